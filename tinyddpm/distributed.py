"""Data parallelism over MPI: N processes ("ranks") train one model, each on its share of every batch.

What data parallelism is. Every rank holds a full copy of the model, the optimiser state and the EMA.
Each step the global batch of B images (``--batch-size``) is cut into N shards of B/N; rank r runs
the forward and backward pass on shard r only, which is where the time goes. Then the ranks average
their gradients (one *all-reduce* of the flat gradient buffer, ``optim.FlatParameters``), and every
rank applies the same clipping, Adam and EMA update to the same parameters: the copies never drift
apart, so there is one model, trained N times as fast as one process could (less the all-reduce).

Why the averaged gradient is the one-big-batch gradient. The loss of a batch is the mean of its
per-sample losses, L = (1/B) Σᵢ ℓᵢ, and a gradient is linear, so with shards S_r of equal size B/N

    ∇L = (1/B) Σᵢ ∇ℓᵢ = (1/N) Σ_r [(N/B) Σ_{i∈S_r} ∇ℓᵢ] = (1/N) Σ_r ∇L_r,

the mean over the ranks of each shard's mean-loss gradient. (Only the order of the float additions
differs, so the two agree to float32 rounding, not bit for bit.) It holds because nothing in the
U-Net mixes samples: GroupNorm and attention work per image, there is no BatchNorm. With the
training draws made for the whole batch on every rank (see ``Trainer.train_step``), N ranks with
B/N images each take the same steps as one process with B.

The pieces here:
- ``world()``: this process's ``World`` (rank, size, collectives). A world of one, with no MPI at all,
  when the process was not started by ``mpiexec``/``mpirun`` (or mpi4py is not installed).
- ``gradient_averager``: the per-step all-reduce, MPI on host (NumPy) buffers and NCCL on GPU
  (CuPy) buffers, which never leave the device.
- ``checksum`` and ``World.check_same``: every K steps the ranks compare a checksum of their
  parameters and stop, on one line, if they differ.
- Every wait on the other ranks is bounded by ``TINYDDPM_MPI_TIMEOUT`` seconds (default 600): a rank
  that dies or hangs makes the others stop with an error instead of waiting for ever. (``mpiexec``
  usually kills the job itself when a rank dies; the timeout covers launchers and hangs that do not.)

Randomness (what makes N ranks equal one process): the batch indices, timesteps, noise and
null-label draws come from one stream that every rank advances identically, drawing for the whole
global batch and keeping its own rows; only dropout, which needs no agreement, draws from a per-rank
stream (``tinyddpm.random.use_rank_stream``). Both are in the checkpoint.
"""
import functools
import os
import shutil
import sys
import time

import numpy as np

from . import device as _dev

TIMEOUT_ENV = "TINYDDPM_MPI_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0  # generous: a rank may wait this long for another's sampling batch on a CPU
CHECK_EVERY = 100          # steps between parameter checksums (and before every checkpoint)

# Environment variables the common launchers set in every process they start (MPICH/Intel MPI's
# Hydra, Open MPI, MVAPICH, PMIx launchers such as Slurm's srun --mpi=pmix, which names only the
# rank): MPI is used only when one is set.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


class DistributedError(RuntimeError):
    """The ranks cannot go on together: one stopped answering, or their parameters differ."""


class StoppedOnRoot(DistributedError):
    """Raised on ranks 1…N−1 when rank 0 refused to start (rank 0 prints why)."""


def agreed(error):
    """Mark ``error`` as raised on every rank at once: the CLI prints it once (on rank 0) and exits,
    with no rank left waiting for another."""
    error.every_rank = True
    return error


class World:
    """The ranks of one run. ``comm`` is an mpi4py communicator, or None for a world of one (then
    every collective below returns at once, with what one process would have)."""

    def __init__(self, comm=None, timeout=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        if timeout is None:  # a world of one never waits: only an MPI run reads the setting
            timeout = _timeout_from_env() if comm is not None else DEFAULT_TIMEOUT_S
        self.timeout = timeout
        self.local_rank, self.local_size = self._local_ranks()

    @property
    def is_root(self):
        """Rank 0: the one rank that reads inputs and writes files."""
        return self.rank == 0

    def _local_ranks(self):
        """(rank among the ranks on this machine, how many there are): which GPU and how many cores are this rank's."""
        if self.comm is None:
            return 0, 1
        from mpi4py import MPI
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_rank(), node.Get_size()
        finally:
            node.Free()

    # ---- splitting work -------------------------------------------------------------------------------
    def shard(self, batch_size):
        """The rows of a global batch of ``batch_size`` that this rank computes: the rank-th of size equal slices."""
        if batch_size % self.size:
            raise agreed(ValueError(f"--batch-size {batch_size} must divide over the {self.size} ranks: "
                                    f"give a multiple of {self.size}"))
        rows = batch_size // self.size
        return slice(self.rank * rows, (self.rank + 1) * rows)

    def my_batches(self, count):
        """The batch indices 0 … count−1 this rank computes: every size-th, starting at its rank (round robin)."""
        return range(self.rank, count, self.size)

    # ---- waiting, bounded ----------------------------------------------------------------------------
    def wait(self, done, what, on_timeout=None):
        """Poll ``done()`` until it is true; after ``timeout`` seconds raise DistributedError (calling
        ``on_timeout`` first). Spinning rather than sleeping: MPI progresses a message only inside
        its calls, as MPI's own blocking wait spins."""
        deadline = time.monotonic() + self.timeout
        while not done():
            if time.monotonic() > deadline:
                if on_timeout is not None:
                    on_timeout()
                raise DistributedError(f"no answer from the other ranks for {self.timeout:g} s "
                                       f"while {what}: a rank has died or hangs ({TIMEOUT_ENV} sets the limit)")

    def _request(self, request, what):
        self.wait(request.Test, what)

    def _all_here(self, what):
        """Wait (bounded) until every rank has reached this point, so the blocking call that follows
        cannot hang on a rank that is gone."""
        if self.comm is not None:
            self._request(self.comm.Ibarrier(), what)

    # ---- collectives (identities in a world of one) --------------------------------------------------
    def broadcast(self, obj, what="sharing rank 0's data"):
        """Rank 0's ``obj`` on every rank (any picklable object; the others pass None)."""
        if self.size == 1:
            return obj
        self._all_here(what)
        return self.comm.bcast(obj, root=0)

    def gather(self, obj, what="gathering results on rank 0"):
        """[obj of rank 0, …, obj of rank N−1] on rank 0, None elsewhere."""
        if self.size == 1:
            return [obj]
        self._all_here(what)
        return self.comm.gather(obj, root=0)

    def gather_in_order(self, parts, what="gathering results on rank 0"):
        """Rank 0: the values of every rank's {index: value} dict, in the order of their indices (the
        work ``my_batches`` dealt out, put back in one process's order); None elsewhere."""
        gathered = self.gather(parts, what)
        if gathered is None:
            return None
        merged = {index: value for part in gathered for index, value in part.items()}
        return [merged[index] for index in sorted(merged)]

    def allgather(self, obj, what="comparing the ranks"):
        """[obj of rank 0, …, obj of rank N−1] on every rank."""
        if self.size == 1:
            return [obj]
        self._all_here(what)
        return self.comm.allgather(obj)

    def allreduce_sum(self, buffer, what):
        """buffer ← Σ over the ranks of buffer, in place (a NumPy array)."""
        if self.comm is None:
            return buffer
        from mpi4py import MPI
        self._request(self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM), what)
        return buffer

    def mean(self, value, what="averaging the loss"):
        """The mean over the ranks of a number (float64)."""
        if self.size == 1:
            return value
        total = self.allreduce_sum(np.array([value], dtype=np.float64), what)
        return float(total[0]) / self.size

    def on_root(self, fn, *args):
        """fn(*args) on rank 0 only: its result there, None elsewhere. If it raises, every rank
        raises (rank 0 the error itself, the others StoppedOnRoot), so no rank goes on alone: this
        is how rank 0's checks of the inputs and outputs stop every rank before any step."""
        if self.size == 1:
            return fn(*args)
        result, failure = None, None
        if self.is_root:
            try:
                result = fn(*args)
            except Exception as e:  # any failure, a bug too: the other ranks must not wait for ever
                failure = e
        message = self.broadcast(None if failure is None else str(failure), "waiting for rank 0's checks")
        if failure is not None:
            raise agreed(failure)
        if message is not None:
            raise agreed(StoppedOnRoot(message))
        return result

    def check_same(self, value, what):
        """Stop every rank (DistributedError, on every rank at once) unless all ranks hold the same ``value``."""
        values = self.allgather(value, f"comparing the {what}")
        if len(set(values)) > 1:
            raise agreed(DistributedError(
                f"the ranks' {what} differ (checksums {', '.join(f'{v:#x}' for v in values)}): they no longer train "
                f"one model, so the run stops"))

    def abort(self, code):
        """End every rank now (MPI_Abort): for a failure the other ranks know nothing of."""
        sys.stderr.flush()
        time.sleep(0.2)  # a moment for the launcher to pass on this rank's last line before the job ends
        self.comm.Abort(code)


def _timeout_from_env():
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the seconds a rank may wait for the others, a number > 0")
    return value


def launched_by_mpi():
    """The world size a launcher announced (mpiexec, mpirun, srun; where it names only this process's
    rank r, at least r + 1), or None when no launcher started this process."""
    for name in _LAUNCHER_SIZE_VARS:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    ranks = [int(os.environ[name]) for name in _LAUNCHER_RANK_VARS if os.environ.get(name, "").isdigit()]
    return ranks[0] + 1 if ranks else None


def mpiexec_path():
    """The mpiexec of this Python's environment (the mpich wheel installs it beside ``python``), else
    the one on PATH; None where there is none."""
    for directory in (os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable))):
        if os.path.isfile(os.path.join(directory, "mpiexec")):
            return os.path.join(directory, "mpiexec")
    return shutil.which("mpiexec")


@functools.cache
def world():
    """This process's World, made once: MPI's COMM_WORLD when a launcher started it, else a world of
    one (MPI is then never imported, so a plain run needs no MPI installed)."""
    size = launched_by_mpi()
    if size is None:
        return World()
    try:
        import mpi4py
    except ImportError:
        if size == 1:
            return World()
        raise agreed(ValueError(f"started by an MPI launcher as one of {size} processes, but mpi4py is not "
                                f"installed: pip install 'tinyddpm[mpi]'")) from None
    mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI (the kernels' threads never do)
    from mpi4py import MPI
    result = World(MPI.COMM_WORLD)
    if result.local_size > 1 and "TINYDDPM_NUM_THREADS" not in os.environ:
        # ranks sharing a machine share its cores: without this each would start a thread per core
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["TINYDDPM_NUM_THREADS"] = str(max(1, cores // result.local_size))
    return result


def select_local_gpu(world):
    """Give each rank on a machine its own GPU, by its local rank, before anything starts CUDA: the
    GPUs a scheduler left visible (CUDA_VISIBLE_DEVICES), else 0, 1, …; NCCL refuses two ranks on one
    GPU. A single visible GPU per rank (as ``srun --gpus-per-task=1`` leaves it) is kept."""
    if world.local_size == 1:
        return
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) == 1:
        return
    if visible and len(visible) < world.local_size:
        raise agreed(ValueError(f"{world.local_size} ranks on this machine but CUDA_VISIBLE_DEVICES names "
                                f"{len(visible)} GPUs: start at most one rank per GPU"))
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[world.local_rank] if visible else str(world.local_rank)


# ---- the gradient all-reduce -------------------------------------------------------------------------
def gradient_averager(world, flats):
    """What averages the gradients of ``flats`` (FlatParameters) over the ranks each step: None when
    the process was not started by MPI (a plain run), else NCCL for GPU buffers and MPI for host ones.
    A world of one started by ``mpiexec -n 1`` takes the same path as N ranks (so one GPU can test it)."""
    if world.comm is None:
        return None
    return NcclAverager(world) if _dev.is_cupy(flats[0].grad) else HostAverager(world)


class HostAverager:
    """g ← (1/N) Σ_r g_r over NumPy buffers with MPI_Iallreduce, in place: one message per flat buffer."""

    def __init__(self, world):
        self.world = world

    def average(self, flats):
        for flat in flats:
            grad = flat.gather_grads()
            self.world.allreduce_sum(grad, "averaging the gradients")
            if self.world.size > 1:
                np.multiply(grad, 1.0 / self.world.size, out=grad)


class NcclAverager:
    """g ← (1/N) Σ_r g_r over CuPy buffers with NCCL, device to device: the gradients never cross to
    the host. The ranks come from MPI; rank 0 makes the NCCL unique id and MPI carries it to the
    others, which is all MPI does on this path.

    NCCL's all-reduce runs as a kernel on the current stream, queued behind the backward pass and
    ahead of the clipping/Adam kernels, so no synchronisation is needed for correctness; the host
    waits for it (polling an event, bounded by the timeout, then ``ncclCommAbort``) only so that a
    dead rank cannot hang this one inside the next device→host read."""

    def __init__(self, world):
        from cupy.cuda import nccl
        if not nccl.available:
            raise _dev.DeviceError("--device cuda under MPI averages gradients with NCCL, which CuPy cannot load "
                                   "here: install NCCL (e.g. pip install nvidia-nccl-cu12, or -cu13)")
        self.world, self.nccl = world, nccl
        unique_id = world.broadcast(nccl.get_unique_id() if world.is_root else None, "sharing the NCCL id")
        self.comm = nccl.NcclCommunicator(world.size, unique_id, world.rank)
        self.types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}

    def average(self, flats):
        import cupy
        stream = cupy.cuda.get_current_stream()
        for flat in flats:
            grad = flat.gather_grads()
            self.comm.allReduce(grad.data.ptr, grad.data.ptr, grad.size, self.types[grad.dtype], self.nccl.NCCL_SUM,
                                stream.ptr)
            if self.world.size > 1:
                cupy.multiply(grad, 1.0 / self.world.size, out=grad)
        finished = stream.record()
        self.world.wait(lambda: finished.done, "averaging the gradients (NCCL)", on_timeout=self.comm.abort)


def checksum(arrays):
    """Σ of the arrays' bytes read as uint32 words, mod 2⁶⁴, computed where they live (one number crosses
    to the host): equal on two ranks when their arrays are equal bit for bit, and any one changed word
    changes it."""
    total = 0
    for a in arrays:
        xp = _dev.array_module(a)
        total += int(xp.sum(a.view(np.uint32), dtype=np.uint64))
    return total % (1 << 64)

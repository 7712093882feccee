"""The CPU kernels' thread pool (kernels/cpu_threads.py): same bits for any thread count, BLAS kept at
one thread, nested maps that do not wait on themselves, one clear error for a bad thread count."""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import tinyddpm  # noqa: F401  (importing it is what limits BLAS)
from tinyddpm.kernels import attention, cpu_threads, shifted_gemm, winograd, winograd4
from tinyddpm.kernels.attention import attention_backward_cpu, attention_forward_cpu
from tinyddpm.kernels.conv2d import conv2d_backward_cpu, conv2d_forward_cpu
from tinyddpm.kernels.group_norm import group_norm_backward_cpu, group_norm_forward_cpu
from tinyddpm.kernels.group_norm_silu import group_norm_silu_backward_cpu, group_norm_silu_forward_cpu


def _conv(method, cin, ksize, rng):
    x = rng.standard_normal((7, cin, 9, 11)).astype(np.float32) + 0.5
    w = rng.standard_normal((5, cin, ksize, ksize)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    y, saved = conv2d_forward_cpu(x, w, b, 1, ksize // 2, method=method)
    assert saved["method"] == ("pointwise" if ksize == 1 else method)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    return (y, *conv2d_backward_cpu(saved, dy))


def _group_norm_silu(rng):
    x = rng.standard_normal((9, 12, 5, 3)).astype(np.float32) + 2.0
    weight, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    emb = rng.standard_normal((9, 12)).astype(np.float32)
    y, saved = group_norm_silu_forward_cpu(x, 4, weight, bias, emb)
    return (y, *group_norm_silu_backward_cpu(saved, rng.standard_normal(y.shape).astype(np.float32)))


def _group_norm(rng):
    x = rng.standard_normal((9, 12, 5, 3)).astype(np.float32) - 1.0
    weight, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    y, saved = group_norm_forward_cpu(x, 3, weight, bias)
    return (y, *group_norm_backward_cpu(saved, rng.standard_normal(y.shape).astype(np.float32)))


def _attention(rng):
    q, k, v = (rng.standard_normal((11, 3, 7, 4)).astype(np.float32) for _ in range(3))
    o, saved = attention_forward_cpu(q, k, v)
    return (o, *attention_backward_cpu(saved, rng.standard_normal(o.shape).astype(np.float32)))


def _attention_row_blocks(rng):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "SCORE_BLOCK_BYTES", 1)  # one query row per block: dK, dV add up over 7
        return _attention(rng)


CASES = {
    "conv2d winograd": lambda rng: _conv("winograd", 8, 3, rng),
    "conv2d winograd4": lambda rng: _conv("winograd4", 8, 3, rng),
    "conv2d shifted": lambda rng: _conv("shifted", 3, 3, rng),
    "conv2d direct": lambda rng: _conv("direct", 2, 3, rng),
    "conv2d pointwise": lambda rng: _conv("auto", 6, 1, rng),
    "group_norm": _group_norm,
    "group_norm_silu": _group_norm_silu,
    "attention": _attention,
    "attention, row blocks": _attention_row_blocks,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_results_are_the_same_bits_for_one_thread_and_for_the_pool(name, monkeypatch):
    """Each task writes its own part and partial sums are added in task order, so neither the thread
    count nor which thread ran which task can move a bit (the run stays repeatable on any machine)."""
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 1)      # one image per chunk: several tasks even at N = 7
    monkeypatch.setattr(winograd4, "CHUNK_BYTES", 1)
    monkeypatch.setattr(shifted_gemm, "CHUNK_BYTES", 1)
    monkeypatch.setattr(cpu_threads, "POOL_MIN_ELEMENTS", 0)  # row-wise ops: several tasks at these sizes too
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", "2")
    pooled = CASES[name](np.random.default_rng(3))
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", "1")
    serial = CASES[name](np.random.default_rng(3))
    for a, b in zip(pooled, serial):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_blas_runs_single_threaded_once_tinyddpm_is_imported():
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)


def test_parallel_map_keeps_order_and_a_nested_map_runs_inline(monkeypatch):
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", "2")
    outer_threads = []

    def outer(i):
        outer_threads.append(threading.current_thread().name)
        return cpu_threads.parallel_map(lambda j: 10 * i + j, range(3))  # from inside an item: inline, no deadlock
    assert cpu_threads.parallel_map(outer, range(5)) == [[10 * i + j for j in range(3)] for i in range(5)]
    main = threading.current_thread().name
    assert all(name == main or name.startswith("tinyddpm-") for name in outer_threads)


def test_parallel_map_runs_items_on_two_threads_at_once(monkeypatch):
    """Two items that each wait for the other can only finish if a helper runs beside the caller."""
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", "2")
    both = threading.Barrier(2, timeout=30)
    assert cpu_threads.parallel_map(lambda i: both.wait() >= 0 and i, range(2)) == [0, 1]


def test_an_error_in_any_item_reaches_the_caller_after_the_others_ran(monkeypatch):
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", "2")
    ran = []

    def item(i):
        ran.append(i)
        if i == 3:
            raise ZeroDivisionError("item 3")
    with pytest.raises(ZeroDivisionError, match="item 3"):
        cpu_threads.parallel_map(item, range(6))
    assert sorted(ran) == list(range(6))


@pytest.mark.parametrize("count", [0, 1, 5, 8, 9, 64, 1000])
def test_task_slices_cut_the_range_exactly_into_at_most_tasks_pieces(count):
    slices = cpu_threads.task_slices(count)
    covered = [i for part in slices for i in range(count)[part]]
    assert covered == list(range(count))
    assert 1 <= len(slices) <= cpu_threads.TASKS
    assert all(part.stop > part.start for part in slices) or count == 0


def test_row_tasks_keep_a_small_op_in_one_task():
    assert cpu_threads.row_tasks(64, cpu_threads.POOL_MIN_ELEMENTS - 1) == [slice(0, 64)]
    assert cpu_threads.row_tasks(64, cpu_threads.POOL_MIN_ELEMENTS) == cpu_threads.task_slices(64)


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_a_bad_thread_count_is_one_clear_error(value, monkeypatch):
    monkeypatch.setenv("TINYDDPM_NUM_THREADS", value)
    with pytest.raises(ValueError, match="TINYDDPM_NUM_THREADS"):
        cpu_threads.num_threads()

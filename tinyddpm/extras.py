"""The optional parts (setup.cfg's extras, and PyTorch for the benchmarks' twins) and the one line that
says how to install one that is missing, instead of the traceback of whatever failed to load it."""
import os
import sys

from .device import DeviceError

PTX = 'pip install -e ".[ptx]"'
TORCH = "pip install torch"


class MissingExtraError(RuntimeError):
    """An optional part is not installed: the message is one line ending in the command that installs it."""


def import_torch(purpose):
    """``import torch``, or MissingExtraError naming ``pip install torch`` for ``purpose``."""
    try:
        import torch
    except ModuleNotFoundError as e:
        if e.name != "torch":  # torch is there but broken: its own error says more than we could
            raise
        raise MissingExtraError(f"{purpose} needs PyTorch: {TORCH}") from None
    return torch


def exit_code(main, argv=None):
    """``main(argv)``, or 2 after one line on stderr when it needs a part that is not installed or a
    device it cannot use (TINYDDPM_DEBUG=1 shows the traceback instead): what a script exits with."""
    try:
        return main(argv)
    except (MissingExtraError, DeviceError) as e:
        if os.environ.get("TINYDDPM_DEBUG"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        return 2

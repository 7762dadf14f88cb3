"""The one check of a device a user names (Engine, FeatureExtractor, `--device` of every
subcommand, `vggfast train`): a device that does not exist here is refused in one line saying
what does, before anything is loaded onto it. torch.device() alone accepts "cpu:1", "cuda:7" on
a one-GPU machine and "mps" without Metal; they failed later, far from the argument, or not at
all ("cpu:1" ran on the CPU as if it were a second one)."""
from __future__ import annotations

import numbers
import os
from typing import Any

import torch

from .errors import ArgumentError


def _present() -> str:
    """What a device error names as existing: the devices vggfast can run on here."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not n:
        return "this machine has cpu and no CUDA device"
    return "this machine has cpu, " + ", ".join(f"cuda:{i}" for i in range(n))


def check_device(device: Any, cuda_index: int | None = None) -> torch.device:
    """The torch.device that `device` names, checked to exist here.

    device: None (cuda if available, else cpu), a string ("cpu", "cuda", "cuda:N"), a
    torch.device, or an int N (cuda:N, as torch reads it). A bare "cuda" gets index `cuda_index`
    (None: the current CUDA device), so the result compares equal to the device its tensors
    report. Raises ArgumentError for a malformed name, an unknown or unsupported type, "cpu:N"
    with N != 0, a CUDA device without CUDA or with N >= the device count.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, numbers.Integral)):
        raise ArgumentError(f"device must be a name such as 'cpu' or 'cuda:0' or a torch.device, "
                            f"not {type(device).__name__} {device!r}")
    try:
        dev = torch.device(device if not isinstance(device, numbers.Integral) else int(device))
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N' "
                            f"({_present()})") from None
    if dev.type == "cpu":
        # torch has one CPU device; "cpu:1" is accepted by torch.device and silently the same one
        if dev.index not in (None, 0):
            raise ArgumentError(f"device {device!r} does not exist: the CPU is 'cpu' (or "
                                f"'cpu:0'); {_present()}")
        return torch.device("cpu")
    if dev.type != "cuda":
        if dev.type == "mps" and not torch.backends.mps.is_available():
            why = "does not exist here (no Metal/MPS)"
        else:
            why = "is not one vggfast runs on (cpu or cuda)"
        raise ArgumentError(f"device {device!r} {why}; {_present()}")
    if not torch.cuda.is_available():
        raise ArgumentError(f"device {device!r} requested but CUDA is not available; "
                            f"{_present()}")
    index = dev.index
    if index is None:
        index = torch.cuda.current_device() if cuda_index is None else cuda_index
    if index >= torch.cuda.device_count():
        # only a cuda_index (torchrun's LOCAL_RANK) can point a bare "cuda" past the last GPU
        what = repr(device) if dev.index is not None else f"cuda:{index} (LOCAL_RANK {index})"
        raise ArgumentError(f"device {what} does not exist; {_present()}")
    return torch.device("cuda", index)


def _ranks_on_this_node() -> int:
    """How many torchrun ranks share this machine's GPUs: LOCAL_WORLD_SIZE (torchrun sets it),
    else WORLD_SIZE (a hand-made launch: assume one node); 1 when not launched by either."""
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        try:
            return max(int(os.environ[name]), 1)
        except (KeyError, ValueError):
            continue
    return 1


def rank_device(device: Any, *, same_on_every_rank: bool) -> torch.device:
    """The checked device of this process when it is one of torchrun's ranks: a bare "cuda" (or
    the default on a CUDA machine) is cuda:LOCAL_RANK, as torch's DDP recipes use.

    An explicit "cuda:N" with several ranks on this node put all of them on GPU N (nccl then
    fails in its first collective, "Duplicate GPU detected", or the GPU's memory runs out):
    same_on_every_rank (a command line, the same argv for every rank): any index is refused, by
    every rank alike, before a group is joined; otherwise (a library caller naming each rank's
    device): an index other than LOCAL_RANK is refused. One rank per node keeps any index.
    """
    from .distributed import local_rank
    lr = local_rank()
    dev = check_device(device, cuda_index=lr)
    n = _ranks_on_this_node()
    if dev.type != "cuda" or n < 2:
        return dev
    explicit = (isinstance(device, numbers.Integral)
                or torch.device(device).index is not None) if device is not None else False
    if not explicit or (not same_on_every_rank and dev.index == lr):
        return dev
    if same_on_every_rank:
        raise ArgumentError(f"--device {device} under torchrun puts all {n} ranks of this machine "
                            f"on one GPU; pass --device cuda (each rank takes cuda:LOCAL_RANK), "
                            f"and choose the GPUs with CUDA_VISIBLE_DEVICES")
    raise ArgumentError(f"device {device!r} is not this rank's GPU: {n} ranks share this machine "
                        f"and LOCAL_RANK is {lr}; pass 'cuda' (each rank takes cuda:LOCAL_RANK) "
                        f"or 'cuda:{lr}'")

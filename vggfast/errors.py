"""Errors a user can cause. Every one is a `VGGFastError`, so callers catch one type."""

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")
# torch.OutOfMemoryError from torch 2.5; the same class as torch.cuda.OutOfMemoryError, which 2.4 has
_TorchOOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# The command line's exit status for bad input: a usage error or a VGGFastError (nothing done),
# and a run that skipped some images and did the others (classify, extract, evaluate). One
# status for both, so a script tests `!= 0` and reads stderr for which.
PARTIAL = 2


class VGGFastError(Exception):
    """Base of every error caused by user input (weights, images, arguments).

    An error about one image of a request also says which: `image` is its index there and
    `reason` the message's words after "image K " ("image K: " for an image of a list that
    could not be read; None and "" otherwise).
    """

    image: int | None = None
    reason: str = ""


class WeightsError(VGGFastError):
    """The weights are missing, unreadable, of an unknown layout, or unusable for the request."""


class ImageError(VGGFastError):
    """An image could not be read, decoded or converted."""


class ArgumentError(VGGFastError, ValueError):
    """An argument is out of range or of the wrong kind (scales, top_k, method, config...)."""


class MemoryBudgetError(VGGFastError):
    """A request would need more activation memory than the engine's budget allows."""


class OutOfMemoryError(VGGFastError, _TorchOOM, MemoryError):
    """The machine's allocator refused memory a request needs: the check made against the memory
    budget before anything is allocated let it through (a budget raised past what the machine
    holds, VGGFAST_MEMORY_BUDGET=1TiB on a 16 GB host; a GPU another process fills). Also a
    torch.OutOfMemoryError and a MemoryError, so code written for PyTorch's own (catch it, lower
    the batch, retry) keeps working; the allocator's error is its __cause__."""


OUT_OF_MEMORY_ADVICE = (
    "the request needs more memory than this machine has free: ask for less (smaller scales or "
    "batches, fewer images), or keep the memory budget (VGGFAST_MEMORY_BUDGET, "
    "Engine(..., memory_budget=)) within the memory it has")


def allocator_failure(exc: BaseException) -> str | None:
    """The allocator's own words (its first line) when `exc` is a failed allocation, a
    MemoryError or PyTorch's RuntimeError of one (CPU "can't allocate memory", CUDA "out of
    memory"); None for any other error, which is a bug and keeps its traceback."""
    if isinstance(exc, OutOfMemoryError):
        return None                     # already ours: passed on as it is
    if isinstance(exc, MemoryError):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    text = str(exc).strip()
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or
                                          "out of memory" in text.lower()):
        return text.splitlines()[0] if text else "out of memory"
    return None


def raising_out_of_memory(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, whose failed allocations raise an OutOfMemoryError that says what to do (one line)
    instead of the allocator's multi-line report; every other error passes through unchanged."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, MemoryError) as exc:
            why = allocator_failure(exc)
            if why is None:
                raise
            raise OutOfMemoryError(f"{why}; {OUT_OF_MEMORY_ADVICE}") from exc
    return wrapper

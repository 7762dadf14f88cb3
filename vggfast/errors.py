"""Errors a user can cause. Every one is a `VGGFastError`, so callers catch one type."""

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

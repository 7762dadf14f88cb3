"""torchrun's environment and the process group, for the two commands that run under it
(`vggfast train`, `vggfast extract`): which rank this process is, and how it leaves the group."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from typing import Iterator

from .errors import VGGFastError


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise VGGFastError("RANK / WORLD_SIZE in the environment are not integers")
    if world < 1 or not 0 <= rank < world:
        raise VGGFastError(f"RANK={rank} / WORLD_SIZE={world}: need WORLD_SIZE >= 1 and "
                           "0 <= RANK < WORLD_SIZE")
    return rank, world


def launch_info(command: str, what: str) -> tuple[int, int]:
    """dist_info() for a command that joins torchrun's process group when WORLD_SIZE > 1 (`vggfast
    train`, `vggfast extract`): a world of several ranks without MASTER_ADDR / MASTER_PORT (a
    WORLD_SIZE left in the shell, no torchrun) is refused in one line before anything is loaded;
    init_process_group's env:// rendezvous raised a ValueError traceback for it. what: the run
    as the message names it ("a sharded extract")."""
    rank, world = dist_info()
    if world > 1 and not (os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT")):
        raise VGGFastError(f"WORLD_SIZE={world} without MASTER_ADDR / MASTER_PORT: the ranks of "
                           f"{what} run together, e.g. `torchrun --nproc-per-node {world} -m "
                           f"vggfast {command} ...`")
    return rank, world


def local_rank() -> int:
    """torchrun's LOCAL_RANK (this process's GPU on its node); 0 when not launched by it."""
    value = os.environ.get("LOCAL_RANK", "0")
    try:
        local = int(value)
    except ValueError:
        local = -1
    if local < 0:
        raise VGGFastError(f"LOCAL_RANK={value!r} in the environment is not a rank (0, 1, ...)")
    return local


# Set by the CLI when its command is this process's whole life (`python -m vggfast` under
# torchrun), never by a library caller or a test calling cli.main(argv) in its own process.
_process_ends_with_command = False


def command_ends_process() -> None:
    """The CLI entry point's note that the process exits when the command returns (torchrun)."""
    global _process_ends_with_command
    try:
        _process_ends_with_command = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        pass   # dist_info reports it


def finished() -> None:
    """This rank's work is over (its output written, or its error decided) and the process exits
    next: from here torchrun's SIGTERM is ignored, so the status is this rank's own. torchrun
    terminates every rank the moment one exits non-zero, and by design one does: extract's rank
    0 exits 2 when it skipped images, just as the others leave the closing barrier with it; a
    rank caught in its own exit was reported killed (exitcode -15) though it had finished, and
    a user error's 2 on a second rank became -15 likewise. A teardown that hangs still ends:
    torchrun follows with SIGKILL (30 s)."""
    if _process_ends_with_command and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _first_line(exc: BaseException) -> str:
    """The backend's message in brief: the first sentence of its first line, without gloo's
    source location ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] ")
    or its advice ("This is typically caused by a remote worker crashing. Check the logs...")."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return re.split(r"(?<=\.)\s+(?=[A-Z])", line, maxsplit=1)[0][:200]


def _peer_gone(exc: BaseException) -> bool:
    """exc is the backend's report that another rank is gone: gloo's transport errors ("Connection
    closed by peer", "Connection reset by peer", a recv timed out) are plain RuntimeErrors whose
    message names the gloo transport; a store or socket failure is a DistNetworkError. Any other
    RuntimeError (a kernel, a shape) is this rank's own and keeps its traceback. nccl is not
    recognised: its ranks wait out the collective's timeout, or torchrun stops them first."""
    import torch.distributed as dist
    return isinstance(exc, RuntimeError) and (
        "gloo/transport" in str(exc) or isinstance(exc, getattr(dist, "DistNetworkError", ())))


@contextlib.contextmanager
def peers_reported() -> Iterator[None]:
    """Around a rank's work in a group: a collective that fails because another rank failed or
    left mid-run (its error is its own to report) is one VGGFastError line here, exit 2, not
    gloo's traceback (exit 1). SIGTERM is ignored from that moment (`finished`), so torchrun's
    stop of the surviving ranks does not replace the line with a kill (-15)."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, VGGFastError) or not _peer_gone(exc):
            raise
        finished()
        raise VGGFastError(f"rank {dist_info()[0]} stopped: another rank of the run failed or "
                           f"left in the middle of it (see its error): {_first_line(exc)}"
                           ) from None


def leave_process_group(ok: bool) -> None:
    """Leave the process group this process joined; a no-op when none is joined.

    ok: the run succeeded here. Then every rank first meets the others at a barrier, so none
    tears its connections down while another still works or waits on it, and the group is
    destroyed here rather than in the interpreter's exit (gloo ranks left to it were seen aborted
    there, "terminate called without an active exception", SIGABRT, after their work was done).
    A barrier that fails means another rank left without reaching the end: raised as a one-line
    VGGFastError, never a success. A teardown that fails after the barrier is swallowed: every
    rank had finished its work, so the run succeeded (it was a RuntimeError traceback, exit 1).

    Not ok (an exception is on its way out): no barrier, since the others may never come, and a
    failure of the teardown itself is swallowed so the first error and its exit status (2 for a
    user error, 130 for ^C) are what the process reports.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    if not ok:
        finished()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        return
    try:
        dist.barrier()
    except Exception as exc:    # gloo: "Connection closed by peer"; nccl: a timeout
        finished()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        raise VGGFastError(f"rank {dist_info()[0]} finished, but another rank of the run left "
                           f"before the end (see its error): {_first_line(exc)}") from None
    finished()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()

"""vggfast.distributed: how train and extract leave the process group they joined under torchrun.
A successful rank meets the others at a barrier and destroys the group; a failing one leaves at
once and its exit status (2 for a user error) survives a teardown that fails too. A real
one-process gloo group stands in for torchrun's (init_process_group is redirected to it). Real
2-rank torchrun runs (gloo, CPU): a rank whose peer fails while it waits in a collective says so
in one line, and extract's ranks report skipped / unusable images as its --help says."""
import re

import pytest
import torch
import torch.distributed as dist

import vggfast.distributed as vd
import vggfast.features as vf
from conftest import small_model
from test_train import TINY, make_folder
from vggfast.cli import main
from vggfast.errors import VGGFastError


@pytest.fixture
def group(tmp_path, monkeypatch):
    """torchrun's environment for 2 ranks, with init_process_group joining a real 1-process gloo
    group instead; records the barrier and destroy calls, in order."""
    calls = []
    real_init, real_barrier, real_destroy = (dist.init_process_group, dist.barrier,
                                             dist.destroy_process_group)

    def init(backend=None, *a, **k):
        calls.append(f"init {backend}")
        real_init("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    def barrier(*a, **k):
        calls.append("barrier")
        return real_barrier(*a, **k)

    def destroy(*a, **k):
        calls.append("destroy")
        return real_destroy(*a, **k)

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    yield calls
    if dist.is_initialized():   # a test that failed midway leaves no group to the next
        real_destroy()


def test_a_successful_rank_meets_the_others_then_destroys_the_group(group):
    dist.init_process_group("gloo")
    vd.leave_process_group(True)
    assert group == ["init gloo", "barrier", "destroy"] and not dist.is_initialized()
    vd.leave_process_group(True)  # no group: nothing to leave
    assert group == ["init gloo", "barrier", "destroy"]


def test_a_failing_rank_does_not_wait_and_a_failed_teardown_is_swallowed(group, monkeypatch):
    dist.init_process_group("gloo")
    real_destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda: (real_destroy(), (_ for _ in ()).throw(RuntimeError("gloo"))))
    vd.leave_process_group(False)   # the error on its way out is the one the process reports
    assert group == ["init gloo", "destroy"] and not dist.is_initialized()


def test_a_barrier_the_others_never_reach_is_a_one_line_failure(group, monkeypatch):
    dist.init_process_group("gloo")

    def broken(*a, **k):
        group.append("barrier")
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:5678\nmore")

    monkeypatch.setattr(dist, "barrier", broken)
    with pytest.raises(VGGFastError, match=r"^rank 0 finished, but another rank of the run left "
                                           r"before the end \(see its error\): .*Connection "
                                           r"closed by peer \[127.0.0.1\]:5678$"):
        vd.leave_process_group(True)
    assert group == ["init gloo", "barrier", "destroy"] and not dist.is_initialized()


def _tiny_folder(tmp_path):
    return make_folder(tmp_path / "data", n=2)


def test_train_under_torchrun_leaves_through_the_barrier(group, tmp_path):
    data = _tiny_folder(tmp_path)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--config", "A",
                 "--width", str(TINY["width"]), "--image-size", "32", "--workers", "0",
                 "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--quiet"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert group[0] == "init gloo" and group[-2:] == ["barrier", "destroy"], group
    assert not dist.is_initialized()


def _failing_teardown(monkeypatch, group):
    """destroy_process_group raising, as a torn gloo connection can make it."""
    real_destroy = dist.destroy_process_group

    def destroy():
        real_destroy()
        raise RuntimeError("gloo teardown failed")

    monkeypatch.setattr(dist, "destroy_process_group", destroy)


def test_a_user_error_under_torchrun_still_exits_2(group, tmp_path, monkeypatch, capsys):
    """The error path's teardown failing (or succeeding) does not replace the user error: a
    RuntimeError from destroy_process_group in the `finally` was a traceback, exit 1."""
    _failing_teardown(monkeypatch, group)
    data = _tiny_folder(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"a run")
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--workers", "0",
                 "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds a training run" in err, err
    assert group == ["init gloo", "destroy"] and not dist.is_initialized()  # no barrier
    group.clear()
    torch.save(small_model().state_dict(), tmp_path / "tiny.pth")
    assert main(["extract", str(tmp_path / "none"), "--weights", str(tmp_path / "tiny.pth"),
                 "--out", str(tmp_path / "f.npy"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none" in err, err
    assert group == ["init gloo", "destroy"] and not dist.is_initialized()


def test_a_teardown_that_fails_after_the_barrier_leaves_a_success(group, monkeypatch):
    """Every rank met at the barrier, so the run's work is done: destroy_process_group raising
    then (a torn gloo connection) was a RuntimeError traceback out of a successful train or
    extract, exit 1. It is swallowed, and the group is gone."""
    _failing_teardown(monkeypatch, group)
    dist.init_process_group("gloo")
    vd.leave_process_group(True)
    assert group == ["init gloo", "barrier", "destroy"] and not dist.is_initialized()


@pytest.mark.parametrize("env, got", [({}, (0, 1)), ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2))])
def test_the_rank_is_read_by_distributed_only(monkeypatch, env, got):
    """features kept `_dist_info`, an alias of distributed.dist_info that only this test used;
    it is gone, and dist_info is read where it lives. local_rank, public in features before it
    moved, still imports from there."""
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert vd.dist_info() == got
    assert not hasattr(vf, "_dist_info") and vf.local_rank is vd.local_rank


# -- exit status under torchrun ------------------------------------------------------------------

RANK_SCRIPT = """
import sys, time
import torch.distributed as dist
from vggfast import distributed as vd
vd.command_ends_process()            # as the CLI's entry point does under torchrun
dist.init_process_group("gloo")
rank = dist.get_rank()
vd.leave_process_group(True)
if rank == 1:
    time.sleep(3)                    # still on its way out when rank 0 has exited
sys.exit(2 if rank == 0 else 0)      # extract's rank 0: done, with images skipped
"""


def test_a_finished_rank_keeps_its_status_when_another_exits_2_first(tmp_path):
    """torchrun SIGTERMs every rank once one exits non-zero; a rank that had left the group and
    was exiting (0) was reported killed (exitcode -15). With the closing barrier the ranks leave
    together, so test_extract's 2-rank run (rank 0 exits 2: a skipped image) failed so in 2 of 7
    runs on a loaded 2-core machine; here rank 1 is made the slow one, every time."""
    import os
    import re
    import socket
    import subprocess
    import sys
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(port), str(script)], capture_output=True, text=True, env=env,
                       timeout=240)
    assert p.returncode == 1, p.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", p.stderr), p.stderr[-3000:]
    assert not re.search(r"exitcode\s*:\s*-", p.stderr), p.stderr[-3000:]   # no rank killed


def test_only_the_cli_entry_point_under_torchrun_ignores_sigterm_when_done(tmp_path, monkeypatch,
                                                                             capsys):
    """main() as the process's entry (argv None) under torchrun ignores SIGTERM once its command
    is over; main(argv) called in a caller's process (tests, scripts), or without torchrun,
    leaves the caller's handler alone."""
    import signal
    import sys
    torch.save(small_model().state_dict(), tmp_path / "tiny.pth")
    info = ["vggfast", "info", str(tmp_path / "tiny.pth")]
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(vd, "_process_ends_with_command", False)
    try:
        monkeypatch.setattr(sys, "argv", info)
        assert main() == 0                                 # no torchrun
        assert signal.getsignal(signal.SIGTERM) is before
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert main(info[1:]) == 0                         # a caller's process
        assert signal.getsignal(signal.SIGTERM) is before
        assert main() == 0                                 # torchrun's rank process
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    capsys.readouterr()


# -- a rank whose peer fails in the middle of a collective ----------------------------------------

def _torchrun(tmp_path, *cmd, monitor=None):
    """torchrun --nproc_per_node 2 on gloo/CPU; (process, {rank: its stderr}, torchrun's
    summary of failed ranks {rank: exitcode}). monitor: torchrun's --monitor-interval (s)."""
    import os
    import re
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    logs = tmp_path / "logs"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                        str(port), "--log-dir", str(logs), "--redirects", "2",
                        *(["--monitor-interval", str(monitor)] if monitor else []), *cmd],
                       capture_output=True, text=True, env=env, timeout=240)
    err = {int(f.parent.name): f.read_text() for f in logs.glob("**/attempt_0/*/stderr.log")}
    codes = {int(r): int(c) for r, c in re.findall(
        r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", p.stderr)}
    return p, err, codes


def _one_line(text, start):
    ok = start.fullmatch(text) if isinstance(start, re.Pattern) else text.startswith(start)
    assert text.count("\n") == 1 and ok, text[-3000:]


PEER_GONE = re.compile(r"vggfast: error: rank 1 stopped: another rank of the run failed or left "
                       r"in the middle of it \(see its error\): [^\n]*"
                       r"(Connection closed by peer|Connection reset by peer)[^\n]*\.\n")
# torchrun polls its ranks every 0.1 s and SIGTERMs the others once one has exited non-zero; a
# rank it stops before the closed connection reaches it exits -15 without a word, as torchrun
# means it to. 1 s between polls keeps that race out of what these tests look at: what a rank
# says when its collective fails.
MONITOR_S = 1


def test_train_a_rank_whose_peer_failed_mid_collective_says_so_in_one_line(tmp_path):
    """Rank 0 alone creates --out; it cannot (a file is in the way), exits 2 and closes its
    connections while rank 1 waits in DDP's first broadcast: rank 1 reported gloo's "Connection
    closed by peer" as a traceback, exit 1. Each rank now exits 2 with its own one line."""
    data = _tiny_folder(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    p, err, codes = _torchrun(tmp_path, "-m", "vggfast", "train", "--data", str(data), "--out",
                              str(tmp_path / "file" / "run"), "--config", "A", "--width",
                              str(TINY["width"]), "--image-size", "32", "--workers", "0",
                              "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--quiet",
                              monitor=MONITOR_S)
    assert p.returncode == 1 and codes == {0: 2, 1: 2}, (codes, p.stderr[-3000:])
    _one_line(err[0], "vggfast: error: cannot create --out")
    _one_line(err[1], PEER_GONE)                    # without gloo's source location and advice
    assert "pair.cc" not in err[1] and "typically" not in err[1], err[1]


EXTRACT_RANK0_FAILS = """
import sys
import vggfast.preprocess as pp
from vggfast import distributed as vd
from vggfast.cli import main
from vggfast.errors import VGGFastError
real = pp.atomic_write
def write(path, how):                # rank 0 cannot write the output, after the work of both
    if path.name == "f.npy":         # ranks; rank 1 waits in the gather that follows
        raise VGGFastError(f"cannot write {path}: No space left on device")
    real(path, how)
if vd.dist_info()[0] == 0:
    pp.atomic_write = write
sys.argv[0] = "vggfast"
sys.exit(main())                     # the CLI's entry point, as `-m vggfast` runs it
"""


def test_extract_a_rank_whose_peer_failed_mid_collective_says_so_in_one_line(tmp_path):
    from PIL import Image
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 36), (40 * i, 90, 200)).save(imgs / f"{i}.png")
    torch.save(small_model().state_dict(), tmp_path / "tiny.pth")
    script = tmp_path / "rank0_fails.py"
    script.write_text(EXTRACT_RANK0_FAILS)
    p, err, codes = _torchrun(tmp_path, str(script), "extract", str(imgs), "--weights",
                              str(tmp_path / "tiny.pth"), "--out", str(tmp_path / "f.npy"),
                              "--scales", "32", "--no-flip", "--device", "cpu", "--quiet",
                              monitor=MONITOR_S)
    assert p.returncode == 1 and codes == {0: 2, 1: 2}, (codes, p.stderr[-3000:])
    _one_line(err[0], f"vggfast: error: cannot write {tmp_path / 'f.npy'}: No space left")
    _one_line(err[1], PEER_GONE)
    assert len(list((tmp_path / "f.npy.parts").glob("r1-*.npy"))) == 1  # rank 1 had done its share


def test_extract_under_torchrun_rank_0_reports_skipped_and_none_usable_the_others_exit_0(
        tmp_path):
    """What each rank says and returns when images are skipped: rank 0 reports the run (2 and
    the skipped files, or 2 and "none of the images could be used"), rank 1 exits 0 silently,
    its share done. In the "none" case rank 1 exited 2, "another rank ... left before the end":
    rank 0 had skipped the closing barrier as if it failed mid-run."""
    from PIL import Image
    torch.save(small_model().state_dict(), tmp_path / "tiny.pth")
    some, none = tmp_path / "some", tmp_path / "none"
    for d in (some, none):
        d.mkdir()
        (d / "0_broken.png").write_bytes(b"not a png")
        (d / "1_broken.png").write_bytes(b"not a png either")
    Image.new("RGB", (40, 36), (10, 90, 200)).save(some / "2_ok.png")
    for src, rank0 in ((some, r"vggfast: skipped \S+0_broken.png: .*\nvggfast: skipped \S+"
                              r"1_broken.png: .*\n$"),
                       (none, r"vggfast: error: none of the 2 images could be used; the first: "
                              r"\S+0_broken.png: .*\n$")):
        run = tmp_path / f"run-{src.name}"
        run.mkdir()
        p, err, codes = _torchrun(run, "-m", "vggfast", "extract", str(src), "--weights",
                                  str(tmp_path / "tiny.pth"), "--out", str(run / "f.npy"),
                                  "--scales", "32", "--no-flip", "--device", "cpu", "--quiet")
        assert p.returncode == 1 and codes == {0: 2}, (src.name, codes, p.stderr[-3000:])
        assert re.fullmatch(rank0, err[0]), err[0]
        assert err[1] == "", err[1]
        assert (run / "f.npy").exists() == (src is some)
        assert not (run / "f.npy.parts").exists()


@pytest.mark.parametrize("env, why", [
    (dict(WORLD_SIZE="two"), "RANK / WORLD_SIZE in the environment are not integers"),
    (dict(WORLD_SIZE="2", RANK="0"), "WORLD_SIZE=2 without MASTER_ADDR / MASTER_PORT: the ranks of "
                                     "{what} run together, e.g. `torchrun --nproc-per-node 2 -m "
                                     "vggfast {command} ...`")])
def test_a_torchrun_environment_that_cannot_be_joined_is_one_line(env, why, tmp_path, monkeypatch,
                                                                  capsys):
    """train read WORLD_SIZE with int() (a ValueError traceback for "two") and, without
    MASTER_ADDR, left the env:// rendezvous to raise its ValueError traceback; extract refused
    both in one line. Both now share distributed.launch_info: one line, exit 2, no group."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda *a, **k: pytest.fail("joined a group it was refused"))
    torch.save(small_model().state_dict(), tmp_path / "tiny.pth")
    runs = {"train": ("a distributed training",
                      ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                       "--device", "cpu", "--quiet"]),
            "extract": ("a sharded extract",
                        ["extract", str(tmp_path / "none"), "--weights", str(tmp_path / "tiny.pth"),
                         "--out", str(tmp_path / "f.npy"), "--device", "cpu"])}
    for command, (what, argv) in runs.items():
        assert main(argv) == 2, command
        err = capsys.readouterr().err
        assert err == f"vggfast: error: {why.format(what=what, command=command)}\n", err
    assert not dist.is_initialized()

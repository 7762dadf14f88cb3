"""`vggfast extract`: bad files skipped and reported, resume after an interruption, 2-rank torchrun
sharding (gloo, CPU) equal to one rank."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vggfast.features as vf
from conftest import small_model
from vggfast import Engine
from vggfast.cli import main

ARGS = ["--scales", "32", "48", "--layer", "relu7", "--quiet"]


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(small_model("D", num_classes=10).state_dict(), path)
    return str(path)


@pytest.fixture
def folder(tmp_path, samples):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    shutil.copy(samples["cat"], d / "a_cat.jpg")
    (d / "b_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    shutil.copy(samples["coffee"], d / "c_coffee.jpg")
    Image.open(samples["rocket"]).save(d / "sub" / "d_rocket.png")
    shutil.copy(samples["astronaut"], d / "e_astro.jpg")
    (d / "notes.txt").write_text("not an image suffix: ignored")
    return d


def _load(out):
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


def test_extract_skips_bad_files_and_matches_engine_features(weights, folder, tmp_path, capsys):
    out = tmp_path / "feats.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    cap = capsys.readouterr()
    assert "b_broken.jpg" in cap.err and "4 x" in cap.out
    feats, meta = _load(out)
    names = [os.path.basename(f) for f in meta["files"]]
    assert names == ["a_cat.jpg", "c_coffee.jpg", "e_astro.jpg", "d_rocket.png"]  # sorted paths
    assert [os.path.basename(f["file"]) for f in meta["failed"]] == ["b_broken.jpg"]
    assert feats.dtype == np.float32 and feats.shape == (4, meta["dim"])
    eng = Engine(weights)
    want = eng.features(meta["files"], layer="relu7", scales=(32, 48)).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "feats.npy.parts").exists()
    # a list file with relative paths gives the same rows
    lst = folder / "list.txt"
    lst.write_text("# my images\n" + "\n".join(os.path.relpath(f, folder)
                                               for f in meta["files"]) + "\n")
    out2 = tmp_path / "list_feats.npy"
    assert main(["extract", str(lst), "--weights", weights, "--out", str(out2), *ARGS]) == 0
    np.testing.assert_array_equal(_load(out2)[0], feats)


def test_interrupted_run_resumes_to_the_same_file(weights, folder, tmp_path, monkeypatch, capsys):
    clean = tmp_path / "clean.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(clean), *ARGS,
                 "--batch-size", "2"]) == 2     # b_broken.jpg skipped
    real = vf.features
    calls = []

    def dying(*a, **k):
        calls.append(a[1])
        if len(calls) == 3:  # one call per chunk: [a, b] and [c, e] are done; die in [sub/d]
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vf, "features", dying)
    out = tmp_path / "run.npy"
    cmd = ["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]
    assert main(cmd + ["--batch-size", "2"]) == 130
    assert not out.exists() and len(list((tmp_path / "run.npy.parts").glob("r0-*.json"))) == 2
    # other settings are refused rather than mixed in
    assert main(cmd[:-1] + ["--batch-size", "2", "--pool", "max"]) == 2
    assert "other settings" in capsys.readouterr().err
    other = tmp_path / "other.pth"      # same configuration, other weights: not mixed in either
    torch.save(small_model("D", num_classes=10, seed=1).state_dict(), other)
    assert main(["extract", str(folder), "--weights", str(other), "--out", str(out), *ARGS,
                 "--batch-size", "2"]) == 2
    assert "other settings (weights)" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(vf, "features", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert main(cmd + ["--batch-size", "2"]) == 2
    assert len(calls) == 1 and len(calls[0]) == 1  # one chunk, with only the fifth file left
    got, meta = _load(out)
    want, want_meta = _load(clean)
    np.testing.assert_array_equal(got, want)
    assert meta == want_meta
    assert not (tmp_path / "run.npy.parts").exists()


def test_a_run_interrupted_under_the_old_parts_name_resumes(weights, folder, tmp_path,
                                                            monkeypatch, capsys):
    """Before `--out x` meant x.npy, its checkpoints went to x.parts/; x.npy.parts/ now, so a
    run interrupted under the old name started over. x.parts/ of the same settings is resumed
    (and removed at the end); one of other settings is left alone and the run starts afresh."""
    clean = tmp_path / "clean.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(clean), *ARGS,
                 "--batch-size", "2"]) == 2
    real = vf.features
    calls = []

    def dying(*a, **k):
        calls.append(a[1])
        if len(calls) == 3:     # [a, b] and [c, e] done; die in [sub/d]
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vf, "features", dying)
    cmd = ["extract", str(folder), "--weights", weights, "--out", str(tmp_path / "run"), *ARGS,
           "--batch-size", "2"]
    assert main(cmd) == 130
    # the folder an older vggfast left for `--out run`
    (tmp_path / "run.npy.parts").rename(tmp_path / "run.parts")
    calls.clear()
    monkeypatch.setattr(vf, "features", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    assert main(cmd) == 2
    assert len(calls) == 1 and len(calls[0]) == 1   # only the fifth file was left
    got, meta = _load(tmp_path / "run.npy")
    want, want_meta = _load(clean)
    np.testing.assert_array_equal(got, want)
    assert meta == want_meta
    assert not (tmp_path / "run.parts").exists() and not (tmp_path / "run.npy.parts").exists()

    # an old folder of other settings (--pool max) is not this run's: left, the run starts over
    monkeypatch.setattr(vf, "features", dying)
    calls.clear()
    assert main(cmd + ["--pool", "max"]) == 130
    (tmp_path / "run.npy.parts").rename(tmp_path / "run.parts")
    calls.clear()
    monkeypatch.setattr(vf, "features", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    capsys.readouterr()
    assert main(cmd) == 2 and "other settings" not in capsys.readouterr().err
    assert len(calls) == 3                          # every chunk again
    np.testing.assert_array_equal(_load(tmp_path / "run.npy")[0], want)
    assert len(list((tmp_path / "run.parts").glob("r0-*.json"))) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_torchrun_equals_one_rank(weights, folder, tmp_path):
    one = tmp_path / "one.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(one), *ARGS,
                 "--batch-size", "1"]) == 2
    two = tmp_path / "two.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                        "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                        "--master_port", str(_free_port()), "-m", "vggfast", "extract",
                        str(folder), "--weights", weights, "--out", str(two), *ARGS,
                        "--batch-size", "1", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=240)
    # torchrun exits 1 when a rank did not exit 0: rank 0's 2 (b_broken.jpg skipped), no signal
    assert p.returncode == 1, p.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2\b", p.stderr), p.stderr[-3000:]
    assert not re.search(r"exitcode\s*:\s*-", p.stderr), p.stderr[-3000:]
    assert "b_broken.jpg" in p.stderr and p.stdout.count("4 x") == 1  # rank 0 reports once
    got, meta = _load(two)
    want, want_meta = _load(one)
    assert meta == want_meta
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / "two.npy.parts").exists()


def test_an_image_over_the_budget_is_skipped_and_ranks_need_torchrun(weights, folder, tmp_path,
                                                                     monkeypatch, capsys):
    Image.new("RGB", (3000, 16)).save(folder / "f_banner.png")
    out = tmp_path / "f.npy"
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "8MiB")
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    feats, meta = _load(out)
    assert feats.shape[0] == 4 and [os.path.basename(f["file"]) for f in meta["failed"]] == [
        "b_broken.jpg", "f_banner.png"]
    assert "memory budget" in meta["failed"][1]["error"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_a_second_run_on_the_same_output_is_refused_until_the_first_ends(weights, folder,
                                                                         tmp_path, capsys):
    """A lock held by a live process refuses the run (one line, exit 2); a lock left by a
    process that died is taken over."""
    out = tmp_path / "f.npy"
    parts = tmp_path / "f.npy.parts"
    parts.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (parts / "r0.lock").write_text(f"{socket.gethostname()} {other.pid}")
        assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
        err = capsys.readouterr().err
        assert f"another extract (pid {other.pid}" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
    finally:
        other.kill()
        other.wait()
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    assert np.load(out).shape[0] == 4 and not parts.exists()


def test_every_image_failing_says_why_and_leaves_nothing_behind(weights, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    for n in range(3):
        (d / f"{n}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "f.npy"
    assert main(["extract", str(d), "--weights", weights, "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert "none of the 3 images could be used; the first:" in err and "0.jpg" in err
    assert not out.exists() and not (tmp_path / "f.npy.parts").exists()


def test_a_write_error_is_one_line_and_leaves_no_temporary_file(weights, folder, tmp_path,
                                                                monkeypatch, capsys):
    def disk_full(f, a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(vf.np, "save", disk_full)
    out = tmp_path / "f.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot write" in err and "No space left on device" in err
    assert not list((tmp_path / "f.npy.parts").glob("*.tmp*"))
    assert not (tmp_path / "f.npy.parts" / "r0.lock").exists()


def test_every_file_extract_writes_is_fsynced_under_a_hidden_temporary_name(
        weights, folder, tmp_path, monkeypatch, capsys):
    """features had an atomic-write helper of its own beside preprocess.atomic_write: it renamed
    without an fsync (a power cut after the rename could leave an empty features file or chunk,
    the interrupted run's resume then reading it) and its temporaries, "f.npy.tmpPID", were
    visible files beside the output. Every file now goes through atomic_write: written to
    ".NAME.tmp-PID", fsynced, then renamed."""
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        renamed.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "f.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    capsys.readouterr()
    targets = {os.path.basename(dst) for _, dst in renamed}
    assert {"f.npy", "f.json", "settings.json", "r0-00000000.npy", "r0-00000000.json"} <= targets
    for src, dst in renamed:
        assert os.path.dirname(src) == os.path.dirname(dst)
        assert os.path.basename(src) == f".{os.path.basename(dst)}.tmp-{os.getpid()}"
        assert src in synced, f"{dst} was renamed into place without an fsync"
    assert vf.np.load(out).shape[0] == 4


def test_file_names_that_are_not_utf8_and_list_files_with_a_bom(weights, tmp_path, samples,
                                                               capsys):
    """A photo whose name is not UTF-8 (Linux allows any bytes) ended `extract FOLDER` with a
    UnicodeEncodeError traceback (the settings hash encoded the names strictly); a list file
    naming it was refused whole ("'utf-8' codec can't decode"); a list file saved with a
    byte-order mark lost its first image ("not found: .../\\ufeff/..."), and a UTF-16 one said
    "can't decode byte 0xff"."""
    d = tmp_path / "photos"
    d.mkdir()
    odd = os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(samples["cat"], d / odd)
    shutil.copy(samples["coffee"], d / "b.jpg")
    want = Engine(weights).features([str(d / odd), str(d / "b.jpg")], layer="pool5", scales=32)
    args = ["--weights", weights, "--scales", "32", "--layer", "pool5", "--quiet"]
    assert main(["extract", str(d), "--out", str(tmp_path / "f.npy"), *args]) == 0
    got = json.loads((tmp_path / "f.json").read_text())
    assert sorted(got["files"]) == sorted([str(d / odd), str(d / "b.jpg")])
    lists = {"raw.txt": os.fsencode(d / odd) + b"\n" + os.fsencode(d / "b.jpg") + b"\n",
             "bom.txt": b"\xef\xbb\xbf" + f"{d / odd}\n{d / 'b.jpg'}\n".encode("utf-8",
                                                                              "surrogateescape")}
    for name, data in lists.items():
        (tmp_path / name).write_bytes(data)
        out = tmp_path / f"{name}.npy"
        assert main(["extract", str(tmp_path / name), "--out", str(out), *args]) == 0, name
        assert json.loads((tmp_path / f"{name}.json").read_text())["files"] == \
            [str(d / odd), str(d / "b.jpg")]
        torch.testing.assert_close(torch.from_numpy(np.load(out)), want)
    (tmp_path / "utf16.txt").write_text(f"{d / 'b.jpg'}\n", encoding="utf-16")
    capsys.readouterr()
    assert main(["extract", str(tmp_path / "utf16.txt"), "--out", str(tmp_path / "u.npy"),
                 *args]) == 2
    assert capsys.readouterr().err == (f"vggfast: error: the file list {tmp_path / 'utf16.txt'} "
                                       "is not UTF-8 text (one path per line)\n")


@pytest.mark.parametrize("bad, match", [(dict(pool="median"), "unknown pool"),
                                        (dict(aggregate="sum"), "unknown aggregate"),
                                        (dict(flip="yes"), "flip must be"),
                                        (dict(normalize="no"), "normalize must be")])
def test_bad_settings_are_refused_before_the_checkpoint_folder_exists(weights, samples, tmp_path,
                                                                      bad, match):
    """extract() used to write OUT.parts/settings.json before checking pool, aggregate, flip and
    normalize, then fail in its first chunk: every corrected rerun was refused as "an interrupted
    run with other settings". It now refuses them first and writes nothing."""
    eng = Engine(weights)
    out = tmp_path / "feats.npy"
    files = [str(samples["cat"])]
    with pytest.raises(vf.VGGFastError, match=match):
        vf.extract(eng, files, out, layer="relu7", scales=(32,), progress=False, **bad)
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny.pth"]
    rec = vf.extract(eng, files, out, layer="relu7", scales=(32,), progress=False)
    np.testing.assert_allclose(np.load(out), eng.features(files, layer="relu7", scales=(32,)),
                               rtol=1e-5, atol=1e-7)
    assert rec["files"] == files and not (tmp_path / "feats.npy.parts").exists()


def test_skipped_images_make_the_exit_status_2_and_the_help_says_so(weights, folder, tmp_path,
                                                                    capsys):
    """extract exited 0 when it had skipped unreadable files: a script could not tell a partial
    run from a whole one. It now exits 2 as classify does (the good rows are still written), 0
    when nothing was skipped; `extract --help` says so."""
    out = tmp_path / "f.npy"
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 2
    cap = capsys.readouterr()
    assert "vggfast: skipped" in cap.err and "b_broken.jpg" in cap.err and "4 x" in cap.out
    assert np.load(out).shape[0] == 4 and len(_load(out)[1]["failed"]) == 1
    (folder / "b_broken.jpg").unlink()
    assert main(["extract", str(folder), "--weights", weights, "--out", str(out), *ARGS]) == 0
    assert np.load(out).shape[0] == 4 and _load(out)[1]["failed"] == []
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["extract", "--help"])
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 every image written; 2 a usage error, nothing written, or some " \
        "images skipped" in help_text
    # under torchrun (tests/test_distributed.py runs these cases): who reports, who exits what
    assert "rank 0 writes the output and reports the run with the status above (also for images " \
        "other ranks skipped, and when none could be used); the other ranks exit 0 once their " \
        "share is done, or 2 with one line when they fail themselves or another rank failed in " \
        "the middle of the run" in help_text


@pytest.mark.parametrize("batch_size", [2.5, "8", True, 0, -1, None])
def test_batch_size_must_be_a_positive_integer(weights, samples, tmp_path, batch_size):
    """extract(..., batch_size=2.5 or "8") failed with a TypeError (or a chunking by floats);
    now a one-line ArgumentError, before anything is written."""
    eng = Engine(weights)
    with pytest.raises(vf.ArgumentError) as err:
        vf.extract(eng, [str(samples["cat"])], tmp_path / "f.npy", layer="relu7", scales=(32,),
                   progress=False, batch_size=batch_size)
    assert str(err.value) == f"batch_size must be a positive integer, not {batch_size!r}"
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny.pth"]
    rec = vf.extract(eng, [str(samples["cat"])], tmp_path / "f.npy", layer="relu7",
                     scales=(32,), progress=False, batch_size=np.int64(3))
    assert rec["files"] == [str(samples["cat"])]


def test_out_without_npy_gets_it_and_two_outputs_never_share_a_file_list(weights, samples,
                                                                          tmp_path, capsys):
    """`--out x` wrote the features to x and the file list to x.json, the very file list of
    `--out x.npy`: two different outputs, one x.json overwritten by the other. The features now
    always go to a .npy (appended as np.save does) whose file list is that name with .json."""
    files = [str(samples["cat"])]
    assert [vf.output_paths(tmp_path / n) for n in ("x", "x.npy", "x.json", "x.tar")] == [
        (tmp_path / "x.npy", tmp_path / "x.json"), (tmp_path / "x.npy", tmp_path / "x.json"),
        (tmp_path / "x.json.npy", tmp_path / "x.json.json"),
        (tmp_path / "x.tar.npy", tmp_path / "x.tar.json")]
    outs = ["x", "x.npy", "x.json", "x.json.npy", "x.tar", "x.NPY", "y.npy.npy", "y.npy"]
    paths = {n: vf.output_paths(tmp_path / n) for n in outs}
    arrays = {a for a, _ in paths.values()}
    # one file list per features file, and no file list is another output's features
    assert len({j for _, j in paths.values()}) == len(arrays) and not arrays & {
        j for _, j in paths.values()}
    eng = Engine(weights)
    vf.extract(eng, files, tmp_path / "x", layer="relu7", scales=(32,), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth", "x.json", "x.npy"]
    assert json.loads((tmp_path / "x.json").read_text())["files"] == files
    (tmp_path / "one").mkdir()
    shutil.copy(samples["cat"], tmp_path / "one" / "cat.jpg")
    assert main(["extract", str(tmp_path / "one"), "--weights", weights, "--out",
                 str(tmp_path / "feats"), "--scales", "32", "--layer", "relu7", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'feats.npy'}: ")
    assert (tmp_path / "feats.npy").exists() and not (tmp_path / "feats").exists()
    feats, meta = _load(tmp_path / "feats.npy")
    assert feats.shape[0] == len(meta["files"])
    (tmp_path / "d.npy").mkdir()
    with pytest.raises(vf.ArgumentError, match="is a folder"):
        vf.output_paths(tmp_path / "d")


@pytest.mark.parametrize("out", ["x", "x.npy"])
def test_a_folder_at_the_file_list_name_is_refused_before_any_work(weights, samples, tmp_path,
                                                                     monkeypatch, capsys, out):
    """output_paths refused a folder at the features' name only: with one at x.json, rank 0
    extracted every image, wrote x.npy, and only then failed to write x.json (exit 2, an x.npy
    without its file list). Both outputs are checked first, before the weights are loaded."""
    (tmp_path / "x.json").mkdir()
    with pytest.raises(vf.ArgumentError, match="is a folder"):
        vf.output_paths(tmp_path / out)
    (tmp_path / "list.txt").write_text(f"{samples['cat']}\n")
    loaded = []
    monkeypatch.setattr("vggfast.cli._engine", lambda *a: loaded.append(a))
    assert main(["extract", str(tmp_path / "list.txt"), "--weights", weights, "--out",
                 str(tmp_path / out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert err == (f"vggfast: error: --out {tmp_path / out}: its file list {tmp_path / 'x.json'} "
                   "is a folder; move it or choose another --out\n")
    assert not loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt", "tiny.pth", "x.json"]
    with pytest.raises(vf.ArgumentError, match="is a folder"):
        vf.extract(Engine(weights), [str(samples["cat"])], tmp_path / out, layer="relu7",
                   scales=(32,), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.txt", "tiny.pth", "x.json"]


def test_an_out_under_a_file_is_refused_before_the_weights_load(weights, samples, tmp_path,
                                                                 monkeypatch, capsys):
    """A place no file can be written was refused only once the weights were loaded (by the
    checkpoint folder's mkdir); output_paths now names it first."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    loaded = []
    monkeypatch.setattr("vggfast.cli._engine", lambda *a: loaded.append(a))
    assert main(["extract", str(samples["cat"].parent), "--weights", weights, "--out",
                 str(blocker / "sub" / "x"), *ARGS]) == 2
    assert capsys.readouterr().err == (f"vggfast: error: cannot write next to "
                                       f"{blocker / 'sub' / 'x.npy'}: {blocker} is not a "
                                       "writable folder\n")
    assert not loaded and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "tiny.pth"]

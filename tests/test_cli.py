import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import small_model
from vggfast.cli import main


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(small_model("D", num_classes=10).state_dict(), path)
    return str(path)


def _run(*args, env=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "vggfast", *args], capture_output=True, text=True,
                          env=e, timeout=300)


def test_classify_json_success(weights, samples):
    p = _run("classify", str(samples["cat"]), str(samples["rocket"]), "--weights", weights,
             "--scales", "32", "48", "--top", "3", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)["results"]
    assert [r["image"] for r in out] == [str(samples["cat"]), str(samples["rocket"])]
    assert len(out[0]["top"]) == 3 and out[0]["top"][0]["prob"] >= out[0]["top"][1]["prob"]


def test_classify_a_folder_takes_its_images_recursively(weights, samples, tmp_path, capsys):
    import shutil
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    (tmp_path / "photos" / ".cache").mkdir()
    shutil.copy(samples["cat"], tmp_path / "photos" / "b.jpg")
    shutil.copy(samples["rocket"], tmp_path / "photos" / "sub" / "a.jpg")
    shutil.copy(samples["rocket"], tmp_path / "photos" / ".cache" / "c.jpg")   # hidden: skipped
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    assert main(["classify", str(tmp_path / "photos"), str(samples["cat"]), "--weights", weights,
                 "--scales", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["results"]
    assert [r["image"] for r in out] == [str(tmp_path / "photos" / "b.jpg"),
                                         str(tmp_path / "photos" / "sub" / "a.jpg"),
                                         str(samples["cat"])]
    (tmp_path / "empty").mkdir()
    assert main(["classify", str(tmp_path / "empty"), "--weights", weights]) == 2
    assert "folder without image files" in capsys.readouterr().err


def test_classify_reads_an_image_from_standard_input(weights, samples):
    """`-` is an image file's bytes on stdin (`cat photo.jpg | vggfast classify - ...`), with the
    same answer as the file's path; bytes that are no image are the usual one-line error."""
    args = ["--weights", weights, "--scales", "32", "--json"]
    want = _run("classify", str(samples["cat"]), *args)
    got = subprocess.run([sys.executable, "-m", "vggfast", "classify", "-", *args],
                         input=samples["cat"].read_bytes(), capture_output=True, timeout=300)
    assert got.returncode == 0, got.stderr
    (w,), (g,) = json.loads(want.stdout)["results"], json.loads(got.stdout)["results"]
    assert g["image"] == "-" and g["top"] == w["top"]
    bad = subprocess.run([sys.executable, "-m", "vggfast", "classify", "-", *args],
                         input=b"not an image", capture_output=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.decode().count("\n") == 1
    assert "standard input: not an image file" in bad.stderr.decode()
    empty = subprocess.run([sys.executable, "-m", "vggfast", "classify", "-", *args],
                           input=b"", capture_output=True, timeout=300)
    assert empty.returncode == 2 and empty.stderr.decode().count("\n") == 1
    assert "standard input is empty" in empty.stderr.decode()


@pytest.mark.parametrize("args", [
    ["classify", "missing.jpg"],                              # missing image
    ["classify", "{cat}", "--weights", "nope.pth"],            # missing weights
    ["classify", "{cat}", "--scales", "16"],                  # scale below native size
    ["classify", "{cat}", "--backend", "tensorrt"],           # argparse refusals
    ["classify", "{cat}", "--top", "three"],
    ["classify"],
    ["nope"],
    ["classify", "{cat}", "--weights", "{cat}"],               # an image given as weights
])
def test_user_errors_exit_2_with_one_line(weights, samples, args):
    args = [a.format(cat=samples["cat"]) for a in args]
    if "--weights" not in args:
        args += ["--weights", weights]
    p = _run(*args)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0], p.stderr


@pytest.mark.parametrize("method, match", [("multicrop", "multi-crop evaluation takes"),
                                           ("dense", "native size")])
def test_a_scale_too_small_is_explained_for_the_method(weights, samples, capsys, method, match):
    assert main(["classify", str(samples["cat"]), "--weights", str(weights), "--scales", "16",
                 "--method", method]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("command", [["classify", "x.jpg"], ["extract", "d", "--out", "f.npy"],
                                     ["info", "w.pth"], ["train", "--data", "d"]])
def test_a_typod_option_points_at_the_subcommands_help(command, capsys):
    """`vggfast classify x.jpg --scalez 3`: one line naming the subcommand's --help, which lists
    its options (the top-level --help does not)."""
    with pytest.raises(SystemExit) as exc:
        main([*command, "--scalez", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"vggfast {command[0]}: error: unrecognized arguments: --scalez 3")
    assert err.rstrip().endswith(f"(see vggfast {command[0]} --help)")


def test_no_weights_is_a_clear_error(samples, monkeypatch, capsys):
    monkeypatch.delenv("VGGFAST_WEIGHTS", raising=False)
    assert main(["classify", str(samples["cat"])]) == 2
    assert "pass --weights" in capsys.readouterr().err


def test_info_and_demo_in_process(weights, monkeypatch, capsys):
    assert main(["info", weights, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"] == "D" and info["num_classes"] == 10 and info["image_size"] == 32
    monkeypatch.setenv("VGGFAST_WEIGHTS", weights)
    assert main(["demo", "--scales", "32", "40"]) == 0
    out = capsys.readouterr().out
    assert "cat.jpg" in out and "ms)" in out and "UNTRAINED" not in out


def test_info_says_which_preprocessing_is_in_effect_and_why(weights, capsys):
    """Weights that do not say their input convention (a Caffe conversion with torchvision's
    names among them) run with torchvision's: `info` shows it as the default, so a user whose
    Caffe weights classify badly sees that --preprocess caffe is theirs to give."""
    assert main(["info", weights, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["preprocess"], info["preprocess_from"]) == ("torchvision", "default")
    assert main(["info", weights, "--preprocess", "caffe"]) == 0
    out = capsys.readouterr().out
    assert "preprocess: caffe" in out and "preprocess_from: argument" in out


def test_info_refuses_two_weights_but_not_the_environments(weights, tmp_path, monkeypatch,
                                                             capsys):
    """`info W --weights X` described W without a word about X; now refused. $VGGFAST_WEIGHTS is
    a default, so WEIGHTS beside it is no clash."""
    other = tmp_path / "other.pth"
    torch.save(small_model("A", num_classes=3).state_dict(), other)
    monkeypatch.delenv("VGGFAST_WEIGHTS", raising=False)
    assert main(["info", weights, "--weights", str(other), "--json"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1
    assert cap.err.startswith(f"vggfast: error: two weights given ({weights} and --weights {other})")
    monkeypatch.setenv("VGGFAST_WEIGHTS", str(other))
    for argv, config in [([weights], "D"), (["--weights", weights], "D"), ([], "A")]:
        assert main(["info", *argv, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["config"] == config
    monkeypatch.delenv("VGGFAST_WEIGHTS")
    assert main(["info"]) == 2
    assert "pass --weights" in capsys.readouterr().err


def test_bad_image_among_good_ones_is_reported_and_the_rest_classified(weights, samples, tmp_path,
                                                                      capsys, monkeypatch):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    code = main(["classify", str(bad), str(samples["cat"]), "--weights", weights, "--scales", "32"])
    cap = capsys.readouterr()
    assert code == 2 and "bad.jpg" in cap.err and "cat.jpg" in cap.out
    # in chunks (one photo each here): the same lines, in the order given
    import vggfast.engine
    code = main(["classify", str(samples["rocket"]), str(bad), str(samples["cat"]), "--weights",
                 weights, "--scales", "32", "--json"])
    whole = capsys.readouterr()
    monkeypatch.setattr(vggfast.engine, "CHUNK_IMAGES", 1)
    assert main(["classify", str(samples["rocket"]), str(bad), str(samples["cat"]), "--weights",
                 weights, "--scales", "32", "--json"]) == code == 2
    chunked = capsys.readouterr()
    assert chunked.out == whole.out and chunked.err == whole.err
    rows = json.loads(chunked.out)["results"]
    assert [r["image"] for r in rows] == [str(samples["rocket"]), str(samples["cat"])]


def test_classify_explain_prints_the_plan(weights, samples, capsys):
    code = main(["classify", str(samples["cat"]), str(samples["coffee"]), "--weights", weights,
                 "--scales", "32", "48", "--explain", "--method", "dense+multicrop"])
    out = capsys.readouterr().out
    assert code == 0
    assert "batch" in out.lower() and "views" in out.lower()
    assert "runs batch by batch on the torch backend" in out
    assert out.count("cat.jpg") == 1 and "coffee.jpg" in out


def test_bench_on_cpu_runs_the_reference_and_says_so(tmp_path, capsys):
    code = main(["bench", "--batches", "1", "--no-dense", "--width", "0.0625", "--rep", "1",
                 "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    if not torch.cuda.is_available():
        assert "no CUDA device" in out
    rows = json.loads((tmp_path / "throughput.json").read_text())
    assert rows


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_bench_refuses_an_unusable_out_before_timing(tmp_path, capsys, out):
    """A file given as --out (or a folder under one) is a one-line usage error up front; it was
    a traceback after the whole benchmark had run."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--batches", "1", "--no-dense", "--no-engine", "--no-check",
              "--out", str(tmp_path / out)])
    cap = capsys.readouterr()
    assert exc.value.code == 2 and cap.err.count("\n") == 1 and "Traceback" not in cap.err
    assert cap.err.startswith(f"vggfast bench: error: --out {tmp_path / out}")
    assert cap.out == ""                                  # nothing was timed



def test_a_warning_on_the_command_line_is_one_line(capsys):
    """backend='auto' on a CUDA machine whose triton cannot run the kernels falls back to cuDNN
    with a warning: under the command line's handler that is one line, not a file:line report."""
    import warnings

    from vggfast import cli
    with cli._pil_quiet():
        warnings.warn("vggfast: the Triton kernels are unavailable (test)", RuntimeWarning)
        warnings.warn("something of torch's", UserWarning)
    err = capsys.readouterr().err
    assert err.splitlines() == ["vggfast: the Triton kernels are unavailable (test)",
                                "UserWarning: something of torch's"], err

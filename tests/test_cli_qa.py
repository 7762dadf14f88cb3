"""A demanding user's checks of the command line and the API: what they do with odd arguments,
broken outputs and copies of the objects they get back. Each test is a regression test for a
traceback or a silent surprise found by trying it."""
import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import vggfast
from conftest import small_model
from vggfast import cli
from vggfast.cli import main

DIGITS = "vggfast/data/digits_a.safetensors"


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(small_model("D", num_classes=10).state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def digits():
    return vggfast.Engine(DIGITS)


def _status(argv) -> int:
    """main(argv)'s exit status, also for a usage error (argparse exits with SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("vggfast"), err
    return err


# -- Result and Engine as Python objects ------------------------------------------------------

def test_results_compare_by_value_and_survive_pickle_and_copy(digits, samples):
    """`r == r2` raised "Boolean value of Tensor with more than one value is ambiguous" (the
    dataclass's == on tensors); now equal means the same posteriors, per scale and method."""
    r = digits.classify(samples["cat"], scales=[32, 48])
    for twin in (pickle.loads(pickle.dumps(r)), copy.deepcopy(r), copy.copy(r)):
        assert twin == r and not twin != r
        assert torch.equal(twin.probs, r.probs) and twin.top(3) == r.top(3)
    other = digits.classify(samples["rocket"], scales=[32, 48])
    assert r != other and r != r.probs and r != "r"
    # one scale's posterior different by one ulp is a different result
    moved = copy.deepcopy(r)
    moved.per_scale[48] = torch.nextafter(moved.per_scale[48], torch.ones(()))
    assert moved != r
    fused = digits.classify(samples["cat"], scales=[32, 48], method="dense+multicrop")
    assert fused == copy.deepcopy(fused) and fused != r
    with pytest.raises(TypeError):
        hash(r)           # mutable and holding tensors: not a dict key


def test_result_top_bounds(digits, samples):
    r = digits.classify(samples["cat"], scales=[32])
    assert len(r.top(10)) == len(r.top(1000)) == 10      # clamped to the classes there are
    assert [p for *_, p in r.top(10)] == sorted((p for *_, p in r.top(10)), reverse=True)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(vggfast.VGGFastError, match="top_k must be a positive integer"):
            r.top(bad)


def test_an_engine_pickles_and_deepcopies_into_an_equal_engine(samples):
    """copy.deepcopy(engine) and pickling (multiprocessing) failed with "cannot pickle
    'vggfast._scheduler.LayerDesc' object"; the copy is built again from the same canonical
    weights and settings and answers the same, bit for bit."""
    eng = vggfast.Engine(DIGITS, preprocess="caffe", memory_budget=10 ** 9)
    want = eng.classify(samples["cat"], scales=[32, 48])
    for twin in (copy.deepcopy(eng), pickle.loads(pickle.dumps(eng))):
        assert twin is not eng and repr(twin) == repr(eng) and twin.info() == eng.info()
        assert twin.preprocess_from == "argument" and twin.memory_budget == 10 ** 9
        assert twin.classify(samples["cat"], scales=[32, 48]) == want
    plain = copy.deepcopy(vggfast.Engine(DIGITS))      # a convention from the weights stays so
    assert plain.preprocess_from == "weights" and plain.preprocess == "torchvision"


def test_feature_extractor_weight_gradients_equal_torchvision():
    """README: the weights are frozen copies and requires_grad_(True) fine-tunes them: their
    gradients are those of torchvision's `vgg.features` (input gradients are checked in
    test_features)."""
    model = small_model("D", num_classes=10).double()
    fx = vggfast.FeatureExtractor(model.state_dict(), layers=["relu2_2", "relu3_3"]).double()
    assert not any(p.requires_grad for p in fx.parameters())
    fx.requires_grad_(True)
    x = torch.rand(2, 3, 40, 36, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = fx(x)
    (out["relu2_2"].square().sum() + out["relu3_3"].sum()).backward()
    f = model.features
    mid = f[:9](x)
    (mid.square().sum() + f[9:16](mid).sum()).backward()
    convs = [m for m in f[:16] if isinstance(m, torch.nn.Conv2d)]
    ours = dict(fx.named_parameters())
    names = ["1_1", "1_2", "2_1", "2_2", "3_1", "3_2", "3_3"]
    assert len(ours) == 2 * len(convs) == 2 * len(names)
    for name, conv in zip(names, convs):
        torch.testing.assert_close(ours[f"conv{name}_weight"].grad, conv.weight.grad,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours[f"conv{name}_bias"].grad, conv.bias.grad,
                                   rtol=1e-12, atol=1e-12)


# -- the command line -------------------------------------------------------------------------

def test_an_option_that_swallowed_the_image_says_where_images_go(weights, samples, capsys):
    """`vggfast classify -w W --scales 32 photo.jpg`: --scales takes every number after it and
    then the photo; argparse only said "invalid int value: 'photo.jpg'"."""
    cat = str(samples["cat"])
    assert _status(["classify", "-w", weights, "--scales", "32", cat]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"invalid int value: '{cat}'" in err
    assert "put the images or folders before --scales" in err
    assert _status(["classify", "-w", weights, "--scales", "32", "typo.jpg"]) == 2
    # a name with a suffix is a path even where no such file exists
    assert "put the images or folders before --scales" in capsys.readouterr().err
    # what the hint says works
    assert _status(["classify", "-w", weights, "--top", "1", "--scales", "32", "--", cat]) == 0
    assert capsys.readouterr().out.startswith(cat)
    # evaluate's --method list swallows the folder the same way
    assert _status(["evaluate", "-w", weights, "--method", "dense", "multicrop",
                    str(samples["cat"].parent)]) == 2
    assert "before --method, or end its values with -- (e.g. --method dense -- " in _one_line(
        capsys.readouterr().err)
    # a one-value option given a path is a wrong value, not a misplaced image
    assert _status(["classify", "-w", weights, "--backend", cat, cat]) == 2
    assert "invalid choice" in (err := _one_line(capsys.readouterr().err)) and "put" not in err
    # a mistyped number is not taken for a path
    for value in ("nan", "32.5", "1.5e3"):
        assert _status(["classify", cat, "-w", weights, "--scales", value]) == 2
        err = _one_line(capsys.readouterr().err)
        assert "invalid int value" in err and "put the images" not in err


def test_standard_input_twice_is_refused_before_anything_runs(weights, capsys, monkeypatch):
    """`classify - -` read the image for the first and an empty stream for the second, and
    exited 2 after printing one result."""
    monkeypatch.setattr(vggfast.Engine, "__init__", lambda *a, **k: pytest.fail("loaded"))
    assert main(["classify", "-", "-", "-w", weights]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "- is given more than once" in err


def test_localize_refuses_a_negative_draw_count(capsys):
    """--draw -1 drew every box, as 0 does, without a word; refused before the nets load."""
    assert main(["localize", "x.jpg", "-w", "nope", "-l", "nope", "--draw", "-1"]) == 2
    assert "--draw must be 0" in _one_line(capsys.readouterr().err)


def test_a_failed_allocation_is_one_line(weights, samples, capsys, monkeypatch):
    """A memory budget raised past what the machine holds (VGGFAST_MEMORY_BUDGET=1000TiB with
    --scales 200000) passed the up-front check and ended in torch's allocator traceback."""
    def oom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 721598400000 bytes.\n"
                           "second line of the C++ report")
    monkeypatch.setattr(vggfast.Engine, "classify", oom)
    assert main(["classify", str(samples["cat"]), "-w", weights, "--scales", "32"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "can't allocate memory" in err and "VGGFAST_MEMORY_BUDGET" in err
    monkeypatch.setattr(vggfast.Engine, "classify", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")))
    assert main(["classify", str(samples["cat"]), "-w", weights, "--scales", "32"]) == 2
    assert "CUDA out of memory" in _one_line(capsys.readouterr().err)
    # any other RuntimeError is a bug, and keeps its traceback
    monkeypatch.setattr(vggfast.Engine, "classify", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["classify", str(samples["cat"]), "-w", weights, "--scales", "32"])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("command", [["classify", "{cat}", "--scales", "32", "--json"],
                                     ["info", "--json"]])
def test_a_full_standard_output_is_one_line(weights, samples, command):
    """`vggfast classify ... > /dev/full` (a full disk) ended in an OSError traceback."""
    args = [a.replace("{cat}", str(samples["cat"])) for a in command]
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "vggfast", *args, "-w", weights], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert _one_line(p.stderr) == ("vggfast: error: cannot write to standard output: No space "
                                   "left on device\n")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_extract_to_a_full_standard_output_says_the_features_were_kept(weights, samples, tmp_path):
    """`vggfast extract ... > /dev/full` said only "cannot write to standard output", as if the
    run were lost: its features are written, only the summary line is not, and it says so."""
    out, folder = tmp_path / "f.npy", tmp_path / "imgs"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(samples["cat"].read_bytes())
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "vggfast", "extract", str(folder),
                            "-w", weights, "--scales", "32", "--quiet", "--out", str(out)],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert _one_line(p.stderr) == (
        f"vggfast: error: cannot write to standard output: No space left on device; the "
        f"features were written to {out} (file list in {out.with_suffix('.json')}), only this "
        f"summary was not\n")
    assert np.load(out).shape[0] == 1


def test_only_standard_output_failures_are_taken_for_one(weights, capsys, monkeypatch):
    """An OSError of another file stays a traceback (a bug to see, not a full terminal), and
    the guard puts sys.stdout back after the command."""
    out = sys.stdout

    def other_file(args):
        raise OSError(28, "No space left on device", "/somewhere/else")
    monkeypatch.setattr(cli, "cmd_info", other_file)
    with pytest.raises(OSError, match="No space left"):
        main(["info", weights])
    assert sys.stdout is out

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass
    monkeypatch.undo()                       # the real cmd_info, printing into Full
    monkeypatch.setattr(sys, "stdout", Full())
    assert main(["info", weights]) == 2
    monkeypatch.undo()
    assert "cannot write to standard output" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("url,then", [
    ("https://download.pytorch.org/models/vgg16-397923af.pth", "then pass 'vgg16'"),
    ("https://download.pytorch.org/models/vgg19_bn-c79401a0.pth", "then pass 'vgg19_bn'"),
    ("https://download.pytorch.org/models/vgg16_features-amdegroot-88682ab5.pth",
     "then pass 'vgg16_features'"),
    ("https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/model.safetensors?download=true",
     "download_url_to_file('https://huggingface.co/timm/vgg16.tv_in1k/resolve/main/"
     "model.safetensors?download=true', 'model.safetensors')\", then pass the path "
     "model.safetensors"),
])
def test_a_url_as_weights_says_how_to_fetch_it(url, then, capsys):
    """A URL pasted from torchvision's model table said "weights file not found:
    https:/download.pytorch.org/..." (Path dropped a slash) and nothing of what to do."""
    with pytest.raises(vggfast.VGGFastError, match="is a URL; vggfast never downloads") as err:
        vggfast.Engine(url)
    assert str(err.value).startswith(f"weights {url} ") and str(err.value).endswith(then)
    assert main(["info", url]) == 2
    assert then in _one_line(capsys.readouterr().err)


def test_standard_input_from_a_terminal_is_refused_not_waited_on(weights, capsys, monkeypatch):
    """`vggfast classify -` typed at a prompt, with nothing piped in, waited for input forever
    (Ctrl-D then said "standard input is empty")."""
    class Terminal:
        def isatty(self):
            return True

        @property
        def buffer(self):
            pytest.fail("read a terminal")
    monkeypatch.setattr(sys, "stdin", Terminal())
    for command in (["classify", "-"], ["heatmap", "-", "--out", "never.png"]):
        assert main([*command, "-w", weights, "--scales" if command[0] == "classify" else
                     "--scale", "32"]) == 2
        assert "standard input is a terminal" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("rep", ["0", "-1"])
def test_bench_refuses_a_repetition_time_that_times_nothing(rep, capsys):
    assert _status(["bench", "--rep", rep, "--out", "never-written"]) == 2
    assert f"--rep must be a positive number of milliseconds, not {rep}" in _one_line(
        capsys.readouterr().err)
    assert not os.path.exists("never-written")


@pytest.mark.parametrize("size", ["32", "192", "230", "-5"])
def test_bench_refuses_a_size_below_the_native_size(size, capsys):
    """`vggfast bench --size 32` passed the multiple-of-32 check and ended in F.conv2d's
    traceback ("Kernel size can't be greater than actual input size") at fc6."""
    assert _status(["bench", "--size", size, "--batches", "1", "--no-dense", "--no-engine",
                    "--out", "never-written"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert "--size must be a multiple of 32 and at least 224" in err and size in err
    assert not os.path.exists("never-written")


def test_threads_mixing_every_kind_of_request_get_the_serial_answers(digits, samples):
    """test_engine checks threads classifying; a server also mixes protocols, features, score
    maps and logits on one Engine at once: each answer equals the one computed alone, bit for
    bit."""
    import threading
    cat, rocket, coffee, astro = (str(samples[k]) for k in ("cat", "rocket", "coffee",
                                                            "astronaut"))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    jobs = {
        "dense": lambda: digits.classify(cat, scales=[32, 48]).probs,
        "multicrop": lambda: digits.classify(rocket, scales=[40], method="multicrop").probs,
        "fused": lambda: digits.classify(coffee, scales=[32, 40],
                                         method="dense+multicrop").probs,
        "list": lambda: torch.stack([r.probs for r in digits.classify(
            [cat, rocket, coffee, astro], scales=[36])]),
        "features": lambda: digits.features([cat, rocket], layer="relu5_2", scales=[32, 48]),
        "score_map": lambda: digits.score_map(astro, scale=64),
        "logits": lambda: digits.logits(x),
    }
    want = {name: job() for name, job in jobs.items()}
    got, errors = [], []

    def work(name):
        try:
            for _ in range(2):
                got.append((name, jobs[name]()))
        except Exception as exc:          # noqa: BLE001 -- reported below, with its job
            errors.append(f"{name}: {exc!r}")
    threads = [threading.Thread(target=work, args=(name,)) for name in [*jobs, *jobs]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads), errors
    assert len(got) == 4 * len(jobs)
    assert [name for name, out in got if not torch.equal(out, want[name])] == []


def test_memory_budget_takes_the_sizes_the_environment_variable_takes(monkeypatch):
    """VGGFAST_MEMORY_BUDGET=16GiB works, Engine(memory_budget="16GiB") was refused as "not a
    positive number of bytes"; both read one syntax, and a bad one names where it came from."""
    sd = small_model().state_dict()
    assert vggfast.Engine(sd, memory_budget="16GiB").memory_budget == 16 << 30
    assert vggfast.Engine(sd, memory_budget="1.5 GB").memory_budget == 3 << 29
    assert vggfast.Engine(sd, memory_budget=4096).memory_budget == 4096
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "2GiB")
    assert vggfast.Engine(sd).memory_budget == 2 << 30
    assert vggfast.Engine(sd, memory_budget="1MiB").memory_budget == 1 << 20  # the argument wins
    with pytest.raises(vggfast.VGGFastError, match=r"^memory_budget='lots' is not a size"):
        vggfast.Engine(sd, memory_budget="lots")
    for bad in ("0", "-1GiB", "nan", "inf"):
        with pytest.raises(vggfast.VGGFastError, match="positive finite size"):
            vggfast.Engine(sd, memory_budget=bad)
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "lots")
    with pytest.raises(vggfast.VGGFastError, match=r"^VGGFAST_MEMORY_BUDGET='lots' is not"):
        vggfast.Engine(sd)


class _Piped:
    """sys.stdin with an image file's bytes piped in (`cat photo.jpg | vggfast ... -`)."""

    def __init__(self, data: bytes):
        import io
        self.buffer = io.BytesIO(data)

    def isatty(self):
        return False


@pytest.fixture
def loc_pair(tmp_path):
    """A classifier and its localisation net (SCR), as files."""
    from vggfast import localize as L
    from vggfast.train import save_model
    cls = tmp_path / "cls.pth"
    torch.save(small_model("D", num_classes=10).state_dict(), cls)
    loc, _ = L.build_localizer(str(cls), "scr")
    save_model(loc, L.loc_meta({}, loc.spec, "scr", [str(i) for i in range(10)]), tmp_path / "loc")
    return ["-w", str(cls), "-l", str(tmp_path / "loc"), "--scales", "32", "--top", "2"]


def test_localize_reads_an_image_from_standard_input(loc_pair, samples, tmp_path, capsys,
                                                     monkeypatch):
    """`cat photo.jpg | vggfast localize -` said "-: no such file" where classify and heatmap
    read the image from standard input; now the same boxes as the file's, drawn with --out."""
    assert main(["localize", str(samples["cat"]), *loc_pair, "--json"]) == 0
    want = json.loads(capsys.readouterr().out)["boxes"]
    monkeypatch.setattr(sys, "stdin", _Piped(samples["cat"].read_bytes()))
    out = tmp_path / "boxes.png"
    assert main(["localize", "-", *loc_pair, "--json", "--out", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["image"] == "-" and got["boxes"] == want and out.stat().st_size > 0
    monkeypatch.setattr(sys, "stdin", _Piped(b"not an image"))
    assert main(["localize", "-", *loc_pair]) == 2
    assert "standard input: not an image file" in _one_line(capsys.readouterr().err)


def test_a_file_name_with_a_line_break_prints_as_one_quoted_line(weights, loc_pair, samples,
                                                                 tmp_path, capsys):
    """`b\\n  0.9000     3  cat.jpg` (legal on Linux) printed as a name line and a line that reads
    as a result; such a name is now printed quoted and escaped, one line, as `ls` quotes it."""
    odd = tmp_path / "photos" / "b\n  0.9000     3  cat\t.jpg"
    odd.parent.mkdir()
    odd.write_bytes(samples["cat"].read_bytes())
    (tmp_path / "photos" / "plain é.jpg").write_bytes(samples["cat"].read_bytes())
    assert main(["classify", str(odd.parent), "-w", weights, "--scales", "32", "--top", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == repr(str(odd)) and lines[2] == str(tmp_path / "photos" / "plain é.jpg")
    assert len(lines) == 4 and lines[1].startswith("  ") and lines[3].startswith("  ")
    assert main(["localize", str(odd), *loc_pair]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == repr(str(odd)) and len(lines) == 3
    assert cli.shown_name("a\rb") == "'a\\rb'" and cli.shown_name("a b") == "a b"


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_broken_symlink_in_a_folder_is_named_as_a_corrupt_image_is(weights, samples, tmp_path,
                                                                     capsys):
    """photo.jpg -> a moved file, inside a folder given to classify / extract / evaluate, was
    left out without a word (Path.is_file() is False for a dangling link); it is now named on
    stderr and the run exits 2, as for a corrupt image, the other images classified."""
    from vggfast.protocols import list_images
    root = tmp_path / "set"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(samples["cat"].read_bytes())
    os.symlink(tmp_path / "moved.jpg", root / "cat" / "gone.jpg")
    assert list_images(root) == [root / "cat" / "a.jpg", root / "cat" / "gone.jpg"]
    assert main(["classify", str(root), "-w", weights, "--scales", "32", "--top", "1"]) == 2
    cap = capsys.readouterr()
    assert "gone.jpg" in _one_line(cap.err) and cap.out.splitlines()[0] == str(root / "cat" / "a.jpg")
    assert main(["extract", str(root), "-w", weights, "--scales", "32", "--quiet",
                 "--out", str(tmp_path / "f.npy")]) == 2
    cap = capsys.readouterr()
    assert "skipped" in _one_line(cap.err) and "gone.jpg" in cap.err and "1 skipped" in cap.out
    assert main(["evaluate", str(root), "-w", weights, "--scales", "32", "--quiet",
                 "--class-map", str(_class_map(tmp_path))]) == 2
    assert "gone.jpg" in _one_line(capsys.readouterr().err)


def _class_map(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n")
    return path

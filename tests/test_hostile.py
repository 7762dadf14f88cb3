"""Hostile and unusual input: every bad image, weights file or argument is a one-line
`VGGFastError` (exit 2 on the command line), never a traceback, a hang or a silent wrong answer."""
import os
import pickle
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import vggfast
from conftest import small_model
from vggfast import preprocess as pp
from vggfast.cli import main
from vggfast.errors import ArgumentError, ImageError, MemoryBudgetError, VGGFastError, WeightsError
from vggfast.features import extract, min_scale
from vggfast.weights import load


@pytest.fixture(scope="module")
def sd():
    return small_model("A", num_classes=10).state_dict()


@pytest.fixture(scope="module")
def eng(sd):
    return vggfast.Engine(sd)


@pytest.fixture
def weights_file(tmp_path, sd):
    path = tmp_path / "tiny.pt"
    torch.save(sd, path)
    return str(path)


IMG = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)


class _RunsCode:
    """Pickles to a call of os.system: loading it must not run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# -- images ---------------------------------------------------------------------------------------

def test_folder_given_as_image_says_folder(tmp_path):
    with pytest.raises(ImageError, match="is a folder, not an image file"):
        pp.load_image(str(tmp_path))


def test_pil_mode_without_rgb_conversion_is_image_error():
    with pytest.raises(ImageError, match="cannot convert a PIL 'La' image"):
        pp.load_image(Image.new("La", (16, 16)))


@pytest.mark.parametrize("size", [(0, 0), (0, 20), (20, 0)], ids=["0x0", "0x20", "20x0"])
def test_a_pil_image_without_pixels_is_refused_by_its_size(eng, size):
    # Image.new makes 0-pixel images; copying one out of PIL divided by its width of 0
    # PIL's size is (W, H); the message gives H x W
    with pytest.raises(ImageError, match=rf"^image is {size[1]}x{size[0]} \(HxW\) pixels; both "
                                         "sides"):
        pp.load_image(Image.new("RGB", size))
    with pytest.raises(ImageError, match=rf"^image is {size[1]}x{size[0]} \(HxW\) pixels"):
        eng.classify(Image.new("L", size), scales=[32])


@pytest.mark.parametrize("make", [lambda: torch.empty(3, 16, 16, device="meta"),
                                  lambda: torch.rand(3, 16, 16).to_sparse()],
                         ids=["meta", "sparse"])
def test_tensor_without_dense_data_is_image_error(make):
    with pytest.raises(ImageError, match="dense tensor holding data"):
        pp.load_image(make())


# -- weights --------------------------------------------------------------------------------------

def test_pickled_code_is_refused_without_running_it(tmp_path, sd):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": sd, "x": _RunsCode(marker)}, path)
    with pytest.raises(WeightsError, match="refused to unpickle") as exc:
        load(str(path))
    msg = str(exc.value)
    assert "GLOBAL posix.system" in msg or "GLOBAL os.system" in msg  # the specific reason
    assert "set to `False`" not in msg and "\n" not in msg  # not torch's unsafe advice
    assert not marker.exists()


def test_plain_pickle_is_refused_without_warnings(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WeightsError, match="refused to unpickle"):
            load(str(path))
    assert not caught, [str(w.message) for w in caught]  # they would print on the CLI's stderr
    assert not marker.exists()


def test_text_file_named_pt_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint"):
        load(str(path))


@pytest.mark.parametrize("cut", [8192, 20_000, 60_000])
def test_a_checkpoint_cut_to_under_64_kib_is_damaged_not_unreadable(tmp_path, sd, cut):
    # torch's zip reader seeks 64 KiB back from the end, before byte 0 of so short a file: the
    # EINVAL it got read as the system refusing the file ("cannot read (Invalid argument)")
    whole = tmp_path / "whole.pt"
    torch.save(sd, whole)
    path = tmp_path / "cut.pt"
    path.write_bytes(whole.read_bytes()[:cut])
    with pytest.raises(WeightsError, match=r"cut\.pt: not a readable PyTorch checkpoint \(.*\); "
                                           r"if it was cut short or damaged"):
        load(str(path))


def test_empty_weights_path_is_not_the_current_folder():
    with pytest.raises(WeightsError, match="weights path is empty"):
        load("")


def test_meta_tensor_weights_are_refused(sd):
    with pytest.raises(WeightsError, match="holds no values"):
        load({k: v.to("meta") for k, v in sd.items()})


def test_non_integer_metadata_is_weights_error(sd):
    convs = {k: v for k, v in sd.items() if k.startswith("features")}
    with pytest.raises(WeightsError, match="must be integers"):
        load({"state_dict": convs, "meta": {"num_classes": "ten"}})


@pytest.mark.parametrize("meta, match", [
    ({"num_classes": 10**12}, "describe a network of more than"),   # was a hang (class names)
    ({"image_size": 1e300}, "describe a network of more than"),     # was the scheduler's TypeError
    ({"num_classes": 2.5}, "must be integers, not num_classes=2.5"),   # was 2 classes
    ({"image_size": True}, "must be integers, not image_size=True"),
    ({"num_classes": -3}, "must be integers, not num_classes=-3")])
def test_metadata_that_sizes_the_missing_classifier_is_checked(sd, meta, match):
    convs = {k: v for k, v in sd.items() if k.startswith("features")}
    with pytest.raises(WeightsError, match=match):
        vggfast.Engine({"state_dict": convs, "meta": meta})


def test_metadata_num_classes_0_as_text_is_unset_as_the_number_is(sd):
    """timm's num_classes=0 (no head) means the default; "0" (a JSON sidecar's text) read 0."""
    convs = {k: v for k, v in sd.items() if k.startswith("features")}
    for zero in (0, "0"):
        assert load({"state_dict": convs, "meta": {"num_classes": zero}}).spec.num_classes == 1000


def test_two_tensors_with_one_name_after_prefix_strip_are_refused(sd):
    both = {**sd, **{"module." + k: torch.zeros_like(v) for k, v in sd.items()}}
    with pytest.raises(WeightsError, match="two tensors are named"):
        load(both)


@pytest.mark.parametrize("key,shape", [("classifier.8.weight", (10, 10)),
                                       ("classifier.8.bias", (10,)),
                                       ("features.30.weight", (4,))])
def test_tensors_no_layer_reads_are_refused(sd, key, shape):
    # e.g. a custom head: classifier.6 -> 10 features, classifier.8 -> the real classes
    with pytest.raises(WeightsError, match=f"unexpected tensors {key}"):
        load({**sd, key: torch.zeros(shape)})


def test_batchnorm_checkpoint_still_loads_every_tensor():
    bn = small_model("B", batch_norm=True).state_dict()
    assert any(k.endswith("num_batches_tracked") for k in bn)
    assert load(bn).spec.batch_norm


# -- arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scales", [torch.tensor(32), np.array(32), torch.tensor([32, 48]),
                                    np.array([32, 48])],
                         ids=["tensor0d", "array0d", "tensor1d", "array1d"])
def test_scales_as_tensor_or_array(eng, scales):
    assert eng.check_scales(scales) == tuple(np.atleast_1d(np.asarray(scales)).tolist())


def test_duplicate_scales_are_refused(eng):
    with pytest.raises(ArgumentError, match="scale 32 is given twice"):
        eng.classify(IMG, scales=[32, 48, 32])


@pytest.mark.parametrize("call", [
    lambda e: e.classify(IMG, scales=[32], flip="no"),
    lambda e: e.plan(IMG, scales=[32], flip=None),
    lambda e: e.features(IMG, layer="pool5", scales=[32], normalize="no"),
    lambda e: e.feature_maps(IMG, layer="conv1_1", scale=32, flip="yes"),
], ids=["classify", "plan", "features", "feature_maps"])
def test_yes_no_arguments_refuse_strings(eng, call):
    with pytest.raises(ArgumentError, match="must be True or False"):
        call(eng)


@pytest.mark.parametrize("value", [2, -1, 1.0, None, "false", np.int64(2)],
                         ids=["2", "-1", "1.0", "None", "false", "int64"])
def test_yes_no_arguments_take_only_bools(eng, value):
    """Only True and False (numpy bools and the integers 1 and 0 too) are yes or no, in the
    engine as in the Scheduler it plans with (which read every truthy value as True)."""
    for call in (lambda: eng.classify(IMG, scales=[32], flip=value),
                 lambda: eng.plan(IMG, scales=[32], flip=value),
                 lambda: eng.features(IMG, layer="pool5", scales=[32], normalize=value)):
        with pytest.raises(ArgumentError, match=r"^(flip|normalize) must be True or False, not "):
            call()
    assert len(eng.plan(IMG, scales=[32], flip=np.True_).views) == 2
    assert len(eng.plan(IMG, scales=[32], flip=np.int64(0)).views) == 1
    assert len(eng.plan(IMG, scales=[32], flip=1).views) == 2


def test_score_map_refuses_a_list(eng):
    with pytest.raises(ArgumentError, match="one image"):
        eng.score_map([IMG, IMG], scale=32)


@pytest.mark.parametrize("budget", [float("inf"), 0.5])
def test_memory_budget_must_be_finite_and_at_least_one_byte(sd, budget):
    with pytest.raises(ArgumentError, match="memory_budget"):
        vggfast.Engine(sd, memory_budget=budget)


def test_logits_refuse_nan_input(eng):
    x = torch.zeros(1, 3, 32, 32)
    x[0, 1, 5, 5] = float("nan")
    with pytest.raises(ArgumentError, match="NaN"):
        eng.logits(x)


def test_unknown_device_is_one_short_line(sd):
    with pytest.raises(ArgumentError) as exc:
        vggfast.Engine(sd, device="gpu")
    assert re.fullmatch(r"unknown device 'gpu'; use 'cpu', 'cuda' or 'cuda:N' \(this machine "
                        r"has (cpu(, cuda:\d+)+|cpu and no CUDA device)\)", str(exc.value))


# -- features -------------------------------------------------------------------------------------

def test_pool_layers_count_their_own_pool(eng):
    assert min_scale(eng, "pool5") == 32 and min_scale(eng, "conv5_1") == 16
    with pytest.raises(ArgumentError, match="pool5 needs at least 32"):
        eng.features(IMG, layer="pool5", scales=[16])
    assert eng.features(IMG, layer="conv5_1", scales=[16]).shape == (1, 32)


def test_feature_extractor_layers_none(sd):
    with pytest.raises(ArgumentError, match="layers must be a list"):
        vggfast.FeatureExtractor(sd, layers=None)


@pytest.mark.parametrize("deepest", ["fc6", "relu7"])
def test_a_feature_extractor_tapping_fc6_or_fc7_is_weights_as_its_docstring_says(sd, deepest):
    # it keeps the weights up to its deepest layer, so holds fc6 (and fc7) without fc8: read as
    # weights that was "incomplete classifier: fc8 missing"
    fx = vggfast.FeatureExtractor(sd, layers=[deepest])
    x = torch.rand(1, 3, 32, 32)
    again = vggfast.FeatureExtractor(fx, layers=["relu1_1", deepest])(x)
    direct = vggfast.FeatureExtractor(sd, layers=["relu1_1", deepest])(x)
    for name in ("relu1_1", deepest):
        torch.testing.assert_close(again[name], direct[name], rtol=0, atol=0)
    with pytest.raises(WeightsError, match="fc8 of these weights are missing; they can be used "
                                           f"for features up to relu{deepest[-1]} "):
        vggfast.Engine(fx).classify(IMG, scales=[32])


@pytest.mark.parametrize("x, got", [
    (torch.full((1, 3, 8, 8), 255, dtype=torch.uint8), r"uint8 \[1, 3, 8, 8\]; divide a uint8"),
    (torch.rand(8, 8, 3), r"float32 \[8, 8, 3\]"),       # was a broadcasting RuntimeError
    (torch.rand(1, 1, 8, 8), r"float32 \[1, 1, 8, 8\]"),  # was broadcast to 3 channels
    (torch.rand(1, 3, 8, 8).to_sparse(), "a sparse_coo tensor"),
    (np.zeros((1, 3, 8, 8), np.float32), "ndarray")],
    ids=["uint8", "hwc", "grey", "sparse", "numpy"])
def test_feature_extractor_normalize_takes_float_rgb_only(sd, x, got):
    # a uint8 image came back all inf: the mean and std were cast to uint8, the std to 0
    fx = vggfast.FeatureExtractor(sd, layers=["relu1_1"])
    with pytest.raises(ArgumentError, match=r"^normalize expects float RGB in \[0, 1\], "
                                            rf"\[\.\.\., 3, H, W\], not {got}"):
        fx.normalize(x)
    assert torch.isfinite(fx.normalize(torch.rand(2, 3, 8, 8))).all()


def test_feature_extractor_too_small_and_too_large_inputs(sd):
    fx = vggfast.FeatureExtractor(sd, layers=["relu1_1", "relu2_1"])
    with pytest.raises(ArgumentError, match="needs at least 2x2"):
        fx(torch.rand(1, 3, 1, 1))
    huge = torch.zeros(1, 3, 1, 1).expand(64, 3, 4096, 4096)  # a view: nothing allocated yet
    with pytest.raises(MemoryBudgetError):
        fx(huge)


def test_extract_refuses_an_image_and_an_unwritable_out(eng, tmp_path, samples):
    with pytest.raises(ArgumentError, match="is an image"):
        vggfast.features.list_inputs(samples["cat"])
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(vggfast.VGGFastError, match="cannot write"):
        extract(eng, [str(samples["cat"])], blocker / "f.npy", layer="pool5", scales=[32],
                progress=False)


# -- command line ---------------------------------------------------------------------------------

def test_cli_error_for_a_file_name_with_a_line_break_is_one_line(weights_file, tmp_path, capsys):
    name = str(tmp_path / "a\nb.jpg")
    assert main(["classify", name, "--weights", weights_file, "--scales", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a\\nb.jpg" in err


def test_cli_refuses_pickled_code_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps(_RunsCode(marker), protocol=4))
    p = subprocess.run([sys.executable, "-m", "vggfast", "info", str(path)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and not marker.exists()
    assert p.stderr.count("\n") == 1 and "refused to unpickle" in p.stderr, p.stderr


def test_huge_scale_error_is_short():
    """A scale of 1e300 is refused in a line that does not print its 301 digits."""
    eng = vggfast.Engine(small_model().state_dict())
    with pytest.raises(ArgumentError, match=r"out of range: 1\.000e\+300$"):
        eng.classify(torch.rand(3, 40, 40), scales=[1e300])


def test_cli_into_a_closed_pipe_ends_quietly():
    """`vggfast info ... | head -0`: the reader is gone before the output; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "vggfast", "info",
                             "vggfast/data/digits_a.safetensors"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# -- found by the session-5 audit -----------------------------------------------------------------

def test_feature_extractor_fast_path_follows_changed_weights(sd):
    """The no-grad fast path runs its own copy of the weights (in bf16 here): loading new
    weights into the module must reach it, never leave it running the old ones."""
    fx = vggfast.FeatureExtractor(sd, layers=["pool5"], dtype=torch.bfloat16)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert fx(x)["pool5"].abs().max() > 0
        fx.load_state_dict({k: torch.zeros_like(v) for k, v in fx.state_dict().items()})
        assert fx(x)["pool5"].abs().max() == 0
        for p in fx.parameters():
            p.fill_(0.5)                      # in place, as an optimiser step
        want = fx(x.requires_grad_())["pool5"]   # the autograd path reads the parameters
        x.requires_grad_(False)
        torch.testing.assert_close(fx(x)["pool5"].float(), want.float(), rtol=2e-2, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_feature_extractor_refuses_nonfinite_weights_from_load_state_dict(sd, bad):
    """The constructor refused NaN/Inf weights, load_state_dict took them (every output NaN
    after): it is refused too, one line, the module's weights and outputs as they were; for a
    FeatureExtractor inside a loss module (the parent's load_state_dict) as well."""
    fx = vggfast.FeatureExtractor(sd, layers=["relu1_1", "relu2_1"])
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        want = fx(x)
    before = {k: v.clone() for k, v in fx.state_dict().items()}
    poisoned = dict(before)
    poisoned["conv2_1_bias"] = poisoned["conv2_1_bias"].clone()
    poisoned["conv2_1_bias"][3] = bad
    for module, state in [(fx, poisoned),
                          (torch.nn.Sequential(fx), {f"0.{k}": v for k, v in poisoned.items()})]:
        with pytest.raises(WeightsError, match=r"^load_state_dict: layers conv2_1 of these "
                                               r"weights contain NaN/Inf; the FeatureExtractor "
                                               r"keeps the weights it had$"):
            module.load_state_dict(state)
        for k, v in fx.state_dict().items():
            assert torch.equal(v, before[k]), k
        with torch.no_grad():
            got = fx(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    # finite weights still load, and the fast path runs them
    fx.load_state_dict({k: v * 0.5 for k, v in before.items()})
    assert torch.equal(fx.conv2_1_bias, before["conv2_1_bias"] * 0.5)
    with torch.no_grad():
        assert not torch.equal(fx(x)["relu2_1"], want["relu2_1"])


def test_pickled_module_refusal_gives_no_advice_to_unpickle(tmp_path):
    """torch's refusal text advises retrying with weights_only=False (which would run the
    file's code); the one-line error names the offending global instead."""
    path = tmp_path / "module.pt"
    torch.save(small_model("A"), path)
    with pytest.raises(WeightsError) as info:
        load(str(path))
    msg = str(info.value)
    assert "GLOBAL vggfast.nn.VGG" in msg and "\n" not in msg
    assert "False" not in msg and "Re-running" not in msg and "2.6" not in msg


@pytest.mark.parametrize("header", ["[1, 2]", "null", "5", '"text"'])
def test_safetensors_metadata_that_is_not_an_object(tmp_path, sd, header):
    from safetensors.torch import save_file
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"vggfast": header})
    with pytest.raises(WeightsError, match="must be a JSON object"):
        load(str(path))


def test_sidecar_metadata_that_is_not_text(tmp_path, sd):
    torch.save(sd, tmp_path / "w.pt")
    (tmp_path / "w.json").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(WeightsError, match="metadata is not UTF-8"):
        load(str(tmp_path / "w.pt"))


def test_preprocess_name_that_is_not_a_string(sd):
    with pytest.raises(ArgumentError, match="unknown preprocessing"):
        vggfast.Engine(sd, preprocess=["caffe"])


@pytest.mark.parametrize("key,value", [("features.0.weight", torch.tensor(1.0)),
                                       ("classifier.6.weight", torch.tensor(1.0)),
                                       ("classifier.6.bias", torch.tensor(1.0))])
def test_scalar_weight_tensors_are_refused(sd, key, value):
    with pytest.raises(WeightsError):
        load({**sd, key: value})


def test_canonical_conv_weight_of_wrong_rank_is_refused(sd):
    canonical = dict(load(sd).state_dict)
    canonical["conv1_1.weight"] = torch.ones(3)
    with pytest.raises(WeightsError, match="4-D"):
        load(canonical)


def test_overflowing_weights_are_an_error_not_nan_probabilities():
    m = small_model("A")
    sd = m.state_dict()
    sd["features.0.weight"] = sd["features.0.weight"].abs() * 1e38 + 1e37   # conv1_1 -> +inf
    eng = vggfast.Engine(sd)
    with pytest.raises(WeightsError, match="not finite"):
        eng.classify(torch.rand(3, 40, 40), scales=[32])
    with pytest.raises(WeightsError, match="not finite"):
        eng.logits(torch.rand(1, 3, 32, 32))


def test_logits_refuse_tensors_without_values(eng):
    with pytest.raises(ArgumentError, match="dense float tensor .* not a meta tensor$"):
        eng.logits(torch.empty(1, 3, 32, 32, device="meta"))


def test_decompression_bomb_limits(tmp_path, monkeypatch):
    """Between PIL's pixel limit and twice it (a 108-MP phone photo) PIL only warns: the image
    is read, without the warning; over twice the limit it is refused like PIL refuses it."""
    path = tmp_path / "big.png"
    Image.new("RGB", (60, 60)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2500)      # 3600 pixels: warning range
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pp.load_image(str(path)).shape == (3, 60, 60)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)      # over twice the limit
    with pytest.raises(ImageError, match="too many pixels"):
        pp.load_image(str(path))


def test_huge_arrays_and_tensors_meet_the_file_limit_before_any_copy(monkeypatch):
    """A broadcast array or an expanded tensor of 100000x100000 pixels costs nothing to make;
    converting it would take 120 GB. Over twice PIL's limit it is refused, as a file is, before
    anything is copied; at the limit it is read; with the limit off (None) the caller's word
    stands."""
    import numpy as np
    huge = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (100_000, 100_000, 3))
    for img in (huge, torch.zeros(3, 1, 1).expand(3, 100_000, 100_000),
                np.broadcast_to(np.zeros((1, 1), np.float32), (100_000, 100_000))):
        with pytest.raises(ImageError,
                           match=r"too many pixels \(100000x100000, HxW: .*MAX_IMAGE_PIXELS"):
            pp.load_image(img)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    assert pp.load_image(np.zeros((40, 30, 3), np.uint8)).shape == (3, 40, 30)   # 1200 pixels
    with pytest.raises(ImageError, match=r"too many pixels \(40x31, HxW: 1240 > 1200, "):
        pp.load_image(torch.rand(3, 40, 31))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert pp.load_image(torch.rand(3, 40, 31)).shape == (3, 40, 31)


def test_a_generator_of_images_is_told_to_be_a_list(eng):
    with pytest.raises(ImageError, match=r"not generator; pass several images as a list$"):
        eng.classify(torch.rand(3, 40, 40) for _ in range(2))
    with pytest.raises(ImageError, match=r"not list; one image is expected here"):
        pp.load_image([torch.rand(3, 40, 40)])


def test_decoding_in_threads_leaves_the_warning_filters_alone(tmp_path):
    """warnings.catch_warnings is process-wide: concurrent decodes must not leak its filters."""
    import threading
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    before = list(warnings.filters)
    errors = []

    def work():
        try:
            for _ in range(30):
                pp.load_image(str(tmp_path / "a.png"))
        except Exception as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and warnings.filters == before


def test_a_tiny_image_file_is_named(tmp_path):
    Image.new("RGB", (7, 300)).save(tmp_path / "banner.png")
    with pytest.raises(ImageError, match=r"banner\.png: image is 300x7 \(HxW\) pixels"):
        pp.load_image(str(tmp_path / "banner.png"))


def test_ensemble_weights_not_a_list_and_huge_weights(eng):
    with pytest.raises(ArgumentError, match="weights must be"):
        vggfast.Ensemble([eng, eng], weights=5)
    huge = vggfast.Ensemble([eng, eng], weights=[1e308, 1e308])
    assert huge.weights == [0.5, 0.5]


def test_localize_flip_must_be_yes_or_no(sd):
    from vggfast.localize import localize  # the submodule is not imported by `import vggfast`
    with pytest.raises(ArgumentError, match="flip"):
        localize(vggfast.Engine(sd), IMG, (32,), 5, "no", 0.5)


@pytest.mark.parametrize("argv", [
    ["extract", "{imgs}", "--out", "{tmp}"],                   # a folder, not a file
    ["extract", "{imgs}", "--out", ""],
    ["evaluate", "{imgs}", "--limit", "-1"],
    ["evaluate", "{imgs}", "--class-map", "{binary}"],
    ["heatmap", "{img}", "--class", "\u00b2", "--out", "{tmp}/h.png"],   # isdigit() but no int
    ["train", "--data", "{imgs}", "--out", "{binary}", "--epochs", "1", "--width", "0.0625",
     "--image-size", "32", "--batch-size", "2", "--workers", "0"],      # --out is a file
])
def test_cli_refusals_found_by_the_audit(argv, weights_file, tmp_path, samples, capsys):
    for label in ("3", "5"):
        imgs = tmp_path / "imgs" / label
        imgs.mkdir(parents=True)
        Image.fromarray(IMG).save(imgs / "a.png")
    binary = tmp_path / "map.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    fill = dict(imgs=str(imgs.parent), tmp=str(tmp_path), binary=str(binary),
                img=str(imgs / "a.png"))
    argv = [a.format(**fill) for a in argv]
    if argv[0] != "train":
        argv += ["--weights", weights_file, "--scale" if argv[0] == "heatmap" else "--scales", "32"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("env", [{"WORLD_SIZE": "0"}, {"RANK": "1", "WORLD_SIZE": "1"}])
def test_extract_refuses_inconsistent_rank_environment(env, weights_file, tmp_path, monkeypatch,
                                                       capsys):
    Image.fromarray(IMG).save(tmp_path / "a.png")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["extract", str(tmp_path), "--out", str(tmp_path / "f.npy"), "--weights",
                 weights_file, "--scales", "32"]) == 2
    assert "WORLD_SIZE" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout=2.0), "dropout must be a probability"),
    (dict(dropout=True), "dropout must be a probability"),
    (dict(image_size=100_000, width=0.125), r"would have [\d,]+ parameters"),
])
def test_build_model_refuses_nonsense_before_allocating(kwargs, match):
    with pytest.raises(ArgumentError, match=match):
        vggfast.build_model("A", **kwargs)


# -- found by the photo-formats audit --------------------------------------------------------------

def _bad_avif(tmp_path):
    """An AVIF whose primary item does not exist: libavif's decoder raises RuntimeError."""
    import io
    from PIL import features
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, "AVIF")
    path = tmp_path / "bad.avif"
    path.write_bytes(buf.getvalue().replace(b"pitm\0\0\0\0\0\1", b"pitm\0\0\0\0\0\7"))
    return path


def test_decoder_errors_that_are_not_oserror_are_image_errors(tmp_path, weights_file, capsys):
    """PIL's plugins raise more than OSError on bad bytes (a traceback here before), and an
    exception without a message left nothing to quote (an IndexError before)."""
    path = _bad_avif(tmp_path)
    with pytest.raises(ImageError, match=r"bad\.avif: corrupt or truncated image \(Failed to "):
        pp.load_image(str(path))
    assert main(["classify", str(path), "--weights", weights_file, "--scales", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.avif" in err, err
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    im = Image.open(tmp_path / "ok.png")

    def load():
        raise EOFError()
    im.load = load
    with pytest.raises(ImageError, match=r"corrupt or truncated image \(EOFError\)"):
        pp.load_image(im)
    im.close()


def _tiff_with(tmp_path, name, tag, count=None, value=None):
    """A 16x12 RGB TIFF whose IFD entry for `tag` gets a new count or (short) value."""
    import io
    import struct
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (10, 200, 30)).save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack("<H", data[at:at + 2])[0] == tag:
            if count is not None:
                data[at + 4:at + 8] = struct.pack("<I", count)
            if value is not None:
                data[at + 8:at + 10] = struct.pack("<H", value)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_cli_output_carries_none_of_pils_own_reports(tmp_path, weights_file, capsys, caplog):
    """PIL warns about a TIFF tag whose data runs past the end of the file while decoding it
    (the image is still read) and about every PNG8 with per-entry alpha (pngquant's output) it
    converts to RGB, and logs an error before refusing a TIFF with 229 samples per pixel: all
    printed beside the CLI's results and its one-line error."""
    skipped = _tiff_with(tmp_path, "skipped.tiff", 284, count=100_000)   # PlanarConfiguration
    refused = _tiff_with(tmp_path, "refused.tiff", 277, value=229)       # SamplesPerPixel
    png8 = tmp_path / "png8.png"
    Image.fromarray(IMG).quantize(16).save(png8, transparency=bytes(range(0, 256, 16)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["classify", str(skipped), str(png8), str(refused), "--weights",
                     weights_file, "--scales", "32"])
    out, err = capsys.readouterr()
    assert code == 2 and "skipped.tiff" in out and "png8.png" in out
    assert err.count("\n") == 1 and "refused.tiff" in err, err
    assert not [str(w.message) for w in caught if "PIL" in w.filename]
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("PIL")]


def test_cli_classify_skips_a_photo_over_the_memory_budget_by_name(tmp_path, weights_file,
                                                                   capsys, monkeypatch):
    """A panorama over the memory budget failed the whole command (the other photos' results
    lost) with an error naming "image 1" of the chunk, not the file; evaluate and extract
    already skipped it by name."""
    import json
    Image.fromarray(IMG).save(tmp_path / "a.png")
    Image.new("RGB", (4000, 8)).save(tmp_path / "pano.png")
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "8MiB")   # 13.6 MiB for the panorama
    assert main(["classify", str(tmp_path / "pano.png"), str(tmp_path / "a.png"), "--weights",
                 weights_file, "--scales", "32", "--json"]) == 2
    out, err = capsys.readouterr()
    assert [r["image"] for r in json.loads(out)["results"]] == [str(tmp_path / "a.png")]
    assert err.count("\n") == 1 and "pano.png (8x4000, HxW) at scale 32 gives" in err, err


def test_an_unreadable_image_of_a_list_is_named_by_its_index(eng, tmp_path, monkeypatch):
    """A list's decode errors did not say which image (the planner's errors do): one wrongly
    scaled array among 64 was a hunt. The index is the list's, not the chunk's."""
    import vggfast.engine as E
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    (tmp_path / "notes.jpg").write_text("not a photo")
    for bad, why in [(IMG.astype(np.float32), "float image values must lie in"),
                     (str(tmp_path / "notes.jpg"), "notes.jpg: not an image file")]:
        items = [IMG, torch.rand(3, 40, 40), IMG[:, ::-1], bad]
        for call in (lambda: eng.classify(items, scales=32),
                     lambda: eng.features(items, layer="pool5", scales=32),
                     lambda: vggfast.Ensemble([eng, eng]).classify(items, scales=32)):
            with pytest.raises(ImageError, match=f"^image 3: .*{why}") as err:
                call()
            assert err.value.image == 3 and why in err.value.reason
    with pytest.raises(ImageError, match="^float image values") as err:   # one image: as it was
        eng.classify(IMG.astype(np.float32), scales=32)
    assert err.value.image is None


# -- found by the image-inputs audit ---------------------------------------------------------------

def test_cli_prints_a_file_name_its_stdout_cannot_encode(tmp_path, weights_file, monkeypatch):
    """A photo whose file name is not UTF-8 (Python reads it with lone surrogates) was
    classified, then printing its name ended the command with a UnicodeEncodeError traceback
    under a strict UTF-8 stdout (en_US.UTF-8 terminals; C.UTF-8 happens to escape it)."""
    import io
    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")                      # Latin-1 bytes, not UTF-8
    Image.fromarray(IMG).save(folder / name)
    buf = io.BytesIO()
    out = io.TextIOWrapper(buf, encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["classify", str(folder), "--weights", weights_file, "--scales", "32"]) == 0
    out.flush()
    assert f"{folder}/caf\\udce9.png\n" in buf.getvalue().decode()
    assert out.errors == "strict"                            # the caller's stream as it was


def test_file_objects_are_named_and_any_read_failure_is_an_image_error(tmp_path):
    """A zip member whose bytes fail their CRC raised zipfile.BadZipFile through load_image (a
    traceback: only OSError and ValueError were caught); a file object's errors said "<bytes>"
    where it has a name; an empty file, upload or pipe was "not an image file PIL can read"."""
    import io
    import zipfile
    path = tmp_path / "a.png"
    Image.fromarray(IMG).save(path)
    data = path.read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("in/a.png", data)
    raw = bytearray(buf.getvalue())
    raw[raw.find(b"IDAT") + 10] ^= 0xFF                   # the member no longer matches its CRC
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z, z.open("in/a.png") as member:
        with pytest.raises(ImageError, match=r"^could not read the image from in/a\.png "
                                             r"\(ZipExtFile\): Bad CRC-32"):
            pp.load_image(member)
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[:len(data) // 2])
    with open(cut, "rb") as f:
        with pytest.raises(ImageError, match=f"^{re.escape(str(cut))}: corrupt or truncated image"):
            pp.load_image(f)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with open(empty, "rb") as f:
        for src, name in ((empty, str(empty)), (str(empty), str(empty)), (f, str(empty)),
                          (b"", "<bytes>"), (io.BytesIO(b""), "<bytes>")):
            with pytest.raises(ImageError, match="empty \\(0 bytes\\), not an image file") as err:
                pp.load_image(src)
            assert str(err.value).startswith(f"{name}: "), err.value


def test_paths_that_are_no_file_and_files_the_system_cannot_read(tmp_path, eng, monkeypatch):
    """/dev/null and a FIFO exist but were "image not found" (a FIFO must still not be opened:
    that waits for a writer); an empty path quoted nothing ("image not found: "); a file the
    system cannot read (permission denied, an I/O error) was "corrupt or truncated"."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for src in (os.devnull, fifo):
        with pytest.raises(ImageError, match=f"^{re.escape(os.fspath(src))} is not a regular "
                                             "file \\(a device, pipe or socket\\)"):
            pp.load_image(src)
    for call in (lambda: pp.load_image(""), lambda: eng.classify(["", IMG], scales=32)):
        with pytest.raises(ImageError, match="an empty path is not an image file$"):
            call()
    path = tmp_path / "locked.png"
    Image.fromarray(IMG).save(path)

    def refuse(fp, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fp))  # as open() does, even as root
    monkeypatch.setattr(Image, "open", refuse)
    with pytest.raises(ImageError, match=f"^{re.escape(str(path))}: cannot read the file "
                                         r"\(Permission denied\)$"):
        pp.load_image(path)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_array_subclasses_strided_buffers_and_nan_arrays():
    """np.matrix (an ndarray) raised numpy's ValueError from deep inside the conversion; a
    strided memoryview of a good file was "corrupt or truncated"; a NaN numpy array was called
    an "image tensor"."""
    gray = IMG[..., 0]
    want = pp.load_image(gray)
    assert torch.equal(pp.load_image(np.matrix(gray)), want)
    assert torch.equal(pp.load_image(np.ma.masked_array(gray)), want)
    import io
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, "PNG")
    doubled = np.repeat(np.frombuffer(buf.getvalue(), np.uint8), 2)   # every byte twice
    assert torch.equal(pp.load_image(memoryview(doubled)[::2]), pp.load_image(IMG))
    with pytest.raises(ImageError, match="^float image contains NaN or infinite values$"):
        pp.load_image(np.full((20, 20, 3), np.nan, np.float32))


def test_postscript_named_as_a_photo_is_not_handed_to_ghostscript(tmp_path, monkeypatch):
    """PIL identifies files by content: PostScript in "photo.jpg" opened as EPS and its load ran
    Ghostscript on the file's program wherever gs is installed (here, without gs, it was a
    "corrupt or truncated image")."""
    from PIL import EpsImagePlugin
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append(a))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 20\nshowpage\n"
    path = tmp_path / "photo.jpg"
    path.write_bytes(eps)
    for src, name in ((path, str(path)), (eps, "<bytes>")):
        with pytest.raises(ImageError, match=f"^{re.escape(name)}: EPS \\(PostScript\\) is not "
                                             "decoded"):
            pp.load_image(src)
    assert ran == []


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_feature_extractor_and_logits_refuse_tensors_without_a_dense_shape(sd, eng):
    """FeatureExtractor let sparse and meta tensors through to PyTorch's RuntimeErrors (logits
    refused them), and both asked a nested tensor for its shape first, which raises; the
    refusals now say what was given."""
    fx = vggfast.FeatureExtractor(sd, layers=["relu2_1"])
    nested = torch.nested.nested_tensor([torch.rand(3, 40, 50), torch.rand(3, 40, 40)])
    for x, got in [(torch.rand(1, 3, 40, 50).to_sparse(), "a sparse_coo tensor"),
                   (torch.empty(1, 3, 40, 50, device="meta"), "a meta tensor"),
                   (nested, "a nested tensor"), (torch.rand(3, 40, 50), r"float32 \[3, 40, 50\]"),
                   (IMG, "ndarray")]:
        for call in (fx, eng.logits):
            with pytest.raises(ArgumentError, match=f"expects a dense float tensor \\[N, 3, H, W\\]"
                                                    f", already normalised, not {got}$"):
                call(x)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged])
def test_a_nested_tensor_of_images_is_refused_with_the_list_to_pass(eng, layout):
    """A nested tensor (a natural holder of images of different sizes) raised PyTorch's
    "NestedTensorImpl doesn't support sizes" RuntimeError from load_image."""
    nt = torch.nested.nested_tensor([torch.rand(3, 40, 50), torch.rand(3, 40, 40)], layout=layout)
    for call in (lambda: pp.load_image(nt), lambda: eng.classify(nt, scales=32)):
        with pytest.raises(ImageError, match=r"^a nested tensor is not one image; pass its "
                                             r"images as a list, list\(t.unbind\(\)\)$"):
            call()
    assert len(eng.classify(list(nt.unbind()), scales=32)) == 2


def test_a_path_given_as_bytes_says_to_pass_the_path(tmp_path):
    """bytes are an encoded image (a path is a str or os.PathLike): os.fsencode(path) or a name
    from os.listdir(b".") was "not an image file PIL can read", as if the photo were bad."""
    import io
    path = tmp_path / "cat.png"
    Image.fromarray(IMG).save(path)
    for src in (os.fsencode(path), bytearray(os.fsencode(path)), io.BytesIO(os.fsencode(path))):
        with pytest.raises(ImageError, match=f"^<bytes>: these bytes are no image but a file's "
                                             f"path; .* pass the path itself \\(a str\\): "
                                             f"{re.escape(str(path))}$"):
            pp.load_image(src)
    with pytest.raises(ImageError, match="^<bytes>: not an image file PIL can read$"):
        pp.load_image(os.fsencode(tmp_path / "absent.png"))


def test_a_bytes_path_like_is_named_as_a_str(tmp_path):
    """os.scandir(b".") gives path-likes whose path is bytes: they were read, but their errors
    quoted the path as b'...'."""
    (tmp_path / "bad.png").write_text("not a photo")
    Image.fromarray(IMG).save(tmp_path / "good.png")
    entries = {e.name: e for e in os.scandir(os.fsencode(tmp_path))}
    assert torch.equal(pp.load_image(entries[b"good.png"]), pp.load_image(IMG))
    with pytest.raises(ImageError, match=f"^{re.escape(str(tmp_path / 'bad.png'))}: not an "
                                         "image file PIL can read$"):
        pp.load_image(entries[b"bad.png"])

    class Missing:
        def __fspath__(self):
            return os.fsencode(tmp_path / "none.png")
    with pytest.raises(ImageError, match=f"^image not found: {re.escape(str(tmp_path))}"):
        pp.load_image(Missing())


def test_cli_error_for_a_damaged_tiff_is_one_line_at_the_file_descriptor(tmp_path, weights_file,
                                                                        capfd):
    """libtiff writes its own messages to stderr from C ("JPEGLib: Not a JPEG file: starts
    with 0x80 0x17."), which no Python-level silencing reaches: each damaged TIFF printed that
    line above the command's one-line error. Good TIFFs, libtiff-compressed, still decode."""
    import io
    import struct
    buf = io.BytesIO()
    Image.fromarray(IMG).save(buf, "TIFF", compression="tiff_lzw")
    data = bytearray(buf.getvalue())
    (tmp_path / "lzw.tiff").write_bytes(bytes(data))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * i
        if struct.unpack("<H", data[at:at + 2])[0] == 259:        # Compression: LZW -> JPEG
            data[at + 8:at + 10] = struct.pack("<H", 7)
    (tmp_path / "bad.tiff").write_bytes(bytes(data))
    capfd.readouterr()
    assert main(["classify", str(tmp_path / "bad.tiff"), str(tmp_path / "lzw.tiff"),
                 "--weights", weights_file, "--scales", "32"]) == 2
    out, err = capfd.readouterr()
    assert str(tmp_path / "lzw.tiff") in out
    assert err.count("\n") == 1, err
    assert err.startswith(f"vggfast: error: {tmp_path / 'bad.tiff'}: corrupt or truncated"), err
    with pytest.raises(ImageError):      # outside the command line, libtiff is left as it was
        pp.load_image(tmp_path / "bad.tiff")


def test_a_symbolic_link_to_nothing_is_named_as_one(tmp_path):
    """A dangling link or a link loop said only "image not found", though `ls` lists the file."""
    dangling, loop = tmp_path / "gone.jpg", tmp_path / "loop.jpg"
    dangling.symlink_to(tmp_path / "deleted.jpg")
    loop.symlink_to(loop)
    with pytest.raises(ImageError, match=r"^image not found: .*gone\.jpg is a symbolic link to "
                                         r".*deleted\.jpg, which does not exist$"):
        pp.load_image(dangling)
    with pytest.raises(ImageError, match=r"^image not found: .*loop\.jpg is a loop of symbolic "
                                         r"links$"):
        pp.load_image(str(loop))
    with pytest.raises(ImageError, match=r"^image not found: .*absent\.jpg$"):
        pp.load_image(tmp_path / "absent.jpg")


@pytest.mark.parametrize("value", ["x", "-1", "1.5"])
def test_a_local_rank_that_is_no_rank_is_one_line(tmp_path, monkeypatch, capsys, value):
    """int(os.environ["LOCAL_RANK"]) was a ValueError traceback (train; extract on nccl)."""
    from vggfast.train import _resolve_device
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(VGGFastError, match=r"^LOCAL_RANK='.*' in the environment is not a rank"):
        _resolve_device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _resolve_device("cpu").type == "cpu"


_CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 721598400000 bytes.\nsecond line of the C++ report")


@pytest.mark.parametrize("raised", [RuntimeError(_CPU_OOM), MemoryError(),
                                    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                "allocate 20.00 GiB")])
@pytest.mark.parametrize("call", [
    lambda e, img: e.classify(img, scales=[32, 40]),
    lambda e, img: e.features(img, layer="pool5", scales=[32]),
    lambda e, img: e.feature_maps(img, layer="pool5", scale=32),
    lambda e, img: e.score_map(img, scale=32),
    lambda e, img: e.logits(torch.zeros(1, 3, 32, 32)),
    lambda e, img: vggfast.Ensemble([e, e]).classify(img, scales=[32]),
    lambda e, img: vggfast.protocols.evaluate(e, [(img, 1)], scales=[32], progress=False),
])
def test_a_failed_allocation_in_the_api_is_one_line(sd, call, raised, monkeypatch):
    """A budget raised past what the machine holds lets a request through the up-front check;
    the allocator's failure then came out of Engine.classify as PyTorch's multi-line
    RuntimeError (or a bare MemoryError) that no `except VGGFastError` catches. It is an
    OutOfMemoryError that says what to do, still a torch OutOfMemoryError and a MemoryError for
    code written for PyTorch's, with the allocator's error as its cause."""
    from vggfast.errors import OutOfMemoryError
    e = vggfast.Engine(sd)
    img = torch.rand(3, 40, 48)

    def fail(*a, **k):
        raise raised
    monkeypatch.setattr(e._backend, "run", fail)
    with pytest.raises(OutOfMemoryError) as info:
        call(e, img)
    err = info.value
    assert isinstance(err, VGGFastError) and isinstance(err, MemoryError)
    assert isinstance(err, torch.cuda.OutOfMemoryError) and err.__cause__ is raised
    text = str(err)
    assert "\n" not in text and "VGGFAST_MEMORY_BUDGET" in text
    assert text.startswith(str(raised).splitlines()[0] if str(raised) else "out of memory")


def test_other_runtime_errors_are_not_taken_for_a_failed_allocation(sd, monkeypatch):
    """Only an allocator's failure becomes an OutOfMemoryError: any other RuntimeError is a bug
    and comes out unchanged, with its traceback."""
    e = vggfast.Engine(sd)
    raised = RuntimeError("shape mismatch in conv3_1")
    monkeypatch.setattr(e._backend, "run", lambda *a, **k: (_ for _ in ()).throw(raised))
    with pytest.raises(RuntimeError) as info:
        e.classify(torch.rand(3, 40, 48), scales=[32])
    assert info.value is raised

import json
import os
import pickle
import struct
import zipfile

import pytest
import safetensors.torch
import torch

from conftest import random_bn_statistics, small_model
import vggfast
from vggfast import Engine, VGGFastError, load_weights
from vggfast.configs import TABLE1
from vggfast.errors import WeightsError
from vggfast.weights import load, to_torchvision


def _timm_names(sd):
    """timm's vgg layout (its _filter_fn): FC layers as ConvMlp convs, head.fc a Linear."""
    out = {}
    for k, v in sd.items():
        if k.startswith("classifier.0."):
            k = "pre_logits.fc1." + k.split(".")[-1]
            v = v.reshape(v.shape[0], -1, 2, 2) if v.dim() == 2 else v
        elif k.startswith("classifier.3."):
            k = "pre_logits.fc2." + k.split(".")[-1]
            v = v.reshape(v.shape[0], v.shape[1], 1, 1) if v.dim() == 2 else v
        elif k.startswith("classifier.6."):
            k = "head.fc." + k.split(".")[-1]
        out[k] = v
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture
def ref64():
    """Net D, width 1/16, native size 64 (fc6 is 2x2), and its canonical weights."""
    m = small_model("D", num_classes=7, image_size=64)
    return m, load(m.state_dict())


def test_detects_config_size_classes(ref64):
    m, w = ref64
    s = w.spec
    assert (s.config, s.num_classes, s.image_size, s.grid, s.batch_norm) == ("D", 7, 64, 2, False)
    assert w.state_dict["fc6.weight"].shape == (256, 32, 2, 2)
    assert w.state_dict["fc8.weight"].shape == (7, 256, 1, 1)
    # torchvision flattens (C, H, W): the Linear weight must view as the conv weight
    torch.testing.assert_close(w.state_dict["fc6.weight"].flatten(1), m.classifier[0].weight)


@pytest.mark.parametrize("config", list(TABLE1) + ["vgg13_bn"])
def test_every_configuration_is_detected(config):
    m = small_model(config, width=1 / 32)
    assert load(m.state_dict()).spec.config == m.spec.config
    assert load(m.state_dict()).spec.batch_norm == m.spec.batch_norm


def test_odd_widths_are_read_from_the_tensors():
    m = small_model("B", width=0.1)
    w = load(m.state_dict())
    assert [l.cout for l in w.spec.convs] == [l.cout for l in m.spec.convs]


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "model_state_dict", "module.",
                                  "_orig_mod.", "module._orig_mod.", "timm", "canonical",
                                  "state_dict_ema", "model.", "net.backbone.", "model.timm",
                                  "lightning", "features.module."])
def test_every_input_form_gives_the_same_canonical_weights(ref64, wrap):
    m, w = ref64
    sd = m.state_dict()
    if wrap in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        src = {wrap: sd, "epoch": 3, "optimizer": {"lr": 0.1}}
    elif wrap == "lightning":      # a LightningModule holding the VGG as self.vgg, and a loss
        src = {"state_dict": {**{"vgg." + k: v for k, v in sd.items()},
                              "loss.weight": torch.ones(3)}, "epoch": 1, "global_step": 10}
    elif wrap == "features.module.":   # pytorch/examples' ImageNet script: DataParallel(features)
        src = {"state_dict": {k.replace("features.", wrap, 1): v for k, v in sd.items()},
               "arch": "vgg16", "best_acc1": torch.tensor(71.6), "optimizer": {"state": {}}}
    elif wrap == "model.timm":
        src = {"model." + k: v for k, v in _timm_names(sd).items()}
    elif wrap.endswith("."):
        src = {wrap + k: v for k, v in sd.items()}
    elif wrap == "timm":
        src = _timm_names(sd)
    elif wrap == "canonical":
        src = load_weights(sd)[1]
    else:
        src = sd
    cfg, got = load_weights(src)
    assert cfg == "D"
    _same(got, w.state_dict)


@pytest.mark.parametrize("ext", [".pt", ".pth", ".bin", ".safetensors", "dir"])
def test_files_round_trip(ref64, tmp_path, ext):
    m, w = ref64
    sd = m.state_dict()
    meta = {"config": "D", "class_names": [f"c{i}" for i in range(7)], "preprocess": "caffe"}
    if ext == ".safetensors":
        path = tmp_path / "w.safetensors"
        safetensors.torch.save_file(sd, str(path), metadata={"vggfast": json.dumps(meta)})
    elif ext == "dir":
        path = tmp_path
        safetensors.torch.save_file(sd, str(path / "model.safetensors"))
        (path / "model.json").write_text(json.dumps(meta))
    else:
        path = tmp_path / f"w{ext}"
        torch.save({"state_dict": sd, "meta": meta}, path)
    got = load(path)
    _same(got.state_dict, w.state_dict)
    assert got.class_names == meta["class_names"] and got.preprocess == "caffe"
    eng = Engine(path)
    assert eng.class_names[3] == "c3" and eng.preprocess == "caffe"


@pytest.mark.parametrize("fmt,name", [("safetensors", "vgg.pth"), ("safetensors", "vgg.bin"),
                                      ("torch", "vgg.safetensors"),
                                      ("torch legacy", "vgg.safetensors")])
def test_the_bytes_decide_the_format_not_the_suffix(ref64, tmp_path, fmt, name):
    """A download saved under another suffix (wget .../model.safetensors -O vgg.pth) loads."""
    m, w = ref64
    path = tmp_path / name
    if fmt == "safetensors":
        safetensors.torch.save_file(m.state_dict(), str(path))
    else:
        torch.save(m.state_dict(), path, _use_new_zipfile_serialization=fmt == "torch")
    _same(load(path).state_dict, w.state_dict)


def test_batchnorm_is_folded_with_running_statistics():
    m = small_model("vgg11_bn", num_classes=5)
    torch.manual_seed(1)
    random_bn_statistics(m)
    w = load(m.state_dict())
    assert w.spec.batch_norm and "features.1.running_mean" not in w.state_dict
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
    out = Engine(m.state_dict()).logits(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # and the folded weights saved back in torchvision layout (no BN) give the same network
    torch.testing.assert_close(Engine(to_torchvision(w)).logits(x), ref, rtol=1e-4, atol=1e-5)


def test_features_only_weights_load_but_classify_is_refused(tiny):
    sd = {k: v for k, v in tiny.state_dict().items() if k.startswith("features.")}
    w = load(sd)
    assert w.missing == ("fc6", "fc7", "fc8")
    eng = Engine(sd)
    with pytest.raises(VGGFastError, match="missing"):
        eng.classify(torch.rand(3, 40, 40), scales=32)


def test_nan_classifier_is_refused_for_classify_only(tiny):
    """As torchvision's IMAGENET1K_FEATURES weights: valid features, NaN classifier."""
    sd = tiny.state_dict()
    sd["classifier.0.weight"] = torch.full_like(sd["classifier.0.weight"], float("nan"))
    w = load(sd)
    assert w.nonfinite == ("fc6",) and w.unusable("pool5") == []
    with pytest.raises(VGGFastError, match="NaN"):
        Engine(sd).classify(torch.rand(3, 40, 40), scales=32)


def test_hub_cache_is_found_by_torchvision_name(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="hub cache"):
        load("vgg11")
    with pytest.raises(WeightsError, match=r"not found: vgg17; torchvision names are vgg11, "):
        load("vgg17")
    m = small_model("A", num_classes=1000, width=1 / 32)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(m.state_dict(), tmp_path / "hub" / "checkpoints" / "vgg11-8a719046.pth")
    eng = Engine("vgg11")
    assert eng.spec.config == "A" and eng.class_names[281] == "tabby"


def _hf_cache(root, repo, sd, rev="0123456789abcdef0123456789abcdef01234567", config=None):
    """huggingface_hub's documented cache layout: refs/main names the snapshot holding the files."""
    folder = root / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    snap = folder / "snapshots" / rev
    snap.mkdir(parents=True)
    safetensors.torch.save_file(sd, str(snap / "model.safetensors"))
    if config is not None:
        (snap / "config.json").write_text(json.dumps(config))
    return snap


@pytest.mark.parametrize("name", ["timm/vgg11.tv_in1k", "hf-hub:timm/vgg11.tv_in1k",
                                  "vgg11.tv_in1k"])
def test_timm_weights_are_found_in_the_hugging_face_cache(tmp_path, monkeypatch, name):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    m = small_model("A", num_classes=3, width=1 / 32, image_size=64)   # _timm_names: fc6 2x2
    with pytest.raises(WeightsError, match=r"'timm/vgg11.tv_in1k' is not in the Hugging Face "
                       r"cache .*timm.create_model\('vgg11.tv_in1k', pretrained=True\)"):
        load(name)
    labels = {"label_names": ["ant", "bee", "cat"]}
    _hf_cache(tmp_path, "timm/vgg11.tv_in1k", _timm_names(m.state_dict()), config=labels)
    eng = Engine(name, backend="torch")
    assert eng.spec.config == "A" and eng.class_names == ["ant", "bee", "cat"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(eng.logits(x), m(x), rtol=1e-4, atol=1e-5)
    assert load_weights(name)[0] == "A"


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    m = small_model("B", num_classes=3, width=1 / 32, image_size=64)
    _hf_cache(tmp_path / "hub", "timm/vgg13.tv_in1k", _timm_names(m.state_dict()))
    assert load("hf-hub:timm/vgg13.tv_in1k").spec.config == "B"


def test_hugging_face_names_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)   # import fails
    with pytest.raises(WeightsError, match=r"needs huggingface_hub \(pip install huggingface_hub\)"
                       r"; or pass the weights file's path"):
        load("timm/vgg16.tv_in1k")
    with pytest.raises(WeightsError, match="not found: vgg16.pth"):   # a file name stays one
        load("vgg16.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_vggfast_test",))


def test_a_malicious_pickle_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": _Evil()}}, path)
    with pytest.raises(WeightsError, match="refused"):
        load(path)
    assert not (tmp_path / "pwned_by_vggfast_test").exists()


def _corrupt(tmp_path, tiny, kind):
    sd = tiny.state_dict()
    if kind == "missing file":
        return tmp_path / "nope.pth"
    if kind == "empty dir":
        return tmp_path
    path = tmp_path / "w.pth"
    if kind == "garbage":
        path.write_bytes(os.urandom(1000))
    elif kind == "truncated":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "garbage safetensors":
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + os.urandom(64))
    elif kind == "not a dict":
        torch.save([1, 2, 3], path)
    elif kind == "resnet":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, path)
    elif kind == "missing bias":
        del sd["features.2.bias"]
        torch.save(sd, path)
    elif kind == "wrong shape":
        sd["features.2.weight"] = torch.zeros(5, 4, 3, 3)
        torch.save(sd, path)
    elif kind == "incomplete classifier":
        del sd["classifier.6.weight"], sd["classifier.6.bias"]
        torch.save(sd, path)
    elif kind == "int weights":
        sd["features.0.weight"] = sd["features.0.weight"].to(torch.int32)
        torch.save(sd, path)
    elif kind == "grayscale conv1":
        sd["features.0.weight"] = sd["features.0.weight"][:, :1]
        torch.save(sd, path)
    elif kind == "zero-size conv":    # the last conv's width divided fc6's input: a crash
        sd["features.28.weight"] = sd["features.28.weight"][:0]
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("kind", ["missing file", "empty dir", "garbage", "truncated",
                                  "garbage safetensors", "not a dict", "resnet", "missing bias",
                                  "wrong shape", "incomplete classifier", "int weights",
                                  "grayscale conv1", "zero-size conv"])
def test_bad_weights_get_one_clear_error(tmp_path, tiny, kind):
    with pytest.raises(WeightsError) as err:
        load(_corrupt(tmp_path, tiny, kind))
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n" * 20,
                                     b"\xff\xd8\xff\xe0" + bytes(400), b"{}\n"])
def test_a_file_that_is_no_checkpoint_at_all_is_named_so(tmp_path, content):
    """A text file or a photo passed as weights read "not a readable PyTorch checkpoint (list
    index out of range)", which suggests a damaged download."""
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=r"weights\.pt: not a PyTorch checkpoint \(neither a "
                                           r"zip archive nor a pickle\)$"):
        load(path)


def _damaged(tmp_path, sd, kind):
    path = tmp_path / ("w.safetensors" if "safetensors" in kind else "w.pth")
    if kind.startswith("empty"):
        path.write_bytes(b"")
        return path
    if "safetensors" in kind:
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, path, _use_new_zipfile_serialization=kind != "truncated legacy")
    data = bytearray(path.read_bytes())
    if kind == "zeroed pickle bytes":      # inside data.pkl, past its PROTO opcode
        with zipfile.ZipFile(path) as z:
            info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
        name, extra = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name + extra
        data[start + 2:start + 12] = bytes(10)
    else:
        data = data[:len(data) * 9 // 10]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["empty .pth", "empty .safetensors", "truncated zip",
                                  "truncated legacy", "zeroed pickle bytes",
                                  "truncated safetensors"])
def test_damaged_files_say_so_and_what_to_do(tmp_path, tiny, kind):
    """A file cut short or damaged in a download: named as such (not as a refused pickle), with
    the way out, on one line (torch's miniz reason goes on for three sentences)."""
    with pytest.raises(WeightsError) as err:
        load(_damaged(tmp_path, tiny.state_dict(), kind))
    msg = str(err.value)
    assert "fetch or save it again" in msg and "refused" not in msg
    assert "\n" not in msg and len(msg) < 300 and "If you are seeing" not in msg
    assert ("empty (0 bytes)" in msg) == kind.startswith("empty")


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_state_dict_pickled_with_a_newer_protocol_is_named(tmp_path, tiny, protocol):
    """torch.load(weights_only=True) cannot read torch.save(..., pickle_protocol=4): the reason
    is the protocol, not an object other than tensors and not a damaged file."""
    path = tmp_path / "w.pth"
    torch.save(tiny.state_dict(), path, pickle_protocol=protocol)
    with pytest.raises(WeightsError, match=r"pickled with protocol 4 or later \(opcode FRAME\).*"
                       "torch.save's default protocol"):
        load(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [0, 1, 2, 3])
def test_a_state_dict_pickled_with_an_early_protocol_is_named(tmp_path, tiny, protocol, legacy):
    """torch.save(..., pickle_protocol=0 or 1) has no PROTO opcode: its legacy file was called
    "neither a zip archive nor a pickle", its zip "protocol 0 or later". Protocols 2 and 3 load
    through weights_only; 0 and 1 are named, with how to save them again, on one line."""
    path = tmp_path / "w.pth"
    torch.save(tiny.state_dict(), path, pickle_protocol=protocol,
               _use_new_zipfile_serialization=not legacy)
    if protocol >= 2:
        _same(load(path).state_dict, load(tiny.state_dict()).state_dict)
        return
    with pytest.raises(WeightsError) as err:
        load(path)
    msg = str(err.value)
    fmt = "legacy (non-zip) " if legacy else ""
    assert msg.startswith(f"{path}: a {fmt}PyTorch checkpoint pickled with protocol {protocol} "
                          f"(torch.save(..., pickle_protocol={protocol}))")
    assert "or as safetensors" in msg and "\n" not in msg and len(msg) - len(str(path)) < 300
    assert "neither" not in msg and "or later" not in msg and "damaged" not in msg
    # protocol 0's tensors cannot be read back even unsafely: no weights_only=False advice
    assert ("weights_only=False" in msg) == (protocol == 1)


def test_a_folder_of_checkpoints_names_them(tmp_path):
    """timm's train output: model_best.pth.tar, last.pth.tar, args.yaml; which one is meant is
    the user's choice, so the error lists them."""
    for name in ("model_best.pth.tar", "last.pth.tar", "args.yaml"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"pass the weights file itself \(it holds "
                       r"last.pth.tar, model_best.pth.tar\)$"):
        load(tmp_path)


def test_wrong_config_and_unknown_source(tiny):
    with pytest.raises(WeightsError, match="does not match"):
        load(tiny.state_dict(), config="E")
    with pytest.raises(WeightsError, match="BatchNorm"):
        load(tiny.state_dict(), config="vgg16_bn")
    with pytest.raises(WeightsError):
        load(12345)
    # A and A-LRN share shapes: torchvision indices tell them apart, canonical names cannot, so
    # there the user says which
    a = small_model("A")
    assert load(small_model("A-LRN").state_dict()).spec.config == "A-LRN"
    assert load(load_weights(a.state_dict())[1], config="A-LRN").spec.config == "A-LRN"
    with pytest.raises(WeightsError, match="does not match"):    # no LRN between the blocks
        load(a.state_dict(), config="A-LRN")


def test_nan_in_a_conv_blocks_everything(tiny):
    sd = tiny.state_dict()
    sd["features.0.bias"][0] = float("inf")
    w = load(sd)
    assert w.unusable("pool1") == ["conv1_1"]
    with pytest.raises(VGGFastError):
        Engine(sd).score_map(torch.rand(3, 40, 40), scale=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_check_finds_one_bad_element(dtype):
    from vggfast.weights import all_finite
    t = torch.randn(64, 33).to(dtype)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[17, 5] = bad
        assert not all_finite(u)
    assert all_finite(torch.full((8,), torch.finfo(dtype).max, dtype=dtype))
    assert all_finite(torch.empty(0, dtype=dtype))


def test_features_module_state_dict_alone(tiny):
    """`vgg.features.state_dict()` ("0.weight", "2.weight", ...): the conv stack, no classifier."""
    w = load(tiny.features.state_dict())
    assert w.spec.config == "D" and w.missing == ("fc6", "fc7", "fc8")
    _same({k: v for k, v in w.state_dict.items() if k.startswith("conv")},
          {k: v for k, v in load(tiny.state_dict()).state_dict.items() if k.startswith("conv")})


def test_two_vggs_in_one_checkpoint_are_refused_by_name(tiny):
    sd = tiny.state_dict()
    src = {**{"model." + k: v for k, v in sd.items()},
           **{"perceptual.vgg." + k: v for k, v in sd.items()}}
    with pytest.raises(WeightsError, match="hold 2 VGGs.*'model.'.*'perceptual.vgg.'"):
        load(src)


@pytest.mark.parametrize("ema", ["ema_model.module.", "model_ema.", "ema."])
def test_a_module_with_its_ema_copy_loads_the_model(tiny, ema):
    """A LightningModule holding the VGG and an EMA copy of it (AveragedModel keeps it under
    .module): the model's weights, as for {"state_dict", "state_dict_ema"} checkpoints."""
    sd = tiny.state_dict()
    src = {"state_dict": {**{"model." + k: v for k, v in sd.items()},
                          **{ema + k: v + 1 for k, v in sd.items()}, "ema_model.n_averaged":
                          torch.tensor(5)}}
    _same(load(src).state_dict, load(sd).state_dict)


class _Opaque:
    """Any class of the user's: a checkpoint holding one is refused."""


def test_timm_training_checkpoint_with_its_args_loads(ref64, tmp_path):
    """timm's train script saves argparse.Namespace args beside the weights: allowed, as timm
    itself allows it; any other class is still refused. The allowance is for vggfast's load
    only: torch's process-wide list (all torch 2.4 has) is left as the user had it."""
    import argparse
    path = tmp_path / "checkpoint-3.pth.tar"
    sd = ref64[0].state_dict()
    torch.save({"epoch": 3, "arch": "vgg16", "state_dict": _timm_names(sd),
                "args": argparse.Namespace(lr=0.1, model="vgg16")}, path)
    # as sets: torch 2.14 lists its allowed globals from a set, in an order that can change
    # when the set is rebuilt (safe_globals puts back the same entries)
    before = set(torch.serialization.get_safe_globals())
    assert load(str(path)).spec.config == "D"
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):     # the user's own weights_only load refuses it
        torch.load(path, weights_only=True)
    torch.save({"state_dict": sd, "extra": _Opaque()}, path)
    with pytest.raises(WeightsError, match=r"GLOBAL [\w.]*_Opaque"):
        load(str(path))


def test_numpy_numbers_and_arrays_beside_the_weights_load(ref64, tmp_path):
    """Training scripts save metrics as numpy numbers (best_acc1 = np.float64, an np.int64
    epoch): they were refused as "objects other than tensors". numpy arrays beside the weights
    (their pickle calls ndarray.__setstate__) load as inert stand-ins on torch >= 2.6, where
    torch's allowlist takes named entries; earlier, they are refused by name."""
    import numpy as np
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.5 has no safe_globals")
    path = tmp_path / "model_best.pth.tar"
    sd = ref64[0].state_dict()
    torch.save({"epoch": np.int64(90), "best_acc1": np.float64(71.59), "arch": np.str_("vgg16"),
                "lr": np.float32(1e-4), "done": np.bool_(True), "state_dict": sd}, path)
    w = load(str(path))
    assert w.spec.config == "D"
    for k, v in sd.items():
        if k.startswith("features.0."):
            torch.testing.assert_close(w.state_dict[f"conv1_1.{k.rsplit('.', 1)[1]}"], v.float())
    torch.save({"state_dict": sd, "confusion": np.zeros((2, 2))}, path)
    if hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        _same(load(str(path)).state_dict, w.state_dict)
    else:
        with pytest.raises(WeightsError, match=r"refused.*_reconstruct"):
            load(str(path))


_HYDRA_LIKE = '''
class DictConfig:      # pickles as omegaconf's does: a class with its own __getstate__ state
    def __init__(self, content):
        self._content = dict(content)
    def __getstate__(self):
        return {"_content": self._content, "_metadata": ("flags", None)}
'''


def test_lightning_checkpoint_with_hydra_hyper_parameters_loads(ref64, tmp_path, monkeypatch):
    """Lightning under Hydra saves hyper_parameters as omegaconf DictConfigs, often with
    pathlib paths: weights_only refuses the whole file. Those classes stand in as inert data
    (omegaconf need not be installed; nothing of it runs) and the weights load; a class of any
    other module beside the weights (the user's own, a payload) is still refused, and its code
    never runs."""
    import pathlib
    import sys
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        pytest.skip("torch < 2.6: the allowlist takes no named stand-ins")
    pkg = tmp_path / "fake" / "omegaconf"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "dictconfig.py").write_text(_HYDRA_LIKE)
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    from omegaconf.dictconfig import DictConfig
    sd = ref64[0].state_dict()
    ckpt = {"epoch": 3, "global_step": 900, "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "hyper_parameters": {"cfg": DictConfig({"lr": 0.01, "data": "/data/imagenet"}),
                                 "root": pathlib.PurePosixPath("/data/imagenet")}}
    path = tmp_path / "epoch=3-step=900.ckpt"
    torch.save(ckpt, path)
    for name in [m for m in sys.modules if m.startswith("omegaconf")]:
        monkeypatch.delitem(sys.modules, name)       # as on a machine without omegaconf
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "fake" not in p])
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)          # what vggfast had before
    _same(load(str(path)).state_dict, load(sd).state_dict)
    # a payload beside the weights: refused, never run
    marker = tmp_path / "ran"
    torch.save({"state_dict": sd, "cfg": _Payload(str(marker))}, path)
    with pytest.raises(WeightsError, match=r"refused.*GLOBAL [\w.]*_touch"):
        load(str(path))
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def _touch(marker):
    open(marker, "w").close()


def test_timm_without_head_loads_for_features(ref64):
    """timm's vgg with num_classes=0 keeps pre_logits (fc6, fc7) and has no head.fc."""
    sd = ref64[0].state_dict()
    w = load({k: v for k, v in _timm_names(sd).items() if not k.startswith("head.")})
    assert w.missing == ("fc8",) and "fc7.weight" in w.state_dict
    with pytest.raises(WeightsError):      # torchvision's layout without classifier.6 is not
        load({k: v for k, v in sd.items() if not k.startswith("classifier.6")})


def test_hugging_face_folder_with_pytorch_model_bin(ref64, tmp_path):
    m, w = ref64
    torch.save(_timm_names(m.state_dict()), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vgg16", "num_classes": 7}))
    _same(load(str(tmp_path)).state_dict, w.state_dict)


def _timm_folder(path, sd, **config):
    """A folder as timm's save_for_hf writes it (no timm needed): model.safetensors and a
    config.json of architecture, num_classes, maybe global_pool / model_args, pretrained_cfg."""
    path.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                                str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architecture": "vgg16", "num_classes": 7, "num_features": 4096, **config,
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    return str(path)


@pytest.mark.parametrize("config, pool", [
    (dict(global_pool="max"), "max"), (dict(model_args={"global_pool": "avgmax"}), "avgmax"),
    (dict(global_pool="avg", model_args={"global_pool": "fastmax"}), "fastmax"),
    (dict(global_pool="catavgmax"), "catavgmax")])
def test_a_timm_head_pooling_other_than_a_mean_is_refused_by_name(ref64, tmp_path, config, pool):
    """timm's head pools fc7's map before fc8 as global_pool says; vggfast averages fc8's score
    map, which is that only for a mean. A config.json naming another pooling loaded, and every
    score was silently not timm's; it is refused naming it. A catavgmax head without a
    config.json (fc8 reads twice fc7's width) was "fc8 ... do not fit"; one rule names it too."""
    m, w = ref64
    sd = _timm_names(m.state_dict())
    if pool == "catavgmax":
        sd["head.fc.weight"] = torch.cat([sd["head.fc.weight"]] * 2, 1)
    folder = _timm_folder(tmp_path / "timm", sd, **config)
    with pytest.raises(WeightsError) as err:
        load(folder)
    assert str(err.value) == (
        f"{tmp_path / 'timm' / 'model.safetensors'}: its config.json names timm's "
        f"global_pool={pool!r}, a pooling of fc7's map before fc8 that vggfast cannot reproduce: "
        "its dense evaluation averages fc8's score map, which equals global_pool='avg' only")
    if pool == "catavgmax":
        with pytest.raises(WeightsError, match=r"^fc8 weight \(7, 512\) reads twice fc7's 256 "
                                               r"features, as a head after timm's "
                                               r"global_pool='catavgmax', a pooling"):
            load(sd)


@pytest.mark.parametrize("config", [{}, dict(global_pool="avg"), dict(global_pool="fast"),
                                    dict(model_args={"global_pool": "fastavg"})])
def test_a_timm_head_that_pools_by_a_mean_loads(ref64, tmp_path, config):
    m, w = ref64
    folder = _timm_folder(tmp_path / "timm", _timm_names(m.state_dict()), **config)
    _same(load(folder).state_dict, w.state_dict)


def test_a_headless_timm_model_loads_whatever_its_pooling(ref64, tmp_path):
    """num_classes=0: no fc8 follows the pooling, and features() pools as it is asked."""
    m, w = ref64
    sd = {k: v for k, v in _timm_names(m.state_dict()).items() if not k.startswith("head.")}
    folder = _timm_folder(tmp_path / "timm", sd, num_classes=0, global_pool="max")
    assert load(folder).missing == ("fc8",)


@pytest.mark.parametrize("fmt", ["model.safetensors", "pytorch_model.bin"])
def test_sharded_hugging_face_folder(ref64, tmp_path, fmt):
    """save_pretrained(max_shard_size=...) writes shards and an index of which holds what."""
    m, w = ref64
    sd = _timm_names(m.state_dict())
    stem, ext = fmt.split(".")
    keys = list(sd)
    shards = {f"{stem}-0000{i + 1}-of-00002.{ext}": keys[i::2] for i in range(2)}
    for name, part in shards.items():
        if ext == "safetensors":
            safetensors.torch.save_file({k: sd[k] for k in part}, str(tmp_path / name))
        else:
            torch.save({k: sd[k] for k in part}, tmp_path / name)
    index = tmp_path / f"{fmt}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0},
                                 "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    _same(load(str(tmp_path)).state_dict, w.state_dict)
    _same(load(index).state_dict, w.state_dict)
    (tmp_path / next(iter(shards))).unlink()
    with pytest.raises(WeightsError, match=f"shard {stem}-00001-of-00002.{ext} is not beside it"):
        load(str(tmp_path))


def test_a_modified_classifier_is_named_in_the_refusal():
    m = small_model("D")
    m.classifier = torch.nn.Sequential(torch.nn.Linear(m.classifier[0].in_features, 16),
                                       torch.nn.ReLU(), torch.nn.Linear(16, 10))
    with pytest.raises(WeightsError, match=r"unexpected tensors .*classifier\.2\.weight \(10, 16\)"):
        load(m.state_dict())


def test_other_tools_metadata_does_not_pass_for_ours(tiny, tmp_path):
    """A JSON file that only shares the checkpoint's name (a class list, a training config) and
    another tool's "config" entry are not vggfast metadata."""
    torch.save(tiny.state_dict(), tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(json.dumps(["cat", "dog"]))
    assert load(str(tmp_path / "w.pt")).spec.config == "D"
    (tmp_path / "w.json").write_text(json.dumps({"lr": 0.1, "epochs": 3}))
    assert load(str(tmp_path / "w.pt")).spec.config == "D"
    assert load({"state_dict": tiny.state_dict(),
                 "meta": {"config": "model = dict(type='VGG')"}}).spec.config == "D"


@pytest.mark.parametrize("config,cut,deepest,truncated", [
    ("D", 23, "relu4_3", ["conv5_1", "conv5_2", "conv5_3"]),     # vgg16.features[:23]
    ("D", 4, "relu1_2", None),                                   # the first block alone
    ("E", 21, "relu4_1", None),                                  # vgg19 up to relu4_1
    ("vgg16_bn", 33, "relu4_3", ["conv5_1", "conv5_2", "conv5_3"]),
    ("A", 8, "relu3_1", None),
])
def test_a_conv_stack_cut_short_loads_for_features(config, cut, deepest, truncated):
    """`vgg.features[:cut]` (kept for a perceptual loss): its layers load under the right
    configuration and compute what the cut stack computes; deeper layers are missing."""
    m = small_model(config)
    stack = m.features[:cut]
    w = load(stack.state_dict())
    assert w.spec.config == ("D" if config == "vgg16_bn" else config)
    if truncated:
        assert list(w.missing[:3]) == truncated
    assert w.missing[-3:] == ("fc6", "fc7", "fc8")
    fx = vggfast.FeatureExtractor(stack.state_dict(), layers=[deepest])
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)[deepest], stack(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(WeightsError, match="missing"):
        Engine(stack.state_dict()).classify(torch.rand(3, 40, 40), scales=[32])


class _Sliced(torch.nn.Module):
    """PyTorch's fast_neural_style Vgg16 (and LPIPS' vgg16): vgg.features split into slices whose
    modules keep their index in vgg.features as their name."""

    def __init__(self, features, cuts=(4, 9, 16, 23), renumber=False):
        super().__init__()
        start = 0
        for n, end in enumerate(cuts, 1):
            s = torch.nn.Sequential()
            for x in range(start, end):
                s.add_module(str(x - start if renumber else x), features[x])
            setattr(self, f"slice{n}", s)
            start = end

    def forward(self, x):
        for n in range(1, 5):
            x = getattr(self, f"slice{n}")(x)
        return x


def test_perceptual_loss_slices_load_for_features():
    """slice1.0.weight ... slice4.21.weight (alone, or inside LPIPS as net.slice1.0.weight with
    its lin layers beside) load as vgg.features[:23]; slices numbered from 0 are refused."""
    m = small_model("D")
    sliced = _Sliced(m.features)
    w = load(sliced.state_dict())
    want = load(m.features[:23].state_dict())
    assert w.spec == want.spec and w.missing == want.missing
    for k, v in want.state_dict.items():
        torch.testing.assert_close(w.state_dict[k], v)
    lpips = torch.nn.Module()
    lpips.net, lpips.lin0 = sliced, torch.nn.Conv2d(4, 1, 1)
    fx = vggfast.FeatureExtractor(lpips.state_dict(), layers=["relu4_3"])
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        torch.testing.assert_close(fx(x)["relu4_3"], sliced(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(WeightsError, match="slices numbered from 0"):
        load(_Sliced(m.features, renumber=True).state_dict())


def _mmpretrain_keys(model):
    """mmpretrain's VGG layout of a torchvision-layout model: `backbone.features.I.conv.*` /
    `.bn.*` (one ConvModule per conv, one index per pool), `backbone.classifier.*`."""
    sd, mi = {}, -1
    for i, m in enumerate(model.features):
        if isinstance(m, torch.nn.Conv2d):
            mi += 1
            part = "conv"
        elif isinstance(m, torch.nn.BatchNorm2d):
            part = "bn"
        elif isinstance(m, torch.nn.MaxPool2d):
            mi += 1
            continue
        else:
            continue
        for k, v in m.state_dict().items():
            sd[f"backbone.features.{mi}.{part}.{k}"] = v
    for k, v in model.classifier.state_dict().items():
        sd[f"backbone.classifier.{k}"] = v
    return sd


@pytest.mark.parametrize("config", ["A", "D", "vgg16_bn", "E"])
def test_mmpretrain_checkpoints_load_as_torchvision(config):
    m = small_model(config)
    names = [f"class {i}" for i in range(10)]
    ckpt = {"meta": {"mmcls_version": "0.x", "CLASSES": names}, "state_dict": _mmpretrain_keys(m)}
    w, want = load(ckpt), load(m.state_dict())
    assert w.class_names == names   # mmcls' CLASSES (mmpretrain: meta.dataset_meta.classes)
    new = {"meta": {"dataset_meta": {"classes": tuple(names[::-1])}}, "state_dict": ckpt["state_dict"]}
    assert load(new).class_names == names[::-1]
    assert load({"meta": {"CLASSES": names[:3]}, "state_dict": ckpt["state_dict"]}).class_names is None
    assert w.spec == want.spec and not w.missing
    assert w.state_dict.keys() == want.state_dict.keys()
    for k, v in want.state_dict.items():
        torch.testing.assert_close(w.state_dict[k], v)


def test_a_cut_stack_is_checked_against_a_named_config():
    stack = small_model("D").features[:23].state_dict()       # blocks of 2, 2, 3, 3 convs
    assert load(stack, config="vgg16").spec.config == "D"
    with pytest.raises(WeightsError, match=r"blocks of \[2, 2, 3, 3\]"):
        load(stack, config="E")
    with pytest.raises(WeightsError, match="stop early"):     # a classifier after a cut stack
        load({**{"features." + k: v for k, v in stack.items()},
              **{k: v for k, v in small_model("D").state_dict().items()
                 if k.startswith("classifier.")}})


def test_caffe_conversions_with_a_dropout_first_classifier(tmp_path):
    """jcjohnson/pytorch-vgg's Caffe conversions (vgg16-00b39a1b.pth, used by style-transfer and
    Faster R-CNN code) hold the Linear layers at classifier.1, .4, .6 and expect Caffe's input
    (BGR, 0-255, minus the mean pixel): both are read off that layout and the paper's ImageNet
    fc6 (a 7x7 map in, 8x the last conv's width out)."""
    m = small_model("D", image_size=224)
    moved = {"classifier.0": "classifier.1", "classifier.3": "classifier.4"}
    sd = {}
    for k, v in m.state_dict().items():
        owner, p = k.rsplit(".", 1)
        sd[f"{moved.get(owner, owner)}.{p}"] = v
    torch.save(sd, tmp_path / "vgg16-00b39a1b.pth")
    w = load(str(tmp_path / "vgg16-00b39a1b.pth"))
    _same(w.state_dict, load(m.state_dict()).state_dict)
    assert w.preprocess == "caffe"
    eng = Engine(str(tmp_path / "vgg16-00b39a1b.pth"), device="cpu")
    x = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    # the Caffe convention by hand: BGR, 0-255, minus the BGR mean pixel, through the module
    bgr = x.flip(0) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(3, 1, 1)
    with torch.no_grad():
        want = torch.softmax(torch.cat([m(bgr[None]), m(bgr.flip(-1)[None])]), 1).mean(0)
    got = eng.classify(x, scales=[224]).probs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert Engine(sd, device="cpu", preprocess="torchvision").preprocess == "torchvision"


def test_caffe_conversions_with_torchvision_names_say_where_their_preprocessing_comes_from(
        tmp_path):
    """A Caffe model converted to torchvision's names (Places205's VGG16: 205 classes;
    caffemodel2pytorch renamed) carries no sign of Caffe in its tensors, and the same nets also
    come converted from MatConvNet (RGB input), so vggfast does not guess: it keeps torchvision's
    preprocessing, and `info` says it is the default, not read off the weights. The file's
    metadata (a sidecar JSON) or the argument set "caffe", and `info` names which. (VGG-Face,
    2622 classes, has its own mean pixel: test_weights_zoo.)"""
    m = small_model("D", num_classes=205)
    path = tmp_path / "vgg_places205.pth"
    torch.save(m.state_dict(), path)
    assert load(path).preprocess is None
    eng = Engine(str(path), device="cpu")
    assert (eng.preprocess, eng.info()["preprocess_from"]) == ("torchvision", "default")
    assert "preprocess=torchvision" in repr(eng)
    eng = Engine(str(path), device="cpu", preprocess="caffe")
    assert (eng.preprocess, eng.info()["preprocess_from"]) == ("caffe", "argument")
    assert "preprocess=caffe" in repr(eng)
    (tmp_path / "vgg_places205.json").write_text(json.dumps({"preprocess": "caffe"}))
    eng = Engine(str(path), device="cpu")
    assert (eng.preprocess, eng.info()["preprocess_from"]) == ("caffe", "weights")
    # jcjohnson's layout (Linear layers at classifier.1, .4, .6) is the one read off the tensors
    moved = {"classifier.0": "classifier.1", "classifier.3": "classifier.4"}
    sd = {f"{moved.get(k.rsplit('.', 1)[0], k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}": v
          for k, v in small_model("D", image_size=224).state_dict().items()}
    eng = Engine(sd, device="cpu")
    assert (eng.preprocess, eng.info()["preprocess_from"]) == ("caffe", "weights")


class _CifarVGG(torch.nn.Module):
    """chengyangfu/pytorch-vgg-cifar10's VGG (1/16 width here): torchvision's features, then
    Dropout, Linear(512, 512), ReLU, Dropout, Linear(512, 512), ReLU, Linear(512, 10) on the 1x1
    map of a 32x32 image: its Linear layers sit at classifier.1, .4, .6 as in jcjohnson's files."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers
        torch.manual_seed(0)
        self.features = make_layers([c if c == "M" else c // 16 for c in cfgs["D"]])
        self.classifier = torch.nn.Sequential(
            torch.nn.Dropout(), torch.nn.Linear(32, 32), torch.nn.ReLU(True), torch.nn.Dropout(),
            torch.nn.Linear(32, 32), torch.nn.ReLU(True), torch.nn.Linear(32, 10))
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 1:
                    p.uniform_(-0.1, 0.1)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def test_a_cifar_vgg_with_a_dropout_first_classifier_keeps_torchvisions_input():
    """Its checkpoint ({"epoch", "state_dict" with features under DataParallel, "best_prec1"})
    was read as a Caffe conversion and classified with BGR 0-255 input: wrong, without a word.
    The layout is the same; the input convention is its training script's (torchvision's)."""
    m = _CifarVGG().eval()
    sd = {k.replace("features.", "features.module.", 1): v for k, v in m.state_dict().items()}
    ckpt = {"epoch": 300, "state_dict": sd, "best_prec1": 93.5}
    w = load(ckpt)
    assert (w.spec.image_size, w.spec.num_classes, w.preprocess) == (32, 10, None)
    eng = Engine(ckpt, device="cpu", backend="torch", dtype="float32")
    assert eng.preprocess == "torchvision"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(eng.logits(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_a_torchscript_archive_is_refused_with_the_way_out(tmp_path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit.script is deprecated in recent torch
        scripted = torch.jit.script(small_model("A"))
    scripted.save(str(tmp_path / "ts.pt"))
    with pytest.raises(WeightsError, match=r"TorchScript archive.*state_dict\(\)"):
        load(str(tmp_path / "ts.pt"))


def test_other_tools_weight_files_are_named_in_the_refusal(tmp_path):
    """Keras, MatConvNet, NumPy, ONNX, Caffe files: say what the file is and what vggfast reads;
    a PyTorch file that merely fails keeps torch's reason."""
    import numpy as np
    np.save(tmp_path / "vgg16.npy", np.array({"conv1_1": [np.zeros(3)]}, dtype=object))
    np.savez(tmp_path / "vgg16_weights.npz", conv1_1_W=np.zeros((3, 3, 3, 64), np.float32))
    files = {"vgg16.npy": "NumPy .npy", "vgg16_weights.npz": "NumPy .npz",
             "vgg16.h5": "HDF5", "imagenet-vgg-verydeep-19.mat": "MATLAB",
             "vgg16.onnx": "ONNX", "VGG_ILSVRC_16_layers.caffemodel": "Caffe"}
    (tmp_path / "vgg16.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    (tmp_path / "imagenet-vgg-verydeep-19.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(64))
    (tmp_path / "vgg16.onnx").write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(32))
    (tmp_path / "VGG_ILSVRC_16_layers.caffemodel").write_bytes(b"\n\x0cVGG_ILSVRC_16" + bytes(32))
    import zipfile
    with zipfile.ZipFile(tmp_path / "vgg16.keras", "w") as z:
        z.writestr("config.json", "{}")
        z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    files["vgg16.keras"] = "Keras model"
    (tmp_path / "vgg16.t7").write_bytes(b"\x04\x00\x00\x00\x01\x00\x00\x00" + bytes(64))
    (tmp_path / "vgg16-397923af.params").write_bytes(b"\x12\x01" + bytes(64))
    (tmp_path / "VGG_ILSVRC_16_layers_deploy.prototxt").write_text('name: "VGG_ILSVRC_16"\n')
    files.update({"vgg16.t7": "Lua Torch7", "vgg16-397923af.params": "MXNet / Gluon",
                  "VGG_ILSVRC_16_layers_deploy.prototxt": "Caffe network description"})
    for name, what in files.items():
        with pytest.raises(WeightsError, match=f"{what}.*does not read.*safetensors") as err:
            load(str(tmp_path / name))
        assert "\n" not in str(err.value)
    torch.save(small_model("A").state_dict(), tmp_path / "run.ckpt")
    (tmp_path / "cut.h5").write_bytes((tmp_path / "run.ckpt").read_bytes()[:200])  # truncated
    with pytest.raises(WeightsError, match="not a readable PyTorch checkpoint"):
        load(str(tmp_path / "cut.h5"))
    assert load(str(tmp_path / "run.ckpt")).spec.config == "A"


def test_demo_finds_timms_weights_in_the_hugging_face_cache(tmp_path, monkeypatch):
    """`vggfast demo` looked only in the torch hub cache; timm's copy of torchvision's weights
    is the same network, found in the Hugging Face cache when the hub cache has none."""
    pytest.importorskip("huggingface_hub")
    from vggfast.cli import find_demo_weights
    monkeypatch.delenv("VGGFAST_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert find_demo_weights() is None
    m = small_model("E", num_classes=3, width=1 / 32, image_size=64)
    _hf_cache(tmp_path / "hf", "timm/vgg19.tv_in1k", _timm_names(m.state_dict()))
    assert find_demo_weights() == "timm/vgg19.tv_in1k"
    assert load(find_demo_weights()).spec.config == "E"
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(small_model("A", num_classes=1000, width=1 / 32).state_dict(),
               tmp_path / "torch" / "hub" / "checkpoints" / "vgg11-8a719046.pth")
    assert find_demo_weights() == "vgg11"      # the torch hub cache first


def _torchvision_vgg(cfg="D", num_classes=10, batch_norm=False, seed=0):
    """torchvision's own VGG class at 1/16 width with a 64-wide classifier (its 7x7 adaptive pool
    kept: native size 224), random weights and biases, BatchNorm statistics not the identity:
    the reference another tool's layout of the same tensors must compute."""
    from torchvision.models.vgg import VGG, cfgs, make_layers
    torch.manual_seed(seed)
    layers = [c if c == "M" else c // 16 for c in cfgs[cfg]]
    tv = VGG(make_layers(layers, batch_norm=batch_norm), num_classes=num_classes)
    tv.classifier[0] = torch.nn.Linear(layers[-2] * 49, 64)
    tv.classifier[3] = torch.nn.Linear(64, 64)
    tv.classifier[6] = torch.nn.Linear(64, num_classes)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.uniform_(-0.1, 0.1)
    return random_bn_statistics(tv).eval()


def _logits_match(src, tv, **engine_args):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tv(x)
    got = Engine(src, backend="torch", device="cpu", dtype="float32", **engine_args).logits(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _cadene_keys(sd, prefix=""):
    """Cadene's pretrainedmodels (modify_vggs): features -> _features, classifier[0] / [3] / [6]
    -> linear0 / linear1 / last_linear."""
    fc = {"classifier.0.": "linear0.", "classifier.3.": "linear1.", "classifier.6.": "last_linear."}
    out = {}
    for k, v in sd.items():
        k = "_" + k if k.startswith("features.") else next(
            new + k[len(old):] for old, new in fc.items() if k.startswith(old))
        out[prefix + k] = v
    return out


@pytest.mark.parametrize("bn,prefix", [(False, ""), (True, ""), (False, "module."),
                                       (False, "model.")])
def test_cadene_pretrainedmodels_layout_computes_torchvisions_logits(bn, prefix):
    """pretrainedmodels.vgg16(num_classes=...) saved with state_dict(): `_features.N`, `linear0`,
    `linear1`, `last_linear` (a fine-tuned 10-class head here); read as "no VGG convolution
    tensors found". Its input convention is torchvision's."""
    tv = _torchvision_vgg(batch_norm=bn)
    src = _cadene_keys(tv.state_dict(), prefix)
    w = load(src)
    assert (w.spec.config, w.spec.batch_norm, w.spec.num_classes, w.missing) == ("D", bn, 10, ())
    assert w.preprocess is None
    _same(w.state_dict, load(tv.state_dict()).state_dict)
    _logits_match(src, tv)
    feats = {k: v for k, v in src.items() if "_features." in k}   # model._features alone
    assert load(feats).missing == ("fc6", "fc7", "fc8")
    if prefix == "model.":   # beside a torchvision VGG (a perceptual loss): two VGGs, named
        with pytest.raises(WeightsError, match="hold 2 VGGs.*'loss.vgg.'.*'model.'"):
            load({**src, **{"loss.vgg." + k: v for k, v in tv.state_dict().items()}})


def _layer_name_keys(tv, classifier=True, bare=False):
    """David Bau's dissect vgg16_places365: torchvision's VGG with modules named as Caffe's layers
    (features.conv1_1 ..., classifier.fc6 / fc7 / fc8a); bare: caffemodel2pytorch's conv1_1 ...
    fc8a of the same Caffe model."""
    out, block, conv = {}, 1, 0
    for i, m in enumerate(tv.features):
        if isinstance(m, torch.nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(m, torch.nn.Conv2d):
            conv += 1
            for p, v in m.state_dict().items():
                out[f"{'' if bare else 'features.'}conv{block}_{conv}.{p}"] = v
    for i, name in ((0, "fc6"), (3, "fc7"), (6, "fc8a")):
        for p, v in tv.classifier[i].state_dict().items():
            out[f"{'' if bare else 'classifier.'}{name}.{p}"] = v
    return out


@pytest.mark.parametrize("bare", [False, True])
def test_places365_vgg16_with_caffes_layer_names(bare):
    """dissect's vgg16_places365-*.pth loaded as a conv stack alone ("conv1_1.weight" under
    "features." passed for vggfast's names held by an owner), its classifier.fc6 / fc7 / fc8a
    silently dropped, 1000 classes assumed; now all of it, 365 classes."""
    tv = _torchvision_vgg(num_classes=365)
    src = _layer_name_keys(tv, bare=bare)
    w = load(src)
    assert (w.spec.config, w.spec.num_classes, w.missing) == ("D", 365, ())
    _same(w.state_dict, load(tv.state_dict()).state_dict)
    _logits_match(src, tv)
    _logits_match({"state_dict": {"model." + k: v for k, v in src.items()}}, tv)
    assert load({k: v for k, v in src.items() if "fc" not in k}).missing == ("fc6", "fc7", "fc8")
    with pytest.raises(WeightsError, match="two tensors are named 'fc8.weight'"):
        load({**load(tv.state_dict()).state_dict, "fc8a.weight": torch.zeros(365, 64, 1, 1)})


def _reparametrised(kind):
    import warnings
    from torch.nn.utils import parametrizations, prune
    m = small_model("D")
    layer = m.features[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the old weight_norm is deprecated
        if kind == "pruning":
            prune.l1_unstructured(layer, "weight", amount=0.3)
        elif kind == "global pruning":
            convs = [(c, "weight") for c in m.features if isinstance(c, torch.nn.Conv2d)]
            prune.global_unstructured(convs, prune.L1Unstructured, amount=0.2)
        elif kind == "weight norm":
            torch.nn.utils.weight_norm(layer)
        elif kind == "spectral norm":
            torch.nn.utils.spectral_norm(layer)
        elif kind == "parametrizations.weight_norm":
            parametrizations.weight_norm(layer)
        elif kind == "parametrizations.spectral_norm":
            parametrizations.spectral_norm(m.classifier[0])
    return m.state_dict()


@pytest.mark.parametrize("kind,fix", [
    ("pruning", r"prune\.remove\(layer, 'weight'\)"),
    ("global pruning", r"prune\.remove\(layer, 'weight'\)"),
    ("weight norm", r"remove_weight_norm\(layer\)"),
    ("spectral norm", r"remove_spectral_norm\(layer\)"),
    ("parametrizations.weight_norm", r"parametrize\.remove_parametrizations\(layer, 'weight'\)"),
    ("parametrizations.spectral_norm", r"parametrize\.remove_parametrizations\(layer, 'weight'\)"),
])
def test_reparametrised_weights_are_refused_with_the_way_out(kind, fix):
    """features.2.weight_orig / weight_mask (pruning), weight_g / weight_v (weight norm), ...: the
    layer's weight is not among the tensors; it read "12 convolutions ... match no configuration
    of Table 1". Refused by name, with the torch call that makes the weights plain."""
    sd = _reparametrised(kind)
    for src in (sd, {"state_dict": {"model." + k: v for k, v in sd.items()}}):
        with pytest.raises(WeightsError, match=f"reparametrised.*{fix}") as err:
            load(src)
        assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_a_reparametrised_module_beside_the_vgg_is_not_its_business():
    """A GAN checkpoint: the perceptual-loss VGG and a spectral-normed discriminator with a
    features.N of its own beside it: the VGG loads, whether it sits at the top or under `vgg.`."""
    sd = small_model("D").state_dict()
    disc = {"disc." + k: v for k, v in _reparametrised("spectral norm").items()
            if k.startswith("features.2.")}
    assert "disc.features.2.weight_u" in disc
    for vgg in ("", "vgg."):
        w = load({"state_dict": {**{vgg + k: v for k, v in sd.items()}, **disc}})
        _same(w.state_dict, load(sd).state_dict)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_timm_safetensors_compute_torchvisions_logits(tmp_path, dtype):
    """A half-precision export of timm's layout (pre_logits.fc1 a 4-D [F, C, 7, 7] conv, head.fc)
    as a safetensors file: the tensors are widened exactly, so the logits are those of the
    torchvision model holding the same (rounded) values."""
    tv = _torchvision_vgg()
    with torch.no_grad():
        for p in tv.parameters():
            p.copy_(p.to(dtype).float())
    sd = _timm_names(tv.state_dict())
    sd["pre_logits.fc1.weight"] = tv.classifier[0].weight.detach().reshape(64, 32, 7, 7)
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd, str(path))
    w = load(path)
    assert w.state_dict["fc6.weight"].dtype == torch.float32 and not w.missing
    _logits_match(path, tv)


def test_unusable_weights_name_the_deepest_layer_they_still_compute(tiny):
    """The refusal said "up to the last good layer" without naming it, "are missing" when some
    layers were also NaN, and offered features when not even conv1_1 was usable."""
    sd = {k: v.clone() for k, v in tiny.state_dict().items() if k.startswith("features.")}
    sd["features.17.weight"][0, 0, 0, 0] = float("inf")      # conv4_1; no classifier at all
    eng = Engine(sd)
    with pytest.raises(WeightsError, match=r"layers conv4_1, .*, fc8 of these weights are missing "
                       r"or contain NaN or infinite values; they can be used for features up to "
                       r"pool3 \(layer='pool3'\), not for this request$"):
        eng.classify(torch.rand(3, 40, 40), scales=[32])
    assert eng.features([torch.rand(3, 40, 40)], layer="pool3", scales=[32]).shape[-1] == 16
    sd["features.0.bias"][0] = float("nan")
    with pytest.raises(WeightsError, match=r"layers conv1_1 of .*; nothing can be computed with "
                       r"them$"):
        Engine(sd).features([torch.rand(3, 40, 40)], layer="relu1_1", scales=[32])


def test_tensorflow_checkpoints_and_savedmodels_are_named_in_the_refusal(tmp_path):
    """TF-slim's vgg_16.ckpt (TensorFlow's own VGG release), a V2 checkpoint's .index and
    .data-00000-of-00001, and a SavedModel folder read as "not a PyTorch checkpoint" or "a
    folder without model.safetensors"; the .ckpt and .index files are LevelDB tables (their
    footer ends with the table magic number), here written by hand."""
    import numpy as np
    magic = (0xdb4775248b80fb57).to_bytes(8, "little")
    table = b"\x00\x16\x04vgg_16/conv1/conv1_1/weights" + bytes(np.random.default_rng(0).bytes(200))
    (tmp_path / "vgg_16.ckpt").write_bytes(table + bytes(40) + magic)
    (tmp_path / "model.ckpt.index").write_bytes(table + bytes(40) + magic)
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(bytes(range(256)) * 4)
    saved = tmp_path / "vgg16_savedmodel"
    (saved / "variables").mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"\x08\x01\x12\x00")
    for name in ("vgg_16.ckpt", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        with pytest.raises(WeightsError, match=r"a TensorFlow checkpoint .*does not read.*convert"):
            load(str(tmp_path / name))
    with pytest.raises(WeightsError, match=r"vgg16_savedmodel: a TensorFlow SavedModel folder, "
                                           r"which vggfast does not read"):
        load(str(saved))
    (tmp_path / "notes.ckpt").write_bytes(b"\x00" + bytes(100))   # no table footer: unnamed
    with pytest.raises(WeightsError, match=r"not a PyTorch checkpoint \(neither a zip"):
        load(str(tmp_path / "notes.ckpt"))


@pytest.mark.parametrize("kind", ["parameters alone", "no running stats", "groupnorm"])
def test_normalisation_without_running_statistics_is_named(kind):
    """A BatchNorm VGG's parameters saved alone (dict(model.named_parameters())), BatchNorm built
    with track_running_stats=False, GroupNorm in its place: there is nothing to fold. They read
    as "unexpected tensors ...: a modified VGG"."""
    m = small_model("vgg11_bn")
    if kind == "parameters alone":
        sd = dict(m.named_parameters())
    else:
        for i, mod in enumerate(m.features):
            if isinstance(mod, torch.nn.BatchNorm2d):
                m.features[i] = (torch.nn.GroupNorm(2, mod.num_features) if kind == "groupnorm"
                                 else torch.nn.BatchNorm2d(mod.num_features,
                                                           track_running_stats=False))
        sd = m.state_dict()
    with pytest.raises(WeightsError, match=r"^features\.1 holds a normalisation layer's weight "
                       r"but no running statistics .*save model\.state_dict\(\)"):
        load(sd)
    assert load(m.state_dict() if kind == "parameters alone" else small_model("vgg11_bn")
                .state_dict()).spec.batch_norm


@pytest.mark.parametrize("named", [True, False])
def test_batchnorm_beside_layer_names_is_refused_not_dropped(named):
    """conv1_1.weight ... with bn1_1.running_mean ... (or features.conv1_1 / features.bn1_1): the
    BatchNorm tensors were ignored and the network ran without them, silently wrong."""
    m = small_model("vgg11_bn")
    sd, block, conv = {}, 1, 0
    for mod in m.features:
        if isinstance(mod, torch.nn.MaxPool2d):
            block, conv = block + 1, 0
        elif isinstance(mod, (torch.nn.Conv2d, torch.nn.BatchNorm2d)):
            conv += isinstance(mod, torch.nn.Conv2d)
            kind = "conv" if isinstance(mod, torch.nn.Conv2d) else "bn"
            for p, v in mod.state_dict().items():
                sd[f"{'features.' if named else ''}{kind}{block}_{conv}.{p}"] = v
    with pytest.raises(WeightsError, match=r"BatchNorm statistics \((features\.)?bn1_1\."
                                           r"running_mean, \.\.\.\) beside layer names"):
        load(sd)


def test_deepspeed_model_states_load_and_zero3_placeholders_are_named(tmp_path):
    """DeepSpeed's mp_rank_00_model_states.pt holds the (here bf16) weights under "module" beside
    its own entries: read as "no tensors found". Under ZeRO-3 each partitioned tensor is saved
    empty: the way out is DeepSpeed's consolidation script."""
    tv = _torchvision_vgg()
    with torch.no_grad():
        for p in tv.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    sd = {k: v.to(torch.bfloat16) for k, v in tv.state_dict().items()}
    state = {"module": sd, "buffer_names": [], "optimizer": None, "param_shapes": None,
             "lr_scheduler": {"last_epoch": 3}, "sparse_tensor_module_names": set(),
             "skipped_steps": 0, "global_steps": 40, "global_samples": 640, "dp_world_size": 1,
             "mp_world_size": 1, "ds_config": {"train_batch_size": 16}, "ds_version": "0.14.0"}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save(state, path)
    _logits_match(path, tv)
    torch.save({**state, "module": {k: torch.empty(0, dtype=v.dtype) for k, v in sd.items()}},
               path)
    with pytest.raises(WeightsError, match="every tensor is empty.*zero_to_fp32.py"):
        load(path)


@pytest.mark.parametrize("keys, why", [
    (("features.0.weight", "module.features.0.weight"), "the wrappers' names"),
    (("conv_1_1.weight", "conv1_1.weight"), "conv_B_I is read as convB_I"),
    (("features.conv1_1.weight", "conv1_1.weight"), r"Caffe's layer names are mapped \(fc8a"),
    (("pre_logits.fc1.weight", "classifier.0.weight"), "timm's names are mapped"),
])
def test_two_tensors_given_one_name_by_a_renaming_are_refused(keys, why):
    """Each renaming of other tools' keys refuses to let one tensor silently replace another."""
    from vggfast.weights import _rename
    sd = {k: torch.zeros(1) for k in keys}
    with pytest.raises(WeightsError, match=f"^two tensors are named '.*' once {why}.*; keep one "
                                           "set$"):
        _rename(sd)

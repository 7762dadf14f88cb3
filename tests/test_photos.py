"""Real-photo variety and weights from other tools, found by a new user's QA pass: every odd file
a camera, an editor or another library writes gives the answer its RGB conversion gives, or a
one-line `VGGFastError`; weights saved by timm's and torchvision's code load by their bytes."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch

import vggfast
from conftest import random_bn_statistics, small_model


def _header_length(path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def _safetensors_with_header_length(path, sd, residue, modulus):
    """Save `sd` with save_file, its metadata padded until the header's length is `residue`
    modulo `modulus` (safetensors pads the JSON with spaces to a multiple of 8)."""
    safetensors.torch.save_file(sd, str(path), metadata={"pad": ""})
    n0 = _header_length(path)
    target = n0 + 8 + (residue - n0 - 8) % modulus
    for pad in range(target - n0 - 8, target - n0 + 8):
        safetensors.torch.save_file(sd, str(path), metadata={"pad": "x" * pad})
        if _header_length(path) % modulus == residue:
            return
    raise AssertionError("no padding gave the header length")


@pytest.mark.parametrize("name", ["w.safetensors", "w.pth"])
@pytest.mark.parametrize("residue,modulus,opening", [(0x80, 256, b"\x80"), (0x4B50, 65536, b"PK")])
def test_safetensors_whose_header_length_opens_like_a_pickle_or_zip(tmp_path, name, residue,
                                                                    modulus, opening):
    """A safetensors file opens with its header's length: one in 256 (timm's vgg11 with 10
    classes, a 1920-byte header) starts with 0x80, pickle's PROTO, and was read as a damaged
    pickle ("not a readable PyTorch checkpoint (Unsupported operand 0)"); "PK", a zip's
    opening, likewise."""
    m = small_model("A", num_classes=10)
    sd = m.state_dict()
    path = tmp_path / name
    _safetensors_with_header_length(path, sd, residue, modulus)
    assert path.read_bytes().startswith(opening)
    cfg, _ = vggfast.load_weights(str(path))
    assert cfg == "A"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = vggfast.Engine(str(path), device="cpu", backend="torch").logits(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _timm_features_only_keys(sd):
    """The state dict of timm.create_model(name, features_only=True): a FeatureListNet that
    flattens vgg.features into its own modules, their names joined with "_" (features_0.weight),
    and drops the classifier (pre_logits, head)."""
    return {k.replace("features.", "features_", 1): v for k, v in sd.items()
            if k.startswith("features.")}


@pytest.mark.parametrize("batch_norm", [False, True])
def test_timm_features_only_state_dict_loads(batch_norm):
    """timm's features_only VGG (a backbone, a perceptual loss) was refused as 'unknown layout: no
    VGG convolution tensors found'; its conv stack is vgg.features under flattened names."""
    m = small_model("D", num_classes=10, batch_norm=batch_norm)
    if batch_norm:
        random_bn_statistics(m)
    sd = _timm_features_only_keys(m.state_dict())
    assert "features_0.weight" in sd and not any(k.startswith("features.") for k in sd)
    fx = vggfast.FeatureExtractor(sd, layers=["relu2_2", "relu4_3", "pool5"], device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        got = fx(x)
        ends = {"relu2_2": 8, "relu4_3": 22, "pool5": 30} if not batch_norm else \
            {"relu2_2": 12, "relu4_3": 32, "pool5": 43}
        for name, end in ends.items():
            torch.testing.assert_close(got[name], m.features[:end + 1](x), rtol=1e-4, atol=1e-5)


def test_timm_features_only_model_matches_timm():
    """The same with timm itself (skipped where timm is not installed): every stage
    timm's FeatureListNet returns equals vggfast's layer of that name."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fo = timm.create_model("vgg11", pretrained=False, features_only=True).eval()
    layers = ["relu1_1", "relu2_1", "relu3_2", "relu4_2", "relu5_2", "pool5"]
    assert fo.feature_info.module_name() == ["features.1", "features.4", "features.9",
                                             "features.14", "features.19", "features.20"]
    fx = vggfast.FeatureExtractor(fo.state_dict(), layers=layers, device="cpu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want, got = fo(x), fx(x)
    for name, w in zip(layers, want):
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-5)

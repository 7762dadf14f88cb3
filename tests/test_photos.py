"""Real-photo variety and weights from other tools, found by a new user's QA pass: every odd file
a camera, an editor or another library writes gives the answer its RGB conversion gives, or a
one-line `VGGFastError`; weights saved by timm's and torchvision's code load by their bytes."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch

import vggfast
from conftest import small_model


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

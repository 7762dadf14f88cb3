"""Shared fixtures. On a machine without CUDA the Triton kernels run under the interpreter, which
must be switched on before any kernel module is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

from vggfast.cli import sample_images  # noqa: E402
from vggfast.nn import build_model  # noqa: E402


def skip_unless_triton_backend():
    """Skip unless backend="triton" can run here: CUDA or the interpreter, and a triton that
    vggfast's kernels support (older ones are refused by design, e.g. triton 3.0 with torch 2.4)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from vggfast.triton_backend import unavailable
    why = unavailable()
    if why is not None:
        pytest.skip(f"the triton backend is unavailable here: {why}")


@pytest.fixture(scope="session")
def samples():
    """The bundled real photos: cat 451x300, coffee 600x400, rocket 240x427, astronaut 512x512."""
    paths = {p.stem: p for p in sample_images()}
    assert {"cat", "coffee", "rocket", "astronaut"} <= set(paths)
    return paths


def small_model(config="D", num_classes=10, width=1 / 16, image_size=32, seed=0, batch_norm=None):
    """A width-reduced VGG in eval mode with random (seeded) weights and non-trivial biases."""
    torch.manual_seed(seed)
    m = build_model(config, num_classes=num_classes, width=width, image_size=image_size,
                    batch_norm=batch_norm).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
    return m


def random_bn_statistics(model):
    """Give every BatchNorm of `model` non-trivial running statistics and affine parameters (a
    freshly built one has mean 0, var 1, weight 1, bias 0: folding it would prove nothing)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


@pytest.fixture
def tiny():
    return small_model()


def write_list_files(tmp_path, pano_width: int = 2000) -> None:
    """The odd files of the long-list tests in tmp_path: pano.png (40 x pano_width, over a small
    memory budget), thin.png (a side under the minimum), small.png (a photo that passes) and
    notes.jpg (text, not an image)."""
    from PIL import Image
    Image.new("RGB", (pano_width, 40)).save(tmp_path / "pano.png")
    Image.new("RGB", (40, 5)).save(tmp_path / "thin.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "small.png")
    (tmp_path / "notes.jpg").write_text("not a photo")


def refused_up_front(call, exc, words: str, decoded: list, runs: list):
    """call() raises `exc` naming image 4, its message starting with `words`, before any image
    of the list is decoded (decoded) or any batch runs (runs); returns the exception."""
    decoded.clear()
    runs.clear()
    with pytest.raises(exc) as err:
        call()
    assert str(err.value).startswith(words) and err.value.image == 4, str(err.value)
    assert runs == [] and decoded == []
    return err.value

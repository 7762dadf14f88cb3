
import re

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from vggfast.errors import ImageError
from vggfast.preprocess import (load_image, normalize, rescaled_size, resize_short)


def _png(tmp_path, im, name="x.png", **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_rgb_file_numpy_pil_and_tensor_agree(samples):
    a = load_image(samples["cat"])
    assert a.dtype == torch.uint8 and a.shape == (3, 300, 451)
    im = Image.open(samples["cat"])
    assert torch.equal(load_image(im), a)
    assert torch.equal(load_image(np.asarray(im.convert("RGB"))), a)
    assert torch.equal(load_image(a), a)
    f = load_image(a.float() / 255)
    assert f.dtype == torch.float32 and torch.allclose(f * 255, a.float(), atol=1e-4)


def test_encoded_bytes_and_binary_file_objects(samples, tmp_path):
    """A photo as bytes, bytearray, memoryview, io.BytesIO (from its current position) or an open
    binary file decodes to the same pixels as its path; a text-mode file and a closed one are
    one-line ImageErrors."""
    import io
    want = load_image(samples["cat"])
    data = samples["cat"].read_bytes()
    moved = io.BytesIO(b"junk" + data)
    moved.seek(4)
    with open(samples["cat"], "rb") as f:
        for src in (data, bytearray(data), memoryview(data), io.BytesIO(data), moved, f):
            assert torch.equal(load_image(src), want)
    text = tmp_path / "t.txt"
    text.write_text("not an image")
    closed = io.BytesIO(data)
    closed.close()
    with open(text) as f:
        for src, match in ((f, "binary mode"), (closed, "could not read")):
            with pytest.raises(ImageError, match=match) as err:
                load_image(src)
            assert "\n" not in str(err.value)


@pytest.mark.parametrize("mode", ["L", "1", "P", "LA", "RGBA", "CMYK", "YCbCr"])
def test_8bit_modes_convert_like_pil(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
    im = rgb.convert(mode)
    got = load_image(_png(tmp_path, im, "x.tiff" if mode in ("CMYK", "YCbCr") else "x.png"))
    want = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    assert got.shape == (3, 20, 30) and torch.equal(got, want)


def test_alpha_is_dropped_not_composited(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 0  # red, fully transparent
    got = load_image(_png(tmp_path, Image.fromarray(a, "RGBA")))
    assert got[0].eq(200).all() and got[1:].eq(0).all()


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (12, 10), 1)
    im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    got = load_image(_png(tmp_path, im, transparency=0))
    assert got[:, 0, 0].tolist() == [10, 20, 30]


def test_16bit_and_float_images_keep_their_range(tmp_path):
    a16 = np.full((10, 12), 65535, np.uint16)
    a16[0, 0] = 0
    a16[1, 1] = 32768
    got = load_image(_png(tmp_path, Image.fromarray(a16)))
    assert got.dtype == torch.float32 and got.shape == (3, 10, 12)
    assert got[:, 0, 0].tolist() == [0, 0, 0] and got[0, 2, 2] == 1.0
    assert abs(float(got[0, 1, 1]) - 0.5) < 1e-4
    f = Image.fromarray(np.full((9, 9), 0.25, np.float32), "F")
    assert torch.allclose(load_image(_png(tmp_path, f, "f.tiff")), torch.full((3, 9, 9), 0.25))
    f255 = Image.fromarray(np.full((9, 9), 51.0, np.float32), "F")
    assert torch.allclose(load_image(f255), torch.full((3, 9, 9), 0.2))
    assert load_image(np.full((9, 9, 3), 65535, np.uint16)).eq(1).all()


def test_tensors_take_the_dtypes_numpy_arrays_take():
    """uint16 (torchvision.io's decode of a 16-bit PNG) and bool tensors were refused while the
    same numpy arrays were read; other integer tensors are still refused, by name."""
    a16 = (np.arange(3 * 10 * 12, dtype=np.uint16) * 181).reshape(3, 10, 12)
    mask = np.zeros((10, 12), np.bool_)
    mask[2:5, 3:9] = True
    if hasattr(torch, "uint16"):
        t16 = torch.from_numpy(a16.astype(np.int32)).to(torch.uint16)
        got = load_image(t16)
        assert got.dtype == torch.float32 and torch.equal(
            got, load_image(np.ascontiguousarray(a16.transpose(1, 2, 0))))
        assert abs(float(got.max()) - float(a16.max()) / 65535) < 1e-7
    got = load_image(torch.from_numpy(mask))
    assert got.dtype == torch.uint8 and torch.equal(got, load_image(mask))
    assert set(got.unique().tolist()) == {0, 255}
    with pytest.raises(ImageError, match="uint8, uint16, bool or float.*torch.int64"):
        load_image(torch.zeros(3, 10, 12, dtype=torch.int64))


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    path = tmp_path / "o.jpg"
    im.save(path, exif=exif)
    assert load_image(path).shape == (3, 40, 20)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = _png(tmp_path, Image.new("RGB", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too many pixels"):
        load_image(path)


@pytest.mark.parametrize("bad", ["truncated", "garbage", "missing", "empty", "tiny", "text",
                                 "nan tensor", "normalised tensor", "batch tensor", "int64 array",
                                 "object"])
def test_bad_images_get_one_line_errors(tmp_path, samples, bad):
    if bad == "truncated":
        src = tmp_path / "t.jpg"
        src.write_bytes(samples["cat"].read_bytes()[:3000])
    elif bad == "garbage":
        src = tmp_path / "g.jpg"
        src.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    elif bad == "missing":
        src = tmp_path / "none.jpg"
    elif bad == "empty":
        src = tmp_path / "e.png"
        src.write_bytes(b"")
    elif bad == "tiny":
        src = _png(tmp_path, Image.new("RGB", (1, 1)))
    elif bad == "text":
        src = tmp_path / "t.png"
        src.write_text("hello")
    elif bad == "nan tensor":
        src = torch.full((3, 20, 20), float("nan"))
    elif bad == "normalised tensor":
        src = torch.randn(3, 20, 20) * 2
    elif bad == "batch tensor":
        src = torch.rand(2, 3, 20, 20)
    elif bad == "int64 array":
        src = np.zeros((20, 20, 3), np.int64)
    else:
        src = object()
    with pytest.raises(ImageError) as err:
        load_image(src)
    assert "\n" not in str(err.value)


def test_rescale_rule_is_floor_of_the_long_side():
    assert rescaled_size(300, 451, 256) == (256, 384)  # 256 * 451 / 300 = 384.85
    assert rescaled_size(427, 240, 224) == (398, 224)
    assert rescaled_size(512, 512, 384) == (384, 384)


def test_resize_matches_torchvision_antialiased_resize(samples):
    x = load_image(samples["coffee"])
    got = resize_short(x, 256)
    want = TF.resize(x.float() / 255, 256, antialias=True)
    assert got.shape == want.shape == (3, 256, 384)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_float_tensor_at_scale_is_not_resampled():
    x = torch.rand(3, 256, 300)
    assert torch.equal(resize_short(x, 256), x)


def test_normalisation_conventions():
    x = torch.zeros(3, 2, 2)
    x[0] = 1.0  # pure red
    tv = normalize(x, "torchvision")
    torch.testing.assert_close(tv[:, 0, 0], torch.tensor([(1 - .485) / .229, -.456 / .224,
                                                          -.406 / .225]))
    caffe = normalize(x, "caffe")  # BGR, 0-255, minus the mean pixel
    torch.testing.assert_close(caffe[:, 0, 0], torch.tensor([-103.939, -116.779, 255 - 123.68]))
    with pytest.raises(Exception, match="unknown preprocessing"):
        normalize(x, "imagenet")


def test_normalize_constants_cached_in_inference_mode_still_work_with_autograd():
    from vggfast.preprocess import _mean_std
    _mean_std.cache_clear()
    with torch.inference_mode():
        first = normalize(torch.rand(3, 4, 4), "caffe")
    x = torch.rand(3, 4, 4, requires_grad=True)
    y = normalize(x, "caffe")
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert first.shape == y.shape


def test_big_endian_arrays_read_like_native_ones(tmp_path):
    """np.asarray of a big-endian 16-bit image (I;16B: TIFFs in Motorola byte order) is '>u2';
    it was refused as "not uint16"."""
    a16 = (np.arange(20 * 30, dtype=np.uint16) * 97).reshape(20, 30)
    path = tmp_path / "be.tiff"
    Image.frombytes("I;16B", (30, 20), a16.astype(">u2").tobytes()).save(path)
    a = np.asarray(Image.open(path))
    assert a.dtype == np.dtype(">u2")
    assert torch.equal(load_image(a), load_image(path))
    assert torch.equal(load_image(a16.astype(">f4") / 65535), load_image(a16 / 65535))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF", "MPO"])
def test_multi_frame_files_use_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (40, 30), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:],
                   **({"lossless": True} if fmt == "WEBP" else {}))
    with Image.open(path) as im:
        assert getattr(im, "n_frames", 1) == 3
    got = load_image(path)
    assert got.shape == (3, 30, 40)
    assert (got[0].float() - 250).abs().max() <= 3 and got[1:].float().max() <= 3


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tiff"])
def test_all_eight_exif_orientations_give_the_upright_image(tmp_path, suffix):
    """Each EXIF orientation equals the stored pixels turned by hand (TIFF turns its own on load
    in PIL, so its pixels are compared with the image written)."""
    t = Image.Transpose
    by_hand = {1: [], 2: [t.FLIP_LEFT_RIGHT], 3: [t.ROTATE_180], 4: [t.FLIP_TOP_BOTTOM],
               5: [t.TRANSPOSE], 6: [t.ROTATE_270], 7: [t.TRANSVERSE], 8: [t.ROTATE_90]}
    base = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), np.uint8))
    for orientation, steps in by_hand.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        path = tmp_path / f"o{orientation}{suffix}"
        base.save(path, exif=exif, **({"lossless": True} if suffix == ".webp" else {}))
        with Image.open(path) as stored:
            want = base if suffix != ".jpg" else stored.convert("RGB")
        for step in steps:
            want = want.transpose(step)
        assert torch.equal(load_image(path), torch.from_numpy(np.array(want)).permute(2, 0, 1)), \
            orientation


def test_a_float_image_a_rounding_over_one_stays_in_0_1():
    """An "F" image in [0, 1] whose maximum came out 1.0000001 (float rounding) was read as
    0-255, so the whole photo turned black (all values / 255); arrays and tensors already
    allowed that rounding."""
    a = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    a[0, 0] = np.float32(1.0000001)
    want = load_image(a)
    got = load_image(Image.fromarray(a, "F"))
    assert float(got.max()) == 1.0 and torch.equal(got, want)
    a[0, 0] = 1.01                     # past rounding: the 0-255 reading, as before
    assert torch.allclose(load_image(Image.fromarray(a, "F")), torch.from_numpy(a / 255)[None]
                          .expand(3, -1, -1))


def test_image_size_is_the_decoded_size_without_decoding(samples, tmp_path, monkeypatch):
    """image_size (the checks classify makes before a long list is decoded) reads a file's
    header: the same (H, W) as load_image, EXIF orientation applied, nothing decoded, a file
    object left where it stood."""
    import io
    from vggfast import preprocess as pp
    exif = Image.Exif()
    exif[0x0112] = 6                                     # stored 60x40, shown 40x60
    Image.new("RGB", (60, 40)).save(tmp_path / "turned.jpg", exif=exif.tobytes())
    Image.new("RGB", (64, 48)).save(tmp_path / "icon.ico", sizes=[(16, 16), (64, 48)])
    frames = [Image.new("P", (30, 20)), Image.new("P", (30, 20))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    stream = io.BytesIO(b"junk" + (tmp_path / "turned.jpg").read_bytes())
    stream.seek(4)
    # PIL decodes an ICO to open it (its sizes are only known then); its largest image is used
    assert pp.image_size(tmp_path / "icon.ico") == tuple(load_image(tmp_path / "icon.ico")
                                                         .shape[-2:]) == (48, 64)
    sources = [samples["cat"], str(tmp_path / "turned.jpg"), tmp_path / "anim.gif", (tmp_path / "turned.jpg").read_bytes(), stream,
               Image.open(samples["rocket"]), np.zeros((20, 30), np.uint8),
               torch.zeros(1, 20, 30), torch.zeros(20, 30)]
    want = [tuple(load_image(s).shape[-2:]) for s in sources[:-5]]
    stream.seek(4)
    want += [tuple(load_image(s).shape[-2:]) for s in sources[-5:]]
    stream.seek(4)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    assert [pp.image_size(s) for s in sources] == want and want[1] == (60, 40)
    assert stream.tell() == 4
    monkeypatch.undo()
    for bad, words in [(tmp_path / "none.png", "image not found"), (tmp_path, "is a folder"),
                       (b"", "empty"), (np.zeros((5, 40, 3), np.uint8), "at least 8"),
                       (torch.zeros(2, 3, 8, 8), "must be [3, H, W]"), (3.5, "not float")]:
        with pytest.raises(ImageError, match=re.escape(words)):
            pp.image_size(bad)
    assert pp.image_size(type("Pipe", (), {"read": lambda self: b""})()) is None


import re

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from vggfast.errors import ArgumentError, ImageError
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


@pytest.mark.parametrize("x, got", [
    (torch.full((3, 4, 4), 255, dtype=torch.uint8), r"uint8 \[3, 4, 4\]; divide a uint8 image"),
    (torch.ones(2, 3, 4, 4, dtype=torch.int64), r"int64 \[2, 3, 4, 4\]$"),
    (torch.ones(3, 4, 4, dtype=torch.bool), r"bool \[3, 4, 4\]$"),
    (torch.rand(4, 4, 3), r"float32 \[4, 4, 3\]$"),      # channels last
    (torch.rand(1, 4, 4), r"float32 \[1, 4, 4\]$"),      # grey: was broadcast to 3 channels
    (torch.rand(4, 4), r"float32 \[4, 4\]$"),
    (np.zeros((3, 4, 4), np.float32), "ndarray$")],
    ids=["uint8", "int64", "bool", "hwc", "grey", "2d", "numpy"])
def test_normalize_refuses_what_is_not_float_rgb(x, got):
    # every caller (engine views, executor batches, train transforms, FeatureExtractor) goes
    # through preprocess.normalize: a uint8 image there came back inf, the std cast to 0
    with pytest.raises(ArgumentError, match=r"^normalize expects float RGB in \[0, 1\], "
                                            rf"\[\.\.\., 3, H, W\], not {got}"):
        normalize(x, "caffe")
    for ok in (torch.rand(3, 4, 4), torch.rand(2, 3, 4, 4, dtype=torch.float64)):
        y = normalize(ok, "caffe")
        assert y.dtype == ok.dtype and torch.isfinite(y).all()


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
    sources = [samples["cat"], str(tmp_path / "turned.jpg"), tmp_path / "anim.gif",
               (tmp_path / "turned.jpg").read_bytes(), stream,
               Image.open(samples["rocket"]), np.zeros((20, 30), np.uint8),
               torch.zeros(1, 20, 30), torch.zeros(20, 30)]
    want = [tuple(load_image(s).shape[-2:]) for s in sources[:-5]]
    stream.seek(4)
    want += [tuple(load_image(s).shape[-2:]) for s in sources[-5:]]
    stream.seek(4)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    _no_decoding(monkeypatch)       # a file's load is ImageFile's, not Image.Image's
    assert [pp.image_size(s) for s in sources] == want and want[1] == (60, 40)
    assert stream.tell() == 4
    monkeypatch.undo()
    for bad, words in [(tmp_path / "none.png", "image not found"), (tmp_path, "is a folder"),
                       (b"", "empty"), (np.zeros((5, 40, 3), np.uint8), "at least 8"),
                       (torch.zeros(2, 3, 8, 8), "must be [3, H, W]"), (3.5, "not float")]:
        with pytest.raises(ImageError, match=re.escape(words)):
            pp.image_size(bad)
    assert pp.image_size(type("Pipe", (), {"read": lambda self: b""})()) is None


def _png_chunk(kind, body):
    import struct
    import zlib
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def _png_bytes(im, after=(), **kw):
    """`im` saved as PNG (save options kw: exif=, pnginfo=, ...), with the chunks `after`
    ((type, data) each) added just before IEND, after the pixels (IDAT)."""
    import io
    b = io.BytesIO()
    im.save(b, "PNG", **kw)
    data = b.getvalue()
    assert data[-12:-4] == b"\0\0\0\0IEND"
    return data[:-12] + b"".join(_png_chunk(k, v) for k, v in after) + data[-12:]


def _exif(orientation, prefix=False):
    e = Image.Exif()
    e[0x0112] = orientation
    raw = e.tobytes()       # "Exif\0\0" + a TIFF header and IFD
    return raw if prefix else raw[6:]


def test_ppm_jpeg2000_and_avif_are_sized_from_their_headers(tmp_path, monkeypatch):
    """PPM/PGM/PBM (a text header), JPEG 2000 (the SIZ marker, the jp2h ihdr box) and AVIF (the
    ispe property; the irot/imir boxes and EXIF orientation, which PIL reads with the header)
    give the decoded size at Image.open: image_size(exact=True) and decoded_size (plan, the
    training scan) sized them only by decoding. A header cut short or garbage is still
    refused with load_image's one-line error."""
    import io

    from PIL import features

    from vggfast import preprocess as pp
    im = Image.new("RGB", (57, 41), (10, 120, 200))
    files = {"rgb.ppm": ("PPM", im), "grey.pgm": ("PPM", im.convert("L")),
             "bits.pbm": ("PPM", im.convert("1"))}
    if features.check("jpg_2000"):
        files.update({"a.jp2": ("JPEG2000", im), "a.j2k": ("JPEG2000", im)})
    if features.check("avif"):
        files.update({"a.avif": ("AVIF", im), "turned.avif": ("AVIF", im, _exif(6, prefix=True))})
    if len(files) == 3:
        pytest.skip("this PIL writes neither JPEG 2000 nor AVIF")
    data = {}
    for name, (fmt, image, *exif) in files.items():
        b = io.BytesIO()
        image.save(b, fmt, **({"exif": exif[0]} if exif else {}))
        data[name] = b.getvalue()
        (tmp_path / name).write_bytes(data[name])
    want = {n: tuple(load_image(d).shape[-2:]) for n, d in data.items()}
    assert {n: s for n, s in want.items() if s != (41, 57)} == (
        {"turned.avif": (57, 41)} if "turned.avif" in want else {})
    from PIL import ImageFile
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded"))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    if "a.avif" in data:
        from PIL import AvifImagePlugin
        monkeypatch.setattr(AvifImagePlugin.AvifImageFile, "load",
                            lambda self: pytest.fail("decoded"))
    _no_decoding(monkeypatch)
    for name, d in data.items():
        assert pp.image_size(tmp_path / name, exact=True) == want[name], name
        assert pp.image_size(d, exact=True) == want[name], name
        with Image.open(io.BytesIO(d)) as opened:
            assert pp.decoded_size(opened, d) == want[name], name
    monkeypatch.undo()
    for bad in [b"P6\n57", b"P6\n-3 41\n255\n", b"P5 57 x\n", data["a.jp2"][:40]
                if "a.jp2" in data else b"P4\n"]:
        with pytest.raises(ImageError) as decoded:
            load_image(bad)
        with pytest.raises(ImageError) as sized:
            pp.image_size(bad, exact=True)
        assert str(sized.value) == str(decoded.value) and "\n" not in str(sized.value), bad


def _no_decoding(monkeypatch):
    """Every PIL decoder (PNG's zlib, TIFF's raw and libtiff ones, ...) fails the test."""
    from PIL import Image as I
    monkeypatch.setattr(I, "_getdecoder", lambda *a, **k: pytest.fail("decoded"))


def test_png_and_tiff_sizes_are_the_oriented_decoded_sizes_without_decoding(tmp_path,
                                                                             monkeypatch):
    """A PNG's EXIF orientation may follow its pixels (PIL reads the chunks after IDAT only as
    it decodes), so image_size gave H and W swapped for a PNG with eXIf there, and exact=True
    sized no PNG; a TIFF was swapped twice (PIL reports an oriented TIFF's size turned). Both
    are now sized exactly from their chunks and tags, nothing decoded, for orientations 6 and 8
    (and 1, 3, which keep H and W) before and after the pixels, in eXIf, XMP, ImageMagick's
    zTXt and a tEXt "exif", the last chunk winning, as decoding reads them."""
    import io
    import zlib

    from PIL import PngImagePlugin
    from vggfast import preprocess as pp
    im = Image.new("RGB", (60, 40), (200, 30, 30))          # stored 60x40 (WxH)
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    raw = _exif(6, prefix=True)
    profile = f"\nexif\n{len(raw)}\n{raw.hex()}\n".encode()
    xmp_info = PngImagePlugin.PngInfo()
    xmp_info.add_itxt("XML:com.adobe.xmp", xmp.decode())
    files = {}
    for o in (1, 3, 6, 8):
        files[f"before{o}.png"] = _png_bytes(im, exif=_exif(o, prefix=True))
        files[f"after{o}.png"] = _png_bytes(im, [(b"eXIf", _exif(o))])
        b = io.BytesIO()
        im.save(b, "TIFF", exif=_exif(o, prefix=True))
        files[f"turned{o}.tiff"] = b.getvalue()
    b = io.BytesIO()
    im.save(b, "TIFF", exif=_exif(6, prefix=True), compression="tiff_lzw")   # libtiff's
    files["lzw6.tiff"] = b.getvalue()
    files.update({
        "xmp_before.png": _png_bytes(im, pnginfo=xmp_info),
        "xmp_after.png": _png_bytes(im, [(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)]),
        "zxmp_after.png": _png_bytes(im, [(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0"
                                             + zlib.compress(xmp))]),
        "profile_after.png": _png_bytes(im, [(b"zTXt", b"Raw profile type exif\0\0"
                                                + zlib.compress(profile))]),
        "text_after.png": _png_bytes(im, [(b"tEXt", b"exif\0" + raw)]),
        "6then1.png": _png_bytes(im, [(b"eXIf", _exif(1))], exif=_exif(6, prefix=True)),
        "1then8.png": _png_bytes(im, [(b"eXIf", _exif(8))], exif=_exif(1, prefix=True)),
        "plain.png": _png_bytes(im.convert("L")),
    })
    want = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        want[name] = tuple(load_image(data).shape[-2:])
    kept = {"before1.png", "after1.png", "turned1.tiff", "before3.png", "after3.png",
            "turned3.tiff", "6then1.png", "plain.png"}
    # the files decode as meant: 60x40 (HxW) where turned, else 40x60
    assert want == {n: (40, 60) if n in kept else (60, 40) for n in files}
    _no_decoding(monkeypatch)
    for name, data in files.items():
        for src in (tmp_path / name, str(tmp_path / name), data, io.BytesIO(data)):
            assert pp.image_size(src, exact=True) == pp.image_size(src) == want[name], name


def test_png_sizes_that_cannot_be_promised_are_decoded(tmp_path, monkeypatch):
    """Where the chunks after a PNG's pixels cannot be read as decoding reads them, exact=True
    gives None (Engine.plan then decodes): an APNG (decoding its first frame stops at the next
    frame), a metadata chunk with a broken CRC (decoding does not check it; PIL's header read
    does), a file with no IEND, a PNG PIL image the caller opened (not re-read here)."""
    from vggfast import preprocess as pp
    im = Image.new("RGB", (60, 40))
    frames = [im, Image.new("RGB", (60, 40), (9, 9, 9))]
    apng = tmp_path / "anim.png"
    frames[0].save(apng, save_all=True, append_images=frames[1:], exif=_exif(6, prefix=True))
    bad = bytearray(_png_bytes(im, [(b"eXIf", _exif(6))]))
    bad[-13] ^= 1                                   # the eXIf chunk's CRC
    cut = _png_bytes(im, [(b"eXIf", _exif(6))])[:-12]
    opened = tmp_path / "after.png"
    opened.write_bytes(_png_bytes(im, [(b"eXIf", _exif(6))]))
    cases = [apng, bytes(bad), cut, Image.open(opened)]
    want = [tuple(load_image(c).shape[-2:]) for c in cases[:3]] + [(60, 40)]
    assert want == [(60, 40)] * 4                   # every one decodes turned
    cases[3] = Image.open(opened)                   # not loaded yet
    _no_decoding(monkeypatch)
    assert [pp.image_size(c, exact=True) for c in cases] == [None] * 4


def test_the_training_scan_sizes_images_as_image_size_does_and_decodes_the_rest(tmp_path,
                                                                               monkeypatch):
    """train._header (the localisation scan's sizes, a classification scan's over the pixel
    limit) walked the PNG chunk heads a second way, of its own, and decoded a PNG with EXIF
    after its pixels. It sizes images with preprocess.decoded_size now: image_size's header
    rules where they promise load_image's size (no decoding), else a decode, which gives
    load_image's turned size (an APNG, a broken CRC, no IEND) or finds the pixels cut short."""
    import io

    from vggfast import preprocess as pp
    from vggfast import train as T
    im = Image.new("RGB", (60, 40), (200, 30, 30))          # stored 60x40 (WxH)
    b = io.BytesIO()
    im.save(b, "TIFF", exif=_exif(6, prefix=True))
    j = io.BytesIO()
    im.save(j, "JPEG", exif=_exif(8, prefix=True))
    sure = {"before6.png": _png_bytes(im, exif=_exif(6, prefix=True)),
            "after8.png": _png_bytes(im, [(b"eXIf", _exif(8))]),
            "after3.png": _png_bytes(im, [(b"eXIf", _exif(3))]),
            "plain.png": _png_bytes(im), "turned6.tiff": b.getvalue(), "turned8.jpg": j.getvalue()}
    apng = io.BytesIO()
    im.save(apng, "PNG", save_all=True, append_images=[Image.new("RGB", (60, 40))],
            exif=_exif(6, prefix=True))
    bad = bytearray(_png_bytes(im, [(b"eXIf", _exif(6))]))
    bad[-13] ^= 1                                   # the eXIf chunk's CRC
    unsure = {"anim.png": apng.getvalue(), "bad_crc.png": bytes(bad),
              "no_iend.png": _png_bytes(im, [(b"eXIf", _exif(6))])[:-12]}
    want = {}
    for name, data in {**sure, **unsure}.items():
        (tmp_path / name).write_bytes(data)
        want[name] = tuple(load_image(data).shape[-2:])
    # the files decode as meant: 60x40 (HxW) where turned
    assert want == {n: (40, 60) if n in ("after3.png", "plain.png") else (60, 40)
                    for n in {**sure, **unsure}}
    assert all(pp.image_size(tmp_path / n, exact=True) is None for n in unsure)
    decoded = []
    real = pp._pil_size

    def spy(im, encoded=None):
        size, ok = real(im, encoded)
        decoded.append(not ok)
        return size, ok
    monkeypatch.setattr(pp, "_pil_size", spy)
    for name in unsure:     # (width, height), as the scan gives them
        assert T._header(str(tmp_path / name), oriented=True) == want[name][::-1], name
    assert decoded == [True] * len(unsure)
    # pixels cut short: the decode fails with load_image's reason, the file is skipped
    cut = tmp_path / "cut.png"
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3)).astype(np.uint8)
    whole = _png_bytes(Image.fromarray(noise), [(b"eXIf", _exif(8))])
    cut.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ImageError) as err:
        load_image(cut)
    assert T._header(str(cut), oriented=True) == str(err.value).removeprefix(f"{cut}: ")
    assert T._header(str(cut)) == (60, 40)          # unturned: its header alone is read
    _no_decoding(monkeypatch)
    for name in sure:
        assert T._header(str(tmp_path / name), oriented=True) == want[name][::-1], name
        with Image.open(tmp_path / name) as opened:
            assert pp.decoded_size(opened, tmp_path / name) == pp.image_size(tmp_path / name,
                                                                             exact=True)


def _gray_tiff(path, a, bits, signed, big_endian=False):
    """A one-strip uncompressed grey TIFF of `a` written by hand: PIL writes no signed 16-bit or
    unsigned 32-bit TIFFs, and no 12-bit ones (those are packed here, two samples in 3 bytes)."""
    import struct
    e = ">" if big_endian else "<"
    h, w = a.shape
    if bits == 12:
        v = a.astype(np.uint32).reshape(-1, 2)
        data = np.stack([v[:, 0] >> 4, (v[:, 0] & 15) << 4 | v[:, 1] >> 8, v[:, 1] & 255],
                        1).astype(np.uint8).tobytes()
    else:
        data = a.astype(f"{e}{'i' if signed else 'u'}{bits // 8}").tobytes()
    tags = [(256, 4, w), (257, 4, h), (258, 3, bits), (259, 3, 1), (262, 3, 1),
            (273, 4, 8 + 2 + 12 * 10 + 4), (277, 3, 1), (278, 4, h), (279, 4, len(data)),
            (339, 3, 2 if signed else 1)]
    out = (b"MM\0*" if big_endian else b"II*\0") + struct.pack(e + "IH", 8, len(tags))
    for tag, kind, value in tags:
        out += struct.pack(e + "HHI", tag, kind, 1) + struct.pack(e + ("HH" if kind == 3 else "I"),
                                                                 *((value, 0) if kind == 3 else
                                                                   (value,)))
    path.write_bytes(out + struct.pack(e + "I", 0) + data)
    return path


@pytest.mark.parametrize("case", ["uint16", "uint16 big-endian", "int16 (I;16S)",
                                  "int16 big-endian (I;16BS)", "uint32 (I;32N)", "int32 (I;32S)",
                                  "uint12"])
def test_integer_grey_tiffs_map_the_range_of_their_type(tmp_path, case):
    """Each TIFF's samples map their type's whole range onto [0, 1] (unsigned v / (2^b - 1),
    signed (v + 2^(b-1)) / (2^b - 1)). Signed 16-bit TIFFs (PIL's "I") were read as 0-65535:
    every negative value clipped to black, the rest squeezed into [0, 0.5]; uint32 ones clipped
    at 65535 (and PIL's int32 holding wrapped the top half to negative, black); 12-bit ones,
    0-4095, came out at most 0.0625."""
    bits, signed, pil_mode = {"uint16": (16, False, "I;16"),
                              "uint16 big-endian": (16, False, "I;16B"),
                              "int16 (I;16S)": (16, True, "I"),
                              "int16 big-endian (I;16BS)": (16, True, "I"),
                              "uint32 (I;32N)": (32, False, "I"), "int32 (I;32S)": (32, True, "I"),
                              "uint12": (12, False, "I;16")}[case]
    lo = -(1 << (bits - 1)) if signed else 0
    hi = lo + (1 << bits) - 1
    row = [lo, lo + 1, lo + (1 << (bits - 1)), hi - 1, hi, lo + 1000, lo + 2 ** (bits - 2)]
    a = np.array([row + row[::-1]] * 9, np.int64)    # 9 x 14: 12-bit rows fill whole bytes
    path = _gray_tiff(tmp_path / "g.tif", a, bits, signed, big_endian="big" in case)
    with Image.open(path) as im:
        assert im.mode == pil_mode
    got = load_image(path)
    want = torch.from_numpy((a - lo) / float(hi - lo)).float()
    assert got.dtype == torch.float32 and got.shape == (3, *a.shape)
    torch.testing.assert_close(got, want[None].expand(3, -1, -1), rtol=0, atol=1e-7)
    assert float(got.min()) == 0.0 and float(got.max()) == 1.0
    if signed:
        assert a[0, 2] == 0 and abs(float(got[0, 0, 2]) - 0.5) < 1e-4    # 0 is mid-grey


def test_an_integer_image_that_tells_no_bit_depth_is_16_bit_or_refused(tmp_path):
    """An "I" image with no file to tell its bit depth (made in memory, FITS) is read as 16-bit
    0-65535, and one holding values outside that range is a one-line ImageError naming them (it
    was clipped: negative values black, all over 65535 white). PIL scales a PGM's maxval to
    0-65535 itself."""
    a = np.array([[0, 1, 257, 32768, 65535] * 3] * 9, np.int32)
    got = load_image(Image.fromarray(a))
    assert torch.equal(got, torch.from_numpy(a / 65535).float()[None].expand(3, -1, -1))
    for bad, shown in ((a - 5, "-5..65530"), (a * 2, "0..131070")):
        with pytest.raises(ImageError, match=f"holds {shown}, outside 16-bit 0-65535") as err:
            load_image(Image.fromarray(bad))
        assert "\n" not in str(err.value)
    pgm = tmp_path / "g.pgm"
    pgm.write_bytes(b"P5 15 9 1023\n" + np.tile(np.array([0, 1, 512, 1023, 7], ">u2"),
                                                 (9, 3)).tobytes())
    with Image.open(pgm) as im:
        assert im.mode == "I"
    got = load_image(pgm)
    assert float(got.max()) == 1.0 and abs(float(got[0, 0, 2]) - 512 / 1023) < 1e-4


def test_a_float_grey_image_outside_its_range_is_refused_not_clipped(tmp_path):
    """An "F" image is read as [0, 1] or as 0-255 (by its maximum); values outside the range it
    is read in (negative ones, 0-65535 data) were clipped to black or white, silently."""
    ok = np.full((9, 9), 0.5, np.float32)
    ok[0, 0] = -1e-4                   # rounding below 0 is clamped, as for arrays
    assert float(load_image(Image.fromarray(ok, "F")).min()) == 0.0
    for values, shown in (([-0.5, 0.25, 1.0], "-0.5..1"), ([0.0, 255.0, 65535.0], "0..65535"),
                          ([-3.0, 100.0, 200.0], "-3..200")):
        a = np.resize(np.array(values, np.float32), (9, 9))
        path = _png(tmp_path, Image.fromarray(a, "F"), "f.tiff")
        with pytest.raises(ImageError, match=f"f.tiff: .*'F'.*found {shown}") as err:
            load_image(path)
        assert "\n" not in str(err.value)


def _interpolate_spy(monkeypatch):
    """(calls, real): every float tensor F.interpolate is given from now on, as (shape, dtype)."""
    import torch.nn.functional as F
    calls, real = [], F.interpolate
    monkeypatch.setattr(F, "interpolate", lambda x, *a, **k: calls.append((x.shape, x.dtype))
                        or real(x, *a, **k))
    return calls, real


def test_an_8bit_image_is_rescaled_without_a_float_copy_of_it_whole(monkeypatch):
    """resize_short converted a uint8 image to float32 whole before resampling it: 1.3 GB for a
    12000x9000 photo, 4x the decoded image. Rows are converted a chunk at a time now: no float
    array the resampler is given has more than RESIZE_CHUNK_BYTES of rows or the [3, H, W_q]
    width-resampled image, and the result equals one F.interpolate call on the float image bit
    for bit (CPU), at every scale, from one pass (resize_scales) or one scale at a time."""
    from vggfast import preprocess as pp
    h, w, scales = 1500, 2000, (256, 384, 512, 1500)      # 1500: the smallest side, no resample
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 30, 40), size=(h, w),
                                             mode="bicubic", align_corners=False)[0]
    x = (smooth * 200 + torch.rand(3, h, w) * 55).clamp(0, 255).to(torch.uint8)  # photo-like
    xf = x.float() / 255
    want = [xf if q == h else torch.nn.functional.interpolate(
        xf[None], size=rescaled_size(h, w, q), mode="bilinear", antialias=True,
        align_corners=False)[0] for q in scales]
    monkeypatch.setattr(pp, "RESIZE_CHUNK_BYTES", 4 << 20, raising=False)
    calls, _ = _interpolate_spy(monkeypatch)
    bound = max((4 << 20) // 4, 3 * h * rescaled_size(h, w, 512)[1])   # a chunk, the widest mid
    for q, t in zip(scales, want):
        assert torch.equal(resize_short(x, q), t)
    assert calls and all(dtype == torch.float32 for _, dtype in calls)
    assert max(s.numel() for s, _ in calls) <= bound < 3 * h * w // 2
    calls.clear()
    got = pp.resize_scales(x, scales)
    assert [tuple(g.shape) for g in got] == [tuple(t.shape) for t in want]
    for g, t in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, t)
    assert calls and max(s.numel() for s, _ in calls) <= bound


def test_the_executor_rescales_8bit_images_without_a_float_copy_of_them_whole(monkeypatch):
    """The executor converted each image to float whole, once for all its scales, before
    resize_short: the largest array of a request on a large photo. It hands the uint8 image to
    resize_scales now, with the same scores as for the float image (bit-equal views)."""
    from conftest import small_model
    from vggfast import Engine
    from vggfast import preprocess as pp
    monkeypatch.setattr(pp, "RESIZE_CHUNK_BYTES", 1 << 16, raising=False)   # many chunks
    eng = Engine(small_model().state_dict(), backend="torch", dtype="float32")
    x = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    want = eng.classify(pp.to_float(x), scales=(32, 40), flip=True)
    calls, _ = _interpolate_spy(monkeypatch)
    got = eng.classify(x, scales=(32, 40), flip=True)
    torch.testing.assert_close(got.probs, want.probs, rtol=0, atol=0)
    assert calls and max(s.numel() for s, _ in calls) <= 3 * 200 * 60 < 3 * 200 * 300


def test_a_decoded_photo_is_copied_out_of_pil_a_chunk_of_rows_at_a_time(monkeypatch, tmp_path):
    """load_image held three whole copies of a decoded photo beside PIL's own (4 bytes a pixel):
    exif_transpose's copy of an image it does not turn, np.asarray's bytes (tobytes' pieces, then
    their join) and the CHW copy, 1.4 GB for a 12000x9000 JPEG. Now PIL copies no image it does
    not turn, no array or bytes object it makes (tracemalloc) holds more than a chunk of rows, and
    the result is the same contiguous [3, H, W] uint8 tensor, from a file, a PIL image (left as it
    was) or a turned file."""
    from vggfast import preprocess as pp
    h, w = 600, 800
    a = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    path = _png(tmp_path, Image.fromarray(a))
    exif = Image.Exif()
    exif[0x0112] = 6    # turned a quarter: stored W x H, shown H x W
    turned = _png(tmp_path, Image.fromarray(np.ascontiguousarray(a.transpose(1, 0, 2)[::-1])),
                  "turned.png", exif=exif.tobytes())
    monkeypatch.setattr(pp, "RESIZE_CHUNK_BYTES", 1 << 16, raising=False)   # 6 rows of 800
    copies, real_copy = [], Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda im: copies.append(im.size) or real_copy(im))
    want = torch.from_numpy(a).permute(2, 0, 1)
    for src in (path, Image.open(path), turned):
        got, peak = _load_traced(src)
        assert got.dtype == torch.uint8 and got.is_contiguous() and torch.equal(got, want)
        assert peak < 3 * h * w // 8, (src, peak)       # the whole image's bytes: 3 * h * w
    assert copies == []
    im = Image.open(path)
    assert torch.equal(load_image(im), want) and np.array_equal(np.asarray(im), a)


def _torch_copies(monkeypatch) -> list:
    """The shapes of the tensors .contiguous() copies from now on (a list that fills)."""
    copies, real = [], torch.Tensor.contiguous

    def contiguous(t, *args, **kw):
        out = real(t, *args, **kw)
        if out.data_ptr() != t.data_ptr():
            copies.append(tuple(t.shape))
        return out
    monkeypatch.setattr(torch.Tensor, "contiguous", contiguous)
    return copies


def _load_traced(src):
    """(load_image(src), the peak bytes numpy allocated meanwhile (tracemalloc)), after a warm
    call (no first-call allocations counted)."""
    import tracemalloc
    load_image(src)
    tracemalloc.start()
    try:
        got = load_image(src)
        return got, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_uint8_array_is_copied_once_and_never_shared(monkeypatch):
    """load_image copied an HxWx3 uint8 array twice: np.array(copy=True), then .contiguous() of
    its CHW permute. It is now copied once, straight into CHW order: the numpy buffers it makes
    (tracemalloc) hold one image, and no torch copy is made. The result is the same and never
    shares the caller's memory, also for an array that is a CHW buffer underneath (which
    np.ascontiguousarray of its transpose would have returned as it is) or a strided view."""
    h, w = 300, 400
    a = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    torch_copies = _torch_copies(monkeypatch)
    chw = np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0)
    for src in (a, chw, a[::-1, ::2]):
        want = torch.from_numpy(np.array(src)).permute(2, 0, 1)
        before = src.copy()
        got, peak = _load_traced(src)
        assert got.dtype == torch.uint8 and got.is_contiguous() and torch.equal(got, want)
        assert src.nbytes <= peak < 2 * src.nbytes, (src.shape, peak)
        assert not np.shares_memory(got.numpy(), src)
        got.fill_(7)
        assert np.array_equal(src, before)
    assert torch_copies == []


@pytest.mark.parametrize("dtype", ["uint8", ">u2", "uint16", "bool", "float64", "float32"])
@pytest.mark.parametrize("gray", [True, False], ids=["HxW", "HxWx3"])
def test_gray_uint16_bool_and_float_arrays_are_copied_once_and_never_shared(monkeypatch, dtype,
                                                                            gray):
    """A grayscale array was np.repeat-ed to HxWx3 and then copied into CHW order; a uint16,
    bool or float one converted (astype, then / 65535 or * 255: two numpy images) and copied
    again by .contiguous() of its CHW permute, a float one once more by its clamp. Each is now
    one copy, converting, repeating the channel and reordering at once: the numpy buffers made
    (tracemalloc) hold one result image, no torch copy is made, the values are those of the
    steps apart, and the result never shares the caller's memory (nor where the array is a CHW
    buffer underneath)."""
    h, w = 200, 300
    rng = np.random.default_rng(1)
    if dtype == "bool":
        a = rng.random((h, w, 3)) < 0.5
    elif "u" in dtype:
        a = rng.integers(0, 256 if dtype == "uint8" else 65536, (h, w, 3)).astype(dtype)
    else:   # a little rounding either side of [0, 1], which is clamped away
        a = rng.uniform(-5e-4, 1 + 5e-4, (h, w, 3)).astype(dtype)
    a = a[..., 0] if gray else a
    # the values of the steps apart (the old code)
    rgb = np.repeat(a[:, :, None], 3, axis=2) if gray else a
    rgb = rgb.astype(rgb.dtype.newbyteorder("="))
    if rgb.dtype == np.uint16:
        rgb = rgb.astype(np.float32) / 65535.0
    elif rgb.dtype == np.bool_:
        rgb = rgb.astype(np.uint8) * 255
    elif rgb.dtype != np.uint8:
        rgb = rgb.astype(np.float32).clip(0, 1)
    want = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    torch_copies = _torch_copies(monkeypatch)
    srcs = [a] if gray else [a, np.ascontiguousarray(a.transpose(2, 0, 1)).transpose(1, 2, 0)]
    for src in srcs:
        before = src.copy()
        got, peak = _load_traced(src)
        assert got.dtype == want.dtype and got.is_contiguous() and torch.equal(got, want)
        out = got.numel() * got.element_size()
        assert out <= peak < 1.5 * out, (src.shape, peak, out)
        assert not np.shares_memory(got.numpy(), src)
        got.fill_(0)
        assert np.array_equal(src, before)
    assert torch_copies == []


@pytest.mark.parametrize("shape, q, crop", [((3, 32, 32), 32, (0, 0, 32, 32)),
                                            ((3, 32, 40), 32, (0, 3, 32, 32)),
                                            ((3, 40, 48), 32, (1, 2, 20, 24)),
                                            ((3, 17, 300), 64, (5, 900, 40, 30))])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_resize_crop_is_a_new_tensor_with_the_whole_rescales_crop(shape, q, crop, dtype):
    """resize_crop against the crop of resize_short's whole rescale, bit for bit, and always a
    new contiguous float32 tensor: where the image is not resampled (its smallest side is q) a
    float32 image's crop was a view of it, the whole image x itself for a full crop, so an
    in-place op on the crop wrote the caller's image."""
    from vggfast.preprocess import resize_crop, resize_short
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    x = x if dtype == torch.uint8 else (x / 255).to(dtype)
    before = x.clone()
    top, left, h, w = crop
    got = resize_crop(x, q, top, left, h, w)
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (3, h, w)
    assert torch.equal(got, resize_short(x, q)[:, top:top + h, left:left + w])
    got.add_(1)
    assert torch.equal(x, before)

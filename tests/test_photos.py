"""Real-photo variety and weights from other tools, found by a new user's QA pass: every odd file
a camera, an editor or another library writes gives the answer its RGB conversion gives, or a
one-line `VGGFastError`; weights saved by timm's and torchvision's code load by their bytes."""
import io
import json
import os
import re
import struct
import zlib

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageCms, ImageOps, features

import vggfast
from conftest import random_bn_statistics, small_model
from vggfast import preprocess as pp
from vggfast.cli import main
from vggfast.errors import ImageError, WeightsError


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


# -- photos ---------------------------------------------------------------------------------------

def _photo(w=48, h=40):
    """A smooth, colourful test photo (JPEG's chroma subsampling and palettes change it little)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
    return Image.fromarray(a.astype(np.uint8))


def _encode(im, fmt, **kw):
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _exif(orientation):
    ex = Image.Exif()
    ex[0x0112] = orientation
    return ex.tobytes()


def _interlaced_png(im):
    """An Adam7-interlaced 8-bit RGB PNG (PIL writes none)."""
    a = np.asarray(im.convert("RGB"))
    h, w, _ = a.shape
    raw = b"".join(b"\0" + row.tobytes()
                   for x0, y0, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4),
                                          (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
                   for row in a[y0::dy, x0::dx] if row.size)

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _ycck_jpeg(im):
    """A JPEG whose Adobe marker says YCCK (transform 2): libjpeg turns its samples to CMYK."""
    data = bytearray(_encode(im.convert("CMYK"), "JPEG"))
    at = data.find(b"Adobe")
    assert at > 0
    data[at + 11] = 2
    return bytes(data)


def _photos():
    base = _photo()
    other = Image.fromarray(255 - np.asarray(base))
    p = base.convert("P")
    yield "progressive.jpg", _encode(base, "JPEG", progressive=True)
    yield "420.jpg", _encode(base, "JPEG", subsampling=2)
    yield "444.jpg", _encode(base, "JPEG", subsampling=0)
    yield "cmyk.jpg", _encode(base.convert("CMYK"), "JPEG")
    yield "ycck.jpg", _ycck_jpeg(base)
    yield "icc.jpg", _encode(base, "JPEG", icc_profile=ImageCms.ImageCmsProfile(
        ImageCms.createProfile("sRGB")).tobytes())
    for o in range(2, 9):
        yield f"exif{o}.jpg", _encode(base, "JPEG", exif=_exif(o))
        yield f"exif{o}.png", _encode(base, "PNG", exif=_exif(o))
        yield f"exif{o}.webp", _encode(base, "WEBP", exif=_exif(o), lossless=True)
    yield "la.png", _encode(base.convert("LA"), "PNG")
    yield "p-transparency.png", _encode(p, "PNG", transparency=0)
    yield "1-bit.png", _encode(base.convert("1"), "PNG")
    yield "interlaced.png", _interlaced_png(base)
    yield "rgba.bmp", _encode(base.convert("RGBA"), "BMP")
    yield "rgba.tga", _encode(base.convert("RGBA"), "TGA")
    yield "rgb.ppm", _encode(base, "PPM")
    yield "cmyk.tif", _encode(base.convert("CMYK"), "TIFF")
    yield "icon.ico", _encode(base.resize((32, 32)), "ICO", sizes=[(16, 16), (32, 32)])
    for fmt, kw in (("GIF", {}), ("WEBP", {"lossless": True}), ("PNG", {}), ("TIFF", {})):
        yield f"two-frames.{fmt.lower()}", _encode(base, fmt, save_all=True,
                                                   append_images=[other], **kw)
    if features.check("avif"):
        yield "rgb.avif", _encode(base, "AVIF", quality=90)


@pytest.mark.parametrize("name,data", list(_photos()), ids=[n for n, _ in _photos()])
def test_photo_modes_and_formats_decode_as_their_rgb_conversion(tmp_path, name, data):
    """Every 8-bit photo decodes to what torchvision's loader gives (PIL's convert("RGB")) after
    EXIF orientation: multi-frame files their first frame, an ICO its largest image; and its
    size read from the header is the decoded one (what the planner and MIN_SIDE check see)."""
    path = tmp_path / name
    path.write_bytes(data)
    with Image.open(path) as im:
        want = torch.from_numpy(np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy())
    got = pp.load_image(str(path))
    assert got.dtype == torch.uint8
    assert torch.equal(got, want.permute(2, 0, 1))
    assert pp.image_size(str(path)) == tuple(want.shape[:2])


@pytest.fixture(scope="module")
def tiny_eng():
    return vggfast.Engine(small_model("A", num_classes=10).state_dict(), device="cpu",
                          backend="torch")


@pytest.mark.parametrize("name", ["cmyk.jpg", "exif6.jpg", "exif5.png", "two-frames.gif"])
def test_engine_results_of_odd_photos_equal_those_of_their_rgb_conversion(tmp_path, tiny_eng,
                                                                          name):
    data = dict(_photos())[name]
    path = tmp_path / name
    path.write_bytes(data)
    with Image.open(path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB")).copy()
    torch.testing.assert_close(tiny_eng.classify(str(path), scales=(32, 40)).probs,
                               tiny_eng.classify(rgb, scales=(32, 40)).probs, rtol=0, atol=0)
    torch.testing.assert_close(tiny_eng.score_map(data, scale=48),
                               tiny_eng.score_map(rgb, scale=48), rtol=0, atol=0)
    torch.testing.assert_close(tiny_eng.features([path], scales=(32,)),
                               tiny_eng.features([rgb], scales=(32,)), rtol=0, atol=0)


def test_a_closed_pil_image_is_named_closed_not_corrupt(tmp_path, tiny_eng):
    """`with Image.open(p) as im: ...` then classify(im) outside the block (or after im.close())
    was 'corrupt or truncated image (AssertionError)', sending the user to check a good file."""
    path = tmp_path / "photo.jpg"
    path.write_bytes(_encode(_photo(), "JPEG"))
    with Image.open(path) as unread:
        pass
    closed = Image.open(path)
    closed.close()
    for im in (unread, closed):
        with pytest.raises(ImageError, match=r"^the PIL image is closed \(") as err:
            tiny_eng.classify(im, scales=(32,))
        assert "corrupt" not in str(err.value) and "\n" not in str(err.value)
    with Image.open(path) as read:
        read.load()
    assert tiny_eng.classify(read, scales=(32,)).probs.shape == (10,)
    # a caller's image of a truncated file is still named so
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        tiny_eng.classify(Image.open(path), scales=(32,))


@pytest.mark.parametrize("url", ["https://example.com/cat.jpg", "HTTP://example.com/a.png",
                                 "s3://bucket/photo.jpg"])
def test_an_image_url_is_named_a_url(tiny_eng, url, capsys, tmp_path):
    """A URL (timm's and torchvision's examples open one with urlopen) was 'image not found:
    https://...', as if the user had mistyped a file name; vggfast downloads nothing."""
    with pytest.raises(ImageError, match=r"is a URL; vggfast reads local files only") as err:
        tiny_eng.classify(url, scales=(32,))
    assert "\n" not in str(err.value)
    weights = tmp_path / "tiny.pt"
    torch.save(small_model("A", num_classes=10).state_dict(), weights)
    assert main(["classify", url, "--weights", str(weights), "--scales", "32"]) == 2
    assert "is a URL" in capsys.readouterr().err
    with pytest.raises(ImageError, match=r"^image not found: no/such/photo\.jpg$"):
        pp.load_image("no/such/photo.jpg")


def _heic_opening():
    """The opening of an iPhone's HEIC file: an ISO-BMFF ftyp box, brand heic (no decodable
    image follows: what counts is that this Pillow cannot identify it)."""
    return struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + b"\0" * 64


@pytest.mark.parametrize("name,data,match", [
    ("page.pdf", _encode(_photo(), "PDF"), r"a PDF document, not an image; render"),
    ("logo.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>',
     r"an SVG drawing \(vector graphics\), not a raster image"),
    ("logo2.svg", b'\xef\xbb\xbf<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
     r"an SVG drawing"),
    ("IMG_0001.HEIC", _heic_opening(), r"a HEIC/HEIF image, which this Pillow cannot decode; "
                                       r"install pillow-heif"),
    ("cat.jpg", b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>",
     r"an HTML page, not an image \(a download that saved the web page"),
    ("notes.jpg", b"hello, not a photo\n", r"not an image file PIL can read$"),
], ids=["pdf", "svg", "svg-xml-bom", "heic", "html", "text"])
def test_documents_and_heic_are_named_by_format(tmp_path, tiny_eng, capsys, name, data, match):
    """A PDF, an SVG, a saved web page and an iPhone's HEIC were all 'not an image file PIL can
    read'; their first bytes say what they are and what to do (API, bytes and CLI, exit 2)."""
    path = tmp_path / name
    path.write_bytes(data)
    for src in (str(path), data):
        with pytest.raises(ImageError, match=match) as err:
            tiny_eng.classify(src, scales=(32,))
        assert "\n" not in str(err.value)
    weights = tmp_path / "tiny.pt"
    torch.save(small_model("A", num_classes=10).state_dict(), weights)
    assert main(["classify", str(path), "--weights", str(weights), "--scales", "32"]) == 2
    err = capsys.readouterr().err
    assert re.search(match.rstrip("$"), err) and err.count("\n") == 1 and "Traceback" not in err


def test_a_folder_of_heic_photos_says_what_it_holds(tmp_path, capsys):
    """A folder of iPhone photos (.HEIC, which folders are not listed by) was 'a folder without
    image files' / 'no images found', as if it were empty; now its files' suffixes are named."""
    (tmp_path / "phone").mkdir()
    for n in ("IMG_0001.HEIC", "IMG_0002.heic"):
        (tmp_path / "phone" / n).write_bytes(_heic_opening())
    (tmp_path / "empty").mkdir()
    weights = tmp_path / "tiny.pt"
    torch.save(small_model("A", num_classes=10).state_dict(), weights)
    for cmd in (["classify"], ["extract", "--out", str(tmp_path / "f.npy")]):
        assert main(cmd[:1] + [str(tmp_path / "phone"), "--weights", str(weights)] + cmd[1:]) == 2
        err = capsys.readouterr().err
        assert "files end in .heic;" in err and "pillow-heif" in err and err.count("\n") == 1
        assert main(cmd[:1] + [str(tmp_path / "empty"), "--weights", str(weights)] + cmd[1:]) == 2
        err = capsys.readouterr().err
        assert "files end in" not in err and err.count("\n") == 1


def test_a_folder_of_links_to_moved_heic_photos_says_what_it_holds(tmp_path, capsys):
    """A folder holding only links to HEIC photos that were moved off (dangling links, which
    is_file() calls no file) was said to hold no files at all."""
    (tmp_path / "phone").mkdir()
    for n in ("IMG_0001.HEIC", "IMG_0002.heic"):
        os.symlink(tmp_path / "moved" / n, tmp_path / "phone" / n)
    weights = tmp_path / "tiny.pt"
    torch.save(small_model("A", num_classes=10).state_dict(), weights)
    assert main(["classify", str(tmp_path / "phone"), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "files end in .heic;" in err and "pillow-heif" in err and err.count("\n") == 1


@pytest.mark.parametrize("headless", ["features", "fc8"])
def test_an_engine_without_a_classifier_does_not_show_1000_classes(headless):
    """vgg.features alone, timm's num_classes=0 (no head.fc) and its features_only models showed
    'classes=1000' in Engine's repr, an ImageNet head they do not have (info() says None)."""
    sd = small_model("A", num_classes=10).state_dict()
    if headless == "features":
        cut = {k: v for k, v in sd.items() if k.startswith("features.")}
    else:   # the canonical tensors up to fc7, as timm's head-less model maps to
        cut = {k: v for k, v in vggfast.load_weights(sd)[1].items() if not k.startswith("fc8.")}
    eng = vggfast.Engine(cut, device="cpu")
    assert "classes=none," in repr(eng) and eng.info()["num_classes"] is None
    assert "classes=10," in repr(vggfast.Engine(sd, device="cpu"))


def test_train_makes_no_more_data_workers_than_cpus(tmp_path, monkeypatch):
    """--workers 4 (the default) on a 2-core machine, the README's own training example there,
    printed torch's 'excessive worker creation' warning for every loader; the workers are now
    capped at the CPUs the process may use (the samples do not depend on their number)."""
    from vggfast import train as T
    made = []
    real = T.DataLoader

    def spy(*args, **kw):
        made.append(kw["num_workers"])
        return real(*args, **{**kw, "num_workers": 0})
    monkeypatch.setattr(T, "DataLoader", spy)
    monkeypatch.setattr(T, "usable_cpus", lambda: 2)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            _photo(40, 36).save(tmp_path / "data" / c / f"{i}.png")
    T.fit(T.TrainOptions(data=str(tmp_path / "data"), out=str(tmp_path / "run"), epochs=1,
                         batch_size=4, config="A", width=1 / 16, image_size=32, quiet=True))
    assert made and set(made) == {2}
    assert T.usable_cpus() >= 1


def _hf_folder(path, mean, std):
    """A timm model pushed to the Hugging Face hub: model.safetensors and config.json whose
    pretrained_cfg names the input normalisation it was trained with."""
    path.mkdir()
    safetensors.torch.save_file(small_model("A", num_classes=10).state_dict(),
                                str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architecture": "vgg11", "num_classes": 10,
        "pretrained_cfg": {"mean": mean, "std": std, "input_size": [3, 32, 32]}}))
    return path


def test_a_timm_folder_trained_on_other_normalisation_is_not_run_on_imagenets(tmp_path, capsys):
    """A timm fine-tune whose config.json says mean = std = 0.5 was normalised with ImageNet's
    mean and std without a word (every probability wrong); it is refused, naming both, unless
    preprocess= says what to do. ImageNet's own values (timm's VGGs) load as before."""
    odd = _hf_folder(tmp_path / "odd", [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    with pytest.raises(WeightsError, match=r"mean \(0\.5, 0\.5, 0\.5\) and std \(0\.5, 0\.5, "
                                           r"0\.5\).*pass preprocess='torchvision'") as err:
        vggfast.Engine(str(odd), device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(WeightsError, match="no vggfast preprocessing matches"):
        vggfast.FeatureExtractor(str(odd), layers=["relu2_1"], device="cpu")
    assert vggfast.Engine(str(odd), device="cpu", preprocess="torchvision").preprocess == \
        "torchvision"
    assert main(["classify", str(tmp_path / "x.jpg"), "--weights", str(odd)]) == 2
    assert "no vggfast preprocessing matches" in capsys.readouterr().err
    imagenet = _hf_folder(tmp_path / "imagenet", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    eng = vggfast.Engine(str(imagenet), device="cpu")
    assert eng.preprocess == "torchvision" and eng.info()["preprocess_from"] == "default"


@pytest.mark.parametrize("name", ["model.safetensors", "vgg16.pth"])
def test_a_web_page_saved_as_weights_is_named(tmp_path, name):
    """wget of a Hugging Face '/blob/main/model.safetensors' link saves the HTML page that shows
    the file: it was 'not a readable safetensors file (... header too large); fetch it again'
    (which fetches the page again) or 'neither a zip archive nor a pickle'."""
    path = tmp_path / name
    path.write_bytes(b"\n<!DOCTYPE html>\n<html class=''><head><title>model.safetensors</title>"
                     b"</head><body>" + b"x" * 4000 + b"</body></html>\n")
    with pytest.raises(WeightsError, match=r"an HTML page, not weights .*/resolve/main/") as err:
        vggfast.Engine(str(path), device="cpu")
    assert "\n" not in str(err.value)

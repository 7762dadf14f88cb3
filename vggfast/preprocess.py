"""Image decoding, conversion to RGB, isotropic rescaling, flips and normalisation.

An image is a path, a PIL image, an HxWx3 uint8 numpy array, or a torch tensor [3, H, W] (uint8
0-255, or float RGB in [0, 1]); an encoded file also comes as bytes or a binary file object
(`io.BytesIO`, `open(f, "rb")`, an upload), read from its current position. `load_image` turns
any of them into a [3, H, W] tensor, uint8, or float32 in [0, 1] when the source carries more
than 8 bits (16-bit grayscale and float images, uint16 and float arrays, float tensors; PIL
itself reads 48-bit RGB PNG and TIFF files as 8-bit RGB, their high bytes).

Conversions (PIL modes): EXIF orientation is applied first. "1", "L", "P", "CMYK", "YCbCr", "LAB",
"HSV" go through PIL's RGB conversion. Alpha ("RGBA", "LA", "PA", palette transparency) is
dropped, as torchvision's and timm's loaders do (`img.convert("RGB")`): the colour under a
transparent pixel is used as it is. Integer grey images ("I;16*", "I") map the whole range of
their samples' type onto [0, 1] (`_integer_gray`): unsigned 16-bit (PNG, TIFF "I;16", "I;16B",
"I;16L", a PGM, which PIL scales to 0-65535) v / 65535; a TIFF's own bit depth where it is
another: 12-bit v / 4095, uint32 v / (2^32 - 1); signed TIFF samples (PIL's "I" from "I;16S",
"I;16BS", "I;32S") shifted by half their range first, (v + 32768) / 65535 for 16 bits, so 0 is
mid-grey. An "I" image that tells no bit depth (made in memory, FITS) is read as 16-bit, and
refused with an ImageError when it holds values outside 0-65535. "F" is read as [0, 1] when its
maximum is at most 1 (+ FLOAT_SLACK, rounding), else as 0-255; values outside the range it is
read in (negative, or over 255) are refused, not clipped.
Multi-frame files (animated GIF, WebP and PNG, multi-page TIFF, MPO) use their first frame, an
ICO its largest image. PIL's decompression-bomb guard stays on: an image over twice
`PIL.Image.MAX_IMAGE_PIXELS` (179 MP by default) is refused with an ImageError; below that PIL's
warning is silenced. Images with a side under MIN_SIDE (8) pixels are refused, and so are EPS
files (PostScript, whatever their name), which PIL decodes by running them in Ghostscript.

Rescaling (Sec. 3.2 of the paper): isotropic, so the smallest side becomes Q; the other side is
(Q * long) // short (integer floor, as torchvision's Resize(int)); antialiased bilinear on float
values in [0, 1]. The C++ planner uses the same rule (`rescaled_size`). An 8-bit image is
converted to float a chunk of rows at a time, never whole (`resize_scales`), with the same result.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import os
import re
import struct
import tempfile
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ArgumentError, ImageError, VGGFastError

MIN_SIDE = 8  # smaller images carry too little to classify; a 1x1 image is refused
# How far float RGB may stray outside [0, 1] and still be read as [0, 1] (clamped): rounding in
# the arithmetic that made it (a colour conversion's 1.0000001), not a different scale.
FLOAT_SLACK = 1e-3
# Float32 bytes of an image's rows worked on at a time (`row_chunks`: 116 rows of a 12000-pixel-
# wide photo) where a copy of the whole image would be large: `resize_scales` converting an 8-bit
# image to float, `load_image` copying a decoded one out of PIL, heatmap's and draw_boxes'
# images made back from the tensor.
RESIZE_CHUNK_BYTES = 16 << 20
# Files a folder of images is listed by (classify/extract/evaluate/train): torchvision's
# ImageFolder extensions plus the other photo formats Pillow decodes (AVIF, JPEG 2000, ICO, ...).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".gif", ".tif",
                  ".tiff", ".webp", ".avif", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k",
                  ".jpx", ".ico", ".tga", ".qoi")


@dataclass(frozen=True)
class Convention:
    """How normalised input is made from RGB in [0, 1]: (x * scale, channel order) - mean) / std."""

    bgr: bool
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CONVENTIONS = {
    # torchvision / timm ImageNet weights: RGB in [0, 1], per-channel mean and std
    "torchvision": Convention(False, 1.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # the original Caffe VGG models: BGR in 0-255 minus the mean pixel (B, G, R)
    "caffe": Convention(True, 255.0, (103.939, 116.779, 123.68), (1.0, 1.0, 1.0)),
    # torchvision's vgg16_features (IMAGENET1K_FEATURES) weights: RGB in 0-255 minus the mean pixel
    "caffe-rgb": Convention(False, 255.0, (122.99925, 116.99966, 103.99950), (1.0, 1.0, 1.0)),
    # VGG-Face (Parkhi et al. 2015; 2622 identities), 0-255 minus its own mean pixel, not
    # ImageNet's: RGB in MatConvNet's model and Albanie's vgg_face_dag.pth made from it...
    "vggface": Convention(False, 255.0, (129.186279296875, 104.76238250732422, 93.59396362304688),
                          (1.0, 1.0, 1.0)),
    # ... BGR in the Caffe model (VGG_FACE.caffemodel) and the conversions made from it
    "vggface-bgr": Convention(True, 255.0, (93.59396362304688, 104.76238250732422,
                                            129.186279296875), (1.0, 1.0, 1.0)),
}


def convention(name: str) -> Convention:
    if not isinstance(name, str) or name not in CONVENTIONS:
        raise ArgumentError(f"unknown preprocessing {name!r}; known: {', '.join(CONVENTIONS)}")
    return CONVENTIONS[name]


def rescaled_size(h: int, w: int, q: int) -> tuple[int, int]:
    """Size after the isotropic rescale that makes the smallest side q."""
    if h <= w:
        return q, (q * w) // h
    return (q * h) // w, q


def load_image(src) -> torch.Tensor:
    """Any accepted image -> [3, H, W] tensor (uint8, or float32 in [0, 1]); ImageError if bad."""
    if isinstance(src, torch.Tensor):
        x = _from_tensor(src)
    elif isinstance(src, np.ndarray):
        x = _from_array(src)
    elif isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        x = _from_file(src)
    elif callable(getattr(src, "read", None)):
        x = _from_file(_read_stream(src), _stream_name(src))
    else:
        from PIL import Image
        if isinstance(src, Image.Image):
            x = _from_pil(src)
        else:
            several = ("; one image is expected here, not a list of them"
                       if isinstance(src, (list, tuple)) else
                       "; pass several images as a list" if hasattr(src, "__iter__") else "")
            raise ImageError(f"an image must be a path, bytes, a binary file, a PIL image, a "
                             f"numpy array or a tensor, not {type(src).__name__}{several}")
    _check_sides(src, *x.shape[-2:])
    return x


# PIL formats whose header gives exactly the size load_image decodes, EXIF orientation included
# (read with the header: PIL's AVIF reader turns the irot/imir boxes into it; PPM/PGM/PBM and
# JPEG 2000, whose size PIL reads from the text header or the SIZ marker / ihdr box, bring
# none). A PNG and a TIFF are sized exactly too, in their own ways (`_pil_size`).
EXACT_HEADER_FORMATS = ("JPEG", "MPO", "WEBP", "GIF", "BMP", "ICO", "PPM", "JPEG2000", "AVIF")


def image_size(src, *, exact: bool = False) -> tuple[int, int] | None:
    """(H, W) of the image load_image(src) gives, read without decoding it: a file's header (a
    path, bytes, a binary file that can seek back), a PIL image's size, an array's or tensor's
    shape. For checks made before a long list is decoded; what decoding alone finds (corrupt
    pixels, a float array's values) is left to load_image. None for a file object that cannot
    be read twice (a pipe, a socket). Raises the ImageError load_image would for what it sees: a
    missing, empty or unreadable file, EPS, too many pixels, the wrong shape, a side under
    MIN_SIDE. H and W may be each other's where the header cannot tell the EXIF orientation
    decoding applies: an animated or malformed PNG's, a PNG that is a PIL image opened by the
    caller, a format outside EXACT_HEADER_FORMATS (PCX, ...), which no sizing rule
    depends on.
    exact=True: None also for those, whose decoded H and W the header cannot promise (for what
    a swap changes: a plan)."""
    from PIL import Image
    sure = True     # an array's or tensor's shape is the decoded size
    if isinstance(src, torch.Tensor):
        h, w = _tensor_size(src)
        _check_tensor_dtype(src)
    elif isinstance(src, np.ndarray):
        h, w = _array_size(np.asarray(src))
        _check_array_dtype(np.asarray(src))
    elif isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        with _open_file(src) as (im, _):
            (h, w), sure = _pil_size(im, src)
    elif callable(getattr(src, "read", None)):
        seekable = getattr(src, "seekable", None)
        if not (callable(seekable) and seekable()):
            return None
        pos = src.tell()
        data = _read_stream(src)
        src.seek(pos)
        with _open_file(data, _stream_name(src)) as (im, _):
            (h, w), sure = _pil_size(im, data)
    elif isinstance(src, Image.Image):
        (h, w), sure = _pil_size(src)
    else:   # no image: load_image raises the ImageError that says so
        return tuple(load_image(src).shape[-2:])
    _check_sides(src, h, w)
    if exact and not sure:
        return None
    return h, w


def _check_sides(src, h: int, w: int) -> None:
    if min(h, w) < MIN_SIDE:
        where = f"{os.fsdecode(src)}: " if isinstance(src, (str, os.PathLike)) else ""
        raise ImageError(f"{where}image is {h}x{w} (HxW) pixels; both sides must be at least "
                         f"{MIN_SIDE}")


_ORIENTATION = 0x0112   # ExifTags.Base.Orientation
_TURNS = (5, 6, 7, 8)   # the orientations that transpose or quarter-turn: H and W swap


def _pil_size(im, encoded=None) -> tuple[tuple[int, int], bool]:
    """((H, W), sure) of a PIL image once load_image has decoded it, EXIF orientation applied,
    from its header; sure: that is the decoded size (else H and W may be each other's).
    encoded: the path or bytes `im` was opened from (a PNG's chunks are read from it).

    - A TIFF: newer PIL reports the size of an oriented TIFF already turned and turns
      its pixels as it loads them (then drops the tag), older PIL neither (load_image turns
      them): both decode the stored ImageWidth x ImageLength turned by the Orientation tag.
    - A PNG: PIL reads the chunks before the pixels (IDAT) at open, those after them only as it
      decodes, and EXIF (eXIf), XMP or ImageMagick's EXIF text may sit after them (`_png_size`).
    - Any other format: the orientation PIL reads with the header; sure for
      EXACT_HEADER_FORMATS and an image made in memory (no format: nothing is left to read).
    """
    w, h = im.size
    if im.format == "TIFF":
        tags = getattr(im, "tag_v2", None)
        if tags is None or _ORIENTATION not in tags:   # none, or turned and dropped by load
            return (h, w), True
        try:
            stored = int(tags[257]), int(tags[256])     # ImageLength, ImageWidth
        except (KeyError, TypeError, ValueError):
            return (h, w), False
        return _turned(*stored, lambda: tags), True
    if im.format == "PNG":
        size = _png_size(im, encoded) if encoded is not None else None
        if size is not None:
            return size, True
        # PIL's PNG getexif decodes the whole file to look past its pixels: only the EXIF read
        # with the header is applied
        return (_turned(h, w, im.getexif) if "exif" in im.info else (h, w)), False
    return _turned(h, w, im.getexif), im.format is None or im.format in EXACT_HEADER_FORMATS


def _turned(h: int, w: int, exif) -> tuple[int, int]:
    """(H, W) turned as load_image turns them for the orientation exif() holds (a mapping):
    swapped for _TURNS. Broken EXIF data keeps the stored orientation, as load_image does."""
    try:
        with _quiet_pil():
            orientation = exif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - broken EXIF data: the stored orientation is kept
        orientation = None
    return (w, h) if orientation in _TURNS else (h, w)


def decoded_size(im, encoded) -> tuple[int, int]:
    """(H, W) of the PIL image `im`, opened from the path or bytes `encoded`, as load_image
    decodes it (EXIF orientation applied): from the header where it promises that (`_pil_size`:
    a JPEG, a whole PNG, a TIFF, ...), else by decoding the pixels, which raises what PIL raises
    for them as load_image's decode would (a PNG cut short, whose chunk list has no IEND), and
    reading the orientation they bring (an APNG's). For a scan of many files that must
    find the ones load_image refuses without decoding every one (train's); image_size, which
    never decodes, says None instead (exact=True)."""
    size, sure = _pil_size(im, encoded)
    if sure:
        return size
    im.load()
    w, h = im.size     # a TIFF that PIL turns as it loads has its turned size now
    return _turned(h, w, im.getexif)


# The PNG chunks Image.getexif finds an orientation in: EXIF (eXIf; a tEXt "exif" or ImageMagick's
# "Raw profile type exif") and XMP (iTXt "XML:com.adobe.xmp").
_PNG_METADATA = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(im, encoded) -> tuple[int, int] | None:
    """(H, W) of the PNG `im` (opened from the path or bytes `encoded`) as load_image decodes
    it, EXIF orientation applied, nothing decompressed; None where that cannot be promised.

    PIL reads at open the chunks before the first IDAT and, as it decodes, those after it up to
    IEND; getexif reads the orientation from what both gave. The chunks after the pixels that
    can hold one (_PNG_METADATA) are found by walking the chunk headers, seeking past the rest
    (`_png_chunks_after_pixels`), and PIL reads them with the header: the file's chunks up to
    its first IDAT, then those, in the file's order, then an empty IDAT, opened as a PNG of its
    own (PIL's parsers, none of ours). None for an APNG (decoding its first frame stops at the
    next frame's chunks), for a chunk layout decoding could read otherwise (no IEND, a chunk
    past the end), and where PIL refuses the chunks so joined (a broken CRC, which decoding
    does not check): those are decoded."""
    from PIL import Image
    try:
        if isinstance(encoded, (bytes, bytearray, memoryview)):
            f = io.BytesIO(encoded)
        else:
            f = open(os.fsdecode(encoded), "rb")
        with f:
            walked = _png_chunks_after_pixels(f)
            if walked is None:
                return None
            start, tail = walked
            f.seek(0)
            head = f.read(start) if tail else b""
    except (OSError, TypeError, ValueError):   # gone since it was opened; a strided memoryview
        return None
    w, h = im.size
    if not tail:    # every chunk with metadata came before the pixels: PIL has read them all
        # (Image.getexif: the PNG plugin's own would decode the image to look after them)
        return _turned(h, w, lambda: Image.Image.getexif(im))
    idat = struct.pack(">I", 0) + b"IDAT" + struct.pack(">I", zlib.crc32(b"IDAT"))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    try:
        with _quiet_pil():
            meta = Image.open(io.BytesIO(head + tail + idat + iend), formats=["PNG"])
    except Exception:  # noqa: BLE001 - chunks PIL refuses this way: decoded instead
        return None
    with meta:
        if meta.size != im.size:
            return None
        return _turned(h, w, lambda: Image.Image.getexif(meta))


def _png_chunks_after_pixels(f) -> tuple[int, bytes] | None:
    """(offset of the first IDAT chunk, the _PNG_METADATA chunks after it, whole and in order)
    of the PNG file object `f`, from its chunk headers: an IDAT is skipped by seeking, not
    read. None for an APNG (an acTL chunk) and where the chunks do not run to an IEND."""
    f.seek(0)
    if f.read(8) != _PNG_SIGNATURE:
        return None
    start, found = None, []
    while True:
        at = f.tell()
        head = f.read(8)
        if len(head) < 8:
            return None
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            return (start, b"".join(found)) if start is not None else None
        if kind == b"acTL" or length >= 1 << 31:
            return None
        if kind == b"IDAT" and start is None:
            start = at
        if start is not None and kind in _PNG_METADATA:
            chunk = f.read(length + 4)      # its data and CRC
            if len(chunk) < length + 4:
                return None
            found.append(head + chunk)
        else:
            f.seek(length + 4, io.SEEK_CUR)


# warnings.catch_warnings changes process-wide state and is not thread-safe: threads decoding at
# once (a server, a DataLoader with threads) would leak each other's filters. Only the steps that
# warn run under it, one thread at a time; the decoding itself runs in parallel.
_WARNINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_pil():
    """PIL's warnings silenced: the decompression-bomb warning (between MAX_IMAGE_PIXELS and
    twice it: a 108-MP phone photo is a photo, PIL's own limit refuses twice that) and the EXIF
    reader's complaints about corrupt tags (the stored orientation is kept)."""
    from PIL import Image
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        yield


def _stream_name(f) -> str:
    """What errors call a file object's image: its file name where it has one (an open file, a
    zip member, "<stdin>"), else "<bytes>" as for encoded bytes."""
    name = getattr(f, "name", None)
    return name if isinstance(name, str) and name else "<bytes>"


def _read_stream(f) -> bytes:
    """The bytes of a file object from its position on: read whole, so PIL's lazy decoding never
    depends on a stream the caller may close or move."""
    try:
        data = f.read()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a closed file, a socket reset, a zip member's
        why = (str(exc) or type(exc).__name__).splitlines()[0][:160]   # bad CRC (BadZipFile)
        name = _stream_name(f)
        what = type(f).__name__ if name == "<bytes>" else f"{name} ({type(f).__name__})"
        raise ImageError(f"could not read the image from {what}: {why}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"{type(f).__name__} gave {type(data).__name__}, not bytes: open image "
                         "files in binary mode ('rb')")
    return data


def _from_file(src, name: str = "<bytes>") -> torch.Tensor:
    with _open_file(src, name) as (im, name):
        try:
            return _from_pil(im, own=True)
        except ImageError as exc:
            raise ImageError(f"{name}: {exc}")


@contextlib.contextmanager
def _open_file(src, name: str = "<bytes>"):
    """(PIL image, name for errors) of a path or encoded bytes: its header read, its pixels not
    decoded."""
    from PIL import Image
    encoded = isinstance(src, (bytes, bytearray, memoryview))
    # a str even for a bytes path-like (os.scandir(b".")'s entries): errors quote no b'...'
    name = name if encoded else os.fsdecode(src)
    if not encoded and not os.path.isfile(name):
        if os.path.isdir(name):
            raise ImageError(f"{name} is a folder, not an image file")
        if os.path.exists(name):   # never opened: a FIFO's open would wait for a writer
            raise ImageError(f"{name} is not a regular file (a device, pipe or socket); pass "
                             "an image file, or its bytes")
        raise not_found(name)
    # said apart from undecodable bytes: an empty upload or pipe is a different mistake
    if (memoryview(src).nbytes if encoded else _file_size(name)) == 0:
        raise ImageError(f"{name}: empty (0 bytes), not an image file")
    if isinstance(src, memoryview) and not src.c_contiguous:   # BytesIO takes no strides
        src = src.tobytes()
    try:
        with _quiet_pil():
            im = Image.open(io.BytesIO(src) if encoded else name)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises (see _decode_failure)
        if encoded and _names_a_file(src):   # os.fsencode(path), bytes from os.listdir(b".")
            raise ImageError(f"{name}: these bytes are no image but a file's path; bytes are "
                             f"read as an encoded image, so pass the path itself (a str): "
                             f"{os.fsdecode(bytes(src))}")
        from PIL import UnidentifiedImageError
        what = _unread_format(src, encoded) if isinstance(exc, UnidentifiedImageError) else None
        raise ImageError(f"{name}: {what or _decode_failure(exc)}")
    with im:
        # PIL knows a file by its bytes, not its name: a "photo.jpg" holding PostScript opens as
        # EPS, and decoding it hands the file's program to Ghostscript (a full interpreter, with
        # a history of sandbox escapes) where one is installed. Opening read the header only.
        if im.format == "EPS":
            raise ImageError(f"{name}: EPS (PostScript) is not decoded, that would run the "
                             "file's code in Ghostscript; convert it to PNG first")
        yield im, name


# ISO-BMFF brands of HEIF images (iPhone photos since iOS 11) that Pillow reads only through a
# plugin (pillow-heif); AVIF's brands are Pillow's own.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1",
                b"msf1")


def _unread_format(src, encoded: bool) -> str | None:
    """What a file PIL cannot identify is, where its first bytes tell a format people take for
    an image (a PDF, an SVG drawing, a web page saved as photo.jpg, an iPhone's HEIC), with what
    to do; None otherwise."""
    try:
        if encoded:
            head = bytes(memoryview(src)[:1024])
        else:
            with open(src, "rb") as f:
                head = f.read(1024)
    except OSError:
        return None
    if head.startswith(b"%PDF-"):
        return "a PDF document, not an image; render its page to PNG or JPEG first"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in text:
        return ("an SVG drawing (vector graphics), not a raster image; render it to PNG first "
                "(e.g. with cairosvg or a browser)")
    if text.startswith((b"<!doctype html", b"<html")):
        return ("an HTML page, not an image (a download that saved the web page around the "
                "image, or an error page?); fetch the image file itself")
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return ("a HEIC/HEIF image, which this Pillow cannot decode; install pillow-heif and call "
                "pillow_heif.register_heif_opener() before vggfast reads it, or convert it to "
                "JPEG")
    return None


def _names_a_file(data) -> bool:
    """Whether bytes that are no image are the path of a file (short, no NUL, there)."""
    data = bytes(data[:4097])
    return len(data) <= 4096 and b"\0" not in data and os.path.isfile(data)


def not_found(path: str | os.PathLike) -> ImageError:
    """The ImageError for a path to nothing (a path of "" would quote nothing); a symbolic link
    that leads nowhere (`ls` lists it) is named as one."""
    path = os.fsdecode(path)
    if not path:
        return ImageError("an empty path is not an image file")
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as exc:
            why = "a loop of symbolic links" if exc.errno == errno.ELOOP else \
                f"a symbolic link to {os.readlink(path)}, which does not exist"
            return ImageError(f"image not found: {path} is {why}")
    if re.match(r"(?i)(https?|ftp|s3|gs)://", path):   # a URL a user pasted as timm's demos do
        return ImageError(f"image not found: {path} is a URL; vggfast reads local files only "
                          "(it never downloads): fetch the image first and pass its path or bytes")
    return ImageError(f"image not found: {path}")


@contextlib.contextmanager
def naming_file(img: Any, name: str | None = None):
    """Within it, a VGGFastError about the request's one image (the planner's "image 0
    (40x2000, HxW) at scale ...", of the decoded tensor it was given) names the file `img`
    instead, as `vggfast classify` does, or `name` where given (the CLI's "standard input");
    for an `img` that is no path and no `name` it passes unchanged. Used by the one-image paths
    (heatmap, feature_maps, localize) that decode first."""
    try:
        yield
    except VGGFastError as exc:
        if name is None and isinstance(img, (str, os.PathLike)):
            name = os.fsdecode(img)
        if exc.image is None or name is None:
            raise
        err = type(exc)(f"{name} {exc.reason}")
        err.image, err.reason = exc.image, exc.reason
        raise err from None


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:     # gone since: Image.open says so
        return None


def _decode_failure(exc: Exception) -> ImageError:
    """The ImageError for an exception PIL raised opening or decoding an image. Bad bytes make
    PIL's plugins raise more than OSError: libavif's RuntimeError, struct.error, zlib.error..."""
    from PIL import Image, UnidentifiedImageError
    if isinstance(exc, Image.DecompressionBombError):
        return ImageError(f"refused, too many pixels ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS "
                          "if the file is trusted")
    if isinstance(exc, UnidentifiedImageError):
        return ImageError("not an image file PIL can read")
    if isinstance(exc, OSError) and exc.errno is not None:   # the system's, not a decoder's:
        return ImageError(f"cannot read the file ({exc.strerror})")   # the bytes may be fine
    first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
    return ImageError(f"corrupt or truncated image ({first})")


def _from_pil(im, own: bool = False) -> torch.Tensor:
    """A PIL image -> load_image's tensor. own: the image is load_image's (opened from a file),
    not the caller's, and may be changed and its pixels freed on the way."""
    from PIL import ImageOps
    try:
        im.load()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises (see _decode_failure)
        if not own and _closed(im, exc):
            raise ImageError("the PIL image is closed (im.close(), or used after its `with "
                             "Image.open(...)` block before its pixels were read); pass it "
                             "before closing it, call im.load() inside the block, or pass the "
                             "path") from None
        raise _decode_failure(exc)
    depth = _sample_depth(im)   # before exif_transpose: its copy keeps no TIFF tags
    try:
        with _quiet_pil():
            # exif_transpose copies an image it does not turn (4 bytes a pixel, for nothing): it
            # is called only for the orientations it turns (ExifTags.Base.Orientation)
            if im.getexif().get(0x0112, 1) in (2, 3, 4, 5, 6, 7, 8):
                turned = ImageOps.exif_transpose(im)
                if own:     # a file's image is done with: its pixels freed before the copy out
                    im.close()
                im = turned
    except Exception:  # broken EXIF data: keep the stored orientation rather than fail
        pass
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return _gray_float(_integer_gray(np.asarray(im), depth))
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ImageError("float image contains NaN or infinite values")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        top = 255.0 if hi > 1.0 + FLOAT_SLACK else 1.0   # 0-255; a 1.0000001 is [0, 1] rounded
        if lo < -FLOAT_SLACK * top or hi > (1.0 + FLOAT_SLACK) * top:
            raise ImageError(f"float (PIL mode 'F') image values must lie in [0, 1] or 0-255 "
                             f"(found {lo:.6g}..{hi:.6g}); rescale it to one of them first")
        return _gray_float(a / 255.0 if top == 255.0 else a)
    if mode != "RGB":
        try:
            rgb = im.convert("RGB")
        except ValueError as exc:  # modes PIL cannot convert ("La", ...): not a corrupt file
            raise ImageError(f"cannot convert a PIL {mode!r} image to RGB ({exc}); convert it "
                             "first")
        if own:     # a file's image is done with: its pixels freed before the copy out
            im.close()
        im = rgb
    return _pil_to_chw(im)


def _closed(im, exc: Exception) -> bool:
    """Whether load() failed because the caller closed the PIL image, not because its bytes are
    bad ("corrupt or truncated" would send them to check a good file): Image.close() leaves an
    image whose every use raises ValueError("Operation on closed image"); leaving `with
    Image.open(p) as im:` unloaded drops its file, and load() then fails an assert (Pillow 13)."""
    if isinstance(exc, ValueError) and "closed image" in str(exc):
        return True
    return isinstance(exc, AssertionError) and getattr(im, "fp", None) is None


def _pil_to_chw(im) -> torch.Tensor:
    """An RGB PIL image -> [3, H, W] uint8, contiguous, copied out of PIL a chunk of rows at a
    time (`row_chunks`). np.asarray of the whole image would make its bytes twice (tobytes'
    pieces, then their join) and the CHW copy a third time: 9 bytes a pixel beside PIL's 4, 1 GB
    for a 12000x9000 photo; a chunk's are 116 rows of it."""
    w, h = im.size
    out = torch.empty((3, h, w), dtype=torch.uint8)
    o = out.numpy()     # the same memory, written by numpy: np.asarray's arrays are read-only
    for top, bottom in row_chunks(h, w):
        o[:, top:bottom] = np.asarray(im.crop((0, top, w, bottom))).transpose(2, 0, 1)
    return out


def _sample_depth(im) -> tuple[int, bool] | None:
    """(bits, signed) of the integer grey samples of a TIFF ("I;16*" or "I" in PIL), from its
    BitsPerSample and SampleFormat tags; None where the file tells none (PNG, PGM, FITS, an
    image made in memory) or they do not fit the mode."""
    tags = getattr(im, "tag_v2", None)
    if tags is None or not (im.mode == "I" or im.mode.startswith("I;16")):
        return None
    bits, fmt = tags.get(258), tags.get(339, 1)
    bits = bits[0] if isinstance(bits, tuple) and len(bits) == 1 else bits
    fmt = fmt[0] if isinstance(fmt, tuple) and len(fmt) == 1 else fmt
    if fmt not in (1, 2) or not isinstance(bits, int):
        return None
    if im.mode == "I":      # PIL's 32-bit integers: signed 16-bit and 32-bit TIFF samples
        return (bits, fmt == 2) if bits == 32 or (bits == 16 and fmt == 2) else None
    return (bits, False) if fmt == 1 and 8 < bits <= 16 else None   # 12-bit TIFFs: 0-4095


def _integer_gray(a: np.ndarray, depth: tuple[int, bool] | None) -> np.ndarray:
    """Integer grey samples -> float32 in [0, 1]: the whole range of their type onto [0, 1], as
    uint8 0-255 is (unsigned b bits: v / (2^b - 1), so 16 bits is v / 65535, 8-bit v / 257;
    signed b bits: (v + 2^(b-1)) / (2^b - 1), so 0 is mid-grey: linear, order kept, as
    offset binary stores it). `depth` is (bits, signed) where the file tells it; without it
    the samples are 16-bit unsigned, and values outside 0-65535 (a 32-bit "I" image, negative
    values) an ImageError: there is no range to map them from, and clipping would hide it."""
    if depth is None:
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"32-bit integer (PIL mode 'I') image holds {lo}..{hi}, outside "
                             f"16-bit 0-65535, and tells no bit depth to scale by; convert it to "
                             f"uint16 or to float in [0, 1] first")
        depth = (16, False)
    bits, signed = depth
    if bits == 32 and not signed:   # PIL holds uint32 TIFF samples in int32: the same bits
        a = a.view(np.uint32)
    offset = 1 << (bits - 1) if signed else 0
    if bits <= 16:     # exact in float32
        return (a.astype(np.float32) + offset) / ((1 << bits) - 1)
    return ((a.astype(np.float64) + offset) / ((1 << bits) - 1)).astype(np.float32)


def _gray_float(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.clip(a, 0.0, 1.0).astype(np.float32))
    return t[None].expand(3, -1, -1).contiguous()


def pixel_limit() -> int | None:
    """The most pixels an image may have: twice PIL.Image.MAX_IMAGE_PIXELS, where PIL refuses a
    decompression bomb (read at each call: a user may raise it); None when PIL's is off."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * limit


def _check_pixels(h: int, w: int) -> None:
    """Arrays and tensors meet the limit PIL sets files (pixel_limit) before they are copied: a
    broadcast array or an expanded tensor of a huge shape costs nothing to make and all of host
    memory to convert."""
    limit = pixel_limit()
    if limit is not None and h * w > limit:
        raise ImageError(f"refused, too many pixels ({h}x{w}, HxW: {h * w} > {limit}, twice "
                         "PIL.Image.MAX_IMAGE_PIXELS, the limit for image files); raise "
                         "PIL.Image.MAX_IMAGE_PIXELS if the image is meant")


def _array_size(a: np.ndarray) -> tuple[int, int]:
    """(H, W) of a numpy image whose shape is one, before it is copied."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ImageError(f"a numpy image must be HxWx3 (or HxW, HxWx1, HxWx4), not shape {a.shape}")
    _check_pixels(a.shape[0], a.shape[1])
    return a.shape[0], a.shape[1]


def _from_array(a: np.ndarray) -> torch.Tensor:
    a = np.asarray(a)  # subclasses index their own way: np.matrix stays 2-D under a[:, :, None]
    _array_size(a)
    if a.ndim == 2:
        a = a[:, :, None]
    a = a[:, :, :3] if a.shape[2] == 4 else a
    # big-endian samples (np.asarray of an I;16B image) read as the native type: the one copy
    # below swaps their bytes
    kind = a.dtype.newbyteorder("=")
    if kind == np.uint8:
        return torch.from_numpy(_chw_copy(a, np.uint8))
    if kind == np.uint16:
        out = _chw_copy(a, np.float32)
        out /= 65535.0
        return torch.from_numpy(out)
    if kind == np.bool_:
        out = _chw_copy(a, np.uint8)
        out *= 255
        return torch.from_numpy(out)
    _check_array_dtype(a)
    t = torch.from_numpy(_chw_copy(a, np.float32))
    _check_float(t)
    return t.clamp_(0, 1)


def _check_array_dtype(a: np.ndarray) -> None:
    """ImageError unless a numpy image's dtype is one load_image reads (checked by image_size
    too, as _check_tensor_dtype)."""
    kind = a.dtype.newbyteorder("=")
    if kind not in (np.uint8, np.uint16, np.bool_) and not np.issubdtype(kind, np.floating):
        raise ImageError(f"numpy images must be uint8, uint16 or float in [0, 1], not {kind}")


def _chw_copy(a: np.ndarray, dtype) -> np.ndarray:
    """a [H, W, C] (C 1 or 3) as a new C-order [3, H, W] array of `dtype`: one copy, which also
    converts the samples (as astype does) and repeats a single channel. Each step apart (repeat,
    astype, a CHW copy) held the image again; a copy is made even where a CHW buffer underneath
    could be returned as it is, so the result never shares the caller's memory."""
    out = np.empty((3, *a.shape[:2]), dtype)
    np.copyto(out, a.transpose(2, 0, 1), casting="unsafe")
    return out


def _check_float(t: torch.Tensor) -> None:
    """ImageError unless the float32 image t is finite with values in [0, 1] (FLOAT_SLACK of
    rounding either side, which the caller clamps away)."""
    if not torch.isfinite(t).all():
        raise ImageError("float image contains NaN or infinite values")  # numpy's too
    if t.numel() and (t.min() < -FLOAT_SLACK or t.max() > 1 + FLOAT_SLACK):
        raise ImageError(f"float image values must lie in [0, 1] (found {t.min():.3g}.."
                         f"{t.max():.3g}); pass uint8 0-255 or un-normalised RGB in [0, 1]")


def _tensor_size(t: torch.Tensor) -> tuple[int, int]:
    """(H, W) of a tensor image whose kind and shape are one, before it is copied."""
    if t.is_nested:  # strided ones have no .shape to check (it raises): images of many sizes
        raise ImageError("a nested tensor is not one image; pass its images as a list, "
                         "list(t.unbind())")
    if t.layout != torch.strided or t.is_meta:
        raise ImageError(f"a tensor image must be a dense tensor holding data, not "
                         f"{'a meta tensor' if t.is_meta else t.layout}")
    shape = (1, *t.shape) if t.dim() == 2 else tuple(t.shape)
    if len(shape) != 3 or shape[0] not in (1, 3, 4):
        raise ImageError(f"a tensor image must be [3, H, W] (or [1, H, W], [4, H, W]), not "
                         f"{list(t.shape)}; for batches of normalised input use Engine.logits")
    _check_pixels(shape[1], shape[2])
    return shape[1], shape[2]


def _from_tensor(t: torch.Tensor) -> torch.Tensor:
    _tensor_size(t)
    t = t.detach()
    if t.dim() == 2:
        t = t[None]
    t = t[:3] if t.shape[0] == 4 else t.expand(3, -1, -1) if t.shape[0] == 1 else t
    t = t.cpu()
    if t.dtype == torch.uint8:
        return t.contiguous()
    if t.dtype == torch.bool:
        return t.to(torch.uint8).mul_(255).contiguous()
    if t.dtype == getattr(torch, "uint16", None):   # torchvision.io's 16-bit PNG decode
        return t.to(torch.float32).div_(65535.0).contiguous()
    _check_tensor_dtype(t)
    t = t.to(torch.float32)
    _check_float(t)
    return t.clamp(0, 1).contiguous()


def _check_tensor_dtype(t: torch.Tensor) -> None:
    """ImageError unless a tensor image's dtype is one load_image reads (checked by image_size
    too: a plan of an int64 tensor would be refused only when it ran)."""
    if t.dtype not in (torch.uint8, torch.bool, getattr(torch, "uint16", torch.uint8)) \
            and not t.is_floating_point():
        raise ImageError(f"tensor images must be uint8, uint16, bool or float in [0, 1], not "
                         f"{t.dtype}")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] uint8 or float -> float32 in [0, 1]."""
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


def resize_short(x: torch.Tensor, q: int) -> torch.Tensor:
    """Isotropic antialiased bilinear rescale so the smallest side is q: [3, H, W] uint8 or float
    -> float32 [3, H', W'] in [0, 1].

    An image whose smallest side already equals q is not resampled. A uint8 image is never
    converted to float whole: see `resize_scales`.
    """
    return resize_scales(x, (q,))[0]


def resize_scales(x: torch.Tensor, qs: Sequence[int]) -> list[torch.Tensor]:
    """`resize_short(x, q)` for each q of qs, from one pass over x: [3, H, W] uint8 or float ->
    a float32 [3, H_q, W_q] per q.

    A uint8 image is converted to float RESIZE_CHUNK_BYTES of rows at a time, not whole (a
    12000x9000 photo's float copy is 1.3 GB): each chunk is resampled along its width to every
    scale's width W_q, then each [3, H, W_q] along its height. The antialiased bilinear resample
    is separable and PyTorch's CPU kernel runs it width first, then height, in float32, so this
    gives the numbers of one F.interpolate call on the whole float image bit for bit (on CUDA,
    whose kernel is another, up to float rounding). Resampling the uint8 image itself (PyTorch's
    uint8 kernel, PIL's resize) rounds to 1/255 steps, up to 4e-3 off on photos, and JPEG draft
    decoding 4e-2, where torchvision's float resize is matched to 1e-5.
    """
    h, w = x.shape[-2:]
    sizes = [rescaled_size(h, w, q) for q in qs]
    # a scale equal to the smallest side is not resampled: the image's float copy itself
    same = [k for k, q in enumerate(qs) if min(h, w) == q]
    todo = [k for k, q in enumerate(qs) if min(h, w) != q]
    out: list[torch.Tensor | None] = [None] * len(qs)
    c = x.shape[0]
    if x.dtype != torch.uint8 or 4 * c * h * w <= RESIZE_CHUNK_BYTES:
        # a float image, or one whose float copy is small: resampled whole, in one call a scale,
        # from the one float copy a scale equal to the smallest side returns
        x = to_float(x)
        for k in same:
            out[k] = x
        for k in todo:
            out[k] = _resample(x, sizes[k])
        return out
    mids = {k: torch.empty((c, h, sizes[k][1]), dtype=torch.float32, device=x.device)
            for k in todo}
    for top, bottom in row_chunks(h, w, c) if mids else ():
        part = to_float(x[:, top:bottom])
        for k in todo:  # (no loop variable holding a width pass past its height pass)
            mids[k][:, top:bottom] = _resample(part, (part.shape[1], sizes[k][1]))
        del part    # before the next chunk's copy is made, and before the height passes
    for k in todo:  # each width pass is freed once its height pass is made
        out[k] = _resample(mids.pop(k), sizes[k])
    if same:        # the whole float copy last, when the width passes are gone
        whole = to_float(x)
        for k in same:
            out[k] = whole
    return out


# Bytes of the 0-dim tensors PyTorch wraps a Python number in while resize_scales runs (to_float's
# div_(255.0): 12 bytes measured), so resize_scales_bytes bounds the measured peak to the byte.
_SCALARS = 64


def _table_bytes(size: int, new: int) -> int:
    """Bytes of the tables PyTorch's antialiased bilinear CPU kernel builds for one pass along
    a side of `size` pixels resampled to `new` (aten UpSampleKernel.cpp, HelperInterpLinear):
    four int64 index vectors and a float32 weight per output pixel and tap, the taps
    2 * ceil(support) + 1, the support size / new (at least 1). Held during that pass only."""
    taps = 2 * math.ceil(max(size / new, 1.0)) + 1
    return new * (4 * 8 + 4 * taps)


def resize_scales_bytes(h: int, w: int, qs: Sequence[int], c: int = 3,
                        dtype: torch.dtype | None = torch.uint8) -> int:
    """Bytes that `resize_scales` of a [c, h, w] image of `dtype` at scales qs holds at once at
    its peak, its float32 results included, the source itself not counted; dtype None: either
    an 8-bit or a float32 image (the larger), for a size known before the image is decoded.
    It follows resize_scales step by step; each resample also holds PyTorch's index and weight
    tables (`_table_bytes`) while it runs.
    A float image, or an 8-bit one whose float copy is at most RESIZE_CHUNK_BYTES, is converted
    whole (a float32 one is its own float copy) and each scale resampled from that copy,
    PyTorch's kernel holding its width pass [c, h, W_q] beside the results made so far; a scale
    equal to the smallest side is the copy itself.
    A larger 8-bit image holds every scale's width pass [c, h, W_q] at once, beside a row
    chunk's float copy and its resample to one W_q; then each height pass beside the width
    passes not yet used and the results made; then, for a scale equal to the smallest side, the
    whole float copy beside the results. A 12000x9000 photo at Q = 256 is 37 MB of width pass
    for a 1 MB result. Measured with torch.profiler's allocation events, to the byte:
    tests/test_rescale_memory.py."""
    if dtype is None:
        return max(resize_scales_bytes(h, w, qs, c, torch.uint8),
                   resize_scales_bytes(h, w, qs, c, torch.float32))
    px = 4 * c
    sizes = [rescaled_size(h, w, q) for q in qs]
    same = any(min(h, w) == q for q in qs)
    todo = [(rh, rw) for q, (rh, rw) in zip(qs, sizes) if min(h, w) != q]
    outs = [px * rh * rw for rh, rw in todo]
    mids = [px * h * rw for _, rw in todo]
    # a scale equal to neither side: both sides change, a width pass and a height pass
    width_tables = [_table_bytes(w, rw) for _, rw in todo]
    height_tables = [_table_bytes(h, rh) for rh, _ in todo]
    if dtype != torch.uint8 or px * h * w <= RESIZE_CHUNK_BYTES:    # converted whole
        copy = 0 if dtype == torch.float32 else px * h * w
        return _SCALARS + copy + max((sum(outs[:k + 1]) + mids[k] +
                                      max(width_tables[k], height_tables[k])
                                      for k in range(len(todo))), default=0)
    if not todo:
        return _SCALARS + px * h * w
    rows = row_chunks(h, w, c)[0][1]        # the first chunk is the largest
    width_pass = sum(mids) + max(px * rows * (w + rw) + t
                                 for (_, rw), t in zip(todo, width_tables))
    height_pass = max(sum(mids[k:]) + sum(outs[:k + 1]) + height_tables[k]
                      for k in range(len(todo)))
    return _SCALARS + max(width_pass, height_pass, px * h * w + sum(outs) if same else 0)


def resize_crop(x: torch.Tensor, q: int, top: int, left: int, height: int,
                width: int) -> torch.Tensor:
    """`resize_short(x, q)[:, top:top + height, left:left + width]`, the same numbers bit for bit,
    without the whole rescale: [3, H, W] uint8 or float -> a new contiguous float32
    [3, height, width].

    A thin strip's whole rescale is large (40x20000 at q = 512 is 512x256000, 1.5 GB in float32)
    for a 224x224 crop. The resample runs width first, then height (see `resize_scales`), and the
    height pass makes each output column from that column alone: so the width pass is made for
    every row, RESIZE_CHUNK_BYTES of them at a time (an [3, H, W_q] float32 image, W_q the
    rescaled width), and the height pass for the crop's columns only, a chunk of them at a time.
    The crop must lie inside the rescaled image (`rescaled_size`)."""
    h, w = x.shape[-2:]
    rh, rw = rescaled_size(h, w, q)
    if not (0 <= top and top + height <= rh and 0 <= left and left + width <= rw):
        raise ValueError(f"crop {height}x{width} at ({top}, {left}) is outside the {rh}x{rw} "
                         f"rescale")
    if min(h, w) == q:  # not resampled (resize_short): the crop of the image itself
        crop = to_float(x[:, top:top + height, left:left + width])
        # a float32 x's crop is a view of it (the whole image: x itself), which a caller's
        # in-place op on the crop (a colour shift) would write through: a copy, as promised
        return crop.clone(memory_format=torch.contiguous_format) if crop.dtype == x.dtype \
            else crop.contiguous()
    c = x.shape[0]
    chunks = row_chunks(h, w, c)
    if len(chunks) == 1:    # no whole copy beside the width pass: it is made in one call
        mid = _resample(to_float(x), (h, rw))
    else:
        mid = torch.empty((c, h, rw), dtype=torch.float32, device=x.device)
        for r0, r1 in chunks:
            mid[:, r0:r1] = _resample(to_float(x[:, r0:r1]), (r1 - r0, rw))
    # The height pass a few columns at a time, RESIZE_CHUNK_BYTES of its rh rows (a tall
    # strip's are 256000 rows long), each keeping the crop's rows; two columns at least:
    # PyTorch's antialiased resample of a one-column image is not the height pass of that
    # column (0.4 off).
    out = torch.empty((c, height, width), dtype=torch.float32, device=x.device)
    step = max(2, RESIZE_CHUNK_BYTES // (4 * c * rh))
    for c0 in range(left, left + width, step):
        c1 = min(c0 + step, left + width)
        a = min(c0, max(rw - 2, 0))
        b = max(c1, a + 2)
        part = _resample(mid[:, :, a:b].contiguous(), (rh, b - a))
        out[:, :, c0 - left:c1 - left] = part[:, top:top + height, c0 - a:c1 - a]
    return out


def resize_crop_bytes(h: int, w: int, q: int, height: int, width: int, c: int = 3) -> int:
    """Bytes of float32 that `resize_crop` of a [c, h, w] image at scale q, cut to a
    height x width crop, holds at once at its peak, the source itself not counted (for a
    float32 source, whose float copy is itself, an upper bound). It follows resize_crop step
    by step: the width pass's output [c, h, W_q] beside a row chunk's float copy and its
    resample (one chunk: the whole float copy), then that output beside the crop, a strip of
    columns' copy [c, h, k] and its height pass [c, H_q, k] (the last strip's still held). Engine._check_center_crop counts
    this before allocating, not the whole rescale that resize_crop never makes."""
    rh, rw = rescaled_size(h, w, q)
    px = 4 * c
    crop = px * height * width
    if min(h, w) == q:          # not resampled: the crop's float copy alone
        return crop
    mid = px * h * rw
    chunks = row_chunks(h, w, c)
    # one chunk: the float copy is resampled into the output itself; else into a chunk's own
    width_pass = mid + (px * h * w if len(chunks) == 1
                        else px * (chunks[0][1] - chunks[0][0]) * (w + rw))
    cols = max(2, min(RESIZE_CHUNK_BYTES // (px * rh), width))     # a strip: `step` columns
    height_pass = mid + crop + px * cols * (h + 2 * rh)    # the last strip's kept to the next
    return max(width_pass, height_pass)


def row_chunks(h: int, w: int, c: int = 3) -> list[tuple[int, int]]:
    """(top, bottom) of the chunks of rows a [c, h, w] image is worked on in where a whole copy
    of it would be large: RESIZE_CHUNK_BYTES of its rows in float32 (at least one row). A width
    of 0 (a PIL image made 0x0) gives one empty chunk: load_image refuses its size after."""
    rows = max(1, RESIZE_CHUNK_BYTES // (4 * c * max(w, 1)))
    return [(top, min(top + rows, h)) for top in range(0, h, rows)]


def _resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear [C, H, W] float32 -> [C, *size] (torchvision's Resize, antialias)."""
    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0]


def normalize(x: torch.Tensor, conv: str | Convention = "torchvision") -> torch.Tensor:
    """RGB float in [0, 1], [..., 3, H, W] -> the network's input under `conv`, in x's dtype.
    ArgumentError for anything else: a uint8 image came back inf (its mean and std were cast to
    uint8, the std to 0), a channels-last one raised a broadcasting RuntimeError, a grey
    [..., 1, H, W] one was broadcast to 3 channels unsaid."""
    if not (isinstance(x, torch.Tensor) and not x.is_nested and x.layout == torch.strided
            and x.is_floating_point() and x.dim() >= 3 and x.shape[-3] == 3):
        raise ArgumentError(f"normalize expects float RGB in [0, 1], [..., 3, H, W], "
                            f"not {_describe(x)}")
    c = convention(conv) if isinstance(conv, str) else conv
    if c.bgr:
        x = x.flip(-3)  # mean and std are listed in the input's channel order already
    mean_t, std_t = _mean_std(c, x.device, x.dtype)
    return (x * c.scale - mean_t) / std_t


def _describe(x: Any) -> str:
    """What normalize was given instead, for its error: dtype and shape, or the kind."""
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    if x.is_nested or x.layout != torch.strided:
        return "a nested tensor" if x.is_nested else \
            f"a {str(x.layout).replace('torch.', '')} tensor"
    got = f"{str(x.dtype).replace('torch.', '')} {list(x.shape)}"
    return got + ("; divide a uint8 image by 255 first" if x.dtype == torch.uint8 else "")


@functools.lru_cache(maxsize=64)
def _mean_std(c: Convention, device: torch.device, dtype: torch.dtype):
    """The convention's mean and std as [3, 1, 1] tensors, made once per device and dtype (a
    host-to-GPU copy each call would wait for the GPU's queued work). Made outside inference
    mode, so that a cached pair may enter an autograd graph later."""
    with torch.inference_mode(False):
        return (torch.tensor(c.mean, dtype=dtype, device=device).view(3, 1, 1),
                torch.tensor(c.std, dtype=dtype, device=device).view(3, 1, 1))


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = center_origin(*x.shape[-2:], size)
    return x[..., top:top + size, left:left + size]


def center_origin(h: int, w: int, size: int) -> tuple[int, int]:
    """(top, left) of center_crop's size x size crop of an h x w image: for the crops that
    `resize_crop` cuts without the whole rescale, the same crop as center_crop of it."""
    return (h - size) // 2, (w - size) // 2


# -- writing images -------------------------------------------------------------------------------

def to_pil(x: torch.Tensor, overlay: Callable[[np.ndarray, int, int], np.ndarray] | None = None):
    """[3, H, W] uint8, or float in [0, 1] -> an RGB PIL image of its pixels (a float image's
    rounded from x * 255), made a chunk of rows at a time (`rgb_rows`): no whole float or
    HxWx3 copy of x is made beside PIL's (4 bytes a pixel). overlay(rgb, top, bottom), where
    given, turns each chunk, the HxWx3 uint8 rows top..bottom, into the uint8 rows drawn there;
    rgb may be a view of x, not to be written."""
    from PIL import Image
    h, w = x.shape[-2:]
    im = Image.new("RGB", (w, h))
    for top, bottom, rgb in rgb_rows(x):
        if overlay is not None:
            rgb = overlay(rgb, top, bottom)
        im.paste(Image.fromarray(np.ascontiguousarray(rgb), "RGB"), (0, top))
    return im


def rgb_rows(x: torch.Tensor) -> Iterator[tuple[int, int, np.ndarray]]:
    """(top, bottom, rgb) for each chunk of rows (`row_chunks`) of a [3, H, W] uint8 or float
    image: rgb the HxWx3 uint8 pixels of rows top..bottom, a float image's rounded from x * 255
    (the pixels `to_pil` writes), a view of x where x is uint8."""
    h, w = x.shape[-2:]
    for top, bottom in row_chunks(h, w):
        part = x[:, top:bottom]
        yield top, bottom, (part.permute(1, 2, 0).numpy() if part.dtype == torch.uint8 else
                            (to_float(part).permute(1, 2, 0).numpy() * 255).round()
                            .astype(np.uint8))


def image_format(out: str | os.PathLike) -> str:
    """The PIL format an RGB image written to `out` takes from its suffix, as PIL's own save infers
    it (.png PNG, .jpg/.jpeg JPEG, .webp WEBP, .bmp BMP, .tif TIFF, ...); checked before any work,
    with the parent folder made as `extract` and `train` make theirs.

    ArgumentError: `out` is a folder, has no suffix, or one PIL cannot write an RGB image as.
    VGGFastError: the folder cannot be made or written in.
    """
    from PIL import Image
    path = Path(os.fspath(out))
    use = "use .png, .jpg, .webp, .bmp or .tif"
    if path.is_dir() or path.name in ("", ".", ".."):
        raise ArgumentError(f"--out {os.fspath(out)} is a folder; give an image file name such as "
                            f"{path / 'out.png'}")
    suffix = path.suffix.lower()
    if not suffix:
        raise ArgumentError(f"--out {path} has no suffix to tell the image format; {use}")
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ArgumentError(f"--out {path}: PIL writes no {suffix} images; {use}")
    try:    # a writer missing its plugin, or one for 1-bit images only (.xbm), found now
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as exc:
        raise ArgumentError(f"--out {path}: PIL cannot write an RGB image as {fmt} ({exc}); "
                            f"{use}") from None
    try:    # found before the work, not after it
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path.parent).close()
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except (FileExistsError, NotADirectoryError) as exc:   # mkdir's "File exists" would puzzle
        file = next((a for a in reversed(path.parents) if a.exists() and not a.is_dir()), None)
        why = f"{file} is a file, not a folder" if file is not None else exc.strerror or exc
        raise VGGFastError(f"cannot write {path}: {why}") from None
    except OSError as exc:
        raise VGGFastError(f"cannot write {path}: {exc.strerror or exc}") from None
    return fmt


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then os.replace: a reader sees
    the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create files 0600
        os.replace(tmp, path)
    except OSError as exc:      # a read-only --out, a full disk: one line, not a traceback
        raise VGGFastError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def save_image(im, out: str | os.PathLike) -> None:
    """Save the PIL image `im` to `out` in the format its suffix names (`image_format`),
    converted to RGB first when that format cannot hold its mode (JPEG has no alpha). Written
    atomically (`atomic_write`): a crash or a full disk leaves the old file or none, not a
    truncated image."""
    from PIL import Image
    fmt = image_format(out)
    if im.mode != "RGB":
        try:
            Image.new(im.mode, (1, 1)).save(io.BytesIO(), format=fmt)
        except (OSError, ValueError, KeyError):
            im = im.convert("RGB")
    atomic_write(Path(os.fspath(out)), lambda p: im.save(p, format=fmt))

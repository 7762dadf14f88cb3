"""Training on PyTorch autograd (cuDNN on GPU) with the paper's recipe (Sec. 3.1).

The defaults are the paper's: SGD with momentum 0.9 and weight decay 5e-4, batch 256 (the global
batch, split over the processes), dropout 0.5 on fc6 and fc7, learning rate 1e-2 divided by 10 when
the validation accuracy stops improving (`ReduceLROnPlateau`, mode "max", factor 0.1), Glorot
initialisation (the paper's footnote) or net A's layers, and this augmentation of every training
image, in order:

1. isotropic rescale so the smallest side is S (antialiased bilinear, `preprocess.resize_short`);
   S is fixed (`scale`) or drawn uniformly from the integers [Smin, Smax] per image (scale
   jittering; default [256, 512] for a 224 crop, i.e. 256/224 and 512/224 of `image_size`);
   S is at least image_size and at most isqrt(preprocess.pixel_limit()) (13377 by default);
2. a random image_size x image_size crop;
3. a horizontal flip with probability 1/2;
4. an RGB colour shift (Krizhevsky et al., 2012): x += V @ (alpha * lambda) with alpha ~ N(0, 0.1^2)
   per image, V and lambda the eigenvectors and eigenvalues of the ImageNet pixel covariance (RGB
   in [0, 1]); not clipped;
5. torchvision normalisation (mean/std), the convention written into the checkpoint.

Validation images are rescaled to Q (= S, or (Smin + Smax) // 2 under jittering, as the paper's
single-scale test) and centre-cropped. Without `val`, the plateau scheduler watches the training
top-1 accuracy instead. Only the crop's pixels are resampled (`preprocess.resize_crop`, the
numbers of the whole rescale's crop). An image whose rescale at Smax (a validation image: at Q)
would pass preprocess.pixel_limit (a thin strip: 40x20000 at S = 512 is 512x256000) is skipped
at the scan, by its header, with the unreadable files (the rule localisation training shares).

Every random choice of the data pipeline comes from a generator seeded by (seed, epoch, image
index), and the shuffling from (seed, epoch), so the samples do not depend on the number of data
workers or processes, and `resume` continues exactly: the model, optimizer, scheduler, epoch and the
per-process torch RNG states (dropout) are in the checkpoint.

Output folder (`out`), rewritten atomically (temporary file, then `os.replace`) after every epoch:
- `model.safetensors`: the torchvision-keyed float32 state dict (`features.N.*`, `classifier.N.*`,
  BatchNorm parameters and running statistics, no `num_batches_tracked`), with the metadata JSON
  under the header key "vggfast"; `vggfast.Engine(out)` loads it;
- `model.json`: the same metadata: config, batch_norm, width, image_size, num_classes,
  class_names (the training folder's class folder names, sorted), preprocess ("torchvision");
- `checkpoint.pt`: model/optimizer/scheduler state, completed epochs, RNG states, metadata and
  history (loads with `torch.load(weights_only=True)`);
- `log.csv`: one row per epoch; `skipped.txt`: unreadable files that were skipped.
An epoch whose loss or weights are not finite (a diverged run, lr too high) stops the run with a
VGGFastError before it is saved, so `out` keeps the last good epoch. `resume` takes lr, momentum,
weight decay and patience from the checkpoint (a warning names flags that differ).

Multi-GPU and multi-node: run under torchrun (`torchrun --nproc-per-node 8 -m vggfast train ...`);
DistributedDataParallel on nccl (CUDA) or gloo (CPU), bf16 autocast on CUDA. Each rank trains on
cuda:LOCAL_RANK (`--device cuda`, the default); `--device cuda:N` with several ranks on a machine
is refused (it put them all on GPU N): choose the GPUs with CUDA_VISIBLE_DEVICES. A rank that
fails exits with its own status (2 and one line for a user error); a rank whose collective fails
because another rank failed or left (gloo) says so in one line and exits 2. BatchNorm uses each
process's batch statistics, as plain DDP does. Resuming on several nodes needs `out` on a shared
filesystem.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .configs import make_spec
from .devices import rank_device
from .distributed import dist_info, launch_info, leave_process_group, peers_reported
from .errors import ArgumentError, ImageError, VGGFastError, WeightsError
from .nn import VGG, build_model
from .preprocess import IMAGE_SUFFIXES, atomic_write, pixel_limit, rescaled_size

PREPROCESS = "torchvision"

# PCA of the ImageNet training pixels, RGB in [0, 1] (the values Krizhevsky et al.'s colour
# augmentation is usually reproduced with, e.g. fb.resnet.torch): eigenvalues and, as columns,
# the eigenvectors.
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
COLOR_SHIFT_STD = 0.1

# Layers of net A that initialise a deeper net (Sec. 3.1: "the first four convolutional layers
# and the last three fully-connected layers"). Net A's first four convs are conv1_1, conv2_1,
# conv3_1, conv3_2; B-E have layers of those names and shapes, so the copy is by name.
NET_A_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")

MODEL_FILE, META_FILE, CKPT_FILE = "model.safetensors", "model.json", "checkpoint.pt"
LOG_FILE, SKIPPED_FILE = "log.csv", "skipped.txt"
# options that --resume takes from the checkpoint's optimizer and scheduler states, not the flags
RESTORED_OPTIONS = ("lr", "momentum", "weight_decay", "patience")
LOG_FIELDS = ("epoch", "loss", "top1_err", "top5_err", "err_on", "lr", "img_per_s", "seconds")


# ---------------------------------------------------------------------------------------------
# options

@dataclass(kw_only=True)
class RunOptions:
    """What both trainers (classification here, localisation in localize.py) take alike:
    output folder, validation images, the training rescale (scale fixes S; scale_jitter =
    (Smin, Smax) draws S per image), augmentation, SGD and the run's settings. device: None =
    cuda if available (cuda:LOCAL_RANK under torchrun) else cpu."""

    out: str = "vggfast-run"
    val: str | None = None
    scale: int | None = None
    scale_jitter: tuple[int, int] | None = None
    flip: bool = True
    color_shift: bool = True
    epochs: int = 74
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    patience: int = 2
    workers: int = 4
    seed: int = 0
    device: str | None = None
    quiet: bool = False

    def jitter(self) -> tuple[int, int] | None:
        """(Smin, Smax) of the training rescale (equal for a fixed scale), None when neither
        scale nor scale_jitter is set."""
        if self.scale is not None and self.scale_jitter is not None:
            raise ArgumentError("give either a fixed scale or a scale-jitter range, not both")
        if self.scale is not None:
            return self.scale, self.scale
        if self.scale_jitter is None:
            return None
        lo, hi = self.scale_jitter
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo > hi:
            raise ArgumentError(f"scale-jitter range is empty: Smin {lo} > Smax {hi}")
        return lo, hi


def run_fields(args: argparse.Namespace, defaults: RunOptions) -> dict[str, Any]:
    """RunOptions' fields from the parsed `vggfast train` flags; a flag left unset (None or
    absent) takes the value of `defaults`."""
    def get(name, default=None):
        v = getattr(args, name, None)
        return default if v is None else v
    d, jitter = defaults, getattr(args, "scale_jitter", None)
    return dict(out=get("out", d.out), val=get("val"), scale=get("scale"),
                scale_jitter=tuple(jitter) if jitter else None,
                flip=not getattr(args, "no_flip", False),
                color_shift=not getattr(args, "no_color_shift", False),
                epochs=get("epochs", d.epochs), batch_size=get("batch_size", d.batch_size),
                lr=get("lr", d.lr), momentum=get("momentum", d.momentum),
                weight_decay=get("weight_decay", d.weight_decay),
                dropout=get("dropout", d.dropout), patience=get("patience", d.patience),
                workers=get("workers", d.workers), seed=get("seed", d.seed),
                device=get("device"), quiet=bool(getattr(args, "quiet", False)))


@dataclass(kw_only=True)
class TrainOptions(RunOptions):
    """Everything `fit` needs; the CLI flags map onto these one to one.

    batch_size is the global batch (split evenly over the processes). Neither scale nor
    scale_jitter = the default jitter range for image_size. init: "glorot" | "kaiming"
    (torchvision's init) | a net-A checkpoint path.
    """

    data: str
    config: str = "A"
    batch_norm: bool | None = None
    width: float = 1.0
    image_size: int = 224
    init: str = "glorot"
    bf16: bool = True
    resume: bool = False


def default_jitter(image_size: int) -> tuple[int, int]:
    """The paper's [256, 512] for 224 crops, scaled to other crop sizes."""
    return round(256 * image_size / 224), round(512 * image_size / 224)


def scale_range(opts: TrainOptions) -> tuple[int, int]:
    """(Smin, Smax) of the training rescale; Smin == Smax for a fixed scale."""
    lo, hi = opts.jitter() or default_jitter(opts.image_size)
    for s in (lo, hi):
        if isinstance(s, bool) or not isinstance(s, int):
            raise ArgumentError(f"scales must be whole numbers of pixels, not {s!r}")
    if lo < opts.image_size:
        raise ArgumentError(f"training scale {lo} is below the crop size {opts.image_size}: the "
                            "smallest side must be at least --image-size")
    check_scale_limit(hi)
    return lo, hi


def check_scale_limit(s: int) -> None:
    """Refuse a training scale S whose rescaled images cannot be made: each has at least S x S
    pixels, and past the limit an image may have (preprocess.pixel_limit, twice PIL's
    MAX_IMAGE_PIXELS) the rescale in the data workers ran out of memory instead."""
    limit = pixel_limit()
    if limit is not None and s * s > limit:
        raise ArgumentError(f"training scale {s} is too large: an image rescaled so its smallest "
                            f"side is {s} has at least {s}x{s} pixels, over the {limit} an image "
                            f"may have (twice PIL.Image.MAX_IMAGE_PIXELS); use at most "
                            f"{math.isqrt(limit)}")


def eval_scale(opts: TrainOptions) -> int:
    """Q of the validation images: S, or the middle of the jitter range (the paper's Q)."""
    lo, hi = scale_range(opts)
    return (lo + hi) // 2


def _check_options(opts: TrainOptions) -> None:
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ArgumentError(f"{name} must be a positive integer, not {v!r}")
    positive_int("epochs", opts.epochs)
    positive_int("batch_size", opts.batch_size)
    if isinstance(opts.patience, bool) or not isinstance(opts.patience, int) or opts.patience < 0:
        raise ArgumentError(f"patience must be a non-negative integer, not {opts.patience!r}")
    for name in ("lr", "momentum", "weight_decay", "dropout"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ArgumentError(f"{name} must be a non-negative number, not {v!r}")
    if opts.lr <= 0:
        raise ArgumentError(f"lr must be positive, not {opts.lr!r}")
    if opts.dropout >= 1:
        raise ArgumentError(f"dropout must be in [0, 1), not {opts.dropout!r}")
    if isinstance(opts.workers, bool) or not isinstance(opts.workers, int) or opts.workers < 0:
        raise ArgumentError(f"workers must be a non-negative integer, not {opts.workers!r}")
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int) or opts.seed < 0:
        raise ArgumentError(f"seed must be a non-negative integer, not {opts.seed!r}")
    make_spec(opts.config, 2, opts.width, opts.image_size, opts.batch_norm)  # validates those
    scale_range(opts)
    # --init is read_init's to check (that it exists, loads and is net A), in _fit before the
    # data scan: one check and one message for `fit` and `initialise` alike


# ---------------------------------------------------------------------------------------------
# data

def _header_problem(path: str, scale: int | None = None) -> str | None:
    """Why `path` is skipped (reading the header only; see `_header`), or None. Cheap for large
    folders."""
    size = _header(path, scale=scale)
    return size if isinstance(size, str) else None


def _header(path: str, oriented: bool = False,
            scale: int | None = None) -> tuple[int, int] | str:
    """(width, height) of the image read from its header, or why PIL cannot open it. oriented:
    as loaded, EXIF rotation applied (preprocess.decoded_size: from the header where it
    promises load_image's size, a PNG's EXIF after its pixels included; else decoded, so a PNG
    cut short is found here).

    scale: the largest S the image is rescaled to, its crop cut from that rescale (None: no
    check). An image whose rescale would have more pixels than an image may have
    (preprocess.pixel_limit, the cap the training scales meet for a square image) is skipped
    the same way: a 40x20000 strip at S = 512 is 512x256000 (only the crop is resampled,
    preprocess.resize_crop, but its width pass is still [3, 40, 256000] float32, 123 MB)."""
    from PIL import Image

    from .preprocess import MIN_SIDE, _decode_failure, decoded_size
    try:
        with Image.open(path) as im:
            if oriented:
                h, w = decoded_size(im, path)
            else:
                w, h = im.size
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a plugin raises (libavif, struct, zlib)
        return str(_decode_failure(exc))
    if min(w, h) < MIN_SIDE:
        return f"{h}x{w} (HxW) pixels, both sides must be at least {MIN_SIDE}"
    limit = pixel_limit() if scale is not None else None
    if limit is not None:
        rh, rw = rescaled_size(h, w, scale)
        if rh * rw > limit:
            if not oriented:
                # the same pixels either way up; read again (rarely) to name the loaded size:
                # the classification scan needs no orientation else, and sizing it would walk
                # each PNG's chunks and decode what its header cannot size (a PNG cut short)
                return _header(path, True, scale)
            return (f"{h}x{w} (HxW) is rescaled to {rh}x{rw} at scale {scale}: {rh * rw} "
                    f"pixels, over the {limit} an image may have (twice "
                    "PIL.Image.MAX_IMAGE_PIXELS)")
    return w, h


@dataclass
class FolderScan:
    """An ImageFolder-layout folder: class names (sorted folder names), (path, label) samples,
    and the files that were skipped, as (path, reason). empty: the class folders without image
    files, which are not classes (training data only)."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def scan_folder(root: str | os.PathLike, classes: Sequence[str] | None = None,
                what: str = "data", scale: int | None = None) -> FolderScan:
    """Read the ImageFolder layout ROOT/CLASS/IMAGE (image extensions only, hidden names ignored).

    classes: the label order to use (a validation folder takes the training folder's); its class
    folders must be among them. Files PIL cannot open are skipped and listed in `skipped`.
    scale: the largest S the images are rescaled to (training: Smax; validation: Q); an image
    whose whole rescale to it would pass preprocess.pixel_limit is skipped too, by its header.
    Raises VGGFastError for a missing or empty folder, fewer than two classes (training data), or
    a class without readable images.
    """
    rootp = Path(os.path.expanduser(os.fspath(root)))
    if not rootp.is_dir():
        raise VGGFastError(f"--{what} {rootp}: not a folder (expected ROOT/CLASS_NAME/IMAGE files)")
    folders = sorted(p.name for p in rootp.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[str, str]] = []
    # links are followed (a class folder of links to a photo library), but never into a folder
    # already walked, nor up to ROOT or above it: a link back up (`ln -s .. loop`) made the walk
    # branch at every level and never end, listing every class's images under each class
    top = os.path.realpath(rootp)

    def new_folder(path: str, seen: set[str]) -> bool:
        real = os.path.realpath(path)
        return real not in seen and not (top + os.sep).startswith(real.rstrip(os.sep) + os.sep)
    for name in folders:
        seen: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(rootp / name, followlinks=True):
            seen.add(os.path.realpath(dirpath))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and new_folder(os.path.join(dirpath, d), seen))
            for f in sorted(filenames):
                if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES):
                    files.append((os.path.join(dirpath, f), name))
    if not files:
        raise VGGFastError(
            f"--{what} {rootp}: no images found (expected the ImageFolder layout ROOT/CLASS_NAME/"
            f"IMAGE with extensions {', '.join(IMAGE_SUFFIXES)}; found {len(folders)} class "
            "folders)")
    present = sorted({c for _, c in files})
    if classes is None:
        if len(present) < 2:
            raise VGGFastError(f"--{what} {rootp}: only one class ({present[0]!r}); a classifier "
                               "needs at least two class folders with images")
        classes = present
        bare = [c for c in folders if c not in present]
    else:
        bare = []
        unknown = [c for c in present if c not in classes]
        if unknown:
            raise VGGFastError(f"--{what} {rootp}: class folders {unknown[:5]} are not classes of "
                               f"the training data (a training class folder without images is "
                               f"not a class)")
    index = {c: i for i, c in enumerate(classes)}
    with ThreadPoolExecutor(max_workers=8) as pool:  # header reads are I/O bound
        problems = list(pool.map(lambda p: _header_problem(p, scale), [p for p, _ in files]))
    samples, skipped = [], []
    for (path, c), problem in zip(files, problems):
        if problem is None:
            samples.append((path, index[c]))
        else:
            skipped.append((path, problem))
    readable = {classes[l] for _, l in samples}
    empty = [c for c in present if c not in readable]
    if empty:
        raise VGGFastError(f"--{what} {rootp}: no readable image in class folders {empty[:5]} "
                           f"({len(skipped)} unreadable files, e.g. {skipped[0][0]}: "
                           f"{skipped[0][1]})")
    return FolderScan(str(rootp), list(classes), samples, skipped, bare)


def random_scale(smin: int, smax: int, gen: torch.Generator) -> int:
    """S drawn uniformly from the integers [smin, smax]."""
    return int(torch.randint(smin, smax + 1, (1,), generator=gen))


def random_crop(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """A size x size crop of [C, H, W] at a uniformly drawn position."""
    top, left = crop_origin(*x.shape[-2:], size, gen)
    return x[..., top:top + size, left:left + size]


def crop_origin(h: int, w: int, size: int, gen: torch.Generator) -> tuple[int, int]:
    """(top, left) of random_crop's size x size crop of an h x w image, uniformly drawn."""
    top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    return top, left


def color_shift(x: torch.Tensor, gen: torch.Generator,
                std: float = COLOR_SHIFT_STD) -> torch.Tensor:
    """Krizhevsky's PCA colour shift on RGB [3, H, W] in [0, 1]: x + V (alpha * lambda), one draw
    alpha ~ N(0, std^2 I) per image, the same shift for every pixel."""
    alpha = torch.randn(3, generator=gen) * std
    vec = torch.tensor(PCA_EIGVEC, dtype=torch.float32)
    val = torch.tensor(PCA_EIGVAL, dtype=torch.float32)
    rgb = vec @ (alpha * val)
    return x + rgb.to(x.dtype).view(3, 1, 1)


class TrainTransform:
    """uint8/float [3, H, W] -> normalised float32 [3, size, size]: rescale to S, crop, flip,
    colour shift, normalise (the steps of the module docstring)."""

    def __init__(self, size: int, smin: int, smax: int, flip: bool = True,
                 color: bool = True, preprocess: str = PREPROCESS):
        self.size, self.smin, self.smax = size, smin, smax
        self.flip, self.color, self.preprocess = flip, color, preprocess

    def __call__(self, img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        from .preprocess import normalize, resize_crop
        s = random_scale(self.smin, self.smax, gen)
        # the crop is drawn from the rescale's size and only its pixels are resampled
        # (resize_crop, equal to the crop of the whole rescale): a thin strip's whole rescale at
        # S = 512 took 1.5 GB in the data worker where scan_folder(scale=...) had not skipped it
        top, left = crop_origin(*rescaled_size(*img.shape[-2:], s), self.size, gen)
        x = resize_crop(img, s, top, left, self.size, self.size)
        if self.flip and bool(torch.rand(1, generator=gen) < 0.5):
            x = x.flip(-1)
        if self.color:
            x = color_shift(x, gen)
        return normalize(x.contiguous(), self.preprocess)


class EvalTransform:
    """uint8/float [3, H, W] -> normalised float32 [3, size, size]: rescale to Q, centre crop."""

    def __init__(self, size: int, q: int, preprocess: str = PREPROCESS):
        self.size, self.q, self.preprocess = size, q, preprocess

    def __call__(self, img: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        from .preprocess import center_origin, normalize, resize_crop
        # preprocess.center_crop's crop; only the crop is resampled (see TrainTransform)
        top, left = center_origin(*rescaled_size(*img.shape[-2:], self.q), self.size)
        return normalize(resize_crop(img, self.q, top, left, self.size, self.size),
                         self.preprocess)


class FolderDataset(torch.utils.data.Dataset):
    """Samples of a `FolderScan` through a transform, decoded with `preprocess.load_image`.

    Indexed by (index, epoch): the random choices for one image in one epoch come from a
    generator seeded by (seed, epoch, index), the same whichever worker or process loads it.
    Returns (image, label, failed): a file that fails to decode although its header was readable
    is replaced by the next readable sample and `failed` is its index (else -1), so the training
    loop can report it.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable, seed: int = 0):
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]):
        from .preprocess import load_image
        index, epoch = key
        failed = -1
        n = len(self.samples)
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            try:
                img = load_image(path)
            except (ImageError, OSError):
                if step == 0:
                    failed = index
                continue
            gen = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img, gen), label, failed
        raise VGGFastError(f"no image of {os.path.dirname(os.path.dirname(path))} could be decoded")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as torch's DataLoader counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):   # macOS, Windows
        return max(1, os.cpu_count() or 1)


def batches(loader):
    """Iterate `loader`, re-raising a VGGFastError from a worker process with its own message:
    torch's DataLoader rebuilds it with the worker's whole traceback as the message, which the
    CLI then printed as its "one-line" error (--workers is 4 by default)."""
    try:
        yield from loader
    except VGGFastError as exc:
        text = str(exc)
        if not text.startswith("Caught ") or "DataLoader worker" not in text:
            raise
        lines = text.rstrip("\n").split("\n")
        name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        starts = [i for i, line in enumerate(lines) if line.startswith(name)]
        if not starts:
            raise
        raise type(exc)("\n".join(lines[starts[-1]:])[len(name):]) from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one image in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(n: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                shuffle: bool = True, pad: bool = True) -> list[int]:
    """This process's image indices for one epoch.

    The permutation depends on (seed, epoch) only; it is padded by wrapping to a multiple of
    `world` (when `pad`) and dealt out round-robin, as DistributedSampler does, so the k-th
    local batches of all processes together hold exactly the k-th global batch of a
    single-process run with the same global batch size.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if pad and n % world:
        extra = world - n % world
        order += (order * (extra // n + 1))[:extra]
    return order[rank::world]


# ---------------------------------------------------------------------------------------------
# initialisation

def init_glorot(model: nn.Module) -> None:
    """Glorot & Bengio (2010) uniform weights, zero biases (convs and linear layers); BN 1/0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _module_of(model: VGG, layer) -> nn.Module:
    return model.features[layer.index] if layer.kind == "conv" else model.classifier[layer.index]


def load_init(src: Any):
    """weights.load(src) for the model --init names: a WeightsError (a folder without a model,
    a file that is not a checkpoint) says "--init SRC: why", as the other --init errors do; the
    loader's "PATH: why" did not say which flag gave PATH."""
    from .weights import load
    try:
        return load(src)
    except WeightsError as exc:
        who = os.fsdecode(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>"
        raise WeightsError(f"--init {who}: {exc}") from None


def _net_a(src: Any):
    """load_init(src), checked to be net A with the layers init_from_net_a copies (what the
    network being trained does not decide)."""
    w = load_init(src)
    if w.spec.config not in ("A", "A-LRN"):
        raise ArgumentError(f"--init {w.source}: expected a checkpoint of net A, found "
                            f"configuration {w.spec.config}")
    bad = [n for n in NET_A_LAYERS if n in w.missing or n in w.nonfinite]
    if bad:
        raise ArgumentError(f"--init {w.source}: layers {', '.join(bad)} are missing or not finite")
    return w


@torch.no_grad()
def init_from_net_a(model: VGG, src: Any) -> list[str]:
    """Copy conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8 of a net-A checkpoint into `model`.

    src: anything `weights.load` reads (a file, a `vggfast train` folder, a state dict) holding
    configuration A or A-LRN of the same width, image size and classes. BatchNorm in the source
    is folded into its convs; the target's BatchNorm layers keep their initialisation. Other
    layers keep theirs (Glorot in the paper). Returns the copied layer names.
    """
    w = _net_a(src)
    for name in NET_A_LAYERS:
        mod = _module_of(model, model.spec.layer(name))
        t = w.state_dict[f"{name}.weight"]
        t = t.flatten(1) if isinstance(mod, nn.Linear) else t
        if tuple(t.shape) != tuple(mod.weight.shape):
            raise ArgumentError(
                f"--init {w.source}: layer {name} has shape {list(t.shape)}, this network needs "
                f"{list(mod.weight.shape)} (width, --image-size and the number of classes must "
                "match net A's)")
        if isinstance(mod, nn.Linear) and name == "fc6" and w.spec.grid != model.spec.grid:
            raise ArgumentError(f"--init {w.source}: net A was trained at image size "
                                f"{w.spec.image_size}, this network at {model.spec.image_size}")
        mod.weight.copy_(t)
        mod.bias.copy_(w.state_dict[f"{name}.bias"])
    return list(NET_A_LAYERS)


def read_init(init: str):
    """The net-A `Weights` the --init value `init` names, None for "glorot" and "kaiming": it
    exists, loads, and is net A with the layers to copy. `fit` reads it before the data scan,
    which on a large dataset took minutes before a bad --init was reported; what depends on
    the classes found (fc8's shape) is checked when it is applied."""
    if init in ("glorot", "kaiming"):
        return None
    if not os.path.exists(os.path.expanduser(init)):
        raise ArgumentError(f"--init {init!r}: not 'glorot', 'kaiming' or an existing net-A "
                            "checkpoint (file or `vggfast train` folder)")
    return _net_a(os.path.expanduser(init))


def initialise(model: VGG, init: Any) -> list[str]:
    """Apply `init` ("glorot" | "kaiming" | a net-A checkpoint | the `Weights` read_init gave).
    Returns copied layer names."""
    if init == "glorot":
        init_glorot(model)
        return []
    if init == "kaiming":
        model.reset_parameters()  # torchvision's: Kaiming normal (fan_out) convs, N(0, 0.01) FCs
        return []
    w = read_init(init) if isinstance(init, str) else init
    init_glorot(model)
    return init_from_net_a(model, w)


def make_optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every parameter (biases and BN included)."""
    return torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                           weight_decay=opts.weight_decay)


# ---------------------------------------------------------------------------------------------
# checkpoints

def model_meta(model: VGG, class_names: Sequence[str]) -> dict[str, Any]:
    s = model.spec
    return {"config": s.config, "batch_norm": s.batch_norm, "width": s.width,
            "image_size": s.image_size, "num_classes": s.num_classes,
            "class_names": list(class_names), "preprocess": PREPROCESS}


def export_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision-keyed float32 CPU tensors, without BN's num_batches_tracked counters."""
    return {k: v.detach().to("cpu", torch.float32).contiguous()
            for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def _save_safetensors(state: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they are:
    safetensors reports them as its own SafetensorError, which `atomic_write` would let through
    as a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(state, path, metadata=metadata)
    except SafetensorError as exc:
        io = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(exc))
        if io is None:      # not the disk's doing
            raise
        raise OSError(int(io[2]), io[1]) from None


def _save_torch(obj: Any, path: str) -> None:
    """torch.save through a Python file: given a name, torch writes from C++ and a full disk is a
    RuntimeError ("unexpected pos 704 vs 598"); through a file it is the OSError (ENOSPC)."""
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_model(model: nn.Module, meta: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write OUT/model.safetensors (metadata under "vggfast") and OUT/model.json atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta)
    state = export_state(model)
    atomic_write(out / MODEL_FILE, lambda p: _save_safetensors(state, p, {"vggfast": text}))
    atomic_write(out / META_FILE, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out / MODEL_FILE


def _write_log(out: Path, history: list[dict[str, Any]]) -> None:
    def write(p):
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            w.writeheader()
            for row in history:
                w.writerow({k: row[k] for k in LOG_FIELDS})
    atomic_write(out / LOG_FILE, write)


def _write_skipped(out: Path, skipped: list[tuple[str, str]]) -> None:
    text = "".join(f"{p}\t{why}\n" for p, why in skipped)
    # the names as the system spells them: one that is not UTF-8 (Linux allows any bytes) has
    # lone surrogates in Python, which write_text refused, ending the run
    atomic_write(out / SKIPPED_FILE, lambda p: Path(p).write_bytes(os.fsencode(text)))


def load_checkpoint(out: str | os.PathLike) -> dict[str, Any]:
    path = Path(out) / CKPT_FILE
    if not path.is_file():
        raise VGGFastError(f"--resume: no {CKPT_FILE} in {out} (nothing to resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a foreign or damaged file: say which, do not show a traceback
        raise VGGFastError(f"--resume: {path} is not a readable vggfast checkpoint ({exc})")


# ---------------------------------------------------------------------------------------------
# distribution

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    created: bool = False

    @property
    def on(self) -> bool:
        return self.world > 1


def _resolve_device(name: str | None) -> torch.device:
    """--device checked to exist; a bare "cuda" (or the default on a CUDA machine) is this
    process's GPU, torchrun's LOCAL_RANK, and a named one must be it when ranks share the GPUs."""
    return rank_device(name, same_on_every_rank=False)


def _setup_distributed(device: torch.device) -> _Dist:
    """Join the process group torchrun describes (or one the caller made): nccl on CUDA, gloo on
    CPU. A single process needs none."""
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), False)
    if launch_info("train", "a distributed training")[1] > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return _Dist(dist.get_rank(), dist.get_world_size(), True)
    return _Dist()


def _all_sum(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.on:
        dist.all_reduce(t)
    return t


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(s["cpu"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


# ---------------------------------------------------------------------------------------------
# the loop

@dataclass
class TrainResult:
    """What `fit` did: per-epoch history rows (the CSV's), skipped files, the output folder."""

    out: Path
    meta: dict[str, Any]
    history: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    copied_layers: list[str] = field(default_factory=list)


def _topk_correct(logits: torch.Tensor, y: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, top-k hits) of a batch, as 0-d tensors on the logits' device."""
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hit = top == y[:, None]
    return hit[:, 0].sum(), hit.any(dim=1).sum()


def _report_skipped(items: list[tuple[str, str]], where: str) -> None:
    if not items:
        return
    shown = "; ".join(f"{p} ({why})" for p, why in items[:3])
    more = f"; and {len(items) - 3} more" if len(items) > 3 else ""
    print(f"vggfast: warning: skipped {len(items)} unreadable files {where}: {shown}{more}",
          file=sys.stderr)


def _newly_failed(failed: list[int], seen: set[int], ds, d: _Dist, main: bool,
                  when: str) -> list[tuple[str, str]]:
    """(path, reason) of the images of `ds` that failed to decode in this epoch's pass for the
    first time, gathered from every process (each learns them); reported once, by the main one."""
    if d.on:
        lists = [None] * d.world
        dist.all_gather_object(lists, failed)
        failed = [i for part in lists for i in part]
    new = sorted(set(failed) - seen)
    seen.update(new)
    items = [(ds.samples[i][0], "failed to decode") for i in new]
    if main:
        _report_skipped(items, f"{when} (replaced by other images)")
    return items


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast, d: _Dist,
             failed: list[int] | None = None) -> tuple[float, float, int]:
    """(top-1 error, top-5 error, images) of `model` on `loader`, summed over processes.
    failed: gets the indices of this process's images that failed to decode (replaced)."""
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64, device=device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for x, y, bad in batches(loader):
        if failed is not None:
            failed += [int(i) for i in bad.tolist() if i >= 0]
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        c1, c5 = _topk_correct(logits.float(), y, 5)
        stats += torch.stack([c1, c5, torch.tensor(len(y), device=device)]).double()
    c1, c5, n = _all_sum(stats, d).tolist()
    return 1 - c1 / max(n, 1), 1 - c5 / max(n, 1), int(n)


def fit(opts: TrainOptions) -> TrainResult:
    """Train per `opts` (see the module docstring); returns the history. Raises VGGFastError for
    bad options or data. Under torchrun every process calls this; process 0 writes the files."""
    _check_options(opts)
    device = _resolve_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed crop size: one algorithm search
    d = _setup_distributed(device)
    ok = False
    try:
        with peers_reported() if d.on else contextlib.nullcontext():
            result = _fit(opts, device, d)
        ok = True
        return result
    finally:
        if d.created:   # a group the caller made is the caller's to leave
            leave_process_group(ok)


def _fit(opts: TrainOptions, device: torch.device, d: _Dist) -> TrainResult:
    if opts.batch_size % d.world:
        raise ArgumentError(f"batch size {opts.batch_size} does not split evenly over "
                            f"{d.world} processes")
    local_bs = opts.batch_size // d.world
    main = d.rank == 0
    say = (lambda *a: print(*a, flush=True)) if main and not opts.quiet else (lambda *a: None)
    out = Path(os.path.expanduser(opts.out))
    if not opts.resume and (out / CKPT_FILE).exists():
        raise VGGFastError(f"--out {out} already holds a training run; pass --resume to continue "
                           "it or choose another folder")
    if not opts.resume and (out / MODEL_FILE).exists():
        # a model without a checkpoint (a --task localize run, a downloaded model folder) was
        # overwritten after the first epoch without a word
        raise VGGFastError(f"--out {out} already holds a model ({MODEL_FILE}) that is not a run "
                           "to resume; choose another folder")

    # before the scan, which takes minutes on a large dataset; not kept past initialise
    net_a = None if opts.resume else read_init(opts.init)
    # an image whose rescale at the largest training scale (validation: at Q) would pass the
    # pixel limit is skipped, as an unreadable one is
    smin, smax = scale_range(opts)
    train_scan = scan_folder(opts.data, what="data", scale=smax)
    val_scan = (scan_folder(opts.val, train_scan.classes, what="val", scale=eval_scale(opts))
                if opts.val else None)
    skipped = list(train_scan.skipped) + (list(val_scan.skipped) if val_scan else [])
    if main:
        _report_skipped(train_scan.skipped, f"in {train_scan.root}")
        if train_scan.empty:  # left out silently, the model had fewer classes than folders
            more = f" and {len(train_scan.empty) - 5} more" if len(train_scan.empty) > 5 else ""
            print(f"vggfast: warning: class folders {train_scan.empty[:5]}{more} in "
                  f"{train_scan.root} hold no images; they are not classes of this model",
                  file=sys.stderr)
        if val_scan:
            _report_skipped(val_scan.skipped, f"in {val_scan.root}")
    classes = train_scan.classes

    torch.manual_seed(opts.seed)  # the same initial weights in every process
    model = build_model(opts.config, num_classes=len(classes), width=opts.width,
                        image_size=opts.image_size, batch_norm=opts.batch_norm,
                        dropout=opts.dropout)
    # resume: weights from the file
    copied = [] if opts.resume else initialise(model, opts.init if net_a is None else net_a)
    net_a = None
    meta = model_meta(model, classes)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    optimizer = make_optimizer(model, opts)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=0.1, patience=opts.patience)
    torch.manual_seed(opts.seed + 1 + d.rank)  # dropout masks differ between processes

    start, history, in_effect = 0, [], {}
    if opts.resume:
        ck = load_checkpoint(out)
        old = ck.get("meta", {})
        for key in ("config", "batch_norm", "width", "image_size", "class_names"):
            if old.get(key) != meta[key]:
                raise VGGFastError(f"--resume: the checkpoint in {out} has {key}={old.get(key)!r}, "
                                   f"these options give {meta[key]!r}")
        try:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            start, history = int(ck["epoch"]), [dict(r) for r in ck.get("history", [])]
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise VGGFastError(f"--resume: {out / CKPT_FILE} does not fit these options "
                               f"({str(exc).splitlines()[0][:200]})")
        rng = ck.get("rng", [])
        if len(rng) == d.world:
            _set_rng_state(rng[d.rank], device)
        elif main:
            print(f"vggfast: warning: the checkpoint was written by {len(rng)} processes, this run "
                  f"has {d.world}; dropout masks will not continue the old sequence exactly",
                  file=sys.stderr)
        # the optimizer's and scheduler's states bring back their own settings, so a new
        # --lr (say, to continue a diverged run more slowly) was dropped without a word
        was = ck.get("options", {})
        in_effect = {k: was[k] for k in RESTORED_OPTIONS if k in was}  # saved as they are
        kept = [f"--{k.replace('_', '-')} {getattr(opts, k)!r} (the run's: {v!r})"
                for k, v in in_effect.items() if v != getattr(opts, k)]
        if kept and main:
            print(f"vggfast: warning: --resume continues the checkpoint's optimizer and lr "
                  f"schedule; ignored: {', '.join(kept)}", file=sys.stderr)
        say(f"resuming {out} after epoch {start}")
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VGGFastError(f"cannot create --out {out}: {exc.strerror or exc}")
        _write_skipped(out, skipped)

    net: nn.Module = model
    if d.on:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)

    use_bf16 = device.type == "cuda" and opts.bf16
    def autocast():
        return (torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16
                else contextlib.nullcontext())

    train_ds = FolderDataset(train_scan.samples,
                             TrainTransform(opts.image_size, smin, smax, opts.flip,
                                            opts.color_shift), opts.seed)
    val_ds = (FolderDataset(val_scan.samples, EvalTransform(opts.image_size, eval_scale(opts)))
              if val_scan else None)
    # no more workers than CPUs: more decode no faster, and torch warns of each loader's
    # "excessive worker creation" (twice an epoch with --val) on the 2-core machines the
    # README's own example runs on; the samples do not depend on the number of workers
    loader_kw = dict(num_workers=min(opts.workers, usable_cpus()),
                     pin_memory=device.type == "cuda", persistent_workers=False)
    if start >= opts.epochs:
        say(f"{out}: already trained for {start} epochs (--epochs {opts.epochs}); nothing to do")
    seen_failed: set[int] = set()
    seen_vfailed: set[int] = set()
    n_train = len(train_ds)

    for epoch in range(start, opts.epochs):
        net.train()
        order = epoch_order(n_train, epoch, opts.seed, d.rank, d.world)
        loader = DataLoader(train_ds, batch_size=local_bs, sampler=[(i, epoch) for i in order],
                            drop_last=False,
                            generator=torch.Generator().manual_seed(opts.seed + epoch),
                            **loader_kw)
        lr = optimizer.param_groups[0]["lr"]
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss * n, n, top-1 hits
        failed: list[int] = []
        bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{opts.epochs}", unit="batch",
                   disable=not main or opts.quiet, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        for step, (x, y, bad) in enumerate(batches(loader)):
            x = x.to(device, non_blocking=True, memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with autocast():
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            c1, _ = _topk_correct(logits.detach().float(), y, 1)
            stats += torch.stack([loss.detach().double() * len(y),
                                  torch.tensor(len(y), dtype=torch.float64, device=device),
                                  c1.double()])
            failed += [int(i) for i in bad.tolist() if i >= 0]
            bar.update(1)
            if step % 10 == 0 or step == len(loader) - 1:
                seen = stats[1].item() * d.world
                bar.set_postfix(loss=f"{stats[0].item() / max(stats[1].item(), 1):.4f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        loss_sum, n_seen, top1 = _all_sum(stats, d).tolist()
        if not (math.isfinite(loss_sum) and bool(torch.stack(
                [torch.isfinite(p).all() for p in model.parameters()]).all())):
            # a diverged run (lr too high) went on to write NaN weights over the last good
            # epoch's files and exit 0; stop before saving (the sum and, after DDP's gradient
            # all-reduce, the weights are the same in every process, so all of them stop here)
            # and leave the previous epoch's checkpoint
            kept = f"{out} keeps epoch {epoch}" if epoch else "no epoch was saved"
            raise VGGFastError(f"training diverged: the loss of epoch {epoch + 1} is "
                               f"{loss_sum / max(n_seen, 1)} at lr {lr:g}; try a lower --lr "
                               f"({kept})")
        new = _newly_failed(failed, seen_failed, train_ds, d, main, "while training")
        skipped += new

        if val_ds is not None:
            vorder = epoch_order(len(val_ds), 0, opts.seed, d.rank, d.world, shuffle=False,
                                 pad=False)
            vloader = DataLoader(val_ds, batch_size=local_bs, sampler=[(i, 0) for i in vorder],
                                 generator=torch.Generator().manual_seed(opts.seed), **loader_kw)
            vfailed: list[int] = []
            top1_err, top5_err, _ = evaluate(model, vloader, device, autocast, d, vfailed)
            err_on = "val"
            # a val image that failed to decode was scored as the next one without a word
            vnew = _newly_failed(vfailed, seen_vfailed, val_ds, d, main, "while validating")
            skipped += vnew
            new = new or vnew
        else:
            top1_err, top5_err, err_on = 1 - top1 / max(n_seen, 1), float("nan"), "train"
        scheduler.step(1 - top1_err)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(n_seen, 1), "top1_err": top1_err,
               "top5_err": top5_err, "err_on": err_on, "lr": lr,
               "img_per_s": n_seen / max(seconds, 1e-9), "seconds": seconds}
        history.append(row)
        top5 = f"  top-5 err {top5_err:.4f}" if err_on == "val" else ""
        say(f"epoch {epoch + 1}/{opts.epochs}  loss {row['loss']:.4f}  {err_on} top-1 err "
            f"{top1_err:.4f}{top5}  lr {lr:g}  {row['img_per_s']:.0f} img/s")

        rng = [_rng_state(device)]
        if d.on:
            rng = [None] * d.world
            dist.all_gather_object(rng, {k: v.cpu() for k, v in _rng_state(device).items()})
        if main:
            ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "rng": rng,
                    "meta": meta, "history": history,
                    "options": {**{k: (list(v) if isinstance(v, tuple) else v)
                                   for k, v in asdict(opts).items()}, **in_effect}}
            save_model(model, meta, out)
            atomic_write(out / CKPT_FILE, lambda p: _save_torch(ckpt, p))
            _write_log(out, history)
            if new:
                _write_skipped(out, skipped)
        if d.on:
            dist.barrier()

    if main and start >= opts.epochs and not (out / MODEL_FILE).exists():
        save_model(model, meta, out)
    if main:
        say(f"model: {out / MODEL_FILE}  (load with vggfast.Engine({str(out)!r}))")
    return TrainResult(out, meta, history, skipped, copied)


# ---------------------------------------------------------------------------------------------
# command line

def add_cli(subparsers) -> None:
    """Register `vggfast train`."""
    p = subparsers.add_parser(
        "train", help="train a VGG on an image folder (the paper's recipe; torchrun for multi-GPU)",
        description="Train configuration A-E of Table 1 on ROOT/CLASS_NAME/IMAGE folders with "
                    "the paper's recipe (Sec. 3.1). Multi-GPU / multi-node: "
                    "torchrun --nproc-per-node N -m vggfast train ...")
    d = TrainOptions(data="")
    p.add_argument("--config", default=d.config, help="A A-LRN B C D E or vgg11..vgg19_bn "
                                                      "(default A)")
    p.add_argument("--batch-norm", action="store_true", default=None,
                   help="BatchNorm after every conv (also implied by a *_bn config)")
    p.add_argument("--width", type=float, default=d.width, help="channel multiplier (default 1)")
    p.add_argument("--data", required=True, help="training images, ROOT/CLASS_NAME/IMAGE; the "
                                                 "class names are the folder names")
    p.add_argument("--val", default=None, help="validation images, same layout (default: none; "
                                               "the lr schedule then watches training accuracy)")
    p.add_argument("--image-size", type=int, default=d.image_size,
                   help="training crop size, a multiple of 32 (default 224)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--scale", type=int, default=None, metavar="S",
                   help="fixed training scale: smallest side rescaled to S")
    g.add_argument("--scale-jitter", type=int, nargs=2, default=None, metavar=("SMIN", "SMAX"),
                   help="S drawn per image from [SMIN, SMAX] (default 256/224 and 512/224 of "
                        "--image-size: 256 512 for 224)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--no-color-shift", action="store_true", help="no PCA colour shift")
    p.add_argument("--init", "--init-from", dest="init", default=d.init,
                   metavar="glorot|kaiming|NET_A_CKPT",
                   help="glorot (default, the paper's), kaiming (torchvision's), or a net-A "
                        "checkpoint: its conv1_1, conv2_1, conv3_1, conv3_2, fc6-fc8 are copied")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {d.epochs} (10 with --task localize)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch, split over processes (default 256)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 0.01; 1e-3 with --task localize)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="default 0.9")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default 5e-4")
    p.add_argument("--dropout", type=float, default=d.dropout, help="on fc6, fc7 (default 0.5)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="epochs without improvement before the lr is divided by 10 (default 2)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="data-loading processes per training process (default 4, at most the "
                        "CPUs it may use)")
    p.add_argument("--seed", type=int, default=d.seed, help="default 0")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--out", default=None,
                   help=f"output folder (default {d.out}; vggfast-loc with --task localize)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where its last epoch ended")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    from .localize import add_train_arguments  # --task localize (Appendix A): vggfast/localize.py
    add_train_arguments(p)
    p.set_defaults(func=run_cli)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    return TrainOptions(
        **run_fields(args, TrainOptions(data="")), data=args.data, config=args.config,
        batch_norm=args.batch_norm, width=args.width, image_size=args.image_size,
        init=args.init, bf16=not args.fp32, resume=args.resume)


def run_cli(args: argparse.Namespace) -> int:
    """`vggfast train`: returns the exit code; user errors raise VGGFastError."""
    if getattr(args, "task", "classify") == "localize":
        from .localize import run_train
        return run_train(args)
    if dist_info()[1] > 1:  # one argv for every rank: `--device cuda:1` is GPU 1 for them all
        rank_device(args.device, same_on_every_rank=True)
    fit(options_from_args(args))
    return 0

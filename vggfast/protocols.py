"""The paper's evaluation protocols (Sec. 3.2, 4.2-4.4): multi-crop, dense + multi-crop, model
fusion, and the `evaluate` and `heatmap` commands.

Multi-crop (Sec. 3.2, Table 4): per scale Q, the image is rescaled so its smallest side is Q and a
regular n x n grid (n = 5) of c x c crops (c = the network's native size, 224 for the paper's
nets) is cut from it. Crop origins along a side of length S are x_i = (i * (S - c)) // (n - 1),
i = 0..n-1 (0 and S - c included; the centre crop when n = 1). Each crop is also mirrored
(cut from the unflipped image, then flipped): 50 views per scale, 150 over three scales. A crop
is c x c, so the dense net gives a 1 x 1 score map: the crop's class scores. View order (the C++
planner's): per scale, crops row by row (y outer, x inner), each followed by its mirror.

The paper does not say where the grid sits nor whether crops are averaged before or after the
softmax. vggfast's rule, shared with the planner, is the grid above; the averaging is chosen by
`average`:

- "probs" (default, as the paper's "averaging the soft-max class posteriors"): softmax of each
  view's scores (a dense view's scores are first averaged spatially), then the mean over views
  and scales.
- "scores": the mean of the raw class scores over views and scales, then one softmax.

"dense+multicrop" (Table 5's best single-model setting) averages the two methods' posteriors;
multi-model fusion (`Ensemble`, Table 6) averages the models' posteriors.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from . import preprocess as pp
from .engine import imagenet_synsets
from .errors import PARTIAL, ArgumentError, ImageError, VGGFastError, raising_out_of_memory

# A class index written as text: ASCII digits only (str.isdigit() also takes "²", which int()
# refuses).
_INTEGER = re.compile(r"-?[0-9]+")

if TYPE_CHECKING:
    from .engine import Engine, Result

AVERAGES = ("probs", "scores")


def check_average(average: Any) -> str:
    if average not in AVERAGES:
        raise ArgumentError(f"unknown average {average!r}; use 'probs' (softmax per view, then "
                            "mean) or 'scores' (mean of raw scores, then softmax)")
    return average


def _mean(ts: Iterable[torch.Tensor]) -> torch.Tensor:
    """The mean of equal-shape tensors (one stacked reduction)."""
    return torch.stack(list(ts)).mean(0)


def _fuse(scores: dict[int, torch.Tensor],
          average: str) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Per-scale view scores -> (posterior over everything, {scale: posterior of that scale})."""
    if average == "probs":
        per_scale = {q: F.softmax(s, dim=1).mean(0) for q, s in scores.items()}
        # every scale has the same number of views, so the mean of means is the mean over views
        return _mean(per_scale.values()), per_scale
    per_scale = {q: F.softmax(s.mean(0), dim=0) for q, s in scores.items()}
    return F.softmax(torch.cat(list(scores.values())).mean(0), dim=0), per_scale


def result_from_views(engine: "Engine", plan, image: int, scores: Sequence[torch.Tensor],
                      method: str, average: str, top_k: int) -> "Result":
    """One image's Result from the per-view class scores of an executed plan.

    scores[v]: the spatially averaged class scores [classes] of plan view v.
    Result.per_scale: {Q: posterior at Q} (for "dense+multicrop" the mean of both methods').
    Result.per_method: {method: Result} for each method used, each with its own per_scale.
    """
    from .engine import Result, check_finite
    views = [plan.views[v] for v in plan.image_views(image)]
    check_finite(torch.stack([scores[v.index] for v in views]), engine, "class scores")
    methods = ("dense", "multicrop") if method == "dense+multicrop" else (method,)
    per_method = {}
    for m in methods:
        kind = "dense" if m == "dense" else "crop"
        by_scale = {q: torch.stack([scores[v.index] for v in views
                                    if v.kind == kind and v.scale == q]) for q in plan.scales}
        probs, per_scale = _fuse(by_scale, average)
        per_method[m] = Result(probs, engine.class_names, per_scale, top_k)
    if len(methods) == 1:
        r = per_method[method]
        return Result(r.probs, engine.class_names, r.per_scale, top_k, per_method=per_method)
    return fuse_methods(engine, per_method, plan.scales, top_k)


def _fused_result(rs: Sequence["Result"], combine: Callable[[list[torch.Tensor]], torch.Tensor],
                  class_names: Sequence[str], scales: Iterable[int], top_k: int,
                  **parts: Any) -> "Result":
    """One image's Result from several of it (methods, models): combine() of their posteriors
    [classes], overall and at each of `scales`; `parts` are the Result's per_method or
    per_model."""
    from .engine import Result
    probs = combine([r.probs for r in rs])
    per_scale = {q: combine([r.per_scale[q] for r in rs]) for q in scales}
    return Result(probs, class_names, per_scale, top_k, **parts)


def fuse_methods(engine: "Engine", per_method: dict[str, "Result"], scales: Sequence[int],
                 top_k: int) -> "Result":
    """"dense+multicrop": the mean of the methods' posteriors [classes], overall and per scale,
    with `per_method` as Result.per_method."""
    return _fused_result(list(per_method.values()), _mean, engine.class_names, scales, top_k,
                         per_method=per_method)


# -- model fusion ---------------------------------------------------------------------------------

def _model(k: int, engine: "Engine") -> str:
    """Engine k of a list, as an error names it."""
    return f"engine {k} ({engine.spec.config}, {engine.weights.source})"


def _check_same_classes(engines: Sequence["Engine"]) -> None:
    """Refuse engines whose classes differ: their posteriors cannot be averaged. Names are
    compared where the weights have them; an engine without names is checked on the count."""
    n = engines[0].spec.num_classes
    for k, e in enumerate(engines):
        if e.spec.num_classes != n:
            raise ArgumentError(f"{_model(0, engines[0])} has {n} classes and {_model(k, e)} "
                                f"{e.spec.num_classes}; fusion needs the same classes in the "
                                "same order")
    named = [(k, e) for k, e in enumerate(engines) if e.weights.class_names]
    if not named:
        return
    j, first = named[0]
    for k, e in named[1:]:
        a, b = first.weights.class_names, e.weights.class_names
        c = next((c for c in range(n) if a[c] != b[c]), None)
        if c is not None:
            raise ArgumentError(f"{_model(j, first)} and {_model(k, e)} have different class "
                                f"names (class {c} is {a[c]!r} in one, {b[c]!r} in the other); "
                                "fusion needs the same classes in the same order")


class Ensemble:
    """Multi-model fusion (Table 6): the weighted mean of several engines' posteriors.

    engines: Engines with the same classes (any configurations, e.g. D and E): the same number,
    and the same names in the same order where their weights name them.
    weights: one non-negative number per engine (normalised to sum 1); None = equal weights.
    classify(img, scales, flip, method, top_k, average) takes Engine.classify's arguments; each
    image is decoded once, rescaled once per scale for the engines on one device, and every
    engine applies its own preprocessing (a list is classified by each engine a chunk of
    CHUNK_IMAGES images at a time, batched by its planner).
    Result.per_model lists each engine's Result.
    """

    def __init__(self, engines: Sequence["Engine"], weights: Sequence[float] | None = None):
        from .engine import Engine
        engines = list(engines) if isinstance(engines, (list, tuple)) else None
        if not engines or not all(isinstance(e, Engine) for e in engines):
            raise ArgumentError("Ensemble needs a non-empty list of vggfast.Engine objects")
        _check_same_classes(engines)
        if weights is None:
            weights = [1.0] * len(engines)
        try:
            weights = list(weights)
        except TypeError:
            raise ArgumentError(f"weights must be a list of {len(engines)} numbers, "
                                f"not {weights!r}")
        if len(weights) != len(engines) or any(
                isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w)
                or w < 0 for w in weights) or sum(weights) <= 0:
            raise ArgumentError(f"weights must be {len(engines)} non-negative numbers, not all "
                                f"zero; got {weights!r}")
        top = float(max(weights))  # normalise by the largest first: 1e308 + 1e308 is inf
        weights = [float(w) / top for w in weights]
        total = math.fsum(weights)
        self.engines = engines
        self.weights = [w / total for w in weights]
        # a model without names in its weights takes them from one that has them
        self.class_names = next((e.class_names for e in engines if e.weights.class_names),
                                engines[0].class_names)

    def __repr__(self) -> str:
        parts = ", ".join(f"{e.spec.config}:{w:.3g}" for e, w in zip(self.engines, self.weights))
        return f"Ensemble({parts})"

    @raising_out_of_memory
    def classify(self, img: Any, scales: Any = (256, 384, 512), flip: bool = True,
                 method: str = "dense", top_k: int = 5,
                 average: str = "probs") -> "Result | list[Result]":
        """Fused classification of one image (-> Result) or a list (-> list of Result).

        A list goes CHUNK_IMAGES images at a time: the chunk's images are decoded once, and each
        engine classifies the decoded chunk as one request (its planner batches equal-size views
        across the images; the engines on one device share the rescaled images, see
        `_shared_rescales`), then each image's Results are fused. An image that cannot be read
        is an ImageError naming its index in the list, as Engine.classify's. A list of several
        chunks is checked by every engine's planner first (Engine._check_chunks, as
        Engine.classify checks its own), so an image too small, over an engine's memory budget
        or unreadable late in the list is refused before any chunk runs.
        """
        from .engine import _check_top_k, check_flag, check_method, decoded_chunks, naming_images
        top_k = _check_top_k(top_k)
        method = check_method(method)
        flip = check_flag("flip", flip)
        check_average(average)
        # once, before the engines (and a list's images) share them: an iterator of scales
        # would be used up by the first; each engine checks them against its own native size
        for e in self.engines:
            e._require("fc8")     # classify's first check: the chunks call past it
            scales = e.check_scales(scales, method=method)
        many = isinstance(img, (list, tuple))
        items = list(img) if many else [img]
        # each engine sees a chunk at a time, too few images for its own check of the list:
        # every engine plans each chunk here, from one read of its images' sizes
        self.engines[0]._check_chunks(items, lambda sizes: [
            e._executor.plan_sizes(sizes, scales, flip, method) for e in self.engines])
        fused = []
        for start, images in decoded_chunks(items):
            shared = self._shared_rescales()
            # a refusal about "image K" of the chunk names the list's image, and its file
            with naming_images(items, start):
                per_model = [e._classify_decoded(images, scales, flip, method, top_k, average,
                                                 shared[k]) for k, e in enumerate(self.engines)]
            del shared      # the chunk's rescales go before the next chunk is decoded
            fused += [self._fuse([rs[i] for rs in per_model], top_k) for i in range(len(images))]
        return fused if many else fused[0]

    def _shared_rescales(self) -> list:
        """One executor.SharedRescales per engine for a chunk (None: nothing to share), the
        same one for the engines on the same device: each of them rescales the chunk's images
        to the same scales (resize_scales of the decoded image, on the engine's device: CUDA's
        kernel rounds otherwise than the CPU's) and normalises the rescaled image by its own
        preprocessing afterwards, so a rescale is any of them's bit for bit, whatever their
        configurations, native sizes or conventions. Bounded by an eighth of the smallest of
        their memory budgets, as evaluate's (on CUDA they sit beside the activations). An
        engine alone on its device shares nothing (its rescales would be held past their last
        batch)."""
        from .executor import SharedRescales
        on: dict[torch.device, list[int]] = {}
        for k, e in enumerate(self.engines):
            on.setdefault(e.device, []).append(k)
        shared: list = [None] * len(self.engines)
        for ks in on.values():
            if len(ks) > 1:
                s = SharedRescales(min(self.engines[k].memory_budget for k in ks) // 8)
                for k in ks:
                    shared[k] = s
        return shared

    def _fuse(self, rs: Sequence["Result"], top_k: int) -> "Result":
        """One image's Result from each engine's: the weighted mean of their posteriors."""
        return _fused_result(rs, lambda ts: sum(w * t for w, t in zip(self.weights, ts)),
                             self.class_names, rs[0].per_scale, top_k, per_model=list(rs))


# -- evaluate: top-1 / top-5 error on a labelled folder -------------------------------------------

def _dangling(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive), sorted by path. A broken symlink named as an image
    (photo.jpg -> a moved file) is listed too: it is then a file that cannot be read, named on
    stderr as a corrupt image is, where it was left out without a word."""
    return sorted(p for p in folder.rglob("*") if (p.is_file() or _dangling(p))
                  and p.suffix.lower() in pp.IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def no_images_note(folder: Path) -> str:
    """Why list_images(folder) found nothing, where files are there: their suffixes (a folder of
    iPhone photos is all .HEIC, which needs a plugin), so "no image files" does not read as an
    empty folder; "" for a folder without visible files (a link to a file that is gone counts:
    a folder of links to photos moved off is not an empty one)."""
    suffixes = sorted({p.suffix.lower() or "(none)" for p in folder.rglob("*")
                       if (p.is_file() or _dangling(p))
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts)})
    if not suffixes:
        return ""
    heif = ("; HEIC/HEIF photos need the pillow-heif plugin: convert them to JPEG"
            if {".heic", ".heif"} & set(suffixes) else "")
    return (f" (its files end in {', '.join(suffixes[:6])}{', ...' if len(suffixes) > 6 else ''};"
            f" image files end in {', '.join(pp.IMAGE_SUFFIXES[:5])}, ...{heif})")


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Folder name -> class index from a file.

    JSON: {"n01440764": 0, ...} or ["n01440764", ...] (index = position). Text: one class per
    line, the first token the folder name and the second, if an integer, its index; otherwise the
    line number (0-based) is the index, so ImageNet's LOC_synset_mapping.txt works as it is.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ArgumentError(f"cannot read class map {p}: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        raise ArgumentError(f"class map {p} is not UTF-8 text ({exc.reason})")
    if p.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArgumentError(f"class map {p} is not valid JSON ({exc.msg}, line {exc.lineno})")
        if isinstance(data, list):
            data = {str(k): i for i, k in enumerate(data)}
        if not isinstance(data, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            raise ArgumentError(f"class map {p} must map folder names to integer class indices")
        return {str(k): int(v) for k, v in data.items()}
    out = {}
    for n, line in enumerate(l for l in text.splitlines() if l.strip()):
        tok = line.split()
        out[tok[0]] = int(tok[1]) if len(tok) > 1 and _INTEGER.fullmatch(tok[1]) else n
    return out


def labelled_images(root: str | os.PathLike, class_names: Sequence[str],
                    class_map: dict[str, int] | None = None,
                    note: Callable[[str], None] | None = None) -> list[tuple[Path, int]]:
    """(image, class index) pairs of an ImageFolder-style tree (one sub-folder per class).

    Folder -> index: `class_map` when given; else folder names equal to the engine's class
    names; else integer folder names are indices; else ImageNet WordNet IDs (n01440764, ...) for a
    model with the ImageNet classes, any subset of them; else, when there is one folder per
    class, their sorted order (torchvision's ImageFolder rule; said through `note`). Anything
    else asks for a class map. Hidden folders and files (a leading ".") are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise ArgumentError(f"{root} is not a folder (expected one sub-folder per class)")
    # hidden folders (.ipynb_checkpoints, .git) are not classes, as in training
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise ArgumentError(f"{root} has no class sub-folders (expected root/CLASS/IMAGE)")
    n = len(class_names)
    if class_map is not None:
        unknown = [f for f in folders if f not in class_map]
        if unknown:
            raise ArgumentError(f"the class map has no entry for folder(s) "
                                f"{', '.join(unknown[:5])}")
        index = {f: class_map[f] for f in folders}
    elif all(f in class_names for f in folders):
        # before the integer rule: `vggfast train` names classes by its folders sorted as text,
        # so a model trained on folders 0..10 has class 2 named "10"
        index = {f: list(class_names).index(f) for f in folders}
    elif all(f.isascii() and f.isdigit() for f in folders):
        index = {f: int(f) for f in folders}
    elif (synsets := imagenet_synsets(class_names)) and all(f in synsets for f in folders):
        index = {f: synsets[f] for f in folders}     # ImageNet's n01440764/... (any subset)
    elif len(folders) == n:
        index = {f: i for i, f in enumerate(folders)}
        if note is not None:
            note(f"the {n} folders are taken as classes 0..{n - 1} in sorted order "
                 f"({folders[0]} = 0, ...; torchvision's ImageFolder rule); pass --class-map if "
                 "the model was trained otherwise")
    else:
        raise ArgumentError(f"cannot tell which class each of the {len(folders)} folders is (the "
                            f"model has {n} classes); pass --class-map FILE (JSON or one folder "
                            "name per line in class-index order)")
    bad = {f: i for f, i in index.items() if not 0 <= i < n}
    if bad:
        f, i = next(iter(bad.items()))
        raise ArgumentError(f"folder {f} maps to class {i}, outside the model's 0..{n - 1}")
    pairs = [(p, index[f]) for f in folders for p in list_images(root / f)]
    if not pairs:
        raise ArgumentError(f"no images found under {root} (suffixes "
                            f"{', '.join(pp.IMAGE_SUFFIXES)})")
    return pairs


def check_pairs(pairs: Any, num_classes: int) -> list[tuple[Any, int]]:
    """(image, class index) pairs as a list, each label an integer 0..num_classes-1 (a label
    that is no class index would only count as a wrong answer)."""
    if isinstance(pairs, (str, bytes, dict)) or not isinstance(pairs, Iterable):
        raise ArgumentError(f"pairs must be a list of (image, class index) pairs, not "
                            f"{type(pairs).__name__}")
    out = []
    for k, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            what = f"{len(pair)} items" if isinstance(pair, (list, tuple)) else type(pair).__name__
            raise ArgumentError(f"pairs[{k}] must be an (image, class index) pair, not {what}")
        img, label = pair
        if isinstance(label, bool) or not isinstance(label, numbers.Integral) \
                or not 0 <= label < num_classes:
            name = f" ({img})" if isinstance(img, (str, os.PathLike)) else ""
            bad = repr(label) if isinstance(label, (str, numbers.Number)) else type(label).__name__
            raise ArgumentError(f"the label of pairs[{k}]{name} must be a class index "
                                f"0..{num_classes - 1}, not {bad}")
        out.append((img, int(label)))
    if not out:
        raise ArgumentError("pairs is empty; give at least one (image, class index) pair")
    return out


def none_evaluated(n: int, images: str, failed: Sequence[dict[str, str]],
                   over: Sequence[dict[str, str]]) -> VGGFastError:
    """The error of an evaluation that scored none of its `n` `images`: how many were unreadable
    and how many over the memory budget, with the first reason of each (one line). failed: the
    {"file", "error"} of every image skipped; over: those of them skipped for the budget. The
    reasons are in the message because nothing was printed before it: the failed list would have
    gone out with the result."""
    budget = {id(f) for f in over}
    kinds = [([f for f in failed if id(f) not in budget], "unreadable"),
             (over, "over the memory budget")]
    counts = ", ".join(f"{len(fs)} {kind}" for fs, kind in kinds if fs)
    firsts = "".join(f"; the first {kind}: {fs[0]['error']}" for fs, kind in kinds if fs)
    return VGGFastError(f"none of the {n} {images} could be evaluated"
                        + (f": {counts}{firsts}" if failed else ""))


def _check_methods(method: Any) -> list[str]:
    """`evaluate`'s method: one method, or a list or tuple of them, each given once."""
    from .engine import check_method
    if not isinstance(method, (list, tuple)):
        return [check_method(method)]
    methods = [check_method(m) for m in method]
    if not methods:
        raise ArgumentError("method is an empty list; give at least one, e.g. ['dense']")
    twice = next((m for i, m in enumerate(methods) if m in methods[:i]), None)
    if twice is not None:   # as a repeated scale is refused: it would be a second, equal row
        raise ArgumentError(f"method {twice!r} is given twice; list each method once")
    return methods


def _forwards(engine: "Engine", images: list, scales: tuple[int, ...], flip: bool,
              method: str) -> Counter:
    """The forwards engine.classify(images, method=method) runs: its plan's waves
    (Executor.waves), each as the views (image, scale, crop, flip) of its batches, slot by
    slot."""
    ex = engine._executor
    plan = ex.plan(images, scales, flip, method)
    return Counter(tuple(tuple((v.image, v.scale, v.crop, v.flip)
                               for v in (plan.views[i] for i in b.views)) for b in wave)
                   for wave in ex.waves(plan, "fc8"))


def _batched_alike(engine: "Engine", images: list, scales: tuple[int, ...], flip: bool) -> bool:
    """Whether classifying `images` by "dense+multicrop" runs exactly the forwards of "dense" and
    of "multicrop": the same waves of the same batches, each view in the same slot. The backend
    computes a wave from its inputs alone (the same inputs, the same numbers), so its view scores
    are then theirs bit for bit, and its Results `fuse_methods` of theirs. Not so where a dense
    view has the crop size (it joins the crops' batches, which are then of other sizes) nor
    where the backend groups batches into waves up to the memory budget (triton): a grouped
    launch takes its kernel from the whole wave (the autotune key's M_CLASS, i.e. the tile and
    BLOCK_K, and SPLIT_K, from the wave's rows) and a wave of one batch takes the ungrouped
    kernel, so a view in another wave is another sum, which may round otherwise. On triton the
    crops (one bucket) run in waves of their own as multicrop's and beside the dense views as
    dense+multicrop's: alike only where the budget leaves every wave one batch. False too where
    a plan is refused (over the budget)."""
    try:
        return _forwards(engine, images, scales, flip, "dense+multicrop") == \
            _forwards(engine, images, scales, flip, "dense") + \
            _forwards(engine, images, scales, flip, "multicrop")
    except VGGFastError:
        return False


def _classify_chunk(engine: "Engine", images: list, scales: tuple[int, ...], flip: bool,
                    methods: Sequence[str], average: str) -> dict[str, tuple[list, list, list]]:
    """{method: (results, kept, over)} for one chunk of decoded images, each method's as
    `skipping_oversized` runs engine.classify(images, method=method): the Results (top 5) of the
    images at positions `kept`, in order, and (position, why) of each image over the memory
    budget. "dense+multicrop" asked for with "dense" and "multicrop" is `fuse_methods` of their
    Results where both ran the whole chunk and `_batched_alike` holds (equal to its own run bit
    for bit, with none of its forwards run again), else run on its own.

    The methods' runs share the chunk's rescaled images (`executor.SharedRescales`, up to an
    eighth of the memory budget): an image is rescaled once per scale, not once per method."""
    from .engine import skipping_oversized
    from .executor import SharedRescales
    # a lone method runs once: nothing to keep its rescales for (they would only be held
    # past their last batch)
    shared = SharedRescales(engine.memory_budget // 8) if len(methods) > 1 else None

    def run(m: str) -> tuple[list, list, list]:
        outs, kept, over = skipping_oversized(
            lambda ims: engine._classify_decoded(ims, scales, flip, m, 5, average, shared),
            images)
        return [r for out in outs for r in out], kept, over

    both = "dense+multicrop"
    done = {m: run(m) for m in methods if m != both}
    if both in methods:
        d, c = done.get("dense"), done.get("multicrop")
        if d is not None and c is not None and images and not d[2] and not c[2] \
                and _batched_alike(engine, images, scales, flip):
            done[both] = ([fuse_methods(engine, {"dense": a.per_method["dense"],
                                                 "multicrop": b.per_method["multicrop"]},
                                        scales, 5) for a, b in zip(d[0], c[0])], d[1], [])
        else:
            done[both] = run(both)
    return {m: done[m] for m in methods}


@raising_out_of_memory
def evaluate(engine: "Engine", pairs: Sequence[tuple[Any, int]], scales: Sequence[int],
             flip: bool = True, method: str | Sequence[str] = "dense", average: str = "probs",
             progress: bool = True) -> dict[str, Any] | list[dict[str, Any]]:
    """Top-1 / top-5 error (%) of `engine` on (image, label) pairs: {"method", "scales", "flip",
    "average", "images", "top1_error", "top5_error", "failed"}. Unreadable images and images
    over the memory budget are skipped and listed under "failed" ({"file", "error"}). Labels are
    class indices 0..num_classes-1; the arguments are checked before any image is read.

    method: one method (-> its dict), or a list or tuple of methods, each once (-> their dicts,
    in that order), as `vggfast evaluate --method dense multicrop dense+multicrop` asks. One pass
    serves every method: each image is decoded once (CHUNK_IMAGES at a time) and classified by
    each, with the numbers of one call per method. An unreadable file is listed by every
    method's dict, one over the budget by those of the methods whose views do not fit.
    "dense+multicrop" with both "dense" and "multicrop" averages their posteriors where that is
    its own result bit for bit (see `_classify_chunk`), instead of running their forwards again.
    """
    from tqdm import tqdm

    from .engine import CHUNK_IMAGES, check_flag
    engine._require("fc8")     # classify's first check: the chunks call past it
    methods = _check_methods(method)
    for m in methods:     # each method's own refusal (multi-crop's names the crop size)
        scales = engine.check_scales(scales, method=m)
    check_average(average)
    flip = check_flag("flip", flip)
    pairs = check_pairs(pairs, engine.spec.num_classes)
    wrong1, wrong5, done = ({m: 0 for m in methods} for _ in range(3))
    failed: dict[str, list[dict[str, str]]] = {m: [] for m in methods}
    over_budget: dict[str, list[dict[str, str]]] = {m: [] for m in methods}
    bar = tqdm(total=len(pairs), desc="evaluate", unit="img", disable=not progress,
               file=sys.stderr)
    for start in range(0, len(pairs), CHUNK_IMAGES):
        # Decoded once, one by one (an unreadable image is skipped), then classified by each
        # method as one request: the planner batches equal-size views across the chunk's images.
        images, labels, names, unreadable = [], [], [], []
        for img, label in pairs[start:start + CHUNK_IMAGES]:
            try:
                images.append(pp.load_image(img))
                labels.append(label)
                names.append(img)
            except ImageError as exc:
                unreadable.append((str(img), str(exc)))
        # an image over the memory budget is skipped, not the evaluation
        chunk = _classify_chunk(engine, images, scales, flip, methods, average)
        for m, (results, kept, over) in chunk.items():
            failed[m] += [{"file": f, "error": why} for f, why in unreadable]
            big = [{"file": str(names[j]), "error": f"{names[j]} {why}"} for j, why in over]
            failed[m] += big
            over_budget[m] += big
            for r, j in zip(results, kept):
                best = [i for i, _, _ in r.top(5)]
                done[m] += 1
                wrong1[m] += best[0] != labels[j]
                wrong5[m] += labels[j] not in best
        bar.update(min(CHUNK_IMAGES, len(pairs) - start))
        rate = {m: (f"{100 * wrong1[m] / done[m]:.1f}%", f"{100 * wrong5[m] / done[m]:.1f}%")
                for m in methods if done[m]}
        if len(methods) == 1 and rate:
            bar.set_postfix(top1=rate[methods[0]][0], top5=rate[methods[0]][1])
        elif rate:
            bar.set_postfix({m: "/".join(r) for m, r in rate.items()})
    bar.close()
    none = [m for m in methods if not done[m]]
    if none:    # for some methods only where the memory budget skips an image for them alone
        m = none[0]
        what = "images" if len(none) == len(methods) else f"images with method {m}"
        raise none_evaluated(len(pairs), what, failed[m], over_budget[m])
    rows = [{"method": m, "scales": list(scales), "flip": flip, "average": average,
             "images": done[m], "top1_error": 100.0 * wrong1[m] / done[m],
             "top5_error": 100.0 * wrong5[m] / done[m], "failed": failed[m]} for m in methods]
    return rows if isinstance(method, (list, tuple)) else rows[0]


def format_table(rows: Sequence[dict[str, Any]], config: str) -> str:
    """Rows of `evaluate` as a table like the paper's Tables 3-5."""
    head = f"{'ConvNet config.':<16} {'method':<16} {'test scale Q':<16} " \
           f"{'top-1 val. error (%)':>20} {'top-5 val. error (%)':>20} {'images':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        method = r["method"] + ("" if r["flip"] else " (no flip)")
        lines.append(f"{config:<16} {method:<16} {','.join(map(str, r['scales'])):<16} "
                     f"{r['top1_error']:>20.1f} {r['top5_error']:>20.1f} {r['images']:>7}")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from .cli import _engine, _need_weights
    if getattr(args, "task", "classify") == "localize":
        from .localize import run_evaluate
        return run_evaluate(args)
    given = [flag for flag, value in (("--boxes", args.boxes), ("--loc-weights", args.loc_weights),
                                      ("--protocol", args.protocol), ("--iou", args.iou))
             if value is not None]
    if given:   # read by localisation only: a classification run would ignore them unsaid
        raise ArgumentError(f"{given[0]} is for --task localize; this evaluation classifies")
    twice = next((m for i, m in enumerate(args.method) if m in args.method[:i]), None)
    if twice is not None:   # as a repeated scale is refused: it would be a second, equal row
        raise ArgumentError(f"--method {twice} is given twice; list each method once")
    eng = _engine(args, _need_weights(args))
    scales = eng.check_scales(args.scales)
    cmap = read_class_map(args.class_map) if args.class_map else None
    pairs = labelled_images(args.folder, eng.class_names, cmap,
                            note=lambda m: print(f"vggfast: note: {m}", file=sys.stderr))
    if args.limit < 0:
        raise ArgumentError(f"--limit must be 0 (all) or a positive number, not {args.limit}")
    if args.limit:
        pairs = pairs[:args.limit]
    # one pass over the images for every method (each image decoded once)
    rows = evaluate(eng, pairs, scales, not args.no_flip, list(args.method), args.average,
                    progress=not args.quiet)
    # every method's, once per file in the order met; one that only some methods skipped (over
    # the memory budget for their views only) says which
    skipped: dict[tuple[str, str], list[str]] = {}    # (file, why): the methods that skipped it
    for row in rows:
        for f in row["failed"]:
            skipped.setdefault((f["file"], f["error"]), []).append(row["method"])
    for (_, error), methods in skipped.items():
        only = f" (--method {' '.join(methods)} only)" if len(methods) < len(rows) else ""
        print(f"vggfast: skipped {error}{only}", file=sys.stderr)
    if args.json:
        print(json.dumps({"config": eng.spec.config, "results": rows}, indent=2))
    else:
        print(format_table(rows, eng.spec.config + ("-BN" if eng.spec.batch_norm else "")))
    return PARTIAL if skipped else 0  # as classify and extract: the table covers fewer images


# -- heatmap --------------------------------------------------------------------------------------

def _colormap(v: "Any") -> "Any":
    """Values in [0, 1] (numpy HxW) -> HxWx3 uint8, a blue-cyan-yellow-red ramp (jet-like)."""
    import numpy as np
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def class_map_image(engine: "Engine", img: Any, cls: int | str | None = None,
                    scale: int | None = None, raw: bool = False) -> tuple[torch.Tensor, int]:
    """The dense score map of one class, resampled onto the image: ([H, W] fp32, class index).

    cls: index, class name, or None for the top class of the dense evaluation at `scale`.
    Values: the per-position softmax probability of the class (0..1), or with raw=True its raw
    score. Position (i, j) of the map is the net applied to the window of `image_size` pixels
    starting at (32 i, 32 j) of the rescaled image, so values are placed at window centres and
    interpolated between them (edges hold the nearest centre's value).
    """
    x = pp.load_image(img)
    q = scale if scale is not None else max(384, engine.spec.image_size)
    with pp.naming_file(img):
        scores = engine.score_map(x, scale=q)  # [classes, h, w]
    if cls is None:
        k = int(scores.mean(dim=(1, 2)).argmax())
    elif isinstance(cls, str) and not _INTEGER.fullmatch(cls.strip()):
        names = list(engine.class_names)
        hits = [i for i, n in enumerate(names) if n == cls] or \
               [i for i, n in enumerate(names) if n.lower() == cls.lower()]
        if not hits:
            raise ArgumentError(f"no class named {cls!r}; pass an index 0..{len(names) - 1} or an "
                                "exact class name")
        k = hits[0]
    else:
        k = int(cls)
        if not 0 <= k < engine.spec.num_classes:
            raise ArgumentError(f"class {k} is outside 0..{engine.spec.num_classes - 1}")
    m = scores[k] if raw else F.softmax(scores, dim=0)[k]
    h, w = m.shape
    H, W = x.shape[-2:]
    rh, rw = pp.rescaled_size(H, W, q)
    half, stride = engine.spec.image_size // 2, 32
    # centres at half + stride * i on the rescaled image; interpolate between them
    inner = F.interpolate(m[None, None], size=((h - 1) * stride + 1, (w - 1) * stride + 1),
                          mode="bilinear", align_corners=True) if h * w > 1 else m[None, None]
    pad = (half, max(rw - half - inner.shape[-1], 0), half, max(rh - half - inner.shape[-2], 0))
    full = F.pad(inner, pad, mode="replicate")[..., :rh, :rw]
    full = F.interpolate(full, size=(H, W), mode="bilinear", align_corners=False)
    return full[0, 0], k


def heatmap(engine: "Engine", img: Any, out: str | os.PathLike, cls: int | str | None = None,
            scale: int | None = None, alpha: float = 0.5, raw: bool = False) -> int:
    """Write the class map overlaid on the image (the image's size, in the format the suffix of
    `out` names: .png, .jpg, .webp, .bmp, .tif, ...); returns the class index.

    The map is stretched to 0..1 by its own min and max before colouring. A missing folder of
    `out` is made.
    """
    import numpy as np
    if not 0 <= alpha <= 1:
        raise ArgumentError(f"alpha must lie in [0, 1], not {alpha}")
    pp.image_format(out)    # a bad --out is refused before the work
    x = pp.load_image(img)
    with pp.naming_file(img):    # x is decoded once, for the map and the overlay
        m, k = class_map_image(engine, x, cls, scale, raw)
    v = m.numpy()
    lo, hi = v.min(), v.max()

    def blend(rgb, top, bottom):
        # a chunk of rows at a time (preprocess.rgb_rows): the float copies of a whole 12000x9000
        # photo and its colour map took 7 GB
        part = (v[top:bottom] - lo) / (hi - lo) if hi > lo else np.zeros_like(v[top:bottom])
        mixed = (1 - alpha) * rgb.astype(np.float32) + alpha * _colormap(part).astype(np.float32)
        return mixed.clip(0, 255).astype(np.uint8)

    # The blended rows are written back into a uint8 image, so that the class map (4 bytes a
    # pixel) is gone before PIL's image (4 bytes a pixel) is made: the map and PIL's image were
    # held together beside the decoded photo. The photo's own rows are the ones written where
    # heatmap decoded it itself (each chunk is read before it is written); a caller's tensor,
    # which load_image may hand back as it is, and a float image get a uint8 image of their own.
    own = x.dtype == torch.uint8 and not isinstance(img, torch.Tensor)
    pixels = x if own else torch.empty(x.shape, dtype=torch.uint8)
    for top, bottom, rgb in pp.rgb_rows(x):
        pixels[:, top:bottom] = torch.from_numpy(blend(rgb, top, bottom)).permute(2, 0, 1)
    del x, m, v     # the blended pixels alone while PIL's copy of them is made
    im = pp.to_pil(pixels)
    del pixels      # the PIL image alone while it is written
    pp.save_image(im, out)
    return k


def cmd_heatmap(args) -> int:
    from .cli import STDIN_NAME, _engine, _need_weights, _stdin_image, shown_name
    pp.image_format(args.out)   # before the weights are loaded
    eng = _engine(args, _need_weights(args))
    stdin = args.image == "-"
    img = _stdin_image() if stdin else args.image   # `-`: as classify reads it
    # the image read from `-` is a tensor, which a refusal called "image 0"
    with pp.naming_file(img, STDIN_NAME if stdin else None):
        k = heatmap(eng, img, args.out, args.cls, args.scale, args.alpha, args.raw)
    print(f"{shown_name(args.out)}: class {k} ({eng.class_names[k]})")
    return 0


def add_cli(sub) -> None:
    """Add the `evaluate` and `heatmap` subcommands."""
    from .cli import _engine_args, _weights_arg
    p = sub.add_parser("evaluate", help="top-1/top-5 error on a labelled folder (one sub-folder "
                                        "per class), as in the paper's tables")
    p.add_argument("folder", help="root of an ImageFolder tree: ROOT/CLASS/IMAGE")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--method", nargs="+", default=["dense"],
                   choices=("dense", "multicrop", "dense+multicrop"),
                   help="one or more protocols; one table row each")
    p.add_argument("--scales", type=int, nargs="+", default=[256, 384, 512], metavar="Q",
                   help="test scales: each image's smallest side rescaled to Q (default 256 384 "
                        "512)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped view")
    p.add_argument("--average", default="probs", choices=AVERAGES,
                   help="probs: softmax per view then mean (default); scores: mean then softmax")
    p.add_argument("--class-map", default=None,
                   help="folder name -> class index (JSON, or one folder name per line in index "
                        "order such as ImageNet's LOC_synset_mapping.txt)")
    p.add_argument("--limit", type=int, default=0,
                   help="use only the first N images (default 0: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .localize import add_evaluate_arguments  # --task localize: vggfast/localize.py
    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("heatmap", help="overlay a class's dense score map on an image")
    p.add_argument("image", help="an image file, or - for one on standard input")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--out", "-o", required=True,
                   help="output image, its format from the suffix (.png, .jpg, .webp, .bmp, .tif, "
                        "...); a missing folder is made")
    p.add_argument("--class", dest="cls", default=None,
                   help="class index or exact name (default: the top class)")
    p.add_argument("--scale", type=int, default=None, help="smallest side Q (default 384)")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the map (default 0.5)")
    p.add_argument("--raw", action="store_true",
                   help="show raw scores instead of per-position softmax probabilities")
    p.set_defaults(func=cmd_heatmap)

"""Object localisation (Appendix A of the paper): box regression, dense application, merging.

The localisation net is a VGG whose last FC layer (fc8) predicts a box instead of class scores:
single-class regression (SCR, 4 outputs shared by every class) or per-class regression (PCR,
4 x num_classes outputs, class c at rows 4c..4c+3). Every other layer has the classifier's layout,
so the net is initialised from a trained classification model and fine-tuned with the Euclidean
loss (all layers, as the paper; or the FC layers / the last FC layer only).

Boxes. A box is (x0, y0, x1, y1) in pixel-edge coordinates: the box covering pixels 0..9 of a row
is x0 = 0, x1 = 10, so its width is x1 - x0 (Pascal-VOC's 1-based inclusive xmin..xmax read as
xmin - 1 .. xmax). The regression target of a box seen through a window (the net's input crop,
origin (wx, wy), size ww x wh) is the paper's 4-D vector, normalised to the window:
    ((cx - wx) / ww, (cy - wy) / wh, (x1 - x0) / ww, (y1 - y0) / wh),   cx, cy = the box centre.
It is not clipped: a window that sees part of an object predicts the whole object.

Loss. Euclidean, as Caffe's EuclideanLoss: L = 1 / (2N) * sum_n || p_n - t_n ||^2 over the N
samples of a batch, with p_n the 4 outputs of the ground-truth class (PCR) or the 4 outputs (SCR).

Dense application. At each scale Q the image is rescaled (smallest side Q) and both nets run fully
convolutionally. Output position (i, j) reads the input window with origin (32 j, 32 i) and side
image_size (the fc6 window of pool5 cells i..i+g-1), the same geometry as the training crops, so
its box decodes against that window. Each position's box is rated by the classifier's softmax
probability of the class at the same position. Predictions of all positions and scales (and of
the flipped image, mirrored back, when `flip`) are merged greedily, as OverFeat (Sermanet et al.,
2014) does: repeatedly take the pair of boxes with the largest IoU; while it is at least
`merge_iou` (default 0.5) replace the two by one box whose coordinates are the score-weighted mean
of theirs (the plain mean when both scores are 0) and whose score is the SUM of their scores;
the merged box with the largest summed score is the class's box. The classes are the
classifier's top-k of the whole image (dense protocol of Sec. 3.2 at the same scales), and the
returned score is that image-level posterior.

Central-crop protocol (the paper's SCR-vs-PCR comparison): rescale to S = 256/224 * image_size,
take the central image_size crop, predict the box of the ground-truth class; an error when its
IoU with every ground-truth box is at most 0.5.

ILSVRC criterion: an image is localised when one of the top-5 guesses has the right class and IoU
above 0.5 with one of the ground-truth boxes; the error is the fraction that is not.

Annotation files (`read_boxes`):
- JSON lines, one object per line: {"file": "img.jpg", "label": 3 or "cat",
  "boxes": [[x0, y0, x1, y1], ...]}; "file" is relative to `image_root` when given, else to the
  annotation file's folder; blank lines are skipped.
- Pascal-VOC XML: one .xml file or a folder of them (recursive). Objects are grouped by class:
  one sample per (image, class). The image is looked for under `image_root` (as <filename>, and
  <folder>/<filename>), beside the XML file and in ../JPEGImages; a file name without suffix (as
  ILSVRC's) is tried with .JPEG, .jpg, .jpeg and .png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import preprocess as pp
from .distributed import dist_info
from .engine import imagenet_synsets
from .errors import PARTIAL, ArgumentError, ImageError, MemoryBudgetError, VGGFastError, \
    WeightsError, raising_out_of_memory
from .protocols import none_evaluated
from .train import RunOptions, check_scale_limit, load_init, run_fields

STRIDE = 32  # five 2x2 pools: one output position per 32 input pixels
MODES = ("scr", "pcr")
TRAINABLE = ("all", "fc", "last-fc")
PROTOCOLS = ("dense", "center")
PAPER_TRAIN_SCALES = (256, 384)  # for 224 crops (Appendix A)
IOU_THRESHOLD = 0.5
MERGE_IOU = 0.5
IMG_SUFFIXES = (".JPEG", ".jpg", ".jpeg", ".png")


class AnnotationError(VGGFastError):
    """A box annotation file is missing, malformed or names unknown classes or images."""


# ---------------------------------------------------------------------------------------------
# boxes

def encode(boxes: torch.Tensor, window: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) [..., 4] -> regression targets (cx, cy, w, h) normalised to
    `window` (wx, wy, ww, wh) [..., 4] (broadcast). float32 out."""
    b = torch.as_tensor(boxes, dtype=torch.float32)
    w = torch.as_tensor(window, dtype=torch.float32)
    cx, cy = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
    return torch.stack([(cx - w[..., 0]) / w[..., 2], (cy - w[..., 1]) / w[..., 3],
                        (b[..., 2] - b[..., 0]) / w[..., 2], (b[..., 3] - b[..., 1]) / w[..., 3]],
                       -1)


def decode(params: torch.Tensor, window: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`: (cx, cy, w, h) [..., 4] relative to `window` -> (x0, y0, x1, y1).

    A negative predicted width or height is taken as 0 (an empty box)."""
    p = torch.as_tensor(params, dtype=torch.float32)
    w = torch.as_tensor(window, dtype=torch.float32)
    cx, cy = w[..., 0] + p[..., 0] * w[..., 2], w[..., 1] + p[..., 1] * w[..., 3]
    bw, bh = p[..., 2].clamp(min=0) * w[..., 2], p[..., 3].clamp(min=0) * w[..., 3]
    return torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)


def iou(a: Any, b: Any) -> np.ndarray:
    """Pairwise IoU of boxes a [N, 4] and b [M, 4] (x0, y0, x1, y1) -> float64 [N, M].

    An inverted or empty box has area 0; two boxes whose union is empty have IoU 0."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]),
                 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]),
                 0, None)
    inter = iw * ih
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def greedy_merge(boxes: Any, scores: Any, merge_iou: float = MERGE_IOU
                 ) -> tuple[np.ndarray, np.ndarray]:
    """OverFeat's greedy merging (see the module docstring).

    boxes [N, 4] (x0, y0, x1, y1), scores [N] >= 0. While the most overlapping pair of the current
    boxes has IoU >= merge_iou, the pair becomes one box: coordinates the score-weighted mean,
    score the sum. Returns (boxes [M, 4], scores [M]) float64, by decreasing score; the scores
    always sum to the input's.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    s = np.asarray(scores, dtype=np.float64).reshape(-1).copy()
    if len(b) != len(s):
        raise ArgumentError(f"{len(b)} boxes but {len(s)} scores")
    if len(s) and (not np.isfinite(s).all() or (s < 0).any()):
        raise ArgumentError("merge scores must be finite and non-negative")
    alive = np.ones(len(b), dtype=bool)
    m = iou(b, b)
    np.fill_diagonal(m, -1.0)
    while alive.sum() > 1:
        masked = np.where(alive[:, None] & alive[None, :], m, -1.0)
        k = int(np.argmax(masked))
        i, j = divmod(k, len(b))
        if masked[i, j] < merge_iou:
            break
        tot = s[i] + s[j]
        wi, wj = (s[i] / tot, s[j] / tot) if tot > 0 else (0.5, 0.5)
        b[i] = wi * b[i] + wj * b[j]
        s[i] = tot
        alive[j] = False
        row = iou(b[i:i + 1], b)[0]
        row[i] = -1.0
        m[i, :], m[:, i] = row, row
    order = np.argsort(-s[alive], kind="stable")
    return b[alive][order], s[alive][order]


def clip_box(box: Sequence[float], width: float, height: float) -> tuple[float, ...]:
    """(x0, y0, x1, y1) clipped to the image [0, width] x [0, height]."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
            min(max(x1, 0.0), width), min(max(y1, 0.0), height))


def flip_boxes(boxes: torch.Tensor, width: float) -> torch.Tensor:
    """Mirror (x0, y0, x1, y1) boxes [..., 4] of an image `width` wide."""
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0],
                        boxes[..., 3]], -1)


def euclidean_loss(pred: torch.Tensor, target: torch.Tensor, labels: torch.Tensor | None = None,
                   mode: str = "scr") -> torch.Tensor:
    """L = 1/(2N) sum_n ||p_n - t_n||^2 (Caffe's EuclideanLoss).

    pred: [N, 4] (SCR) or [N, 4 * C] (PCR: only the ground-truth class's 4 outputs count);
    target: [N, 4]; labels: [N] int64 class indices (PCR only)."""
    if mode == "pcr":
        if labels is None:
            raise ArgumentError("per-class regression needs the labels")
        pred = pred.view(pred.shape[0], -1, 4)[torch.arange(pred.shape[0]), labels]
    elif mode != "scr":
        raise ArgumentError(f"unknown regression mode {mode!r}; use scr or pcr")
    return ((pred.float() - target.float()) ** 2).sum() / (2 * max(pred.shape[0], 1))


# ---------------------------------------------------------------------------------------------
# the localisation net

def head_outputs(mode: str, num_classes: int) -> int:
    """Rows of fc8: 4 (SCR) or 4 * num_classes (PCR)."""
    if mode not in MODES:
        raise ArgumentError(f"unknown regression mode {mode!r}; use scr or pcr")
    return 4 if mode == "scr" else 4 * num_classes


def check_loc_weights(w, cls_spec, class_names: Sequence[str]) -> str:
    """Check loaded localisation `Weights` against the classifier; return the mode (scr | pcr).

    The mode is the metadata's ("mode") when present, else read from fc8's rows: 4 -> SCR,
    4 x the classifier's classes -> PCR. Raises WeightsError when the two nets do not pair."""
    rows = w.spec.num_classes
    n = cls_spec.num_classes
    bad = w.unusable()
    if bad:
        raise WeightsError(f"localisation weights: layers {', '.join(bad)} are missing or not "
                           "finite")
    meta = w.meta or {}
    mode = meta.get("mode")
    if meta.get("task") not in (None, "localize"):
        raise WeightsError(f"localisation weights {w.source} are for task {meta.get('task')!r}")
    if mode is None:
        mode = "scr" if rows == 4 else "pcr" if rows == 4 * n else None
        if mode is None:
            raise WeightsError(
                f"localisation weights {w.source}: fc8 has {rows} outputs; expected 4 (single-class "
                f"regression) or 4 x {n} = {4 * n} (per-class, one box per class of the "
                "classifier)")
    elif mode not in MODES:
        raise WeightsError(f"localisation weights {w.source}: unknown mode {mode!r} in metadata")
    if rows != head_outputs(mode, n):
        raise WeightsError(f"localisation weights {w.source}: {mode.upper()} with {n} classes needs "
                           f"{head_outputs(mode, n)} fc8 outputs, found {rows}")
    if mode == "pcr" and meta.get("num_classes") not in (None, n):
        raise WeightsError(f"localisation weights {w.source} were trained for "
                           f"{meta.get('num_classes')} classes, the classifier has {n}")
    names = meta.get("loc_class_names")
    if mode == "pcr" and names is not None and list(names) != list(class_names):
        raise WeightsError(f"localisation weights {w.source}: their class names (order) differ "
                           "from the classifier's")
    if w.spec.image_size != cls_spec.image_size:
        raise WeightsError(f"the localisation net's native size {w.spec.image_size} differs from "
                           f"the classifier's {cls_spec.image_size}: their dense outputs would not "
                           "line up")
    return mode


def loc_meta(cls_meta: dict[str, Any], spec, mode: str, class_names: Sequence[str],
             **extra: Any) -> dict[str, Any]:
    """Checkpoint metadata of a localisation net. "class_names" is deliberately absent (the loader
    checks it against fc8's rows); the classes are under "loc_class_names"."""
    return {"task": "localize", "mode": mode, "num_classes": len(class_names),
            "loc_class_names": list(class_names), "config": spec.config, "batch_norm": False,
            "width": spec.width, "image_size": spec.image_size,
            "preprocess": cls_meta.get("preprocess") or "torchvision", **extra}


def build_localizer(cls_weights: Any, mode: str = "scr", num_classes: int | None = None,
                    who: str | None = None):
    """A trainable localisation VGG initialised from a classification model.

    cls_weights: anything `weights.load` reads. Convs (BatchNorm folded into them), fc6 and fc7
    are copied; fc8 gets head_outputs(mode, C) rows, weights N(0, 0.001^2) and biases
    (0.5, 0.5, 0.5, 0.5) (a centred half-size box). who: how a WeightsError names the
    classifier, "WHO: why" (default its source; `vggfast train` passes "--init PATH"). Returns
    (model, Weights of the classifier).
    """
    from .configs import make_spec
    from .nn import VGG
    from .weights import load
    w = load(cls_weights)
    who = w.source if who is None else who
    bad = w.unusable("fc7")
    if bad:
        raise WeightsError(f"{who}: layers {', '.join(bad)} are missing or not finite; a "
                           "localisation net starts from a complete classifier")
    if (w.meta or {}).get("task") == "localize":
        raise WeightsError(f"{who}: holds a localisation net; start from a classification model")
    s = w.spec
    c = num_classes or s.num_classes
    firsts = sorted({l.block: l.cout for l in s.convs}.items())
    spec = make_spec(s.config, head_outputs(mode, c), s.width, s.image_size, batch_norm=False,
                     fc_width=s.fc_width, channels=tuple(ch for _, ch in firsts))
    model = VGG(spec)
    sd = w.state_dict
    with torch.no_grad():
        for l in spec.convs:
            m = model.features[l.index]
            m.weight.copy_(sd[f"{l.name}.weight"])
            m.bias.copy_(sd[f"{l.name}.bias"])
        for l in spec.fcs[:2]:
            m = model.classifier[l.index]
            m.weight.copy_(sd[f"{l.name}.weight"].flatten(1))
            m.bias.copy_(sd[f"{l.name}.bias"])
        fc8 = model.classifier[6]
        torch.nn.init.normal_(fc8.weight, 0.0, 1e-3)
        fc8.bias.fill_(0.5)
    return model, w


def set_trainable(model, trainable: str) -> list[str]:
    """Freeze all but the chosen layers: "all", "fc" (fc6-fc8) or "last-fc" (fc8). Returns the
    trainable parameter names."""
    if trainable not in TRAINABLE:
        raise ArgumentError(f"unknown trainable set {trainable!r}; use {', '.join(TRAINABLE)}")
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or (trainable == "fc" and name.startswith("classifier"))
                         or name.startswith("classifier.6."))
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------
# dense application

def windows(oh: int, ow: int, size: int) -> torch.Tensor:
    """Input windows (wx, wy, size, size) of an oh x ow dense output, row-major: [oh, ow, 4]."""
    ys, xs = torch.meshgrid(torch.arange(oh, dtype=torch.float32) * STRIDE,
                            torch.arange(ow, dtype=torch.float32) * STRIDE, indexing="ij")
    full = torch.full_like(xs, float(size))
    return torch.stack([xs, ys, full, full], -1)


def _require_loc(engine) -> None:
    if getattr(engine, "_loc_backend", None) is None:
        raise VGGFastError("this Engine has no localisation net; create it with "
                           "vggfast.Engine(weights, loc_weights=LOC_WEIGHTS)")


@dataclass
class DensePredictions:
    """Every position's box and class probabilities, over all views of one image.

    boxes: [P, K, 4] (x0, y0, x1, y1) in original-image pixels (K = 1 for SCR, C for PCR).
    probs: [P, C] the classifier's softmax at the same position. image_probs: [C] the image-level
    posterior (mean over views of softmax(spatial mean of scores)). size: (height, width).
    """

    boxes: torch.Tensor
    probs: torch.Tensor
    image_probs: torch.Tensor
    size: tuple[int, int]

    def class_boxes(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes [P, 4], scores [P]) of class c."""
        k = c if self.boxes.shape[1] > 1 else 0
        return self.boxes[:, k], self.probs[:, c]


def dense_predictions(engine, img: Any, scales: Any = (256, 384), flip: bool = False
                      ) -> DensePredictions:
    """Run the classifier and the localisation net of `engine` densely on `img` at `scales`."""
    _require_loc(engine)
    engine._require("fc8")
    scales = engine.check_scales(scales)
    x = pp.load_image(img)
    with pp.naming_file(img):    # "FILE (40x2000, HxW) at scale Q: why", as classify says
        return _dense_predictions(engine, x, scales, flip)


def _dense_predictions(engine, x: torch.Tensor, scales: tuple[int, ...], flip: bool
                       ) -> DensePredictions:
    """`dense_predictions` of load_image's tensor `x`, the engine and the arguments already
    checked (evaluate_localization checks them once for every image, and hands the image it
    decoded, which load_image would copy again if it is float). A refusal names "image 0"."""
    H, W = x.shape[-2:]
    size = engine.spec.image_size
    engine._check_views([(H, W)], scales, flip)     # every scale, before the first runs
    all_boxes, all_probs, image_probs = [], [], []
    for q in scales:
        h, w = pp.rescaled_size(H, W, q)
        v = pp.resize_short(x, q)
        v = torch.stack([v, v.flip(-1)]) if flip else v[None]
        scores = engine._backend.run(pp.normalize(v, engine.preprocess), ("fc8",))["fc8"].cpu()
        loc = engine._loc_backend.run(pp.normalize(v, engine.loc_preprocess), ("fc8",))["fc8"].cpu()
        nv, c, oh, ow = scores.shape
        image_probs += list(F.softmax(scores.mean((2, 3)), 1))
        probs = F.softmax(scores, 1).permute(0, 2, 3, 1)               # [V, oh, ow, C]
        params = loc.view(nv, -1, 4, oh, ow).permute(0, 3, 4, 1, 2)     # [V, oh, ow, K, 4]
        boxes = decode(params, windows(oh, ow, size)[None, :, :, None])
        if flip:
            boxes[1] = flip_boxes(boxes[1], w)
        boxes = boxes * torch.tensor([W / w, H / h, W / w, H / h])
        all_boxes.append(boxes.reshape(-1, boxes.shape[-2], 4))
        all_probs.append(probs.reshape(-1, c))
    return DensePredictions(torch.cat(all_boxes), torch.cat(all_probs),
                            torch.stack(image_probs).mean(0), (H, W))


# Boxes per class entering the greedy merge, the strongest first: merging is cubic in the boxes
# (about 1 s for 1000 overlapping ones), and a panorama at a large scale has thousands.
MAX_MERGE = 1000


def localize(engine, img: Any, scales: Any = (256, 384), top_k: int = 5, flip: bool = False,
             merge_iou: float = MERGE_IOU) -> list[tuple[int, str, float, tuple[float, ...]]]:
    """Boxes of the classifier's top-k classes: [(class_index, class_name, score, (x0, y0, x1,
    y1)), ...], best first, in original-image pixels (clipped to the image). score: the class's
    image-level posterior. See the module docstring for the dense application and the merging."""
    from .engine import _check_top_k, check_flag
    top_k = _check_top_k(top_k)
    flip = check_flag("flip", flip)
    merge_iou = _check_merge_iou(merge_iou)
    return _merged_boxes(engine, dense_predictions(engine, img, scales, flip), top_k, merge_iou)


def _merged_boxes(engine, d: DensePredictions, top_k: int, merge_iou: float
                  ) -> list[tuple[int, str, float, tuple[float, ...]]]:
    """`localize`'s boxes from the dense predictions `d`, the arguments already checked."""
    H, W = d.size
    p, idx = torch.topk(d.image_probs, min(top_k, d.image_probs.numel()))
    out = []
    for prob, c in zip(p.tolist(), idx.tolist()):
        boxes, scores = d.class_boxes(c)
        if len(scores) > MAX_MERGE:
            keep = torch.topk(scores, MAX_MERGE).indices
            boxes, scores = boxes[keep], scores[keep]
        merged, _ = greedy_merge(boxes.numpy(), scores.numpy(), merge_iou)
        out.append((c, engine.class_names[c], prob, clip_box(merged[0], W, H)))
    return out


def _check_merge_iou(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 < v <= 1:
        raise ArgumentError(f"merge_iou must be a number in (0, 1], not {v!r}")
    return float(v)


def default_center_scale(image_size: int) -> int:
    """The paper's S = 256 for 224 crops, scaled to other native sizes."""
    return round(256 * image_size / 224)


def center_crop_box(engine, img: Any, label: int, scale: int | None = None) -> tuple[float, ...]:
    """The paper's SCR-vs-PCR protocol: the box of class `label` predicted on the central
    image_size crop of `img` rescaled to `scale` (default 256/224 * image_size), in original
    pixels (clipped to the image)."""
    _require_loc(engine)
    q = _check_center_scale(engine, scale)
    n = engine.spec.num_classes
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < n:
        raise ArgumentError(f"label must be a class index in 0..{n - 1}, not {label!r}")
    x = pp.load_image(img)
    with pp.naming_file(img):
        return _center_crop_box(engine, x, int(label), q)


def _check_center_scale(engine, scale: int | None) -> int:
    """center_crop_box's scale: the default for the native size, or `scale` checked."""
    q = default_center_scale(engine.spec.image_size) if scale is None else scale
    (q,) = engine.check_scales((q,))
    return q


def _center_crop_box(engine, x: torch.Tensor, label: int, q: int) -> tuple[float, ...]:
    """`center_crop_box` of load_image's tensor `x`, the arguments already checked (see
    `_dense_predictions`). A refusal names "image 0"."""
    size = engine.spec.image_size
    H, W = x.shape[-2:]
    # A huge image or scale is refused before it is resized, "FILE (HxW) at scale Q is rescaled
    # to HxW to cut its central crop" (the budget of what resize_crop holds, not of the whole
    # rescale it never makes: pp.resize_crop_bytes); the caller names the file.
    engine._check_center_crop((H, W), q)
    h, w = pp.rescaled_size(H, W, q)
    top, left = pp.center_origin(h, w, size)
    # pp.center_crop's crop of resize_short(x, q), bit for bit, without the whole rescale
    v = pp.resize_crop(x, q, top, left, size, size)[None]
    out = engine._loc_backend.run(pp.normalize(v, engine.loc_preprocess), ("fc8",))["fc8"].cpu()
    params = out.view(-1, 4)
    params = params[label if engine.loc_mode == "pcr" else 0]
    box = decode(params, (left, top, size, size))
    box = box * torch.tensor([W / w, H / h, W / w, H / h])
    return clip_box(box.tolist(), W, H)


# ---------------------------------------------------------------------------------------------
# annotations

@dataclass
class LocSample:
    """One annotated image: file path, class index, ground-truth boxes (x0, y0, x1, y1) pixels."""

    file: str
    label: int
    boxes: list[tuple[float, float, float, float]]


def _clipped_boxes(s: LocSample, w: int, h: int) -> list[tuple[float, ...]]:
    """s.boxes clipped to its w x h image; a box wholly outside is an AnnotationError."""
    boxes = []
    for b in s.boxes:
        c = clip_box(b, w, h)
        if not (c[2] > c[0] and c[3] > c[1]):
            raise AnnotationError(f"{s.file}: box {list(b)} lies outside the {h}x{w} (HxW) image")
        boxes.append(c)
    return boxes


def readable_samples(samples: Sequence[LocSample], where: str,
                     scale: int | None = None) -> list[LocSample]:
    """The samples whose image PIL can open (read from the header only; the others are skipped
    with a warning, as the classification trainer skips them), each box clipped to its image. A
    box wholly outside its image is an AnnotationError naming the file.

    scale: the largest S the images are rescaled to (LocDataset resamples only the crop of that
    rescale, pp.resize_crop). An image whose rescale would have more pixels than an image may
    have (preprocess.pixel_limit, the cap the training scales meet for a square image) is
    skipped the same way, by its header (the rule of train._header, which the classification
    trainer's scan applies too): a 40x20000 strip at S = 512 is 512x256000."""
    from .train import _header, _report_skipped
    out, skipped = [], []
    for s in samples:
        size = _header(s.file, oriented=True, scale=scale)
        if isinstance(size, str):
            skipped.append((s.file, size))
            continue
        out.append(dataclasses.replace(s, boxes=_clipped_boxes(s, *size)))
    if skipped:
        _report_skipped(skipped, where)
    if not out:
        raise AnnotationError(f"none of the {len(samples)} annotated images {where} can be read")
    return out


def _label_index(raw: Any, class_names: Sequence[str] | None, class_map: dict[str, int] | None,
                 where: str) -> int:
    n = len(class_names) if class_names is not None else None
    if isinstance(raw, bool):
        raise AnnotationError(f"{where}: label must be a class index or name, not {raw!r}")
    if isinstance(raw, numbers.Integral):
        i = int(raw)
    elif isinstance(raw, str):
        if class_map is not None and raw in class_map:
            i = class_map[raw]
        elif class_names is not None and raw in class_names:
            i = list(class_names).index(raw)
        elif class_names is not None and raw in imagenet_synsets(class_names):
            i = imagenet_synsets(class_names)[raw]      # ImageNet's boxes name synsets
        elif raw.strip().isdigit():
            i = int(raw)
        else:
            raise AnnotationError(f"{where}: unknown class {raw!r} (not among the model's class "
                                  "names; pass a class map or use class indices)")
    else:
        raise AnnotationError(f"{where}: label must be a class index or name, not {raw!r}")
    if i < 0 or (n is not None and i >= n):
        raise AnnotationError(f"{where}: class {i} outside the model's 0..{(n or 1) - 1}")
    return i


def _check_box(b: Any, where: str) -> tuple[float, float, float, float]:
    if not isinstance(b, (list, tuple)) or len(b) != 4 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in b):
        raise AnnotationError(f"{where}: a box must be [x0, y0, x1, y1] (4 finite numbers), "
                              f"not {b!r}")
    x0, y0, x1, y1 = (float(v) for v in b)
    if not (x1 > x0 and y1 > y0):
        raise AnnotationError(f"{where}: box {list(b)} is empty (needs x1 > x0 and y1 > y0)")
    return x0, y0, x1, y1


def read_jsonl(path: str | os.PathLike, class_names: Sequence[str] | None = None,
               image_root: str | os.PathLike | None = None,
               class_map: dict[str, int] | None = None) -> list[LocSample]:
    """Samples of a JSON-lines annotation file (format in the module docstring)."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read box annotations {p}: {getattr(exc, 'strerror', None) or exc}")
    root = Path(image_root) if image_root is not None else p.parent
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AnnotationError(f"{where}: not valid JSON ({exc.msg}); expected "
                                  '{"file": ..., "label": ..., "boxes": [[x0, y0, x1, y1], ...]}')
        if not isinstance(rec, dict):
            raise AnnotationError(f"{where}: expected a JSON object, found {type(rec).__name__}")
        missing = [k for k in ("file", "label", "boxes") if k not in rec]
        if missing:
            raise AnnotationError(f"{where}: missing {', '.join(missing)}")
        if not isinstance(rec["file"], str) or not rec["file"]:
            raise AnnotationError(f"{where}: file must be a non-empty string")
        boxes = rec["boxes"]
        if not isinstance(boxes, list) or not boxes:
            raise AnnotationError(f"{where}: boxes must be a non-empty list of [x0, y0, x1, y1]")
        out.append(LocSample(str(root / rec["file"]),
                             _label_index(rec["label"], class_names, class_map, where),
                             [_check_box(b, where) for b in boxes]))
    if not out:
        raise AnnotationError(f"{p}: no annotations (expected one JSON object per line)")
    return out


def _find_image(name: str, folder: str | None, xml_path: Path, image_root: Path | None
                ) -> Path | None:
    dirs = []
    if image_root is not None:
        dirs += [image_root] + ([image_root / folder] if folder else [])
    dirs += [xml_path.parent, xml_path.parent.parent / "JPEGImages"]
    names = [name] if Path(name).suffix else [name + s for s in IMG_SUFFIXES]
    for d in dirs:
        for nm in names:
            if (d / nm).is_file():
                return d / nm
    return None


def read_voc(path: str | os.PathLike, class_names: Sequence[str] | None = None,
             image_root: str | os.PathLike | None = None,
             class_map: dict[str, int] | None = None) -> list[LocSample]:
    """Samples of Pascal-VOC XML annotations (a file or a folder of them; see the docstring)."""
    p = Path(path)
    files = sorted(p.rglob("*.xml")) if p.is_dir() else [p]
    if not files:
        raise AnnotationError(f"{p}: no .xml annotation files found")
    root = Path(image_root) if image_root is not None else None
    out = []
    for f in files:
        try:
            tree = ET.parse(f).getroot()
        except (ET.ParseError, OSError) as exc:
            raise AnnotationError(f"{f}: not a readable Pascal-VOC XML file ({exc})")
        name = (tree.findtext("filename") or "").strip()
        if not name:
            raise AnnotationError(f"{f}: no <filename>")
        per_class: dict[int, list] = {}
        for obj in tree.iter("object"):
            cname = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            where = f"{f} (object {cname or '?'})"
            if not cname or bb is None:
                raise AnnotationError(f"{where}: an <object> needs <name> and <bndbox>")
            try:
                xmin, ymin, xmax, ymax = (float(bb.findtext(k)) for k in
                                          ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                raise AnnotationError(f"{where}: <bndbox> needs numeric xmin, ymin, xmax, ymax")
            box = _check_box([xmin - 1, ymin - 1, xmax, ymax], where)
            per_class.setdefault(_label_index(cname, class_names, class_map, where), []).append(box)
        if not per_class:
            continue
        img = _find_image(name, (tree.findtext("folder") or "").strip() or None, f, root)
        if img is None:
            raise AnnotationError(f"{f}: image {name!r} not found (looked under "
                                  f"{root or 'no --images root'}, beside the XML and in "
                                  "../JPEGImages)")
        out += [LocSample(str(img), c, b) for c, b in sorted(per_class.items())]
    if not out:
        raise AnnotationError(f"{p}: no objects in the XML annotations")
    return out


def read_boxes(path: str | os.PathLike, class_names: Sequence[str] | None = None,
               image_root: str | os.PathLike | None = None,
               class_map: dict[str, int] | None = None, check_files: bool = True
               ) -> list[LocSample]:
    """Box annotations from a JSON-lines file or Pascal-VOC XML (file or folder). Labels given
    as names are mapped through `class_map`, then `class_names`. Raises AnnotationError."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise AnnotationError(f"box annotations not found: {p}")
    if p.is_dir() or p.suffix.lower() == ".xml":
        samples = read_voc(p, class_names, image_root, class_map)
    else:
        samples = read_jsonl(p, class_names, image_root, class_map)
    if check_files:
        gone = [s.file for s in samples if not os.path.isfile(s.file)]
        if gone:
            raise AnnotationError(f"{p}: {len(gone)} annotated images do not exist, e.g. {gone[0]} "
                                  "(paths are relative to the image folder, or to the annotation "
                                  "file's folder when none is given)")
    return samples


# ---------------------------------------------------------------------------------------------
# the ILSVRC criterion and evaluation

def ilsvrc_correct(preds: Sequence[Sequence[Any]], label: int, gt_boxes: Any, k: int = 5,
                   iou_threshold: float = IOU_THRESHOLD) -> bool:
    """True when one of the first k guesses has class `label` and IoU > iou_threshold with one
    of `gt_boxes`. A guess is (class_index, box) or `localize`'s (class, name, score, box)."""
    gt = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    for g in list(preds)[:k]:
        if int(g[0]) == int(label) and len(gt) and iou([g[-1]], gt).max() > iou_threshold:
            return True
    return False


def _as_samples(engine, dataset: Any, image_root: Any = None, class_map=None) -> list[LocSample]:
    if isinstance(dataset, (str, os.PathLike)):
        return read_boxes(dataset, engine.class_names, image_root, class_map)
    samples = list(dataset)
    if not all(isinstance(s, LocSample) for s in samples):
        raise ArgumentError("dataset must be an annotation file or a list of LocSample")
    return samples


@raising_out_of_memory
def evaluate_localization(engine, dataset: Any, scales: Any = (256, 384), top_k: int = 5,
                          protocol: str = "dense", flip: bool = False,
                          iou_threshold: float = IOU_THRESHOLD, center_scale: int | None = None,
                          image_root: Any = None, class_map: dict[str, int] | None = None,
                          limit: int = 0, progress: bool = False) -> dict[str, Any]:
    """Localisation error (%) of `engine` (with loc_weights) on annotated images.

    dataset: an annotation file (`read_boxes`) or a list of LocSample. protocol "dense": the
    ILSVRC criterion on `localize(img, scales, top_k)`: top1_error (the best guess) and
    top5_error (any of the top 5 guesses; top_k must be >= 5 for it), plus the classifier's
    top-1/top-5 classification errors. protocol "center": the central-crop, ground-truth-class
    protocol; error. Ground-truth boxes are clipped to their image, as predictions are.
    Unreadable images, and images over the memory budget, are skipped and listed under "failed"
    ("FILE why"), as classification's `evaluate` lists them. The arguments are checked once,
    before the annotations or any image is read; each image is decoded once.
    """
    from tqdm import tqdm

    from .engine import _check_top_k, check_flag
    _require_loc(engine)
    if protocol not in PROTOCOLS:
        raise ArgumentError(f"unknown protocol {protocol!r}; use {' or '.join(PROTOCOLS)}")
    # Each protocol's own arguments, once, before the annotations or any image is read (each
    # image's localize or center_crop_box checked them again, and only after decoding it).
    if protocol == "center":
        q = _check_center_scale(engine, center_scale)
    else:
        engine._require("fc8")
        scales = engine.check_scales(scales)
        top_k = _check_top_k(top_k)
        flip = check_flag("flip", flip)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ArgumentError(f"limit must be 0 (all) or a positive number, not {limit!r}")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, numbers.Real) \
            or not 0 <= iou_threshold < 1:
        raise ArgumentError(f"the IoU threshold must be a number in [0, 1), not {iou_threshold!r}")
    samples = _as_samples(engine, dataset, image_root, class_map)
    if limit:
        samples = samples[:limit]
    n = engine.spec.num_classes
    # an index the boxes are read at (a PCR head's class), as center_crop_box refuses others
    odd = next((s for s in samples if isinstance(s.label, bool)
                or not isinstance(s.label, numbers.Integral)), None)
    if odd is not None:
        raise AnnotationError(f"{odd.file}: label {odd.label!r} is not a class index")
    bad = [s for s in samples if not 0 <= s.label < n]
    if bad:
        raise AnnotationError(f"{bad[0].file}: class {bad[0].label} outside the model's 0..{n - 1}")
    counts = dict(loc1=0, loc5=0, cls1=0, cls5=0, center=0)
    done, failed, over_budget, ious = 0, [], [], []
    bar = tqdm(samples, desc="localize", unit="img", disable=not progress, file=sys.stderr)
    for s in bar:
        try:
            img = pp.load_image(s.file)     # decoded once; its size clips the ground truth
            gt = _clipped_boxes(s, img.shape[-1], img.shape[-2])
        except ImageError as exc:
            failed.append({"file": s.file, "error": str(exc)})
            continue
        # An image over the memory budget is skipped and listed, not the evaluation, as
        # classification's `evaluate` skips it. Each image runs alone here (the dense
        # localisation is one image's), so the refusal is caught directly: both protocols check
        # the budget before they compute anything (skipping_oversized's retry of a list's images
        # one by one has nothing to retry).
        try:
            with pp.naming_file(s.file):      # the decoded image has no name of its own
                if protocol == "center":
                    box = _center_crop_box(engine, img, int(s.label), q)
                else:
                    preds = _merged_boxes(engine, _dense_predictions(engine, img, scales, flip),
                                          top_k, MERGE_IOU)
        except MemoryBudgetError as exc:
            big = {"file": s.file, "error": f"{s.file} {exc.reason}"}
            failed.append(big)
            over_budget.append(big)
            continue
        if protocol == "center":
            best = float(iou([box], gt).max())
            ious.append(best)
            counts["center"] += best <= iou_threshold
        else:
            classes = [g[0] for g in preds]
            counts["loc1"] += not ilsvrc_correct(preds, s.label, gt, 1, iou_threshold)
            counts["loc5"] += not ilsvrc_correct(preds, s.label, gt, 5, iou_threshold)
            counts["cls1"] += classes[0] != s.label
            counts["cls5"] += s.label not in classes[:5]
        done += 1
    if not done:
        raise none_evaluated(len(samples), "annotated images", failed, over_budget)
    pct = lambda k: 100.0 * counts[k] / done  # noqa: E731
    out: dict[str, Any] = {"task": "localize", "protocol": protocol, "images": done,
                           "iou_threshold": iou_threshold, "mode": engine.loc_mode,
                           "failed": failed}
    if protocol == "center":
        out.update(scale=q, error=pct("center"), mean_iou=float(np.mean(ious)))
    else:
        out.update(scales=list(scales), flip=flip, top_k=top_k,
                   top1_error=pct("loc1"), top5_error=pct("loc5") if top_k >= 5 else None,
                   cls_top1_error=pct("cls1"), cls_top5_error=pct("cls5") if top_k >= 5 else None)
    return out


def format_report(r: dict[str, Any]) -> str:
    if r["protocol"] == "center":
        return (f"central crop (S={r['scale']}), ground-truth class, {r['mode'].upper()}: "
                f"localisation error {r['error']:.1f}% (IoU <= {r['iou_threshold']:g}), mean IoU "
                f"{r['mean_iou']:.3f}, {r['images']} images")
    t5 = "n/a" if r["top5_error"] is None else f"{r['top5_error']:.1f}%"
    c5 = "n/a" if r["cls_top5_error"] is None else f"{r['cls_top5_error']:.1f}%"
    return (f"dense, scales {','.join(map(str, r['scales']))}, {r['mode'].upper()}: localisation "
            f"error top-1 {r['top1_error']:.1f}%  top-5 {t5}  (classification error top-1 "
            f"{r['cls_top1_error']:.1f}%  top-5 {c5}), {r['images']} images")


# ---------------------------------------------------------------------------------------------
# training

@dataclass(kw_only=True)
class LocTrainOptions(RunOptions):
    """Options of `train_localizer`. init: the classification model to start from (required).
    scales: the training scales S (one drawn per image; default the paper's 256 and 384 scaled to
    image_size); scale / scale_jitter override them as in the classification trainer. trainable:
    "all" (the paper's), "fc" (fc6-fc8, as OverFeat) or "last-fc". val_boxes: annotations scored
    each epoch with the central-crop protocol (the lr plateau watches it; else the training
    loss)."""

    boxes: str
    init: str
    data: str | None = None
    out: str = "vggfast-loc"
    mode: str = "scr"
    trainable: str = "all"
    val_boxes: str | None = None
    scales: tuple[int, ...] | None = None
    min_visible: float = 0.5
    epochs: int = 10
    lr: float = 1e-3


def train_scales(opts: LocTrainOptions, image_size: int) -> tuple[int, ...] | tuple[int, int, str]:
    """The S values of training: a tuple of choices, or (lo, hi, "range") for jittering."""
    jitter = opts.jitter()
    if opts.scale is not None:
        out: tuple = (opts.scale,)
    elif jitter is not None:
        out = (*jitter, "range")
    elif opts.scales:
        out = tuple(opts.scales)
    else:
        out = tuple(round(s * image_size / 224) for s in PAPER_TRAIN_SCALES)
    for s in out:
        if isinstance(s, str):
            continue
        if isinstance(s, bool) or not isinstance(s, int) or s < image_size:
            raise ArgumentError(f"training scale {s!r} must be a whole number >= the crop size "
                                f"{image_size}")
        check_scale_limit(s)
    return out


def _visible(box, size: int) -> float:
    x0, y0, x1, y1 = box
    inter = max(0.0, min(x1, size) - max(x0, 0.0)) * max(0.0, min(y1, size) - max(y0, 0.0))
    area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
    return inter / area if area > 0 else 0.0


class LocDataset(torch.utils.data.Dataset):
    """(normalised crop [3, size, size], target [4], label) per (index, seed) key.

    Training (`train=True`): rescale to S (drawn from `scales`), a random size x size crop (up
    to 10 positions are drawn until the chosen box is at least `min_visible` inside; the best is
    kept), a flip with probability 1/2 (the box mirrored), the PCA colour shift. The box is the
    ground-truth box most visible in the crop. Evaluation: rescale to scales[0], central crop.
    Only the crop's pixels are resampled (`preprocess.resize_crop`).
    """

    def __init__(self, samples: Sequence[LocSample], size: int, scales, train: bool = True,
                 flip: bool = True, color: bool = True, min_visible: float = 0.5,
                 preprocess: str = "torchvision"):
        self.samples, self.size, self.scales, self.train = list(samples), size, scales, train
        self.flip, self.color, self.min_visible, self.preprocess = flip, color, min_visible, preprocess

    def __len__(self) -> int:
        return len(self.samples)

    def _scale(self, gen: torch.Generator) -> int:
        if self.scales[-1] == "range":
            return int(torch.randint(self.scales[0], self.scales[1] + 1, (1,), generator=gen))
        return int(self.scales[int(torch.randint(0, len(self.scales), (1,), generator=gen))])

    def __getitem__(self, key):
        from .train import color_shift, crop_origin
        index, seed = key
        s = self.samples[index]
        gen = torch.Generator().manual_seed(int(seed))
        x = pp.load_image(s.file)
        H, W = x.shape[-2:]
        q = self._scale(gen) if self.train else int(self.scales[0])
        h, w = pp.rescaled_size(H, W, q)
        boxes = torch.tensor(s.boxes, dtype=torch.float32) * torch.tensor([w / W, h / H] * 2)
        size = self.size
        if self.train:
            best = None
            for _ in range(10):
                top, left = crop_origin(h, w, size, gen)
                shifted = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
                vis = [_visible(b.tolist(), size) for b in shifted]
                k = int(np.argmax(vis))
                if best is None or vis[k] > best[0]:
                    best = (vis[k], top, left, shifted[k])
                if vis[k] >= self.min_visible:
                    break
            _, top, left, box = best
        else:
            top, left = pp.center_origin(h, w, size)
            shifted = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
            box = shifted[int(np.argmax([_visible(b.tolist(), size) for b in shifted]))]
        # only the crop is resampled (the whole rescale's crop, bit for bit): a thin strip's
        # whole rescale (40x20000 at S = 512: 1.5 GB of float32) for one crop in a data worker
        v = pp.resize_crop(x, q, top, left, size, size)
        if self.train and self.flip and bool(torch.rand(1, generator=gen) < 0.5):
            v = v.flip(-1)
            box = flip_boxes(box, size)
        if self.train and self.color:
            v = color_shift(v, gen)
        target = encode(box, (0, 0, size, size))
        return pp.normalize(v.contiguous(), self.preprocess), target, s.label


@dataclass
class LocTrainResult:
    out: Path
    meta: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


@torch.no_grad()
def _center_accuracy(model, loader, mode: str, device) -> tuple[float, float]:
    """(fraction with IoU > 0.5, mean IoU) of the central-crop protocol on a LocDataset."""
    model.eval()
    hits, total, tot_iou = 0, 0, 0.0
    for x, t, y in loader:
        p = model(x.to(device)).float().cpu()
        if mode == "pcr":
            p = p.view(len(y), -1, 4)[torch.arange(len(y)), y]
        win = (0, 0, 1, 1)
        a, b = decode(p, win).numpy(), decode(t, win).numpy()
        ious = np.array([iou(a[i:i + 1], b[i:i + 1])[0, 0] for i in range(len(a))])
        hits += int((ious > IOU_THRESHOLD).sum())
        tot_iou += float(ious.sum())
        total += len(ious)
    return hits / max(total, 1), tot_iou / max(total, 1)


def train_localizer(opts: LocTrainOptions) -> LocTrainResult:
    """Fine-tune a localisation net from `opts.init` on `opts.boxes` (see LocTrainOptions).

    Writes OUT/model.safetensors (torchvision keys; metadata: task "localize", mode, num_classes,
    loc_class_names, config, width, image_size, preprocess) and OUT/model.json after every
    epoch, and OUT/log.jsonl (one JSON row per epoch). Single process: a world of several ranks
    (torchrun's WORLD_SIZE > 1) is refused before anything is read. No resume."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from .train import MODEL_FILE, _resolve_device, batches, epoch_order, sample_seed, save_model
    # under torchrun every rank would train the whole net alone and write the same --out
    rank, world = dist_info()
    if world > 1:
        raise ArgumentError(f"--task localize trains in a single process, but this is rank {rank} "
                            f"of WORLD_SIZE={world}: run `vggfast train --task localize` without "
                            "torchrun")
    if opts.mode not in MODES:
        raise ArgumentError(f"unknown --mode {opts.mode!r}; use scr or pcr")
    for name in ("epochs", "batch_size"):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ArgumentError(f"{name} must be a positive integer, not {v!r}")
    if not (isinstance(opts.lr, (int, float)) and math.isfinite(opts.lr) and opts.lr > 0):
        raise ArgumentError(f"lr must be positive, not {opts.lr!r}")
    if not opts.init:
        raise ArgumentError("a localisation net starts from a classification model: pass --init "
                            "CLASSIFIER (a file or a `vggfast train` folder)")
    out = Path(os.path.expanduser(opts.out))
    if (out / MODEL_FILE).exists():
        raise VGGFastError(f"--out {out} already holds a model; choose another folder")
    device = _resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    init = os.path.expanduser(opts.init)
    if not os.path.exists(init):
        raise ArgumentError(f"--init {opts.init!r}: no such classification model (file or folder)")
    cls_w = load_init(init)
    classes = cls_w.class_names or [str(i) for i in range(cls_w.spec.num_classes)]
    model, _ = build_localizer(cls_w, opts.mode, len(classes), who=f"--init {init}")
    set_trainable(model, opts.trainable)
    if opts.dropout != 0.5:
        for m in model.classifier:
            if isinstance(m, torch.nn.Dropout):
                m.p = opts.dropout
    size = model.spec.image_size
    scales = train_scales(opts, size)
    pre = cls_w.preprocess or "torchvision"
    # an image whose rescale at the largest scale would pass the pixel limit is skipped, as an
    # unreadable one is (the classification trainer's rule; only the crop is resampled)
    smax = scales[1] if scales[-1] == "range" else max(scales)
    cscale = default_center_scale(size)
    samples = readable_samples(read_boxes(opts.boxes, classes, opts.data), "for training", smax)
    val = (readable_samples(read_boxes(opts.val_boxes, classes, opts.val), "for validation",
                            cscale) if opts.val_boxes else None)
    meta = loc_meta(cls_w.meta or {}, model.spec, opts.mode, classes, trainable=opts.trainable,
                    init=str(init))
    meta["preprocess"] = pre
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=opts.lr, momentum=opts.momentum,
                                weight_decay=opts.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.1,
                                                           patience=opts.patience)
    ds = LocDataset(samples, size, scales, True, opts.flip, opts.color_shift, opts.min_visible, pre)
    vds = LocDataset(val, size, (cscale,), False, preprocess=pre) if val else None
    say = (lambda *a: None) if opts.quiet else (lambda *a: print(*a, flush=True))
    say(f"localisation net {opts.mode.upper()} from {init}: {len(samples)} training images, "
        f"scales {scales}, trainable {opts.trainable}, {device}")
    try:        # a file, or a read-only place: one line, as `vggfast train`'s
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VGGFastError(f"cannot create --out {out}: {exc.strerror or exc}") from None
    try:        # found now, not when the first epoch's model is saved
        tempfile.TemporaryFile(dir=out).close()
    except OSError as exc:
        raise VGGFastError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    history = []
    for epoch in range(opts.epochs):
        model.train()
        order = epoch_order(len(ds), epoch, opts.seed)
        keys = [(i, sample_seed(opts.seed, epoch, i)) for i in order]
        loader = DataLoader(ds, batch_size=opts.batch_size, sampler=keys,
                            num_workers=opts.workers)
        lr = optimizer.param_groups[0]["lr"]
        t0, tot, seen = time.perf_counter(), 0.0, 0
        bar = tqdm(batches(loader), total=len(loader), desc=f"epoch {epoch + 1}/{opts.epochs}",
                   leave=False, disable=opts.quiet, file=sys.stderr)
        for x, t, y in bar:
            x, t, y = x.to(device), t.to(device), y.to(device)
            loss = euclidean_loss(model(x), t, y, opts.mode)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            tot += float(loss.detach()) * len(y)
            seen += len(y)
        seconds = time.perf_counter() - t0
        if not (math.isfinite(tot) and bool(torch.stack(
                [torch.isfinite(p).all() for p in model.parameters()]).all())):
            # as in `vggfast train`: a diverged run wrote NaN boxes over the last good epoch's
            # files and exited 0; stop before saving and keep them
            kept = f"{out} keeps epoch {epoch}" if epoch else "no epoch was saved"
            raise VGGFastError(f"training diverged: the loss of epoch {epoch + 1} is "
                               f"{tot / max(seen, 1)} at lr {lr:g}; try a lower --lr ({kept})")
        row = {"epoch": epoch + 1, "loss": tot / max(seen, 1), "lr": lr, "seconds": seconds}
        if vds is not None:
            vkeys = [(i, 0) for i in range(len(vds))]
            acc, miou = _center_accuracy(model, DataLoader(vds, batch_size=opts.batch_size,
                                                           sampler=vkeys), opts.mode, device)
            row.update(val_center_acc=acc, val_mean_iou=miou)
            scheduler.step(acc)
        else:
            scheduler.step(-row["loss"])
        history.append(row)
        say(f"epoch {epoch + 1}/{opts.epochs}  loss {row['loss']:.5f}  lr {lr:g}"
            + (f"  val centre-crop IoU>0.5 {row['val_center_acc']:.4f}  mean IoU "
               f"{row['val_mean_iou']:.3f}" if vds is not None else "") + f"  {seconds:.1f} s")
        model.eval()
        save_model(model, meta, out)
        text = "".join(json.dumps(r) + "\n" for r in history)
        pp.atomic_write(out / "log.jsonl", lambda p: Path(p).write_text(text))
    say(f"model: {out / MODEL_FILE}  (use with vggfast.Engine(CLASSIFIER, loc_weights="
        f"{str(out)!r}))")
    return LocTrainResult(out, meta, history)


# ---------------------------------------------------------------------------------------------
# drawing

_COLOURS = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 192, 0), (200, 64, 255))


def draw_boxes(img: Any, preds: Sequence[Sequence[Any]], out: str | os.PathLike | None = None,
               width: int | None = None):
    """Draw `localize`'s boxes with "name score" labels on `img`; returns the PIL image and saves
    it to `out` when given (format from the suffix, a missing folder made:
    `preprocess.save_image`)."""
    from PIL import ImageDraw
    im = pp.to_pil(pp.load_image(img))   # a chunk of rows at a time, no whole float copy
    d = ImageDraw.Draw(im)
    lw = width or max(1, round(min(im.size) / 150))
    for n, (c, name, score, box) in reversed(list(enumerate(preds))):
        col = _COLOURS[n % len(_COLOURS)]
        d.rectangle([box[0], box[1], max(box[0], box[2] - 1), max(box[1], box[3] - 1)],
                    outline=col, width=lw)
        label = f"{name} {score:.2f}"
        tx, ty = box[0] + lw, box[1] + lw
        l, t, r, b = d.textbbox((tx, ty), label)
        d.rectangle([l - 1, t - 1, r + 1, b + 1], fill=col)
        d.text((tx, ty), label, fill=(0, 0, 0))
    if out is not None:
        pp.save_image(im, out)
    return im


# ---------------------------------------------------------------------------------------------
# command line

def _loc_engine(args):
    from .engine import Engine
    from .cli import _need_weights
    if not getattr(args, "loc_weights", None):
        raise VGGFastError("no localisation net given: pass --loc-weights PATH (a `vggfast train "
                           "--task localize` folder or checkpoint)")
    return Engine(_need_weights(args), config=getattr(args, "config", None),
                  device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                  backend=getattr(args, "backend", "auto"),
                  preprocess=getattr(args, "preprocess", None), loc_weights=args.loc_weights)


def cmd_localize(args) -> int:
    if args.draw < 0:   # would draw all of them, as 0 does, without a word
        raise ArgumentError(f"--draw must be 0 (all --top boxes) or a positive number of "
                            f"boxes, not {args.draw}")
    if args.out:    # refused before the nets are loaded, not after the boxes are printed
        pp.image_format(args.out)
    eng = _loc_engine(args)
    from .cli import STDIN_NAME, _stdin_image, shown_name
    stdin = args.image == "-"
    img = _stdin_image() if stdin else args.image   # `-`: as classify and heatmap read it
    # the image read from `-` is a tensor, which a refusal called "image 0"
    with pp.naming_file(img, STDIN_NAME if stdin else None):
        preds = eng.localize(img, scales=args.scales, top_k=args.top, flip=args.flip)
    if args.json:
        print(json.dumps({"image": args.image, "boxes": [
            {"index": c, "name": n, "score": s, "box": list(b)} for c, n, s, b in preds]},
            indent=2))
    else:
        print(shown_name(args.image))
        for c, n, s, b in preds:
            print(f"  {s:7.4f}  {c:4d}  {n:<24} ({b[0]:.0f}, {b[1]:.0f}, {b[2]:.0f}, {b[3]:.0f})")
    if args.out:
        draw_boxes(img, preds[:args.draw] if args.draw > 0 else preds, args.out)
        print(f"wrote {shown_name(args.out)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def add_cli(sub) -> None:
    """Register `vggfast localize IMG --weights W --loc-weights L [--out boxes.png]`."""
    from .cli import _engine_args, _weights_arg
    p = sub.add_parser("localize", help="boxes of the top classes (paper Appendix A): dense "
                                        "localisation net + greedy merging; draws them with --out")
    p.add_argument("image", help="an image file, or - for one on standard input")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--loc-weights", "-l", required=True,
                   help="the localisation net (`vggfast train --task localize` output)")
    p.add_argument("--scales", type=int, nargs="+", default=[256, 384], metavar="Q",
                   help="test scales: the image's smallest side rescaled to Q (default 256 384)")
    p.add_argument("--top", type=int, default=5, help="classes (one box each; default 5)")
    p.add_argument("--flip", action="store_true", help="also use the flipped image's boxes")
    p.add_argument("--out", "-o", default=None,
                   help="write the image with the boxes, its format from the suffix (.png, .jpg, "
                        "...); a missing folder is made")
    p.add_argument("--draw", type=int, default=0,
                   help="boxes drawn with --out, best first (default 0: all --top boxes)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_localize)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags `vggfast train` needs for `--task localize` (the rest are the trainer's own)."""
    parser.add_argument("--task", choices=("classify", "localize"), default="classify",
                        help="classify (default) or localize: fine-tune a box-regression net from "
                             "the classifier given with --init, on --boxes (one process; not "
                             "under torchrun)")
    parser.add_argument("--boxes", default=None, metavar="FILE",
                        help="localize: box annotations, JSON lines {file, label, boxes} or a "
                             "Pascal-VOC XML folder; images relative to --data")
    parser.add_argument("--val-boxes", default=None, metavar="FILE",
                        help="localize: validation annotations (images relative to --val), scored "
                             "by the central-crop protocol after each epoch")
    parser.add_argument("--mode", choices=MODES, default="scr",
                        help="localize: scr (one box for all classes) or pcr (one per class)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--last-fc-only", action="store_true",
                   help="localize: fine-tune fc8 only (default: all layers, as the paper)")
    g.add_argument("--fc-only", action="store_true",
                   help="localize: fine-tune fc6-fc8 only (OverFeat's choice)")


def options_from_args(args: argparse.Namespace) -> LocTrainOptions:
    if not getattr(args, "boxes", None):
        raise ArgumentError("--task localize needs --boxes FILE (box annotations)")
    if getattr(args, "resume", False):
        raise ArgumentError("--resume is not supported for --task localize")
    init = getattr(args, "init", None)
    if init in (None, "glorot", "kaiming"):
        raise ArgumentError("--task localize starts from a trained classifier: pass --init "
                            "CLASSIFIER (a `vggfast train` folder or a checkpoint)")
    d = LocTrainOptions(boxes="", init="")
    return LocTrainOptions(
        **run_fields(args, d), boxes=args.boxes, init=init, data=getattr(args, "data", None),
        mode=getattr(args, "mode", "scr"),
        trainable="last-fc" if getattr(args, "last_fc_only", False) else
        "fc" if getattr(args, "fc_only", False) else "all",
        val_boxes=getattr(args, "val_boxes", None))


def run_train(args: argparse.Namespace) -> int:
    """`vggfast train --task localize ...`: returns the exit code; user errors raise
    VGGFastError. --lr: None means the paper's 1e-3 for localisation."""
    train_localizer(options_from_args(args))
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags `vggfast evaluate` needs for `--task localize DIR --boxes BOXES`."""
    parser.add_argument("--task", choices=("classify", "localize"), default="classify",
                        help="classify (default) or localize: ILSVRC localisation error")
    parser.add_argument("--boxes", default=None, metavar="FILE",
                        help="localize: box annotations (JSON lines or Pascal-VOC XML); images "
                             "relative to the folder argument")
    parser.add_argument("--loc-weights", default=None, help="localize: the localisation net")
    parser.add_argument("--protocol", choices=PROTOCOLS, default=None,
                        help="localize: dense (top-k classes, greedy merging; default) or center "
                             "(central crop, ground-truth class)")
    parser.add_argument("--iou", type=float, default=None,
                        help="localize: IoU a correct box must exceed (default 0.5)")


def run_evaluate(args: argparse.Namespace) -> int:
    """`vggfast evaluate --task localize DIR --boxes BOXES --weights W --loc-weights L`."""
    from .protocols import read_class_map
    if not getattr(args, "boxes", None):
        raise ArgumentError("--task localize needs --boxes FILE (box annotations)")
    eng = _loc_engine(args)
    cmap = read_class_map(args.class_map) if getattr(args, "class_map", None) else None
    scales = getattr(args, "scales", None) or [256, 384]
    # None where not given: `vggfast evaluate` refuses them, given, with --task classify
    protocol = args.protocol or "dense"
    iou = IOU_THRESHOLD if args.iou is None else args.iou
    r = evaluate_localization(eng, args.boxes, scales=scales, protocol=protocol,
                              flip=not getattr(args, "no_flip", True),
                              iou_threshold=iou, image_root=getattr(args, "folder", None),
                              class_map=cmap, limit=getattr(args, "limit", 0) or 0,
                              progress=not getattr(args, "quiet", False))
    for f in r["failed"]:
        print(f"vggfast: skipped {f['error']}", file=sys.stderr)
    print(json.dumps(r, indent=2) if getattr(args, "json", False) else format_report(r))
    return PARTIAL if r["failed"] else 0  # as classification's evaluate: fewer images than given

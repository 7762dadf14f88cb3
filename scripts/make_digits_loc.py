"""Digits-on-canvas localisation: build the set, train a classifier and a localiser, report.

The set (real handwriting, known boxes): each of scikit-learn's 1797 digits (8x8, 16 grey levels)
is upsampled (bilinear) to a random size (side 18-44 pixels, aspect 0.8-1.25) and pasted at a
random position onto a 64x64 canvas of dark uniform noise. Its box is the tight box of the digit's
ink (upsampled values above 1/4 of full scale), in pixel-edge coordinates. Splits are by digit
image (stratified, fixed seed): train (2 canvases per digit), val and held-out (1 each); the
held-out digits are never seen in training.

Models (CPU, a few minutes on two cores):
1. classifier: net A with BatchNorm at width 1/8, native size 64, trained with
   `vggfast.train.fit` on the canvas folders (fixed scale 64, no flip: digits are not
   mirror-symmetric, no colour shift);
2. localiser: the same net (BatchNorm folded into the convs) with fc8 predicting boxes (SCR by
   default), fine-tuned from the classifier with `vggfast.localize.train_localizer` (all layers,
   Euclidean loss, training scales 64 and 96 drawn per image; lr 1e-2 and no dropout, which this
   tiny net needs: see LOC_RECIPE).

Report, on the held-out canvases, through `vggfast.Engine(cls, loc_weights=loc)`:
- dense application at scales 64 and 96 with greedy merging (`evaluate_localization`): the share
  localised with the correct class and IoU > 0.5 by the top-1 guess (the target, >= 90%) and by
  the top-5 guesses (the ILSVRC criterion), and the classification accuracy;
- the central-crop, ground-truth-class protocol.

    .venv/bin/python scripts/make_digits_loc.py [--root DIR] [--mode scr|pcr] [--keep]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CANVAS = 64
SIDE = (18, 44)
ASPECT = (0.8, 1.25)
INK = 0.25
SEED = 0
CLASSES = [str(i) for i in range(10)]
# BatchNorm: without it this width-1/8 net A reached 62% held-out accuracy in 12 epochs (Glorot)
# and did not start learning with torchvision's init; with it, 97% on val in 15 epochs.
CLS_RECIPE = dict(config="A", batch_norm=True, width=1 / 8, image_size=CANVAS, scale=CANVAS,
                  flip=False, color_shift=False, batch_size=32, epochs=15, lr=0.01,
                  init="glorot", patience=2, workers=0, seed=0, quiet=True)
# lr 1e-2 and no dropout: with the paper's lr 1e-3 and dropout 0.5 this tiny net reached only
# 44% (central crop, IoU > 0.5, val) after 10 epochs; with these, 87% after 8.
LOC_RECIPE = dict(scales=(64, 96), flip=False, color_shift=False, batch_size=32, epochs=10,
                  lr=1e-2, dropout=0.0, patience=2, workers=0, seed=0)
EVAL_SCALES = (64, 96)


def canvas(digit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """One 64x64x3 uint8 canvas with `digit` (8x8, 0..16) pasted; its ink box (x0, y0, x1, y1)."""
    from PIL import Image
    side = rng.uniform(*SIDE)
    aspect = rng.uniform(*ASPECT)
    w = int(round(min(side * np.sqrt(aspect), CANVAS)))
    h = int(round(min(side / np.sqrt(aspect), CANVAS)))
    small = Image.fromarray(np.clip(np.rint(digit * 255.0 / 16.0), 0, 255).astype(np.uint8))
    big = np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.float32)
    x, y = int(rng.integers(0, CANVAS - w + 1)), int(rng.integers(0, CANVAS - h + 1))
    bg = rng.uniform(0, 48, (CANVAS, CANVAS)).astype(np.float32)
    bg[y:y + h, x:x + w] = np.maximum(bg[y:y + h, x:x + w], big)
    ink = big > INK * 255
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    box = [float(x + cols[0]), float(y + rows[0]), float(x + cols[-1] + 1), float(y + rows[-1] + 1)]
    img = np.repeat(np.clip(np.rint(bg), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return img, box


def build_set(root: Path) -> dict[str, int]:
    """root/{train,val,heldout}/<digit>/<n>.png and root/{split}.jsonl (paths relative to
    root/{split}). Returns the number of canvases per split."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, held = train_test_split(idx, test_size=0.25, stratify=y, random_state=SEED)
    tr, va = train_test_split(rest, test_size=0.1, stratify=y[rest], random_state=SEED)
    rng = np.random.default_rng(SEED)
    counts = {}
    for split, ids, copies in (("train", tr, 2), ("val", va, 1), ("heldout", held, 1)):
        lines = []
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        n = 0
        for i in ids:
            for _ in range(copies):
                img, box = canvas(d.images[i], rng)
                rel = f"{y[i]}/{n:05d}.png"
                Image.fromarray(img, "RGB").save(root / split / rel)
                lines.append(json.dumps({"file": rel, "label": int(y[i]), "boxes": [box]}))
                n += 1
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        counts[split] = n
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--mode", default="scr", choices=("scr", "pcr"))
    ap.add_argument("--cls-epochs", type=int, default=CLS_RECIPE["epochs"])
    ap.add_argument("--loc-epochs", type=int, default=LOC_RECIPE["epochs"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import vggfast
    from vggfast.localize import LocTrainOptions, evaluate_localization, train_localizer
    from vggfast.train import TrainOptions, fit

    tmp = None if args.root else tempfile.mkdtemp(prefix="vggfast-digits-loc-")
    root = Path(args.root or tmp)
    try:
        t0 = time.perf_counter()
        counts = build_set(root)
        print(f"canvases {counts} in {root} ({time.perf_counter() - t0:.1f} s)", flush=True)

        t1 = time.perf_counter()
        cls_dir, loc_dir = root / "cls", root / f"loc-{args.mode}"
        for d in (cls_dir, loc_dir):
            if d.exists():
                shutil.rmtree(d)
        fit(TrainOptions(data=str(root / "train"), val=str(root / "val"), out=str(cls_dir),
                         **{**CLS_RECIPE, "epochs": args.cls_epochs}))
        t_cls = time.perf_counter() - t1
        print(f"classifier trained in {t_cls:.1f} s", flush=True)

        t2 = time.perf_counter()
        train_localizer(LocTrainOptions(
            boxes=str(root / "train.jsonl"), data=str(root / "train"), init=str(cls_dir),
            val_boxes=str(root / "val.jsonl"), val=str(root / "val"), out=str(loc_dir),
            mode=args.mode, **{**LOC_RECIPE, "epochs": args.loc_epochs}))
        t_loc = time.perf_counter() - t2
        print(f"localiser trained in {t_loc:.1f} s", flush=True)

        t3 = time.perf_counter()
        eng = vggfast.Engine(str(cls_dir), loc_weights=str(loc_dir), device="cpu")
        held = str(root / "heldout.jsonl")
        dense = evaluate_localization(eng, held, scales=EVAL_SCALES, top_k=5,
                                      image_root=root / "heldout")
        center = evaluate_localization(eng, held, protocol="center",
                                       image_root=root / "heldout")
        t_eval = time.perf_counter() - t3
        n = dense["images"]
        acc1, acc5 = 100 - dense["top1_error"], 100 - dense["top5_error"]
        print(f"\nheld-out canvases: {n}; mode {args.mode.upper()}; torch threads "
              f"{torch.get_num_threads()}")
        print(f"dense (scales {list(EVAL_SCALES)}, greedy merging): correct class and IoU > 0.5 "
              f"top-1 {acc1:.2f}%  top-5 (ILSVRC) {acc5:.2f}%; classification top-1 "
              f"{100 - dense['cls_top1_error']:.2f}%")
        print(f"central crop, ground-truth class: IoU > 0.5 {100 - center['error']:.2f}%, "
              f"mean IoU {center['mean_iou']:.3f}")
        print(f"time: set {t1 - t0:.0f} s, classifier {t_cls:.0f} s, localiser {t_loc:.0f} s, "
              f"evaluation {t_eval:.0f} s, total {time.perf_counter() - t0:.0f} s")
        ok = acc1 >= 90.0
        print("target (>= 90% top-1 at IoU > 0.5 with the correct class):",
              "met" if ok else "NOT met")
        return 0 if ok else 1
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp:
            print(f"kept {tmp}")


if __name__ == "__main__":
    sys.exit(main())

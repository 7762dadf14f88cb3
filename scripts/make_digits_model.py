"""Train the small demo/test model shipped as vggfast/data/digits_a.safetensors.

scikit-learn's digits (1797 8x8 images, 16 grey levels, ten classes) are upsampled to 32x32
(bilinear), written as RGB PNGs in ImageFolder trees (train / val / heldout, stratified, fixed
seed), and a width-reduced net A (width 1/8, image size 32) is trained on them with
`vggfast.train.fit`: fixed scale 32, no flip, no colour shift, batch 32. The held-out split is
never seen in training (the lr schedule watches `val`); its accuracy is printed at the end, and
tests/test_train.py checks it again on the shipped file.

    .venv/bin/python scripts/make_digits_model.py [--root DIR] [--out FILE] [--epochs N]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = [str(i) for i in range(10)]
SIZE = 32
SPLIT_SEED = 0
HELDOUT_FRACTION, VAL_FRACTION = 0.2, 0.1
MAX_BYTES = 5 * 1024 * 1024
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "vggfast" / "data" / "digits_a.safetensors"
# The recipe (fit's options besides the folders); width 1/8 keeps the file near 1.8 MB.
RECIPE = dict(config="A", width=1 / 8, image_size=SIZE, scale=SIZE, flip=False,
              color_shift=False, batch_size=32, epochs=20, lr=0.01, init="glorot",
              patience=2, workers=0, seed=0)


def digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train" | "val" | "heldout": (images uint8 [N, 32, 32, 3], labels int64 [N])}."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    small = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(a).resize((SIZE, SIZE), Image.BILINEAR))
                    for a in small])
    rgb = np.repeat(big[..., None], 3, axis=3)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, held = train_test_split(idx, test_size=HELDOUT_FRACTION, stratify=y,
                                  random_state=SPLIT_SEED)
    tr, va = train_test_split(rest, test_size=VAL_FRACTION, stratify=y[rest],
                              random_state=SPLIT_SEED)
    return {name: (rgb[i], y[i]) for name, i in (("train", tr), ("val", va), ("heldout", held))}


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """ROOT/<digit>/<n>.png for every image."""
    from PIL import Image
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
    for n, (a, lab) in enumerate(zip(images, labels)):
        Image.fromarray(a, "RGB").save(root / CLASSES[lab] / f"{n:04d}.png")
    return root


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of the plain module on uint8 [N, 32, 32, 3] images (torchvision norm)."""
    from vggfast.preprocess import normalize
    model.eval()
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, "torchvision")
    pred = model(x).argmax(1)
    return float((pred == torch.from_numpy(labels)).float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="where to write the image folders "
                                                 "(default: a temporary folder, removed)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = ap.parse_args(argv)

    from vggfast.nn import build_model
    from vggfast.train import TrainOptions, fit
    from vggfast.weights import load

    tmp = None if args.root else tempfile.mkdtemp(prefix="vggfast-digits-")
    root = Path(args.root or tmp)
    try:
        splits = digits_splits()
        for name, (x, y) in splits.items():
            write_folder(root / name, x, y)
        print({k: len(v[1]) for k, v in splits.items()}, "images in", root)
        run = root / "run"
        if run.exists():
            shutil.rmtree(run)
        opts = TrainOptions(data=str(root / "train"), val=str(root / "val"), out=str(run),
                            **{**RECIPE, "epochs": args.epochs})
        t0 = time.perf_counter()
        result = fit(opts)
        seconds = time.perf_counter() - t0

        w = load(str(run))
        model = build_model("A", num_classes=10, width=RECIPE["width"], image_size=SIZE)
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(run / "model.safetensors")))
        acc = accuracy(model, *splits["heldout"])
        size = (run / "model.safetensors").stat().st_size
        print(f"trained in {seconds:.1f} s ({len(result.history)} epochs, torch threads "
              f"{torch.get_num_threads()}); held-out accuracy {acc:.4f} on "
              f"{len(splits['heldout'][1])} images; model {size / 1e6:.2f} MB; "
              f"classes {w.class_names}")
        if acc < 0.95:
            print("held-out accuracy below 0.95: not writing the model", file=sys.stderr)
            return 1
        if size >= MAX_BYTES:
            print(f"model is {size} bytes, over {MAX_BYTES}: not shipping it", file=sys.stderr)
            return 1
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(run / "model.safetensors", tmp_out)
        os.replace(tmp_out, out)
        print(f"wrote {out}")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

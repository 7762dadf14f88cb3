"""Ensemble.classify with its engines sharing each image's rescales vs each engine rescaling
again, on the CPU (a benchmark, not a test).

Ensemble.classify decodes a chunk of images once; each engine rescaled every image of it again.
The engines on one device now share the chunk's rescales (executor.SharedRescales): an image is
rescaled once per scale for all of them, then normalised by each engine's own preprocessing.
Both run here, in the same process, on --images JPEGs made from the bundled photos (each side
times --photo-scale), with an ensemble of random-init VGGs (--configs, --width, 10 classes,
seeded; torchvision and caffe preprocessing in turn), backend "torch", float32, --threads CPU
threads:
  unshared   Ensemble.classify with SharedRescales holding nothing (each engine rescales again:
             the ensemble as it was)
  shared     Ensemble.classify
The fused Results are checked equal bit for bit before anything is timed; then the variants
alternate --repeat times after a warm-up, and the medians are printed with the rescales (an image
to one scale, preprocess.resize_scales) each made. JSON (torch version, CPU, threads, git commit)
goes to --out when given.

    python bench/ensemble.py [--scales 40 48 64] [--photo-scale 1] [--out /tmp/ensemble.json]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
import tempfile
from pathlib import Path

import torch

from vggfast import Engine, Ensemble, preprocess as pp
from vggfast.nn import build_model

sys.path.insert(0, str(Path(__file__).parent))
from evaluate_methods import (  # noqa: E402  (the same JPEGs, checks and options)
    _folder, checked_medians, common_args, unshared, write_json)


def same_results(results: dict) -> bool:
    """The shared and unshared runs' fused Results and per-model Results equal bit for bit."""
    return all(torch.equal(a.probs, b.probs) and all(
        torch.equal(x.probs, y.probs) for x, y in zip(a.per_model, b.per_model))
        for a, b in zip(results["shared"], results["unshared"], strict=True))


def main() -> int:
    ap = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--configs", nargs="+", default=["D", "E", "A"])
    ap.add_argument("--method", default="dense")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engines = []
    for k, config in enumerate(args.configs):
        torch.manual_seed(args.seed + k)
        model = build_model(config, num_classes=10, width=args.width, image_size=32).eval()
        engines.append(Engine(model.state_dict(), backend="torch", device="cpu",
                              dtype=torch.float32,
                              preprocess=("torchvision", "caffe")[k % 2]))
    fusion = Ensemble(engines)
    resize, counts = pp.resize_scales, Counter()

    def counted_resize(x, qs):
        counts["rescales"] += len(qs)
        return resize(x, qs)
    pp.resize_scales = counted_resize

    def classify():
        return fusion.classify(items, scales=args.scales, method=args.method)

    # unshared: every engine rescales the images again
    variants = {"unshared": unshared(classify), "shared": classify}
    with tempfile.TemporaryDirectory() as tmp:
        items = [p for p, _ in _folder(Path(tmp), args.images, args.photo_scale)]
        _, calls, med, times = checked_medians(variants, counts, args.repeat, same_results,
                                               "the shared rescales changed a Result")
    print(f"{args.images} JPEGs (bundled photos x{args.photo_scale}), ensemble "
          f"{'+'.join(args.configs)} width {args.width:g}, {args.method}, scales {args.scales}, "
          f"torch fp32 cpu, {args.threads} thread(s), median of {args.repeat}")
    print(f"{'variant':<10} {'seconds':>8} {'rescales':>9}")
    for name in variants:
        print(f"{name:<10} {med[name]:>8.3f} {calls[name].get('rescales', 0):>9}")
    print(f"speed-up shared vs unshared: {med['unshared'] / med['shared']:.2f}x; Results equal")
    if args.out:
        write_json(args.out, args, med, times, calls=calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())

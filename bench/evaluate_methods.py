"""evaluate with several methods: one pass over the images vs one evaluate per method, on the CPU
(a benchmark, not a test).

`vggfast evaluate DIR --method dense multicrop dense+multicrop` ran protocols.evaluate once per
method, decoding every image each time; it now makes one call with the list of methods (each image
decoded once and rescaled once per scale for all methods, dense+multicrop fused from the other two
where that is bit for bit its own result).
All three run here, in the same process, on --images JPEGs made from the bundled photos (each side
times --photo-scale), with a random-init VGG (vggfast.nn.build_model, --config, --width,
--image-size, 10 classes, seeded), backend "torch", float32, --threads CPU threads:
  per-method   [evaluate(eng, pairs, scales, method=m) for m in METHODS]   (the anchor: the old CLI)
  unshared     evaluate(eng, pairs, scales, method=METHODS), each method rescaling the images again
               (executor.SharedRescales holding nothing: the one pass as it was before it shared)
  one-pass     evaluate(eng, pairs, scales, method=METHODS)
The rows are checked equal (top-1 / top-5 error, images, skipped files) before anything is timed;
then they alternate --repeat times after a warm-up, and the medians are printed with the decodes
(preprocess.load_image of a file), rescales (an image to one scale, preprocess.resize_scales) and
classify calls each variant made. JSON (torch version, CPU, threads, git commit) goes to --out
when given.

    python bench/evaluate_methods.py [--scales 40 48 64] [--photo-scale 1] [--out /tmp/eval.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from vggfast import Engine, executor, protocols
from vggfast.benchmark import git_commit
from vggfast.cli import sample_images
from vggfast.nn import build_model

METHODS = ["dense", "multicrop", "dense+multicrop"]


def _folder(root: Path, n: int, scale: float) -> list[tuple[str, int]]:
    photos = sorted(sample_images())
    pairs = []
    for k in range(n):
        img = Image.open(photos[k % len(photos)]).convert("RGB")
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        path = root / f"{k}.jpg"
        img.save(path, quality=90)
        pairs.append((str(path), k % 3))
    return pairs


def unshared(run):
    """run() with executor.SharedRescales holding nothing: every run rescales the images again,
    as before the rescales were shared."""
    init = executor.SharedRescales.__init__

    def variant():
        executor.SharedRescales.__init__ = lambda self, max_bytes: init(self, 0)
        try:
            return run()
        finally:
            executor.SharedRescales.__init__ = init
    return variant


def medians(variants: dict, repeat: int) -> tuple[dict, dict]:
    """({name: median seconds}, {name: [seconds]}): the variants run in turn `repeat` times (the
    caller has run each once: its check and warm-up)."""
    times = {name: [] for name in variants}
    for _ in range(repeat):
        for name, run in variants.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}, times


def checked_medians(variants: dict, counts: Counter, repeat: int, same, failure: str):
    """(results, calls, medians, times): each variant run once (`counts` cleared before each;
    calls[name] is what it counted), the results checked, then timed by medians(). Exits with
    status 1 after printing "FAIL: `failure`" when same(results) is false: nothing is timed."""
    results, calls = {}, {}
    for name, run in variants.items():     # the check, and the warm-up
        counts.clear()
        results[name] = run()
        calls[name] = dict(counts)
    if not same(results):
        print(f"FAIL: {failure}", file=sys.stderr)
        sys.exit(1)
    return (results, calls, *medians(variants, repeat))


def write_json(out: str, args, med: dict, times: dict, **extra) -> None:
    """The run's figures with its arguments, torch version, CPU and git commit, to `out`."""
    Path(out).write_text(json.dumps({
        "args": vars(args), "median_s": med, "times_s": times, **extra,
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
        "commit": git_commit()}, indent=2))


def common_args(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options both CPU benchmarks of shared work take: the JPEG folder, scales, threads,
    repeats, seed and --out."""
    ap.add_argument("--images", type=int, default=12)
    ap.add_argument("--photo-scale", type=float, default=1.0)
    ap.add_argument("--scales", type=int, nargs="+", default=[40, 48, 64])
    ap.add_argument("--width", type=float, default=1 / 16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap


def main() -> int:
    ap = common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    ap.add_argument("--config", default="D")
    ap.add_argument("--image-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.config, num_classes=10, width=args.width,
                        image_size=args.image_size).eval()
    eng = Engine(model.state_dict(), backend="torch", device="cpu", dtype=torch.float32)
    load, resize, counts = protocols.pp.load_image, protocols.pp.resize_scales, Counter()
    classify_decoded = eng._classify_decoded

    def counted_load(img):
        counts["decodes"] += isinstance(img, (str, Path))
        return load(img)

    def counted_resize(x, qs):
        counts["rescales"] += len(qs)
        return resize(x, qs)

    def counted_classify_decoded(imgs, scales, flip, method, *rest):
        counts[method] += 1
        return classify_decoded(imgs, scales, flip, method, *rest)

    protocols.pp.load_image, protocols.pp.resize_scales = counted_load, counted_resize
    eng._classify_decoded = counted_classify_decoded   # evaluate's run of each method
    variants = {
        "per-method": lambda: [protocols.evaluate(eng, pairs, args.scales, method=m,
                                                  progress=False) for m in METHODS],
        # one pass, but every method's run rescales the images again
        "unshared": unshared(lambda: protocols.evaluate(eng, pairs, args.scales, method=METHODS,
                                                        progress=False)),
        "one-pass": lambda: protocols.evaluate(eng, pairs, args.scales, method=METHODS,
                                               progress=False)}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = _folder(Path(tmp), args.images, args.photo_scale)
        rows, calls, med, times = checked_medians(
            variants, counts, args.repeat,
            lambda r: r["one-pass"] == r["unshared"] == r["per-method"],
            "the one-pass rows differ from one evaluate per method")
    print(f"{args.images} JPEGs (bundled photos x{args.photo_scale}), {args.config} width "
          f"{args.width:g}, scales {args.scales}, torch fp32 cpu, {args.threads} thread(s), "
          f"median of {args.repeat}")
    print(f"{'variant':<12} {'seconds':>8} {'decodes':>8} {'rescales':>9}  classify calls")
    for name in variants:
        c = calls[name]
        print(f"{name:<12} {med[name]:>8.3f} {c.get('decodes', 0):>8} {c.get('rescales', 0):>9}  "
              + ", ".join(f"{m} {c.get(m, 0)}" for m in METHODS))
    print(f"speed-up one-pass vs per-method: {med['per-method'] / med['one-pass']:.2f}x, vs "
          f"unshared rescales: {med['unshared'] / med['one-pass']:.2f}x; rows equal")
    if args.out:
        write_json(args.out, args, med, times, calls=calls, rows=rows["one-pass"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

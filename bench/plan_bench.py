"""Planner cost, and batched vs one-by-one classify on a GPU: 64 mixed-size photos at scales
256/384/512 with flips, dense evaluation (a benchmark, not a test).

Default mode, on the CPU: times, as medians over --repeat runs after a warm-up,
  plan (uncached)   Scheduler.plan with no cache: argument checks, C++ planning, Python records
  C++ make_plan     the extension call alone
  key + cache hit   what a repeated request costs (Scheduler with its plan cache)
  arena tensors     building every arena's tensor records (done lazily, once, by the executor)
Each plan is checked before it is timed (every view in one batch slot, budget kept, no two live
tensors sharing a byte). Run: python bench/plan_bench.py [--json out.json]

--gpu (issue 5's bar): one Engine (a VGG16 of vggfast.nn.build_model("D"), random init seeded by
--seed, backend "triton", bfloat16, cuda) classifies --images (64) photos of common camera and web
resolutions (4:3, 16:9, 3:2, 1:1, each landscape or portrait at random, seeded) at scales
256/384/512 with flip, dense, two ways in the same run:
  batched   one eng.classify(images, scales=...) call: the planner puts the views of equal shape
            of all the images into shared batches
  loop      [eng.classify(img, scales=...) for img in images]: three batches of two views a photo
Each is called --calls (3) times in a row, timed with torch.cuda.synchronize() and
time.perf_counter(): call 1 "cold" (Triton JIT compiles, autotuning, cuDNN/plan building; every
batch runs eagerly), call 2 (the engine's GraphCache captures a CUDA graph of each batch shape
the second time it meets it, so this call pays the captures), call 3 "warm" (replays only: the
steady state; the warm ratio uses the last call). The loop meets repeated photo sizes within one
call, so its captures start in call 1. The variant run first pays the kernel compiles the other
then finds cached (--loop-first swaps them).
The images are random float tensors [3, H, W] in [0, 1] already on the CPU: decoding is not
timed; everything classify does from there on (checks, resize, normalise, planning, forward,
reduction, the copy of the results to the CPU) is. Printed: the batched call's plan summary
(views, batches, peak memory), a table (variant, call, seconds, images/s, TFLOP/s, peak MiB,
CUDA graphs captured), the warm throughput ratio batched / loop, each variant's cold (eager) vs
warm (replayed) probabilities, and whether the two variants agree (top-1 class of every image, max
|p_batched - p_loop| of the probabilities, and of the log-probabilities beside their spread: a
random-init net's posteriors are close to uniform, so a top-1 flip whose margin is below the
difference is rounding between batch compositions, not a wrong view). JSON (GPU name, driver,
torch/triton versions, git commit) goes to --out (default bench/results/mixed.json). Without
CUDA, --gpu says so and exits 0 having done nothing. --e2e-cpu runs the same comparison on the
CPU with the torch backend in float32 (a smoke test of this script: small --width and --images).

    python bench/plan_bench.py --gpu [--images 64] [--out bench/results/mixed.json]
    python bench/plan_bench.py --e2e-cpu --images 4 --width 0.0625 --out /tmp/mixed.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from vggfast import scheduler as S
from vggfast.configs import make_spec

# Photo sizes (h, w) as cameras and phones write them: 4:3, 3:2, 16:9 both ways, squares, panoramas.
ASPECTS = [(3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9), (1, 1), (1, 3), (5, 4)]


def photo_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        a, b = rng.choice(ASPECTS)
        short = rng.choice([480, 600, 768, 1080, 1200, 2000, 3000]) + rng.randint(-40, 40)
        sizes.append((short * a // min(a, b), short * b // min(a, b)))
    return sizes


# Camera and web resolutions (w, h), landscape; --gpu turns each portrait with probability 1/2.
RESOLUTIONS = [
    (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2048, 1536),  # 4:3
    (1280, 720), (1920, 1080),                                                      # 16:9
    (600, 400), (1500, 1000), (3000, 2000),                                         # 3:2
    (500, 500), (1000, 1000),                                                       # 1:1
]
SCALES = (256, 384, 512)


def camera_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """n (h, w) sizes drawn from RESOLUTIONS, each landscape or portrait at random (seeded)."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        w, h = rng.choice(RESOLUTIONS)
        sizes.append((h, w) if rng.random() < 0.5 else (w, h))
    return sizes


def check(plan, n_views: int, budget: int) -> None:
    assert len(plan.views) == n_views
    slots = sorted(v for b in plan.batches for v in b.views)
    assert slots == list(range(n_views))
    assert plan.peak_bytes <= budget
    for a in plan.arenas:
        for x, y in itertools.combinations(a.tensors, 2):
            if x.first <= y.last and y.first <= x.last:
                assert x.offset + x.bytes <= y.offset or y.offset + y.bytes <= x.offset


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--config", default="D")
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--elem-size", type=int, default=2, help="2 = bf16/fp16, 4 = fp32")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--gpu", action="store_true",
                    help="instead: batched vs looped Engine.classify on the GPU (triton, bf16)")
    ap.add_argument("--e2e-cpu", action="store_true",
                    help="instead: the --gpu comparison on the CPU (torch backend, float32)")
    ap.add_argument("--width", type=float, default=1.0,
                    help="channel width of the --gpu / --e2e-cpu model (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the model, sizes and pixels")
    ap.add_argument("--loop-first", action="store_true",
                    help="--gpu: run the loop variant before the batched one")
    ap.add_argument("--calls", type=int, default=3,
                    help="--gpu: calls of each variant (cold, capture, warm; default 3)")
    ap.add_argument("--out", default=str(Path("bench") / "results" / "mixed.json"),
                    help="--gpu / --e2e-cpu JSON (default bench/results/mixed.json)")
    args = ap.parse_args()
    if args.images < 1:
        ap.error("--images must be at least 1")
    if args.calls < 2:
        ap.error("--calls must be at least 2 (a cold and a warm call)")
    if args.gpu:
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: the --gpu comparison needs one; nothing run (without --gpu "
                  "this script times the planner on the CPU)")
            return 0
        return end_to_end(args, "cuda", "triton", torch.bfloat16)
    if args.e2e_cpu:
        import torch
        return end_to_end(args, "cpu", "torch", torch.float32)

    spec = make_spec(args.config)
    sizes = photo_sizes(args.images)
    scales = (256, 384, 512)
    budget = int(args.budget_gib * (1 << 30))
    rows = []
    for method, grid in (("dense", 5), ("dense+multicrop", 5)):
        req = dict(scales=scales, flip=True, method=method, grid=grid)
        uncached = S.Scheduler(spec, elem_size=args.elem_size, memory_budget=budget, cache_size=0)
        cached = S.Scheduler(spec, elem_size=args.elem_size, memory_budget=budget)
        plan = uncached.plan(sizes, **req)
        per_scale = 2 * ((method != "multicrop") + (grid * grid if "multicrop" in method else 0))
        check(plan, args.images * len(scales) * per_scale, budget)

        layers = S.layers_of(spec)
        creq = S._request(sizes, scales, True, method, None, grid)
        copt = S._options(spec, args.elem_size, budget, None, 0, True, S.DEFAULT_ALIGN, ())
        cached.plan(sizes, **req)

        def tensors_ms() -> float:
            times = []
            for _ in range(max(5, args.repeat // 5)):
                p = uncached.plan(sizes, **req)
                t = time.perf_counter()
                for a in p.arenas:
                    a.tensors
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)

        row = dict(
            method=method, images=args.images, views=len(plan.views), sizes=len(plan.shapes),
            batches=len(plan.batches), arenas=len(plan.arenas), peak_mib=plan.peak_bytes / 2**20,
            naive_mib=plan.naive_bytes / 2**20, tflop=plan.flops / 1e12,
            plan_ms=median_ms(lambda: uncached.plan(sizes, **req), args.repeat),
            cxx_ms=median_ms(lambda: S._C.make_plan(layers, creq, copt), args.repeat),
            hit_ms=median_ms(lambda: cached.plan(sizes, **req), args.repeat),
            tensors_ms=tensors_ms(),
        )
        rows.append(row)
        print(plan.summary(max_rows=5))
        print()

    print(f"planner cost, VGG {args.config}, {args.images} mixed-size images, scales "
          f"{'/'.join(map(str, scales))} + flip, {args.elem_size}-byte activations, budget "
          f"{args.budget_gib:g} GiB; CPU {platform.processor() or platform.machine()}, median of "
          f"{args.repeat}")
    head = ("method", "views", "batches", "peak MiB", "plan ms", "C++ ms", "hit ms", "tensors ms")
    print("  ".join(f"{h:>15}" for h in head))
    for r in rows:
        vals = (r["method"], r["views"], r["batches"], f"{r['peak_mib']:.1f}", f"{r['plan_ms']:.2f}",
                f"{r['cxx_ms']:.2f}", f"{r['hit_ms']:.3f}", f"{r['tensors_ms']:.2f}")
        print("  ".join(f"{v:>15}" for v in vals))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(python=platform.python_version(), machine=platform.machine(),
                           rows=rows), f, indent=1)
    return 0


def end_to_end(args, device: str, backend: str, dtype) -> int:
    """One eng.classify(images) call vs a loop of eng.classify(img), cold and warm (module doc)."""
    import torch

    import vggfast
    from vggfast.benchmark import meta

    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    torch.manual_seed(args.seed)
    model = vggfast.build_model(args.config, width=args.width)
    eng = vggfast.Engine(model, config=args.config, device=dev, dtype=dtype, backend=backend)
    sizes = camera_sizes(args.images, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]  # "decoded" photos, CPU
    info = meta(dev)
    print(f"{eng!r}\non {info.get('gpu') or info.get('cpu')}; torch {info['torch']}, triton "
          f"{info['triton']}, commit {info['git_commit'][:12]}")
    print(f"{len(images)} photos: " + ", ".join(
        f"{w}x{h}" + (f" (x{n})" if n > 1 else "") for (h, w), n in Counter(sizes).most_common()))

    plan = eng.plan(images, scales=SCALES)
    loop_batches = sum(len(eng.plan(img, scales=SCALES).batches) for img in images)
    print(plan.summary(max_rows=8))
    print(f"  (the loop runs {loop_batches} batches: one per photo and scale)")

    variants = {"batched": lambda: eng.classify(images, scales=SCALES),
                "loop": lambda: [eng.classify(img, scales=SCALES) for img in images]}
    order = ["loop", "batched"] if args.loop_first else ["batched", "loop"]
    rows, probs = [], {}
    labels = ["cold"] + [f"call {i}" for i in range(2, args.calls)] + ["warm"]
    for name in order:
        for call in labels:
            captures = _graph_stat(eng, "captures")
            sync()
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
            t = time.perf_counter()
            out = variants[name]()
            sync()
            sec = time.perf_counter() - t
            rows.append(dict(variant=name, call=call, seconds=sec,
                             images_per_s=len(images) / sec, tflops=plan.flops / sec / 1e12,
                             peak_extra_mib=((torch.cuda.max_memory_allocated(dev) - base) / 2**20
                                             if cuda else None),
                             graph_captures=(None if captures is None else
                                             _graph_stat(eng, "captures") - captures)))
            probs[name, call] = torch.stack([r.probs for r in out])

    print(f"\n{'variant':>8}  {'call':>6}  {'seconds':>8}  {'images/s':>8}  {'TFLOP/s':>7}  "
          f"{'peak MiB':>8}  {'captures':>8}")
    for r in rows:
        mib = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        cap = "-" if r["graph_captures"] is None else str(r["graph_captures"])
        print(f"{r['variant']:>8}  {r['call']:>6}  {r['seconds']:8.3f}  {r['images_per_s']:8.1f}  "
              f"{r['tflops']:7.1f}  {mib:>8}  {cap:>8}")
    warm = {r["variant"]: r["seconds"] for r in rows if r["call"] == "warm"}
    ratio = warm["loop"] / warm["batched"]
    print(f"warm throughput batched / loop: {ratio:.2f}x")

    # The same variant's cold (eager) and warm (graph replay) calls run the same kernels.
    replay_diff = {v: (probs[v, "warm"] - probs[v, "cold"]).abs().max().item() for v in variants}
    print("cold vs warm call (eager vs CUDA-graph replay), max |dp|: " + ", ".join(
        f"{v} {d:.3g}" for v, d in replay_diff.items()))
    pb, pl = probs["batched", "warm"], probs["loop", "warm"]
    diff = (pb - pl).abs().max().item()
    same = pb.argmax(1) == pl.argmax(1)
    # Random weights give near-uniform posteriors: compare log-probabilities with their spread.
    lb, ll = pb.clamp_min(1e-30).log(), pl.clamp_min(1e-30).log()
    dlog = (lb - ll).abs().max().item()
    spread = (ll - ll.mean(1, keepdim=True)).abs().max().item()
    print(f"agreement: top-1 class equal on {int(same.sum())}/{len(images)} images; max |p_batched "
          f"- p_loop| = {diff:.3g} (largest probability {pl.max().item():.3g}); max |log p_batched "
          f"- log p_loop| = {dlog:.3g} against a log-probability spread of {spread:.3g}")
    top2 = pl.topk(2, dim=1).values
    for i in (~same).nonzero().flatten().tolist():
        print(f"  image {i} ({sizes[i][1]}x{sizes[i][0]}): batched top-1 {int(pb[i].argmax())}, "
              f"loop top-1 {int(pl[i].argmax())}; loop's top-2 margin "
              f"{(top2[i, 0] - top2[i, 1]).item():.3g}")

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(dict(
        meta=info, engine=repr(eng), config=args.config, width=args.width, seed=args.seed,
        device=str(dev), backend=backend, dtype=str(dtype).replace("torch.", ""),
        scales=list(SCALES), flip=True, method="dense", decode_timed=False,
        image_sizes_hw=[list(s) for s in sizes], order=order,
        plan=dict(key=plan.key, views=len(plan.views), input_sizes=len(plan.shapes),
                  batches=len(plan.batches), loop_batches=loop_batches,
                  peak_bytes=plan.peak_bytes, naive_bytes=plan.naive_bytes,
                  budget_bytes=plan.budget_bytes, tflop=plan.flops / 1e12),
        cuda_graphs=eng.cuda_graphs, graph_captures=_graph_stat(eng, "captures"),
        graph_replays=_graph_stat(eng, "replays"), rows=rows, warm_batched_over_loop=ratio,
        cold_vs_warm_max_abs_prob_diff=replay_diff, top1_agree=int(same.sum()),
        max_abs_prob_diff=diff, max_abs_log_prob_diff=dlog, log_prob_spread=spread), indent=1))
    print(f"wrote {out_path}")
    return 0


def _graph_stat(eng, name: str):
    """A counter of the engine's CUDA-graph cache (None without one)."""
    cache = getattr(eng._executor, "graphs", None)
    return getattr(cache, name, None)


if __name__ == "__main__":
    sys.exit(main())

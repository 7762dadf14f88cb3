"""Planner cost: 64 mixed-size photos at scales 256/384/512 with flips (a benchmark, not a test).

Times, as medians over --repeat runs after a warm-up, on the CPU:
  plan (uncached)   Scheduler.plan with no cache: argument checks, C++ planning, Python records
  C++ make_plan     the extension call alone
  key + cache hit   what a repeated request costs (Scheduler with its plan cache)
  arena tensors     building every arena's tensor records (done lazily, once, by the executor)
Each plan is checked before it is timed (every view in one batch slot, budget kept, no two live
tensors sharing a byte). Run: python bench/plan_bench.py [--json out.json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import statistics
import time

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--config", default="D")
    ap.add_argument("--budget-gib", type=float, default=16.0)
    ap.add_argument("--elem-size", type=int, default=2, help="2 = bf16/fp16, 4 = fp32")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()

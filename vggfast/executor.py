"""Runs the C++ planner's plans through an Engine's backend.

A request (images, scales, flips, dense and/or multi-crop views) is planned once by
`vggfast.scheduler.Scheduler` (views, equal-size buckets split to fit the memory budget, plan key
cache); the executor then builds each batch's input from the images (rescale once per image and
scale, crop, flip, normalise), runs it through the backend in one call, and reduces each view's
output (by default the spatial mean of the class score map) into a row of the result.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import preprocess as pp
from .scheduler import Plan, Scheduler


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, C]: the paper's sum-pooling of the class score map (as a mean)."""
    return t.mean(dim=(2, 3))


class Executor:
    """Plans and runs requests for one engine.

    The arena sizes of the plan model the fused Triton forward (NHWC, `dtype` elements); the torch
    reference backend allocates its own tensors, and the plan then only bounds its batch sizes.
    """

    def __init__(self, engine):
        self.engine = engine
        backend = engine._backend
        self.scheduler = Scheduler(engine.spec, elem_size=torch.finfo(engine.dtype).bits // 8,
                                   memory_budget=engine.memory_budget,
                                   fuse_pool=bool(getattr(backend, "fuses_pool", False)))

    def plan(self, images: Sequence[torch.Tensor], scales: Sequence[int], flip: bool,
             method: str, keep: Sequence[str] = ()) -> Plan:
        sizes = [tuple(x.shape[-2:]) for x in images]
        return self.scheduler.plan(sizes, tuple(scales), flip, method, keep=tuple(keep))

    def run(self, plan: Plan, images: Sequence[torch.Tensor], tap: str = "fc8",
            reduce: Callable[[torch.Tensor], torch.Tensor] = spatial_mean) -> list[torch.Tensor]:
        """Run every batch of `plan`; returns reduce(output of `tap`) per view, in view order."""
        last_use: dict[tuple[int, int], int] = {}
        for b in plan.batches:
            for vi in b.views:
                v = plan.views[vi]
                last_use[(v.image, v.scale)] = b.index
        rescaled: dict[tuple[int, int], torch.Tensor] = {}
        out: list[torch.Tensor | None] = [None] * len(plan.views)
        convention = self.engine.preprocess
        for b in plan.batches:
            xs = []
            for vi in b.views:
                v = plan.views[vi]
                key = (v.image, v.scale)
                r = rescaled.get(key)
                if r is None:
                    r = rescaled[key] = pp.resize_short(images[v.image], v.scale)
                if v.crop is not None:
                    x0, y0, x1, y1 = v.crop
                    r = r[:, y0:y1, x0:x1]
                xs.append(r.flip(-1) if v.flip else r)
            x = pp.normalize(torch.stack(xs), convention)
            y = reduce(self.engine._backend.run(x, (tap,))[tap]).cpu()
            for slot, vi in enumerate(b.views):
                out[vi] = y[slot]
            for key in [k for k, last in last_use.items() if last == b.index]:
                rescaled.pop(key, None)
        return out  # type: ignore[return-value]

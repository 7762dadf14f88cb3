"""Runs the C++ planner's plans through an Engine's backend.

A request (images, scales, flips, dense and/or multi-crop views) is planned once by
`vggfast.scheduler.Scheduler` (views, equal-size buckets split to fit the memory budget, plan key
cache); the executor then builds each batch's input from the images (rescale once per image and
scale, crop, flip, normalise), runs it through the backend, and reduces each view's output (by
default the spatial mean of the class score map) into a row of the result.

Waves: when the backend can group the requested output (the triton backend, `run_many`), the
plan's batches are cut into waves whose arenas fit the memory budget together, and each wave is
ONE grouped forward: every layer one kernel launch for all the wave's batches, whatever their
sizes. A dense 3-scale + flip request is then 16 launches (VGG16) instead of 48, and 64 mixed
photos are 16 launches per wave instead of 16 per distinct size. Without CUDA graphs the waves'
intermediate activations live in one arena the executor allocates once per plan key (repeated
requests reuse it): a grouped wave's layer outputs ping-pong between two regions (see
triton_backend.GroupPlan), and a wave of one batch puts every activation at the offset the C++
planner's arena layout gave it (`run_planned`). A captured graph takes its memory from the
graph pool instead.

On CUDA the images are moved to the device before rescaling (the antialiased resize runs on the
GPU), and each wave's forward goes through a `GraphCache`: a wave seen for the second time is
captured in a CUDA graph, and every later wave of the same shapes replays it, so a repeated
request (the same plan key: same image sizes, scales, flips, crops) costs no kernel launches from
Python.
"""
from __future__ import annotations

import threading
import warnings
from collections import Counter, OrderedDict
from typing import Callable, Sequence

import torch

from . import preprocess as pp
from .errors import VGGFastError
from .scheduler import Plan, Scheduler
from .triton_backend import on_device


def spatial_mean(t: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N, C]: the paper's sum-pooling of the class score map (as a mean)."""
    return t.mean(dim=(2, 3))


class GraphCache:
    """CUDA graphs of one backend's forward, keyed by (input shape, dtype, tap), LRU-bounded.

    Keyed by the batch's input shape rather than by the whole plan key: every batch of a repeated
    plan replays, and so does any batch of the same shape in another plan. A shape's first batch
    runs eagerly (Triton compiles and autotunes, cuDNN picks its algorithms, outside any capture);
    its second is captured (after one warm-up on a side stream) and replayed; later ones replay.
    All graphs share one memory pool: replays are sequential on one stream and each output is
    consumed before the next replay, so a graph may reuse another's intermediate memory. If a
    capture fails the cache warns once and runs that backend eagerly from then on.

    Bounds: at most `capacity` graphs, and at most `max_bytes` of static inputs and outputs held
    by them (least recently used go first; a batch larger than that alone is never captured);
    the shapes seen once are forgotten past `SEEN_LIMIT` of them (a server meeting endless new
    photo sizes).
    """

    SEEN_LIMIT = 10_000

    def __init__(self, capacity: int = 32, max_bytes: int | None = None):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self.held_bytes = 0
        self.seen: Counter = Counter()
        self.pool = None
        self.disabled = False
        self.captures = self.replays = 0

    def run(self, forward: Callable, x: torch.Tensor | tuple[torch.Tensor, ...], tap: str,
            keep: object = None):
        """forward(x) through the cache; x is a tensor or a tuple of tensors (a grouped wave of
        batches). The result may be a graph's static output (a tensor or a list of them), valid
        until the next call: consume or copy it first. keep: an object a captured graph reads
        from (device tables) and that must live as long as the graph; held by its entry."""
        key = _key(x) + (tap,)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.seen) >= self.SEEN_LIMIT:
                self.seen.clear()
            self.seen[key] += 1
            too_big = self.max_bytes is not None and _nbytes(x) > self.max_bytes
            if self.disabled or self.seen[key] < 2 or too_big:
                return forward(x)
            entry = self._capture(forward, x, key, keep)
            if entry is None:
                return forward(x)
        self.graphs.move_to_end(key)
        static_in, static_out, graph = entry[:3]
        _copy(static_in, x)
        graph.replay()
        self.replays += 1
        return static_out

    def _capture(self, forward, x, key, keep=None):
        # Normal tensors even under a caller's inference_mode: every replay copies into them,
        # which a later call outside inference_mode could not do to inference tensors.
        with torch.inference_mode(False):
            static_in = x.clone() if isinstance(x, torch.Tensor) else tuple(t.clone() for t in x)
        try:
            static_out, graph = self._record(forward, static_in)
        except VGGFastError:
            raise
        except Exception as exc:   # noqa: BLE001 - any capture failure: fall back to eager
            self.disabled = True
            warnings.warn(f"vggfast: CUDA graph capture failed ({str(exc).splitlines()[0]}); "
                          "running without CUDA graphs", RuntimeWarning, stacklevel=3)
            return None
        self.captures += 1
        held = _nbytes(static_in) + _nbytes(static_out)
        self.graphs[key] = entry = (static_in, static_out, graph, held, keep)
        self.held_bytes += held
        while len(self.graphs) > 1 and (len(self.graphs) > self.capacity or (
                self.max_bytes is not None and self.held_bytes > self.max_bytes)):
            self.held_bytes -= self.graphs.popitem(last=False)[1][3]
        return entry

    def _record(self, forward, static_in):
        """Capture forward(static_in) in a CUDA graph -> (static output, graph)."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        device = (static_in if isinstance(static_in, torch.Tensor) else static_in[0]).device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            forward(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Captured on `side`, a stream of the input's device: torch.cuda.graph's default capture
        # stream is one per process, made on whichever device was current at the first capture.
        # thread_local: CUDA work of the caller's other threads (a logits() or FeatureExtractor
        # call, a data loader's copies) neither fails nor invalidates this capture, as it would
        # under the default "global" mode; only this thread's unsafe calls are refused.
        with torch.cuda.graph(graph, pool=self.pool, stream=side,
                              capture_error_mode="thread_local"):
            static_out = forward(static_in)
        return static_out, graph


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(map(_nbytes, t))


def _key(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype)
    return (tuple((tuple(t.shape), t.dtype) for t in x),)


def _copy(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            d.copy_(s)


def _fresh(y: torch.Tensor, raw) -> torch.Tensor:
    """y, cloned if it shares storage with a graph's static output `raw` (overwritten by the
    next replay)."""
    if y.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr():
        return y.clone()
    return y


class SharedRescales:
    """Rescaled images (`preprocess.resize_scales`' float32 [3, H_q, W_q]) kept across several
    `Executor.run` calls on the same decoded images: `evaluate` runs one plan per method on a
    chunk, and dense and multi-crop views at scale Q both cut from the image rescaled to Q.

    Keyed by the image tensor itself (the object `run` is given, held here so its id stays
    its own), so a request of some of the images (one run alone past the memory budget) finds
    them too. At most `max_bytes` are held: past it an image's rescales are not kept and a
    later run makes them again, the same numbers (resize_scales gives each scale's image from
    the image alone, whichever other scales it makes with it), so sharing changes no result.
    On CUDA they stay on the device, beside the activations, hence the bound."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, image: torch.Tensor, q: int) -> torch.Tensor | None:
        entry = self._views.get((id(image), q))
        return entry[1] if entry is not None and entry[0] is image else None

    def put(self, image: torch.Tensor, q: int, r: torch.Tensor) -> None:
        size = r.numel() * r.element_size()
        if self.held_bytes + size <= self.max_bytes and (id(image), q) not in self._views:
            self._views[(id(image), q)] = (image, r)
            self.held_bytes += size


class Executor:
    """Plans and runs requests for one engine.

    The arena sizes of the plan model the fused Triton forward (NHWC, `dtype` elements); the torch
    reference backend allocates its own tensors, and the plan then only bounds its batch sizes.
    """

    MAX_WAVE = 64   # batches per grouped wave (bounds the per-wave tables and graph keys)

    def __init__(self, engine):
        self.engine = engine
        backend = engine._backend
        self.scheduler = Scheduler(engine.spec, elem_size=torch.finfo(engine.dtype).bits // 8,
                                   memory_budget=engine.memory_budget,
                                   fuse_pool=bool(getattr(backend, "fuses_pool", False)))
        # Graphs may hold a quarter of the activation budget in static inputs and outputs.
        self.graphs = (GraphCache(max_bytes=engine.memory_budget // 4)
                       if getattr(engine, "cuda_graphs", False) else None)
        self._arena: torch.Tensor | None = None
        self._arena_key: str | None = None
        # One request runs at a time: the arena and the graphs' static buffers are shared by
        # every request, so two threads (a server's workers) would overwrite each other's
        # activations. `run` holds it until its results are on the host, i.e. until the device
        # is done with them, whatever stream each caller is on.
        self._lock = threading.Lock()

    def plan(self, images: Sequence[torch.Tensor], scales: Sequence[int], flip: bool,
             method: str, keep: Sequence[str] = ()) -> Plan:
        return self.plan_sizes([tuple(x.shape[-2:]) for x in images], scales, flip, method, keep)

    def plan_sizes(self, sizes: Sequence[tuple[int, int]], scales: Sequence[int], flip: bool,
                   method: str, keep: Sequence[str] = ()) -> Plan:
        """The scheduler's plan for images of `sizes` ((H, W) each), refused (MemoryBudgetError
        about "image K") where it is over the budget: the planner's arenas (and crop methods'
        whole rescales), then what `run` holds to rescale each image to all its scales at once
        (pp.resize_scales, counted in Python beside the plan: Engine._check_rescales)."""
        sizes = list(sizes)
        plan = self.scheduler.plan(sizes, tuple(scales), flip, method, keep=tuple(keep))
        self.engine._check_rescales([(int(h), int(w)) for h, w in sizes], plan.scales)
        return plan

    def _arena_for(self, plan: Plan, needs: list[int]) -> torch.Tensor | None:
        """The activation arena for `plan`'s waves run eagerly (a grouped wave's ping-pong
        regions, or a lone batch's C++-planned layout): allocated once per plan key (a repeated
        request reuses it; another request replaces it), None under graphs (a captured graph
        takes its memory from the graph pool)."""
        if not needs or self.graphs is not None:
            return None
        need = max(needs)
        if self._arena_key != plan.key or self._arena is None or self._arena.numel() < need:
            self._arena = None   # the old one goes back to the allocator first
            # A normal tensor under a caller's inference_mode too: later requests write it
            # whatever their mode (that its dtype views are not inference tensors in torch 2.14
            # is not relied upon).
            with torch.inference_mode(False):
                self._arena = torch.empty(need, dtype=torch.uint8, device=self.engine.device)
            self._arena_key = plan.key
        return self._arena

    def waves(self, plan: Plan, tap: str) -> list[list]:
        """The plan's batches in order, cut into waves run together: one grouped forward
        (`run_many`: each layer one launch for every batch of the wave) when the backend can
        group `tap`, else one batch per wave. A wave's arenas together fit the plan's budget."""
        backend = self.engine._backend
        if not (hasattr(backend, "run_many") and backend.can_group(tap)):
            return [[b] for b in plan.batches]
        waves: list[list] = []
        used = 0
        for b in plan.batches:
            need = plan.arenas[b.arena].total_bytes
            if waves and used + need <= plan.budget_bytes and len(waves[-1]) < self.MAX_WAVE:
                waves[-1].append(b)
                used += need
            else:
                waves.append([b])
                used = need
        return waves

    def run(self, plan: Plan, images: Sequence[torch.Tensor], tap: str = "fc8",
            reduce: Callable[[torch.Tensor], torch.Tensor] = spatial_mean,
            shared: SharedRescales | None = None) -> list[torch.Tensor]:
        """Run every batch of `plan`; returns reduce(output of `tap`) per view (on the host), in
        view order. shared: rescaled images to take from and keep for later runs on the same
        images (see `SharedRescales`); None: each is dropped after its last batch. Thread-safe:
        concurrent calls run one after the other."""
        with self._lock, on_device(self.engine.device):
            return self._run(plan, images, tap, reduce, shared)

    def _run(self, plan, images, tap, reduce, shared=None) -> list[torch.Tensor]:
        last_use: dict[tuple[int, int], int] = {}
        for b in plan.batches:
            for vi in b.views:
                v = plan.views[vi]
                last_use[(v.image, v.scale)] = b.index
        last_image_use, scales_of = {}, {}
        for (i, q), last in last_use.items():
            last_image_use[i] = max(last, last_image_use.get(i, -1))
            scales_of.setdefault(i, []).append(q)
        rescaled: dict[tuple[int, int], torch.Tensor] = {}
        out: list[torch.Tensor | None] = [None] * len(plan.views)
        convention = self.engine.preprocess
        backend = self.engine._backend
        device = self.engine.device
        on_device: dict[int, torch.Tensor] = {}
        kept = {} if shared is None else {
            key: r for key in last_use if (r := shared.get(images[key[0]], key[1])) is not None}
        if device.type == "cuda":
            # Rescale on the GPU. Every image goes up before the first kernel is queued: a copy
            # from pageable memory waits for the work already queued, so uploads between batches
            # would stall the pipeline. One whose every rescale is shared stays on the host.
            on_device = {i: images[i].to(device) for i in sorted(last_image_use)
                         if any((i, q) not in kept for q in scales_of[i])}
        pending: list[tuple] = []

        def batch_input(b) -> torch.Tensor:
            xs = []
            for vi in b.views:
                v = plan.views[vi]
                key = (v.image, v.scale)
                if key not in rescaled:
                    # Every scale of the image now, from one pass over it (resize_scales: a
                    # uint8 image converted to float a chunk of rows at a time; a whole 48-MP
                    # photo's float copy is 0.6 GB).
                    qs = [q for q in scales_of[v.image] if (v.image, q) not in kept]
                    x = on_device.get(v.image, images[v.image])
                    for q, r in zip(qs, pp.resize_scales(x, qs) if qs else ()):
                        rescaled[(v.image, q)] = r
                        if shared is not None:
                            shared.put(images[v.image], q, r)
                    for q in scales_of[v.image]:
                        if (v.image, q) in kept:
                            rescaled[(v.image, q)] = kept.pop((v.image, q))
                r = rescaled[key]
                if v.crop is not None:
                    x0, y0, x1, y1 = v.crop
                    r = r[:, y0:y1, x0:x1]
                xs.append(r.flip(-1) if v.flip else r)
            return pp.normalize(torch.stack(xs), convention)

        waves = self.waves(plan, tap)
        # Grouped waves: the problem tables go to the device now, outside any graph capture (a
        # captured graph keeps them alive), and, without graphs, the intermediate activations of
        # every wave live in one arena allocated once per plan key (graphs take theirs from the
        # graph pool).
        preps = [backend.prepare_many([(b.size, 3, b.height, b.width) for b in w], tap)
                 if len(w) > 1 else None for w in waves]
        # A lone batch of the standard forward runs on the C++ planner's arena layout.
        planned = (hasattr(backend, "run_planned") and bool(plan.ops)
                   and tap == plan.ops[-1].name)
        needs = [p.arena_bytes for p in preps if p is not None]
        if planned and any(len(w) == 1 for w in waves):
            needs.append(plan.peak_bytes)
        arena = self._arena_for(plan, needs)
        for wave, prepared in zip(waves, preps):
            xs = tuple(batch_input(b) for b in wave)
            with torch.no_grad():
                if len(wave) == 1 and planned:
                    layout = plan.arenas[wave[0].arena]
                    forward = lambda t: backend.run_planned(t, layout, plan.ops, arena)  # noqa: E731
                    xs = xs[0]
                elif len(wave) == 1:
                    forward = lambda t: backend.run(t, (tap,))[tap]   # noqa: E731
                    xs = xs[0]
                else:
                    forward = lambda ts, p=prepared: backend.run_many(ts, tap, p, arena)  # noqa: E731
                raw = (self.graphs.run(forward, xs, tap, keep=prepared)
                       if self.graphs is not None else forward(xs))
                raws = [raw] if len(wave) == 1 else raw
                # A graph's static output is overwritten by its next replay: keep copies.
                ys = [_fresh(reduce(r), r) if self.graphs is not None else reduce(r)
                      for r in raws]
            # Results stay on the device until every batch is queued: no sync per batch, so the
            # CPU prepares the next batch while the GPU runs this one.
            pending.extend(zip(wave, ys))
            done = {b.index for b in wave}
            for key in [k for k, last in last_use.items() if last in done]:
                rescaled.pop(key, None)
            for i in [i for i, last in last_image_use.items() if last in done]:
                on_device.pop(i, None)
        ys = [y for _, y in pending]
        if len(ys) > 1 and all(
                y.dim() == ys[0].dim() and y.shape[1:] == ys[0].shape[1:]
                and y.dtype == ys[0].dtype for y in ys):
            # One device-to-host copy for the whole request (each copy waits for the GPU).
            ys = list(torch.cat(ys).cpu().split([y.shape[0] for y in ys]))
        for (b, _), y in zip(pending, ys):
            y = y.cpu()
            for slot, vi in enumerate(b.views):
                out[vi] = y[slot]
        return out  # type: ignore[return-value]

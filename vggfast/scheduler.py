"""Python face of the C++ planner (csrc/ -> vggfast._scheduler). No planning happens here.

A request (image sizes, scales Q, flips, dense and/or multi-crop views) becomes a `Plan`:

- views: one per network input, `View(image, scale, flip, crop, height, width, ...)`; the
  rescale is `rescaled_size` (the rule vggfast/preprocess.py applies: smallest side -> Q, the
  other (Q * long) // short), crops are a grid x grid regular grid over the rescaled image with
  origins (i * (side - crop)) // (grid - 1), cut from the unflipped image and then mirrored.
- shapes: per distinct input size, every layer's output size (`Shape.layers`).
- batches: views of equal size, split into near-equal batches that fit `memory_budget`, largest
  work first; `Batch.views` lists view indices in slot order.
- arenas: per batch shape (n, h, w) the tensors of the forward, NHWC, with byte offsets into one
  buffer of `Plan.peak_bytes` bytes that every batch of the plan shares.
- ops: the launch list, the same for every batch (input tensor -> output tensor, fused ReLU and
  pool, kernel configuration id); tensor indices match every arena's tensor list.
- key: a hash of the request's structure (equal requests, equal keys); `Scheduler` caches plans by
  the request itself, so a hash collision cannot hand out another request's plan.

How an executor runs a plan (activations are NHWC, `elem_size` bytes per element):

    buf = torch.empty(plan.peak_bytes, dtype=torch.uint8, device=dev)   # once per plan key
    for batch in plan.batches:
        arena = plan.arenas[batch.arena]
        def tensor(i):                      # [n, c, h, w] channels_last view into the buffer
            t = arena.tensors[i]
            return (buf[t.offset:t.offset + t.bytes].view(dtype)[:t.n * t.h * t.w * t.c]
                    .view(t.n, t.h, t.w, t.c).permute(0, 3, 1, 2))
        x = tensor(0)                       # "input": fill slot s with view batch.views[s]
        for op in plan.ops:                 # op.kind in "conv" "fc" "lrn" "pool"
            run(op, spec.layers[op.layer], tensor(op.input), out=tensor(op.output))
        scores = tensor(plan.ops[-1].output)    # [n, classes, oh, ow] score maps, slot order
"""
from __future__ import annotations

import gc
import math
import operator
import numbers
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from .configs import NetSpec
from .errors import ArgumentError, MemoryBudgetError, VGGFastError

try:
    from . import _scheduler as _C
except ImportError as _exc:  # the extension is built by `pip install -e .`
    _C = None
    _IMPORT_ERROR: Exception | None = _exc
else:
    _IMPORT_ERROR = None

METHODS = ("dense", "multicrop", "dense+multicrop")
DEFAULT_MEMORY_BUDGET = 8 << 30
DEFAULT_ALIGN = 256
_INT64_MAX = (1 << 63) - 1


# -- the plan, as plain frozen Python objects ------------------------------------------------------

class View(NamedTuple):
    """One network input: image `image` rescaled to smallest side `scale` (rescaled_h x
    rescaled_w), cropped to `crop` = (x0, y0, x1, y1) half-open in the unflipped rescaled image
    (None: the whole image, dense), then mirrored when `flip`. height x width is the network input.
    It runs in batch `batch` at position `slot`; `shape` indexes `Plan.shapes`."""

    index: int
    image: int
    scale: int
    flip: bool
    crop: tuple[int, int, int, int] | None
    rescaled_h: int
    rescaled_w: int
    height: int
    width: int
    shape: int
    batch: int
    slot: int

    @property
    def kind(self) -> str:
        return "dense" if self.crop is None else "crop"


class LayerShape(NamedTuple):
    """A layer's output for one input size: conv_h x conv_w after the conv (and ReLU), out_h x
    out_w after LRN and the 2x2 pool (floor); `channels` feature maps."""

    name: str
    channels: int
    conv_h: int
    conv_w: int
    out_h: int
    out_w: int


@dataclass(frozen=True, eq=False)
class Shape:
    """Every layer's output size for a height x width input; out_h x out_w is the score map.
    `layers` is built on first use (a plan can hold hundreds of sizes)."""

    height: int
    width: int
    out_h: int
    out_w: int
    _raw: Any = field(repr=False)

    @cached_property
    def layers(self) -> tuple[LayerShape, ...]:
        return tuple(map(_new(LayerShape), self._raw.layer_rows))


class Tensor(NamedTuple):
    """One activation of a batch: NHWC [n, h, w, c], `bytes` bytes (rounded up to the alignment) at
    `offset` in the arena, live from op step `first` to `last` inclusive (step 0: the executor
    writes the input; op i runs at step i + 1; the output is read one step after the last op)."""

    name: str
    n: int
    c: int
    h: int
    w: int
    bytes: int
    offset: int
    first: int
    last: int

    @property
    def numel(self) -> int:
        return self.n * self.c * self.h * self.w


class Op(NamedTuple):
    """One launch: `kind` "conv"/"fc" (conv + bias, ReLU if relu, fused 2x2 max-pool if pool),
    "lrn" or "pool", of network layer `layer` (`name`), reading tensor `input`, writing `output`
    (indices into Arena.tensors). config: kernel configuration id from the table (-1: none
    matched, the backend's default); config_key: the table key that matched."""

    kind: str
    layer: int
    name: str
    input: int
    output: int
    relu: bool
    pool: bool
    config: int
    config_key: str


@dataclass(frozen=True, eq=False)
class Arena:
    """The layout of one batch shape (n views of height x width). total_bytes: the arena's size;
    lower_bound_bytes: the most bytes live at one step (no layout does better); naive_bytes:
    every tensor in its own buffer; strategy: the layout that won; flops: 2 x multiply-adds.
    `tensors` (indexed by Op.input / Op.output) is built on first use."""

    index: int
    n: int
    height: int
    width: int
    total_bytes: int
    lower_bound_bytes: int
    naive_bytes: int
    strategy: str
    flops: float
    _raw: Any = field(repr=False)

    @cached_property
    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(map(_new(Tensor), self._raw.tensor_rows))

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise ArgumentError(f"no tensor {name!r}; tensors: {', '.join(t.name for t in self.tensors)}")


@dataclass(frozen=True, slots=True)
class Batch:
    """Views (indices into Plan.views, in slot order) of one height x width, run together with the
    layout Plan.arenas[arena]."""

    index: int
    height: int
    width: int
    views: tuple[int, ...]
    arena: int

    @property
    def size(self) -> int:
        return len(self.views)


@dataclass(frozen=True)
class Plan:
    """A planned request. peak_bytes: the one activation buffer every batch shares (the largest
    arena); naive_bytes: the largest batch's activations without reuse; budget_bytes: the budget
    planned against; elem_size: bytes per activation element."""

    key: str
    config: str
    num_images: int
    scales: tuple[int, ...]
    flip: bool
    method: str
    views: tuple[View, ...]
    shapes: tuple[Shape, ...]
    batches: tuple[Batch, ...]
    arenas: tuple[Arena, ...]
    ops: tuple[Op, ...]
    peak_bytes: int
    naive_bytes: int
    budget_bytes: int
    elem_size: int

    @cached_property
    def _by_image(self) -> tuple[tuple[int, ...], ...]:
        out: list[list[int]] = [[] for _ in range(self.num_images)]
        for v in self.views:
            out[v.image].append(v.index)
        return tuple(map(tuple, out))

    def image_views(self, image: int) -> tuple[int, ...]:
        """Indices of the views of image `image`, in request order (scale, then crop, then flip)."""
        return self._by_image[image]

    def view_layers(self, view: int) -> tuple[LayerShape, ...]:
        """Per-layer output shapes of view `view`."""
        return self.shapes[self.views[view].shape].layers

    @property
    def flops(self) -> float:
        return sum(self.arenas[b.arena].flops for b in self.batches)

    def summary(self, max_rows: int = 12) -> str:
        """Human-readable plan: views, batches, peak memory (for Engine.plan and --explain)."""
        dense = sum(v.crop is None for v in self.views)
        lines = [
            f"plan {self.key}: VGG {self.config}, {self.num_images} image"
            f"{'s' if self.num_images != 1 else ''}, scales {'/'.join(map(str, self.scales))}, "
            f"{'flip, ' if self.flip else ''}{self.method}",
            f"  {len(self.views)} views ({dense} dense, {len(self.views) - dense} crops) of "
            f"{len(self.shapes)} input sizes in {len(self.batches)} batches, "
            f"{self.flops / 1e12:.2f} TFLOP",
            f"  peak activation memory {_fmt_bytes(self.peak_bytes)} (one arena shared by all "
            f"batches; budget {_fmt_bytes(self.budget_bytes)}, no reuse {_fmt_bytes(self.naive_bytes)}"
            f", {self.elem_size}-byte elements)",
            f"  {'batch':>5}  {'views':>5}  {'input':>11}  {'arena':>10}  {'GFLOP':>8}",
        ]
        for b in self.batches[:max_rows]:
            a = self.arenas[b.arena]
            lines.append(f"  {b.index:>5}  {b.size:>5}  {f'{b.height}x{b.width}':>11}  "
                         f"{_fmt_bytes(a.total_bytes):>10}  {a.flops / 1e9:>8.1f}")
        if len(self.batches) > max_rows:
            lines.append(f"  ... {len(self.batches) - max_rows} more batches")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"Plan(key={self.key!r}, views={len(self.views)}, batches={len(self.batches)}, "
                f"peak_bytes={self.peak_bytes})")


def _fmt_bytes(n: float) -> str:
    """A size as the planner's messages write it (csrc/plan.cpp fmt_bytes): EiB, GiB, MiB, else
    whole bytes (a small net's arenas, and the engine's refusals of small budgets, all read
    "0.0 MiB" otherwise). The engine's own memory checks write their sizes with it too."""
    if n >= 1 << 60:
        return f"{n / (1 << 60):.2f} EiB"
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{int(n)} bytes"


# -- calling the extension -----------------------------------------------------------------------

def _ext():
    if _C is None:
        raise VGGFastError(f"the C++ planner vggfast._scheduler is not built ({_IMPORT_ERROR}); "
                           "run `pip install -e .` with a C++17 compiler")
    return _C


def _call(fn, *args):
    C = _ext()
    try:
        return fn(*args)
    except C.PlanError as e:
        what, image, reason = e.args
        kind = (MemoryBudgetError if isinstance(e, C.PlanBudgetError) else
                ArgumentError if isinstance(e, C.PlanArgumentError) else VGGFastError)
        err = kind(what)
        if image >= 0:
            err.image, err.reason = image, reason
        raise err from None


def _int(x: Any, what: str) -> int:
    """An integer argument (whole floats accepted) that fits the planner's int64."""
    if isinstance(x, bool):
        raise ArgumentError(f"{what} must be an integer, not {x!r}")
    try:
        v = operator.index(x)
    except TypeError:
        if not (isinstance(x, float) and x.is_integer()):  # also refuses nan and inf
            raise ArgumentError(f"{what} must be an integer, not {x!r}") from None
        v = int(x)
    if not -(1 << 63) <= v < 1 << 63:
        text = repr(x)
        raise ArgumentError(f"{what} is out of range: {text if len(text) <= 24 else f'{v:.3e}'}")
    return v


def check_method(method: Any) -> str:
    """An evaluation method of METHODS (see protocols.py)."""
    if not isinstance(method, str) or method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return method


def check_flag(name: str, value: Any) -> bool:
    """A yes/no argument: True or False (a numpy bool, or the integers 1 and 0, too). Anything
    else is refused: bool() reads "no", "false", 2 and None each as an answer, so a typo gave a
    silently different request."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, numbers.Integral)
                                               and value in (0, 1)):
        return bool(value)
    raise ArgumentError(f"{name} must be True or False, not {value!r}")


def layers_of(spec: NetSpec) -> list:
    """The C++ layer list of a NetSpec (every layer of Table 1, fc6-fc8 as dense convolutions)."""
    C = _ext()
    return [C.LayerDesc(l.name, l.kind, l.cin, l.cout, l.k, l.pad, l.relu, l.lrn, l.pool)
            for l in spec.layers]


def _request(sizes: Iterable[Sequence[int]], scales: Any, flip: bool, method: str,
             crop: int | None, grid: int):
    C = _ext()
    if isinstance(scales, (int, float)) and not isinstance(scales, bool):
        scales = (scales,)
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise ArgumentError(f"scales must be an integer or a list of integers, not {scales!r}")
    method = check_method(method)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable):
        raise ArgumentError(f"sizes must be a list of (height, width) pairs, not {sizes!r}")
    images = []
    for i, s in enumerate(sizes):
        try:
            h, w = s
        except (TypeError, ValueError):
            raise ArgumentError(f"image size {i} must be a (height, width) pair, not {s!r}") \
                from None
        images.append((_int(h, f"height of image {i}"), _int(w, f"width of image {i}")))
    r = C.Request()
    r.images = images
    r.scales = [_int(q, "each scale") for q in scales]
    r.flip = check_flag("flip", flip)
    r.method = method
    r.crop = 0 if crop is None else _int(crop, "crop")
    r.grid = _int(grid, "grid")
    if r.crop < 0:
        raise ArgumentError(f"crop must be positive, not {crop!r}")
    return r


def _options(spec: NetSpec, elem_size: int, memory_budget: int, kernel_table: Mapping | None,
             max_batch: int, fuse_pool: bool, align: int, keep: Iterable[str]):
    C = _ext()
    o = C.Options()
    o.native_size = spec.image_size
    o.elem_size = _int(elem_size, "elem_size")
    if isinstance(memory_budget, float) and math.isfinite(memory_budget):
        memory_budget = int(memory_budget)  # "8e9" bytes; fractions of a byte do not matter
    if isinstance(memory_budget, int) and memory_budget >= _INT64_MAX:
        # A budget past int64 (Engine(memory_budget=1e30): "no limit") holds every plan the
        # largest one does; refusing it made such an Engine impossible to build.
        memory_budget = _INT64_MAX
    o.budget = _int(memory_budget, "memory_budget")
    o.align = _int(align, "align")
    o.max_batch = _int(max_batch, "max_batch")
    o.fuse_pool = check_flag("fuse_pool", fuse_pool)
    # one tap name alone is one name, not its letters
    o.keep = [keep] if isinstance(keep, str) else [str(k) for k in keep]
    if kernel_table is not None and not isinstance(kernel_table, Mapping):
        raise ArgumentError(f"kernel_table must map shape-class keys to configuration ids, not "
                            f"{type(kernel_table).__name__}")
    table = dict(kernel_table or {})
    o.kernel_table = sorted((str(k), _int(v, f"kernel config of {k!r}")) for k, v in table.items())
    return o


def _new(cls):
    # NamedTuple rows straight from the extension's tuples: the field count is the C++ struct's.
    return partial(tuple.__new__, cls)


def _convert(raw, spec: NetSpec, req) -> Plan:
    # Thousands of small tuples (a multi-crop request has ~10k views) would trigger full garbage
    # collections that cost more than the planning itself; none of them can form a cycle.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _convert_records(raw, spec, req)
    finally:
        if enabled:
            gc.enable()


def _convert_records(raw, spec: NetSpec, req) -> Plan:
    views = tuple(map(_new(View), raw.view_rows))
    shapes = tuple(_shape(s) for s in raw.shapes)
    arenas = tuple(
        Arena(i, a.n, a.height, a.width, a.total_bytes, a.lower_bound_bytes, a.naive_bytes,
              a.strategy, a.flops, a)
        for i, a in enumerate(raw.arenas))
    batches = tuple(Batch(i, b.height, b.width, tuple(b.views), b.arena)
                    for i, b in enumerate(raw.batches))
    ops = tuple(_op(o, spec) for o in raw.ops)
    return Plan(raw.key, spec.config, len(req.images), tuple(req.scales), req.flip, req.method,
                views, shapes, batches, arenas, ops, raw.peak_bytes, raw.naive_bytes,
                raw.budget_bytes, raw.elem_size)


def _op(o, spec: NetSpec) -> Op:
    return Op(o.kind, o.layer, spec.layers[o.layer].name, o.input, o.output, o.relu, o.pool,
              o.config, o.config_key)


def _shape(s) -> Shape:
    return Shape(s.height, s.width, s.out_h, s.out_w, s)


# -- public API -----------------------------------------------------------------------------------

class Scheduler:
    """Plans requests for one network and memory budget, caching plans by request (LRU).

    spec: the network. elem_size: bytes per activation element (2 for bf16/fp16, 4 for fp32).
    memory_budget: bytes one batch's activation arena may use. kernel_table: shape-class key ->
    kernel configuration id (keys as "conv3x3:64->128+pool", "conv3x3", "fc7x7", "fc", "lrn";
    the most specific present wins). max_batch: cap on views per batch (0: none). fuse_pool: the
    conv kernels do the 2x2 max-pool in their epilogue (no pre-pool tensor). align: byte alignment
    of every tensor in the arena. cache_size: plans kept.
    """

    def __init__(self, spec: NetSpec, *, elem_size: int = 2,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 kernel_table: Mapping[str, int] | None = None, max_batch: int = 0,
                 fuse_pool: bool = True, align: int = DEFAULT_ALIGN, cache_size: int = 32):
        self.spec = spec
        self._layers = layers_of(spec)
        self._opt = dict(elem_size=elem_size, memory_budget=memory_budget,
                         kernel_table=kernel_table, max_batch=max_batch,
                         fuse_pool=fuse_pool, align=align)
        _options(spec, keep=(), **self._opt)  # fail now on bad options, not at the first plan
        self._opt["kernel_table"] = dict(kernel_table or {})   # the caller's dict may change
        self.cache_size = max(0, _int(cache_size, "cache_size"))
        self._cache: OrderedDict[tuple, Plan] = OrderedDict()
        self._cache_lock = threading.Lock()   # an Engine may be called from several threads

    def _args(self, sizes, scales, flip, method, crop, grid, keep):
        return (self._layers, _request(sizes, scales, flip, method, crop, grid),
                _options(self.spec, keep=keep, **self._opt))

    def key(self, sizes: Iterable[Sequence[int]], scales: Any = (256, 384, 512), flip: bool = True,
            method: str = "dense", *, crop: int | None = None, grid: int = 5,
            keep: Iterable[str] = ()) -> str:
        """The plan key of a request (16 hex digits), without planning it."""
        return _call(_C.plan_key, *self._args(sizes, scales, flip, method, crop, grid, keep))

    def plan(self, sizes: Iterable[Sequence[int]], scales: Any = (256, 384, 512),
             flip: bool = True, method: str = "dense", *, crop: int | None = None, grid: int = 5,
             keep: Iterable[str] = ()) -> Plan:
        """Plan a request; the same request again returns the cached Plan object.

        sizes: (height, width) of each image as decoded. scales: smallest-side sizes Q (each >=
        spec.image_size). method: "dense" | "multicrop" | "dense+multicrop". crop: multi-crop side
        (None: spec.image_size). grid: crops per side. keep: arena tensor names (e.g. "fc7")
        that must stay readable after the batch's last op.
        Raises ArgumentError (bad request, views too small) or MemoryBudgetError.
        """
        layers, req, opt = self._args(sizes, scales, flip, method, crop, grid, keep)
        # Cached by the request itself, not by its 64-bit key: a hash collision (FNV-1a is easy
        # to collide on purpose) would hand one request another's views. The options other than
        # keep are the scheduler's own.
        key = (tuple(req.images), tuple(req.scales), req.flip, req.method, req.crop, req.grid,
               tuple(opt.keep))
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        plan = _convert(_call(_C.make_plan, layers, req, opt), self.spec, req)
        if self.cache_size:
            with self._cache_lock:
                self._cache[key] = plan
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return plan

    def empty_plan(self, scales: Any = (256, 384, 512), flip: bool = True,
                   method: str = "dense", *, crop: int | None = None, grid: int = 5,
                   keep: Iterable[str] = ()) -> Plan:
        """The plan of a request of no images (Engine.plan([]), as classify([]) gives []): no
        views, shapes, batches or arenas, peak_bytes and naive_bytes 0; key, scales, flip,
        method and ops as a request of images has them. The arguments are checked as `plan`
        checks them (the planner refuses a request of no images, so its checks see a stand-in
        image of the native size, planned without a budget)."""
        layers, req, opt = self._args([], scales, flip, method, crop, grid, keep)
        key = _call(_C.plan_key, layers, req, opt)
        n = self.spec.image_size
        probe = _request([(n, n)], req.scales, req.flip, req.method, req.crop or None, req.grid)
        unlimited = _options(self.spec, keep=keep, **{**self._opt, "memory_budget": _INT64_MAX})
        _call(_C.make_plan, layers, probe, unlimited)
        ops = tuple(_op(o, self.spec) for o in _call(_C.build_ops, layers, opt))
        return Plan(key, self.spec.config, 0, tuple(req.scales), req.flip, req.method, (), (), (),
                    (), ops, 0, 0, opt.budget, opt.elem_size)

    def clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()


def make_plan(spec: NetSpec, sizes: Iterable[Sequence[int]], scales: Any = (256, 384, 512),
              flip: bool = True, method: str = "dense", *, crop: int | None = None,
              grid: int = 5, elem_size: int = 2, memory_budget: int = DEFAULT_MEMORY_BUDGET,
              kernel_table: Mapping[str, int] | None = None, max_batch: int = 0,
              fuse_pool: bool = True, align: int = DEFAULT_ALIGN,
              keep: Iterable[str] = ()) -> Plan:
    """Plan one request without caching; arguments as Scheduler(...) and Scheduler.plan(...)."""
    return Scheduler(spec, elem_size=elem_size, memory_budget=memory_budget,
                     kernel_table=kernel_table, max_batch=max_batch, fuse_pool=fuse_pool,
                     align=align, cache_size=0).plan(sizes, scales, flip, method, crop=crop,
                                                     grid=grid, keep=keep)


def rescaled_size(h: int, w: int, q: int) -> tuple[int, int]:
    """The planner's isotropic rescale: smallest side -> q, the other (q * long) // short."""
    return tuple(_call(_ext().rescaled_size, _int(h, "h"), _int(w, "w"), _int(q, "q")))


def crop_origins(size: int, crop: int, n: int) -> tuple[int, ...]:
    """The planner's crop origins along one side: (i * (size - crop)) // (n - 1), i < n."""
    return tuple(_call(_ext().crop_origins, _int(size, "size"), _int(crop, "crop"), _int(n, "n")))


def infer_shapes(spec: NetSpec, h: int, w: int) -> Shape:
    """The planner's per-layer output sizes of an h x w input (no native-size check)."""
    return _shape(_call(_ext().infer_shapes, layers_of(spec), _int(h, "h"), _int(w, "w")))

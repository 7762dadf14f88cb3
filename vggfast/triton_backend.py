"""The "triton" backend: the dense VGG on vggfast's own kernels.

Every layer is one launch of kernels/conv.py: conv3x3 (1x1 in config C) + bias + ReLU, with the
2x2 max-pool fused into the last conv of each block; fc6 as a (image_size/32)-square valid conv
and fc7/fc8 as 1x1 convs on the whole map (dense evaluation, Sec. 3.2 of the paper); fc8 writes
fp32 scores. A-LRN's LRN after conv1_1 is kernels/lrn.py followed by kernels/pool.py. The network
input is read by conv1_1 as the NCHW float tensor it arrives in; activations between layers are
NHWC in the backend dtype.

`run_many` runs several inputs of different sizes with ONE launch per layer for all of them
(kernels/conv.py's grouped launches): the dense protocol's three scales, a mixed-size request's
batches. Its inputs are first concatenated into one flat buffer (`torch.cat`, one launch);
A-LRN's LRN and pool run input by input between its grouped conv1_1 and conv2_1.

Ops left to torch: `torch.relu` only when the pre-ReLU output of a layer is asked for as a tap
(then the ReLU cannot be fused), the final `.float()` of bf16/fp16 taps, and in `fc` the cast of
the (already pooled, grid x grid) map to NHWC. The standard forward (taps fc8 or pool5) runs no
torch op besides the output allocations.
"""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import Iterable, Mapping, NamedTuple, Sequence

import torch

from .configs import Layer, NetSpec
from .errors import ArgumentError, VGGFastError, WeightsError

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable() -> str | None:
    """Why the Triton kernels cannot be used here (no triton, or one older than 3.6), or None."""
    try:
        from . import ops  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _ops():
    """vggfast.ops, or a VGGFastError when Triton is not importable here."""
    why = unavailable()
    if why is not None:
        raise VGGFastError(f"the triton backend is unavailable here ({why}); install "
                           "triton >= 3.6 or use backend='torch'")
    from . import ops
    return ops


def on_device(device: torch.device):
    """A context in which `device` is the current CUDA device (nothing on the CPU). Triton
    launches on the current device, not on its arguments', and CUDA graphs capture the current
    device's stream: an engine on cuda:1 would otherwise launch on cuda:0 with cuda:1's pointers."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_own_device(method):
    @functools.wraps(method)
    def run_there(self, *args, **kwargs):
        with on_device(self.device):
            return method(self, *args, **kwargs)
    return run_there


ARENA_ALIGN = 256   # bytes: every buffer carved from an arena starts at a multiple of this


class GroupPlan(NamedTuple):
    """A grouped forward (TritonBackend.prepare_many): input shapes, tap, every layer's
    ops.GroupLayer and its (problem table, chunk table) on the device, and the arena layout.

    Arena: the flat input (float32 at most) and every layer's output but the last live in two
    ping-pong regions of one byte buffer: layer i writes region i % 2 and reads the other, the
    input sits in region 1. region_offsets[r] is where region r starts; arena_bytes the total.
    The last layer's output (what the caller keeps) is a tensor of its own.
    posts: per layer, None, or for A-LRN's LRN layer the ((offset, n, h, w) per input, numel)
    layout of the flat buffer its LRN + pool (run input by input) write.
    """

    shapes: tuple[tuple[int, ...], ...]
    tap: str
    layers: tuple
    tables: tuple
    region_offsets: tuple[int, int]
    arena_bytes: int
    posts: tuple


class TritonBackend:
    """Dense VGG forward on the Triton kernels, weights packed once.

    params: canonical weights (`conv1_1.weight` [Cout, Cin, k, k], `fc6.weight` [F, C, g, g], ...,
    biases [Cout]); layers a checkpoint lacks (e.g. a features-only one) are only an error when a
    forward needs them. spec: the network. device: cuda, or cpu when TRITON_INTERPRET=1 was set
    before vggfast.ops was imported (slow; for tests). dtype: activation/weight dtype (bfloat16 or
    float16 on GPU; float32 allowed), accumulation is always fp32.
    """

    name = "triton"
    fuses_pool = True  # the planner then sizes arenas without pre-pool tensors
    GROUP_PLANS = 64   # grouped-forward plans (problem tables on the device) kept, LRU

    def __init__(self, params: Mapping[str, torch.Tensor], spec: NetSpec, device: torch.device,
                 dtype: torch.dtype):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:   # as its tensors report it: cuda:N
            device = torch.device("cuda", torch.cuda.current_device())
        if dtype not in DTYPES:
            raise ArgumentError(f"the triton backend runs float32, bfloat16 or float16, "
                                f"not {dtype}")
        self.ops = _ops()
        if device.type == "cpu" and not self.ops.INTERPRETING:
            raise VGGFastError("the triton backend needs a CUDA device; on the CPU use "
                               "backend='torch' (or set TRITON_INTERPRET=1 before importing "
                               "vggfast, for the slow interpreter)")
        if device.type not in ("cpu", "cuda"):
            raise ArgumentError(f"the triton backend runs on cuda (or cpu under the interpreter), "
                                f"not {device}")
        self.spec, self.device, self.dtype = spec, device, dtype
        self.packed = {}
        for l in spec.layers:
            w, b = params.get(f"{l.name}.weight"), params.get(f"{l.name}.bias")
            if w is None or b is None:
                continue
            if tuple(w.shape) != (l.cout, l.cin, l.k, l.k) or tuple(b.shape) != (l.cout,):
                raise WeightsError(f"{l.name} weights are {list(w.shape)} / {list(b.shape)}; "
                                   f"configuration {spec.config} needs "
                                   f"[{l.cout}, {l.cin}, {l.k}, {l.k}] / [{l.cout}]")
            self.packed[l.name] = self.ops.pack_conv_weight(w, b, dtype, device)
        self._names = tuple(spec.tap_names())
        self._pos = {n: i for i, n in enumerate(self._names)}
        self._fc6 = self._pos.get("fc6", len(self._names))
        self._last_layer = spec.layers[-1]
        # Per weight layer, the named activations it produces and what each one is.
        names = iter(self._names)
        self._stages: list[tuple[Layer, list[tuple[str, str]]]] = []
        for l in spec.layers:
            kinds = ["conv"] + ["relu"] * l.relu + ["lrn"] * l.lrn + ["pool"] * l.pool
            self._stages.append((l, [(next(names), k) for k in kinds]))
        # Taps `run_many` serves with grouped launches -> (last layer, its ReLU, its pool): every
        # output (pre-ReLU, post-ReLU, pooled) but an LRN's; earlier layers fuse their ReLU and
        # pool, and A-LRN's LRN + pool run input by input between two grouped launches.
        self._group_plans: OrderedDict[tuple, GroupPlan] = OrderedDict()
        self._group_end: dict[str, tuple[int, bool, bool]] = {}
        for i, (l, stages) in enumerate(self._stages):
            for name, kind in stages:
                if kind != "lrn":     # A-LRN's norm1 alone is not served grouped
                    self._group_end[name] = (i, kind != "conv" and l.relu, kind == "pool")

    def _layer(self, l: Layer):
        p = self.packed.get(l.name)
        if p is None:
            raise WeightsError(f"the weights have no {l.name} layer, which this output needs")
        return p

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 \
                or not x.is_floating_point():
            raise ArgumentError("the input must be a float tensor [N, 3, H, W] already normalised")
        if x.dtype not in DTYPES:
            x = x.float()
        return x.to(self.device)

    @_on_own_device
    @torch.no_grad()
    def run(self, x: torch.Tensor, taps: Iterable[str] = ("fc8",)) -> dict[str, torch.Tensor]:
        """Dense forward: x [N, 3, H, W] normalised float -> {tap: float32 NCHW}.

        Same contract as nn.dense_forward: taps are names from spec.tap_names(); computation
        stops after the deepest. The tensors are NCHW views of NHWC storage (channels_last).
        """
        ops, spec, pos = self.ops, self.spec, self._pos
        want = list(taps)
        for t in want:
            if t not in pos:
                raise ArgumentError(f"unknown layer {t!r}; layers of {spec.config}: "
                                    f"{', '.join(self._names)}")
        if not want:
            raise ArgumentError("taps is empty; name at least one layer, e.g. ('fc8',)")
        last = max(pos[t] for t in want)
        x = self._check_input(x)
        if last >= self._fc6 and min(spec.output_size(*x.shape[2:])) < 1:
            raise ArgumentError(f"input {x.shape[2]}x{x.shape[3]} (HxW) is too small: fc6 needs a "
                                f"{spec.grid}x{spec.grid} map after pool5, i.e. inputs of at "
                                f"least {spec.image_size} pixels a side")
        out: dict[str, torch.Tensor] = {}
        h = x.permute(0, 2, 3, 1)          # NHWC view; conv1_1 reads it in place
        first = 0
        for l, stages in self._stages:
            end = min(len(stages), last - first + 1)
            wanted = [name in want for name, _ in stages[:end]]
            # Fuse the ReLU and pool that follow into the conv's epilogue unless an output
            # between them is asked for; an LRN ends the fusion.
            j = 1
            while j < end and stages[j][1] in ("relu", "pool") and not wanted[j - 1]:
                j += 1
            fused = {kind for _, kind in stages[1:j]}
            y = ops.conv2d(h, self._layer(l), l.pad, relu="relu" in fused, pool="pool" in fused,
                           out_dtype=torch.float32 if l is self._last_layer else None)
            for i in range(j - 1, end):
                kind = stages[i][1]
                if i >= j:
                    y = (torch.relu(y) if kind == "relu" else ops.lrn(y) if kind == "lrn"
                         else ops.max_pool2x2(y))
                if wanted[i]:
                    out[stages[i][0]] = y.permute(0, 3, 1, 2).float()
            first += len(stages)
            if first > last:
                break
            h = y
        return out

    def _arena(self, arena: torch.Tensor | None, nbytes: int) -> torch.Tensor:
        """`arena` checked to hold `nbytes` on this device, or a fresh one when None."""
        if arena is None:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 \
                or arena.dim() != 1 or arena.numel() < nbytes \
                or arena.device != self.device or not arena.is_contiguous():
            raise ArgumentError(f"arena must be a contiguous uint8 tensor of at least {nbytes} "
                                f"bytes on {self.device}")
        return arena

    def can_group(self, tap: str) -> bool:
        """Whether `run_many(xs, tap)` runs each layer as one launch for all of xs."""
        return tap in self._group_end

    def prepare_many(self, shapes: Sequence[Sequence[int]], tap: str = "fc8") -> GroupPlan | None:
        """The grouped forward of inputs of these [N, 3, H, W] shapes up to `tap`: every layer's
        geometry and its problem tables on the device (one upload), or None when `tap` cannot be
        grouped. Cached per (shapes, tap), the last GROUP_PLANS of them.

        Under CUDA-graph capture the tables must already exist (a plan prepared, or the same
        request run once, before the capture): a graph replays device addresses, so whoever
        captures should hold the returned plan as long as the graph (GraphCache's `keep`).
        """
        key = (tuple(tuple(int(d) for d in sh) for sh in shapes), tap)
        plan = self._group_plans.get(key)
        if plan is not None:
            self._group_plans.move_to_end(key)
            return plan
        if tap not in self._group_end:
            return None
        end, _, last_pool = self._group_end[tap]
        spec = self.spec
        inputs, strides, off = [], [], 0
        for n, c, h, w in key[0]:
            if self._pos[tap] >= self._fc6 and min(spec.output_size(h, w)) < 1:
                raise ArgumentError(f"input {h}x{w} (HxW) is too small: fc6 needs a {spec.grid}x"
                                    f"{spec.grid} map after pool5, i.e. inputs of at least "
                                    f"{spec.image_size} pixels a side")
            inputs.append((off, n, h, w))
            strides.append((c * h * w, w, 1, h * w))     # conv1_1 reads the NCHW input in place
            off += n * c * h * w
        layers, posts = [], []
        for i, (l, _) in enumerate(self._stages[:end + 1]):
            pool = last_pool if i == end else l.pool
            gl = self.ops.group_layer(inputs, l.cin, l.cout, l.k, l.pad, pool and not l.lrn,
                                      strides)
            layers.append(gl)
            inputs, strides = list(gl.outputs), None
            post = None
            if l.lrn and pool:
                # LRN, then the pool, input by input, into a flat buffer of its own: the next
                # layer's (or the caller's) NHWC-contiguous inputs.
                inputs, o = [], 0
                for _, n, h, w in gl.outputs:
                    inputs.append((o, n, h // 2, w // 2))
                    o += self.ops.align(n * (h // 2) * (w // 2) * l.cout, self.ops.GROUP_ELEM_ALIGN)
                post = (tuple(inputs), o)
            posts.append(post)
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise VGGFastError("a grouped forward met new input shapes inside CUDA-graph "
                               "capture; call prepare_many (or run the request once) first")
        elem = torch.finfo(self.dtype).bits // 8
        region = [0, 4 * off]                                 # region 1 holds the input first
        for i, (gl, post) in enumerate(zip(layers, posts)):
            if i < end or post is not None:                   # not the caller's output
                region[i % 2] = max(region[i % 2], elem * gl.numel)
        start1 = self.ops.align(region[0], ARENA_ALIGN)
        plan = GroupPlan(key[0], tap, tuple(layers),
                         tuple(self.ops.upload_groups(layers, self.device)), (0, start1),
                         start1 + self.ops.align(region[1], ARENA_ALIGN), tuple(posts))
        self._group_plans[key] = plan
        while len(self._group_plans) > self.GROUP_PLANS:
            self._group_plans.popitem(last=False)
        return plan

    @_on_own_device
    @torch.no_grad()
    def run_many(self, xs: Sequence[torch.Tensor], tap: str = "fc8",
                 plan: GroupPlan | None = None,
                 arena: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`run` on several inputs of different sizes, every layer ONE launch for all of them.

        xs: [N_i, 3, H_i, W_i] normalised float tensors. Returns the `tap` output of each input,
        float32 NCHW views of NHWC storage, as run(x, (tap,))[tap] would. A single launch per
        layer instead of one per input size is what keeps a multi-scale or mixed-size request
        from being bound by Python launch overhead, and it fills the GPU with the small maps of
        the deep layers. Taps that cannot be grouped (see `can_group`) run input by input.
        plan: from `prepare_many` for these shapes and tap (default: looked up or made).
        arena: a uint8 buffer on the device of at least plan.arena_bytes for the intermediate
        activations (default: one allocation per call); the outputs never live in it, so a
        caller may reuse it for the next call.
        """
        if tap not in self._pos:
            raise ArgumentError(f"unknown layer {tap!r}; layers of {self.spec.config}: "
                                f"{', '.join(self._names)}")
        xs = [self._check_input(x) for x in xs]
        if len(xs) < 2 or not self.can_group(tap):
            return [self.run(x, (tap,))[tap] for x in xs]
        shapes = tuple(tuple(x.shape) for x in xs)
        if plan is None:
            plan = self.prepare_many(shapes, tap)
        elif not isinstance(plan, GroupPlan) or plan.shapes != shapes or plan.tap != tap:
            raise ArgumentError("plan was prepared for other input shapes or another tap")
        arena = self._arena(arena, plan.arena_bytes)

        def carve(region: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
            start = plan.region_offsets[region]
            return arena[start:start + numel * (torch.finfo(dtype).bits // 8)].view(dtype)

        dtype = xs[0].dtype if all(x.dtype == xs[0].dtype for x in xs) else torch.float32
        h = torch.cat([x.to(dtype).reshape(-1) for x in xs],
                      out=carve(1, sum(x.numel() for x in xs), dtype))
        end, last_relu, _ = self._group_end[tap]
        for i, ((l, _), gl, tables, post) in enumerate(zip(self._stages, plan.layers,
                                                           plan.tables, plan.posts)):
            outputs = gl.outputs
            mine = i == end and post is None                  # the caller's output
            h = self.ops.conv2d_grouped(h, gl, tables, self._layer(l),
                                        relu=last_relu if i == end else l.relu,
                                        out=None if mine else carve(i % 2, gl.numel,
                                                                    self.dtype),
                                        out_dtype=torch.float32 if l is self._last_layer
                                        else None)
            if post is not None:
                pooled = torch.empty(post[1], dtype=self.dtype, device=self.device)
                for (o, n, gh, gw), (po, _, ph, pw) in zip(gl.outputs, post[0]):
                    y = self.ops.lrn(h[o:o + n * gh * gw * l.cout].view(n, gh, gw, l.cout))
                    self.ops.max_pool2x2(y, out=pooled[po:po + n * ph * pw * l.cout].view(
                        n, ph, pw, l.cout))
                h, outputs = pooled, post[0]
        c = plan.layers[-1].cout
        return [h[o:o + n * gh * gw * c].view(n, gh, gw, c).permute(0, 3, 1, 2).float()
                for o, n, gh, gw in outputs]

    @_on_own_device
    @torch.no_grad()
    def run_planned(self, x: torch.Tensor, layout, plan_ops: Sequence,
                    arena: torch.Tensor | None = None) -> torch.Tensor:
        """The standard forward of one batch (fc8 scores) laid out by the C++ planner: every
        intermediate activation at the byte offset the plan's arena gave it.

        x: [N, 3, H, W] normalised float, the batch `layout` (a vggfast.scheduler.Arena, planned
        with this backend's element size) was made for; plan_ops: Plan.ops. arena: a uint8
        buffer on the device of at least layout.total_bytes (default: one allocation per call).
        conv1_1 reads x in place, so the plan's input slot stays unused; the scores (fp32) are a
        tensor of their own, never in the arena. Returns [N, classes, h, w] float32, equal to
        run(x)["fc8"].
        """
        ops = self.ops
        x = self._check_input(x)
        t0 = layout.tensors[0]
        if (t0.n, t0.c, t0.h, t0.w) != tuple(x.shape):
            raise ArgumentError(f"the layout is for a batch of {t0.n} x {t0.c} x {t0.h} x {t0.w}, "
                                f"not {list(x.shape)}")
        arena = self._arena(arena, layout.total_bytes)
        elem = torch.finfo(self.dtype).bits // 8

        def slot(i: int) -> torch.Tensor:
            t = layout.tensors[i]
            return arena[t.offset:t.offset + t.numel * elem].view(self.dtype).view(
                t.n, t.h, t.w, t.c)

        h = x.permute(0, 2, 3, 1)
        last = len(plan_ops) - 1
        for j, op in enumerate(plan_ops):
            out = None if j == last else slot(op.output)
            if op.kind in ("conv", "fc"):
                l = self.spec.layers[op.layer]
                h = ops.conv2d(h, self._layer(l), l.pad, relu=op.relu, pool=op.pool, out=out,
                               out_dtype=torch.float32 if j == last else None)
            elif op.kind == "lrn":
                h = ops.lrn(h, out=out)
            else:
                h = ops.max_pool2x2(h, out=out)
        return h.permute(0, 3, 1, 2).float()

    @_on_own_device
    @torch.no_grad()
    def fc(self, pooled: torch.Tensor) -> torch.Tensor:
        """fc6-fc8 on a pool5 map pooled to grid x grid: [N, C, g, g] -> [N, classes] fp32."""
        g, c = self.spec.grid, self.spec.feature_channels
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape[1:]) != (c, g, g):
            raise ArgumentError(f"fc expects a [N, {c}, {g}, {g}] map, not "
                                f"{list(getattr(pooled, 'shape', []))}")
        h = pooled.to(self.device, self.dtype).permute(0, 2, 3, 1).contiguous()
        for l in self.spec.fcs:
            h = self.ops.conv2d(h, self._layer(l), 0, relu=l.relu,
                                out_dtype=torch.float32 if l is self.spec.layers[-1] else None)
        return h.reshape(h.shape[0], -1).float()

"""Launch wrappers for the Triton kernels in vggfast.kernels.

Each wrapper does four things in order: check its inputs, allocate the output (or take `out`),
compute the grid, launch. Activations are logical NHWC tensors ([N, H, W, C]); the kernels read
them through their strides. On CPU tensors the kernels run only under TRITON_INTERPRET=1, which
must be set before this module is first imported.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import triton

# The kernels use triton 3.6's language and autotuner (older releases fail on importing them);
# torch 2.4-2.9 wheels bring triton 3.0-3.5, so this is an ImportError the backend reports.
MIN_TRITON = (3, 6)


def _triton_version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("+")[0].split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts)


TRITON_VERSION = _triton_version(triton.__version__)
if TRITON_VERSION < MIN_TRITON:
    raise ImportError(f"vggfast's kernels need triton >= {'.'.join(map(str, MIN_TRITON))}, this "
                      f"is triton {triton.__version__}")

from vggfast.kernels import conv as _conv  # noqa: E402
from vggfast.kernels import lrn as _lrn  # noqa: E402
from vggfast.kernels import pool as _pool  # noqa: E402
from vggfast.kernels import score as _score  # noqa: E402

from .configs import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE  # noqa: E402
from .errors import ArgumentError  # noqa: E402

INTERPRETING = _conv.INTERPRET


def _fix_interpreter_index() -> None:
    """Let the interpreter use a run-time scalar as a loop bound under numpy >= 2.4.

    Triton 3.6's interpreter gives its scalar tensors (1-element numpy arrays) an `__index__`
    of `int(data)`, which numpy 2.4 refuses for arrays with a dimension ("only 0-dimensional
    arrays can be converted"), so `for k in range(lo, hi)` with run-time bounds fails in every
    kernel. Later triton squeezes the array first; this wraps the patching function to do that.
    Nothing changes for compiled kernels.
    """
    from triton.runtime import interpreter
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_vggfast", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._vggfast = True
    interpreter._patch_lang_tensor = patched


if INTERPRETING:
    _fix_interpreter_index()

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SPLIT_K = 16   # choose_split_k's ceiling; the reduction unrolls over the splits
K_ALIGN = 128   # packed K rows: a multiple of every BLOCK_K, so B is never masked along K
N_ALIGN = 16    # packed output channels: B rows and the bias load as whole 16-element vectors
SMALL_ROWS, MID_ROWS = 128, 8192   # M-grid rows bounding the conv kernel's shape classes


@dataclass(frozen=True)
class PackedConv:
    """A conv (or dense FC) layer's weights in the layout kernels/conv.py reads.

    weight: [K_pad, Cout_p] in the activation dtype, row (kh*k + kw)*cin + ci holds
    w[:, ci, kh, kw]; K_pad = k*k*cin rounded up to 128 and Cout_p = cout rounded up to 16, zeros.
    bias: [Cout_p] float32. cin, cout, k: the layer's true sizes.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    cin: int
    cout: int
    k: int


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (triton.next_power_of_2 without its per-call wrapper)."""
    return 1 << max(0, n - 1).bit_length()


def _check_act(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ArgumentError(f"{name} must be a 4-D NHWC tensor, not {getattr(x, 'shape', x)!r}")
    if x.dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{name} must be float32, bfloat16 or float16, not {x.dtype}")
    if x.numel() == 0:
        raise ArgumentError(f"{name} is empty (shape {list(x.shape)})")
    if x.device.type == "cpu" and not INTERPRETING:
        raise ArgumentError(f"{name} is on the CPU; the Triton kernels need a CUDA tensor "
                            "(or TRITON_INTERPRET=1 set before import)")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a tensor's elements can touch."""
    start = t.data_ptr()
    if t.is_contiguous():   # the common case, without Python over the dimensions
        return start, start + t.numel() * t.element_size()
    return start, start + (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
                           ) * t.element_size()


def _check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape \
            or out.device != like.device or out.dtype not in FLOAT_DTYPES or out.stride(-1) != 1:
        raise ArgumentError(f"out must be a {list(shape)} float tensor on {like.device} with "
                            f"unit channel stride, not {getattr(out, 'shape', out)!r}")
    (a0, a1), (b0, b1) = _span(out), _span(like)
    if a0 < b1 and b0 < a1:   # programs would read input that others have already overwritten
        raise ArgumentError("out overlaps the input; the kernels cannot run in place")


def _check_pad(pad: Any) -> None:
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ArgumentError(f"pad must be a non-negative integer, not {pad!r}")


def _check_out_dtype(out_dtype: Any) -> None:
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"out_dtype must be None, float32, bfloat16 or float16, not "
                            f"{out_dtype!r}")


def _check_split_k(split_k: Any, pool: bool) -> None:
    if isinstance(split_k, bool) or not isinstance(split_k, int) or not 1 <= split_k <= MAX_SPLIT_K \
            or (pool and split_k > 1):
        raise ArgumentError(f"split_k must be an integer in 1..{MAX_SPLIT_K} (1 with pool), "
                            f"not {split_k!r}")


def pack_conv_weight(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype,
                     device: torch.device | str | None = None) -> PackedConv:
    """Pack a conv weight [Cout, Cin, k, k] and bias [Cout] once, for `conv2d`.

    dtype: the activation dtype the layer will run in (float32, bfloat16 or float16).
    Returns a PackedConv on `device` (default: the weight's device).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 \
            or weight.shape[2] != weight.shape[3]:
        raise ArgumentError(f"conv weight must be [Cout, Cin, k, k], not "
                            f"{getattr(weight, 'shape', weight)}")
    cout, cin, k, _ = weight.shape
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cout,):
        raise ArgumentError(f"conv bias must be [{cout}], not {getattr(bias, 'shape', bias)}")
    if dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
    if min(weight.shape) < 1:
        raise ArgumentError(f"conv weight {list(weight.shape)} is empty")
    try:
        device = weight.device if device is None else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ArgumentError(f"device {device!r} is not a device ({exc})") from None
    kk = k * k * cin
    k_pad, cout_p = _cdiv(kk, K_ALIGN) * K_ALIGN, _cdiv(cout, N_ALIGN) * N_ALIGN
    w = torch.zeros(k_pad, cout_p, dtype=dtype, device=device)
    w[:kk, :cout] = weight.detach().permute(2, 3, 1, 0).reshape(kk, cout).to(device, dtype)
    b = torch.zeros(cout_p, dtype=torch.float32, device=device)
    b[:cout] = bias.detach().to(device, torch.float32)
    return PackedConv(w, b, int(cin), int(cout), int(k))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8        # the interpreter: small, so the tests' tiny layers take the split path
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(rows: int, cout: int, k_total: int, pool: bool, sms: int) -> int:
    """Split-K factor for a conv launch of `rows` M-grid rows: 1 unless its tiles are too few.

    Estimates the tiles with 64 x 128 blocks; while the grid would stay under two programs per
    SM, doubles the split (at most 16, and at least two 128-wide K steps per split). Pooled
    layers never split (the pool needs the whole sum).
    """
    if pool:
        return 1
    tiles = _cdiv(rows, 64) * _cdiv(cout, 128)
    split = 1
    while (split * 2 <= MAX_SPLIT_K and tiles * split * 2 <= 2 * sms
           and split * 2 <= k_total // 256):
        split *= 2
    return split


# -- launching ----------------------------------------------------------------------------------
# Triton's launch path (JITFunction.run) costs tens of microseconds of Python per launch: option
# parsing, the argument binder, a string cache key, launch metadata and hook plumbing. For an
# un-graphed forward of small batches that host time, not the GPU, sets the pace (run A: batch 1
# at ~0.1 ms per launch). `_launch` takes that path once per kind of launch, keeps the compiled
# kernel it returns, and from then on calls the kernel's launcher directly with the argument list
# JITFunction.run would have given it. A kind of launch is the kernel, the current device, the
# constexpr arguments and each run-time argument's class as triton specialises on it (see
# `_spec`): exactly what selects one compiled kernel, a little stricter, so two launches of one
# kind always take the same compiled kernel, and a new image size is a new kind only where an
# argument changes class (a size that becomes a multiple of 16, say). Launch hooks (profilers
# such as proton), pre-run hooks and TRITON_DEBUG fall back to triton's own path, as do
# VGGFAST_FAST_LAUNCH=0 and the interpreter.
# `python scripts/launch_overhead.py --check` compares the launcher calls of both paths argument
# by argument, with kernels compiled for sm_90 and a stub driver, including launches at a second
# set of sizes that reuse the first's entries (tests/test_launch.py runs it).
# The shortcut reproduces triton internals checked on 3.6 (on an H100) and 3.8 (the stub driver
# check): a later triton takes its own launch path until the check is run against it.
FAST_LAUNCH_TRITON = ((3, 6), (3, 9))    # [first, past-the-last) minor versions
FAST_LAUNCH = (not INTERPRETING and hasattr(triton, "knobs")
               and FAST_LAUNCH_TRITON[0] <= TRITON_VERSION < FAST_LAUNCH_TRITON[1]
               and os.environ.get("VGGFAST_FAST_LAUNCH", "1").strip() != "0")
_FAST: dict[tuple, tuple | None] = {}
_FAST_LIMIT = 4096      # kinds of launch kept (a server meeting endless new shapes)
_I32 = (-(1 << 31), 1 << 31)
_U64 = 1 << 63


def _spec(args: tuple) -> tuple:
    """The run-time arguments as a cache key, by the classes triton 3.x specialises a kernel on:
    a tensor by its dtype and 16-byte alignment; an int by (== 1, a multiple of 16, 32-bit,
    below 2^63), i.e. triton's constant 1, its divisibility-by-16 hint and its i32/i64/u64 type;
    a float is always fp32. TypeError for any other argument (bools, None, ...): triton's path."""
    lo, hi = _I32
    return tuple([(a.dtype, not a.data_ptr() & 15) if type(a) is torch.Tensor
                  else (a == 1, not a & 15, lo <= a < hi, a < _U64) if type(a) is int
                  else float if type(a) is float else _spec_other(a) for a in args])


def _spec_other(a) -> tuple:
    if isinstance(a, torch.Tensor):      # a subclass (nn.Parameter)
        return (a.dtype, not a.data_ptr() & 15)
    raise TypeError(f"no launch shortcut for a {type(a).__name__} argument")


def _hooked() -> bool:
    rt = triton.knobs.runtime
    return bool(getattr(rt.launch_enter_hook, "calls", rt.launch_enter_hook)
                or getattr(rt.launch_exit_hook, "calls", rt.launch_exit_hook))


def _fast_entry(fn, kernel, args: tuple, meta: dict) -> tuple | None:
    """(compiled kernel, trailing launcher arguments) for later launches of this kind, or None
    when the shortcut cannot reproduce triton's call exactly. Only a bare @triton.jit function
    qualifies: a heuristic or autotuner layer may read argument values that `_spec` reduces to
    classes."""
    from triton.runtime.jit import JITFunction
    if hasattr(kernel, "result"):
        kernel = kernel.result()
    if (type(fn) is not JITFunction or kernel is None or getattr(fn, "pre_run_hooks", 1)
            or getattr(fn, "debug", False) or triton.knobs.runtime.debug
            or getattr(kernel, "function", None) is None):
        return None
    names = fn.arg_names
    if len(names) < len(args) or any(n not in meta for n in names[len(args):]):
        return None
    return kernel, tuple(meta[n] for n in names[len(args):])


def _launch(fn, grid, args: tuple, meta: dict) -> None:
    """fn[grid](*args, **meta) for a @triton.jit kernel: the first launch of each kind through
    triton, later ones straight to its launcher. grid: a tuple, or a callable of meta."""
    if not FAST_LAUNCH or _hooked():
        fn[grid](*args, **meta)
        return
    drv = triton.runtime.driver.active
    device = drv.get_current_device()
    try:
        key = (fn, device, tuple(meta.items()), _spec(args))
        entry = _FAST.get(key, False)
    except TypeError:       # an argument of another kind: triton's path
        entry = None
    if entry is False:      # first launch of this kind: triton's path, which returns the kernel
        kernel = fn.run(*args, grid=grid, warmup=False, **meta)
        if len(_FAST) >= _FAST_LIMIT:
            _FAST.clear()
        try:
            _FAST[key] = _fast_entry(fn, kernel, args, meta)
        except Exception:   # noqa: BLE001 - triton internals not as expected: its own path
            _FAST[key] = None
        return
    if entry is None:
        fn[grid](*args, **meta)
        return
    kernel, tail = entry
    g = grid(meta) if callable(grid) else grid
    kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,
               drv.get_current_stream(device), kernel.function, kernel.packed_metadata,
               None, None, None, *args, *tail)


def _bare(fn):
    """The @triton.jit function under autotuner / heuristics layers."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    while isinstance(fn, (Autotuner, Heuristics)):
        fn = fn.fn
    return fn


_CONV = _bare(_conv.conv2d_kernel)
# The autotuner's key: these arguments' values, then every tensor argument's dtype (as triton's
# Autotuner forms it): (position in the positional arguments, name) of each key argument.
_TUNE_KEY = [(_CONV.arg_names.index(k), k) for k in _conv.conv2d_kernel.keys]
# Autotune key -> the config the autotuner picked (its keyword arguments). Once a key is tuned,
# launches skip the Autotuner and the FLAT_K heuristic and go straight to the kernel with that
# config and FLAT_K: the same call the Autotuner makes, with less Python per launch (it is paid
# on every layer of every un-graphed forward).
_TUNED: dict[tuple, dict] = {}
_STRIDE_XC = _CONV.arg_names.index("stride_xc")


def _launch_conv(grid, args: tuple, meta: dict) -> None:
    n = len(args)
    key = tuple([args[i] if i < n else meta[k] for i, k in _TUNE_KEY]
                + [a.dtype for a in args if isinstance(a, torch.Tensor)])
    cfg = _TUNED.get(key)
    if cfg is None:
        _conv.conv2d_kernel[grid](*args, **meta)
        best = getattr(_conv.conv2d_kernel, "best_config", None)
        if isinstance(best, triton.Config):
            _TUNED[key] = best.all_kwargs()
        return
    flat = _conv.flat_k(meta["CIN"], cfg["BLOCK_K"], args[_STRIDE_XC])
    _launch(_CONV, grid, args, {**meta, **cfg, "FLAT_K": flat})


def _precision(packed: PackedConv) -> str:
    return ("ieee" if packed.weight.dtype == torch.float32
            and not torch.backends.cudnn.allow_tf32 else "tf32")


def _m_class(rows: int) -> int:
    return (_conv.M_CLASS_SMALL if rows <= SMALL_ROWS else
            _conv.M_CLASS_MID if rows <= MID_ROWS else _conv.M_CLASS_LARGE)


def conv2d(x: torch.Tensor, packed: PackedConv, pad: int, relu: bool = True, pool: bool = False,
           out: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           split_k: int | None = None) -> torch.Tensor:
    """Stride-1 convolution + bias [+ ReLU] [+ 2x2 stride-2 max-pool, floor] in one kernel.

    x: [N, H, W, Cin] logical NHWC, any strides (the NCHW network input as x.permute(0, 2, 3, 1)
    is read in place and cast to the packed dtype). packed: from `pack_conv_weight`.
    Returns [N, OH, OW, Cout] (or [N, OH//2, OW//2, Cout] with pool) with OH = H + 2*pad - k + 1,
    contiguous, in out_dtype (default: the packed weight dtype), or writes into `out`.
    bf16/fp16 layers multiply on the tensor cores with fp32 accumulation; float32 layers use TF32
    while torch.backends.cudnn.allow_tf32 is set (PyTorch's default for convolutions), exact fp32
    otherwise. split_k: split the K reduction over that many programs (fp32 partial sums, then
    a reduction kernel adds bias/ReLU); default `choose_split_k`. Not with pool.
    """
    _check_act(x, "x")
    if not isinstance(packed, PackedConv):
        raise ArgumentError("packed must come from pack_conv_weight")
    nb, h, w, cin = x.shape
    if cin != packed.cin or x.device != packed.weight.device:
        raise ArgumentError(f"x has {cin} channels on {x.device}; the layer expects "
                            f"{packed.cin} on {packed.weight.device}")
    _check_pad(pad)
    _check_out_dtype(out_dtype)
    oh, ow = h + 2 * pad - packed.k + 1, w + 2 * pad - packed.k + 1
    gh, gw = (oh // 2, ow // 2) if pool else (oh, ow)
    if gh < 1 or gw < 1:   # an empty batch is refused by _check_act
        raise ArgumentError(f"input {h}x{w} (HxW) is too small for a {packed.k}x{packed.k} conv "
                            f"(pad {pad}){' and a 2x2 pool' if pool else ''}")
    shape = (nb, gh, gw, packed.cout)
    if out is None:
        dtype = packed.weight.dtype if out_dtype is None else out_dtype
        out = torch.empty(shape, dtype=dtype, device=x.device)
    else:
        _check_out(out, shape, x)

    g = nb * gh * gw
    rows = 4 * g if pool else g
    m_class = _m_class(rows)
    cout_p = packed.weight.shape[1]
    if split_k is None:
        split_k = choose_split_k(rows, packed.cout, packed.k * packed.k * packed.cin, pool,
                                 _sm_count(x.device))
    _check_split_k(split_k, bool(pool))
    per_tile = 4 if pool else 1
    target = out
    if split_k > 1:
        target = torch.empty(split_k, g, cout_p, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (_cdiv(g, meta["BLOCK_M"] // per_tile) * _cdiv(packed.cout, meta["BLOCK_N"])
                * split_k,)

    args = (x, packed.weight, packed.bias, target, packed.bias, packed.bias,
            h, w, g, gh, gw,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            out.stride(0), out.stride(1), out.stride(2),
            packed.cout, cout_p, m_class)
    meta = dict(CIN=packed.cin, KSIZE=packed.k, PAD=pad, APPLY_RELU=bool(relu),
                FUSE_POOL=bool(pool), SPLIT_K=split_k, GROUPED=False,
                PRECISION=_precision(packed))
    _launch_conv(grid, args, meta)
    if split_k > 1:
        _reduce_splits(target, packed, out, relu, split_k, g,
                       (packed.bias, packed.bias, g, gw, gh * gw), out.stride()[:3])
    return out


_REDUCE_ROWS = 32   # rows per reduce program; divides GROUP_ROW_ALIGN (one problem per block)


def _reduce_splits(ws: torch.Tensor, packed: PackedConv, out: torch.Tensor, relu: bool,
                   split_k: int, rows: int, where: tuple, y_strides: Sequence[int],
                   grouped: bool = False) -> None:
    """The split-K reduction launch: out = [ReLU](sum of ws's splits + bias). where: (grp_ptr,
    chunk_ptr, G, GW, GHW) of splitk_reduce_kernel (grouped: the tables and the virtual rows)."""
    block_n = min(128, _pow2(packed.cout))
    _launch(_conv.splitk_reduce_kernel, (_cdiv(rows, _REDUCE_ROWS), _cdiv(packed.cout, block_n)),
            (ws, packed.bias, out, *where, packed.cout, packed.weight.shape[1], *y_strides),
            dict(SPLIT_K=split_k, APPLY_RELU=bool(relu), GROUPED=grouped,
                 BLOCK_G=_REDUCE_ROWS, BLOCK_N=block_n))


# -- grouped launches: one conv launch for several inputs of different sizes -------------------

GROUP_FIELDS = int(_conv.GROUP_FIELDS)
GROUP_ROW_ALIGN = int(_conv.GROUP_ROW_ALIGN)
GROUP_ELEM_ALIGN = 16   # NHWC problems start at multiples of 16 elements (vector loads/stores)


@dataclass(frozen=True)
class GroupLayer:
    """Host-side geometry of one grouped conv launch (from `group_layer`).

    rows: the problem table, one GROUP_FIELDS-int row per problem (layout in kernels/conv.py);
    spans: the GROUP_ROW_ALIGN-row chunks of each problem (`chunks` expands them into the
    chunk -> problem map the kernel reads);
    vrows: virtual rows (problem p's rows start at a multiple of GROUP_ROW_ALIGN);
    m_rows: accumulator rows actually computed (4x the pooled pixels with pool), for the shape
    class; outputs: per problem (offset, n, h, w) of its NHWC-contiguous output in the flat
    output buffer of `numel` elements; in_numel: the input buffer elements the problems reach;
    k, pad, pool, cin, cout: the layer.
    """

    rows: tuple[tuple[int, ...], ...]
    spans: tuple[int, ...]        # chunks of each problem
    vrows: int
    m_rows: int
    outputs: tuple[tuple[int, int, int, int], ...]
    numel: int
    in_numel: int
    k: int
    pad: int
    pool: bool
    cin: int
    cout: int
    unit_channel_stride: bool

    @property
    def chunks(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.spans), dtype=np.int64), self.spans)


def align(n: int, a: int) -> int:
    """n rounded up to a multiple of a."""
    return _cdiv(n, a) * a


def group_layer(inputs: Sequence[tuple[int, int, int, int]], cin: int, cout: int, k: int,
                pad: int, pool: bool,
                strides: Sequence[tuple[int, int, int, int]] | None = None) -> GroupLayer:
    """Plan one grouped conv launch over problems `inputs` = [(offset, n, h, w), ...] in a flat
    input buffer (elements). strides: per problem (n, h, w, c) element strides of its input;
    default NHWC-contiguous with `cin` channels. Outputs are laid out NHWC-contiguous one after
    another, each at a multiple of GROUP_ELEM_ALIGN elements. Pure Python, no tensors.
    """
    if not inputs:
        raise ArgumentError("a grouped launch needs at least one input")
    rows, spans, outputs = [], [], []
    v = y = m_rows = in_numel = 0
    unit_c = True
    for p, (off, n, h, w) in enumerate(inputs):
        oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
        gh, gw = (oh // 2, ow // 2) if pool else (oh, ow)
        if n < 1 or gh < 1 or gw < 1:
            raise ArgumentError(f"input {h}x{w} (HxW) is too small for a {k}x{k} conv (pad {pad})"
                                f"{' and a 2x2 pool' if pool else ''}")
        st = (h * w * cin, w * cin, cin, 1) if strides is None else tuple(strides[p])
        if len(st) != 4:
            raise ArgumentError(f"grouped input {p}: strides must be (n, h, w, c), not {st}")
        if off < 0 or min(st) < 0:
            raise ArgumentError(f"grouped input {p} has a negative offset or stride")
        in_numel = max(in_numel, off + 1 + (n - 1) * st[0] + (h - 1) * st[1]
                       + (w - 1) * st[2] + (cin - 1) * st[3])
        unit_c = unit_c and st[3] == 1 and off % GROUP_ELEM_ALIGN == 0 \
            and st[:3] == (h * w * cin, w * cin, cin)
        g = n * gh * gw
        rows.append((off, y, h, w, gh, gw, g, v, *st) + (0,) * (GROUP_FIELDS - 12))
        outputs.append((y, n, gh, gw))
        span = align(g, GROUP_ROW_ALIGN)
        spans.append(span // GROUP_ROW_ALIGN)
        v += span
        y += align(g * cout, GROUP_ELEM_ALIGN)
        m_rows += 4 * g if pool else g
    return GroupLayer(tuple(rows), tuple(spans), v, m_rows, tuple(outputs), y, in_numel, k,
                      pad, bool(pool), cin, cout, unit_c)


def upload_groups(layers: Sequence[GroupLayer], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (problem table [P, GROUP_FIELDS], chunk table) as int64 views of ONE tensor
    on `device`: one host-to-device copy for a whole grouped forward."""
    parts, spans, n = [], [], 0
    for gl in layers:
        rows, chunks = np.asarray(gl.rows, dtype=np.int64).reshape(-1), gl.chunks
        parts += [rows, chunks]
        spans.append((n, n + rows.size, n + rows.size + chunks.size, len(gl.rows)))
        n += rows.size + chunks.size
    buf = torch.from_numpy(np.concatenate(parts))
    if torch.device(device).type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    return [(buf[a:b].view(p, GROUP_FIELDS), buf[b:c]) for a, b, c, p in spans]


def conv2d_grouped(src: torch.Tensor, layer: GroupLayer, tables: tuple[torch.Tensor, torch.Tensor],
                   packed: PackedConv, relu: bool = True, out: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None,
                   split_k: int | None = None) -> torch.Tensor:
    """One launch of the conv kernel over every problem of `layer` (see `group_layer`).

    src: the flat input buffer (1-D, any float dtype); tables: this layer's entry of
    `upload_groups`; packed: from `pack_conv_weight` (cin/cout/k must match the layer).
    Returns the flat output buffer ([layer.numel] in out_dtype, default the packed dtype, or
    `out`); problem p's output is out[o : o + n*h*w*cout].view(n, h, w, cout) for
    (o, n, h, w) = layer.outputs[p]. split_k: as in `conv2d` (default `choose_split_k` on the
    launch's rows; the fp32 workspace is indexed by virtual row).
    """
    if not isinstance(layer, GroupLayer) or not isinstance(packed, PackedConv):
        raise ArgumentError("layer must come from group_layer and packed from pack_conv_weight")
    if (packed.cin, packed.cout, packed.k) != (layer.cin, layer.cout, layer.k):
        raise ArgumentError(f"the grouped layer is {layer.cin}->{layer.cout} k{layer.k}; the "
                            f"weights are {packed.cin}->{packed.cout} k{packed.k}")
    if not isinstance(src, torch.Tensor) or src.dim() != 1 or src.dtype not in FLOAT_DTYPES \
            or src.device != packed.weight.device or not src.is_contiguous():
        raise ArgumentError("src must be a contiguous 1-D float tensor on the weights' device")
    if layer.in_numel > src.numel():
        raise ArgumentError(f"the grouped inputs reach element {layer.in_numel - 1} of a "
                            f"{src.numel()}-element buffer")
    if src.device.type == "cpu" and not INTERPRETING:
        raise ArgumentError("src is on the CPU; the Triton kernels need a CUDA tensor "
                            "(or TRITON_INTERPRET=1 set before import)")
    table, chunks = tables if isinstance(tables, tuple) and len(tables) == 2 else (None, None)
    if not (isinstance(table, torch.Tensor) and isinstance(chunks, torch.Tensor)) \
            or table.shape != (len(layer.rows), GROUP_FIELDS) or chunks.numel() != sum(layer.spans) \
            or table.dtype != torch.int64 or chunks.dtype != torch.int64:
        raise ArgumentError("tables must be this layer's entry of upload_groups")
    _check_out_dtype(out_dtype)
    dtype = packed.weight.dtype if out_dtype is None else out_dtype
    if out is None:
        out = torch.empty(layer.numel, dtype=dtype, device=src.device)
    elif not isinstance(out, torch.Tensor) or out.dim() != 1 or out.numel() < layer.numel \
            or out.device != src.device or out.dtype not in FLOAT_DTYPES \
            or not out.is_contiguous():
        raise ArgumentError(f"out must be a contiguous 1-D float tensor of at least "
                            f"{layer.numel} elements on {src.device}")
    m_class = _m_class(layer.m_rows)
    per_tile = 4 if layer.pool else 1
    cout_p = packed.weight.shape[1]
    if split_k is None:
        split_k = choose_split_k(layer.m_rows, packed.cout, packed.k * packed.k * packed.cin,
                                 layer.pool, _sm_count(src.device))
    _check_split_k(split_k, layer.pool)
    target = out
    if split_k > 1:
        target = torch.empty(split_k, layer.vrows, cout_p, dtype=torch.float32,
                             device=src.device)

    def grid(meta):
        return (_cdiv(layer.vrows, meta["BLOCK_M"] // per_tile)
                * _cdiv(layer.cout, meta["BLOCK_N"]) * split_k,)

    stride_xc = 1 if layer.unit_channel_stride else 0   # 0: FLAT_K, strides from the table
    # The sizes and strides come from the table (G carries the virtual rows); the placeholders
    # are 0, not 1 (triton turns an int argument equal to 1 into a constant: another kernel).
    args = (src, packed.weight, packed.bias, target, table, chunks,
            0, 0, layer.vrows, 0, 0,
            0, 0, 0, stride_xc,
            0, 0, 0,
            packed.cout, cout_p, m_class)
    meta = dict(CIN=packed.cin, KSIZE=packed.k, PAD=layer.pad, APPLY_RELU=bool(relu),
                FUSE_POOL=layer.pool, SPLIT_K=split_k, GROUPED=True,
                PRECISION=_precision(packed))
    _launch_conv(grid, args, meta)
    if split_k > 1:
        _reduce_splits(target, packed, out, relu, split_k, layer.vrows,
                       (table, chunks, layer.vrows, 0, 0), (0, 0, 0), grouped=True)
    return out


def conv2d_many(xs: Sequence[torch.Tensor], packed: PackedConv, pad: int, relu: bool = True,
                pool: bool = False, out_dtype: torch.dtype | None = None,
                split_k: int | None = None) -> list[torch.Tensor]:
    """`conv2d` on several NHWC inputs of different sizes (same channels) in ONE launch (plus
    the reduction when K is split).

    Copies the inputs into one aligned flat buffer, launches once, and returns each output as a
    view [n, OH, OW, Cout] (or pooled) of one flat output buffer.
    """
    if not xs:
        raise ArgumentError("conv2d_many needs at least one input")
    if not isinstance(packed, PackedConv):
        raise ArgumentError("packed must come from pack_conv_weight")
    for i, x in enumerate(xs):
        _check_act(x, f"xs[{i}]")
        if x.shape[3] != packed.cin or x.device != packed.weight.device:
            raise ArgumentError(f"xs[{i}] has {x.shape[3]} channels on {x.device}; the layer "
                                f"expects {packed.cin} on {packed.weight.device}")
    _check_pad(pad)
    dtype = torch.promote_types(xs[0].dtype, xs[0].dtype)
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    inputs, off = [], 0
    for x in xs:
        inputs.append((off, x.shape[0], x.shape[1], x.shape[2]))
        off += align(x.numel(), GROUP_ELEM_ALIGN)
    src = torch.empty(off, dtype=dtype, device=xs[0].device)
    for (o, *_), x in zip(inputs, xs):
        src[o:o + x.numel()].view(x.shape).copy_(x)
    layer = group_layer(inputs, packed.cin, packed.cout, packed.k, pad, pool)
    tables = upload_groups([layer], src.device)[0]
    y = conv2d_grouped(src, layer, tables, packed, relu, out_dtype=out_dtype, split_k=split_k)
    return [y[o:o + n * h * w * packed.cout].view(n, h, w, packed.cout)
            for o, n, h, w in layer.outputs]


def max_pool2x2(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """2x2 stride-2 max-pool (floor): x [N, H, W, C] (channel stride 1) -> [N, H//2, W//2, C]."""
    _check_act(x, "x")
    if x.stride(3) != 1:
        raise ArgumentError("max_pool2x2 needs an NHWC tensor with unit channel stride")
    nb, h, w, c = x.shape
    if h < 2 or w < 2:
        raise ArgumentError(f"input {h}x{w} (HxW) is too small for a 2x2 max-pool")
    shape = (nb, h // 2, w // 2, c)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, shape, x)
        if not out.is_contiguous():
            raise ArgumentError("out must be contiguous")
    g = nb * (h // 2) * (w // 2)
    block_c = min(64, _pow2(c))
    block_p = max(1, 4096 // block_c) if not INTERPRETING else 64
    grid = (_cdiv(g, block_p), _cdiv(c, block_c))
    _launch(_pool.max_pool2x2_kernel, grid,
            (x, out, g, h // 2, w // 2, c, x.stride(0), x.stride(1), x.stride(2)),
            dict(BLOCK_P=block_p, BLOCK_C=block_c))
    return out


def lrn(x: torch.Tensor, out: torch.Tensor | None = None, size: int = LRN_SIZE,
        alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K) -> torch.Tensor:
    """Cross-channel LRN, x [N, H, W, C] contiguous -> same shape and dtype (or into `out`).

    y = x / (k + alpha * sum of x^2 over the `size` channels around c) ^ beta; alpha is not
    divided by size (Krizhevsky et al.; A-LRN's defaults n=5, alpha=1e-4, beta=0.75, k=2).
    """
    _check_act(x, "x")
    if not x.is_contiguous():
        raise ArgumentError("lrn needs a contiguous NHWC tensor")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ArgumentError(f"LRN size must be a positive integer, not {size!r}")
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ArgumentError(f"LRN {name} must be a finite number, not {v!r}")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, tuple(x.shape), x)
        if not out.is_contiguous():
            raise ArgumentError("out must be contiguous")
    c = x.shape[3]
    p = x.numel() // c
    block_c = min(128, _pow2(c))
    block_p = max(1, 4096 // block_c) if not INTERPRETING else 64
    grid = (_cdiv(p, block_p), _cdiv(c, block_c))
    _launch(_lrn.lrn_kernel, grid, (x, out, p, c, float(alpha), float(beta), float(k)),
            dict(SIZE=size, BLOCK_P=block_p, BLOCK_C=block_c))
    return out


MAX_CLASSES = 1 << 16


def mean_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Spatial mean of a class score map, then softmax over classes.

    scores: [N, C, h, w] float (any strides; the triton backend's fc8 output is NHWC viewed as
    NCHW). Returns [N, C] float32 posteriors, each row summing to 1.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ArgumentError(f"scores must be a 4-D [N, C, h, w] tensor, not "
                            f"{getattr(scores, 'shape', scores)!r}")
    _check_act(scores, "scores")
    nb, c, h, w = scores.shape
    if c > MAX_CLASSES or min(nb, c, h, w) < 1:
        raise ArgumentError(f"scores must have 1..{MAX_CLASSES} classes and a non-empty map, "
                            f"not {list(scores.shape)}")
    out = torch.empty(nb, c, dtype=torch.float32, device=scores.device)
    block_c = _pow2(c)
    block_s = max(1, min(_pow2(h * w), 8192 // block_c))
    _launch(_score.mean_softmax_kernel, (nb,),
            (scores, out, h * w, w, c, scores.stride(0), scores.stride(1), scores.stride(2),
             scores.stride(3)),
            dict(BLOCK_S=block_s, BLOCK_C=block_c))
    return out

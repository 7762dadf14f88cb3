"""Launch wrappers for the Triton kernels in vggfast.kernels.

Each wrapper does four things in order: check its inputs, allocate the output (or take `out`),
compute the grid, launch. Activations are logical NHWC tensors ([N, H, W, C]); the kernels read
them through their strides. On CPU tensors the kernels run only under TRITON_INTERPRET=1, which
must be set before this module is first imported.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from vggfast.kernels import conv as _conv
from vggfast.kernels import lrn as _lrn
from vggfast.kernels import pool as _pool
from vggfast.kernels import score as _score

from .configs import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE
from .errors import ArgumentError

INTERPRETING = _conv.INTERPRET
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
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


def _check_act(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ArgumentError(f"{name} must be a 4-D NHWC tensor, not {getattr(x, 'shape', x)!r}")
    if x.dtype not in FLOAT_DTYPES:
        raise ArgumentError(f"{name} must be float32, bfloat16 or float16, not {x.dtype}")
    if x.device.type == "cpu" and not INTERPRETING:
        raise ArgumentError(f"{name} is on the CPU; the Triton kernels need a CUDA tensor "
                            "(or TRITON_INTERPRET=1 set before import)")


def _check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor) -> None:
    if tuple(out.shape) != shape or out.device != like.device or out.dtype not in FLOAT_DTYPES \
            or out.stride(-1) != 1:
        raise ArgumentError(f"out must be a {list(shape)} float tensor on {like.device} with "
                            f"unit channel stride, not {list(out.shape)} {out.dtype} {out.device}")


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
    device = weight.device if device is None else torch.device(device)
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
    while (split * 2 <= 16 and tiles * split * 2 <= 2 * sms
           and split * 2 <= k_total // 256):
        split *= 2
    return split


# Autotune key (the kernel's key plus its tensors' dtypes, as triton's Autotuner forms it) -> the
# config the autotuner picked. Once a key is tuned, launches skip the Autotuner's per-call key
# building and go straight to the kernel with that config: the same call the Autotuner makes,
# with less Python per launch (it is paid on every layer of every un-graphed forward).
_TUNED: dict[tuple, triton.Config] = {}


def _launch_conv(grid, args: tuple, meta: dict, key: tuple) -> None:
    kernel = _conv.conv2d_kernel
    cfg = _TUNED.get(key)
    if cfg is None:
        kernel[grid](*args, **meta)
        best = getattr(kernel, "best_config", None)
        if isinstance(best, triton.Config):
            _TUNED[key] = best
    else:
        kernel.fn.run(*args, grid=grid, warmup=False, **meta, **cfg.all_kwargs())


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
    if not isinstance(pad, int) or pad < 0:
        raise ArgumentError(f"pad must be a non-negative integer, not {pad!r}")
    oh, ow = h + 2 * pad - packed.k + 1, w + 2 * pad - packed.k + 1
    gh, gw = (oh // 2, ow // 2) if pool else (oh, ow)
    if nb < 1 or gh < 1 or gw < 1:
        raise ArgumentError(f"input {h}x{w} is too small for a {packed.k}x{packed.k} conv "
                            f"(pad {pad}){' and a 2x2 pool' if pool else ''}")
    shape = (nb, gh, gw, packed.cout)
    if out is None:
        dtype = packed.weight.dtype if out_dtype is None else out_dtype
        out = torch.empty(shape, dtype=dtype, device=x.device)
    else:
        _check_out(out, shape, x)

    g = nb * gh * gw
    rows = 4 * g if pool else g
    m_class = (_conv.M_CLASS_SMALL if rows <= SMALL_ROWS else
               _conv.M_CLASS_MID if rows <= MID_ROWS else _conv.M_CLASS_LARGE)
    cout_p = packed.weight.shape[1]
    if split_k is None:
        split_k = choose_split_k(rows, packed.cout, packed.k * packed.k * packed.cin, pool,
                                 _sm_count(x.device))
    if not isinstance(split_k, int) or split_k < 1 or (pool and split_k > 1):
        raise ArgumentError(f"split_k must be a positive integer (1 with pool), not {split_k!r}")
    per_tile = 4 if pool else 1
    target = out
    if split_k > 1:
        target = torch.empty(split_k, g, cout_p, dtype=torch.float32, device=x.device)

    def grid(meta):
        return (_cdiv(g, meta["BLOCK_M"] // per_tile) * _cdiv(packed.cout, meta["BLOCK_N"])
                * split_k,)

    args = (x, packed.weight, packed.bias, target,
            h, w, g, gh, gw,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            out.stride(0), out.stride(1), out.stride(2),
            packed.cout, cout_p, m_class)
    meta = dict(CIN=packed.cin, KSIZE=packed.k, PAD=pad, APPLY_RELU=bool(relu),
                FUSE_POOL=bool(pool), SPLIT_K=split_k,
                PRECISION=("ieee" if packed.weight.dtype == torch.float32
                           and not torch.backends.cudnn.allow_tf32 else "tf32"))
    _launch_conv(grid, args, meta, (packed.cin, packed.cout, packed.k, bool(pool), m_class,
                                    meta["PRECISION"], split_k, x.dtype, packed.weight.dtype,
                                    target.dtype))
    if split_k > 1:
        block_n = min(128, triton.next_power_of_2(packed.cout))
        block_g = 32
        _conv.splitk_reduce_kernel[(_cdiv(g, block_g), _cdiv(packed.cout, block_n))](
            target, packed.bias, out, g, gw, gh * gw, packed.cout, cout_p,
            out.stride(0), out.stride(1), out.stride(2),
            SPLIT_K=split_k, APPLY_RELU=bool(relu), BLOCK_G=block_g, BLOCK_N=block_n)
    return out


def max_pool2x2(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """2x2 stride-2 max-pool (floor): x [N, H, W, C] (channel stride 1) -> [N, H//2, W//2, C]."""
    _check_act(x, "x")
    if x.stride(3) != 1:
        raise ArgumentError("max_pool2x2 needs an NHWC tensor with unit channel stride")
    nb, h, w, c = x.shape
    if h < 2 or w < 2:
        raise ArgumentError(f"input {h}x{w} is too small for a 2x2 max-pool")
    shape = (nb, h // 2, w // 2, c)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    else:
        _check_out(out, shape, x)
        if not out.is_contiguous():
            raise ArgumentError("out must be contiguous")
    g = nb * (h // 2) * (w // 2)
    block_c = min(64, triton.next_power_of_2(c))
    block_p = max(1, 4096 // block_c) if not INTERPRETING else 64
    grid = (_cdiv(g, block_p), _cdiv(c, block_c))
    _pool.max_pool2x2_kernel[grid](x, out, g, h // 2, w // 2, c, x.stride(0), x.stride(1),
                                   x.stride(2), BLOCK_P=block_p, BLOCK_C=block_c)
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
    if not isinstance(size, int) or size < 1:
        raise ArgumentError(f"LRN size must be a positive integer, not {size!r}")
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_out(out, tuple(x.shape), x)
        if not out.is_contiguous():
            raise ArgumentError("out must be contiguous")
    c = x.shape[3]
    p = x.numel() // c
    block_c = min(128, triton.next_power_of_2(c))
    block_p = max(1, 4096 // block_c) if not INTERPRETING else 64
    grid = (_cdiv(p, block_p), _cdiv(c, block_c))
    _lrn.lrn_kernel[grid](x, out, p, c, float(alpha), float(beta), float(k), SIZE=size,
                          BLOCK_P=block_p, BLOCK_C=block_c)
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
    block_c = triton.next_power_of_2(c)
    block_s = max(1, min(triton.next_power_of_2(h * w), 8192 // block_c))
    _score.mean_softmax_kernel[(nb,)](scores, out, h * w, w, c, scores.stride(0),
                                      scores.stride(1), scores.stride(2), scores.stride(3),
                                      BLOCK_S=block_s, BLOCK_C=block_c)
    return out

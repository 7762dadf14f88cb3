"""Dense-evaluation score reduction: spatial mean of the class score map, then softmax.

Math. For a score map s [N, C, h, w] (fc8 applied densely, C classes):

    m[n, c] = (1 / (h*w)) * sum_{i, j} s[n, c, i, j]
    p[n, c] = exp(m[n, c] - max_c m[n, :]) / sum_c exp(m[n, c] - max_c m[n, :])

(Sec. 3.2 of the paper: average the raw scores spatially, then softmax.) All arithmetic in fp32.

Layouts. s: any strides (stride_n, stride_c, stride_h, stride_w); the backend passes its NHWC fc8
output viewed as NCHW, so stride_c == 1 and a row of classes is one contiguous load. p: [N, C]
fp32 contiguous.

Program id -> tile. One program per image n (grid (N,)); it holds all C classes in one
BLOCK_C = next_power_of_2(C) vector and walks the h*w positions BLOCK_S at a time, each step
loading a [BLOCK_S, BLOCK_C] tile and summing it over positions.
"""
import triton
import triton.language as tl


@triton.jit
def mean_softmax_kernel(s_ptr, p_ptr, HW, Wd, C, stride_n, stride_c, stride_h, stride_w,
                        BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    base = s_ptr + n.to(tl.int64) * stride_n + cols.to(tl.int64)[None, :] * stride_c
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, HW, BLOCK_S):
        pos = s0 + tl.arange(0, BLOCK_S)
        off = (pos // Wd).to(tl.int64) * stride_h + (pos % Wd).to(tl.int64) * stride_w
        mask = (pos < HW)[:, None] & c_ok[None, :]
        v = tl.load(base + off[:, None], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=0)
    mean = tl.where(c_ok, acc / HW, float("-inf"))
    e = tl.exp(mean - tl.max(mean, axis=0))
    e = tl.where(c_ok, e, 0.0)
    tl.store(p_ptr + n.to(tl.int64) * C + cols, e / tl.sum(e, axis=0), mask=c_ok)

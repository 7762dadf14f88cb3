"""2x2 stride-2 max-pool on NHWC, floor semantics (nn.MaxPool2d(2, 2)).

Only used where the pool cannot live in the conv epilogue (kernels/conv.py FUSE_POOL): after
A-LRN's LRN, and when a caller asks for the pre-pool activation as an output.

Math. y[n, i, j, c] = max(x[n, 2i+a, 2j+b, c] for a, b in {0, 1}), i < H // 2, j < W // 2.

Layouts. x: [N, H, W, C] with channel stride 1 and strides (stride_xn, stride_xh, stride_xw);
y: [N, H//2, W//2, C] contiguous. The max is taken in fp32 (exact for bf16/fp16 inputs).

Program id -> tile. A 2-D grid (cdiv(G, BLOCK_P), cdiv(C, BLOCK_C)) with G = N*(H//2)*(W//2)
pooled pixels in (n, i, j) order; each program owns BLOCK_P pooled pixels x BLOCK_C channels.
Pixel offsets are int64.
"""
import triton
import triton.language as tl


@triton.jit
def max_pool2x2_kernel(x_ptr, y_ptr, G, GH, GW, C, stride_xn, stride_xh, stride_xw,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    g = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    n = g // (GH * GW)
    r = g % (GH * GW)
    i = r // GW
    j = r % GW
    mask = (g < G)[:, None] & (cols < C)[None, :]
    src = x_ptr + (n * stride_xn + 2 * i * stride_xh + 2 * j * stride_xw)[:, None] + cols[None, :]
    m = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    m = tl.maximum(m, tl.load(src + stride_xw, mask=mask, other=0.0).to(tl.float32))
    m = tl.maximum(m, tl.load(src + stride_xh, mask=mask, other=0.0).to(tl.float32))
    m = tl.maximum(m, tl.load(src + stride_xh + stride_xw, mask=mask, other=0.0).to(tl.float32))
    tl.store(y_ptr + (g * C)[:, None] + cols[None, :], m.to(y_ptr.dtype.element_ty), mask=mask)

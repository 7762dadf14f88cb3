"""Local response normalisation across channels (Krizhevsky et al. 2012), NHWC.

Math. For each pixel and channel c of x [P, C] (P = N*H*W pixels, channels contiguous):

    y[p, c] = x[p, c] / (KAPPA + ALPHA * sum_{j = c - SIZE//2}^{c + (SIZE-1)//2} x[p, j]^2) ^ BETA

with out-of-range j contributing 0; that is F.local_response_norm(x, SIZE, alpha=ALPHA*SIZE,
beta=BETA, k=KAPPA) (PyTorch divides alpha by SIZE, the paper's LRN does not). A-LRN uses
SIZE=5, ALPHA=1e-4, BETA=0.75, KAPPA=2 after conv1_1's ReLU. The power is exp2(BETA*log2(.)),
computed in fp32 whatever the storage dtype.

Layouts. x and y: [P, C] with row stride C and channel stride 1 (an NHWC tensor viewed flat), same
shape, any of bf16/fp16/fp32; y may have its own dtype.

Program id -> tile. A 2-D grid (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C)); each program owns
BLOCK_P pixels x BLOCK_C channels and reads its SIZE - 1 halo channels straight from memory (the
SIZE shifted loads of one row hit L1), so channel blocks are independent. Pixel offsets are int64.
"""
import triton
import triton.language as tl


@triton.jit
def lrn_kernel(x_ptr, y_ptr, P, C, ALPHA, BETA, KAPPA,
               SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < P
    base = rows[:, None] * C
    sumsq = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for s in tl.static_range(SIZE):
        cc = cols + (s - SIZE // 2)
        m = row_ok[:, None] & ((cc >= 0) & (cc < C))[None, :]
        v = tl.load(x_ptr + base + cc[None, :], mask=m, other=0.0).to(tl.float32)
        sumsq += v * v
    mask = row_ok[:, None] & (cols < C)[None, :]
    x = tl.load(x_ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    div = tl.exp2(BETA * tl.log2(KAPPA + ALPHA * sumsq))
    tl.store(y_ptr + base + cols[None, :], (x / div).to(y_ptr.dtype.element_ty), mask=mask)

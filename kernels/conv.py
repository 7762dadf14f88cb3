"""Implicit-GEMM convolution with fused bias, ReLU and 2x2 stride-2 max-pool epilogue.

Math. For an input x [NB, H, W, CIN] (logical NHWC), weights w [COUT, CIN, KS, KS], bias b and
zero padding PAD, the stride-1 convolution is

    y[n, oh, ow, co] = b[co] + sum_{kh, kw, ci} x[n, oh+kh-PAD, ow+kw-PAD, ci] * w[co, ci, kh, kw]

with OH = H + 2 PAD - KS + 1 (same for OW), read as a GEMM C[M, N] = A[M, K] @ B[K, N] with
M = NB*OH*OW (output pixels), N = COUT, K = KS*KS*CIN ordered (kh, kw, ci); A is never formed,
each A tile is gathered from x with the padding as a load mask (implicit GEMM). The epilogue adds
b, then optionally ReLU (APPLY_RELU), then optionally the 2x2 stride-2 max-pool (FUSE_POOL) with
the floor semantics of nn.MaxPool2d(2, 2): pooled size (OH // 2, OW // 2); conv outputs in a last
odd row/column are never computed. Max commutes with "+ b" and with ReLU (both monotone), so the
kernel pools the raw accumulator first and adds b / applies ReLU on a quarter of the values.
KS = 3 (PAD 1) is the VGG conv, KS = 1 config C's third conv and fc7/fc8, KS = g (PAD 0) is fc6
applied densely (g = image_size / 32, 7 for the paper's nets).

Operands and layouts.
- x: any strides (stride_xn, stride_xh, stride_xw, stride_xc); activations are NHWC-contiguous
  (stride_xc == 1) bf16/fp16/fp32. The network input is read as the NCHW fp32 tensor it arrives
  in (a permuted view, stride_xc = H*W) and cast to the weights' dtype in registers, so there is
  no host-side repack of the image.
- w: packed once at load time to [K_PAD, COUT_P] row-major (B of the GEMM, N contiguous), rows in
  (kh, kw, ci) order, K_PAD = K rounded up to 128 and COUT_P = COUT rounded up to 16 with zeros,
  in the activation dtype. Zero rows let the K loop run whole BLOCK_K steps without masking B.
- b: [COUT_P] fp32.
- y: [NB, OH', OW', COUT] with channel stride 1 and row strides (stride_yn, stride_yh,
  stride_yw); OH', OW' = OH, OW or OH // 2, OW // 2 with FUSE_POOL. Its dtype may differ from x
  (fc8 writes fp32 scores); the fp32 accumulator is cast on store.

Two ways to walk K (constexpr FLAT_K, chosen per config by the heuristic below):
- channel chunks (FLAT_K False; CIN % BLOCK_K == 0 and stride_xc == 1): K step s covers one tap
  (kh, kw) and BLOCK_K consecutive channels, so every A row is one contiguous, vectorisable run
  of channels and the mask is one bit per row. All VGG layers past conv1_1 take this path.
- flat K (FLAT_K True): each of the BLOCK_K columns decodes its own (kh, kw, ci). This is the
  conv1_1 path: K = 27 is a single BLOCK_K = 32 step (one 27-wide MMA instead of nine 3-wide
  ones), reading the fp32 NCHW image directly; it also serves width-reduced nets whose CIN is
  not a multiple of BLOCK_K. Both paths read the same packed w, since w is always (kh, kw, ci).

Split-K (SPLIT_K > 1, never with FUSE_POOL): when the M x N tiles are too few to fill the GPU
(batch-1 and small dense fc6/fc7/fc8, deep convs at batch 1), each tile's K steps are split into
SPLIT_K contiguous ranges run by separate programs; each writes its raw fp32 partial sums to a
workspace [SPLIT_K, G, COUT_P] (y_ptr then points to it) and splitk_reduce_kernel adds them,
the bias and the ReLU. fc6's 205 MB of weights are then streamed by hundreds of programs.

Grouped launches (GROUPED): one launch computes the same layer for several problems (inputs of
different sizes: the three scales of the dense protocol, the batches of a mixed-size request),
so a request costs one launch per layer instead of one per layer and input size. Problem p owns
the rows [V_p, V_p + G_p) of a virtual M grid, V_p a multiple of GROUP_ROW_ALIGN (256); tiles
hold ROWS <= 256 rows (a power of two), so none straddles two problems. A program reads its
problem from chunk_ptr[first row // 256], then the problem's row of grp_ptr: input/output
offsets, H, W, GH, GW, G, V_p and the input strides; programs over the padding rows return at
once. Inputs and outputs live in flat buffers. Outputs are NHWC-contiguous at 16-element-aligned
offsets (row offset = row * COUT), and so are the inputs of the channel-chunk path, whose strides
are then rebuilt from the constexpr CIN so that the compiler still sees aligned, vectorisable
rows. The flat-K path (conv1_1 reading the NCHW images) takes the strides from the table.
A grouped launch may split K: its workspace is indexed by virtual row, and the grouped
splitk_reduce_kernel maps each row back to its problem's output.
Offline sm_90 compiles (scripts/aot_sm90.py) give the grouped kernels the shared memory and
wgmma/cp.async use of the single-problem ones and no spills, except conv1_1's 256x64 tile (128
bytes of stack).

Program id -> tile. A 1-D grid of cdiv(G, ROWS) * cdiv(COUT, BLOCK_N) * SPLIT_K programs;
pid_k = pid % SPLIT_K, then pid_n = (pid // SPLIT_K) % num_n is the fast index, so the programs that share an A tile (the gathered, 9x re-read
operand) run side by side and hit L2, while the packed weights (<= 4.7 MB per conv) stay
L2-resident. pid_m = pid // num_n selects ROWS consecutive rows of the "M grid" of G rows:
- without pool: the G = NB*OH*OW output pixels in (n, oh, ow) order, ROWS = BLOCK_M;
- with pool: the G = NB*(OH//2)*(OW//2) pooled pixels, ROWS = BLOCK_M // 4, and the tile's
  BLOCK_M accumulator rows are ordered (q, r): row q*ROWS + r is conv output
  (2*ph + q // 2, 2*pw + q % 2) of pooled pixel r. Every tile therefore holds whole 2x2 windows,
  and the pool is a max over the leading axis of the accumulator reshaped to [4, ROWS, BLOCK_N],
  in registers. Linearising the windows (rather than 2-D spatial tiles) leaves no idle rows at
  the edges of small maps (14x14, 7x7) and at odd sizes, whatever the image size.
Row offsets (n, h, w) are int64: an activation of 64x512x512x64 already has 2^30 elements.

Under TRITON_INTERPRET=1 (the CPU tests) two interpreter gaps are bridged, behind the constexpr
_INTERPRETER so the GPU build does not see them: the interpreter stores bfloat16 as uint16 and its
tl.dot multiplies those bit patterns, so the operands are widened to fp32 before the dot (products
of bf16/fp16 values are exact in fp32, as in the tensor cores' fp32-accumulated MMA); and its
fp32 -> bf16 cast truncates, so the fp32 image entering a bf16 dot and the bf16 result are first
rounded to nearest-even by _round_to_bf16, as the GPU's cvt.rn does.
"""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETER = tl.constexpr(INTERPRET)

# Shape classes (autotune key M_CLASS): rows of the M grid <= 128 ("small": batch-1 fc6/fc7/fc8,
# tiny maps), <= 8192 ("mid": deep layers at batch 1..8), else "large". Hopper configs: wgmma wants
# BLOCK_M a multiple of 64 per warpgroup; 3-4 cp.async stages of (BM + BN) * BK * 2 bytes stay
# under the 227 KB of shared memory (128x256x64 x 3 stages = 144 KB). Checked by compiling for
# sm_90 offline (Triton 3.8 + its ptxas, no GPU): the bf16 tiles with BLOCK_M >= 64 issue HGMMA
# (wgmma), BLOCK_M 16/32 HMMA; the channel-chunk path loads through LDGSTS (cp.async), the flat
# path through plain loads; nothing spills except 128x256 on 1x1 layers (16 bytes of stack).
# 256x128 tiles spilled ~100 bytes (the A-tile addresses live in registers) and are left out.
M_CLASS_SMALL, M_CLASS_MID, M_CLASS_LARGE = 0, 1, 2
# Grouped launches (GROUPED): each problem's rows start at a multiple of GROUP_ROW_ALIGN in the
# launch's virtual row space; its GROUP_FIELDS-entry int64 row of the problem table holds
# [x offset, y offset, H, W, GH, GW, G, V (first virtual row), stride_xn, stride_xh, stride_xw,
# stride_xc, 0...] (offsets in elements; the y offset, and the x offset of an NHWC-contiguous
# input, are multiples of 16).
GROUP_ROW_ALIGN = tl.constexpr(256)
GROUP_FIELDS = tl.constexpr(16)


def _c(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


CONFIGS_BY_CLASS = {
    # First of each list that fits a layer = its config under VGGFAST_AUTOTUNE=0: the tiles the
    # autotuner picked on an H100 for VGG16 at batch 64 (bench/NOTES.md, run A).
    M_CLASS_LARGE: [_c(128, 256, 64, 8, 3), _c(128, 128, 64, 4, 4), _c(128, 64, 64, 4, 4),
                    _c(128, 128, 64, 8, 3), _c(128, 128, 64, 8, 4), _c(64, 128, 64, 4, 4),
                    # Cout-64 layers (conv1_2): a taller tile halves the B re-reads per row.
                    _c(256, 64, 64, 8, 3), _c(256, 64, 64, 8, 4)],
    M_CLASS_MID: [_c(64, 128, 64, 4, 4), _c(128, 128, 64, 8, 3), _c(64, 64, 64, 4, 4),
                  _c(128, 64, 64, 4, 4), _c(64, 256, 64, 8, 3)],
    # Batch-1 fc layers are weight-streaming GEMVs: many narrow N tiles to spread the weight read
    # over all SMs, a long BLOCK_K and deep pipelining to keep enough bytes in flight.
    M_CLASS_SMALL: [_c(16, 64, 128, 4, 4), _c(16, 32, 128, 4, 5), _c(32, 64, 128, 4, 4),
                    _c(16, 128, 128, 4, 4), _c(64, 64, 64, 4, 4)],
}
# conv1_1 (K = 27) and other flat-K layers: a single (or few) BLOCK_K = 32 steps.
FLAT_CONFIGS = [_c(128, 64, 32, 4, 2), _c(256, 64, 32, 8, 2), _c(64, 64, 32, 4, 2),
                _c(128, 128, 32, 8, 2)]
# float32 layers (not the product path): TF32 tensor cores with 4-byte tiles at BLOCK_K = 32, or
# exact fp32 FMA ("ieee"), which spills beyond 64x128 tiles.
TF32_CONFIGS = [_c(128, 128, 32, 8, 3), _c(128, 64, 32, 4, 3), _c(64, 128, 32, 4, 3),
                _c(32, 64, 32, 4, 3)]
IEEE_CONFIGS = [_c(64, 64, 32, 4, 3), _c(128, 64, 32, 8, 2), _c(64, 128, 32, 8, 2),
                _c(32, 64, 32, 4, 2)]
# The interpreter runs each program in Python: one config, no tuning runs (they would be slow).
INTERPRETER_CONFIG = _c(128, 64, 32, 4, 1)

if INTERPRET:
    CONFIGS = [INTERPRETER_CONFIG]
else:
    CONFIGS = list(dict.fromkeys(FLAT_CONFIGS + TF32_CONFIGS + IEEE_CONFIGS
                                 + [c for cs in CONFIGS_BY_CLASS.values() for c in cs]))


def flat_k(cin: int, block_k: int, stride_xc: int) -> bool:
    return cin % block_k != 0 or stride_xc != 1


def _prune(configs, named_args, **kwargs):
    """Keep the configs of this launch's shape class that suit its CIN/COUT (at least one), in
    the class list's order; only the first when VGGFAST_AUTOTUNE=0 (no tuning runs: a cold start
    compiles one config per layer shape instead of benchmarking several)."""
    a = {**named_args, **kwargs}
    cin, cout, stride_xc = a["CIN"], a["COUT"], a["stride_xc"]
    k_total = a["KSIZE"] * a["KSIZE"] * cin
    if a["w_ptr"].element_size() == 4:
        want = IEEE_CONFIGS if a["PRECISION"] == "ieee" else TF32_CONFIGS
    elif flat_k(cin, 64, stride_xc) and k_total <= 512:
        want = FLAT_CONFIGS
    else:
        want = CONFIGS_BY_CLASS[a["M_CLASS"]]
    # The 256-row tiles are for Cout-64 layers only (each extra config is a compile at cold start).
    keep = [c for c in configs if c in want
            and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(cout))
            and (c.kwargs["BLOCK_M"] < 256 or cout <= 64 or want is FLAT_CONFIGS)]
    keep = keep or [c for c in configs if c in want] or list(configs[:1])
    keep.sort(key=lambda c: want.index(c) if c in want else len(want))
    if os.environ.get("VGGFAST_AUTOTUNE", "1").strip() == "0":
        return keep[:1]
    return keep


@triton.jit
def _round_to_bf16(x):
    """fp32 -> the nearest bfloat16 value (ties to even), kept in fp32; finite x."""
    u = x.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return ((u >> 16) << 16).to(tl.float32, bitcast=True)


@triton.autotune(configs=CONFIGS,
                 key=["CIN", "COUT", "KSIZE", "FUSE_POOL", "M_CLASS", "PRECISION", "SPLIT_K", "GROUPED"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.heuristics({"FLAT_K": lambda a: flat_k(a["CIN"], a["BLOCK_K"], a["stride_xc"])})
@triton.jit
def conv2d_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    grp_ptr, chunk_ptr,       # GROUPED only: problem table [P, GROUP_FIELDS], chunk -> problem
    H, W,                     # input spatial size
    G, GH, GW,                # M grid: G = NB*GH*GW rows; (GH, GW) = (OH, OW) or pooled size
    stride_xn, stride_xh, stride_xw, stride_xc,
    stride_yn, stride_yh, stride_yw,
    COUT, COUT_P,             # real and padded output channels
    M_CLASS,                  # shape class, autotune key only
    CIN: tl.constexpr, KSIZE: tl.constexpr, PAD: tl.constexpr,
    APPLY_RELU: tl.constexpr, FUSE_POOL: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FLAT_K: tl.constexpr,
):
    tl.static_assert(not (FUSE_POOL and SPLIT_K > 1), "a pooled layer cannot split K")
    pid = tl.program_id(0)
    num_n = tl.cdiv(COUT, BLOCK_N)
    if SPLIT_K == 1:
        pid_k = 0
        pid_mn = pid
    else:
        pid_k = pid % SPLIT_K
        pid_mn = pid // SPLIT_K
    pid_m = pid_mn // num_n
    pid_n = pid_mn % num_n
    if FUSE_POOL:
        ROWS: tl.constexpr = BLOCK_M // 4
    else:
        ROWS: tl.constexpr = BLOCK_M
    x_base = x_ptr
    y_base = y_ptr
    if GROUPED:
        # One launch, several problems (inputs of different sizes, same layer): problem p owns
        # the virtual rows [V_p, V_p + G_p) with V_p a multiple of GROUP_ROW_ALIGN, so a tile of
        # ROWS (a power of two <= GROUP_ROW_ALIGN) rows never straddles two problems.
        prob = tl.load(chunk_ptr + (pid_m * ROWS) // GROUP_ROW_ALIGN)
        t = grp_ptr + prob * GROUP_FIELDS
        v0 = pid_m.to(tl.int64) * ROWS            # first virtual row (split-K workspace row)
        VROWS = G                                 # the G argument: virtual rows of the launch
        pid_m -= (tl.load(t + 7) // ROWS).to(tl.int32)
        G = tl.load(t + 6)
        if pid_m * ROWS >= G:
            return                    # the padding between two problems' rows
        H = tl.load(t + 2).to(tl.int32)
        W = tl.load(t + 3).to(tl.int32)
        GH = tl.load(t + 4).to(tl.int32)
        GW = tl.load(t + 5).to(tl.int32)
        if FLAT_K:
            x_base = x_ptr + tl.load(t)
            stride_xn = tl.load(t + 8)
            stride_xh = tl.load(t + 9)
            stride_xw = tl.load(t + 10)
            stride_xc = tl.load(t + 11)
        else:
            # NHWC-contiguous input at a 16-element-aligned offset: written so the compiler
            # sees the alignment (vectorised, cp.async loads as in the single-problem kernel).
            x_base = x_ptr + (tl.load(t) // 16) * 16
            stride_xw = CIN
            stride_xh = W * CIN
            stride_xn = H.to(tl.int64) * stride_xh
        y_base = y_ptr + (tl.load(t + 1) // 16) * 16    # NHWC-contiguous output

    ghw = GH * GW

    # -- rows of this tile: output pixel (n, oh, ow) of each accumulator row ------------------
    offs_m = tl.arange(0, BLOCK_M)
    if FUSE_POOL:
        quad = offs_m // ROWS
        g = pid_m.to(tl.int64) * ROWS + (offs_m % ROWS)
        n = g // ghw
        r = g % ghw
        oh = ((r // GW) * 2 + quad // 2).to(tl.int32)
        ow = ((r % GW) * 2 + quad % 2).to(tl.int32)
    else:
        g = pid_m.to(tl.int64) * BLOCK_M + offs_m
        n = g // ghw
        r = g % ghw
        oh = (r // GW).to(tl.int32)
        ow = (r % GW).to(tl.int32)
    row_ok = g < G
    ih0 = oh - PAD
    iw0 = ow - PAD
    x_rows = x_base + (n * stride_xn + ih0.to(tl.int64) * stride_xh + iw0.to(tl.int64) * stride_xw)

    # -- this program's share of the K steps (all of them unless split-K) --------------------
    K_TOTAL: tl.constexpr = KSIZE * KSIZE * CIN
    K_STEPS: tl.constexpr = (K_TOTAL + BLOCK_K - 1) // BLOCK_K
    if SPLIT_K == 1:
        # Compile-time loop bounds (the path every batch-64 layer takes): the software pipeliner
        # sees a static trip count, exactly as before split-K existed.
        k_lo = 0
        k_hi = K_STEPS
    else:
        STEPS_PER_SPLIT: tl.constexpr = (K_STEPS + SPLIT_K - 1) // SPLIT_K
        k_lo = pid_k * STEPS_PER_SPLIT
        k_hi = tl.minimum(k_lo + STEPS_PER_SPLIT, K_STEPS)

    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < COUT_P
    w_ptrs = w_ptr + (k_lo * BLOCK_K + offs_k)[:, None] * COUT_P + offs_n[None, :]

    # -- main loop: acc[BLOCK_M, BLOCK_N] += A_tile[BLOCK_M, BLOCK_K] @ B_tile[BLOCK_K, BLOCK_N] --
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ks in range(k_lo, k_hi):
        if FLAT_K:
            kk = ks * BLOCK_K + offs_k
            tap = kk // CIN
            ci = kk % CIN
            kh = tap // KSIZE
            kw = tap % KSIZE
            ih = ih0[:, None] + kh[None, :]
            iw = iw0[:, None] + kw[None, :]
            a_mask = (row_ok[:, None] & (kk < K_TOTAL)[None, :] & (ih >= 0) & (ih < H)
                      & (iw >= 0) & (iw < W))
            a_ptrs = x_rows[:, None] + (kh * stride_xh + kw * stride_xw + ci * stride_xc)[None, :]
        else:
            CHUNKS: tl.constexpr = CIN // BLOCK_K
            tap = ks // CHUNKS
            c0 = (ks % CHUNKS) * BLOCK_K
            kh = tap // KSIZE
            kw = tap % KSIZE
            ih = ih0 + kh
            iw = iw0 + kw
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            a_ptrs = x_rows[:, None] + (kh * stride_xh + kw * stride_xw + c0) + offs_k[None, :]
            a_mask = ok[:, None]
        a = tl.load(a_ptrs, mask=a_mask, other=0.0)
        b = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        if _INTERPRETER:
            if b.dtype == tl.bfloat16 and a.dtype == tl.float32:
                a = _round_to_bf16(a)          # the fp32 image, rounded as the GPU's cvt.rn
            a = a.to(b.dtype).to(tl.float32)
            b = b.to(tl.float32)
        else:
            a = a.to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        w_ptrs += BLOCK_K * COUT_P

    # -- epilogue: [pool] + bias [+ ReLU], cast, store ------------------------------------------
    if SPLIT_K > 1:
        # Partial sums: y_ptr is the fp32 workspace [SPLIT_K, G, COUT_P] (grouped: indexed by
        # virtual row, [SPLIT_K, VROWS, COUT_P]); splitk_reduce_kernel adds the splits, the bias
        # and the ReLU (never with FUSE_POOL).
        if GROUPED:
            ws_rows = pid_k * VROWS + v0 + offs_m
        else:
            ws_rows = pid_k * G + g
        ws_ptrs = y_ptr + ws_rows[:, None] * COUT_P + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])
    else:
        if FUSE_POOL:
            res = tl.max(tl.reshape(acc, (4, ROWS, BLOCK_N)), axis=0)
            gy = pid_m.to(tl.int64) * ROWS + tl.arange(0, ROWS)
        else:
            res = acc
            gy = g
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)
        res = res + bias[None, :]
        if APPLY_RELU:
            res = tl.maximum(res, 0.0)
        if GROUPED:
            y_rows = gy * COUT
        else:
            ny = gy // ghw
            ry = gy % ghw
            y_rows = ny * stride_yn + (ry // GW) * stride_yh + (ry % GW) * stride_yw
        y_ptrs = y_base + y_rows[:, None] + offs_n[None, :]
        y_mask = (gy < G)[:, None] & (offs_n < COUT)[None, :]
        if _INTERPRETER:
            if y_ptr.dtype.element_ty == tl.bfloat16:
                res = _round_to_bf16(res)
        tl.store(y_ptrs, res.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def splitk_reduce_kernel(
    ws_ptr, b_ptr, y_ptr, grp_ptr, chunk_ptr,
    G, GW, GHW, COUT, COUT_P,
    stride_yn, stride_yh, stride_yw,
    SPLIT_K: tl.constexpr, APPLY_RELU: tl.constexpr, GROUPED: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y[g, n] = [ReLU](sum_s ws[s, g, n] + b[n]), cast to y's dtype; y rows (n, oh, ow).

    GROUPED: g runs over the G virtual rows of a grouped launch; a block of BLOCK_G (dividing
    GROUP_ROW_ALIGN) rows lies in one problem, whose NHWC-contiguous output row g - V_p sits at
    its table offset; padding rows are skipped."""
    v = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if GROUPED:
        t = grp_ptr + tl.load(chunk_ptr + (tl.program_id(0) * BLOCK_G) // GROUP_ROW_ALIGN) \
            * GROUP_FIELDS
        g = v - tl.load(t + 7)
        row_ok = g < tl.load(t + 6)
    else:
        g = v
        row_ok = v < G
    mask = row_ok[:, None] & (offs_n < COUT)[None, :]
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * G + v)[:, None] * COUT_P + offs_n[None, :], mask=mask,
                       other=0.0)
    acc += tl.load(b_ptr + offs_n, mask=offs_n < COUT, other=0.0)[None, :]
    if APPLY_RELU:
        acc = tl.maximum(acc, 0.0)
    if GROUPED:
        y_ptr += (tl.load(t + 1) // 16) * 16
        y_rows = g * COUT
    else:
        ny = g // GHW
        ry = g % GHW
        y_rows = ny * stride_yn + (ry // GW) * stride_yh + (ry % GW) * stride_yw
    if _INTERPRETER:
        if y_ptr.dtype.element_ty == tl.bfloat16:
            acc = _round_to_bf16(acc)
    tl.store(y_ptr + y_rows[:, None] + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

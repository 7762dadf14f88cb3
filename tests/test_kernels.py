"""The Triton kernels (vggfast/ops.py, kernels/) and the triton backend against torch references.

On a machine without CUDA everything runs under TRITON_INTERPRET=1 on tiny shapes (the interpreter
runs each program in Python). Tolerances: fp32 results must agree with the fp64 reference to
fp32 rounding; bf16 results follow STYLE.md's rule (the kernel's error against an fp32 reference
is at most 2x the error of PyTorch's own same-dtype result against that reference), applied on
CPU to torch's bf16 CPU convolution and on GPU to cuDNN (TF32 off for the reference).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from conftest import small_model  # noqa: E402
from vggfast.configs import make_spec  # noqa: E402
from vggfast.errors import ArgumentError, VGGFastError, WeightsError  # noqa: E402
from vggfast.nn import dense_forward, fc_forward, lrn as torch_lrn  # noqa: E402

ops = pytest.importorskip("vggfast.ops", reason="no triton >= 3.6 here", exc_type=ImportError)
from vggfast.triton_backend import TritonBackend  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (timing-free kernel checks at "
                                                "full VGG16 sizes)")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    assert torch.isfinite(got).all(), "non-finite values in the kernel output"
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def canonical(model) -> dict[str, torch.Tensor]:
    """Canonical (FC-as-conv) float32 weights of a build_model module."""
    sd, out = model.state_dict(), {}
    for l in model.spec.layers:
        pre = f"features.{l.index}" if l.kind == "conv" else f"classifier.{l.index}"
        out[f"{l.name}.weight"] = sd[f"{pre}.weight"].reshape(l.cout, l.cin, l.k, l.k).clone()
        out[f"{l.name}.bias"] = sd[f"{pre}.bias"].clone()
    return out


def reference_conv(x, w, b, pad, relu, pool):
    y = F.conv2d(x, w, b, padding=pad)
    if relu:
        y = F.relu(y)
    if pool:
        y = F.max_pool2d(y, 2, 2)
    return y


def make_layer(cin, cout, k, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
    b = torch.rand(cout, generator=g) * 0.2 - 0.1
    return w.to(device), b.to(device)


# --- conv kernel, fp32: every variant against the fp64 reference --------------------------------
# (batch, cin, cout, H, W, k, pad, relu, pool, input layout)
CONV_CASES = {
    "conv1_1 NCHW fp32 input, K=27": (1, 3, 16, 9, 11, 3, 1, True, False, "nchw"),
    "conv1_1 + pool, odd size, batch 3": (3, 3, 16, 9, 11, 3, 1, True, True, "nchw"),
    "conv1_1 + pool 33x47": (1, 3, 8, 33, 47, 3, 1, True, True, "nchw"),
    "3x3 channel chunks": (1, 64, 48, 9, 11, 3, 1, True, False, "nhwc"),
    "3x3 channel chunks + pool, batch 3": (3, 32, 40, 9, 11, 3, 1, True, True, "nhwc"),
    "3x3 no ReLU (pre-activation tap)": (2, 32, 24, 7, 6, 3, 1, False, False, "nhwc"),
    "3x3 pool without ReLU": (1, 32, 16, 5, 9, 3, 1, False, True, "nhwc"),
    "3x3 flat K (cin 8, width-reduced)": (2, 8, 16, 10, 13, 3, 1, True, True, "nhwc"),
    "1x1 (config C, fc7/fc8)": (3, 64, 40, 5, 7, 1, 0, True, False, "nhwc"),
    "1x1 batch 1 single pixel (small M)": (1, 96, 70, 1, 1, 1, 0, False, False, "nhwc"),
    "gxg valid (dense fc6), g=4": (2, 32, 24, 6, 9, 4, 0, True, False, "nhwc"),
    "gxg valid at native size (1x1 out)": (1, 32, 64, 7, 7, 7, 0, True, False, "nhwc"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_fp32_variants(case):
    nb, cin, cout, h, w, k, pad, relu, pool, layout = CONV_CASES[case]
    torch.manual_seed(hash(case) % 1000)
    x = torch.randn(nb, cin, h, w, device=DEV)
    wt, b = make_layer(cin, cout, k, seed=len(case))
    packed = ops.pack_conv_weight(wt, b, torch.float32)
    xin = x.permute(0, 2, 3, 1) if layout == "nchw" else x.permute(0, 2, 3, 1).contiguous()
    y = ops.conv2d(xin, packed, pad, relu=relu, pool=pool)
    want = reference_conv(x.double(), wt.double(), b.double(), pad, relu, pool)
    assert y.shape == (want.shape[0], want.shape[2], want.shape[3], want.shape[1])
    assert y.is_contiguous() and y.dtype == torch.float32
    assert rel_err(y.permute(0, 3, 1, 2), want) < 2e-6
    if relu:
        assert (y >= 0).all()


@pytest.mark.parametrize("dtype,pool", [(torch.bfloat16, False), (torch.bfloat16, True),
                                        (torch.float16, True)])
def test_conv_half_within_twice_torch_same_dtype_error(dtype, pool):
    """STYLE.md tolerance rule on CPU: error vs fp64 <= 2x torch's own same-dtype conv error."""
    torch.manual_seed(1)
    nb, cin, cout, h, w = 3, 32, 48, 9, 11
    x = torch.randn(nb, cin, h, w, device=DEV)
    wt, b = make_layer(cin, cout, 3, seed=2)
    xh = x.to(dtype)
    y = ops.conv2d(xh.permute(0, 2, 3, 1).contiguous(),
                   ops.pack_conv_weight(wt, b, dtype), 1, relu=True, pool=pool)
    assert y.dtype == dtype
    want = reference_conv(x.double(), wt.double(), b.double(), 1, True, pool)
    torch_same = reference_conv(xh, wt.to(dtype), b.to(dtype), 1, True, pool)
    ours, theirs = rel_err(y.permute(0, 3, 1, 2), want), rel_err(torch_same, want)
    assert ours <= 2 * theirs, (ours, theirs)
    assert ours > 0          # a result identical to fp64 would mean the half dtype was never used


def test_conv1_1_bf16_reads_fp32_nchw_and_writes_fp32_scores():
    """conv1_1 casts the fp32 NCHW image in registers; out_dtype=fp32 is the fc8 score path."""
    torch.manual_seed(3)
    x = torch.randn(1, 3, 12, 10, device=DEV)
    wt, b = make_layer(3, 10, 3, seed=4)
    packed = ops.pack_conv_weight(wt, b, torch.bfloat16)
    assert packed.weight.shape == (128, 16)           # K 27 -> 128 rows, Cout 10 -> 16 columns
    assert packed.weight[27:].abs().sum() == 0 and packed.weight[:, 10:].abs().sum() == 0
    y = ops.conv2d(x.permute(0, 2, 3, 1), packed, 1, relu=False, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    want = F.conv2d(x.bfloat16().double(), wt.bfloat16().double(), b.double(), padding=1)
    assert rel_err(y.permute(0, 3, 1, 2), want) < 1e-6   # exact bf16 products, fp32 sums


def test_conv_writes_into_given_out_and_leaves_the_rest():
    x = torch.randn(2, 5, 6, 32, device=DEV)
    wt, b = make_layer(32, 8, 3, seed=5)
    big = torch.full((2, 2, 3, 12), -7.0, device=DEV)   # channel-sliced destination
    out = big[..., 2:10]
    ops.conv2d(x, ops.pack_conv_weight(wt, b, torch.float32), 1, relu=True, pool=True, out=out)
    want = reference_conv(x.permute(0, 3, 1, 2).double(), wt.double(), b.double(), 1, True, True)
    assert rel_err(out.permute(0, 3, 1, 2), want) < 2e-6
    assert (big[..., :2] == -7).all() and (big[..., 10:] == -7).all()


# (batch, cin, cout, H, W, k, pad, relu, input layout)
SPLIT_CASES = {
    "3x3 channel chunks": (2, 64, 40, 6, 7, 3, 1, True, "nhwc"),
    "gxg valid (fc6 at native size)": (1, 32, 64, 7, 7, 7, 0, True, "nhwc"),
    "gxg dense fc6 on a larger map": (2, 32, 24, 9, 8, 7, 0, False, "nhwc"),
    "flat K (cin 8)": (2, 8, 16, 5, 6, 3, 1, True, "nhwc"),
    "conv1_1 NCHW input": (1, 3, 16, 9, 11, 3, 1, True, "nchw"),
}


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_conv_split_k_fp32(case, split):
    """Split-K (uneven splits too, some of them empty) sums to the fp64 reference, into a
    channel-sliced `out`, with bias and ReLU applied once after the partial sums."""
    nb, cin, cout, h, w, k, pad, relu, layout = SPLIT_CASES[case]
    torch.manual_seed(split)
    x = torch.randn(nb, cin, h, w, device=DEV)
    wt, b = make_layer(cin, cout, k, seed=split + cin)
    xin = x.permute(0, 2, 3, 1) if layout == "nchw" else x.permute(0, 2, 3, 1).contiguous()
    want = reference_conv(x.double(), wt.double(), b.double(), pad, relu, False)
    big = torch.full((nb, want.shape[2], want.shape[3], cout + 5), -7.0, device=DEV)
    out = big[..., 3:3 + cout]
    ops.conv2d(xin, ops.pack_conv_weight(wt, b, torch.float32), pad, relu=relu, out=out,
               split_k=split)
    assert rel_err(out.permute(0, 3, 1, 2), want) < 2e-6
    assert (big[..., :3] == -7).all() and (big[..., 3 + cout:] == -7).all()


def test_conv_split_k_bf16_within_twice_torch_error():
    torch.manual_seed(4)
    x = torch.randn(2, 64, 7, 7, device=DEV)
    wt, b = make_layer(64, 48, 7, seed=5)
    xh = x.bfloat16()
    y = ops.conv2d(xh.permute(0, 2, 3, 1).contiguous(), ops.pack_conv_weight(wt, b, torch.bfloat16),
                   0, relu=True, split_k=4)
    assert y.dtype == torch.bfloat16
    want = reference_conv(x.double(), wt.double(), b.double(), 0, True, False)
    theirs = rel_err(reference_conv(xh, wt.bfloat16(), b.bfloat16(), 0, True, False), want)
    assert rel_err(y.permute(0, 3, 1, 2), want) <= 2 * theirs


def test_choose_split_k():
    """Few tiles -> split (batch-1 fc6 on 132 SMs streams its weights with 8x the programs);
    enough tiles, pooled layers or short K -> no split."""
    assert ops.choose_split_k(1, 4096, 25088, False, 132) == 8      # fc6, batch 1
    assert ops.choose_split_k(1, 1000, 4096, False, 132) == 16      # fc8, batch 1
    assert ops.choose_split_k(196, 512, 4608, False, 132) == 16     # conv5_x at batch 1
    assert ops.choose_split_k(196, 512, 4608, True, 132) == 1       # conv5_3 pools
    assert ops.choose_split_k(64 * 56 * 56, 256, 2304, False, 132) == 1
    assert ops.choose_split_k(1, 64, 144, False, 132) == 1          # K too short to split
    with pytest.raises(ArgumentError, match="split_k"):
        wt, b = make_layer(8, 4, 3, seed=6)
        ops.conv2d(torch.randn(1, 4, 4, 8, device=DEV), ops.pack_conv_weight(wt, b, torch.float32),
                   1, pool=True, split_k=2)


def test_conv_wrapper_refuses_bad_inputs():
    wt, b = make_layer(8, 4, 3, seed=6)
    p = ops.pack_conv_weight(wt, b, torch.float32)
    with pytest.raises(ArgumentError, match="channels"):
        ops.conv2d(torch.randn(1, 5, 5, 7, device=DEV), p, 1)
    with pytest.raises(ArgumentError, match="too small"):
        ops.conv2d(torch.randn(1, 1, 1, 8, device=DEV), p, 1, pool=True)
    with pytest.raises(ArgumentError, match="float32"):
        ops.conv2d(torch.zeros(1, 5, 5, 8, dtype=torch.int32, device=DEV), p, 1)
    with pytest.raises(ArgumentError, match="Cout, Cin, k, k"):
        ops.pack_conv_weight(torch.randn(4, 8, 3), b, torch.float32)


def test_wrappers_refuse_what_would_be_silently_wrong_or_a_raw_error():
    """The audit's cases: an integer out_dtype truncated the results, an `out` overlapping the
    input raced (programs read rows others had overwritten), and malformed arguments raised
    AttributeError / TypeError / ZeroDivisionError instead of a VGGFastError."""
    wt, b = make_layer(8, 8, 3, seed=7)
    p = ops.pack_conv_weight(wt, b, torch.float32)
    x = torch.randn(1, 5, 6, 8, device=DEV)
    for bad in (torch.int32, torch.float64, "float32"):
        with pytest.raises(ArgumentError, match="out_dtype"):
            ops.conv2d(x, p, 1, out_dtype=bad)
    with pytest.raises(ArgumentError, match="overlaps the input"):
        ops.conv2d(x, p, 1, out=x)
    with pytest.raises(ArgumentError, match="overlaps the input"):
        ops.max_pool2x2(x, out=x[:, :2, :3])
    xc = x.contiguous()
    with pytest.raises(ArgumentError, match="overlaps the input"):
        ops.lrn(xc, out=xc)
    y = torch.empty(1, 5, 6, 8, device=DEV)
    torch.testing.assert_close(ops.conv2d(x, p, 1, out=y), ops.conv2d(x, p, 1))  # apart: fine
    with pytest.raises(ArgumentError, match="out must be"):
        ops.conv2d(x, p, 1, out=[1])
    for pad in (True, -1):
        with pytest.raises(ArgumentError, match="pad"):
            ops.conv2d(x, p, pad)
    for split in (True, 0, ops.MAX_SPLIT_K + 1):
        with pytest.raises(ArgumentError, match="split_k"):
            ops.conv2d(x, p, 1, split_k=split)
    with pytest.raises(ArgumentError, match="empty"):
        ops.conv2d(torch.randn(0, 5, 6, 8, device=DEV), p, 1)
    with pytest.raises(ArgumentError, match="empty"):
        ops.lrn(torch.randn(1, 2, 2, 0, device=DEV))
    with pytest.raises(ArgumentError, match="alpha"):
        ops.lrn(xc, alpha="x")
    with pytest.raises(ArgumentError, match="packed"):
        ops.conv2d_many([x], None, 1)
    with pytest.raises(ArgumentError, match="device"):
        ops.pack_conv_weight(wt, b, torch.float32, device="nonsense")
    gl = ops.group_layer([(0, 1, 5, 6)], 8, 8, 3, 1, False)
    src = torch.randn(gl.in_numel, device=DEV)
    with pytest.raises(ArgumentError, match="tables"):
        ops.conv2d_grouped(src, gl, None, p)
    tables = ops.upload_groups([gl], DEV)[0]
    with pytest.raises(ArgumentError, match="out_dtype"):
        ops.conv2d_grouped(src, gl, tables, p, out_dtype=torch.int32)
    with pytest.raises(ArgumentError, match="strides"):
        ops.group_layer([(0, 1, 5, 6)], 8, 8, 3, 1, False, strides=[(1, 2)])


def test_autotune_shape_classes_pick_their_configs():
    """The GPU config pruning (pure Python): conv1_1 -> flat-K configs, batch-1 fc -> small-M
    GEMV tiles, big maps -> wgmma-sized tiles, fp32 -> TF32 or exact-fp32 tiles."""
    conv = ops._conv
    every = list(dict.fromkeys(conv.FLAT_CONFIGS + conv.TF32_CONFIGS + conv.IEEE_CONFIGS + [
        c for cs in conv.CONFIGS_BY_CLASS.values() for c in cs]))
    bf16, fp32 = torch.empty(1, dtype=torch.bfloat16), torch.empty(1)

    def pick(cin, cout, k, m_class, w=bf16, stride_xc=1, precision="tf32"):
        return conv._prune(every, {"w_ptr": w, "stride_xc": stride_xc}, CIN=cin, COUT=cout,
                           KSIZE=k, M_CLASS=m_class, PRECISION=precision, FUSE_POOL=False)

    assert pick(3, 64, 3, conv.M_CLASS_LARGE, stride_xc=50176) == [
        c for c in conv.FLAT_CONFIGS if c.kwargs["BLOCK_N"] <= 64]
    small = pick(512, 4096, 7, conv.M_CLASS_SMALL)
    assert small and all(c.kwargs["BLOCK_M"] <= 64 for c in small)
    large = pick(256, 256, 3, conv.M_CLASS_LARGE)
    assert large and all(c.kwargs["BLOCK_M"] >= 64 and c.kwargs["BLOCK_K"] == 64 for c in large)
    assert all(c.kwargs["BLOCK_N"] <= 64 for c in pick(64, 64, 3, conv.M_CLASS_LARGE))
    assert any(c.kwargs["BLOCK_M"] == 256 for c in pick(64, 64, 3, conv.M_CLASS_LARGE))
    assert all(c.kwargs["BLOCK_M"] < 256 for c in large)      # tall tiles: Cout-64 layers only
    assert pick(64, 64, 3, conv.M_CLASS_LARGE, w=fp32, precision="ieee") == [
        c for c in conv.IEEE_CONFIGS if c.kwargs["BLOCK_N"] <= 64]
    assert set(pick(256, 256, 3, conv.M_CLASS_MID, w=fp32)) <= set(conv.TF32_CONFIGS)
    assert pick(3, 10, 3, conv.M_CLASS_SMALL, stride_xc=9)          # never empty


def test_no_autotune_mode_takes_the_measured_defaults(monkeypatch):
    """VGGFAST_AUTOTUNE=0: one config per launch, the class list's first that fits."""
    conv = ops._conv
    bf16 = torch.empty(1, dtype=torch.bfloat16)

    every = list(dict.fromkeys(conv.FLAT_CONFIGS + conv.TF32_CONFIGS + conv.IEEE_CONFIGS + [
        c for cs in conv.CONFIGS_BY_CLASS.values() for c in cs]))

    def pick(cin, cout, k, m_class, stride_xc=1):
        return conv._prune(every, {"w_ptr": bf16, "stride_xc": stride_xc}, CIN=cin,
                           COUT=cout, KSIZE=k, M_CLASS=m_class, PRECISION="tf32", FUSE_POOL=False)

    assert len(pick(256, 256, 3, conv.M_CLASS_LARGE)) > 1
    monkeypatch.setenv("VGGFAST_AUTOTUNE", "0")

    def tile(*a, **k):
        (c,) = pick(*a, **k)
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
    assert tile(3, 64, 3, conv.M_CLASS_LARGE, stride_xc=50176) == (128, 64, 32)   # conv1_1
    assert tile(64, 64, 3, conv.M_CLASS_LARGE) == (128, 64, 64)                    # conv1_2
    assert tile(128, 128, 3, conv.M_CLASS_LARGE) == (128, 128, 64)                 # conv2_2
    assert tile(512, 512, 3, conv.M_CLASS_LARGE) == (128, 256, 64)                 # conv4_x
    assert tile(512, 4096, 7, conv.M_CLASS_SMALL) == (16, 64, 128)                 # fc6


# --- LRN, max-pool, score reduction ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lrn_matches_krizhevsky_lrn(dtype):
    torch.manual_seed(7)
    x = (torch.randn(2, 5, 7, 70, device=DEV) * 20).relu()   # large enough that LRN matters
    y = ops.lrn(x.to(dtype).contiguous())
    want = torch_lrn(x.to(dtype).double().permute(0, 3, 1, 2))
    assert y.dtype == dtype and y.shape == x.shape
    assert (want - x.permute(0, 3, 1, 2)).abs().max() > 1    # LRN changed the values
    # fp32: rounding only; bf16: one storage rounding (the interpreter's cast truncates: 2^-8)
    assert rel_err(y.permute(0, 3, 1, 2), want) < (1e-6 if dtype == torch.float32 else 4e-3)


@pytest.mark.parametrize("hw", [(9, 11), (2, 3)])
def test_max_pool2x2_floor(hw):
    x = torch.randn(3, *hw, 20, device=DEV)
    y = ops.max_pool2x2(x)
    want = F.max_pool2d(x.permute(0, 3, 1, 2), 2, 2)
    assert torch.equal(y.permute(0, 3, 1, 2), want)


@pytest.mark.parametrize("classes,hw,layout", [(10, (3, 5), "nhwc"), (1000, (2, 2), "nchw"),
                                               (7, (1, 1), "nhwc")])
def test_mean_softmax(classes, hw, layout):
    torch.manual_seed(8)
    s = torch.randn(2, classes, *hw, device=DEV) * 5
    if layout == "nhwc":
        s = s.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    p = ops.mean_softmax(s)
    want = F.softmax(s.double().mean(dim=(2, 3)), dim=1)
    assert p.shape == (2, classes) and p.dtype == torch.float32
    torch.testing.assert_close(p.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.sum(1), torch.ones(2, device=DEV), rtol=0, atol=1e-5)


# --- the whole network --------------------------------------------------------------------------
NETS = [("D", 1, (32, 32)), ("D", 3, (45, 38)), ("A-LRN", 2, (40, 45)), ("C", 1, (33, 47))]


@pytest.mark.parametrize("config,batch,hw", NETS)
def test_backend_equals_dense_forward_fp32(config, batch, hw):
    m = small_model(config)
    params = canonical(m)
    x = torch.randn(batch, 3, *hw)
    be = TritonBackend(params, m.spec, DEV, torch.float32)
    got = be.run(x.to(DEV))
    want = dense_forward({k: v.double() for k, v in params.items()}, m.spec, x.double())
    assert set(got) == {"fc8"} and got["fc8"].dtype == torch.float32
    assert got["fc8"].shape == want["fc8"].shape
    assert rel_err(got["fc8"].cpu(), want["fc8"]) < 1e-5


def test_backend_every_tap_fp32_a_lrn():
    """Every named activation (pre-ReLU convs, ReLUs, norm1, pools, fc6..fc8), unfused paths too."""
    m = small_model("A-LRN", seed=1)
    params = canonical(m)
    x = torch.randn(2, 3, 36, 41)
    names = m.spec.tap_names()
    got = TritonBackend(params, m.spec, DEV, torch.float32).run(x.to(DEV), names)
    want = dense_forward({k: v.double() for k, v in params.items()}, m.spec, x.double(), names)
    assert list(got) == list(names)
    for t in names:
        assert got[t].shape == want[t].shape, t
        assert rel_err(got[t].cpu(), want[t]) < 1e-5, t


def test_backend_stops_at_the_deepest_tap_and_fuses_what_it_may():
    m = small_model("D", seed=2)
    params = canonical(m)
    be = TritonBackend(params, m.spec, DEV, torch.float32)
    x = torch.randn(1, 3, 34, 35)
    want = dense_forward(params, m.spec, x, ("relu2_1", "pool3"))
    got = be.run(x.to(DEV), ("pool3", "relu2_1"))
    assert set(got) == {"relu2_1", "pool3"}
    for t in got:
        assert rel_err(got[t].cpu(), want[t]) < 1e-5


def test_backend_bf16_within_twice_torch_bf16_error():
    m = small_model("C", seed=3)
    params = canonical(m)
    x = torch.randn(2, 3, 36, 50)
    taps = ("pool3", "fc8")
    got = TritonBackend(params, m.spec, DEV, torch.bfloat16).run(x.to(DEV), taps)
    want = dense_forward({k: v.double() for k, v in params.items()}, m.spec, x.double(), taps)
    theirs = dense_forward({k: v.bfloat16() for k, v in params.items()}, m.spec, x.bfloat16(), taps)
    for t in taps:
        assert got[t].dtype == torch.float32
        ours, ref = rel_err(got[t].cpu(), want[t]), rel_err(theirs[t], want[t])
        assert ours <= 2 * ref, (t, ours, ref)


def test_backend_fc_on_pooled_map_equals_fc_forward():
    m = small_model("D", seed=4)
    params = canonical(m)
    pooled = torch.randn(3, m.spec.feature_channels, m.spec.grid, m.spec.grid).relu()
    got = TritonBackend(params, m.spec, DEV, torch.float32).fc(pooled.to(DEV))
    want = fc_forward({k: v.double() for k, v in params.items()}, m.spec, pooled.double())
    assert got.shape == (3, m.spec.num_classes)
    assert rel_err(got.cpu(), want) < 1e-5


def test_backend_refuses_bad_requests_clearly():
    m = small_model("D")
    params = canonical(m)
    be = TritonBackend(params, m.spec, DEV, torch.float32)
    with pytest.raises(ArgumentError, match="unknown layer 'fc9'"):
        be.run(torch.randn(1, 3, 32, 32, device=DEV), ("fc9",))
    with pytest.raises(ArgumentError, match="fc6 needs a 1x1 map"):
        be.run(torch.randn(1, 3, 31, 40, device=DEV))
    with pytest.raises(ArgumentError, match=r"\[N, 3, H, W\]"):
        be.run(torch.randn(1, 4, 32, 32, device=DEV))
    del params["fc7.weight"]
    partial = TritonBackend(params, m.spec, DEV, torch.float32)   # features-only is fine ...
    with pytest.raises(WeightsError, match="fc7"):
        partial.run(torch.randn(1, 3, 32, 32, device=DEV))        # ... until fc7 is needed
    bad = canonical(m)
    bad["conv2_1.weight"] = bad["conv2_1.weight"][:, :2]
    with pytest.raises(WeightsError, match="conv2_1"):
        TritonBackend(bad, m.spec, DEV, torch.float32)


def test_backend_without_interpreter_or_triton_is_a_vggfast_error(monkeypatch):
    import sys

    import vggfast
    m = small_model("D")
    params = canonical(m)
    with monkeypatch.context() as mp:
        mp.setattr(ops, "INTERPRETING", False)
        with pytest.raises(VGGFastError, match="needs a CUDA device"):
            TritonBackend(params, m.spec, torch.device("cpu"), torch.float32)
    with monkeypatch.context() as mp:                 # as if triton were not installed
        mp.setitem(sys.modules, "vggfast.ops", None)
        mp.delattr(vggfast, "ops")
        with pytest.raises(VGGFastError, match=r"triton backend is unavailable here \(.*\); "
                                               r"install triton >= 3\.6 or use backend='torch'"):
            TritonBackend(params, m.spec, DEV, torch.float32)
    TritonBackend(params, m.spec, DEV, torch.float32)  # and back to normal


# --- grouped launches: one launch for several input sizes ----------------------------------------

def count_conv_launches(monkeypatch) -> list:
    calls = []
    real = ops._launch_conv

    def counting(grid, args, meta):
        calls.append(meta["GROUPED"])
        return real(grid, args, meta)

    monkeypatch.setattr(ops, "_launch_conv", counting)
    return calls


# (cin, cout, k, pad, relu, pool): channel chunks with and without pool, flat K, 1x1, g x g
GROUP_CASES = [(32, 48, 3, 1, True, True), (64, 20, 3, 1, False, False), (8, 16, 3, 1, True, True),
               (64, 24, 1, 0, True, False), (32, 16, 4, 0, True, False)]


@pytest.mark.parametrize("case", GROUP_CASES)
def test_conv_grouped_one_launch_equals_reference(case, monkeypatch):
    """conv2d_many: inputs of different sizes and batches in ONE launch; each output equals the
    fp64 reference. One input has over 256 rows, so a problem spans several row chunks."""
    cin, cout, k, pad, relu, pool = case
    torch.manual_seed(cin + cout)
    wt, b = make_layer(cin, cout, k, seed=cout)
    sizes = [(2, 5, 7), (1, 9, 6), (3, 4, 4), (1, 23, 13)]
    xs = [torch.randn(n, h, w, cin, device=DEV) for n, h, w in sizes]
    calls = count_conv_launches(monkeypatch)
    ys = ops.conv2d_many(xs, ops.pack_conv_weight(wt, b, torch.float32), pad, relu=relu,
                         pool=pool)
    assert calls == [True]
    for x, y in zip(xs, ys):
        want = reference_conv(x.permute(0, 3, 1, 2).double(), wt.double(), b.double(), pad, relu,
                              pool)
        assert y.shape == (want.shape[0], want.shape[2], want.shape[3], cout)
        assert rel_err(y.permute(0, 3, 1, 2), want) < 2e-6


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("case", [(64, 40, 3, 1, True), (32, 24, 5, 0, False)])
def test_conv_grouped_split_k_equals_reference(case, split):
    """A grouped launch with K split: partial sums indexed by virtual row, then the grouped
    reduction writes each problem's rows (padding rows skipped) with bias and ReLU."""
    cin, cout, k, pad, relu = case
    torch.manual_seed(split)
    wt, b = make_layer(cin, cout, k, seed=split + cin)
    xs = [torch.randn(n, h, w, cin, device=DEV) for n, h, w in [(2, 6, 7), (1, 21, 15), (1, 5, 5)]]
    ys = ops.conv2d_many(xs, ops.pack_conv_weight(wt, b, torch.float32), pad, relu=relu,
                         split_k=split)
    for x, y in zip(xs, ys):
        want = reference_conv(x.permute(0, 3, 1, 2).double(), wt.double(), b.double(), pad, relu,
                              False)
        assert rel_err(y.permute(0, 3, 1, 2), want) < 2e-6
    with pytest.raises(ArgumentError, match="split_k"):
        ops.conv2d_many(xs[:2], ops.pack_conv_weight(wt, b, torch.float32), pad, pool=True,
                        split_k=2)


def test_conv_grouped_bf16_within_twice_torch_error():
    torch.manual_seed(7)
    wt, b = make_layer(32, 40, 3, seed=8)
    xs = [torch.randn(n, h, w, 32, device=DEV).bfloat16() for n, h, w in [(2, 6, 9), (1, 11, 5)]]
    ys = ops.conv2d_many(xs, ops.pack_conv_weight(wt, b, torch.bfloat16), 1, pool=True)
    for x, y in zip(xs, ys):
        x = x.permute(0, 3, 1, 2)
        want = reference_conv(x.double(), wt.double(), b.double(), 1, True, True)
        theirs = rel_err(reference_conv(x, wt.bfloat16(), b.bfloat16(), 1, True, True), want)
        assert y.dtype == torch.bfloat16
        assert 0 < rel_err(y.permute(0, 3, 1, 2), want) <= 2 * theirs


def test_group_layer_geometry():
    """Every problem's rows start at a multiple of GROUP_ROW_ALIGN, the chunk table names the
    owner of each chunk, and the outputs are aligned and disjoint."""
    a = ops.GROUP_ROW_ALIGN
    gl = ops.group_layer([(0, 2, 30, 41), (5000, 1, 3, 3), (9000, 3, 17, 8)], cin=16, cout=24,
                         k=3, pad=1, pool=True)
    g = [2 * 15 * 20, 1 * 1 * 1, 3 * 8 * 4]
    assert [r[6] for r in gl.rows] == g and gl.m_rows == 4 * sum(g)
    v = [r[7] for r in gl.rows]
    assert v == [0, 3 * a, 4 * a] and gl.vrows == 5 * a
    assert list(gl.chunks) == [0, 0, 0, 1, 2]
    ends = [o + n * h * w * 24 for o, n, h, w in gl.outputs]
    assert all(o % ops.GROUP_ELEM_ALIGN == 0 for o, *_ in gl.outputs)
    assert all(e <= o for e, (o, *_) in zip(ends, gl.outputs[1:])) and ends[-1] <= gl.numel
    assert gl.unit_channel_stride is False          # offset 5000 is not a multiple of 16
    with pytest.raises(ArgumentError, match="too small"):
        ops.group_layer([(0, 1, 1, 1)], cin=16, cout=8, k=3, pad=1, pool=True)


def test_backend_run_many_one_launch_per_layer_equals_run(monkeypatch):
    """run_many on three input sizes launches each layer once and returns, per input, what run
    returns, for post-ReLU, pooled and pre-ReLU taps; A-LRN runs its LRN + pool input by input
    between grouped layers, and only its norm1 output falls back to input-by-input runs."""
    m = small_model("D", seed=4)
    be = TritonBackend(canonical(m), m.spec, DEV, torch.float32)
    xs = [torch.randn(2, 3, 32, 41, device=DEV), torch.randn(1, 3, 33, 35, device=DEV),
          torch.randn(1, 3, 32, 32, device=DEV)]
    calls = count_conv_launches(monkeypatch)
    plan = be.prepare_many([x.shape for x in xs], "fc8")
    got = be.run_many(xs, "fc8")
    assert calls == [True] * len(m.spec.layers)
    assert be.prepare_many([x.shape for x in xs], "fc8") is plan      # cached: no new upload
    lrn = small_model("A-LRN", seed=5)
    lrn_be = TritonBackend(canonical(lrn), lrn.spec, DEV, torch.float32)
    assert lrn_be.prepare_many([x.shape for x in xs], "norm1") is None  # an LRN's own output
    with pytest.raises(ArgumentError, match="other input shapes"):
        be.run_many(xs[:2], "fc8", plan)
    # The intermediates live in a caller's arena, the outputs never do: a second call through
    # the same arena leaves the first call's outputs intact.
    with pytest.raises(ArgumentError, match="arena must be"):
        be.run_many(xs, "fc8", plan, torch.empty(plan.arena_bytes - 1, dtype=torch.uint8))
    arena = torch.full((plan.arena_bytes,), 255, dtype=torch.uint8, device=DEV)
    first = be.run_many(xs, "fc8", plan, arena)
    keep = [t.clone() for t in first]
    be.run_many([x.flip(-1) for x in xs], "fc8", plan, arena)
    for f, k, g in zip(first, keep, got):
        assert f.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr()
        assert torch.equal(f, k) and rel_err(f.cpu(), g.cpu()) < 1e-6
    calls.clear()
    for x, g in zip(xs, got):
        want = be.run(x, ("fc8",))["fc8"]
        assert g.shape == want.shape and g.dtype == torch.float32
        assert rel_err(g.cpu(), want.cpu()) < 1e-6
    assert all(be.can_group(t) for t in m.spec.tap_names())
    for tap in ("pool2", "conv2_2", "relu2_2"):      # pooled, pre-ReLU and pre-pool outputs
        calls.clear()
        got = be.run_many(xs[:2], tap)
        assert calls == [True] * 4
        for x, g in zip(xs[:2], got):
            want = be.run(x, (tap,))[tap]
            assert g.shape == want.shape and rel_err(g.cpu(), want.cpu()) < 1e-6, tap
    assert lrn_be.can_group("relu1_1") and lrn_be.can_group("fc8")
    assert not lrn_be.can_group("norm1")
    calls.clear()
    lrn_be.run_many(xs[:2], "norm1")
    assert calls == [False, False]
    # A-LRN: conv1_1 grouped, its LRN + pool input by input, the rest grouped again
    for tap in ("pool1", "conv3_1", "relu1_1"):
        calls.clear()
        got = lrn_be.run_many(xs[:2], tap)
        depth = [l.name for l in lrn.spec.layers].index(lrn.spec.tap_layer(tap).name) + 1
        assert calls == [True] * depth, tap
        for x, g in zip(xs[:2], got):
            want = lrn_be.run(x, (tap,))[tap]
            assert g.shape == want.shape and rel_err(g.cpu(), want.cpu()) < 1e-6, tap
    with pytest.raises(ArgumentError, match="too small"):
        be.run_many([xs[0], torch.randn(1, 3, 20, 40, device=DEV)], "fc8")


@pytest.mark.parametrize("config", ["D", "A-LRN", "C"])
def test_backend_run_planned_on_the_cpp_arena_equals_run(config):
    """run_planned puts every activation at the C++ planner's arena offset (conv + fused pool,
    A-LRN's separate LRN and pool) and gives exactly run's scores; every slot it reads was
    written first (the arena starts as NaN bytes)."""
    from vggfast import Engine
    m = small_model(config, seed=6)
    eng = Engine(m.state_dict(), backend="triton", device=DEV, dtype="float32", cuda_graphs=False)
    plan = eng.plan([torch.rand(3, 45, 38)], scales=(36,), flip=True)
    (b,) = plan.batches
    layout = plan.arenas[b.arena]
    x = torch.randn(b.size, 3, b.height, b.width, device=DEV)
    be = eng._backend
    arena = torch.full((layout.total_bytes,), 255, dtype=torch.uint8, device=DEV)
    got = be.run_planned(x, layout, plan.ops, arena)
    want = be.run(x)["fc8"]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert got.untyped_storage().data_ptr() != arena.untyped_storage().data_ptr()
    with pytest.raises(ArgumentError, match="layout is for a batch"):
        be.run_planned(x[:1], layout, plan.ops)
    with pytest.raises(ArgumentError, match="arena must be"):
        be.run_planned(x, layout, plan.ops, arena[:-1])


# --- GPU: every VGG16 layer shape at full size --------------------------------------------------
def _vgg16_layer_cases():
    """(id, cin, cout, H, W, k, pad, relu, pool) of every VGG16 layer at each test size."""
    cases = []
    for h0, w0 in ((224, 224), (256, 256), (384, 384), (512, 512), (225, 301)):
        h, w = h0, w0
        for l in make_spec("D").layers:
            cases.append((f"{l.name}@{h0}x{w0}", l.cin, l.cout, h, w, l.k, l.pad, l.relu, l.pool))
            h, w = h + 2 * l.pad - l.k + 1, w + 2 * l.pad - l.k + 1
            if l.pool:
                h, w = h // 2, w // 2
    return cases


@needs_gpu
@pytest.mark.parametrize("case", _vgg16_layer_cases(), ids=lambda c: c[0])
def test_gpu_vgg16_layer_within_twice_cudnn_bf16_error(case):
    """STYLE.md: kernel error vs fp32 (TF32 off) <= 2x cuDNN's same-dtype (bf16) error."""
    name, cin, cout, h, w, k, pad, relu, pool = case
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    nb = 2
    x = torch.randn(nb, cin, h, w, device="cuda")
    if cin != 3:
        x = x.relu()                       # activations after a ReLU, as in the network
    wt, b = make_layer(cin, cout, k, seed=cin + cout + k, device="cuda")
    want = reference_conv(x, wt, b, pad, relu, pool)
    xb = x.to(torch.bfloat16, memory_format=torch.channels_last)
    cudnn = reference_conv(xb, wt.to(torch.bfloat16, memory_format=torch.channels_last),
                           b.bfloat16(), pad, relu, pool)
    xin = x.permute(0, 2, 3, 1) if cin == 3 else xb.permute(0, 2, 3, 1)
    y = ops.conv2d(xin, ops.pack_conv_weight(wt, b, torch.bfloat16), pad, relu=relu, pool=pool)
    assert y.shape == (want.shape[0], want.shape[2], want.shape[3], want.shape[1])
    ours, theirs = rel_err(y.permute(0, 3, 1, 2), want), rel_err(cudnn, want)
    assert ours <= 2 * theirs, (name, ours, theirs)


@needs_gpu
def test_gpu_conv_past_2_to_the_31_elements():
    """int64 offsets: an input of 2^31+ elements; the last image is checked against cuDNN."""
    nb, c, h, w = 129, 64, 512, 512                       # 2.16e9 elements, 4.3 GB in bf16
    torch.manual_seed(0)
    x = torch.empty(nb, h, w, c, device="cuda", dtype=torch.bfloat16)
    x[-1].normal_()
    x[:-1].zero_()
    wt, b = make_layer(c, c, 3, seed=9, device="cuda")
    y = ops.conv2d(x, ops.pack_conv_weight(wt, b, torch.bfloat16), 1, relu=True, pool=True)
    last = x[-1:].permute(0, 3, 1, 2).float()
    want = reference_conv(last, wt, b, 1, True, True)
    cudnn = reference_conv(last.bfloat16(), wt.bfloat16(), b.bfloat16(), 1, True, True)
    ours, theirs = rel_err(y[-1:].permute(0, 3, 1, 2), want), rel_err(cudnn, want)
    assert ours <= 2 * theirs, (ours, theirs)
    zero_image = b.relu().bfloat16().expand(y.shape[1], y.shape[2], c)   # every row was written
    assert torch.equal(y[0], zero_image) and torch.equal(y[-2], zero_image)


@needs_gpu
@pytest.mark.parametrize("hw", [(224, 224), (225, 301)])
def test_gpu_vgg16_network_within_twice_cudnn_bf16_error(hw):
    from vggfast.nn import TorchBackend, build_model
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    m = build_model("D").eval()
    params = canonical(m)
    x = torch.randn(2, 3, *hw, device="cuda")
    taps = ("pool5", "fc8")
    want = TorchBackend(params, m.spec, torch.device("cuda"), torch.float32).run(x, taps)
    cudnn = TorchBackend(params, m.spec, torch.device("cuda"), torch.bfloat16).run(x, taps)
    got = TritonBackend(params, m.spec, torch.device("cuda"), torch.bfloat16).run(x, taps)
    for t in taps:
        ours, theirs = rel_err(got[t], want[t]), rel_err(cudnn[t], want[t])
        assert ours <= 2 * theirs, (t, ours, theirs)


@needs_gpu
def test_gpu_vgg16_grouped_dense_scales_within_twice_cudnn_bf16_error():
    """run_many on the dense protocol's three scale batches of a 4:3 image (every layer one
    launch for all three) vs the fp32 reference, per scale, against cuDNN bf16's error."""
    from vggfast.nn import TorchBackend, build_model
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(1)
    m = build_model("D").eval()
    params = canonical(m)
    dev = torch.device("cuda")
    xs = [torch.randn(2, 3, h, w, device=dev) for h, w in [(256, 341), (384, 512), (225, 301)]]
    ref = TorchBackend(params, m.spec, dev, torch.float32)
    cudnn = TorchBackend(params, m.spec, dev, torch.bfloat16)
    got = TritonBackend(params, m.spec, dev, torch.bfloat16).run_many(xs, "fc8")
    for x, g in zip(xs, got):
        want = ref.run(x)["fc8"]
        assert g.shape == want.shape
        ours, theirs = rel_err(g, want), rel_err(cudnn.run(x)["fc8"], want)
        assert ours <= 2 * theirs, (tuple(x.shape), ours, theirs)


def test_tuned_launches_skip_the_autotuner_and_agree(monkeypatch):
    """After a key's first launch (which goes through triton's Autotuner), later launches of that
    key call the kernel with the recorded config directly, and compute the same result."""
    x = torch.randn(1, 6, 7, 32, device=DEV)
    wt, b = make_layer(32, 24, 3, seed=11)
    packed = ops.pack_conv_weight(wt, b, torch.float32)
    ops._TUNED.clear()
    first = ops.conv2d(x, packed, 1, relu=True)
    assert len(ops._TUNED) == 1
    calls = []
    kernel = ops._conv.conv2d_kernel
    monkeypatch.setattr(type(kernel), "run", lambda self, *a, **k: calls.append(1))
    again = ops.conv2d(x, packed, 1, relu=True)
    assert not calls                                  # the Autotuner was not entered
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    ops.conv2d(x, packed, 1, relu=True, pool=True)   # another key (pooled): tuned first
    assert calls

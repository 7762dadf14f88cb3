"""The launch shortcut (ops._launch): later launches of a kind go straight to the compiled
kernel's launcher, with exactly the arguments triton's own path gives it.

The equality check compiles real sm_90 kernels with triton's bundled ptxas and launches them into
a stub driver (scripts/launch_overhead.py --check), so it runs on a machine without a GPU; the
GPU tests then run every kernel through the shortcut for real."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vggfast import ops

ROOT = Path(__file__).resolve().parents[1]


def test_shortcut_passes_the_launcher_what_triton_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "launch_overhead.py"),
                           "--check"], capture_output=True, text=True, env=env, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "all launches equal" in out, out[-4000:]
    # every launch wrapper was compared: conv (plain, split-K, pooled, grouped), pool, lrn, score
    assert out.count("ok ") == 10, out[-4000:]


def test_spec_keys_tensors_by_dtype_and_alignment_and_numbers_by_value():
    buf = torch.zeros(64, dtype=torch.bfloat16)
    a, b = buf[:16], buf[8:24]          # 0 and 16 bytes in: both 16-byte aligned
    c = buf[1:17]                       # 2 bytes in: not aligned
    assert ops._spec((a, 3, 2.5)) == ops._spec((b, 3, 2.5))
    assert ops._spec((a, 3)) != ops._spec((c, 3))
    assert ops._spec((a, 3)) != ops._spec((a.float(), 3))
    assert ops._spec((a, 16)) != ops._spec((a, 32))
    assert ops._spec((torch.nn.Parameter(a.float()),)) == ops._spec((a.float(),))
    with pytest.raises(TypeError):
        ops._spec((a, "x"))


def test_interpreter_and_switch_take_triton_path():
    if ops.INTERPRETING:
        assert not ops.FAST_LAUNCH
    env = {**os.environ, "VGGFAST_FAST_LAUNCH": "0"}
    env.pop("TRITON_INTERPRET", None)
    code = "import vggfast.ops as o; print(o.FAST_LAUNCH)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


def test_pow2_matches_triton():
    import triton
    assert [ops._pow2(n) for n in range(1, 3000)] == [triton.next_power_of_2(n)
                                                       for n in range(1, 3000)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shortcut_on_gpu_gives_triton_paths_results():
    """Every wrapper, launched through triton's path and then twice more (the second and third
    through the shortcut), writes bit-identical outputs; the shortcut was really taken."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)

    def conv(cin, cout, k):
        return ops.pack_conv_weight(torch.randn(cout, cin, k, k) * 0.05, torch.randn(cout), bf,
                                    dev)
    c3, fc6 = conv(64, 64, 3), conv(512, 1024, 7)
    x3 = torch.randn(2, 33, 47, 64, device=dev).to(bf)
    x6 = torch.randn(1, 9, 8, 512, device=dev).to(bf)
    xs = [torch.randn(1, 20, 18, 64, device=dev).to(bf),
          torch.randn(2, 9, 7, 64, device=dev).to(bf)]
    scores = torch.randn(2, 1000, 3, 4, device=dev)
    calls = {
        "conv": lambda: ops.conv2d(x3, c3, 1),
        "conv +pool": lambda: ops.conv2d(x3, c3, 1, pool=True),
        "fc6 split-K": lambda: ops.conv2d(x6, fc6, 0, split_k=4),
        "grouped": lambda: torch.cat([y.flatten() for y in ops.conv2d_many(xs, c3, 1)]),
        "grouped split-K": lambda: torch.cat([y.flatten() for y in ops.conv2d_many(
            xs, c3, 1, split_k=2)]),
        "pool": lambda: ops.max_pool2x2(x3),
        "lrn": lambda: ops.lrn(x3),
        "score": lambda: ops.mean_softmax(scores),
    }
    was = ops.FAST_LAUNCH
    try:
        for name, call in calls.items():
            ops.FAST_LAUNCH = False
            want = call().clone()
            ops.FAST_LAUNCH = True
            ops._FAST.clear()
            for _ in range(3):
                got = call()
                torch.cuda.synchronize()
                assert torch.equal(got, want), name
            assert any(e is not None for e in ops._FAST.values()), name
    finally:
        ops.FAST_LAUNCH = was

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

ops = pytest.importorskip("vggfast.ops", reason="no triton >= 3.6 here", exc_type=ImportError)

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
    # ... also at other sizes, most of them through entries made at the first sizes; a size that
    # turns into a multiple of 16 (another compiled kernel) made a new entry
    assert out.count("shortcut reused") >= 6, out[-4000:]
    changed = next(line for line in out.splitlines() if "(split_k=1)" in line)
    assert "new kind" in changed, out[-4000:]


def test_spec_keys_tensors_by_dtype_and_alignment_and_numbers_by_class():
    buf = torch.zeros(64, dtype=torch.bfloat16)
    a, b = buf[:16], buf[8:24]          # 0 and 16 bytes in: both 16-byte aligned
    c = buf[1:17]                       # 2 bytes in: not aligned
    assert ops._spec((a, 3, 2.5)) == ops._spec((b, 5, 0.25))
    assert ops._spec((a, 3)) != ops._spec((c, 3))
    assert ops._spec((a, 3)) != ops._spec((a.float(), 3))
    assert ops._spec((a, 16)) == ops._spec((a, 32)) != ops._spec((a, 17))
    assert ops._spec((a, 1)) != ops._spec((a, 17))
    assert ops._spec((a, 2 ** 31 - 16)) != ops._spec((a, 2 ** 31))
    assert ops._spec((torch.nn.Parameter(a.float()),)) == ops._spec((a.float(),))
    for other in ("x", True, None):
        with pytest.raises(TypeError):
            ops._spec((a, other))


def test_spec_is_at_least_as_strict_as_triton():
    """Two arguments `_spec` puts in one class get one specialisation from triton itself (the
    compiled kernel a launch takes depends on nothing else of a run-time argument)."""
    jit = pytest.importorskip("triton.runtime.jit")
    if not hasattr(jit, "native_specialize_impl"):
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.compiler import BaseBackend

    def triton_spec(v):
        return jit.native_specialize_impl(BaseBackend, v, False, True, True)
    buf = torch.zeros(4096, dtype=torch.bfloat16)
    values = ([0, 1, 2, 3, 15, 16, 17, 31, 32, 48, 1000, 3136, 50176, 2 ** 31 - 16, 2 ** 31 - 1,
               2 ** 31, 2 ** 32, 2 ** 40 + 3, 2 ** 63 - 16, 2 ** 63, 2 ** 64 - 16, -1, -16, -17,
               -2 ** 31, -2 ** 31 - 16, 0.0, 1.0, 0.5, -3.25]
              + [buf[i:] for i in range(0, 40, 2)] + [buf.float()[i:] for i in range(0, 12)])
    classes: dict = {}
    for v in values:
        classes.setdefault(ops._spec((v,)), []).append(triton_spec(v))
    for key, specs in classes.items():
        assert all(s == specs[0] for s in specs), (key, specs)


def test_interpreter_and_switch_take_triton_path():
    if ops.INTERPRETING:
        assert not ops.FAST_LAUNCH
    env = {**os.environ, "VGGFAST_FAST_LAUNCH": "0"}
    env.pop("TRITON_INTERPRET", None)
    code = "import vggfast.ops as o; print(o.FAST_LAUNCH)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr
    # a triton past the versions the shortcut was checked on takes triton's own path
    env.pop("VGGFAST_FAST_LAUNCH")
    for version, want in (("3.6.0", "True"), ("3.8.1", "True"), ("3.9.0", "False"),
                          ("4.0.0", "False")):
        code = (f"import triton; triton.__version__ = {version!r}; import vggfast.ops as o; "
                "print(o.FAST_LAUNCH)")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.stdout.strip() == want, (version, proc.stdout + proc.stderr)


def test_pow2_matches_triton():
    import triton
    assert [ops._pow2(n) for n in range(1, 3000)] == [triton.next_power_of_2(n)
                                                       for n in range(1, 3000)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shortcut_on_gpu_gives_triton_paths_results():
    """Every wrapper, launched through triton's path and then twice more (the second and third
    through the shortcut), writes bit-identical outputs, and so does a launch at other sizes
    after those (through the same entry where its arguments specialise alike); the shortcut was
    really taken."""
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)

    def conv(cin, cout, k):
        return ops.pack_conv_weight(torch.randn(cout, cin, k, k) * 0.05, torch.randn(cout), bf,
                                    dev)
    c3, fc6 = conv(64, 64, 3), conv(512, 1024, 7)

    def calls(size):   # size 1: other sizes, mostly in the same specialisation classes
        x3 = torch.randn(2, *((33, 47), (35, 45))[size], 64, device=dev).to(bf)
        x6 = torch.randn(1, *((9, 8), (11, 10))[size], 512, device=dev).to(bf)
        xs = [torch.randn(1, *((20, 18), (18, 22))[size], 64, device=dev).to(bf),
              torch.randn(2, 9, 7, 64, device=dev).to(bf)]
        scores = torch.randn(2, 1000, *((3, 4), (2, 10))[size], device=dev)
        return {
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
    first, other = calls(0), calls(1)
    was = ops.FAST_LAUNCH
    try:
        for name in first:
            ops.FAST_LAUNCH = False
            want = [first[name]().clone(), other[name]().clone()]
            ops.FAST_LAUNCH = True
            ops._FAST.clear()
            for _ in range(3):
                got = first[name]()
                torch.cuda.synchronize()
                assert torch.equal(got, want[0]), name
            assert any(e is not None for e in ops._FAST.values()), name
            got = other[name]()       # other sizes, through the entries of the first
            torch.cuda.synchronize()
            assert torch.equal(got, want[1]), name
    finally:
        ops.FAST_LAUNCH = was

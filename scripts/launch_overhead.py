"""Where the host time of one Triton launch goes, measured on a machine without a GPU.

Triton's real launch path runs (binder, cache key, our wrappers, the Autotuner and heuristics
layers), with a stub driver in place of CUDA: kernels are really compiled for sm_90 (Triton's
bundled ptxas), then "launched" into a recorder instead of the GPU. What is left out is only the
C launcher's own cost (argument parsing + cuLaunchKernelEx, a few microseconds on a GPU host).

    python scripts/launch_overhead.py            # per-call cost, triton's path vs the shortcut
    python scripts/launch_overhead.py --check    # the shortcut's launcher calls == triton's
    python scripts/launch_overhead.py --forward  # host ms of whole VGG16 forwards

A development aid for the per-launch cost of un-graphed forwards (bench/NOTES.md); the figures
are this CPU's, so compare rows with each other rather than with a GPU host's.
"""
from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("VGGFAST_AUTOTUNE", "0")   # one config per key: no tuning runs to stub

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


CALLS: list = []


class _Recorder:
    """Stands for triton's CUDA launcher of one compiled kernel: records each call."""

    def __init__(self, src, metadata):
        self.name = getattr(src, "name", "?")

    def __call__(self, *args):
        CALLS.append((self, args))


class _Utils:
    @staticmethod
    def load_binary(name, kernel, shared, device):
        return 0, 0, 0, 0, 1024

    @staticmethod
    def get_device_properties(device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    @staticmethod
    def unload_module(module):
        pass


class StubDriver:
    """The parts of triton's active driver that compiling and launching touch."""

    launcher_cls = _Recorder
    utils = _Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def set_current_device(self, device):
        pass

    def is_active(self):
        return True

    def get_benchmarker(self):
        """For an Autotuner that benchmarks even a single config (triton 3.6): one call."""
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()
            return [1.0] * len(quantiles) if quantiles else 1.0
        return bench


def per_call_us(fn, n: int = 300, repeats: int = 7) -> float:
    """Best of `repeats` averages over n calls (this 2-core machine is noisy)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        CALLS.clear()
    return best


def _setup():
    driver.set_active(StubDriver())
    from vggfast import ops
    ops.INTERPRETING = True                 # CPU tensors pass the wrappers' device check
    ops._sm_count = lambda device: 132      # an H100's SM count for the split-K choice
    ops.FAST_LAUNCH = True
    return ops


def _cases(ops, alt: bool = False):
    """(name, call) pairs: every launch wrapper, at shapes of VGG16's batch-1 forward; alt=True:
    the same wrappers at other sizes whose integer arguments mostly fall in the same triton
    specialisation classes (so `check` sees the shortcut reuse an entry made at other sizes),
    and where they do not (a size becoming a multiple of 16: another compiled kernel)."""
    torch.manual_seed(0)
    bf = torch.bfloat16

    def conv(cin, cout, k):
        return ops.pack_conv_weight(torch.randn(cout, cin, k, k), torch.randn(cout), bf)
    c3, c4, fc6 = conv(256, 256, 3), conv(512, 512, 3), conv(512, 4096, 7)
    x3 = torch.randn(1, *((40, 72) if alt else (56, 56)), 256).to(bf)
    x3b = torch.randn(1, *((48, 64) if alt else (56, 56)), 256).to(bf)   # alt: multiples of 16
    x4 = torch.randn(1, *((20, 36) if alt else (28, 28)), 512).to(bf)
    x6 = torch.randn(1, *((11, 13) if alt else (7, 7)), 512).to(bf)
    shapes = [(1, 20, 10), (1, 9, 9)] if alt else [(1, 14, 18), (2, 9, 7)]
    xs = [torch.randn(*s, 256).to(bf) for s in shapes]
    inputs, off = [], 0
    for x in xs:
        inputs.append((off, *x.shape[:3]))
        off += ops.align(x.numel(), ops.GROUP_ELEM_ALIGN)
    src = torch.randn(off).to(bf)
    layer = ops.group_layer(inputs, 256, 256, 3, 1, False)
    tables = ops.upload_groups([layer], "cpu")[0]
    pooled = ops.group_layer(inputs, 256, 256, 3, 1, True)
    ptables = ops.upload_groups([pooled], "cpu")[0]
    act = torch.randn(1, *((40, 72) if alt else (56, 56)), 64).to(bf)
    scores = torch.randn(2, 1000, *((2, 10) if alt else (3, 4)))
    return [
        ("conv3_2 (split-K 2 + reduce)", lambda: ops.conv2d(x3, c3, 1)),
        ("conv3_2 (split_k=1)", lambda: ops.conv2d(x3b, c3, 1, split_k=1)),
        ("conv4_3 +pool", lambda: ops.conv2d(x4, c4, 1, pool=True)),
        ("fc6 (split-K)", lambda: ops.conv2d(x6, fc6, 0)),
        ("fc6 fp32 out", lambda: ops.conv2d(x6, fc6, 0, relu=False, out_dtype=torch.float32,
                                            split_k=1)),
        ("grouped conv3 (split-K + reduce)", lambda: ops.conv2d_grouped(src, layer, tables, c3)),
        ("grouped conv3 +pool", lambda: ops.conv2d_grouped(src, pooled, ptables, c3)),
        ("max_pool2x2", lambda: ops.max_pool2x2(act)),
        ("lrn", lambda: ops.lrn(act)),
        ("mean_softmax", lambda: ops.mean_softmax(scores)),
    ]


def _normal(call) -> tuple:
    """A launcher call, comparable across the two paths: the launcher (one per compiled kernel),
    the grid, the function handle and metadata, and every argument (a tensor by its dtype, shape
    and strides: each call allocates its own outputs); the launch metadata and the two hooks
    are compared apart."""
    rec, args = call
    norm = tuple(("tensor", a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor)
                 else a for a in args[9:])
    return (id(rec), args[:6], norm)


def check() -> int:
    """Every wrapper's launcher calls on the shortcut equal triton's own, argument by argument:
    at the sizes whose launch made the shortcut's entry, and at other sizes (`_cases(alt=True)`)
    that reuse that entry where their arguments specialise alike."""
    ops = _setup()
    bad = reused = 0
    for (name, call), (_, other) in zip(_cases(ops), _cases(ops, alt=True)):
        want = []
        ops.FAST_LAUNCH = False
        for c in (call, other):
            c()                             # compiles, and tunes where triton benchmarks
            CALLS.clear()
            c()
            want.append(list(CALLS))
        ops.FAST_LAUNCH = True
        ops._FAST.clear()
        call()                              # first of its kind: triton's path, entry kept
        CALLS.clear()
        call()                              # the shortcut
        got = [list(CALLS)]
        CALLS.clear()
        kinds = len(ops._FAST)
        other()                             # other sizes: the same entries where they fit
        got.append(list(CALLS))
        new_kinds = len(ops._FAST) - kinds
        reused += not new_kinds
        ok = True
        for w, g in zip(want, got):
            hooks_empty = all(not getattr(h, "calls", h) for _, a in w for h in a[7:9])
            ok &= (len(g) == len(w) and hooks_empty and [_normal(c) for c in g]
                   == [_normal(c) for c in w])
        ok &= (all(a[6:9] == (None, None, None) for _, a in got[0])
               and all(e is not None for e in ops._FAST.values()))
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name}: {len(want[0])} launch(es), "
              f"{len(want[0][0][1]) if want[0] else 0} launcher arguments; other sizes: "
              f"{'shortcut reused' if not new_kinds else f'{new_kinds} new kind(s)'}")
        if not ok:
            for w, g in zip(want, got):
                for c in w:
                    print("   triton  :", _normal(c))
                for c in g:
                    print("   shortcut:", _normal(c))
    print(f"triton {triton.__version__}: {'all launches equal' if not bad else f'{bad} differ'}; "
          f"other sizes reused the shortcut in {reused} of {len(_cases(ops))} cases")
    return 1 if bad else 0


def main() -> int:
    ops = _setup()
    rows = []
    for name, call in _cases(ops):
        t0 = time.perf_counter()
        call()                               # compiles for sm_90 (or Triton's disk cache)
        compile_s = time.perf_counter() - t0
        ops.FAST_LAUNCH = False
        slow = per_call_us(call)
        ops.FAST_LAUNCH = True
        call()
        n = len(CALLS)
        fast = per_call_us(call)
        rows.append((name, compile_s, n, slow, fast))
    print(f"triton {triton.__version__}, torch {torch.__version__}, Python "
          f"{sys.version.split()[0]}; microseconds per wrapper call on this CPU (stub launcher)")
    print("| wrapper call | launches | triton's path | shortcut | saved per launch |")
    print("| --- | --- | --- | --- | --- |")
    for name, _, n, slow, fast in rows:
        print(f"| {name} | {n} | {slow:.1f} | {fast:.1f} | {(slow - fast) / max(n, 1):.1f} |")
    return 0


def forward() -> int:
    """Host milliseconds of whole VGG16 forwards (TritonBackend.run at batch 1 and 8, run_many on
    the dense protocol's three scales + flip of a 480x640 photo), shortcut on and off: what an
    un-graphed forward costs the CPU before the GPU does anything."""
    ops = _setup()
    from vggfast.configs import make_spec
    from vggfast.nn import build_model
    from vggfast.triton_backend import TritonBackend
    from vggfast.weights import load
    torch.manual_seed(0)
    w = load(build_model("D").eval(), config="D")
    tri = TritonBackend(w.state_dict, make_spec("D"), torch.device("cpu"), torch.bfloat16)
    dense = [torch.randn(2, 3, h, w_) for h, w_ in ((256, 341), (384, 512), (512, 682))]
    # One arena for every call, as the executor keeps one per plan key (fresh host memory would
    # add page faults that a GPU's caching allocator does not have).
    arena = torch.empty(tri.prepare_many([tuple(v.shape) for v in dense]).arena_bytes,
                        dtype=torch.uint8)
    cases = [("run, batch 1 @224", lambda x=torch.randn(1, 3, 224, 224): tri.run(x)),
             ("run, batch 8 @224", lambda x=torch.randn(8, 3, 224, 224): tri.run(x)),
             ("run_many, dense 3 scales + flip", lambda: tri.run_many(dense, "fc8", arena=arena)),
             ("run per scale, dense 3 scales + flip", lambda: [tri.run(v) for v in dense]),
             # run_many's first step, a real copy here but one asynchronous kernel on a GPU:
             # subtract it from the run_many row for the host cost on a GPU machine.
             ("(of run_many: torch.cat of the inputs on this CPU)",
              lambda: torch.cat([v.reshape(-1) for v in dense], out=arena[:sum(
                  v.numel() for v in dense) * 4].view(torch.float32)))]
    print(f"triton {triton.__version__}, torch {torch.__version__}; host milliseconds per "
          "forward on this CPU (stub launcher: no GPU work, no C launcher)")
    print("| forward | launches | triton's path | shortcut |")
    print("| --- | --- | --- | --- |")
    for name, call in cases:
        call()                                   # compiles every layer for sm_90
        CALLS.clear()
        call()
        n = len(CALLS)
        ops.FAST_LAUNCH = False
        slow = per_call_us(call, n=20, repeats=5) / 1000
        ops.FAST_LAUNCH = True
        fast = per_call_us(call, n=20, repeats=5) / 1000
        print(f"| {name} | {n} | {slow:.2f} | {fast:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    flags = sys.argv[1:]
    sys.exit(check() if "--check" in flags else forward() if "--forward" in flags else main())

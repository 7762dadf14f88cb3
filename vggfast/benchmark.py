"""Throughput of vggfast's Triton backend beside cuDNN eager and torch.compile, in one process.

    python bench/throughput.py [--config D] [--batches 1,8,64] [--compile-batches 1,64]
                               [--no-compile] [--no-graph] [--out DIR]
    vggfast bench ...            (the same: both call vggfast.benchmark.main)

On a GPU: correctness first (each backend's logits against the fp32, TF32-off cuDNN reference;
the Triton backend must be within 2x cuDNN bf16's error; the dense rows' scores likewise, printed
and recorded as dense_check_ok), then median times from
triton.testing.do_bench, side by side, for
  - each batch of --batches (default 1, 8, 64) at 224x224: vggfast triton, torchvision cuDNN
    eager (bf16, channels_last), both also replayed from a CUDA graph (--no-graph skips those),
    and torch.compile(mode="max-autotune", dynamic=False) of the same module (--compile, default
    on), compiled afresh for each batch of --compile-batches (default: all of --batches) so every
    batch gets a static-shape compile; each batch's first call (compile + autotune) is timed and
    reported. "max-autotune" already replays its kernels from CUDA graphs (cudagraph trees), so
    its fair partner is the "+ CUDA graph" rows;
  - dense evaluation of one 4:3 image (480x640) at scales 256, 384, 512 with its flip (Sec. 3.2
    of the paper: three batches of two views, fc6-fc8 as convs, spatial mean + softmax): triton
    (each layer one grouped launch for all three scales, TritonBackend.run_many; also a row with
    a launch per scale and layer) vs cuDNN eager running the same dense net
    (vggfast.nn.dense_forward), each also as one CUDA graph of the whole three-scale function
    (all three batches and the mean/softmax), time per image.
    Resizing and flipping the views is outside the timed region for these rows;
  - the product path on the same image, end to end: "vggfast Engine.classify", i.e.
    vggfast.Engine(the same weights, backend="triton", the bench dtype, engine defaults otherwise)
    .classify(img, scales=(256, 384, 512)) with its default flip, img a [3, 480, 640] float
    tensor in [0, 1] on the CPU: input checks, the upload, resize and normalise on the GPU,
    planner, forward (replayed from the engine's CUDA graphs once warm), reduction and the copy
    of the result back to the CPU are all timed (--no-engine skips it).
Each row: ms, img/s, TFLOP/s (2 x multiply-adds of every conv/fc layer), % of the bf16 matmul
peak measured in this run (8192^3 torch.matmul), peak extra memory of one call (a graph replay
allocates nothing: its buffers were taken at capture), speed-up vs eager and vs compile (a
"+ CUDA graph" row against "cuDNN eager + CUDA graph"). JSON and CSV (GPU name, driver,
torch/triton versions, git commit) go to --out; the JSON also holds compile_first_call_s,
{batch: seconds} (a warm inductor cache shortens these).

Without a GPU it times the torch reference (TorchBackend, fp32 on the CPU) and Engine.classify on
the torch backend only, at a small width (--width, default 1/8), and says so: the Triton kernels
need a GPU to be timed.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import preprocess as pp
from .errors import VGGFastError
from .nn import TorchBackend, build_model, dense_forward
from .weights import load

REPO = Path(__file__).resolve().parent.parent  # the checkout, for `git rev-parse` in the report

DENSE_SCALES = (256, 384, 512)
DENSE_IMAGE = (480, 640)  # (h, w) of the dense rows' one 4:3 photo


def parse_args(argv):
    from .cli import OneLineParser
    p = OneLineParser(prog="vggfast bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="D", help="A, A-LRN, B, C, D, E or vgg11..vgg19 (default D)")
    p.add_argument("--batches", default="1,8,64", help="batch sizes at --size (default 1,8,64)")
    p.add_argument("--size", type=int, default=224, help="square input size of the batch rows")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile(mode='max-autotune', dynamic=False) (default "
                   "on a GPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--compile-batches", default=None,
                   help="batch sizes to compile, one static compile each (comma-separated, a "
                   "subset of --batches; default all of them)")
    p.add_argument("--compile-dense", action="store_true",
                   help="also compile the dense net for the dense rows (one compile per scale)")
    p.add_argument("--no-dense", action="store_true", help="skip the dense 3-scale + flip rows")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")
    p.add_argument("--no-engine", action="store_true", help="skip the Engine.classify row")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--width", type=float, default=None,
                   help="channel width multiplier (default 1 on a GPU, 1/8 on the CPU)")
    p.add_argument("--rep", type=int, default=300, help="do_bench repetition time in ms")
    p.add_argument("--out", default=str(Path("bench") / "results"),
                   help="directory for throughput.json / throughput.csv")
    args = p.parse_args(argv)

    def batch_list(flag, text):
        try:
            return [int(b) for b in text.split(",") if b.strip()]
        except ValueError:
            p.error(f"{flag} must be comma-separated integers, not {text!r}")

    args.batches = batch_list("--batches", args.batches)
    if not args.batches or min(args.batches) < 1:
        p.error("--batches needs positive batch sizes")
    if args.compile_batches is None:
        args.compile_batches = list(args.batches)
    else:
        args.compile_batches = batch_list("--compile-batches", args.compile_batches)
        extra = sorted(set(args.compile_batches) - set(args.batches))
        if extra:
            p.error(f"--compile-batches {','.join(map(str, extra))} not in --batches "
                    f"{','.join(map(str, args.batches))}")
    if args.rep < 1:   # do_bench would time one run, a median of nothing, without a word
        p.error(f"--rep must be a positive number of milliseconds, not {args.rep}")
    # the bench nets are built at the paper's native size: below it fc6 (a 7x7 conv over pool5)
    # has no input to run on, and the first timing ended in F.conv2d's traceback
    if args.size < 224 or args.size % 32:
        p.error(f"--size must be a multiple of 32 and at least 224 (the native size of the "
                f"nets timed), not {args.size}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file; give a folder for throughput.json / .csv")
    try:    # made now, so a bad --out fails before the timing runs, not after them
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot make the results folder ({exc.strerror or exc})")
    return args


def gflop(spec, n: int, h: int, w: int) -> float:
    """GFLOP (2 x multiply-adds) of the dense net on n images of h x w."""
    total = 0
    for l in spec.layers:
        oh, ow = h + 2 * l.pad - l.k + 1, w + 2 * l.pad - l.k + 1
        total += 2 * n * oh * ow * l.cout * l.cin * l.k * l.k
        h, w = (oh // 2, ow // 2) if l.pool else (oh, ow)
    return total / 1e9


def _run(cmd: list[str]) -> str:
    """A command's stdout in the checkout, "unknown" where it fails (no git, not a checkout)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              cwd=REPO).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_commit() -> str:
    """The checkout's HEAD (what the bench/ scripts and `meta` report), or "unknown"."""
    return _run(["git", "rev-parse", "HEAD"])


def meta(device: torch.device) -> dict:
    run = _run
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    m = {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
         "git_commit": git_commit(),
         "git_dirty": bool(run(["git", "status", "--porcelain", "--untracked-files=no"])
                           not in ("", "unknown")),
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         # off: each layer shape takes the first tile of its list (kernels/conv.py), untuned
         "autotune": os.environ.get("VGGFAST_AUTOTUNE", "1").strip() != "0"}
    if device.type == "cuda":
        m.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                 driver=run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
                            ).splitlines()[0])
    else:
        m.update(gpu=None, cpu=platform.processor() or platform.machine(),
                 threads=torch.get_num_threads())
    return m


def time_ms(fn, device: torch.device, rep: int) -> float:
    """Median milliseconds of fn(): do_bench on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        import triton.testing
        fn()                      # first call: JIT compile / autotune / cudnn.benchmark
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=max(25, rep // 4), rep=rep,
                                             return_mode="median"))
    fn()
    times, deadline = [], time.perf_counter() + rep / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def peak_mib(fn, device: torch.device) -> float | None:
    """Extra device memory one call of fn needs at its peak (MiB), beyond what was allocated."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def matmul_peak_tflops(dtype, rep: int) -> float:
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = time_ms(lambda: a @ b, torch.device("cuda"), rep)
    return 2 * n**3 / ms / 1e9


def cuda_graph(fn, *static):
    """Capture fn(*static) once into a CUDA graph; returns a zero-argument replay closure.

    static: the inputs the graph reads in place (tensors, or lists of them); the closure holds
    them, since the captured addresses must stay allocated as long as the graph. Three warm-up
    calls on a side stream first, so that JIT compiles, autotuning and cudnn.benchmark's search
    happen before the capture.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*static)

    def replay(graph=g, keep=static):
        graph.replay()
    return replay


def compile_static(fn):
    """torch.compile(fn, mode="max-autotune", dynamic=False) with dynamo's caches cleared first,
    so that each shape fn meets gets its own static compile (no dynamic-shape recompile) and the
    previous compile's cudagraph pools are released."""
    torch._dynamo.reset()
    return torch.compile(fn, mode="max-autotune", dynamic=False)


def first_call_s(fn, device: torch.device) -> float:
    """Seconds of one call of fn, synchronised (a compile's or a capture's first call)."""
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def rel_err(got, want) -> float:
    got, want = got.double().flatten(), want.double().flatten()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def eager_module(spec, params_model, device, dtype):
    """torchvision's module for the configuration (vggfast.nn's identical layout otherwise)."""
    model = None
    try:
        import torchvision
        name = spec.torchvision_name
        if name and spec.width == 1.0:
            model = getattr(torchvision.models, name)(weights=None, num_classes=spec.num_classes)
            model.load_state_dict(params_model.state_dict())
    except ImportError:
        pass
    model = model or params_model
    return model.eval().to(device, dtype, memory_format=torch.channels_last)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = getattr(torch, args.dtype) if gpu else torch.float32
    width = args.width if args.width is not None else (1.0 if gpu else 1 / 8)
    compile_on = gpu if args.compile is None else args.compile
    torch.manual_seed(0)
    model = build_model(args.config, width=width).eval()
    weights = load(model, config=args.config)
    spec, params = weights.spec, weights.state_dict
    info = meta(device)
    print(f"vggfast bench: config {spec.config} width {width:g} on "
          f"{info.get('gpu') or 'CPU (' + str(info.get('cpu')) + ')'}; torch {info['torch']}, "
          f"triton {info['triton']}, commit {info['git_commit'][:12]}"
          f"{'' if info['autotune'] else ', VGGFAST_AUTOTUNE=0 (untuned tiles)'}")
    rows: list[dict] = []
    result = {"meta": info, "config": spec.config, "width": width, "dtype": str(dtype),
              "rows": rows}
    dense_case = "dense 3 scales + flip"

    if not gpu:
        print("no CUDA device: timing the torch reference (TorchBackend, float32, CPU) and "
              "Engine.classify on it only; the Triton kernels and the cuDNN/torch.compile anchors "
              "need a GPU")
        ref = TorchBackend(params, spec, device, torch.float32)
        for n in args.batches:
            x = torch.randn(n, 3, args.size, args.size)
            _time_rows(rows, {"torch reference (cpu)": lambda: ref.run(x)},
                       f"batch {n} @{args.size}", n, gflop(spec, n, args.size, args.size), None,
                       device, args.rep)
        if not args.no_dense:
            views = _dense_views(device, torch.float32)
            def fn():
                return [F.softmax(ref.run(v)["fc8"].mean(dim=(2, 3)), 1) for v in views]
            fns = {"torch reference (cpu)": fn}
            if not args.no_engine:
                fns["vggfast Engine.classify (cpu)"] = _engine_classify(weights, device,
                                                                        torch.float32, "torch")
            _time_rows(rows, fns, dense_case, 1, _dense_gflop(spec), None, device, args.rep)
        return _report(result, args)

    from vggfast import ops
    from vggfast.triton_backend import TritonBackend
    torch.backends.cudnn.benchmark = True
    peak = matmul_peak_tflops(dtype, args.rep)
    result["matmul_peak_tflops"] = peak
    print(f"measured {args.dtype} matmul peak (8192^3): {peak:.0f} TFLOP/s")

    t0 = time.perf_counter()
    tri = TritonBackend(params, spec, device, dtype)
    eager = eager_module(spec, model, device, dtype)
    dense_params = {k: (v.to(device, dtype, memory_format=torch.channels_last) if v.dim() == 4
                        else v.to(device, dtype)) for k, v in params.items()}
    x0 = torch.randn(max(args.batches), 3, args.size, args.size, device=device)
    t1 = time.perf_counter()
    result["triton_first_call_s"] = first_call_s(lambda: tri.run(x0[:1]), device)
    result["setup_s"] = t1 - t0
    print(f"triton backend: first call {result['triton_first_call_s']:.1f} s "
          "(JIT compile + autotune; a warm Triton cache makes this fast)")

    if not args.no_check:
        ok = _check(spec, params, tri, eager, x0[:2], device, dtype)
        if not ok:
            print("correctness check FAILED: not timing (use --no-check to time anyway)")
            _report(result, args)
            return 1

    compile_s: dict[int, float] = {}   # batch -> seconds of its first (compiling) call
    result["compile_first_call_s"] = compile_s
    for n in args.batches:
        x = x0[:n].contiguous()
        xe = x.to(dtype, memory_format=torch.channels_last)
        with torch.inference_mode():
            fns = {"vggfast triton": lambda: tri.run(x),
                   "cuDNN eager": lambda: eager(xe)}
            if n <= 8 and ops.FAST_LAUNCH:   # host-bound sizes: the launch shortcut's share
                fns[SLOW_LAUNCH] = _triton_launch_path(ops, lambda: tri.run(x))
            if compile_on and n in args.compile_batches:
                compiled = compile_static(eager)
                compile_s[n] = first_call_s(lambda: compiled(xe), device)
                print(f"torch.compile max-autotune, batch {n}: first call {compile_s[n]:.0f} s")
                fns["torch.compile max-autotune"] = lambda: compiled(xe)
            if not args.no_graph:
                fns["vggfast triton + CUDA graph"] = cuda_graph(tri.run, x)
                fns["cuDNN eager + CUDA graph"] = cuda_graph(eager, xe)
            _time_rows(rows, fns, f"batch {n} @{args.size}", n,
                       gflop(spec, n, args.size, args.size), peak, device, args.rep)
        fns.clear()   # this batch's graphs and their memory pools go before the next is captured

    if not args.no_dense:
        views = _dense_views(device, torch.float32)
        dviews = [v.to(dtype, memory_format=torch.channels_last) for v in views]
        if not args.no_check:
            result["dense_check_ok"] = _check_dense(spec, params, tri, dense_params, views,
                                                    device, dtype)

        def tri_dense(vs=views):    # every layer one launch for all three scales (run_many)
            return [ops.mean_softmax(s) for s in tri.run_many(vs, "fc8")]

        def tri_dense_per_scale(vs=views):
            return [ops.mean_softmax(tri.run(v)["fc8"]) for v in vs]

        def eager_dense(vs=dviews, run=lambda v: dense_forward(dense_params, spec, v)["fc8"]):
            return [F.softmax(run(v).float().mean(dim=(2, 3)), 1) for v in vs]

        with torch.inference_mode():
            fns = {"vggfast triton": tri_dense, "vggfast triton, launches per scale":
                   tri_dense_per_scale, "cuDNN eager": eager_dense}
            if ops.FAST_LAUNCH:
                fns[SLOW_LAUNCH] = _triton_launch_path(ops, tri_dense)
            if not args.no_graph:   # one graph each for all three scales and the reduction
                fns["vggfast triton + CUDA graph"] = cuda_graph(tri_dense, views)
                fns["cuDNN eager + CUDA graph"] = cuda_graph(eager_dense, dviews)
            if compile_on and args.compile_dense:
                cd = compile_static(lambda v: dense_forward(dense_params, spec, v)["fc8"])
                result["compile_dense_first_call_s"] = first_call_s(
                    lambda: eager_dense(run=cd), device)
                print(f"torch.compile max-autotune, dense (3 static compiles): first call "
                      f"{result['compile_dense_first_call_s']:.0f} s")
                fns["torch.compile max-autotune"] = lambda: eager_dense(run=cd)
            _time_rows(rows, fns, dense_case, 1, _dense_gflop(spec), peak, device, args.rep)
        fns.clear()
        if not args.no_engine:   # outside inference_mode, as a user calls it
            _time_rows(rows, {"vggfast Engine.classify":
                              _engine_classify(weights, device, dtype, "triton")},
                       dense_case, 1, _dense_gflop(spec), peak, device, args.rep)
    _speedups(rows)
    return _report(result, args)


SLOW_LAUNCH = "vggfast triton, triton's launch path"


def _triton_launch_path(ops, fn):
    """fn with every launch through triton's JITFunction.run instead of the shortcut
    (ops._launch; VGGFAST_FAST_LAUNCH=0 does the same for a whole process)."""
    def run():
        was, ops.FAST_LAUNCH = ops.FAST_LAUNCH, False
        try:
            return fn()
        finally:
            ops.FAST_LAUNCH = was
    return run


def _time_rows(rows, fns, case, n, gfl, peak, device, rep) -> None:
    """Append one row per {backend name: zero-argument callable}, all of one case."""
    for name, fn in fns.items():
        ms = time_ms(fn, device, rep)
        rows.append(_row(name, case, n, ms, gfl, peak, peak_mib(fn, device)))


def _engine_classify(weights, device, dtype, backend):
    """Engine.classify on the dense rows' 4:3 photo: a zero-argument callable (the product path,
    from a [3, 480, 640] float image in [0, 1] on the CPU to a Result on the CPU)."""
    from .engine import Engine
    eng = Engine(weights, device=device, dtype=dtype, backend=backend)
    img = torch.rand(3, *DENSE_IMAGE, generator=torch.Generator().manual_seed(2))
    return lambda: eng.classify(img, scales=DENSE_SCALES)


def _dense_views(device, dtype):
    """The dense protocol's inputs for one 4:3 image (DENSE_IMAGE): per scale Q a
    [2, 3, Q, 4Q // 3] batch (the view and its flip; the engine's rescale rule), already
    normalised (random, seeded)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for h, w in _dense_sizes():
        v = torch.randn(1, 3, h, w, generator=g)
        out.append(torch.cat([v, v.flip(-1)]).to(device, dtype))
    return out


def _dense_sizes() -> list[tuple[int, int]]:
    return [pp.rescaled_size(*DENSE_IMAGE, q) for q in DENSE_SCALES]


def _dense_gflop(spec) -> float:
    return sum(gflop(spec, 2, h, w) for h, w in _dense_sizes())


def _row(backend, case, n, ms, gfl, peak, mem) -> dict:
    tflops = gfl / ms  # GFLOP per ms = TFLOP/s
    return {"backend": backend, "case": case, "images": n, "ms": ms, "img_per_s": n * 1000 / ms,
            "ms_per_image": ms / n, "tflops": tflops,
            "pct_of_matmul_peak": (100 * tflops / peak) if peak else None,
            "peak_extra_mib": mem, "speedup_vs_eager": None, "speedup_vs_compile": None}


def _speedups(rows) -> None:
    by_case: dict[str, dict[str, float]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["backend"]] = r["ms"]
    for r in rows:
        c = by_case[r["case"]]
        eager = c.get("cuDNN eager + CUDA graph" if "graph" in r["backend"] else "cuDNN eager")
        comp = c.get("torch.compile max-autotune")
        r["speedup_vs_eager"] = eager / r["ms"] if eager else None
        r["speedup_vs_compile"] = comp / r["ms"] if comp else None


@contextlib.contextmanager
def _no_tf32():
    """Exact fp32 convolutions and matmuls inside (the references of the correctness checks)."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _check(spec, params, tri, eager, x, device, dtype) -> bool:
    """Logits of each backend vs the fp32 TF32-off cuDNN reference (STYLE.md's 2x rule)."""
    with _no_tf32():
        ref = TorchBackend(params, spec, device, torch.float32).run(x)["fc8"].flatten(1)
        e_eager = rel_err(eager(x.to(dtype, memory_format=torch.channels_last)).float(), ref)
        e_tri = rel_err(tri.run(x)["fc8"].flatten(1), ref)
    ok = e_tri <= 2 * e_eager
    print(f"correctness (logits vs fp32 TF32-off reference, rel. L2): cuDNN eager {e_eager:.2e}, "
          f"vggfast triton {e_tri:.2e} -> {'ok' if ok else 'FAIL'} (rule: triton <= 2x eager)")
    return ok


def _check_dense(spec, params, tri, dense_params, views, device, dtype) -> bool:
    """The dense rows' scores (triton grouped over the three scales, cuDNN eager per scale) vs
    the fp32 TF32-off reference, all scales together (STYLE.md's 2x rule)."""
    with _no_tf32():
        ref = TorchBackend(params, spec, device, torch.float32)
        want = torch.cat([ref.run(v)["fc8"].flatten() for v in views])
        eager = torch.cat([dense_forward(dense_params, spec, v.to(
            dtype, memory_format=torch.channels_last))["fc8"].float().flatten() for v in views])
        got = torch.cat([t.flatten() for t in tri.run_many(views, "fc8")])
        e_eager, e_tri = rel_err(eager, want), rel_err(got, want)
    ok = e_tri <= 2 * e_eager
    print(f"dense correctness (scores of 3 scales + flip vs fp32 reference, rel. L2): cuDNN "
          f"eager {e_eager:.2e}, vggfast triton (grouped) {e_tri:.2e} -> "
          f"{'ok' if ok else 'FAIL'}")
    return ok


def _report(result, args) -> int:
    rows = result["rows"]
    print(f"\n{'backend':38s} {'case':24s} {'ms':>9s} {'img/s':>9s} {'TFLOP/s':>8s} "
          f"{'%peak':>6s} {'MiB':>8s} {'x eager':>8s} {'x compile':>9s}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{r['backend']:38s} {r['case']:24s} {r['ms']:9.3f} {r['img_per_s']:9.1f} "
              f"{r['tflops']:8.2f} {f(r['pct_of_matmul_peak'], '6.1f'):>6s} "
              f"{f(r['peak_extra_mib'], '8.0f'):>8s} {f(r['speedup_vs_eager'], '8.2f'):>8s} "
              f"{f(r['speedup_vs_compile'], '9.2f'):>9s}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "throughput.json").write_text(json.dumps(result, indent=2))
        with open(out / "throughput.csv", "w", newline="") as fh:
            keys = list(rows[0]) if rows else ["backend"]
            meta_keys = ["gpu", "driver", "torch", "triton", "git_commit"]
            w = csv.DictWriter(fh, fieldnames=keys + meta_keys)
            w.writeheader()
            for r in rows:
                w.writerow({**r, **{k: result["meta"].get(k) for k in meta_keys}})
    except OSError as exc:
        raise VGGFastError(f"cannot write the results to {out}: {exc.strerror or exc}") from None
    print(f"\nwrote {out / 'throughput.json'} and {out / 'throughput.csv'}")
    return 0

"""CPU speed of the torch backend vs torchvision's VGG16 eager, side by side, in one run.

    python bench/cpu.py [--reps 5] [--threads N] [--rows logits1,logits8,dense] [--json OUT]
    python bench/cpu.py --rows features      # FeatureExtractor (perceptual-loss) rows

The backend CPU users get (and the only speed CI can measure): vggfast.Engine(backend="torch",
device="cpu") against torchvision.models.vgg16(weights=None) in eval mode, float32, under
torch.inference_mode, on the same random full-size weights (no download).

Rows:
  logits1, logits8  eng.logits(x) vs model(x) at batch 1 and 8, 224x224, normalised input.
  dense             eng.classify(img, scales=(256, 384, 512), flip=True) of one 640x480 (4:3)
                    uint8 photo vs the torchvision-based loop of the paper's dense evaluation:
                    per scale, resize (torchvision's antialiased bilinear on float, smallest
                    side Q), the image and its flip as one batch of 2, normalise,
                    model.features, the classifier applied as convs (fc6 as 7x7, fc7/fc8 as
                    1x1), spatial mean, softmax; mean of the 6 posteriors.
  features          (only when named) vggfast.FeatureExtractor(layers=relu1_2, relu2_2,
                    relu3_3, relu4_3) vs torchvision's vgg16().features run up to relu4_3,
                    reading the same four outputs, at batch 1 and 4, 224x224 and 256x256:
                    "no_grad" (forward under torch.no_grad) and "fwd+bwd" (input requiring grad,
                    loss = sum of the mean squares of the four maps, backward to the input; the
                    check compares the input gradients). Weights: vggfast.build_model("D"),
                    random, loaded into both.
Correctness is checked first (max abs difference of logits / probabilities; the run stops if
it is past float32 rounding). Timing: time.perf_counter around each call, after one warm-up
call per row; the sides alternate call by call (the machine is shared: all see the same
load), and the table shows the median over --reps calls with min-max beside it. The speed-up
is the median of the per-round ratios (each round's calls are adjacent in time, so a burst of
load from other tenants mostly cancels), beside the ratio of the medians.

--ablate adds, in the same rounds, the same engine with each CPU choice of TorchBackend
switched off in turn (its private settings, swapped per call; weights re-laid out once):
"no in-place ReLU" (F.relu), "no fc GEMM" (fc6-fc8 by F.conv2d), "contiguous"
(NCHW activations and weights), and "before" (all off: the backend as of commit 72db8c4).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from vggfast.benchmark import git_commit


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def photo_4x3() -> torch.Tensor:
    """A real photo (the bundled coffee.jpg) resized to 640x480 (4:3), [3, 480, 640] uint8."""
    from PIL import Image
    from vggfast.cli import sample_images
    path = next(p for p in sample_images() if p.stem == "coffee")
    im = Image.open(path).convert("RGB").resize((640, 480), Image.BICUBIC)
    return torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(480, 640, 3) \
        .permute(2, 0, 1).contiguous()


class TorchvisionDense:
    """The paper's dense evaluation written directly on torchvision's module (the anchor)."""

    def __init__(self, model):
        self.model = model
        c = model.classifier
        # fc6 [4096, 25088] -> a 7x7 conv over pool5's 512 channels; fc7/fc8 -> 1x1 convs
        self.fc = [(c[0].weight.detach().view(4096, 512, 7, 7), c[0].bias.detach(), True),
                   (c[3].weight.detach()[:, :, None, None], c[3].bias.detach(), True),
                   (c[6].weight.detach()[:, :, None, None], c[6].bias.detach(), False)]

    def __call__(self, img: torch.Tensor, scales, flip: bool = True) -> torch.Tensor:
        from torchvision.transforms import functional as TF
        x = img.float().div(255.0)
        posteriors = []
        for q in scales:
            v = TF.resize(x, q, antialias=True)     # smallest side q, bilinear, float
            v = torch.stack([v, v.flip(-1)]) if flip else v[None]
            v = TF.normalize(v, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
            y = self.model.features(v)
            for w, b, relu in self.fc:
                y = F.conv2d(y, w, b)
                if relu:
                    y = F.relu(y, inplace=True)
            posteriors.append(y.mean((2, 3)).softmax(1))
        return torch.cat(posteriors).mean(0)


FEATURE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
TV_FEATURE_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22}   # vgg16.features


def feature_cases(model, fx, gen) -> list:
    """The `features` rows: (row, images per call, vggfast fn, torchvision fn, what)."""
    stack = model.features[:max(TV_FEATURE_INDEX.values()) + 1]

    def tv(x):
        out = []
        for i, m in enumerate(stack):
            x = m(x)
            if i in TV_FEATURE_INDEX.values():
                out.append(x)
        return out

    def grad_of(f, x):
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(sum(o.square().mean() for o in f(x)), x)
        return g

    def no_grad(f, x):
        with torch.no_grad():
            return torch.cat([o.flatten() for o in f(x)])

    ours = lambda x: list(fx(x).values())   # noqa: E731
    cases = []
    for side in (224, 256):
        for b in (1, 4):
            x = torch.randn(b, 3, side, side, generator=gen)
            cases.append((f"features b{b} {side}x{side} no_grad", b,
                          lambda x=x: no_grad(ours, x), lambda x=x: no_grad(tv, x), "maps"))
            cases.append((f"features b{b} {side}x{side} fwd+bwd", b,
                          lambda x=x: grad_of(ours, x), lambda x=x: grad_of(tv, x), "input grad"))
    return cases


def ablations(eng) -> dict:
    """{name: call(fn)}: fn() run with some of the CPU choices of eng's TorchBackend switched off
    (private attributes, restored after the call; the contiguous weights are made once)."""
    be = eng._backend
    on = (be.params, be.memory_format, be._fc, be._inplace)
    flat = {k: v.contiguous() for k, v in be.params.items()}
    settings = {
        "no in-place ReLU": (be.params, be.memory_format, be._fc, False),
        "no fc GEMM": (be.params, be.memory_format, None, True),
        "contiguous": (flat, torch.contiguous_format, be._fc, True),
        "before (72db8c4)": (flat, torch.contiguous_format, None, False),
    }

    def call(setting):
        def run(fn):
            (be.params, be.memory_format, be._fc, be._inplace) = setting
            try:
                return fn()
            finally:
                (be.params, be.memory_format, be._fc, be._inplace) = on
        return run

    return {name: call(s) for name, s in settings.items()}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def measure(pairs, reps: int) -> dict[str, list[float]]:
    """{name: [ms, ...]}: one warm-up call each, then `reps` rounds that call every side once,
    in turn (so a burst of load from the other tenants lands on both sides alike)."""
    for _, fn in pairs:
        fn()
    times = {name: [] for name, _ in pairs}
    for _ in range(reps):
        for name, fn in pairs:
            times[name].append(timed(fn))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: "
                   "torch's own choice)")
    p.add_argument("--rows", default="logits1,logits8,dense")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--ablate", action="store_true", help="also time the engine with each CPU "
                   "choice of TorchBackend off")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)

    import torchvision
    import vggfast

    torch.manual_seed(0)
    model = torchvision.models.vgg16(weights=None).eval()
    # torchvision's init leaves the biases at zero; random ones make the comparison stricter
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.uniform_(-0.05, 0.05)
    eng = vggfast.Engine(model.state_dict(), backend="torch", device="cpu",
                         preprocess="torchvision")
    anchor = TorchvisionDense(model)
    img = photo_4x3()
    scales = (256, 384, 512)
    gen = torch.Generator().manual_seed(1)
    inputs = {b: torch.randn(b, 3, 224, 224, generator=gen) for b in (1, 8)}

    variants = ablations(eng) if args.ablate else {}
    if "features" in rows:
        # build_model's random weights (torchvision's keys) in both
        net = vggfast.build_model("D")
        fmodel = torchvision.models.vgg16(weights=None).eval()
        fmodel.load_state_dict(net.state_dict())
        fx = vggfast.FeatureExtractor(net.state_dict(), layers=FEATURE_LAYERS, device="cpu",
                                      preprocess="torchvision")

    def tv_logits(x):
        with torch.inference_mode():
            return model(x)

    def tv_dense():
        with torch.inference_mode():
            return anchor(img, scales)

    cases = []   # (row, images per call, vggfast fn, torchvision fn, what the check compares)
    for b in (1, 8):
        if f"logits{b}" in rows:
            x = inputs[b]
            cases.append((f"logits batch {b} 224x224", b, lambda x=x: eng.logits(x),
                          lambda x=x: tv_logits(x), "logits"))
    if "dense" in rows:
        cases.append(("dense 640x480, Q 256/384/512 + flip", 1,
                      lambda: eng.classify(img, scales=scales, flip=True).probs, tv_dense,
                      "probs"))
    if "features" in rows:
        cases += feature_cases(fmodel, fx, gen)

    print(f"# CPU: {cpu_name()}, {os.cpu_count()} logical CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}, python {platform.python_version()}, vggfast commit "
          f"{git_commit()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, load "
          f"{os.getloadavg()[0]:.2f}")
    print("# timing: time.perf_counter, 1 warm-up, median of "
          f"{args.reps} alternating calls (min-max)")
    out_rows = []
    for name, n, fast, ref, what in cases:
        a, b = fast(), ref()
        err = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        # float32 rounding of a 16-layer forward: a few 1e-6 relative to the largest value
        if not err <= 1e-4 * max(scale, 1e-3):
            print(f"{name}: vggfast and torchvision differ by {err:.3g} (max |ref| {scale:.3g})")
            return 1
        # the ablations switch the Engine's backend, not the FeatureExtractor's
        extra = [] if name.startswith("features") else \
            [(v, lambda v=v, fast=fast: variants[v](fast)) for v in variants]
        for v, fn in extra:
            d = (fn().float() - b.float()).abs().max().item()
            if not d <= 1e-4 * max(scale, 1e-3):
                print(f"{name}, {v}: differs from torchvision by {d:.3g}")
                return 1
        t = measure([("vggfast", fast), ("torchvision", ref), *extra], args.reps)
        med = {k: statistics.median(v) for k, v in t.items()}
        ratio = {k: statistics.median(r / f for r, f in zip(t["torchvision"], v))
                 for k, v in t.items()}
        row = {"row": name, "check": f"max|d {what}| {err:.2e} (max |ref| {scale:.2e})",
               **{f"{k}_ms": round(v, 2) for k, v in med.items()},
               **{f"{k}_min_ms": round(min(v), 2) for k, v in t.items()},
               **{f"{k}_max_ms": round(max(v), 2) for k, v in t.items()},
               "vggfast_img_s": round(n * 1e3 / med["vggfast"], 2),
               "torchvision_img_s": round(n * 1e3 / med["torchvision"], 2),
               "speedup": round(ratio["vggfast"], 3),
               "speedup_of_medians": round(med["torchvision"] / med["vggfast"], 3),
               "variants": {v: {"ms": round(med[v], 2), "min_ms": round(min(t[v]), 2),
                                "max_ms": round(max(t[v]), 2), "speedup": round(ratio[v], 3)}
                            for v, _ in extra}}
        out_rows.append(row)
        print(f"{name:38s} vggfast {med['vggfast']:9.1f} ms ({min(t['vggfast']):.1f}-"
              f"{max(t['vggfast']):.1f}) {row['vggfast_img_s']:7.2f} img/s | torchvision "
              f"{med['torchvision']:9.1f} ms ({min(t['torchvision']):.1f}-"
              f"{max(t['torchvision']):.1f}) {row['torchvision_img_s']:7.2f} img/s | "
              f"x{row['speedup']:.2f} (of medians x{row['speedup_of_medians']:.2f}) | "
              f"{row['check']}", flush=True)
        for v, _ in extra:
            print(f"  {v:36s} {med[v]:9.1f} ms ({min(t[v]):.1f}-{max(t[v]):.1f}) "
                  f"x{ratio[v]:.2f} vs torchvision", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "commit": git_commit(),
                       "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
                       "rows": out_rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

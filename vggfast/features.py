"""VGG as a feature extractor: Appendix B descriptors, dense feature maps, `FeatureExtractor`
(an nn.Module for perceptual/style losses), and the `extract` command.

Appendix B descriptor of an image (`features`): at each scale Q the image is rescaled so its
smallest side is Q and the network is applied densely up to `layer` (fc6/fc7 as convolutions, or
any conv-part activation such as "conv5_3", "relu4_3", "pool5"); the [C, h, w] map is pooled over
space (mean, or max), averaged with the pooled map of the mirrored image, then the per-scale
vectors are averaged (aggregate="mean": D = C) or concatenated in scale order
(aggregate="stack": D = C * len(scales)); finally the vector is L2-normalised. C is the layer's
channel count: 4096 for fc6/fc7 of the paper's nets, 512 for conv5_x/pool5, 256 for conv3_x, ...
and the number of classes for fc8.

Layer names are `NetSpec.tap_names()`: conv{b}_{i}, relu{b}_{i}, [norm1], pool{b}, fc6, relu6,
fc7, relu7, fc8. A "conv"/"fc" name is the layer's output before its ReLU (torchvision's
`features[i]` / `classifier[i]` output), the "relu" name the one after. The default of `features`
and `extract` is "fc7", the fc7 output of DESIGN.md's public API (the paper's "4096-D activations
of the penultimate layer"); "relu7" is the same blob after its ReLU, as the Caffe models' fc7 blob
reads once their in-place ReLU has run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import numbers
import os
import sys
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import preprocess as pp
from .devices import rank_device
from .distributed import local_rank  # noqa: F401  (features.local_rank, its old home)
from .distributed import launch_info, leave_process_group, peers_reported
from .errors import PARTIAL, ArgumentError, ImageError, VGGFastError, WeightsError
from .nn import dense_forward
from .weights import load

if TYPE_CHECKING:
    from .engine import Engine

POOLS = ("avg", "max")
AGGREGATES = ("mean", "stack")


# -- descriptors ----------------------------------------------------------------------------------

def _check_layer(engine: "Engine", layer: Any) -> str:
    names = engine.spec.tap_names()
    if not isinstance(layer, str) or layer not in names:
        raise ArgumentError(f"unknown layer {layer!r}; layers of {engine.spec.config}: "
                            f"{', '.join(names)}")
    engine._require(layer)
    return layer


def _min_side(spec, layer: str) -> int:
    """Smallest input side at which `layer` still has a map of at least 1 x 1: 2 ** (pools up
    to and including `layer`), or the native size for the fc layers."""
    if spec.tap_layer(layer).kind == "fc":
        return spec.image_size
    pools = 0
    for name, l in spec.taps():
        pools += name.startswith("pool")
        if name == layer:
            break
    return 2 ** pools


def min_scale(engine: "Engine", layer: str) -> int:
    """Smallest scale Q at which `layer` still has a map of at least 1 x 1."""
    return max(pp.MIN_SIDE, _min_side(engine.spec, layer))


def _check_scales(engine: "Engine", scales: Any, layer: str) -> tuple[int, ...]:
    """Like Engine.check_scales, but conv layers accept scales below the native size."""
    lo = min_scale(engine, layer)
    return engine.check_scales(scales, minimum=lo, why=f"layer {layer} needs at least {lo}")


def _pool(m: torch.Tensor, pool: str) -> torch.Tensor:
    """[V, C, h, w] -> [V, C]."""
    return m.mean(dim=(2, 3)) if pool == "avg" else m.amax(dim=(2, 3))


def _check_settings(engine: "Engine", layer: str, scales: Any, flip: Any, pool: str,
                    aggregate: str, normalize: Any) -> tuple[str, tuple[int, ...], bool, bool]:
    """The descriptor settings of `features` and `extract` checked: (layer, scales, flip,
    normalize)."""
    from .engine import check_flag
    layer = _check_layer(engine, layer)
    scales = _check_scales(engine, scales, layer)
    flip, normalize = check_flag("flip", flip), check_flag("normalize", normalize)
    if pool not in POOLS:
        raise ArgumentError(f"unknown pool {pool!r}; use 'avg' or 'max'")
    if aggregate not in AGGREGATES:
        raise ArgumentError(f"unknown aggregate {aggregate!r}; use 'mean' or 'stack'")
    return layer, scales, flip, normalize


def features(engine: "Engine", imgs: Any, layer: str = "fc7", scales: Any = (256, 384, 512),
             flip: bool = True, pool: str = "avg", normalize: bool = True,
             aggregate: str = "mean") -> torch.Tensor:
    """Appendix B descriptors of one image or a list of images -> [N, D] float32 on cpu.

    See the module docstring for the computation and D. normalize: L2-normalise each row (the
    paper's); a zero vector stays zero. A list longer than CHUNK_IMAGES is decoded and run that
    many images at a time; every image's size is read (a file's header) and checked first, as
    Engine.classify does, so an image too small, over the memory budget or unreadable is refused
    before any chunk runs.
    """
    from .engine import decoded_chunks, naming_images
    layer, scales, flip, normalize = _check_settings(engine, layer, scales, flip, pool,
                                                     aggregate, normalize)
    items = list(imgs) if isinstance(imgs, (list, tuple)) else [imgs]
    if not items:   # as classify([]) gives []: no rows, of the width the settings give
        d = engine.spec.tap_layer(layer).cout * (len(scales) if aggregate == "stack" else 1)
        return torch.zeros(0, d, dtype=torch.float32)
    # the planner's equal-size batches, across images, when it can plan the request (it
    # refuses views below native size); else one image at a time
    planned = min(scales) >= engine.spec.image_size
    ex = engine._executor

    def check(sizes):
        """A chunk's refusals before any of it runs: its plan, or each image's views."""
        if planned:
            ex.plan_sizes(sizes, scales, flip, "dense")
        else:
            engine._check_views(sizes, scales, flip)

    checked = engine._check_chunks(items, check)
    per_image = []
    for start, images in decoded_chunks(items):
        if planned:
            with naming_images(items, start):
                plan = ex.plan(images, scales, flip, "dense")
            pooled = ex.run(plan, images, tap=layer, reduce=lambda m: _pool(m, pool))
            for i in range(len(images)):
                views = [plan.views[v] for v in plan.image_views(i)]
                per_image.append([torch.stack([pooled[v.index] for v in views
                                               if v.scale == q]).mean(0) for q in scales])
        else:
            # The views' check is a function of the sizes alone: an image decoded at the size
            # its header was checked at (always so where the header is exact, image_size's
            # exact=True) is not checked again; one without a header size (a stream read once, a
            # list of one chunk) or decoded at another (an orientation the header could not
            # tell: H and W swapped) is checked now, before any of the chunk runs.
            todo = [start + j for j, x in enumerate(images)
                    if checked.get(start + j) != tuple(x.shape[-2:])]
            if todo:
                with naming_images(items, todo):
                    check([tuple(images[k - start].shape[-2:]) for k in todo])
            per_image += [[_pool(engine._run(engine._views(x, q, flip), (layer,))[layer],
                                 pool).mean(0).cpu() for q in scales] for x in images]
    rows = [torch.stack(p).mean(0) if aggregate == "mean" else torch.cat(p) for p in per_image]
    out = torch.stack(rows).float()
    return F.normalize(out, dim=1) if normalize else out


def feature_maps(engine: "Engine", img: Any, layer: str = "conv5_3", scale: int = 384,
                 flip: bool = False) -> torch.Tensor:
    """The un-pooled activation of `layer` on `img` rescaled to `scale`: [C, h, w] float32 on cpu
    (with flip=True, [2, C, h, w]: the image and its mirror, each in its own coordinates). A
    request over the memory budget is refused naming the image, its file for a path ("FILE
    (40x2000, HxW) at scale Q: why"), as localize's and classify's refusals do."""
    from .engine import check_flag
    layer = _check_layer(engine, layer)
    (q,) = _check_scales(engine, (scale,), layer)
    flip = check_flag("flip", flip)
    x = pp.load_image(img)
    with pp.naming_file(img):
        engine._check_views([tuple(x.shape[-2:])], (q,), flip)
    m = engine._run(engine._views(x, q, flip), (layer,))[layer].cpu()
    return m if flip else m[0]


# -- FeatureExtractor -----------------------------------------------------------------------------

class FeatureExtractor(nn.Module):
    """VGG activations as an nn.Module (perceptual / style losses, feature matching).

    weights: anything `vggfast.Engine` accepts (a FeatureExtractor too). layers: tap names
    ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "conv5_3", "pool5", "fc6", "fc7", ...;
    `NetSpec.tap_names()`; with BatchNorm weights "convB_I" is the output after the folded BN).
    forward(x): x [N, 3, H, W] float, already normalised for these weights (`fe.normalize(rgb)`
    does it for RGB in [0, 1]); returns {layer: [N, C, h, w] tensor in x's dtype, contiguous
    (NCHW strides) on both paths} in the order of `layers`. Computation stops after the deepest requested layer and only the weights up to it
    are kept. fc layers need H, W >= image_size.

    Two paths on the same canonical (BatchNorm-folded) weights, computing in the same dtype,
    `dtype` (default: x's dtype, or autocast's under torch.autocast; pass dtype=torch.bfloat16
    for the fastest kernels on a GPU), with outputs cast back to x's (or autocast's) dtype:
    - no gradient needed (grad disabled, or neither x nor any weight requires grad): the engine's
      fast backend (Triton kernels on CUDA, torch otherwise).
    - otherwise, and inside torch.compile: plain torch ops (cuDNN) with autograd. Input
      gradients equal torchvision's on the same weights. The weights are frozen parameters
      (requires_grad False); set `requires_grad_(True)` on them to fine-tune, which moves every
      call to this path.
    Both paths compute on x's device and return there (the parameters are copied to it when
    they live elsewhere; keep the two together with `.to()` for speed). The fast path follows
    the parameters (an optimiser step, load_state_dict, .to(), in-place
    ops); writes through `.data` bypass PyTorch's version counters, so call `refresh()` after
    them. load_state_dict of weights with NaN/Inf is refused (WeightsError), as the constructor
    refuses them, before any of this module's parameters change (inside a parent module, the
    parent's own and earlier submodules' parameters may already have been loaded). Copies
    (deepcopy, torch.save of the module, pickling) drop the fast engines, which are rebuilt on
    the next call. memory_budget: as Engine's (a forward over it is refused).
    """

    def __init__(self, weights: Any, layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_3",
                                                              "relu4_3"),
                 config: str | None = None, device: Any = None, dtype: Any = None,
                 backend: str = "auto", preprocess: str | None = None,
                 memory_budget: int | None = None):
        super().__init__()
        from .engine import Engine
        if isinstance(layers, str):
            layers = [layers]
        if layers is None or not isinstance(layers, (list, tuple)):
            raise ArgumentError(f"layers must be a list of layer names, not {layers!r}")
        layers = list(dict.fromkeys(layers))
        if not layers:
            raise ArgumentError("layers is empty; name at least one, e.g. ['relu2_2']")
        w = load(weights, config=config)
        spec = w.spec
        names = spec.tap_names()
        for t in layers:
            if t not in names:
                raise ArgumentError(f"unknown layer {t!r}; layers of {spec.config}: "
                                    f"{', '.join(names)}")
        self.layers = layers
        self.spec = spec
        self.deepest = max(layers, key=names.index)
        self._min_side = _min_side(spec, self.deepest)
        bad = w.unusable(self.deepest)
        if bad:
            raise WeightsError(f"layers {', '.join(bad)} of these weights are missing or contain "
                               f"NaN/Inf; {self.deepest} cannot be computed")
        upto = [l.name for l in spec.layers]
        upto = upto[:upto.index(spec.tap_layer(self.deepest).name) + 1]
        if "fc6" not in upto:  # the fast backend need not hold the classifier (most of VGG's bytes)
            fcs = tuple(l.name for l in spec.fcs)
            w = dataclasses.replace(
                w, state_dict={k: v for k, v in w.state_dict.items() if k.split(".")[0] not in fcs},
                missing=fcs, nonfinite=tuple(n for n in w.nonfinite if n not in fcs))
        self._engine_args = dict(backend=backend, preprocess=preprocess,
                                 memory_budget=memory_budget)
        # The first engine checks the arguments and settles the device, the convention and the
        # budget; a fast engine is kept per (device, dtype) met.
        eng = Engine(w, device=device, dtype=torch.float32 if dtype is None else dtype,
                     **self._engine_args)
        self._dtype = None if dtype is None else eng.dtype
        self._engines: dict[tuple, Engine] = {(eng.device, eng.dtype): eng}
        self.preprocess = eng.preprocess
        self._budget = eng.memory_budget
        # canonical names use "." so they are stored under "conv1_1_weight" etc.; the module owns
        # copies (fine-tuning it must not write into the caller's state dict)
        self._keys = {f"{n}.{p}": f"{n}_{p}" for n in upto for p in ("weight", "bias")}
        for key, attr in self._keys.items():
            self.register_parameter(attr, nn.Parameter(
                w.state_dict[key].to(eng.device, copy=True), requires_grad=False))
        self._weights = w
        self._synced = self._param_signature()
        self._init_shared()

    def _init_shared(self) -> None:
        # nn.DataParallel runs shallow copies of this module (replicas, one per GPU, made again
        # every forward) whose parameters are fresh copies: the fast path of a replica uses the
        # engines of the module it was copied from, which checks its own parameters, instead of
        # rebuilding every engine on every call. Replicas run in threads: one lock guards them.
        self._origin = weakref.ref(self)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # the engines hold compiled kernels and C++ plans: not copied, rebuilt when next needed
        return {**self.__dict__, "_engines": {}, "_origin": None, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._init_shared()

    def _param_signature(self) -> tuple:
        """What identifies the parameters' current values: storage, in-place version, dtype."""
        return tuple((a, p.data_ptr(), p._version, p.dtype, p.device)
                     for a, p in ((a, getattr(self, a)) for a in self._keys.values()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # load_state_dict of NaN/Inf weights: the constructor refuses them, so a loaded model
        # must not be the one way in (the fast path would run them, every output NaN). Checked
        # here, before this module's parameters are copied, rather than in load_state_dict, so a
        # FeatureExtractor inside a loss module (the parent's load_state_dict) is checked too.
        bad = []
        for key, attr in self._keys.items():
            t = state_dict.get(prefix + attr)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta \
                    and not bool(torch.isfinite(t).all()):
                bad.append(key.split(".")[0])
        if bad:
            raise WeightsError(
                f"load_state_dict: layers {', '.join(dict.fromkeys(bad))} of these weights "
                f"contain NaN/Inf; the FeatureExtractor keeps the weights it had")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def refresh(self) -> None:
        """Make the fast path re-read the parameters on its next call (needed only after writes
        through `.data`, which PyTorch does not track)."""
        self._synced = None

    def _sync_fast_weights(self) -> None:
        """Rebuild the fast engines from the parameters when they were changed (an optimiser
        step, load_state_dict, .half(), .data = ...): the fast path must never run stale
        weights."""
        sig = self._param_signature()
        if sig == self._synced:
            return
        sd = dict(self._weights.state_dict)
        sd.update({k: getattr(self, a).detach().to("cpu", torch.float32).clone()
                   for k, a in self._keys.items()})
        self._weights = dataclasses.replace(self._weights, state_dict=sd)
        self._engines = {}
        self._synced = sig

    def extra_repr(self) -> str:
        return f"config={self.spec.config}, layers={self.layers}"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], [N, 3, H, W] float -> this network's input (its preprocessing
        convention). ArgumentError for anything else (preprocess.normalize's check)."""
        return pp.normalize(x, self.preprocess)

    def _fast_engine(self, device: torch.device, dtype: torch.dtype):
        from .engine import Engine
        key = (device, dtype)
        if key not in self._engines:
            self._engines[key] = Engine(self._weights, device=device, dtype=dtype,
                                        **self._engine_args)
        return self._engines[key]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from .engine import check_memory, check_nchw
        check_nchw(x, "FeatureExtractor")   # sparse, meta, nested: PyTorch's RuntimeErrors before
        lo = self._min_side
        if min(x.shape[-2:]) < lo:
            raise ArgumentError(f"input {x.shape[-2]}x{x.shape[-1]} (HxW) is too small for "
                                f"{self.deepest}; it needs at least {lo}x{lo}")
        params = {k: getattr(self, a) for k, a in self._keys.items()}
        compiling = torch.compiler.is_compiling()
        # under autocast the convolutions run in its dtype and the outputs come in it, as a
        # torchvision module's do (float64 is left alone, as autocast leaves it)
        amp = x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
        out_dtype = torch.get_autocast_dtype(x.device.type) if amp else x.dtype
        fast_dtype = self._dtype or out_dtype
        fast = not compiling and fast_dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and x.shape[0] > 0 and not (torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in params.values())))
        if not compiling:   # refuse before allocating, as Engine does
            check_memory(self.spec, fast_dtype if fast else x.dtype, self._budget, x.shape[0],
                         *x.shape[-2:], "use smaller inputs, or raise the limit with "
                         "FeatureExtractor(..., memory_budget=BYTES)")
        if not fast:
            # on x's device, as the fast path's engines are (a differentiable copy when the
            # parameters live elsewhere: gradients still reach them)
            cdt = self._dtype or x.dtype        # the fast path's dtype: both paths agree
            params = {k: p.to(x.device, cdt) for k, p in params.items()}
            out = dense_forward(params, self.spec, x.to(cdt), self.layers)
            out = {k: v.to(out_dtype) for k, v in out.items()}
        else:
            owner = self._origin() if getattr(self, "_is_replica", False) else self
            owner = owner if owner is not None else self
            with owner._lock:
                owner._sync_fast_weights()
                engine = owner._fast_engine(x.device, fast_dtype)
            out = engine._backend.run(x, self.layers)
            # the backend computes in channels_last (oneDNN's and cuDNN's fast layout); the
            # outputs are contiguous NCHW as torchvision's and the autograd path's are, so a
            # Gram matrix's f.view(N * C, H * W) works on a target computed under no_grad too
            out = {k: v.to(x.device, out_dtype, memory_format=torch.contiguous_format)
                   for k, v in out.items()}
        return {t: out[t] for t in self.layers}


# -- extract: a folder of images -> features (resumable, sharded with torchrun) -------------------

def list_inputs(src: str | os.PathLike) -> list[str]:
    """A folder (its image files, recursive, sorted) or a text file with one path per line
    (relative paths are relative to the list file's folder; blank lines and #-comments skipped)."""
    from .protocols import list_images
    p = Path(src)
    if p.is_dir():
        files = [str(f) for f in list_images(p)]
    elif p.is_file():
        if p.suffix.lower() in pp.IMAGE_SUFFIXES:
            raise ArgumentError(f"{src} is an image; extract takes a folder of images or a text "
                                "file listing one image path per line")
        try:
            data = p.read_bytes()
            if b"\0" in data:   # UTF-16 (an editor's "Unicode"), or not text at all
                raise ArgumentError(f"the file list {p} is not UTF-8 text (one path per line)")
            # decoded as the system decodes file names: a path that is not UTF-8 (any bytes on
            # Linux; `find > list.txt` writes them) names the file a folder listing names, and
            # an editor's byte-order mark is no part of the first path
            lines = os.fsdecode(data.removeprefix(b"\xef\xbb\xbf")).splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ArgumentError(f"cannot read the file list {p}: {exc}")
        files = [str((p.parent / l.strip()) if not os.path.isabs(l.strip()) else l.strip())
                 for l in lines if l.strip() and not l.lstrip().startswith("#")]
    else:
        raise ArgumentError(f"{src} is neither a folder nor a file list")
    if not files:
        from .protocols import no_images_note
        raise ArgumentError(f"no images found in {src}"
                            f"{no_images_note(p) if p.is_dir() else ''}")
    return files


def weights_id(w) -> str:
    """A fingerprint of canonical weights (every tensor's name, shape and two float64 sums): a
    resumed extract must not mix the rows of two models of one configuration."""
    h = hashlib.sha256()
    for k in sorted(w.state_dict):
        t = w.state_dict[k]
        h.update(f"{k}{tuple(t.shape)}{t.sum(dtype=torch.float64).item():.17g}"
                 f"{t.abs().sum(dtype=torch.float64).item():.17g}".encode())
    return h.hexdigest()[:16]


def _save_npy(path: str, a: np.ndarray) -> None:
    with open(path, "wb") as f:   # np.save(name) would append ".npy" to a temporary name
        np.save(f, a)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # e.g. another user's process: alive
        return True
    return True


def _holds_run(folder: Path, settings: dict[str, Any]) -> bool:
    """Whether `folder` is an extract checkpoint folder of exactly these settings."""
    try:
        return json.loads((folder / "settings.json").read_text()) == settings
    except (OSError, ValueError):   # no folder, no settings.json, or one that is no JSON
        return False


class _Parts:
    """A run's checkpoint folder OUT.parts/: settings.json, and per rank and chunk
    r{rank}-{chunk}.npy (features, in shard order) + r{rank}-{chunk}.json (file indices, failures).
    A chunk is written only once complete (atomic rename), so an interrupted run loses at most the
    chunk in flight. r{rank}.lock (host and pid) keeps a second run from writing the same output
    at the same time; a lock left by a process that died is taken over.

    A run interrupted before `--out x` meant x.npy (output_paths) kept its chunks in x.parts/;
    where OUT.parts/ is not there and that folder holds a run of these very settings, it is
    resumed there (and removed at the end) rather than started over. One of other settings is
    left alone: it was never this output's (`--out x.npy` wrote x.npy.parts/ then too)."""

    def __init__(self, out: Path, settings: dict[str, Any], rank: int):
        self.dir = out.with_name(out.name + ".parts")
        legacy = out.with_name(out.stem + ".parts")
        if not self.dir.exists() and _holds_run(legacy, settings):
            # every rank decides alike: nobody creates OUT.parts/ nor writes the legacy
            # settings.json when it is resumed
            self.dir = legacy
        self.rank = rank
        self.lock = self.dir / f"r{rank}.lock"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VGGFastError(f"cannot write next to {out}: {exc.strerror or exc}") from None
        self._take_lock(out)
        meta = self.dir / "settings.json"
        if rank == 0 and not meta.exists():
            pp.atomic_write(meta, lambda p: Path(p).write_text(json.dumps(settings, indent=1)))
        self.settings = settings

    def _take_lock(self, out: Path) -> None:
        import socket
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, pid = self.lock.read_text().split()
                except (OSError, ValueError):
                    host, pid = "", "0"   # being written, or garbage: look once more
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    self.lock.unlink(missing_ok=True)   # its process died: take over
                    continue
                if host:
                    raise VGGFastError(
                        f"another extract (pid {pid} on {host}) is writing {out}; wait for it, "
                        f"choose another --out, or delete {self.lock} if it is not running")
                continue
            except OSError as exc:
                raise VGGFastError(f"cannot write next to {out}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        raise VGGFastError(f"cannot lock {self.lock}; delete it if no extract is running")

    def release(self) -> None:
        self.lock.unlink(missing_ok=True)

    def check(self) -> None:
        meta = self.dir / "settings.json"
        if meta.exists():
            old = json.loads(meta.read_text())
            if old != self.settings:
                diff = [k for k in self.settings if old.get(k) != self.settings[k]]
                raise VGGFastError(f"{self.dir} holds an interrupted run with other settings "
                                   f"({', '.join(diff)}); rerun with those, or delete the folder")

    def done(self) -> list[tuple[list[int], np.ndarray, list[dict]]]:
        out = []
        for meta in sorted(self.dir.glob(f"r{self.rank}-*.json")):
            info = json.loads(meta.read_text())
            feats = np.load(meta.with_suffix(".npy"))
            out.append((info["indices"], feats, info["failed"]))
        return out

    def save(self, chunk: int, indices: list[int], feats: np.ndarray, failed: list[dict]) -> None:
        stem = self.dir / f"r{self.rank}-{chunk:08d}"
        pp.atomic_write(stem.with_suffix(".npy"), lambda p: _save_npy(p, feats))
        pp.atomic_write(stem.with_suffix(".json"), lambda p: Path(p).write_text(
            json.dumps({"indices": indices, "failed": failed})))

    def remove_own(self) -> None:
        """This rank's chunks and lock (the run is over)."""
        for f in self.dir.glob(f"r{self.rank}-*"):
            f.unlink()
        self.release()


class NothingUsable(VGGFastError):
    """extract's run reached its end on every rank and none of the images could be used: only
    rank 0 learns it (from the gathered parts), and the ranks still leave the group together."""


def extract(engine: "Engine", files: Sequence[str], out: str | os.PathLike, layer: str = "fc7",
            scales: Any = (256, 384, 512), flip: bool = True, pool: str = "avg",
            normalize: bool = True, aggregate: str = "mean", batch_size: int = 16,
            progress: bool = True, rank: int = 0, world: int = 1,
            gather=None) -> dict[str, Any] | None:
    """Features of `files` to OUT (.npy, [N, D] float32, row i = i-th readable file) and
    OUT's name with .json ({"files": [...], "failed": [{"file", "error"}], settings}); an OUT not
    ending in .npy gets it appended, as np.save does (`output_paths`), so two different outputs
    never share one .json.

    Work is checkpointed every `batch_size` images in OUT.parts/, and a rerun with the same
    settings resumes from there. With world > 1 rank r takes files[r::world]; `gather(obj)` must
    return the list of every rank's obj on rank 0 (None elsewhere); rank 0 writes the output.
    Returns the JSON record on rank 0, None on other ranks. A second run writing the same OUT
    at the same time is refused (a lock in OUT.parts/).
    """
    out, _ = output_paths(out)
    # every setting is checked before OUT.parts/settings.json is written: a run refused later,
    # in its first chunk, left settings that no corrected rerun matched
    layer, scales, flip, normalize = _check_settings(engine, layer, scales, flip, pool,
                                                     aggregate, normalize)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
            or batch_size < 1:
        raise ArgumentError(f"batch_size must be a positive integer, not {batch_size!r}")
    batch_size = int(batch_size)    # a numpy integer would not go into settings.json
    settings = {"layer": layer, "scales": list(scales), "flip": bool(flip), "pool": pool,
                "normalize": bool(normalize), "aggregate": aggregate, "world": world,
                "batch_size": batch_size, "config": engine.spec.config,
                "weights": weights_id(engine.weights), "preprocess": engine.preprocess,
                "dtype": str(engine.dtype).removeprefix("torch."),
                # a file name that is not UTF-8 hashes as its bytes (surrogateescape), a UTF-8
                # one as before: a resumed run's earlier parts still match
                "files": hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape"))
                .hexdigest()}
    parts = _Parts(out, settings, rank)
    try:
        return _extract_parts(engine, files, out, parts, settings, layer, scales, flip, pool,
                              normalize, aggregate, batch_size, progress, rank, world, gather)
    finally:
        parts.release()


def _extract_parts(engine, files, out, parts, settings, layer, scales, flip, pool, normalize,
                   aggregate, batch_size, progress, rank, world, gather):
    """extract's work once its checkpoint folder is locked."""
    from tqdm import tqdm

    from .engine import skipping_oversized
    if gather is not None:
        gather(None)  # rank 0 has written settings.json before anyone checks it
    parts.check()
    mine = list(range(rank, len(files), world))
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    # chunking depends only on the settings checked above, so chunk k is the same on a rerun
    done_chunks = {int(m.stem.split("-")[1]) for m in parts.dir.glob(f"r{rank}-*.json")}
    todo = [(k, c) for k, c in enumerate(chunks) if k not in done_chunks]
    bar = tqdm(total=len(mine), initial=len(mine) - sum(len(c) for _, c in todo),
               desc=f"extract{f' rank {rank}' if world > 1 else ''}", unit="img",
               disable=not progress, file=sys.stderr)
    for k, chunk in todo:
        idx, images, failed = [], [], []
        for i in chunk:
            try:
                images.append(pp.load_image(files[i]))
                idx.append(i)
            except ImageError as exc:
                failed.append({"index": i, "file": files[i], "error": str(exc)})
        # one request per chunk: the planner batches equal-size views across its images; an
        # image over the memory budget is skipped, not the run
        rows, kept, over = skipping_oversized(
            lambda ims: features(engine, ims, layer, scales, flip, pool, normalize,
                                 aggregate).numpy(), images)
        failed += [{"index": idx[j], "file": files[idx[j]], "error": f"{files[idx[j]]} {why}"}
                   for j, why in over]
        idx = [idx[j] for j in kept]
        vecs = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)
        bar.update(len(chunk))
        parts.save(k, idx, vecs, failed)
    bar.close()
    local = parts.done()
    gathered = gather(local) if gather is not None else [local]
    record, error = None, None
    if rank == 0:
        rows: dict[int, np.ndarray] = {}
        failed = []
        for per_rank in gathered:
            for ix, feats, bad in per_rank:
                rows.update(zip(ix, feats))
                failed += bad
        order = sorted(rows)
        failed.sort(key=lambda f: f["index"])
        if not order:   # nothing to write; the parts go too, so a rerun reads the files again
            error = (f"none of the {len(files)} images could be used"
                     + (f"; the first: {failed[0]['error']}" if failed else ""))
        else:
            feats = np.stack([rows[i] for i in order]).astype(np.float32)
            record = {"files": [files[i] for i in order],
                      "failed": [{"file": f["file"], "error": f["error"]} for f in failed],
                      "dim": int(feats.shape[1]), **{k: v for k, v in settings.items()
                                                     if k not in ("files", "world", "batch_size")}}
            pp.atomic_write(out, lambda p: _save_npy(p, feats))
            pp.atomic_write(output_paths(out)[1],
                            lambda p: Path(p).write_text(json.dumps(record, indent=1)))
    if gather is not None:
        gather(None)  # the output exists before anyone removes its parts
    parts.remove_own()
    if gather is not None:
        gather(None)  # every rank's parts are gone before the folder is removed
    if rank == 0:
        (parts.dir / "settings.json").unlink(missing_ok=True)
        try:
            parts.dir.rmdir()
        except OSError:  # a rank on another node keeps its own (unshared) parts folder
            pass
    if error:
        raise NothingUsable(error)
    return record


def output_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """(features, file list) that `extract` writes for --out OUT: OUT when it ends in .npy, else
    OUT + ".npy" (np.save's rule), and the features' name with .npy replaced by .json. `--out x`
    and `--out x.npy` are one output; when the features went to x itself, the two were different
    outputs writing one x.json.

    Both are checked here, before any work (`vggfast extract` calls this before it loads the
    weights): a folder at either name, and a place no file can be written (under a file, or in
    a folder without write permission). A folder at the .json was found only after every image
    was extracted and the .npy written (exit 2, features without their list)."""
    if not os.fspath(out).strip() or Path(out).name in ("", ".", ".."):
        raise ArgumentError(f"--out {os.fspath(out)!r} is not a file name")
    given = Path(out)
    npy = given if given.suffix == ".npy" else given.with_name(given.name + ".npy")
    for p in (given, npy):
        if p.is_dir():
            raise ArgumentError(f"--out {p} is a folder; give a file name such as "
                                f"{p / 'feats.npy'}")
    index = npy.with_suffix(".json")
    if index.is_dir():
        raise ArgumentError(f"--out {given}: its file list {index} is a folder; move it or "
                            "choose another --out")
    folder = npy.parent
    while not folder.exists() and folder != folder.parent:  # extract creates the missing ones
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ArgumentError(f"cannot write next to {npy}: {folder} is not a writable folder")
    return npy, index


def cmd_extract(args) -> int:
    from .cli import OutputError, _engine, _need_weights, shown_name
    rank, world = launch_info("extract", "a sharded extract")
    # before the weights load and the group forms: every rank refuses a bad --out alike
    output_paths(args.out)
    gather = None
    if world > 1:
        import torch.distributed as dist
        # the device settles the backend, so it is checked before the group is joined: "cpu:0"
        # was taken for a GPU (nccl), and every rank refuses a bad one alike, none left waiting
        device = rank_device(args.device, same_on_every_rank=True)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        args.device = str(device)
        dist.init_process_group(backend)

        def gather(obj):
            got = [None] * world if rank == 0 else None
            dist.gather_object(obj, got, dst=0)
            return got
    ok = False
    try:
        eng = _engine(args, _need_weights(args))
        files = list_inputs(args.source)
        with peers_reported() if world > 1 else contextlib.nullcontext():
            rec = extract(eng, files, args.out, args.layer, args.scales, not args.no_flip,
                          args.pool, not args.no_normalize, args.aggregate, args.batch_size,
                          progress=not args.quiet, rank=rank, world=world, gather=gather)
        ok = True
    except NothingUsable:
        # not a rank failing mid-run: every rank took part to the end, so they leave through the
        # closing barrier; rank 1, once waiting there for a rank 0 that skipped it, exited 2
        # ("another rank ... left before the end") for a run whose one report is rank 0's
        ok = True
        raise
    finally:
        if world > 1:
            leave_process_group(ok)
    if rank != 0:
        return 0
    for f in rec["failed"]:
        print(f"vggfast: skipped {f['error']}", file=sys.stderr)
    npy, index = output_paths(args.out)
    try:
        print(f"{shown_name(npy)}: {len(rec['files'])} x {rec['dim']} ({rec['layer']}), "
              f"{len(rec['failed'])} skipped; file list in {shown_name(index)}")
        sys.stdout.flush()      # here, not at exit: the error below can say what was kept
    except OutputError as exc:  # `vggfast extract ... > /dev/full`: only the summary is lost
        raise OutputError(f"{exc}; the features were written to {shown_name(npy)} (file list "
                          f"in {shown_name(index)}), only this summary was not") from exc
    return PARTIAL if rec["failed"] else 0


def add_cli(sub) -> None:
    """Add the `extract` subcommand."""
    from .cli import _engine_args, _weights_arg
    p = sub.add_parser("extract", help="Appendix B features of a folder or list of images "
                                       "(resumable; shards across ranks under torchrun)",
                       epilog=f"exit status: 0 every image written; {PARTIAL} a usage error, "
                              "nothing written, or some images skipped (unreadable, or over the "
                              "memory budget: named on stderr and under \"failed\" in the "
                              ".json) and the others written. Under torchrun (each rank on "
                              "cuda:LOCAL_RANK with --device cuda; --device cuda:N with several "
                              "ranks on a machine is refused) rank 0 writes the output and "
                              "reports the run with the status above (also for images other "
                              "ranks skipped, and when none could be used); the other ranks "
                              "exit 0 once their share is done, or "
                              f"{PARTIAL} with one line when they fail themselves or another "
                              "rank failed in the middle of the run; torchrun exits 1 if any "
                              "rank did not exit 0 and names the first as the root cause")
    p.add_argument("source", metavar="DIR_OR_LIST",
                   help="a folder of images (recursive) or a text file with one path per line")
    _weights_arg(p)
    _engine_args(p)
    p.add_argument("--out", "-o", required=True,
                   help="features .npy (.npy appended when OUT does not end in it); the file "
                        "list goes to the same name with .json")
    p.add_argument("--layer", default="fc7",
                   help="fc7 (default; Appendix B's descriptor), relu7 (fc7 after its ReLU), "
                        "relu6, pool5, conv5_3, ...")
    p.add_argument("--scales", type=int, nargs="+", default=[256, 384, 512], metavar="Q",
                   help="test scales: each image's smallest side rescaled to Q (default 256 384 "
                        "512)")
    p.add_argument("--no-flip", action="store_true", help="skip the horizontally flipped view")
    p.add_argument("--pool", default="avg", choices=POOLS, help="over space (default avg)")
    p.add_argument("--aggregate", default="mean", choices=AGGREGATES,
                   help="over scales: mean (D = C) or stack (D = C x scales)")
    p.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per checkpointed chunk (a resumed run restarts the chunk in "
                        "flight)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

"""`Engine`: dense (fully convolutional) VGG evaluation on images of any size; `Result`.

Dense evaluation (Sec. 3.2 of the paper): rescale the image isotropically so its smallest side is
Q, run the net with fc6 as a (image_size/32)-square conv and fc7/fc8 as 1x1 convs on the whole
image, giving a class score map [classes, h, w]. vggfast averages the raw scores spatially,
applies softmax, then averages the posteriors over the image and its flip and over the scales.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import preprocess as pp
from .devices import check_device
from .errors import ArgumentError, ImageError, MemoryBudgetError, VGGFastError, WeightsError, \
    raising_out_of_memory
from .executor import Executor
from .nn import TorchBackend
from .scheduler import _fmt_bytes, check_flag, check_method
from .weights import Weights, all_finite, load

BACKENDS = ("auto", "triton", "torch")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
DEFAULT_CPU_BUDGET = 8 << 30
# The channels of the float32 images pp.resize_crop resamples (pp.resize_crop_bytes counts them;
# the planner's multi-crop check counts its whole rescales: csrc/plan.cpp, kRescaleElemSize).
RESCALE_CHANNELS = 3


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in torchvision's index order (package data)."""
    return list(_imagenet_classes())


@functools.lru_cache(maxsize=None)
def _imagenet_classes() -> tuple[str, ...]:
    return tuple(json.loads(resources.files("vggfast").joinpath(
        "data/imagenet_classes.json").read_text()))


@functools.lru_cache(maxsize=None)
def _imagenet_synsets() -> dict[str, int]:
    text = resources.files("vggfast").joinpath("data/imagenet_synsets.txt").read_text()
    return {wnid: i for i, wnid in enumerate(text.split())}


def imagenet_synsets(class_names: Sequence[str]) -> dict[str, int]:
    """WordNet ID -> class index ({"n01440764": 0, ...}: ILSVRC-2012's sorted synsets, which is
    torchvision's index order) when `class_names` are the ImageNet classes in that order, the
    folder names of an ImageNet tree and the labels of its box annotations; else {}."""
    if len(class_names) != 1000 or tuple(class_names) != _imagenet_classes():
        return {}
    return _imagenet_synsets()


def activation_bytes(spec, dtype: torch.dtype, batch: int, h: int, w: int) -> int:
    """Peak activation bytes of one [batch, 3, h, w] forward of `spec` in `dtype` (a layer's
    input, conv output and ReLU output alive at once)."""
    el = torch.finfo(dtype).bits // 8
    peak = 0
    c = 3
    for l in spec.layers:
        ho, wo = h + 2 * l.pad - l.k + 1, w + 2 * l.pad - l.k + 1
        if ho < 1 or wo < 1:
            break
        peak = max(peak, batch * el * (c * h * w + 2 * l.cout * ho * wo))
        h, w, c = (ho // 2, wo // 2, l.cout) if l.pool else (ho, wo, l.cout)
    return peak


def check_memory(spec, dtype: torch.dtype, budget: int, batch: int, h: int, w: int,
                 advice: str) -> None:
    """MemoryBudgetError, before anything is allocated, when the forward would pass `budget`."""
    need = activation_bytes(spec, dtype, batch, h, w)
    if need > budget:
        raise MemoryBudgetError(
            f"a {h}x{w} (HxW) input (batch {batch}) needs {_fmt_bytes(need)} of activations, "
            f"over the memory budget of {_fmt_bytes(budget)}; {advice} or "
            "VGGFAST_MEMORY_BUDGET=16GiB")


# Images of a list request decoded, planned and run together. A long list goes in chunks of
# this many, so host memory holds a chunk's decoded photos, not every photo of the list; 64 is
# the request size the planner is measured at, whose batches already fill the GPU.
CHUNK_IMAGES = 64


def decoded_chunks(items: Sequence[Any]) -> Iterable[tuple[int, list[torch.Tensor]]]:
    """(start, images): `items` decoded (preprocess.load_image) CHUNK_IMAGES at a time, start
    the index of the chunk's first item. Paths that do not exist are an ImageError before
    anything is decoded, so a typo late in a long list fails at once."""
    for k, i in enumerate(items):
        if isinstance(i, (str, os.PathLike)) and not os.path.exists(i):
            raise _of_image(pp.not_found(i), k, len(items))
    size = CHUNK_IMAGES
    for start in range(0, len(items), size):
        yield start, [load_item(items, k) for k in range(start, min(start + size, len(items)))]


def load_item(items: Sequence[Any], k: int) -> torch.Tensor:
    """items[k] decoded (preprocess.load_image); an ImageError about it says which image of a
    list it is, as the planner's errors do: "image K: why" (a path is named in why)."""
    try:
        return pp.load_image(items[k])
    except ImageError as exc:
        raise _of_image(exc, k, len(items)) from None


def item_size(items: Sequence[Any], k: int, exact: bool = False) -> tuple[int, int] | None:
    """(H, W) of items[k] without decoding it (preprocess.image_size: a file's header), None for
    a stream that cannot be read twice, and with `exact` for a format whose header may give H
    and W the wrong way round; an ImageError names the image as load_item's does."""
    try:
        return pp.image_size(items[k], exact=exact)
    except ImageError as exc:
        raise _of_image(exc, k, len(items)) from None


def item_size_or_decode(items: Sequence[Any], k: int) -> tuple[int, int]:
    """(H, W) of items[k] as load_item decodes it, read without decoding where that is exact
    (item_size with `exact`: a swapped H x W would be another plan): a file's header, an
    array's or tensor's shape, a PIL image's size; else decoded. Not preprocess.decoded_size
    (one PIL image already opened, for train's scan), whose name it had too."""
    size = item_size(items, k, exact=True)
    return size if size is not None else tuple(load_item(items, k).shape[-2:])


def _refusal(k: int, reason: str) -> MemoryBudgetError:
    """The MemoryBudgetError about image K of a request, as the planner words it: "image K
    reason" (reason "(40x2000, HxW) at scale Q ..."), with .image and .reason for
    `naming_images` and `preprocess.naming_file` to name it in a list or by its file."""
    err = MemoryBudgetError(f"image {k} {reason}")
    err.image, err.reason = k, reason
    return err


def _rescale_refusal(h: int, w: int, scales: Sequence[int], need: int, budget: int) -> str:
    """Why an image of h x w is refused at `scales` (Engine._check_rescales): its rescale's
    float32 buffers, `need` bytes, over `budget`, and what to do."""
    many = len(scales) > 1
    qs = ", ".join(str(q) for q in scales)
    to = ", ".join("x".join(map(str, pp.rescaled_size(h, w, q))) for q in scales)
    return (f"({h}x{w}, HxW) at scale{'s' if many else ''} {qs} is rescaled to {to}: "
            f"{_fmt_bytes(need)} of float32 resample buffers, over the memory budget of "
            f"{_fmt_bytes(budget)}; use smaller {'or fewer ' if many else ''}scales, or raise the "
            f"budget to at least {need} bytes with Engine(..., memory_budget=BYTES) or "
            f"VGGFAST_MEMORY_BUDGET")


def _of_image(exc: ImageError, k: int, n: int) -> ImageError:
    if n == 1:  # a request of one image: there is no other to tell it from
        return exc
    err = type(exc)(f"image {k}: {exc}")
    err.image, err.reason = k, str(exc)
    return err


def skipping_oversized(run, images: list) -> tuple[list, list[int], list[tuple[int, str]]]:
    """run(images), or, when that is over the memory budget, run([image]) for each image alone,
    skipping those still over it: a long job loses the one huge photo, not its chunk.

    Returns (outputs, kept, over): the outputs of the calls made, the positions in `images` they
    cover in order, and (position, why) for each image skipped, why being
    "(40x2000, HxW) at scale ...". A request of one image over the budget is not run again.
    """
    if not images:
        return [], [], []
    try:
        return [run(images)], list(range(len(images))), []
    except MemoryBudgetError as exc:
        if len(images) == 1:    # already alone: running it again would be refused again
            return [], [], [(0, exc.reason)]
    outs, kept, over = [], [], []
    for i, img in enumerate(images):
        try:
            outs.append(run([img]))
            kept.append(i)
        except MemoryBudgetError as exc:
            over.append((i, exc.reason))
    return outs, kept, over


@contextlib.contextmanager
def naming_images(items: Sequence[Any], start: int | Sequence[int]):
    """The planner's errors name "image K" of the request it was given, a chunk: re-raised with
    K as the index in `items` and, for a path, the file. start: the index in `items` of the
    request's first image, or the index of each of its images."""
    index = range(start, len(items)) if isinstance(start, int) else start
    try:
        yield
    except VGGFastError as exc:
        if exc.image is None or not 0 <= exc.image < len(index):
            raise
        k = index[exc.image]
        path = items[k] if isinstance(items[k], (str, os.PathLike)) else None
        who = f"{os.fsdecode(path)} (image {k})" if path is not None else f"image {k}"
        err = type(exc)(f"{who} {exc.reason}")
        err.image, err.reason = k, exc.reason
        raise err from None


@dataclass(repr=False)
class Result:
    """Classification of one image.

    probs: [num_classes] float32 on cpu, sums to 1 (the mean posterior over all views).
    per_scale: {Q: [num_classes] posterior averaged over that scale's views}.
    per_method: {method: Result} of each protocol used ("dense", "multicrop"), each with its own
    per_scale. per_model: the member engines' Results of an `Ensemble`.
    """

    probs: torch.Tensor
    class_names: Sequence[str] = field(repr=False)
    per_scale: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    top_k: int = 5
    per_method: dict[str, "Result"] = field(default_factory=dict, repr=False)
    per_model: list["Result"] = field(default_factory=list, repr=False)

    def top(self, k: int | None = None) -> list[tuple[int, str, float]]:
        """[(class_index, class_name, prob), ...] best first."""
        k = self.top_k if k is None else _check_top_k(k)
        p, i = torch.topk(self.probs, min(k, self.probs.numel()))
        return [(int(j), self.class_names[int(j)], float(q)) for q, j in zip(p, i)]

    def to_dict(self, k: int | None = None) -> dict[str, Any]:
        return {"top": [{"index": i, "name": n, "prob": p} for i, n, p in self.top(k)]}

    def __eq__(self, other: object) -> bool:
        # the dataclass's own == compares the tensors with ==, whose truth value raises
        # ("Boolean value of Tensor with more than one value is ambiguous"): equal is the same
        # posteriors bit for bit, per scale, method and model, and the same class names
        if not isinstance(other, Result):
            return NotImplemented
        return (_same(self.probs, other.probs) and list(self.class_names) ==
                list(other.class_names) and self.top_k == other.top_k and
                _same(self.per_scale, other.per_scale) and
                _same(self.per_method, other.per_method) and
                _same(self.per_model, other.per_model))

    __hash__ = None    # mutable, holds tensors: as the dataclass with eq would have it

    def __repr__(self) -> str:      # the answer, not a thousand probabilities
        top = ", ".join(f"({i}, {n!r}, {p:.4f})" for i, n, p in self.top())
        scales = f", scales={sorted(self.per_scale)}" if self.per_scale else ""
        methods = f", methods={list(self.per_method)}" if self.per_method else ""
        models = f", models={len(self.per_model)}" if self.per_model else ""
        return f"Result(top=[{top}]{scales}{methods}{models})"


def _same(a: Any, b: Any) -> bool:
    """Equality of Result fields: tensors by value (dtype, shape and every element), dicts and
    lists item by item, anything else with ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_nchw(x: Any, who: str) -> None:
    """ArgumentError unless x is a dense float tensor [N, 3, H, W] holding values (what logits
    and FeatureExtractor take), saying what x is. A nested tensor has no shape to ask for (its
    .shape raises a RuntimeError), so the kind of tensor is tested before its shape."""
    if not isinstance(x, torch.Tensor):
        got = type(x).__name__
    elif x.is_nested or x.layout != torch.strided or x.is_meta:
        got = "a nested tensor" if x.is_nested else "a meta tensor" if x.is_meta else \
            f"a {str(x.layout).replace('torch.', '')} tensor"
    elif x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        got = f"{str(x.dtype).replace('torch.', '')} {list(x.shape)}"
    else:
        return
    raise ArgumentError(f"{who} expects a dense float tensor [N, 3, H, W], already normalised, "
                        f"not {got}")


def check_finite(t: torch.Tensor, engine: "Engine", what: str) -> torch.Tensor:
    """`t` (the network's outputs) unless some value is NaN or infinite: finite weights whose
    products overflow the compute dtype, or an input the checks let through."""
    if not all_finite(t):
        hint = "; try dtype=torch.bfloat16" if engine.dtype == torch.float16 else ""
        raise WeightsError(f"the network's {what} are not finite (an overflow in "
                           f"{str(engine.dtype).replace('torch.', '')}): the weights' values "
                           f"are out of range{hint}")
    return t


def _check_top_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ArgumentError(f"top_k must be a positive integer, not {k!r}")
    return int(k)


def _resolve_device(device: Any) -> torch.device:
    # cuda:N as the engine's tensors report it ("cuda" is the current device), so device
    # comparisons with them hold; devices.check_device is the one check every entry point uses
    return check_device(device)


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ArgumentError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ArgumentError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
    return dtype


def _parse_bytes(text: str, what: str = "VGGFAST_MEMORY_BUDGET") -> int:
    """Bytes of a size such as "16GiB", "1.5GB" or "8000000" (K/M/G/T, binary); `what` names
    where the text came from in the error."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        value = float(num) * mult
    except ValueError:
        raise ArgumentError(f"{what}={text!r} is not a size such as 8GiB")
    if not math.isfinite(value) or value < 1:
        raise ArgumentError(f"memory budget must be a positive finite size such as 8GiB, not "
                            f"{text!r}")
    return int(value)


def _choose_backend(backend: str, device: torch.device) -> str:
    """backend="auto": triton on CUDA, torch elsewhere, and torch (with a warning, once) on a
    CUDA machine whose triton cannot run the kernels (missing, or older than 3.6)."""
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    from .triton_backend import unavailable
    why = unavailable()
    if why is not None:     # run on cuDNN rather than refuse, and say why it is slower
        _warn_once(f"vggfast: the Triton kernels are unavailable ({why}); backend='auto' runs "
                   "on the torch (cuDNN) backend")
        return "torch"
    return "triton"


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    import warnings
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _default_budget(device: torch.device) -> int:
    env = os.environ.get("VGGFAST_MEMORY_BUDGET")
    if env:
        return _parse_bytes(env)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return DEFAULT_CPU_BUDGET


def _check_tool_normalisation(w) -> None:
    """WeightsError when another tool's config (timm's pretrained_cfg in a Hugging Face folder)
    says the model was trained on input normalised with a mean and std that are not ImageNet's,
    which the default "torchvision" convention would apply unsaid (a silently wrong answer)."""
    ms = w.meta.get("tool_mean_std")
    if ms is None:
        return
    tv = pp.convention("torchvision")
    if all(abs(a - b) <= 1e-3 for a, b in zip([*ms[0], *ms[1]], [*tv.mean, *tv.std])):
        return
    def fmt(v):
        return "(" + ", ".join(f"{x:g}" for x in v) + ")"
    raise WeightsError(f"{w.source}: its config.json says the model takes input normalised with "
                       f"mean {fmt(ms[0])} and std {fmt(ms[1])}, which no vggfast preprocessing "
                       f"matches (torchvision's is mean {fmt(tv.mean)}, std {fmt(tv.std)}); pass "
                       f"preprocess='torchvision' (--preprocess torchvision) to run it with "
                       f"ImageNet's anyway")


# VGG-Face's 2622 identities (Parkhi et al. 2015): its conversions take 0-255 minus VGG-Face's
# mean pixel, RGB from MatConvNet, BGR from Caffe; the default (torchvision's mean/std on [0, 1])
# fed it input of another range, and nothing in the tensors says which conversion it is.
VGGFACE_CLASSES = 2622


def _check_face_normalisation(w) -> None:
    """WeightsError for VGG-Face-sized weights whose input convention no one stated (also when
    a FeatureExtractor keeps only their convs: its `normalize` would be as wrong)."""
    if w.spec.num_classes != VGGFACE_CLASSES:
        return
    raise WeightsError(f"{w.source}: {VGGFACE_CLASSES} classes, VGG-Face's identities, whose "
                       "input is 0-255 minus VGG-Face's mean pixel: RGB in MatConvNet's "
                       "conversion (vgg_face_dag.pth: preprocess='vggface'), BGR in Caffe's "
                       "(VGG_FACE.caffemodel converted: 'vggface-bgr'); the tensors do not say "
                       "which, so pass preprocess (--preprocess) or set it in the weights' "
                       "metadata")


class Engine:
    """A VGG network ready for dense evaluation.

    weights: a path, a torchvision name found in the torch hub cache ("vgg16"), a state dict, a
    checkpoint dict, a module or a `vggfast train --out` folder.
    config: "A" "A-LRN" "B" "C" "D" "E" or "vgg11".."vgg19_bn"; None = detected from the weights.
    device: None = cuda if available else cpu. dtype: None = bfloat16 on cuda, float32 on cpu.
    backend: "auto" (triton on cuda, torch otherwise) | "triton" | "torch".
    preprocess: "torchvision" | "caffe" | "caffe-rgb" | "vggface" | "vggface-bgr"; None = from
    the weights (their metadata's "preprocess", torchvision's vgg16_features, jcjohnson's Caffe
    conversions by their classifier layout, a file named vgg_face_dag.pth), else "torchvision".
    Pass "caffe" for any other weights converted from Caffe (caffemodel2pytorch's output, ...),
    whatever their names: nothing in the tensors tells a Caffe conversion. VGG-Face (2622
    classes) has its own mean pixel and comes converted from Caffe (BGR: "vggface-bgr") and from
    MatConvNet (RGB: "vggface"): without a stated convention it is refused, not guessed.
    `info()["preprocess_from"]` says which decided.
    memory_budget: bytes of activations one batch may use, and of the float32 buffers that
    rescale one image (pp.resize_scales_bytes), a number or a size such as "16GiB" (default: 80%
    of the GPU, 8 GiB on CPU, or VGGFAST_MEMORY_BUDGET such as "16GiB"). Larger requests are
    refused up front.
    loc_weights: a localisation net (Appendix A; `vggfast train --task localize`) paired with
    this classifier for `localize`; run on a second backend of the same kind.
    cuda_graphs: None = on for a CUDA device. A batch shape seen a second time is captured in a
    CUDA graph and replayed from then on (repeated requests launch no kernels from Python).
    """

    def __init__(self, weights: Any, config: str | None = None, device: Any = None,
                 dtype: Any = None, backend: str = "auto", preprocess: str | None = None,
                 memory_budget: int | None = None, loc_weights: Any = None,
                 cuda_graphs: bool | None = None):
        self.device = _resolve_device(device)
        if cuda_graphs not in (None, True, False):
            raise ArgumentError(f"cuda_graphs must be True, False or None, not {cuda_graphs!r}")
        if cuda_graphs and self.device.type != "cuda":
            raise ArgumentError(f"cuda_graphs=True needs a CUDA device, not {self.device}")
        # Replay repeated batch shapes from CUDA graphs (vggfast.executor.GraphCache).
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.dtype = _resolve_dtype(dtype, self.device)
        if backend not in BACKENDS:
            raise ArgumentError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        if preprocess is not None:
            pp.convention(preprocess)
        if isinstance(memory_budget, str):   # "16GiB", as VGGFAST_MEMORY_BUDGET takes it
            memory_budget = _parse_bytes(memory_budget, "memory_budget")
        if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(
                memory_budget, numbers.Real) or not math.isfinite(memory_budget)
                or not memory_budget >= 1):
            raise ArgumentError(f"memory_budget must be a positive number of bytes, not "
                                f"{memory_budget!r}")
        self.weights: Weights = load(weights, config=config)
        if self.weights.meta.get("task") == "localize":
            raise WeightsError(f"{self.weights.source} is a localisation net (its last layer "
                               "predicts boxes): pass it as Engine(classifier, loc_weights=...)")
        self.spec = self.weights.spec
        if not (preprocess or self.weights.preprocess):
            _check_tool_normalisation(self.weights)
            _check_face_normalisation(self.weights)
        self.preprocess = preprocess or self.weights.preprocess or "torchvision"
        # what `info` names as the source of the convention in effect: the weights only say
        # so through metadata, a hub name or jcjohnson's layout, so a "default" may be wrong
        self.preprocess_from = ("argument" if preprocess else "weights"
                                if self.weights.preprocess else "default")
        pp.convention(self.preprocess)
        self.memory_budget = int(memory_budget or _default_budget(self.device))
        n = self.spec.num_classes
        self.class_names = self.weights.class_names or (
            imagenet_classes() if n == 1000 else [str(i) for i in range(n)])
        self.backend_name = backend = _choose_backend(backend, self.device)
        self._backend = self._make_backend(self.weights)
        self.loc_weights: Weights | None = None
        self.loc_mode: str | None = None
        self.loc_preprocess: str | None = None
        self._loc_backend = None
        if loc_weights is not None:
            from .localize import check_loc_weights
            self.loc_weights = load(loc_weights)
            self.loc_mode = check_loc_weights(self.loc_weights, self.spec, self.class_names)
            self.loc_preprocess = preprocess or self.loc_weights.preprocess or self.preprocess
            self._loc_backend = self._make_backend(self.loc_weights)
        self._executor = Executor(self)

    def __reduce__(self):
        # The backends hold what does not pickle (the C++ planner's layer table, packed
        # kernel weights, arenas, CUDA graphs); a copy (copy.deepcopy, pickle, a worker process
        # of multiprocessing) is built again from the same canonical weights and settings
        preprocess = self.preprocess if self.preprocess_from == "argument" else None
        return (Engine, (self.weights, None, self.device, self.dtype, self.backend_name,
                         preprocess, self.memory_budget, self.loc_weights, self.cuda_graphs))

    def _make_backend(self, weights: Weights):
        if self.backend_name == "torch":
            return TorchBackend(weights.state_dict, weights.spec, self.device, self.dtype)
        try:
            from .triton_backend import TritonBackend
        except ImportError as exc:
            raise VGGFastError(f"the triton backend is unavailable here ({exc}); "
                               "use backend='torch'")
        return TritonBackend(weights.state_dict, weights.spec, self.device, self.dtype)

    def __repr__(self) -> str:
        s = self.spec
        # weights without fc8 (vgg.features, timm's num_classes=0 or features_only) classify
        # nothing: the spec's default 1000 would read as an ImageNet head (info() says None)
        classes = s.num_classes if "fc8" not in self.weights.missing else "none"
        return (f"Engine(config={s.config}{' +BN folded' if s.batch_norm else ''}, width={s.width:g}, "
                f"classes={classes}, image_size={s.image_size}, device={self.device}, "
                f"dtype={str(self.dtype).replace('torch.', '')}, backend={self.backend_name}, "
                f"preprocess={self.preprocess})")

    # -- checks ---------------------------------------------------------------------------------

    def check_scales(self, scales: Any, minimum: int | None = None,
                     why: str | None = None, method: str = "dense") -> tuple[int, ...]:
        """Validate scales: an int or a non-empty sequence of ints >= `minimum` (default: the
        native size, below which the dense net has no map after pool5 and multi-crop evaluation
        no crop, as the message for `method` says; `why` says otherwise)."""
        if minimum is None and method == "multicrop":
            minimum, n = self.spec.image_size, self.spec.image_size
            why = f"multi-crop evaluation takes {n}x{n} crops, so each scale must be at least {n}"
        if isinstance(scales, (torch.Tensor, np.ndarray)):  # iterating a 0-d one fails
            scales = scales.tolist()
        if isinstance(scales, numbers.Number) and not isinstance(scales, bool):
            scales = (scales,)
        if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
            raise ArgumentError(f"scales must be an integer or a list of integers, not {scales!r}")
        out = []
        for q in scales:
            if isinstance(q, bool) or not isinstance(q, numbers.Real) or not math.isfinite(q) \
                    or int(q) != q:
                raise ArgumentError(f"each scale must be a whole number of pixels, not {q!r}")
            q = int(q)
            if minimum is not None and q < minimum:
                raise ArgumentError(f"scale {q} is too small: {why or f'it must be >= {minimum}'}")
            if minimum is None and q < self.spec.image_size:
                raise ArgumentError(
                    f"scale {q} is below the network's native size {self.spec.image_size}: the dense "
                    f"net needs a {self.spec.grid}x{self.spec.grid} map after pool5")
            if q in out:  # it would count twice in the mean over scales
                raise ArgumentError(f"scale {q} is given twice; list each scale once")
            out.append(q)
        if not out:
            raise ArgumentError("scales is empty; give at least one, e.g. (256, 384, 512)")
        return tuple(out)

    def _require(self, upto: str) -> None:
        bad = self.weights.unusable(upto)
        if bad:
            miss = [n for n in bad if n in self.weights.missing]
            what = " or ".join(w for w, hit in (("are missing", miss), (
                "contain NaN or infinite values", len(miss) < len(bad))) if hit)
            # the user's way out is a shallower layer: name it (none when conv1_1 is bad)
            last = self.weights.usable_up_to()
            use = (f"they can be used for features up to {last} (layer={last!r}), not for this "
                   "request" if last else "nothing can be computed with them")
            raise WeightsError(f"layers {', '.join(bad)} of these weights {what}; {use}")

    def activation_bytes(self, batch: int, h: int, w: int) -> int:
        """Peak activation bytes of one batch (input, conv output and ReLU output alive at once)."""
        return activation_bytes(self.spec, self.dtype, batch, h, w)

    def _check_memory(self, batch: int, h: int, w: int) -> None:
        check_memory(self.spec, self.dtype, self.memory_budget, batch, h, w,
                     "use smaller scales, or raise the limit with Engine(..., memory_budget=BYTES)")

    def _request(self, imgs: Any, scales: Any, method: str):
        """Checked (scales, method, images, whether a list was given); the images not decoded
        yet (see `decoded_chunks`)."""
        method = check_method(method)
        scales = self.check_scales(scales, method=method)
        many = isinstance(imgs, (list, tuple))
        return scales, method, list(imgs) if many else [imgs], many

    def _check_chunks(self, items: list, check: Callable[[list[tuple[int, int]]], Any]
                      ) -> dict[int, tuple[int, int]]:
        """A list of several chunks (see `decoded_chunks`) checked chunk by chunk from its images'
        sizes (`item_size`: a file's header, one image at a time, nothing decoded) before the
        first chunk runs: check(sizes) refuses what the chunk's run would (classify and features
        plan it; the scheduler's cache keeps the last 32 plans, so a list of up to 32 chunks
        whose headers give the decoded sizes is not planned again when it runs), its errors about
        "image K" of `sizes` named as the list's image. An image too small, over the memory
        budget or unreadable late in a long list is thus refused before the chunks before it
        are computed, as in a list of one chunk. What only decoding finds (corrupt pixels, a
        stream that cannot be read twice) is found in its chunk.
        Returns {K: (H, W)} of the images checked, the size each was checked at (none for a list
        of one chunk): a caller whose check is a function of the sizes alone need not check an
        image again once decoded at that size (`features` below the native size)."""
        checked: dict[int, tuple[int, int]] = {}
        if len(items) <= CHUNK_IMAGES:   # decoded and checked before anything runs
            return checked
        for start in range(0, len(items), CHUNK_IMAGES):
            chunk = range(start, min(start + CHUNK_IMAGES, len(items)))
            sizes = {k: item_size(items, k) for k in chunk}
            known = [k for k in chunk if sizes[k] is not None]
            if known:
                with naming_images(items, known):
                    check([sizes[k] for k in known])
                checked.update((k, tuple(sizes[k])) for k in known)
        return checked

    def _check_views(self, sizes: Sequence[tuple[int, int]], scales: Sequence[int],
                     flip: bool) -> None:
        """MemoryBudgetError, before anything is allocated, when an image of `sizes` ((H, W)
        each) gives at a scale of `scales` dense views (with their flips) over the budget, run as
        the paths the planner does not batch run them, one image at a time (features below the
        native size, localize), or when rescaling it to that one scale would be
        (`_check_rescales`). It names image K of `sizes` as the planner's refusals do ("image
        K (40x2000, HxW) at scale Q: why"), so `naming_images` can say which image of a list it
        is. The one check of those views: `_views` makes them without checking again."""
        for k, (h, w) in enumerate(sizes):
            for q in scales:
                try:
                    self._check_memory(2 if flip else 1, *pp.rescaled_size(h, w, q))
                except MemoryBudgetError as exc:
                    raise _refusal(k, f"({h}x{w}, HxW) at scale {q}: {exc}") from None
                # `_views` rescales one scale at a time (pp.resize_short)
                self._check_rescales([(h, w)], (q,), k)

    def _check_rescales(self, sizes: Sequence[tuple[int, int]], scales: Sequence[int],
                        first: int = 0) -> None:
        """MemoryBudgetError, before anything is allocated, when rescaling an image of `sizes`
        ((H, W) each) to all of `scales` at once, as the executor does (pp.resize_scales: every
        scale from one pass over the image; `_views` passes one scale), would hold more than the
        budget: pp.resize_scales_bytes for an 8-bit or a float32 image, the larger (a size read
        from a header does not say which it decodes to), its results and width passes included.
        Worded as the planner's refusals, "image K (9000x12000, HxW) at scales 256, 384 is
        rescaled to 256x341, 384x512: why", K counted from `first`, so `naming_images` can say
        which image of a list it is."""
        budget = self.memory_budget
        for k, (h, w) in enumerate(sizes, first):
            need = pp.resize_scales_bytes(h, w, scales, RESCALE_CHANNELS, None)
            if need > budget:
                raise _refusal(k, _rescale_refusal(h, w, scales, need, budget))

    def _check_center_crop(self, size: tuple[int, int], q: int) -> None:
        """MemoryBudgetError, before anything is allocated, when the central native-size crop
        of an image of `size` (H, W) at scale q (localize.center_crop_box) would pass the
        budget: what pp.resize_crop holds at its peak (pp.resize_crop_bytes: its width pass
        [3, H, W_q] and the crop's height pass; not the whole rescale, which it never makes, so
        a panorama or a huge scale that fits is not refused) must fit it; then the
        localisation net's forward of the crop. Worded as the planner's refusals, "image 0
        (40x2000, HxW) at scale Q is rescaled to HxW to cut its central crop: why", so
        `preprocess.naming_file` names the file."""
        h, w = size
        rh, rw = pp.rescaled_size(h, w, q)
        n = self.spec.image_size
        need = pp.resize_crop_bytes(h, w, q, n, n, RESCALE_CHANNELS)
        budget = self.memory_budget
        if need > budget:
            raise _refusal(0, (
                f"({h}x{w}, HxW) at scale {q} is rescaled to {rh}x{rw} to cut its central crop: "
                f"{_fmt_bytes(need)} of float32 resample buffers, over the memory budget of "
                f"{_fmt_bytes(budget)}; use smaller scales, or raise the budget to at least "
                f"{need} bytes with Engine(..., memory_budget=BYTES) or VGGFAST_MEMORY_BUDGET"))
        try:
            check_memory(self.loc_weights.spec, self.dtype, budget, 1, n, n,
                         "raise the limit with Engine(..., memory_budget=BYTES)")
        except MemoryBudgetError as exc:
            raise _refusal(0, f"({h}x{w}, HxW) at scale {q}: its central crop: {exc}") from None

    # -- views ----------------------------------------------------------------------------------

    def _views(self, x: torch.Tensor, q: int, flip: bool) -> torch.Tensor:
        """Rescaled (and flipped) normalised views of one image at scale q: [V, 3, H, W]. Its
        callers have checked them against the memory budget first, with `_check_views` (which
        names the image), so they are not checked again here."""
        v = pp.resize_short(x, q)
        v = torch.stack([v, v.flip(-1)]) if flip else v[None]
        return pp.normalize(v, self.preprocess)

    def _run(self, batch: torch.Tensor, taps=("fc8",)) -> dict[str, torch.Tensor]:
        return self._backend.run(batch, taps)

    # -- public API -----------------------------------------------------------------------------

    @raising_out_of_memory
    def classify(self, img: Any, scales: Any = (256, 384, 512), flip: bool = True,
                 method: str = "dense", top_k: int = 5,
                 average: str = "probs") -> Result | list[Result]:
        """Classify one image (-> Result) or a list of images (-> list of Result; sizes may differ).

        scales: smallest-side sizes Q (each >= the native size, 224 for the paper's nets).
        flip: also evaluate the horizontal flip. method: "dense" | "multicrop" (5x5 grid of
        native-size crops per scale, and their flips) | "dense+multicrop" (mean of both).
        average: "probs" (softmax per view, then mean; the paper's) | "scores" (mean of raw scores,
        then softmax). See vggfast/protocols.py.
        A list longer than CHUNK_IMAGES is decoded and run that many images at a time; every
        image's size is read (a file's header) and planned first, so an image too small, over
        the memory budget or unreadable is refused before any chunk runs.
        """
        self._require("fc8")
        from .protocols import check_average
        top_k = _check_top_k(top_k)
        check_average(average)
        flip = check_flag("flip", flip)
        scales, method, items, many = self._request(img, scales, method)
        self._check_chunks(items, lambda sizes: self._executor.plan_sizes(sizes, scales, flip,
                                                                          method))
        results = []
        for start, images in decoded_chunks(items):
            with naming_images(items, start):
                results += self._classify_decoded(images, scales, flip, method, top_k, average)
        return results if many else results[0]

    def _classify_decoded(self, images: list[torch.Tensor], scales: tuple[int, ...], flip: bool,
                          method: str, top_k: int, average: str,
                          shared=None) -> list[Result]:
        """`classify` of load_image's tensors, the arguments already checked, planned and run
        as one request. shared: an executor.SharedRescales that keeps the rescaled images for
        other requests on the same tensors (evaluate's methods); the planner's errors name
        "image K" of `images`."""
        from .protocols import result_from_views
        plan = self._executor.plan(images, scales, flip, method)
        scores = self._executor.run(plan, images, shared=shared)
        return [result_from_views(self, plan, i, scores, method, average, top_k)
                for i in range(len(images))]

    def plan(self, imgs: Any, scales: Any = (256, 384, 512), flip: bool = True,
             method: str = "dense"):
        """The scheduler's plan for a classify request: views, batches, arena, peak memory.

        Returns a `vggfast.scheduler.Plan`; `print(plan)` shows its summary. A list longer than
        CHUNK_IMAGES (64) is classified in chunks of that many, each planned on its own; this is
        the plan of the whole list, as one request. An empty list has an empty plan (no views,
        batches or memory), as classify([]) gives [].
        An image is sized without decoding where that gives the decoded size
        (preprocess.image_size with exact=True): a file's header (a path, bytes, a seekable
        file object: JPEG, WebP, PNG, TIFF, ..., EXIF orientation applied), an array's or
        tensor's shape, a PIL image's size (made in memory, or a JPEG, ...); the others (an
        animated PNG, a PNG PIL image the caller opened, a pipe) are decoded. What only
        decoding finds (corrupt pixels, a float tensor's values) is then left to classify, as
        for its long lists.
        """
        flip = check_flag("flip", flip)
        scales, method, items, _ = self._request(imgs, scales, method)
        if not items:
            return self._executor.scheduler.empty_plan(scales, flip, method)
        # Only the sizes: each decoded image is dropped at once (holding every decoded photo of
        # a long list at once is what classify's chunks avoid).
        sizes = [item_size_or_decode(items, k) for k in range(len(items))]
        with naming_images(items, 0):     # a refusal names the file, as classify's does
            return self._executor.plan_sizes(sizes, scales, flip, method)

    @raising_out_of_memory
    def score_map(self, img: Any, scale: int = 384) -> torch.Tensor:
        """Raw class scores of the dense net on `img` rescaled to `scale`: [classes, h, w] fp32."""
        self._require("fc8")
        if isinstance(img, (list, tuple)):
            raise ArgumentError("score_map takes one image, not a list; call it once per image")
        scales, _, items, _ = self._request(img, (scale,), "dense")
        images = [pp.load_image(items[0])]
        with naming_images(items, 0):
            plan = self._executor.plan(images, scales, False, "dense")
        return check_finite(self._executor.run(plan, images, reduce=lambda t: t)[0], self,
                            "class scores")

    @raising_out_of_memory
    def localize(self, img: Any, scales: Any = (256, 384), top_k: int = 5, flip: bool = False,
                 merge_iou: float = 0.5) -> list[tuple[int, str, float, tuple[float, ...]]]:
        """Boxes of the top-k classes (Appendix A): [(class_index, class_name, score, (x0, y0,
        x1, y1)), ...] best first, in image pixels; score is the class's posterior. Needs
        `loc_weights`. Dense application and OverFeat's greedy merging: vggfast/localize.py."""
        from .localize import localize
        return localize(self, img, scales, top_k, flip, merge_iou)

    @raising_out_of_memory
    def features(self, imgs: Any, layer: str = "fc7", scales: Any = (256, 384, 512),
                 flip: bool = True, pool: str = "avg", normalize: bool = True,
                 aggregate: str = "mean") -> torch.Tensor:
        """Appendix B descriptors of one image or a list -> [N, D] float32 on cpu.

        `layer` applied densely at each scale, pooled over space ("avg" | "max"), averaged with
        the flip, aggregated over scales ("mean": D = C, "stack": D = C * len(scales)), then
        L2-normalised. See vggfast/features.py. A long list is checked before any of it runs,
        as in `classify`.
        """
        from .features import features
        return features(self, imgs, layer, scales, flip, pool, normalize, aggregate)

    @raising_out_of_memory
    def feature_maps(self, img: Any, layer: str = "conv5_3", scale: int = 384,
                     flip: bool = False) -> torch.Tensor:
        """Un-pooled activation of `layer` on `img` at `scale`: [C, h, w] float32 on cpu."""
        from .features import feature_maps
        return feature_maps(self, img, layer, scale, flip)

    @raising_out_of_memory
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Standard fixed-size forward: x [N, 3, H, W] normalised float -> [N, classes] fp32.

        Equals torchvision's forward: features, adaptive average pool to (image_size/32)^2, then
        the classifier (fc layers applied as convs on the pooled map).
        """
        check_nchw(x, "logits")
        h, w = x.shape[-2:]
        if min(h, w) < 32:
            raise ArgumentError(f"input {h}x{w} (HxW) is too small; the five pools need at least "
                                "32x32")
        self._require("fc8")
        if x.shape[0] == 0:                 # as a module would: no kernel takes an empty launch
            return torch.zeros(0, self.spec.num_classes)
        self._check_memory(x.shape[0], h, w)
        if not all_finite(x):               # else NaN logits, silently
            raise ArgumentError("logits input contains NaN or infinite values")
        s = self.spec
        if h == w == s.image_size:
            out = self._run(x)["fc8"].flatten(1)
        else:
            pooled = F.adaptive_avg_pool2d(self._run(x, ("pool5",))["pool5"], (s.grid, s.grid))
            out = self._backend.fc(pooled)
        return check_finite(out, self, "logits").cpu()

    def info(self) -> dict[str, Any]:
        """What the engine runs: configuration, sizes, parameters, classes, conventions."""
        s, w = self.spec, self.weights
        has_fc8 = "fc8" not in w.missing
        present = sum(l.params for l in s.layers if l.name not in w.missing)
        return {
            **w.describe(), "torchvision_name": s.torchvision_name,
            "num_classes": s.num_classes if has_fc8 else None, "parameters": present,
            "usable_up_to": w.usable_up_to(), "preprocess": self.preprocess,
            "preprocess_from": self.preprocess_from,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "backend": self.backend_name, "cuda_graphs": self.cuda_graphs,
            "class_names": "none (no classifier)" if not has_fc8 else "from weights"
            if w.class_names else ("imagenet" if s.num_classes == 1000 else "indices"),
        }

"""Weight loading: bytes in, canonical tensors out. Pure: no globals touched, nothing downloaded.

Accepted sources: a path (.pt/.pth/.bin through `torch.load(weights_only=True)`, .safetensors, a
directory written by `vggfast train --out DIR`, or a Hugging Face model folder with
model.safetensors / pytorch_model.bin or a shard index, `*.index.json`, and its shards), a
torchvision model name found in the torch hub cache ("vgg16" -> vgg16-397923af.pth), a timm name
found in the Hugging Face cache by huggingface_hub ("timm/vgg16.tv_in1k", "hf-hub:timm/...",
"vgg16.tv_in1k"), a state dict or checkpoint dict, or a `torch.nn.Module`. The file's first
bytes, not its suffix, tell safetensors from torch.save.
Accepted layouts: torchvision (`features.N.*`, `classifier.N.*`, with or without BatchNorm),
timm (`pre_logits.fc1/fc2`, `head.fc`; without `head.fc` when built with num_classes=0;
features_only=True's flattened `features_N.*`),
vggfast's canonical names (`conv1_1.weight`, `fc6.weight`), `vgg.features` alone (`0.weight`,
...) or cut short (`features[:23]`: the layers present load, the rest are missing) or split
into perceptual-loss slices (`slice1.0.weight`, `net.slice4.21.weight`), mmpretrain's
ConvModule layout (`backbone.features.3.conv.weight`, `.bn.*`; meta CLASSES as class names),
Cadene's pretrainedmodels (`_features.N.*`, `linear0`, `linear1`, `last_linear`), Caffe's layer
names as torchvision's module names (dissect's vgg16_places365: `features.conv1_1.weight`,
`classifier.fc6` ... `classifier.fc8a`; fc8a, Places365's name for fc8, also bare), prlz77's
VGG-Face names (`conv_1_1.weight`), with
`module.` / `_orig_mod.` wrappers at any depth (pytorch/examples' `features.module.0.weight`),
a VGG held under one attribute prefix of a larger module (Lightning's `model.features.0.weight`;
other tensors and an EMA copy beside it are ignored, two VGGs refused), and checkpoint wrappers
(`state_dict`, `model`, `model_state_dict`, `net`, `weights`, DeepSpeed's `module`; an EMA
copy, `state_dict_ema` / `model_ema`, when there is nothing else). Training checkpoints may carry
argparse.Namespace arguments (timm's do) and numpy numbers; on torch >= 2.6, classes of
metadata modules (omegaconf's DictConfig in a Lightning + Hydra checkpoint's hyper_parameters,
pathlib paths, numpy arrays) load as inert stand-ins, still through torch's weights_only
unpickler. Any other class is refused, never unpickled. torch.save's files written with
pickle_protocol 0 or 1 (zip or legacy format; weights_only reads neither) or 4 and later are
named as such, with how to save them again.
Other tools' files (Keras .h5/.keras, TensorFlow checkpoints and SavedModel folders, ONNX, Caffe,
MatConvNet, NumPy) are refused by name, and so are networks built from VGG's parts that are not
the paper's VGG: pytorch-AdaIN's vgg_normalised.pth (a leading 1x1 conv, reflection padding),
SSD's reduced-fc VGG16 (vgg16_reducedfc.pth, ssd.pytorch and mmdetection detectors: a dilated
conv6, conv7), Faster R-CNN's RCNN_base / RCNN_top, LPIPS's lin layers alone, kuangliu's CIFAR
VGG (one Linear head) and quantized weights. Two files known by name take their convention:
vgg_face_dag.pth ("vggface") and Gatys' vgg_conv.pth ("caffe"). Weights stored reparametrised (pruning's `weight_orig`
/ `weight_mask`, weight norm's `weight_g`, spectral norm, `parametrizations.weight.*`) are
refused, naming the torch call that makes them plain.

Canonical form (what every backend reads): float32 tensors named by layer, BatchNorm folded into
the convs (eps 1e-5, torchvision's), `{conv}.weight` [Cout, Cin, k, k], `fc6.weight` [F, C, g, g]
(torchvision flattens C, H, W, so the Linear weight views directly), `fc7.weight` [F, F, 1, 1],
`fc8.weight` [classes, F, 1, 1], `{layer}.bias` [Cout].
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import fnmatch
import io
import json
import math
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .configs import (ALIASES, BLOCK_CHANNELS, TABLE1, NetSpec, canonical_config,
                      make_spec, scaled)
from .errors import ArgumentError, WeightsError
from .preprocess import _WARNINGS_LOCK

BN_EPS = 1e-5
# Wrappers' attribute names, removed at any depth: DataParallel / DDP and torch.compile wrap a
# model ("module.features.0.weight") or one part of it (pytorch/examples' ImageNet script
# wraps vgg.features alone: "features.module.0.weight").
_WRAPPER_NAMES = ("module", "_orig_mod")
# "module": DeepSpeed's mp_rank_00_model_states.pt (beside buffer_names, ds_config, ...)
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "weights", "module")
# Used only when none of _WRAPPERS is there (timm ModelEmaV2/V3, DeiT/ConvNeXt-style "model_ema").
_EMA_WRAPPERS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")


def _numpy_scalar_globals() -> list:
    """What a pickled numpy number needs (a checkpoint's `best_acc1 = np.float64(...)`, an
    `epoch` from np.int64): numpy's scalar-from-bytes constructor, np.dtype and the numeric and
    text dtype classes. They build values from raw bytes and call nothing else; numpy arrays
    (`_reconstruct`) and object dtypes stay refused."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    out: list = [core.multiarray.scalar, np.dtype]
    kinds = getattr(np, "dtypes", None)          # numpy >= 1.25: one class per dtype
    if kinds is not None:
        out += [getattr(kinds, n) for n in dir(kinds) if n.endswith("DType")
                and n not in ("ObjectDType", "VoidDType") and isinstance(getattr(kinds, n), type)]
    return out


# Harmless classes common in training checkpoints (timm train.py saves its argparse args;
# training scripts save numpy numbers beside the weights).
_SAFE_GLOBALS = (argparse.Namespace, *_numpy_scalar_globals())
_TIMM = {"pre_logits.fc1.": "classifier.0.", "pre_logits.fc2.": "classifier.3.",
         "head.fc.": "classifier.6."}
_CANONICAL = re.compile(r"^(conv\d_\d|fc[678])\.(weight|bias)$")
# Weights whose inputs are not torchvision's mean/std: name in the hub cache -> convention.
_HUB_EXTRA = {"vgg16_features": ("vgg16_features-*.pth", "D", "caffe-rgb")}


@dataclass
class Weights:
    """Canonical weights and what was learned about them.

    spec: the resolved network. state_dict: canonical float32 tensors (see module docstring).
    missing: layers whose tensors the source does not have (a features-only checkpoint has no fc).
    nonfinite: layers with NaN/Inf values (usable for nothing past them).
    class_names: from checkpoint metadata, else None. preprocess: convention from metadata/name.
    """

    spec: NetSpec
    state_dict: dict[str, torch.Tensor]
    source: str = "<dict>"
    missing: tuple[str, ...] = ()
    nonfinite: tuple[str, ...] = ()
    class_names: list[str] | None = None
    preprocess: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """What `vggfast info` reports of any weights (Engine.info adds what the engine runs)."""
        s = self.spec
        return {"config": s.config, "batch_norm_folded": s.batch_norm, "width": s.width,
                "image_size": s.image_size, "fc_width": s.fc_width, "preprocess": self.preprocess,
                "missing_layers": list(self.missing), "nonfinite_layers": list(self.nonfinite),
                "source": self.source}

    def unusable(self, upto: str | None = None) -> list[str]:
        """Weight layers needed for tap `upto` (default: all) that are missing or non-finite."""
        names = [l.name for l in self.spec.layers]
        end = names.index(self.spec.tap_layer(upto).name) + 1 if upto else len(names)
        bad = set(self.missing) | set(self.nonfinite)
        return [n for n in names[:end] if n in bad]

    def usable_up_to(self) -> str | None:
        """The last tap these weights can compute (every weight layer up to it present and
        finite); None when not even conv1_1 can be."""
        bad, last = set(self.missing) | set(self.nonfinite), None
        for name, layer in self.spec.taps():
            if layer.name in bad:   # taps come in layer order: nothing after it either
                break
            last = name
        return last


def load_weights(src: Any, config: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Public entry: `(config_name, canonical state_dict)`; see `load` for the sources accepted."""
    w = load(src, config=config)
    return w.spec.config, w.state_dict


def load(src: Any, config: str | None = None) -> Weights:
    """Read `src` and return canonical `Weights`; raises WeightsError saying what is wrong."""
    if isinstance(src, Weights):
        return src
    meta: dict[str, Any] = {}
    source = "<dict>"
    preprocess = None
    if isinstance(src, torch.nn.Module):
        raw: Any = src.state_dict()
        source = type(src).__name__
    elif isinstance(src, Mapping):
        raw = src
    elif isinstance(src, (str, os.PathLike)):
        path, preprocess, hub_config = _resolve_path(src)
        if config is None:
            config = hub_config
        raw, meta = _read_file(path)
        source = str(path)
    else:
        raise WeightsError(f"weights must be a path, a torchvision name, a state dict or a module, "
                           f"not {type(src).__name__}")
    sd, ckpt_meta = _unwrap(raw)
    meta = {**ckpt_meta, **meta}
    # timm's VGG built with num_classes=0 has pre_logits (fc6, fc7) and no head.fc (fc8)
    headless = any(re.search(r"(^|\.)pre_logits\.fc2\.weight$", k) for k in sd) and \
        not any(re.search(r"(^|\.)head\.fc\.weight$", k) for k in sd)
    pool = meta.get("tool_global_pool")
    # a headless model (num_classes=0) has no fc8 for the pooling to come before: its features
    # are pooled as features() is asked to
    if isinstance(pool, str) and not headless and _pool_error(pool):
        raise _pool_error(pool, f"{source}: its config.json names ")
    sd = _rename(sd)
    if _caffe_classifier(sd):
        if _imagenet_fc6(sd):
            preprocess = preprocess or "caffe"
        sd = {_CAFFE_FC.get(k, k): v for k, v in sd.items()}
    if config is None and isinstance(meta.get("config"), str):
        try:
            canonical_config(meta["config"])
            config = meta["config"]
        except ArgumentError:
            pass  # another tool's "config" (mmcv stores its whole config file there)
    spec, params, missing, nonfinite = _canonicalise(sd, config, meta, headless)
    names = meta.get("class_names")
    tool = meta.get("tool_class_names")   # another tool's list: used when it fits, else ignored
    if names is None and tool is not None and len(tool) == spec.num_classes:
        names = tool
    if names is not None:
        if not (isinstance(names, list) and len(names) == spec.num_classes
                and all(isinstance(n, str) for n in names)):
            raise WeightsError(f"{source}: metadata 'class_names' must list {spec.num_classes} "
                               "strings, one per class")
    pre = meta.get("preprocess", preprocess)
    if pre is None and isinstance(src, (str, os.PathLike)):
        pre = _file_convention(Path(source), spec, torchvision_names=all(
            k.startswith(("features.", "classifier.")) for k in sd))
    return Weights(spec, params, source, missing, nonfinite, names, pre, meta)


# ---------------------------------------------------------------------------------------------
# reading

def hub_checkpoint(name: str) -> Path | None:
    """The torchvision checkpoint for `name` ("vgg16", "vgg16_bn", ...) in the torch hub cache."""
    pattern = f"{name}-*.pth" if name in ALIASES else _HUB_EXTRA[name][0]
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    hits = sorted(directory.glob(pattern)) if directory.is_dir() else []
    return hits[0] if hits else None


# A Hugging Face model folder's weights, in the order timm tries them; then the indexes of
# sharded weights (save_pretrained with a small max_shard_size: model-00001-of-00002.safetensors
# ... beside the index).
_HF_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
             "pytorch_model.bin.index.json")
_FILE_SUFFIXES = {".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar", ".pkl", ".json",
                  ".onnx", ".h5", ".keras", ".mat", ".npy", ".npz", ".caffemodel", ".pb",
                  ".tflite"}


def _hf_repo(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `text` names a Hugging Face Hub repo the way timm does:
    "hf-hub:timm/vgg16.tv_in1k" (its own spelling, any repo), "timm/vgg16.tv_in1k", or bare
    "vgg16.tv_in1k" (torchvision's names have no dot); "@rev" picks a revision, as in timm."""
    if text.startswith("hf-hub:"):
        text = text[len("hf-hub:"):]
    elif text.startswith("timm/"):
        pass
    elif re.fullmatch(r"vgg\d+(_bn)?\.[a-z]\w*", text.lower()) and \
            Path(text).suffix.lower() not in _FILE_SUFFIXES:
        text = "timm/" + text.lower()
    else:
        return None
    repo, _, revision = text.partition("@")
    return repo, revision or None


def _hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment now (huggingface_hub reads it
    once, at import)."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or \
        os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(hub)))


def hf_checkpoint(repo: str, revision: str | None = None) -> Path:
    """The weights file of Hugging Face Hub repo `repo` ("timm/vgg16.tv_in1k") in the local
    Hugging Face cache, found with huggingface_hub and no network access."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise WeightsError(f"reading {repo!r} from the Hugging Face cache needs huggingface_hub "
                           "(pip install huggingface_hub); or pass the weights file's path"
                           ) from None
    cache = _hf_cache_dir()
    for filename in _HF_FILES:
        try:
            hit = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        except ValueError as exc:    # huggingface_hub's HFValidationError: not a repo id
            raise WeightsError(f"{repo!r} is not a Hugging Face Hub repo id ({_first_line(exc)})")
        if isinstance(hit, str) and os.path.isfile(hit):   # else None or _CACHED_NO_EXIST
            return Path(hit)
    at = f" at revision {revision!r}" if revision else ""
    if repo.startswith("timm/"):
        model = f"hf-hub:{repo}@{revision}" if revision else repo[len("timm/"):]
        fetch = f"python -c \"import timm; timm.create_model('{model}', pretrained=True)\""
    else:
        fetch = f"python -c \"import huggingface_hub; huggingface_hub.snapshot_download('{repo}')\""
    tag = " (timm's repo names carry the weights' tag: 'timm/vgg16.tv_in1k')" if \
        repo.startswith("timm/") and "." not in repo else ""
    raise WeightsError(f"{repo!r}{at} is not in the Hugging Face cache{tag} ({cache}; looked for "
                       f"{' and '.join(_HF_FILES[:2])}, sharded or not); vggfast never downloads. "
                       f"Fetch it once with {fetch} or pass a path")


# Files known by their name and layer names whose input convention nothing in their tensors
# shows; used unless the file's metadata says. Albanie's conversion of MatConvNet's VGG-Face,
# vgg_face_dag.pth (net D, 2622 identities, named conv1_1 ...; its class's meta: RGB 0-255 minus
# VGG-Face's own mean pixel); Gatys' vgg_conv.pth (PytorchNeuralStyleTransfer: net E's convs
# from Caffe named conv1_1 ..., fed BGR 0-255 minus the ImageNet mean pixel); and the Faster
# R-CNN codes' vgg16_caffe.pth (jwyang/faster-rcnn.pytorch, ruotianluo/pytorch-faster-rcnn,
# chenyuntc/simple-faster-rcnn-pytorch: jcjohnson's Caffe VGG16 with its classifier moved to
# torchvision's indices, so under torchvision's names; Caffe's BGR 0-255 input). All three ran
# on torchvision's input unsaid. name -> (convention, configuration, classes or None for any,
# whether the file has torchvision's names: features.N / classifier.N)
_FILE_CONVENTIONS = {"vgg_face_dag": ("vggface", "D", 2622, False),
                     "vgg_conv": ("caffe", "E", None, False),
                     "vgg16_caffe": ("caffe", "D", None, True)}


def _file_convention(path: Path, spec: NetSpec, torchvision_names: bool) -> str | None:
    hit = _FILE_CONVENTIONS.get(path.name.split(".")[0].lower())
    if hit is None or hit[3] != torchvision_names or hit[1] != spec.config or spec.batch_norm:
        return None
    return hit[0] if hit[2] in (None, spec.num_classes) else None


def _resolve_path(src: str | os.PathLike) -> tuple[Path, str | None, str | None]:
    if not os.fspath(src).strip():  # Path("") is the current folder
        raise WeightsError("the weights path is empty; pass a file, a folder or a torchvision name")
    path = Path(os.path.expanduser(os.fspath(src)))
    if path.is_dir():
        for name in _HF_FILES:  # vggfast train --out; a Hugging Face model folder
            if (path / name).is_file():
                return path / name, None, None
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            raise _foreign_refusal(path, "a TensorFlow SavedModel folder")
        # timm's and Lightning's output folders hold several checkpoints: name them
        files = sorted(f.name for f in path.iterdir() if f.is_file() and f.suffix.lower() in
                       (".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".tar"))
        held = f" (it holds {', '.join(files[:4])}{' ...' * (len(files) > 4)})" if files else ""
        raise WeightsError(f"{path} is a folder without model.safetensors, pytorch_model.bin or "
                           "a shard index (expected the --out folder of `vggfast train` or a "
                           f"Hugging Face model folder); pass the weights file itself{held}")
    if path.is_file():
        return path, None, None
    url = os.fspath(src).strip()
    if re.match(r"(?i)(https?|ftp|s3|gs)://", url):   # pasted from a model zoo's table
        raise _url_refusal(url)
    name = url.lower()
    if name in ALIASES or name in _HUB_EXTRA:
        hit = hub_checkpoint(name)
        if hit is None:
            where = Path(torch.hub.get_dir()) / "checkpoints"
            raise WeightsError(
                f"torchvision weights {name!r} are not in the torch hub cache ({where}); vggfast "
                f"never downloads. Fetch them once with torchvision (e.g. "
                f"torchvision.models.{name.split('_features')[0]}(weights='DEFAULT')) or pass a path")
        extra = _HUB_EXTRA.get(name)
        return hit, (extra[2] if extra else None), (extra[1] if extra else None)
    repo = _hf_repo(os.fspath(src).strip())
    if repo is not None:
        return hf_checkpoint(*repo), None, None
    if re.fullmatch(r"vgg\w*", name) and not path.suffix:
        names = ", ".join(sorted({n for n in ALIASES if n.startswith("vgg")} | set(_HUB_EXTRA)))
        raise WeightsError(f"weights file not found: {path}; torchvision names are {names}")
    raise WeightsError(f"weights file not found: {path}")


def _url_refusal(url: str) -> WeightsError:
    """A URL given as weights ("weights file not found: https:/download..." said Path, with
    one slash gone): vggfast never downloads. A torchvision checkpoint's URL is fetched into the
    torch hub cache, where it is then found by name; any other file to a path to pass."""
    file = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    for name in (*ALIASES, *_HUB_EXTRA):
        if fnmatch.fnmatchcase(file, f"{name}-*.pth" if name in ALIASES else _HUB_EXTRA[name][0]):
            return WeightsError(
                f"weights {url} is a URL; vggfast never downloads: fetch it once into the torch "
                f"hub cache with python -c \"import torch; torch.hub.load_state_dict_from_url("
                f"'{url}')\", then pass {name!r}")
    return WeightsError(f"weights {url} is a URL; vggfast never downloads: fetch it once with "
                        f"python -c \"import torch; torch.hub.download_url_to_file('{url}', "
                        f"'{file}')\", then pass the path {file}")


def _read_file(path: Path) -> tuple[Any, dict[str, Any]]:
    meta: dict[str, Any] = {}
    sidecar = path.with_suffix(".json")
    if path.name.endswith(".index.json"):
        return _read_shards(path)
    try:
        if path.stat().st_size == 0:
            raise WeightsError(f"{path}: the file is empty (0 bytes); {_DAMAGED}")
        _refuse_web_page(path)
        if _is_safetensors(path):
            from safetensors import SafetensorError, safe_open
            from safetensors.torch import load_file
            try:
                with safe_open(str(path), framework="pt") as f:
                    header = f.metadata() or {}
                raw = load_file(str(path))
            except (SafetensorError, ValueError) as exc:
                raise WeightsError(f"{path}: not a readable safetensors file "
                                   f"({_first_sentence(exc)}); {_DAMAGED}")
            if "vggfast" in header:
                meta.update(_json_object(json.loads(header["vggfast"]), f"{path} metadata"))
        else:
            if _is_torchscript(path):   # torch 2.4's torch.load hands it to torch.jit.load
                raise _torchscript_refusal(path)
            try:
                raw = _torch_load(path)
            except pickle.UnpicklingError as exc:
                _refuse_early_protocol(path)
                if not _looks_like_checkpoint(path):
                    _refuse_foreign(path)
                    raise WeightsError(f"{path}: not a PyTorch checkpoint (neither a zip archive "
                                       "nor a pickle)")
                reason = _unpickle_reason(exc)
                if _damaged_pickle(path, reason):
                    raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({reason}); "
                                       f"{_DAMAGED}")
                m = re.match(r"Unsupported operand (\d+)", reason)
                if m:   # a valid opcode: torch.save(..., pickle_protocol=4) frames its stream
                    op = _PICKLE_OPCODES[int(m.group(1))]
                    raise WeightsError(
                        f"{path}: refused to unpickle it: it was pickled with protocol {op.proto} "
                        f"or later (opcode {op.name}), which torch's weights_only loader does not "
                        "read; save a plain state_dict with torch.save's default protocol or a "
                        "safetensors file")
                raw = _load_with_stand_ins(path)
                if raw is None:
                    raise WeightsError(
                        f"{path}: refused to unpickle objects other than tensors "
                        f"(weights_only=True); save a plain state_dict or a safetensors file "
                        f"({reason})")
            except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, UnicodeDecodeError,
                    AttributeError, TypeError, KeyError, IndexError) as exc:
                _refuse_early_protocol(path)
                _refuse_foreign(path)
                if not _looks_like_checkpoint(path):     # a text file, an image, ...
                    raise WeightsError(f"{path}: not a PyTorch checkpoint (neither a zip archive "
                                       "nor a pickle)") from None
                if _is_torchscript(path):
                    raise _torchscript_refusal(path) from None
                raise WeightsError(f"{path}: not a readable PyTorch checkpoint "
                                   f"({_first_sentence(exc)}); {_DAMAGED}")
        if sidecar.is_file() and not meta:
            side = json.loads(sidecar.read_text())
            # a JSON file that merely shares the stem (a class list, a training log) is not ours
            if isinstance(side, dict) and set(side) & _META_KEYS:
                meta.update(side)
        if path.name in _HF_FILES:
            meta.update(_hf_label_names(path.parent / "config.json"))
    except UnicodeDecodeError as exc:
        raise WeightsError(f"{sidecar}: metadata is not UTF-8 text ({exc.reason})")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})")
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: metadata is not valid JSON ({exc})")
    return raw, meta


def _read_shards(index: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Sharded weights (Hugging Face's `*.index.json`: {"weight_map": {tensor: shard file}}): the
    shards beside the index, read as one state dict."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise WeightsError(f"{index}: not a readable shard index ({_first_line(exc)})")
    if not (isinstance(weight_map, dict) and weight_map and all(
            isinstance(f, str) and f == Path(f).name and not f.endswith(".index.json")
            for f in weight_map.values())):
        raise WeightsError(f"{index}: a shard index needs a 'weight_map' of tensor names to "
                           "file names in its folder")
    raw: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (index.parent / shard).is_file():
            raise WeightsError(f"{index}: shard {shard} is not beside it; fetch every shard")
        part, _ = _read_file(index.parent / shard)
        if not isinstance(part, Mapping):
            raise WeightsError(f"{index}: shard {shard} is not a state dict")
        raw.update(part)
    lost = [k for k in weight_map if k not in raw]
    if lost:
        raise WeightsError(f"{index}: its shards lack {len(lost)} of the tensors it lists "
                           f"({', '.join(lost[:3])}); fetch the shards again")
    return raw, _hf_label_names(index.parent / "config.json")


_META_KEYS = {"config", "batch_norm", "width", "image_size", "num_classes", "class_names",
              "preprocess", "task"}


def _hf_label_names(config: Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json's class names (timm writes `label_names`, a list or a
    {"0": name, ...} map, when the model was pushed with them) as another tool's list, and what
    else of timm's config vggfast must honour (pretrained_cfg's mean / std, the head's
    global_pool: `load` refuses a pooling `_pool_error` names); {} when there are none or the
    file is not readable: it is another tool's file."""
    try:
        cfg = json.loads(config.read_text())
        names = cfg.get("label_names")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    out: dict[str, Any] = {}
    # timm's pretrained_cfg names the input normalisation the model was trained with; one that
    # is not ImageNet's (a fine-tune with mean = std = 0.5) matches no vggfast convention, and
    # the Engine refuses it rather than normalise with ImageNet's values unsaid
    pcfg = cfg.get("pretrained_cfg")
    if isinstance(pcfg, dict):
        mean, std = pcfg.get("mean"), pcfg.get("std")
        if all(isinstance(v, list) and len(v) == 3
               and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
               for v in (mean, std)):
            out["tool_mean_std"] = [[float(x) for x in mean], [float(x) for x in std]]
    # timm's head pooling: save_for_hf writes the factory's arguments under model_args (what
    # builds the model) and, from some versions, the model's global_pool at the top level
    args = cfg.get("model_args")
    pools = [p for p in ((args.get("global_pool") if isinstance(args, dict) else None),
                         cfg.get("global_pool")) if isinstance(p, str)]
    if pools:
        out["tool_global_pool"] = next((p for p in pools if _pool_error(p)), pools[0])
    if isinstance(names, dict) and set(names) == {str(i) for i in range(len(names))}:
        names = [names[str(i)] for i in range(len(names))]
    if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
        out["tool_class_names"] = names
    return out


def _pool_error(pool: str, why: str = "") -> WeightsError | None:
    """The one rule for timm's head pooling (global_pool), None where vggfast reproduces it.

    timm's ClassifierHead pools the pre_logits map (fc7's output) before head.fc (fc8); vggfast's
    dense evaluation averages fc8's score map instead. fc8 is linear, so that equals a mean taken
    before it, and nothing else: timm's SelectAdaptivePool2d builds a mean for every name that
    does not end in "max" ("avg", "fast", "fastavg"); "max", "avgmax" (their mean), "catavgmax"
    (both, concatenated: fc8 reads twice fc7's width) and their "fast" forms are refused.
    why: what shows the pooling, to start the message."""
    if not pool.endswith("max"):
        return None
    return WeightsError(f"{why}timm's global_pool={pool!r}, a pooling of fc7's map before fc8 "
                        "that vggfast cannot reproduce: its dense evaluation averages fc8's "
                        "score map, which equals global_pool='avg' only")


def _json_object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WeightsError(f"{what} must be a JSON object, found {type(value).__name__}")
    return value


def _refuse_web_page(path: Path) -> None:
    """A WeightsError for an HTML page saved under a weights name: wget of a Hugging Face
    ".../blob/main/model.safetensors" link (the page that shows the file, not /resolve/), a
    login or error page. It read as a damaged safetensors file ("header too large") or as
    "neither a zip archive nor a pickle"."""
    with open(path, "rb") as f:
        head = f.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")):
        raise WeightsError(f"{path}: an HTML page, not weights (a download that saved the web "
                           "page: on the Hugging Face hub the file's link is .../resolve/main/..., "
                           "not .../blob/main/...); fetch the file itself")


def _is_safetensors(path: Path) -> bool:
    """By content, whatever the suffix (a download saved as vgg16.pth): a safetensors file opens
    with its header's length (8 bytes) and the header's JSON; torch.save's archive with "PK", its
    legacy pickle with PROTO. The suffix decides only what neither format's opening shows.
    The header's length is checked first: it is any number, and one of 128 + 256k bytes opens
    with 0x80 (PROTO) and one of 0x4b50 + 65536k with "PK" (timm's vgg11 with 10 classes
    saved by save_file has a 1920-byte header, 0x780). Its JSON closing where that length says
    ('}', then safetensors' space padding) tells it from a pickle or zip that has '{' at byte 8."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            if head[8:9] == b"{":
                n = int.from_bytes(head[:8], "little")
                size = os.fstat(f.fileno()).st_size
                if 2 <= n <= size - 8:
                    f.seek(8 + n - min(n, 64))
                    if f.read(min(n, 64)).rstrip(b" ").endswith(b"}"):
                        return True
    except OSError:
        return path.suffix == ".safetensors"
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return False
    return head[8:9] == b"{" or path.suffix == ".safetensors"


def _looks_like_checkpoint(path: Path) -> bool:
    """A zip archive (torch.save's format) or a pickle (protocol 2+ starts with PROTO, 0x80)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK") or head[:1] == b"\x80"


# torch.save's legacy (non-zip) format opens with its magic number pickled: protocols 0 and 1
# write it as text (LONG), 2 and later as PROTO and LONG1 (0x80 first).
_LEGACY_MAGIC_TEXT = b"L119547037146038801333356L\n."


def _early_protocol(path: Path) -> tuple[int, bool] | None:
    """(protocol, legacy) of a torch.save file pickled with protocol 0 or 1 (no PROTO opcode:
    torch.save(..., pickle_protocol=0 or 1)), in the zip archive or the legacy format; None for
    any other file. Read off the opcodes (pickletools.genops), nothing unpickled: a zip's
    data.pkl, or a legacy file's first three pickles (magic number, version, system info)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC_TEXT))
            if head == _LEGACY_MAGIC_TEXT:
                f.seek(0)
                return _protocol_below_2(f, 3, True)
        if not head.startswith(b"PK"):
            return None
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"), None)
            if name is None:
                return None
            return _protocol_below_2(io.BytesIO(z.read(name)), 1, False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return None


def _protocol_below_2(stream: Any, pickles: int, legacy: bool) -> tuple[int, bool] | None:
    proto = 0
    for _ in range(pickles):
        for op, _, _ in pickletools.genops(stream):
            proto = max(proto, op.proto)
    return (proto, legacy) if proto < 2 else None


def _refuse_early_protocol(path: Path) -> None:
    """A WeightsError for a checkpoint pickled with protocol 0 or 1: which file it is and how to
    save it again (torch's weights_only loader refuses their opcodes, so it was named a damaged
    file or, in the legacy format, no pickle at all)."""
    early = _early_protocol(path)
    if early is None:
        return
    proto, legacy = early
    what = (f"{path}: a {'legacy (non-zip) ' if legacy else ''}PyTorch checkpoint pickled "
            f"with protocol {proto} (torch.save(..., pickle_protocol={proto}))")
    if proto == 0:
        # protocol 0 writes each storage's persistent id as text, its repr: torch.load cannot
        # read it back (weights_only or not), so re-saving it from the file is no way out
        raise WeightsError(f"{what}, whose tensors torch.load cannot read back (protocol 0 "
                           "writes their storage ids as text); save them again from the model "
                           "with torch.save's default protocol or as safetensors")
    raise WeightsError(f"{what}, which torch's weights_only loader does not read; where you "
                       "trust the file, save it again: torch.save(torch.load(path, "
                       "weights_only=False), 'weights.pt'), or as safetensors")


# Other tools' weight files, by their first bytes, their zip members, or else (a file that is
# neither a zip nor a pickle) by their suffix: named in the refusal.
_FOREIGN_MAGIC = {b"\x89HDF\r\n\x1a\n": "an HDF5 file (Keras .h5)",
                  b"MATLAB": "a MATLAB file (e.g. MatConvNet's imagenet-vgg-verydeep-*.mat)",
                  b"\x93NUMPY": "a NumPy .npy file (e.g. tensorflow-vgg's vgg16.npy)"}
_FOREIGN_SUFFIX = {".onnx": "an ONNX model", ".caffemodel": "a Caffe model",
                   ".h5": "an HDF5 file (Keras .h5)", ".pb": "a TensorFlow file",
                   ".tflite": "a TensorFlow Lite model",
                   ".t7": "a Lua Torch7 file (e.g. fast-neural-style's vgg16.t7)",
                   ".params": "an MXNet / Gluon .params file",
                   ".prototxt": "a Caffe network description (its weights are a .caffemodel)"}


def _refuse_foreign(path: Path) -> None:
    """A WeightsError naming the tool a weight file that torch cannot load comes from, if known."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return
    what = next((w for magic, w in _FOREIGN_MAGIC.items() if head.startswith(magic)), None)
    if what is None and head.startswith(b"PK"):
        names = _zip_names(path)
        if names and all(n.endswith(".npy") for n in names):
            what = "a NumPy .npz archive"
        elif "model.weights.h5" in names:
            what = "a Keras model"
    elif what is None and head[:1] != b"\x80":
        what = _FOREIGN_SUFFIX.get(path.suffix.lower())
        if what is None and (_is_sstable(path) or ".data-0" in path.name):
            what = "a TensorFlow checkpoint (e.g. TF-slim's vgg_16.ckpt)"
    if what is not None:
        raise _foreign_refusal(path, what)


def _foreign_refusal(path: Path, what: str) -> WeightsError:
    return WeightsError(f"{path}: {what}, which vggfast does not read; it reads PyTorch "
                        "checkpoints (torch.save of a state dict) and safetensors files with "
                        "torchvision, timm or vggfast names: convert the tensors to one first")


# TensorFlow's checkpoints (TF-slim's vgg_16.ckpt, a V2 checkpoint's .index) are LevelDB tables:
# their last 8 bytes are the table magic number, little-endian.
_SSTABLE_MAGIC = (0xdb4775248b80fb57).to_bytes(8, "little")


def _is_sstable(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() < 48:       # a table's footer alone is 48 bytes
                return False
            f.seek(-8, os.SEEK_END)
            return f.read(8) == _SSTABLE_MAGIC
    except OSError:
        return False


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (OSError, zipfile.BadZipFile):
        return []


def _torchscript_refusal(path: Path) -> WeightsError:
    return WeightsError(f"{path}: a TorchScript archive, which vggfast does not load (it holds "
                        "code); save its weights instead: torch.save(torch.jit.load(path)"
                        ".state_dict(), 'weights.pt') where you trust the file")


def _is_torchscript(path: Path) -> bool:
    """torch.jit.save's zip: a code/ folder (or constants.pkl) beside data.pkl."""
    return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in _zip_names(path))


def _unpickle_reason(exc: BaseException) -> str:
    """The specific line of torch's weights_only refusal (it opens with generic advice to load
    with weights_only=False, which would run the file's code)."""
    text = str(exc)
    m = re.search(r"(?:Unsupported global: )?GLOBAL ([\w.]+)", text)
    if m:  # torch words this two ways; both name the class or function the file wants to load
        return f"it needs GLOBAL {m.group(1)}, which is not a tensor type"
    m = re.search(r"WeightsUnpickler error: *(\S[^\n]*)", text)
    if m:  # torch 2.4 puts the reason at the end of its "Please file an issue" line
        return m.group(1).strip()[:200]
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation",
            "(1)", "(2)", "In PyTorch")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(skip):
            return line[:200]
    return type(exc).__name__


# Said of a file that is cut short or damaged (an interrupted download or save, a bad copy).
_DAMAGED = ("if it was cut short or damaged (an interrupted download or save), fetch or save it "
            "again")


# torch's weights_only unpickler's words for a stream no pickler writes (a length past the end),
# as opposed to its refusals of what a well-formed stream asks for.
# ("unexpected EOF": a legacy file cut short; torch 2.4 wraps it as a refusal, later torch raises
# it as a RuntimeError)
_BROKEN_PICKLE = re.compile(r"String is too long|negative argument|unsupported persistent id|"
                            r"persistent_load id must be|unexpected EOF")
_PICKLE_OPCODES = {op.code.encode("latin-1")[0]: op for op in pickletools.opcodes}


def _damaged_pickle(path: Path, reason: str) -> bool:
    """Whether an unpickling failure comes from damaged bytes: a byte that is no pickle opcode
    (a valid one torch does not take is a pickle of another kind), bytes no pickler writes, or a
    zip member (torch.save's archive) whose CRC does not match its data."""
    m = re.match(r"Unsupported operand (\d+)", reason)
    if (m and int(m.group(1)) not in _PICKLE_OPCODES) or _BROKEN_PICKLE.match(reason):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip() is not None
    except (OSError, EOFError, ValueError, zipfile.BadZipFile):
        return False


def _torch_load(path: Path, extra: list | None = None) -> Any:
    """torch.load(weights_only=True) of `path` on the CPU, _SAFE_GLOBALS (and `extra`) allowed."""
    # torch's pickle-protocol notes are not the user's; the lock keeps threads from
    # interleaving catch_warnings (global state) with image decoding's
    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # an open file, not the path: torch 2.14 hands a path ending in .safetensors to
        # safetensors, whatever the bytes say
        with _allow_safe_globals(extra), open(path, "rb") as f:
            try:
                return torch.load(f, map_location="cpu", weights_only=True)
            except OSError as exc:
                # torch's zip reader seeks back from the end for the archive's directory: in a
                # zip cut to under 64 KiB that seek lands before byte 0 and the file object
                # refuses it (EINVAL), which is damage, not a read the system refused
                if exc.errno != errno.EINVAL:
                    raise
                raise zipfile.BadZipFile("the zip archive ends before its central directory") \
                    from None


class _StandIn:
    """What an object of a class or function a checkpoint names beside its weights becomes
    (Hydra's omegaconf.DictConfig or a pathlib.PosixPath in a Lightning checkpoint's
    hyper_parameters, a numpy array of metrics): its arguments and state are kept as plain data;
    nothing of the named class or function is imported or run."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


# Where the classes of a training checkpoint's metadata come from (Lightning's hyper_parameters
# under Hydra: omegaconf; paths, dates, enums, numpy arrays of metrics). Only these stand in:
# any other class (a pickled model, the user's own, a payload) stays refused by name.
_METADATA_MODULES = ("omegaconf", "pathlib", "numpy", "datetime", "enum", "typing", "collections",
                     "uuid", "decimal", "fractions")


def _load_with_stand_ins(path: Path) -> Any | None:
    """A torch.save zip checkpoint whose state dict sits beside objects weights_only refuses,
    loaded with each refused global replaced by a _StandIn (still through torch's weights_only
    unpickler). None where that cannot help: a class outside _METADATA_MODULES (a pickled model,
    a payload), the tensors inside a refused object (no state dict outside them), or a torch
    without named allowlist entries (< 2.6)."""
    ser = torch.serialization
    if not hasattr(ser, "get_unsafe_globals_in_checkpoint"):
        return None
    try:
        names = ser.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - a legacy (non-zip) file, a damaged archive
        return None
    if not names or any(n.split(".")[0] not in _METADATA_MODULES for n in names):
        return None
    stand_ins = [(type(n.rsplit(".", 1)[-1], (_StandIn,), {"__module__": __name__}), n)
                 for n in names]
    try:
        raw = _torch_load(path, stand_ins)
        _unwrap(raw)
    except Exception:  # noqa: BLE001 - refused all the same: the caller says why
        return None
    return raw


@contextlib.contextmanager
def _allow_safe_globals(extra: list | None = None):
    """_SAFE_GLOBALS (and `extra`) allowed for the torch.load inside (the caller holds
    _WARNINGS_LOCK). torch >= 2.5 scopes the allowance with safe_globals; torch 2.4 has only the
    process-wide add_safe_globals, so the user's own list is put back as it was afterwards."""
    ser = torch.serialization
    allowed = list(_SAFE_GLOBALS) + list(extra or ())
    if hasattr(ser, "safe_globals"):
        with ser.safe_globals(allowed):
            yield
        return
    before = list(ser.get_safe_globals())   # a copy: torch 2.4 returns its live list
    ser.add_safe_globals(allowed)
    try:
        yield
    finally:
        ser.clear_safe_globals()
        ser.add_safe_globals(before)


def _first_sentence(exc: BaseException) -> str:
    """The first sentence of the first line: torch's and safetensors' reasons go on with advice
    (miniz's "If you are seeing this error, ...") that does not fit on one line."""
    return re.split(r"\. (?=[A-Z])", _first_line(exc))[0].rstrip(".")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _unwrap(raw: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict inside checkpoint wrappers; return it and any metadata beside it."""
    meta: dict[str, Any] = {}
    for _ in range(3):
        if not isinstance(raw, Mapping):
            raise WeightsError(f"expected a state dict (a mapping of names to tensors), found "
                               f"{type(raw).__name__}")
        if isinstance(raw.get("meta"), Mapping):
            meta.update(raw["meta"])
            tool = raw["meta"].get("CLASSES")   # mmcls 0.x; mmpretrain: dataset_meta.classes
            if tool is None and isinstance(raw["meta"].get("dataset_meta"), Mapping):
                tool = raw["meta"]["dataset_meta"].get("classes")
            if isinstance(tool, (list, tuple)) and all(isinstance(n, str) for n in tool):
                meta.setdefault("tool_class_names", list(tool))
        if isinstance(raw.get("class_names"), list):
            meta.setdefault("class_names", raw["class_names"])
        inner = next((raw[k] for k in _WRAPPERS if isinstance(raw.get(k), Mapping)), None)
        if inner is None and not any(isinstance(v, torch.Tensor) for v in raw.values()):
            inner = next((raw[k] for k in _EMA_WRAPPERS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    tensors = {str(k): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError("no tensors found: not a state dict or a known checkpoint layout "
                           f"(top-level keys: {', '.join(map(str, list(raw)[:8])) or 'none'})")
    if all(v.numel() == 0 for v in tensors.values()):   # DeepSpeed ZeRO-3's placeholders
        raise WeightsError("every tensor is empty, as in a DeepSpeed ZeRO-3 checkpoint's "
                           "partitioned model; consolidate it first with the zero_to_fp32.py "
                           "script saved beside it")
    empty = [k for k, v in tensors.items() if v.is_meta or v.layout != torch.strided]
    if empty:
        raise WeightsError(f"tensor {empty[0]!r} holds no values (a meta or sparse tensor); "
                           "save the state dict of a model whose weights are loaded")
    return tensors, meta


_VGG_KEY = re.compile(r"(?:^|\.)(features\.\d+\.weight|pre_logits\.fc1\.weight|conv1_1[._]weight)$")


# An attribute holding an EMA copy of the model: ema., ema_model., model_ema., net_ema.
_EMA_OWNER = re.compile(r"(^|[._])ema([._]|$)")


def _strip_owner(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys of a VGG held as an attribute ("model.features.0.weight" in a Lightning module) or of
    `vgg.features` alone ("0.weight") -> the VGG's own keys. Tensors outside the VGG are dropped;
    two VGGs in one checkpoint (a model and a perceptual loss) are refused by name, unless all
    but one are EMA copies (Lightning's `ema_model.`, `model_ema.`): as for checkpoint wrappers,
    an EMA copy is used only when there is nothing else."""
    if any(_VGG_KEY.match(k) for k in sd):
        return sd
    owners = sorted({k[:m.start(1)] for k in sd for m in [_VGG_KEY.search(k)] if m})
    plain = [o for o in owners if not _EMA_OWNER.search(o)]
    if len(owners) > 1 and len(plain) == 1:
        owners = plain
    if len(owners) > 1:
        raise WeightsError(f"these weights hold {len(owners)} VGGs (under "
                           f"{', '.join(repr(o) for o in owners[:4])}); pass the state dict of one, "
                           f"e.g. {{k[len(p):]: v for k, v in sd.items() if k.startswith(p)}}")
    if owners:
        p = owners[0]
        return {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    # nn.Sequential alone (vgg.features.state_dict(), a torchvision-style features stack)
    if sd and all(re.fullmatch(r"\d+\.(weight|bias|running_mean|running_var|num_batches_tracked)", k)
                  for k in sd):
        return {f"features.{k}": v for k, v in sd.items()}
    return sd


# Perceptual-loss code splits vgg.features into slices and keeps each module's index as its name
# (PyTorch's fast_neural_style example, LPIPS' `net.slice1.0.weight`): slice1.0 ... slice4.21.
_SLICE_KEY = re.compile(r"^(.*?)slice\d+\.(\d+)\.(weight|bias|running_mean|running_var|"
                        r"num_batches_tracked)$")


def _unslice(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`P.sliceN.I.x` -> `P.features.I.x` when the indices are vgg.features' own (unique across
    slices); slices numbered from 0 each cannot be placed and are refused by name."""
    hits = {k: m for k in sd for m in [_SLICE_KEY.match(k)] if m}
    if not hits or any(_VGG_KEY.search(k) for k in sd):
        return sd
    seen: dict[tuple[str, int], str] = {}
    for k, m in hits.items():
        if m.group(3) != "weight":
            continue
        key = (m.group(1), int(m.group(2)))
        if key in seen:
            raise WeightsError(f"{seen[key]!r} and {k!r} have one index: slices numbered from 0 "
                               "each do not say where their layers sit in vgg.features; save "
                               "them with the indices of vgg.features (add_module(str(i), ...))")
        seen[key] = k
    return {(f"{m.group(1)}features.{m.group(2)}.{m.group(3)}" if (m := hits.get(k)) else k): v
            for k, v in sd.items()}


# timm's features_only=True model (FeatureListNet, for backbones and perceptual losses) flattens
# vgg.features into its own modules and joins their names with "_": features_0.weight ...
# features_18.weight (vgg11; a cut short one, out_indices=(1, 2), ends at its deepest layer).
_TIMM_FLAT_KEY = re.compile(r"^(.*?)features_(\d+)\.(weight|bias|running_mean|running_var|"
                            r"num_batches_tracked)$")


def _from_timm_features(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`P.features_I.x` -> torchvision's `P.features.I.x` (the indices are vgg.features' own)."""
    if any(_VGG_KEY.search(k) for k in sd):
        return sd
    hits = {k: m for k in sd for m in [_TIMM_FLAT_KEY.match(k)] if m}
    return {(f"{m.group(1)}features.{m.group(2)}.{m.group(3)}" if (m := hits.get(k)) else k): v
            for k, v in sd.items()}


# mmpretrain / mmcv's VGG: each conv is a ConvModule (`features.I.conv.weight`, `.bn.*` with
# norm_cfg), one index per conv module, one per max-pool; the classifier is torchvision's.
_CONVMODULE_KEY = re.compile(r"^(.*?)features\.(\d+)\.(conv|bn)\.(weight|bias|running_mean|"
                             r"running_var|num_batches_tracked)$")


def _from_convmodules(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`P.features.I.conv.x` / `.bn.x` -> torchvision's `P.features.J.x`: J counts conv, [bn],
    relu for every conv module and one index for every module without parameters (a pool)."""
    hits = {k: m for k in sd for m in [_CONVMODULE_KEY.match(k)] if m}
    if not hits or any(_VGG_KEY.search(k) for k in sd):
        return sd
    owners = {m.group(1) for m in hits.values()}
    if len(owners) > 1:
        return sd   # _strip_owner names the VGGs
    convs = sorted({int(m.group(2)) for m in hits.values() if m.group(3) == "conv"})
    bn = any(m.group(3) == "bn" for m in hits.values())
    where, t = {}, 0
    for i in range(convs[-1] + 1 if convs else 0):
        if i in convs:
            where[i] = t
            t += 3 if bn else 2
        else:
            t += 1
    out = {}
    for k, v in sd.items():
        m = hits.get(k)
        if m is None:
            out[k] = v
            continue
        i = int(m.group(2))
        if i not in where:
            raise WeightsError(f"{k!r}: a normalisation layer without its conv")
        j = where[i] + (1 if m.group(3) == "bn" else 0)
        out[f"{m.group(1)}features.{j}.{m.group(4)}"] = v
    return out


def _renamed(sd: dict[str, torch.Tensor], name, why: str) -> dict[str, torch.Tensor]:
    """sd with each key k as name(k); two tensors given one name are a WeightsError (which one
    is meant is unknowable), its message "... once {why}; keep one set"."""
    out = {}
    for k, v in sd.items():
        k = name(k)
        if k in out:
            raise WeightsError(f"two tensors are named {k!r} once {why}; keep one set")
        out[k] = v
    return out


# prlz77/vgg-face.pytorch's VGG_16 (VGG-Face from the Torch7 VGG_FACE.t7, and the code built on
# it): conv_1_1 ... conv_5_3, fc6 (a Linear on pool5), fc7, fc8. Read as no VGG at all.
_UNDERSCORED_KEY = re.compile(r"^(?P<owner>(?:.*\.)?)conv_(?P<b>\d)_(?P<i>\d)\.(?P<p>weight|bias)$")


def _from_underscored_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`P.conv_B_I.x` -> vggfast's `P.convB_I.x`, for a stack that has conv_1_1."""
    hits = {k: m for k in sd for m in [_UNDERSCORED_KEY.match(k)] if m}
    if not any(m["b"] == m["i"] == "1" for m in hits.values()):
        return sd
    def name(k: str) -> str:
        m = hits.get(k)
        return k if m is None else f"{m['owner']}conv{m['b']}_{m['i']}.{m['p']}"
    return _renamed(sd, name, "conv_B_I is read as convB_I")


# A FeatureExtractor's parameters: the canonical names with "_" for "." (conv1_1_weight).
_EXTRACTOR_KEY = re.compile(r"^(conv\d_\d|fc[678])_(weight|bias)$")


# Cadene's pretrainedmodels (modify_vggs) moves torchvision's VGG modules to other attributes:
# features -> _features, classifier[0] / [3] / [6] -> linear0 / linear1 / last_linear. The tensors
# and the input convention (RGB, mean/std) are torchvision's.
_CADENE = {"_features.": "features.", "linear0.": "classifier.0.", "linear1.": "classifier.3.",
           "last_linear.": "classifier.6."}
_CADENE_KEY = re.compile(r"^((?:.*\.)?)_features\.\d+\.weight$")


def _from_cadene(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`P._features.I.x`, `P.linear0.x`, `P.linear1.x`, `P.last_linear.x` -> torchvision's keys."""
    owners = {m.group(1) for k in sd for m in [_CADENE_KEY.match(k)] if m}
    # an owner with torchvision's names as well is not Cadene's; another VGG beside one is left
    # for _strip_owner to name (it took that one for the model, unseen)
    owners = sorted((o for o in owners if not any(k.startswith((o + "features.", o + "classifier."))
                                                  for k in sd)), key=len, reverse=True)
    if not owners:
        return sd
    out = {}
    for k, v in sd.items():
        o = next((o for o in owners if k.startswith(o)), None)
        if o is not None:
            rest = k[len(o):]
            old = next((old for old in _CADENE if rest.startswith(old)), None)
            if old is not None:
                k = o + _CADENE[old] + rest[len(old):]
        out[k] = v
    return out


# Caffe's layer names as module names: David Bau's dissect / GAN dissection convert the Places365
# VGG16 (vgg16_places365-*.pth) into torchvision's VGG with named modules, features.conv1_1 ...
# classifier.fc6 / fc7 / fc8a (Places365's Caffe model names its 365-way layer fc8a; so do
# caffemodel2pytorch's conversions of it, conv1_1 ... fc8a). Without this, "conv1_1.weight" under
# "features." passed for a conv stack alone and the classifier was silently dropped.
_LAYER_NAME_KEY = re.compile(r"^(?P<owner>(?:.*\.)?)(?:features\.(?P<conv>conv\d_\d)|"
                             r"classifier\.(?P<fc>fc[678]a?))\.(?P<p>weight|bias)$")
_FC8A_KEY = re.compile(r"^(?P<owner>(?:.*\.)?)(?P<fc>fc8a)\.(?P<p>weight|bias)$")


def _from_layer_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`P.features.convB_I.x`, `P.classifier.fcN.x`, `P.fc8a.x` -> vggfast's `P.convB_I.x`,
    `P.fcN.x` (fc8a is fc8)."""
    hits = {k: m.groupdict() for k in sd for m in [_LAYER_NAME_KEY.match(k) or _FC8A_KEY.match(k)]
            if m}
    if not hits:
        return sd
    def name(k: str) -> str:
        g = hits.get(k)
        return k if g is None else \
            f"{g['owner']}{g.get('conv') or g['fc'].replace('fc8a', 'fc8')}.{g['p']}"
    return _renamed(sd, name, "Caffe's layer names are mapped (fc8a is fc8)")


# Weights stored reparametrised: torch.nn.utils.prune (weight_orig, weight_mask), weight_norm
# (weight_g, weight_v), spectral_norm (weight_orig, weight_u, weight_v) and their parametrize
# forms (parametrizations.weight.original...). The weight the layer computes with is not among the
# tensors, so the layer looked absent and the stack matched no configuration of Table 1.
_REPARAM_KEY = re.compile(r"(?:^|\.)(?:features\.\d+|classifier\.\d+|conv\d_\d|fc[678])\."
                          r"(?:(?:weight|bias)_(orig|mask|g|v|u)$|"
                          r"parametrizations\.(weight|bias)\.)")


def _refuse_reparametrised(sd: dict[str, torch.Tensor]) -> None:
    """A WeightsError naming the reparametrisation and the torch call that makes weights plain.
    Only the VGG's own tensors count: those at the top when the VGG is there, else any."""
    at_top = any(_VGG_KEY.match(k) for k in sd)
    find = _REPARAM_KEY.match if at_top else _REPARAM_KEY.search
    hits = [(k, m) for k in sd for m in [find(k)] if m]
    if not hits:
        return
    kinds = {m.group(1) for _, m in hits}
    if any(m.group(2) for _, m in hits):
        what = "torch.nn.utils.parametrizations: weight or spectral norm"
        fix = "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')"
    elif "mask" in kinds:
        what, fix = "pruning", "torch.nn.utils.prune.remove(layer, 'weight')"
    elif "u" in kinds:
        what, fix = "spectral norm", "torch.nn.utils.remove_spectral_norm(layer)"
    elif "g" in kinds:
        what, fix = "weight norm", "torch.nn.utils.remove_weight_norm(layer)"
    else:   # its partner tensor is missing: pruning or spectral norm
        what = "torch.nn.utils' pruning or spectral norm"
        fix = "prune.remove(layer, 'weight') or remove_spectral_norm(layer)"
    raise WeightsError(f"{hits[0][0]!r}: the weights are stored reparametrised ({what}), not as "
                       f"the layers' weights; call {fix} on each such layer and save the "
                       "state dict again")


# Networks built from VGG's parts that are not the paper's VGG. Their tensors read as a VGG
# matching no configuration of Table 1 ("17 convolutions with kernel sizes [1, 3, ...]"), or as
# no VGG at all, which named neither the file nor why vggfast cannot run it.
_SEQ_KEY = re.compile(r"^(?P<owner>(?:.*\.)?)(?P<i>\d+)\.weight$")


def _refuse_other_networks(sd: dict[str, torch.Tensor]) -> None:
    """A WeightsError naming a style-transfer encoder with reflection padding (pytorch-AdaIN's
    vgg_normalised.pth) or its decoder, SSD's reduced-fc VGG16, an FCN or a Faster R-CNN
    detector built on VGG16."""
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in sd.items():
        m = _SEQ_KEY.match(k)
        if m and isinstance(v, torch.Tensor) and v.dim() == 4:
            groups.setdefault(m.group("owner"), {})[int(m.group("i"))] = v
    vgg_beside = any(_VGG_KEY.search(k) for k in sd)
    # AdaIN's encoder (from the Lua AdaIN-style's vgg_normalised.t7; pytorch-AdaIN's Sequential,
    # its Net's enc_1 ... enc_4, PytorchWCT's encoders' conv1, conv2, ...): Conv2d(3, 3, 1) turns
    # RGB in [0, 1] into Caffe's input, then ReflectionPad2d, Conv2d(.., 3) (no padding of its
    # own), ReLU per conv. Reflection padding gives other values than the paper's zero padding
    # all along the borders, at every layer, so it cannot be folded away.
    weights = [(k, v) for k, v in sd.items() if k.split(".")[-1] == "weight" and v.dim() == 4]
    recolour = next((k for k, v in weights if tuple(v.shape) == (3, 3, 1, 1)), None)
    conv1_1 = next((k for k, v in weights if v.shape[1] == 3 and v.shape[-1] == 3), None)
    if not vgg_beside and recolour is not None and conv1_1 is not None:
        raise WeightsError(
            f"a style-transfer encoder, not the paper's VGG: '{recolour}' is a 1x1 conv that "
            f"recolours the input before conv1_1 ('{conv1_1}'), as in pytorch-AdaIN's "
            "vgg_normalised.pth and the WCT encoders, whose 3x3 convs are padded by a "
            "ReflectionPad2d before each; vggfast runs VGG with zero padding, which differs at "
            "every border, so it cannot run these weights")
    for owner, convs in sorted(groups.items()):
        # AdaIN's decoder.pth (and WCT's) mirrors the encoder: relu4_1's 512 channels back to
        # RGB; it read as "conv1_1 reads 512 channels; VGG takes RGB (3)". Beside a VGG (an
        # autoencoder's checkpoint) it is another network, left to _strip_owner.
        lo, hi = convs[min(convs)], convs[max(convs)]
        if not vgg_beside and len(convs) > 2 and hi.shape[0] == 3 and lo.shape[1] > 3:
            raise WeightsError(
                f"an image decoder, not a VGG: its first conv ('{owner}{min(convs)}.weight') reads "
                f"{lo.shape[1]} channels and its last ('{owner}{max(convs)}.weight') makes 3, "
                "an image (pytorch-AdaIN's decoder.pth, a style-transfer decoder); pass the "
                "encoder's weights, or torchvision's VGG")
        # ssd.pytorch / mmdetection's SSDVGG: torchvision's VGG16 convs (pool3 in ceil mode),
        # pool5 3x3 stride 1, conv6 a 3x3 conv with dilation 6 (fc6 subsampled to 1024 wide)
        # and conv7 (fc7) a 1x1 conv: at 31 and 33, or with BatchNorm after each conv
        # (ssd.pytorch's vgg(batch_norm=True)) at 44 and 46; the 13 3x3 convs before them
        order = sorted(convs)
        if len(order) >= 15 and all(convs[i].shape[-1] == 3 for i in order[-15:-1]) \
                and convs[order[-1]].shape[-1] == 1 \
                and convs[order[-2]].shape[1] == convs[order[-3]].shape[0]:
            i6, i7 = order[-2], order[-1]
            w31, w33 = convs[i6], convs[i7]
            raise WeightsError(
                f"SSD's VGG16 backbone, not the paper's VGG ('{owner}{i6}.weight' "
                f"{tuple(w31.shape)}, '{owner}{i7}.weight' {tuple(w33.shape)}: ssd.pytorch's "
                "vgg16_reducedfc.pth or an SSD detector): fc6 and fc7 are a dilated 3x3 conv and a 1x1 conv "
                f"{w31.shape[0]} wide after a 3x3 stride-1 pool5, and the input is Caffe's; "
                "vggfast cannot run them; for VGG16 itself pass torchvision's 'vgg16' or "
                "jcjohnson's vgg16-00b39a1b.pth")
    # Chatfield et al.'s VGG-F / VGG-M / VGG-S (2014; VGG-M-Face, Albanie's
    # vgg_m_face_bn_dag.pth) and AlexNet: conv1 an 11x11 or 7x7 stride-2/4 conv on the image
    # where the paper's A-E have a 3x3 one; read as "0 convolutions match" or as BatchNorm
    # beside conv1_1 names
    big = next(((k, v) for k, v in weights if v.shape[1] == 3 and v.shape[-1] in (7, 11)
                and v.shape[-2] == v.shape[-1]), None)
    if conv1_1 is None and big is not None:
        k, v = big
        raise WeightsError(
            f"not one of the paper's VGG nets: its first conv ('{k}' {tuple(v.shape)}) is "
            f"{v.shape[-2]}x{v.shape[-1]} on the image, where VGG A-E start with a 3x3 conv "
            "(this is a VGG-F/M/S net of Chatfield et al. 2014, such as VGG-M-Face, or an "
            "AlexNet); vggfast cannot run it; pass a VGG A-E (e.g. torchvision's 'vgg16')")
    fcn = sorted(k for k in sd if re.search(r"(^|\.)(score_fr|upscore\w*)\.weight$", k))
    if fcn:
        # wkentaro/pytorch-fcn's FCN32s/16s/8s (conv1_1 ... fc7 as convs, then score_fr and a
        # transposed conv): it passed for vggfast's names cut after fc7, score_fr dropped
        raise WeightsError(
            f"a fully convolutional segmentation net (FCN: {', '.join(fcn[:2])}), not a VGG "
            "classifier: conv1_1 pads the image by 100 pixels, score_fr and the upsampling "
            "layers are no layers of VGG, and the input is Caffe's; vggfast cannot run it; "
            "pass the VGG16 it was trained from")
    if any(k.startswith(("RCNN_base.", "RCNN_top.")) for k in sd):
        # jwyang/faster-rcnn.pytorch: RCNN_base = vgg.features[:-1] (no pool5), RCNN_top =
        # vgg.classifier[:-1] (no fc8), RoI pooling in between: read as "no VGG found"
        raise WeightsError(
            "a Faster R-CNN detector's weights (RCNN_base, RCNN_top, RCNN_rpn: "
            "faster-rcnn.pytorch), not a VGG classifier: its VGG16 has no pool5 and no fc8 and "
            "runs on RoI-pooled boxes, which vggfast does not do; pass the VGG16 it was "
            "trained from (vgg16_caffe.pth, with preprocess='caffe')")


def _timm_name(k: str) -> str:
    for old, new in _TIMM.items():
        if k.startswith(old):
            k = new + k[len(old):]
    return _EXTRACTOR_KEY.sub(r"\1.\2", k)


def _rename(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = _strip_prefixes(sd)
    _refuse_other_networks(sd)
    sd = _from_layer_names(_from_cadene(_from_underscored_names(sd)))
    sd = _from_convmodules(_unslice(_from_timm_features(sd)))
    out = _renamed(_strip_owner(sd), _timm_name, "timm's names are mapped")
    _refuse_reparametrised(out)
    return out


# jcjohnson/pytorch-vgg's conversions of the original Caffe models (vgg16-00b39a1b.pth,
# vgg19-d01eb7cb.pth; style transfer and Faster R-CNN code loads them) keep a Dropout before fc6,
# so their Linear layers sit at classifier.1, .4, .6, and they expect Caffe's input: BGR, 0-255,
# minus the mean pixel. That classifier layout with the paper's ImageNet fc6 is their signature:
# CIFAR VGGs written with the same Dropout-first Sequential (chengyangfu/pytorch-vgg-cifar10's
# Linear(512, 512) on the 1x1 map) were trained on torchvision's input, and fed Caffe's they
# classified wrongly without a word.
_CAFFE_FC = {f"classifier.{a}.{p}": f"classifier.{b}.{p}"
             for a, b in ((1, 0), (4, 3)) for p in ("weight", "bias")}


def _caffe_classifier(sd: dict[str, torch.Tensor]) -> bool:
    linear = {int(m.group(1)) for k in sd
              for m in [re.fullmatch(r"classifier\.(\d+)\.(?:weight|bias)", k)] if m}
    return linear == {1, 4, 6}


def _imagenet_fc6(sd: dict[str, torch.Tensor]) -> bool:
    """fc6 (classifier.1) reads a 7x7 map and is 8x as wide as the last conv: the paper's
    ImageNet classifier (4096 outputs for 512 channels) at any width."""
    convs, w = _convs_torchvision(sd), sd.get("classifier.1.weight")
    if not convs or w is None or w.dim() != 2:
        return False
    c = convs[-1][1].shape[0]
    return tuple(w.shape) == (8 * c, 49 * c)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def unwrapped(k: str) -> str:     # both "conv.w" and "module.conv.w": one is refused
        *path, leaf = k.split(".")
        return ".".join([p for p in path if p not in _WRAPPER_NAMES] + [leaf])
    return _renamed(sd, unwrapped, "the wrappers' names "
                    f"{', '.join(n + '.' for n in _WRAPPER_NAMES)} are removed")


# ---------------------------------------------------------------------------------------------
# layout detection and canonicalisation

def _convs_torchvision(sd: dict[str, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    convs = []
    for k, v in sd.items():
        m = re.fullmatch(r"features\.(\d+)\.weight", k)
        if m and v.dim() == 4:
            convs.append((int(m.group(1)), v))
    return sorted(convs, key=lambda t: t[0])


# A conv stack cut short (vgg16.features[:23], kept for a perceptual loss) fits several
# configurations; the first in this order that fits names it (its present layers compute the same
# whichever fits).
_TRUNCATED_ORDER = ("D", "E", "B", "C", "A", "A-LRN")


def _blocks_from_indices(indices: list[int], bn: bool) -> tuple[list[int], bool] | None:
    """(convs per block, A-LRN's LRN seen) from torchvision's features.N indices: in a block a
    conv follows the previous one (conv[, BN], ReLU) later, across blocks one more (the pool),
    A-LRN's first gap two more (LRN, pool). None when the gaps fit none of these."""
    step = 3 if bn else 2
    sizes, lrn = [1], False
    for n, (a, b) in enumerate(zip(indices, indices[1:])):
        if b - a == step:
            sizes[-1] += 1
        elif b - a == step + 1:
            sizes.append(1)
        elif n == 0 and not bn and b - a == step + 2:
            sizes.append(1)
            lrn = True
        else:
            return None
    return sizes, lrn


def _blocks_from_names(names: list[str]) -> list[int] | None:
    """Convs per block from canonical names conv{b}_{i}: blocks 1.. and convs 1.. without gaps."""
    sizes: list[int] = []
    for n in names:
        b, i = int(n[4]), int(n[6])
        if b == len(sizes) + 1 and i == 1:
            sizes.append(1)
        elif b == len(sizes) and i == sizes[-1] + 1:
            sizes[-1] += 1
        else:
            return None
    return sizes


def _detect_config(kernels: list[int], sizes: list[int] | None, lrn: bool,
                   wanted: str | None = None) -> str:
    """The configuration whose convs the stack holds (all, or the first ones: a truncated stack).

    sizes: convs per block when known (None: match the kernel list alone, complete stacks only);
    wanted: the configuration the caller named, checked to fit instead of detecting one."""
    def fits(cfg: str, complete: bool) -> bool:
        blocks = [list(b) for b in TABLE1[cfg]]
        if (cfg == "A-LRN") != lrn and (sizes is not None or cfg == "A-LRN"):
            return False
        if sizes is None:
            return complete and [k for b in blocks for k in b] == kernels
        it = iter(kernels)
        seen = [[next(it) for _ in range(n)] for n in sizes]
        if complete:
            return seen == blocks
        return (len(seen) <= len(blocks) and seen[:-1] == blocks[:len(seen) - 1]
                and seen[-1] == blocks[len(seen) - 1][:len(seen[-1])])
    if wanted is not None:
        if fits(wanted, True) or fits(wanted, False):
            return wanted
        raise WeightsError(f"config {wanted!r} does not match the weights ({len(kernels)} "
                           f"convolutions{f' in blocks of {sizes}' if sizes else ''})")
    for cfg in TABLE1:
        if fits(cfg, True):
            return cfg
    for cfg in _TRUNCATED_ORDER:
        if fits(cfg, False):
            return cfg
    raise WeightsError(f"unknown layout: {len(kernels)} convolutions with kernel sizes {kernels}"
                       f"{f' in blocks of {sizes}' if sizes else ''} match no configuration of "
                       "Table 1 (A, A-LRN, B, C, D, E), complete or cut short")


def all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite: torch's min/max reductions propagate NaN, and an
    infinity is its own extreme, so the two extremes decide in one pass with no boolean copy of
    the tensor (VGG16's fc6 alone has 103M elements; isfinite().all() took 30x longer)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _canonicalise(sd: dict[str, torch.Tensor], config: str | None, meta: dict[str, Any],
                  headless: bool = False):
    canonical_keys = [k for k in sd if _CANONICAL.match(k)]
    tv = _convs_torchvision(sd)
    if tv:
        conv_w = [w for _, w in tv]
        indices = [i for i, _ in tv]
        bn = any(f"features.{i + 1}.running_mean" in sd for i in indices)
        # a normalisation layer's weight after a conv but no running statistics (parameters
        # saved alone, BatchNorm with track_running_stats=False, GroupNorm): it read as "tensors
        # no layer of configuration D reads (a modified VGG)"
        norm = next((i + 1 for i, w in tv if not bn and getattr(sd.get(
            f"features.{i + 1}.weight"), "shape", None) == w.shape[:1]), None)
        if norm is not None:
            raise WeightsError(
                f"features.{norm} holds a normalisation layer's weight but no running statistics "
                "(BatchNorm's running_mean / running_var); save model.state_dict(), which holds "
                "them, not its parameters alone (BatchNorm without running statistics and "
                "GroupNorm cannot be folded into the convolutions)")
    elif canonical_keys:
        names = sorted({k.split(".")[0] for k in canonical_keys if k.startswith("conv")},
                       key=lambda n: (int(n[4]), int(n[6])))
        names = [n for n in names if f"{n}.weight" in sd]
        conv_w = [sd[f"{n}.weight"] for n in names]
        indices, bn = None, False
        # layer names say nothing of which conv a BatchNorm follows: its statistics were
        # ignored and the network ran without them
        stats = sorted(k for k in sd if re.fullmatch(r"(features\.)?[^.]+\.running_(mean|var)", k))
        if stats:
            raise WeightsError(f"BatchNorm statistics ({stats[0]}, ...) beside layer names "
                               "(conv1_1.weight): which conv each follows is not known; save the "
                               "model in torchvision's layout (features.N) or fold the BatchNorm "
                               "into the convolutions first")
    else:
        lins = sorted(k for k in sd if re.search(r"(^|\.)lin\d\.model\.1\.weight$", k))
        if lins:    # LPIPS's weights/v0.1/vgg.pth and taming-transformers' vgg.pth
            raise WeightsError(
                f"LPIPS's linear layers alone ({', '.join(lins[:2])}, ...: 1x1 weights on "
                "the VGG's features), not a VGG: LPIPS runs them on torchvision's vgg16, so "
                "load that ('vgg16'), or a state dict of the whole LPIPS module (net.slice1 ...)")
        sample = ", ".join(list(sd)[:5])
        raise WeightsError("unknown layout: no VGG convolution tensors found (expected torchvision "
                           f"'features.N.weight', timm, or vggfast names; found {sample}...)")
    for w in conv_w:
        if w.is_quantized:     # torch.ao.quantization's convert(): int8 values and their scales
            raise WeightsError(
                f"quantized convolution weights ({str(w.dtype).replace('torch.', '')}, a model "
                "after torch.ao.quantization's convert); vggfast computes in floating point: "
                "save the float model's state dict, from before convert")
        if not w.is_floating_point():
            raise WeightsError(f"convolution weights must be floating point, found {w.dtype}")
        if w.dim() != 4 or w.numel() == 0:
            raise WeightsError(f"convolution weights must be 4-D [Cout, Cin, k, k] with values, "
                               f"found {tuple(w.shape)}")
    kernels = [int(w.shape[-1]) for w in conv_w]
    if indices is not None:
        found = _blocks_from_indices(indices, bn)
        sizes, lrn = found if found else (None, False)
    else:
        sizes, lrn = _blocks_from_names(names), False
    cfg = None
    if config is not None:
        try:
            cfg, cfg_bn = canonical_config(config)
        except ArgumentError as exc:
            raise WeightsError(str(exc))
        if cfg_bn != bn and config.lower() in ALIASES:
            raise WeightsError(f"config {config!r} {'has' if cfg_bn else 'has no'} BatchNorm but the "
                               f"weights {'have' if bn else 'have none'}")
        if cfg == "A-LRN" and bn:
            raise WeightsError("A-LRN has no BatchNorm variant but the weights have BatchNorm")
        if indices is None and cfg in ("A", "A-LRN"):
            lrn = cfg == "A-LRN"        # vggfast's names do not show the LRN: the caller's word
    detected = _detect_config(kernels, sizes, lrn, cfg)
    c0 = conv_w[0]
    if c0.shape[1] != 3:
        raise WeightsError(f"conv1_1 reads {c0.shape[1]} channels; VGG takes RGB (3)")
    width = c0.shape[0] / 64

    # classifier (optional: a features-only checkpoint has none)
    fc_names = {"fc6": "classifier.0", "fc7": "classifier.3", "fc8": "classifier.6"}
    fc: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {}
    for name, tvname in fc_names.items():
        w = sd.get(f"{tvname}.weight", sd.get(f"{name}.weight"))
        b = sd.get(f"{tvname}.bias", sd.get(f"{name}.bias"))
        if (w is None) != (b is None):
            raise WeightsError(f"{name} has a weight but no bias or a bias but no weight")
        if w is not None and (w.dim() == 0 or b.dim() == 0):
            raise WeightsError(f"{name}: weight {tuple(w.shape)} / bias {tuple(b.shape)} must be "
                               "arrays, not scalars")
        fc[name] = None if w is None else (w, b)
    present = [n for n, v in fc.items() if v is not None]
    stray = sorted(k for k in sd if k.startswith("classifier") and not re.fullmatch(
        r"classifier\.[036]\.(weight|bias)", k))
    if set(stray) == {"classifier.weight", "classifier.bias"} and not present:
        # kuangliu/pytorch-cifar's VGG: the 1x1 map of a 32x32 image straight into
        # Linear(512, classes)
        raise WeightsError(
            f"classifier.weight {tuple(sd['classifier.weight'].shape)}: one Linear layer on the "
            "conv features (a CIFAR VGG, as in kuangliu/pytorch-cifar), where the paper's VGG "
            "has fc6, fc7 and fc8 (classifier.0, .3, .6); vggfast does not run that head (drop "
            "the classifier.* tensors to use the convolutions for features)")
    if stray:
        shapes = ", ".join(f"{k} {tuple(sd[k].shape)}" for k in stray[:4])
        raise WeightsError(f"unexpected tensors {shapes}{' ...' if len(stray) > 4 else ''}: the "
                           "classifier is not VGG's (Linear layers at classifier.0, .3, .6); a "
                           "modified head is not supported (drop the classifier.* tensors to use "
                           "the convolutions for features)")
    # vggfast's own names: a FeatureExtractor keeps its weights up to its deepest layer only, so
    # one tapping fc6 or fc7 holds a classifier without fc8 (and fc7), and is accepted as weights
    cut = "fc6.weight" in sd and present in (["fc6"], ["fc6", "fc7"])
    if present and not cut and present != (["fc6", "fc7"] if headless else list(fc)):
        missing = [n for n in fc if fc[n] is None]
        raise WeightsError(f"incomplete classifier: {', '.join(missing)} missing")
    channels = conv_w[-1].shape[0]
    if present:
        w6 = fc["fc6"][0]
        if w6.dim() == 4:
            grid = int(w6.shape[-1])
            if w6.shape[1] != channels or w6.shape[2] != grid:
                raise WeightsError(f"fc6 weight {tuple(w6.shape)} does not read {channels} channels")
        elif w6.dim() == 2:
            cells = w6.shape[1] / channels
            grid = int(round(math.sqrt(cells))) if cells > 0 else 0
            if grid < 1 or grid * grid * channels != w6.shape[1]:
                raise WeightsError(f"fc6 weight {tuple(w6.shape)} does not read a square map of "
                                   f"{channels} channels")
        else:
            raise WeightsError(f"fc6 weight must be 2-D or 4-D, found {tuple(w6.shape)}")
        fc_width = int(w6.shape[0])
        if fc["fc8"] is not None:
            num_classes = int(fc["fc8"][0].shape[0])
        else:  # timm with num_classes=0: fc6/fc7 only, usable for features up to relu7
            num_classes = _meta_int(meta, "num_classes", 1000)
        image_size = 32 * grid
    else:
        fc_width = None
        num_classes = _meta_int(meta, "num_classes", 1000)
        image_size = _meta_int(meta, "image_size", 224)
    block_channels, i = [], 0
    for b, kernels in enumerate(TABLE1[detected]):      # a truncated stack: width-scaled defaults
        block_channels.append(int(conv_w[i].shape[0]) if i < len(conv_w)
                              else scaled(BLOCK_CHANNELS[b], width))
        i += len(kernels)
    try:
        spec = make_spec(detected, num_classes, width, image_size, batch_norm=bn, fc_width=fc_width,
                         channels=tuple(block_channels))
    except ArgumentError as exc:
        raise WeightsError(f"weights describe an impossible network: {exc}")
    if fc["fc8"] is None:
        # the layers no tensor gave are sized by metadata alone: one of 1e12 classes made a
        # list of 1e12 class names (a hang), an image size of 1e300 overflowed the scheduler
        from .nn import MAX_PARAMS
        n = sum(layer.params for layer in spec.layers)
        if n > MAX_PARAMS:
            raise WeightsError(f"metadata num_classes / image_size {num_classes:.6g} / "
                               f"{image_size:.6g} describe a network of more than "
                               f"{MAX_PARAMS:,} parameters, the most vggfast builds")

    if indices is not None:
        _check_no_extra(sd, spec, bn)

    params: dict[str, torch.Tensor] = {}
    nonfinite = []
    # each conv reading what the one before makes, with widths that change inside a block:
    # a channel-pruned VGG (neural-style-pt's channel_pruning.pth: 24, 22 | 41, 51 | ...)
    chained = all(b.shape[1] == a.shape[0] for a, b in zip(conv_w, conv_w[1:]))
    for layer, w in zip(spec.convs, conv_w):
        if tuple(w.shape) != (layer.cout, layer.cin, layer.k, layer.k):
            widths = [int(v.shape[0]) for l, v in zip(spec.convs, conv_w)
                      if l.block == layer.block]
            if chained and w.shape[-1] == layer.k and len(set(widths)) > 1:
                raise WeightsError(
                    f"{layer.name}: {w.shape[0]} channels where block {layer.block}'s convs "
                    f"have {', '.join(map(str, widths))}: a channel-pruned VGG (e.g. neural-style-pt's "
                    "channel_pruning.pth); vggfast runs one width per block, as the paper's "
                    "networks have, so it cannot run these weights")
            raise WeightsError(
                f"{layer.name}: weight shape {tuple(w.shape)} does not fit configuration "
                f"{spec.config} at width {width:g} (expected {(layer.cout, layer.cin, layer.k, layer.k)})")
        if indices is not None:
            i = indices[spec.convs.index(layer)]
            if i != layer.index:
                raise WeightsError(f"{layer.name} sits at features.{i}, expected features."
                                   f"{layer.index} for configuration {spec.config}"
                                   f"{' with BatchNorm' if bn else ''}")
            b = _need(sd, f"features.{i}.bias", layer.cout)
        else:
            b = _need(sd, f"{layer.name}.bias", layer.cout)
        w = w.detach().to(torch.float32)
        b = b.detach().to(torch.float32)
        if bn:
            j = layer.bn_index
            gamma = _need(sd, f"features.{j}.weight", layer.cout).to(torch.float32)
            beta = _need(sd, f"features.{j}.bias", layer.cout).to(torch.float32)
            mean = _need(sd, f"features.{j}.running_mean", layer.cout).to(torch.float32)
            var = _need(sd, f"features.{j}.running_var", layer.cout).to(torch.float32)
            scale = gamma / torch.sqrt(var + BN_EPS)
            w = w * scale[:, None, None, None]
            b = (b - mean) * scale + beta
        params[f"{layer.name}.weight"] = w.contiguous()
        params[f"{layer.name}.bias"] = b.contiguous()
        if not (all_finite(w) and all_finite(b)):
            nonfinite.append(layer.name)
    missing = [l.name for l in spec.convs[len(conv_w):]]    # a stack cut short
    if missing and present:
        raise WeightsError(f"the weights have a classifier but no {', '.join(missing)}: the "
                           f"convolutions of configuration {spec.config} stop early")
    for layer in spec.fcs:
        pair = fc[layer.name]
        if pair is None:
            missing.append(layer.name)
            continue
        w, b = pair
        shape = (layer.cout, layer.cin, layer.k, layer.k)
        if layer.name == "fc8" and tuple(w.shape) == (layer.cout, 2 * layer.cin):
            raise _pool_error("catavgmax", f"fc8 weight {tuple(w.shape)} reads twice fc7's "
                                           f"{layer.cin} features, as a head after ")
        if w.numel() != math.prod(shape) or w.dim() not in (2, 4) \
                or w.shape[0] != layer.cout or tuple(b.shape) != (layer.cout,):
            raise WeightsError(f"{layer.name}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not "
                               f"fit (expected weight {shape} or its 2-D Linear form)")
        if w.dim() == 4 and tuple(w.shape) != shape:
            raise WeightsError(f"{layer.name}: weight {tuple(w.shape)}, expected {shape}")
        if not w.is_floating_point() or not b.is_floating_point():
            raise WeightsError(f"{layer.name}: weights must be floating point, found {w.dtype}")
        w = w.detach().to(torch.float32).reshape(shape).contiguous()
        b = b.detach().to(torch.float32).contiguous()
        params[f"{layer.name}.weight"], params[f"{layer.name}.bias"] = w, b
        if not (all_finite(w) and all_finite(b)):
            nonfinite.append(layer.name)
    return spec, params, tuple(missing), tuple(nonfinite)


def _meta_int(meta: Mapping[str, Any], key: str, default: int) -> int:
    """meta[key] as an integer (a JSON number, or its text), `default` where it is unset or 0
    (timm's num_classes=0: no head); WeightsError for a fraction, a bool or anything else."""
    value = meta.get(key)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value.strip())
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not value:   # unset, 0 (also "0", read as a number first), or empty
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise WeightsError(f"metadata num_classes / image_size must be integers, not "
                           f"{key}={meta.get(key)!r}")
    return value


def _check_no_extra(sd: dict[str, torch.Tensor], spec: NetSpec, bn: bool) -> None:
    """Refuse tensors under features./classifier. that no layer of `spec` reads: they mean a
    modified VGG (an extra head layer, a changed block) whose output vggfast would get wrong."""
    expected = set()
    for layer in spec.convs:
        expected |= {f"features.{layer.index}.weight", f"features.{layer.index}.bias"}
        if bn:
            expected |= {f"features.{layer.bn_index}.{p}" for p in
                         ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    expected |= {f"classifier.{l.index}.{p}" for l in spec.fcs for p in ("weight", "bias")}
    extra = [k for k in sd if k.startswith(("features.", "classifier.")) and k not in expected]
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise WeightsError(f"unexpected tensors {', '.join(extra[:3])}{more}: no layer of "
                           f"configuration {spec.config}{' with BatchNorm' if bn else ''} reads "
                           "them (a modified VGG, e.g. an extra classifier layer, is not supported)")


def _need(sd: dict[str, torch.Tensor], key: str, n: int) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise WeightsError(f"missing tensor {key!r}")
    if tuple(t.shape) != (n,):
        raise WeightsError(f"{key}: shape {tuple(t.shape)}, expected ({n},)")
    if not t.is_floating_point():
        raise WeightsError(f"{key}: must be floating point, found {t.dtype}")
    return t.detach()


def to_torchvision(w: Weights) -> dict[str, torch.Tensor]:
    """Canonical weights back to a torchvision-keyed state dict (BN stays folded: no BN keys)."""
    spec = w.spec
    if spec.batch_norm:
        spec = make_spec(spec.config, spec.num_classes, spec.width, spec.image_size,
                         batch_norm=False, fc_width=spec.fc_width,
                         channels=tuple(spec.convs[i].cout for i in _block_firsts(spec)))
    out = {}
    for l in spec.convs:
        out[f"features.{l.index}.weight"] = w.state_dict[f"{l.name}.weight"]
        out[f"features.{l.index}.bias"] = w.state_dict[f"{l.name}.bias"]
    for l in spec.fcs:
        if f"{l.name}.weight" in w.state_dict:
            out[f"classifier.{l.index}.weight"] = w.state_dict[f"{l.name}.weight"].flatten(1)
            out[f"classifier.{l.index}.bias"] = w.state_dict[f"{l.name}.bias"]
    return out


def _block_firsts(spec: NetSpec) -> list[int]:
    """Index in spec.convs of the first conv of each block."""
    out, seen = [], set()
    for i, l in enumerate(spec.convs):
        if l.block not in seen:
            seen.add(l.block)
            out.append(i)
    return out

"""Table 1 of Simonyan & Zisserman (ICLR 2015), written once; every layer list derives from it.

A configuration is five blocks of convolutions (channels 64-128-256-512-512, stride 1, "same"
padding), each block closed by a 2x2 stride-2 max-pool, then fc6 (a (image_size/32)-square
convolution when applied densely), fc7 and fc8 (1x1 convolutions). Each conv and fc6/fc7 is
followed by ReLU. A-LRN adds local response normalisation after conv1_1; C uses 1x1 convolutions
as the third conv of blocks 3, 4 and 5.

`NetSpec` is the resolved network (channels after `width` scaling, torchvision module indices,
BatchNorm or not). The PyTorch module (`nn.py`), the weight loader, the engine, the kernels and the
C++ planner all read it; nothing else lists layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ArgumentError

# Table 1: kernel size of each conv, per block. Channels per block are BLOCK_CHANNELS.
TABLE1: dict[str, tuple[tuple[int, ...], ...]] = {
    "A": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "A-LRN": ((3,), (3,), (3, 3), (3, 3), (3, 3)),
    "B": ((3, 3), (3, 3), (3, 3), (3, 3), (3, 3)),
    "C": ((3, 3), (3, 3), (3, 3, 1), (3, 3, 1), (3, 3, 1)),
    "D": ((3, 3), (3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
    "E": ((3, 3), (3, 3), (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)),
}
BLOCK_CHANNELS = (64, 128, 256, 512, 512)
FC_WIDTH = 4096
CONFIGS = tuple(TABLE1)

# torchvision's model names -> (paper configuration, BatchNorm after each conv)
ALIASES: dict[str, tuple[str, bool]] = {
    "vgg11": ("A", False), "vgg11_bn": ("A", True),
    "vgg13": ("B", False), "vgg13_bn": ("B", True),
    "vgg16": ("D", False), "vgg16_bn": ("D", True),
    "vgg19": ("E", False), "vgg19_bn": ("E", True),
}
TORCHVISION_NAMES = {cfg: name for name, (cfg, bn) in ALIASES.items() if not bn}

# Local response normalisation of A-LRN, as in Krizhevsky et al. (2012):
# b_i = a_i / (k + alpha * sum_{j in i-n/2..i+n/2} a_j^2) ^ beta, n = 5, alpha = 1e-4, beta = 0.75,
# k = 2. PyTorch's local_response_norm divides alpha by n, so it is called with alpha * n.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0



@dataclass(frozen=True)
class Layer:
    """One weight layer of the network and what follows it.

    kind: "conv" (features) or "fc" (fc6 is a grid x grid conv, fc7/fc8 1x1 convs when dense).
    k, pad: kernel size and zero padding of the dense convolution.
    relu / lrn / pool: a ReLU, an LRN, a 2x2 stride-2 max-pool follow (in that order).
    index / bn_index: the torchvision module index (features.N or classifier.N) of the conv or
    linear layer and of its BatchNorm (None without BN).
    block: 1..5 for convs, 6..8 for fc layers.
    """

    name: str
    kind: str
    cin: int
    cout: int
    k: int
    pad: int
    relu: bool
    lrn: bool
    pool: bool
    index: int
    bn_index: int | None
    block: int

    @property
    def params(self) -> int:
        """Weight and bias elements (BatchNorm folded in)."""
        return self.cout * (self.cin * self.k * self.k + 1)


@dataclass(frozen=True)
class NetSpec:
    """A resolved VGG: configuration, scaled channels, native size, classes, module indices."""

    config: str
    batch_norm: bool
    width: float
    image_size: int
    num_classes: int
    layers: tuple[Layer, ...] = field(repr=False)
    lrn_index: int | None = field(default=None, repr=False)

    @property
    def grid(self) -> int:
        """Side of the map fc6 reads at the native size (7 for 224)."""
        return self.image_size // 32

    @property
    def convs(self) -> tuple[Layer, ...]:
        return tuple(l for l in self.layers if l.kind == "conv")

    @property
    def fcs(self) -> tuple[Layer, ...]:
        return tuple(l for l in self.layers if l.kind == "fc")

    @property
    def fc_width(self) -> int:
        return self.fcs[0].cout

    @property
    def feature_channels(self) -> int:
        return self.convs[-1].cout

    @property
    def torchvision_name(self) -> str | None:
        name = TORCHVISION_NAMES.get(self.config)
        if name is None or self.width != 1 or self.image_size != 224:
            return None
        return name + ("_bn" if self.batch_norm else "")

    def layer(self, name: str) -> Layer:
        for l in self.layers:
            if l.name == name:
                return l
        raise ArgumentError(f"no layer {name!r} in configuration {self.config}")

    def taps(self) -> tuple[tuple[str, Layer], ...]:
        """Every named activation with the weight layer that produces it, in order:
        conv1_1, relu1_1, [norm1], pool1, ..., pool5, fc6, relu6, fc7, relu7, fc8."""
        out = []
        for j, l in enumerate(self.layers):
            b = l.block
            if l.kind == "conv":
                i = 1 + sum(1 for m in self.layers[:j] if m.block == b)
                out += [(f"conv{b}_{i}", l), (f"relu{b}_{i}", l)]
                if l.lrn:
                    out.append((f"norm{b}", l))
                if l.pool:
                    out.append((f"pool{b}", l))
            else:
                out.append((l.name, l))
                if l.relu:
                    out.append((f"relu{b}", l))
        return tuple(out)

    def tap_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.taps())

    def tap_layer(self, tap: str) -> Layer:
        """The weight layer whose output (after ReLU/LRN/pool as named) `tap` is."""
        for name, l in self.taps():
            if name == tap:
                return l
        raise ArgumentError(f"unknown layer {tap!r}; layers of {self.config}: "
                            f"{', '.join(self.tap_names())}")

    def param_count(self) -> int:
        n = 0
        for l in self.layers:
            n += l.params
            if self.batch_norm and l.kind == "conv":
                n += 2 * l.cout
        return n

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Spatial size of the dense score map for an h x w input (pool floor semantics)."""
        for _ in range(5):
            h, w = h // 2, w // 2
        return h - self.grid + 1, w - self.grid + 1


def canonical_config(config: str) -> tuple[str, bool]:
    """Map "A".."E", "A-LRN" or a torchvision name to (paper configuration, batch_norm)."""
    if not isinstance(config, str):
        raise ArgumentError(f"config must be a string such as 'D' or 'vgg16', not {config!r}")
    key = config.strip()
    if key.upper() in TABLE1:
        return key.upper(), False
    if key.lower() in ALIASES:
        return ALIASES[key.lower()]
    known = ", ".join(list(TABLE1) + list(ALIASES))
    raise ArgumentError(f"unknown configuration {config!r}; known: {known}")


def scaled(channels: int, width: float) -> int:
    """Channel count after width scaling (at least 1)."""
    return max(1, int(round(channels * width)))


def make_spec(config: str, num_classes: int = 1000, width: float = 1.0, image_size: int = 224,
              batch_norm: bool | None = None, fc_width: int | None = None,
              channels: tuple[int, ...] | None = None) -> NetSpec:
    """Resolve a configuration of Table 1 into a `NetSpec`.

    width scales every conv channel count and (unless fc_width is given) the FC width.
    image_size must be a positive multiple of 32: fc6 reads an (image_size/32)^2 map.
    channels (five per-block counts) overrides the width scaling, for weights whose widths were
    rounded another way.
    """
    cfg, bn = canonical_config(config)
    if batch_norm is not None:
        bn = bool(batch_norm)
    if cfg == "A-LRN" and bn:
        raise ArgumentError("A-LRN has no BatchNorm variant")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ArgumentError(f"num_classes must be a positive integer, not {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) \
            or width <= 0 or width > 16:
        raise ArgumentError(f"width must be a number in (0, 16], not {width!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32 \
            or image_size % 32:
        raise ArgumentError(f"image_size must be a positive multiple of 32, not {image_size!r}")
    fcw = scaled(FC_WIDTH, width) if fc_width is None else int(fc_width)
    grid = image_size // 32

    layers: list[Layer] = []
    idx = 0
    cin = 3
    lrn_index = None
    if channels is None:
        channels = tuple(scaled(c, width) for c in BLOCK_CHANNELS)
    if len(channels) != 5 or any(int(c) < 1 for c in channels):
        raise ArgumentError(f"channels must be five positive counts, not {channels!r}")
    if fcw < 1:
        raise ArgumentError(f"fc_width must be positive, not {fcw}")
    for b, (kernels, cout) in enumerate(zip(TABLE1[cfg], channels), start=1):
        cout = int(cout)
        for i, k in enumerate(kernels, start=1):
            conv_idx = idx
            idx += 1
            bn_idx = None
            if bn:
                bn_idx = idx
                idx += 1
            idx += 1  # ReLU
            lrn = cfg == "A-LRN" and b == 1 and i == 1
            if lrn:
                lrn_index = idx
                idx += 1
            pool = i == len(kernels)
            layers.append(Layer(f"conv{b}_{i}", "conv", cin, cout, k, k // 2, True, lrn, pool,
                                conv_idx, bn_idx, b))
            if pool:
                idx += 1
            cin = cout
    # torchvision classifier: Linear(0) ReLU(1) Dropout(2) Linear(3) ReLU(4) Dropout(5) Linear(6)
    layers.append(Layer("fc6", "fc", cin, fcw, grid, 0, True, False, False, 0, None, 6))
    layers.append(Layer("fc7", "fc", fcw, fcw, 1, 0, True, False, False, 3, None, 7))
    layers.append(Layer("fc8", "fc", fcw, num_classes, 1, 0, False, False, False, 6, None, 8))
    return NetSpec(cfg, bn, float(width), image_size, num_classes, tuple(layers), lrn_index)

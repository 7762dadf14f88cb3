"""PyTorch (cuDNN) modules and the reference forward.

`build_model` returns a trainable `torch.nn.Module` whose state_dict keys equal torchvision's
(`features.N.*`, `classifier.N.*`). `dense_forward` is the slow, obviously correct reference every
fast path is compared against: it runs the canonical (BN-folded, FC-as-conv) weights of
`weights.load` fully convolutionally with plain torch ops.
"""
from __future__ import annotations

import numbers
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .configs import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, NetSpec, make_spec
from .errors import ArgumentError


class LRN(nn.LocalResponseNorm):
    """Krizhevsky et al.'s LRN (n=5, alpha=1e-4, beta=0.75, k=2); alpha is not divided by n."""

    def __init__(self):
        super().__init__(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrn(x)


def lrn(x: torch.Tensor) -> torch.Tensor:
    """F.local_response_norm; on the CPU half types go through float32 (its avg_pool3d has no
    bfloat16 / float16 kernel there)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return lrn(x.float()).to(x.dtype)
    return F.local_response_norm(x, LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)


# The largest network build_model makes: 32x VGG16's parameters, 18 GB in float32 (VGG16 at
# image size 1024 has 2.3e9, most of them fc6's); past it a typo such as --image-size 100000
# (2e13 parameters) is refused by name rather than failing deep in torch's allocator.
MAX_PARAMS = 32 * 138_357_544


class VGG(nn.Module):
    """VGG with torchvision's module layout; `spec` says which configuration it is.

    forward(x): x is a normalised NCHW float batch of any size >= image_size; features, an
    adaptive average pool to (image_size/32)^2 (identity at the native size, as torchvision), the
    classifier. Returns [N, num_classes] logits.
    """

    def __init__(self, spec: NetSpec, dropout: float = 0.5):
        super().__init__()
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) \
                or not 0 <= dropout <= 1:
            raise ArgumentError(f"dropout must be a probability in [0, 1], not {dropout!r}")
        n = sum(l.params for l in spec.layers)
        if n > MAX_PARAMS:
            raise ArgumentError(f"this network would have {n:,} parameters ({4 * n / 2**30:,.0f} "
                                f"GiB in float32; fc6 alone reads a {spec.grid}x{spec.grid} map "
                                f"at image size {spec.image_size}); vggfast builds at most "
                                f"{MAX_PARAMS:,}")
        self.spec = spec
        mods: list[nn.Module] = []
        for l in spec.convs:
            mods.append(nn.Conv2d(l.cin, l.cout, l.k, padding=l.pad))
            if spec.batch_norm:
                mods.append(nn.BatchNorm2d(l.cout))
            mods.append(nn.ReLU(inplace=True))
            if l.lrn:
                mods.append(LRN())
            if l.pool:
                mods.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*mods)
        g = spec.grid
        self.avgpool = nn.AdaptiveAvgPool2d((g, g))
        fc6, fc7, fc8 = spec.fcs
        self.classifier = nn.Sequential(
            nn.Linear(fc6.cin * g * g, fc6.cout), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(fc7.cin, fc7.cout), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(fc8.cin, fc8.cout),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation (Kaiming for convs, N(0, 0.01) for linear layers)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def build_model(config: str = "D", num_classes: int = 1000, width: float = 1.0,
                image_size: int = 224, batch_norm: bool | None = None,
                dropout: float = 0.5) -> VGG:
    """A trainable VGG of Table 1 on PyTorch/cuDNN, with torchvision's state_dict keys.

    config: "A" "A-LRN" "B" "C" "D" "E" or "vgg11".."vgg19_bn". width scales every channel
    count and the FC width. image_size (a multiple of 32) is the native input size.
    """
    return VGG(make_spec(config, num_classes, width, image_size, batch_norm), dropout)


def dense_forward(params: Mapping[str, torch.Tensor], spec: NetSpec, x: torch.Tensor,
                  taps: Iterable[str] = ("fc8",), fc=None,
                  inplace: bool = False) -> dict[str, torch.Tensor]:
    """Reference fully convolutional forward on canonical weights.

    params: canonical weights (`conv1_1.weight` [Cout, Cin, k, k], ..., `fc6.weight`
    [F, C, g, g], `fc7.weight` [F, F, 1, 1], `fc8.weight` [classes, F, 1, 1], biases [Cout]).
    x: [N, 3, H, W] normalised, H and W >= spec.image_size for taps past pool5.
    taps: names from `spec.tap_names()`; computation stops after the deepest one.
    Returns {tap: tensor} (NCHW, x's dtype); "fc8" is the raw class score map.
    fc: None (fc6-fc8 by F.conv2d, the reference) or a function (x, weight, bias) -> the same
    convolution computed another way (TorchBackend's `conv_as_matmul` on the CPU).
    inplace: ReLU in place on a conv output that is not a requested tap (a pass less over every
    activation; the numbers are the same).
    """
    taps = list(taps)
    names = spec.tap_names()
    for t in taps:
        if t not in names:
            raise ArgumentError(f"unknown layer {t!r}; layers of {spec.config}: {', '.join(names)}")
    last = max(names.index(t) for t in taps)
    out: dict[str, torch.Tensor] = {}
    pos = 0

    def emit(t: torch.Tensor) -> bool:
        nonlocal pos
        name = names[pos]
        if name in taps:
            out[name] = t
        pos += 1
        return pos > last

    for l in spec.layers:
        w, b = params[f"{l.name}.weight"], params[f"{l.name}.bias"]
        x = F.conv2d(x, w, b, padding=l.pad) if fc is None or l.kind != "fc" else fc(x, w, b)
        if emit(x):
            return out
        if l.relu:
            # a tensor of its own: in place unless the caller holds it as a tap
            x = F.relu_(x) if inplace and names[pos - 1] not in out else F.relu(x)
            if emit(x):
                return out
        if l.lrn:
            x = lrn(x)
            if emit(x):
                return out
        if l.pool:
            x = F.max_pool2d(x, 2, 2)
            if emit(x):
                return out
    return out


def fc_forward(params: Mapping[str, torch.Tensor], spec: NetSpec, x: torch.Tensor,
               fc=None) -> torch.Tensor:
    """fc6-fc8 as convolutions on a pool5 map already pooled to (grid x grid) -> [N, classes].
    fc: as in `dense_forward` (None: F.conv2d)."""
    for l in spec.fcs:
        w, b = params[f"{l.name}.weight"], params[f"{l.name}.bias"]
        x = F.conv2d(x, w, b) if fc is None else fc(x, w, b)
        if l.relu:
            x = F.relu(x)
    return x.flatten(1)


# Bytes of one im2col chunk of `conv_as_matmul` (fc6 on a large map: 100 KB of columns per
# output pixel in float32, six times its output)
MATMUL_CHUNK_BYTES = 64 << 20


def conv_as_matmul(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                   chunk_bytes: int = MATMUL_CHUNK_BYTES) -> torch.Tensor:
    """F.conv2d(x, w, b) (stride 1, no padding) as matrix products: x [N, C, H, W], w [O, C, k, k]
    (contiguous), b [O] -> [N, O, H-k+1, W-k+1] in channels_last, x's dtype.

    Why: PyTorch's CPU convolution (oneDNN) reorders its weights into a blocked layout at every
    call; for fc6 (411 MB in float32) that is ~0.3 s on a 2-core Xeon, about 10x the GEMM of a
    batch-1 forward. A matmul reads [O, C*k*k] as it lies. A 1x1 conv of a channels_last x is
    one GEMM on its [N*H*W, C] rows (no copy); a k x k one goes through F.unfold, a chunk of
    output rows at a time (`chunk_bytes` of columns), in unfold's (c, kh, kw) order, which is
    the weight's own."""
    n, c, h, wd = x.shape
    o, k = w.shape[0], w.shape[-1]
    oh, ow = h - k + 1, wd - k + 1
    wt = w.reshape(o, c * k * k).t()
    if k == 1:
        y = torch.addmm(b, x.permute(0, 2, 3, 1).reshape(n * h * wd, c), wt)
        return y.view(n, h, wd, o).permute(0, 3, 1, 2)
    step = max(1, chunk_bytes // (x.element_size() * n * ow * c * k * k))
    out = None if step >= oh else torch.empty((n, oh, ow, o), dtype=x.dtype, device=x.device)
    for r0 in range(0, oh, step):
        r1 = min(oh, r0 + step)
        cols = F.unfold(x[:, :, r0:r1 + k - 1], k)        # [N, C*k*k, (r1 - r0) * ow]
        y = torch.addmm(b, cols.transpose(1, 2).reshape(-1, c * k * k), wt)
        y = y.view(n, r1 - r0, ow, o)
        if out is None:
            return y.permute(0, 3, 1, 2)
        out[:, r0:r1] = y
    return out.permute(0, 3, 1, 2)


class TorchBackend:
    """The reference backend: `dense_forward` on cuDNN (GPU) or the CPU, weights cast once.

    run(x, taps): x [N, 3, H, W] normalised float32 -> {tap: float32 NCHW}, as `dense_forward`.
    Activations are channels_last in `dtype` (cuDNN's and oneDNN's fast layout); fp32
    accumulate. On the CPU fc6-fc8 run as matrix products (`conv_as_matmul`, their weights kept
    contiguous for it) and each ReLU in place where its input is no tap (not oneDNN's fused
    conv+ReLU post-op: it maps NaN to 0, and an overflow must stay visible to the finite
    check): see bench/cpu.py and bench/NOTES.md "CPU (torch backend)".
    """

    name = "torch"

    def __init__(self, params: Mapping[str, torch.Tensor], spec: NetSpec, device: torch.device,
                 dtype: torch.dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.memory_format = fmt = torch.channels_last
        cpu = device.type == "cpu"
        self._fc = conv_as_matmul if cpu else None
        self._inplace = cpu
        fcs = {f"{l.name}.weight" for l in spec.fcs} if cpu else set()
        self.params = {k: (v.to(device, dtype, memory_format=fmt) if v.dim() == 4
                           and k not in fcs else v.to(device, dtype).contiguous())
                       for k, v in params.items()}

    # the engine's dtype is the dtype: a caller's torch.autocast region does not change it (the
    # Triton kernels ignore autocast; the reference must compute the same)
    @torch.no_grad()
    def run(self, x: torch.Tensor, taps: Iterable[str] = ("fc8",)) -> dict[str, torch.Tensor]:
        x = x.to(self.device, self.dtype, memory_format=self.memory_format)
        with torch.autocast(self.device.type, enabled=False):
            out = dense_forward(self.params, self.spec, x, taps, self._fc, self._inplace)
        return {k: v.float() for k, v in out.items()}

    @torch.no_grad()
    def fc(self, pooled: torch.Tensor) -> torch.Tensor:
        pooled = pooled.to(self.device, self.dtype, memory_format=self.memory_format)
        with torch.autocast(self.device.type, enabled=False):
            return fc_forward(self.params, self.spec, pooled, self._fc).float()

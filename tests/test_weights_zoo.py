"""Weights as other projects save them: each layout rebuilt with the same module structure (so
the same keys and shapes) at a reduced width with random values. Either vggfast computes what
an equivalent torch module of those tensors computes, with the project's own preprocessing, or
it refuses the file in one line that says what the file is and why it cannot run.

Layouts: pytorch-AdaIN's vgg_normalised.pth, SSD's vgg16_reducedfc.pth and detectors built on it
(ssd.pytorch, mmdetection), Faster R-CNN's RCNN_base/RCNN_top, LPIPS (its lin layers alone and
the whole module), VGG-Face (Albanie's vgg_face_dag.pth, Caffe's VGG_FACE conversions), Gatys'
vgg_conv.pth, neural-style-pt's vgg19-d01eb7cb.pth, kuangliu's CIFAR VGG, a quantized VGG.
"""
import re
import warnings

import pytest
import torch
from torch import nn

from conftest import random_bn_statistics
from vggfast import Engine, FeatureExtractor
from vggfast.cli import main
from vggfast.errors import WeightsError
from vggfast.weights import load

DIV = 16    # width divisor: 64-128-256-512-512 channels become 4-8-16-32-32
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"]


def _randomise(m, seed=0):
    """Seeded weights and non-trivial biases (zero biases would hide a misplaced one)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else (2 / p[0].numel()) ** 0.5))
    return random_bn_statistics(m).eval()


def _refused(src, match):
    """load(src) refuses with a one-line WeightsError matching `match`."""
    with pytest.raises(WeightsError, match=match) as exc:
        load(src)
    assert "\n" not in str(exc.value)
    return exc.value


def _cli_refuses(path, match, capsys):
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and match in err, err


# --- pytorch-AdaIN ----------------------------------------------------------------------------

def _adain_vgg():
    """naoto0804/pytorch-AdaIN's net.vgg: a 1x1 conv (RGB in [0, 1] -> Caffe's input), then
    per conv ReflectionPad2d, Conv2d without padding, ReLU; ceil-mode pools; up to relu5_4."""
    layers, cin = [nn.Conv2d(3, 3, 1)], 3
    for c in VGG19[:-1]:
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, c // DIV, 3), nn.ReLU()]
            cin = c // DIV
    return _randomise(nn.Sequential(*layers))


@pytest.mark.parametrize("cut", [None, 31])   # the file, and the encoder AdaIN keeps (relu4_1)
def test_adain_vgg_normalised_is_refused_for_its_reflection_padding(tmp_path, capsys, cut):
    """It read as "17 convolutions with kernel sizes [1, 3, ...] match no configuration": the
    file and the reason (reflection padding, not the paper's zero padding) were not named."""
    vgg = _adain_vgg()
    sd = (vgg if cut is None else vgg[:cut]).state_dict()
    assert list(sd)[:4] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    _refused(sd, r"style-transfer encoder.*'0\.weight' is a 1x1 conv.*\('2\.weight'\).*"
                 r"ReflectionPad2d")
    _refused({"encoder." + k: v for k, v in sd.items()}, r"'encoder\.0\.weight' is a 1x1 conv")
    # pytorch-AdaIN's Net, its encoder cut into enc_1 ... enc_4 (indices from 0 in each)
    cuts = [(1, 0, 4), (2, 4, 11), (3, 11, 18), (4, 18, 31)]
    net = {f"enc_{n}.{i - a}.{p}": v for n, a, b in cuts for i in range(a, b)
           for p, v in vgg[i].state_dict().items()}
    _refused(net, r"'enc_1\.0\.weight' is a 1x1 conv .* \('enc_1\.2\.weight'\)")
    # another network that merely opens with a 1x1 conv on RGB, beside a VGG, is not AdaIN's
    from conftest import small_model
    vgg16 = small_model("D").state_dict()
    other = {"0.weight": torch.zeros(8, 3, 1, 1), "2.weight": torch.zeros(8, 8, 1, 1)}
    assert load({**{"model." + k: v for k, v in vgg16.items()},
                 **{"stem." + k: v for k, v in other.items()}}).spec.config == "D"
    torch.save(sd, tmp_path / "vgg_normalised.pth")
    _cli_refuses(tmp_path / "vgg_normalised.pth", "zero padding", capsys)
    # why it cannot be run as VGG: even its 3x3 convs alone, zero-padded, differ at the borders
    x = torch.rand(1, 3, 20, 20)
    conv = vgg[2]
    reflect = conv(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))
    zero = nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert not torch.allclose(reflect[..., 0, :], zero[..., 0, :])
    torch.testing.assert_close(reflect[..., 1:-1, 1:-1], zero[..., 1:-1, 1:-1])


def test_adain_decoder_is_named():
    """pytorch-AdaIN's decoder.pth (relu4_1's features back to RGB): read as "conv1_1 reads 512
    channels; VGG takes RGB (3)", which did not say it is no VGG at all."""
    c = 512 // DIV
    dec = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(c, c // 2, 3), nn.ReLU(),
                        nn.Upsample(scale_factor=2), nn.ReflectionPad2d(1),
                        nn.Conv2d(c // 2, c // 2, 3), nn.ReLU(), nn.ReflectionPad2d(1),
                        nn.Conv2d(c // 2, 3, 3))
    _refused(dec.state_dict(), r"an image decoder, not a VGG: its first conv \('1\.weight'\) "
                               r"reads 32 channels and its last \('8\.weight'\) makes 3")


# --- SSD ---------------------------------------------------------------------------------------

def _ssd_vgg(batch_norm=False):
    """ssd.pytorch's vgg(base['300'], 3): VGG16's convs with pool3 in ceil mode, pool5 3x3 stride 1,
    conv6 3x3 dilation 6 and conv7 1x1, 1024 wide (here 64): vgg16_reducedfc.pth's modules
    (with batch_norm, vgg(..., batch_norm=True)'s: a BatchNorm after each of the 13 convs)."""
    layers, cin = [], 3
    for i, c in enumerate(VGG16[:-1]):
        if c == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=i == 9))
        else:
            layers += [nn.Conv2d(cin, c // DIV, 3, padding=1)]
            layers += [nn.BatchNorm2d(c // DIV)] if batch_norm else []
            layers += [nn.ReLU()]
            cin = c // DIV
    layers += [nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, 1024 // DIV, 3, padding=6, dilation=6),
               nn.ReLU(), nn.Conv2d(1024 // DIV, 1024 // DIV, 1), nn.ReLU()]
    return _randomise(nn.ModuleList(layers))


def test_ssd_reduced_fc_vgg16_is_refused_by_name(tmp_path, capsys):
    """vgg16_reducedfc.pth (keys 0 ... 33), a whole ssd.pytorch detector (vgg.*, extras, loc,
    conf, L2Norm) and mmdetection's SSDVGG (backbone.features.*): read as "15 convolutions ...
    in blocks of [2, 2, 3, 3, 3, 2]" or as no VGG at all."""
    sd = _ssd_vgg().state_dict()
    assert {"31.weight", "33.weight"} <= set(sd) and sd["33.weight"].shape[-1] == 1
    match = r"SSD's VGG16 backbone.*'31\.weight' \(64, 32, 3, 3\).*dilated 3x3 conv"
    _refused(sd, match)
    detector = {**{"vgg." + k: v for k, v in sd.items()}, "L2Norm.weight": torch.ones(32),
                "extras.0.weight": torch.zeros(16, 64, 1, 1), "extras.0.bias": torch.zeros(16),
                "loc.0.weight": torch.zeros(16, 32, 3, 3),
                "conf.0.weight": torch.zeros(84, 32, 3, 3)}
    _refused({"model": detector}, r"SSD's VGG16 backbone, not the paper's VGG "
                                  r"\('vgg\.31\.weight'")
    _refused({"state_dict": {"backbone.features." + k: v for k, v in sd.items()}},
             r"'backbone\.features\.31\.weight'")
    torch.save(sd, tmp_path / "vgg16_reducedfc.pth")
    _cli_refuses(tmp_path / "vgg16_reducedfc.pth", "SSD's VGG16 backbone", capsys)


def test_ssd_vgg16_with_batchnorm_is_refused_by_name():
    """ssd.pytorch's VGG16 built with batch_norm=True puts conv6 and conv7 at 44 and 46: it was
    "no VGG convolution tensors found" inside a detector, nothing about SSD."""
    sd = _ssd_vgg(batch_norm=True).state_dict()
    assert {"44.weight", "46.weight", "1.running_mean"} <= set(sd)
    _refused({"model": {"vgg." + k: v for k, v in sd.items()}},
             r"SSD's VGG16 backbone, not the paper's VGG \('vgg\.44\.weight' \(64, 32, 3, 3\), "
             r"'vgg\.46\.weight' \(64, 64, 1, 1\)")


@pytest.mark.parametrize("net", ["vgg_m_face_bn_dag", "vgg_m", "vgg_f", "alexnet"])
def test_chatfield_vgg_m_and_alexnet_are_refused_by_their_first_conv(net):
    """Chatfield et al.'s VGG-F/M/S (VGG-M-Face: Albanie's vgg_m_face_bn_dag.pth, conv1 ... conv5
    with bn49 ...) and AlexNet start with a 7x7 or 11x11 conv: they read as "BatchNorm
    statistics beside layer names (conv1_1.weight)" or "0 convolutions with kernel sizes []"."""
    if net == "alexnet":
        import torchvision
        sd = torchvision.models.alexnet(weights=None).state_dict()
        want = r"'features\.0\.weight' \(64, 3, 11, 11\)\) is 11x11"
    else:
        k1, c1 = (11, 64) if net == "vgg_f" else (7, 96)
        shapes = [("conv1", c1, 3, k1), ("conv2", 256, c1, 5), ("conv3", 512, 256, 3),
                  ("conv4", 512, 512, 3), ("conv5", 512, 512, 3), ("fc6", 4096, 512, 6),
                  ("fc7", 4096, 4096, 1), ("fc8", 2622, 4096, 1)]
        sd = {}
        for i, (name, o, c, k) in enumerate(shapes):
            sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.zeros(o, c // DIV, k, k), torch.zeros(o)
            if net.endswith("bn_dag") and name != "fc8":
                sd.update({f"bn{49 + i}.{p}": torch.ones(o) for p in ("weight", "bias",
                                                                     "running_mean", "running_var")})
        sd["conv1.weight"] = torch.zeros(c1, 3, k1, k1)
        want = rf"'conv1\.weight' \({c1}, 3, {k1}, {k1}\)\) is {k1}x{k1}.*Chatfield"
    _refused(sd, want)


def test_faster_rcnn_vgg16_detector_is_refused_by_name():
    """jwyang/faster-rcnn.pytorch's vgg16: RCNN_base = features[:-1], RCNN_top = classifier[:-1]
    beside the RPN and box heads; read as "no VGG convolution tensors found"."""
    from torchvision.models.vgg import make_layers
    feats = _randomise(make_layers([c if c == "M" else c // DIV for c in VGG16]))
    sd = {"RCNN_base." + k: v for k, v in feats[:-1].state_dict().items()}
    sd.update({"RCNN_top.0.weight": torch.zeros(64, 32 * 49), "RCNN_top.0.bias": torch.zeros(64),
               "RCNN_rpn.RPN_Conv.weight": torch.zeros(32, 32, 3, 3),
               "RCNN_cls_score.weight": torch.zeros(21, 64)})
    _refused({"model": sd, "pooling_mode": "align"}, r"Faster R-CNN detector.*no pool5 and no fc8")


class _FCN32s(nn.Module):
    """wkentaro/pytorch-fcn's FCN32s: conv1_1 (padding 100) ... conv5_3, fc6 a 7x7 conv, fc7 a
    1x1 conv, score_fr (21 classes) and upscore, a transposed conv."""

    def __init__(self):
        super().__init__()
        block, conv, cin = 1, 0, 3
        for c in VGG16:
            if c == "M":
                block, conv = block + 1, 0
                continue
            conv += 1
            pad = 100 if (block, conv) == (1, 1) else 1
            setattr(self, f"conv{block}_{conv}", nn.Conv2d(cin, c // DIV, 3, padding=pad))
            cin = c // DIV
        self.fc6 = nn.Conv2d(cin, 64, 7)
        self.fc7 = nn.Conv2d(64, 64, 1)
        self.score_fr = nn.Conv2d(64, 21, 1)
        self.upscore = nn.ConvTranspose2d(21, 21, 64, stride=32, bias=False)


def test_fcn_segmentation_net_is_refused_not_cut_to_its_convs():
    """It passed for vggfast's names cut after fc7 (score_fr, upscore dropped) and ran on
    torchvision's input with conv1_1's 100-pixel padding lost."""
    sd = _FCN32s().state_dict()
    _refused(sd, r"segmentation net \(FCN: score_fr\.weight, upscore\.weight\).*pads the image "
                 r"by 100 pixels")
    # VGG's own tensors of the same names, cut after fc7, still load for features
    cut = {k: v for k, v in sd.items() if not k.startswith(("score_fr", "upscore"))}
    assert load(cut).missing == ("fc8",)


def test_an_image_decoder_beside_a_vgg_is_another_network():
    """An autoencoder's checkpoint: torchvision's VGG as encoder, a Sequential decoder back to
    RGB beside it. The decoder is not the file: the VGG loads."""
    from conftest import small_model
    vgg = small_model("D").state_dict()
    dec = nn.Sequential(nn.Conv2d(32, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.ReLU(),
                        nn.Conv2d(8, 3, 3))
    ckpt = {**{"encoder." + k: v for k, v in vgg.items()},
            **{"decoder." + k: v for k, v in dec.state_dict().items()}}
    assert load(ckpt).spec.config == "D"


# --- LPIPS -------------------------------------------------------------------------------------

class _LPIPS(nn.Module):
    """richzhang/PerceptualSimilarity's LPIPS(net='vgg'): ScalingLayer for input in [-1, 1],
    torchvision's vgg16.features in five slices (relu1_2 ... relu5_3), a 1x1 lin layer on each."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import make_layers
        feats = make_layers([c if c == "M" else c // DIV for c in VGG16])
        self.scaling_layer = nn.Module()
        self.scaling_layer.register_buffer(
            "shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.scaling_layer.register_buffer(
            "scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        self.net = nn.Module()
        for n, (a, b) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)], 1):
            s = nn.Sequential()
            for i in range(a, b):
                s.add_module(str(i), feats[i])
            setattr(self.net, f"slice{n}", s)
        for n, c in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{n}", nn.Module())
            getattr(self, f"lin{n}").model = nn.Sequential(nn.Dropout(),
                                                           nn.Conv2d(c // DIV, 1, 1, bias=False))
        _randomise(self)

    def features(self, x01):
        """The five slices' outputs for RGB in [0, 1] (LPIPS is fed [-1, 1])."""
        s = self.scaling_layer
        h, out = (x01 * 2 - 1 - s.shift) / s.scale, []
        for n in range(1, 6):
            h = getattr(self.net, f"slice{n}")(h)
            out.append(h)
        return out


def test_lpips_lin_layers_alone_are_named_and_the_whole_module_computes_its_features():
    """LPIPS's weights/v0.1/vgg.pth holds only lin0 ... lin4 (read as "no VGG convolution
    tensors found"); a state dict of the whole module (scaling layer, net.slice1-5, lins) loads
    as VGG16's convs, and LPIPS's ScalingLayer on [-1, 1] is torchvision's mean/std on [0, 1]."""
    m = _LPIPS()
    sd = m.state_dict()
    lins = {k: v for k, v in sd.items() if k.startswith("lin")}
    assert sorted(lins) == [f"lin{n}.model.1.weight" for n in range(5)]
    _refused(lins, r"LPIPS's linear layers alone \(lin0\.model\.1\.weight.*torchvision's vgg16")
    w = load(sd)
    assert (w.spec.config, w.missing, w.preprocess) == ("D", ("fc6", "fc7", "fc8"), None)
    taps = ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
    fe = FeatureExtractor(sd, layers=taps, device="cpu", backend="torch", dtype=torch.float32)
    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m.features(x)
        got = fe(fe.normalize(x))
    for tap, a in zip(taps, want):
        torch.testing.assert_close(got[tap], a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_lpips_inside_a_vqgan_checkpoint_loads_its_vgg():
    """taming-transformers / latent-diffusion autoencoder checkpoints hold LPIPS as
    loss.perceptual_loss (net.slice1-5, lins, scaling layer) beside the encoder, the decoder and
    a PatchGAN discriminator (a numbered Sequential opening with a 4x4 conv on RGB): the VGG is
    the one VGG there, and the discriminator is not taken for AdaIN's encoder or a decoder."""
    m = _LPIPS()
    disc = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 16, 4, 2, 1),
                         nn.BatchNorm2d(16), nn.LeakyReLU(0.2), nn.Conv2d(16, 1, 4, 1, 1))
    sd = {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
          "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3),
          **{"loss.perceptual_loss." + k: v for k, v in m.state_dict().items()},
          **{"loss.discriminator.main." + k: v for k, v in disc.state_dict().items()}}
    fe = FeatureExtractor({"state_dict": sd, "global_step": 10}, layers=["relu3_3"],
                          device="cpu", backend="torch", dtype=torch.float32)
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m.features(x)[2]
        got = fe(fe.normalize(x))["relu3_3"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_basicsr_perceptual_vgg_with_layer_names_computes_its_features():
    """BasicSR's VGGFeatureExtractor (ESRGAN / Real-ESRGAN perceptual loss): vgg19.features
    rebuilt as an OrderedDict Sequential named conv1_1, relu1_1, ..., pool5 (vgg_net.conv1_1),
    torchvision's mean and std as buffers beside it, held as a loss's `vgg.` attribute."""
    from collections import OrderedDict
    from torchvision.models.vgg import make_layers
    feats = _randomise(make_layers([c if c == "M" else c // DIV for c in VGG19]))
    names, block, conv = [], 1, 0
    for mod in feats:
        if isinstance(mod, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(mod, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        else:
            names.append(f"pool{block}")
            block, conv = block + 1, 0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net = nn.Sequential(OrderedDict(zip(names, feats)))
    sd = {"vgg.mean": mean, "vgg.std": std,
          **{"vgg.vgg_net." + k: v for k, v in net.state_dict().items()}}
    assert "vgg.vgg_net.conv5_4.weight" in sd
    assert load(sd).spec.config == "E"
    fe = FeatureExtractor(sd, layers=["relu2_2", "relu5_4"], device="cpu", backend="torch",
                          dtype=torch.float32)
    x = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = {"relu2_2": feats[:9]((x - mean) / std), "relu5_4": feats[:36]((x - mean) / std)}
        got = fe(fe.normalize(x))
    for tap, a in want.items():
        torch.testing.assert_close(got[tap], a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


# --- VGG-Face ----------------------------------------------------------------------------------

def _named_convs(m: nn.Module, cfg) -> int:
    """The MatConvNet/Caffe-style layout both ports below share: conv{block}_{i} attributes (3x3
    pad 1, width / DIV) and m.names, the layer order with "pool" for each max-pool; returns the
    last conv's channels."""
    block, conv, cin, m.names = 1, 0, 3, []
    for c in cfg:
        if c == "M":
            block, conv = block + 1, 0
            m.names.append("pool")
            continue
        conv += 1
        setattr(m, f"conv{block}_{conv}", nn.Conv2d(cin, c // DIV, 3, padding=1))
        m.names.append(f"conv{block}_{conv}")
        cin = c // DIV
    return cin


class _VggFaceDag(nn.Module):
    """Albanie's vgg_face_dag.py (the MatConvNet VGG-Face): conv1_1 ... conv5_3 as attributes,
    fc6 a Linear on the flattened 7x7 pool5, fc7, fc8 over 2622 identities; input RGB 0-255 minus
    meta['mean']."""

    MEAN = [129.186279296875, 104.76238250732422, 93.59396362304688]

    def __init__(self):
        super().__init__()
        cin = _named_convs(self, VGG16)
        self.fc6 = nn.Linear(cin * 49, 64)
        self.fc7 = nn.Linear(64, 64)
        self.fc8 = nn.Linear(64, 2622)
        _randomise(self)

    def forward(self, x):
        for n in self.names:
            x = nn.functional.max_pool2d(x, 2) if n == "pool" else getattr(self, n)(x).relu()
        return self.fc8(self.fc7(self.fc6(x.flatten(1)).relu()).relu())


def _face_probs(m, x, bgr):
    """Dense evaluation at 224 with the flip, by hand: VGG-Face's input (0-255 minus its mean
    pixel, in RGB or BGR order) through the module."""
    mean = torch.tensor(m.MEAN).view(3, 1, 1)
    img = x * 255 - mean
    if bgr:    # Caffe's model: BGR channels, the same mean per colour
        img = img.flip(0)
    with torch.no_grad():
        return torch.softmax(torch.cat([m(img[None]), m(img.flip(-1)[None])]), 1).mean(0)


def test_vgg_face_dag_uses_its_own_mean_pixel_and_unnamed_vgg_face_is_refused(tmp_path, capsys):
    """vgg_face_dag.pth loaded and ran on torchvision's input (mean/std on [0, 1]) unsaid, and no
    vggfast preprocessing had VGG-Face's mean pixel: 'caffe' subtracts ImageNet's. By that name
    (its layer names and 2622 classes) it takes 'vggface'; VGG-Face weights with no name or
    metadata are refused, naming both conventions, rather than guessed."""
    m = _VggFaceDag()
    sd = m.state_dict()
    assert sorted(sd)[:2] == ["conv1_1.bias", "conv1_1.weight"] and sd["fc6.weight"].dim() == 2
    path = tmp_path / "vgg_face_dag.pth"
    torch.save(sd, path)
    x = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0))
    eng = Engine(str(path), device="cpu", backend="torch", dtype="float32")
    assert (eng.preprocess, eng.info()["preprocess_from"]) == ("vggface", "weights")
    got = eng.classify(x, scales=[224]).probs
    torch.testing.assert_close(got, _face_probs(m, x, bgr=False), rtol=1e-4, atol=1e-6)
    # a Caffe VGG_FACE conversion (BGR) under another name: refused until the caller says
    other = tmp_path / "VGG_FACE.pth"
    torch.save(sd, other)
    assert load(str(other)).preprocess is None
    with pytest.raises(WeightsError, match="2622 classes, VGG-Face's.*'vggface'.*'vggface-bgr'"):
        Engine(str(other), device="cpu")
    with pytest.raises(WeightsError, match="VGG-Face"):
        Engine(sd, device="cpu")      # a state dict: no name to go by
    from PIL import Image
    Image.new("RGB", (32, 32)).save(tmp_path / "face.png")
    assert main(["classify", str(tmp_path / "face.png"), "--weights", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "VGG-Face" in err, err
    assert main(["info", str(other), "--preprocess", "vggface-bgr", "--json"]) == 0
    assert '"preprocess": "vggface-bgr"' in capsys.readouterr().out
    eng = Engine(str(other), device="cpu", backend="torch", dtype="float32",
                 preprocess="vggface-bgr")
    got = eng.classify(x, scales=[224]).probs
    torch.testing.assert_close(got, _face_probs(m, x, bgr=True), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, _face_probs(m, x, bgr=False), rtol=1e-3, atol=1e-5)
    # a face perceptual loss (FeatureExtractor) is refused alike, and normalises as told
    with pytest.raises(WeightsError, match="VGG-Face"):
        FeatureExtractor(sd, layers=["relu3_3"], device="cpu")
    fe = FeatureExtractor(sd, layers=["relu3_3"], device="cpu", preprocess="vggface")
    torch.testing.assert_close(fe.normalize(x[None]),
                               x[None] * 255 - torch.tensor(m.MEAN).view(1, 3, 1, 1))
    # the name alone is not enough: another network saved as vgg_face_dag.pth keeps the default
    from conftest import small_model
    torch.save(small_model("D", num_classes=10).state_dict(), path)
    assert load(str(path)).preprocess is None
    # features-only VGG-Face weights (no fc8) need no class-count guess: they load as they are
    assert Engine({k: v for k, v in sd.items() if k.startswith("conv")}, device="cpu",
                  backend="torch").preprocess == "torchvision"


def test_prlz77_vgg_face_names_load_and_take_caffes_channel_order():
    """prlz77/vgg-face.pytorch's VGG_16 (its weights from the Torch7 VGG_FACE.t7, a port of the
    Caffe model): conv_1_1 ... conv_5_3, fc6 / fc7 / fc8 Linear layers. Read as "no VGG
    convolution tensors found"; now net D with 2622 classes, run with 'vggface-bgr'."""
    m = _VggFaceDag()
    sd = {re.sub(r"^conv(\d)_(\d)", r"conv_\1_\2", k): v for k, v in m.state_dict().items()}
    assert "conv_1_1.weight" in sd and "conv_5_3.bias" in sd
    w = load({"state_dict": {"module." + k: v for k, v in sd.items()}})
    assert (w.spec.config, w.spec.num_classes, w.missing) == ("D", 2622, ())
    with pytest.raises(WeightsError, match="VGG-Face"):
        Engine(sd, device="cpu")
    eng = Engine(sd, device="cpu", backend="torch", dtype="float32", preprocess="vggface-bgr")
    x = torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(1))
    got = eng.classify(x, scales=[224]).probs
    torch.testing.assert_close(got, _face_probs(m, x, bgr=True), rtol=1e-4, atol=1e-6)


# --- Gatys / neural-style-pt ------------------------------------------------------------------

class _GatysVGG(nn.Module):
    """PytorchNeuralStyleTransfer's VGG (vgg_conv.pth): net E's 16 convs named conv1_1 ...
    conv5_4, max pools, no classifier; fed BGR 0-255 minus the ImageNet mean pixel."""

    def __init__(self):
        super().__init__()
        _named_convs(self, VGG19)
        _randomise(self)

    def forward(self, x, upto):
        for n in self.names:
            x = nn.functional.max_pool2d(x, 2) if n == "pool" else getattr(self, n)(x).relu()
            if n == upto:
                return x


def test_gatys_vgg_conv_takes_caffes_input(tmp_path):
    """vgg_conv.pth loaded as net E and ran on torchvision's input; by its name and layout it
    is the Caffe VGG19's convs (BGR, 0-255, minus the mean pixel)."""
    m = _GatysVGG()
    torch.save(m.state_dict(), tmp_path / "vgg_conv.pth")
    w = load(str(tmp_path / "vgg_conv.pth"))
    assert (w.spec.config, w.missing, w.preprocess) == ("E", ("fc6", "fc7", "fc8"), "caffe")
    fe = FeatureExtractor(str(tmp_path / "vgg_conv.pth"), layers=["relu4_1"], device="cpu",
                          backend="torch", dtype=torch.float32)
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    bgr = x.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = m(bgr, "conv4_1")
        got = fe(fe.normalize(x))["relu4_1"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # the same tensors under torchvision's names are not Gatys' file: no name-based convention
    torch.save(m.state_dict(), tmp_path / "vgg19_convs.pth")
    assert load(str(tmp_path / "vgg19_convs.pth")).preprocess is None


def test_faster_rcnn_vgg16_caffe_takes_caffes_input(tmp_path):
    """The Faster R-CNN codes' vgg16_caffe.pth (jcjohnson's Caffe VGG16 with the classifier
    moved to torchvision's indices: torchvision's names throughout) loaded as torchvision's
    weights and ran on torchvision's input; by its name it takes Caffe's (BGR 0-255 minus the
    mean pixel). The name alone is not enough: another layout or network keeps the default."""
    from conftest import small_model
    sd = small_model("D", num_classes=1000).state_dict()
    for name, want in (("vgg16_caffe.pth", "caffe"), ("VGG16_caffe.pt", "caffe"),
                       ("vgg16.pth", None)):
        torch.save(sd, tmp_path / name)
        assert load(str(tmp_path / name)).preprocess == want, name
    eng = Engine(str(tmp_path / "vgg16_caffe.pth"))
    assert (eng.preprocess, eng.preprocess_from) == ("caffe", "weights")
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    torch.save(feats, tmp_path / "vgg16_caffe.pth")        # the backbone alone: still Caffe's
    assert load(str(tmp_path / "vgg16_caffe.pth")).preprocess == "caffe"
    torch.save(small_model("E", num_classes=1000).state_dict(), tmp_path / "vgg16_caffe.pth")
    assert load(str(tmp_path / "vgg16_caffe.pth")).preprocess is None     # a VGG19
    torch.save(small_model("D", batch_norm=True).state_dict(), tmp_path / "vgg16_caffe.pth")
    assert load(str(tmp_path / "vgg16_caffe.pth")).preprocess is None     # a BN net


def test_neural_style_pt_vgg19_caffe_conversion():
    """neural-style-pt's models/vgg19-d01eb7cb.pth (jcjohnson's conversion of
    VGG_ILSVRC_19_layers.caffemodel): torchvision's features, a Dropout first in the classifier
    (Linear layers at classifier.1, .4, .6): net E, Caffe's input, the logits of the module."""
    from torchvision.models.vgg import make_layers
    feats = make_layers([c if c == "M" else c // DIV for c in VGG19])
    c = 512 // DIV
    head = nn.Sequential(nn.Dropout(), nn.Linear(c * 49, 8 * c), nn.ReLU(), nn.Dropout(),
                         nn.Linear(8 * c, 8 * c), nn.ReLU(), nn.Linear(8 * c, 1000))
    m = _randomise(nn.ModuleDict({"features": feats, "classifier": head}))
    w = load(m.state_dict())
    assert (w.spec.config, w.spec.num_classes, w.missing, w.preprocess) == ("E", 1000, (), "caffe")
    eng = Engine(m.state_dict(), device="cpu", backend="torch", dtype="float32")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = head(torch.flatten(feats(x), 1))
    torch.testing.assert_close(eng.logits(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_channel_pruned_vgg16_is_named():
    """neural-style-pt's channel_pruning.pth (a VGG16 pruned per conv: 24, 22 | 41, 51 | 108,
    89, 111 | ...): read as "conv1_2: weight shape (22, 24, 3, 3) does not fit configuration D at
    width 0.375", which did not say why."""
    from torchvision.models.vgg import make_layers
    cfg = [24, 22, "M", 41, 51, "M", 108, 89, 111, "M", 184, 276, 228, "M", 512, 512, 512, "M"]
    sd = {"features." + k: v for k, v in make_layers(cfg).state_dict().items()}
    _refused(sd, r"conv1_2: 22 channels where block 1's convs have 24, 22: a channel-pruned VGG")
    # a VGG at one width throughout still loads, as before
    assert load({"features." + k: v for k, v in make_layers(
        [c if c == "M" else c // DIV for c in VGG16]).state_dict().items()}).spec.width == 1 / DIV


# --- CIFAR VGGs, quantized weights ---------------------------------------------------------------

class _KuangliuVGG(nn.Module):
    """kuangliu/pytorch-cifar's VGG('VGG16'): conv, BatchNorm, ReLU per conv, max pools, an
    AvgPool2d(1, 1), then one Linear(512, 10) on the 1x1 map of a 32x32 image."""

    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for c in VGG16:
            if c == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, c // DIV, 3, padding=1), nn.BatchNorm2d(c // DIV),
                           nn.ReLU(inplace=True)]
                cin = c // DIV
        self.features = nn.Sequential(*layers, nn.AvgPool2d(1, 1))
        self.classifier = nn.Linear(cin, 10)
        _randomise(self)


def test_kuangliu_cifar_vgg_head_is_named_and_its_convs_load_for_features():
    m = _KuangliuVGG()
    sd = m.state_dict()
    ckpt = {"net": {"module." + k: v for k, v in sd.items()}, "acc": 93.1, "epoch": 199}
    _refused(ckpt, r"classifier\.weight \(10, 32\): one Linear layer.*CIFAR VGG.*kuangliu")
    feats = {k: v for k, v in sd.items() if k.startswith("features.")}
    fe = FeatureExtractor(feats, layers=["pool5"], device="cpu", backend="torch",
                          dtype=torch.float32)
    assert load(feats).spec.batch_norm
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m.features(x)
        got = fe(x)["pool5"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_quantized_weights_are_named():
    """A VGG after torch.ao.quantization's convert holds qint8 weights with their scales:
    "convolution weights must be floating point, found torch.qint8" said nothing of why."""
    from torchvision.models.vgg import make_layers
    sd = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # torch deprecates quantized tensors' creation
        for k, v in _randomise(make_layers([8, "M", 16, "M"])).state_dict().items():
            if k.endswith("weight"):
                sd["features." + k] = torch.quantize_per_tensor(v, 0.01, 0, torch.qint8)
                sd["features." + k.replace("weight", "scale")] = torch.tensor(0.01)
            else:
                sd["features." + k] = v
    _refused(sd, r"quantized convolution weights \(qint8.*float model's state dict")

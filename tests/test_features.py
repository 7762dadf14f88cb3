"""Engine.features / feature_maps (Appendix B) and FeatureExtractor, against computations written
out here on torchvision-layout modules."""
import argparse
import inspect

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import (random_bn_statistics, refused_up_front, skip_unless_triton_backend,
                      small_model, write_list_files)
from vggfast import Engine, FeatureExtractor, VGGFastError
from vggfast.errors import MemoryBudgetError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# torchvision `features` indices (config D, no BN): the module after which each tap is read
D_INDEX = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "conv5_3": 28, "pool5": 30,
           "pool2": 9, "conv3_1": 10, "conv4_2": 19, "pool4": 23}


def _views(path, q):
    img = TF.pil_to_tensor(Image.open(path).convert("RGB")).float() / 255
    img = TF.resize(img, q, antialias=True)
    return TF.normalize(torch.stack([img, img.flip(-1)]), MEAN, STD)


def _hand_map(model, x, layer):
    """The tap `layer` of model (torchvision layout) applied densely to x, by hand."""
    with torch.no_grad():
        if layer in D_INDEX:
            return model.features[:D_INDEX[layer] + 1](x)
        c, g = model.classifier, model.spec.grid
        f = model.features(x)
        f = F.conv2d(f, c[0].weight.view(c[0].out_features, -1, g, g), c[0].bias)
        if layer == "fc6":
            return f
        f = F.conv2d(F.relu(f), c[3].weight[:, :, None, None], c[3].bias)
        return f if layer == "fc7" else F.relu(f)


def _hand_descriptor(model, path, layer, scales, pool="avg", aggregate="mean"):
    per = []
    for q in scales:
        m = _hand_map(model, _views(path, q), layer)
        v = m.mean((2, 3)) if pool == "avg" else m.amax((2, 3))
        per.append(v.mean(0))
    v = torch.stack(per).mean(0) if aggregate == "mean" else torch.cat(per)
    return v / v.norm()


@pytest.fixture(scope="module")
def model():
    return small_model("D", num_classes=10)


@pytest.fixture(scope="module")
def eng(model):
    return Engine(model.state_dict())


@pytest.mark.parametrize("layer, pool, aggregate", [("fc7", "avg", "mean"),
                                                    ("relu7", "max", "mean"),
                                                    ("pool5", "avg", "stack"),
                                                    ("relu3_3", "max", "stack")])
def test_features_equal_a_hand_written_appendix_b(eng, model, samples, layer, pool, aggregate):
    scales = (32, 48, 64)
    paths = [samples["cat"], samples["rocket"]]
    got = eng.features([str(p) for p in paths], layer=layer, scales=scales, pool=pool,
                       aggregate=aggregate)
    c = model.spec.fc_width if layer in ("fc7", "relu7") else \
        model.spec.feature_channels if layer == "pool5" else model.spec.layer("conv3_3").cout
    assert got.shape == (2, c * (3 if aggregate == "stack" else 1)) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2))
    for row, p in zip(got, paths):
        want = _hand_descriptor(model, p, layer, scales, pool, aggregate)
        torch.testing.assert_close(row, want, rtol=1e-4, atol=1e-6)


def test_flip_averaged_descriptor_is_mirror_invariant(eng):
    x = torch.rand(3, 50, 77)
    a = eng.features(x, layer="fc6", scales=(32, 40))
    b = eng.features(x.flip(-1), layer="fc6", scales=(32, 40))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    c = eng.features(x, layer="fc6", scales=(32, 40), flip=False)
    d = eng.features(x.flip(-1), layer="fc6", scales=(32, 40), flip=False)
    assert (c - d).abs().max() > 1e-4  # without the flip average the mirror changes it
    raw = eng.features(x, layer="fc6", scales=(32, 40), normalize=False)
    torch.testing.assert_close(raw / raw.norm(), a)


def test_feature_maps_are_the_unpooled_dense_activation(eng, model, samples):
    got = eng.feature_maps(samples["astronaut"], layer="relu4_3", scale=48)
    want = _hand_map(model, _views(samples["astronaut"], 48)[:1], "relu4_3")[0]
    assert got.shape == want.shape == (model.spec.feature_channels, 6, 6)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    both = eng.feature_maps(samples["astronaut"], layer="fc7", scale=64, flip=True)
    assert both.shape == (2, model.spec.fc_width, 2, 2)


def test_feature_maps_over_the_memory_budget_names_the_image(model, tmp_path):
    """feature_maps' refusal named no image ("a 64x3200 (HxW) input (batch 1) needs ..."), nor
    the file; it now reads as localize's and features': "FILE (40x2000, HxW) at scale Q: why",
    "image 0 (...)" for an image that is not a path, with the image's index and the reason."""
    eng = Engine(model.state_dict(), backend="torch", dtype="float32", memory_budget=1 << 20)
    pano = torch.randint(0, 256, (3, 40, 2000), dtype=torch.uint8)
    path = tmp_path / "pano.png"
    Image.fromarray(pano.permute(1, 2, 0).numpy()).save(path)
    for img, who in ((str(path), str(path)), (path, str(path)), (pano, "image 0")):
        for flip, batch in ((False, 1), (True, 2)):
            with pytest.raises(MemoryBudgetError) as err:
                eng.feature_maps(img, layer="relu3_3", scale=64, flip=flip)
            reason = f"(40x2000, HxW) at scale 64: a 64x3200 (HxW) input (batch {batch}) needs "
            assert str(err.value).startswith(f"{who} {reason}"), str(err.value)
            assert err.value.image == 0 and err.value.reason.startswith(reason)
    # within the budget it runs
    assert eng.feature_maps(pano[:, :, :48], layer="relu3_3", scale=64).shape[0] == \
        model.spec.tap_layer("relu3_3").cout


def test_nan_classifier_allows_conv_features_and_refuses_fc7(model, samples):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["classifier.0.weight"][0, 0] = float("nan")  # like torchvision's IMAGENET1K_FEATURES
    eng = Engine(sd)
    got = eng.features(samples["cat"], layer="pool5", scales=(32, 48))
    torch.testing.assert_close(got[0], _hand_descriptor(model, samples["cat"], "pool5", (32, 48)),
                               rtol=1e-4, atol=1e-6)
    for call in (lambda: eng.features(samples["cat"], layer="fc7", scales=32),
                 lambda: eng.feature_maps(samples["cat"], layer="fc6", scale=32),
                 lambda: eng.classify(samples["cat"], scales=32),
                 lambda: FeatureExtractor(sd, layers=["relu3_3", "fc7"])):
        with pytest.raises(VGGFastError, match="fc6"):
            call()
    fx = FeatureExtractor(sd, layers=["pool5"])  # fine, and its fast engine holds no classifier
    assert not any(k.startswith("fc") for k in next(iter(fx._engines.values())).weights.state_dict)


def test_feature_arguments_are_checked(eng):
    x = torch.rand(3, 40, 40)
    assert eng.features(x, layer="relu2_2", scales=16).shape == (1, 8)  # conv: below native OK
    for kwargs, match in [(dict(layer="fc9"), "unknown layer"), (dict(scales=16), "too small"),
                          (dict(pool="median"), "pool"), (dict(aggregate="sum"), "aggregate"),
                          (dict(scales=[]), "empty")]:
        with pytest.raises(VGGFastError, match=match):
            eng.features(x, **{"scales": 32, **kwargs})


@pytest.mark.parametrize("layer, aggregate", [("fc7", "mean"), ("pool5", "stack"),
                                              ("relu2_2", "stack"), ("fc8", "mean")])
def test_no_images_give_no_rows_of_the_width_one_image_gives(eng, layer, aggregate):
    """features([]) is [0, D] float32 on cpu, as classify([]) is []; the settings still checked."""
    scales = (32, 48)
    one = eng.features([torch.rand(3, 40, 50)], layer=layer, scales=scales, aggregate=aggregate)
    none = eng.features([], layer=layer, scales=scales, aggregate=aggregate)
    assert none.shape == (0, one.shape[1]) and none.dtype == one.dtype == torch.float32
    assert none.device == one.device == torch.device("cpu")
    assert torch.cat([none, one]).shape == one.shape
    with pytest.raises(VGGFastError, match="unknown layer"):
        eng.features([], layer="fc9", scales=scales)


# -- FeatureExtractor -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tv16():
    """torchvision's VGG16 feature stack (full width) with random weights and biases."""
    torch.manual_seed(0)
    feats = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"]).eval()
    with torch.no_grad():
        for m in feats:
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                m.bias.uniform_(-0.1, 0.1)
    return feats


def test_feature_extractor_outputs_and_input_grads_equal_torchvision(tv16):
    layers = ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]
    fx = FeatureExtractor({f"features.{k}": v for k, v in tv16.state_dict().items()},
                          layers=layers)
    names = dict(fx.named_parameters())
    assert "conv4_3_weight" in names and "conv5_1_weight" not in names  # stops at relu4_3
    assert not any(p.requires_grad for p in fx.parameters())
    torch.manual_seed(1)
    x = torch.randn(2, 3, 40, 36, requires_grad=True)
    out = fx(x)
    assert list(out) == layers
    probe = {k: torch.randn_like(v) for k, v in out.items()}
    loss = sum((out[k] * probe[k]).sum() for k in layers)
    (g,) = torch.autograd.grad(loss, x)

    x2 = x.detach().clone().requires_grad_(True)
    want = {k: tv16[:D_INDEX[k] + 1](x2) for k in layers}
    loss2 = sum((want[k] * probe[k]).sum() for k in layers)
    (g2,) = torch.autograd.grad(loss2, x2)
    for k in layers:
        torch.testing.assert_close(out[k], want[k], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-4 * g2.abs().max().item())


@pytest.mark.parametrize("layers", [["conv4_2"], ["relu2_2", "pool2", "conv3_1"],
                                    ["relu4_3", "pool4"], ["conv3_1", "relu1_2"]])
def test_both_paths_give_torchvisions_maps_and_input_grads_as_contiguous_nchw(tv16, layers):
    """A pre-ReLU conv tap, the last ReLU of a block before and after its pool, and the first
    conv after a pool: both paths' maps, and the autograd path's input gradient, equal
    torchvision's; every output is contiguous NCHW, so the Gram matrix of PyTorch's
    neural-style tutorial, f.view(N * C, H * W), works on a target made under no_grad."""
    fx = FeatureExtractor({f"features.{k}": v for k, v in tv16.state_dict().items()},
                          layers=layers)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 48, 40, requires_grad=True)
    out = fx(x)
    with torch.no_grad():
        fast = fx(x)
    assert list(out) == list(fast) == layers
    x2 = x.detach().clone().requires_grad_(True)
    want = {k: tv16[:D_INDEX[k] + 1](x2) for k in layers}
    probe = {k: torch.randn_like(v) for k, v in want.items()}
    (g,) = torch.autograd.grad(sum((out[k] * probe[k]).sum() for k in layers), x)
    (g2,) = torch.autograd.grad(sum((want[k] * probe[k]).sum() for k in layers), x2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-4 * g2.abs().max().item())
    for k in layers:
        for t in (out[k], fast[k]):
            torch.testing.assert_close(t, want[k], rtol=1e-4, atol=1e-4)
            assert t.is_contiguous(), (k, t.stride())
            n, c, h, w = t.shape
            f = t.view(n * c, h * w)
            torch.testing.assert_close(f @ f.t(), (want[k].reshape(n * c, h * w)
                                                   @ want[k].reshape(n * c, h * w).t()),
                                       rtol=1e-4, atol=1e-4 * h * w)


def test_feature_extractor_no_grad_path_uses_the_fast_backend(monkeypatch):
    m = small_model("A", num_classes=10, batch_norm=True, seed=4)
    random_bn_statistics(m)
    layers = ["relu2_1", "pool3", "fc7"]
    fx = FeatureExtractor(m, layers=layers)
    x = torch.randn(2, 3, 64, 48, requires_grad=True)
    slow = fx(x)
    assert all(v.requires_grad for v in slow.values())
    backend = next(iter(fx._engines.values()))._backend
    calls = []
    real = backend.run
    monkeypatch.setattr(backend, "run", lambda x, taps: calls.append(tuple(taps)) or real(x, taps))
    with torch.no_grad():
        fast = fx(x)
    fast_detached = fx(x.detach())
    assert calls == [tuple(layers), tuple(layers)]
    for k in layers:
        assert not fast[k].requires_grad
        torch.testing.assert_close(fast[k], slow[k].detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast_detached[k], fast[k])
    # BatchNorm folded: the autograd path's gradient equals the eval-mode module's
    (g,) = torch.autograd.grad(slow["pool3"].square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = m.features[:m.spec.convs[3].index + 4](x2)  # conv3_2, BN, ReLU, pool3
    torch.testing.assert_close(slow["pool3"], ref, rtol=1e-4, atol=1e-5)
    (g2,) = torch.autograd.grad(ref.square().sum(), x2)
    torch.testing.assert_close(g, g2, rtol=1e-4, atol=1e-4 * g2.abs().max().item())
    with pytest.raises(VGGFastError, match="too small"):
        fx(torch.randn(1, 3, 16, 40))
    with pytest.raises(VGGFastError, match="unknown layer"):
        FeatureExtractor(m, layers=["relu9_9"])


def test_feature_extractor_as_a_perceptual_loss(tv16):
    """The usual VGG-loss pattern: the target's features come from the fast (no-grad) path and
    must enter any loss; public outputs are ordinary tensors (not inference tensors), so
    in-place edits and losses that save them for backward work."""
    fx = FeatureExtractor({f"features.{k}": v for k, v in tv16.state_dict().items()},
                          layers=["relu2_2", "relu3_3"])
    torch.manual_seed(0)
    target = torch.randn(1, 3, 32, 32)
    gen = target.clone().requires_grad_(True)
    loss = sum(F.mse_loss(a, b) for a, b in zip(fx(gen).values(), fx(target).values()))
    loss.backward()                                   # target features saved for backward
    assert float(loss.detach()) == pytest.approx(0, abs=1e-10) and gen.grad is not None
    assert fx(target)["relu2_2"].clamp_(min=0.5).min() == 0.5
    eng = Engine(small_model(num_classes=10).state_dict())
    img = torch.rand(3, 40, 40)
    for t in (eng.score_map(img, 32), eng.logits(torch.randn(1, 3, 32, 32)),
              eng.feature_maps(img, "conv3_1", 32), eng.features(img, "relu7", (32,)),
              eng.classify(img, scales=(32,)).probs):
        assert not t.is_inference()


def test_feature_extractor_copies_compiles_and_reloads(tv16, tmp_path):
    import copy
    fx = FeatureExtractor({f"features.{k}": v for k, v in tv16.state_dict().items()},
                          layers=["relu1_2", "relu3_3"])
    x = torch.randn(2, 3, 36, 40)
    with torch.no_grad():
        want = fx(x)
    for clone in (copy.deepcopy(fx), torch.nn.Sequential(fx, torch.nn.Identity())[0]):
        with torch.no_grad():
            got = clone(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k])
    torch.save(fx, tmp_path / "fx.pt")
    loaded = torch.load(tmp_path / "fx.pt", weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["relu3_3"], want["relu3_3"])
    # its own state dict, or the module itself, are weights vggfast reads
    for src in (fx.state_dict(), fx, {f"loss.vgg.{k}": v for k, v in fx.state_dict().items()}):
        with torch.no_grad():
            torch.testing.assert_close(FeatureExtractor(src, layers=["relu3_3"])(x)["relu3_3"],
                                       want["relu3_3"])
    # torch.compile traces the autograd path (the fast engines are plain Python it cannot)
    compiled = torch.compile(fx, backend="eager")
    xg = x.clone().requires_grad_(True)
    out = compiled(xg)
    torch.testing.assert_close(out["relu3_3"], want["relu3_3"], rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad(out["relu3_3"].sum(), xg)
    (g2,) = torch.autograd.grad(fx(xg)["relu3_3"].sum(), xg)
    torch.testing.assert_close(g, g2)


def test_feature_extractor_dtype_refresh_and_errors(tv16):
    sd = {f"features.{k}": v for k, v in tv16.state_dict().items()}
    x = torch.randn(1, 3, 32, 32)
    # the fast path computes in x's dtype unless told: both paths agree, output in x's dtype
    fx = FeatureExtractor(sd, layers=["relu2_2", "relu2_2"])
    assert fx.layers == ["relu2_2"]                               # duplicates merged
    with torch.no_grad():
        fast = fx(x)["relu2_2"]
    torch.testing.assert_close(fast, fx(x.requires_grad_(True))["relu2_2"].detach())
    fx64 = FeatureExtractor(sd, layers=["relu2_2"]).double()
    with torch.no_grad():
        assert fx64(x.detach().double())["relu2_2"].dtype == torch.float64
    # bf16 fast engine: a copy of the weights, re-read after writes through .data on refresh()
    fb = FeatureExtractor(sd, layers=["relu2_2"], dtype=torch.bfloat16)
    xg = x.detach().clone().requires_grad_(True)
    slow = fb(xg)["relu2_2"]                  # the autograd path computes in dtype= too
    slow.sum().backward()
    assert slow.dtype == xg.grad.dtype == torch.float32
    with torch.no_grad():
        before = fb(x.detach())["relu2_2"]
        assert before.dtype == torch.float32 and before.abs().max() > 0
        # STYLE.md's tolerance rule: the fast path's error against the float32 result is at
        # most 2x that of PyTorch's own bf16 result (the autograd path); the two round apart by
        # an ulp of bf16 in a few elements, by CPU (AMD EPYC here, not on a Sapphire Rapids)
        ref = fx(x.detach())["relu2_2"]
        err, err_torch = (before - ref).abs().max(), (slow.detach() - ref).abs().max()
        assert 1e-4 < err <= 2 * err_torch                           # bf16, not fp32
        for p in fb.parameters():
            p.data.zero_()                                  # not seen by the version counter
        fb.refresh()
        assert fb(x.detach())["relu2_2"].abs().max() == 0
        assert all(v.abs().max() > 0 for v in sd.values())    # the caller's weights untouched
    # a failed call does not leave the module broken
    with pytest.raises(Exception):
        with torch.no_grad():
            fx(torch.empty(1, 3, 32, 32, device="meta"))
    with torch.no_grad():
        torch.testing.assert_close(fx(x.detach())["relu2_2"], fast)
    small = FeatureExtractor(sd, layers=["relu2_2"], memory_budget=10_000)
    with pytest.raises(VGGFastError, match=r"FeatureExtractor\(\.\.\., memory_budget"):
        small(x)


def test_feature_extractor_under_autocast_follows_torchvision(tv16):
    """A perceptual loss in mixed-precision training: under autocast both paths compute in its
    dtype and return it, as torchvision's module does, so target and generated features agree."""
    fx = FeatureExtractor({f"features.{k}": v for k, v in tv16.state_dict().items()},
                          layers=["relu2_2", "pool3"])
    x = torch.randn(1, 3, 32, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = fx(x)
            want = tv16[:17](x)                        # conv1_1 .. pool3
        slow = fx(x.clone().requires_grad_(True))
    for k, v in fast.items():
        assert v.dtype == slow[k].dtype == torch.bfloat16
        torch.testing.assert_close(v, slow[k].detach())
    torch.testing.assert_close(fast["pool3"], want)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert fx.double()(x.double())["pool3"].dtype == torch.float64   # autocast leaves fp64


def test_the_default_descriptor_is_fc7_as_design_md_names_it(eng):
    """DESIGN.md's public API: features(imgs, layer="fc7", ...), Appendix B's fc7 output (before
    its ReLU, as every "fc"/"conv" name is); "relu7" is the same blob after the ReLU. The CLI's
    extract has the same default."""
    from vggfast.features import add_cli, extract, features
    assert inspect.signature(type(eng).features).parameters["layer"].default == "fc7"
    assert inspect.signature(features).parameters["layer"].default == "fc7"
    assert inspect.signature(extract).parameters["layer"].default == "fc7"
    sub = argparse.ArgumentParser().add_subparsers()
    add_cli(sub)
    assert sub.choices["extract"].get_default("layer") == "fc7"
    img = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(2))
    default = eng.features(img, scales=(32, 40))
    torch.testing.assert_close(default, eng.features(img, layer="fc7", scales=(32, 40)))
    assert default.min() < 0 and eng.features(img, layer="relu7", scales=(32, 40)).min() >= 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_batch_gives_empty_outputs_on_every_backend(backend):
    """As any nn.Module: [0, 3, H, W] in, [0, C, h, w] out (the Triton kernels take no empty
    launch, so an empty batch runs on plain torch ops)."""
    if backend == "triton":
        skip_unless_triton_backend()
    fx = FeatureExtractor(small_model().state_dict(), layers=["relu1_2", "pool3"], backend=backend)
    with torch.no_grad():
        out = fx(torch.rand(0, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"relu1_2": (0, 4, 32, 32),
                                                          "pool3": (0, 16, 4, 4)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (a second device)")
def test_both_paths_compute_on_the_inputs_device(tv16):
    """Weights on the GPU (the default there) and a CPU input: the fast path always ran on the
    input's device; the autograd path refused it, so a loss and its target disagreed on what
    worked. Both now run there, and gradients still reach parameters on the GPU."""
    sd = {f"features.{k}": v for k, v in tv16.state_dict().items()}
    fx = FeatureExtractor(sd, layers=["relu2_2"], device="cuda")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        fast = fx(x)["relu2_2"]
    xg = x.clone().requires_grad_(True)
    slow = fx(xg)["relu2_2"]
    assert fast.device.type == slow.device.type == "cpu"
    torch.testing.assert_close(slow.detach(), fast, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, tv16[:9](x), rtol=1e-4, atol=1e-5)
    fx.requires_grad_(True)
    fx(x)["relu2_2"].sum().backward()
    assert fx.conv1_1_weight.grad is not None and fx.conv1_1_weight.grad.device.type == "cuda"


def _replica(fx):
    """What nn.DataParallel's replicate() makes of a module on each forward (it needs 2+ GPUs
    itself): a shallow copy whose parameters are fresh copies of the module's."""
    r = fx._replicate_for_data_parallel()
    for name, p in fx._parameters.items():
        setattr(r, name, p.detach().clone())   # as replicate() does: plain tensors, not Parameters
    return r


def test_data_parallel_replicas_reuse_the_engines_and_follow_the_weights(tv16, monkeypatch):
    """Replicas used to rebuild every fast engine (weights copied to the CPU, packed again) on
    every forward, as their fresh parameter copies looked like changed weights; they now use the
    engines of the module they copy, which still follow its parameters."""
    from vggfast import engine as engine_mod
    fx = FeatureExtractor({f"features.{k}": v for k, v in tv16.state_dict().items()},
                          layers=["relu2_2"])
    x = torch.randn(2, 3, 36, 40)
    with torch.no_grad():
        want = fx(x)["relu2_2"]
    built = []
    real = engine_mod.Engine.__init__
    monkeypatch.setattr(engine_mod.Engine, "__init__",
                        lambda self, *a, **k: (built.append(1), real(self, *a, **k))[1])
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(_replica(fx)(x)["relu2_2"], want, rtol=0, atol=0)
        assert built == []
        fx.conv1_1_weight.mul_(2)          # an optimiser step on the module DataParallel wraps
        changed = _replica(fx)(x)["relu2_2"]
    assert len(built) == 1 and not torch.allclose(changed, want)
    with torch.no_grad():
        torch.testing.assert_close(changed, fx(x)["relu2_2"], rtol=0, atol=0)


@pytest.mark.parametrize("layer, q", [("pool5", 64), ("relu3_3", 16)])
def test_a_long_list_of_features_is_checked_before_its_first_chunk_runs(model, tmp_path,
                                                                        monkeypatch, layer, q):
    """features of a list of several chunks refused an image late in it (over the budget, too
    small, not an image) only when its chunk came, after the chunks before it had run; below the
    native size (relu3_3 at 16, one image at a time) also after the images before it in its
    chunk, and an image over the budget was not named. Now, as classify does, every image's size
    is read (a file's header, nothing decoded) and checked before anything runs."""
    import io
    import vggfast.engine as E
    from vggfast.errors import MemoryBudgetError
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    write_list_files(tmp_path, pano_width=4000)
    eng = Engine(model.state_dict(), backend="torch", dtype="float32", memory_budget=1 << 20)
    decoded, runs = [], []
    real_load, real_run, real_one = E.pp.load_image, eng._executor.run, eng._run
    monkeypatch.setattr(E.pp, "load_image", lambda i: decoded.append(i) or real_load(i))
    monkeypatch.setattr(eng._executor, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    monkeypatch.setattr(eng, "_run", lambda *a, **k: runs.append(1) or real_one(*a, **k))
    head = [torch.rand(3, 40, 40), tmp_path / "small.png", torch.rand(3, 40, 48),
            io.BytesIO((tmp_path / "small.png").read_bytes())]
    pano = f"(40x4000, HxW) at scale {q}"
    for last, exc, words in [
            (tmp_path / "pano.png", MemoryBudgetError, f"{tmp_path / 'pano.png'} (image 4) {pano}"),
            (io.BytesIO((tmp_path / "pano.png").read_bytes()), MemoryBudgetError,
             f"image 4 {pano}"),
            (torch.rand(3, 40, 4000), MemoryBudgetError, f"image 4 {pano}"),
            (tmp_path / "thin.png", VGGFastError, "image 4: "),
            (tmp_path / "notes.jpg", VGGFastError, "image 4: ")]:
        err = refused_up_front(lambda: eng.features(head + [last], layer=layer, scales=q), exc,
                               words, decoded, runs)
        if exc is MemoryBudgetError:   # what extract writes for a skipped image
            assert err.reason.startswith(pano) and "memory_budget" in err.reason
    # one chunk: refused before any of its images runs, named
    monkeypatch.setattr(E, "CHUNK_IMAGES", 64)
    runs.clear()
    with pytest.raises(MemoryBudgetError, match=rf"^image 4 \(40x4000, HxW\) at scale {q}"):
        eng.features(head[:3] + [tmp_path / "small.png", torch.rand(3, 40, 4000)], layer=layer,
                     scales=q)
    assert runs == []
    # what passes the checks runs as before: file objects read from where they stood
    want = eng.features(head[:3] + [tmp_path / "small.png"] * 3, layer=layer, scales=q)
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    streams = [io.BytesIO((tmp_path / "small.png").read_bytes()) for _ in range(3)]
    got = eng.features(head[:3] + streams, layer=layer, scales=q)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_features_below_the_native_size_check_each_image_once(model, tmp_path, monkeypatch):
    """Below the native size a long list was checked twice: every image's header size
    (Engine._check_chunks), then each chunk's decoded sizes again. An image decoded at the size
    it was checked at (always so for an exact header: a PNG, a JPEG, a tensor's shape) is now
    checked once; one the header could not size (a stream read once) or sized otherwise (H and
    W swapped: an orientation a header cannot tell, made here by one that says so) is checked
    once decoded, before its chunk runs, as is every image of a list of one chunk. The
    features are those of each image alone."""
    import io
    import vggfast.engine as E
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    Image.new("RGB", (50, 40), (200, 10, 30)).save(tmp_path / "small.png")
    Image.new("RGB", (40, 56), (20, 90, 130)).save(tmp_path / "tall.jpg")
    Image.new("RGB", (48, 40), (70, 70, 250)).save(tmp_path / "swapped.png")
    swapped = tmp_path / "swapped.png"

    class Pipe(io.BytesIO):     # a stream that cannot seek back: no header size
        def seekable(self):
            return False
    torch.manual_seed(0)
    t = torch.rand(3, 40, 40)

    def items():
        return [t, tmp_path / "small.png", tmp_path / "tall.jpg",
                Pipe((tmp_path / "small.png").read_bytes()), swapped]
    eng = Engine(model.state_dict(), backend="torch", dtype="float32")
    want = torch.cat([eng.features(i, layer="relu3_3", scales=16) for i in items()])
    real_size, real_check, calls = E.pp.image_size, eng._check_views, []
    monkeypatch.setattr(E.pp, "image_size", lambda src, exact=False: (
        None if exact else real_size(src)[::-1]) if src == swapped else real_size(src, exact=exact))
    monkeypatch.setattr(eng, "_check_views", lambda sizes, *a: (
        calls.append([tuple(s) for s in sizes]), real_check(sizes, *a))[1])
    got = eng.features(items(), layer="relu3_3", scales=16)
    assert torch.equal(got, want)
    assert calls == [[(40, 40), (40, 50)], [(56, 40)], [(48, 40)],     # the headers
                     [(40, 50)], [(40, 48)]]     # decoded: the stream, the swapped one
    monkeypatch.setattr(E, "CHUNK_IMAGES", 64)
    calls.clear()
    assert torch.equal(eng.features(items(), layer="relu3_3", scales=16), want)
    assert calls == [[(40, 40), (40, 50), (56, 40), (40, 50), (40, 48)]]

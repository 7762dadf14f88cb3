import os

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from conftest import (random_bn_statistics, refused_up_front, skip_unless_triton_backend,
                      small_model, write_list_files)
from vggfast import Engine, FeatureExtractor, VGGFastError
from vggfast.errors import ArgumentError, MemoryBudgetError

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.mark.parametrize("name", ["vgg11", "vgg13", "vgg16", "vgg19", "vgg16_bn"])
def test_logits_equal_torchvision_at_224(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)(num_classes=1000).eval()
    random_bn_statistics(tv)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.uniform_(-0.05, 0.05)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = tv(x)
    got = Engine(tv.state_dict(), backend="torch", dtype="float32").logits(x)
    assert got.shape == (2, 1000)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_logits_at_other_sizes_follow_torchvision_adaptive_pool(tiny):
    x = torch.randn(1, 3, 75, 50)
    with torch.no_grad():
        want = tiny(x)
    torch.testing.assert_close(Engine(tiny.state_dict(), dtype="float32").logits(x), want,
                               rtol=1e-4, atol=1e-6)


def _independent_score_map(model, path, q, flip=False):
    """Dense evaluation written out by hand on the torchvision-layout module (Sec. 3.2)."""
    img = TF.pil_to_tensor(Image.open(path).convert("RGB")).float() / 255
    img = TF.resize(img, q, antialias=True)
    if flip:
        img = img.flip(-1)
    x = TF.normalize(img, MEAN, STD)[None]
    c = model.classifier
    g = model.spec.grid
    with torch.no_grad():
        f = model.features(x)
        f = F.relu(F.conv2d(f, c[0].weight.view(c[0].out_features, -1, g, g), c[0].bias))
        f = F.relu(F.conv2d(f, c[3].weight[:, :, None, None], c[3].bias))
        return F.conv2d(f, c[6].weight[:, :, None, None], c[6].bias)[0]


@pytest.mark.parametrize("photo", ["cat", "rocket", "astronaut"])
def test_score_map_equals_an_independent_dense_evaluation(samples, photo):
    m = small_model("D", num_classes=10, image_size=32)
    eng = Engine(m.state_dict(), backend="torch", dtype="float32")
    for q in (32, 75):
        want = _independent_score_map(m, samples[photo], q)
        got = eng.score_map(samples[photo], scale=q)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert min(got.shape[1:]) >= 2  # a real map, not a single position


def test_classify_equals_an_independent_dense_protocol(samples):
    m = small_model("C", num_classes=10, image_size=32)
    eng = Engine(m.state_dict(), dtype="float32")
    scales = (32, 48, 64)
    for photo in ("coffee", "rocket"):
        posts = []
        for q in scales:
            for flip in (False, True):
                s = _independent_score_map(m, samples[photo], q, flip)
                posts.append(F.softmax(s.mean(dim=(1, 2)), dim=0))
        want = torch.stack(posts).mean(0)
        r = eng.classify(samples[photo], scales=scales, flip=True)
        torch.testing.assert_close(r.probs, want, rtol=1e-4, atol=1e-6)
        assert abs(float(r.probs.sum()) - 1) < 1e-5 and r.probs.dtype == torch.float32
        assert set(r.per_scale) == set(scales)
        top = r.top(3)
        assert [t[0] for t in top] == torch.argsort(want, descending=True)[:3].tolist()
        assert top[0][1] == str(top[0][0]) and top[0][2] >= top[1][2] >= top[2][2]


def test_classify_list_of_mixed_sizes_equals_one_by_one(samples):
    eng = Engine(small_model(num_classes=10).state_dict(), dtype="float32")
    imgs = [samples["cat"], samples["rocket"], samples["astronaut"],
            torch.rand(3, 40, 170)]  # panorama
    batch = eng.classify(imgs, scales=(32, 40))
    assert isinstance(batch, list) and len(batch) == 4
    for img, r in zip(imgs, batch):
        torch.testing.assert_close(r.probs, eng.classify(img, scales=(32, 40)).probs)


def test_long_lists_go_in_chunks_with_the_same_results(samples, monkeypatch, tmp_path):
    """A list longer than CHUNK_IMAGES is decoded, planned and run a chunk at a time (host memory
    holds a chunk's photos); results, and Appendix B features, equal one request for all."""
    import vggfast.engine as E
    eng = Engine(small_model(num_classes=10).state_dict(), dtype="float32")
    imgs = [samples["cat"], samples["rocket"], torch.rand(3, 40, 170), samples["astronaut"],
            torch.rand(3, 50, 33)]
    whole = eng.classify(imgs, scales=(32, 40))
    feats = eng.features(imgs, layer="relu7", scales=(32, 40))
    decoded = []
    real = E.pp.load_image
    monkeypatch.setattr(E.pp, "load_image", lambda i: decoded.append(i) or real(i))
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    plans = []
    plan = eng._executor.plan
    monkeypatch.setattr(eng._executor, "plan", lambda ims, *a: plans.append(len(ims)) or
                        plan(ims, *a))
    chunked = eng.classify(imgs, scales=(32, 40))
    assert plans == [2, 2, 1] and len(decoded) == 5
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a.probs, b.probs)
    torch.testing.assert_close(eng.features(imgs, layer="relu7", scales=(32, 40)), feats)
    # a path that does not exist fails before anything is decoded
    decoded.clear()
    with pytest.raises(VGGFastError, match="not found"):
        eng.classify(imgs + [str(tmp_path / "missing.jpg")], scales=(32,))
    assert decoded == []
    assert eng.classify([], scales=(32,)) == []


def test_imagenet_class_names_ship_with_the_package():
    m = small_model("A", num_classes=1000, width=1 / 32)
    eng = Engine(m.state_dict())
    assert len(eng.class_names) == 1000 and eng.class_names[0] == "tench"
    r = eng.classify(torch.rand(3, 40, 40), scales=32, top_k=2)
    assert len(r.top()) == 2 and r.top(4)[0][1] in eng.class_names


@pytest.mark.parametrize("kwargs, match", [
    (dict(scales=16), "below the network's native size"),
    (dict(scales=16, method="multicrop"), "multi-crop evaluation takes 32x32 crops"),
    (dict(scales=16, method="dense+multicrop"), "below the network's native size"),
    (dict(scales=()), "empty"),
    (dict(scales=[32, 40.5]), "whole number"),
    (dict(scales=[float("nan")]), "whole number"),
    (dict(scales=-32), "below"),
    (dict(scales="256"), "list of integers"),
    (dict(method="tencrop"), "unknown method"),
    (dict(top_k=0), "top_k"),
    (dict(scales=100_000), "memory budget"),
])
def test_bad_requests_are_refused_clearly(tiny, kwargs, match):
    eng = Engine(tiny.state_dict())
    with pytest.raises(VGGFastError, match=match) as err:
        eng.classify(torch.rand(3, 40, 40), **{"scales": 32, **kwargs})
    assert "\n" not in str(err.value)


def test_memory_budget_names_the_limit_and_the_way_to_raise_it(tiny, monkeypatch):
    eng = Engine(tiny.state_dict(), memory_budget=1 << 20)
    with pytest.raises(MemoryBudgetError, match="memory_budget") as err:
        eng.classify(torch.rand(3, 40, 2000), scales=64)
    assert "1.0 MiB" in str(err.value)
    assert err.value.image == 0 and str(err.value) == f"image 0 {err.value.reason}"


def test_memory_budget_refusals_give_every_size_as_hxw(tiny):
    """The planner's refusals gave sizes as HxW, the checks of the paths it does not plan (logits,
    features below the native size, FeatureExtractor, localize) as WxH: a 40x2000 panorama's
    64x3200 view read "a 3200x64 input". Every refusal now says HxW, and says it."""
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32", memory_budget=1 << 20)
    pano = torch.rand(3, 40, 2000)
    for call, words in [
            (lambda: eng.classify(pano, scales=64),
             "image 0 (40x2000, HxW) at scale 64 gives a 64x3200 view that needs "),
            (lambda: eng.features([pano], layer="relu3_3", scales=16),
             "image 0 (40x2000, HxW) at scale 16: a 16x800 (HxW) input (batch 2) needs "),
            (lambda: eng.logits(torch.rand(1, 3, 64, 3200)), "a 64x3200 (HxW) input (batch 1) "),
            (lambda: FeatureExtractor(tiny.state_dict(), memory_budget=1 << 20)(
                torch.rand(1, 3, 64, 3200)), "a 64x3200 (HxW) input (batch 1) ")]:
        with pytest.raises(MemoryBudgetError) as err:
            call()
        assert str(err.value).startswith(words), str(err.value)


def test_unplanned_views_are_checked_once_each(tiny, monkeypatch):
    """Engine._check_views (which names the image) checked each dense view of the paths the
    planner does not plan, and Engine._views then checked it again, for nothing: now one check
    a view (an image at a scale, with its flip), the refusals worded as before."""
    import vggfast.engine as E
    checked = []
    real = E.check_memory

    def count(spec, dtype, budget, batch, h, w, advice):
        checked.append((batch, h, w))
        return real(spec, dtype, budget, batch, h, w, advice)
    monkeypatch.setattr(E, "check_memory", count)
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32")
    imgs = [torch.rand(3, 40, 48), torch.rand(3, 36, 60)]
    eng.features(imgs, layer="relu3_3", scales=(16, 24))     # below native: not planned
    want = [(2, *E.pp.rescaled_size(*x.shape[-2:], q)) for x in imgs for q in (16, 24)]
    assert checked == want
    checked.clear()
    eng.feature_maps(imgs[1], layer="relu3_3", scale=24, flip=False)
    assert checked == [(1, *E.pp.rescaled_size(36, 60, 24))]
    # refused as before, naming the image, before anything runs
    small = Engine(tiny.state_dict(), backend="torch", dtype="float32", memory_budget=1 << 20)
    monkeypatch.setattr(small, "_run", lambda *a: pytest.fail("ran"))
    with pytest.raises(MemoryBudgetError, match=r"^image 1 \(40x2000, HxW\) at scale 16: a "
                                                r"16x800 \(HxW\) input \(batch 2\) needs "):
        small.features([imgs[0], torch.rand(3, 40, 2000)], layer="relu3_3", scales=16)


def test_memory_budget_refusals_below_a_mib_give_bytes_as_the_planner_does(tiny):
    """The engine's own checks (logits, FeatureExtractor, the paths the planner does not plan)
    wrote sizes below 1 MiB as "0.0 MiB": a 100 kB budget and the input over it read the same.
    They now write whole bytes there, as the planner's refusals (csrc fmt_bytes) do."""
    need = Engine(tiny.state_dict(), backend="torch", dtype="float32").activation_bytes(1, 40, 40)
    assert need < 1 << 20
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32", memory_budget=need - 1)
    with pytest.raises(MemoryBudgetError) as err:
        eng.logits(torch.rand(1, 3, 40, 40))
    msg = str(err.value)
    assert f"needs {need} bytes of activations, over the memory budget of {need - 1} bytes" \
        in msg and "MiB" not in msg, msg
    # the planner's refusal of the same budget writes it the same way
    with pytest.raises(MemoryBudgetError, match=f"over the memory budget of {need - 1} bytes"):
        eng.classify(torch.rand(3, 40, 2000), scales=64)


def test_a_callers_autocast_region_does_not_change_the_engines_dtype(tiny):
    """Engine computes in its own dtype (the Triton kernels ignore autocast; so must the
    reference): inside torch.autocast the answers are the same, not bf16 ones."""
    eng = Engine(tiny.state_dict())
    img, x = torch.rand(3, 40, 48), torch.randn(2, 3, 32, 32)

    def answers():
        return [eng.classify(img, scales=(32, 40)).probs, eng.logits(x), eng.score_map(img, 40),
                eng.features(img, "relu7", (32,))]
    want = answers()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = answers()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_an_image_over_the_budget_is_named_by_its_list_index_and_file(tiny, tmp_path, monkeypatch):
    """The planner sees a chunk; its error names the image's index in the whole list, its file."""
    import vggfast.engine as E
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    Image.new("RGB", (2000, 40)).save(tmp_path / "pano.png")
    Image.new("RGB", (50, 40)).save(tmp_path / "small.png")
    eng = Engine(tiny.state_dict(), memory_budget=1 << 20)
    items = [torch.rand(3, 40, 40), tmp_path / "small.png", torch.rand(3, 40, 48),
             tmp_path / "pano.png"]
    with pytest.raises(MemoryBudgetError) as err:
        eng.classify(items, scales=64)
    assert str(err.value).startswith(
        f"{tmp_path / 'pano.png'} (image 3) (40x2000, HxW) at scale 64 ")
    assert err.value.image == 3 and "memory_budget" in err.value.reason
    with pytest.raises(MemoryBudgetError, match=r"^image 1 \(40x2000, HxW\) at scale 64 "):
        eng.classify([torch.rand(3, 40, 40), torch.rand(3, 40, 2000)], scales=64)
    # plan and score_map name the file as classify does
    for call in (lambda: eng.plan(items, scales=64),
                 lambda: eng.score_map(tmp_path / "pano.png", scale=64)):
        with pytest.raises(MemoryBudgetError) as err:
            call()
        assert str(err.value).startswith(f"{tmp_path / 'pano.png'} (image ")


def test_a_long_list_is_checked_before_its_first_chunk_runs(tiny, tmp_path, monkeypatch):
    """A list of several chunks refused an image late in it (over the budget, too small, not an
    image) only when its chunk came, after the chunks before it had run. Now every image's size
    is read (a file's header, nothing decoded) and planned before the first chunk runs."""
    import io
    import vggfast.engine as E
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    write_list_files(tmp_path)
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32", memory_budget=1 << 20)
    decoded, runs = [], []
    real_load, real_run = E.pp.load_image, eng._executor.run
    monkeypatch.setattr(E.pp, "load_image", lambda i: decoded.append(i) or real_load(i))
    monkeypatch.setattr(eng._executor, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    head = [torch.rand(3, 40, 40), tmp_path / "small.png", torch.rand(3, 40, 48),
            io.BytesIO((tmp_path / "small.png").read_bytes())]
    for last, exc, words in [
            (tmp_path / "pano.png", MemoryBudgetError, f"{tmp_path / 'pano.png'} (image 4) "
                                                       "(40x2000, HxW) at scale 64 "),
            (io.BytesIO((tmp_path / "pano.png").read_bytes()), MemoryBudgetError,
             "image 4 (40x2000, HxW) at scale 64 "),
            (torch.rand(3, 40, 2000), MemoryBudgetError, "image 4 (40x2000, HxW) at scale 64 "),
            (tmp_path / "thin.png", VGGFastError, "image 4: "),
            (tmp_path / "notes.jpg", VGGFastError, "image 4: ")]:
        refused_up_front(lambda: eng.classify(head + [last], scales=64), exc, words, decoded,
                         runs)
    assert "both sides must be at least 8" in str(
        pytest.raises(VGGFastError, eng.classify, head + [tmp_path / "thin.png"], scales=64).value)
    # what passes the checks runs as before: file objects read from where they stood
    streams = [io.BytesIO((tmp_path / "small.png").read_bytes()) for _ in range(3)]
    monkeypatch.setattr(E, "CHUNK_IMAGES", 64)
    want = [r.probs for r in eng.classify(head[:3] + [tmp_path / "small.png"] * 3, scales=64)]
    monkeypatch.setattr(E, "CHUNK_IMAGES", 2)
    for b in streams:
        b.seek(0)
    got = [r.probs for r in eng.classify(head[:3] + streams, scales=64)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    # a stream that cannot be read twice is not read ahead; it is checked when its chunk comes
    reads, runs[:] = [], []
    pipe = type("Pipe", (), {"read": lambda self: reads.append(1) or
                             (tmp_path / "pano.png").read_bytes()})
    with pytest.raises(VGGFastError, match="^image 4: .*notes.jpg: not an image file"):
        eng.classify(head[:3] + [pipe(), tmp_path / "notes.jpg"], scales=64)
    assert reads == [] and runs == []
    with pytest.raises(MemoryBudgetError, match=r"^image 3 \(40x2000, HxW\) at scale 64 "):
        eng.classify(head[:3] + [pipe(), head[0]], scales=64)
    assert len(runs) == 1 and reads == [1]   # the first chunk ran before its chunk was read


def test_multicrop_at_a_huge_scale_is_refused_before_the_rescale(tiny):
    """The crops fit any budget; the rescaled image they are cut from (here 6000x6000 float32,
    412 MiB, allocated before) must fit it too, and the refusal names the image."""
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32", memory_budget=8 << 20)
    imgs = [torch.rand(3, 40, 48), torch.rand(3, 40, 40)]
    for call in (lambda: eng.classify(imgs, scales=(32, 6000), method="multicrop"),
                 lambda: eng.plan(imgs, scales=6000, method="multicrop")):
        with pytest.raises(MemoryBudgetError, match=r"^image 0 \(40x48, HxW\) at scale 6000 is "
                                                    r"rescaled to 6000x7200 .*memory_budget"):
            call()
    eng.classify(imgs, scales=(32, 96), method="multicrop")   # 96x115 float32 fits 8 MiB


def test_a_memory_budget_past_int64_is_no_limit(tiny, monkeypatch):
    x = torch.rand(3, 40, 48)
    want = Engine(tiny.state_dict(), backend="torch", dtype="float32").classify(x, scales=32)
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "1e30")
    for eng in (Engine(tiny.state_dict(), backend="torch", dtype="float32", memory_budget=1e30),
                Engine(tiny.state_dict(), backend="torch", dtype="float32")):
        torch.testing.assert_close(eng.classify(x, scales=32).probs, want.probs)
        assert eng.plan(x, scales=32).budget_bytes == (1 << 63) - 1


def test_plan_of_a_list_holds_one_decoded_image_at_a_time(tiny, monkeypatch):
    """Engine.plan needs only the sizes: it held every decoded image of the list at once (the
    images here are PNGs opened by the caller, which plan decodes to size: their chunks after
    the pixels are not read again)."""
    import io
    import weakref
    import vggfast.engine as E
    alive, most = weakref.WeakSet(), []
    real = E.pp.load_image

    def load(item):
        x = real(item)
        alive.add(x)
        most.append(len(alive))
        return x

    monkeypatch.setattr(E.pp, "load_image", load)
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32")
    imgs = []
    for k in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40 + k)).save(buf, "PNG")
        imgs.append(Image.open(buf))
    plan = eng.plan(imgs, scales=(32, 40))
    assert len(most) == 6 and max(most) == 1 and plan.num_images == 6
    decoded = [real(i) for i in imgs]
    assert eng._executor.plan(decoded, (32, 40), True, "dense") is plan  # classify's cached plan


def _png_with_a_chunk_after_its_pixels(path, im, chunk_type, body):
    """Save `im` as PNG with one more chunk just before IEND (after the pixels, IDAT)."""
    import struct
    import zlib
    im.save(path)
    data = path.read_bytes()
    crc = struct.pack(">I", zlib.crc32(chunk_type + body) & 0xFFFFFFFF)
    path.write_bytes(data[:-12] + struct.pack(">I", len(body)) + chunk_type + body + crc
                     + data[-12:])


def test_plan_of_files_reads_headers_where_they_give_the_decoded_size(tiny, tmp_path,
                                                                      monkeypatch):
    """Engine.plan decoded every file just to learn its size. A file whose header gives the
    decoded size exactly (a JPEG, EXIF rotation and all; a WebP; a PNG, its EXIF before or
    after its pixels; a TIFF) is now sized from it, not decoded, and the plan is the decoded
    images' plan, summary and all. Where the header cannot promise H and W the right way round,
    and a swapped H x W is another plan, the file is still decoded: an animated PNG (decoding
    its first frame stops before EXIF at the end)."""
    import vggfast.engine as E
    exif = Image.Exif()
    exif[0x0112] = 6                                     # stored 60x40, shown 40x60
    left = Image.Exif()
    left[0x0112] = 8
    photo = Image.new("RGB", (60, 40), (200, 30, 30))
    header = {"turned.jpg": True, "gray.jpg": True, "photo.webp": True, "photo.png": True,
              "gray.png": True, "turned.png": True, "left.png": True, "turned.tiff": True,
              "anim.png": False}
    photo.save(tmp_path / "turned.jpg", exif=exif.tobytes())
    photo.convert("L").resize((50, 40)).save(tmp_path / "gray.jpg")
    photo.resize((70, 40)).save(tmp_path / "photo.webp")
    photo.resize((40, 90)).save(tmp_path / "photo.png")
    photo.convert("L").resize((45, 40)).save(tmp_path / "gray.png")
    _png_with_a_chunk_after_its_pixels(tmp_path / "turned.png", photo, b"eXIf", exif.tobytes())
    photo.resize((50, 40)).save(tmp_path / "left.png", exif=left.tobytes())    # before IDAT
    photo.save(tmp_path / "turned.tiff", exif=exif.tobytes())
    photo.save(tmp_path / "anim.png", save_all=True, append_images=[photo.resize((60, 40))],
               exif=exif.tobytes())
    paths = [tmp_path / name for name in header]
    decoded = [E.pp.load_image(p) for p in paths]
    assert [tuple(x.shape[-2:]) for x in decoded[5:8]] == [(60, 40), (50, 40), (60, 40)]
    assert [E.pp.image_size(p) for p in paths] == [tuple(x.shape[-2:]) for x in decoded]
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32")
    methods = ("dense", "dense+multicrop")
    want = {m: str(eng.plan(decoded, scales=(32, 40), method=m)) for m in methods}
    eng._executor.scheduler.clear()      # planned anew from the files' sizes, not a cache hit
    read = []
    real = E.pp.load_image

    def load(item):
        read.append(os.path.basename(item))
        return real(item)
    monkeypatch.setattr(E.pp, "load_image", load)
    for m in methods:
        read.clear()
        assert str(eng.plan(paths, scales=(32, 40), method=m)) == want[m]
        assert read == [name for name, exact in header.items() if not exact]
    read.clear()
    plan = eng.plan(str(paths[0]), scales=32)                    # one path, given as a str
    assert [(v.height, v.width) for v in plan.views] == [(48, 32), (48, 32)] and read == []


def test_the_planners_sizing_has_a_name_of_its_own(tmp_path, monkeypatch):
    """engine.decoded_size(items, k) and preprocess.decoded_size(im, encoded) were two functions
    of one name and different arguments. The engine's (a request's item: header where exact,
    else decoded) is item_size_or_decode now; each gives the size load_item decodes to."""
    import numpy as np

    import vggfast.engine as E
    assert not hasattr(E, "decoded_size")
    photo = Image.new("RGB", (60, 40), (200, 30, 30))
    photo.save(tmp_path / "photo.jpg")
    photo.save(tmp_path / "anim.png", save_all=True, append_images=[photo])
    items = [tmp_path / "photo.jpg", tmp_path / "anim.png", np.zeros((20, 30, 3), np.uint8)]
    read = []
    real = E.pp.load_image
    monkeypatch.setattr(E.pp, "load_image", lambda item: read.append(item) or real(item))
    assert [E.item_size_or_decode(items, k) for k in range(3)] == [(40, 60), (40, 60), (20, 30)]
    assert read == [tmp_path / "anim.png"]      # the header of an animated PNG is not exact
    with Image.open(tmp_path / "photo.jpg") as im:
        assert E.pp.decoded_size(im, tmp_path / "photo.jpg") == (40, 60)


def test_plan_sizes_arrays_tensors_and_pil_images_without_decoding(tiny, monkeypatch):
    """Engine.plan decoded (load_image: a copy, a float check) every image that was not a path
    to learn its size, though an array's or tensor's shape is that size, and so is a PIL
    image's where its header tells it exactly (made in memory, a JPEG; EXIF orientation
    applied). Those are now sized without load_image and planned as the decoded images are;
    a PNG PIL image the caller opened is still decoded (its chunks are not re-read)."""
    import io

    import numpy as np

    import vggfast.engine as E
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (60, 40)).save(buf, "JPEG", exif=exif.tobytes())
    png = io.BytesIO()
    Image.new("RGB", (44, 40)).save(png, "PNG")
    made = Image.new("RGB", (52, 40))
    made.info["exif"] = exif.tobytes()                   # orientation 6, on an in-memory image
    items = [torch.rand(3, 40, 48), torch.zeros(3, 41, 50, dtype=torch.uint8),
             np.zeros((42, 56, 3), np.uint8), np.zeros((43, 40), np.float32),
             Image.new("L", (40, 45)), made, Image.open(buf), buf.getvalue(),
             Image.open(png)]
    decoded = [E.pp.load_image(i) for i in items]
    assert [tuple(x.shape[-2:]) for x in decoded][5:7] == [(52, 40), (60, 40)]
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32")
    want = str(eng.plan(decoded, scales=(32, 40)))
    eng._executor.scheduler.clear()
    read = []
    real = E.pp.load_image
    monkeypatch.setattr(E.pp, "load_image", lambda item: read.append(item) or real(item))
    assert str(eng.plan(items, scales=(32, 40))) == want
    assert [id(i) for i in read] == [id(items[-1])]      # (PIL images' == compares pixels)
    # a dtype load_image refuses is refused by the plan too, naming the image, not when it runs
    from vggfast.errors import ImageError
    for bad, words in [(torch.zeros(3, 40, 40, dtype=torch.int64), "tensor images must be"),
                       (np.zeros((40, 40, 3), np.int32), "numpy images must be")]:
        with pytest.raises(ImageError, match=f"^image 1: {words}"):
            eng.plan([items[0], bad], scales=32)


def test_plan_of_an_empty_list_is_empty(tiny):
    """classify([]) gives []; plan([]) raised the planner's "no images to plan"."""
    eng = Engine(tiny.state_dict(), backend="torch", dtype="float32")
    assert eng.classify([], scales=(32, 40)) == []
    for imgs in ([], ()):
        plan = eng.plan(imgs, scales=(32, 40), flip=False, method="dense+multicrop")
        assert (plan.num_images, plan.views, plan.batches, plan.arenas) == (0, (), (), ())
        assert (plan.peak_bytes, plan.naive_bytes, plan.flops) == (0, 0, 0)
        assert (plan.scales, plan.flip, plan.method) == ((32, 40), False, "dense+multicrop")
        assert plan.budget_bytes == eng.memory_budget and plan.ops[-1].name == "fc8"
        assert "0 images" in str(plan) and "0 views" in str(plan) and "0 batches" in str(plan)
        assert "peak activation memory 0 bytes" in str(plan)
    assert eng.plan([], scales=32).key != eng.plan([], scales=32, flip=False).key
    with pytest.raises(ArgumentError, match="below the network's native size"):
        eng.plan([], scales=16)    # the request is checked as one of images is


def test_memory_budget_from_the_environment(tiny, monkeypatch):
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "2GiB")
    assert Engine(tiny.state_dict()).memory_budget == 2 << 30
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "lots")
    with pytest.raises(ArgumentError):
        Engine(tiny.state_dict())


@pytest.mark.parametrize("kwargs", [dict(backend="tensorrt"), dict(dtype="int8"),
                                    dict(device="tpu"), dict(preprocess="imagenet"),
                                    dict(config="vgg15"), dict(memory_budget=-1)])
def test_bad_engine_arguments(tiny, kwargs):
    with pytest.raises(VGGFastError):
        Engine(tiny.state_dict(), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_requested_without_cuda(tiny):
    with pytest.raises(VGGFastError, match="CUDA"):
        Engine(tiny.state_dict(), device="cuda")


def test_logits_input_checks(tiny):
    eng = Engine(tiny.state_dict())
    for bad in (torch.rand(3, 32, 32), torch.rand(1, 4, 32, 32), torch.zeros(1, 3, 32, 32,
                dtype=torch.uint8), torch.rand(1, 3, 16, 16)):
        with pytest.raises(ArgumentError):
            eng.logits(bad)


def test_triton_backend_classifies_like_the_reference(samples):
    """Engine(backend="triton") end to end (the Triton interpreter on CPU) vs backend="torch"."""
    skip_unless_triton_backend()
    m = small_model("D", num_classes=10)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fast = Engine(m.state_dict(), backend="triton", device=dev, dtype="float32")
    ref = Engine(m.state_dict(), backend="torch", device=dev, dtype="float32")
    imgs = [samples["cat"], samples["rocket"]]
    for a, b in zip(fast.classify(imgs, scales=(32, 40)), ref.classify(imgs, scales=(32, 40))):
        torch.testing.assert_close(a.probs, b.probs, rtol=1e-4, atol=1e-6)


def test_triton_features_grouped_equal_the_reference(samples):
    """Engine.features on the triton backend (grouped waves, the pre-ReLU fc7) equals the torch
    backend's."""
    skip_unless_triton_backend()
    sd = small_model("D", num_classes=10).state_dict()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    fast = Engine(sd, backend="triton", device=dev, dtype="float32")
    ref = Engine(sd, backend="torch", device=dev, dtype="float32")
    imgs = [samples["cat"], torch.rand(3, 40, 90)]
    got = fast.features(imgs, layer="fc7", scales=(32, 40), flip=False)
    want = ref.features(imgs, layer="fc7", scales=(32, 40), flip=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_classify_from_several_threads_equals_one_at_a_time():
    """A server's worker threads share one Engine: requests of one shape share the executor's
    arena (and graphs on CUDA), so concurrent calls must not overwrite each other's activations.
    Each thread's answer equals the one-at-a-time answer for its own image."""
    import threading
    skip_unless_triton_backend()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    eng = Engine(small_model("D", num_classes=10).state_dict(), backend="triton", device=dev,
                 dtype="float32")
    torch.manual_seed(3)
    imgs = [torch.rand(3, 40, 52) for _ in range(3)]          # one size: one plan, one arena
    want = [eng.classify(im, scales=(32,)).probs for im in imgs]
    got, errors = {}, []

    def work(i):
        try:
            for k in range(2):
                got[i, k] = eng.classify(imgs[i], scales=(32,)).probs
        except Exception as exc:          # noqa: BLE001 -- reported below, with its thread
            errors.append(f"thread {i}: {exc!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(imgs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (i, _), p in got.items():
        torch.testing.assert_close(p, want[i], rtol=1e-5, atol=1e-7)


def test_executor_waves_group_batches_within_the_budget():
    """With the triton backend, a plan's batches run in waves (one grouped forward each) whose
    arenas fit the budget together, every batch once and in order; the torch backend, which
    cannot group, runs batch by batch."""
    skip_unless_triton_backend()
    sd = small_model("D", num_classes=10).state_dict()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    imgs = [torch.rand(3, 60, 80), torch.rand(3, 80, 60), torch.rand(3, 40, 170)]
    big = Engine(sd, backend="triton", device=dev, dtype="float32").plan(imgs, (32, 40, 48))
    for budget in (None, 2 * max(a.total_bytes for a in big.arenas)):
        eng = Engine(sd, backend="triton", device=dev, dtype="float32", memory_budget=budget)
        plan = eng.plan(imgs, scales=(32, 40, 48))
        waves = eng._executor.waves(plan, "fc8")
        assert [b.index for w in waves for b in w] == [b.index for b in plan.batches]
        for w in waves:
            assert len(w) == 1 or sum(plan.arenas[b.arena].total_bytes
                                      for b in w) <= plan.budget_bytes
        if budget is None:
            assert len(waves) == 1 < len(plan.batches)
        else:
            assert 1 < len(waves) < len(plan.batches)
    ref = Engine(sd, backend="torch", device=dev, dtype="float32")
    plan = ref.plan(imgs, scales=(32, 40))
    assert ref._executor.waves(plan, "fc8") == [[b] for b in plan.batches]


def test_executor_arena_once_per_plan_key(samples):
    """Without CUDA graphs, grouped waves take their intermediates from one arena that the
    executor allocates once per plan key: a repeated request reuses it, another replaces it."""
    skip_unless_triton_backend()
    sd = small_model("D", num_classes=10).state_dict()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    eng = Engine(sd, backend="triton", device=dev, dtype="float32", cuda_graphs=False)
    ex = eng._executor
    imgs = [torch.rand(3, 40, 50), torch.rand(3, 50, 40)]
    first = eng.classify(imgs, scales=(32,), flip=False)
    arena, key = ex._arena, ex._arena_key
    assert arena is not None and key == eng.plan(imgs, scales=(32,), flip=False).key
    again = eng.classify(imgs, scales=(32,), flip=False)
    assert ex._arena is arena
    for a, b in zip(first, again):
        torch.testing.assert_close(a.probs, b.probs, rtol=0, atol=0)
    eng.classify(imgs[::-1] + imgs[:1], scales=(32,), flip=False)
    assert ex._arena_key != key
    # a lone batch runs on the C++ planner's layout, in the same arena
    calls = []
    real = eng._backend.run_planned
    eng._backend.run_planned = lambda *a: calls.append(a) or real(*a)
    one = eng.classify(imgs[0], scales=(32,))
    assert len(calls) == 1 and calls[0][3] is ex._arena
    ref = Engine(sd, backend="torch", device=dev, dtype="float32").classify(imgs[0], scales=(32,))
    torch.testing.assert_close(one.probs, ref.probs, rtol=1e-4, atol=1e-6)


# --- CUDA-graph cache (vggfast.executor.GraphCache) ---------------------------------------------

def test_graph_cache_eager_first_capture_second_replay_after_and_lru(monkeypatch):
    """The cache's bookkeeping with only the CUDA recording replaced by a recorder (CPU): a
    shape's first batch runs eagerly, its second is captured and replayed, later ones replay; the
    cache keeps at most `capacity` graphs and `max_bytes` of static tensors; a batch larger than
    max_bytes is never captured; a failed capture switches the cache off with one warning."""
    from vggfast.executor import GraphCache

    class FakeGraph:
        def __init__(self, fn, static_in, static_out):
            self.fn, self.static_in, self.static_out = fn, static_in, static_out

        def replay(self):
            new = self.fn(self.static_in)
            if isinstance(new, torch.Tensor):
                self.static_out.copy_(new)
            else:
                for out, t in zip(self.static_out, new):
                    out.copy_(t)

    def fake_record(self, fn, static_in):
        out = fn(static_in)
        return out, FakeGraph(fn, static_in, out)

    monkeypatch.setattr(GraphCache, "_record", fake_record)
    forward = lambda x: x * 2  # noqa: E731
    cache = GraphCache(capacity=2)
    a, b, c = torch.rand(2, 3), torch.rand(4, 3), torch.rand(5, 3)
    torch.testing.assert_close(cache.run(forward, a, "fc8"), a * 2)         # eager
    assert cache.captures == 0 and cache.replays == 0
    a2 = torch.rand(2, 3)
    torch.testing.assert_close(cache.run(forward, a2, "fc8"), a2 * 2)       # capture + replay
    assert cache.captures == 1 and cache.replays == 1
    a3 = torch.rand(2, 3)
    torch.testing.assert_close(cache.run(forward, a3, "fc8"), a3 * 2)       # replay (new data)
    assert cache.captures == 1 and cache.replays == 2
    cache.run(forward, a3, "pool5")                                          # other tap: new key
    assert cache.captures == 1
    for x in (b, b, c, c):                                                   # two more shapes
        cache.run(forward, x, "fc8")
    assert cache.captures == 3 and len(cache.graphs) == 2                    # LRU bound
    assert ((2, 3), torch.float32, "fc8") not in cache.graphs
    assert cache.held_bytes == sum(e[3] for e in cache.graphs.values()) == 2 * 4 * (12 + 15)

    small = GraphCache(max_bytes=2 * 4 * 12)      # room for the static in + out of one [3, 4]
    for x in [torch.rand(3, 4)] * 2 + [torch.rand(2, 4)] * 2:
        torch.testing.assert_close(small.run(forward, x, "fc8"), x * 2)
    assert list(small.graphs) == [((2, 4), torch.float32, "fc8")]          # the older went
    big = torch.rand(7, 4)                                                   # > max_bytes alone
    for _ in range(3):
        torch.testing.assert_close(small.run(forward, big, "fc8"), big * 2)
    assert small.captures == 2

    # a grouped wave: a tuple of inputs in, a list of outputs out, keyed by all their shapes
    waves = GraphCache()
    fwd = lambda ts: [t * 3 for t in ts]  # noqa: E731
    for i in range(3):
        ts = (torch.rand(2, 3), torch.rand(1, 5))
        got = waves.run(fwd, ts, "fc8")
        for g, t in zip(got, ts):
            torch.testing.assert_close(g, t * 3)
    assert waves.captures == 1 and waves.replays == 2
    assert list(waves.graphs) == [((((2, 3), torch.float32), ((1, 5), torch.float32)), "fc8")]
    assert waves.held_bytes == 2 * 4 * (6 + 5)
    waves.run(fwd, (torch.rand(2, 3), torch.rand(1, 6)), "fc8")     # another wave shape: eager
    assert waves.captures == 1

    monkeypatch.undo()
    if not torch.cuda.is_available():
        # the real recording of a CPU tensor fails inside torch.cuda: warn and turn off
        cache2 = GraphCache()
        cache2.seen[((2, 3), torch.float32, "fc8")] = 1
        with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
            out = cache2.run(lambda x: x + 1, a, "fc8")
        torch.testing.assert_close(out, a + 1)
        assert cache2.disabled and not cache2.graphs
        torch.testing.assert_close(cache2.run(lambda x: x + 1, a, "fc8"), a + 1)


def test_graph_static_inputs_outlive_a_callers_inference_mode(monkeypatch):
    """A graph captured under the caller's torch.inference_mode is replayed by a later request
    outside it: its static inputs, copied into at every replay, are normal tensors (the CUDA
    recording replaced by a recorder whose replay writes its output as kernels do)."""
    from vggfast.executor import GraphCache

    def fake_record(self, fn, static_in):
        out = fn(static_in)

        class Replay:
            def replay(self):
                with torch.inference_mode():    # kernels write without autograd's checks
                    out.copy_(fn(static_in))
        return out, Replay()

    monkeypatch.setattr(GraphCache, "_record", fake_record)
    cache = GraphCache()
    with torch.inference_mode():
        for _ in range(2):                       # eager, then captured
            cache.run(lambda t: t * 2, torch.rand(2, 3), "fc8")
    assert cache.captures == 1
    x = torch.rand(2, 3)
    torch.testing.assert_close(cache.run(lambda t: t * 2, x, "fc8"), x * 2)
    assert cache.replays == 2


def test_executor_buffers_outlive_a_callers_inference_mode():
    """Requests under torch.inference_mode and outside it may alternate (a server's handlers):
    what the executor keeps from the first ones (its arena, and on CUDA a graph's static inputs)
    is still writable by a later one outside it, which gives the same answer."""
    skip_unless_triton_backend()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sd = small_model("D", num_classes=10).state_dict()
    img = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(4))
    for graphs in ((False, True) if dev == "cuda" else (False,)):
        eng = Engine(sd, backend="triton", device=dev, dtype="float32", cuda_graphs=graphs)
        with torch.inference_mode():
            want = [eng.classify(img, scales=(32, 40)).probs for _ in range(2)]
        assert graphs or not eng._executor._arena.is_inference()
        torch.testing.assert_close(eng.classify(img, scales=(32, 40)).probs, want[0],
                                   rtol=0, atol=0)


def test_graph_capture_runs_on_a_stream_of_the_inputs_device(monkeypatch):
    """GraphCache captures on its own stream of the input's device, warmed up there first, not
    on torch.cuda.graph's process-wide default capture stream (made on whichever device was
    current at the first capture: an engine on cuda:1 would capture on cuda:0). CUDA faked."""
    import contextlib

    from vggfast.executor import GraphCache
    made, events = [], []

    class FakeStream:
        def __init__(self, device=None):
            self.device = device
            made.append(self)

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def on_stream(s):
        events.append(("run on", s))
        yield

    @contextlib.contextmanager
    def capture(graph, pool=None, stream=None, **kw):
        events.append(("capture on", stream))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device))
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    x = torch.rand(2, 3)
    out, graph = GraphCache()._record(lambda t: t * 2, x)
    side = made[0]
    assert side.device == x.device and graph == "graph"
    assert events == [("run on", side), ("capture on", side)]
    torch.testing.assert_close(out, x * 2)


def test_engine_cuda_graphs_option():
    eng = Engine(small_model(num_classes=10).state_dict(), device="cpu")
    assert eng.cuda_graphs is False and eng.info()["cuda_graphs"] is False
    assert eng._executor.graphs is None
    with pytest.raises(ArgumentError, match="cuda_graphs=True needs a CUDA device"):
        Engine(small_model(num_classes=10).state_dict(), device="cpu", cuda_graphs=True)
    with pytest.raises(ArgumentError, match="cuda_graphs must be"):
        Engine(small_model(num_classes=10).state_dict(), cuda_graphs="yes")


def test_cuda_devices_resolve_to_the_index_their_tensors_report(monkeypatch):
    """Engine.device is cuda:N, never a bare "cuda" (torch.device("cuda") != cuda:0, the device
    its tensors report), for device="cuda" and for the default device alike (CUDA faked)."""
    from vggfast import engine as E
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for dev in (None, "cuda", torch.device("cuda")):
        assert E._resolve_device(dev) == torch.device("cuda", 1), dev
    assert E._resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ArgumentError, match="does not exist"):
        E._resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_an_engine_on_the_second_gpu_runs_there(samples):
    """Engine(device="cuda:1") launches its kernels (and captures its graphs) on cuda:1 while
    cuda:0 is the current device, and answers as an engine on cuda:0 does."""
    sd = small_model(num_classes=10).state_dict()
    imgs = [samples["cat"], torch.rand(3, 40, 90)]
    torch.cuda.set_device(0)
    first = Engine(sd, device="cuda:0")
    want = first.classify(imgs, scales=(32, 40))
    first.classify(imgs, scales=(32, 40))      # a capture on cuda:0 first
    assert first._executor.graphs.captures > 0
    for graphs in (False, True):
        eng = Engine(sd, device="cuda:1", cuda_graphs=graphs)
        assert eng.device == torch.device("cuda:1") and eng._backend.device == eng.device
        for _ in range(3):
            for g, w in zip(eng.classify(imgs, scales=(32, 40)), want):
                torch.testing.assert_close(g.probs, w.probs, rtol=1e-3, atol=1e-4)
        if graphs:     # captured there, not fallen back to eager
            cache = eng._executor.graphs
            assert cache.captures > 0 and cache.replays > 0 and not cache.disabled
    assert torch.cuda.current_device() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_graph_replay_equals_eager(samples, backend):
    """A repeated mixed-size request replays CUDA graphs and gives the eager engine's results."""
    sd = small_model(num_classes=10).state_dict()
    imgs = [samples["cat"], samples["rocket"], samples["astronaut"], torch.rand(3, 40, 170)]
    eager = Engine(sd, device="cuda", backend=backend, cuda_graphs=False)
    graphs = Engine(sd, device="cuda", backend=backend)
    assert graphs.cuda_graphs
    want = eager.classify(imgs, scales=(32, 40))
    for _ in range(3):
        got = graphs.classify(imgs, scales=(32, 40))
        for g, w in zip(got, want):
            torch.testing.assert_close(g.probs, w.probs, rtol=1e-3, atol=1e-4)
    one = eager.classify(imgs[0], scales=(32,))          # a lone batch: the planned layout
    for _ in range(3):
        torch.testing.assert_close(graphs.classify(imgs[0], scales=(32,)).probs, one.probs,
                                   rtol=1e-3, atol=1e-4)
    cache = graphs._executor.graphs
    assert cache.captures > 1 and cache.replays >= cache.captures and not cache.disabled


def test_info_of_features_only_and_cut_short_weights():
    """info counts the parameters the weights have and says how far they reach: a features-only
    checkpoint has no classes, a cut-short one (features[:23], a perceptual loss) ends at pool4."""
    tv = torchvision.models.vgg16()
    full = Engine(tv.state_dict()).info()
    assert (full["parameters"], full["num_classes"], full["usable_up_to"]) == (138357544, 1000, "fc8")
    feat = Engine(tv.features.state_dict()).info()
    assert feat["parameters"] == sum(p.numel() for p in tv.features.parameters())
    assert (feat["num_classes"], feat["usable_up_to"]) == (None, "pool5")
    assert feat["class_names"].startswith("none")
    cut = Engine(tv.features[:23].state_dict()).info()
    assert cut["parameters"] == sum(p.numel() for p in tv.features[:23].parameters())
    assert cut["usable_up_to"] == "pool4"
    bn_model = small_model(batch_norm=True)
    folded = sum(m.weight.numel() + m.out_channels for m in bn_model.modules()
                 if isinstance(m, torch.nn.Conv2d))
    folded += sum(m.weight.numel() + m.bias.numel() for m in bn_model.modules()
                  if isinstance(m, torch.nn.Linear))
    assert Engine(bn_model.state_dict()).info()["parameters"] == folded   # BN folded into convs


def test_a_lrn_runs_in_half_types_on_the_cpu():
    """torch's local_response_norm has no bfloat16 / float16 CPU kernel; the reference goes
    through float32 there (the model's LRN module too)."""
    m = small_model("A-LRN")
    img = torch.rand(3, 40, 52, generator=torch.Generator().manual_seed(1))
    want = Engine(m.state_dict(), backend="torch").classify(img, scales=[32, 40]).probs
    for dtype in (torch.bfloat16, torch.float16):
        got = Engine(m.state_dict(), backend="torch", dtype=dtype).classify(img, scales=[32, 40])
        torch.testing.assert_close(got.probs, want, rtol=0, atol=1e-3)   # probs 0.096..0.107
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(m.to(dtype)(x.to(dtype)).float(), m.float()(x),
                                       rtol=0, atol=2e-3)   # logits up to 0.06, bf16 err 2e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_of_an_empty_batch_are_empty(backend):
    if backend == "triton":
        skip_unless_triton_backend()
    eng = Engine(small_model(num_classes=10).state_dict(), backend=backend, dtype="float32",
                 device="cuda" if torch.cuda.is_available() else "cpu")
    out = eng.logits(torch.rand(0, 3, 32, 32))
    assert out.shape == (0, 10) and out.dtype == torch.float32 and out.device.type == "cpu"


def test_the_readmes_runs_anywhere_example_prints_what_it_says(monkeypatch, capsys):
    """README's first Python block ("so this runs anywhere, as written"), run as written from the
    repository root: it prints the list its comment shows, [(1, '1', 0.95...), ...] (float32 on
    a CPU; bfloat16 on a GPU moves the third digit)."""
    import ast
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    text = (root / "README.md").read_text()
    block = re.search(r"runs\s+anywhere, as written:\n\n```python\n(.*?)```", text, re.S)[1]
    assert "# [(1, '1', 0.95...), ...]" in block
    monkeypatch.chdir(root)
    exec(compile(block, "README.md", "exec"), {})
    top = ast.literal_eval(capsys.readouterr().out.strip())
    assert len(top) == 3 and top[0][:2] == (1, "1")
    assert 0.95 <= top[0][2] < 0.96 if not torch.cuda.is_available() else top[0][2] > 0.9


@pytest.mark.parametrize("some", [False, True], ids=["every-tap", "some-taps"])
@pytest.mark.parametrize("config", ["D", "A-LRN"])
def test_cpu_torch_backend_equals_reference(config, some):
    """The CPU torch backend (channels_last, fc6-fc8 as matmuls, ReLU in place) against the
    plain F.conv2d reference in float64. Every tap at once: a ReLU done in place on a conv
    output the caller asked for would turn that tap into the ReLU's output. Some taps: the
    ReLUs between them run in place. fc6 is a 2x2 conv here (image_size 64) on a 2x3 pool5
    map, so the unfold path gives several output pixels. Non-finite values must survive (the
    engine's finite check relies on it; oneDNN's fused conv+ReLU post-op mapped NaN to 0)."""
    from vggfast.nn import TorchBackend, dense_forward
    from vggfast.weights import load_weights
    m = small_model(config, image_size=64)
    _, params = load_weights(m.state_dict())
    be = TorchBackend(params, m.spec, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 3, 70, 100)
    taps = m.spec.tap_names()
    if some:
        taps = ("conv1_1", "relu2_1", "pool3", "relu6", "fc8")
    want = dense_forward({k: v.double() for k, v in params.items()}, m.spec, x.double(), taps)
    got = be.run(x, taps)
    assert got["fc8"].shape == (2, 10, 1, 2)
    for t in taps:
        # float32 rounding of at most 16 layers, relative to the tap's largest value
        torch.testing.assert_close(got[t].double(), want[t], rtol=0,
                                   atol=2e-5 * want[t].abs().max().item(), msg=t)
    x[0, :, :8, :8] = float("inf")      # relu(inf) -> conv with mixed-sign weights -> NaN
    got = be.run(x, taps)
    assert not got["fc8"][0].isfinite().any() and got["fc8"][1].isfinite().all()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("k", [1, 3])
def test_conv_as_matmul_equals_conv2d_in_any_chunking(k, fmt):
    """conv_as_matmul against F.conv2d (float64), whole and a chunk of output rows at a time
    (chunk_bytes=1: one row per chunk; 2000: a few rows, the last chunk shorter)."""
    from vggfast.nn import conv_as_matmul
    torch.manual_seed(0)
    w, b = torch.randn(5, 4, k, k), torch.randn(5)
    x = torch.randn(2, 4, 9, 6).contiguous(memory_format=fmt)
    want = F.conv2d(x.double(), w.double(), b.double())
    for chunk in (1, 2000, 1 << 26):
        got = conv_as_matmul(x, w, b, chunk_bytes=chunk)
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())

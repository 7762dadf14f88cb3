"""Localisation (paper Appendix A): boxes, IoU, greedy merging, the loss, SCR/PCR heads, dense
application against crop-by-crop module forwards, the central-crop protocol, the ILSVRC
criterion, annotation readers, training, CLI and errors. Tiny random nets; CPU only."""
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_model

import vggfast
from vggfast import localize as L
from vggfast import preprocess as pp
from vggfast.errors import VGGFastError, WeightsError

C = 10


# -- boxes ------------------------------------------------------------------------------------

def test_encode_hand_case_and_round_trip():
    t = L.encode(torch.tensor([10.0, 20.0, 30.0, 60.0]), (0, 0, 100, 100))
    assert torch.allclose(t, torch.tensor([0.2, 0.4, 0.2, 0.4]))
    t = L.encode(torch.tensor([40.0, 40.0, 80.0, 56.0]), (32, 32, 64, 64))
    assert torch.allclose(t, torch.tensor([28 / 64, 16 / 64, 40 / 64, 16 / 64]))
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 200 - 50
    wh = torch.rand(50, 2, generator=g) * 100 + 1
    boxes = torch.cat([xy, xy + wh], 1)
    win = torch.cat([torch.rand(50, 2, generator=g) * 64, torch.full((50, 2), 224.0)], 1)
    assert torch.allclose(L.decode(L.encode(boxes, win), win), boxes, atol=1e-4)
    # boxes outside the window are not clipped (a window predicts the whole object)
    assert L.encode(torch.tensor([-10.0, 0, 10, 10]), (0, 0, 10, 10))[0] == 0.0


def test_decode_negative_size_is_empty():
    b = L.decode(torch.tensor([0.5, 0.5, -0.2, 0.3]), (0, 0, 10, 10))
    assert b[0] == b[2] == 5.0


def test_iou_hand_cases():
    a = [[0, 0, 2, 1], [0, 0, 4, 4], [0, 0, 1, 1], [5, 5, 5, 9]]
    b = [[1, 0, 3, 1], [1, 1, 3, 3], [0, 0, 1, 1], [5, 5, 6, 9]]
    m = L.iou(a, b)
    assert m.shape == (4, 4)
    assert math.isclose(m[0, 0], 1 / 3)
    assert math.isclose(m[1, 1], 4 / 16)
    assert m[2, 2] == 1.0
    assert m[3, 3] == 0.0  # an empty box overlaps nothing
    assert m[0, 2] == 0.5 and m[2, 0] == 0.0
    assert np.array_equal(L.iou(b, a), m.T)  # symmetric
    assert L.iou([[0, 0, 1, 1]], [[2, 2, 3, 3]])[0, 0] == 0.0


def test_greedy_merge_two_clusters_stay_two():
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11],
             [50, 50, 70, 70], [51, 50, 71, 70]]
    scores = [0.2, 0.3, 0.1, 0.25, 0.05]
    mb, ms = L.greedy_merge(boxes, scores, 0.5)
    assert len(mb) == 2
    assert np.allclose(ms, [0.6, 0.3])  # scores add up, best first
    b = np.array(boxes[:3], float)
    s = np.array(scores[:3])
    assert np.allclose(mb[0], (s[:, None] * b).sum(0) / s.sum())  # score-weighted mean
    assert np.allclose(mb[1], (0.25 * np.array(boxes[3]) + 0.05 * np.array(boxes[4])) / 0.3)


def test_greedy_merge_one_cluster_becomes_one_and_threshold():
    boxes = [[10, 10, 20, 20], [11, 10, 21, 20], [10, 11, 20, 21], [9, 9, 19, 19]]
    mb, ms = L.greedy_merge(boxes, [1, 1, 1, 1], 0.5)
    assert len(mb) == 1 and ms[0] == 4
    assert np.allclose(mb[0], np.mean(boxes, 0))
    # IoU of these two is 1/3: merged at 0.3, kept apart at 0.5
    assert len(L.greedy_merge([[0, 0, 2, 1], [1, 0, 3, 1]], [1, 2], 0.3)[0]) == 1
    mb, ms = L.greedy_merge([[0, 0, 2, 1], [1, 0, 3, 1]], [1, 2], 0.5)
    assert len(mb) == 2 and list(ms) == [2, 1] and list(mb[0]) == [1, 0, 3, 1]
    with pytest.raises(VGGFastError):
        L.greedy_merge([[0, 0, 1, 1]], [-1.0])


def test_euclidean_loss_equals_manual():
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, 4, generator=g)
    p = torch.rand(3, 4, generator=g)
    manual = sum(float(((p[n] - t[n]) ** 2).sum()) for n in range(3)) / (2 * 3)
    assert math.isclose(float(L.euclidean_loss(p, t, mode="scr")), manual, rel_tol=1e-6)
    pc = torch.rand(3, 4 * 5, generator=g)
    y = torch.tensor([4, 0, 2])
    manual = sum(float(((pc[n, 4 * y[n]:4 * y[n] + 4] - t[n]) ** 2).sum())
                 for n in range(3)) / 6
    assert math.isclose(float(L.euclidean_loss(pc, t, y, "pcr")), manual, rel_tol=1e-6)


def test_ilsvrc_criterion_hand_cases():
    gt = [[0, 0, 10, 10], [20, 20, 40, 40]]
    good = (3, [21, 20, 40, 41])  # IoU 0.9 with the second box
    assert L.ilsvrc_correct([good], 3, gt)
    assert not L.ilsvrc_correct([(4, good[1])], 3, gt)        # wrong class
    assert not L.ilsvrc_correct([(3, [0, 0, 20, 10])], 3, gt)  # IoU exactly 0.5: not > 0.5
    guesses = [(1, [0, 0, 10, 10]), (2, [0, 0, 10, 10]), (5, [0, 0, 10, 10]),
               (6, [0, 0, 10, 10]), good]
    assert L.ilsvrc_correct(guesses, 3, gt, k=5)
    assert not L.ilsvrc_correct(guesses, 3, gt, k=4)
    # localize's tuples (class, name, score, box) are accepted as they are
    assert L.ilsvrc_correct([(3, "x", 0.9, (0.0, 0.0, 9.0, 10.0))], 3, gt)


# -- nets -------------------------------------------------------------------------------------

def _pair(mode, seed=0):
    cls = small_model(num_classes=C, seed=seed)
    loc, _ = L.build_localizer(cls.state_dict(), mode, C)
    with torch.no_grad():  # a non-trivial head
        loc.classifier[6].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        loc.classifier[6].bias.uniform_(0.2, 0.6)
    return cls, loc.eval()


def _engine(cls, loc, mode=None, **kw):
    src = loc.state_dict()
    if mode:
        src = {"state_dict": src, "meta": {"task": "localize", "mode": mode, "num_classes": C}}
    return vggfast.Engine(cls.state_dict(), device="cpu", backend="torch", loc_weights=src, **kw)


@pytest.mark.parametrize("mode,rows", [("scr", 4), ("pcr", 4 * C)])
def test_scr_pcr_shapes_and_mode_detection(mode, rows):
    cls, loc = _pair(mode)
    assert loc(torch.randn(2, 3, 32, 32)).shape == (2, rows)
    # copied from the classifier except fc8
    assert torch.equal(loc.features[0].weight, cls.features[0].weight)
    assert torch.equal(loc.classifier[3].weight, cls.classifier[3].weight)
    eng = _engine(cls, loc)  # no metadata: the mode is read from fc8's rows
    assert eng.loc_mode == mode
    d = L.dense_predictions(eng, torch.rand(3, 40, 72), scales=(32, 64))
    k = 1 if mode == "scr" else C
    # 32x57 -> pool5 1x1 -> 1 position; 64x115 -> pool5 2x3 -> 6 (a 1x1 fc6 window)
    assert d.boxes.shape == (1 + 6, k, 4) and d.probs.shape == (7, C)
    assert torch.allclose(d.image_probs.sum(), torch.tensor(1.0))


def test_loc_weights_that_do_not_pair_are_refused():
    cls = small_model(num_classes=C)
    bad, _ = L.build_localizer(cls.state_dict(), "pcr", 7)  # 28 rows: neither 4 nor 40
    with pytest.raises(WeightsError, match="expected 4"):
        vggfast.Engine(cls.state_dict(), device="cpu", loc_weights=bad.state_dict())
    other = small_model(num_classes=C, image_size=64)
    with pytest.raises(WeightsError, match="native size"):
        _engine(other, _pair("scr")[1])
    _, loc = _pair("scr")
    src = {"state_dict": loc.state_dict(), "meta": {"task": "localize", "mode": "pcr"}}
    with pytest.raises(WeightsError, match="PCR"):
        vggfast.Engine(cls.state_dict(), device="cpu", loc_weights=src)


def test_localize_without_loc_weights_raises():
    eng = vggfast.Engine(small_model(num_classes=C).state_dict(), device="cpu")
    with pytest.raises(VGGFastError, match="loc_weights"):
        eng.localize(torch.rand(3, 40, 40), scales=(32,))
    with pytest.raises(VGGFastError, match="loc_weights"):
        L.center_crop_box(eng, torch.rand(3, 40, 40), 0)


def _independent_dense(cls, loc, img, scales, flip):
    """Window by window: the modules' conv features on the whole view (dense application keeps
    the neighbouring pixels a separate crop would zero-pad), then for every fc6 window (1x1 of
    pool5 at native size 32) torchvision's Linear classifier; the box decoded by hand against the
    32x32 input window at stride 32 and mapped to the original image."""
    H, W = img.shape[-2:]
    boxes, probs = [], []
    with torch.no_grad():
        for q in scales:
            v = pp.resize_short(img, q)
            h, w = v.shape[-2:]
            views = [v, v.flip(-1)] if flip else [v]
            for n, view in enumerate(views):
                x = pp.normalize(view, "torchvision")[None]
                fl, fc = loc.features(x), cls.features(x)
                for i in range(fl.shape[2]):
                    for j in range(fl.shape[3]):
                        p = loc.classifier(fl[:, :, i, j]).view(-1, 4)
                        probs.append(F.softmax(cls.classifier(fc[:, :, i, j])[0], 0))
                        cx, cy = 32 * j + p[:, 0] * 32, 32 * i + p[:, 1] * 32
                        bw, bh = p[:, 2].clamp(min=0) * 32, p[:, 3].clamp(min=0) * 32
                        x0, x1 = cx - bw / 2, cx + bw / 2
                        if n == 1:
                            x0, x1 = w - x1, w - x0
                        boxes.append(torch.stack([x0 * W / w, (cy - bh / 2) * H / h,
                                                  x1 * W / w, (cy + bh / 2) * H / h], 1))
    return torch.stack(boxes), torch.stack(probs)


@pytest.mark.parametrize("mode", ["scr", "pcr"])
def test_dense_localisation_matches_window_by_window(mode):
    cls, loc = _pair(mode, seed=3)
    eng = _engine(cls, loc, mode)
    g = torch.Generator().manual_seed(5)
    img = torch.rand(3, 70, 50, generator=g)
    scales = (32, 48, 80)
    d = L.dense_predictions(eng, img, scales, flip=True)
    boxes, probs = _independent_dense(cls, loc, img, scales, flip=True)
    assert d.boxes.shape == boxes.shape and d.boxes.shape[0] > 6
    assert torch.allclose(d.boxes, boxes, atol=1e-3)
    assert torch.allclose(d.probs, probs, atol=1e-5)
    # the final answer: the top-k classes, each the best greedily merged box of its class
    out = eng.localize(img, scales=scales, top_k=3, flip=True)
    assert len(out) == 3 and [o[2] for o in out] == sorted([o[2] for o in out], reverse=True)
    for c, name, score, box in out:
        assert name == eng.class_names[c]
        k = c if mode == "pcr" else 0
        mb, ms = L.greedy_merge(boxes[:, k].numpy(), probs[:, c].numpy(), 0.5)
        want = [min(max(mb[0][0], 0), 50), min(max(mb[0][1], 0), 70),
                min(max(mb[0][2], 0), 50), min(max(mb[0][3], 0), 70)]
        assert np.allclose(box, want, atol=1e-3)
    assert [o[0] for o in out] == torch.topk(d.image_probs, 3).indices.tolist()


def test_merge_takes_only_the_strongest_boxes_of_a_class(monkeypatch):
    """Above MAX_MERGE boxes of a class (a panorama at a large scale), only the strongest
    MAX_MERGE enter the cubic greedy merge; with the cap lowered to 3 here, the answer must be
    the merge of the 3 best-scoring boxes, which differs from merging all of them."""
    cls, loc = _pair("pcr", seed=3)
    eng = _engine(cls, loc, "pcr")
    img = torch.rand(3, 70, 50, generator=torch.Generator().manual_seed(5))
    scales = (32, 48, 80)
    d = L.dense_predictions(eng, img, scales, flip=True)
    c = int(torch.argmax(d.image_probs))
    boxes, scores = d.class_boxes(c)
    assert len(scores) > 3
    top = torch.topk(scores, 3).indices
    want = L.greedy_merge(boxes[top].numpy(), scores[top].numpy(), 0.1)[0][0]
    everything = L.greedy_merge(boxes.numpy(), scores.numpy(), 0.1)[0][0]
    assert not np.allclose(want, everything, atol=1e-3)   # the cap changes this answer
    monkeypatch.setattr(L, "MAX_MERGE", 3)
    (got_c, _, _, box), = eng.localize(img, scales=scales, top_k=1, flip=True, merge_iou=0.1)
    assert got_c == c
    assert np.allclose(box, L.clip_box(want, 50, 70), atol=1e-4)


def test_center_crop_box_matches_module():
    cls, loc = _pair("pcr", seed=4)
    eng = _engine(cls, loc, "pcr")
    img = torch.rand(3, 60, 90, generator=torch.Generator().manual_seed(2))
    box = L.center_crop_box(eng, img, 7, scale=40)
    v = pp.normalize(pp.resize_short(img, 40), "torchvision")  # 40 x 60
    top, left = (40 - 32) // 2, (60 - 32) // 2
    with torch.no_grad():
        p = loc(v[None, :, top:top + 32, left:left + 32]).view(C, 4)[7]
    cx, cy = left + p[0] * 32, top + p[1] * 32
    bw, bh = p[2].clamp(min=0) * 32, p[3].clamp(min=0) * 32
    want = [(cx - bw / 2) * 1.5, (cy - bh / 2) * 1.5, (cx + bw / 2) * 1.5, (cy + bh / 2) * 1.5]
    want = [min(max(float(want[0]), 0), 90), min(max(float(want[1]), 0), 60),
            min(max(float(want[2]), 0), 90), min(max(float(want[3]), 0), 60)]
    assert np.allclose(box, want, atol=1e-3)


# -- annotations ------------------------------------------------------------------------------

def _img(path, w=48, h=40):
    from PIL import Image
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path)


def test_read_jsonl(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    f = tmp_path / "boxes.jsonl"
    f.write_text(json.dumps({"file": "a.png", "label": 2, "boxes": [[1, 2, 30, 20]]}) + "\n\n"
                 + json.dumps({"file": "b.png", "label": "cat", "boxes": [[0, 0, 5, 5],
                                                                        [6, 6, 9, 9]]}) + "\n")
    s = L.read_boxes(f, ["dog", "x", "y", "cat"])
    assert [x.label for x in s] == [2, 3]
    assert s[1].boxes == [(0, 0, 5, 5), (6, 6, 9, 9)]
    assert s[0].file == str(tmp_path / "a.png")


@pytest.mark.parametrize("line,match", [
    ("{not json", "not valid JSON"),
    ('{"file": "a.png", "label": 0}', "missing boxes"),
    ('{"file": "a.png", "label": 0, "boxes": [[5, 5, 5, 9]]}', "empty"),
    ('{"file": "a.png", "label": 0, "boxes": [[1, 2, 3]]}', "4 finite numbers"),
    ('{"file": "a.png", "label": "zebra", "boxes": [[0, 0, 1, 1]]}', "unknown class"),
    ('{"file": "a.png", "label": 12, "boxes": [[0, 0, 1, 1]]}', "outside"),
    ('{"file": "gone.png", "label": 0, "boxes": [[0, 0, 1, 1]]}', "do not exist"),
    ('[1, 2]', "JSON object"),
])
def test_bad_jsonl_is_a_vggfast_error(tmp_path, line, match):
    _img(tmp_path / "a.png")
    f = tmp_path / "boxes.jsonl"
    f.write_text(line + "\n")
    with pytest.raises(L.AnnotationError, match=match):
        L.read_boxes(f, [str(i) for i in range(C)])
    with pytest.raises(VGGFastError):
        L.read_boxes(tmp_path / "missing.jsonl")


VOC = """<annotation><folder>imgs</folder><filename>{name}</filename>
<size><width>48</width><height>40</height><depth>3</depth></size>
<object><name>cat</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
<object><name>dog</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>30</xmax><ymax>35</ymax></bndbox></object>
<object><name>cat</name><bndbox><xmin>20</xmin><ymin>1</ymin><xmax>40</xmax><ymax>9</ymax></bndbox></object>
</annotation>"""


def test_read_voc(tmp_path):
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    _img(tmp_path / "JPEGImages" / "x1.jpg")
    (tmp_path / "Annotations" / "x1.xml").write_text(VOC.format(name="x1.jpg"))
    s = L.read_boxes(tmp_path / "Annotations", ["dog", "cat"])
    assert [(x.label, x.boxes) for x in s] == [
        (0, [(4.0, 4.0, 30.0, 35.0)]),                          # 1-based inclusive -> edges
        (1, [(0.0, 1.0, 10.0, 20.0), (19.0, 0.0, 40.0, 9.0)])]  # one sample per class
    assert s[0].file == str(tmp_path / "JPEGImages" / "x1.jpg")
    # ILSVRC style: no suffix in <filename>, images under an explicit root
    root = tmp_path / "Data"
    root.mkdir()
    _img(root / "x2.JPEG")
    (tmp_path / "x2.xml").write_text(VOC.format(name="x2"))
    s = L.read_boxes(tmp_path / "x2.xml", ["dog", "cat"], image_root=root)
    assert s[0].file == str(root / "x2.JPEG")
    # ILSVRC's boxes name WordNet IDs: read against the ImageNet classes (cat -> n01443537,
    # goldfish, class 1; dog -> n15075141, toilet tissue, class 999)
    xml = VOC.format(name="x2").replace(">cat<", ">n01443537<").replace(">dog<", ">n15075141<")
    (tmp_path / "x2.xml").write_text(xml)
    s = L.read_boxes(tmp_path / "x2.xml", vggfast.engine.imagenet_classes(), image_root=root)
    assert [x.label for x in s] == [1, 999]
    with pytest.raises(VGGFastError, match="unknown class 'n01443537'"):   # not ImageNet's
        L.read_boxes(tmp_path / "x2.xml", ["dog", "cat"], image_root=root)


def test_bad_voc(tmp_path):
    (tmp_path / "a.xml").write_text("<annotation><filename>a.png</filename><object><name>cat"
                                    "</name></object></annotation>")
    with pytest.raises(L.AnnotationError, match="bndbox"):
        L.read_boxes(tmp_path / "a.xml", ["cat"])
    (tmp_path / "b.xml").write_text("<annotation><filename")
    with pytest.raises(L.AnnotationError, match="not a readable"):
        L.read_boxes(tmp_path / "b.xml", ["cat"])
    (tmp_path / "c.xml").write_text(VOC.format(name="nowhere.jpg"))
    with pytest.raises(L.AnnotationError, match="not found"):
        L.read_boxes(tmp_path / "c.xml", ["dog", "cat"])


# -- training, evaluation, CLI ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """Six 48x40 images with a bright square (its box), a saved classifier folder."""
    from PIL import Image

    from vggfast.train import model_meta, save_model
    root = tmp_path_factory.mktemp("locset")
    rng = np.random.default_rng(0)
    lines = []
    for n in range(6):
        a = rng.integers(0, 40, (40, 48, 3)).astype(np.uint8)
        x, y, s = int(rng.integers(0, 20)), int(rng.integers(0, 14)), int(rng.integers(14, 26))
        a[y:y + s, x:x + s] = 230
        Image.fromarray(a).save(root / f"{n}.png")
        lines.append(json.dumps({"file": f"{n}.png", "label": n % 3,
                                 "boxes": [[x, y, x + s, y + s]]}))
    (root / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    cls = small_model(num_classes=3, seed=1)
    save_model(cls, model_meta(cls, ["a", "b", "c"]), root / "cls")
    return root


@pytest.mark.parametrize("mode,trainable", [("pcr", "all"), ("scr", "last-fc")])
def test_train_localizer_writes_a_pairable_net(tiny_set, tmp_path, mode, trainable):
    out = tmp_path / "loc"
    r = L.train_localizer(L.LocTrainOptions(
        boxes=str(tiny_set / "boxes.jsonl"), init=str(tiny_set / "cls"), data=str(tiny_set),
        out=str(out), mode=mode, trainable=trainable, epochs=2, batch_size=3, workers=0,
        val_boxes=str(tiny_set / "boxes.jsonl"), val=str(tiny_set), scales=(32, 48),
        lr=1e-3, quiet=True))
    assert len(r.history) == 2 and all(math.isfinite(h["loss"]) for h in r.history)
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "localize" and meta["mode"] == mode and meta["num_classes"] == 3
    assert "class_names" not in meta and meta["loc_class_names"] == ["a", "b", "c"]
    eng = vggfast.Engine(str(tiny_set / "cls"), device="cpu", loc_weights=str(out))
    assert eng.loc_mode == mode
    assert eng.loc_weights.spec.num_classes == (4 if mode == "scr" else 12)
    frozen = torch.equal(eng.loc_weights.state_dict["conv1_1.weight"],
                         eng.weights.state_dict["conv1_1.weight"])
    assert frozen == (trainable == "last-fc")
    preds = eng.localize(tiny_set / "0.png", scales=(32, 48), top_k=2)
    assert len(preds) == 2 and all(len(p[3]) == 4 for p in preds)
    res = L.evaluate_localization(eng, str(tiny_set / "boxes.jsonl"), scales=(32,), top_k=5,
                                  image_root=tiny_set)
    assert res["images"] == 6 and 0 <= res["top5_error"] <= res["top1_error"] <= 100
    res = L.evaluate_localization(eng, str(tiny_set / "boxes.jsonl"), protocol="center",
                                  image_root=tiny_set)
    assert 0 <= res["error"] <= 100 and 0 <= res["mean_iou"] <= 1


def test_train_errors(tiny_set, tmp_path):
    base = dict(boxes=str(tiny_set / "boxes.jsonl"), data=str(tiny_set), out=str(tmp_path / "o"),
                epochs=1, batch_size=2, workers=0, quiet=True)
    with pytest.raises(VGGFastError, match="init"):
        L.train_localizer(L.LocTrainOptions(init="", **base))
    with pytest.raises(VGGFastError, match="mode"):
        L.train_localizer(L.LocTrainOptions(init=str(tiny_set / "cls"), mode="xyz", **base))
    with pytest.raises(VGGFastError, match="training scale"):
        L.train_localizer(L.LocTrainOptions(init=str(tiny_set / "cls"), scales=(16,), **base))
    import argparse
    p = argparse.ArgumentParser()
    L.add_train_arguments(p)
    p.add_argument("--init", default="glorot")
    with pytest.raises(VGGFastError, match="--boxes"):
        L.run_train(p.parse_args(["--task", "localize"]))
    with pytest.raises(VGGFastError, match="classifier"):
        L.run_train(p.parse_args(["--task", "localize", "--boxes", "x.jsonl"]))
    a = p.parse_args(["--task", "localize", "--boxes", "b", "--init", "c", "--mode", "pcr",
                      "--last-fc-only"])
    o = L.options_from_args(a)
    assert (o.mode, o.trainable, o.lr) == ("pcr", "last-fc", 1e-3)


def test_train_localize_init_errors_say_init(tiny_set, tmp_path, capsys):
    """`vggfast train --task localize --init X` with X a localisation net, or a classifier
    without its fc layers, said "X is a localisation net ..." / "X: layers fc6, fc7 are missing
    ...", not which flag gave X; they now say "--init X: ...", one line, exit 2, as the other
    --init errors do. build_localizer itself still names the source."""
    from vggfast.cli import main
    from vggfast.train import save_model
    loc, _ = L.build_localizer(str(tiny_set / "cls"), "scr")
    save_model(loc, L.loc_meta({}, loc.spec, "scr", ["a", "b", "c"]), tmp_path / "loc")
    cls = small_model(num_classes=3, seed=1)
    torch.save({k: v for k, v in cls.state_dict().items() if k.startswith("features.")},
               tmp_path / "convs.pt")
    for init, why in [(tmp_path / "loc", "holds a localisation net; start from a "
                                         "classification model"),
                      (tmp_path / "convs.pt", "layers fc6, fc7 are missing or not finite; a "
                                              "localisation net starts from a complete "
                                              "classifier")]:
        rc = main(["train", "--task", "localize", "--data", str(tiny_set), "--boxes",
                   str(tiny_set / "boxes.jsonl"), "--init", str(init), "--out",
                   str(tmp_path / "o"), "--epochs", "1", "--batch-size", "2", "--workers", "0",
                   "--device", "cpu", "--quiet"])
        cap = capsys.readouterr()
        assert rc == 2 and cap.err == f"vggfast: error: --init {init}: {why}\n", cap.err
        with pytest.raises(WeightsError, match=f"^{re.escape(str(init))}"):
            L.build_localizer(str(init), "scr")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_localize_under_torchrun_is_refused_as_single_process(tiny_set, tmp_path,
                                                                      monkeypatch, capsys, rank):
    """The localisation trainer is single-process, yet nothing refused it under torchrun: every
    rank trained the whole net and wrote the same --out. Each rank now refuses in one line
    before it reads anything."""
    from vggfast.cli import main
    for k, v in dict(RANK=rank, WORLD_SIZE="2", LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(L, "load_init", lambda *a: pytest.fail("the --init model was read"))
    rc = main(["train", "--task", "localize", "--data", str(tiny_set), "--boxes",
               str(tiny_set / "boxes.jsonl"), "--init", str(tiny_set / "cls"), "--out",
               str(tmp_path / "o"), "--epochs", "1", "--batch-size", "2", "--workers", "0",
               "--device", "cpu", "--quiet"])
    assert rc == 2 and capsys.readouterr().err == (
        f"vggfast: error: --task localize trains in a single process, but this is rank {rank} "
        "of WORLD_SIZE=2: run `vggfast train --task localize` without torchrun\n")
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("RANK", "2")   # dist_info's own check of the environment still holds
    with pytest.raises(VGGFastError, match="0 <= RANK < WORLD_SIZE"):
        L.train_localizer(L.LocTrainOptions(boxes="b", init="c", out=str(tmp_path / "o")))


def test_cli_localize_and_evaluate(tiny_set, tmp_path, capsys):
    from PIL import Image

    from vggfast.cli import main
    cls = tiny_set / "cls"
    loc, _ = L.build_localizer(str(cls), "scr")
    from vggfast.train import save_model
    save_model(loc, L.loc_meta({}, loc.spec, "scr", ["a", "b", "c"]), tmp_path / "loc")
    png = tmp_path / "boxes.png"
    rc = main(["localize", str(tiny_set / "1.png"), "--weights", str(cls), "--loc-weights",
               str(tmp_path / "loc"), "--scales", "32", "48", "--top", "2", "--out", str(png),
               "--device", "cpu"])
    assert rc == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.size == (48, 40)
        assert (255, 64, 64) in {c for _, c in im.getcolors(10000)}  # the box outline
    # a missing folder is made, as extract and train make theirs; the suffix names the format
    jpg = tmp_path / "new" / "b.jpg"
    assert main(["localize", str(tiny_set / "1.png"), "--weights", str(cls), "--loc-weights",
                 str(tmp_path / "loc"), "--scales", "32", "--out", str(jpg)]) == 0
    capsys.readouterr()
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.size == (48, 40)
    # an --out it cannot write, or whose format it cannot tell, is refused before anything is
    # computed or printed (the boxes were printed, then the write failed)
    (tmp_path / "file").write_text("")
    for out, err in [(tmp_path / "file" / "b.png", f"cannot write {tmp_path / 'file' / 'b.png'}: "
                                                   f"{tmp_path / 'file'} is a file, not a folder"),
                     (tmp_path / "b", f"--out {tmp_path / 'b'} has no suffix"),
                     (tmp_path / "b.foo", f"--out {tmp_path / 'b.foo'}: PIL writes no .foo")]:
        rc = main(["localize", str(tiny_set / "1.png"), "--weights", str(cls), "--loc-weights",
                   str(tmp_path / "loc"), "--scales", "32", "--out", str(out)])
        cap = capsys.readouterr()                     # one line, as heatmap's, no errno repr
        assert rc == 2 and cap.out == "" and cap.err.count("\n") == 1
        assert cap.err.startswith(f"vggfast: error: {err}")
        assert not out.exists()
    assert main(["info", str(tmp_path / "loc"), "--json"]) == 0      # describes the loc net
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "localize" and info["mode"] == "scr" and info["outputs"] == 4
    rc = main(["localize", str(tiny_set / "1.png"), "--weights", str(cls), "--loc-weights",
               str(tiny_set / "boxes.jsonl")])
    assert rc == 2
    assert capsys.readouterr().err.startswith("vggfast: error:")

    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--weights")
    p.add_argument("--scales", type=int, nargs="+", default=[32])
    p.add_argument("--json", action="store_true")
    L.add_evaluate_arguments(p)
    args = p.parse_args([str(tiny_set), "--task", "localize", "--boxes",
                         str(tiny_set / "boxes.jsonl"), "--weights", str(cls), "--loc-weights",
                         str(tmp_path / "loc"), "--json"])
    assert L.run_evaluate(args) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["images"] == 6 and r["mode"] == "scr"
    args = p.parse_args([str(tiny_set), "--task", "localize", "--weights", str(cls)])
    with pytest.raises(VGGFastError, match="--boxes"):
        L.run_evaluate(args)


def test_train_and_evaluate_commands_route_task_localize(tiny_set, tmp_path, capsys):
    """`vggfast train --task localize` and `vggfast evaluate --task localize` through cli.main."""
    from vggfast.cli import main
    out = tmp_path / "loc"
    rc = main(["train", "--task", "localize", "--data", str(tiny_set), "--boxes",
               str(tiny_set / "boxes.jsonl"), "--init", str(tiny_set / "cls"), "--out", str(out),
               "--epochs", "1", "--batch-size", "3", "--workers", "0", "--scale", "32",
               "--device", "cpu", "--quiet"])
    assert rc == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "localize"
    rc = main(["evaluate", str(tiny_set), "--task", "localize", "--boxes",
               str(tiny_set / "boxes.jsonl"), "--weights", str(tiny_set / "cls"),
               "--loc-weights", str(out), "--scales", "32", "--json", "--quiet"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    assert main(["train", "--task", "localize", "--data", str(tiny_set), "--init",
                 str(tiny_set / "cls"), "--out", str(out)]) == 2  # no --boxes
    (tmp_path / "a_file").write_text("")          # an --out it cannot make: one line, as
    capsys.readouterr()                           # `vggfast train`'s (it was a traceback)
    assert main(["train", "--task", "localize", "--data", str(tiny_set), "--boxes",
                 str(tiny_set / "boxes.jsonl"), "--init", str(tiny_set / "cls"), "--out",
                 str(tmp_path / "a_file"), "--device", "cpu", "--workers", "0", "--quiet"]) == 2
    assert capsys.readouterr().err == f"vggfast: error: cannot create --out {tmp_path / 'a_file'}" \
                                      ": File exists\n"


def test_a_localisation_net_is_not_taken_for_a_classifier(tiny_set, tmp_path):
    loc, _ = L.build_localizer(str(tiny_set / "cls"), "scr")
    from vggfast.train import save_model
    save_model(loc, L.loc_meta({}, loc.spec, "scr", ["a", "b", "c"]), tmp_path / "loc")
    with pytest.raises(VGGFastError, match="loc_weights"):
        vggfast.Engine(str(tmp_path / "loc"))


@pytest.mark.parametrize("kwargs, match", [(dict(limit=-1), "limit"), (dict(iou_threshold=1.5),
                                                                        "IoU threshold")])
def test_evaluate_localization_checks_its_options(kwargs, match):
    cls, loc = _pair("scr")
    with pytest.raises(VGGFastError, match=match):
        L.evaluate_localization(_engine(cls, loc, "scr"), [], **kwargs)


def test_training_samples_are_checked_before_training(tiny_set, tmp_path, capsys):
    """An unreadable image is skipped with a warning (as the classification trainer does), a box
    partly outside its image is clipped, one wholly outside is refused by file."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    from PIL import Image
    Image.new("RGB", (48, 40)).save(tmp_path / "ok.png")
    Image.new("RGB", (48, 40)).save(tmp_path / "big.png")   # pixels cut off after the header
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:60])
    exif = Image.Exif()
    exif[0x0112] = 6                                          # loaded turned: 40 wide, 48 high
    Image.new("RGB", (48, 40)).save(tmp_path / "turned.jpg", exif=exif)
    samples = [L.LocSample(str(tmp_path / "bad.png"), 0, [(1.0, 1.0, 5.0, 5.0)]),
               L.LocSample(str(tmp_path / "ok.png"), 1, [(-20.0, -5.0, 30.0, 60.0)]),
               L.LocSample(str(tmp_path / "cut.png"), 1, [(1.0, 1.0, 5.0, 5.0)]),
               L.LocSample(str(tmp_path / "turned.jpg"), 1, [(-20.0, -5.0, 30.0, 60.0)])]
    kept = L.readable_samples(samples, "for training")
    assert [s.file for s in kept] == [str(tmp_path / "ok.png"), str(tmp_path / "turned.jpg")]
    assert kept[0].boxes == [(0.0, 0.0, 30.0, 40.0)] and kept[1].boxes == [(0.0, 0.0, 30.0, 48.0)]
    err = capsys.readouterr().err
    assert "bad.png" in err and "cut.png" in err
    with pytest.raises(VGGFastError, match=r"ok\.png: box .* outside the 40x48 \(HxW\) image"):
        L.readable_samples([L.LocSample(str(tmp_path / "ok.png"), 1, [(100, 100, 140, 140)])],
                           "for training")


def test_a_training_image_whose_rescale_passes_the_pixel_limit_is_skipped(tiny_set, tmp_path,
                                                                          monkeypatch, capsys):
    """The localisation trainer rescaled each whole image to S before cutting its crop, with no
    check of the rescale's size: a thin strip (40x20000 at S = 512: 512x256000 pixels, 1.5 GB of
    float32) allocated GBs in a data worker. Such an image is now skipped by its header and
    reported before training, as the classification trainer skips an image it cannot read
    (and caps S where a square image's rescale passes the same pixel limit); validation
    images at the central-crop scale too."""
    from PIL import Image
    rng = np.random.default_rng(3)
    strip = rng.integers(0, 256, (10, 480, 3)).astype(np.uint8)
    Image.fromarray(strip).save(tmp_path / "strip.png")
    lines = [json.loads(line) for line in (tiny_set / "boxes.jsonl").read_text().splitlines()]
    for rec in lines:
        rec["file"] = str(tiny_set / rec["file"])
    lines.append({"file": str(tmp_path / "strip.png"), "label": 1, "boxes": [[10, 2, 30, 8]]})
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)      # the limit: 10000 pixels
    rescaled, real = [], L.pp.resize_crop
    monkeypatch.setattr(L.pp, "resize_crop", lambda x, q, *crop: rescaled.append(
        (tuple(x.shape[-2:]), q)) or real(x, q, *crop))
    r = L.train_localizer(L.LocTrainOptions(
        boxes=str(boxes), init=str(tiny_set / "cls"), out=str(tmp_path / "loc"), epochs=1,
        batch_size=4, workers=0, val_boxes=str(boxes), scales=(32, 48), quiet=True))
    assert len(r.history) == 1 and math.isfinite(r.history[0]["loss"])
    err = capsys.readouterr().err
    strip = str(tmp_path / "strip.png")
    assert f"skipped 1 unreadable files for training: {strip} (10x480 (HxW) is rescaled to " \
        "48x2304 at scale 48: 110592 pixels, over the 10000 an image may have" in err, err
    assert f"for validation: {strip} (10x480 (HxW) is rescaled to 37x1776 at scale 37" in err
    # each of the other images rescaled every pass (6 training, 6 validation), never the strip
    assert len(rescaled) == 12 and all(size == (40, 48) for size, _ in rescaled)
    kept = L.readable_samples(L.read_boxes(boxes, ["a", "b", "c"]), "for training", 48)
    assert [s.file for s in kept] == [rec["file"] for rec in lines[:-1]]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)      # the limit off: the caller's word
    assert len(L.readable_samples(L.read_boxes(boxes, ["a", "b", "c"]), "for training", 48)) == 7


def test_an_image_whose_exif_cannot_be_read_is_kept_the_way_it_is_stored(tmp_path, monkeypatch):
    """load_image keeps the stored orientation when the EXIF block is broken; the training scan
    agrees (it read the EXIF outside its guard and skipped such a photo), while a PNG whose
    pixels are cut short is still skipped."""
    import struct

    from PIL import Image
    Image.new("RGB", (48, 40)).save(tmp_path / "photo.jpg")
    Image.new("RGB", (48, 40)).save(tmp_path / "big.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "big.png").read_bytes()[:60])

    def broken(self):
        raise struct.error("unpack requires a buffer of 12 bytes")
    monkeypatch.setattr(Image.Image, "getexif", broken)
    from vggfast.preprocess import load_image
    assert tuple(load_image(tmp_path / "photo.jpg").shape) == (3, 40, 48)
    samples = [L.LocSample(str(tmp_path / f), 0, [(1.0, 1.0, 5.0, 5.0)])
               for f in ("photo.jpg", "cut.png")]
    assert [s.file for s in L.readable_samples(samples, "for training")] == [samples[0].file]


def test_evaluation_clips_ground_truth_to_the_image(tmp_path):
    """Predictions are clipped to the image, so ground truth is too: a box annotated past the
    image's edge is scored as the part inside it."""
    cls, loc = _pair("scr", seed=3)
    eng = _engine(cls, loc, "scr")
    _img(tmp_path / "a.png", 48, 40)
    f = str(tmp_path / "a.png")
    box = L.center_crop_box(eng, f, 1)
    gt = (box[0], box[1], box[2] + 500.0, box[3] + 500.0)
    r = L.evaluate_localization(eng, [L.LocSample(f, 1, [gt])], protocol="center")
    clipped = float(L.iou([box], [(box[0], box[1], 48.0, 40.0)]).max())
    assert r["mean_iou"] == pytest.approx(clipped)
    assert clipped > 10 * float(L.iou([box], [gt]).max())
    with pytest.raises(VGGFastError, match=r"a\.png: box .* outside the 40x48 \(HxW\) image"):
        L.evaluate_localization(eng, [L.LocSample(f, 1, [(60, 50, 90, 80)])], protocol="center")


def test_a_diverged_localizer_stops_before_saving_nan_weights(tiny_set, tmp_path):
    """lr 1e6 sent the Euclidean loss to NaN and train_localizer saved the NaN net, returning as
    if trained; now it raises, and what --out holds (if anything) is finite."""
    out = tmp_path / "loc"
    with pytest.raises(VGGFastError, match=r"^training diverged: the loss of epoch \d+ is "):
        L.train_localizer(L.LocTrainOptions(
            boxes=str(tiny_set / "boxes.jsonl"), init=str(tiny_set / "cls"), data=str(tiny_set),
            out=str(out), batch_size=6, workers=0, scales=(32, 48), epochs=6, lr=1e6,
            quiet=True))
    if (out / "model.safetensors").exists():
        from safetensors.torch import load_file
        sd = load_file(str(out / "model.safetensors"))
        assert all(torch.isfinite(v).all() for v in sd.values())


def test_a_localisation_over_the_memory_budget_names_the_image_file(tmp_path):
    """The refusal said only "a 3200x64 input (batch 1) needs ... over the memory budget": in
    `vggfast evaluate --task localize` over a folder, which photo it was went unsaid. It now
    names the file, as classify's and heatmap's refusals do."""
    from PIL import Image

    from vggfast.errors import MemoryBudgetError
    cls, loc = _pair("scr")
    eng = _engine(cls, loc, "scr", memory_budget=1 << 20)
    pano = tmp_path / "pano.png"
    Image.new("RGB", (2000, 40)).save(pano)
    _img(tmp_path / "small.png", 48, 40)
    want = f"{pano} (40x2000, HxW) at scale 64: a 64x3200 (HxW) input (batch 1) needs "
    with pytest.raises(MemoryBudgetError) as err:
        eng.localize(str(pano), scales=(64,))
    assert str(err.value).startswith(want) and "memory_budget=BYTES" in str(err.value)
    assert err.value.image == 0 and str(err.value) == f"{pano} {err.value.reason}"
    with pytest.raises(MemoryBudgetError,
                       match=r"^image 0 \(40x2000, HxW\) at scale 64: a 64x3200 \(HxW\) "):
        eng.localize(torch.rand(3, 40, 2000), scales=(64,))     # no file to name
    samples = [L.LocSample(str(tmp_path / "small.png"), 0, [(0, 0, 8, 8)]),
               L.LocSample(str(pano), 1, [(0, 0, 10, 10)])]
    r = L.evaluate_localization(eng, samples, scales=(64,))   # it decodes the image itself
    assert [f["error"] for f in r["failed"]] == [str(err.value)]


def test_evaluate_localization_skips_an_image_over_the_memory_budget_and_lists_it(tmp_path):
    """`vggfast evaluate --task localize` stopped at the first photo over the memory budget (a
    panorama) and lost the evaluation; classification's `evaluate` skips it by name. Now both
    protocols skip it, list it under "failed" as "FILE (HxW) at scale Q ...", and score the
    rest; the command prints it as a "skipped" line."""
    from PIL import Image
    cls, loc = _pair("scr")
    eng = _engine(cls, loc, "scr", memory_budget=1 << 20)
    pano = tmp_path / "pano.png"
    Image.new("RGB", (2000, 40)).save(pano)
    small = [tmp_path / "a.png", tmp_path / "b.png"]
    for f in small:
        _img(f, 48, 40)
    samples = [L.LocSample(str(small[0]), 0, [(0, 0, 8, 8)]),
               L.LocSample(str(pano), 1, [(0, 0, 10, 10)]),
               L.LocSample(str(small[1]), 2, [(4, 4, 20, 20)])]
    alone = [samples[0], samples[2]]
    for protocol, kw, why in [
            ("dense", dict(scales=(64,)),
             "(40x2000, HxW) at scale 64: a 64x3200 (HxW) input (batch 1) "),
            ("center", dict(center_scale=64),
             "(40x2000, HxW) at scale 64 is rescaled to 64x3200 to "
             "cut its central crop: ")]:
        r = L.evaluate_localization(eng, samples, protocol=protocol, **kw)
        assert r["images"] == 2 and len(r["failed"]) == 1
        assert r["failed"][0]["file"] == str(pano)
        assert r["failed"][0]["error"].startswith(f"{pano} {why}")
        assert "memory budget" in r["failed"][0]["error"]
        # the others are scored as if the panorama were not there
        want = L.evaluate_localization(eng, alone, protocol=protocol, **kw)
        assert {**r, "failed": []} == want and want["failed"] == []
    with pytest.raises(VGGFastError, match="none of the 1 annotated images"):
        L.evaluate_localization(eng, [samples[1]], scales=(64,))


def test_evaluate_localization_says_why_no_image_was_evaluated(tmp_path, tiny_set, capsys,
                                                                monkeypatch):
    """When every annotated image was skipped, some (or all) for the memory budget, the
    localisation `evaluate` said "none of the N annotated images could be read", though they
    were read. It now says how many were unreadable and how many over the budget, with the first
    reason of each: one line, exit 2 from the command."""
    from PIL import Image

    from vggfast.cli import main
    from vggfast.train import save_model
    cls, loc = _pair("scr")
    eng = _engine(cls, loc, "scr", memory_budget=1 << 20)
    pano = tmp_path / "pano.png"
    Image.new("RGB", (2000, 40)).save(pano)
    gone = tmp_path / "gone.png"
    samples = [L.LocSample(str(pano), 1, [(0, 0, 10, 10)]),
               L.LocSample(str(gone), 0, [(0, 0, 8, 8)])]
    for protocol, kw in [("dense", dict(scales=(64,))), ("center", dict(center_scale=64))]:
        with pytest.raises(VGGFastError) as err:
            L.evaluate_localization(eng, samples, protocol=protocol, **kw)
        msg = str(err.value)
        assert msg.startswith("none of the 2 annotated images could be evaluated: 1 unreadable, 1 "
                              "over the memory budget; the first unreadable: image not found: "
                              f"{gone}; "), msg
        assert f"; the first over the memory budget: {pano} (40x2000, HxW) at scale 64" in msg
        assert "\n" not in msg
        with pytest.raises(VGGFastError, match=r"^none of the 1 annotated images could be "
                                               r"evaluated: 1 over the memory budget; the first "
                                               f"over the memory budget: {re.escape(str(pano))} "):
            L.evaluate_localization(eng, samples[:1], protocol=protocol, **kw)
    loc, _ = L.build_localizer(str(tiny_set / "cls"), "scr")
    save_model(loc, L.loc_meta({}, loc.spec, "scr", ["a", "b", "c"]), tmp_path / "loc")
    (tmp_path / "boxes.jsonl").write_text(json.dumps({"file": "pano.png", "label": 1,
                                                      "boxes": [[0, 0, 8, 8]]}) + "\n")
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "1MiB")
    rc = main(["evaluate", str(tmp_path), "--task", "localize", "--boxes",
               str(tmp_path / "boxes.jsonl"), "--weights", str(tiny_set / "cls"), "--loc-weights",
               str(tmp_path / "loc"), "--scales", "64", "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("vggfast: error: none of the 1 annotated images could be evaluated: 1 "
                          "over the memory budget; the first over the memory budget: "
                          f"{pano} (40x2000, HxW) at scale 64"), err


def test_cli_evaluate_localize_skips_a_photo_over_the_memory_budget(tiny_set, tmp_path, capsys,
                                                                    monkeypatch):
    """The command's end of the skip above: one "vggfast: skipped FILE ..." line on stderr, as
    classification's `evaluate` prints, the report of the other images, exit 0."""
    from PIL import Image

    from vggfast.cli import main
    from vggfast.train import save_model
    loc, _ = L.build_localizer(str(tiny_set / "cls"), "scr")
    save_model(loc, L.loc_meta({}, loc.spec, "scr", ["a", "b", "c"]), tmp_path / "loc")
    folder = tmp_path / "set"
    folder.mkdir()
    lines = (tiny_set / "boxes.jsonl").read_text().splitlines()[:2]
    for n in range(2):
        (folder / f"{n}.png").write_bytes((tiny_set / f"{n}.png").read_bytes())
    Image.new("RGB", (4000, 8)).save(folder / "pano.png")
    lines.insert(1, json.dumps({"file": "pano.png", "label": 1, "boxes": [[0, 0, 8, 8]]}))
    (folder / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("VGGFAST_MEMORY_BUDGET", "8MiB")     # 13.6 MiB for the panorama
    rc = main(["evaluate", str(folder), "--task", "localize", "--boxes",
               str(folder / "boxes.jsonl"), "--weights", str(tiny_set / "cls"), "--loc-weights",
               str(tmp_path / "loc"), "--scales", "32", "--json", "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 2, err    # results, and 2: an image was skipped
    r = json.loads(out)
    assert r["images"] == 2 and [f["file"] for f in r["failed"]] == [str(folder / "pano.png")]
    assert err.count("\n") == 1
    want = f"vggfast: skipped {folder / 'pano.png'} (8x4000, HxW) at scale 32: "
    assert err.startswith(want), err


def test_center_crop_box_refuses_a_rescale_over_the_memory_budget(tmp_path, monkeypatch):
    """center_crop_box resized the whole image to the scale with no memory check: a huge scale
    (or panorama) allocated the float32 rescale on the host, GBs, for one small crop. It is now
    refused first, by a check of that one rescale (Engine._check_center_crop; it planned a whole
    multi-crop request for it), with the one-line MemoryBudgetError the other paths give,
    naming the file."""
    from PIL import Image

    from vggfast.errors import MemoryBudgetError
    cls, loc = _pair("scr")
    eng = _engine(cls, loc, "scr", memory_budget=1 << 20)
    pano = tmp_path / "pano.png"
    Image.new("RGB", (2000, 40)).save(pano)
    resized = []
    real = pp.resize_crop
    monkeypatch.setattr(pp, "resize_crop", lambda x, q, *crop: resized.append(q) or real(x, q,
                                                                                     *crop))
    # one crop, worded for it (it said "to cut its crops", multi-crop's words)
    want = (f"{pano} (40x2000, HxW) at scale 64 is rescaled to 64x3200 to cut its central crop: "
            "2.4 MiB of float32 resample buffers, over the memory budget of 1.0 MiB; use smaller "
            "scales, or raise the budget to at least 2496000 bytes with "
            "Engine(..., memory_budget=BYTES)")
    with pytest.raises(MemoryBudgetError) as err:
        L.center_crop_box(eng, str(pano), 0, scale=64)
    assert str(err.value).startswith(want) and "\n" not in str(err.value)
    assert err.value.image == 0 and str(err.value) == f"{pano} {err.value.reason}"
    with pytest.raises(MemoryBudgetError,
                       match=r"^image 0 \(40x2000, HxW\) at scale 64 is rescaled"):
        L.center_crop_box(eng, torch.rand(3, 40, 2000), 0, scale=64)    # no file to name
    with pytest.raises(MemoryBudgetError,
                       match=r"^image 0 \(40x48, HxW\) at scale 4096 is rescaled"):
        L.center_crop_box(eng, torch.rand(3, 40, 48), 0, scale=4096)    # a huge scale
    assert resized == []                                # refused before anything was resized
    # the check is of the one rescale: the planner is not asked
    monkeypatch.setattr(eng._executor.scheduler, "plan",
                        lambda *a, **k: pytest.fail("center_crop_box planned a request"))
    L.center_crop_box(eng, str(pano), 0, scale=40)      # within the budget: as before
    assert resized == [40]


def _whole_rescale_crop(x, q, top, left, height, width):
    """LocDataset's crop as it was cut before: from the whole rescale."""
    return pp.resize_short(x, q)[:, top:top + height, left:left + width]


def test_localisation_crops_resample_only_the_crop_bit_for_bit(tmp_path, monkeypatch):
    """center_crop_box and LocDataset rescaled the whole image to the scale to cut one crop
    (pp.resize_short: 1.5 GB of float32 for a 40x20000 strip at S = 512). They resample only
    the crop now (pp.resize_crop), and their crops equal the old whole rescale's bit for bit
    (torch.equal), with the same targets and boxes: on a small image, wide and tall strips and
    odd sizes, uint8 files and float tensors, at training's random scales, crops, flips and
    colour shifts and at the central crop, also with the resample made in small chunks."""
    from PIL import Image
    rng = np.random.default_rng(5)
    cls, loc = _pair("scr")
    eng = _engine(cls, loc, "scr")
    size = eng.spec.image_size
    shapes = [(40, 48), (37, 301), (16, 2000), (2000, 24), (97, 61)]
    samples, floats = [], []
    for k, (h, w) in enumerate(shapes):
        a = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        Image.fromarray(a).save(tmp_path / f"{k}.png")
        samples.append(L.LocSample(str(tmp_path / f"{k}.png"), k % C,
                                   [(2.0, 3.0, 0.6 * w, 0.7 * h), (0.3 * w, 0.2 * h, w, h)]))
        floats.append(torch.from_numpy(rng.random((3, h, w), dtype=np.float32)))
    images = [s.file for s in samples] + floats
    scales = (L.default_center_scale(size), size, 64)    # 37: (37, 301) is not resampled
    # center_crop_box's net input as it was: the central crop of the whole rescale
    old_inputs = [pp.normalize(pp.center_crop(pp.resize_short(pp.load_image(img), q), size)[None],
                               eng.loc_preprocess) for img in images for q in scales]
    sets = [L.LocDataset(samples, size, (size, 48, "range")),
            L.LocDataset(samples, size, (size, 40, 64), color=False),
            L.LocDataset(samples, size, (37,), train=False)]
    keys = [(i, seed) for i in range(len(samples)) for seed in range(4)]
    with monkeypatch.context() as m:     # LocDataset's crop as it was
        m.setattr(pp, "resize_crop", _whole_rescale_crop)
        old_items = [d[key] for d in sets for key in keys]
        old_boxes = [L.center_crop_box(eng, img, 3, scale=q) for img in images for q in scales]
    seen, real_run = [], eng._loc_backend.run
    monkeypatch.setattr(eng._loc_backend, "run", lambda x, *a, **k: seen.append(x.clone())
                        or real_run(x, *a, **k))
    crops, real_crop = [], pp.resize_crop
    monkeypatch.setattr(pp, "resize_crop", lambda x, q, *crop: crops.append(q)
                        or real_crop(x, q, *crop))
    for chunk in (pp.RESIZE_CHUNK_BYTES, 1 << 12):      # 1 << 12: chunks of rows and columns
        monkeypatch.setattr(pp, "RESIZE_CHUNK_BYTES", chunk)
        seen.clear(), crops.clear()
        items = [d[key] for d in sets for key in keys]
        boxes = [L.center_crop_box(eng, img, 3, scale=q) for img in images for q in scales]
        assert len(crops) == len(items) + len(boxes)        # each crop is resize_crop's
        for (xa, ta, la), (xb, tb, lb) in zip(items, old_items, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ta, tb) and la == lb
        assert len(seen) == len(old_inputs)
        assert all(torch.equal(a, b) for a, b in zip(seen, old_inputs))
        assert boxes == old_boxes
    # the whole rescale is not made: a strip's training crop resamples a few columns of it
    monkeypatch.setattr(pp, "resize_short", lambda *a: pytest.fail("a whole rescale"))
    assert sets[0][(2, 0)][0].shape == (3, size, size)


def test_center_crop_check_counts_what_resize_crop_holds(monkeypatch):
    """Engine._check_center_crop (center_crop_box's check) counts pp.resize_crop_bytes, what
    resize_crop holds at its peak, not the whole float32 rescale (the planner's multi-crop
    rule, which it applied before and which refused a huge scale of a small image, 240 MB
    for a crop that needs 14 MB): refused one byte under, passed at it; and the crop's own
    forward through the localisation net is still checked."""
    from vggfast.engine import activation_bytes
    from vggfast.errors import MemoryBudgetError
    cls, loc = _pair("scr")
    spec = _engine(cls, loc, "scr").spec
    n = spec.image_size
    for (h, w), q in [((40, 2000), 64), ((2000, 40), 64), ((40, 48), 4096), ((33, 47), 700),
                      ((3000, 2000), 256)]:
        rh, rw = pp.rescaled_size(h, w, q)
        need = pp.resize_crop_bytes(h, w, q, n, n)
        with pytest.raises(MemoryBudgetError) as err:
            _engine(cls, loc, "scr", memory_budget=need - 1)._check_center_crop((h, w), q)
        assert err.value.image == 0 and str(err.value) == f"image 0 {err.value.reason}"
        assert err.value.reason.startswith(f"({h}x{w}, HxW) at scale {q} is rescaled to "
                                           f"{rh}x{rw} to cut its central crop: ")
        assert f"at least {need} bytes" in err.value.reason
        _engine(cls, loc, "scr", memory_budget=need)._check_center_crop((h, w), q)
    # a huge scale of a small image: its width pass is 40 rows, not the 4096 rows it is cut from
    assert pp.resize_crop_bytes(40, 48, 4096, n, n) * 10 < 3 * 4 * 4096 * 4915
    # a budget the resample fits and the crop's forward does not (an image whose smallest side
    # is the scale: its crop is cut, not resampled)
    forward = activation_bytes(_engine(cls, loc, "scr").loc_weights.spec, torch.float32, 1, n, n)
    rescale = pp.resize_crop_bytes(n, n + 8, n, n, n)
    assert rescale < forward - 1
    eng = _engine(cls, loc, "scr", memory_budget=forward - 1)
    with pytest.raises(MemoryBudgetError,
                       match=rf"^image 0 \({n}x{n + 8}, HxW\) at scale {n}: its central crop: "
                             rf"a {n}x{n} \(HxW\) input \(batch 1\) needs "):
        L.center_crop_box(eng, torch.rand(3, n, n + 8), 0, scale=n)
    _engine(cls, loc, "scr", memory_budget=forward)._check_center_crop((n, n + 8), n)


def _failing_pil_save(monkeypatch, exc):
    """PIL's save to a file name writes a partial file and fails with `exc` (a full disk, a
    crash); saves to in-memory buffers (the format probes) work."""
    import io

    from PIL import Image
    real = Image.Image.save

    def save(self, fp, format=None, **kw):
        if isinstance(fp, io.BytesIO):
            return real(self, fp, format, **kw)
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n half an image")
        raise exc
    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"),
                                 KeyboardInterrupt()])
def test_the_localize_image_is_written_atomically(tmp_path, monkeypatch, exc):
    """draw_boxes (`vggfast localize --out`) wrote the PNG in place: a full disk or a crash
    mid-write left a truncated image where the previous one was. It now writes a temporary file
    in the same folder and renames it: the old image survives and no temporary is left."""
    from PIL import Image
    out = tmp_path / "boxes.png"
    preds = [(0, "a", 0.9, (2.0, 3.0, 30.0, 20.0))]
    L.draw_boxes(torch.rand(3, 40, 48), preds, out)
    old = out.read_bytes()
    with Image.open(out) as im:
        assert im.size == (48, 40)
    _failing_pil_save(monkeypatch, exc)
    with pytest.raises(VGGFastError if isinstance(exc, OSError) else KeyboardInterrupt) as err:
        L.draw_boxes(torch.rand(3, 40, 48), preds, out)
    if isinstance(exc, OSError):
        assert str(err.value) == f"cannot write {out}: No space left on device"
    assert out.read_bytes() == old and os.listdir(tmp_path) == ["boxes.png"]


def test_draw_boxes_makes_no_whole_float_copy_of_the_image(monkeypatch):
    """draw_boxes converted the whole image to float32 and back to uint8 (to_float, * 255,
    round: 12 bytes a pixel twice over, 2.8 GB at the peak for a 12000x9000 photo) just to make
    the PIL image it draws on. It is made a chunk of rows at a time now: no array (tracemalloc)
    holds more than a few chunks, and the pixels are those of the old conversion, for uint8 and
    float images."""
    import tracemalloc
    h, w = 480, 640
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(pp, "RESIZE_CHUNK_BYTES", 1 << 15, raising=False)   # 4 rows of 640
    preds = [(0, "a", 0.9, (20.0, 30.0, 500.0, 400.0)), (1, "b", 0.5, (5.0, 5.0, 630.0, 470.0))]
    for x in (torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g),
              torch.rand(3, h, w, generator=g)):
        want = (pp.to_float(x).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(np.asarray(L.draw_boxes(x, [])), want)
        tracemalloc.start()
        try:
            im = L.draw_boxes(x, preds)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert im.size == (w, h) and peak < 3 * h * w // 4, peak   # the uint8 image: 3 * h * w
        drawn = np.asarray(im)
        assert np.array_equal(drawn[100:150, 100:150], want[100:150, 100:150])   # inside both
        assert not np.array_equal(drawn, want)


def test_the_training_scan_reads_png_orientation_without_decoding(tmp_path, monkeypatch):
    """readable_samples read each image's EXIF rotation through PIL's getexif, which decodes a
    whole PNG to look for EXIF after its pixels: every PNG of a training set was decoded at the
    scan. The chunk list is read instead (heads only; preprocess.decoded_size, the sizing of
    image_size), an EXIF chunk after the pixels read with the header, and a PNG is decoded only
    where the list is cut short. The boxes are clipped to the loaded size (load_image's, EXIF
    rotation applied) as before, and a PNG whose pixels are cut short is still skipped."""
    import zlib

    from PIL import Image, ImageFile
    from vggfast.preprocess import load_image
    turn = Image.Exif()
    turn[0x0112] = 6                                          # loaded turned: 40 wide, 48 high
    Image.new("RGB", (48, 40), "red").save(tmp_path / "plain.jpg")
    Image.new("RGB", (48, 40), "red").save(tmp_path / "plain.png")
    Image.new("RGB", (48, 40), "red").save(tmp_path / "turned.jpg", exif=turn)
    Image.new("RGB", (48, 40), "red").save(tmp_path / "head.png", exif=turn)  # eXIf before IDAT
    data = (tmp_path / "plain.png").read_bytes()
    body = turn.tobytes()
    chunk = (len(body).to_bytes(4, "big") + b"eXIf" + body
             + zlib.crc32(b"eXIf" + body).to_bytes(4, "big"))
    (tmp_path / "tail.png").write_bytes(data[:-12] + chunk + data[-12:])   # before IEND
    (tmp_path / "cut.png").write_bytes(data[:60])
    names = ["plain.jpg", "plain.png", "turned.jpg", "head.png", "tail.png", "cut.png"]
    loaded = {n: tuple(load_image(tmp_path / n).shape[1:]) for n in names[:-1]}
    assert loaded["tail.png"] == loaded["head.png"] == loaded["turned.jpg"] == (48, 40)
    assert loaded["plain.png"] == loaded["plain.jpg"] == (40, 48)
    decoded = []
    real = ImageFile.ImageFile.load

    def load(self):
        decoded.append(os.path.basename(getattr(self, "filename", "") or ""))
        return real(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    samples = [L.LocSample(str(tmp_path / n), 1, [(-20.0, -5.0, 30.0, 60.0)]) for n in names]
    kept = L.readable_samples(samples, "for training")
    assert [os.path.basename(s.file) for s in kept] == names[:-1]
    for s in kept:
        h, w = loaded[os.path.basename(s.file)]
        assert s.boxes == [(0.0, 0.0, min(30.0, w), min(60.0, h))], s.file
    assert decoded == ["cut.png"], decoded


@pytest.mark.parametrize("kwargs, match", [
    (dict(scales=(16,)), "^scale 16 is below the network's native size"),
    (dict(scales=()), "scales"), (dict(top_k=0), "^top_k must be a positive integer"),
    (dict(flip="yes"), "flip"),
    (dict(protocol="center", center_scale=16), "^scale 16 is below the network's native size")])
def test_evaluate_localization_checks_its_arguments_before_reading_an_image(tmp_path, kwargs,
                                                                            match, monkeypatch):
    """Bad scales (top_k, flip, the center protocol's scale) were refused by the first image's
    localize, after that image was decoded; now before any image is read, as classification's
    evaluate refuses them."""
    cls, loc = _pair("scr")
    eng = _engine(cls, loc, "scr")
    _img(tmp_path / "a.png")
    decoded = []
    monkeypatch.setattr(L.pp, "load_image", lambda i: decoded.append(i))
    with pytest.raises(VGGFastError, match=match):
        L.evaluate_localization(eng, [L.LocSample(str(tmp_path / "a.png"), 0, [(0, 0, 8, 8)])],
                                **kwargs)
    assert decoded == []
    with pytest.raises(VGGFastError, match=r"a\.png: label 1\.0 is not a class index"):
        L.evaluate_localization(eng, [L.LocSample(str(tmp_path / "a.png"), 1.0, [(0, 0, 8, 8)])],
                                protocol="center")


@pytest.mark.parametrize("mode", ["scr", "pcr"])
def test_evaluate_localization_decodes_and_checks_once_with_localizes_numbers(tiny_set, mode,
                                                                              monkeypatch):
    """Each image's localize (center_crop_box) checked the scales again and re-ran load_image
    on the decoded tensor. Now each image is decoded once and the scales checked once for the
    whole evaluation; the figures are those of localize (center_crop_box) on each file."""
    cls, loc = _pair(mode, seed=1)
    eng = _engine(cls, loc, mode)
    samples = L.read_boxes(tiny_set / "boxes.jsonl", None, tiny_set)
    for protocol, kw in [("dense", dict(scales=(32, 40), top_k=5, flip=True)),
                         ("center", dict(center_scale=40))]:
        if protocol == "dense":
            preds = [L.localize(eng, s.file, (32, 40), 5, True) for s in samples]
            loc1 = [not L.ilsvrc_correct(p, s.label, s.boxes, 1) for p, s in zip(preds, samples)]
            loc5 = [not L.ilsvrc_correct(p, s.label, s.boxes, 5) for p, s in zip(preds, samples)]
            want = dict(top1_error=100 * np.mean(loc1), top5_error=100 * np.mean(loc5))
        else:
            ious = [float(L.iou([L.center_crop_box(eng, s.file, s.label, 40)], s.boxes).max())
                    for s in samples]
            want = dict(mean_iou=float(np.mean(ious)),
                        error=100 * np.mean([i <= L.IOU_THRESHOLD for i in ious]))
        decoded, checked = [], []
        load, check = L.pp.load_image, eng.check_scales
        monkeypatch.setattr(L.pp, "load_image", lambda i: decoded.append(i) or load(i))
        monkeypatch.setattr(eng, "check_scales", lambda *a, **k: checked.append(a) or
                            check(*a, **k))
        r = L.evaluate_localization(eng, samples, protocol=protocol, **kw)
        monkeypatch.undo()
        assert decoded == [s.file for s in samples] and len(checked) == 1
        assert r["images"] == len(samples) and r["failed"] == []
        assert {k: r[k] for k in want} == pytest.approx(want, rel=0, abs=1e-9)

"""End-to-end on real data (scikit-learn's digits): the training run itself, the Engine on the
held-out digits, and Appendix B's linear-classifier check on Engine.features."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import vggfast

pytest.importorskip("sklearn", reason="scikit-learn (the test extra) provides the digits")
ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "vggfast" / "data" / "digits_a.safetensors"


def _script(name="make_digits_model"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _engine_accuracy(eng, images, labels):
    results = eng.classify([torch.from_numpy(a).permute(2, 0, 1) for a in images], scales=32,
                           flip=False)
    pred = np.array([r.top(1)[0][0] for r in results])
    return float((pred == labels).mean())


@pytest.mark.slow
def test_the_digits_training_run_reaches_95_percent_held_out(tmp_path):
    """scripts/make_digits_model.py from scratch (about 40 s on a quiet 2-core CPU)."""
    mod = _script()
    out = tmp_path / "digits.safetensors"
    assert mod.main(["--root", str(tmp_path / "data"), "--out", str(out)]) == 0
    heldout = mod.digits_splits()["heldout"]
    assert _engine_accuracy(vggfast.Engine(str(out), backend="torch"), *heldout) >= 0.95


@pytest.mark.slow
def test_digits_on_canvas_localisation_reaches_90_percent(tmp_path):
    """Appendix A on real handwriting: scripts/make_digits_loc.py (classifier, then a localiser
    fine-tuned from it) must localise >= 90% of held-out digits with the right class, IoU > 0.5
    (the script returns 1 below that)."""
    assert _script("make_digits_loc").main(["--root", str(tmp_path)]) == 0


def test_linear_classifier_on_engine_features_of_real_digits():
    """Appendix B: dense descriptors (pooled, flip-averaged, L2-normalised) + a linear classifier."""
    from sklearn.linear_model import LogisticRegression
    splits = _script().digits_splits()
    eng = vggfast.Engine(str(SHIPPED), backend="torch")

    def feats(name, n):
        x, y = splits[name]
        imgs = [torch.from_numpy(a).permute(2, 0, 1) for a in x[:n]]
        return eng.features(imgs, layer="relu7", scales=(32, 40)).numpy(), y[:n]

    xtr, ytr = feats("train", 600)
    xte, yte = feats("heldout", 300)
    assert xtr.shape == (600, eng.spec.fc_width)
    np.testing.assert_allclose(np.linalg.norm(xtr, axis=1), 1, rtol=1e-5)
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(xtr, ytr)
    assert clf.score(xte, yte) >= 0.93


def test_result_repr_shows_the_answer():
    """repr(Result) is the top classes and the scales (as the README example prints), not the
    whole probability vector."""
    eng = vggfast.Engine(str(SHIPPED), backend="torch")
    img = np.zeros((32, 32, 3), np.uint8)
    img[4:28, 14:19] = 255
    r = eng.classify(img, scales=[32, 48], top_k=3)
    text = repr(r)
    assert text.startswith("Result(top=[(1, '1', 0.9") and "scales=[32, 48]" in text
    assert text.count("(") == 4 and len(text) < 200

import pytest
import torch
import torchvision

from vggfast import VGGFastError, build_model, make_spec
from vggfast.configs import ALIASES, TABLE1
from vggfast.nn import dense_forward

# Table 2 of the paper (1000 classes)
PARAMS = {"A": 132_863_336, "B": 133_047_848, "C": 133_638_952, "D": 138_357_544,
          "E": 143_667_240}


@pytest.mark.parametrize("config", list(PARAMS))
def test_parameter_counts_equal_table2(config):
    with torch.device("meta"):
        m = build_model(config)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[config]
    assert m.spec.param_count() == PARAMS[config]


def test_a_lrn_has_lrn_after_conv1_1_and_a_parameters():
    with torch.device("meta"):
        m = build_model("A-LRN")
    assert sum(p.numel() for p in m.parameters()) == PARAMS["A"]
    assert isinstance(m.features[2], torch.nn.LocalResponseNorm)
    lrn = m.features[2]
    # Krizhevsky's alpha is not divided by n; torch's is, so torch gets alpha * n
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 5e-4, 0.75, 2.0)


def test_config_c_uses_1x1_as_third_conv_of_blocks_3_to_5():
    spec = make_spec("C")
    ones = [l.name for l in spec.convs if l.k == 1]
    assert ones == ["conv3_3", "conv4_3", "conv5_3"]
    assert all(l.pad == 0 for l in spec.convs if l.k == 1)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_state_dict_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):
        ours = build_model(name).state_dict()
        theirs = getattr(torchvision.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_width_and_image_size_scale_the_network():
    spec = make_spec("D", num_classes=10, width=0.25, image_size=64)
    assert [l.cout for l in spec.convs][:2] == [16, 16]
    assert spec.fc_width == 1024 and spec.grid == 2
    assert spec.fcs[0].k == 2 and spec.fcs[0].cin == 128


@pytest.mark.parametrize("bad", [dict(config="F"), dict(config="vgg15"), dict(config=3),
                                 dict(width=0), dict(width=float("nan")), dict(image_size=100),
                                 dict(image_size=0), dict(num_classes=0),
                                 dict(config="A-LRN", batch_norm=True)])
def test_bad_configurations_are_refused(bad):
    args = dict(config="D") | bad
    with pytest.raises(VGGFastError):
        make_spec(**args)


@pytest.mark.parametrize("config", list(TABLE1))
def test_output_size_matches_the_dense_network(config):
    spec = make_spec(config, num_classes=3, width=1 / 32, image_size=32)
    m = build_model(config, num_classes=3, width=1 / 32, image_size=32)
    from vggfast.weights import load
    w = load(m.state_dict(), config=config)
    for h, w_ in [(32, 32), (33, 47), (95, 64), (64, 130)]:
        out = dense_forward(w.state_dict, w.spec, torch.randn(1, 3, h, w_))["fc8"]
        assert tuple(out.shape[-2:]) == spec.output_size(h, w_)


def test_tap_names_follow_torchvision_style():
    names = make_spec("D").tap_names()
    assert names[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert names[-6:] == ("pool5", "fc6", "relu6", "fc7", "relu7", "fc8")
    assert "norm1" in make_spec("A-LRN").tap_names()

"""EfficientNet-Lite0 converter: checked by name and shape; a mismatched state dict is a clear error."""

import pytest
import timm
import torch

from vclr.errors import ConversionError
from vclr.model.convert import convert_efficientnet_lite, efficientnet_name_map


@pytest.fixture(scope="module")
def timm_model():
    torch.manual_seed(0)
    return timm.create_model("efficientnet_lite0", pretrained=False)


@pytest.fixture
def source(timm_model):
    """A state dict in EfficientNet-PyTorch names, made from the timm model with the inverse map."""
    target = timm_model.state_dict()
    return {src: target[dst].clone() + 0.5 for src, dst in efficientnet_name_map(timm_model).items()
            if target[dst].is_floating_point()} | {
        src: target[dst].clone() for src, dst in efficientnet_name_map(timm_model).items()
        if not target[dst].is_floating_point()}


def test_map_covers_every_tensor_once(timm_model):
    names = efficientnet_name_map(timm_model)
    assert len(names) == len(timm_model.state_dict()) == 296
    assert len(set(names.values())) == len(names)
    assert names["_blocks.0._depthwise_conv.weight"] == "blocks.0.0.conv_dw.weight"
    assert names["_blocks.15._project_conv.weight"] == "blocks.6.0.conv_pwl.weight"
    assert names["_blocks.1._expand_conv.weight"] == "blocks.1.0.conv_pw.weight"


def test_conversion_places_every_tensor(timm_model, source):
    converted = convert_efficientnet_lite(source, timm_model)
    fresh = timm.create_model("efficientnet_lite0", pretrained=False)
    fresh.load_state_dict(converted, strict=True)
    for src, dst in efficientnet_name_map(timm_model).items():
        assert torch.equal(fresh.state_dict()[dst], source[src]), dst


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.update({"_blocks.3._expand_conv.weight": torch.zeros(1, 2, 1, 1)}), "shapes differ"),
    (lambda sd: sd.pop("_bn1.running_var"), "are absent (first: _bn1.running_var)"),
    (lambda sd: sd.update({"_blocks.3._se_reduce.weight": torch.zeros(1)}), "have no place"),
])
def test_mismatched_state_dict_is_rejected(timm_model, source, damage, message):
    damage(source)
    with pytest.raises(ConversionError, match="cannot convert into EfficientNet") as info:
        convert_efficientnet_lite(source, timm_model)
    assert message in str(info.value)


def test_wrong_architecture_is_rejected(source):
    with pytest.raises(ConversionError, match="shapes differ|absent|no place"):
        convert_efficientnet_lite(source, timm.create_model("efficientnet_lite1", pretrained=False))

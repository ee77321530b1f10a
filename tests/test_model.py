"""Contract: every vclr model config builds and both towers map into one space; the temperature is a log value."""

import json
import math

import pytest
import torch

from vclr.config import ModelConfig
from vclr.errors import ConfigError
from vclr.model.build import MODEL_CONFIG_DIR, build_model, get_tokenizer, image_preprocess_cfg, list_models

VCLR_MODELS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json") if "hf_model_name" not in p.read_text())
HF_TEXT_MODELS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json") if "hf_model_name" in p.read_text())


def test_vclr_configs_are_registered_with_open_clip():
    assert VCLR_MODELS and set(VCLR_MODELS) <= set(list_models())
    assert "ViT-B-32" in list_models()


@pytest.mark.parametrize("name", VCLR_MODELS)
@pytest.mark.parametrize("projector", [False, True])
def test_model_encodes_both_modalities(name, projector):
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, projector=projector, init_temperature=0.05)).eval()
    size = image_preprocess_cfg(model)["size"]
    tokens = get_tokenizer(model.cfg)(["a red circle", "a small blue star at the top"])
    out = model(torch.randn(2, 3, size, size), tokens)
    dim = json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())["embed_dim"]
    assert out["image_features"].shape == out["text_features"].shape == (2, dim)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert float(out["logit_scale"].detach()) == pytest.approx(1 / 0.05, rel=1e-5)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(1 / 0.05), rel=1e-6)


def test_fixed_temperature_is_not_trained():
    model = build_model(ModelConfig(learn_temperature=False))
    assert not model.logit_scale.requires_grad


def test_unknown_model_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="vclr models"):
        build_model(ModelConfig(name="no-such-model"))
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        build_model(ModelConfig(pretrained=str(tmp_path / "missing.pt")))


def test_pretrained_local_checkpoint_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = build_model(ModelConfig())
    torch.save(source.clip.state_dict(), tmp_path / "towers.pt")
    torch.manual_seed(2)
    loaded = build_model(ModelConfig(pretrained=str(tmp_path / "towers.pt")))
    fresh = build_model(ModelConfig())
    name = "visual.conv1.weight"
    assert torch.equal(loaded.clip.state_dict()[name], source.clip.state_dict()[name])
    assert not torch.equal(fresh.clip.state_dict()[name], source.clip.state_dict()[name])


@pytest.mark.parametrize("name", HF_TEXT_MODELS)
def test_hf_text_configs_build_from_a_local_dir(name, tiny_hf_text_dir):
    model = build_model(ModelConfig(name=name, text_tower_dir=str(tiny_hf_text_dir))).eval()
    size = image_preprocess_cfg(model)["size"]
    out = model(torch.randn(2, 3, size, size), get_tokenizer(model.cfg)(["a red circle", "a blue star"]))
    dim = json.loads((MODEL_CONFIG_DIR / f"{name}.json").read_text())["embed_dim"]
    assert out["image_features"].shape == out["text_features"].shape == (2, dim)


def test_patch_dropout_is_open_clips_flip_in_training_only():
    """Training drops patches exactly as open_clip's own model with the same setting; eval sees every patch."""
    import open_clip

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="vclr-tiny-vit", patch_dropout=0.5))
    reference = open_clip.create_model("vclr-tiny-vit", force_patch_dropout=0.5, output_dict=True)
    reference.load_state_dict(model.clip.state_dict())
    plain = build_model(ModelConfig(name="vclr-tiny-vit"))
    plain.load_state_dict(model.state_dict())
    tokens_seen = []
    model.clip.visual.transformer.register_forward_pre_hook(lambda _, args: tokens_seen.append(args[0].shape[1]))
    images = torch.randn(3, 3, 64, 64)  # 8x8 patches of 8 px + the class token

    model.train(), reference.train()
    torch.manual_seed(1)
    ours = model.encode_image(images)
    torch.manual_seed(1)
    theirs = reference.encode_image(images)
    assert tokens_seen == [1 + 32]
    torch.testing.assert_close(ours, theirs)

    model.eval(), plain.eval()
    torch.testing.assert_close(model.encode_image(images), plain.encode_image(images))
    assert tokens_seen[-1] == 1 + 64


@pytest.mark.parametrize("name", ["vclr-tiny-rn", "vclr-lit-effl0-minilm"])
def test_patch_dropout_needs_a_vit(name):
    with pytest.raises(ConfigError, match="model.patch_dropout=0.5 needs an open_clip ViT image tower"):
        build_model(ModelConfig(name=name, patch_dropout=0.5))

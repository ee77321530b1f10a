"""LiT-style towers from local files: a timm image tower with converted weights, a local HF text tower, and locking."""

from dataclasses import replace

import pytest
import timm
import torch

from vclr.config import LossConfig, ModelConfig
from vclr.errors import ConfigError
from vclr.model.build import build_model, get_tokenizer
from vclr.train.loss import CombinedLoss
from vclr.train.optim import param_groups


@pytest.fixture
def lit_cfg(tiny_hf_text_dir, tiny_lit_model_name, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "trunk.pt"
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), weights)
    return ModelConfig(name=tiny_lit_model_name, text_tower_dir=str(tiny_hf_text_dir), image_tower_weights=str(weights))


def _step(model, cfg):
    tokens = get_tokenizer(cfg)(["a red circle on the left", "a small blue star at the top", "a green square",
                                 "the large star"])
    images = torch.randn(4, 3, 64, 64)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    model.train()
    out = model(images, tokens)
    CombinedLoss(LossConfig())(out["image_features"], out["text_features"], out["logit_scale"])["loss"].backward()
    optimizer.step()


def test_local_towers_load(lit_cfg, tmp_path):
    model = build_model(lit_cfg)
    saved = torch.load(lit_cfg.image_tower_weights, weights_only=True)
    assert torch.equal(model.clip.visual.trunk.state_dict()["conv_stem.weight"], saved["conv_stem.weight"])
    from transformers import AutoModel
    bert = AutoModel.from_pretrained(lit_cfg.text_tower_dir)
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(model.clip.text.transformer.state_dict()[name], bert.state_dict()[name])
    tokens = get_tokenizer(lit_cfg)(["a red circle"])
    assert tokens.shape == (1, 24) and tokens[0, 0] == 2  # [CLS] from the local vocab


def test_locked_towers_do_not_change(lit_cfg):
    cfg = lit_cfg.__class__(**{**lit_cfg.__dict__, "lock_image": True, "lock_text": True})
    model = build_model(cfg)
    trunk_before = {k: v.clone() for k, v in model.clip.visual.trunk.state_dict().items()}
    text_before = {k: v.clone() for k, v in model.clip.text.transformer.state_dict().items()}
    head_before = model.clip.visual.head.proj.weight.clone()
    _step(model, cfg)
    for k, v in model.clip.visual.trunk.state_dict().items():
        assert torch.equal(v, trunk_before[k]), f"locked image tower changed: {k}"  # BN stats included
    for k, v in model.clip.text.transformer.state_dict().items():
        assert torch.equal(v, text_before[k]), f"locked text tower changed: {k}"
    assert not torch.equal(model.clip.visual.head.proj.weight, head_before), "the projection must still train"


def test_unlocked_towers_do_change(lit_cfg):
    model = build_model(lit_cfg)
    before = model.clip.visual.trunk.conv_stem.weight.clone()
    _step(model, lit_cfg)
    assert not torch.equal(model.clip.visual.trunk.conv_stem.weight, before)


def test_partial_unlock_trains_only_the_last_text_layer(lit_cfg):
    cfg = lit_cfg.__class__(**{**lit_cfg.__dict__, "lock_text": True, "lock_text_unlocked_layers": 1})
    model = build_model(cfg)
    layers = model.clip.text.transformer.encoder.layer
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())


def test_mismatched_tower_files_are_clear_errors(lit_cfg, tmp_path):
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not fit the image tower"):
        build_model(lit_cfg.__class__(**{**lit_cfg.__dict__, "image_tower_weights": str(tmp_path / "bad.pt")}))
    with pytest.raises(ConfigError, match="not a Hugging Face model dir"):
        build_model(lit_cfg.__class__(**{**lit_cfg.__dict__, "text_tower_dir": str(tmp_path)}))
    with pytest.raises(ConfigError, match="no Hugging Face text tower"):
        build_model(ModelConfig(text_tower_dir=lit_cfg.text_tower_dir))


def test_pooled_levels_join_the_averaged_maps_of_timm_s_stages(lit_cfg):
    """model.image_pool_levels: the tower's output is timm's pooled features followed by the named feature levels'
    maps, averaged; checked against timm's blocks run one by one. The projection takes the wider input."""
    cfg = replace(lit_cfg, lock_image=True, image_pool_levels=(2, 4))
    model = build_model(cfg).eval()
    reference = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    reference.load_state_dict(torch.load(cfg.image_tower_weights, weights_only=True), strict=False)
    reference.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h, maps = reference.bn1(reference.conv_stem(x)), []
        for block in reference.blocks:
            h = block(h)
            maps.append(h)
        # feature levels are timm's stage ends: level 2 = blocks[2] (40 channels), level 4 = blocks[6] (320)
        expected = torch.cat([reference.forward_head(reference.bn2(reference.conv_head(h))),
                              maps[2].mean(dim=(2, 3)), maps[6].mean(dim=(2, 3))], dim=1)  # (2, 1640)
        torch.testing.assert_close(model.clip.visual.trunk(x), expected, rtol=1e-4, atol=1e-4)
        assert model.clip.visual.head.proj.in_features == 1280 + 40 + 320
        assert model.encode_image(x).shape == (2, 32)
    assert not any(p.requires_grad for p in model.clip.visual.trunk.parameters())
    assert model.clip.visual.head.proj.weight.requires_grad
    with pytest.raises(ConfigError, match=r"feature levels 0\.\.4"):
        build_model(replace(lit_cfg, image_pool_levels=(5,)))
    with pytest.raises(ConfigError, match="needs a timm image tower"):
        build_model(ModelConfig(image_pool_levels=(1,)))


def test_locked_timm_tower_computes_what_timm_computes(lit_cfg):
    """Locking must not change the function: BN freezing has to keep timm's fused BN+activation intact."""
    cfg = lit_cfg.__class__(**{**lit_cfg.__dict__, "lock_image": True})
    model = build_model(cfg).train()  # a locked tower behaves as in eval mode even while the model trains
    reference = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    reference.load_state_dict(torch.load(cfg.image_tower_weights, weights_only=True), strict=False)
    reference.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.clip.visual.trunk(x), reference(x), rtol=1e-4, atol=1e-4)

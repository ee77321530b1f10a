"""Locked towers computed once: the cached path gives the uncached path's loss and gradients; a training run on the
cache reuses it across runs and recomputes it when the data changes; padding trimmed to the batch's longest caption
leaves an HF text tower's features unchanged."""

import logging
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import vclr.train.loop as train_mod
from vclr.config import LossConfig, ModelConfig, load_config
from vclr.data.synthetic import make_synthetic
from vclr.model.build import build_model, get_tokenizer
from vclr.train.loss import CombinedLoss

CAPTIONS = ["a red circle on the left", "a small blue star at the top", "a green square", "the large star",
            "a red square", "a blue circle"]


@pytest.fixture
def lit_files(tiny_hf_text_dir, tiny_lit_model_name, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "trunk.pt"
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), weights)
    return tiny_lit_model_name, str(tiny_hf_text_dir), str(weights)


def _locked(lit_files, **extra):
    name, text_dir, weights = lit_files
    return ModelConfig(**{"name": name, "text_tower_dir": text_dir, "image_tower_weights": weights,
                          "lock_image": True, "lock_text": True, **extra})


def _loss_and_grads(model, images, text_input):
    model.zero_grad()
    out = model(images, text_input)
    loss = CombinedLoss(LossConfig(triplet_weight=0.5))(out["image_features"], out["text_features"],
                                                        out["logit_scale"])["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("levels,width", [((), 1280), ((3,), 1280 + 112)])
def test_cached_frozen_parts_give_the_uncached_loss_and_gradients(lit_files, levels, width):
    cfg = _locked(lit_files, image_pool_levels=levels)
    model = build_model(cfg).train()
    tokens = get_tokenizer(cfg)(CAPTIONS)  # (6, L)
    images = torch.randn(6, 3, 64, 64)
    expected_loss, expected_grads = _loss_and_grads(model, images, tokens)

    with torch.no_grad():
        frozen_images = model.frozen_image_part()(images)  # (6, width) the trunk's pooled output (+ pooled levels)
        frozen_texts = model.frozen_text_part()(model.trim_padding(tokens))  # (6, H) pooled transformer output
    assert frozen_images.shape == (6, width) and frozen_texts.ndim == 2
    model.use_cached_inputs(image=True, text=True)
    loss, grads = _loss_and_grads(model, frozen_images, frozen_texts)
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and grads  # the projections (and the temperature) train
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)  # float32 rounding


def test_unlocked_towers_are_not_cached(lit_files):
    model = build_model(_locked(lit_files, lock_image=False))
    assert model.frozen_image_part() is None and model.frozen_text_part() is not None
    model = build_model(_locked(lit_files, lock_text=False))
    assert model.frozen_image_part() is not None and model.frozen_text_part() is None
    model = build_model(_locked(lit_files, lock_text_unlocked_layers=3))  # 2 layers + embeddings: all train
    assert model.frozen_text_part() is None


def test_partly_unlocked_text_tower_caches_its_frozen_layers_with_equal_loss_and_gradients(lit_files):
    cfg = _locked(lit_files, lock_text_unlocked_layers=1)  # the tiny BERT's second (last) layer trains
    model = build_model(cfg).train()
    layers = model.clip.text.transformer.encoder.layer
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert not layers[0].training and layers[1].training  # no dropout in the frozen layer: it can be cached
    tokens = get_tokenizer(cfg)(CAPTIONS)  # (6, L)
    images = torch.randn(6, 3, 64, 64)
    torch.manual_seed(1)  # the trainable layer's dropout draws the same masks on both paths
    expected_loss, expected_grads = _loss_and_grads(model, images, model.trim_padding(tokens))
    with torch.no_grad():
        frozen_images = model.frozen_image_part()(images)
        # padded beyond the longest caption, as cache rows are (the rest trims each batch to its longest again)
        frozen_texts = model.frozen_text_part()(torch.cat([model.trim_padding(tokens),
                                                           torch.zeros(6, 3, dtype=tokens.dtype)], dim=1))
    assert frozen_texts.shape == (6, model.trim_padding(tokens).shape[1] + 3, 32 + 1)  # hidden states + mask
    model.use_cached_inputs(image=True, text=True)
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, frozen_images, frozen_texts)
    torch.testing.assert_close(loss, expected_loss)
    assert any(name.startswith("clip.text.transformer.encoder.layer.1.") for name in grads)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_trimmed_padding_leaves_hf_text_features_unchanged(lit_files):
    cfg = _locked(lit_files, lock_text=False)
    model = build_model(cfg).eval()
    tokens = get_tokenizer(cfg)(CAPTIONS)
    trimmed = model.trim_padding(tokens)
    assert trimmed.shape[1] < tokens.shape[1] and (tokens[:, trimmed.shape[1]:] == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(trimmed), model.encode_text(tokens), rtol=1e-5, atol=1e-6)
    builtin = build_model(ModelConfig())  # open_clip's own text transformer needs every position: left alone
    assert builtin.trim_padding(tokens) is tokens


@pytest.mark.slow
def _train_locked(lit_files, data, out, caplog, *overrides):
    """A short LiT training with both towers locked: (its final weights, what it logged)."""
    name, text_dir, weights = lit_files
    cfg = load_config(None, [f"data.train={data / 'train'}", f"train.output_dir={out}", f"model.name={name}",
                             f"model.text_tower_dir={text_dir}", f"model.image_tower_weights={weights}",
                             "model.lock_image=true", "model.lock_text=true", "data.batch_size=16",
                             "optim.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=100", *overrides])
    with caplog.at_level(logging.INFO):
        caplog.clear()
        train_mod.train(cfg)
    return load_file(out / "model.safetensors"), caplog.text


def _cached_equals_uncached(run) -> str:
    """Trains uncached, then cached: the final weights agree to float32 rounding. -> the cached run's log."""
    uncached, _ = run("uncached", cached=False)
    cached, log = run("cached")
    for key, value in uncached.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-4, atol=1e-6, msg=key)
    return log


def test_training_on_the_cache_equals_uncached_training_and_reuses_it(lit_files, tmp_path, caplog):
    data = make_synthetic(tmp_path / "data", num_train=64, num_test=8, seed=2)

    def run(folder, cached=True, seed=0):
        return _train_locked(lit_files, data, tmp_path / folder, caplog, "optim.max_steps=4",
                             f"train.cache_locked_towers={str(cached).lower()}", f"train.seed={seed}")

    assert "computing the locked image tower's outputs once" in _cached_equals_uncached(run)
    _, log = run("again")
    assert "reusing the locked image tower's outputs" in log and "reusing the locked text tower's outputs" in log
    _, log = run("other_seed", seed=7)  # other random projections: the frozen parts, and so the cache, are the same
    assert "reusing the locked image tower's outputs" in log and "reusing the locked text tower's outputs" in log

    image = next((data / "train").glob("*.png"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # the file changed
    _, log = run("changed")
    assert "computing the locked image tower's outputs once" in log
    assert "reusing the locked text tower's outputs" in log  # the captions did not change


def test_pooled_levels_change_the_image_cache_key(lit_files):
    """The same weights with other pooled levels compute other features: they must not share cached outputs."""
    from types import SimpleNamespace

    from vclr.train.locked_cache import cache_key

    data = SimpleNamespace(table=SimpleNamespace(fingerprint=lambda: "t", image_paths=[]))
    keys = {levels: cache_key("images", build_model(_locked(lit_files, image_pool_levels=levels)).image_split(),
                              data, {}) for levels in [(), (3,), (2, 3), (3,)]}
    assert len(set(keys.values())) == 3


def test_jpeg_draft_changes_the_image_cache_key(lit_files, tmp_path):
    """Decoding JPEGs at another scale gives slightly other pixels: cached outputs must not be shared."""
    from vclr.data.dataset import ImageTextDataset, load_caption_table
    from vclr.train.locked_cache import image_cache_key

    data = make_synthetic(tmp_path / "shapes", num_train=8, num_test=2, seed=0)
    model = build_model(_locked(lit_files))
    table = load_caption_table(data / "train")
    keys = [image_cache_key(model, model.image_split(), ImageTextDataset(
        table, get_tokenizer(model.cfg), 64, decode_now=False, jpeg_draft=draft)) for draft in (0.0, 2.0, 1.0, 2.0)]
    assert len(set(keys)) == 3 and keys[1] == keys[3]


def test_partly_unlocked_towers_have_cache_keys_of_their_own(lit_files):
    """The key hashes the frozen part only (its BatchNorm counters included): another cut, another key."""
    from types import SimpleNamespace

    from vclr.train.locked_cache import cache_key

    data = SimpleNamespace(table=SimpleNamespace(fingerprint=lambda: "t", image_paths=[]),
                           tokens=torch.zeros(2, 4, dtype=torch.long))
    images = {groups: cache_key("images", build_model(_locked(lit_files, lock_image_unlocked_groups=groups))
                                .image_split(), data, {}) for groups in [0, 1, 3]}
    texts = {layers: cache_key("texts", build_model(_locked(lit_files, lock_text_unlocked_layers=layers))
                               .text_split(), data, {}) for layers in [0, 1]}
    assert len(set(images.values())) == 3 and len(set(texts.values())) == 2


@pytest.mark.parametrize("unlocked_groups", [1, 3])
def test_partly_unlocked_trunk_caches_its_frozen_blocks_with_equal_loss_and_gradients(lit_files, unlocked_groups):
    cfg = _locked(lit_files, lock_image_unlocked_groups=unlocked_groups)
    model = build_model(cfg).train()
    prefix = model.frozen_image_part()
    assert isinstance(prefix, torch.nn.Sequential)
    assert not any(p.requires_grad for p in prefix.parameters())
    assert any(p.requires_grad for p in model.clip.visual.trunk.parameters())  # the later blocks train
    tokens = get_tokenizer(cfg)(CAPTIONS)
    images = torch.randn(6, 3, 64, 64)
    torch.manual_seed(1)
    expected_loss, expected_grads = _loss_and_grads(model, images, tokens)
    with torch.no_grad():
        maps = prefix(images)  # (6, C, h, w) feature maps of the frozen blocks
    assert maps.ndim == 4
    model.use_cached_inputs(image=True, text=False)
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, maps, tokens)
    torch.testing.assert_close(loss, expected_loss)
    assert any(name.startswith("clip.visual.trunk.") for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_validation_on_cached_locked_towers_equals_the_full_towers(lit_files, tmp_path):
    from types import SimpleNamespace

    from vclr.data.dataset import load_caption_table
    from vclr.train.validate import Validator

    data = make_synthetic(tmp_path / "data", num_train=8, num_test=24, seed=3)
    cfg = _locked(lit_files, lock_image_unlocked_groups=1)
    model = build_model(cfg).eval()
    one_process = SimpleNamespace(num_processes=1, process_index=0,
                                  gather_for_metrics=lambda parts, use_gather_object: parts)
    full = Validator(load_caption_table(data / "test"), model, get_tokenizer(cfg), one_process, batch_size=10)(model)
    model.use_cached_inputs(image=True, text=True)
    validator = Validator(load_caption_table(data / "test"), model, get_tokenizer(cfg), one_process, batch_size=10)
    cached = validator(model)
    assert validator._frozen_cache[0] is not None and validator._frozen_cache[1] is not None
    assert {k: v for k, v in cached.items() if k != "val_s"} == {k: v for k, v in full.items() if k != "val_s"}


def test_cached_augmented_views_equal_the_uncached_augmented_path(lit_files, tmp_path, caplog):
    """train.cache_views: K seeded augmented views of each image are computed once; training on them equals training
    with the locked tower run every step on the same seeded views (the uncached path), and another K, seed or
    augmentation is another cache."""
    data = make_synthetic(tmp_path / "data", num_train=48, num_test=8, seed=4)

    def run(folder, cached=True, views=3, jitter=0.3):
        return _train_locked(lit_files, data, tmp_path / folder, caplog, "optim.max_steps=6", "data.augment=true",
                             f"data.augment_color_jitter={jitter}", "data.augment_scale=0.5",
                             f"train.cache_views={views}", f"train.cache_locked_towers={str(cached).lower()}")

    assert "x 3 augmented views" in _cached_equals_uncached(run)
    _, log = run("again")
    assert "reusing the locked image tower's outputs" in log
    for folder, options in (("views", {"views": 2}), ("jitter", {"jitter": 0.1})):
        _, log = run(folder, **options)
        assert "computing the locked image tower's outputs once" in log, folder


def test_views_are_the_same_pixels_every_time_and_differ_from_each_other(tmp_path):
    from vclr.config import DataConfig
    from vclr.data.dataset import ImageTextDataset, load_caption_table

    data = make_synthetic(tmp_path / "data", num_train=8, num_test=2, seed=5)
    table = load_caption_table(data / "train")
    settings = DataConfig(augment=True, augment_scale=0.5, augment_color_jitter=0.4, augment_grayscale=0.5)
    dataset = ImageTextDataset(table, get_tokenizer(ModelConfig()), 64, augment=True, augment_settings=settings,
                               views=4, cache_images=False)
    first = [dataset.image(0, view) for view in range(4)]
    assert all(torch.equal(a, dataset.image(0, view)) for view, a in enumerate(first))  # seeded: the same again
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[2], first[3])  # and views differ
    epochs = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        image = dataset[0][0]
        epochs.add(next(view for view in range(4) if torch.equal(image, first[view])))  # an item is one of them
    assert len(epochs) > 1  # and another one in other epochs
    with pytest.raises(Exception, match="train.cache_views"):
        train_mod.train(load_config(None, [f"data.train={data / 'train'}", f"train.output_dir={tmp_path / 'r'}",
                                           "train.cache_views=2", "data.augment=true", "data.batch_size=4"]))

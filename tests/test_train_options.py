"""Training options against references: gradient accumulation (with the memory bank, and across a resume), the LR
schedule, weight-decay groups, the wall-time cap and augmentation on the loader path."""

import logging
from dataclasses import replace

import pytest
import torch
from accelerate.utils import set_seed
from helpers import StopAfterCheckpoint, die_after_checkpoint, train_overrides
from safetensors.torch import load_file

import vclr.train.loop as train_mod
from vclr.config import ModelConfig, load_config
from vclr.data.batch import TrainBatch
from vclr.data.dataset import ImageTextDataset, load_caption_table, normalize_images
from vclr.model.build import build_model, get_tokenizer, image_preprocess_cfg
from vclr.train.loss import CombinedLoss, text_ids
from vclr.train.optim import param_groups

ACCUMULATION = {"optim.max_steps": 2, "optim.warmup_steps": 1, "data.batch_size": 8, "train.log_every": 1,
                "train.gradient_accumulation_steps": 2, "loss.memory_bank_size": 12, "loss.triplet_weight": 0.5,
                "loss.triplet_warmup_steps": 0, "train.checkpoint_every": 2}


def _record_micro_batches(monkeypatch) -> list[TrainBatch]:
    batches, real_step = [], train_mod.train_step

    def recording_step(trainer, batch):
        batches.append(replace(batch, images=batch.images.clone(), tokens=batch.tokens.clone(),
                               image_ids=batch.image_ids.clone()))
        return real_step(trainer, batch)

    monkeypatch.setattr(train_mod, "train_step", recording_step)
    return batches


def _reference_weights(cfg, micro_batches: list[TrainBatch], accumulation: int, concatenate: bool = False) -> dict:
    """What gradient accumulation means, by hand: each optimizer step averages the gradients of `accumulation`
    micro-batch losses, each contrastive over its own micro-batch only (plus the memory bank). GradCache, not
    accumulation, is the way to a larger contrastive batch. `concatenate`: one loss over the joined micro-batches."""
    set_seed(cfg.train.seed)
    model = build_model(cfg.model)
    preprocess = image_preprocess_cfg(model)
    loss_fn = CombinedLoss(cfg.loss, embed_dim=model.embed_dim)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_mod.warmup_cosine(cfg.optim.warmup_steps,
                                                                                     cfg.optim.max_steps))
    for step in range(len(micro_batches) // accumulation):
        group = micro_batches[step * accumulation:(step + 1) * accumulation]
        if concatenate:
            group = [TrainBatch("pixels", *(torch.cat([getattr(b, k) for b in group])
                                            for k in ("images", "tokens", "image_ids")))]
        for batch in group:
            out = model(normalize_images(batch.images, preprocess["mean"], preprocess["std"]), batch.tokens)
            losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], step=step,
                             image_ids=batch.image_ids, caption_ids=text_ids(batch.tokens))
            (losses["loss"] / len(group)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model.state_dict()


def _assert_weights_equal(got: dict, expected: dict) -> None:
    for name, value in expected.items():
        if value.is_floating_point():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=2e-6, msg=name)


@pytest.mark.slow
def test_gradient_accumulation_equals_averaged_micro_batch_losses(small_shapes, tmp_path, monkeypatch):
    batches = _record_micro_batches(monkeypatch)
    cfg = load_config(None, train_overrides(small_shapes, tmp_path / "run", **ACCUMULATION))
    train_mod.train(cfg)
    assert len(batches) == 4 and all(len(b.tokens) == 8 for b in batches)
    got = load_file(tmp_path / "run" / "model.safetensors")
    _assert_weights_equal(got, _reference_weights(cfg, batches, accumulation=2))
    # and it is not one contrastive batch of 16: negatives never cross micro-batches
    joined = _reference_weights(cfg, batches, accumulation=2, concatenate=True)
    assert any(not torch.allclose(got[k], v, rtol=1e-3, atol=1e-5) for k, v in joined.items()
               if v.is_floating_point())


@pytest.mark.slow
def test_gradient_accumulation_with_memory_bank_resumes_exactly(small_shapes, tmp_path, monkeypatch):
    extra = {**ACCUMULATION, "optim.max_steps": 4, "train.checkpoint_every": 2}
    train_mod.train(load_config(None, train_overrides(small_shapes, tmp_path / "full", **extra)))
    cfg = load_config(None, train_overrides(small_shapes, tmp_path / "stopped", **extra))
    real_save = die_after_checkpoint(monkeypatch, 2)
    with pytest.raises(StopAfterCheckpoint):
        train_mod.train(cfg)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert train_mod.train(cfg, resume=True).step == 4
    _assert_weights_equal(load_file(tmp_path / "stopped" / "model.safetensors"),
                          load_file(tmp_path / "full" / "model.safetensors"))


def test_warmup_cosine_schedule():
    factor = train_mod.warmup_cosine(10, 110)
    assert [factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup to 1
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.5)  # cosine: halfway at the middle
    assert factor(110) == pytest.approx(0.0, abs=1e-12) and factor(500) == pytest.approx(0.0, abs=1e-12)
    assert train_mod.warmup_cosine(0, 10)(0) == pytest.approx(1.0)  # no warmup


def test_weight_decay_applies_to_matrices_only():
    model = build_model(ModelConfig())
    decay, no_decay = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decayed and exempt and not decayed & exempt
    assert decayed | exempt == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "clip.logit_scale" in exempt and any(n.endswith("bias") for n in exempt)
    assert not any("bn" in n or "ln" in n for n in decayed)  # norm gains are 1-D or named: never decayed


@pytest.mark.slow
def test_max_minutes_stops_early_with_a_checkpoint(small_shapes, tmp_path, caplog):
    cfg = load_config(None, train_overrides(small_shapes, tmp_path / "run", **{"train.max_minutes": 0.0001,
                                                                               "optim.max_steps": 50}))
    with caplog.at_level(logging.WARNING):
        result = train_mod.train(cfg)
    assert result.stopped_early and 1 <= result.step < 50
    assert "train.max_minutes=0.0001 reached" in caplog.text
    from vclr.rundir import latest_checkpoint

    assert latest_checkpoint(tmp_path / "run").name == f"step_{result.step:07d}"
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_augmentation_on_the_loader_path_crops_afresh_each_read(small_shapes):
    table = load_caption_table(small_shapes / "test")
    plain = ImageTextDataset(table, get_tokenizer(ModelConfig()), 64)
    augmented = ImageTextDataset(table, get_tokenizer(ModelConfig()), 64, augment=True)
    assert plain.cache is not None and augmented.cache is None  # random crops cannot be cached
    torch.manual_seed(0)
    first, second = augmented[0][0], augmented[0][0]
    assert first.shape == second.shape == (3, 64, 64) and first.dtype == torch.uint8
    assert not torch.equal(first, second) and not torch.equal(first, plain[0][0])
    # a mild crop: still close to the whole image
    assert (first.float() - plain[0][0].float()).abs().mean() < 40


@pytest.mark.slow
def test_training_with_augmentation_runs(small_shapes, tmp_path):
    cfg = load_config(None, train_overrides(small_shapes, tmp_path / "run", **{
        "data.augment": True, "optim.max_steps": 2, "optim.warmup_steps": 1, "train.checkpoint_every": 2}))
    assert train_mod.train(cfg).step == 2


def test_tower_lr_scale_and_layer_decay_give_each_parameter_its_lr(tiny_hf_text_dir, tiny_lit_model_name):
    model = build_model(ModelConfig(name=tiny_lit_model_name, text_tower_dir=str(tiny_hf_text_dir)))
    groups = param_groups(model, 0.1, lr=1e-3, tower_lr_scale=0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["clip.visual.head.proj.weight"])] == pytest.approx(1e-3)  # the new heads keep lr
    assert lr_of[id(named["clip.text.proj.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["clip.logit_scale"])] == pytest.approx(1e-3)
    text_layers = 2  # the tiny BERT: layers 0 and 1, then the top
    assert lr_of[id(named["clip.text.transformer.encoder.layer.1.output.dense.weight"])] == pytest.approx(1e-4 * 0.5)
    assert lr_of[id(named["clip.text.transformer.encoder.layer.0.output.dense.weight"])] == pytest.approx(1e-4 * 0.25)
    embeddings = named["clip.text.transformer.embeddings.word_embeddings.weight"]
    assert lr_of[id(embeddings)] == pytest.approx(1e-4 * 0.5 ** (text_layers + 1))  # below block 0
    last_block = max(int(n.split("blocks.")[1].split(".")[0]) for n in named if "trunk.blocks." in n)
    top_block = f"clip.visual.trunk.blocks.{last_block}.0.conv_pwl.weight"
    assert lr_of[id(named[top_block])] == pytest.approx(1e-4 * 0.5)
    assert lr_of[id(named["clip.visual.trunk.conv_head.weight"])] == pytest.approx(1e-4)  # above the blocks
    plain = param_groups(model, 0.1, lr=1e-3)  # the defaults: one LR, the two weight-decay groups as before
    assert len(plain) == 2 and {g["lr"] for g in plain} == {1e-3}

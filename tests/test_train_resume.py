"""A run stopped after a checkpoint and resumed continues from the saved step, with the same batches and losses."""

import json

import pytest
import torch
from helpers import StopAfterCheckpoint, die_after_checkpoint, train_overrides

import vclr.train.loop as train_mod
from vclr.config import load_config
from vclr.errors import VclrError


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _record_batches(monkeypatch, into: dict):
    """Fingerprint (token sum, image sum) of the batch each step trains on."""
    real_step = train_mod.train_step

    def recording_step(trainer, batch):
        into[trainer.state.step + 1] = (int(batch.tokens.sum()), int(batch.images.long().sum()))
        return real_step(trainer, batch)

    monkeypatch.setattr(train_mod, "train_step", recording_step)
    return real_step


@pytest.mark.slow
def test_resume_continues_from_saved_step(small_shapes, tmp_path, monkeypatch):
    # 1500 images / batch 64 = 23 batches per epoch: the stop at step 30 is mid-epoch 1, so resume must skip batches
    extra = {"optim.max_steps": 40, "train.checkpoint_every": 30, "train.log_every": 1}
    full_batches, resumed_batches = {}, {}
    real_step = _record_batches(monkeypatch, full_batches)
    full = train_mod.train(load_config(None, train_overrides(small_shapes, tmp_path / "full", **extra)))
    assert full.step == 40
    monkeypatch.setattr(train_mod, "train_step", real_step)

    cfg = load_config(None, train_overrides(small_shapes, tmp_path / "stopped", **extra))
    real_save = die_after_checkpoint(monkeypatch, 30)  # the process dies right after checkpoint step 30
    with pytest.raises(StopAfterCheckpoint):
        train_mod.train(cfg)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    assert max(_losses(tmp_path / "stopped")) == 30

    with pytest.raises(VclrError, match="continue it with `resume`"):
        train_mod.train(cfg)  # not silently restarted over the old run
    _record_batches(monkeypatch, resumed_batches)
    resumed = train_mod.train(cfg, resume=True)
    assert resumed.step == 40
    assert sorted(resumed_batches) == list(range(31, 41))  # resumed at step 31, not 0
    for step in range(31, 41):  # the identical next batches: same images, same captions
        assert resumed_batches[step] == full_batches[step], step
    assert full_batches[31] != full_batches[30]
    stopped_losses, full_losses = _losses(tmp_path / "stopped"), _losses(tmp_path / "full")
    assert sorted(stopped_losses) == list(range(1, 41))  # each step logged once: no restart from 0
    # same next batches, same model: same losses. CPU kernels are deterministic; CUDA's atomic-add reductions
    # (conv backward) are not, so on a GPU the two runs drift apart by float noise, not by a batch's worth.
    rel = 1e-4 if not torch.cuda.is_available() else 3e-2
    for step in range(31, 41):
        assert stopped_losses[step] == pytest.approx(full_losses[step], rel=rel, abs=1e-5), step


@pytest.mark.slow
def test_train_twice_in_one_process_with_other_precision(small_shapes, tmp_path):
    """Accelerate's per-process state must not pin the first run's mixed precision on later runs."""
    extra = {"optim.max_steps": 3, "optim.warmup_steps": 1, "train.checkpoint_every": 3}
    first = train_mod.train(load_config(None, train_overrides(small_shapes, tmp_path / "a", **extra,
                                                              **{"train.mixed_precision": "bf16"})))
    second = train_mod.train(load_config(None, train_overrides(small_shapes, tmp_path / "b", **extra)))
    assert first.step == second.step == 3

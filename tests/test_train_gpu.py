"""CUDA paths: bf16 training on the GPU learns, and GPU embeddings agree with CPU ones. Skipped without CUDA."""

import json

import numpy as np
import pytest
import torch
from helpers import train_overrides

from vclr.config import load_config
from vclr.data.dataset import load_caption_table
from vclr.embed.embedding import embed_table
from vclr.model.source import load_trained
from vclr.train.loop import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bf16_training_on_gpu_learns_and_embeds_like_cpu(small_shapes, tmp_path):
    cfg = load_config(None, train_overrides(small_shapes, tmp_path / "run", **{"train.mixed_precision": "bf16"}))
    result = train(cfg)
    assert result.last_loss < 0.4 * result.first_loss
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows)
    table = load_caption_table(small_shapes / "test")
    gpu_model, cfg = load_trained(tmp_path / "run", torch.device("cuda"))
    cpu_model, _ = load_trained(tmp_path / "run", torch.device("cpu"))
    gpu, cpu = embed_table(gpu_model, cfg, table), embed_table(cpu_model, cfg, table)
    # fp32 inference on both (TF32 matmuls may be on): cosine between the two embeddings of each item ~ 1
    assert np.min(np.sum(gpu.image_embeddings * cpu.image_embeddings, axis=1)) > 0.995
    assert np.min(np.sum(gpu.text_embeddings * cpu.text_embeddings, axis=1)) > 0.995


@pytest.mark.parametrize("fast", [
    {"data.decode_on": "device", "train.channels_last": "true"},  # nvJPEG path (PNG files fall back per image)
    {"train.grad_cache_chunk": 16, "train.compile": "true"},
])
def test_fast_gpu_paths_learn(small_shapes, tmp_path, fast):
    extra = {"train.mixed_precision": "bf16", "optim.max_steps": 60, "train.log_every": 5, **fast}
    result = train(load_config(None, train_overrides(small_shapes, tmp_path / "run", **extra)))
    assert result.step == 60 and result.last_loss < 0.7 * result.first_loss

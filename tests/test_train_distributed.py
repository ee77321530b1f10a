"""Global negatives across processes: 2 CPU processes (gloo, `accelerate launch`) with per-process batch B train
exactly as one process with batch 2B (a world-size check in the worker makes sure two processes really ran), for
InfoNCE, the hardest-negative triplet term, SigLIP, the memory bank and GradCache.

The model is the tiny ViT: LayerNorm only. BatchNorm would make the comparison meaningless, since under DDP each
process normalises with its own batch statistics.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, write_shards
from safetensors.torch import load_file

import vclr.train.loop as train_mod
from vclr.config import load_config
from vclr.data.synthetic import make_synthetic

PER_PROCESS_BATCH = 8
STEPS = 3
CASES = {
    "infonce": {},
    "triplet": {"loss.infonce_weight": 0, "loss.triplet_weight": 1.0},
    "both_bank": {"loss.triplet_weight": 0.5, "loss.memory_bank_size": 24},
    "gradcache": {"loss.triplet_weight": 0.5, "train.grad_cache_chunk": 4},
    # the sigmoid loss over global negatives, its columns scored 5 at a time, and its bias through GradCache
    "siglip": {"loss.infonce_weight": 0, "loss.siglip_weight": 1.0, "loss.siglip_chunk": 5},
    "siglip_gradcache": {"loss.siglip_weight": 1.0, "train.grad_cache_chunk": 4},
    # validation during training: each process embeds its share of the validation set, gathered for the metrics
    "validation": {"train.eval_every": 2, "data.val": "{data}/test"},
}


def _overrides(data: Path, run: Path, batch: int, case: dict) -> list[str]:
    values = {"data.train": data / "train", "train.output_dir": run, "model.name": "vclr-tiny-vit",
              "data.batch_size": batch, "optim.max_steps": STEPS, "optim.warmup_steps": 1, "optim.lr": 1e-3,
              "train.log_every": 1, "train.checkpoint_every": 100, "train.seed": 3, "train.threads": 1,
              "loss.triplet_warmup_steps": 0}
    values.update(case)
    return [f"{k}={str(v).replace('{data}', str(data))}" for k, v in values.items()]


def _losses(run: Path) -> dict[int, float]:
    rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _val_rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_rsum" in r]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = make_synthetic(root / "data", num_train=96, num_test=8, seed=5)
    cases = [_overrides(data, root / f"dist_{name}", PER_PROCESS_BATCH, case) for name, case in CASES.items()]
    # shard streams of unequal length per process (70 vs 26 pairs): epochs must end together, not hang
    shards = write_shards(data / "train", root / "shards" / "train", 4, sizes=[40, 20, 30, 6]).parent
    cases.append(_overrides(shards, root / "dist_shards", PER_PROCESS_BATCH,
                            {"optim.max_steps": 8, "data.decode_on": "device"}))
    (root / "cases.json").write_text(json.dumps(cases))
    worker = Path(__file__).with_name("dist_train_worker.py")
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is installed; the torchrun
    # launcher (--multi_gpu) with ACCELERATE_USE_CPU=1 starts two CPU processes on gloo, even on a GPU machine
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--gpu_ids", "all", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(worker), str(root / "cases.json")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return data, root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process_on_the_concatenated_batch(two_process_runs, name):
    data, root = two_process_runs
    case = dict(CASES[name])
    case.pop("train.grad_cache_chunk", None)  # the reference is the plain full batch
    reference = root / f"single_{name}"
    train_mod.train(load_config(None, _overrides(data, reference, 2 * PER_PROCESS_BATCH, case)))

    dist_rows, single_rows = _val_rows(root / f"dist_{name}"), _val_rows(reference)
    assert len(dist_rows) == len(single_rows) == (2 if "train.eval_every" in case else 0)  # steps 2 and 3 (last)
    for got, want in zip(dist_rows, single_rows):
        assert got.keys() == want.keys()
        for key in want:
            if key != "val_s":  # the gathered embeddings score as one process's do
                assert got[key] == pytest.approx(want[key], abs=1e-6), (key, got, want)
    dist_losses, single_losses = _losses(root / f"dist_{name}"), _losses(reference)
    assert sorted(dist_losses) == sorted(single_losses) == list(range(1, STEPS + 1))
    for step in single_losses:
        assert dist_losses[step] == pytest.approx(single_losses[step], rel=1e-5), (name, step)

    dist_weights = load_file(root / f"dist_{name}" / "model.safetensors")
    single_weights = load_file(reference / "model.safetensors")
    initial_cfg = load_config(None, _overrides(data, reference, 2, case))
    initial = train_mod.build_model(initial_cfg.model, logit_bias=initial_cfg.loss.siglip_weight > 0).state_dict()
    assert dist_weights.keys() == single_weights.keys()
    moved = 0
    for key, value in single_weights.items():
        torch.testing.assert_close(dist_weights[key], value, rtol=1e-4, atol=2e-6, msg=f"{name}: {key}")
        moved += int(not torch.equal(value, initial[key]))
    assert moved > len(single_weights) // 2  # the comparison is of trained weights, not of the initial ones


@pytest.mark.slow
def test_two_processes_stream_their_own_shards_through_epochs(two_process_runs):
    _, root = two_process_runs
    rows = [json.loads(line) for line in (root / "dist_shards" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    # the shorter stream (26 pairs: 3 batches of 8) ends each epoch for both processes
    assert [r["epoch"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2]

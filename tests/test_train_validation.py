"""Training as practitioners run it: validation recalls during training (rows, best checkpoint, early stop), the
TensorBoard tracker read back, a time budget that fits the schedule, and SigLIP end to end."""

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import train_overrides
from safetensors.torch import load_file

import vclr.train.budget as budget
import vclr.train.loop as train_mod
from vclr.config import load_config
from vclr.rundir import read_best, read_metrics


def _short(small_shapes, run, **extra):
    values = {"optim.max_steps": 10, "optim.warmup_steps": 2, "train.log_every": 4, "train.checkpoint_every": 100,
              "train.eval_every": 5, "data.batch_size": 32, "loss.triplet_weight": 0, **extra}
    return load_config(None, train_overrides(small_shapes, run, **values))


def _val_rows(run):
    return [row for row in read_metrics(run) if "val_rsum" in row]


@pytest.mark.slow
def test_validation_rows_best_checkpoint_and_tensorboard(small_shapes, tmp_path):
    run = tmp_path / "run"
    train_mod.train(_short(small_shapes, run, **{"train.log_with": "tensorboard", "data.val_fraction": 0.2}))
    rows = _val_rows(run)
    assert [row["step"] for row in rows] == [5, 10]
    assert {"val_image_to_text_R@1", "val_text_to_image_R@10", "val_rsum", "val_s"} <= set(rows[0])
    losses = [row for row in read_metrics(run) if "loss" in row]
    assert losses[-1]["step"] == 10  # the last step is logged whatever log_every says

    best = read_best(run)
    expected = max(rows, key=lambda row: row["val_rsum"])  # first of equals: a tie is not an improvement
    assert best["step"] == expected["step"] and best["value"] == expected["val_rsum"]
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "step_0000010"]
    from vclr.cli import main
    from vclr.model.source import RunSource

    best_weights = load_file(run / "checkpoints" / "best" / "model.safetensors")
    model, _ = RunSource(str(run), "best").load()
    for name, value in model.state_dict().items():  # --checkpoint best loads exactly the best state
        assert np.array_equal(value.cpu().numpy(), best_weights[name].numpy()), name
    assert main(["eval", "--run", str(run), "--checkpoint", "best", "--out", str(tmp_path / "best.json"),
                 "--no-plots"]) == 0
    assert json.loads((tmp_path / "best.json").read_text())["model_source"]["checkpoint"] == "best"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    scalars = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    assert [step for step, _ in scalars["val_rsum"]] == [5, 10]
    assert scalars["val_rsum"][-1][1] == pytest.approx(rows[-1]["val_rsum"], rel=1e-5)
    assert [step for step, _ in scalars["loss"]] == [row["step"] for row in losses]

    from vclr.eval import plots

    # the training-curve plot draws the validation points in a third panel (it used to fail on validation rows)
    figures = []
    real_save = plots._save
    plots._save = lambda fig, path: figures.append(fig) or real_save(fig, path)
    try:
        assert plots.training_curves(read_metrics(run), tmp_path / "curves.png").is_file()
    finally:
        plots._save = real_save
    loss_panel, temperature_panel, val_panel = figures[0].axes
    assert [line.get_label() for line in loss_panel.lines] == ["loss = infonce_loss"]  # one term: one named line
    low, high = temperature_panel.get_ylim()
    assert high - low >= 0.09 * 0.07  # a barely moving temperature is not drawn as a dramatic swing
    assert val_panel.get_title() == "Validation"
    assert list(val_panel.lines[0].get_xdata()) == [5, 10]


def test_validation_held_out_images_never_train(small_shapes):
    from vclr.data.dataset import load_caption_table, split_held_out

    table = load_caption_table(small_shapes / "train")
    train, held = split_held_out(table, 0.2)
    assert 0.1 * len(table) < len(held) < 0.3 * len(table)
    assert not set(train.image_paths) & set(held.image_paths)
    assert len(train) + len(held) == len(table)
    assert split_held_out(table, 0.2)[1].image_paths == held.image_paths  # the same images every time


@pytest.mark.slow
def test_early_stop_after_patience_validations_without_a_new_best(small_shapes, tmp_path, caplog):
    run = tmp_path / "run"
    # both towers locked (BatchNorm statistics too) and only the temperature learning: the embeddings, and so every
    # validation figure, are exactly constant. (With towers that train at lr 1e-12, BatchNorm running statistics
    # still drift, and a figure could creep up by chance depending on the thread count.)
    cfg = _short(small_shapes, run, **{"optim.lr": 1e-12, "optim.max_steps": 50, "train.eval_every": 2,
                                       "train.early_stop_patience": 2, "data.val_fraction": 0.2,
                                       "model.lock_image": True, "model.lock_text": True})
    with caplog.at_level(logging.WARNING):
        result = train_mod.train(cfg)
    assert result.stopped_early and result.step == 6  # best at step 2; steps 4 and 6 are no better
    assert "train.early_stop_patience=2" in caplog.text
    assert read_best(run)["step"] == 2


def test_validation_needs_data(small_shapes, tmp_path):
    from vclr.errors import VclrError

    cfg = load_config(None, [f"data.train={small_shapes / 'train'}", f"train.output_dir={tmp_path / 'run'}",
                             "train.eval_every=5", "data.batch_size=32"])
    with pytest.raises(VclrError, match="train.eval_every needs validation data"):
        train_mod.train(cfg)


def _clock(max_minutes, max_steps, warmup=0):
    cfg = SimpleNamespace(train=SimpleNamespace(max_minutes=max_minutes),
                          optim=SimpleNamespace(max_steps=max_steps, warmup_steps=warmup))
    state = train_mod.TrainState(max_steps=max_steps)
    return budget.BudgetClock(SimpleNamespace(cfg=cfg, state=state)), state


def _advance(clock, state, steps, seconds_per_step, first_step_s=5.0):
    for _ in range(steps):
        state.step += 1
        state.elapsed_s += first_step_s if state.step == 1 else seconds_per_step
        clock.tick(validated=False)


def test_time_budget_fits_the_schedule_after_the_timed_steps():
    clock, state = _clock(max_minutes=1.0, max_steps=1000)
    _advance(clock, state, budget.BUDGET_TIMING_STEPS, 0.5)
    assert state.max_steps == 1000  # not fitted yet: only 9 steps timed after the first
    _advance(clock, state, 1, 0.5)
    # 60 s budget, 5 s first step + 10 x 0.5 s spent: 50 s left at 0.5 s/step = 100 more steps (less the margin)
    assert state.max_steps == 11 + int(budget.BUDGET_MARGIN * 50 / 0.5)
    _advance(clock, state, 60, 0.25)  # the steps got faster: refitted from the recent ones
    assert state.max_steps == 71 + int(budget.BUDGET_MARGIN * (60 - 5 - 5 - 15) / 0.25)
    clock, state = _clock(max_minutes=10.0, max_steps=200)
    _advance(clock, state, 11, 0.5)
    assert state.max_steps == 200  # never above optim.max_steps


@pytest.mark.slow
def test_time_budget_completes_the_schedule(small_shapes, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = load_config(None, train_overrides(small_shapes, run, **{"optim.max_steps": 100000, "train.max_minutes": 0.1,
                                                                   "data.batch_size": 32, "train.log_every": 5}))
    with caplog.at_level(logging.INFO):
        result = train_mod.train(cfg)
    assert not result.stopped_early and result.step < 100000
    assert "schedule fitted to" in caplog.text
    rows = read_metrics(run)
    assert rows[-1]["step"] == result.step and rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine done


@pytest.mark.slow
def test_siglip_trains_and_its_bias_is_saved_and_loaded(small_shapes, tmp_path):
    from vclr.model.source import RunSource

    run = tmp_path / "run"
    train_mod.train(_short(small_shapes, run, **{"loss.siglip_weight": 1.0, "loss.infonce_weight": 0,
                                                 "train.eval_every": 0, "model.init_temperature": 0.1}))
    weights = load_file(run / "model.safetensors")
    assert "clip.logit_bias" in weights and float(weights["clip.logit_bias"]) != -10.0  # it learned
    rows = read_metrics(run)
    assert all(np.isfinite(row["siglip_loss"]) for row in rows) and "infonce_loss" not in rows[0]
    model, _ = RunSource(str(run)).load()
    assert float(model.logit_bias.detach()) == pytest.approx(float(weights["clip.logit_bias"]))
    assert json.loads(json.dumps(rows[-1]))["step"] == 10


def test_held_out_share_is_the_same_wherever_the_dataset_lies(small_shapes, tmp_path):
    import shutil

    from vclr.data.dataset import load_caption_table, split_held_out

    moved = tmp_path / "elsewhere" / "shapes"
    shutil.copytree(small_shapes / "train", moved)
    names = [[p.rsplit("/", 1)[1] for p in split_held_out(load_caption_table(folder), 0.2)[1].image_paths]
             for folder in (small_shapes / "train", moved)]
    assert names[0] == names[1] and names[0]


@pytest.mark.slow
def test_train_benchmark_scores_its_datasets_at_each_validation_as_vclr_benchmark_does(small_shapes, tmp_path):
    from vclr.bench.matrix import benchmark
    from vclr.config import BenchmarkConfig
    from vclr.errors import VclrError

    test = small_shapes / "test"
    run = tmp_path / "run"
    train_mod.train(_short(small_shapes, run, **{"train.benchmark": f"[{test}]"}))
    rows = [row for row in read_metrics(run) if "bench_s" in row]
    assert [row["step"] for row in rows] == [5, 10]
    key = f"bench/{test.parent.name}-test"
    final = benchmark([str(run)], [str(test)], tmp_path / "bench", settings=BenchmarkConfig(bootstrap=0),
                      report=False)[0]["metrics"]
    for name, value in final.items():  # the last validation saw the final weights: the same figures
        assert rows[-1][f"{key}/{name}"] == round(value, 6)
    with pytest.raises(VclrError, match="train.eval_every"):
        train_mod.train(_short(small_shapes, tmp_path / "r2", **{"train.benchmark": f"[{test}]",
                                                                  "train.eval_every": 0}))

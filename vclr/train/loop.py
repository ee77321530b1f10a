"""Contrastive training on HuggingFace Accelerate: the same code on a CPU laptop, one GPU or N GPUs.

    vclr train --config configs/demo.yaml train.output_dir=runs/demo
    accelerate launch --num_processes 2 -m vclr.cli train --config configs/demo.yaml   # N processes

The run directory's layout and its checkpoint format live in `vclr.rundir`; this module only trains.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin, set_seed
from tqdm import tqdm

from vclr import rundir
from vclr.config import Config, config_to_dict
from vclr.data.batch import TrainBatch
from vclr.data.dataset import normalize_images
from vclr.data.device_decode import decode_resize
from vclr.data.sources import open_training_source
from vclr.errors import ResourceError, VclrError
from vclr.model.build import build_model, get_tokenizer, image_preprocess_cfg
from vclr.train.budget import BudgetClock
from vclr.train.finetune import WeightEMA, enable_grad_checkpointing, trainable_parameters, training_report
from vclr.train.gradcache import grad_cache_step
from vclr.train.locked_cache import cache_locked_towers, caches_image_tower
from vclr.train.loss import CombinedLoss, gather_features, text_ids
from vclr.train.optim import param_groups, warmup_cosine
from vclr.train.profiling import StepProfiler
from vclr.train.state import Trainer, TrainResult, TrainState
from vclr.train.validate import make_validator

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------ setup


def check_inputs(cfg: Config) -> None:
    """The user's own mistakes first: data and weight paths must exist before the run directory is looked at."""
    if not cfg.data.train:
        raise VclrError("data.train is not set: pass data.train=DIR (e.g. from `vclr make-synthetic`)")
    for key, value in (("data.train", cfg.data.train), ("model.image_tower_weights", cfg.model.image_tower_weights),
                       ("model.text_tower_dir", cfg.model.text_tower_dir)):
        if value and not Path(value).exists():
            raise VclrError(f"config field {key}={value} does not exist; pass {key}=PATH to an existing path")


def setup(cfg: Config, resume: bool = False) -> Trainer:
    check_inputs(cfg)
    run_dir = Path(cfg.train.output_dir)
    if not resume and rundir.latest_checkpoint(run_dir) is not None:
        raise VclrError(f"{run_dir} already holds checkpoints: continue it with `resume`, or choose another "
                        "train.output_dir")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    model = build_model(cfg.model, logit_bias=cfg.loss.siglip_weight > 0)
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    preprocess = image_preprocess_cfg(model)
    source = open_training_source(cfg, accelerator, get_tokenizer(cfg.model), preprocess["size"],
                                  cached_image_rows=caches_image_tower(cfg, model))
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr, cfg.optim.tower_lr_scale, cfg.optim.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps,
                                  fused=accelerator.device.type == "cuda")
    state = TrainState(max_steps=cfg.optim.max_steps)
    # Not prepared: accelerate would step a prepared scheduler once per process; ours counts optimizer steps.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.optim.warmup_steps,
                                                                           lambda: state.max_steps))
    validator = make_validator(cfg, source, model, accelerator)
    locked = cache_locked_towers(cfg, model, source, accelerator)
    ema = WeightEMA(model.to(accelerator.device), cfg.train.ema_decay) if cfg.train.ema_decay else None
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = CombinedLoss(cfg.loss, gather=gather_features, embed_dim=accelerator.unwrap_model(model).embed_dim)
    loss_fn.to(accelerator.device)
    accelerator.register_for_checkpointing(scheduler, state)
    if loss_fn.bank is not None:
        accelerator.register_for_checkpointing(loss_fn.bank)  # the queue of negatives resumes with the run
    if ema is not None:
        accelerator.register_for_checkpointing(ema)  # the average resumes with the run
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, source, loss_fn, state,
                      tuple(preprocess["mean"]), tuple(preprocess["std"]), preprocess["size"], validator, locked, ema)
    trainable, total = trainable_parameters(model)
    logger.info("training %d of %d parameters (%.2f%%)", trainable, total, 100 * trainable / max(1, total))
    if resume:
        _restore(trainer)
    if accelerator.is_main_process:
        # rows logged after the step this run starts from (by an attempt killed before its next checkpoint, or by an
        # earlier run that left none) will be logged again
        rundir.truncate_metrics(run_dir, trainer.state.step)
        rundir.write_run_config(run_dir, cfg)
        if cfg.model.text_tower_dir:
            rundir.save_text_tower_files(run_dir, cfg.model.text_tower_dir)
    start_trackers(trainer)
    return trainer


def start_trackers(trainer: Trainer) -> None:
    """Accelerate's trackers (train.log_with), with the resolved config as their hyperparameters."""
    if not trainer.accelerator.log_with:  # train.log_with=none
        return
    flat = {}
    for section, values in config_to_dict(trainer.cfg).items():
        for key, value in values.items():  # trackers take scalars: lists become their text
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    trainer.accelerator.init_trackers(rundir.TRACKER_DIR, config=flat)


def _log(trainer: Trainer, row: dict) -> None:
    """One row to metrics.jsonl (main process) and to the trackers."""
    if trainer.accelerator.is_main_process:
        rundir.append_metrics(trainer.run_dir, row)
    if trainer.accelerator.trackers:
        trainer.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])


def make_accelerator(cfg: Config) -> Accelerator:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    log_with = [name.strip() for name in cfg.train.log_with.split(",") if name.strip() not in ("", "none")]
    accelerator = Accelerator(
        log_with=log_with or None,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        project_dir=cfg.train.output_dir,
        # seedable sampler: the shuffle of epoch e is a function of (seed, e), so resume can replay it
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if cfg.train.compile else "no"),
    )
    if accelerator.device.type == "cuda":
        # TF32 for whatever autocast leaves in fp32: ~8x the fp32 tensor-core rate at 10-bit mantissa
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
    return accelerator


def _restore(trainer: Trainer) -> None:
    ckpt = rundir.restore_latest(trainer.accelerator, trainer.run_dir)
    if ckpt is None:
        logger.warning("--resume: no usable checkpoint in %s, starting from step 0", trainer.run_dir)
    else:
        logger.info("resumed from %s at step %d", ckpt, trainer.state.step)
    if not trainer.cfg.train.max_minutes:  # a resumed run may be given a longer (or shorter) schedule
        trainer.state.max_steps = trainer.cfg.optim.max_steps


# ------------------------------------------------------------------------------------------------------------- loop


def batch_on_device(trainer: Trainer, batch: TrainBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor | None]:
    """What the model takes for this batch, on the training device: normalised images (B, 3, S, S) or the locked
    image tower's cached outputs; tokens (B, L) or the locked text tower's cached outputs; the tokens themselves
    (caption identities); image ids (B,).

    With data.decode_on=device the batch holds encoded bytes: decode them here, in one batched call, and drop the
    tokens (and ids) of images that fail to decode.
    """
    device, tokens, image_ids = trainer.accelerator.device, batch.tokens, batch.image_ids
    caption_rows = batch.caption_rows
    if batch.image_input == "rows":
        images = trainer.locked.images[batch.images].to(device, non_blocking=True)  # (B, ...) cached
    elif batch.image_input == "encoded":
        images, kept = decode_resize(batch.images, trainer.image_size, device, trainer.cfg.data.augment)
        if not kept.all():
            kept = kept.to(tokens.device)
            tokens = tokens[kept]
            image_ids = image_ids[kept] if image_ids is not None else None
            caption_rows = caption_rows[kept] if caption_rows is not None else None
    else:
        images = batch.images.to(device, non_blocking=True)
    if batch.image_input != "rows":
        images = normalize_images(images, trainer.mean, trainer.std)  # (B, 3, S, S)
        if trainer.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
    tokens = tokens.to(device, non_blocking=True)
    if trainer.locked.texts is not None:
        text_input = trainer.locked.texts[caption_rows].to(device, non_blocking=True)  # (B, ...) cached
    else:
        text_input = trainer.accelerator.unwrap_model(trainer.model).trim_padding(tokens)  # (B, L' <= L)
    image_ids = image_ids.to(device, non_blocking=True) if image_ids is not None else None
    return images, text_input, tokens, image_ids


def train_step(trainer: Trainer, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, loss, backward; the optimizer steps when accumulation completes."""
    acc, cfg = trainer.accelerator, trainer.cfg
    step = trainer.state.step

    with acc.accumulate(trainer.model):
        images, text_input, tokens, image_ids = batch_on_device(trainer, batch)
        caption_ids = text_ids(tokens)  # (B,) equal captions, equal ids

        def loss_fn(image_features, text_features, logit_scale, logit_bias=None):
            # the loss in fp32 even under bf16/fp16 autocast: softmax over large batches is precision-sensitive
            return trainer.loss_fn(image_features.float(), text_features.float(), logit_scale.float(), step=step,
                                   logit_bias=None if logit_bias is None else logit_bias.float(),
                                   image_ids=image_ids, caption_ids=caption_ids)

        chunk = cfg.train.grad_cache_chunk
        if chunk and chunk < len(images):
            losses, logit_scale = grad_cache_step(trainer.model, images, text_input, chunk, loss_fn, acc.backward,
                                                  acc.no_sync)
        else:
            out = trainer.model(images, text_input)
            losses = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out.get("logit_bias"))
            logit_scale = out["logit_scale"].detach()
            acc.backward(losses["loss"])
        if acc.sync_gradients and cfg.optim.grad_clip_norm > 0:
            acc.clip_grad_norm_(trainer.model.parameters(), cfg.optim.grad_clip_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    if acc.sync_gradients:
        trainer.scheduler.step()
        if trainer.ema is not None:
            trainer.ema.update(acc.unwrap_model(trainer.model))
    return {k: v.detach() for k, v in losses.items()} | {"logit_scale": logit_scale}


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _step_or_explain_oom(trainer: Trainer, batch: TrainBatch) -> dict[str, torch.Tensor]:
    try:
        return train_step(trainer, batch)
    except Exception as e:
        if not _is_out_of_memory(e):
            raise
        batch_size = trainer.cfg.data.batch_size
        raise ResourceError(
            f"a training step at data.batch_size={batch_size} ran out of memory on {trainer.accelerator.device} "
            f"({type(e).__name__}); lower data.batch_size, or keep the contrastive batch and cut activation memory "
            f"with GradCache: train.grad_cache_chunk={max(1, batch_size // 4)}. Checkpoints so far are kept "
            "(`resume` continues).") from None


def save_checkpoint(trainer: Trainer) -> Path:
    return rundir.save_checkpoint(trainer.accelerator, trainer.run_dir, trainer.state.step,
                                  trainer.cfg.train.keep_checkpoints)


def _log_row(trainer: Trainer, losses: dict, samples_per_s: float, epoch: int) -> dict:
    # each process holds the loss of its own anchors; their mean is the global batch's loss
    losses = {k: trainer.accelerator.reduce(v, "mean") if k.endswith("loss") else v for k, v in losses.items()}
    row = {"step": trainer.state.step, "epoch": epoch, "lr": trainer.scheduler.get_last_lr()[0],
           "temperature": 1.0 / float(losses["logit_scale"]), "samples_per_s": round(samples_per_s, 1),
           "elapsed_s": round(trainer.state.elapsed_s, 2)}
    row.update({k: float(v) for k, v in losses.items() if k.endswith("loss")})
    _log(trainer, row)
    return row


def _everyone_has_a_batch(trainer: Trainer, has_batch: bool) -> bool:
    """Shard streams of different processes may end at different batches: the epoch ends when the first one does
    (otherwise the others would wait for it in the next all_gather forever). Map-style loaders are even already."""
    acc = trainer.accelerator
    if not trainer.source.uneven_epochs or acc.num_processes == 1:
        return has_batch
    count = acc.reduce(torch.tensor(int(has_batch), device=acc.device), "sum")
    return int(count) == acc.num_processes


def batches(trainer: Trainer):
    """Batches from the saved data position (epoch, batches into it) on, through as many epochs as it takes.

    The caller counts consumed batches in `trainer.state`, so a checkpoint taken between two batches resumes with
    the very next one (accelerate's skip_first_batches replays the epoch's order up to it).
    """
    state, acc = trainer.state, trainer.accelerator
    while True:
        loader = trainer.source.loader(state.epoch)
        if state.batches_in_epoch:
            loader = acc.skip_first_batches(loader, state.batches_in_epoch)
        iterator = iter(loader)
        while _everyone_has_a_batch(trainer, (batch := next(iterator, None)) is not None):
            yield batch
        if state.batches_in_epoch == 0:
            raise VclrError(f"data.train={trainer.cfg.data.train} gave no full batch of data.batch_size="
                            f"{trainer.cfg.data.batch_size} in an epoch; lower the batch size or add data")
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0


def validate(trainer: Trainer) -> bool:
    """Validation recalls into metrics.jsonl and the trackers; a new best is saved as checkpoints/best.
    Returns whether train.early_stop_patience ran out."""
    cfg, state, acc = trainer.cfg, trainer.state, trainer.accelerator
    row = {"step": state.step, **trainer.validator(acc.unwrap_model(trainer.model))}
    if trainer.ema is not None:  # the moving average, validated beside the weights and kept as checkpoints/ema
        row.update({f"ema_{k}": v for k, v in trainer.validator(trainer.ema.model).items()})
        if acc.is_main_process:
            rundir.save_ema(trainer.run_dir, trainer.ema.model, {"step": state.step, "decay": trainer.ema.decay,
                                                                 "validation": row})
    _log(trainer, row)
    value = row[f"val_{cfg.train.best_metric}"]
    logger.info("step %d: validation %s %.2f (best %.2f at step %d) in %.1f s", state.step, cfg.train.best_metric,
                value, max(value, state.best_value), state.step if value > state.best_value else state.best_step,
                row["val_s"])
    if value > state.best_value:
        state.best_value, state.best_step, state.evals_since_best = value, state.step, 0
        rundir.save_best(acc, trainer.run_dir, {"step": state.step, "metric": cfg.train.best_metric, "value": value,
                                                "validation": row})
        return False
    state.evals_since_best += 1
    return bool(cfg.train.early_stop_patience) and state.evals_since_best >= cfg.train.early_stop_patience


def run_loop(trainer: Trainer) -> TrainResult:
    cfg, acc, state = trainer.cfg, trainer.accelerator, trainer.state
    global_batch = cfg.data.batch_size * acc.num_processes
    bar = tqdm(total=state.max_steps, initial=state.step, desc="train", unit="step",
               disable=not acc.is_local_main_process, dynamic_ncols=True)
    first_loss = last_loss = float("nan")
    stop_reason = ""
    finished = state.step >= state.max_steps  # resuming a run that is already done
    window_start, window_samples = time.perf_counter(), 0
    last_tick = time.perf_counter()
    clock = BudgetClock(trainer)
    profiler = StepProfiler(cfg.train.profile_steps, state.max_steps, trainer.run_dir / "profile", acc.device,
                            acc.is_main_process)
    try:  # the bar is closed whatever happens: an error message must not share a line with it
        for batch in batches(trainer) if not finished else ():
            losses = _step_or_explain_oom(trainer, batch)
            state.batches_in_epoch += 1
            window_samples += global_batch
            now = time.perf_counter()
            state.elapsed_s += now - last_tick  # data loading included
            last_tick = now
            if not acc.sync_gradients:
                continue
            state.step += 1
            profiler.step()
            bar.update(1)
            last = state.step >= state.max_steps
            if cfg.train.max_minutes and state.elapsed_s > cfg.train.max_minutes * 60 and not last:
                stop_reason = f"train.max_minutes={cfg.train.max_minutes} reached"
            validated = bool(trainer.validator) and (state.step % cfg.train.eval_every == 0 or last
                                                     or bool(stop_reason))
            if state.step % cfg.train.log_every == 0 or state.step == 1 or last or stop_reason or validated:
                rate = window_samples / (time.perf_counter() - window_start)
                row = _log_row(trainer, losses, rate, state.epoch)
                first_loss = row["loss"] if math.isnan(first_loss) else first_loss
                last_loss = row["loss"]
                # the loss is read at logged steps only (reading it every step would sync the GPU): say which step
                bar.set_postfix_str(f"loss {row['loss']:.3f} @ step {state.step}, T {row['temperature']:.3f}, "
                                    f"{rate:.0f} samples/s")
                window_start, window_samples = time.perf_counter(), 0
            if validated and validate(trainer) and not last:
                stop_reason = (f"train.early_stop_patience={cfg.train.early_stop_patience}: no better validation "
                               f"{cfg.train.best_metric} since step {state.best_step}")
            if validated:  # the validation's time counts against the budget, not against samples/s
                window_start = time.perf_counter()
                state.elapsed_s += window_start - last_tick
                last_tick = window_start
            if state.step % cfg.train.checkpoint_every == 0:
                save_checkpoint(trainer)
            if stop_reason:
                logger.warning("%s: stopping at step %d of the %d-step schedule (the LR had not decayed to 0)",
                               stop_reason, state.step, state.max_steps)
                break
            clock.tick(validated)
            bar.total = state.max_steps
            if last:
                break
    finally:
        profiler.close()
        bar.close()
    return TrainResult(trainer.run_dir, state.step, first_loss, last_loss, state.elapsed_s, bool(stop_reason),
                       acc.is_main_process)


def cleanup(trainer: Trainer, result: TrainResult) -> None:
    """Final checkpoint (unless this step has one), the final weights as model.safetensors, and the data report."""
    for tracker in trainer.accelerator.trackers:
        tracker.finish()
    if rundir.latest_checkpoint(trainer.run_dir) != rundir.checkpoint_path(trainer.run_dir, result.step):
        save_checkpoint(trainer)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.save_model(trainer.model, str(trainer.run_dir), safe_serialization=True)
    if trainer.accelerator.is_main_process:
        if trainer.ema is not None:
            rundir.save_ema(trainer.run_dir, trainer.ema.model, {"step": result.step, "decay": trainer.ema.decay})
        result.report = training_report(trainer.model, trainer.accelerator.device, result.step, result.elapsed_s)
        rundir.write_train_report(trainer.run_dir, result.report)
    report = trainer.source.report()
    if report["skipped_or_repaired"]:
        logger.warning("training data: skipped rows %s", report["skipped_or_repaired"])
    if trainer.accelerator.is_main_process:
        rundir.write_data_report(trainer.run_dir, {"source": trainer.cfg.data.train, **report})
    # Accelerate keeps its state per process; clear the per-run part (precision, accumulation) so that this process
    # can train again with other settings (the demo, sweeps, tests). The distributed set-up (PartialState and the
    # process group) stays: accelerator.end_training() would destroy the group under a second run's feet; the CLI
    # ends it once, with `end_distributed()`. These are private members: pyproject pins the accelerate versions
    # this was tested with.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def end_distributed() -> None:
    """Tear down the process group of a multi-process launch (a no-op in a single process)."""
    from accelerate import PartialState

    if PartialState._shared_state:
        PartialState().destroy_process_group()


def train(cfg: Config, resume: bool = False) -> TrainResult:
    """Train per `cfg`; with `resume`, continue from the newest checkpoint in train.output_dir."""
    trainer = setup(cfg, resume)
    result = run_loop(trainer)
    cleanup(trainer, result)
    logger.info("trained %d steps in %.1fs; loss %.4f -> %.4f", result.step, result.elapsed_s, result.first_loss,
                result.last_loss)
    return result

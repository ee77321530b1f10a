"""What a training run carries from step to step: its position (checkpointed), its parts, and its result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from vclr.config import Config
from vclr.data.sources import TrainingSource
from vclr.model.dual_encoder import DualEncoder
from vclr.train.finetune import WeightEMA
from vclr.train.locked_cache import LockedFeatures
from vclr.train.loss import CombinedLoss
from vclr.train.validate import Validator


@dataclass
class TrainState:
    """Position of the run; checkpointed with the model through accelerator.register_for_checkpointing."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position to resume from: epoch and micro-batches into it
    batches_in_epoch: int = 0
    elapsed_s: float = 0.0  # training-loop wall time, summed over resumes
    max_steps: int = 0  # the schedule's length: optim.max_steps, or fewer when fitted to train.max_minutes
    best_value: float = float("-inf")  # the best validation figure so far (train.best_metric) and its step
    best_step: int = 0
    evals_since_best: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    first_loss: float
    last_loss: float
    elapsed_s: float
    stopped_early: bool  # by train.max_minutes or train.early_stop_patience
    main_process: bool = True  # False in the other processes of a multi-process launch
    report: dict = field(default_factory=dict)  # trainable parameters, peak memory, steps/s (RUN/train_report.json)


@dataclass
class Trainer:
    cfg: Config
    accelerator: Accelerator
    model: DualEncoder
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    source: TrainingSource
    loss_fn: CombinedLoss
    state: TrainState
    mean: tuple
    std: tuple
    image_size: int
    validator: Validator | None = None
    locked: LockedFeatures = field(default_factory=LockedFeatures)
    ema: WeightEMA | None = None  # train.ema_decay

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

"""What fine-tuning a published model adds to a run: gradient checkpointing, EMA weights, and a report of what trains
and what it costs.

    enable_grad_checkpointing(model)          # train.grad_checkpointing: open_clip's and Hugging Face's own
    ema = WeightEMA(model, 0.999)             # train.ema_decay: timm's ModelEmaV3; ema.update(model) each step
    report = training_report(model, device)   # trainable / total parameters, peak memory: RUN/train_report.json

The EMA starts as a copy of the initial weights; after each optimizer step every floating tensor (parameters and
buffers) moves to `decay * ema + (1 - decay) * weights` and integer buffers are copied (timm's rule; tested against a
hand-computed average). It is validated beside the raw weights (`ema_val_*` rows), saved as `checkpoints/ema`
(`--checkpoint ema` in every command that takes a run) and kept in each checkpoint, so a resumed run continues it.
"""

from __future__ import annotations

import logging
import resource
import sys

import torch
from torch import nn

logger = logging.getLogger(__name__)


def enable_grad_checkpointing(model: nn.Module) -> None:
    """Recompute the towers' activations in the backward pass, through open_clip's `set_grad_checkpointing` (which
    reaches timm trunks and Hugging Face text towers); says so where a tower has none (open_clip's ModifiedResNet)."""
    clip = model.clip
    clip.set_grad_checkpointing(True)
    visual = getattr(clip, "visual", None)
    if type(visual).__name__ == "ModifiedResNet":
        logger.warning("train.grad_checkpointing: open_clip's ModifiedResNet image tower has no gradient "
                       "checkpointing; only the text tower recomputes its activations")


class WeightEMA(nn.Module):
    """timm's ModelEmaV3 over a model (see the module docstring); an nn.Module, so Accelerate checkpoints it."""

    def __init__(self, model: nn.Module, decay: float):
        from timm.utils.model_ema import ModelEmaV3

        super().__init__()
        self.ema = ModelEmaV3(model, decay=decay)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.ema.update(model)

    @property
    def model(self) -> nn.Module:
        return self.ema.module


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """The run's peak memory so far and what it measures: CUDA's peak allocation on a GPU, else the process's peak
    resident memory (which includes everything the process loaded)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_peak_rss"


def training_report(model: nn.Module, device: torch.device, steps: int, elapsed_s: float) -> dict:
    trainable, total = trainable_parameters(model)
    peak, kind = peak_memory_bytes(device)
    return {"trainable_parameters": trainable, "total_parameters": total,
            "trainable_share": round(trainable / max(total, 1), 6), "peak_memory_bytes": peak, "peak_memory": kind,
            "steps": steps, "steps_per_s": round(steps / elapsed_s, 3) if elapsed_s else None}

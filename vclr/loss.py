"""Contrastive losses over L2-normalised features. Pure modules: `forward(image_features, text_features, logit_scale)`
returns a dict of `*_loss` terms. Cross-process gathering is the separate `gather_features`, passed in.

Local-loss layout (open_clip's `--local-loss --gather-with-grad`): each process scores its own B rows against the
global batch of N = world * B columns; its positives sit at columns rank * B + arange(B).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vclr.config import LossConfig

GatherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor):
    """All processes' features, with gradient flowing back to each process's own slice; and this process's rank.

    Single process: returns the inputs unchanged and rank 0.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_features, text_features, 0
    from torch.distributed.nn.functional import all_gather  # autograd-aware all_gather

    all_images = torch.cat(all_gather(image_features), dim=0)  # (N, D)
    all_texts = torch.cat(all_gather(text_features), dim=0)  # (N, D)
    return all_images, all_texts, dist.get_rank()


def _no_gather(image_features: torch.Tensor, text_features: torch.Tensor):
    return image_features, text_features, 0


def positive_columns(batch: int, rank: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch, device=device) + rank * batch  # (B,)


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text and text->image softmaxes at temperature 1/logit_scale."""

    def __init__(self, gather: GatherFn = _no_gather):
        super().__init__()
        self.gather = gather

    def forward(self, image_features, text_features, logit_scale) -> dict[str, torch.Tensor]:
        all_images, all_texts, rank = self.gather(image_features, text_features)
        logits_per_image = logit_scale * image_features @ all_texts.T  # (B, N)
        logits_per_text = logit_scale * text_features @ all_images.T  # (B, N)
        labels = positive_columns(image_features.shape[0], rank, image_features.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"infonce_loss": loss}


class TripletLoss(nn.Module):
    """Hinge on cosine similarity, both directions (VSE++): max(0, margin + s(neg) - s(pos)).

    negatives="hardest" keeps the largest violation per anchor (max-violation); "all" sums every violation.
    Each direction is averaged over anchors so the loss scale does not grow with the batch.
    """

    def __init__(self, margin: float = 0.2, negatives: str = "hardest", gather: GatherFn = _no_gather):
        super().__init__()
        if negatives not in ("hardest", "all"):
            raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
        self.margin = margin
        self.negatives = negatives
        self.gather = gather

    def _direction(self, anchors: torch.Tensor, candidates: torch.Tensor, rank: int) -> torch.Tensor:
        scores = anchors @ candidates.T  # (B, N) cosine similarities
        columns = positive_columns(anchors.shape[0], rank, anchors.device)
        positive = scores.gather(1, columns[:, None])  # (B, 1)
        violation = (self.margin + scores - positive).clamp(min=0)  # (B, N)
        violation = violation.scatter(1, columns[:, None], 0.0)  # the positive is not its own negative
        per_anchor = violation.max(dim=1).values if self.negatives == "hardest" else violation.sum(dim=1)
        return per_anchor.mean()

    def forward(self, image_features, text_features, logit_scale=None) -> dict[str, torch.Tensor]:
        all_images, all_texts, rank = self.gather(image_features, text_features)
        image_to_text = self._direction(image_features, all_texts, rank)  # captions as negatives of an image
        text_to_image = self._direction(text_features, all_images, rank)  # images as negatives of a caption
        return {"triplet_loss": image_to_text + text_to_image}


class CombinedLoss(nn.Module):
    """infonce_weight * InfoNCE + ramp(step) * triplet_weight * triplet. Returns the terms and `loss`, their sum.

    The triplet weight ramps linearly from 0 over `triplet_warmup_steps`: hardest-negative hinges collapse every
    embedding to one point when they start from random features (VSE++ notes this); InfoNCE spreads them first.
    """

    def __init__(self, cfg: LossConfig, gather: GatherFn = _no_gather):
        super().__init__()
        self.cfg = cfg
        self.infonce = InfoNCELoss(gather)
        self.triplet = TripletLoss(cfg.triplet_margin, cfg.triplet_negatives, gather)

    def triplet_weight_at(self, step: int) -> float:
        if self.cfg.triplet_warmup_steps == 0:
            return self.cfg.triplet_weight
        return self.cfg.triplet_weight * min(1.0, step / self.cfg.triplet_warmup_steps)

    def forward(self, image_features, text_features, logit_scale, step: int = 0) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = image_features.new_zeros(())
        if self.cfg.infonce_weight > 0:
            terms.update(self.infonce(image_features, text_features, logit_scale))
            total = total + self.cfg.infonce_weight * terms["infonce_loss"]
        triplet_weight = self.triplet_weight_at(step)
        if self.cfg.triplet_weight > 0:
            terms.update(self.triplet(image_features, text_features))
            total = total + triplet_weight * terms["triplet_loss"]
        terms["loss"] = total
        return terms

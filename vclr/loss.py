"""Contrastive losses over L2-normalised features. Pure modules: `forward(image_features, text_features, logit_scale)`
returns a dict of `*_loss` terms. Cross-process gathering is the separate `gather_features`, passed in.

Local-loss layout (open_clip's `--local-loss --gather-with-grad`): each process scores its own B rows against the
global batch of N = world * B columns; its positives sit at columns rank * B + arange(B).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vclr.config import LossConfig

# torch marks torch.distributed.nn.functional.all_gather deprecated in favour of a private functional-collectives API;
# the public, autograd-aware one is still the documented way (open_clip uses it too), so say it once, not every step
warnings.filterwarnings("once", message=r".*all_gather is deprecated", category=FutureWarning)

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
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text and text->image softmaxes at temperature 1/logit_scale.

    `bank_images` / `bank_texts` (M, D), from a FeatureQueue, are extra negative columns after the batch's N.
    """

    def __init__(self, gather: GatherFn = _no_gather):
        super().__init__()
        self.gather = gather

    def forward(self, image_features, text_features, logit_scale, bank_images=None, bank_texts=None):
        all_images, all_texts, rank = self.gather(image_features, text_features)
        return self.from_gathered(image_features, text_features, all_images, all_texts, rank, logit_scale,
                                  bank_images, bank_texts)

    def from_gathered(self, image_features, text_features, all_images, all_texts, rank, logit_scale,
                      bank_images=None, bank_texts=None) -> dict[str, torch.Tensor]:
        candidate_texts = _with_bank(all_texts, bank_texts)  # (N [+ M], D)
        candidate_images = _with_bank(all_images, bank_images)
        logits_per_image = logit_scale * image_features @ candidate_texts.T  # (B, N [+ M])
        logits_per_text = logit_scale * text_features @ candidate_images.T  # (B, N [+ M])
        labels = positive_columns(image_features.shape[0], rank, image_features.device)
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"infonce_loss": loss}


class TripletLoss(nn.Module):
    """Hinge on cosine similarity, both directions (VSE++): max(0, margin + s(neg) - s(pos)).

    negatives="hardest" keeps the largest violation per anchor (max-violation); "all" sums every violation.
    Each direction is averaged over anchors so the loss scale does not grow with the batch. Negatives are the
    GLOBAL batch (every process's features) plus, when given, the memory bank's.
    """

    def __init__(self, margin: float = 0.2, negatives: str = "hardest", gather: GatherFn = _no_gather):
        super().__init__()
        if negatives not in ("hardest", "all"):
            raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
        self.margin = margin
        self.negatives = negatives
        self.gather = gather

    def _direction(self, anchors: torch.Tensor, candidates: torch.Tensor, rank: int) -> torch.Tensor:
        scores = anchors @ candidates.T  # (B, N [+ M]) cosine similarities
        columns = positive_columns(anchors.shape[0], rank, anchors.device)
        positive = scores.gather(1, columns[:, None])  # (B, 1)
        violation = (self.margin + scores - positive).clamp(min=0)  # (B, N [+ M])
        violation = violation.scatter(1, columns[:, None], 0.0)  # the positive is not its own negative
        per_anchor = violation.max(dim=1).values if self.negatives == "hardest" else violation.sum(dim=1)
        return per_anchor.mean()

    def forward(self, image_features, text_features, logit_scale=None, bank_images=None, bank_texts=None):
        all_images, all_texts, rank = self.gather(image_features, text_features)
        return self.from_gathered(image_features, text_features, all_images, all_texts, rank, bank_images,
                                  bank_texts)

    def from_gathered(self, image_features, text_features, all_images, all_texts, rank, bank_images=None,
                      bank_texts=None) -> dict[str, torch.Tensor]:
        # captions as negatives of an image; images as negatives of a caption
        image_to_text = self._direction(image_features, _with_bank(all_texts, bank_texts), rank)
        text_to_image = self._direction(text_features, _with_bank(all_images, bank_images), rank)
        return {"triplet_loss": image_to_text + text_to_image}


def _with_bank(batch: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
    return batch if bank is None or len(bank) == 0 else torch.cat([batch, bank.to(batch.dtype)], dim=0)


class FeatureQueue(nn.Module):
    """A FIFO memory bank of past global-batch features (MoCo's queue, NPID's memory bank): negatives beyond the batch.

    Entries are detached: they come from earlier steps' towers, so no gradient reaches them. Every process pushes
    the same gathered global batch, so the queues stay identical across processes. Saved in checkpoints (buffers).
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("images", torch.zeros(size, dim))  # (M, D)
        self.register_buffer("texts", torch.zeros(size, dim))  # (M, D)
        self.register_buffer("next_slot", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = int(self.filled)
        return self.images[:count], self.texts[:count]  # (m, D) each, m <= M

    @torch.no_grad()
    def push(self, images: torch.Tensor, texts: torch.Tensor) -> None:
        images, texts = images.detach()[-self.size:], texts.detach()[-self.size:]  # (n, D), n <= M
        slots = (int(self.next_slot) + torch.arange(len(images))) % self.size
        self.images[slots.to(self.images.device)] = images.to(self.images)
        self.texts[slots.to(self.texts.device)] = texts.to(self.texts)
        self.next_slot.fill_((int(self.next_slot) + len(images)) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + len(images)))


class CombinedLoss(nn.Module):
    """infonce_weight * InfoNCE + ramp(step) * triplet_weight * triplet. Returns the terms and `loss`, their sum.

    The triplet weight ramps linearly from 0 over `triplet_warmup_steps`: hardest-negative hinges collapse every
    embedding to one point when they start from random features (VSE++ notes this); InfoNCE spreads them first.
    Features are gathered from all processes once, and both terms score against the same global batch (and the
    memory bank, when `loss.memory_bank_size` > 0 and `embed_dim` is given).
    """

    def __init__(self, cfg: LossConfig, gather: GatherFn = _no_gather, embed_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.gather = gather
        self.infonce = InfoNCELoss(gather)
        self.triplet = TripletLoss(cfg.triplet_margin, cfg.triplet_negatives, gather)
        if cfg.memory_bank_size and embed_dim is None:
            raise ValueError("loss.memory_bank_size > 0 needs the embedding dimension (embed_dim)")
        self.bank = FeatureQueue(cfg.memory_bank_size, embed_dim) if cfg.memory_bank_size else None

    def triplet_weight_at(self, step: int) -> float:
        if self.cfg.triplet_warmup_steps == 0:
            return self.cfg.triplet_weight
        return self.cfg.triplet_weight * min(1.0, step / self.cfg.triplet_warmup_steps)

    def forward(self, image_features, text_features, logit_scale, step: int = 0) -> dict[str, torch.Tensor]:
        all_images, all_texts, rank = self.gather(image_features, text_features)  # (N, D) each
        bank_images, bank_texts = self.bank.negatives() if self.bank is not None else (None, None)
        terms: dict[str, torch.Tensor] = {}
        # 0 * logit_scale keeps the temperature in the graph when no term uses it (triplet only): DDP requires every
        # parameter to receive a gradient, and its gradient is then an exact 0
        total = 0.0 * logit_scale
        if self.cfg.infonce_weight > 0:
            terms.update(self.infonce.from_gathered(image_features, text_features, all_images, all_texts, rank,
                                                    logit_scale, bank_images, bank_texts))
            total = total + self.cfg.infonce_weight * terms["infonce_loss"]
        if self.cfg.triplet_weight > 0:
            terms.update(self.triplet.from_gathered(image_features, text_features, all_images, all_texts, rank,
                                                    bank_images, bank_texts))
            total = total + self.triplet_weight_at(step) * terms["triplet_loss"]
        terms["loss"] = total
        if self.bank is not None and torch.is_grad_enabled():
            self.bank.push(all_images, all_texts)  # after scoring: a batch is never its own bank negative
        return terms

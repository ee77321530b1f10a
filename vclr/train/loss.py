"""Contrastive losses over L2-normalised features. Every term is a `LossTerm`: `term.score(batch)` takes a `LossBatch`
(local features, the gathered global batch, rank, memory-bank negatives, temperature) and returns `{"<name>_loss": t}`;
`term(image_features, text_features, logit_scale)` gathers and scores in one call. `CombinedLoss` sums the terms the
config weights. Cross-process gathering is the separate `gather_features`, passed in.

Local-loss layout (open_clip's `--local-loss --gather-with-grad`): each process scores its own B rows against the
global batch of N = world * B columns; its positives sit at columns rank * B + arange(B).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B,) -> (N,) every process's row identities, in rank order (no gradient: they are labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


_TOKEN_HASH_SEED = 0x5EED


def text_ids(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B,) int64 identities: equal captions (as tokenised) get equal ids. A polynomial hash with
    fixed random multipliers; int64 overflow wraps, identically on every device and process."""
    generator = torch.Generator().manual_seed(_TOKEN_HASH_SEED)
    multipliers = torch.randint(1, 2**62, (tokens.shape[1],), generator=generator, dtype=torch.int64)
    return (tokens.long() * multipliers.to(tokens.device)).sum(dim=1)  # (B,)


@dataclass
class LossBatch:
    """What every loss term scores: this process's rows against the global batch (and the memory bank)."""

    image_features: torch.Tensor  # (B, D) this process's rows, L2-normalised
    text_features: torch.Tensor  # (B, D)
    all_images: torch.Tensor  # (N, D) every process's rows (N = world * B); gradient flows to this process's slice
    all_texts: torch.Tensor  # (N, D)
    rank: int  # this process's slice of the global batch: rows rank * B ... (rank + 1) * B - 1
    logit_scale: torch.Tensor  # () 1 / temperature
    bank_images: torch.Tensor | None = None  # (M, D) detached negatives of earlier steps (FeatureQueue)
    bank_texts: torch.Tensor | None = None
    logit_bias: torch.Tensor | None = None  # () SigLIP's learnable bias (None when the model has none)
    # (B, N) True where column j of row i is the same image or the same caption text as row i's own pair, without
    # being that pair: a false negative, left out of every term. None: every off-pair column is a negative.
    same_pair: torch.Tensor | None = None

    @classmethod
    def gathered(cls, image_features, text_features, logit_scale, gather: GatherFn | None = None,
                 bank: FeatureQueue | None = None, logit_bias: torch.Tensor | None = None,
                 image_ids: torch.Tensor | None = None, caption_ids: torch.Tensor | None = None) -> LossBatch:
        """`image_ids`/`caption_ids` (B,): identities of this process's rows (same id = same image / caption text);
        with them, duplicates anywhere in the global batch are masked as negatives."""
        all_images, all_texts, rank = (gather or _no_gather)(image_features, text_features)  # (N, D) each
        bank_images, bank_texts = bank.negatives() if bank is not None else (None, None)
        same = None
        if image_ids is not None or caption_ids is not None:
            same = duplicate_pairs(image_ids, caption_ids, rank, len(all_images))
        return cls(image_features, text_features, all_images, all_texts, rank, logit_scale, bank_images, bank_texts,
                   logit_bias, same)

    def candidate_texts(self) -> torch.Tensor:
        return _with_bank(self.all_texts, self.bank_texts)  # (N [+ M], D)

    def candidate_images(self) -> torch.Tensor:
        return _with_bank(self.all_images, self.bank_images)  # (N [+ M], D)

    def positives(self) -> torch.Tensor:
        """(B,) the column of each row's own pair among the candidates."""
        return positive_columns(self.image_features.shape[0], self.rank, self.image_features.device)

    def false_negatives(self, columns: int) -> torch.Tensor | None:
        """(B, columns) the mask of `same_pair`, widened with False for the memory bank's columns (no ids)."""
        if self.same_pair is None:
            return None
        extra = columns - self.same_pair.shape[1]
        return F.pad(self.same_pair, (0, extra), value=False) if extra else self.same_pair


def duplicate_pairs(image_ids: torch.Tensor | None, caption_ids: torch.Tensor | None, rank: int,
                    columns: int) -> torch.Tensor:
    """(B, N): row i and global column j share an image id or a caption id, and j is not row i's own pair."""
    same = None
    for ids in (image_ids, caption_ids):
        if ids is None:
            continue
        everyone = gather_ids(ids) if columns > len(ids) else ids  # (N,)
        pairs = ids[:, None] == everyone[None, :]  # (B, N)
        same = pairs if same is None else same | pairs
    own = positive_columns(len(same), rank, same.device)
    return same.scatter(1, own[:, None], False)


class LossTerm(nn.Module):
    """One loss term: `score(batch) -> {"<name>_loss": scalar}`. Calling it on features gathers them first.

    A new term is one subclass here plus one `loss.<name>_weight` field in LossConfig; `TERMS` lists it.
    """

    name: str = ""

    def __init__(self, gather: GatherFn | None = None):
        super().__init__()
        self.gather = gather or _no_gather

    def score(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, image_features, text_features, logit_scale=None, logit_bias=None, bank_images=None,
                bank_texts=None, image_ids=None, caption_ids=None):
        batch = LossBatch.gathered(image_features, text_features, logit_scale, self.gather, None, logit_bias,
                                   image_ids, caption_ids)
        batch.bank_images, batch.bank_texts = bank_images, bank_texts
        return self.score(batch)


class InfoNCELoss(LossTerm):
    """Symmetric InfoNCE (CLIP): cross-entropy of image->text and text->image softmaxes at temperature 1/logit_scale.

    The memory bank's features (M, D), when present, are extra negative columns after the batch's N.
    """

    name = "infonce"

    @classmethod
    def from_config(cls, cfg: LossConfig, gather: GatherFn | None = None) -> InfoNCELoss:
        return cls(gather)

    def score(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        logits_per_image = batch.logit_scale * batch.image_features @ batch.candidate_texts().T  # (B, N [+ M])
        logits_per_text = batch.logit_scale * batch.text_features @ batch.candidate_images().T  # (B, N [+ M])
        masked = batch.false_negatives(logits_per_image.shape[1])
        if masked is not None:  # a false negative leaves the softmax's denominator
            logits_per_image = logits_per_image.masked_fill(masked, float("-inf"))
            logits_per_text = logits_per_text.masked_fill(masked, float("-inf"))
        labels = batch.positives()
        loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
        return {"infonce_loss": loss}


class TripletLoss(LossTerm):
    """Hinge on cosine similarity, both directions (VSE++): max(0, margin + s(neg) - s(pos)).

    negatives="hardest" keeps the largest violation per anchor (max-violation); "all" sums every violation.
    Each direction is averaged over anchors so the loss scale does not grow with the batch. Negatives are the
    GLOBAL batch (every process's features) plus, when given, the memory bank's.
    """

    name = "triplet"

    def __init__(self, margin: float = 0.2, negatives: str = "hardest", gather: GatherFn | None = None):
        super().__init__(gather)
        if negatives not in ("hardest", "all"):
            raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")
        self.margin = margin
        self.negatives = negatives

    @classmethod
    def from_config(cls, cfg: LossConfig, gather: GatherFn | None = None) -> TripletLoss:
        return cls(cfg.triplet_margin, cfg.triplet_negatives, gather)

    def _direction(self, anchors: torch.Tensor, candidates: torch.Tensor, columns: torch.Tensor,
                   masked: torch.Tensor | None) -> torch.Tensor:
        scores = anchors @ candidates.T  # (B, N [+ M]) cosine similarities
        positive = scores.gather(1, columns[:, None])  # (B, 1)
        violation = (self.margin + scores - positive).clamp(min=0)  # (B, N [+ M])
        violation = violation.scatter(1, columns[:, None], 0.0)  # the positive is not its own negative
        if masked is not None:
            violation = violation.masked_fill(masked, 0.0)  # nor are the same image / caption in other rows
        per_anchor = violation.max(dim=1).values if self.negatives == "hardest" else violation.sum(dim=1)
        return per_anchor.mean()

    def score(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        # captions as negatives of an image; images as negatives of a caption
        columns, texts, images = batch.positives(), batch.candidate_texts(), batch.candidate_images()
        masked = batch.false_negatives(len(texts))
        image_anchored = self._direction(batch.image_features, texts, columns, masked)
        text_anchored = self._direction(batch.text_features, images, columns, masked)
        return {"triplet_loss": image_anchored + text_anchored}


class SigLipLoss(LossTerm):
    """Pairwise sigmoid loss (SigLIP, Zhai et al. 2023): every image-text pair of the global batch is its own binary
    problem, -log sigmoid(label * (scale * cos + bias)) with label +1 for a row's own pair and -1 otherwise, summed
    over the N columns and averaged over this process's B rows (open_clip's `SigLipLoss` normalisation, so that
    the mean over processes equals one process holding the whole batch).

    Columns are scored `chunk` at a time under activation checkpointing, so memory stays O(B x chunk) in the
    backward pass too. Global negatives come from the autograd all-gather (gradient flows back to their process).
    False negatives are dropped, not labelled; memory-bank columns are negatives.
    """

    name = "siglip"

    def __init__(self, chunk: int = 4096, gather: GatherFn | None = None):
        super().__init__(gather)
        self.chunk = chunk

    @classmethod
    def from_config(cls, cfg: LossConfig, gather: GatherFn | None = None) -> SigLipLoss:
        return cls(cfg.siglip_chunk, gather)

    def score(self, batch: LossBatch) -> dict[str, torch.Tensor]:
        if batch.logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (the model makes one when loss.siglip_weight > 0)")
        texts = batch.candidate_texts()  # (N [+ M], D)
        labels = F.one_hot(batch.positives(), len(texts)).to(texts.dtype) * 2 - 1  # (B, N [+ M]) +1 / -1
        masked = batch.false_negatives(len(texts))
        keep = (~masked).to(texts.dtype) if masked is not None else torch.ones_like(labels)
        total = batch.image_features.new_zeros(())
        for start in range(0, len(texts), self.chunk):
            part = slice(start, start + self.chunk)
            args = (batch.image_features, texts[part], labels[:, part], keep[:, part], batch.logit_scale,
                    batch.logit_bias)
            if torch.is_grad_enabled() and len(texts) > self.chunk:
                total = total + checkpoint(_sigmoid_pairs, *args, use_reentrant=False)
            else:
                total = total + _sigmoid_pairs(*args)
        return {"siglip_loss": total / len(batch.image_features)}


def _sigmoid_pairs(images, texts, labels, keep, logit_scale, logit_bias) -> torch.Tensor:
    logits = logit_scale * images @ texts.T + logit_bias  # (B, C)
    return -(F.logsigmoid(labels * logits) * keep).sum()


def _with_bank(batch: torch.Tensor, bank: torch.Tensor | None) -> torch.Tensor:
    return batch if bank is None or len(bank) == 0 else torch.cat([batch, bank.to(batch.dtype)], dim=0)


TERMS: dict[str, type[LossTerm]] = {term.name: term for term in (InfoNCELoss, TripletLoss, SigLipLoss)}


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
    """The weighted sum of the terms that `cfg` turns on (`loss.<name>_weight` > 0, see TERMS). Returns each term's
    `<name>_loss` and `loss`, their weighted sum.

    A term's weight ramps linearly from 0 over `loss.<name>_warmup_steps` where the config has one: hardest-negative
    hinges collapse every embedding to one point when they start from random features (VSE++ notes this); InfoNCE
    spreads them first. Features are gathered from all processes once, and every term scores the same global batch
    (and the memory bank, when `loss.memory_bank_size` > 0 and `embed_dim` is given).
    """

    def __init__(self, cfg: LossConfig, gather: GatherFn | None = None, embed_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.gather = gather or _no_gather
        self.terms = nn.ModuleDict({name: term.from_config(cfg, self.gather) for name, term in TERMS.items()
                                    if getattr(cfg, f"{name}_weight") > 0})
        if cfg.memory_bank_size and embed_dim is None:
            raise ValueError("loss.memory_bank_size > 0 needs the embedding dimension (embed_dim)")
        self.bank = FeatureQueue(cfg.memory_bank_size, embed_dim) if cfg.memory_bank_size else None

    def weight_at(self, name: str, step: int) -> float:
        weight, warmup = getattr(self.cfg, f"{name}_weight"), getattr(self.cfg, f"{name}_warmup_steps", 0)
        return weight if warmup == 0 else weight * min(1.0, step / warmup)

    def forward(self, image_features, text_features, logit_scale, step: int = 0, logit_bias=None, image_ids=None,
                caption_ids=None) -> dict[str, torch.Tensor]:
        if not self.cfg.mask_false_negatives:
            image_ids = caption_ids = None
        batch = LossBatch.gathered(image_features, text_features, logit_scale, self.gather, self.bank, logit_bias,
                                   image_ids, caption_ids)
        terms: dict[str, torch.Tensor] = {}
        # 0 * logit_scale keeps the temperature in the graph when no term uses it (triplet only): DDP requires every
        # parameter to receive a gradient, and its gradient is then an exact 0
        total = 0.0 * logit_scale
        for name, term in self.terms.items():
            terms.update(term.score(batch))
            total = total + self.weight_at(name, step) * terms[f"{name}_loss"]
        terms["loss"] = total
        if self.bank is not None and torch.is_grad_enabled():
            self.bank.push(batch.all_images, batch.all_texts)  # after scoring: a batch is never its own bank negative
        return terms

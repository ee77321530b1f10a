"""Retrieval recall on a validation set while training (`train.eval_every`): the exact evaluator's recall@k both ways
and rsum, with each process embedding its share of the images and captions and the embeddings gathered across
processes (Accelerate's `gather_for_metrics`).

The validation images are decoded once (uint8, at the model's eval preprocessing) and its captions tokenised once,
so an evaluation costs only the two towers' forward passes.

`train.benchmark` adds datasets scored by `vclr benchmark`'s own tasks (vclr.bench.tasks: zero-shot classification,
retrieval, ... each dataset's default) at each validation, on the main process: rows `bench/<dataset>/<figure>` beside
the `val_` ones, with their cost `bench_s`, the same figures `vclr benchmark` gives for the saved weights.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vclr.config import BenchmarkConfig, DataConfig
from vclr.data.dataset import CaptionTable, decode_images, normalize_images, tokenize_all
from vclr.embed.embedding import embed_tokens, encode_image_batch, image_decoder
from vclr.errors import VclrError
from vclr.eval.metrics import retrieval_metrics
from vclr.model.build import image_preprocess_cfg
from vclr.model.dual_encoder import DualEncoder

logger = logging.getLogger(__name__)


class Validator:
    """`validator(model)` -> {"val_image_to_text_R@1": ..., "val_rsum": ..., "val_s": seconds} on one table."""

    def __init__(self, table: CaptionTable, model: DualEncoder, tokenizer, accelerator, batch_size: int = 256,
                 ks: Sequence[int] = (1, 5, 10), jpeg_draft: float = DataConfig.jpeg_draft,
                 benchmark: BenchmarkScorer | None = None):
        self.accelerator, self.batch_size, self.ks, self.benchmark = accelerator, batch_size, tuple(ks), benchmark
        images = decode_images(table.image_paths, image_decoder(model, jpeg_draft))
        kept = [i for i, image in enumerate(images) if image is not None]
        if len(kept) < len(images):
            logger.warning("validation set %s: %d unreadable images left out", table.source, len(images) - len(kept))
        self.images = torch.stack([images[i] for i in kept])  # (N, 3, S, S) uint8
        captions = [table.captions[i] for i in kept]
        self.tokens = tokenize_all(tokenizer, [c for caps in captions for c in caps])  # (C, L)
        self.caption_image = np.repeat(np.arange(len(kept)), [len(c) for c in captions])  # (C,)
        self._frozen_cache: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
        logger.info("validation set %s: %d images, %d captions", table.source, len(kept), len(self.tokens))

    def _share(self, rows: int) -> slice:
        """This process's contiguous share of `rows` (shares are in rank order, so the gather keeps row order)."""
        bounds = np.linspace(0, rows, self.accelerator.num_processes + 1).astype(int)
        rank = self.accelerator.process_index
        return slice(bounds[rank], bounds[rank + 1])

    def _gathered(self, local: np.ndarray) -> np.ndarray:
        parts = self.accelerator.gather_for_metrics([local], use_gather_object=True)  # one array per process
        return np.concatenate(parts)

    def _batches(self, rows: torch.Tensor):
        return (rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size))

    def _frozen(self, model: DualEncoder) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This process's share of the validation set through the model's locked parts, computed at the first
        validation and kept: when training runs on cached locked towers, validating costs only the parts that
        train, as a training step does."""
        cached = model.cached_inputs
        if self._frozen_cache is None:
            device, preprocess = next(model.parameters()).device, image_preprocess_cfg(model)
            images = texts = None
            if "image" in cached:
                part = model.frozen_image_part()
                images = torch.cat([part(normalize_images(b.to(device), preprocess["mean"], preprocess["std"]))
                                    for b in self._batches(self.images[self._share(len(self.images))])])
            if "text" in cached:
                part = model.frozen_text_part()
                tokens = model.trim_padding(self.tokens[self._share(len(self.tokens))])  # one length: rows stack
                texts = torch.cat([part(b.to(device)) for b in self._batches(tokens)])
            self._frozen_cache = (images, texts)
        return self._frozen_cache

    def _embed(self, model: DualEncoder) -> tuple[np.ndarray, np.ndarray]:
        frozen_images, frozen_texts = self._frozen(model)
        if frozen_images is not None:
            images = torch.cat([F.normalize(model.image_from_frozen(b), dim=-1).float().cpu()
                                for b in self._batches(frozen_images)]).numpy()
        else:
            parts = [encode_image_batch(model, b) for b in self._batches(self.images[self._share(len(self.images))])]
            images = torch.cat(parts).numpy() if parts else np.zeros((0, model.embed_dim), np.float32)
        if frozen_texts is not None:
            texts = torch.cat([F.normalize(model.text_from_frozen(b), dim=-1).float().cpu()
                               for b in self._batches(frozen_texts)]).numpy()
        else:
            texts = embed_tokens(model, self.tokens[self._share(len(self.tokens))], self.batch_size)
        return images, texts

    @torch.no_grad()
    def __call__(self, model: DualEncoder) -> dict[str, float]:
        start, was_training = time.perf_counter(), model.training
        model.eval()
        try:
            local_images, local_texts = self._embed(model)
        finally:
            model.train(was_training)
        metrics = retrieval_metrics(self._gathered(local_images), self._gathered(local_texts), self.caption_image,
                                    self.ks)
        row = {f"val_{k}": round(v, 4) for k, v in metrics.items() if "_R@" in k or k == "rsum"}
        row["val_s"] = round(time.perf_counter() - start, 2)
        if self.benchmark is not None:
            row.update(self.benchmark(model, self.accelerator))
        return row


class BenchmarkScorer:
    """train.benchmark: datasets resolved once (a bad name fails before training), scored at each validation."""

    def __init__(self, names: Sequence[str], root: str, settings: BenchmarkConfig, cfg):
        from vclr.bench.datasets import resolve_dataset

        self.datasets = [resolve_dataset(name, root or None) for name in names]
        self.settings = dataclasses.replace(settings, bootstrap=0)  # figures only: intervals are `vclr benchmark`'s
        self.cfg = cfg

    @staticmethod
    def _key(name: str) -> str:
        path = Path(name)
        short = f"{path.parent.name}-{path.name}" if path.exists() and path.parent.name else name
        return re.sub(r"[^\w.-]+", "-", short).strip("-")

    @torch.no_grad()
    def __call__(self, model: DualEncoder, accelerator) -> dict[str, float]:
        from vclr.bench.features import Featurizer
        from vclr.bench.tasks import TASKS, tasks_for

        if not accelerator.is_main_process:
            return {}
        start, was_training = time.perf_counter(), model.training
        model.eval()
        row = {}
        try:
            featurizer = Featurizer(model, self.cfg, None, self.settings.batch_size, self.settings.num_workers)
            for dataset in self.datasets:
                for task in tasks_for(dataset):
                    metrics = TASKS[task].run(featurizer, dataset, self.settings).metrics
                    row.update({f"bench/{self._key(dataset.name)}/{k}": round(v, 6) for k, v in metrics.items()})
        finally:
            model.train(was_training)
        row["bench_s"] = round(time.perf_counter() - start, 2)
        return row


def make_validator(cfg, source, model: DualEncoder, accelerator) -> Validator | None:
    if not cfg.train.eval_every:
        if cfg.train.benchmark:
            raise VclrError("train.benchmark scores its datasets at each validation: set train.eval_every too")
        return None
    from vclr.data.sources import validation_table
    from vclr.model.build import get_tokenizer

    table = validation_table(cfg, source)
    if table is None:
        raise VclrError("train.eval_every needs validation data: pass data.val=TABLE, data.val_fraction=0.1 or "
                        "data.test=TABLE")
    scorer = BenchmarkScorer(cfg.train.benchmark, cfg.train.benchmark_root, cfg.benchmark, cfg) \
        if cfg.train.benchmark else None
    return Validator(table, model, get_tokenizer(cfg.model), accelerator, cfg.eval.batch_size, cfg.eval.ks,
                     cfg.data.jpeg_draft, scorer)

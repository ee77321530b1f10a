"""Embed collections and queries with a model: float32, L2-normalised numpy arrays.

    model, cfg = model_source(run="runs/demo").load()       # or model="ViT-B-32", pretrained=...
    emb = embed_table(model, cfg, load_collection("photos/"))

Images go through one pipeline: paths -> DataLoader workers decode (PIL) and apply the model's own open_clip
preprocessing (short side resized with its interpolation, centre crop, its mean/std) -> batches on the model's device
(bf16 autocast on CUDA) -> unit vectors. A file that cannot be decoded is dropped and named, never embedded blank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vclr.config import Config, DataConfig
from vclr.data.dataset import CaptionTable, ImageDecoder, draft_size, normalize_images, read_image, tokenize_all
from vclr.errors import VclrError
from vclr.model.build import get_tokenizer, image_preprocess_cfg, inference_transform
from vclr.model.dual_encoder import DualEncoder

logger = logging.getLogger(__name__)


class Towers(Protocol):
    """Another backend for a model's towers (vclr.search.onnx.OnnxQueryEncoder: an ONNX export, fp32 or int8)."""

    def embed_pixels(self, batch: np.ndarray) -> np.ndarray: ...  # uint8 (B, 3, S, S) resized and cropped -> (B, D)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...  # -> (N, D)


@dataclass
class Embeddings:
    image_embeddings: np.ndarray  # (N, D) float32, unit norm
    text_embeddings: np.ndarray  # (C, D) float32, unit norm
    caption_image: np.ndarray  # (C,) int64: the image (row of image_embeddings) of each caption
    image_paths: list[str]
    texts: list[str]
    unreadable: list[str] = field(default_factory=list)  # image files that could not be decoded, left out
    rows: np.ndarray | None = None  # (N,) the table row of each embedded image (unreadable rows are missing)


def model_device(model: DualEncoder) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device):
    """bf16 on CUDA (tensor cores; embeddings are normalised, so bf16 costs no retrieval quality); none on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                    enabled=False)


def image_decoder(model: DualEncoder, jpeg_draft: float = DataConfig.jpeg_draft) -> ImageDecoder:
    """Files -> uint8 (3, S, S) through the model's own eval preprocess; JPEGs decoded at reduced scale down to
    jpeg_draft x S a side (data.jpeg_draft)."""
    return ImageDecoder(inference_transform(model), draft_size(image_preprocess_cfg(model)["size"], jpeg_draft))


class _ImageFiles(Dataset):
    """Item i: (i, uint8 (3, S, S)) or (i, None) when file i cannot be decoded; decoded in the loader's workers."""

    def __init__(self, paths: Sequence[str], decoder: ImageDecoder):
        self.paths, self.decoder = list(paths), decoder

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return i, self.decoder(self.paths[i])


class _Rows:
    """Where embeddings go as they are computed: a list in RAM, or rows of a memory-mapped .npy file for collections
    whose vectors do not fit in RAM (then at most one batch is held)."""

    def __init__(self, capacity: int, dim: int, spill_to: Path | None = None):
        self.dim, self.count, self.parts = dim, 0, []
        self.file = np.lib.format.open_memmap(spill_to, mode="w+", dtype=np.float32, shape=(max(capacity, 1), dim)
                                              ) if spill_to is not None else None

    def append(self, batch: torch.Tensor) -> None:  # (B, D)
        if self.file is None:
            self.parts.append(batch)
        else:
            self.file[self.count:self.count + len(batch)] = batch.numpy()
        self.count += len(batch)

    def result(self) -> np.ndarray:  # (count, D)
        if self.file is not None:
            self.file.flush()
            return self.file[:self.count]
        return torch.cat(self.parts).numpy().astype(np.float32) if self.parts else np.zeros((0, self.dim), np.float32)


def _collate_kept(items: list) -> tuple[list[int], torch.Tensor | None, list[int]]:
    kept = [(i, image) for i, image in items if image is not None]
    failed = [i for i, image in items if image is None]
    return [i for i, _ in kept], torch.stack([image for _, image in kept]) if kept else None, failed


@torch.no_grad()
def encode_image_batch(model: DualEncoder, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> (B, D) float32 unit vectors."""
    device, preprocess = model_device(model), image_preprocess_cfg(model)
    batch = normalize_images(batch.to(device, non_blocking=True), preprocess["mean"], preprocess["std"])
    with _autocast(device):
        return model.encode_image(batch, normalize=True).float().cpu()


def embed_image_paths(model: DualEncoder, paths: Sequence[str], batch_size: int = 256, num_workers: int = 0,
                      spill_to: Path | None = None, jpeg_draft: float = DataConfig.jpeg_draft,
                      towers: Towers | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (embeddings (M, D) of the readable images, their positions (M,) in `paths`), in the order of `paths`.
    `spill_to`: write the embeddings into this .npy file as they come (returned memory-mapped). `towers`: another
    backend for the model's towers (an ONNX export); the decoding stays the model's own."""
    loader = DataLoader(_ImageFiles(paths, image_decoder(model, jpeg_draft)), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate_kept)
    out, kept = _Rows(len(paths), model.embed_dim, spill_to), []
    with tqdm(total=len(paths), desc="embedding images", unit="img", leave=False, disable=len(paths) <= batch_size,
              dynamic_ncols=True) as bar:
        for positions, batch, failed in loader:
            if batch is not None:
                out.append(encode_image_batch(model, batch) if towers is None
                           else torch.from_numpy(towers.embed_pixels(batch.numpy())))
                kept += positions
            bar.update(len(positions) + len(failed))
    return out.result(), np.asarray(kept, dtype=np.int64)  # (M, D), (M,)


@torch.no_grad()
def embed_tokens(model: DualEncoder, tokens: torch.Tensor, batch_size: int = 512,
                 spill_to: Path | None = None) -> np.ndarray:
    device = model_device(model)

    def encode(rows: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            return model.encode_text(rows.to(device), normalize=True).float().cpu()

    return _text_batches(tokens, encode, batch_size, model.embed_dim, spill_to)


def _text_batches(items, encode, batch_size: int, dim: int, spill_to: Path | None) -> np.ndarray:
    """`encode` over `items` (token rows, or texts for other towers) a batch at a time, with a progress bar."""
    out = _Rows(len(items), dim, spill_to)
    for start in tqdm(range(0, len(items), batch_size), desc="embedding texts", unit="batch", leave=False,
                      disable=len(items) <= batch_size):
        out.append(encode(items[start:start + batch_size]))
    return out.result()  # (C, D)


def embed_texts(model: DualEncoder, cfg: Config, texts: Sequence[str], batch_size: int = 512,
                spill_to: Path | None = None) -> np.ndarray:
    return embed_tokens(model, tokenize_all(get_tokenizer(cfg.model), texts), batch_size, spill_to)


def embed_pil_images(model: DualEncoder, images: Sequence) -> np.ndarray:
    """Embed decoded RGB PIL images (search queries, uploads). -> (B, D)"""
    transform = inference_transform(model)
    return encode_image_batch(model, torch.stack([transform(image) for image in images])).numpy()


def embed_image_files(model: DualEncoder, paths: Sequence[str]) -> np.ndarray:
    """Embed images given by path (search queries); an unreadable file is an error here."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise VclrError(f"query image {path} does not exist")
        image = read_image(path)
        if image is None:
            raise VclrError(f"query image {path} is not a readable image")
        images.append(image)
    return embed_pil_images(model, images)


def embed_table(model: DualEncoder, cfg: Config, table: CaptionTable, batch_size: int | None = None,
                spill_dir: Path | None = None, towers: Towers | None = None) -> Embeddings:
    """Embed every readable image of a table and the captions of those images. `spill_dir`: stream the vectors into
    memory-mapped files there (images.npy, texts.npy) instead of RAM. `towers`: run the towers through this backend
    (an ONNX export of the same model, vclr.search.onnx.OnnxQueryEncoder) instead of the PyTorch model."""
    batch_size = batch_size or cfg.eval.batch_size
    spill = (lambda name: Path(spill_dir) / name) if spill_dir is not None else (lambda name: None)
    image_embeddings, kept = embed_image_paths(model, table.image_paths, batch_size, cfg.data.num_workers,
                                               spill("images.npy"), cfg.data.jpeg_draft, towers)
    unreadable = sorted(set(range(len(table))) - set(kept.tolist()))
    if unreadable:
        logger.warning("%s: %d unreadable images left out (first: %s)", table.source, len(unreadable),
                       table.image_paths[unreadable[0]])
    captions = [table.captions[i] for i in kept]
    texts = [c for caps in captions for c in caps]
    caption_image = np.repeat(np.arange(len(kept)), [len(c) for c in captions]).astype(np.int64)  # (C,)
    text_embeddings = embed_texts(model, cfg, texts, batch_size, spill("texts.npy")) if towers is None else \
        _text_batches(texts, lambda batch: torch.from_numpy(towers.embed_texts(batch)), batch_size, model.embed_dim,
                      spill("texts.npy"))
    return Embeddings(image_embeddings, text_embeddings, caption_image,
                      [table.image_paths[i] for i in kept], texts, [table.image_paths[i] for i in unreadable], kept)


def fill_template(template: str, name: str) -> str:
    """A zero-shot prompt: CLIP_benchmark's templates hold `{c}`, vclr's `{}`."""
    return template.format(c=name) if "{c}" in template else template.replace("{}", name)


@torch.no_grad()
def class_embeddings(model: DualEncoder, cfg: Config, class_names: Sequence[str],
                     templates: Sequence[str]) -> np.ndarray:
    """(K, D) one unit vector per class: the mean of its prompts' unit embeddings, renormalised (CLIP's prompt
    ensemble). One batch per class, normalised and averaged in float32 torch as CLIP_benchmark's
    `zero_shot_classifier` does, so that zero-shot figures equal its own bit for bit."""
    if not templates or any("{}" not in t and "{c}" not in t for t in templates):
        raise VclrError(f"each zero-shot template needs a '{{}}' (or '{{c}}') for the class name, got "
                        f"{list(templates)}")
    tokenizer, device = get_tokenizer(cfg.model), model_device(model)
    rows = []
    for name in class_names:
        with _autocast(device):
            emb = model.encode_text(tokenizer([fill_template(t, name) for t in templates]).to(device))  # (T, D)
        emb = F.normalize(emb.float(), dim=-1).mean(dim=0)
        rows.append((emb / emb.norm()).cpu())
    return torch.stack(rows).numpy().astype(np.float32) if rows else np.zeros((0, model.embed_dim), np.float32)

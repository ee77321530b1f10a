"""Embed datasets and queries with a trained model: float32, L2-normalised numpy arrays.

    model, cfg = load_trained(Path("runs/demo"))
    emb = embed_table(model, cfg, load_caption_table("data/shapes/test"))
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from vclr.config import Config, VclrError
from vclr.data.dataset import CaptionTable, ImageOnlyDataset, ImageTextDataset, normalize_images, read_image, \
    decode_transform, tokenize_all
from vclr.model import DualEncoder, build_model, get_tokenizer, image_preprocess_cfg
from vclr.rundir import load_run_config, weights_file

logger = logging.getLogger(__name__)


@dataclass
class Embeddings:
    image_embeddings: np.ndarray  # (N, D) float32, unit norm
    text_embeddings: np.ndarray  # (C, D) float32, unit norm
    caption_image: np.ndarray  # (C,) int64
    image_paths: list[str]
    texts: list[str]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_trained(run_dir: str | Path, device: torch.device | None = None) -> tuple[DualEncoder, Config]:
    """The model of a run directory (its config.yaml and weights), in eval mode."""
    cfg = load_run_config(run_dir)
    # the weights come from the run: no pretrained files to load, no locking needed for inference
    model = build_model(dataclasses.replace(cfg.model, pretrained="", image_tower_weights=""))
    model.load_state_dict(load_file(str(weights_file(run_dir))))
    return model.to(device or default_device()).eval(), cfg


@torch.no_grad()
def embed_image_batches(model: DualEncoder, images: DataLoader, device: torch.device) -> np.ndarray:
    preprocess = image_preprocess_cfg(model)
    out = []
    for batch in tqdm(images, desc="embedding images", unit="batch", leave=False, disable=len(images) <= 1):
        batch = normalize_images(batch.to(device), preprocess["mean"], preprocess["std"])  # (B, 3, S, S)
        out.append(model.encode_image(batch, normalize=True).float().cpu())
    return torch.cat(out).numpy().astype(np.float32)  # (N, D)


@torch.no_grad()
def embed_tokens(model: DualEncoder, tokens: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    out = [model.encode_text(tokens[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in tqdm(range(0, len(tokens), batch_size), desc="embedding texts", unit="batch", leave=False,
                         disable=len(tokens) <= batch_size)]
    return torch.cat(out).numpy().astype(np.float32)  # (C, D)


def embed_texts(model: DualEncoder, cfg: Config, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
    device = next(model.parameters()).device
    return embed_tokens(model, tokenize_all(get_tokenizer(cfg.model), texts), batch_size, device)


def embed_pil_images(model: DualEncoder, images: Sequence) -> np.ndarray:
    """Embed decoded RGB PIL images (search queries, uploads)."""
    device = next(model.parameters()).device
    transform = decode_transform(image_preprocess_cfg(model)["size"])
    batch = torch.stack([transform(image) for image in images])  # (B, 3, S, S) uint8
    return embed_image_batches(model, DataLoader(batch, batch_size=len(images)), device)


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


def embed_table(model: DualEncoder, cfg: Config, table: CaptionTable, batch_size: int | None = None) -> Embeddings:
    """Embed every image and every caption of a table."""
    batch_size = batch_size or cfg.eval.batch_size
    device = next(model.parameters()).device
    pairs = ImageTextDataset(table, get_tokenizer(cfg.model), image_preprocess_cfg(model)["size"],
                             cache_images=cfg.data.cache_images, cache_max_gb=cfg.data.cache_max_gb)
    loader = DataLoader(ImageOnlyDataset(pairs), batch_size=batch_size, num_workers=cfg.data.num_workers)
    image_embeddings = embed_image_batches(model, loader, device)
    text_embeddings = embed_tokens(model, pairs.tokens, batch_size, device)
    texts, caption_image = pairs.table.flat_captions()
    return Embeddings(image_embeddings, text_embeddings, caption_image, list(pairs.table.image_paths), texts)

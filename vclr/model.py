"""The dual encoder: open_clip image and text towers, a learnable temperature, an optional projector head.

Architectures are data: `vclr/model_configs/*.json` (open_clip's format) are registered with open_clip next to its
own configs, so `model.name` may be `vclr-tiny-rn` or any open_clip model such as `ViT-B-32`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from vclr.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


def list_models() -> list[str]:
    """Every model config name `model.name` accepts: vclr's and open_clip's."""
    return open_clip.list_models()


class ProjectorMLP(nn.Module):
    """FC-BN-ReLU-FC head (SimCLR): a non-linear projection that the contrastive loss shapes instead of the tower."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        return self.net(x)


class DualEncoder(nn.Module):
    """Image and text towers into one joint space. API as open_clip's CLIP: encode_image, encode_text, forward->dict."""

    def __init__(self, cfg: ModelConfig, clip: nn.Module, embed_dim: int, reset_temperature: bool = True):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.embed_dim = embed_dim
        self.image_projector = ProjectorMLP(embed_dim, cfg.projector_hidden_dim) if cfg.projector else nn.Identity()
        self.text_projector = ProjectorMLP(embed_dim, cfg.projector_hidden_dim) if cfg.projector else nn.Identity()
        # The temperature lives as log(1/T) (open_clip's logit_scale): gradient steps act on a scale-free quantity.
        # Pretrained weights keep their learned temperature; fresh towers start at init_temperature.
        if reset_temperature:
            with torch.no_grad():
                self.clip.logit_scale.fill_(math.log(1.0 / cfg.init_temperature))
        self.clip.logit_scale.requires_grad_(cfg.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_projector(self.clip.encode_image(images))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_projector(self.clip.encode_text(tokens))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images, normalize=True),  # (B, D)
            "text_features": self.encode_text(tokens, normalize=True),  # (B, D)
            # clamp as CLIP does (at 100): the learned temperature can otherwise run off and destabilise training
            "logit_scale": self.clip.logit_scale.clamp(max=self.max_log_scale).exp(),
        }


def _open_clip_config(name: str) -> dict:
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ConfigError(f"model.name={name!r} is not a known model config; run `vclr models` to list them")
    return model_cfg


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init_warning():
    """open_clip warns on every random init; with model.pretrained="" that is what the user asked for."""
    root, log_filter = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(log_filter)
    try:
        yield
    finally:
        root.removeFilter(log_filter)


def build_model(cfg: ModelConfig) -> DualEncoder:
    """Create the towers from the named open_clip config; load `cfg.pretrained` if set."""
    embed_dim = _open_clip_config(cfg.name)["embed_dim"]
    pretrained = cfg.pretrained or None
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such checkpoint file")
    with _quiet_random_init_warning():
        clip = open_clip.create_model(cfg.name, pretrained=pretrained, pretrained_text=False, output_dict=True)
    if pretrained:
        logger.info("loaded pretrained weights %s into %s", pretrained, cfg.name)
    return DualEncoder(cfg, clip, embed_dim, reset_temperature=not pretrained)


def get_tokenizer(cfg: ModelConfig):
    """open_clip's tokenizer for the model (BPE SimpleTokenizer or the model's HF tokenizer)."""
    return open_clip.get_tokenizer(cfg.name)


def image_preprocess_cfg(model: DualEncoder) -> dict:
    """size (int) / mean / std / interpolation the image tower expects (open_clip's preprocess config)."""
    preprocess = dict(open_clip.get_model_preprocess_cfg(model.clip))
    size = preprocess["size"]
    preprocess["size"] = size if isinstance(size, int) else size[0]  # square inputs only
    return preprocess


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: gains, biases, embeddings' scalars and the temperature are exempt (CLIP's recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "logit_scale" in name or "bn" in name or "ln" in name or "bias" in name
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

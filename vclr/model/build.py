"""Building a dual encoder from its config: open_clip's towers, weights, locking; its tokenizer and preprocessing.

    model = build_model(ModelConfig(name="vclr-tiny-rn"))      # any name `list_models()` gives
    tokens = get_tokenizer(model.cfg)(["a red circle"])
    transform = inference_transform(model)                      # PIL -> uint8 (3, S, S), open_clip's eval geometry

Architectures are data: `vclr/model/configs/*.json` (open_clip's format) are registered with open_clip next to its
own configs when this module is imported, so `model.name` may be `vclr-tiny-rn` or any open_clip model such as
`ViT-B-32`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

import open_clip
import torch
from open_clip.hf_configs import arch_dict
from open_clip.tokenizer import HFTokenizer
from torch import nn

from vclr.config import ModelConfig
from vclr.errors import ConfigError
from vclr.model.dual_encoder import DualEncoder
from vclr.model.towers import lock_towers, pool_levels

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
# open_clip's architecture table lacks BERT's layer names, which partial unlocking of an HF text tower looks up
# (MiniLM is a BERT); the names are those of transformers' BertModel.
arch_dict.get("bert", {}).get("config_names", {}).setdefault("layer_attr", "layer")
arch_dict.get("bert", {}).get("config_names", {}).setdefault("token_embeddings_attr", "embeddings")


def list_models() -> list[str]:
    """Every model config name `model.name` accepts: vclr's and open_clip's."""
    return open_clip.list_models()


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


def _text_cfg_override(cfg: ModelConfig, model_cfg: dict, load_weights: bool = True) -> dict:
    """open_clip kwargs that point an hf_model_name text tower at a local directory (config + tokenizer, and the
    weights when `load_weights`)."""
    if not cfg.text_tower_dir:
        return {}
    text_cfg = dict(model_cfg["text_cfg"])
    if "hf_model_name" not in text_cfg:
        raise ConfigError(f"model.text_tower_dir is set but {cfg.name} has no Hugging Face text tower "
                          "(text_cfg.hf_model_name); use a LiT config such as vclr-lit-effl0-minilm")
    if not (Path(cfg.text_tower_dir) / "config.json").is_file():
        raise ConfigError(f"model.text_tower_dir={cfg.text_tower_dir!r} is not a Hugging Face model dir "
                          "(no config.json)")
    text_cfg.update(hf_model_name=cfg.text_tower_dir, hf_tokenizer_name=cfg.text_tower_dir,
                    hf_model_pretrained=load_weights)
    return {"text_cfg": text_cfg}


def _patch_dropout_override(cfg: ModelConfig, model_cfg: dict) -> dict:
    """open_clip's own FLIP patch dropout for its ViT image towers (a timm or ResNet tower has no patches to drop)."""
    if not cfg.patch_dropout:
        return {}
    vision = model_cfg["vision_cfg"]
    if vision.get("timm_model_name") or not isinstance(vision.get("layers"), int):
        raise ConfigError(f"model.patch_dropout={cfg.patch_dropout} needs an open_clip ViT image tower; {cfg.name}'s "
                          "is a timm or ResNet tower: set model.patch_dropout=0")
    return {"force_patch_dropout": cfg.patch_dropout}


def load_image_tower_weights(clip: nn.Module, path: str) -> None:
    """Load a timm state dict into the image tower's trunk; every trunk tensor must be in the file."""
    trunk = getattr(clip.visual, "trunk", None)
    if trunk is None:
        raise ConfigError("model.image_tower_weights needs a timm image tower (vision_cfg.timm_model_name)")
    if not Path(path).is_file():
        raise ConfigError(f"model.image_tower_weights={path!r}: no such file")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        result = trunk.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        raise ConfigError(f"model.image_tower_weights={path!r} does not fit the image tower: "
                          f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("classifier.", "fc.", "head."))]
    if result.missing_keys or unexpected:  # a classification head may be left over; anything else is a mismatch
        first = (result.missing_keys or unexpected)[0]
        raise ConfigError(f"model.image_tower_weights={path!r} does not fit the image tower: "
                          f"{len(result.missing_keys)} missing and {len(unexpected)} unexpected tensors "
                          f"(first: {first})")
    logger.info("loaded image tower weights from %s", path)


def build_model(cfg: ModelConfig, logit_bias: bool = False, tower_weights: bool = True) -> DualEncoder:
    """Create the towers from the named open_clip config; load `cfg.pretrained` and tower weights; lock towers.

    `logit_bias`: give the model SigLIP's learnable bias (at `cfg.init_logit_bias`); open_clip's SigLIP configs
    have one anyway. `tower_weights=False`: read no weight files (pretrained, image tower, text tower), for a caller
    that loads a whole trained state dict next."""
    model_cfg = _open_clip_config(cfg.name)
    if not tower_weights:
        cfg = replace(cfg, pretrained="", image_tower_weights="")
    run_weights = _vclr_weights(cfg.pretrained)  # a vclr run's model.safetensors: fine-tuning a vclr model
    pretrained = (cfg.pretrained or None) if run_weights is None else None
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r}: no such checkpoint file")
    with _quiet_random_init_warning():
        bias = {"init_logit_bias": cfg.init_logit_bias} if logit_bias and "init_logit_bias" not in model_cfg else {}
        clip = open_clip.create_model(cfg.name, pretrained=pretrained, pretrained_text=False, output_dict=True,
                                      **_text_cfg_override(cfg, model_cfg, tower_weights),
                                      **_patch_dropout_override(cfg, model_cfg), **bias)
    if pretrained:
        logger.info("loaded pretrained weights %s into %s", pretrained, cfg.name)
    if cfg.image_tower_weights:
        load_image_tower_weights(clip, cfg.image_tower_weights)
    lock_towers(clip, cfg)
    if cfg.image_pool_levels:
        pool_levels(clip, cfg)
    if run_weights is not None:  # the base's weights before any adapter, so its state dict fits the towers as built
        _load_clip_weights(clip, run_weights, cfg)
    if cfg.lora_rank:
        from vclr.model.lora import add_lora

        add_lora(clip, cfg)
    model = DualEncoder(cfg, clip, model_cfg["embed_dim"], reset_temperature=not (pretrained or run_weights))
    if run_weights is not None:
        heads = {k: v for k, v in run_weights.items() if k.split(".")[0] in ("image_projector", "text_projector")}
        model.load_state_dict(heads, strict=False)
    return model


def _vclr_weights(pretrained: str) -> dict | None:
    """The state dict of a vclr run's weights (keys under `clip.`) named by model.pretrained, else None."""
    if not pretrained or Path(pretrained).suffix != ".safetensors" or not Path(pretrained).is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(pretrained, framework="pt") as f:
        if not any(key.startswith("clip.") for key in f.keys()):
            return None
    return load_file(pretrained)


def _load_clip_weights(clip: nn.Module, state: dict, cfg: ModelConfig) -> None:
    """A vclr run's tower weights into freshly built towers; every tensor must fit."""
    own = {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
    try:
        clip.load_state_dict(own)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} (a vclr run's weights) does not fit model.name="
                          f"{cfg.name} with these settings: {first}") from None
    logger.info("loaded the weights of %s (a vclr run) into %s", cfg.pretrained, cfg.name)


def get_tokenizer(cfg: ModelConfig):
    """open_clip's tokenizer for the model: BPE SimpleTokenizer, or the HF tokenizer of the text tower."""
    if cfg.text_tower_dir:
        context_length = _open_clip_config(cfg.name)["text_cfg"].get("context_length", 77)
        return HFTokenizer(cfg.text_tower_dir, context_length=context_length)
    return open_clip.get_tokenizer(cfg.name)


def inference_transform(model: DualEncoder):
    """PIL -> uint8 (3, S, S): open_clip's own eval preprocess for this model (its resize mode, interpolation, crop or
    pad), less ToTensor/Normalize; normalize_images on the batch then gives open_clip's input exactly."""
    from torchvision import transforms

    cfg = image_preprocess_cfg(model)
    full = open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                     resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
                                     fill_color=cfg.get("fill_color", 0))
    geometry = [t for t in full.transforms if not isinstance(t, (transforms.ToTensor, transforms.Normalize))]
    return transforms.Compose([*geometry, transforms.PILToTensor()])


def image_preprocess_cfg(model: DualEncoder) -> dict:
    """size (int) / mean / std / interpolation the image tower expects (open_clip's preprocess config)."""
    preprocess = dict(open_clip.get_model_preprocess_cfg(model.clip))
    size = preprocess["size"]
    preprocess["size"] = size if isinstance(size, int) else size[0]  # square inputs only
    return preprocess

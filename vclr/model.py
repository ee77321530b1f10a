"""The dual encoder: open_clip image and text towers, a learnable temperature, an optional projector head.

Architectures are data: `vclr/model_configs/*.json` (open_clip's format) are registered with open_clip next to its
own configs, so `model.name` may be `vclr-tiny-rn` or any open_clip model such as `ViT-B-32`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import open_clip
from open_clip.hf_configs import arch_dict
from open_clip.tokenizer import HFTokenizer
from timm.layers import freeze_batch_norm_2d as timm_freeze_batch_norm_2d
import torch
import torch.nn.functional as F
from torch import nn

from vclr.config import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)
# open_clip's architecture table lacks BERT's layer names, which partial unlocking of an HF text tower looks up
# (MiniLM is a BERT); the names are those of transformers' BertModel.
arch_dict.get("bert", {}).get("config_names", {}).setdefault("layer_attr", "layer")
arch_dict.get("bert", {}).get("config_names", {}).setdefault("token_embeddings_attr", "embeddings")


def list_models() -> list[str]:
    """Every model config name `model.name` accepts: vclr's and open_clip's."""
    return open_clip.list_models()


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


def _pool_levels(clip: nn.Module, cfg: ModelConfig) -> None:
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
    """A tower as its frozen prefix and the part after it (vclr.locked_cache caches the prefix's outputs)."""

    frozen: Callable[[torch.Tensor], torch.Tensor]  # input -> frozen output (the prefix module where there is one)
    state: dict[str, torch.Tensor]  # the tensors the frozen output depends on: the cache key hashes them
    rest: Callable[[torch.Tensor], torch.Tensor]  # frozen output -> the tower's output, before the projector


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

    def train(self, mode: bool = True) -> "DualEncoder":
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
                frozen.extend(_hf_frozen_prefix(text.transformer)[0])
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

    # ---- locked towers computed once (vclr.locked_cache): a tower whose frozen part is a prefix splits into that
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
        return _timm_block_split(trunk, visual.head)

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
        return _hf_layer_split(text) if not pooler_trains else None

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


def longest_caption(mask: torch.Tensor) -> int | None:
    """(B, L) mask of real tokens -> the length up to the batch's last real token (None, slicing nothing away,
    when there is none): captions are padded at the end, so the columns after it are padding in every row."""
    used = mask.any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else None


# poolers that read only the last hidden states and the mask (not the transformer's own pooler output), so they can
# run on the output of layers computed apart from the transformer's forward
LAST_HIDDEN_STATE_POOLERS = ("MeanPooler", "MaxPooler", "ClsLastHiddenStatePooler")


def _hf_frozen_prefix(transformer: nn.Module) -> tuple[list[nn.Module], int]:
    """An HF encoder's (BERT-style: embeddings, encoder.layer) frozen embeddings and leading layers, and the index
    of its first trainable layer; ([], 0) when its embeddings train or it has no such layer list."""
    layers = getattr(getattr(transformer, "encoder", None), "layer", None)
    embeddings = getattr(transformer, "embeddings", None)
    if layers is None or embeddings is None or any(p.requires_grad for p in embeddings.parameters()):
        return [], 0
    first = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                 len(layers))
    return [embeddings, *layers[:first]], first


def _hf_layer_split(text: nn.Module) -> "TowerSplit | None":
    """A partly unlocked HF text encoder (model.lock_text_unlocked_layers): tokens (B, L) -> the hidden states
    before its first trainable layer with the attention mask as one more channel (B, L, H + 1), since the trainable
    layers need both and a cache row holds one tensor; and the rest: those layers, the pooler and the projection.
    None for decoders, poolers that read the transformer's own pooler output, or trainable embeddings."""
    from transformers.masking_utils import create_bidirectional_mask  # only HF towers need transformers
    from transformers.modeling_outputs import BaseModelOutput

    transformer = text.transformer
    prefix, first = _hf_frozen_prefix(transformer)
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


def _timm_block_split(trunk: nn.Module, head: nn.Module) -> "TowerSplit | None":
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


def _lock_towers(clip: nn.Module, cfg: ModelConfig) -> None:
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


def build_model(cfg: ModelConfig, logit_bias: bool = False, tower_weights: bool = True) -> DualEncoder:
    """Create the towers from the named open_clip config; load `cfg.pretrained` and tower weights; lock towers.

    `logit_bias`: give the model SigLIP's learnable bias (at `cfg.init_logit_bias`); open_clip's SigLIP configs
    have one anyway. `tower_weights=False`: read no weight files (pretrained, image tower, text tower), for a caller
    that loads a whole trained state dict next."""
    model_cfg = _open_clip_config(cfg.name)
    if not tower_weights:
        cfg = replace(cfg, pretrained="", image_tower_weights="")
    pretrained = cfg.pretrained or None
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
    _lock_towers(clip, cfg)
    if cfg.image_pool_levels:
        _pool_levels(clip, cfg)
    return DualEncoder(cfg, clip, model_cfg["embed_dim"], reset_temperature=not pretrained)


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

"""Typed run configuration: frozen dataclasses, loaded from YAML, overridden by `section.key=value` strings.

    cfg = load_config("configs/demo.yaml", ["optim.lr=1e-3", "train.output_dir=runs/x"])

Unknown keys, wrong types and out-of-range values raise `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# the config hash: which indexes, caches and exports a model's config may use
from vclr.config.hashing import (
    HASHED_FIELDS,
    LEGACY_ALWAYS_HASHED,
    LOCATION_FIELDS,
    NEWER_FIELDS,
    UNHASHED_FIELDS,
    config_hash,
    config_hashes,
)
from vclr.errors import ConfigError
from vclr.storage import atomic_write_text


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vclr-tiny-rn"  # an open_clip model config: vclr's own (vclr/model/configs) or any of open_clip's
    pretrained: str = ""  # "" = random init; a local checkpoint path; or an open_clip tag (downloads: needs internet)
    init_temperature: float = 0.07  # CLIP's starting softmax temperature; stored as log(1/T) like open_clip
    learn_temperature: bool = True  # learnable temperature is one of InfoNCE's best-known wins (CLIP, ALIGN)
    init_logit_bias: float = -10.0  # SigLIP's learnable bias (only with loss.siglip_weight > 0); its paper's init
    max_logit_scale: float = 100.0  # clamp 1/T as CLIP does, so the learned temperature cannot blow up the logits
    projector: bool = False  # FC-BN-ReLU-FC head after each tower (SimCLR-style); off: towers project themselves
    projector_hidden_dim: int = 512
    projector_dropout: float = 0.0  # dropout before each projector layer (small data, many steps on frozen features)
    # LiT-style pretrained towers from local files (no hub access): see configs/lit_*.yaml
    image_tower_weights: str = ""  # state dict for a timm image tower's trunk (scripts/convert_efficientnet_lite0.py)
    text_tower_dir: str = ""  # local Hugging Face model dir (weights + tokenizer) for an hf_model_name text tower
    lock_image: bool = False  # freeze the image tower (LiT: "locked image tuning")
    lock_image_unlocked_groups: int = 0  # ... except its last N layer groups
    lock_image_freeze_bn: bool = True  # a fully locked tower keeps its BatchNorm statistics too
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0  # ... except its last N transformer layers
    # timm image towers: also average-pool these feature levels (indices into the trunk's feature_info, as timm's
    # forward_intermediates takes them) and join them to the pooled output before the projection. Earlier levels keep
    # colour and shape that the last one has abstracted away: they carry over to images unlike the tower's training
    # data (OpenMoji validation split, EfficientNet-Lite0: see configs/lit_frozen_minilm_effl0.yaml)
    image_pool_levels: tuple[int, ...] = ()
    # FLIP: training drops this share of an open_clip ViT image tower's patches (random per image, each step), so
    # its steps cost about (1 - p) as much; validation, embedding and search see every patch
    patch_dropout: float = 0.0
    # LoRA through peft (vclr.model.lora): adapters of this rank on the unlocked towers' attention and MLP layers;
    # with the heads and the temperature they alone train, the towers' own weights stay as loaded; 0 = off
    lora_rank: int = 0
    lora_alpha: float = 16.0  # the adapters' scale is alpha / rank (peft's rule): 2 at rank 8
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()  # module names to adapt (peft's suffix rule); () = vclr.model.lora's defaults

    def __post_init__(self):
        _check(self.init_temperature > 0, "model.init_temperature", self.init_temperature, "> 0")
        _check(self.max_logit_scale > 1, "model.max_logit_scale", self.max_logit_scale, "> 1")
        _check(self.projector_hidden_dim > 0, "model.projector_hidden_dim", self.projector_hidden_dim, "> 0")
        _check(0 <= self.projector_dropout < 1, "model.projector_dropout", self.projector_dropout, "[0, 1)")
        _check(0 <= self.patch_dropout < 1, "model.patch_dropout", self.patch_dropout, "[0, 1)")
        _check(self.lora_rank >= 0, "model.lora_rank", self.lora_rank, ">= 0 (0 = no adapters)")
        _check(self.lora_alpha > 0, "model.lora_alpha", self.lora_alpha, "> 0")
        _check(0 <= self.lora_dropout < 1, "model.lora_dropout", self.lora_dropout, "[0, 1)")
        _check(self.lock_image_unlocked_groups >= 0, "model.lock_image_unlocked_groups",
               self.lock_image_unlocked_groups, ">= 0")
        _check(self.lock_text_unlocked_layers >= 0, "model.lock_text_unlocked_layers", self.lock_text_unlocked_layers,
               ">= 0")


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # dataset: an imagefolder split dir, or a .jsonl/.json/.csv/.parquet table of image paths
    test: str = ""  # same forms as `train`; used by eval and for the end-of-training report
    # validation during training (train.eval_every): this table; else a held-out share of train (val_fraction > 0,
    # by a hash of each image's path, so the same images every run); else data.test
    val: str = ""
    val_fraction: float = 0.0
    image_column: str = "file_name"  # paths are relative to the table's folder
    caption_columns: tuple[str, ...] = ("captions",)  # each holds one caption or a list of captions
    batch_size: int = 256  # contrastive batch: more in-batch negatives per step
    num_workers: int = 0  # 0 suits cached images; raise for large datasets decoded on the fly
    cache_images: bool = True  # decode + resize once into RAM (uint8) when the dataset fits in `cache_max_gb`
    cache_max_gb: float = 4.0
    augment: bool = False  # random resized crop; off by default: crops and flips break captions about position
    augment_scale: float = 0.8  # the crop keeps at least this share of the image's area (vclr.data.augment)
    augment_color_jitter: float = 0.0  # brightness, contrast and saturation jitter (never hue: captions name it)
    augment_grayscale: float = 0.0  # probability of a greyscale view
    augment_blur: float = 0.0  # probability of a Gaussian blur
    # where images are decoded: "loader" = PIL in the data loader (cached as uint8 when they fit); "device" = the
    # loader only reads encoded bytes and the training device decodes whole batches (nvJPEG on CUDA) and resizes
    decode_on: Literal["loader", "device"] = "loader"
    # PIL decoding (decode_on=loader, embedding, validation): a JPEG decodes at the largest DCT scale (1/2, 1/4,
    # 1/8) that keeps both its sides >= jpeg_draft x the model's input size. 2: the model's input stays within about
    # 1 level of 255 of full decoding, and a 12-megapixel photo decodes 3-4x faster; 1: faster, a few levels off;
    # below 1 upsamples (0.8: 500x375 photos decode at half scale for a 224-px model); 0: full size, open_clip's
    # exact input
    jpeg_draft: float = 2.0

    def __post_init__(self):
        _check(self.batch_size >= 2, "data.batch_size", self.batch_size, ">= 2 (contrastive needs negatives)")
        _check(0 < self.augment_scale <= 1, "data.augment_scale", self.augment_scale, "(0, 1]")
        for name in ("augment_color_jitter", "augment_grayscale", "augment_blur"):
            _check(0 <= getattr(self, name) <= 1, f"data.{name}", getattr(self, name), "[0, 1]")
        _check(self.num_workers >= 0, "data.num_workers", self.num_workers, ">= 0")
        _check(len(self.caption_columns) > 0, "data.caption_columns", self.caption_columns, "at least one column")
        _check(self.cache_max_gb >= 0, "data.cache_max_gb", self.cache_max_gb, ">= 0")
        _check(0 <= self.val_fraction < 1, "data.val_fraction", self.val_fraction, "[0, 1)")
        _check(self.jpeg_draft >= 0, "data.jpeg_draft", self.jpeg_draft, ">= 0 (0 = full-size decoding)")


@dataclass(frozen=True)
class LossConfig:
    infonce_weight: float = 1.0  # symmetric InfoNCE (CLIP)
    triplet_weight: float = 0.0  # triplet hinge on cosine similarity (VSE++)
    triplet_margin: float = 0.2
    triplet_negatives: Literal["hardest", "all"] = "hardest"  # hardest = VSE++ max-violation
    triplet_warmup_steps: int = 0  # hardest-negative hinge collapses from scratch: phase it in after InfoNCE warms up
    memory_bank_size: int = 0  # > 0: a FIFO of this many past features adds negatives beyond the batch (MoCo/NPID)
    # SigLIP's pairwise sigmoid loss; it adds a learnable logit bias to the model (model.init_logit_bias). SigLIP
    # starts its scale at 10 (model.init_temperature=0.1, as configs/siglip_*.yaml set)
    siglip_weight: float = 0.0
    siglip_chunk: int = 4096  # columns scored at a time: memory O(batch x chunk), backward included
    # rows of one batch that show the same image (duplicate rows, several captions of one image) or carry the same
    # caption text are not each other's negatives in any term
    mask_false_negatives: bool = True

    def __post_init__(self):
        _check(self.infonce_weight >= 0, "loss.infonce_weight", self.infonce_weight, ">= 0")
        _check(self.triplet_weight >= 0, "loss.triplet_weight", self.triplet_weight, ">= 0")
        _check(self.siglip_weight >= 0, "loss.siglip_weight", self.siglip_weight, ">= 0")
        _check(self.infonce_weight + self.triplet_weight + self.siglip_weight > 0, "loss.infonce_weight",
               self.infonce_weight, "> 0 when loss.triplet_weight and loss.siglip_weight are 0 (some loss must be on)")
        _check(self.siglip_chunk >= 1, "loss.siglip_chunk", self.siglip_chunk, ">= 1")
        _check(0 <= self.triplet_margin <= 2, "loss.triplet_margin", self.triplet_margin, "[0, 2] (cosine margin)")
        _check(self.triplet_warmup_steps >= 0, "loss.triplet_warmup_steps", self.triplet_warmup_steps, ">= 0")
        _check(self.memory_bank_size >= 0, "loss.memory_bank_size", self.memory_bank_size, ">= 0 (0 = off)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1  # applied to matrices only; gains, biases and the temperature are exempt (as CLIP)
    beta1: float = 0.9
    beta2: float = 0.98  # CLIP's: steadier with large contrastive batches
    eps: float = 1e-6
    warmup_steps: int = 100  # linear warmup, then cosine decay to 0 at max_steps
    max_steps: int = 1000
    grad_clip_norm: float = 1.0  # 0 = off
    # fine-tuning pretrained towers: their LR is lr * tower_lr_scale (the new projection heads keep lr), and within
    # a tower each block below the top gets another factor layer_decay (BEiT/ELECTRA-style layer-wise LR decay)
    tower_lr_scale: float = 1.0
    layer_decay: float = 1.0

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "[0, 1)")
        _check(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "[0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "> 0")
        _check(self.max_steps >= 1, "optim.max_steps", self.max_steps, ">= 1")
        _check(0 <= self.warmup_steps <= self.max_steps, "optim.warmup_steps", self.warmup_steps,
               f"[0, optim.max_steps={self.max_steps}]")
        _check(self.grad_clip_norm >= 0, "optim.grad_clip_norm", self.grad_clip_norm, ">= 0")
        _check(0 < self.tower_lr_scale <= 1, "optim.tower_lr_scale", self.tower_lr_scale, "(0, 1]")
        _check(0 < self.layer_decay <= 1, "optim.layer_decay", self.layer_decay, "(0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # micro-batches per optimizer step: the gradient is the MEAN of per-micro-batch losses, each contrastive over its
    # own micro-batch (negatives never cross micro-batches). For a larger contrastive batch use grad_cache_chunk.
    gradient_accumulation_steps: int = 1
    checkpoint_every: int = 500  # steps between save_state checkpoints (and one at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10  # steps between metrics.jsonl rows
    # wall-time budget of the training loop; 0 = none. After its first steps the run times a step and fits
    # optim.max_steps to the budget (never above it), so the LR schedule completes; a hard stop at the budget remains
    max_minutes: float = 0.0
    eval_every: int = 0  # steps between validation recalls (data.val, see there); 0 = off. Also at the last step
    # the validation figure that picks checkpoints/best: rsum, or e.g. text_to_image_R@1
    best_metric: str = "rsum"
    early_stop_patience: int = 0  # stop after this many validations without a new best; 0 = never
    # experiment trackers through Accelerate, besides metrics.jsonl: none, tensorboard, wandb, mlflow, comet_ml, ...
    log_with: str = "none"
    threads: int = 0  # torch CPU threads; 0 = torch's default (one per core)
    # GradCache: embed the batch in chunks of this many pairs without graphs, take the loss over the whole batch,
    # then backprop chunk by chunk. Same gradients as the full batch, activation memory of one chunk. 0 = off
    grad_cache_chunk: int = 0
    tf32: bool = True  # CUDA: TF32 matmuls/convolutions for the fp32 parts
    compile: bool = False  # torch.compile the model (Accelerate's dynamo backend "inductor")
    channels_last: bool = False  # NHWC memory format for conv towers (faster tensor-core convolutions)
    # a fully locked tower on deterministic input (no data.augment) is run once over the training set; its outputs
    # are cached on disk ($VCLR_CACHE/locked) and training runs only the parts that train (vclr.train.locked_cache)
    cache_locked_towers: bool = True
    # torch.profiler over this many optimizer steps after the first 10: a timeline, an operator table and the
    # device's busy share in RUN/profile/ (vclr.train.profiling); 0 = off
    profile_steps: int = 0
    # an exponential moving average of the weights (timm's ModelEmaV3), validated beside them and kept in
    # checkpoints/ema (`--checkpoint ema`); e.g. 0.999; 0 = off
    ema_decay: float = 0.0
    # recompute the towers' activations in the backward pass (open_clip's set_grad_checkpointing, Hugging Face's
    # gradient checkpointing for HF text towers): less memory, about a third more compute
    grad_checkpointing: bool = False
    # a locked image tower on augmented data (data.augment): compute this many augmented views of each image once and
    # cache them, each step taking one at random (vclr.train.locked_cache): LiT with augmentation at cached speed
    cache_views: int = 0
    # datasets scored by `vclr benchmark`'s code at each validation (names or paths, vclr.bench.datasets), logged
    # as bench/<dataset>/<figure> beside the val_ rows; benchmark_root: where CLIP_benchmark-named ones lie
    benchmark: tuple[str, ...] = ()
    benchmark_root: str = ""

    def __post_init__(self):
        _check(self.profile_steps >= 0, "train.profile_steps", self.profile_steps, ">= 0 (0 = off)")
        _check(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps",
               self.gradient_accumulation_steps, ">= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, ">= 1")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, ">= 1")
        _check(self.log_every >= 1, "train.log_every", self.log_every, ">= 1")
        _check(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, ">= 0")
        _check(self.eval_every >= 0, "train.eval_every", self.eval_every, ">= 0 (0 = off)")
        _check(self.early_stop_patience >= 0, "train.early_stop_patience", self.early_stop_patience, ">= 0 (0 = off)")
        _check(self.best_metric == "rsum" or "_R@" in self.best_metric, "train.best_metric", self.best_metric,
               "rsum or a recall such as text_to_image_R@1")
        _check(self.threads >= 0, "train.threads", self.threads, ">= 0")
        _check(self.grad_cache_chunk >= 0, "train.grad_cache_chunk", self.grad_cache_chunk, ">= 0 (0 = off)")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "[0, 1) (0 = off)")
        _check(self.cache_views >= 0, "train.cache_views", self.cache_views, ">= 0 (0 = off)")


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 512  # embedding batch
    ks: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self):
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")
        _check(len(self.ks) > 0 and all(k >= 1 for k in self.ks), "eval.ks", self.ks, "a list of integers >= 1")


@dataclass(frozen=True)
class BenchmarkConfig:
    """`vclr benchmark` and train.benchmark; CLIP_benchmark's defaults wherever it has one."""

    batch_size: int = 64  # CLIP_benchmark's --batch_size: figures equal its own at the same batching
    num_workers: int = 0  # image decoding workers
    recall_ks: tuple[int, ...] = (1, 5, 10)
    bootstrap: int = 1000  # resamples behind each 95% interval; 0 = no intervals
    confidence: float = 0.95
    seed: int = 0  # the bootstrap's replicates, the linear probe's init, shuffles and splits
    fewshot_k: int = -1  # linear probe: training examples per class; -1 = all
    lp_epochs: int = 10
    lp_lr: float = 0.1
    # linear probe on a dataset without a val split: this share of train picks the weight decay (0: weight decay 0)
    lp_val_proportion: float = 0.2
    failures: int = 8  # worst misses shown on each failure sheet

    def __post_init__(self):
        _check(self.batch_size >= 1, "benchmark.batch_size", self.batch_size, ">= 1")
        _check(self.bootstrap >= 0, "benchmark.bootstrap", self.bootstrap, ">= 0 (0 = no intervals)")
        _check(0 < self.confidence < 1, "benchmark.confidence", self.confidence, "in (0, 1)")
        _check(self.fewshot_k == -1 or self.fewshot_k >= 1, "benchmark.fewshot_k", self.fewshot_k, "-1 or >= 1")
        _check(0 <= self.lp_val_proportion < 1, "benchmark.lp_val_proportion", self.lp_val_proportion, "[0, 1)")
        _check(len(self.recall_ks) > 0 and all(k >= 1 for k in self.recall_ks), "benchmark.recall_ks",
               self.recall_ks, "a list of integers >= 1")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config field {key}={value!r} is out of range: must be {allowed}")


# ---------------------------------------------------------------------------------------------- building from dicts


class _RawOverride(str):
    """A command-line value, kept as typed until the field's type says how to read it."""


def _is_text_field(annotation: Any) -> bool:
    return annotation is str or typing.get_origin(annotation) is Literal


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type, converting only where it loses nothing (int -> float, list -> tuple)."""
    if isinstance(value, _RawOverride):
        # text fields take the string as typed: YAML would read `no` as False and `1e-3` as a string
        value = str(value) if _is_text_field(annotation) else yaml.safe_load(value) if value.strip() else ""
    if _is_text_field(annotation) and isinstance(value, bool):
        # a YAML file's unquoted `no`/`off`/`yes` arrive as booleans; map the one spelling our choices use
        value = {False: "no", True: "yes"}[value]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"config field {key}={value!r} is not allowed: choose one of {', '.join(choices)}")
        return value
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if isinstance(value, str):  # `eval.ks=1,5,10` from the command line
            value = [yaml.safe_load(v) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field {key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads `1e-3` as a string
            return float(value)
        except ValueError:
            pass
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation is str and value is None:
        return ""
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"config field {key}={value!r} has the wrong type: expected {annotation.__name__}, "
            f"got {type(value).__name__}"
        )
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"section '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' in {where}; "
                          f"known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{prefix}{name}' must be a mapping, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, hint)
    return cls(**kwargs)


def _apply_override(tree: dict, override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {override!r}: write it as section.key=value, e.g. optim.lr=0.001")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"bad override {override!r}: '{part}' is not a config section")
    node[parts[-1]] = _RawOverride(raw.strip())


def config_from_dict(values: dict, overrides: typing.Sequence[str] = ()) -> Config:
    tree = copy.deepcopy(values or {})
    for override in overrides:
        _apply_override(tree, override)
    return _build(Config, tree)


BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # in the wheel; `configs/` in the checkout


def builtin_configs() -> list[str]:
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file by path; else a built-in one by name (`demo`, `demo.yaml` or `configs/demo.yaml`), so that the
    documented commands work from any directory and from an installed wheel."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        builtin = BUILTIN_CONFIGS / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
        if builtin.is_file():
            return builtin
    raise ConfigError(f"config file {path} does not exist; pass a YAML file or a built-in config name "
                      f"({', '.join(builtin_configs())})")


def load_config(path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file (a path or a built-in name, if given) <- `key=value` overrides."""
    values: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_to_dict(cfg: Config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples -> lists: plain YAML/JSON


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = ["BenchmarkConfig", "Config", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig", "OptimConfig",
           "TrainConfig", "builtin_configs", "config_from_dict", "config_hash", "config_hashes", "config_to_dict",
           "load_config", "resolve_config_path", "save_config", "HASHED_FIELDS", "NEWER_FIELDS", "LOCATION_FIELDS",
           "UNHASHED_FIELDS", "LEGACY_ALWAYS_HASHED"]

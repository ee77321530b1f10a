"""The config hash: a short, stable hash of a model config that says which indexes, caches and exports it may use.

Every ModelConfig field is in exactly one of the sets below (tests/test_config.py fails until a new field is placed),
because each field is a decision: does it change what the model computes?
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

# - hashed: it changes what the model computes;
HASHED_FIELDS = {"name", "pretrained", "init_temperature", "learn_temperature", "max_logit_scale", "projector",
                 "projector_hidden_dim", "lock_image", "lock_image_unlocked_groups", "lock_image_freeze_bn",
                 "lock_text", "lock_text_unlocked_layers"}
# - hashed only away from their default: added after index manifests began recording config hashes, so an index
#   built before they existed still matches the run that built it;
NEWER_FIELDS = {"init_logit_bias", "projector_dropout", "image_pool_levels", "lora_rank", "lora_alpha", "lora_targets"}
# - hashed as "set" or "": where a model's initial tower weights were read from. The trained weights define the
#   model, not these paths, so a run moved elsewhere (its text tower then read from its own copy) keeps its hash;
LOCATION_FIELDS = {"text_tower_dir", "image_tower_weights"}
# - not hashed: training-only settings that leave the embeddings unchanged (FLIP patch dropout and LoRA dropout are off
#   in eval).
UNHASHED_FIELDS = {"patch_dropout", "lora_dropout"}
# fields that an earlier vclr hashed at every value (before they were placed above): indexes and exports it wrote
# carry that hash, which `config_hashes` still accepts
LEGACY_ALWAYS_HASHED = {"image_pool_levels", "patch_dropout"}


def config_hash(section: Any, always_hashed: frozenset[str] = frozenset()) -> str:
    """Short stable hash of a config (section); the index manifest uses the model section's. `always_hashed`: fields
    hashed at every value, as an earlier vclr did (config_hashes)."""
    values = json.loads(json.dumps(dataclasses.asdict(section)))
    for field_ in dataclasses.fields(section):
        if field_.name in always_hashed:
            continue
        if field_.name in UNHASHED_FIELDS or (field_.name in NEWER_FIELDS
                                              and getattr(section, field_.name) == field_.default):
            values.pop(field_.name)
        if field_.name in LOCATION_FIELDS and values[field_.name]:
            values[field_.name] = "set"
    blob = json.dumps(values, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_hashes(section: Any) -> tuple[str, ...]:
    """The hash this vclr records first, then the one earlier versions recorded for the same config: what an index or
    export built from it may carry."""
    return tuple(dict.fromkeys([config_hash(section), config_hash(section, frozenset(LEGACY_ALWAYS_HASHED))]))

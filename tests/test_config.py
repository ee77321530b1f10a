"""Config loading, overrides and validation; every YAML in configs/ (recursively) must load."""


import pytest
import yaml

from vclr.config import BUILTIN_CONFIGS, Config, ModelConfig, config_to_dict, load_config, save_config
from vclr.errors import ConfigError

CONFIG_FILES = sorted(BUILTIN_CONFIGS.rglob("*.yaml"))


def test_configs_dir_is_not_empty():
    assert CONFIG_FILES, "configs/ holds no YAML"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert path.read_text().startswith("# vclr "), f"{path} must start with the command that runs it"


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-3", "data.batch_size=32", "loss.triplet_negatives=all",
                             "eval.ks=1,2,3", "model.projector=true", "optim.weight_decay=0"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 32
    assert cfg.loss.triplet_negatives == "all"
    assert cfg.eval.ks == (1, 2, 3)
    assert cfg.model.projector is True
    assert cfg.optim.weight_decay == 0.0


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("data.batch_size=big", "data.batch_size='big' has the wrong type: expected int"),
    ("data.batch_size=1.5", "expected int"),
    ("model.projector=3", "expected bool"),
    ("loss.triplet_negatives=some", "choose one of hardest, all"),
    ("optim.lr=-1", "optim.lr=-1.0 is out of range"),
    ("data.batch_size=1", "data.batch_size=1 is out of range"),
    ("optim.lr", "write it as section.key=value"),
])
def test_bad_overrides_name_the_field(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown.yaml: unknown config key 'optim.learning_rate'"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=0.005", "eval.ks=1,3"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(cfg)


def test_text_fields_take_values_as_typed(tmp_path):
    # YAML 1.1 would read these as booleans; a text field keeps what the user wrote
    cfg = load_config(None, ["train.mixed_precision=no", "model.name=on", "model.pretrained=123"])
    assert cfg.train.mixed_precision == "no" and cfg.model.name == "on" and cfg.model.pretrained == "123"
    unquoted = tmp_path / "c.yaml"
    unquoted.write_text("train:\n  mixed_precision: no\n")
    assert load_config(unquoted).train.mixed_precision == "no"
    assert load_config(None, ["eval.ks=[1, 2]"]).eval.ks == (1, 2)


def test_every_model_field_decides_whether_it_enters_the_config_hash():
    """A ModelConfig field added without being placed in one of the hash sets fails here: the hash decides which
    indexes, caches and exports a model may use."""
    import dataclasses

    from vclr.config import HASHED_FIELDS, LOCATION_FIELDS, NEWER_FIELDS, UNHASHED_FIELDS

    placed = [name for fields in (HASHED_FIELDS, NEWER_FIELDS, LOCATION_FIELDS, UNHASHED_FIELDS) for name in fields]
    assert sorted(placed) == sorted(f.name for f in dataclasses.fields(ModelConfig))  # each field exactly once


def test_config_hash_follows_the_field_sets_and_accepts_earlier_records():
    import hashlib
    import json
    from dataclasses import asdict, replace

    from vclr.config import config_hash, config_hashes

    base = ModelConfig()
    assert config_hash(replace(base, patch_dropout=0.5)) == config_hash(base)  # training-only
    assert config_hash(replace(base, image_pool_levels=(2, 3))) != config_hash(base)
    assert config_hash(replace(base, text_tower_dir="/a")) == config_hash(replace(base, text_tower_dir="/b"))
    # what the previous vclr recorded: every field but the two newer ones at their default, image_pool_levels and
    # patch_dropout included
    values = json.loads(json.dumps(asdict(base)))
    values.pop("init_logit_bias"), values.pop("projector_dropout")
    for newer in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):  # fields it did not have
        values.pop(newer)
    earlier = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hashes(base) == (config_hash(base), earlier)

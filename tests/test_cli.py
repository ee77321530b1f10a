"""The CLI through main(argv): user errors are one clear line on stderr, a non-zero exit, and no traceback."""

import os

import numpy as np
import pytest
from helpers import REPO_ROOT

from vclr.cli import main
from vclr.config import BUILTIN_CONFIGS, ModelConfig, config_hash
from vclr.index.format import RetrievalIndex

CONFIG = str(BUILTIN_CONFIGS / "demo.yaml")


@pytest.fixture
def fake_index(tmp_path):
    """An index whose manifest points at a run dir that holds no model (enough for argument checks)."""
    emb = np.eye(4, dtype=np.float32)
    RetrievalIndex.build(emb, emb, np.arange(4), [f"{i}.png" for i in range(4)], [f"c{i}" for i in range(4)],
                         {"run_dir": str(tmp_path / "no-run"), "model_config_hash": config_hash(ModelConfig())}
                         ).save(tmp_path / "index")
    return tmp_path / "index"


def _assert_one_line_error(capsys, code, expected):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vclr: error:") and expected in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, expected", [
    (["search", "--index", "{index}", "--text", "   "], "text query is empty"),
    (["search", "--index", "{index}", "--text", "a red circle", "-k", "0"], "k must be an integer from 1 to 1000"),
    (["search", "--index", "{index}", "--text", "a red circle", "-k", "-3"], "k must be an integer from 1 to 1000"),
    (["search", "--index", "{tmp}/nowhere", "--text", "a red circle"], "does not exist"),
    (["search", "--index", "{index}"], "give at least one of --text, --image or --like"),
    (["search", "--index", "{index}", "--text", "x" * 1001], "limit is 1000"),
    (["search", "--index", "{index}", "--text", "x", "--where", "colour=red"], "--where has no field 'colour'"),
    (["search", "--index", "{index}", "--text", "x", "--where", "folder"], "--where takes KEY=VALUE"),
    (["search", "--index", "{index}", "--text", "x", "--after", "june"], "after must be a date such as 2024-06-01"),
    (["search", "--index", "{index}", "--image", "{tmp}/missing.jpg"], "query image"),
    (["search", "--index", "{index}", "--text", "x", "--offset", "-1"], "--offset must be from 0"),
    (["train", "--config", CONFIG, "optim.no_such_key=1"], "unknown config key 'optim.no_such_key'"),
    (["train", "--config", CONFIG, "data.batch_size=many"], "data.batch_size='many' has the wrong type"),
    (["train", "--config", "{tmp}/missing.yaml"], "does not exist"),
    (["train", "--config", CONFIG, "data.train={tmp}/nodata"], "does not exist"),
    (["eval", "--run", "{tmp}/no-run"], "has no config.yaml"),
    (["index", "--run", "{tmp}/no-run", "--out", "{tmp}/i"], "has no config.yaml"),
    (["eval", "--run", "{tmp}", "--ks", "1,x"], "--ks must be comma-separated integers"),
    (["make-synthetic", "--out", "{tmp}/s", "--train", "0"], "must be >= 1"),
    # every config section: the field, the bad value and the allowed range or choices
    (["train", "--config", CONFIG, "data.num_workers=-1"], "data.num_workers=-1 is out of range: must be >= 0"),
    (["train", "--config", CONFIG, "data.decode_on=gpu"], "data.decode_on='gpu' is not allowed: choose one of"),
    (["train", "--config", CONFIG, "data.batch_size=1"], "data.batch_size=1 is out of range: must be >= 2"),
    (["train", "--config", CONFIG, "loss.triplet_margin=3"], "loss.triplet_margin=3.0 is out of range"),
    (["train", "--config", CONFIG, "loss.triplet_negatives=some"], "choose one of hardest, all"),
    (["train", "--config", CONFIG, "loss.memory_bank_size=-5"], "loss.memory_bank_size=-5 is out of range"),
    (["train", "--config", CONFIG, "optim.lr=0"], "optim.lr=0.0 is out of range: must be > 0"),
    (["train", "--config", CONFIG, "optim.warmup_steps=5000"], "optim.warmup_steps=5000 is out of range"),
    (["train", "--config", CONFIG, "optim.beta2=1"], "optim.beta2=1.0 is out of range: must be [0, 1)"),
    (["train", "--config", CONFIG, "train.mixed_precision=fp8"], "train.mixed_precision='fp8' is not allowed"),
    (["train", "--config", CONFIG, "train.grad_cache_chunk=-2"], "train.grad_cache_chunk=-2 is out of range"),
    (["train", "--config", CONFIG, "train.compile=maybe"], "train.compile='maybe' has the wrong type"),
    (["train", "--config", CONFIG, "train.keep_checkpoints=0"], "train.keep_checkpoints=0 is out of range"),
    (["train", "--config", CONFIG, "model.init_temperature=0"], "model.init_temperature=0.0 is out of range"),
    (["train", "--config", CONFIG, "eval.ks=0,5"], "eval.ks=(0, 5) is out of range"),
    (["train", "--config", CONFIG, "nokey"], "bad override 'nokey'"),
    # command-line flags
    (["search", "--index", "{index}", "--text", "a red circle", "-k", "5000"], "k must be an integer from 1 to"),
    (["search", "--index", "{index}", "--text", "a", "-k", "five"], "argument -k: invalid int value: 'five'"),
    (["index", "--run", "{tmp}", "--out", "{tmp}/i", "--recall-target", "1.5"], "--recall-target must be in (0, 1]"),
    (["index", "--run", "{tmp}", "--out", "{tmp}/i", "--memory-budget-gb", "-1"], "--memory-budget-gb must be >= 0"),
    (["index", "--run", "{tmp}", "--out", "{tmp}/i", "--index-type", "magic"], "invalid choice: 'magic'"),
    (["index-delete", "--index", "{index}"], "nothing to delete"),
    (["index-delete", "--index", "{index}", "--image-ids", "1,two"], "--image-ids must be comma-separated integer"),
    (["index-delete", "--index", "{index}", "--image-ids", "99"], "no image with id 99"),
    (["serve", "--index", "{index}", "--port", "0"], "--port must be 1..65535"),
    (["sweep", "--grid", "optim.lr", "--out", "{tmp}/sw"], "bad --grid"),
    (["sweep", "--grid", "optim.lr=1,2", "--grid", "optim.lr=3", "--out", "{tmp}/sw"], "names optim.lr twice"),
    (["sweep", "--grid", "optim.nothing=1", "--out", "{tmp}/sw"], "unknown config key 'optim.nothing'"),
    (["prepare", "webdataset", "--shards", "{tmp}/none", "--out", "{tmp}/o"], "no .tar shards"),
    (["no-such-command"], "invalid choice: 'no-such-command'"),
])
def test_user_errors(argv, expected, tmp_path, fake_index, capsys):
    argv = [a.format(index=fake_index, tmp=tmp_path) for a in argv]
    code = None
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own checks (types, choices) exit from inside parse_args
        code = exit_.code
    _assert_one_line_error(capsys, code, expected)


def test_debug_shows_the_traceback(tmp_path):
    from vclr.errors import VclrError

    with pytest.raises(VclrError):
        main(["--debug", "search", "--index", str(tmp_path / "nowhere"), "--text", "x"])


def test_models_lists_configs(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "vclr-tiny-rn" in names and "ViT-B-32" in names


def _every_command() -> list[list[str]]:
    from vclr.cli.data_cmds import PREPARE_DATASETS
    from vclr.cli.main import COMMANDS

    commands = [[name] for name, *_ in COMMANDS] + [["prepare", name] for name in PREPARE_DATASETS]
    return [[]] + commands + [["embed"]]  # the top level, every subcommand, every prepare dataset, an alias


@pytest.mark.parametrize("command", _every_command(), ids=lambda c: " ".join(c) or "vclr")
def test_every_help_ends_with_a_runnable_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out.rstrip()
    example = out.rsplit("example:\n", 1)[1].strip()
    assert "\n" not in example  # the example is the last thing printed
    # it runs the command it documents: `vclr <command ...>` with the alias's canonical name
    expected = ["vclr", *(["index"] if command == ["embed"] else command)]
    assert example.split()[:len(expected)] == expected, example
    # and parses: the example's arguments are accepted by the parser (nothing is run)
    import shlex

    from vclr.cli.main import build_parser

    args = build_parser().parse_args(shlex.split(example)[1:])
    assert callable(args.func)


def test_config_mistakes_are_reported_before_the_run_directory(tmp_path, capsys):
    """A run dir that already holds checkpoints (say, `make demo`'s) must not hide the real mistake: bad data."""
    (tmp_path / "run" / "checkpoints" / "step_0000010").mkdir(parents=True)
    code = main(["train", "--config", CONFIG, f"data.train={tmp_path}/nodata", f"train.output_dir={tmp_path}/run"])
    _assert_one_line_error(capsys, code, f"data.train={tmp_path}/nodata does not exist")
    code = main(["train", "--config", CONFIG, f"data.train={tmp_path}", f"train.output_dir={tmp_path}/run",
                 f"model.text_tower_dir={tmp_path}/no-bert"])
    _assert_one_line_error(capsys, code, "model.text_tower_dir")
    code = main(["train", "--config", CONFIG, f"data.train={tmp_path}", f"train.output_dir={tmp_path}/run"])
    _assert_one_line_error(capsys, code, "already holds checkpoints")  # inputs fine: now the run dir speaks


def test_builtin_configs_resolve_by_name_from_any_directory():
    from vclr.config import load_config

    assert load_config("demo").model.name == load_config("configs/demo.yaml").model.name == "vclr-tiny-rn"


LOAD_SCRIPT = """
import sys
from vclr.cli.main import _setup_logging
_setup_logging(quiet=False, verbose=sys.argv[2] == "verbose")
from transformers import BertModel
BertModel.from_pretrained(sys.argv[1])  # the tiny BERT dir has a pooler the model does not use: a LOAD REPORT
"""


@pytest.mark.parametrize("mode", ["default", "verbose"])
def test_library_chatter_is_hidden_unless_verbose(tiny_hf_text_dir, mode):
    import subprocess
    import sys

    from transformers import BertForMaskedLM

    folder = tiny_hf_text_dir.parent / "bert_with_extra_head"
    if not folder.exists():  # a checkpoint with tensors BertModel does not have: transformers reports them
        BertForMaskedLM.from_pretrained(str(tiny_hf_text_dir)).save_pretrained(folder)
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(folder), mode], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(REPO_ROOT)}, check=True)
    assert ("LOAD REPORT" in out.stderr + out.stdout) == (mode == "verbose")

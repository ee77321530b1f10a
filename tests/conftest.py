import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is fetched from a hub in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent  # for the scripts/ and the sources; configs come from the package
sys.path.insert(0, str(REPO_ROOT / "scripts"))  # test helpers shared with the benchmarks (structured_vectors)


@pytest.fixture(autouse=True)
def isolated_working_dir(request, tmp_path_factory, monkeypatch):
    """Every test runs in an empty working directory of its own, with vclr's and the hub's caches in it too: what
    `make demo`, an earlier test run or a user's own runs left in the checkout cannot change a result, and no test
    writes into the checkout. A test marked `real_cache` keeps the user's caches."""
    work = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(work)
    if "real_cache" not in request.keywords:
        monkeypatch.setenv("VCLR_CACHE", str(work / ".cache" / "vclr"))
        monkeypatch.setenv("HF_HOME", str(work / ".cache" / "huggingface"))
    return work


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory):
    """A small synthetic dataset shared by the training tests."""
    from vclr.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("small_shapes"), num_train=1500, num_test=200, seed=1)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StopAfterCheckpoint(Exception):
    """A training 'killed' right after writing a checkpoint (see die_after_checkpoint)."""


def die_after_checkpoint(monkeypatch, step: int):
    """Make the trainer raise StopAfterCheckpoint right after it writes checkpoint `step`. -> the real save."""
    import vclr.train as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_die(trainer):
        path = real_save(trainer)
        if trainer.state.step == step:
            raise StopAfterCheckpoint
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    return real_save


def train_overrides(data, run, **extra):
    values = {"data.train": data / "train", "data.test": data / "test", "train.output_dir": run,
              "optim.max_steps": 150, "optim.warmup_steps": 10, "data.batch_size": 64,
              "loss.triplet_warmup_steps": 50, "train.checkpoint_every": 75, "train.max_minutes": 0}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def tiny_hf_text_dir(tmp_path_factory):
    """A randomly initialised 2-layer BERT with a word-level vocab, saved like a Hugging Face model dir."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "red", "blue", "green", "circle", "star",
             "square", "small", "large", "on", "left", "right", "top", "bottom", "at", "in", "and", "photo", "of"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch_manual_seed = __import__("torch").manual_seed
    torch_manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_lit_model_name(tmp_path_factory):
    """A LiT-shaped open_clip config (timm image tower + HF text tower) at 64 px, registered with open_clip."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("tiny_lit_config")
    config = {"embed_dim": 32,
              "vision_cfg": {"timm_model_name": "efficientnet_lite0", "timm_model_pretrained": False,
                             "timm_pool": "avg", "timm_proj": "linear", "image_size": 64},
              "text_cfg": {"hf_model_name": "tiny-bert-placeholder", "hf_tokenizer_name": "tiny-bert-placeholder",
                           "hf_proj_type": "linear", "hf_pooler_type": "mean_pooler", "context_length": 24}}
    (folder / "tiny-lit.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / "tiny-lit.json")
    return "tiny-lit"


def untrained_index(data: Path, run: Path) -> Path:
    """An index of `data` embedded by an untrained tiny model saved as a run (for tests of the service and the query
    path, not of the model): RUN and RUN_index beside it."""
    import torch
    from safetensors.torch import save_file

    from vclr.config import load_config, save_config
    from vclr.model import build_model
    from vclr.search import build_index

    cfg = load_config(None, [f"train.output_dir={run}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_config(cfg, run / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    index_dir = run.parent / f"{run.name}_index"
    build_index(run, str(data), index_dir)
    return index_dir

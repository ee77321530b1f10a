"""pytest fixtures shared by the suite: an isolated working directory for every test, and small datasets and models
built once a session. Plain helpers live in tests/helpers.py."""

import logging
import os
from pathlib import Path

import pytest
from helpers import TINY_MODEL

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is fetched from a hub in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def logging_as_it_was():
    """Every logger's level, and the root's handlers, put back after each test: the CLI (`vclr -q` sets the vclr
    logger to WARNING) and the benchmark scripts configure logging as programs do, and a later test that captures
    INFO records must not depend on which ran before it."""
    manager, root = logging.Logger.manager, logging.getLogger()
    levels = {name: lg.level for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
    root_level, handlers = root.level, list(root.handlers)
    yield
    for name, lg in list(manager.loggerDict.items()):
        if isinstance(lg, logging.Logger):
            lg.setLevel(levels.get(name, logging.NOTSET))
    root.setLevel(root_level)
    root.handlers[:] = handlers


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


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init open_clip state dict saved to a file, as a user's local checkpoint would be."""
    import open_clip
    import torch

    import vclr.model.build  # noqa: F401  (registers vclr's model configs with open_clip)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-rn.pt"
    torch.save(open_clip.create_model(TINY_MODEL).state_dict(), path)
    return path

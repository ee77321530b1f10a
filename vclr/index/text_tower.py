"""An index's own text query tower: what a cold `vclr search --text` runs, with PyTorch alone.

Building a model means importing open_clip, which imports torchvision, transformers and timm: measured 4.7 s here
before the first query, against 1.3 s for torch itself. So when an index is built, its model's text tower (tokens ->
unit vectors) is traced with TorchScript and saved inside the index with its tokenizer's settings; a text query then
loads that (0.05 s) and open_clip's BPE tokenizer module on its own (0.2 s), never the package. The traced tower is a
snapshot of the very model that embedded the index, so queries and index always agree.

    files = text_query_files(model, cfg)        # {} when the model's tokenizer is not open_clip's BPE
    encoder = TextQueryEncoder.load(index_dir)  # None for indexes without one
    vectors = encoder(["a red circle"])         # (1, D) float32, equal to the model's embed_texts

TorchScript rather than torch.export: an exported program took 1.9 s to load here, a traced module 0.04 s.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from vclr.config import Config
    from vclr.model.dual_encoder import DualEncoder

TOWER_FILE = "query_text_tower.pt"
TOKENIZER_FILE = "query_tokenizer.json"
FILES = (TOWER_FILE, TOKENIZER_FILE)
# the exported tokenizer must give the model's own tokens for these before the tower is saved
PROBES = ("a red circle", "Two  BLUE squares, at the top-left!", "café déjà vu 123", "", "x " * 200)


def _bpe_module():
    """open_clip's tokenizer module, loaded from its file without running the open_clip package's __init__."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("vclr_open_clip_bpe", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _bpe_tokenizer(settings: dict):
    return _bpe_module().SimpleTokenizer(context_length=settings["context_length"], **settings["kwargs"])


class _TextTower(torch.nn.Module):
    def __init__(self, model: DualEncoder):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, D)
        return self.model.encode_text(tokens, normalize=True)


def text_query_files(model: DualEncoder, cfg: Config) -> dict[str, bytes]:
    """The traced text tower and its tokenizer settings, as files for the index; {} when the model's tokenizer is
    not open_clip's BPE (a Hugging Face tokenizer: queries then load the model) or the exported one differs."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    from vclr.model.build import get_tokenizer

    tokenizer = get_tokenizer(cfg.model)
    if type(tokenizer) is not SimpleTokenizer:
        return {}
    # an hf-hub: model has no registered config: its tokenizer then takes no extra settings, or the probe says so
    text_cfg = (open_clip.get_model_config(cfg.model.name) or {}).get("text_cfg", {})
    settings = {"kind": "open_clip_bpe", "context_length": tokenizer.context_length,
                "kwargs": dict(text_cfg.get("tokenizer_kwargs", {}))}
    if not torch.equal(_bpe_tokenizer(settings)(list(PROBES)), tokenizer(list(PROBES))):
        return {}
    with _without_image_tower(model):
        cpu_fp32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
        # traced on CPU in float32, so that it loads anywhere; a model elsewhere is copied (its text side only)
        tower = _TextTower(model if cpu_fp32 else copy.deepcopy(model).float().cpu())
        traced = _traced_bytes(tower, tokenizer(["a photo", "two red circles at the top"]))
    return {TOWER_FILE: traced, TOKENIZER_FILE: json.dumps(settings).encode()}


@contextlib.contextmanager
def _without_image_tower(model: DualEncoder):
    """The model with its image tower swapped out for the moment: a trace (or copy) then holds the text side only."""
    visual, model.clip.visual = model.clip.visual, torch.nn.Identity()
    try:
        yield
    finally:
        model.clip.visual = visual


def _traced_bytes(tower: _TextTower, example: torch.Tensor) -> bytes:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated; nothing else loads as fast
        # shape checks inside attention become constants: the context length is fixed and the batch is traced
        # free (tested with other batch sizes)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(tower, example), buffer)
        return buffer.getvalue()


class TextQueryEncoder:
    """Texts -> unit vectors (N, D) float32 through an index's saved text tower, on the CPU."""

    def __init__(self, tower, tokenizer):
        self.tower, self.tokenizer = tower, tokenizer

    @classmethod
    def load(cls, index_dir: str | Path) -> TextQueryEncoder | None:
        index_dir = Path(index_dir)
        if not all((index_dir / name).is_file() for name in FILES):
            return None
        settings = json.loads((index_dir / TOKENIZER_FILE).read_text(encoding="utf-8"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            tower = torch.jit.load(str(index_dir / TOWER_FILE), map_location="cpu").eval()
        return cls(tower, _bpe_tokenizer(settings))

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        with torch.no_grad():
            return self.tower(self.tokenizer(list(texts))).float().numpy()  # (N, D)

"""vclr: train, index, search and evaluate image-text retrieval models.

    import vclr
    vclr.build_index(vclr.model_source(model="ViT-B-32", pretrained="vit.pt"), "photos/", "photos-index")
    index = vclr.open_index("photos-index")
    hits = index.search("golden retriever", Path("pool.jpg"), negatives=["fruit"], weights=[2, 1], k=10)
    model, cfg = vclr.open_run("vclr-demo/run")
    report = vclr.evaluate("vclr-demo/run", "vclr-demo/data/test")
    rows = vclr.bench(models=["vclr-demo/run", "ViT-B-32,vit.pt"], datasets=["shapes"], out="bench")

The names below are imported on first use (PEP 562), so `import vclr` costs nothing: `vclr --help` and a text query
through an index's traced tower stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it (and the name there, where it differs)
_EXPORTS = {
    "open_index": "vclr.search.api",
    "Index": "vclr.search.api",
    "Query": "vclr.search.query",
    "open_run": "vclr.model.source",
    "evaluate": "vclr.eval.evaluate:evaluate_run",
    "VclrError": "vclr.errors",
    "load_config": "vclr.config",
    "model_source": "vclr.model.source",
    "train": "vclr.train.loop",
    "build_index": "vclr.index.build",
    "add_to_index": "vclr.index.build",
    "delete_from_index": "vclr.index.build",
    "Searcher": "vclr.search.searcher",
    "Hit": "vclr.search.searcher",
    "DuplicateGroup": "vclr.search.duplicates",
    "search_by_text": "vclr.search.searcher",
    "evaluate_run": "vclr.eval.evaluate",
    "export_onnx": "vclr.export.onnx",
    "benchmark": "vclr.bench.matrix",
    "compare_models": "vclr.bench.matrix:compare",
}
__all__ = ["__version__", "open_index", "Index", "Query", "open_run", "evaluate", "VclrError", "load_config",
           "model_source", "train", "build_index", "add_to_index", "delete_from_index", "Searcher", "Hit",
           "DuplicateGroup", "search_by_text", "evaluate_run", "export_onnx", "benchmark", "compare_models"]

if TYPE_CHECKING:
    from vclr.bench.matrix import benchmark
    from vclr.bench.matrix import compare as compare_models
    from vclr.config import load_config
    from vclr.errors import VclrError
    from vclr.eval.evaluate import evaluate_run
    from vclr.eval.evaluate import evaluate_run as evaluate
    from vclr.export.onnx import export_onnx
    from vclr.index.build import add_to_index, build_index, delete_from_index
    from vclr.model.source import model_source, open_run
    from vclr.search.api import Index, open_index
    from vclr.search.duplicates import DuplicateGroup
    from vclr.search.query import Query
    from vclr.search.searcher import Hit, Searcher, search_by_text
    from vclr.train.loop import train


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vclr' has no attribute {name!r}")
    module, _, attribute = _EXPORTS[name].partition(":")
    value = getattr(importlib.import_module(module), attribute or name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

"""Which backend embeds a collection: the PyTorch model, or its ONNX export in fp32 or int8 (vclr.export.onnx).

    choice = choose_towers(model_source(run="runs/demo"), paths, backend="onnx", int8=True)
    build_index(source, "photos/", "indexes/photos", towers=choice.towers)      # None: PyTorch

- `torch`: the model itself.
- `onnx`: the model's ONNX export (made once, kept under the vclr cache by the model's identity and weights), run
  by onnxruntime in its own threads while the loader's workers decode. With `int8`, the quantised export, guarded
  first on the collection's own images: on a sample, the cosine between each image's int8 and fp32 (PyTorch) vectors
  and the overlap of each image's 10 nearest neighbours; below GUARD_MIN_COSINE or GUARD_MIN_OVERLAP the fp32 export
  embeds instead, and the choice says so.
- `auto`: the fastest of torch, onnx fp32 and onnx int8 (when it passes the guard), timed on the sample once per
  machine and model (kept in the cache); PyTorch for a small collection (the export would cost more than it saves),
  on CUDA, or without onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vclr.data.cache import cache_dir
from vclr.errors import ExportDisagrees, VclrError
from vclr.model.source import ModelSource, model_identity
from vclr.search.onnx import OnnxQueryEncoder
from vclr.storage import atomic_write_text

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
# The guard's bars. Measured (scripts/bench_int8.py): the demo run's int8 towers against fp32 over its 1,000 test
# images give cosines >= 0.9989 (mean 0.9997) and a top-10 overlap of 0.97, with R@1 within 0.3 point; the export's
# own check already refuses towers under 0.99 on probe inputs. Below these bars neighbours reorder visibly.
GUARD_MIN_COSINE = 0.99
GUARD_MIN_OVERLAP = 0.8
GUARD_SAMPLE = 128  # images of the collection the guard and `auto`'s timing look at (256: 12 s of ViT-B-32 on 2 cores)
AUTO_MIN_IMAGES = 1000  # below this `auto` keeps PyTorch: ViT-B-32's two exports take about a minute
TIMING_BATCH = 32


@dataclass
class BackendChoice:
    """What embeds the collection, and why."""

    backend: str  # "torch" or "onnx"
    precision: str  # "fp32" or "int8"
    towers: OnnxQueryEncoder | None = None  # None: the PyTorch model
    reason: str = ""
    guard: dict | None = None  # min_cosine, mean_cosine, top10_overlap, sample, passed
    speeds: dict = field(default_factory=dict)  # images/s of each candidate on this machine


def choose_towers(source: ModelSource, paths: list[str], loaded: tuple | None = None, *, backend: str = "auto",
                  int8: bool = False, jpeg_draft: float | None = None) -> BackendChoice:
    """Pick the towers that embed `paths` (a collection's image files) with `source`'s model. `loaded`: the model
    and config already loaded from `source` (build_index passes them: ViT-B-32 takes seconds to load)."""
    if backend not in BACKENDS:
        raise VclrError(f"`backend` {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        if int8:
            raise VclrError("int8 towers are ONNX exports: pass `backend` onnx (or auto) with `int8`")
        return BackendChoice("torch", "fp32", reason="asked for")
    if backend == "auto":
        plain = _torch_only_because(paths)
        if plain:
            return BackendChoice("torch", "fp32", reason=plain)
    model, cfg = loaded or source.load(torch.device("cpu"))
    identity = _export_identity(source, cfg)
    if backend == "onnx" and not int8:  # nothing to guard or time: no sample decoded
        return BackendChoice("onnx", "fp32", _export(source, identity, "fp32"), reason="asked for")
    pixels = _sample_pixels(model, paths, jpeg_draft)
    try:
        quantised: OnnxQueryEncoder | None = _export(source, identity, "int8")
        guard = int8_guard(_torch_vectors(model, pixels), quantised.embed_pixels(pixels))
    except ExportDisagrees as e:  # this model quantises badly everywhere (its export's own probes): fp32 then
        quantised, guard = None, {"sample": 0, "min_cosine": round(e.cosine, 5), "passed": False,
                                  "export_check": str(e)}
    if backend == "onnx":
        if guard["passed"]:
            return BackendChoice("onnx", "int8", quantised, reason="asked for; passed the guard", guard=guard)
        logger.warning("int8 towers fail the guard on this collection (%s): embedding with the fp32 export", guard)
        return BackendChoice("onnx", "fp32", _export(source, identity, "fp32"), guard=guard,
                             reason="int8 failed the guard on this collection: fp32 instead")
    return _fastest(model, source, identity, pixels, quantised, guard)


def int8_guard(fp32: np.ndarray, int8: np.ndarray, k: int = 10) -> dict:
    """int8 vectors (N, D) against fp32 ones of the same images: cosines, and how many of each image's k nearest
    neighbours (among the others) both find."""
    fp32, int8 = _unit(fp32), _unit(int8)
    cosines = (fp32 * int8).sum(1)  # (N,)
    k = min(k, len(fp32) - 1)
    overlap = 1.0
    if k > 0:
        overlap = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(_neighbours(fp32, k), _neighbours(int8, k))]))
    passed = bool(cosines.min() >= GUARD_MIN_COSINE and overlap >= GUARD_MIN_OVERLAP)
    return {"sample": len(fp32), "min_cosine": round(float(cosines.min()), 5),
            "mean_cosine": round(float(cosines.mean()), 5), "top10_overlap": round(overlap, 4), "passed": passed}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """(N, k) the k most similar other rows of each row."""
    scores = vectors @ vectors.T  # (N, N)
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _torch_only_because(paths: list[str]) -> str:
    import importlib.util

    if len(paths) < AUTO_MIN_IMAGES:
        return f"{len(paths)} images: fewer than {AUTO_MIN_IMAGES}, an export would cost more than it saves"
    if torch.cuda.is_available():
        return "a CUDA device embeds faster than any CPU backend"
    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxscript", "onnxruntime")):
        return "the ONNX backends need pip install 'vclr[onnx]'"
    return ""


def _export_identity(source: ModelSource, cfg) -> dict:
    from vclr.index.build import weights_identity

    described = source.describe()
    if described["kind"] == "open_clip" and not described.get("pretrained"):
        raise VclrError(f"`model` {described['model']} has no weights (random init: new ones at each load), so an "
                        "export of it would not be the model that indexes; give `pretrained` or use the torch backend")
    return weights_identity(model_identity(source, cfg))


def cached_export(source: ModelSource, precision: str, loaded: tuple | None = None) -> OnnxQueryEncoder:
    """`source`'s model exported at `precision` ("fp32" or "int8"), made once and kept in the vclr cache. `loaded`:
    the (model, config) already loaded from `source`."""
    _, cfg = loaded or source.load(torch.device("cpu"))
    return _export(source, _export_identity(source, cfg), precision)


def _export(source: ModelSource, identity: dict, precision: str) -> OnnxQueryEncoder:
    """The model's export at `precision`, made once and kept in the cache by the model's identity and weights."""
    from vclr.export.onnx import INT8_RECIPE, export_onnx

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    tag = f"int8r{INT8_RECIPE}" if precision == "int8" else precision  # a new recipe is a new export (and verdict)
    folder = cache_dir() / "onnx" / f"{identity['model_name'].replace('/', '_')}-{digest}-{tag}"
    refused = folder.with_name(folder.name + ".refused.json")  # an export that failed its check: not tried again
    if refused.is_file():
        record = json.loads(refused.read_text())
        raise ExportDisagrees(record["cosine"], record["message"])
    if not (folder / "export.json").is_file():
        logger.info("exporting %s as %s ONNX to %s (once)", identity["model_name"], precision, folder)
        try:
            export_onnx(source, folder, int8=precision == "int8")
        except ExportDisagrees as e:
            folder.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(refused, json.dumps({"cosine": e.cosine, "message": str(e)}))
            raise
    return OnnxQueryEncoder.load(folder, spinning=True)  # a collection's batches follow each other


def _sample_pixels(model, paths: list[str], jpeg_draft: float | None) -> np.ndarray:
    """uint8 (S, 3, H, W): up to GUARD_SAMPLE of the collection's images, spread over it, decoded as indexing does."""
    from vclr.config import DataConfig
    from vclr.data.dataset import decode_images
    from vclr.embed.embedding import image_decoder

    picks = np.linspace(0, len(paths) - 1, num=min(GUARD_SAMPLE, len(paths))).round().astype(int) if paths else []
    decoder = image_decoder(model, DataConfig.jpeg_draft if jpeg_draft is None else jpeg_draft)
    images = [image for image in decode_images([paths[i] for i in sorted(set(picks))], decoder) if image is not None]
    if not images:
        raise VclrError("no readable image in the collection to check the backend on")
    return torch.stack(images).numpy()


def _torch_vectors(model, pixels: np.ndarray) -> np.ndarray:
    from vclr.embed.embedding import encode_image_batch

    return np.concatenate([encode_image_batch(model, torch.from_numpy(pixels[i:i + 64])).numpy()
                           for i in range(0, len(pixels), 64)])


def _fastest(model, source: ModelSource, identity: dict, pixels: np.ndarray, quantised: OnnxQueryEncoder | None,
             guard: dict) -> BackendChoice:
    from vclr.embed.embedding import encode_image_batch

    key = json.dumps({"machine": machine(), "model": identity}, sort_keys=True)
    speeds = _timings().get(key)
    full = None  # the fp32 export is loaded (or made) only to be timed or used
    if speeds is None:
        full, batch = _export(source, identity, "fp32"), pixels[:TIMING_BATCH]
        speeds = {"torch": _rate(lambda: encode_image_batch(model, torch.from_numpy(batch)), len(batch)),
                  "onnx fp32": _rate(lambda: full.embed_pixels(batch), len(batch))}
        if quantised is not None:
            speeds["onnx int8"] = _rate(lambda: quantised.embed_pixels(batch), len(batch))
        _remember(key, speeds)
    allowed = {name: rate for name, rate in speeds.items() if name != "onnx int8" or guard["passed"]}
    best = max(allowed, key=allowed.get)
    if best == "onnx fp32" and full is None:
        full = _export(source, identity, "fp32")
    towers = {"torch": None, "onnx fp32": full, "onnx int8": quantised}[best]
    reason = f"the fastest here ({allowed[best]:.1f} images/s)" + ("" if guard["passed"] else
                                                                   "; int8 failed the guard on this collection")
    return BackendChoice("torch" if best == "torch" else "onnx", "int8" if best == "onnx int8" else "fp32", towers,
                         reason=reason, guard=guard, speeds=speeds)


def median_seconds(run, repeats: int = 3) -> float:
    """The median wall time of `run()` over `repeats` calls, after one call to warm up."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _rate(run, count: int, repeats: int = 3) -> float:
    return round(count / median_seconds(run, repeats), 1)


def cpu_flags() -> list[str]:
    """The CPU's vector and int8 dot-product features: what each backend's speed depends on."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp") if f in flags]


def machine() -> dict:
    """The processor, its int8 features and the cores: a timing holds for these."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return {"cpu": model, "flags": cpu_flags(), "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def _timings_file() -> Path:
    return cache_dir() / "backend-speeds.json"


def _timings() -> dict:
    try:
        return json.loads(_timings_file().read_text())
    except (OSError, ValueError):
        return {}


def _remember(key: str, speeds: dict) -> None:
    timings = _timings()
    timings[key] = speeds
    _timings_file().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_timings_file(), json.dumps(timings, indent=1))

"""Export a model's query towers as ONNX, for a search service without PyTorch (vclr.search.onnx reads them).

    export_onnx(model_source(run="vclr-demo/run"), "vclr-demo/onnx")
    export_onnx(None, "photos-onnx", index_dir="indexes/photos")       # the model an index was built with

Both towers are exported with torch.onnx's dynamo exporter, the batch dimension dynamic, in float32; `int8=True` then
quantises each tower with onnxruntime's dynamic quantisation (int8 weights per output channel, activations quantised per
batch at run time: no calibration set needed). Measured on a 2-core AVX-512 VNNI/AMX machine (scripts/bench_onnx.py),
ViT-B-32's image tower at batch 32: 50.9 images/s int8 against 22.3 for onnxruntime fp32 and 27.9 for PyTorch fp32,
cosine 0.9999 to PyTorch on random weights; unsigned int8 weights ran no faster than fp32 (no VNNI kernel for them),
onnxruntime's pre-processing step fails on these graphs, and per-channel scales cost nothing and agree slightly better
(0.99984 against 0.99977, one probe). The older TorchScript exporter was tried: it baked the traced batch size into the
attention pool of vclr's tiny ResNet (cosine 0.11 at another batch size). The tokenizer is written for Hugging Face
`tokenizers`: open_clip's BPE vocabulary and merges through transformers' CLIP converter, or the text tower's own fast
tokenizer. Before anything is written the export is checked against the PyTorch model: the tokens of a set of probe
texts must be equal, and the embeddings of texts and of images of several sizes (preprocessed the ONNX way) must reach
cosine >= MIN_COSINE.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from vclr.errors import ExportDisagrees, VclrError
from vclr.export.format import (
    FORMAT_VERSION,
    IMAGE_FILE,
    INTERPOLATIONS,
    MANIFEST,
    RESIZE_MODES,
    TEXT_FILE,
    TOKENIZER_FILE,
)
from vclr.index.text_tower import PROBES
from vclr.model.build import get_tokenizer, image_preprocess_cfg
from vclr.model.dual_encoder import DualEncoder
from vclr.model.source import ModelSource, model_identity, source_from_manifest
from vclr.search.onnx import OnnxQueryEncoder
from vclr.storage import write_directory

logger = logging.getLogger(__name__)

MIN_COSINE = 0.9999
# an int8 tower is approximate by design; below this it would reorder neighbours it should not (an index built with
# int8 vectors is guarded again on the collection itself)
MIN_COSINE_INT8 = 0.99
EXTERNAL_DATA_BYTES = 1_500_000_000  # towers larger than this keep their weights beside the graph (ONNX's 2 GB cap)


class _Tower(torch.nn.Module):
    """One tower of a dual encoder as a module of its own: tokens or normalised pixels -> unit vectors."""

    def __init__(self, model: DualEncoder, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) int64 or (B, 3, S, S) float32 -> (B, D)
        if self.modality == "text":
            return self.model.encode_text(x, normalize=True)
        return self.model.encode_image(x, normalize=True)


def export_onnx(source: ModelSource | None, out_dir: str | Path, index_dir: str | Path | None = None, *,
                int8: bool = False) -> dict:
    """Write the export folder (atomically); -> its manifest. `source` None: the model `index_dir` records. `int8`:
    quantised towers (manifest `precision` "int8"), checked against PyTorch at MIN_COSINE_INT8."""
    _check_exporter_installed()
    if source is None:
        source = index_source(index_dir)
    model, cfg = source.load(torch.device("cpu"))
    model = model.float().eval()
    image_cfg = _image_cfg(model)
    tokenizer = get_tokenizer(cfg.model)
    tokenizer_json = _tokenizer_json(tokenizer)
    identity = model_identity(source, cfg)
    manifest = {"format_version": FORMAT_VERSION, **identity, "embed_dim": int(model.embed_dim),
                "context_length": int(tokenizer.context_length), "image": image_cfg,
                "precision": "int8" if int8 else "fp32"}
    out_dir = Path(out_dir)

    def write_files(tmp: Path) -> None:
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        tokens = tokenizer(["a photo", "two red circles at the top"])  # (2, L)
        pixels = torch.randn(2, 3, image_cfg["size"], image_cfg["size"])
        for modality, example, name in (("text", tokens, TEXT_FILE), ("image", pixels, IMAGE_FILE)):
            path = tmp / "fp32" / name if int8 else tmp / name  # an int8 tower is quantised from its fp32 export
            path.parent.mkdir(exist_ok=True)
            _export_tower(_Tower(model, modality).eval(), example, path, "tokens" if modality == "text" else "pixels")
            if int8:
                quantize_tower(path, tmp / name)
                shutil.rmtree(path.parent)
        (tmp / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")  # the check below loads the folder
        manifest["min_cosine"] = _check(model, tokenizer, tmp, MIN_COSINE_INT8 if int8 else MIN_COSINE)

    manifest = write_directory(out_dir, write_files, MANIFEST, manifest)
    logger.info("exported %s to %s (cosine to PyTorch >= %.6f)", manifest["model_name"], out_dir,
                manifest["min_cosine"])
    return {**manifest, "model": manifest["model_name"]}


def _check_exporter_installed() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise VclrError(f"the ONNX export needs {', '.join(missing)}: pip install 'vclr[onnx]'")


def index_source(index_dir: str | Path | None) -> ModelSource:
    from vclr.index.format import RetrievalIndex

    if index_dir is None:
        raise VclrError("name the model to export: `run`, `model` (with `pretrained`), or an `index_dir` whose model "
                        "it is")
    source = source_from_manifest(RetrievalIndex.load(index_dir, verify=False).manifest, index_dir)
    if source is None:
        raise VclrError(f"the index {index_dir} records no model: give `run` or `model`")
    return source


def _image_cfg(model: DualEncoder) -> dict:
    """open_clip's eval preprocessing for the model, in the terms vclr.search.onnx reproduces (or a clear refusal)."""
    cfg = image_preprocess_cfg(model)
    resize_mode, interpolation = cfg.get("resize_mode") or "shortest", cfg.get("interpolation") or "bicubic"
    if resize_mode not in RESIZE_MODES or interpolation not in INTERPOLATIONS:
        raise VclrError(f"the model's image preprocessing (resize mode {resize_mode!r}, interpolation "
                        f"{interpolation!r}) cannot be exported yet: the ONNX path reproduces resize modes "
                        f"{', '.join(RESIZE_MODES)} with {', '.join(INTERPOLATIONS)} interpolation")
    return {"size": int(cfg["size"]), "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]],
            "resize_mode": resize_mode, "interpolation": interpolation}


def _tokenizer_json(tokenizer) -> str:
    """The model's tokenizer as a `tokenizers` JSON that pads and truncates to its context length."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    length = tokenizer.context_length
    if type(tokenizer) is SimpleTokenizer:
        from transformers import CLIPTokenizerFast

        # open_clip's vocabulary and merges through transformers' converter: the same byte-level BPE, lower-casing
        # normaliser and pre-tokenising pattern; open_clip pads with id 0
        merges = [pair for pair, _ in sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])]
        fast = CLIPTokenizerFast(vocab=dict(tokenizer.encoder), merges=merges, bos_token="<start_of_text>",
                                 eos_token="<end_of_text>", unk_token="<end_of_text>", pad_token="<end_of_text>")
        backend, pad_id = fast.backend_tokenizer, 0
    elif isinstance(tokenizer, HFTokenizer) and hasattr(tokenizer.tokenizer, "backend_tokenizer"):
        backend, pad_id = tokenizer.tokenizer.backend_tokenizer, tokenizer.tokenizer.pad_token_id
    else:
        raise VclrError(f"the model's tokenizer ({type(tokenizer).__name__}) cannot be exported: the ONNX path needs "
                        "open_clip's BPE tokenizer or a Hugging Face fast tokenizer")
    from tokenizers import Tokenizer

    exported = Tokenizer.from_str(backend.to_str())  # a copy: the model's own tokenizer is left as it was
    exported.enable_truncation(max_length=length)
    exported.enable_padding(pad_id=pad_id, length=length)
    return exported.to_str()


def _export_tower(tower: _Tower, example: torch.Tensor, path: Path, input_name: str) -> None:
    large = sum(p.numel() * p.element_size() for p in tower.parameters()) > EXTERNAL_DATA_BYTES
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), _quiet():
        torch.onnx.export(tower, (example,), str(path), dynamo=True, input_names=[input_name],
                          output_names=["embeddings"], dynamic_shapes=({0: batch},), external_data=large,
                          verbose=False)


def quantize_tower(fp32: Path, out: Path) -> None:
    """Write the dynamically quantised int8 twin of an fp32 tower (signed weights: the operand of the VNNI, AMX and
    ARM dot-product kernels; unsigned ones measured 2.3x slower)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = (fp32.parent / f"{fp32.name}.data").exists()  # the exporter kept the weights beside the graph
    # onnxruntime.quantization advises pre-processing on the root logger ("": it fails on these graphs)
    with _quiet(("",)):
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=large)


@contextlib.contextmanager
def _quiet(names: tuple[str, ...] = ("onnxscript", "torch.onnx", "onnx_ir")):
    """The dynamo exporter prints its progress and onnxscript logs its optimiser's notes (the default `names`; "" is
    the root logger): vclr says what matters."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check(model: DualEncoder, tokenizer, folder: Path, min_cosine: float) -> float:
    """The export against the PyTorch model: equal tokens on the probes, cosine >= `min_cosine` on texts and on images
    of several sizes and shapes (preprocessed the ONNX way and the PyTorch way). -> the smallest cosine."""
    from PIL import Image

    from vclr.embed.embedding import embed_pil_images

    encoder = OnnxQueryEncoder.load(folder)  # the folder as the service will load it (its manifest has no files yet)
    texts = list(PROBES) + ["a photo of a dog", "Two BLUE squares &amp; a circle"]
    expected = tokenizer(texts).numpy()
    got = encoder.tokenize(texts)
    if not np.array_equal(expected, got):
        row = int(np.flatnonzero((expected != got).any(axis=1))[0])
        raise VclrError(f"the exported tokenizer differs from the model's on {texts[row]!r}; this tokenizer cannot be "
                        "exported yet")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              ((64, 64), (97, 150), (300, 180), (224, 224))]
    with torch.no_grad():
        text_reference = model.encode_text(torch.as_tensor(expected), normalize=True).numpy()
    cosines = [(encoder.embed_texts(texts) * text_reference).sum(1),
               (encoder.embed_images(images) * embed_pil_images(model, images)).sum(1)]
    lowest = float(min(c.min() for c in cosines))
    if lowest < min_cosine:
        raise ExportDisagrees(lowest, f"the ONNX export disagrees with the PyTorch model (cosine {lowest:.6f} < "
                              f"{min_cosine}); nothing was written")
    return lowest

"""Export a model's query towers as ONNX, for a search service without PyTorch (vclr.search.onnx reads them).

    export_onnx(model_source(run="vclr-demo/run"), "vclr-demo/onnx")
    export_onnx(None, "photos-onnx", index_dir="indexes/photos")       # the model an index was built with

Both towers are exported with torch.onnx's dynamo exporter, the batch dimension dynamic, in float32, each
self-attention block as onnxruntime's fused `Attention` node (vclr.export.attention); `int8=True` then quantises each
tower with onnxruntime's dynamic quantisation (int8 weights per output channel, activations quantised per batch at run
time: no calibration set needed) of its per-token matrix products only (QUANTIZED_OPS; convolutions and projection
heads stay fp32). Measured on a 2-core AVX-512 VNNI machine (scripts/bench_onnx.py, 2026-12-06), ViT-B-32's image
tower at batch 32: 57.9 images/s int8 against 20.1 for onnxruntime fp32 and 16.5 for PyTorch fp32, cosine 0.99994 to
PyTorch on random weights (every op quantised and attention unfused, the same session: 39.4); unsigned int8 weights
ran no faster than fp32 (no VNNI kernel for them), onnxruntime's pre-processing step fails on these graphs, and
per-channel scales cost nothing and agree slightly better (0.99984 against 0.99977, one probe). The older
TorchScript exporter was tried: it baked the traced batch size into the attention pool of vclr's tiny ResNet (cosine
0.11 at another batch size). The tokenizer is written for Hugging Face
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
from vclr.export.attention import TRANSLATIONS as ATTENTION_TRANSLATIONS
from vclr.export.attention import fused_attention
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
# What int8 quantises: the matrix products and embedding tables, not convolutions. onnxruntime's ConvInteger has no
# VNNI kernel: ViT-B-32's patch embedding took 219 ms of a batch of 32 in int8 against 49 ms in fp32 (39.4 against
# 46.8 images/s for the whole tower, AVX-512 VNNI, same session; 54.6 with attention fused too), and int8
# convolutions made EfficientNet-Lite0 slower and lossy (cosine 0.49, image->text R@1 -1.2 points on OpenMoji).
# INT8_RECIPE names this choice in the manifest and the cache.
QUANTIZED_OPS = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization", "LSTM")  # of its dynamic registry
INT8_RECIPE = 3  # 1: every op onnxruntime quantises; 2: QUANTIZED_OPS; 3: QUANTIZED_OPS but projection heads
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
                "precision": "int8" if int8 else "fp32",
                **({"int8_recipe": INT8_RECIPE} if int8 else {})}
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
    with torch.no_grad(), _quiet(), fused_attention(tower, example) as fused:
        torch.onnx.export(fused, (example,), str(path), dynamo=True, input_names=[input_name],
                          output_names=["embeddings"], dynamic_shapes=({0: batch},), external_data=large,
                          custom_translation_table=ATTENTION_TRANSLATIONS, verbose=False)


def quantize_tower(fp32: Path, out: Path) -> None:
    """Write the dynamically quantised int8 twin of an fp32 tower: its per-token matrix products (QUANTIZED_OPS, not
    those on pooled vectors: see _pooled_products) in int8 with signed weights (the operand of the VNNI, AMX and ARM
    dot-product kernels; unsigned ones measured 2.3x slower), its convolutions in fp32 (see QUANTIZED_OPS)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = (fp32.parent / f"{fp32.name}.data").exists()  # the exporter kept the weights beside the graph
    # onnxruntime.quantization advises pre-processing on the root logger ("": it fails on these graphs)
    with _quiet(("",)):
        quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=_pooled_products(fp32),
                         use_external_data_format=large)


def _pooled_products(path: Path) -> list[str]:
    """The matrix products of a tower that act on pooled (B, E) vectors rather than on every token or pixel: its
    projection heads. They are a sliver of the work and feed the embedding directly, and per-batch activation scales
    fit them badly (a concatenation of features of different scales): the LiT image tower's one projection, quantised,
    cost 1.0 point of image->text R@1 on OpenMoji (cosine 0.968)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False)).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    pooled = [node.name for node in graph.node
              if node.op_type == "Gemm" or (node.op_type == "MatMul" and ranks.get(node.input[0], 3) <= 2)]
    # the quantiser first rewrites each Gemm as a MatMul named after it (and an Add): exclude that name too
    return pooled + [f"{name}_MatMul" for name in pooled]


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

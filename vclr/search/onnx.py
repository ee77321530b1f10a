"""Queries answered through an ONNX export, with onnxruntime, `tokenizers`, PIL and numpy: no PyTorch.

    encoder = OnnxQueryEncoder.load("vclr-demo/onnx")          # written by `vclr export --format onnx`
    vectors = encoder.embed_texts(["a red circle"])            # (1, D) float32 unit vectors
    vectors = encoder.embed_images([pil_image])                # (1, D)
    searcher = Searcher.open("vclr-demo/index", encoder=encoder)

The export folder's layout is vclr.export.format's.

Text is cleaned as open_clip's tokenizers clean it (ftfy, HTML entities, whitespace) before `tokenizers` encodes it;
images get open_clip's eval preprocessing (resize the short side, centre crop; or squash) with PIL, as torchvision
does it on PIL images. The export checks both against the PyTorch model before it is written.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vclr.errors import VclrError
from vclr.export.format import FORMAT_VERSION, IMAGE_FILE, MANIFEST, TEXT_FILE, TOKENIZER_FILE
from vclr.storage import directory_problem


def clean_text(text: str) -> str:
    """open_clip's tokenizer cleaning (ftfy, HTML entities unescaped twice, whitespace collapsed); lower-casing is
    the tokenizer's own normaliser where the model's tokenizer lower-cases."""
    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


def preprocess_image(image, cfg: dict) -> np.ndarray:
    """A decoded RGB PIL image -> (3, S, S) float32, normalised: open_clip's eval transform, computed as torchvision
    computes it on PIL images (Resize of the short side to S, CenterCrop to S; or a squash to S x S)."""
    from PIL import Image

    size = cfg["size"]
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[cfg["interpolation"]]
    if cfg["resize_mode"] == "squash":
        image = image.resize((size, size), resample)
    else:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)  # torchvision truncates the long side
        new_size = (size, new_long) if width <= height else (new_long, size)
        if new_size != image.size:
            image = image.resize(new_size, resample)
        left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
    return normalize(np.asarray(image).transpose(2, 0, 1), cfg)  # (3, S, S)


def normalize(pixels, cfg: dict) -> np.ndarray:
    """uint8 (..., 3, S, S), 0..255 -> float32 normalised with the export's mean and std."""
    mean = np.asarray(cfg["mean"], dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg["std"], dtype=np.float32).reshape(3, 1, 1)
    return (np.asarray(pixels, dtype=np.float32) / np.float32(255) - mean) / std  # as torchvision's, in float32


class OnnxQueryEncoder:
    """Texts and images -> unit vectors through an export's ONNX towers (the service's `--backend onnx`)."""

    def __init__(self, folder: Path, manifest: dict, text_session, image_session, tokenizer):
        self.folder, self.manifest = folder, manifest
        self.text_session, self.image_session, self.tokenizer = text_session, image_session, tokenizer

    @classmethod
    def load(cls, folder: str | Path, threads: int = 0, spinning: bool = False) -> OnnxQueryEncoder:
        """`threads`: onnxruntime's intra-op threads (0: its default, one per core). `spinning`: let them spin
        between runs (embedding a collection batch after batch: ViT-B-32 int8 ran 18% faster on 2 cores)."""
        import onnxruntime
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise VclrError(f"{folder} is not a vclr ONNX export (no {MANIFEST}); write one with `vclr export` "
                            "(format onnx) first")
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format_version") != FORMAT_VERSION:
            raise VclrError(f"{folder}: ONNX export format {manifest.get('format_version')} is not the one this vclr "
                            f"reads ({FORMAT_VERSION}); export the model again")
        problem = directory_problem(folder, MANIFEST, manifest=manifest)
        if problem:
            raise VclrError(f"{folder}: {problem}; the export is damaged, export the model again")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        # onnxruntime's threads spin between runs by default: on a small machine that takes the cores from the
        # HTTP loop (measured with scripts/bench_serve.py: 406 queries/s at 8 clients spinning, against 525 for torch)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        providers = ["CPUExecutionProvider"]
        sessions = [onnxruntime.InferenceSession(str(folder / name), options, providers=providers)
                    for name in (TEXT_FILE, IMAGE_FILE)]
        return cls(folder, manifest, *sessions, Tokenizer.from_file(str(folder / TOKENIZER_FILE)))

    @property
    def embed_dim(self) -> int:
        return self.manifest["embed_dim"]

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """(N, L) int64 token ids, as the model's own tokenizer gives them."""
        encodings = self.tokenizer.encode_batch([clean_text(t) for t in texts])
        return np.asarray([e.ids for e in encodings], dtype=np.int64)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.embed_dim), np.float32)
        return self.text_session.run(None, {"tokens": self.tokenize(texts)})[0]  # (N, D)

    def embed_images(self, images: Sequence) -> np.ndarray:
        """Decoded RGB PIL images -> (N, D)."""
        if not len(images):
            return np.zeros((0, self.embed_dim), np.float32)
        pixels = np.stack([preprocess_image(image, self.manifest["image"]) for image in images])  # (N, 3, S, S)
        return self.image_session.run(None, {"pixels": pixels})[0]

    @property
    def precision(self) -> str:
        return self.manifest.get("precision", "fp32")  # exports before int8 existed were fp32

    def embed_pixels(self, batch) -> np.ndarray:
        """uint8 (B, 3, S, S) images already resized and cropped (a collection's loader: vclr.embed) -> (B, D)."""
        return self.image_session.run(None, {"pixels": normalize(batch, self.manifest["image"])})[0]  # (B, 3, S, S)

    def reopen(self, old, new) -> OnnxQueryEncoder:
        """The export fits a new save of the index when it fits its model (a clear error otherwise)."""
        self.check_index(new)
        return self

    def check_index(self, index) -> None:
        """A clear error when the index (a RetrievalIndex) was built with another model than this one."""
        index.check_model(self.embed_dim, self.manifest["model_config_hash"],
                          remedy=f"the ONNX export in {self.folder} is of {self.manifest['model_name']}: export the "
                                 "index's model with `vclr export --index DIR --format onnx --out DIR`")

"""Single-query latency of the two query backends: PyTorch (the service's torch backend) against the ONNX export.

    python scripts/bench_onnx.py                                   # vclr-tiny-rn and ViT-B-32, random init
    python scripts/bench_onnx.py --models ViT-B-32 --repeats 50

For each model config (random-init: the cost does not depend on the weights): export it (`vclr export`), then time
one text query (tokenizing included) and one image query (a decoded 256x256 image, preprocessing included), each the
median of `--repeats`, through
- torch: the index's traced text tower (vclr.index.text_tower, what `vclr serve` runs for text) and the model's image
  tower (vclr.embed.embedding), and the model's own eager `encode_text` as a second reference;
- onnx: vclr.search.onnx (onnxruntime, `tokenizers`, PIL), what `vclr serve --backend onnx` runs.
The int8 export (`vclr export --int8`) is timed beside them, and each tower's images/s on a batch of `--batch`
preprocessed images (the tower alone) for PyTorch fp32, onnxruntime fp32 and int8, with the CPU's int8 features.
The cosine between the backends' vectors is reported too. One JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def median_ms(fn, repeats: int) -> float:
    from vclr.export.backends import median_seconds

    return round(median_seconds(fn, repeats) * 1000, 2)


def bench(model_name: str, repeats: int, folder: Path, batch: int = 32) -> dict:
    import torch
    from PIL import Image

    from vclr.embed.embedding import embed_pil_images, embed_texts
    from vclr.export.backends import cpu_flags
    from vclr.export.onnx import export_onnx
    from vclr.index.text_tower import TOKENIZER_FILE, TOWER_FILE, TextQueryEncoder, text_query_files
    from vclr.model.source import model_source
    from vclr.search.onnx import OnnxQueryEncoder

    source = model_source(model=model_name)
    torch.manual_seed(0)  # random-init weights: the export loads the model again, and must get the same ones
    model, cfg = source.load(torch.device("cpu"))
    torch.manual_seed(0)
    started = time.perf_counter()
    export_onnx(source, folder / "onnx")
    export_s = time.perf_counter() - started
    for name, content in text_query_files(model, cfg).items():  # what an index keeps for text queries
        (folder / name).write_bytes(content)
    traced = TextQueryEncoder.load(folder) if (folder / TOWER_FILE).is_file() and (folder / TOKENIZER_FILE).is_file() \
        else None
    torch.manual_seed(0)
    export_onnx(source, folder / "int8", int8=True)
    onnx, int8 = OnnxQueryEncoder.load(folder / "onnx"), OnnxQueryEncoder.load(folder / "int8")
    text = ["a dog running on a beach at sunset"]
    image = [Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))]
    size = onnx.manifest["image"]["size"]
    pixels = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)  # (B, 3, S, S)

    def per_s(fn) -> float:  # images/s of a batch through the tower alone (no decoding, no preprocessing)
        return round(batch / median_ms(fn, max(2, repeats // 10)) * 1000, 1)

    with torch.no_grad():
        torch_batch = per_s(lambda: model.encode_image(torch.from_numpy(pixels)))
    line = {"bench": "onnx_query", "model": model_name, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_flags": cpu_flags(), "export_s": round(export_s, 1),
            "text_ms": {"torch_traced": median_ms(lambda: traced(text), repeats) if traced else None,
                        "torch_eager": median_ms(lambda: embed_texts(model, cfg, text), repeats),
                        "onnx": median_ms(lambda: onnx.embed_texts(text), repeats),
                        "onnx_int8": median_ms(lambda: int8.embed_texts(text), repeats)},
            "image_ms": {"torch": median_ms(lambda: embed_pil_images(model, image), repeats),
                         "onnx": median_ms(lambda: onnx.embed_images(image), repeats),
                         "onnx_int8": median_ms(lambda: int8.embed_images(image), repeats)},
            f"image_tower_batch{batch}_per_s": {
                "torch": torch_batch, "onnx": per_s(lambda: onnx.image_session.run(None, {"pixels": pixels})),
                "onnx_int8": per_s(lambda: int8.image_session.run(None, {"pixels": pixels}))},
            "cosine": {"text": float((onnx.embed_texts(text) * embed_texts(model, cfg, text)).sum()),
                       "image": float((onnx.embed_images(image) * embed_pil_images(model, image)).sum()),
                       "int8_text": float((int8.embed_texts(text) * embed_texts(model, cfg, text)).sum()),
                       "int8_image": float((int8.embed_images(image) * embed_pil_images(model, image)).sum())}}
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vclr-tiny-rn,ViT-B-32")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32, help="images a batch for the towers' throughput")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    for model_name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            line = bench(model_name, args.repeats, Path(tmp), args.batch)
        print(json.dumps(line), flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

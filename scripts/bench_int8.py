"""Retrieval quality through int8 towers against fp32, on a trained run and its captioned test set.

    python scripts/bench_int8.py --run vclr-demo/run --data vclr-demo/data/shapes/test

Embeds the test set three ways: the PyTorch model (fp32), its ONNX export in fp32 and in int8 (what `vclr index
--backend onnx [--int8]` runs; exports made once and cached), then reports recall@1/5/10 both ways for each (vclr's
metric code), the int8 guard's figures over the whole set (cosine to PyTorch, overlap of each image's 10 nearest
neighbours) and whether the guard would pass. "by_tower": each tower quantised alone (the other kept in fp32),
its lowest cosine to the fp32 export and the recall it gives, so a model whose whole int8 export is refused (its check
at MIN_COSINE_INT8) still shows which tower keeps its recall through int8. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from vclr.data.folder import load_collection
from vclr.embed.embedding import Embeddings, embed_image_paths, embed_table
from vclr.errors import ExportDisagrees
from vclr.eval.metrics import retrieval_metrics
from vclr.export.backends import cached_export, cpu_flags, int8_guard
from vclr.export.format import IMAGE_FILE, TEXT_FILE
from vclr.export.onnx import quantize_tower
from vclr.model.source import model_source
from vclr.search.onnx import OnnxQueryEncoder


def _rounded(metrics: dict) -> dict:
    return {k: round(float(v), 2) for k, v in metrics.items()}


def by_tower(model, cfg, fp32: OnnxQueryEncoder, reference: Embeddings, batch: int) -> dict:
    """Each tower of the fp32 export quantised alone (as the int8 export quantises it), the other kept in fp32: the
    tower's lowest cosine to the fp32 export's `reference` vectors and the recall of the pair. Only the quantised
    tower runs again; the other modality's vectors are the reference's."""
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for modality, name in (("text", TEXT_FILE), ("image", IMAGE_FILE)):
            quantize_tower(Path(fp32.folder) / name, Path(tmp) / name)
            quantised = onnxruntime.InferenceSession(str(Path(tmp) / name), providers=["CPUExecutionProvider"])
            sessions = {"text": fp32.text_session, "image": fp32.image_session, modality: quantised}
            mixed = OnnxQueryEncoder(fp32.folder, fp32.manifest, sessions["text"], sessions["image"], fp32.tokenizer)
            images, texts = reference.image_embeddings, reference.text_embeddings
            if modality == "text":  # batches as embed_table's: dynamic int8 scales its activations per batch
                texts = np.concatenate([mixed.embed_texts(reference.texts[start:start + batch])
                                        for start in range(0, len(reference.texts), batch)])
                own, vectors = reference.text_embeddings, texts
            else:
                images, _ = embed_image_paths(model, reference.image_paths, batch, cfg.data.num_workers,
                                              jpeg_draft=cfg.data.jpeg_draft, towers=mixed)
                own, vectors = reference.image_embeddings, images
            figures[f"{modality} int8"] = {
                "min_cosine": round(float(np.min((vectors * own).sum(1))), 4),
                "recall": _rounded(retrieval_metrics(images, texts, reference.caption_image))}
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a vclr run (its final weights)")
    parser.add_argument("--checkpoint", default="final")
    parser.add_argument("--data", required=True, help="a captioned test set (a prepared dataset or a folder)")
    parser.add_argument("--batch", type=int, default=64, help="images a batch (large inputs need smaller ones)")
    args = parser.parse_args(argv)
    from bench_embed import git_commit

    source = model_source(run=args.run, checkpoint=args.checkpoint)
    model, cfg = source.load(torch.device("cpu"))
    table = load_collection(args.data, cfg.data.image_column, cfg.data.caption_columns)
    line = {"bench": "int8_quality", "run": args.run, "data": args.data, "images": len(table),
            "cpu_flags": cpu_flags(), "recall": {}, "seconds": {}}
    embeddings, exports = {}, {}
    for name, precision in (("torch fp32", None), ("onnx fp32", "fp32"), ("onnx int8", "int8")):
        try:
            exports[name] = cached_export(source, precision, (model, cfg)) if precision else None
        except ExportDisagrees as e:  # the whole int8 export fails its own check: by_tower says which tower
            line["recall"][name] = {"refused": str(e)}
            continue
        started = time.perf_counter()
        emb = embed_table(model, cfg, table, args.batch, towers=exports[name])
        line["seconds"][name] = round(time.perf_counter() - started, 1)
        line["recall"][name] = _rounded(retrieval_metrics(emb.image_embeddings, emb.text_embeddings,
                                                          emb.caption_image))
        embeddings[name] = emb
    vectors = {name: emb.image_embeddings for name, emb in embeddings.items()}
    if "onnx int8" in vectors:
        line["guard"] = int8_guard(vectors["torch fp32"], vectors["onnx int8"])
        r1 = {name: (m["image_to_text_R@1"], m["text_to_image_R@1"]) for name, m in line["recall"].items()}
        line["r1_drop_int8"] = [round(a - b, 2) for a, b in zip(r1["torch fp32"], r1["onnx int8"])]
    line["min_image_cosine_fp32_export"] = round(float(np.min((vectors["onnx fp32"] * vectors["torch fp32"]).sum(1))),
                                                6)
    line["by_tower"] = by_tower(model, cfg, exports["onnx fp32"], embeddings["onnx fp32"], args.batch)
    line["commit"] = git_commit()
    print(json.dumps(line))


if __name__ == "__main__":
    main()

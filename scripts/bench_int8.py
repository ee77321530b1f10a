"""Retrieval quality through int8 towers against fp32, on a trained run and its captioned test set.

    python scripts/bench_int8.py --run vclr-demo/run --data vclr-demo/data/shapes/test

Embeds the test set three ways: the PyTorch model (fp32), its ONNX export in fp32 and in int8 (what `vclr index
--backend onnx [--int8]` runs; exports made once and cached), then reports recall@1/5/10 both ways for each (vclr's
metric code), the int8 guard's figures over the whole set (cosine to PyTorch, overlap of each image's 10 nearest
neighbours) and whether the guard would pass. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from vclr.data.folder import load_collection
from vclr.embed.embedding import embed_table
from vclr.eval.metrics import retrieval_metrics
from vclr.export.backends import cached_export, cpu_flags, int8_guard
from vclr.model.source import model_source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a vclr run (its final weights)")
    parser.add_argument("--checkpoint", default="final")
    parser.add_argument("--data", required=True, help="a captioned test set (a prepared dataset or a folder)")
    args = parser.parse_args(argv)
    from bench_embed import git_commit

    source = model_source(run=args.run, checkpoint=args.checkpoint)
    model, cfg = source.load(torch.device("cpu"))
    table = load_collection(args.data, cfg.data.image_column, cfg.data.caption_columns)
    line = {"bench": "int8_quality", "run": args.run, "data": args.data, "images": len(table),
            "cpu_flags": cpu_flags(), "recall": {}, "seconds": {}}
    vectors = {}
    for name, towers in (("torch fp32", None), ("onnx fp32", cached_export(source, "fp32", (model, cfg))),
                         ("onnx int8", cached_export(source, "int8", (model, cfg)))):
        started = time.perf_counter()
        emb = embed_table(model, cfg, table, towers=towers)
        line["seconds"][name] = round(time.perf_counter() - started, 1)
        metrics = retrieval_metrics(emb.image_embeddings, emb.text_embeddings, emb.caption_image)
        line["recall"][name] = {k: round(float(v), 2) for k, v in metrics.items()}
        vectors[name] = emb.image_embeddings
    line["guard"] = int8_guard(vectors["torch fp32"], vectors["onnx int8"])
    r1 = {name: (m["image_to_text_R@1"], m["text_to_image_R@1"]) for name, m in line["recall"].items()}
    line["r1_drop_int8"] = [round(a - b, 2) for a, b in zip(r1["torch fp32"], r1["onnx int8"])]
    line["min_image_cosine_fp32_export"] = round(float(np.min((vectors["onnx fp32"] * vectors["torch fp32"]).sum(1))),
                                                6)
    line["commit"] = git_commit()
    print(json.dumps(line))


if __name__ == "__main__":
    main()

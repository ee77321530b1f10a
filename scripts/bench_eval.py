"""Exact retrieval evaluation at scale: seconds and peak memory of recall@k both ways, one JSON line per case.

    python scripts/bench_eval.py                          # coco5k (25k captions x 5k images) and 1M x 200k
    python scripts/bench_eval.py --cases coco5k --d 512

Embeddings are synthetic unit vectors, 5 captions per image, each caption near its image (so ranks spread over
1..N). Each case runs in its own process so that its peak resident memory (ru_maxrss) is its own. The evaluator is
`vclr.eval.metrics.retrieval_metrics`: exact, blocked to ~1 GiB of scores at a time, never the dense matrix (the
1M x 200k one alone would be 800 GB in float32).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

CASES = {"coco5k": (5_000, 5), "large": (200_000, 5), "smoke": (200, 5)}  # images, captions per image (smoke: the test)


def synthetic_embeddings(images: int, per_image: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image_embeddings = rng.standard_normal((images, d), dtype=np.float32)
    image_embeddings /= np.linalg.norm(image_embeddings, axis=1, keepdims=True)
    caption_image = np.repeat(np.arange(images), per_image)
    text_embeddings = np.empty((len(caption_image), d), dtype=np.float32)
    for start in range(0, len(caption_image), 100_000):  # in chunks: no second full-size temporary
        stop = min(start + 100_000, len(caption_image))
        chunk = image_embeddings[caption_image[start:stop]] + 0.35 * rng.standard_normal((stop - start, d),
                                                                                         dtype=np.float32)
        text_embeddings[start:stop] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return image_embeddings, text_embeddings, caption_image


def run_case(name: str, d: int) -> dict:
    from vclr.eval.metrics import retrieval_metrics

    images, per_image = CASES[name]
    start = time.perf_counter()
    image_embeddings, text_embeddings, caption_image = synthetic_embeddings(images, per_image, d)
    data_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = retrieval_metrics(image_embeddings, text_embeddings, caption_image, (1, 5, 10))
    eval_s = time.perf_counter() - start
    return {"bench": "eval", "case": name, "images": images, "captions": len(text_embeddings), "d": d,
            "eval_s": round(eval_s, 1), "data_s": round(data_s, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
            "embeddings_gb": round((image_embeddings.nbytes + text_embeddings.nbytes) / 1e9, 2),
            "dense_matrix_gb": round(images * len(text_embeddings) * 4 / 1e9, 1),
            "scores_per_s": round(2 * images * len(text_embeddings) / eval_s / 1e9, 2),  # billions, both ways
            **{k: round(v, 3) for k, v in metrics.items() if "R@" in k or k == "rsum"}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="coco5k,large")
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.d)), flush=True)
        return
    for name in args.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--d", str(args.d)], text=True,
                              capture_output=True)
        if proc.returncode != 0:
            raise SystemExit(f"case {name} failed:\n{proc.stderr[-2000:]}")
        print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

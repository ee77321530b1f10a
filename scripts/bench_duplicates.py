"""Near-duplicate search at scale: `vclr duplicates` over an index of N structured vectors with planted copies.

    python scripts/bench_duplicates.py --n 1000000 --d 512 --planted 2000 --subset 50000

Builds an index (vclr's automatic kind choice: an ANN index at this size) of N CLIP-like vectors
(vclr.data.synthetic_vectors) of which `planted` are near-copies of others (cosine to their original drawn from
[0.98, 0.995], as resized or re-encoded photos score under real models), then times the whole command `vclr
duplicates --index DIR --threshold T --json` in a child process, with its peak memory. Quality: the share of planted
pairs found, and on a random subset of `subset` images (planted pairs kept whole) the recall of every pair >= T
against an exact scan of that subset, timed as the reference. One JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vclr.data.synthetic_vectors import structured_pairs
from vclr.export.backends import cpu_flags
from vclr.index.format import IndexOptions, RetrievalIndex


def planted_collection(n: int, d: int, planted: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) unit vectors, the last `planted` near-copies of random earlier ones; -> (vectors, (planted, 2) pairs)."""
    x, _ = structured_pairs(n - planted, d, seed=seed, queries=1)
    rng = np.random.default_rng(seed + 1)
    originals = rng.choice(n - planted, planted, replace=False)
    target = rng.uniform(0.98, 0.995, planted)[:, None]  # (P, 1) the copies' cosine to their originals
    noise = rng.standard_normal((planted, d)).astype(np.float32)
    noise -= (noise * x[originals]).sum(1, keepdims=True) * x[originals]  # orthogonal to the original
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    copies = (target * x[originals] + np.sqrt(1 - target ** 2) * noise).astype(np.float32)
    pairs = np.stack([originals, np.arange(n - planted, n)], axis=1)
    return np.concatenate([x, copies]), pairs


def exact_pairs(x: np.ndarray, ids: np.ndarray, threshold: float, chunk: int = 4096) -> set[tuple[int, int]]:
    """Every pair of `ids` scoring >= threshold, by brute force."""
    sub = x[ids]
    found = set()
    for start in range(0, len(ids), chunk):
        scores = sub[start:start + chunk] @ sub.T  # (c, m)
        rows, cols = np.nonzero(scores >= threshold)
        rows = rows + start
        keep = cols > rows
        found |= {(int(ids[a]), int(ids[b])) for a, b in zip(rows[keep], cols[keep])}
    return {(min(a, b), max(a, b)) for a, b in found}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--planted", type=int, default=2000)
    parser.add_argument("--subset", type=int, default=50_000)
    parser.add_argument("--threshold", type=float, default=0.97)
    parser.add_argument("--exact-below", type=int, default=50_000, help="the index stays exact up to this size")
    args = parser.parse_args(argv)
    from bench_embed import git_commit

    x, pairs = planted_collection(args.n, args.d, args.planted)
    line = {"bench": "duplicates", "n": args.n, "d": args.d, "planted": args.planted, "threshold": args.threshold,
            "cpu_flags": cpu_flags()}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        index = RetrievalIndex.build(x, np.zeros((0, args.d), np.float32), [], [f"{i}.jpg" for i in range(args.n)], [],
                                     {"model_source": None}, IndexOptions(exact_below=args.exact_below))
        index.save(Path(tmp) / "index")
        line["index"] = index.manifest["index"]["images"]["factory"]
        line["build_seconds"] = round(time.perf_counter() - started, 1)
        del index
        started = time.perf_counter()
        command = ["duplicates", "--index", str(Path(tmp) / "index"), "--threshold", str(args.threshold), "--json"]
        done = subprocess.run([sys.executable, "-m", "vclr.cli", "-q", *command], capture_output=True, text=True)
        line["duplicates_seconds"] = round(time.perf_counter() - started, 1)
        if done.returncode:
            raise SystemExit(done.stderr)
        line["duplicates_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    groups = json.loads(done.stdout)["groups"]
    found = set()
    for group in groups:
        ids = sorted(int(Path(m["path"]).stem) for m in group["members"])
        found |= {(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]}
    planted = {(int(a), int(b)) for a, b in pairs}
    line["groups"] = len(groups)
    line["planted_found"] = round(len(planted & found) / len(planted), 4)
    rng = np.random.default_rng(2)
    subset = np.unique(np.concatenate([rng.choice(args.n, args.subset, replace=False),
                                       pairs[:args.subset // 50].ravel()]))[:args.subset * 2]
    started = time.perf_counter()
    exact = exact_pairs(x, subset, args.threshold)
    line["exact_subset"] = {"images": len(subset), "pairs": len(exact),
                            "seconds": round(time.perf_counter() - started, 1)}
    inside = set(subset.tolist())
    found_inside = {p for p in found if p[0] in inside and p[1] in inside}
    line["recall_vs_exact_subset"] = round(len(found_inside & exact) / max(1, len(exact)), 4)
    line["false_pairs_vs_exact_subset"] = len(found_inside - exact)  # connected components add pairs via chains
    line["commit"] = git_commit()
    print(json.dumps(line))


if __name__ == "__main__":
    main()

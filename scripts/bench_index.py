"""Index benchmark at scale: build time, memory, queries/s and cross-modal recall@10 vs exact, per index type.

    python scripts/bench_index.py                       # 1M x 512, every type, then the automatic choice
    python scripts/bench_index.py --n 200000 --kinds flat,ivf_flat

Vectors: `vclr.ann.structured_pairs`, CLIP-like clustered unit "image" vectors with paired "text" queries shifted by a
modality gap. Each type is tuned to the smallest nprobe/efSearch reaching --target recall@10 against exact search
(IndexFlatIP) on the text queries, then timed on all of them in one batch. One JSON line per index type, then one
for the automatic choice (`vclr.ann.choose_index`) with its speed-up over exact search measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import faiss
import numpy as np

from vclr.ann import (build, choose_index, memory_bytes, recall_at_k, spec_for, structured_pairs, timed_search,
                      tune)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # peak, KiB on Linux


def index_bytes(index: faiss.Index) -> int:
    return int(faiss.serialize_index(index).nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--kinds", default="flat,ivf_flat,hnsw,ivf_pq")
    parser.add_argument("--no-auto", action="store_true")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--noise", type=float, default=1.0, help="spread around cluster centres (higher: harder)")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    start = time.perf_counter()
    xb, xq = structured_pairs(args.n, args.d, seed=0, queries=args.queries, noise=args.noise)
    common = {"n": args.n, "d": args.d, "queries": args.queries, "k": 10, "noise": args.noise,
              "threads": faiss.omp_get_max_threads()}
    exact_index = faiss.IndexFlatIP(args.d)
    exact_index.add(xb)
    exact, exact_qps = timed_search(exact_index, xq, 10)  # ground truth and the exact baseline, same run
    print(json.dumps({"bench": "index", "kind": "flat", "factory": "Flat", **common, "build_s": 0.0,
                      "bytes": args.n * args.d * 4, "qps": round(exact_qps, 1), "recall_at_10": 1.0,
                      "speedup_vs_exact": 1.0, "data_s": round(time.perf_counter() - start, 1)}), flush=True)
    del exact_index

    for kind in [k for k in args.kinds.split(",") if k and k != "flat"]:
        spec = spec_for(kind, args.n, args.d)
        t0 = time.perf_counter()
        index = build(spec, xb)
        build_s = time.perf_counter() - t0
        tuning = tune(index, spec, xq, exact, 10, args.target)
        print(json.dumps({"bench": "index", "kind": kind, "factory": spec.factory, **common,
                          "build_s": round(build_s, 1), "bytes": index_bytes(index),
                          "bytes_estimate": memory_bytes(spec, args.n, args.d), "param": tuning.param,
                          "value": tuning.value, "qps": round(tuning.qps, 1), "recall_at_10": round(tuning.recall, 4),
                          "met_target": tuning.met, "speedup_vs_exact": round(tuning.qps / exact_qps, 2),
                          "curve": [[v, round(r, 4), round(q, 1)] for v, r, q in tuning.curve],
                          "peak_rss_gb": round(rss_gb(), 2)}), flush=True)
        del index

    if not args.no_auto:
        # tuned on the first half of the queries, measured on the other half: no credit for fitting the test set
        half = len(xq) // 2
        t0 = time.perf_counter()
        index, tuning = choose_index(xb, xq[:half], 10, args.target)
        total_s = time.perf_counter() - t0
        found, qps = timed_search(index, xq[half:], 10)
        held_out_recall = recall_at_k(found, exact[half:], 10)
        print(json.dumps({"bench": "index", "kind": "auto", "chosen": tuning.kind, "factory": tuning.factory,
                          **common, "param": tuning.param, "value": tuning.value, "tuning_recall": round(tuning.recall, 4),
                          "recall_at_10": round(held_out_recall, 4), "met_target": held_out_recall >= args.target,
                          "qps": round(qps, 1),
                          "exact_qps": round(exact_qps, 1), "speedup_vs_exact": round(qps / exact_qps, 2),
                          "choose_s": round(total_s, 1), "peak_rss_gb": round(rss_gb(), 2)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()

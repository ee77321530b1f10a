"""Index benchmark at scale: build time, memory, queries/s and cross-modal recall@10 vs exact, per index type.

    python scripts/bench_index.py                       # 1M x 512: exact, IVF-Flat, HNSW, OPQ+IVF-PQ, then auto
    python scripts/bench_index.py --n 200000 --kinds flat,ivf_flat

Vectors: `vclr.data.synthetic_vectors.structured_pairs`, CLIP-like clustered unit "image" vectors with
paired "text" queries shifted by a modality gap. Each type is tuned (`vclr.index.tuning.tune`) on the first
half of the text queries to the smallest
nprobe/efSearch reaching --target recall@10 against exact search, then measured on the held-out second half: recall
and queries/s (all held-out queries in one batch). One JSON line per type, then one for the automatic choice: the
rule of `vclr.index.tuning.choose_index` (`vclr.index.tuning.pick`: the fastest type meeting the target among those
whose raw vectors fit the memory budget, exact search included) applied to the indexes built above, with its
speed-up over exact search measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import faiss

from vclr.data.synthetic_vectors import structured_pairs
from vclr.index.kinds import candidate_kinds, memory_bytes, spec_for
from vclr.index.tuning import Tuning, build, pick, recall_at_k, timed_search, tune


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000, help="half tune, half measure")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--noise", type=float, default=1.0, help="spread around concept centres (higher: harder)")
    parser.add_argument("--latent-dim", type=int, default=48, help="intrinsic dimension; 0 = full-rank isotropic")
    parser.add_argument("--ambient-noise", type=float, default=0.3, help="full-rank noise, relative to the signal")
    parser.add_argument("--kinds", default="flat,ivf_flat,hnsw,ivf_pq")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0, help="for the automatic choice (0: none)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    xb, xq = structured_pairs(args.n, args.d, seed=0, queries=args.queries, noise=args.noise,
                              latent_dim=args.latent_dim, ambient_noise=args.ambient_noise)
    half = len(xq) // 2
    tune_q, test_q = xq[:half], xq[half:]
    common = {"n": args.n, "d": args.d, "k": 10, "noise": args.noise, "latent_dim": args.latent_dim,
              "ambient_noise": args.ambient_noise, "target": args.target,
              "tuning_queries": half, "test_queries": len(test_q), "threads": faiss.omp_get_max_threads()}
    flat = faiss.IndexFlatIP(args.d)
    flat.add(xb)
    exact_tune = flat.search(tune_q, 10)[1]
    exact_test, exact_qps = timed_search(flat, test_q, 10)  # ground truth and the exact baseline, same run
    data_s = time.perf_counter() - start

    eligible = candidate_kinds(args.n, args.d, args.memory_budget_gb * 1e9 or None, 50_000)
    kinds = [k for k in args.kinds.split(",") if k]
    kinds = [k for k in kinds if k in eligible] + [k for k in kinds if k not in eligible]  # auto's first
    tried = []
    for kind in kinds:
        spec = spec_for(kind, args.n, args.d)
        t0 = time.perf_counter()
        index = flat if kind == "flat" else build(spec, xb)
        build_s = time.perf_counter() - t0
        if kind == "flat":
            tuning = Tuning("flat", "Flat", None, None, 1.0, exact_qps, 10, args.target, True)
        else:
            tuning = tune(index, spec, tune_q, exact_tune, 10, args.target)
        found, qps = timed_search(index, test_q, 10)  # held-out queries, tuned parameter
        recall = recall_at_k(found, exact_test, 10)
        line = {"bench": "index", "kind": kind, "factory": spec.factory, **common, "build_s": round(build_s, 1),
                "bytes": int(faiss.serialize_index(index).nbytes) if kind != "flat" else args.n * args.d * 4,
                "bytes_estimate": memory_bytes(spec, args.n, args.d), "param": tuning.param, "value": tuning.value,
                "tuning_recall": round(tuning.recall, 4), "recall_at_10": round(recall, 4),
                "qps": round(qps, 1), "speedup_vs_exact": round(qps / exact_qps, 2),
                "curve": [[v, round(r, 4), round(q, 1)] for v, r, q in tuning.curve],
                "peak_rss_gb": round(peak_rss_gb(), 2)}
        if kind == "flat":
            line["data_s"] = round(data_s, 1)
        print(json.dumps(line), flush=True)
        held_out = Tuning(kind, spec.factory, tuning.param, tuning.value, tuning.recall, qps, 10, args.target,
                          tuning.met)
        tried.append((kind, held_out, recall))
        del index  # one ANN index in memory at a time
        if kind != "flat" and [k for k, *_ in tried] == [k for k in kinds if k in eligible]:
            print_auto(tried, exact_qps, common, args, start)  # every candidate of the auto choice is measured


def print_auto(tried, exact_qps, common, args, start) -> None:
    _, chosen = pick([(None, tuning) for _, tuning, _ in tried], 10, args.target)
    test_recall = next(recall for _, tuning, recall in tried if tuning is chosen)
    print(json.dumps({"bench": "index", "kind": "auto", "chosen": chosen.kind, "factory": chosen.factory, **common,
                      "param": chosen.param, "value": chosen.value,
                      "recall_at_10": round(test_recall, 4), "met_target": test_recall >= args.target,
                      "qps": round(chosen.qps, 1), "exact_qps": round(exact_qps, 1),
                      "speedup_vs_exact": round(chosen.qps / exact_qps, 2), "candidates": chosen.candidates,
                      "total_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()

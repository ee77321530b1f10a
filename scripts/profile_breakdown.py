"""Where a profiled step's device time goes: a torch.profiler trace (`train.profile_steps`, `--profile-steps`) read
into device milliseconds a step by kind of kernel, the busy share, and the largest idle gaps with the host operation
that held the training thread meanwhile. Prints a short table, then one JSON line.

    python scripts/profile_breakdown.py RUN/profile/*.pt.trace.json.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation")
# first match wins: (kind, substrings of the lower-cased kernel name)
KINDS = (("matmul", ("nvjet", "gemm", "cutlass", "xmma")),
         ("attention", ("sdpa", "flash", "fmha", "compute_dot_do_o")),
         ("convolution", ("wgrad", "convolve", "conv2d", "implicit_convolve")),
         ("jpeg decode", ("nvjpeg", "jpeg", "huffman", "idct")),
         ("resize", ("upsample",)),
         ("optimizer", ("adam", "multi_tensor")),
         ("compiled reductions", ("triton_per", "triton_red")),
         ("compiled pointwise", ("triton_poi",)),
         ("copies", ("memcpy", "memset")))


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(key in low for key in keys)), "other")


def union_length(intervals: list[tuple[float, float]]) -> float:
    covered, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        a = max(a, reach)
        if b > a:
            covered, reach = covered + b - a, b
    return covered


def breakdown(trace: dict, gaps: int = 5) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps: dict[str, list[float]] = {}
    for e in events:
        if e.get("name", "").startswith("ProfilerStep#"):
            span = steps.setdefault(e["name"], [e["ts"], e["ts"] + e["dur"]])
            span[0], span[1] = min(span[0], e["ts"]), max(span[1], e["ts"] + e["dur"])
    if not steps:
        raise SystemExit("no ProfilerStep# ranges in this trace: is it a torch.profiler trace of training steps?")
    start, end, n = min(s[0] for s in steps.values()), max(s[1] for s in steps.values()), len(steps)
    work = sorted((e for e in events if e.get("cat") in DEVICE_CATS and start <= e["ts"] <= end), key=lambda e: e["ts"])
    by_kind, count = Counter(), Counter()
    for e in work:
        by_kind[kind_of(e["name"])] += e["dur"]
        count[kind_of(e["name"])] += 1
    host = [e for e in events if e.get("cat") in HOST_CATS and not e["name"].startswith("ProfilerStep#")]
    idle = sorted(((b["ts"] - (a["ts"] + a["dur"]), a["ts"] + a["dur"], b["ts"]) for a, b in zip(work, work[1:])),
                  reverse=True)
    largest = []
    for length, a, b in idle[:gaps]:
        # the host op that overlaps the gap most (the training thread was inside it while the device waited)
        most, name = max(((min(b, e["ts"] + e["dur"]) - max(a, e["ts"]), e["name"]) for e in host), default=(0, None))
        largest.append({"ms": round(length / 1e3, 2), "host": name if most > 0.5 * length else None})
    busy = union_length([(e["ts"], e["ts"] + e["dur"]) for e in work])
    return {"steps": n, "wall_ms_per_step": round((end - start) / 1e3 / n, 2),
            "device_ms_per_step": round(busy / 1e3 / n, 2), "device_busy": round(busy / (end - start), 4),
            "by_kind_ms_per_step": {k: round(v / 1e3 / n, 2) for k, v in by_kind.most_common()},
            "kernels_per_step": {k: round(count[k] / n, 1) for k, _ in by_kind.most_common()},
            "largest_gaps": largest}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a .pt.trace.json or .pt.trace.json.gz")
    parser.add_argument("--gaps", type=int, default=5, help="how many of the largest idle gaps to show")
    args = parser.parse_args(argv)
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        result = breakdown(json.load(f), args.gaps)
    print(f"{result['steps']} steps: {result['wall_ms_per_step']} ms a step, device busy "
          f"{result['device_ms_per_step']} ms ({result['device_busy']:.0%})")
    for kind, ms in result["by_kind_ms_per_step"].items():
        print(f"  {kind:22s} {ms:8.2f} ms  {result['kernels_per_step'][kind]:6.0f} kernels")
    for gap in result["largest_gaps"]:
        print(f"  idle {gap['ms']:6.2f} ms while the host ran {gap['host']}")
    print(json.dumps({"trace": args.trace, **result}))


if __name__ == "__main__":
    main()

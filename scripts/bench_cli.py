"""How fast the `vclr` command answers: `vclr --help`, an argument error, and a cold `vclr search` by text.

    python scripts/bench_cli.py                           # builds a small demo-model index in a temp dir
    python scripts/bench_cli.py --index vclr-demo/index   # or times an existing index

Each figure is the median of `--repeats` fresh processes (`python -m vclr.cli ...`, as the `vclr` script runs it).
References measured in the same run: a bare `python -c pass` (interpreter start) and `python -c "import torch,
open_clip"` (what any PyTorch query path must import at least). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def seconds(argv: list[str], repeats: int, expect_code: int = 0) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode != expect_code:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}, expected {expect_code}:\n{done.stderr}")
    return round(statistics.median(times), 3)


def small_demo_index(folder: Path) -> Path:
    """The demo's model architecture, trained 2 steps on 64 images, indexing 200: cold-start cost does not depend
    on the weights, and the query path is the same as for the real demo index."""
    import vclr
    from vclr.cli import main

    demo_config = str(Path(vclr.__file__).parent / "configs" / "demo.yaml")
    data = folder / "data"
    code = main(["-q", "make-synthetic", "--out", str(data), "--train", "64", "--test", "200"])
    code = code or main(["-q", "train", "--config", demo_config, "data.train=" + str(data / "train"),
                         f"train.output_dir={folder / 'run'}",
                         "optim.max_steps=2", "optim.warmup_steps=1", "data.batch_size=32",
                         "train.checkpoint_every=100"])
    code = code or main(["-q", "index", "--run", str(folder / "run"), "--data", str(data / "test"),
                         "--out", str(folder / "index")])
    if code:
        raise SystemExit("could not build the benchmark's index")
    return folder / "index"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="an existing index to search (default: build a small demo-model one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    vclr = [sys.executable, "-m", "vclr.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or str(small_demo_index(Path(tmp)))
        figures = {
            "help_s": seconds([*vclr, "--help"], args.repeats),
            "argument_error_s": seconds([*vclr, "search", "--index", index, "--text", "a", "-k", "0"],
                                        args.repeats, expect_code=2),
            "cold_search_s": seconds([*vclr, "search", "--index", index, "--text", "a large red circle", "-k", "5"],
                                     args.repeats),
            "reference_python_start_s": seconds([sys.executable, "-c", "pass"], args.repeats),
            "reference_import_torch_open_clip_s": seconds([sys.executable, "-c", "import torch, open_clip"],
                                                          args.repeats),
        }
    print(json.dumps({"bench": "cli", "index": args.index or "small demo-model index (200 images)",
                      "repeats": args.repeats, **figures}))


if __name__ == "__main__":
    main()

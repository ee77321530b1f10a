"""The search service under load: `vclr serve` over a 1M-image index, driven by N concurrent clients.

    python scripts/bench_serve.py                                  # 1M images, clients 1/8/32/128, 20 s each
    python scripts/bench_serve.py --backend onnx                   # the same, answered through an ONNX export
    python scripts/bench_serve.py --backend onnx --int8            # ... through its int8 export
    python scripts/bench_serve.py --images 100000 --seconds 5      # a quick look

The index (built once, cached in $VCLR_CACHE/bench/serve-*): `--images` synthetic-but-structured vectors
(vclr.data.synthetic_vectors: clusters in a low-dimensional subspace, as real embeddings are) of the dimension of a
real model config (`--model`, default the demo's vclr-tiny-rn, random-init and saved as a vclr run, so the service
loads it and its text tower as it would any run), in an IVF-Flat index tuned to recall@10 >= 0.95 on the matching
synthetic caption vectors. Image paths cycle over 256 small PNG files, so image fetches read real files.

Each client is a keep-alive HTTP/1.1 connection that sends its next request when the last one is answered, for
`--seconds` (after a warm-up of `--warmup` seconds) on 127.0.0.1 only: 80% text queries (three in four new, one in
four from a set of 50 popular ones), 10% image uploads (a 64x64 PNG: similar images), 10% image fetches. A 503 is
honoured as a client would: it waits the Retry-After second before its next request. One JSON line per concurrency
level: queries a second, p50/p95/p99 latency per route (ms, answered requests), 503s, errors (anything else that is
not a 200, or a broken connection) and the server's peak RSS; the reference is the same text query answered in the
benchmark's own process (no HTTP, no concurrency) on the same index, the floor the service adds its costs to.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from vclr.data.synthetic_vectors import structured_pairs  # noqa: E402

ROUTES = ("text", "upload", "fetch")
ADJECTIVES = ("red", "blue", "green", "small", "large", "old", "bright", "dark", "striped", "round", "square", "tall",
              "tiny", "wooden", "shiny", "yellow", "purple", "orange", "white", "black", "golden", "dusty", "wet",
              "broken", "empty", "busy", "quiet", "happy", "sleepy", "frozen")
NOUNS = ("dog", "cat", "car", "house", "tree", "boat", "bird", "bicycle", "chair", "table", "cup", "horse", "train",
         "flower", "mountain", "river", "bridge", "clock", "lamp", "book", "guitar", "pizza", "cake", "shoe", "hat",
         "umbrella", "kite", "apple", "window", "door", "street", "beach", "forest", "city", "field", "garden",
         "kitchen", "market", "station", "tower")
PLACES = ("on a beach", "in the snow", "at night", "in a park", "on a table", "under a bridge", "in the rain",
          "near a river", "on a street", "in a field", "at sunset", "in a kitchen", "on a shelf", "in the sky",
          "by the sea", "in a forest", "on the grass", "in a window", "at a station", "in a garden", "on a hill",
          "in the city", "at the market", "on a boat", "in a room", "on a road", "in the desert", "at the zoo",
          "in the fog", "on ice")


def cache_dir() -> Path:
    return Path(os.environ.get("VCLR_CACHE", Path.home() / ".cache" / "vclr")) / "bench"


# ------------------------------------------------------------------------------------------------- the index


def build_bench_index(folder: Path, images: int, model_name: str, backend: str, int8: bool = False) -> Path:
    """A random-init `model_name` saved as a run, and an index of `images` structured vectors that records it."""
    index_dir = folder / "index"
    if (index_dir / "manifest.json").is_file():
        print(f"reusing {index_dir}", file=sys.stderr)
    else:
        _build(folder, images, model_name)
    if backend == "onnx" and not (export_folder(folder, int8) / "export.json").is_file():
        from vclr.export.onnx import export_onnx
        from vclr.model.source import model_source

        export_onnx(model_source(run=str(folder / "run")), export_folder(folder, int8), int8=int8)
    return index_dir


def export_folder(folder: Path, int8: bool) -> Path:
    return folder / ("onnx-int8" if int8 else "onnx")


def _build(folder: Path, images: int, model_name: str) -> None:
    import torch
    from PIL import Image

    from vclr.config import load_config
    from vclr.index.format import IndexOptions, RetrievalIndex
    from vclr.index.text_tower import text_query_files
    from vclr.model.build import build_model
    from vclr.model.source import RunSource, model_identity, with_run_from_index
    from vclr.rundir import save_model_as_run

    run = folder / "run"
    cfg = load_config(None, [f"model.name={model_name}", f"train.output_dir={run}"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_model_as_run(run, cfg, model)
    files = folder / "images"
    files.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(256):
        path = files / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    print(f"building a {images}-image index of {model.embed_dim}-d structured vectors (minutes, once)",
          file=sys.stderr)
    xb, xq = structured_pairs(images, model.embed_dim)
    source = RunSource(str(run))
    manifest = model_identity(source, cfg) | {"dataset": "structured vectors (vclr.data.synthetic_vectors)"}
    manifest["model_source"] = with_run_from_index(manifest["model_source"], folder / "index")
    index = RetrievalIndex.build(xb, np.zeros((0, model.embed_dim), np.float32), [],
                                 [paths[i % len(paths)] for i in range(images)], [], manifest,
                                 IndexOptions(kind="ivf_flat"))
    # the images' own tuning used image queries (there are no captions): tune again with the caption vectors,
    # which sit across the modality gap as text queries do
    from vclr.index.kinds import spec_for
    from vclr.index.tuning import exact_neighbours, tune

    spec = spec_for("ivf_flat", images, model.embed_dim)
    tuning = tune(index.image_index, spec, xq, exact_neighbours(xb, xq, 10), 10, 0.95)
    index.manifest["index"]["images"] = tuning.to_dict()
    index.attachments.update(text_query_files(model, cfg))
    index.save(folder / "index")


# --------------------------------------------------------------------------------------------------- clients


class Connection:
    """One keep-alive HTTP/1.1 connection (asyncio streams: a load generator must cost little CPU itself)."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "vclrbench7d1e"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def text_query(rng: random.Random, popular: list[str]) -> str:
    if popular and rng.random() < 0.25:
        return rng.choice(popular)
    return f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(PLACES)}"


async def client(port: int, rng: random.Random, until: float, measure_from: float, uploads: list[tuple[bytes, str]],
                 popular: list[str], images: int, record: dict) -> None:
    connection = Connection(port)
    while time.monotonic() < until:
        draw = rng.random()
        route = "text" if draw < 0.8 else "upload" if draw < 0.9 else "fetch"
        started = time.monotonic()
        try:
            if route == "text":
                query = quote(text_query(rng, popular))
                status, headers = await connection.request("GET", f"/api/search?k=10&text={query}")
            elif route == "upload":
                body, content_type = rng.choice(uploads)
                status, headers = await connection.request("POST", "/api/search/image?k=10&images=true", body,
                                                           content_type)
            else:
                status, headers = await connection.request("GET", f"/api/image/{rng.randrange(images)}")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            connection.close()
            status, headers = -1, {}
        elapsed = time.monotonic() - started
        if started < measure_from:
            if status == 503:
                await asyncio.sleep(1.0)
            continue
        if status == 200:
            record[route].append(elapsed)
        elif status == 503:
            record["refused"] += 1
            await asyncio.sleep(float(headers.get("retry-after", 1)))
        else:
            record["errors"] += 1
    connection.close()


async def drive(port: int, clients: int, seconds: float, warmup: float, images: int, seed: int) -> dict:
    from PIL import Image

    rng = random.Random(seed)
    uploads = []
    for i in range(8):
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
        uploads.append(multipart(buffer.getvalue()))
    popular = [f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}" for _ in range(50)]
    record = {route: [] for route in ROUTES} | {"refused": 0, "errors": 0}
    start = time.monotonic()
    await asyncio.gather(*[client(port, random.Random(seed * 1000 + c), start + warmup + seconds, start + warmup,
                                  uploads, popular, images, record) for c in range(clients)])
    return record


# ------------------------------------------------------------------------------------------------- the server


def start_server(index_dir: Path, port: int, backend: str, onnx_dir: Path, extra: list[str]) -> subprocess.Popen:
    argv = [sys.executable, "-m", "vclr.cli", "-q", "serve", "--index", str(index_dir), "--port", str(port), *extra]
    if backend == "onnx":
        argv += ["--backend", "onnx", "--onnx", str(onnx_dir)]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd="/")
    import urllib.request

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited {server.returncode}:\n{server.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=2).read()
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start within 10 minutes")


def peak_rss_mb(pid: int) -> float:
    """The process's high-water mark of resident memory (Linux VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def percentiles(seconds_list: list[float]) -> dict:
    if not seconds_list:
        return {"n": 0}
    ms = np.asarray(seconds_list) * 1000
    return {"n": len(ms), **{f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 95, 99)}}


def in_process_reference(index_dir: Path, backend: str, onnx_dir: Path, repeats: int = 200) -> float:
    """Median ms of one text query answered in this process (the service's floor), on the same index."""
    from vclr.search.searcher import Searcher

    encoder = None
    if backend == "onnx":
        from vclr.search.onnx import OnnxQueryEncoder

        encoder = OnnxQueryEncoder.load(onnx_dir)
    searcher = Searcher.open(index_dir, load_model=False, encoder=encoder)
    rng = random.Random(1)
    searcher.by_text("warm up", 10)
    times = []
    for _ in range(repeats):
        text = text_query(rng, [])
        started = time.perf_counter()
        searcher.by_text(text, 10)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--model", default="vclr-tiny-rn", help="the model config whose towers answer")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--int8", action="store_true", help="with --backend onnx: the int8 export (vclr export --int8)")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrent clients, one JSON line each")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--serve-args", default="", help="extra `vclr serve` flags, e.g. '--max-queue 32'")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args(argv)
    folder = cache_dir() / f"serve-{args.model}-{args.images}"
    if args.int8 and args.backend != "onnx":
        parser.error("--int8 needs --backend onnx")
    index_dir = build_bench_index(folder, args.images, args.model, args.backend, args.int8)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    tuning = manifest["index"]["images"]
    onnx_dir = export_folder(folder, args.int8)
    reference_ms = in_process_reference(index_dir, args.backend, onnx_dir)
    server = start_server(index_dir, args.port, args.backend, onnx_dir, args.serve_args.split())
    try:
        for clients in [int(v) for v in args.levels.split(",")]:
            record = asyncio.run(drive(args.port, clients, args.seconds, args.warmup, args.images, seed=clients))
            if server.poll() is not None:
                raise SystemExit(f"the server died at {clients} clients:\n{server.stderr.read()}")
            answered = sum(len(record[route]) for route in ROUTES)
            line = {"bench": "serve", "backend": args.backend, "precision": "int8" if args.int8 else "fp32",
                    "model": args.model, "images": manifest["num_images"],
                    "index": f"{tuning['factory']} {tuning['param']}={tuning['value']} "
                             f"recall@10={tuning['recall']:.3f}",
                    "clients": clients, "seconds": args.seconds, "qps": round(answered / args.seconds, 1),
                    **{route: percentiles(record[route]) for route in ROUTES},
                    "refused_503": record["refused"], "errors": record["errors"],
                    "server_peak_rss_mb": peak_rss_mb(server.pid), "cores": os.cpu_count(),
                    "reference_in_process_text_ms": reference_ms}
            print(json.dumps(line), flush=True)
            if args.out:
                with open(args.out, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

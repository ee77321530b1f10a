"""The search service: a JSON API and a small web page over one index (FastAPI + uvicorn).

    vclr serve --index vclr-demo/index            # http://127.0.0.1:8000

GET  /                              the search page: a query box, a "but not" box, folder and date filters, order by
                                    relevance or date, an image upload, a grid of results with scores, "more like
                                    this" on every image and "more results"
GET  /api/search?text=...&k=...     images for a query (vclr.search.query): text (repeat; weight as 2:dog), not_text,
     [&not_text=..&like=ID          like (indexed image ids), folder (a glob), after / before (dates taken), ext,
      &folder=..&after=..&ext=..    sort (relevance|date), min_score, offset -> {"query", "k", "hits": [{"rank",
      &sort=date&min_score=..]      "score", "id", "kind", "value", "url", "weak"}]} (value: the file name)
POST /api/search/image?k=...        image upload (multipart field "file"), alone -> captions, or images when the index
     [&images=true&text=..]         has none or `images=true`; with the parameters of GET /api/search -> images
GET  /metrics                       Prometheus metrics (vclr.serve.metrics)
GET  /api/like/{id}?k=...           indexed image id -> the images most like it (itself left out)
GET  /api/image/{id}                an indexed image by id (only files that are in the index: no paths from clients)
GET  /api/info                      the index manifest (counts, dimension, index type and its measured recall)
GET  /api/stats                     the query engine's counters: waiting queries, batches, cache hits, index version

Every answer names the `index_version` it came from: a new save of the index (`vclr index`, `index-add`,
`index-delete` while the service runs) is loaded beside the old one and swapped in between batches of queries
(vclr.serve.engine), so no answer mixes two versions.

Bounds: 1 <= k <= MAX_K, text up to MAX_QUERY_CHARS, uploads up to `max_upload_bytes`; errors are JSON
{"error": "..."}: 4xx for the request's own faults (401 without the API key when one is set, 429 past the per-client
rate limit), 503 with Retry-After when the service is overloaded or a query timed out.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (UploadFile, imported lazily
# inside create_app) at runtime
import hmac
import json
import logging
import mimetypes
import time
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from vclr.errors import Overloaded, TimedOut, VclrError
from vclr.model.source import ModelSource
from vclr.search.limits import MAX_K, MAX_QUERY_CHARS, ServiceLimits, check_k, check_text_query
from vclr.search.query import parse_query
from vclr.search.searcher import Searcher
from vclr.serve.engine import ImageQuery, LikeQuery, LiveIndex, QueryEngine, SearchQuery, TextQuery
from vclr.serve.metrics import MetricsMiddleware, ServiceMetrics

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # a multipart body's boundaries and headers around the file
MAX_CONNECTIONS = 1000  # open connections beyond this are answered 503 by uvicorn: memory stays bounded
LOOPBACK = ("127.0.0.1", "localhost", "::1")
KEY_COOKIE = "vclr_key"


@dataclass(frozen=True)
class Access:
    """Who may use the service: everyone who can reach it (the default, on 127.0.0.1), or holders of `api_key`;
    each client address at most `rate_limit` requests a second (bursts of twice that); cross-origin pages only
    from `cors_origins` (none by default: browsers then refuse other sites' pages the answers)."""

    api_key: str | None = None
    rate_limit: float = 0.0  # requests per second per client address; 0 = no limit
    cors_origins: tuple[str, ...] = ()


def exposure_warning(host: str, access: Access) -> str | None:
    """What to tell someone who serves beyond this machine without a key."""
    if host in LOOPBACK or access.api_key:
        return None
    return (f"warning: serving on {host} without authentication: anyone who can reach this machine can query the "
            "index and fetch its images; give `api_key` (or set VCLR_API_KEY) to require a key")


def create_app(searcher: Searcher | LiveIndex, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               limits: ServiceLimits = ServiceLimits(), access: Access = Access()):
    """The service over a searcher, or over a live index (new saves of the index are served as they appear)."""
    from fastapi import Depends, FastAPI, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse

    live = searcher if isinstance(searcher, LiveIndex) else LiveIndex(searcher)
    engine = QueryEngine(live, limits)
    app = FastAPI(title="vclr search", docs_url=None, redoc_url=None)
    app.state.engine = engine

    def busy(exc: VclrError):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    app.add_exception_handler(Overloaded, lambda request, exc: busy(exc))
    app.add_exception_handler(TimedOut, lambda request, exc: busy(exc))

    @app.exception_handler(VclrError)
    async def user_error(request: Request, exc: VclrError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.exception("search service error")
        return JSONResponse({"error": "internal error"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    _add_guards(app, access, max_upload_bytes)
    metrics = ServiceMetrics(engine)
    engine.batch_observer = metrics.batch_size.observe
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last: outermost, refusals are counted too

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def render(query: dict):
        """Image hits by file name, first caption and URL (never the server's paths), caption hits by their text;
        `weak`: no better than unrelated pairs score (vclr.search.calibration); made in the worker, from the version
        of the index that it searched."""
        def answer(version: Searcher, hits) -> dict:
            captions = version.first_captions(hits)
            return {**query, "index_version": version.index.version, "hits": [
                {"rank": h.rank, "score": h.score, "id": h.id, "weak": h.weak,
                 **({"words": h.words} if h.words is not None else {}),
                 **({"kind": "image", "value": Path(h.path).name, "caption": caption, "url": f"api/image/{h.id}"}
                    if h.path is not None else {"kind": "caption", "value": h.caption})}
                for h, caption in zip(hits, captions)]}

        return answer

    _add_page(app, live.current)

    @app.get("/api/info")
    def info():
        return {**live.current.index.manifest, "index_version": live.current.index.version}

    @app.get("/api/stats")
    def stats():
        return engine.stats()

    def query_parameters(text: list[str] = Query([], description="what to look for; repeat to combine, weight "
                                                                "with a prefix: 2:dog"),
                         not_text: list[str] = Query([], description="what to steer away from"),
                         folder: str | None = Query(None, description="a folder glob: 2024/**"),
                         after: str | None = Query(None, description="taken on or after: 2024-06-01"),
                         before: str | None = Query(None, description="taken before"),
                         ext: list[str] = Query([], description="file types: jpg, heic"),
                         sort: str = Query("relevance", description="relevance, or date (newest first)"),
                         min_score: float | None = Query(None, description="leave out hits scoring below this cosine"),
                         k: int = Query(10, description=f"hits, 1..{MAX_K}"), offset: int = Query(0),
                         distinct: bool = Query(False, description="one hit per set of near-duplicate images")
                         ) -> dict:
        """The query parameters both search routes take: parse_query's arguments."""
        return dict(text=text, not_text=not_text, sort=sort, min_score=min_score, k=k, offset=offset,
                    where={"folder": folder, "after": after, "before": before, "ext": ext}, distinct=distinct)

    @app.get("/api/search")
    async def search(params: dict = Depends(query_parameters),
                     like: list[int] = Query([], description="indexed image ids to look for")):
        if not params["text"] and not like:
            check_text_query("")  # the query is empty: one message for every way of asking
        query, k = parse_query(like=like, **params), params["k"]
        # the batched, cached path; an index with OCR text fuses word matches into every text query (Searcher.search)
        if _plain_text(query) and not live.current.index.manifest.get("ocr"):
            text = query.positives[0].value
            return JSONResponse(await engine.submit(TextQuery(text, k), render({"query": text, "k": k})))
        return JSONResponse(await engine.submit(SearchQuery(query), render({"query": query.describe(), "k": k})))

    @app.get("/api/like/{image_id}")
    async def like(image_id: int, k: int = Query(10)):
        check_k(k)
        return JSONResponse(await engine.submit(LikeQuery(image_id, k), render({"id": image_id, "k": k})))

    @app.post("/api/search/image")
    async def search_image(file: UploadFile, params: dict = Depends(query_parameters), images: bool = Query(False)):
        """An uploaded image (multipart field "file"), alone (-> its captions, or images) or with the same query
        parameters as GET /api/search."""
        params, k = dict(params, images=images or None), params["k"]
        parse_query(upload=b"x", **params)  # every parameter checked before reading up to 8 MB
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return _too_large(max_upload_bytes)
        query = parse_query(upload=data, **params)
        if query.single_image and not query.offset:  # the batched path
            return JSONResponse(await engine.submit(ImageQuery(data, k, images or None), render({"k": k})))
        return JSONResponse(await engine.submit(SearchQuery(query), render({"query": query.describe(), "k": k})))

    @app.get("/api/image/{image_id}")
    def image(image_id: int):
        store = live.current.index.store
        if not store.is_live("images", image_id):
            return JSONResponse({"error": f"no image with id {image_id}"}, status_code=404)
        path = Path(store.image_paths([image_id])[0])
        if not path.is_file():
            return JSONResponse({"error": f"image {image_id} is indexed but its file is gone"}, status_code=404)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    return app


def _add_guards(app, access: Access, max_upload_bytes: int) -> None:
    """Body size from the header (before anything is read), the API key, the per-client rate limit, and CORS only
    for the origins named. A plain ASGI middleware: Starlette's `@app.middleware("http")` costs ~1 ms a request."""
    app.add_middleware(_Guard, access=access, max_upload_bytes=max_upload_bytes)
    if access.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(access.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["X-API-Key"])


class _Guard:
    def __init__(self, app, access: Access, max_upload_bytes: int):
        self.app, self.access, self.max_upload_bytes = app, access, max_upload_bytes
        self.limiter = RateLimiter(access.rate_limit) if access.rate_limit else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope):
        from fastapi.responses import JSONResponse
        from starlette.requests import Request

        request = Request(scope)
        if scope["method"] == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse({"error": "send the upload with a Content-Length header"}, status_code=411)
            if int(length) > self.max_upload_bytes + MULTIPART_OVERHEAD:
                return _too_large(self.max_upload_bytes)
        if self.access.api_key and scope["path"].startswith("/api/") and not _has_key(request, self.access.api_key):
            return JSONResponse({"error": "this service needs an API key: send it in the X-API-Key header"},
                                status_code=401)
        client = scope["client"][0] if scope.get("client") else "-"
        if self.limiter and not self.limiter.allow(client):
            return JSONResponse({"error": f"too many requests from {client}: the limit is "
                                          f"{self.access.rate_limit:g} a second"}, status_code=429,
                                headers={"Retry-After": "1"})
        return None


def _plain_text(query) -> bool:
    """One text, nothing else asked: the query engine batches and caches these."""
    return len(query.positives) == 1 and query.positives[0].kind == "text" and query.positives[0].weight == 1 \
        and not query.negatives and query.where.empty and query.sort == "relevance" and query.min_score is None \
        and not query.offset and not query.distinct


def _too_large(max_upload_bytes: int):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": f"upload too large: the limit is {max_upload_bytes} bytes"}, status_code=413)


def _has_key(request, api_key: str) -> bool:
    """The key from the X-API-Key header, an `Authorization: Bearer` header, or the page's cookie (images load
    through <img> tags, which send no headers)."""
    bearer = request.headers.get("authorization", "")
    given = request.headers.get("x-api-key") or (bearer[7:] if bearer.lower().startswith("bearer ") else None) or \
        unquote(request.cookies.get(KEY_COOKIE, ""))  # the page percent-encodes it
    return hmac.compare_digest(given.encode(), api_key.encode())


class RateLimiter:
    """A token bucket per client address: `rate` requests a second, bursts of up to twice that."""

    MAX_CLIENTS = 10_000  # addresses remembered (the oldest are forgotten): memory stays bounded

    def __init__(self, rate: float, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, max(1.0, 2 * rate), clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def allow(self, client: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        self._buckets[client] = (tokens - 1 if allowed else tokens, now)
        if len(self._buckets) > self.MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed


PAGE_FILES = {"/": ("index.html", "text/html"), "/page.js": ("page.js", "text/javascript"),
              "/page.css": ("page.css", "text/css")}  # route -> file in vclr/serve/static, its media type


def page_settings(searcher: Searcher) -> dict:
    """What the page needs to know of this index: an example query from its own captions, the query bounds."""
    example = searcher.index.store.first_captions([0])[0] if searcher.has_captions else None
    return {"placeholder": (f"e.g. {example}" if example else "describe what you are looking for")[:80],
            "max_chars": MAX_QUERY_CHARS, "max_k": MAX_K, "has_captions": searcher.has_captions}


def _add_page(app, searcher: Searcher) -> None:
    """The search page: static files shipped in the package, and settings.js with this index's page_settings."""
    from fastapi.responses import Response

    static = resources.files("vclr.serve") / "static"
    for route, (name, media_type) in PAGE_FILES.items():
        body = (static / name).read_bytes()
        app.add_api_route(route, lambda body=body, media_type=media_type: Response(body, media_type=media_type),
                          methods=["GET"], include_in_schema=False)
    script = f"window.vclrSettings = {json.dumps(page_settings(searcher))};\n".encode()
    app.add_api_route("/settings.js", lambda: Response(script, media_type="text/javascript"), methods=["GET"],
                      include_in_schema=False)


def serve(index_dir: str, source: ModelSource | None = None, host: str = "127.0.0.1", port: int = 8000,
          mmap: bool = False, limits: ServiceLimits = ServiceLimits(), access: Access = Access(),
          onnx_dir: str | None = None) -> None:
    """`source`: the model that embeds queries (default: the one the index records); `onnx_dir`: answer through
    that ONNX export instead (vclr.search.onnx: onnxruntime, no torch).

    One uvicorn worker process on one event loop: the index and the model are in memory once, and every query is
    computed by the one worker thread of the QueryEngine (more processes would each hold the index and compete for
    the same cores). uvicorn answers 503 itself past `MAX_CONNECTIONS` open connections."""
    import uvicorn

    encoder = None
    if onnx_dir:
        from vclr.search.onnx import OnnxQueryEncoder

        encoder = OnnxQueryEncoder.load(onnx_dir, threads=limits.thread_count)
    live = LiveIndex(Searcher.open(index_dir, source, mmap=mmap, encoder=encoder))
    live.watch(limits.reload_every_s)
    uvicorn.run(create_app(live, limits=limits, access=access), host=host, port=port, log_level="warning",
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5)

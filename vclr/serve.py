"""The search service: a JSON API and a small web page over one index (FastAPI + uvicorn).

    vclr serve --index vclr-demo/index            # http://127.0.0.1:8000

GET  /                              the search page: a query box, an image upload, a grid of results with scores and
                                    "more like this" on every image
GET  /api/search?text=...&k=...     text -> images: {"query", "k", "hits": [{"rank", "score", "id", "kind", "value",
                                    "url"}]} (kind "image": value is the file name, url fetches it)
POST /api/search/image?k=...        image upload (multipart field "file") -> captions, or images when the index has no
     [&images=true]                 captions or `images=true` (kind "caption": value is the caption)
GET  /api/like/{id}?k=...           indexed image id -> the images most like it (itself left out)
GET  /api/image/{id}                an indexed image by id (only files that are in the index: no paths from clients)
GET  /api/info                      the index manifest (counts, dimension, index type and its measured recall)
GET  /api/stats                     the query engine's counters: waiting queries, batches, cache hits, index version

Every answer names the `index_version` it came from: a new save of the index (`vclr index`, `index-add`,
`index-delete` while the service runs) is loaded beside the old one and swapped in between batches of queries
(vclr.serve_engine), so no answer mixes two versions.

Bounds: 1 <= k <= MAX_K, text up to MAX_QUERY_CHARS, uploads up to `max_upload_bytes`; errors are JSON
{"error": "..."}: 4xx for the request's own faults (401 without the API key when one is set, 429 past the per-client
rate limit), 503 with Retry-After when the service is overloaded or a query timed out.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (UploadFile, imported lazily
# inside create_app) at runtime
import hmac
import html
import logging
import mimetypes
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from vclr.config import VclrError
from vclr.model_source import ModelSource
from vclr.query_limits import MAX_K, MAX_QUERY_CHARS, ServiceLimits, check_k, check_text_query
from vclr.search import Searcher
from vclr.serve_engine import ImageQuery, LikeQuery, LiveIndex, Overloaded, QueryEngine, TextQuery, TimedOut

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # a multipart body's boundaries and headers around the file
MAX_CONNECTIONS = 1000  # open connections beyond this are answered 503 by uvicorn: memory stays bounded
LOOPBACK = ("127.0.0.1", "localhost", "::1")
KEY_COOKIE = "vclr_key"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vclr search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
 form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-bottom: .8rem; }
 #query { flex: 1; min-width: 16rem; font-size: 1.1rem; padding: .4rem; }
 #k { width: 4.5rem; }
 :focus-visible { outline: 3px solid #1a5fb4; outline-offset: 2px; }
 #drop { border: 2px dashed #999; border-radius: 6px; padding: .8rem; margin-bottom: .8rem; color: #444; }
 #drop.over { border-color: #1a5fb4; background: #eef4fc; }
 #status { min-height: 1.4rem; margin: .4rem 0; } #status.error { color: #a00; } #status.weak { color: #8a5a00; }
 #results { list-style: none; padding: 0; display: grid; gap: .8rem;
            grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); }
 #results.captions { grid-template-columns: 1fr; }
 .hit { margin: 0; padding: .3rem; border-radius: 4px; } .hit img { width: 128px; height: 128px; object-fit: contain;
 background: #f4f4f4; image-rendering: pixelated; display: block; margin: 0 auto; }
 .name { font-size: .8rem; color: #333; word-break: break-all; } .caption { font-size: .85rem; }
 .score { font-size: .75rem; color: #666; } .hit.weak { opacity: .55; }
 .badge { font-size: .7rem; background: #f6e7c8; color: #6b4500; border-radius: 3px; padding: 0 .3rem; }
 button.like { font-size: .75rem; }
</style></head>
<body><main>
<h1>vclr search</h1>
<form id="search" role="search">
 <label for="query">Search the images by text</label>
 <input id="query" type="search" name="q" placeholder="__PLACEHOLDER__" maxlength="__MAX_CHARS__" autofocus>
 <label for="k">results</label><input id="k" type="number" name="k" value="12" min="1" max="__MAX_K__">
 <button type="submit">Search</button>
</form>
<div id="drop">
 <label for="upload">Or search by an image: drop it here, or choose a file</label>
 <input id="upload" type="file" name="file" accept="image/*">
 <label><input id="want-images" type="checkbox" checked> find similar images__CAPTION_CHOICE__</label>
</div>
<div id="status" role="status" aria-live="polite"></div>
<ol id="results" aria-label="results"></ol>
</main>
<script>
const $ = (id) => document.getElementById(id);
const results = $("results"), status = $("status"), box = $("query");
const k = () => $("k").value;
function say(text, kind) { status.textContent = text; status.className = kind || ""; }
function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
function scoreLine(hit) {
  const line = el("div", "score", `#${hit.rank} · score ${hit.score.toFixed(3)}`);
  if (hit.weak) { line.append(" "); line.append(el("span", "badge", "weak match")); }
  return line;
}
async function show(request, what) {
  say("searching…"); results.replaceChildren();
  let response, body;
  try { response = await request; body = await response.json(); }
  catch (error) { say("the search service did not answer: " + error, "error"); return; }
  if (response.status === 401) {  // the service needs a key: kept in a cookie, which <img> requests carry too
    const key = window.prompt("This search service needs an API key:");
    if (key) { document.cookie = `vclr_key=${encodeURIComponent(key)}; path=/; SameSite=Strict`; fromAddress(false); }
    else say(body.error, "error");
    return;
  }
  if (!response.ok) { say(body.error, "error"); return; }
  results.className = body.hits.length && body.hits[0].kind === "caption" ? "captions" : "";
  for (const hit of body.hits) {
    const item = el("li", "hit" + (hit.weak ? " weak" : ""));
    if (hit.kind === "image") {
      const img = el("img"), like = el("button", "like", "more like this");
      img.src = hit.url; img.alt = hit.caption || hit.value; img.loading = "lazy";
      like.type = "button"; like.setAttribute("aria-label", `more images like ${hit.value}`);
      like.addEventListener("click", () => search({like: hit.id}));
      item.append(img, el("div", "name", hit.value));
      if (hit.caption) item.append(el("div", "caption", hit.caption));
      item.append(scoreLine(hit), like);
    } else {
      item.append(el("div", "caption", hit.value), scoreLine(hit));
    }
    results.append(item);
  }
  if (!body.hits.length) say("no results");
  else if (body.hits.every((hit) => hit.weak))
    say(`No strong match for ${what}: every result scores no better than unrelated pairs do by chance ` +
        "in this collection.", "weak");
  else say(`${body.hits.length} results for ${what}`);
}
function search(params, push = true) {
  if (push) history.pushState(params, "", "?" + new URLSearchParams(params));
  if (params.q !== undefined) {
    box.value = params.q;
    if (!params.q.trim()) {
      results.replaceChildren(); say("Type what you are looking for, or drop an image.", "error"); return;
    }
    show(fetch("api/search?" + new URLSearchParams({text: params.q, k: k()})), `“${params.q.trim()}”`);
  } else if (params.like !== undefined) {
    show(fetch(`api/like/${params.like}?k=${k()}`), `images like #${params.like}`);
  }
}
function fromAddress(push) {
  const address = new URLSearchParams(location.search);
  if (address.has("k")) $("k").value = address.get("k");
  if (address.has("q")) search({q: address.get("q")}, push);
  else if (address.has("like")) search({like: address.get("like")}, push);
  else { results.replaceChildren(); say(""); }
}
function searchImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { say(`${file.name} is not an image`, "error"); return; }
  const data = new FormData(); data.append("file", file);
  const images = $("want-images").checked;
  history.pushState({}, "", location.pathname);
  show(fetch(`api/search/image?k=${k()}&images=${images}`, {method: "POST", body: data}), file.name);
}
$("search").addEventListener("submit", (event) => { event.preventDefault(); search({q: box.value}); });
$("upload").addEventListener("change", (event) => searchImage(event.target.files[0]));
const drop = $("drop");
for (const name of ["dragenter", "dragover"])
  document.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) drop.classList.remove("over"); });
document.addEventListener("drop", (event) => {
  event.preventDefault(); drop.classList.remove("over");
  searchImage(event.dataTransfer.files[0]);
});
document.addEventListener("keydown", (event) => {  // "/" jumps to the search box, as on most search pages
  if (event.key === "/" && document.activeElement !== box) { event.preventDefault(); box.focus(); }
});
window.addEventListener("popstate", () => fromAddress(false));
fromAddress(false);
</script></body></html>
"""


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
            "index and fetch its images; pass --api-key (or set VCLR_API_KEY) to require a key")


def create_app(searcher: Searcher | LiveIndex, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               limits: ServiceLimits = ServiceLimits(), access: Access = Access()):
    """The service over a searcher, or over a live index (new saves of the index are served as they appear)."""
    from fastapi import FastAPI, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

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

    def render(query: dict):
        """Image hits by file name, first caption and URL (never the server's paths), caption hits by their text;
        `weak`: no better than unrelated pairs score (vclr.calibration); made in the worker, from the version of the
        index that it searched."""
        def answer(version: Searcher, hits) -> dict:
            captions = version.first_captions(hits)
            return {**query, "index_version": version.index.version, "hits": [
                {"rank": h.rank, "score": h.score, "id": h.id, "weak": h.weak,
                 **({"kind": "image", "value": Path(h.path).name, "caption": caption, "url": f"api/image/{h.id}"}
                    if h.path is not None else {"kind": "caption", "value": h.caption})}
                for h, caption in zip(hits, captions)]}

        return answer

    page_html = _page(live.current)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return page_html

    @app.get("/api/info")
    def info():
        return {**live.current.index.manifest, "index_version": live.current.index.version}

    @app.get("/api/stats")
    def stats():
        return engine.stats()

    @app.get("/api/search")
    async def search_text(text: str = Query(""), k: int = Query(10)):
        text = check_text_query(text)
        check_k(k)
        return JSONResponse(await engine.submit(TextQuery(text, k), render({"query": text, "k": k})))

    @app.get("/api/like/{image_id}")
    async def like(image_id: int, k: int = Query(10)):
        check_k(k)
        return JSONResponse(await engine.submit(LikeQuery(image_id, k), render({"id": image_id, "k": k})))

    @app.post("/api/search/image")
    async def search_image(file: UploadFile, k: int = Query(10), images: bool = Query(False)):
        check_k(k)  # before reading up to 8 MB
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return _too_large(max_upload_bytes)
        return JSONResponse(await engine.submit(ImageQuery(data, k, images or None), render({"k": k})))

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


def _page(searcher: Searcher) -> str:
    """The page, with an example query from the collection's own captions."""
    example = searcher.index.store.first_captions([0])[0] if searcher.has_captions else None
    placeholder = f"e.g. {example}" if example else "describe what you are looking for"
    choice = " (unticked: the captions that match it)" if searcher.has_captions else ""
    values = {"__PLACEHOLDER__": html.escape(placeholder[:80], quote=True), "__MAX_CHARS__": str(MAX_QUERY_CHARS),
              "__MAX_K__": str(MAX_K), "__CAPTION_CHOICE__": choice}
    page = PAGE
    for key, value in values.items():
        page = page.replace(key, value)
    return page


def serve(index_dir: str, source: ModelSource | None = None, host: str = "127.0.0.1", port: int = 8000,
          mmap: bool = False, limits: ServiceLimits = ServiceLimits(), access: Access = Access(),
          onnx_dir: str | None = None) -> None:
    """`source`: the model that embeds queries (default: the one the index records); `onnx_dir`: answer through
    that ONNX export instead (vclr.onnx_query: onnxruntime, no torch).

    One uvicorn worker process on one event loop: the index and the model are in memory once, and every query is
    computed by the one worker thread of the QueryEngine (more processes would each hold the index and compete for
    the same cores). uvicorn answers 503 itself past `MAX_CONNECTIONS` open connections."""
    import uvicorn

    encoder = None
    if onnx_dir:
        from vclr.onnx_query import OnnxQueryEncoder

        encoder = OnnxQueryEncoder.load(onnx_dir, threads=limits.thread_count)
    live = LiveIndex(Searcher.open(index_dir, source, mmap=mmap, encoder=encoder))
    live.watch(limits.reload_every_s)
    uvicorn.run(create_app(live, limits=limits, access=access), host=host, port=port, log_level="warning",
                limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=5)

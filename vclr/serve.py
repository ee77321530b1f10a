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

Bounds: 1 <= k <= MAX_K, text up to MAX_QUERY_CHARS, uploads up to `max_upload_bytes`; errors are JSON
{"error": "..."} with a 4xx status.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (UploadFile, imported lazily
# inside create_app) at runtime
import html
import io
import logging
import mimetypes
from pathlib import Path

from vclr.config import VclrError
from vclr.model_source import ModelSource
from vclr.query_limits import MAX_K, MAX_QUERY_CHARS, check_k
from vclr.search import Searcher

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # refused from the image header, before decoding

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


def create_app(searcher: Searcher, max_upload_bytes: int = MAX_UPLOAD_BYTES):
    from fastapi import FastAPI, Query, Request, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    app = FastAPI(title="vclr search", docs_url=None, redoc_url=None)

    @app.exception_handler(VclrError)
    async def user_error(request: Request, exc: VclrError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        logger.exception("search service error")
        return JSONResponse({"error": "internal error"}, status_code=500)

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    def hits_json(hits) -> list[dict]:
        """Image hits by file name, first caption and URL (never the server's paths), caption hits by their text;
        `weak`: no better than unrelated pairs score (vclr.calibration)."""
        captions = searcher.first_captions(hits)
        return [{"rank": h.rank, "score": h.score, "id": h.id, "weak": h.weak,
                 **({"kind": "image", "value": Path(h.path).name, "caption": caption, "url": f"api/image/{h.id}"}
                    if h.path is not None else {"kind": "caption", "value": h.caption})}
                for h, caption in zip(hits, captions)]

    page_html = _page(searcher)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return page_html

    @app.get("/api/info")
    def info():
        return searcher.index.manifest

    @app.get("/api/search")
    def search_text(text: str = Query(""), k: int = Query(10)):
        hits = searcher.by_text(text, k)  # checks the query and k
        return {"query": text.strip(), "k": k, "hits": hits_json(hits)}

    @app.get("/api/like/{image_id}")
    def like(image_id: int, k: int = Query(10)):
        return {"id": image_id, "k": k, "hits": hits_json(searcher.like(image_id, k))}

    @app.post("/api/search/image")
    async def search_image(file: UploadFile, k: int = Query(10), images: bool = Query(False)):
        check_k(k)  # before reading up to 8 MB; the search itself takes k as checked
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            return JSONResponse({"error": f"upload too large: the limit is {max_upload_bytes} bytes"},
                                status_code=413)
        embedding = searcher.embed_images([_decode_upload(data)])  # (1, d)
        return {"k": k, "hits": hits_json(searcher.by_image_embedding(embedding, k, images=images or None))}

    @app.get("/api/image/{image_id}")
    def image(image_id: int):
        total = searcher.index.store.count("images")
        if not 0 <= image_id < total or image_id in set(searcher.index.store.deleted_ids("images").tolist()):
            return JSONResponse({"error": f"no image with id {image_id}"}, status_code=404)
        path = Path(searcher.index.store.image_paths([image_id])[0])
        if not path.is_file():
            return JSONResponse({"error": f"image {image_id} is indexed but its file is gone"}, status_code=404)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    return app


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


def _decode_upload(data: bytes):
    """The training data's decoder (pixel limit from the header, any mode to RGB), with the upload's own limit."""
    from vclr.data.dataset import read_image

    if not data:
        raise VclrError("the upload is empty: send an image file in the 'file' field")
    image = read_image(io.BytesIO(data), max_pixels=MAX_UPLOAD_PIXELS)
    if image is None:
        raise VclrError(f"the upload is not a readable image (JPEG, PNG, WebP...) of at most {MAX_UPLOAD_PIXELS} "
                        "pixels")
    return image


def serve(index_dir: str, source: ModelSource | None = None, host: str = "127.0.0.1", port: int = 8000,
          mmap: bool = False) -> None:
    """`source`: the model that embeds queries (default: the one the index records)."""
    import uvicorn

    searcher = Searcher.open(index_dir, source, mmap=mmap)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this machine can query the index", host)
    uvicorn.run(create_app(searcher), host=host, port=port, log_level="warning")

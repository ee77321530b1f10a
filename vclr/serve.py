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
import io
import logging
import mimetypes
from pathlib import Path

from vclr.config import VclrError
from vclr.embed import embed_pil_images
from vclr.model_source import ModelSource
from vclr.search import MAX_K, MAX_QUERY_CHARS, Searcher, check_k

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_UPLOAD_PIXELS = 40_000_000  # refused from the image header, before decoding

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>vclr search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
 form { display: flex; gap: .5rem; margin-bottom: 1rem; }
 input[type=text] { flex: 1; font-size: 1.1rem; padding: .4rem; }
 #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: .8rem; }
 figure { margin: 0; text-align: center; } figure img { width: 128px; height: 128px; object-fit: contain;
 background: #f4f4f4; image-rendering: pixelated; } figcaption { font-size: .8rem; color: #555; }
 #status { color: #a00; min-height: 1.2rem; }
</style></head>
<body>
<h1>vclr search</h1>
<form id="search"><input id="query" type="text" name="text" placeholder="a large red circle on the left"
 maxlength="__MAX_CHARS__" autofocus><input id="k" type="number" name="k" value="12" min="1" max="__MAX_K__">
<button type="submit">Search</button></form>
<form id="by-image"><label>or an image: <input id="upload" type="file" name="file" accept="image/*"></label>
<label><input id="want-images" type="checkbox" checked> find images</label></form>
<div id="status"></div>
<div id="results"></div>
<script>
const form = document.getElementById("search"), results = document.getElementById("results"),
      status = document.getElementById("status"), k = () => document.getElementById("k").value;
async function show(request) {
  status.textContent = ""; results.replaceChildren();
  const response = await request;
  const body = await response.json();
  if (!response.ok) { status.textContent = body.error; return; }
  for (const hit of body.hits) {
    const figure = document.createElement("figure"), caption = document.createElement("figcaption");
    figure.className = "hit";
    if (hit.kind === "image") {
      const img = document.createElement("img"), like = document.createElement("button");
      img.src = hit.url; img.alt = hit.value;
      like.className = "like"; like.textContent = "more like this";
      like.addEventListener("click", () => show(fetch(`api/like/${hit.id}?k=${k()}`)));
      caption.textContent = `#${hit.rank} · ${hit.score.toFixed(3)}`;
      figure.append(img, caption, like);
    } else {
      caption.textContent = `#${hit.rank} · ${hit.score.toFixed(3)} · ${hit.value}`;
      figure.append(caption);
    }
    results.append(figure);
  }
  if (!body.hits.length) status.textContent = "no results";
}
form.addEventListener("submit", (event) => {
  event.preventDefault();
  show(fetch("api/search?" + new URLSearchParams({text: document.getElementById("query").value, k: k()})));
});
document.getElementById("upload").addEventListener("change", (event) => {
  const data = new FormData(); data.append("file", event.target.files[0]);
  const images = document.getElementById("want-images").checked;
  show(fetch(`api/search/image?k=${k()}&images=${images}`, {method: "POST", body: data}));
});
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
        """Image hits by file name and URL (never the server's paths), caption hits by their text."""
        return [{"rank": h.rank, "score": h.score, "id": h.id,
                 **({"kind": "image", "value": Path(h.path).name, "url": f"api/image/{h.id}"} if h.path is not None
                    else {"kind": "caption", "value": h.caption})} for h in hits]

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.replace("__MAX_CHARS__", str(MAX_QUERY_CHARS)).replace("__MAX_K__", str(MAX_K))

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
        embedding = embed_pil_images(searcher.model, [_decode_upload(data)])  # (1, d)
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

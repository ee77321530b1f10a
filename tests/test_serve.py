"""The search service: JSON API bounds and errors (FastAPI TestClient), and the web page in headless Chromium."""

import io
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import free_port
from vclr.config import load_config, save_config
from vclr.index import RetrievalIndex
from vclr.search import Searcher, build_index


@pytest.fixture(scope="module")
def searcher(small_shapes, tmp_path_factory):
    """An index of the small test split, embedded by an untrained tiny model (the service, not the model, is tested)."""
    import torch
    from safetensors.torch import save_file

    from vclr.model import build_model

    run = tmp_path_factory.mktemp("serve_run")
    cfg = load_config(None, [f"train.output_dir={run}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_config(cfg, run / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    index_dir = run.parent / "serve_index"
    build_index(run, str(small_shapes / "test"), index_dir)
    return Searcher.open(index_dir)


@pytest.fixture(scope="module")
def client(searcher):
    from fastapi.testclient import TestClient

    from vclr.serve import create_app

    return TestClient(create_app(searcher, max_upload_bytes=200_000))


def _png(size=(64, 64), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_text_search_returns_k_hits_with_image_urls(client, searcher):
    response = client.get("/api/search", params={"text": "a red circle", "k": 7})
    assert response.status_code == 200
    hits = response.json()["hits"]
    assert [h["rank"] for h in hits] == list(range(1, 8))
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    image = client.get(hits[0]["url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == Path(searcher.index.store.image_paths([hits[0]["id"]])[0]).read_bytes()


@pytest.mark.parametrize("params, status, message", [
    ({"text": "a red circle", "k": 0}, 400, "k must be an integer from 1 to 1000"),
    ({"text": "a red circle", "k": 1001}, 400, "k must be an integer from 1 to 1000"),
    ({"text": "a red circle", "k": "many"}, 422, "k"),
    ({"text": "   ", "k": 5}, 400, "the text query is empty"),
    ({"k": 5}, 400, "the text query is empty"),
    ({"text": "x" * 1001, "k": 5}, 400, "the limit is 1000"),
])
def test_bad_queries_get_json_errors(client, params, status, message):
    response = client.get("/api/search", params=params)
    assert response.status_code == status and message in response.json()["error"]


def test_image_upload_searches_captions(client):
    response = client.post("/api/search/image", params={"k": 3}, files={"file": ("q.png", _png(), "image/png")})
    assert response.status_code == 200
    hits = response.json()["hits"]
    assert len(hits) == 3 and all(isinstance(h["value"], str) and h["value"] for h in hits)
    assert {h["kind"] for h in hits} == {"caption"}


def test_image_upload_can_ask_for_images_and_more_like_this(searcher, client):
    """image -> images, and "more like this" by id: the index's own vectors, by brute force."""
    import numpy as np

    response = client.post("/api/search/image", params={"k": 4, "images": "true"},
                           files={"file": ("q.png", _png(), "image/png")})
    hits = response.json()["hits"]
    assert response.status_code == 200 and [h["kind"] for h in hits] == ["image"] * 4
    assert all(h["url"] == f"api/image/{h['id']}" and "/" not in h["value"] for h in hits)  # no server paths
    like = client.get("/api/like/5", params={"k": 3}).json()["hits"]
    scores = searcher.index.image_embeddings @ searcher.index.image_embeddings[5]  # (N,) brute force
    scores[5] = -np.inf  # itself left out
    assert np.allclose([h["score"] for h in like], np.sort(scores)[::-1][:3], atol=1e-5)  # near-ties may swap ids
    assert 5 not in [h["id"] for h in like] and all(np.isclose(scores[h["id"]], h["score"], atol=1e-5) for h in like)
    assert client.get("/api/like/99999").status_code == 400


@pytest.mark.parametrize("payload, status, message", [
    (b"x" * 200_001, 413, "upload too large"),
    (b"", 400, "the upload is empty"),
    (b"GIF89a this is not really an image", 400, "not a readable image"),
])
def test_bad_uploads_get_json_errors(client, payload, status, message):
    response = client.post("/api/search/image", files={"file": ("q.png", payload, "image/png")})
    assert response.status_code == status and message in response.json()["error"]


@pytest.mark.parametrize("path", ["/api/image/../../etc/passwd", "/api/image/..%2F..%2Fetc%2Fpasswd",
                                  "/api/image/%2Fetc%2Fpasswd", "/api/image/-1", "/api/image/999999",
                                  "/etc/passwd", "/../config.yaml"])
def test_only_indexed_files_are_served(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422)
    assert b"root:" not in response.content


def test_deleted_images_are_not_served(searcher, tmp_path):
    """`vclr index-delete` on a copy of the index, then a service over that copy (the shared one stays whole)."""
    from fastapi.testclient import TestClient

    from vclr.cli import main
    from vclr.serve import create_app

    index_dir = tmp_path / "index"
    shutil.copytree(Path(searcher.index.manifest["model_source"]["run_dir"]).parent / "serve_index", index_dir)
    client = TestClient(create_app(Searcher(RetrievalIndex.load(index_dir), searcher.model, searcher.cfg)))
    hit = client.get("/api/search", params={"text": "a blue square", "k": 1}).json()["hits"][0]
    assert main(["index-delete", "--index", str(index_dir), "--image-ids", str(hit["id"])]) == 0
    client = TestClient(create_app(Searcher(RetrievalIndex.load(index_dir), searcher.model, searcher.cfg)))
    assert client.get(f"/api/image/{hit['id']}").status_code == 404
    again = client.get("/api/search", params={"text": "a blue square", "k": 5}).json()["hits"]
    assert hit["id"] not in [h["id"] for h in again]
    assert client.get("/api/info").json()["deleted_images"] == 1


def test_info_reports_the_index(client):
    info = client.get("/api/info").json()
    assert info["num_images"] == 200 and info["index"]["images"]["kind"] == "flat"


# ------------------------------------------------------------------------------------------ the page, in a browser


@pytest.fixture(scope="module")
def server(searcher):
    import uvicorn

    from vclr.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=5)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium + chromedriver (Debian: apt-get install "
                    "chromium chromium-driver; `make test` installs them when it can)")
def test_search_page_in_headless_chromium(server, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server)
        assert driver.title == "vclr search"
        box = driver.find_element(By.ID, "query")
        box.send_keys("a large red circle on the left")
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "figure.hit img")) == 12)
        # every result image really loaded (decoded, non-zero size), and shows its rank and score
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('figure.hit img')].every(i => i.complete && i.naturalWidth > 0)"))
        captions = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "figure.hit figcaption")]
        assert captions[0].startswith("#1 ·") and captions[-1].startswith("#12 ·")
        # the screenshot goes to $VCLR_TEST_ARTIFACTS when set (to look at), else into the test's temp dir
        artifacts = Path(os.environ.get("VCLR_TEST_ARTIFACTS") or tmp_path)
        artifacts.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(artifacts / "search_page.png"))
        assert (artifacts / "search_page.png").stat().st_size > 5000

        box.clear()
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()  # empty query: the API's error shows
        wait.until(lambda d: "empty" in d.find_element(By.ID, "status").text)
    finally:
        driver.quit()

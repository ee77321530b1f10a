"""The search service: JSON API bounds and errors (FastAPI TestClient), and the web page in headless Chromium."""

import io
import os
import shutil
from pathlib import Path

import pytest
from helpers import served, untrained_index
from PIL import Image

from vclr.index.format import RetrievalIndex
from vclr.search.searcher import Searcher


@pytest.fixture(scope="module")
def searcher(small_shapes, tmp_path_factory):
    """An index of the small test split, embedded by an untrained tiny model (the service, not the model, is tested)."""
    index_dir = untrained_index(small_shapes / "test", tmp_path_factory.mktemp("serve_run"))
    return Searcher.open(index_dir)


@pytest.fixture(scope="module")
def client(searcher):
    from fastapi.testclient import TestClient

    from vclr.serve.app import create_app

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
    from vclr.serve.app import create_app

    index_dir = tmp_path / "index"
    run = Path(searcher.index.manifest["model_source"]["run_dir"])
    shutil.copytree(run.parent / f"{run.name}_index", index_dir)
    client = TestClient(create_app(Searcher(RetrievalIndex.load(index_dir), searcher.encoder)))
    hit = client.get("/api/search", params={"text": "a blue square", "k": 1}).json()["hits"][0]
    assert main(["index-delete", "--index", str(index_dir), "--image-ids", str(hit["id"])]) == 0
    client = TestClient(create_app(Searcher(RetrievalIndex.load(index_dir), searcher.encoder)))
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
    from vclr.serve.app import create_app

    with served(create_app(searcher)) as url:
        yield url + "/"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def _all_weak_query(client) -> str:
    """A query about nothing the collection holds, as the API judges it (the first of a few that is all weak)."""
    for text in ("pizza", "a violin on a piano", "zebra", "the eiffel tower", "a bowl of soup", "a rocket"):
        hits = client.get("/api/search", params={"text": text, "k": 6}).json()["hits"]
        if all(hit["weak"] for hit in hits):
            return text
    pytest.fail("every candidate query has a hit stronger than unrelated pairs")


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium + chromedriver (Debian: apt-get install "
                    "chromium chromium-driver; `make test` installs them when it can)")
def test_search_page_in_headless_chromium(server, client, searcher, tmp_path):
    """Each state a user meets, with a screenshot of it: the empty page, a deep link, a keyboard search and the back
    button, a query about nothing in the collection, an empty query, a file-picker upload, a drag-and-drop upload
    for captions, "more like this", a combined filtered query and its next page; labels and alt text throughout."""
    from urllib.parse import quote_plus

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 20)
    # screenshots go to $VCLR_TEST_ARTIFACTS when set (`make test`: test-artifacts/), else into the test's temp dir
    artifacts = Path(os.environ.get("VCLR_TEST_ARTIFACTS") or tmp_path) / "search-page"
    artifacts.mkdir(parents=True, exist_ok=True)

    def shot(name):
        driver.save_screenshot(str(artifacts / f"{name}.png"))
        assert (artifacts / f"{name}.png").stat().st_size > 5000

    def status():
        return driver.find_element(By.ID, "status").text

    def hits():
        return driver.find_elements(By.CSS_SELECTOR, "#results li.hit")

    def loaded(count):
        wait.until(lambda d: len(hits()) == count and d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))

    caption = searcher.index.store.texts([0])[0]
    paths = searcher.index.store.image_paths()
    try:
        driver.get(server)  # 1. the empty page: an example query from the collection, every input labelled
        assert driver.title == "vclr search"
        box = driver.find_element(By.ID, "query")
        assert box.get_attribute("placeholder") == f"e.g. {searcher.index.store.first_captions([0])[0]}"
        assert driver.execute_script("return [...document.querySelectorAll('input')].every(i => i.labels.length)")
        assert driver.find_element(By.ID, "status").get_attribute("aria-live") == "polite"
        shot("1-empty")

        driver.get(f"{server}?q={quote_plus(caption)}&k=12")  # 2. a deep link searches at once
        loaded(12)
        first = hits()[0]
        api = client.get("/api/search", params={"text": caption, "k": 12}).json()["hits"]
        assert first.find_element(By.CLASS_NAME, "name").text == api[0]["value"]  # file name, caption, score
        assert first.find_element(By.CLASS_NAME, "caption").text == api[0]["caption"]
        assert first.find_element(By.CLASS_NAME, "score").text.startswith("#1 · score ")
        assert driver.find_element(By.ID, "query").get_attribute("value") == caption
        assert all(img.get_attribute("alt") for img in driver.find_elements(By.CSS_SELECTOR, "#results img"))
        assert [len(h.find_elements(By.CLASS_NAME, "badge")) for h in hits()] == [int(h["weak"]) for h in api]
        shot("2-deep-link")

        unrelated = _all_weak_query(client)  # 3. typed and sent with Enter: the address follows the query
        box = driver.find_element(By.ID, "query")
        box.clear()
        box.send_keys(unrelated, Keys.ENTER)
        wait.until(lambda d: "No strong match" in status())
        assert driver.current_url.endswith(f"?q={quote_plus(unrelated)}")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results .badge")) == len(hits()) > 0
        shot("3-weak-matches")
        driver.back()  # the browser's back button returns to the previous search
        wait.until(lambda d: d.find_element(By.ID, "query").get_attribute("value") == caption)
        loaded(12)

        box = driver.find_element(By.ID, "query")  # 4. an empty query, in the page's words
        box.clear()
        box.send_keys(Keys.ENTER)
        wait.until(lambda d: "Type what you are looking for" in status())
        assert not hits()
        shot("4-empty-query")

        query_image = Path(paths[5])  # 5. an image from the file picker: similar images, itself first
        driver.find_element(By.ID, "upload").send_keys(str(query_image))
        loaded(12)
        top = hits()[0]
        assert top.find_element(By.CLASS_NAME, "name").text == query_image.name
        with open(query_image, "rb") as f:  # the page marks weak matches as the API judges them
            api_image = client.post("/api/search/image?k=12&images=true", files={"file": f}).json()["hits"]
        assert [len(h.find_elements(By.CLASS_NAME, "badge")) for h in hits()] == [int(h["weak"]) for h in api_image]
        shot("5-image-upload")

        driver.find_element(By.ID, "want-images").click()  # 6. dropped on the page, unticked: captions
        driver.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch("api/image/7").then(r => r.blob()).then(blob => {
              const data = new DataTransfer();
              data.items.add(new File([blob], "dropped.png", {type: blob.type}));
              document.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
              done();
            });""")
        wait.until(lambda d: "dropped.png" in status())
        shown = [h.find_element(By.CLASS_NAME, "caption").text for h in hits()]
        assert len(shown) == 12 and set(shown) <= set(searcher.index.store.texts())
        assert not driver.find_elements(By.CSS_SELECTOR, "#results img")
        shot("6-dropped-image-captions")

        driver.get(server + "?q=" + quote_plus(caption))  # 7. more like this, by keyboard
        loaded(12)
        like = hits()[2].find_element(By.CLASS_NAME, "like")
        like_id = api[2]["id"]
        like.send_keys(Keys.ENTER)
        wait.until(lambda d: d.current_url.endswith(f"?like={like_id}") and f"images like #{like_id}" in status())
        loaded(12)
        shot("7-more-like-this")

        # 8. a combined, filtered query from the form: "but not", a folder, date order; then "more results"
        driver.get(server)
        box = driver.find_element(By.ID, "query")
        box.send_keys("a red circle")
        driver.find_element(By.ID, "not").send_keys("blue")
        driver.find_element(By.ID, "folder").send_keys("**")
        driver.find_element(By.CSS_SELECTOR, "#sort option[value=date]").click()
        driver.find_element(By.CSS_SELECTOR, "#search button[type=submit]").click()
        wait.until(lambda d: "not=blue" in d.current_url and "sort=date" in d.current_url)
        loaded(12)
        params = {"text": "a red circle", "not_text": "blue", "folder": "**", "sort": "date", "k": 12}
        api = client.get("/api/search", params=params).json()["hits"]  # the page shows what the API answers
        assert [h.find_element(By.CLASS_NAME, "name").text for h in hits()] == [h["value"] for h in api]
        driver.find_element(By.ID, "more").click()  # the next page, appended, ranks continuing
        loaded(24)
        after = client.get("/api/search", params={**params, "offset": 12}).json()["hits"]
        assert [h.find_element(By.CLASS_NAME, "name").text for h in hits()[12:]] == [h["value"] for h in after]
        assert hits()[12].find_element(By.CLASS_NAME, "score").text.startswith("#13 · score ")
        shot("8-filtered-and-more")
    finally:
        driver.quit()

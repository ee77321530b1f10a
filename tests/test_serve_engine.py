"""The search service under load: micro-batching equals one-at-a-time, the query cache, 503 on overload and timeout,
live index updates swapped in whole while clients query, and the hardening options (API key, rate limit, CORS,
body limits, the warning for public addresses)."""

import asyncio
import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import free_port, untrained_index
from PIL import Image

from vclr.cli import main
from vclr.errors import Overloaded, TimedOut
from vclr.index.build import delete_from_index
from vclr.index.format import RetrievalIndex
from vclr.search.calibration import NULL_PHRASES
from vclr.search.limits import ServiceLimits
from vclr.search.searcher import Searcher
from vclr.serve.app import Access, RateLimiter, create_app, exposure_warning
from vclr.serve.engine import ImageQuery, LiveIndex, QueryEngine, TextQuery

TEXTS = ["a red circle", "two blue squares", "a small green triangle at the top", "a big yellow star",
         "three purple circles", "a square", "an orange triangle on the left", "red", "blue things", "a shape"]


@pytest.fixture(scope="module")
def index_dir(small_shapes, tmp_path_factory):
    return untrained_index(small_shapes / "test", tmp_path_factory.mktemp("load") / "run")


@pytest.fixture(scope="module")
def searcher(index_dir):
    return Searcher.open(index_dir)


def _ids(hits) -> list[int]:
    return [h.id if hasattr(h, "id") else h["id"] for h in hits]


def _render(searcher, hits) -> dict:
    return {"version": searcher.index.version, "hits": [{"id": h.id, "score": h.score} for h in hits]}


def _png(color=(200, 30, 30), size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def test_batched_answers_equal_one_at_a_time(searcher):
    """Forty text queries of several k and eight image queries at once are embedded and searched in batches; each
    answer equals the same query asked alone."""
    engine = QueryEngine(LiveIndex(searcher), ServiceLimits(batch_wait_ms=50, cache_size=0))
    queries = [TextQuery(text, k) for text in TEXTS for k in (1, 3, 7, 20)]
    colors = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (250, 250, 0)]
    images = [ImageQuery(_png(c), k, images) for c in colors for k, images in ((4, True), (6, None))]

    async def ask_all():
        return await asyncio.gather(*[engine.submit(q, _render) for q in queries + images])

    answers = asyncio.run(ask_all())
    assert engine.largest_batch > 10 and engine.batches < len(answers) / 4
    for query, answer in zip(queries, answers):
        alone = searcher.by_text(query.text, query.k)
        assert _ids(answer["hits"]) == _ids(alone)
        np.testing.assert_allclose([h["score"] for h in answer["hits"]], [h.score for h in alone], atol=1e-5)
    for query, answer in zip(images, answers[len(queries):]):
        vector = searcher.embed_images([Image.open(io.BytesIO(query.data)).convert("RGB")])
        assert _ids(answer["hits"]) == _ids(searcher.by_image_embedding(vector, query.k, query.images))


class _Observed:
    """A searcher's encoder with `before(texts)` called ahead of each text embedding (a spy, or a slow machine)."""

    def __init__(self, inner, before):
        self.inner, self.before = inner, before

    def embed_texts(self, texts):
        self.before(texts)
        return self.inner.embed_texts(texts)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_repeated_text_queries_come_from_the_cache(searcher):
    calls = []
    # the weak-match calibration's own null queries go to the encoder once, around the cache: not counted here
    observed = Searcher(searcher.index, _Observed(searcher.encoder, lambda texts: calls.append(list(texts))
                                                  if list(texts) != list(NULL_PHRASES) else None))
    engine = QueryEngine(LiveIndex(observed), ServiceLimits(cache_size=4))

    async def ask(texts):
        return [await engine.submit(TextQuery(t, 5), _render) for t in texts]

    first = asyncio.run(ask(["a red circle", "a blue square", "a red circle"]))
    assert calls == [["a red circle"], ["a blue square"]]  # the third was answered from the cache
    assert first[0] == first[2]
    asyncio.run(ask(TEXTS[1:6] + ["a red circle"]))  # capacity 4: the oldest entries were dropped
    assert calls[-1] == ["a red circle"]
    assert engine.stats()["cache"]["hits"] == 1


def test_a_text_asked_twice_in_one_batch_is_embedded_once(searcher):
    calls = []
    once = Searcher(searcher.index, _Observed(searcher.encoder, lambda texts: calls.append(list(texts))))
    vectors = once.embed_texts(["a red circle", "a star", "a red circle"])
    assert calls == [["a red circle", "a star"]]
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(vectors, searcher.embed_texts(["a red circle", "a star", "a red circle"]), atol=1e-6)


def _slow(searcher, seconds: float) -> Searcher:
    """The searcher with a text embedding that takes `seconds` (a busy machine)."""
    return Searcher(searcher.index, _Observed(searcher.encoder, lambda texts: time.sleep(seconds)))


def test_overload_is_answered_503_at_once(searcher):
    app = create_app(_slow(searcher, 0.3), limits=ServiceLimits(max_batch=1, max_queue=2, cache_size=0))

    async def flood():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            started = time.monotonic()
            responses = await asyncio.gather(*[client.get("/api/search", params={"text": f"query {i}", "k": 3})
                                               for i in range(8)])
            return responses, time.monotonic() - started

    responses, elapsed = asyncio.run(flood())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(503) >= 4 and set(statuses) == {200, 503}, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "busy" in refused.json()["error"]
    assert elapsed < 0.3 * 5  # the refused ones did not wait their turn


def test_a_query_that_waits_too_long_gets_503(searcher):
    engine = QueryEngine(LiveIndex(_slow(searcher, 0.5)), ServiceLimits(max_batch=1, timeout_s=0.2, cache_size=0))

    async def ask_two():
        return await asyncio.gather(*[engine.submit(TextQuery(t, 3), _render) for t in ("one", "two")],
                                    return_exceptions=True)

    outcomes = asyncio.run(ask_two())
    assert all(isinstance(o, TimedOut) for o in outcomes), outcomes
    assert "0.2 s" in str(outcomes[0])


def test_submit_refuses_past_the_queue_bound_without_queueing(searcher):
    engine = QueryEngine(LiveIndex(_slow(searcher, 0.2)), ServiceLimits(max_batch=1, max_queue=1, cache_size=0))

    async def three():
        return await asyncio.gather(*[engine.submit(TextQuery(t, 3), _render) for t in ("a", "b", "c")],
                                    return_exceptions=True)

    outcomes = asyncio.run(three())
    assert sum(isinstance(o, Overloaded) for o in outcomes) >= 1
    assert sum(isinstance(o, dict) for o in outcomes) >= 1


# ------------------------------------------------------------------------------------------------ live updates


def _live_ids(index: RetrievalIndex) -> set[int]:
    deleted = set(index.store.deleted_ids("images").tolist())
    return {i for i in range(index.store.count("images")) if i not in deleted}


@pytest.mark.slow
def test_live_updates_while_clients_query(index_dir, tmp_path):
    """A writer deletes and adds images in a loop (the library calls behind `vclr index-delete` and `index-add`:
    load, change, save) while four clients query the served index. Every answer is 200 and names its version;
    the hits of a query for every image (k = 1000) are exactly the live images of that version: no answer comes
    from a half-updated index."""
    import uvicorn

    served = tmp_path / "index"
    shutil.copytree(index_dir, served)
    versions = {}  # version -> the ids of its live images
    first = RetrievalIndex.load(served)
    versions[first.version] = _live_ids(first)
    live = LiveIndex(Searcher.open(served))
    live.watch(0.02)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(live), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    answers, stop = [], threading.Event()

    def client(seed: int):
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while not stop.is_set():
                response = http.get("/api/search", params={"text": TEXTS[rng.integers(len(TEXTS))], "k": 1000})
                answers.append((response.status_code, response.json()))

    clients = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for thread in clients:
        thread.start()
    try:
        rng = np.random.default_rng(0)
        for step in range(12):
            if step % 2 == 0:  # what `vclr index-delete` does
                index = RetrievalIndex.load(served)
                doomed = rng.choice(sorted(_live_ids(index)), 15, replace=False).tolist()
                delete_from_index(served, image_ids=doomed)
            else:  # what `vclr index-add` does once the new images are embedded
                index = RetrievalIndex.load(served)
                rows = rng.choice(len(index.image_embeddings), 10, replace=False)
                index.add(index.image_embeddings[rows], [f"added-{step}-{r}.png" for r in rows],
                          np.zeros((0, index.d), np.float32), [], [])
                index.save(served)
            saved = RetrievalIndex.load(served)
            versions[saved.version] = _live_ids(saved)
            time.sleep(0.15)  # let the clients see this version
    finally:
        stop.set()
        for thread in clients:
            thread.join()
        server.should_exit = True
        live.stop()
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    seen = {body["index_version"] for _, body in answers}
    assert len(seen) >= 6 and live.swaps >= 6  # the clients met many versions
    for _, body in answers:
        assert set(_ids(body["hits"])) == versions[body["index_version"]]


def test_a_swap_keeps_the_model_and_cache_when_the_model_is_the_same(index_dir, tmp_path, monkeypatch):
    from vclr.index.text_tower import TextQueryEncoder

    served = tmp_path / "index"
    shutil.copytree(index_dir, served)
    live = LiveIndex(Searcher.open(served))
    old = live.current
    engine = QueryEngine(live, ServiceLimits())
    asyncio.run(engine.submit(TextQuery("a red circle", 3), _render))
    assert not live.check()  # nothing new on disk
    delete_from_index(served, image_ids=[0, 1])
    loads = []
    monkeypatch.setattr(TextQueryEncoder, "load", classmethod(lambda cls, folder: loads.append(folder)))
    assert live.check()
    assert loads == []  # the unchanged traced tower is not read again
    assert live.current is not old and live.current.index.manifest["deleted_images"] == 2
    assert live.current.encoder is old.encoder and live.current.text_cache is old.text_cache
    assert old.encoder.images.loaded  # the model that a service loads at start is kept too


def test_a_damaged_save_is_not_swapped_in(index_dir, tmp_path):
    served = tmp_path / "index"
    shutil.copytree(index_dir, served)
    live = LiveIndex(Searcher.open(served))
    version = live.current.index.version
    (served / "manifest.json").write_text("{not json")
    opened = []
    live._reopen = lambda old: opened.append(1) or old.reopen()
    assert not live.check() and live.current.index.version == version
    assert not live.check() and len(opened) == 1  # the same broken save is not loaded again every second


# ---------------------------------------------------------------------------------------------------- hardening


def test_api_key_is_required_when_set(searcher):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(searcher, access=Access(api_key="s3cret")))
    assert client.get("/").status_code == 200  # the page loads, and asks for the key
    refused = client.get("/api/search", params={"text": "a red circle"})
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    assert client.get("/api/search", params={"text": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/api/search", params={"text": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    client.cookies.set("vclr_key", "s3cret")  # what the page sets: <img> tags send no headers
    assert client.get("/api/image/0").status_code == 200


def test_rate_limit_per_client():
    now = [0.0]
    limiter = RateLimiter(2.0, clock=lambda: now[0])  # 2 a second, bursts of 4
    assert [limiter.allow("a") for _ in range(5)] == [True] * 4 + [False]
    assert limiter.allow("b")  # another client has its own bucket
    now[0] += 0.5  # one more token
    assert limiter.allow("a") and not limiter.allow("a")


def test_rate_limited_requests_get_429(searcher):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(searcher, access=Access(rate_limit=1.0)))
    statuses = [client.get("/api/info").status_code for _ in range(4)]
    assert statuses[:2] == [200, 200] and statuses[-1] == 429


def test_cors_is_off_unless_origins_are_named(searcher):
    from fastapi.testclient import TestClient

    origin = {"Origin": "https://elsewhere.example"}
    plain = TestClient(create_app(searcher)).get("/api/info", headers=origin)
    assert "access-control-allow-origin" not in plain.headers
    allowed = TestClient(create_app(searcher, access=Access(cors_origins=("https://elsewhere.example",))))
    assert allowed.get("/api/info", headers=origin).headers["access-control-allow-origin"] == \
        "https://elsewhere.example"


def test_oversized_bodies_are_refused_from_their_header(searcher):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(searcher, max_upload_bytes=1000))
    response = client.post("/api/search/image", content=b"x" * 100, headers={"Content-Length": str(10**9),
                                                                             "Content-Type": "image/png"})
    assert response.status_code == 413


def test_public_address_warns_without_a_key(monkeypatch, capsys):
    assert exposure_warning("127.0.0.1", Access()) is None
    assert exposure_warning("0.0.0.0", Access(api_key="k")) is None
    assert "without authentication" in exposure_warning("0.0.0.0", Access())
    import vclr.serve.app

    monkeypatch.setattr(vclr.serve.app, "serve", lambda *args, **kwargs: None)
    assert main(["serve", "--index", "x", "--host", "0.0.0.0"]) == 0
    assert "without authentication" in capsys.readouterr().err

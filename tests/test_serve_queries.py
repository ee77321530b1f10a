"""The service answers the same query model as the CLI and the Python API (same hits for the same query), reports
Prometheus metrics, describes itself in a truthful OpenAPI schema, and survives fuzzing from that schema."""

import json
from pathlib import Path

import pytest
from helpers import served, untrained_index

import vclr
from vclr.cli import main


@pytest.fixture(scope="module")
def index_dir(small_shapes, tmp_path_factory):
    return untrained_index(small_shapes / "test", tmp_path_factory.mktemp("queries_run"))


@pytest.fixture(scope="module")
def client(index_dir):
    from fastapi.testclient import TestClient

    from vclr.search.searcher import Searcher
    from vclr.serve.app import create_app

    return TestClient(create_app(Searcher.open(index_dir)))


QUERIES = [  # (CLI flags, HTTP parameters, Python API call)
    (["--text", "a red circle"], {"text": "a red circle"}, (("a red circle",), {})),
    (["--text", "2:a red circle", "--text", "a star", "--not-text", "blue"],
     {"text": ["2:a red circle", "a star"], "not_text": "blue"},
     (("a red circle", "a star"), {"weights": [2, 1], "negatives": ["blue"]})),
    (["--like", "3", "--text", "green"], {"like": 3, "text": "green"}, ((3, "green"), {})),
    (["--text", "a square", "--where", "ext=png", "--after", "2000-01-01", "--sort", "date", "--min-score", "-1"],
     {"text": "a square", "ext": "png", "after": "2000-01-01", "sort": "date", "min_score": -1},
     (("a square",), {"where": {"ext": ["png"], "after": "2000-01-01"}, "sort": "date", "min_score": -1})),
    (["--text", "a square", "--offset", "4"], {"text": "a square", "offset": 4}, (("a square",), {"offset": 4})),
]


@pytest.mark.parametrize("flags, params, call", QUERIES, ids=[" ".join(q[0]) for q in QUERIES])
def test_cli_api_and_service_give_the_same_hits(index_dir, client, capsys, flags, params, call):
    assert main(["search", "--index", str(index_dir), "-k", "6", "--json", *flags]) == 0
    cli = [(h["id"], round(h["score"], 5)) for h in json.loads(capsys.readouterr().out)]
    terms, options = call
    api = [(h.id, round(h.score, 5)) for h in vclr.open_index(index_dir).search(*terms, k=6, **options)]
    response = client.get("/api/search", params={**params, "k": 6})
    assert response.status_code == 200, response.text
    http = [(h["id"], round(h["score"], 5)) for h in response.json()["hits"]]
    assert cli == api == http and len(cli) == 6


def test_an_upload_with_query_parameters_is_a_combined_query(index_dir, client, small_shapes):
    image = sorted((small_shapes / "test").glob("*.png"))[5]
    response = client.post("/api/search/image", params={"k": 4, "text": "a star", "not_text": "red"},
                           files={"file": ("q.png", image.read_bytes(), "image/png")})
    assert response.status_code == 200, response.text
    expected = vclr.open_index(index_dir).search(Path(image), "a star", negatives=["red"], k=4)
    assert [h["id"] for h in response.json()["hits"]] == [h.id for h in expected]


@pytest.mark.parametrize("params, field", [
    ({"text": "x", "colour": "red"}, None),  # an unknown query parameter is ignored, as HTTP APIs do
    ({"text": "x", "after": "june"}, "after"),
    ({"text": "x", "sort": "size"}, "sort"),
    ({"text": "x", "k": 0}, "k must be"),
    ({"text": "x", "offset": -1}, "offset"),
    ({"text": "x", "like": 99999}, "no image with id 99999"),
    ({"text": "x", "not_text": "x"}, "cancel out"),
    ({"k": 5}, "query is empty"),
])
def test_bad_query_parameters_are_a_json_error_naming_the_field(client, params, field):
    response = client.get("/api/search", params=params)
    if field is None:
        assert response.status_code == 200
        return
    assert response.status_code == 400 and field in response.json()["error"], response.text


def test_metrics_in_the_prometheus_text_format(client):
    from prometheus_client.parser import text_string_to_metric_families

    client.get("/api/search", params={"text": "a red circle", "k": 3})
    client.get("/api/search", params={"text": "a red circle", "k": 3})  # from the cache
    client.get("/api/search", params={"text": "x", "k": 0})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    requests = {(s.labels["route"], s.labels["status"]): s.value for s in families["vclr_requests"].samples
                if s.name == "vclr_requests_total"}
    assert requests[("/api/search", "200")] >= 2 and requests[("/api/search", "400")] >= 1
    assert any(s.labels.get("route") == "/api/search" for s in families["vclr_request_seconds"].samples)
    assert families["vclr_text_cache_hits"].samples[0].value >= 1
    assert families["vclr_index_images"].samples[0].value == 200
    assert sum(s.value for s in families["vclr_query_batch_size"].samples if s.name.endswith("_count")) >= 2
    assert families["vclr_queue_depth"].samples[0].value == 0


def test_the_openapi_schema_describes_every_route_and_parameter(client):
    schema = client.get("/openapi.json").json()
    search = schema["paths"]["/api/search"]["get"]
    names = {p["name"] for p in search["parameters"]}
    assert {"text", "not_text", "like", "folder", "after", "before", "ext", "sort", "min_score", "k", "offset"} <= names
    assert {"/api/search", "/api/search/image", "/api/like/{image_id}", "/api/image/{image_id}", "/api/info",
            "/api/stats"} <= set(schema["paths"])
    text = next(p for p in search["parameters"] if p["name"] == "text")
    assert text["schema"]["type"] == "array"  # repeatable, as the service reads it


@pytest.fixture(scope="module")
def live_server(index_dir):
    from vclr.search.searcher import Searcher
    from vclr.serve.app import create_app

    with served(create_app(Searcher.open(index_dir))) as url:
        yield url


@pytest.mark.slow
def test_fuzzing_from_the_schema_finds_no_server_error(live_server):
    """schemathesis generates requests for every API route and parameter from the OpenAPI schema and sends them to
    the running service: no answer is a 5xx other than 503 (overloaded), and the service still answers after."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, given, settings, strategies

    schema = schemathesis.openapi.from_url(f"{live_server}/openapi.json")
    routes = [("/api/search", "GET"), ("/api/search/image", "POST"), ("/api/like/{image_id}", "GET"),
              ("/api/image/{image_id}", "GET"), ("/api/info", "GET"), ("/api/stats", "GET")]
    cases = strategies.one_of([schema[path][method].as_strategy() for path, method in routes])
    sent, failures = [], []

    @settings(max_examples=500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        response = case.call(base_url=live_server, timeout=30)
        sent.append(response.status_code)
        if response.status_code >= 500 and response.status_code != 503:
            failures.append((case.method, case.path, case.query, response.status_code, response.text[:200]))

    while len(sent) < 2000:  # each run of the generator is a fresh draw
        fuzz()
    assert failures == [], failures[:5]
    assert len(set(sent)) > 2  # the generator reached answers of several kinds, not one refusal
    assert httpx.get(f"{live_server}/api/search", params={"text": "a red circle", "k": 3}).status_code == 200

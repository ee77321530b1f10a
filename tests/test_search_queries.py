"""The one query path: combined queries equal a brute-force ranking of rclip's vector, filters return only what they
select (and keep recall on an ANN index), dates come from EXIF, and bad queries are one clear error."""

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vclr
from vclr.data.images import image_facts
from vclr.errors import VclrError
from vclr.index.format import IndexOptions, RetrievalIndex, exact_search
from vclr.index.metadata import folder_matches
from vclr.search.api import Index
from vclr.search.query import Query, parse_query, parse_weighted
from vclr.search.searcher import Searcher

D = 16
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class FakeEncoder:
    """Fixed vectors for texts, and for images by their colour (the test's image files are plain colours)."""

    def __init__(self, rng):
        self.texts, self.colours = {}, {c: _unit(rng.standard_normal(D)) for c in COLOURS}
        self.rng = rng

    def embed_texts(self, texts):
        for text in texts:
            self.texts.setdefault(text, _unit(self.rng.standard_normal(D)))
        return np.stack([self.texts[t] for t in texts])

    def embed_images(self, images):
        return np.stack([self.colours[image.getpixel((0, 0))] for image in images])

    def check_index(self, index):
        pass

    def reopen(self, old, new):
        return self


@pytest.fixture()
def index(tmp_path):
    """300 images in folders by year, dated, with real files (jpg and png) so that image queries can read them."""
    rng = np.random.default_rng(3)
    paths, facts = [], []
    for i in range(300):
        year = 2022 + i % 3
        path = tmp_path / "photos" / str(year) / ("raw" if i % 5 == 0 else "") / f"p{i}.{'jpg' if i % 2 else 'png'}"
        paths.append(str(path))
        taken = dt.datetime(year, 1 + i % 12, 1 + i % 28).timestamp()
        facts.append({"folder": str(Path(path).parent.relative_to(tmp_path / "photos")), "ext": path.suffix[1:],
                      "bytes": 1, "width": 8, "height": 8, "taken": taken, "taken_from": "exif"})
    images = _unit(rng.standard_normal((300, D)))
    built = RetrievalIndex.build(images, np.zeros((0, D), np.float32), [], paths, [], {}, IndexOptions())
    built.store.set_facts(range(300), facts)
    searcher = Searcher(built, FakeEncoder(rng), tmp_path / "index")
    for colour in COLOURS:
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"q{colour[0]}_{colour[2]}.png")
    return Index(searcher)


def _query_file(tmp_path, colour) -> Path:
    return tmp_path / f"q{colour[0]}_{colour[2]}.png"


def _brute_force(index: Index, vector: np.ndarray, among=None, leave_out=()) -> tuple[list[int], np.ndarray]:
    xb = index.searcher.index.image_embeddings
    ids = np.arange(len(xb)) if among is None else np.asarray(among)
    ids = np.asarray([i for i in ids if i not in leave_out])
    scores = xb[ids] @ vector
    order = np.argsort(-scores, kind="stable")
    return ids[order].tolist(), scores[order]


@pytest.mark.parametrize("case", ["one text", "weighted texts and an image", "negatives", "an image id"])
def test_a_combined_query_ranks_as_brute_force_does(index, tmp_path, case):
    encoder = index.searcher.encoder
    red, blue = _query_file(tmp_path, COLOURS[0]), _query_file(tmp_path, COLOURS[2])
    positives, negatives, weights = {
        "one text": (["a dog"], [], None),
        "weighted texts and an image": (["golden retriever", red], [], [2, 1]),
        "negatives": (["a beach", "sunset"], ["fruit", blue], [1, 0.5]),
        "an image id": ([17, "a dog"], ["fruit"], [3, 1]),
    }[case]
    hits = index.search(*positives, negatives=negatives, weights=weights, k=20)

    def e(term):  # the naive embedding of each term
        if isinstance(term, Path):
            return encoder.colours[Image.open(term).convert("RGB").getpixel((0, 0))]
        if isinstance(term, int):
            return index.searcher.index.image_embeddings[term]
        return encoder.embed_texts([term])[0]

    weights = weights or [1] * len(positives)
    vector = sum(w * e(p) for w, p in zip(weights, positives)) - sum((e(n) for n in negatives), np.zeros(D))
    vector /= np.linalg.norm(vector)
    ids, scores = _brute_force(index, vector, leave_out={p for p in positives if isinstance(p, int)})
    assert [h.id for h in hits] == ids[:20]
    np.testing.assert_allclose([h.score for h in hits], scores[:20], rtol=1e-5, atol=1e-6)
    assert [h.rank for h in hits] == list(range(1, 21))
    np.testing.assert_allclose(index.embed(positives[0]), e(positives[0]), atol=1e-6)


def test_paging_continues_the_ranking(index):
    first, second = index.search("a dog", k=10), index.search("a dog", k=10, offset=10)
    assert [h.id for h in first + second] == [h.id for h in index.search("a dog", k=20)]
    assert [h.rank for h in second] == list(range(11, 21))


def test_where_returns_only_matching_images_ranked_as_brute_force(index):
    store = index.searcher.index.store
    where = {"folder": "2023/**", "after": "2023-03-01", "before": "2023-09-01", "ext": ["jpg"]}
    hits = index.search("a dog", where=where, k=300)
    matching = [i for i, f in enumerate(store.facts(range(300))) if f["folder"].startswith("2023")
                and dt.datetime(2023, 3, 1).timestamp() <= f["taken"] < dt.datetime(2023, 9, 1).timestamp()
                and f["ext"] == "jpg"]
    assert matching and sorted(h.id for h in hits) == matching
    ids, _ = _brute_force(index, index.embed("a dog"), among=matching)
    assert [h.id for h in hits] == ids
    assert {h.id for h in index.search("a dog", where={"folder": "2022/raw"}, k=300)} == \
        {i for i in range(300) if i % 3 == 0 and i % 5 == 0}


def test_sort_by_date_orders_the_hits_above_min_score_newest_first(index):
    hits = index.search("a dog", sort="date", min_score=0.1, k=300)
    assert hits and all(h.score >= 0.1 for h in hits)
    assert [h.taken for h in hits] == sorted((h.taken for h in hits), reverse=True)
    relevant = {h.id for h in index.search("a dog", k=300) if h.score >= 0.1}
    assert {h.id for h in hits} == relevant


def test_folder_globs():
    assert folder_matches("2024/**", "2024") and folder_matches("2024/**", "2024/06/raw")
    assert not folder_matches("2024/**", "20245") and not folder_matches("2024/*", "2024/06/raw")
    assert folder_matches("**/raw", "2022/raw") and folder_matches("**/raw", "raw") and folder_matches("trip?", "trip2")


def test_exif_dates_and_file_facts(tmp_path):
    taken = tmp_path / "camera" / "a.jpg"
    taken.parent.mkdir()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[36867] = "2024:07:14 09:30:00"  # DateTimeOriginal, in the EXIF sub-IFD as cameras write it
    Image.new("RGB", (40, 30), (1, 2, 3)).save(taken, exif=exif)
    plain = tmp_path / "b.PNG"
    Image.new("RGB", (8, 8)).save(plain)
    os.utime(plain, (1_600_000_000, 1_600_000_000))
    facts = image_facts(str(taken), str(tmp_path))
    assert facts["taken"] == dt.datetime(2024, 7, 14, 9, 30).timestamp() and facts["taken_from"] == "exif"
    assert (facts["folder"], facts["ext"], facts["width"], facts["height"]) == ("camera", "jpg", 40, 30)
    facts = image_facts(str(plain), str(tmp_path))
    assert (facts["taken"], facts["taken_from"], facts["folder"], facts["ext"]) == (1_600_000_000, "mtime", "", "png")


@pytest.mark.parametrize("call, message", [
    (lambda index: index.search("x", where={"colour": "red"}), "`where` has no field 'colour'"),
    (lambda index: index.search("x", where={"after": "june"}), "must be a date such as 2024-06-01"),
    (lambda index: index.search(Path("missing.jpg")), "query image missing.jpg does not exist"),
    (lambda index: index.search("x", k=0), "k must be an integer from 1 to"),
    (lambda index: index.search(), "the query is empty"),
    (lambda index: index.search("x", negatives=["x"]), "terms cancel out"),
    (lambda index: index.search(999), "no image with id 999"),
    (lambda index: index.search("x", sort="size"), "`sort` must be one of relevance, date"),
])
def test_bad_queries_are_one_clear_error(index, call, message):
    with pytest.raises(VclrError, match=message):
        call(index)


def test_weights_parse_as_the_cli_and_the_service_write_them():
    assert parse_weighted("2:golden retriever") == (2.0, "golden retriever")
    assert parse_weighted("0.5: a dog") == (0.5, "a dog")
    assert parse_weighted("12:30 meeting") == (1.0, "12:30 meeting")  # a time, not a weight
    query = parse_query(text=["2:dog", "cat"], like=[3], not_text=["fruit"], where={"ext": "jpg,heic", "folder": ""})
    assert [(t.kind, t.value, t.weight) for t in query.positives] == [("text", "dog", 2), ("text", "cat", 1),
                                                                      ("id", 3, 1)]
    assert query.where.ext == ("jpg", "heic") and query.where.folder is None
    assert Query.of("dog", where={"ext": ["jpeg"]}).where.bounds()["ext"] == ("jpg",)


def test_exact_search_equals_faiss_flat():
    import faiss

    rng = np.random.default_rng(0)
    xb, xq = _unit(rng.standard_normal((500, D))), _unit(rng.standard_normal((7, D)))
    flat = faiss.IndexFlatIP(D)
    flat.add(xb)
    D_ref, I_ref = flat.search(xq, 10)
    D_got, I_got = exact_search(xq, xb, 10)
    assert np.array_equal(I_got, I_ref)
    np.testing.assert_allclose(D_got, D_ref, rtol=1e-5)
    among = np.sort(rng.choice(500, 60, replace=False))
    D_sub, I_sub = exact_search(xq, xb, 10, among)
    assert np.isin(I_sub, among).all() and np.array_equal(I_sub, among[np.argsort(-(xq @ xb[among].T), 1,
                                                                                  kind="stable")[:, :10]])


@pytest.mark.slow
def test_filtered_search_keeps_recall_on_a_200k_ann_index():
    """A filter keeping 60k of 200k images goes through the IVF index with a selector (widened search); recall@10
    against exact filtered search stays >= 0.95. One keeping 10k is searched exactly."""
    from vclr.data.synthetic_vectors import structured_pairs

    xb, xq = structured_pairs(200_000, 64, queries=200, seed=5)
    index = RetrievalIndex.build(xb, xq, np.zeros(len(xq), np.int64), [f"{i}.jpg" for i in range(len(xb))],
                                 [f"q{i}" for i in range(len(xq))], {}, IndexOptions(kind="ivf_flat"))
    assert index.manifest["index"]["images"]["kind"] == "ivf_flat"
    rng = np.random.default_rng(1)
    for kept in (60_000, 10_000):
        among = np.sort(rng.choice(len(xb), kept, replace=False))
        _, I = index.search_images(xq, 10, among)
        _, truth = exact_search(xq, xb, 10, among)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, truth)])
        assert np.isin(I, among).all() and recall >= 0.95, (kept, recall)


def test_indexing_records_facts_and_fills_them_into_an_older_index_without_embedding(tmp_path, monkeypatch):
    """A folder with EXIF-dated photos in subfolders: the index records folder, type, size and date; an index whose
    store lacks them (built before they existed) gets them on the next `vclr index`, which embeds nothing."""
    from helpers import untrained_index

    import vclr.embed.embedding as embedding
    from vclr.index.build import build_index

    photos = tmp_path / "photos"
    for i, (folder, date) in enumerate([("2023/trip", "2023:05:01 10:00:00"), ("2024", "2024:07:14 09:30:00"),
                                         ("2024/raw", None)]):
        (photos / folder).mkdir(parents=True)
        exif = Image.Exif()
        if date:
            exif.get_ifd(0x8769)[36867] = date
        Image.new("RGB", (48, 32), COLOURS[i]).save(photos / folder / f"p{i}.jpg", exif=exif)
    index_dir = untrained_index(photos, tmp_path / "run")
    index = vclr.open_index(index_dir)
    facts = {Path(p).name: f for p, f in zip(index.searcher.index.image_paths,
                                              index.searcher.index.store.facts(range(3)))}
    assert facts["p0.jpg"]["folder"] == "2023/trip" and facts["p1.jpg"]["taken_from"] == "exif"
    assert facts["p2.jpg"]["taken_from"] == "mtime" and facts["p0.jpg"]["width"] == 48
    assert {Path(h.path).name for h in index.search("x", where={"folder": "2024/**"}, k=5)} == {"p1.jpg", "p2.jpg"}
    assert [Path(h.path).name for h in index.search("x", where={"before": "2024-01-01"}, k=5)] == ["p0.jpg"]

    stored = RetrievalIndex.load(index_dir)  # as an index of the previous version: no facts
    with stored.store.db:
        stored.store.db.execute("UPDATE images SET folder = NULL, ext = NULL, taken = NULL")
    stored.save(index_dir)
    embedded = []
    real = embedding.embed_table
    monkeypatch.setattr(embedding, "embed_table", lambda *a, **k: embedded.append(1) or real(*a, **k))
    update = build_index(tmp_path / "run", str(photos), index_dir)
    assert embedded == [] and update.added == 0 and update.facts_recorded == 3
    assert RetrievalIndex.load(index_dir).store.facts([0])[0]["ext"] == "jpg"


def test_a_query_by_the_index_own_run_uses_its_traced_text_tower(small_shapes, tmp_path):
    from helpers import untrained_index

    from vclr.model.source import model_source
    from vclr.search.encoders import ModelEncoder, TracedTextEncoder

    index_dir = untrained_index(small_shapes / "test", tmp_path / "run")
    searcher = Searcher.open(index_dir, model_source(run=str(tmp_path / "run")), load_model=False)
    assert isinstance(searcher.encoder, TracedTextEncoder) and searcher.encoder.images is not None
    assert not searcher.encoder.images.loaded  # a text query will not load the model
    other = untrained_index(small_shapes / "test", tmp_path / "other")
    searcher = Searcher.open(index_dir, model_source(run=str(other.parent / "other")), load_model=False)
    assert isinstance(searcher.encoder, ModelEncoder)  # another run: its own model embeds the queries

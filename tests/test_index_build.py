"""Index lifecycle: ANN indexes saved and loaded with their tuning, incremental add, delete by id, checksums,
memory-mapped loading, model checks, and a SIGKILL in the middle of saving."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vclr.data.synthetic_vectors import structured_pairs
from vclr.errors import IndexDirError
from vclr.index.format import IndexOptions, RetrievalIndex


@pytest.fixture(scope="module")
def collection():
    images, _ = structured_pairs(6000, 32, seed=3, clusters=100, queries=1)
    rng = np.random.default_rng(4)
    caption_image = np.repeat(np.arange(6000), 2)
    texts = images[caption_image] + 0.2 * rng.standard_normal((12000, 32)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return images, texts, caption_image


def _build(collection, kind="ivf_flat", n=5000):
    images, texts, t2i = collection
    keep = t2i < n
    return RetrievalIndex.build(images[:n], texts[keep], t2i[keep], [f"/data/{i}.png" for i in range(n)],
                                [f"caption {j}" for j in range(int(keep.sum()))], {"model_config_hash": "h1"},
                                IndexOptions(kind=kind, recall_target=0.9, exact_below=1000))


def test_ann_index_round_trip_keeps_tuning_and_results(collection, tmp_path):
    index = _build(collection)
    tuning = index.manifest["index"]["images"]
    assert tuning["kind"] == "ivf_flat" and tuning["met"] and tuning["recall"] >= 0.9
    queries = collection[1][:50]
    before = index.search_images(queries, 10)
    index.save(tmp_path / "idx")
    for mmap in (False, True):
        loaded = RetrievalIndex.load(tmp_path / "idx", mmap=mmap)
        after = loaded.search_images(queries, 10)
        assert np.array_equal(before[1], after[1]) and np.array_equal(before[0], after[0])
        assert loaded.manifest["index"]["images"]["value"] == tuning["value"]
    saved = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert set(saved["files"]) >= {"images.faiss", "metadata.sqlite"} and saved["dim"] == 32


def test_add_without_rebuilding_then_delete(collection, tmp_path):
    images, texts, t2i = collection
    index = _build(collection, kind="flat")
    new = t2i >= 5000
    image_ids, text_ids = index.add(images[5000:], [f"/data/{i}.png" for i in range(5000, 6000)], texts[new],
                                    [f"caption {j}" for j in range(int(new.sum()))], t2i[new] - 5000)
    assert image_ids[0] == 5000 and index.manifest["num_images"] == 6000
    # the added vectors are searched like the first ones: exact search over all 6000 images, by brute force
    D, I = index.search_images(texts[new][:20], 1)
    assert np.array_equal(I[:, 0], np.argmax(texts[new][:20] @ images.T, axis=1))
    assert (I[:, 0] >= 5000).sum() >= 5  # and the new images do come up
    assert index.store.image_paths([5003]) == ["/data/5003.png"]
    assert index.caption_image[text_ids[0]] == 5000

    target = int(I[0, 0])
    index.delete(image_ids=[target])
    D2, I2 = index.search_images(texts[new][:1], 10)
    assert target not in I2[0] and I2.shape == (1, 10)
    _, caption_hits = index.search_texts(images[target:target + 1], 50)
    assert not set(caption_hits[0]) & set(np.flatnonzero(index.caption_image == target))  # its captions went too
    index.save(tmp_path / "idx")
    loaded = RetrievalIndex.load(tmp_path / "idx")
    assert target not in loaded.search_images(texts[new][:1], 10)[1][0]
    assert loaded.manifest["deleted_images"] == 1 and loaded.manifest["deleted_texts"] == 2
    with pytest.raises(IndexDirError, match="no image with id 99999"):
        loaded.delete(image_ids=[99999])


def test_add_to_an_ivf_index_needs_no_retraining(collection):
    images, texts, t2i = collection
    index = _build(collection, kind="ivf_flat")
    nprobe_before = index.manifest["index"]["images"]["value"]
    index.add(images[5000:5010], [f"n{i}" for i in range(10)], texts[:0], [], [])
    D, I = index.search_images(images[5000:5010], 1)
    assert list(I[:, 0]) == list(range(5000, 5010)) and index.manifest["index"]["images"]["value"] == nprobe_before


def test_corrupt_file_is_detected(collection, tmp_path):
    _build(collection, kind="flat", n=300).save(tmp_path / "idx")
    path = tmp_path / "idx" / "image_embeddings.npy"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(IndexDirError, match="checksum"):
        RetrievalIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "texts.faiss").write_bytes(b"short")
    with pytest.raises(IndexDirError, match="wrong size"):
        RetrievalIndex.load(tmp_path / "idx", verify=False)


def test_model_mismatch_is_a_clear_error(collection):
    index = _build(collection, kind="flat", n=300)
    index.check_model(32, "h1")
    with pytest.raises(IndexDirError, match="embeds into 64 dimensions"):
        index.check_model(64, "h1")
    with pytest.raises(IndexDirError, match="not the one this index was built with"):
        index.check_model(32, "other")


SAVER = """
import sys, numpy as np
from vclr.index.format import RetrievalIndex, IndexOptions
rng = np.random.default_rng(0)
versions = []
for v in range(2):
    img = rng.standard_normal((20000, 64)).astype(np.float32); img /= np.linalg.norm(img, axis=1, keepdims=True)
    versions.append(RetrievalIndex.build(img, img[:100], np.arange(100), [f"v{v}/{i}" for i in range(20000)],
                                         [f"v{v}" for _ in range(100)], {"version": v}, IndexOptions(kind="flat")))
versions[0].save(sys.argv[1])
print("ready", flush=True)
while True:  # overwrite the index again and again until killed
    for version in versions[::-1] + versions:
        version.save(sys.argv[1])
"""


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_loadable_index(tmp_path):
    """SIGKILL a process that keeps overwriting an index, at 12 random moments; each time the index loads, passes
    its checksums and answers exactly as one of the two versions that were being written."""
    target = tmp_path / "idx"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    rng = np.random.default_rng(0)
    expected = {}
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 1.5)))  # somewhere inside a save: faiss, npy, sqlite or rename
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        loaded = RetrievalIndex.load(target)  # verify=True: every checksum
        version = loaded.manifest["version"]
        D, I = loaded.search_images(loaded.text_embeddings[:5], 3)
        assert loaded.image_paths[0] == f"v{version}/0"
        if version in expected:
            assert np.array_equal(expected[version], I)
        expected[version] = I
    assert kills == 12
    # temp dirs of killed saves were never mistaken for the index, and the next successful save removes them all
    RetrievalIndex.load(target).save(target)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")]


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw", pytest.param("ivf_pq", marks=pytest.mark.slow)])
def test_deletes_on_ann_indexes_against_brute_force(collection, kind):
    """Deleted ids never come back, k live results still do, and they are the live collection's neighbours (as a
    brute-force search over the live vectors finds them, to the index's own recall)."""
    images, texts, t2i = collection
    n = 2000 if kind == "ivf_pq" else 4000  # OPQ training is the slow part
    index = _build(collection, kind=kind, n=n)
    queries = texts[:40]
    _, before = index.search_images(queries, 10)
    deleted = np.unique(before[:, :3])  # every query's best 3: the deletions hit the results that matter
    index.delete(image_ids=deleted)
    D, I = index.search_images(queries, 10)
    assert I.shape == (40, 10) and not np.isin(I, deleted).any() and (I >= 0).all()
    live = np.setdiff1d(np.arange(n), deleted)
    scores = queries @ images[live].T  # (40, live)
    exact = live[np.argsort(-scores, axis=1, kind="stable")[:, :10]]
    recall = np.mean([len(np.intersect1d(found, truth)) / 10 for found, truth in zip(I, exact)])
    assert recall >= (0.85 if kind != "ivf_pq" else 0.6), recall
    assert np.all(np.diff(D, axis=1) <= 1e-6)  # still ranked


def test_mmap_falls_back_to_reading_index_types_it_cannot_map(collection, tmp_path):
    index = _build(collection, kind="hnsw", n=2000)
    index.save(tmp_path / "idx")
    queries = collection[1][:20]
    expected = index.search_images(queries, 5)
    loaded = RetrievalIndex.load(tmp_path / "idx", mmap=True)  # faiss cannot mmap HNSW: read it instead
    got = loaded.search_images(queries, 5)
    assert np.array_equal(got[1], expected[1]) and np.allclose(got[0], expected[0])
    assert isinstance(loaded.image_embeddings, np.memmap)  # the vectors are still mapped


def test_index_add_refuses_a_model_of_another_config(small_shapes, tmp_path, capsys):
    from vclr.cli import main
    from vclr.config import load_config
    from vclr.model.build import build_model
    from vclr.rundir import save_model_as_run

    runs = {}
    for name, overrides in (("a", []), ("b", ["model.init_temperature=0.05"])):  # same shapes, another config
        run = tmp_path / name
        cfg = load_config(None, [f"train.output_dir={run}", *overrides])
        model = build_model(cfg.model)
        save_model_as_run(run, cfg, model)
        runs[name] = run
    assert main(["index", "--run", str(runs["a"]), "--data", str(small_shapes / "test"), "--out",
                 str(tmp_path / "idx")]) == 0
    manifest = (tmp_path / "idx" / "manifest.json").read_bytes()
    capsys.readouterr()
    code = main(["index-add", "--index", str(tmp_path / "idx"), "--data", str(small_shapes / "test"), "--run",
                 str(runs["b"])])
    err = capsys.readouterr().err
    assert code == 2 and "not the one this index was built with" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "idx" / "manifest.json").read_bytes() == manifest  # nothing was added

"""`vclr eval` on a trained run: the JSON report's sections and the PNG plots; `vclr sweep` over a small grid."""

import json

import numpy as np
import pytest
from helpers import train_overrides
from PIL import Image

from vclr.cli import main


@pytest.fixture(scope="module")
def trained_run(small_shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("eval_run") / "run"
    extra = {"optim.max_steps": 30, "train.log_every": 5}
    assert main(["train", *train_overrides(small_shapes, run, **extra)]) == 0
    return run


@pytest.mark.slow
def test_eval_writes_report_and_plots(trained_run, small_shapes, tmp_path):
    index = tmp_path / "index"
    assert main(["index", "--run", str(trained_run), "--data", str(small_shapes / "test"), "--out", str(index),
                 "--index-type", "ivf_flat", "--recall-target", "0.9"]) == 0
    out = tmp_path / "report" / "eval.json"
    assert main(["eval", "--run", str(trained_run), "--out", str(out), "--index", str(index)]) == 0
    report = json.loads(out.read_text())
    metrics = report["metrics"]
    assert report["recall_curve"]["k"][:3] == [1, 2, 5]
    assert report["recall_curve"]["text_to_image"][0] == pytest.approx(metrics["text_to_image_R@1"])
    assert all(a <= b for a, b in zip(report["recall_curve"]["image_to_text"],
                                      report["recall_curve"]["image_to_text"][1:]))
    v = report["verification"]
    assert 0 < v["f1"] <= 100 and v["validation_pairs"] > 0 and v["test_pairs"] > 0
    ann = report["ann_vs_exact"]
    assert ann["index"]["images"].startswith("IVF")
    for key in ("text_to_image_R@1", "image_to_text_R@10"):
        assert ann[key]["exact"] == pytest.approx(metrics[key])
        assert ann[key]["cost"] == pytest.approx(ann[key]["exact"] - ann[key]["index"])
    # the index figure is what searching the index gives (an ANN index may even beat exact search by missing a
    # wrong neighbour): recompute text->image R@1 from the index directly
    from vclr.index.format import RetrievalIndex

    loaded = RetrievalIndex.load(index)
    _, hits = loaded.search_images(loaded.text_embeddings, 1)
    assert ann["text_to_image_R@1"]["index"] == pytest.approx(100 * np.mean(hits[:, 0] == loaded.caption_image))
    assert report["dataset_fingerprint"] and report["model_config_hash"]
    for name in ("recall_curves", "training_curves", "examples"):
        path = tmp_path / "report" / "eval-plots" / f"{name}.png"
        assert path == type(path)(report["plots"][name])
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        assert image.width > 300 and pixels.std() > 10  # a real figure, not a blank canvas


@pytest.mark.slow
def test_eval_with_labels_adds_knn_and_clustering(tmp_path):
    """Fashion-MNIST-shaped labelled data: classes of synthetic shapes, with label + class_name columns."""
    from vclr.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=600, num_test=120, seed=2)
    for split in ("train", "test"):  # label = the first shape named in the first caption
        meta = data / split / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        for r in rows:
            name = next((s for s in ("circle", "square", "triangle", "star", "cross", "diamond")
                         if s in r["captions"][0]), "other")
            r["class_name"] = name
        names = sorted({r["class_name"] for r in rows})
        for r in rows:
            r["label"] = names.index(r["class_name"])
        meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    assert main(["train", *train_overrides(data, run, **{"optim.max_steps": 30, "data.batch_size": 64})]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--out", str(out), "--label-column", "label", "--no-plots"]) == 0
    c = json.loads(out.read_text())["classification"]
    assert c["num_classes"] >= 3 and -100 <= c["cluster_ari"] <= 100 and 0 <= c["cluster_nmi"] <= 100
    assert c["knn_k"] == 200 and c["knn_temperature"] == 0.07
    # kNN top-1 against a naive reference: every test image votes over all train images by brute force
    from vclr.data.dataset import load_caption_table, load_class_labels
    from vclr.embed.embedding import embed_table
    from vclr.model.source import load_trained

    model, cfg = load_trained(run)
    embedded, labels = {}, {}
    for split in ("train", "test"):
        table = load_caption_table(data / split)
        embedded[split] = embed_table(model, cfg, table).image_embeddings
        labels[split] = load_class_labels(data / split, table.image_paths)[0]
    correct = 0
    for query, label in zip(embedded["test"], labels["test"]):
        similarities = embedded["train"] @ query  # (N_train,)
        top = np.argsort(-similarities, kind="stable")[:200]
        votes = np.zeros(c["num_classes"])
        for j in top:
            votes[labels["train"][j]] += np.exp(similarities[j] / 0.07)
        correct += int(np.argmax(votes) == label)
    assert c["knn_top1"] == pytest.approx(100 * correct / len(labels["test"]), abs=1e-6)


@pytest.mark.slow
def test_sweep_trains_each_point_and_writes_table_and_plot(small_shapes, tmp_path, capsys):
    out = tmp_path / "sweep"
    overrides = train_overrides(small_shapes, tmp_path / "unused", **{"optim.max_steps": 12,
                                                                     "optim.warmup_steps": 2,
                                                                     "loss.triplet_weight": 0.5,
                                                                     "loss.triplet_warmup_steps": 0})
    overrides = [o for o in overrides if not o.startswith("train.output_dir")]
    argv = ["sweep", "--grid", "loss.triplet_margin=0.1,0.5", "--out", str(out), *overrides]
    assert main(argv) == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [r["loss.triplet_margin"] for r in result["rows"]] == ["0.1", "0.5"]
    assert (out / "loss.triplet_margin=0.1" / "model.safetensors").is_file()
    assert "| loss.triplet_margin |" in (out / "sweep.md").read_text()
    with Image.open(out / "sweep.png") as image:
        assert image.width > 300
    weights = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/model.safetensors")}
    assert len(weights) == 2
    assert main(argv) == 0  # a second call reuses the finished points: not one of them is trained again
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("*/model.safetensors")} == weights
    assert json.loads((out / "sweep.json").read_text())["rows"] == result["rows"]


def test_bad_grid_is_one_clear_error(capsys):
    assert main(["sweep", "--grid", "loss.triplet_margin", "--out", "/tmp/x"]) == 2
    assert "bad --grid" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_another_dataset_keeps_the_earlier_report(trained_run, small_shapes, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["eval", "--run", str(run), "--no-plots"]) == 0  # the run's data.test
    first = capsys.readouterr().out
    assert main(["eval", "--run", str(run), "--data", str(small_shapes / "train"), "--no-plots"]) == 0
    second = capsys.readouterr().out
    test_name, train_name = f"eval-{small_shapes.name}-test.json", f"eval-{small_shapes.name}-train.json"
    assert f"report: {run / test_name}" in first and f"report: {run / train_name}" in second  # says where
    assert json.loads((run / test_name).read_text())["metrics"]["num_images"] == 200
    assert json.loads((run / train_name).read_text())["metrics"]["num_images"] == 1500

"""End to end through the CLI: a short CPU training that learns, then index, search (both ways) and eval."""

import json
from pathlib import Path

import pytest
from helpers import train_overrides

from vclr.cli import main
from vclr.config import BUILTIN_CONFIGS

CONFIG = str(BUILTIN_CONFIGS / "demo.yaml")
CHANCE_R1 = 100 / 200  # 200 test images


@pytest.mark.slow
def test_train_learns_then_index_search_eval(small_shapes, tmp_path, capsys):
    run, index = tmp_path / "run", tmp_path / "index"
    assert main(["train", "--config", CONFIG, *train_overrides(small_shapes, run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 150
    assert rows[-1]["loss"] < 0.4 * rows[0]["loss"], "loss must fall"
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000075", "step_0000150"]

    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["num_images"] == 200
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"{direction}_R@1"] > 40 * CHANCE_R1, f"{direction} recall is near chance: {metrics}"
        assert metrics[f"{direction}_R@10"] > 80

    assert main(["index", "--run", str(run), "--data", str(small_shapes / "test"), "--out", str(index)]) == 0
    capsys.readouterr()
    test_rows = [json.loads(line) for line in (small_shapes / "test" / "metadata.jsonl").read_text().splitlines()]
    # text -> image: a test caption finds its own image among the top 5
    found = 0
    for row in test_rows[:10]:
        assert main(["search", "--index", str(index), "--text", row["captions"][0], "-k", "5", "--json"]) == 0
        hits = json.loads(capsys.readouterr().out)
        assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0]["score"] >= hits[-1]["score"]
        found += any(Path(h["path"]).name == row["file_name"] for h in hits)
    assert found >= 7
    # image -> text: an image's top captions include one of its own
    image = small_shapes / "test" / test_rows[0]["file_name"]
    assert main(["search", "--index", str(index), "--image", str(image), "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert any(h["caption"] in test_rows[0]["captions"] for h in hits)

"""A run and its index are self-contained: moved to another folder and used from a third one, they still search,
evaluate and serve (the text tower's config and tokenizer travel inside the run; the index finds its run beside it)."""

import json
import shutil

import pytest

from vclr.cli import main
from vclr.data.synthetic import make_synthetic
from vclr.rundir import TEXT_TOWER_DIR


@pytest.mark.slow
def test_moved_run_and_index_work_from_anywhere(tmp_path, monkeypatch, capsys, tiny_lit_model_name,
                                                 tiny_hf_text_dir):
    first, second, elsewhere = tmp_path / "first", tmp_path / "second", tmp_path / "elsewhere"
    for folder in (first, second, elsewhere):
        folder.mkdir()
    data = make_synthetic(tmp_path / "data", num_train=32, num_test=8, seed=0)
    shutil.copytree(tiny_hf_text_dir, first / "weights")
    monkeypatch.chdir(first)  # the text tower is given relative to where training runs, as the LiT recipes do
    assert main(["train", f"data.train={data / 'train'}", "train.output_dir=run", f"model.name={tiny_lit_model_name}",
                 "model.text_tower_dir=weights", "data.batch_size=8", "optim.max_steps=2", "optim.warmup_steps=1",
                 "train.checkpoint_every=100"]) == 0
    assert main(["index", "--run", "run", "--data", str(data / "test"), "--out", "index"]) == 0
    assert (first / "run" / TEXT_TOWER_DIR / "tokenizer.json").is_file()
    assert not list((first / "run" / TEXT_TOWER_DIR).glob("*.safetensors"))  # the weights live in model.safetensors

    for name in ("run", "index"):
        shutil.move(first / name, second / name)
    shutil.rmtree(first)  # the text tower's source dir is gone too
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()

    assert main(["search", "--index", "../second/index", "--text", "a red circle", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all("path" in hit for hit in hits)
    assert main(["eval", "--run", "../second/run", "--data", str(data / "test")]) == 0
    assert (second / "run" / "eval-data-test.json").is_file()

    from fastapi.testclient import TestClient

    from vclr.search.searcher import Searcher
    from vclr.serve.app import create_app

    client = TestClient(create_app(Searcher.open("../second/index")))
    response = client.get("/api/search", params={"text": "a blue star", "k": 2})
    assert response.status_code == 200 and len(response.json()["hits"]) == 2


def test_an_index_whose_run_is_gone_says_so(tmp_path):
    from vclr.errors import ModelSourceError
    from vclr.model.source import source_from_manifest

    manifest = {"model_source": {"kind": "run", "run_dir": str(tmp_path / "gone"), "run_dir_from_index": "../gone"}}
    with pytest.raises(ModelSourceError, match="give `run` where it lies now"):
        source_from_manifest(manifest, tmp_path / "index")


def test_a_run_source_reads_its_own_text_tower_copy(tmp_path, tiny_lit_model_name, tiny_hf_text_dir):
    from vclr.config import load_config
    from vclr.rundir import inference_model_config, save_text_tower_files

    cfg = load_config(None, [f"model.name={tiny_lit_model_name}", "model.text_tower_dir=nowhere/bert"])
    save_text_tower_files(tmp_path, tiny_hf_text_dir)
    assert inference_model_config(tmp_path, cfg.model).text_tower_dir == str((tmp_path / TEXT_TOWER_DIR).resolve())

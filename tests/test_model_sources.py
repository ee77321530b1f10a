"""Any model, any folder: open_clip models by config + checkpoint, plain photo folders without captions, incremental
re-indexing, and `vclr eval --model`, each against open_clip's own embeddings."""

import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import TINY_MODEL, draw_photo, photo_folder
from PIL import Image

import vclr.model.build  # noqa: F401  (registers vclr's model configs with open_clip)
from vclr.cli import main
from vclr.eval.metrics import retrieval_metrics
from vclr.index.build import build_index
from vclr.model.source import OpenClipSource, model_source
from vclr.search.searcher import Searcher

MODEL = TINY_MODEL
QUERIES = ["a red square", "a large blue circle at the top", "green"]


@pytest.fixture(scope="module")
def reference(checkpoint):
    """open_clip itself: its model from the checkpoint, its preprocess and its tokenizer."""
    model, _, preprocess = open_clip.create_model_and_transforms(MODEL, pretrained=str(checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer(MODEL)


def _open_clip_images(reference, paths) -> np.ndarray:
    model, preprocess, _ = reference
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]))
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def _open_clip_texts(reference, texts) -> np.ndarray:
    model, _, tokenizer = reference
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1).numpy()


@pytest.fixture
def photos(tmp_path) -> tuple[Path, list[Path]]:
    root = tmp_path / "photos"
    paths = photo_folder(root)
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")  # 3 unreadable files
    (root / "trip" / "empty.png").write_bytes(b"")
    (root / "pets" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    outside = tmp_path / "outside.png"
    draw_photo(outside, 999)
    (root / "link-out.png").symlink_to(outside)  # a link out of the folder: never indexed
    (root / "notes.md").write_text("not an image")
    return root, paths


def _brute_force(query: np.ndarray, images: np.ndarray, paths: list[Path], k: int):
    scores = images @ query  # (N,)
    top = np.argsort(-scores, kind="stable")[:k]
    return [str(paths[i]) for i in top], scores[top]


def test_open_clip_model_from_a_local_checkpoint_embeds_as_open_clip(checkpoint, reference, photos):
    from vclr.embed.embedding import embed_image_paths, embed_texts

    model, cfg = OpenClipSource(MODEL, str(checkpoint)).load(torch.device("cpu"))
    _, paths = photos
    inputs, encode_image = [], model.clip.encode_image
    model.clip.encode_image = lambda images, **kw: inputs.append(images) or encode_image(images, **kw)
    ours, kept = embed_image_paths(model, [str(p) for p in paths[:12]], batch_size=5)
    assert list(kept) == list(range(12))
    # what the image tower is fed is open_clip's own preprocess, to float rounding (jpg, png, webp, bmp; 70-140 px)
    expected_inputs = torch.stack([reference[1](Image.open(p)) for p in paths[:12]])
    torch.testing.assert_close(torch.cat(inputs), expected_inputs, atol=1e-5, rtol=0)
    theirs = _open_clip_images(reference, paths[:12])
    assert np.min(np.sum(ours * theirs, axis=1)) >= 0.999
    ours_text, theirs_text = embed_texts(model, cfg, QUERIES), _open_clip_texts(reference, QUERIES)
    assert np.min(np.sum(ours_text * theirs_text, axis=1)) >= 0.999


def test_a_vclr_weights_file_loads_as_a_checkpoint_too(tmp_path):
    from safetensors.torch import save_file

    from vclr.config import ModelConfig
    from vclr.model.build import build_model

    torch.manual_seed(1)
    trained = build_model(ModelConfig(name=MODEL))
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(tmp_path / "model.safetensors"))
    loaded, _ = OpenClipSource(MODEL, str(tmp_path / "model.safetensors")).load(torch.device("cpu"))
    for name, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


@pytest.mark.slow
def test_vit_b_32_embeds_as_open_clip(tmp_path, photos):
    """The acceptance model: a random-init ViT-B-32 saved to a file, at its own 224 px, bicubic, CLIP mean/std."""
    from vclr.embed.embedding import embed_image_paths, embed_texts

    torch.manual_seed(0)
    checkpoint = tmp_path / "vit-b-32.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in open_clip.create_model("ViT-B-32").state_dict().items()},
              str(checkpoint))
    model, cfg = OpenClipSource("ViT-B-32", str(checkpoint)).load(torch.device("cpu"))
    reference = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(checkpoint))
    reference = (reference[0].eval(), reference[2], open_clip.get_tokenizer("ViT-B-32"))
    paths = [str(p) for p in photos[1][:4]]
    ours, _ = embed_image_paths(model, paths)
    assert np.min(np.sum(ours * _open_clip_images(reference, paths), axis=1)) >= 0.999
    ours_text = embed_texts(model, cfg, QUERIES)
    assert np.min(np.sum(ours_text * _open_clip_texts(reference, QUERIES), axis=1)) >= 0.999


def test_lit_towers_embed_as_open_clip(tiny_lit_model_name, tiny_hf_text_dir, tmp_path, photos):
    """vclr's LiT towers (timm image tower + HF text tower from a local dir), through a run directory."""
    from open_clip.tokenizer import HFTokenizer

    from vclr.config import load_config
    from vclr.embed.embedding import embed_image_paths, embed_texts
    from vclr.model.build import build_model, image_preprocess_cfg
    from vclr.rundir import save_model_as_run

    run = tmp_path / "run"
    cfg = load_config(None, [f"model.name={tiny_lit_model_name}", f"model.text_tower_dir={tiny_hf_text_dir}",
                             f"train.output_dir={run}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_model_as_run(run, cfg, model)
    loaded, cfg = model_source(run=str(run)).load(torch.device("cpu"))
    preprocess = open_clip.image_transform(**{k: v for k, v in image_preprocess_cfg(loaded).items()
                                              if k in ("mean", "std", "interpolation", "resize_mode")},
                                           image_size=image_preprocess_cfg(loaded)["size"], is_train=False)
    tokenizer = HFTokenizer(str(tiny_hf_text_dir), context_length=24)
    reference = (loaded.clip, preprocess, tokenizer)
    paths = [str(p) for p in photos[1][:6]]
    ours, _ = embed_image_paths(loaded, paths)
    assert np.min(np.sum(ours * _open_clip_images(reference, paths), axis=1)) >= 0.999
    texts = ["a red circle", "the blue star on the left"]
    assert np.min(np.sum(embed_texts(loaded, cfg, texts) * _open_clip_texts(reference, texts), axis=1)) >= 0.999


def test_a_photo_folder_without_captions(checkpoint, reference, photos, capsys):
    root, paths = photos
    out = root.parent / "index"
    assert main(["index", "--model", MODEL, "--pretrained", str(checkpoint), "--data", str(root),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "indexed 57 images and 0 captions" in printed and "3 unreadable files skipped" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(Path(p).name for p in manifest["unreadable_files"]) == ["broken.jpg", "empty.png", "truncated.png"]
    assert manifest["model_source"] == {"kind": "open_clip", "model": MODEL, "pretrained": str(checkpoint.resolve())}

    searcher = Searcher.open(out)  # no model flags: the index knows its model
    ordered = [Path(p) for p in searcher.index.image_paths]
    assert sorted(ordered) == sorted(p.resolve() for p in paths)
    images = _open_clip_images(reference, ordered)
    for query, embedding in zip(QUERIES, _open_clip_texts(reference, QUERIES)):  # text -> images
        hits = searcher.by_text(query, 5)
        expected_paths, expected_scores = _brute_force(embedding, images, ordered, 5)
        assert [h.path for h in hits] == expected_paths
        assert np.allclose([h.score for h in hits], expected_scores, atol=1e-4)
    query = paths[7]  # image -> images: an image-only index answers with images
    hits = searcher.by_image_file(query, 4)
    expected_paths, expected_scores = _brute_force(_open_clip_images(reference, [query])[0], images, ordered, 4)
    assert [h.path for h in hits] == expected_paths and hits[0].path == str(query.resolve())
    assert np.allclose([h.score for h in hits], expected_scores, atol=1e-4)
    like = searcher.like(hits[0].id, 3)  # "more like this": the same neighbours, itself left out
    assert [h.path for h in like] == expected_paths[1:4]

    assert main(["search", "--index", str(out), "--text", "a red square", "-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [sorted(r) for r in rows] == [["id", "path", "rank", "score", "taken", "weak"]] * 3
    assert main(["search", "--index", str(out), "--like", str(hits[0].id), "-k", "2", "--json"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == expected_paths[1:3]


def _answers(index_dir, image: Path) -> list:
    """What an index answers, by path and score: text queries and an image query."""
    searcher = Searcher.open(index_dir)
    answers = [[(h.path, round(h.score, 4)) for h in searcher.by_text(q, 10)] for q in QUERIES]
    return answers + [[(h.path, round(h.score, 4)) for h in searcher.by_image_file(image, 10, images=True)]]


def test_re_indexing_a_changed_folder_embeds_only_what_changed(checkpoint, photos, tmp_path, monkeypatch):
    import vclr.embed.embedding as embed_mod

    root, paths = photos
    source = model_source(model=MODEL, pretrained=str(checkpoint))
    first = build_index(source, str(root), tmp_path / "index")
    assert first.rebuilt and first.added == 57
    added = photo_folder(root / "new", count=10, start=100)
    for path in paths[:5]:
        path.unlink()
    embedded = []
    real_embed_table = embed_mod.embed_table
    monkeypatch.setattr(embed_mod, "embed_table", lambda m, c, t: embedded.extend(t.image_paths)
                        or real_embed_table(m, c, t))
    update = build_index(source, str(root), tmp_path / "index")
    assert not update.rebuilt and (update.added, update.changed, update.removed) == (10, 0, 5)
    assert sorted(embedded) == sorted(str(p.resolve()) for p in added)  # exactly the 10 new files
    assert update.unchanged == 52 and len(update.unreadable) == 3  # the unreadable ones are not retried
    fresh = build_index(source, str(root), tmp_path / "fresh")
    assert _answers(tmp_path / "index", paths[9]) == _answers(tmp_path / "fresh", paths[9]) and fresh.rebuilt

    embedded.clear()
    (paths[5].with_suffix(".txt")).write_text("a caption that arrived later\n")  # a changed sidecar: re-embedded
    update = build_index(source, str(root), tmp_path / "index")
    assert (update.added, update.changed, update.removed) == (0, 1, 0) and embedded == [str(paths[5].resolve())]
    assert Searcher.open(tmp_path / "index").index.texts == ["a caption that arrived later"]
    build_index(source, str(root), tmp_path / "fresh")
    assert _answers(tmp_path / "index", paths[9]) == _answers(tmp_path / "fresh", paths[9])
    embedded.clear()
    again = build_index(source, str(root), tmp_path / "index")  # nothing changed: nothing embedded
    assert (again.added, again.changed, again.removed, again.unchanged) == (0, 0, 0, 62) and embedded == []


def test_a_killed_re_index_continues_where_it_stopped(checkpoint, photos, tmp_path, monkeypatch):
    import vclr.embed.embedding as embed_mod

    root, _ = photos
    source = model_source(model=MODEL, pretrained=str(checkpoint))
    build_index(source, str(root), tmp_path / "index")
    added = photo_folder(root / "new", count=12, start=200)
    real_embed_table, embedded = embed_mod.embed_table, []

    def dies_on_the_third_chunk(model, cfg, table):
        if len(embedded) == 10:
            raise KeyboardInterrupt  # Ctrl-C in the middle: two chunks of 5 are saved
        embedded.extend(table.image_paths)
        return real_embed_table(model, cfg, table)

    monkeypatch.setattr(embed_mod, "embed_table", dies_on_the_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_index(source, str(root), tmp_path / "index", save_every=5)
    saved = set(Searcher.open(tmp_path / "index").index.image_paths)
    assert set(embedded) <= saved  # the two finished chunks were saved
    monkeypatch.setattr(embed_mod, "embed_table", real_embed_table)
    resumed = build_index(source, str(root), tmp_path / "index", save_every=5)
    assert resumed.added == 2 and resumed.unchanged == 57 + 10  # only what the killed run had not saved
    build_index(source, str(root), tmp_path / "fresh")
    assert _answers(tmp_path / "index", added[0]) == _answers(tmp_path / "fresh", added[0])


def test_eval_of_an_open_clip_model_equals_open_clip_figures(checkpoint, reference, small_shapes, tmp_path):
    from vclr.data.dataset import load_caption_table

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", MODEL, "--pretrained", str(checkpoint), "--data", str(small_shapes / "test"),
                 "--out", str(out), "--no-plots"]) == 0
    report = json.loads(out.read_text())
    table = load_caption_table(small_shapes / "test")
    texts = [c for caps in table.captions for c in caps]
    caption_image = np.repeat(np.arange(len(table)), [len(c) for c in table.captions])
    expected = retrieval_metrics(_open_clip_images(reference, table.image_paths), _open_clip_texts(reference, texts),
                                 caption_image, (1, 5, 10))
    for key in ("image_to_text_R@1", "image_to_text_R@5", "text_to_image_R@1", "text_to_image_R@10", "rsum"):
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert report["model_source"]["kind"] == "open_clip"


@pytest.mark.parametrize("argv, expected", [
    (["index", "--data", "{tmp}", "--out", "{tmp}/i"], "no model source: give --run (a vclr run directory) or --model"),
    (["index", "--run", "{tmp}/r", "--model", "RN50", "--out", "{tmp}/i"], "either --run (a run directory) or --model"),
    (["index", "--pretrained", "x.pt", "--out", "{tmp}/i"], "--pretrained needs --model"),
    (["index", "--model", "no-such-model", "--data", "{tmp}", "--out", "{tmp}/i"], "--model no-such-model is not"),
    (["index", "--model", MODEL, "--pretrained", "{tmp}/missing.pt", "--data", "{tmp}", "--out", "{tmp}/i"],
     "no such checkpoint file"),
    (["eval", "--run", "{tmp}/nowhere"], "--run {tmp}/nowhere has no config.yaml"),
    (["search", "--index", "{tmp}"], "give at least one of --text, --image or --like"),
])
def test_a_wrong_or_missing_model_source_is_one_line_naming_the_flag(argv, expected, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(tmp=tmp_path) in err, err


def test_sidecar_captions_make_image_queries_return_captions(checkpoint, tmp_path):
    root = tmp_path / "photos"
    paths = photo_folder(root, count=6)
    paths[0].with_suffix(".txt").write_text("a birthday cake\nthe cake on the table\n")
    build_index(model_source(model=MODEL, pretrained=str(checkpoint)), str(root), tmp_path / "index")
    searcher = Searcher.open(tmp_path / "index")
    assert searcher.index.texts == ["a birthday cake", "the cake on the table"]
    hits = searcher.by_image_file(paths[0], 2)
    assert {h.caption for h in hits} == {"a birthday cake", "the cake on the table"} and hits[0].path is None
    assert all(h.path for h in searcher.by_image_file(paths[0], 2, images=True))  # images on request


def test_pretrained_tag_without_network_is_one_line_at_once(monkeypatch, tmp_path, capsys):
    """An open_clip tag needs a download; without a network the error is one line, exit 2, and open_clip is never
    asked (it retries for a minute): offline by HF_HUB_OFFLINE, or because the hub cannot be reached."""
    import socket

    import vclr.model.build as model_mod
    from vclr.cli import main
    from vclr.errors import ModelSourceError

    def never(*args, **kwargs):
        raise AssertionError("open_clip was asked to download")

    monkeypatch.setattr(model_mod.open_clip, "create_model", never)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (32, 32)).save(photos / "a.png")
    argv = ["index", "--model", "ViT-B-32", "--pretrained", "openai", "--data", str(photos), "--out", "idx"]
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the suite never reaches a hub
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vclr: error: cannot download pretrained weights 'openai' for "
                                                     "ViT-B-32: HF_HUB_OFFLINE is set; give a local checkpoint file as "
                                                     "--pretrained")

    def no_route(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", no_route)
    with pytest.raises(ModelSourceError, match=r"'laion2b_s34b_b79k' for ViT-B-32: no network \(huggingface.co "):
        OpenClipSource("ViT-B-32", "laion2b_s34b_b79k").load()


def test_embeddings_larger_than_ram_stream_to_disk_and_fill_the_index_in_chunks(checkpoint, photos, tmp_path,
                                                                                 monkeypatch):
    """The out-of-core path (forced with a zero RAM allowance and a 7-vector chunk) gives the in-memory index."""
    import vclr.embed.embedding as embed_mod
    import vclr.index.tuning as ann_mod
    from vclr.index.format import IndexOptions

    root, _ = photos
    (root / "pets").joinpath("img003.txt").write_text("a cat on the sofa\n")
    source = model_source(model=MODEL, pretrained=str(checkpoint))
    options = IndexOptions(kind="ivf_flat", recall_target=0.9)
    in_memory = build_index(source, str(root), tmp_path / "memory", options)
    mapped, filled, truths = [], [], []
    real_open, real_build, real_truth = np.lib.format.open_memmap, ann_mod.build, ann_mod.exact_neighbours
    monkeypatch.setattr(embed_mod.np.lib.format, "open_memmap", lambda *a, **k: mapped.append(a[0]) or
                        real_open(*a, **k))
    monkeypatch.setattr(ann_mod, "build", lambda spec, xb, seed, chunk: filled.append((len(xb), chunk)) or
                        real_build(spec, xb, seed, chunk))
    monkeypatch.setattr(ann_mod, "exact_neighbours", lambda xb, q, k, chunk: truths.append(chunk) or
                        real_truth(xb, q, k, chunk))
    streamed = build_index(source, str(root), tmp_path / "streamed", IndexOptions(kind="ivf_flat", recall_target=0.9,
                                                                                   chunk=7), in_memory_max_bytes=0)
    assert sorted(Path(p).name for p in mapped) == ["images.npy", "texts.npy"]  # vectors went to mapped files
    assert filled == [(57, 7), (1, 7)] and truths == [7, 7]  # the index filled and checked 7 vectors at a time
    assert not list(tmp_path.glob(".*.embeddings"))  # the scratch files are gone
    np.testing.assert_array_equal(np.load(tmp_path / "streamed" / "image_embeddings.npy"),
                                  np.load(tmp_path / "memory" / "image_embeddings.npy"))
    image = Path(in_memory.index.image_paths[3])
    assert _answers(tmp_path / "streamed", image) == _answers(tmp_path / "memory", image) and streamed.rebuilt


@pytest.mark.parametrize("flags, expected", [([], None), (["--model", MODEL, "--pretrained", "w.pt"],
                                                          OpenClipSource(MODEL, "w.pt"))])
def test_serve_takes_the_model_flags_or_the_index_s_own(flags, expected, tmp_path, monkeypatch):
    import vclr.serve.app as serve_mod

    served = []
    monkeypatch.setattr(serve_mod, "serve", lambda index, source, *rest, **options: served.append(source))
    assert main(["serve", "--index", str(tmp_path), *flags]) == 0
    assert served == [expected]

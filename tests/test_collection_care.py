"""Collection care: moves, renames and copies found by content hash; phone and camera formats; EXIF orientation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_MODEL, draw_photo, photo_folder
from PIL import Image

from vclr.cli import main
from vclr.index.build import build_index
from vclr.model.source import model_source
from vclr.search.searcher import Searcher


@pytest.fixture
def source(checkpoint):
    return model_source(model=TINY_MODEL, pretrained=str(checkpoint))


def _count_embedded(monkeypatch) -> list[str]:
    import vclr.embed.embedding as embed_mod

    embedded: list[str] = []
    real = embed_mod.embed_table
    monkeypatch.setattr(embed_mod, "embed_table", lambda m, c, t, **kw: embedded.extend(t.image_paths)
                        or real(m, c, t, **kw))
    return embedded


def _vectors_by_path(index_dir) -> dict[str, np.ndarray]:
    index = Searcher.open(index_dir).index
    deleted = set(index.store.deleted_ids("images").tolist())
    return {p: index.image_embeddings[i] for i, p in enumerate(index.image_paths) if i not in deleted}


def test_renamed_and_moved_files_keep_their_vectors_and_are_not_embedded(source, tmp_path, monkeypatch, capsys):
    root = tmp_path / "photos"
    paths = photo_folder(root, count=20)
    (paths[0].with_suffix(".txt")).write_text("a caption that moves with its image\n")
    build_index(source, str(root), tmp_path / "index")
    before = _vectors_by_path(tmp_path / "index")
    ids_before = {p: i for i, p in enumerate(Searcher.open(tmp_path / "index").index.image_paths)}
    moves = {}
    for path in paths[:5]:  # renamed in place (the first one with its caption sidecar)
        moves[path] = path.with_name("renamed-" + path.name)
    (root / "elsewhere").mkdir()
    for path in paths[5:8]:  # moved into another folder
        moves[path] = root / "elsewhere" / path.name
    for old, new in moves.items():
        old.rename(new)
        if old.with_suffix(".txt").exists():
            old.with_suffix(".txt").rename(new.with_suffix(".txt"))
    embedded = _count_embedded(monkeypatch)
    assert main(["index", "--model", TINY_MODEL, "--pretrained", source.pretrained, "--data", str(root),
                 "--out", str(tmp_path / "index"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert embedded == []
    assert {k: report[k] for k in ("added", "changed", "moved", "removed", "unchanged", "embedded")} == \
        {"added": 0, "changed": 0, "moved": 8, "removed": 0, "unchanged": 12, "embedded": 0}
    after = _vectors_by_path(tmp_path / "index")
    index = Searcher.open(tmp_path / "index").index
    for old, new in moves.items():
        new_path = str(new.resolve())
        assert np.array_equal(after[new_path], before[str(old.resolve())])
        assert index.image_paths[ids_before[str(old.resolve())]] == new_path  # the same id, now at its new path
    assert str(paths[0].resolve()) not in after
    assert index.store.facts([ids_before[str(paths[5].resolve())]])[0]["folder"] == "elsewhere"
    first = ids_before[str(paths[0].resolve())]
    assert index.store.captions_of([first])[first] == ["a caption that moves with its image"]

    fresh = build_index(source, str(root), tmp_path / "fresh")  # the moved index answers as a fresh build does
    query = "a photo"
    assert [(h.path, round(h.score, 4)) for h in Searcher.open(tmp_path / "index").by_text(query, 10)] == \
        [(h.path, round(h.score, 4)) for h in Searcher.open(tmp_path / "fresh").by_text(query, 10)]
    assert fresh.rebuilt


def test_a_copy_is_not_embedded_and_a_touched_file_is_unchanged(source, tmp_path, monkeypatch):
    root = tmp_path / "photos"
    paths = photo_folder(root, count=8)
    build_index(source, str(root), tmp_path / "index")
    shutil.copy(paths[2], root / "copy-of-2.jpg" if paths[2].suffix == ".jpg" else root / f"copy{paths[2].suffix}")
    copy = next(p for p in root.iterdir() if p.name.startswith("copy"))
    paths[3].touch()  # a new mtime, the same bytes
    import os
    os.utime(paths[3], (1e9, 1e9))
    embedded = _count_embedded(monkeypatch)
    update = build_index(source, str(root), tmp_path / "index")
    assert embedded == []
    assert (update.added, update.copies, update.changed, update.moved, update.unchanged) == (1, 1, 0, 0, 8)
    vectors = _vectors_by_path(tmp_path / "index")
    assert np.array_equal(vectors[str(copy.resolve())], vectors[str(paths[2].resolve())])
    again = build_index(source, str(root), tmp_path / "index")  # the touched file's new state was recorded
    assert (again.added, again.changed, again.unchanged) == (0, 0, 9)
    draw_photo(paths[4], 1234)  # new content at the same path: embedded again
    embedded.clear()
    update = build_index(source, str(root), tmp_path / "index")
    assert update.changed == 1 and embedded == [str(paths[4].resolve())]


def test_an_index_from_before_hashes_gets_them_and_then_finds_moves(source, tmp_path, monkeypatch):
    root = tmp_path / "photos"
    paths = photo_folder(root, count=6)
    build_index(source, str(root), tmp_path / "index")
    index = Searcher.open(tmp_path / "index").index
    with index.store.db:
        index.store.db.execute("UPDATE images SET hash = NULL")  # as an older vclr wrote it
    index.save(tmp_path / "index")
    build_index(source, str(root), tmp_path / "index")  # hashes recorded, nothing embedded
    assert None not in Searcher.open(tmp_path / "index").index.store.hashes(range(6))
    paths[1].rename(root / "moved.png" if paths[1].suffix == ".png" else root / f"moved{paths[1].suffix}")
    embedded = _count_embedded(monkeypatch)
    update = build_index(source, str(root), tmp_path / "index")
    assert update.moved == 1 and embedded == []


# ------------------------------------------------------------------------------------------------------ formats


def _scene(seed: int, size=(96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = rng.integers(0, 255, 3)
    x = int(rng.integers(0, size[0] // 2))
    pixels[:, x:x + size[0] // 3] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def write_dng(path: Path, scene: Image.Image, preview: Image.Image | None = None) -> Path:
    """A tiny, valid DNG (an uncompressed RGGB Bayer mosaic of `scene`), as a camera would write one; with `preview`,
    that image as its embedded preview (IFD0, the mosaic in a sub-IFD, as cameras lay them out)."""
    import tifffile

    rgb = np.asarray(scene, np.float64) / 255
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    cfa = np.zeros((h, w), np.uint16)
    cfa[0::2, 0::2] = rgb[0:h:2, 0:w:2, 0] * 4000
    cfa[0::2, 1::2] = rgb[0:h:2, 1:w:2, 1] * 4000
    cfa[1::2, 0::2] = rgb[1:h:2, 0:w:2, 1] * 4000
    cfa[1::2, 1::2] = rgb[1:h:2, 1:w:2, 2] * 4000
    tags = [(50706, "B", 4, (1, 4, 0, 0)), (50708, "s", 0, "vclr test camera"), (33421, "H", 2, (2, 2)),
            (33422, "B", 4, (0, 1, 1, 2)), (50717, "H", 1, 4095),
            (50721, "2i", 9, (1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1)), (50778, "H", 1, 21),
            (50728, "2I", 3, (1, 1, 1, 1, 1, 1))]
    if preview is None:
        tifffile.imwrite(path, cfa, photometric=32803, extratags=tags, subfiletype=0, metadata=None)
        return path
    dng, cfa_tags, colour = tags[:2], tags[2:5], tags[5:]
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.asarray(preview), photometric="rgb", subfiletype=1, subifds=1, extratags=dng + colour,
                  metadata=None)
        tif.write(cfa, photometric=32803, subfiletype=0, extratags=cfa_tags, metadata=None)
    return path


def test_heic_avif_and_raw_are_read_upright_and_exif_rotation_applies(tmp_path):
    pytest.importorskip("pillow_heif").register_heif_opener()  # to write the test's HEIC file
    pytest.importorskip("rawpy")
    from vclr.data.images import image_facts, read_image

    scene = _scene(0)
    scene.save(tmp_path / "a.heic")
    scene.save(tmp_path / "a.avif")
    write_dng(tmp_path / "a.dng", scene)
    for name in ("a.heic", "a.avif"):
        image = read_image(str(tmp_path / name))
        assert image.size == (96, 64) and np.abs(np.asarray(image, float) - np.asarray(scene, float)).mean() < 12
    raw = read_image(str(tmp_path / "a.dng"))  # half-size demosaic: no preview in this file
    assert raw.size == (48, 32) and raw.mode == "RGB"
    big = _scene(5, size=(600, 400))
    write_dng(tmp_path / "previewed.dng", scene, preview=big)  # the camera's preview stands for the file
    assert np.array_equal(np.asarray(read_image(str(tmp_path / "previewed.dng"))), np.asarray(big))
    write_dng(tmp_path / "thumb.dng", scene, preview=_scene(5, size=(160, 120)))  # a thumbnail is too small: demosaic
    assert read_image(str(tmp_path / "thumb.dng")).size == (48, 32)
    assert image_facts(str(tmp_path / "a.dng"))["width"] == 96
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to show
    scene.save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = read_image(str(tmp_path / "turned.jpg"))
    assert upright.size == (64, 96)
    expected = scene.transpose(Image.Transpose.ROTATE_270)
    assert np.abs(np.asarray(upright, float) - np.asarray(expected, float)).mean() < 6
    assert image_facts(str(tmp_path / "turned.jpg"))["width"] == 64


@pytest.mark.parametrize("name", ["bomb.jpg", "bomb.png", "bomb.avif", "bomb.heic", "bomb.dng"])
def test_a_decompression_bomb_of_each_format_is_refused_from_its_header(name, tmp_path, caplog):
    """The pixel count comes from the header (HEIC's, RAW's sensor size) before any decoding: a file over the limit
    is refused (here the limit is lowered, to keep the files small)."""
    pytest.importorskip("pillow_heif").register_heif_opener()
    pytest.importorskip("rawpy")
    from vclr.data.images import read_image

    path = tmp_path / name
    write_dng(path, _scene(1)) if name.endswith(".dng") else _scene(1).save(path)
    assert read_image(str(path)) is not None
    with caplog.at_level("WARNING"):
        assert read_image(str(path), max_pixels=96 * 64 - 1) is None
    assert "over the 6143-pixel limit" in caplog.text


def test_an_animated_image_is_read_by_its_first_frame(tmp_path):
    from vclr.data.images import read_image

    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue", "green")]
    for name in ("anim.gif", "anim.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=100, loop=0)
        image = read_image(str(tmp_path / name))
        assert image.size == (40, 30) and image.getpixel((5, 5))[0] > 200 and image.getpixel((5, 5))[2] < 50


def test_a_missing_decoder_is_one_clear_line_and_the_files_are_skipped(tmp_path, monkeypatch, caplog):
    import vclr.data.images as images

    monkeypatch.setattr(images, "_optional_module", lambda kind: None)
    monkeypatch.setattr(images, "_warned_missing", set())
    (tmp_path / "a.heic").write_bytes(b"not read")
    (tmp_path / "b.heic").write_bytes(b"not read")
    with caplog.at_level("WARNING"):
        assert images.read_image(str(tmp_path / "a.heic")) is None
        assert images.read_image(str(tmp_path / "b.heic")) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "pip install 'vclr[photos]'" in lines[0] and "pillow-heif" in lines[0]


def test_phone_and_camera_formats_are_indexed_and_found(source, tmp_path):
    pytest.importorskip("pillow_heif").register_heif_opener()
    pytest.importorskip("rawpy")
    root = tmp_path / "photos"
    photo_folder(root, count=6)
    scenes = {name: _scene(i + 10, size=(128, 96)) for i, name in enumerate(("phone.heic", "web.avif", "cam.dng"))}
    scenes["phone.heic"].save(root / "phone.heic")
    scenes["web.avif"].save(root / "web.avif")
    write_dng(root / "cam.dng", scenes["cam.dng"])
    (root / "fuzzed.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(range(256)) * 4)
    (root / "fuzzed.dng").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    update = build_index(source, str(root), tmp_path / "index")
    assert sorted(Path(p).name for p in update.unreadable) == ["fuzzed.dng", "fuzzed.heic"]
    searcher = Searcher.open(tmp_path / "index")
    names = {Path(p).name for p in searcher.index.image_paths}
    assert {"phone.heic", "web.avif", "cam.dng"} <= names
    for name in ("phone.heic", "web.avif", "cam.dng"):  # each is its own nearest image
        assert Path(searcher.by_image_file(root / name, 1, images=True)[0].path).name == name


# ---------------------------------------------------------------------------------------------------------- OCR


def _invoice(path: Path) -> None:
    from PIL import ImageDraw, ImageFont

    image = Image.new("RGB", (640, 420), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=44)
    draw.text((40, 40), "INVOICE 4711", fill="black", font=font)
    draw.text((40, 140), "Total due: 129.00 EUR", fill="black", font=ImageFont.load_default(size=30))
    draw.text((40, 220), "Payable within 30 days", fill="black", font=ImageFont.load_default(size=30))
    image.save(path, quality=92)


@pytest.fixture
def ocr_ready():
    from vclr.data.ocr import check_ocr
    from vclr.errors import VclrError

    try:
        check_ocr()
    except VclrError as e:
        pytest.skip(str(e))


def test_ocr_finds_an_invoice_by_its_words_with_an_untrained_model(ocr_ready, source, tmp_path, monkeypatch,
                                                                  capsys, caplog):
    import threading

    import pytesseract

    import vclr
    import vclr.data.ocr as ocr

    root = tmp_path / "photos"
    photo_folder(root, count=12)
    _invoice(root / "scan.jpg")
    real_engine, calls, lock = pytesseract.image_to_string, [], threading.Lock()

    def crashes_once(image, **kwargs):
        photo = abs(image.width / image.height - 640 / 420) > 0.01  # not the invoice
        with lock:
            first = photo and not calls
            calls.extend([1] if photo else [])
        if first:
            raise pytesseract.TesseractError(-11, "segmentation fault")  # one image: the engine dies
        return real_engine(image, **kwargs)

    monkeypatch.setattr(pytesseract, "image_to_string", crashes_once)
    real = ocr.read_text
    assert main(["index", "--model", TINY_MODEL, "--pretrained", source.pretrained, "--data", str(root),
                 "--out", str(tmp_path / "index"), "--ocr", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["words_read"] == 13  # the crash on one image did not stop it
    assert len([r for r in caplog.records if "OCR failed" in r.getMessage()]) == 1
    index = vclr.open_index(tmp_path / "index")
    hits = index.search("invoice 4711", k=5)
    assert Path(hits[0].path).name == "scan.jpg" and "[INVOICE]" in hits[0].words and "[4711]" in hits[0].words
    assert not hits[0].weak and all(h.words is None for h in hits[1:])
    assert main(["search", "--index", str(tmp_path / "index"), "--text", "invoice 4711", "-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert Path(rows[0]["path"]).name == "scan.jpg" and "4711" in rows[0]["words"]
    plain = index.search("a photo of a lake", k=13)  # no word matches: the embedding ranking alone
    assert all(h.words is None for h in plain)
    from fastapi.testclient import TestClient

    from vclr.serve.app import create_app
    with TestClient(create_app(Searcher.open(tmp_path / "index"))) as client:  # the service's one-text fast path too
        answer = client.get("/api/search", params={"text": "invoice 4711", "k": 3}).json()
    assert answer["hits"][0]["value"] == "scan.jpg" and "[4711]" in answer["hits"][0]["words"]

    draw_photo(root / "new.png", 77)  # incremental: only the new image is read
    read = []
    monkeypatch.setattr(ocr, "read_text", lambda p: read.append(p) or real(p))
    update = build_index(source, str(root), tmp_path / "index")  # the index remembers it reads text
    assert update.words_read == 1 and [Path(p).name for p in read] == ["new.png"]


def test_reciprocal_rank_fusion_against_its_rule(source, tmp_path):
    """The fused order equals the stated rule computed by hand from the two rankings: word matches inside and
    outside the embedding ranking's pool, interleaved with images found by embedding alone."""
    from vclr.search.query import Query
    from vclr.search.searcher import RRF_K

    root = tmp_path / "photos"
    photo_folder(root, count=10)
    build_index(source, str(root), tmp_path / "index")
    searcher = Searcher.open(tmp_path / "index")
    query = Query.of("invoice", k=4)
    full = [h.id for h in searcher.image_hits(searcher.query_vector(query), 10, "text")[0]]
    words = {full[1]: "invoice", full[6]: "red invoice", full[8]: "an invoice invoice invoice"}
    searcher.index.store.set_words(list(words), list(words.values()))
    searcher.index.manifest["ocr"] = True
    embedding = full[:4]  # the pool of a k=4 query
    by_words = [i for i, _ in searcher.index.store.match_words("invoice", 10)]
    assert sorted(by_words) == sorted(words)
    fused = {i: 1 / (RRF_K + r + 1) for r, i in enumerate(embedding)}
    for r, i in enumerate(by_words):
        fused[i] = fused.get(i, 0) + 1 / (RRF_K + r + 1)
    expected = sorted(fused, key=lambda i: (-fused[i], i not in by_words))[:4]
    got = searcher.search(query)
    assert [h.id for h in got] == expected and [h.rank for h in got] == [1, 2, 3, 4]
    assert any(i not in embedding for i in expected)  # a word match from outside the pool made the page

"""Dataset preparers on tiny fixtures in each source's real format; their output loads as a vclr table."""

import gzip
import json
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vclr.cli import main
from vclr.data.dataset import load_caption_table
from vclr.data.prepare import FASHION_MNIST_CLASSES, read_idx
from vclr.errors import PrepareError


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)


def _karpathy_fixture(tmp_path, coco=False):
    """The layout of dataset_flickr30k.json / dataset_coco.json (sentences[].raw, tokens, split, filename...)."""
    images, rows = tmp_path / "images", []
    splits = ["train", "train", "val", "test", "restval" if coco else "train", "test"]
    for i, split in enumerate(splits):
        folder = "val2014" if coco else ""
        name = f"COCO_val2014_{i:012d}.jpg" if coco else f"{1000 + i}.jpg"
        if i != 5:  # the last one is listed but missing on disk
            _png(images / folder / name, 10 * i)
        entry = {"filename": name, "imgid": i, "split": split, "sentids": [5 * i + k for k in range(5)],
                 "sentences": [{"raw": f"Caption {k} of image {i}.", "tokens": ["caption"], "imgid": i,
                                "sentid": 5 * i + k} for k in range(5)]}
        if coco:
            entry.update(filepath=folder, cocoid=900 + i)
        rows.append(entry)
    (tmp_path / "dataset.json").write_text(json.dumps({"images": rows, "dataset": "coco" if coco else "flickr30k"}))
    return tmp_path / "dataset.json", images


@pytest.mark.parametrize("coco", [False, True])
def test_karpathy(tmp_path, coco, capsys):
    split_file, images = _karpathy_fixture(tmp_path, coco)
    out = tmp_path / "out"
    assert main(["prepare", "karpathy", "--json", str(split_file), "--images", str(images), "--out", str(out)]) == 0
    assert "3 train" in capsys.readouterr().out  # restval joins train for COCO
    test = load_caption_table(out / "test")
    assert len(test) == 1  # the missing image is left out
    assert test.captions[0] == [f"Caption {k} of image 3." for k in range(5)]
    assert test.image_paths[0].endswith("COCO_val2014_000000000003.jpg" if coco else "1003.jpg")
    assert len(load_caption_table(out / "train")) == 3 and len(load_caption_table(out / "val")) == 1


def test_karpathy_rejects_other_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"annotations": []}))
    (tmp_path / "img").mkdir()
    with pytest.raises(PrepareError, match="not a Karpathy split file"):
        from vclr.data.prepare import prepare_karpathy
        prepare_karpathy(tmp_path / "x.json", tmp_path / "img", tmp_path / "out")


def _write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fashion_mnist_source(folder, train, test, seed=0):
    """Random 28x28 images with labels 0..9 cycling, as the four IDX .gz files of the real dataset."""
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, size=(n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def test_fashion_mnist_from_idx_files(tmp_path):
    src = _fashion_mnist_source(tmp_path / "src", train=12, test=5)
    out = tmp_path / "out"
    assert main(["prepare", "fashion-mnist", "--source", str(src), "--out", str(out), "--limit", "10"]) == 0
    train = load_caption_table(out / "train")
    assert len(train) == 10 and len(load_caption_table(out / "test")) == 5
    assert train.captions[3][0] == f"a photo of a {FASHION_MNIST_CLASSES[3]}"
    pixels = read_idx(src / "train-images-idx3-ubyte.gz")[7]
    assert np.array_equal(np.asarray(Image.open(out / "train" / "00007.png")), pixels)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out))  # a standard imagefolder, labels included
    assert ds["train"][7]["label"] == 7


def test_idx_with_wrong_length_is_rejected(tmp_path):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x01\x02")
    with pytest.raises(PrepareError, match="header says"):
        read_idx(path)


def test_folder_with_csv(tmp_path):
    images = tmp_path / "photos"
    lines = ["path,caption,alt"]
    for i in range(40):
        _png(images / "sub" / f"{i}.png", i)
        lines.append(f"sub/{i}.png,photo {i},alt text {i}")
    lines.append("sub/missing.png,gone,gone")
    (tmp_path / "caps.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["prepare", "folder", "--images", str(images), "--captions", str(tmp_path / "caps.csv"), "--out", str(out),
            "--image-column", "path", "--caption-columns", "caption,alt", "--test-fraction", "0.25"]
    assert main(argv) == 0
    train, test = load_caption_table(out / "train"), load_caption_table(out / "test")
    assert len(train) + len(test) == 40 and 3 <= len(test) <= 20
    assert sorted(test.image_paths) == sorted(set(test.image_paths) - set(train.image_paths))
    first = (out / "test" / "metadata.jsonl").read_text()
    assert main(argv) == 0 and (out / "test" / "metadata.jsonl").read_text() == first  # deterministic
    i = int(train.image_paths[0].rsplit("/", 1)[1].split(".")[0])
    assert train.captions[0] == [f"photo {i}", f"alt text {i}"]


def _openmoji_fixture(root):
    """The npm package's layout: data/openmoji.json (real keys) and color/svg/<hexcode>.svg."""
    def entry(hexcode, annotation, group="people-body", skintone="", base=""):
        return {"emoji": "?", "hexcode": hexcode, "group": group, "subgroups": "hand-fingers-open",
                "annotation": annotation, "tags": "hand, wave, waving", "openmoji_tags": "", "skintone": skintone,
                "skintone_combination": "single" if skintone else "", "skintone_base_emoji": "",
                "skintone_base_hexcode": base, "unicode": 1, "order": 1}
    entries = [entry("1F44B", "waving hand")]
    entries += [entry(f"1F44B-1F3F{t}", f"waving hand: tone {t}", skintone=t, base="1F44B") for t in "BCDEF"]
    entries += [entry(f"1F60{i}", f"face number {i}", group="smileys-emotion") for i in range(10)]
    entries += [entry("1F3FB", "light skin tone", group="component"), entry("E000", "no svg for this one")]
    (root / "data").mkdir(parents=True)
    (root / "data" / "openmoji.json").write_text(json.dumps(entries))
    (root / "color" / "svg").mkdir(parents=True)
    for e in entries[:-1]:
        (root / "color" / "svg" / f"{e['hexcode']}.svg").write_text(
            '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><circle cx="36" cy="36" r="30" '
            'fill="#fcea2b" stroke="#000" stroke-width="2"/></svg>')
    return root


@pytest.mark.parametrize("skin_tones, expected", [("drop", 11), ("group", 16), ("keep", 16)])
def test_openmoji(tmp_path, skin_tones, expected):
    package = _openmoji_fixture(tmp_path / "package")
    out = tmp_path / "out"
    assert main(["prepare", "openmoji", "--source", str(package), "--out", str(out), "--size", "32",
                 "--skin-tones", skin_tones, "--test-fraction", "0.5"]) == 0
    rows = [json.loads(line) for split in ("train", "test") if (out / split).is_dir()
            for line in (out / split / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == expected  # the component entry and the entry without an SVG are never written
    hands = [r for r in rows if r["file_name"].startswith("1F44B")]
    if skin_tones == "group":
        assert {r["concept"] for r in hands} == {"1F44B"}
        assert all(r["captions"][0] == "waving hand" for r in hands)
    if skin_tones == "keep":
        assert len({r["concept"] for r in hands}) == 6
    # split by concept: one concept never sits on both sides
    split_of = {}
    for split in ("train", "test"):
        for line in (out / split / "metadata.jsonl").read_text().splitlines():
            concept = json.loads(line)["concept"]
            assert split_of.setdefault(concept, split) == split
    assert set(split_of.values()) == {"train", "test"}
    image = Image.open(next((out / "train").glob("*.png")))
    assert image.size == (32, 32) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((16, 16))[2] < 100  # white bg, yellow face
    table = load_caption_table(out / "train")
    assert "an emoji showing" in " ".join(table.captions[0])


def test_zero_shot_on_a_prepared_fashion_mnist(tmp_path, capsys):
    src = _fashion_mnist_source(tmp_path / "src", train=20, test=10, seed=1)
    data, run = tmp_path / "fm", tmp_path / "run"
    assert main(["prepare", "fashion-mnist", "--source", str(src), "--out", str(data)]) == 0
    assert main(["train", f"data.train={data / 'train'}", f"data.test={data / 'test'}", f"train.output_dir={run}",
                 "data.batch_size=4", "optim.max_steps=2", "optim.warmup_steps=1", "train.checkpoint_every=2"]) == 0
    capsys.readouterr()
    assert main(["zero-shot", "--run", str(run), "--data", str(data / "test"), "--template", "a photo of a {}",
                 "--template", "a {}"]) == 0
    assert "zero-shot on 10 images, 10 classes" in capsys.readouterr().out
    report = json.loads((run / "zero_shot.json").read_text())
    assert report["classes"][9] == "ankle boot" and report["templates"] == ["a photo of a {}", "a {}"]
    assert report["metrics"]["zero_shot_top5"] >= report["metrics"]["zero_shot_top1"]
    assert len([k for k in report["metrics"] if k.startswith("zero_shot_top1/")]) == 10


def _tar_add(archive, name, data):
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path):
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as archive:
            for i in range(10):
                key = f"sample{s}{i:02d}"
                png = io.BytesIO()
                Image.new("RGB", (8, 8), (i * 20, s * 100, 0)).save(png, format="PNG")
                _tar_add(archive, f"{key}.png", png.getvalue())
                if i % 2:
                    _tar_add(archive, f"{key}.txt", f"caption {s} {i}\nsecond line {i}".encode())
                else:
                    _tar_add(archive, f"{key}.json", json.dumps({"caption": f"json caption {s} {i}"}).encode())
            _tar_add(archive, "nocaption.png", png.getvalue())  # an image alone: skipped
    out = tmp_path / "out"
    assert main(["prepare", "webdataset", "--shards", str(shards), "--out", str(out), "--test-fraction", "0.3"]) == 0
    train, test = load_caption_table(out / "train"), load_caption_table(out / "test")
    assert len(train) + len(test) == 20 and len(test) > 0
    by_name = {Path(p).name: c for p, c in zip(train.image_paths + test.image_paths, train.captions + test.captions)}
    assert by_name["00001_sample103.png"] == ["caption 1 3", "second line 3"]
    assert by_name["00000_sample004.png"] == ["json caption 0 4"]
    assert np.asarray(Image.open(out / ("train" if "00001_sample103.png" in map(lambda p: Path(p).name,
                      train.image_paths) else "test") / "00001_sample103.png")).shape == (8, 8, 3)
    (shards / "broken.tar").write_bytes(b"not a tar")
    assert main(["prepare", "webdataset", "--shards", str(shards), "--out", str(tmp_path / "o2")]) == 2

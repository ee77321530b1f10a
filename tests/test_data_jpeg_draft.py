"""Reduced-scale JPEG decoding (data.jpeg_draft): never smaller than asked, close to full decoding, on every path."""

import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vclr.config import ModelConfig, load_config
from vclr.data import dataset as dataset_module
from vclr.data.dataset import ImageDecoder, ImageTextDataset, decode_transform, load_caption_table
from vclr.data.images import read_image
from vclr.data.shards import ShardPairs
from vclr.embed.embedding import embed_image_paths, embed_table
from vclr.model.build import build_model, get_tokenizer, image_preprocess_cfg


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, sharp-edged boxes and fine noise: photo-like JPEG content whose edges show any loss of
    resolution (a smooth image would hide decoding at too small a scale)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(coarse)
    for _ in range(60):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        side = int(rng.integers(width // 40, width // 8))
        draw.rectangle((x, y, x + side, y + side // 2), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(coarse, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A table of three large JPEGs and one PNG."""
    folder = tmp_path_factory.mktemp("photos")
    rows = []
    for i, (w, h, fmt) in enumerate([(1000, 750, "JPEG"), (1200, 900, "JPEG"), (640, 960, "JPEG"), (800, 600, "PNG")]):
        name = f"{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        photo(w, h, seed=i).save(folder / name, format=fmt, quality=92)
        rows.append({"file_name": name, "captions": [f"photo {i}", f"picture {i}"]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("draft_to, expected", [(0, (1000, 750)), (224, (500, 375)), (180, (250, 188)),
                                                (64, (125, 94)), (751, (1000, 750))])
def test_jpeg_decodes_at_the_smallest_scale_that_keeps_both_sides(photos, draft_to, expected):
    image = read_image(str(photos / "0.jpg"), draft_to=draft_to)
    assert image.size == expected and image.mode == "RGB"
    assert min(image.size) >= min(draft_to, 750)  # never below what was asked, nor above the full size


def test_other_formats_decode_at_full_size(photos):
    assert read_image(str(photos / "3.png"), draft_to=64).size == (800, 600)


@pytest.mark.parametrize("size", [64, 224])
def test_drafted_pixels_match_full_decoding(photos, size):
    """The naive reference: decode the whole JPEG, then the same resize and crop."""
    geometry = decode_transform(size)
    for name in ("0.jpg", "1.jpg", "2.jpg"):
        full = geometry(Image.open(photos / name).convert("RGB")).float()  # (3, S, S)
        drafted = ImageDecoder(geometry, draft_to=2 * size)(str(photos / name)).float()  # data.jpeg_draft=2
        assert drafted.shape == full.shape == (3, size, size)
        # not exact: a side that is not a multiple of the scale rounds the drafted aspect ratio, so the resize can
        # round the long side one pixel apart (a sub-pixel shift that sharp edges show)
        assert (drafted - full).abs().mean() < 2  # of 255
        assert np.corrcoef(drafted.flatten(), full.flatten())[0, 1] > 0.998


@pytest.fixture()
def draft_sizes(monkeypatch):
    """Every draft_to the PIL decoders ask read_image for."""
    seen = []

    def spy(source, draft_to=0):
        seen.append(draft_to)
        return read_image(source, draft_to=draft_to)

    monkeypatch.setattr(dataset_module, "read_image", spy)
    return seen


@pytest.mark.parametrize("jpeg_draft", [0.0, 0.5, 1.0])
def test_jpeg_draft_reaches_training_items_caches_and_shards(photos, draft_sizes, jpeg_draft):
    table = load_caption_table(photos)
    tokenizer = get_tokenizer(ModelConfig())
    expected = math.ceil(64 * jpeg_draft)
    lazy = ImageTextDataset(table, tokenizer, 64, cache_images=False, jpeg_draft=jpeg_draft)
    assert lazy[0][0].shape == (3, 64, 64)
    ImageTextDataset(table, tokenizer, 64, cache_images=True, jpeg_draft=jpeg_draft)  # the decoded-once cache
    pairs = ShardPairs(tokenizer, 64, 0, ("captions",), encoded=False, augment=False, jpeg_draft=jpeg_draft)
    row = {"jpg": (photos / "0.jpg").read_bytes(), "captions": ["a photo"], "__key__": "0"}
    assert pairs(row)["image"].shape == (3, 64, 64)
    assert draft_sizes and set(draft_sizes) == {expected}


def test_training_source_takes_jpeg_draft_from_the_config(photos, draft_sizes):
    from accelerate import Accelerator

    from vclr.data.sources import open_training_source

    cfg = load_config(None, [f"data.train={photos}", "data.batch_size=2", "data.jpeg_draft=0.25"])
    source = open_training_source(cfg, Accelerator(cpu=True), get_tokenizer(cfg.model), 64)
    batch = next(iter(source.loader(0)))
    assert batch.images.shape == (2, 3, 64, 64)
    assert set(draft_sizes) == {16}


def test_embedding_follows_the_run_config_and_matches_full_decoding(photos, draft_sizes):
    model = build_model(ModelConfig()).eval()
    size = image_preprocess_cfg(model)["size"]
    paths = [str(photos / name) for name in ("0.jpg", "1.jpg", "2.jpg", "3.png")]
    full, _ = embed_image_paths(model, paths, jpeg_draft=0)
    drafted, kept = embed_image_paths(model, paths)  # default: sides kept >= 2 x the input size
    assert kept.tolist() == [0, 1, 2, 3]
    assert set(draft_sizes) == {0, 2 * size}
    cosine = np.sum(full * drafted, axis=1)  # (4,) unit vectors
    assert cosine.min() > 0.99 and cosine[3] == pytest.approx(1.0, abs=1e-6)  # the PNG is decoded alike
    draft_sizes.clear()
    cfg = load_config(None, ["data.jpeg_draft=0.5"])
    embed_table(model, cfg, load_caption_table(photos))
    assert set(draft_sizes) == {math.ceil(size * 0.5)}


def test_negative_jpeg_draft_is_refused():
    with pytest.raises(Exception, match="data.jpeg_draft=-1.0 is out of range"):
        load_config(None, ["data.jpeg_draft=-1"])


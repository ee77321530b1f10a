"""Batched decoding on the training device against the loader's PIL path (both resize with torch's antialiasing)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vclr.data.dataset import decode_transform
from vclr.data.device_decode import decode_resize


def _photo(width, height, seed, mode="RGB"):
    """Smooth gradients plus texture: JPEG-like content with real high frequencies."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _encode(image, fmt, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _pil_reference(data: bytes, size: int) -> torch.Tensor:
    return decode_transform(size)(Image.open(io.BytesIO(data)).convert("RGB"))


def test_device_decode_matches_pil_path():
    encoded = [_encode(_photo(500, 375, 0), "JPEG", quality=90), _encode(_photo(500, 375, 1), "JPEG", quality=90),
               _encode(_photo(320, 480, 2), "JPEG", quality=75),  # portrait: another resize group
               _encode(_photo(100, 80, 3, "L"), "JPEG"),  # grayscale JPEG -> RGB
               _encode(_photo(90, 90, 4), "PNG"),  # not a JPEG: CPU fallback
               _encode(_photo(64, 64, 5, "P"), "PNG")]  # palette PNG
    images, kept = decode_resize(encoded, 64, torch.device("cpu"))
    assert kept.all() and images.shape == (6, 3, 64, 64) and images.dtype == torch.uint8
    for got, data in zip(images, encoded):
        expected = _pil_reference(data, 64)
        # libjpeg versions may differ by an intensity level or two; geometry and colour must agree
        assert (got.float() - expected.float()).abs().mean() < 1.5


def test_unreadable_bytes_are_dropped_and_reported():
    good = _encode(_photo(80, 60, 0), "JPEG")
    truncated = good[: len(good) // 3]
    not_an_image = b"this is a text file, not a JPEG"
    images, kept = decode_resize([good, truncated, not_an_image, b"\xff\xd8\xff garbage", good], 32,
                                 torch.device("cpu"))
    assert kept.tolist()[0] and kept.tolist()[4] and not kept.tolist()[2] and not kept.tolist()[3]
    assert images.shape[0] == int(kept.sum())


def test_augment_gives_random_crops_of_the_right_size():
    data = [_encode(_photo(200, 150, i), "JPEG") for i in range(4)]
    torch.manual_seed(0)
    a, _ = decode_resize(data, 48, torch.device("cpu"), augment=True)
    b, _ = decode_resize(data, 48, torch.device("cpu"), augment=True)
    assert a.shape == (4, 3, 48, 48) and not torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvJPEG)")
def test_cuda_decode_matches_cpu_decode():
    encoded = [_encode(_photo(500, 375, i), "JPEG", quality=90) for i in range(8)]
    cpu, _ = decode_resize(encoded, 224, torch.device("cpu"))
    gpu, kept = decode_resize(encoded, 224, torch.device("cuda"))
    assert kept.all() and gpu.is_cuda
    assert (gpu.cpu().float() - cpu.float()).abs().mean() < 1.5


@pytest.mark.slow
def test_training_with_device_decoding_matches_loader_decoding(small_shapes, tmp_path):
    """Same batches, images decoded in the loader (PIL) or on the device: the same losses up to decoder rounding."""
    import json

    from helpers import train_overrides

    import vclr.train.loop as train_mod
    from vclr.config import load_config

    def losses(run, decode_on):
        extra = {"optim.max_steps": 4, "optim.warmup_steps": 2, "train.log_every": 1, "data.decode_on": decode_on}
        train_mod.train(load_config(None, train_overrides(small_shapes, tmp_path / run, **extra)))
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    loader, device = losses("loader", "loader"), losses("device", "device")
    assert len(loader) == len(device) == 4
    assert device == pytest.approx(loader, rel=2e-3)

"""Streaming training data from webdataset shards: every pair once per epoch, per-process shards, exact resume."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from helpers import write_shards

from vclr.config import ModelConfig, load_config
from vclr.data.dataset import load_caption_table
from vclr.data.shards import ShardPairs, find_shards, stream_shards
from vclr.errors import DataError
from vclr.model.build import get_tokenizer


@pytest.fixture(scope="module")
def shard_dir(small_shapes, tmp_path_factory):
    return write_shards(small_shapes / "train", tmp_path_factory.mktemp("shards"), 4)


def _keys(stream) -> list[str]:
    return [json.dumps(row["tokens"].tolist()) + str(len(row["image"])) for row in stream]


def _pairs(seed=0):
    return ShardPairs(get_tokenizer(ModelConfig()), 64, seed, ("captions",), encoded=True, augment=False)


def test_find_shards(shard_dir, small_shapes):
    assert [p.name for p in find_shards(shard_dir)] == [f"shard-{i:04d}.tar" for i in range(4)]
    assert find_shards(small_shapes / "train") == []  # an imagefolder split is not a shard dir


def test_stream_gives_every_pair_once_per_epoch_in_a_seeded_order(shard_dir):
    shards = find_shards(shard_dir)
    epoch0 = _keys(stream_shards(shards, _pairs(), 0, 1, epoch=0))
    assert len(epoch0) == 1500 and len({k.split("]")[1] + k for k in epoch0}) >= 1490  # (near-)unique images
    assert _keys(stream_shards(shards, _pairs(), 0, 1, epoch=0)) == epoch0  # same (seed, epoch): same order
    epoch1 = _keys(stream_shards(shards, _pairs(), 0, 1, epoch=1))
    assert epoch1 != epoch0 and len(epoch1) == 1500


def test_each_process_reads_its_own_shards(shard_dir):
    shards = find_shards(shard_dir)
    images = [{row["image"] for row in stream_shards(shards, _pairs(), rank, 2, epoch=0)} for rank in (0, 1)]
    assert images[0].isdisjoint(images[1])
    assert len(images[0]) + len(images[1]) == len({row["image"] for row in stream_shards(shards, _pairs(), 0, 1, 0)})
    assert abs(len(images[0]) - len(images[1])) <= 1


def test_mixed_shard_kinds_are_an_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "b.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="mixes"):
        find_shards(tmp_path)


@pytest.mark.slow
def test_training_from_shards_resumes_with_the_identical_next_batch(small_shapes, tmp_path, monkeypatch):
    import vclr.train.loop as train_mod

    shards = write_shards(small_shapes / "test", tmp_path / "shards", 3)  # 200 pairs: 6 batches of 32 an epoch

    def overrides(run, **extra):
        values = {"data.train": shards, "train.output_dir": tmp_path / run, "data.batch_size": 32,
                  "optim.max_steps": 10, "optim.warmup_steps": 2, "train.log_every": 1, "train.checkpoint_every": 8,
                  "data.decode_on": "device", "train.threads": 2}
        values.update(extra)
        return [f"{k}={v}" for k, v in values.items()]

    seen = {}
    real_step = train_mod.train_step

    def recording_step(trainer, batch):
        seen.setdefault(trainer.cfg.train.output_dir, {})[trainer.state.step + 1] = int(batch.tokens.sum())
        return real_step(trainer, batch)

    monkeypatch.setattr(train_mod, "train_step", recording_step)
    full = train_mod.train(load_config(None, overrides("full")))
    assert full.step == 10  # 6 batches an epoch: the run crosses into epoch 1

    real_save = train_mod.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_die(trainer):
        real_save(trainer)
        raise Stop  # dies right after the step-8 checkpoint, 2 batches into epoch 1

    cfg = load_config(None, overrides("stopped"))
    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        train_mod.train(cfg)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    resumed = train_mod.train(cfg, resume=True)
    assert resumed.step == 10
    full_seen, stopped_seen = seen[str(tmp_path / "full")], seen[str(tmp_path / "stopped")]
    assert [stopped_seen[s] for s in range(1, 11)] == [full_seen[s] for s in range(1, 11)]
    full_losses = [json.loads(r)["loss"] for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resumed_losses = [json.loads(r)["loss"] for r in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert resumed_losses == pytest.approx(full_losses, rel=1e-4)


def test_parquet_shards_stream_like_tar_shards(small_shapes, tmp_path):
    """Parquet shards (an HF Image column + a captions column) stream through the same path."""
    import datasets

    table = load_caption_table(small_shapes / "test")
    for shard in range(2):
        rows = range(shard * 100, (shard + 1) * 100)
        ds = datasets.Dataset.from_dict({"image": [table.image_paths[i] for i in rows],
                                         "captions": [table.captions[i] for i in rows]},
                                        features=datasets.Features({"image": datasets.Image(),
                                                                    "captions": [datasets.Value("string")]}))
        ds.to_parquet(str(tmp_path / f"part-{shard}.parquet"))
    shards = find_shards(tmp_path)
    assert [p.suffix for p in shards] == [".parquet", ".parquet"]
    rows = list(stream_shards(shards, _pairs(), 0, 1, epoch=0))
    assert len(rows) == 200 and all(isinstance(r["image"], bytes) and r["image"][:4] == b"\x89PNG" for r in rows)
    decoded = ShardPairs(get_tokenizer(ModelConfig()), 32, 0, ("captions",), encoded=False, augment=False)
    first = next(iter(stream_shards(shards, decoded, 0, 1, epoch=0)))
    assert tuple(first["image"].shape) == (3, 32, 32)


def test_streamed_and_prepared_shards_read_the_same_captions_and_images(tmp_path):
    """One parser for the format: `vclr prepare webdataset` and training from the same shards see the same pairs."""
    import datasets
    from PIL import Image

    from vclr.data.prepare import prepare_webdataset
    from vclr.data.shards import sample_captions, sample_image_key

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(png, format="PNG")
    # HF's webdataset reader wants every sample to hold the same members
    samples = {"a": {"png": png.getvalue(), "txt": b"first line\nsecond line\n", "json": b"{}"},
               "b": {"png": png.getvalue(), "txt": b"",
                     "json": json.dumps({"caption": "from json", "text": "first line"}).encode()},
               "c": {"png": png.getvalue(), "txt": b"only txt", "json": json.dumps({"captions": ["x", "y"]}).encode()}}
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "s.tar", "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    prepare_webdataset(tmp_path / "shards", tmp_path / "out", test_fraction=0.0)
    prepared = {Path(p).name.split("_")[1].split(".")[0]: c
                for p, c in zip(*[getattr(load_caption_table(tmp_path / "out" / "train"), a)
                                  for a in ("image_paths", "captions")])}
    stream = datasets.load_dataset("webdataset", data_files=[str(tmp_path / "shards" / "s.tar")], split="train",
                                   streaming=True)
    streamed = {row["__key__"]: sample_captions(row, ("captions",)) for row in stream}
    assert prepared == streamed == {"a": ["first line", "second line"], "b": ["from json", "first line"],
                                    "c": ["only txt", "x", "y"]}
    assert [sample_image_key(s) for s in ({"webp": None, "png": b"x"}, {"jpg": b"x"}, {"image": {}}, {})] == \
        ["png", "jpg", "image", None]

import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing is fetched from a hub in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def small_shapes(tmp_path_factory):
    """A small synthetic dataset shared by the training tests."""
    from vclr.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("small_shapes"), num_train=1500, num_test=200, seed=1)


def train_overrides(data, run, **extra):
    values = {"data.train": data / "train", "data.test": data / "test", "train.output_dir": run,
              "optim.max_steps": 150, "optim.warmup_steps": 10, "data.batch_size": 64,
              "loss.triplet_warmup_steps": 50, "train.checkpoint_every": 75, "train.max_minutes": 0}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]

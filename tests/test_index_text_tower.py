"""The index's own text query tower: equal to the model's text embeddings, kept through index updates, and a cold
text search through it imports neither open_clip nor torchvision."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import untrained_index

from vclr.config import load_config
from vclr.index.format import RetrievalIndex
from vclr.index.text_tower import FILES, TextQueryEncoder
from vclr.search.encoders import ModelEncoder, TracedTextEncoder
from vclr.search.searcher import Searcher


@pytest.fixture(scope="module")
def index_dir(small_shapes, tmp_path_factory):
    return untrained_index(small_shapes / "test", tmp_path_factory.mktemp("qt_run"))


def test_the_saved_tower_embeds_as_the_model_does(index_dir):
    from vclr.embed.embedding import embed_texts

    assert all((index_dir / name).is_file() for name in FILES)
    searcher = Searcher.open(index_dir)  # the model too
    model = ModelEncoder.of_index(searcher.index, index_dir)
    model.load()
    texts = ["a large red circle on the left", "", "two tiny blue stars", "x " * 100, "Café, déjà vu!"]
    np.testing.assert_allclose(TextQueryEncoder.load(index_dir)(texts), embed_texts(model.model, model.cfg, texts),
                               atol=1e-5)
    cold = Searcher.open(index_dir, load_model=False)
    assert isinstance(cold.encoder, TracedTextEncoder) and cold.encoder.images is None
    assert [h.id for h in cold.by_text("a red circle", 5)] == [h.id for h in searcher.by_text("a red circle", 5)]
    assert cold.encoder.images is None  # a text query did not need the model
    cold.by_image_file(cold.index.image_paths[0], 3)  # an image query loads it
    assert cold.encoder.images.loaded


def test_the_tower_survives_updates_of_the_index(index_dir, tmp_path):
    from vclr.index.build import delete_from_index

    before = (index_dir / FILES[0]).read_bytes()
    delete_from_index(index_dir, image_ids=[1])
    assert (index_dir / FILES[0]).read_bytes() == before
    assert set(FILES) <= set(RetrievalIndex.load(index_dir).attachments)


def test_a_cold_text_search_imports_neither_open_clip_nor_torchvision(index_dir):
    code = ("import sys, json; from vclr.cli import main; "
            f"assert main(['search', '--index', {str(index_dir)!r}, '--text', 'a red circle', '--json']) == 0; "
            "heavy = [m for m in ('open_clip', 'torchvision', 'transformers', 'timm') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_saved_tower_holds_the_text_side_only():
    from vclr.config import ModelConfig
    from vclr.index.text_tower import TOWER_FILE, text_query_files
    from vclr.model.build import build_model

    model = build_model(ModelConfig()).eval()
    visual = model.clip.visual
    saved = len(text_query_files(model, load_config(None, []))[TOWER_FILE])
    assert model.clip.visual is visual  # the model keeps its image tower
    image_bytes = sum(p.numel() * p.element_size() for p in visual.parameters())
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert saved < all_bytes - image_bytes / 2

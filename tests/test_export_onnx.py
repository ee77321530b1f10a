"""ONNX export (`vclr export --format onnx`) and the service that answers through it without PyTorch."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import free_port, untrained_index
from PIL import Image

from vclr.cli import main
from vclr.errors import VclrError
from vclr.export.onnx import export_onnx
from vclr.model.source import model_source
from vclr.search.onnx import OnnxQueryEncoder, preprocess_image
from vclr.search.searcher import Searcher

# what a machine without PyTorch lacks: the test's server process cannot import any of these
BLOCKER = """
import sys
BLOCKED = {"torch", "torchvision", "open_clip", "transformers", "timm"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: this process stands for a machine without PyTorch")
sys.meta_path.insert(0, Block())
"""


@pytest.fixture(scope="module")
def exported(small_shapes, tmp_path_factory):
    """An index of the small test split by an untrained tiny model saved as a run, and that run's ONNX export."""
    root = tmp_path_factory.mktemp("onnx")
    index_dir = untrained_index(small_shapes / "test", root / "run")
    assert main(["export", "--run", str(root / "run"), "--format", "onnx", "--out", str(root / "onnx")]) == 0
    return index_dir, root / "onnx"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_onnx_embeddings_equal_pytorch(exported, small_shapes):
    index_dir, onnx_dir = exported
    torch_side = Searcher.open(index_dir)
    onnx_side = OnnxQueryEncoder.load(onnx_dir)
    texts = ["a red circle", "two blue squares at the top left", "a small green triangle", "x"]
    assert _cosines(onnx_side.embed_texts(texts), torch_side.embed_texts(texts)).min() >= 0.9999
    # the indexed images themselves, decoded the service's way, against the vectors the index holds
    paths = torch_side.index.store.image_paths(list(range(8)))
    images = [Image.open(p).convert("RGB") for p in paths]
    assert _cosines(onnx_side.embed_images(images), np.asarray(torch_side.index.image_embeddings[:8])).min() >= 0.9999


def test_int8_export_stays_close_to_pytorch_and_says_so(exported, small_shapes, tmp_path, capsys):
    """`vclr export --int8`: quantised towers, recorded as int8, checked against PyTorch before writing; the service's
    encoder reads them like any export."""
    index_dir, onnx_dir = exported
    run = onnx_dir.parent / "run"
    assert main(["export", "--run", str(run), "--format", "onnx", "--out", str(tmp_path / "int8"), "--int8"]) == 0
    assert "as int8 ONNX" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert manifest["precision"] == "int8" and manifest["min_cosine"] >= 0.99
    assert json.loads((onnx_dir / "export.json").read_text())["precision"] == "fp32"
    assert sorted(p.name for p in (tmp_path / "int8").iterdir()) == sorted(p.name for p in onnx_dir.iterdir())
    int8, fp32 = OnnxQueryEncoder.load(tmp_path / "int8"), OnnxQueryEncoder.load(onnx_dir)
    graph = (tmp_path / "int8" / "image.onnx").read_bytes()
    assert b"DynamicQuantizeLinear" in graph and b"DynamicQuantizeLinear" not in (onnx_dir / "image.onnx").read_bytes()
    texts = ["a red circle", "two blue squares at the top left", "a small green triangle"]
    assert _cosines(int8.embed_texts(texts), fp32.embed_texts(texts)).min() >= 0.99
    images = [Image.open(p).convert("RGB") for p in sorted((small_shapes / "test").rglob("*.png"))[:8]]
    assert _cosines(int8.embed_images(images), fp32.embed_images(images)).min() >= 0.99


def test_an_int8_export_below_the_bar_writes_nothing(exported, tmp_path, monkeypatch):
    import vclr.export.onnx as onnx_export

    monkeypatch.setattr(onnx_export, "MIN_COSINE_INT8", 1.0 + 1e-9)  # no quantised tower reaches it
    with pytest.raises(VclrError, match="disagrees with the PyTorch model"):
        export_onnx(model_source(run=exported[1].parent / "run"), tmp_path / "int8", int8=True)
    assert not (tmp_path / "int8").exists()


def test_preprocessing_equals_torchvision_on_odd_sizes():
    """Resize of the short side (truncating the long one), centre crop, normalise: as open_clip's transform does."""

    from vclr.data.dataset import normalize_images
    from vclr.model.build import inference_transform

    class Stub:  # inference_transform reads the preprocess config from the model's image tower
        pass

    import open_clip

    model = Stub()
    model.clip = open_clip.create_model("RN50", pretrained=None)  # 224 px, bicubic, shortest side
    cfg = {"size": 224, "mean": open_clip.OPENAI_DATASET_MEAN, "std": open_clip.OPENAI_DATASET_STD,
           "resize_mode": "shortest", "interpolation": "bicubic"}
    transform = inference_transform(model)
    rng = np.random.default_rng(0)
    for h, w in ((224, 224), (97, 333), (500, 301), (225, 224), (60, 61)):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        expected = normalize_images(transform(image)[None], cfg["mean"], cfg["std"])[0].numpy()
        np.testing.assert_allclose(preprocess_image(image, cfg), expected, atol=1e-4, err_msg=f"{h}x{w}")


def test_the_service_answers_without_torch(exported, tmp_path):
    """`vclr serve --backend onnx` in a process where torch, open_clip, transformers... cannot be imported: its
    answers equal the PyTorch service's."""
    import httpx

    index_dir, onnx_dir = exported
    port = free_port()
    script = BLOCKER + f"""
from vclr.cli import main
sys.exit(main(["serve", "--index", {str(index_dir)!r}, "--backend", "onnx", "--onnx", {str(onnx_dir)!r},
               "--port", "{port}"]))
"""
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/api/info", timeout=1)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start:\n{server.communicate()[0]}") from None
                time.sleep(0.2)
        text = httpx.get(f"{base}/api/search", params={"text": "a red circle", "k": 5}).json()
        upload = io.BytesIO()
        Image.new("RGB", (80, 60), (200, 30, 30)).save(upload, "PNG")
        image = httpx.post(f"{base}/api/search/image", params={"k": 5, "images": "true"},
                           files={"file": ("red.png", upload.getvalue(), "image/png")}).json()
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0]
    reference = Searcher.open(index_dir)
    expected_text = reference.by_text("a red circle", 5)
    assert [h["id"] for h in text["hits"]] == [h.id for h in expected_text], output
    np.testing.assert_allclose([h["score"] for h in text["hits"]], [h.score for h in expected_text], atol=1e-4)
    expected_image = reference.by_image_embedding(
        reference.embed_images([Image.open(io.BytesIO(upload.getvalue())).convert("RGB")]), 5, images=True)
    assert [h["id"] for h in image["hits"]] == [h.id for h in expected_image], output


def test_the_serving_path_imports_no_torch(exported):
    """The modules a `--backend onnx` service loads, imported with torch blocked (a precise failure message if one
    of them starts to import torch at module level)."""
    index_dir, onnx_dir = exported
    script = BLOCKER + f"""
from fastapi.testclient import TestClient
from vclr.search.onnx import OnnxQueryEncoder
from vclr.search.searcher import Searcher
from vclr.serve.app import create_app
client = TestClient(create_app(Searcher.open({str(index_dir)!r}, encoder=OnnxQueryEncoder.load({str(onnx_dir)!r}))))
hits = client.get("/api/search", params={{"text": "a red circle", "k": 3}}).json()["hits"]
print(json.dumps([h["id"] for h in hits]))
"""
    done = subprocess.run([sys.executable, "-c", "import json\n" + script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [h.id for h in Searcher.open(index_dir).by_text(
        "a red circle", 3)]


def test_an_export_of_another_model_is_refused(exported, tmp_path):
    index_dir, onnx_dir = exported
    other = tmp_path / "other"
    shutil.copytree(onnx_dir, other)
    manifest = json.loads((other / "export.json").read_text())
    (other / "export.json").write_text(json.dumps({**manifest, "model_config_hash": "0123456789ab"}))
    with pytest.raises(VclrError, match="export the index's model"):
        Searcher.open(index_dir, encoder=OnnxQueryEncoder.load(other))


def test_a_lit_model_with_a_hugging_face_tokenizer_exports(tiny_hf_text_dir, tiny_lit_model_name, tmp_path):
    """A LiT-shaped model (timm EfficientNet-Lite0 + a BERT text tower with its WordPiece tokenizer): the export's
    own check passes (equal tokens, cosine >= 0.9999), and the folder answers like the model."""
    import timm
    import torch

    from vclr.config import Config, ModelConfig, config_hash
    from vclr.embed.embedding import embed_texts
    from vclr.model.build import build_model

    weights = tmp_path / "trunk.pt"
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), weights)
    cfg = Config(model=ModelConfig(name=tiny_lit_model_name, text_tower_dir=str(tiny_hf_text_dir),
                                   image_tower_weights=str(weights)))

    class Fixed:  # a model source that gives the same random-init model on every load
        def load(self, device=None):
            torch.manual_seed(0)
            return build_model(cfg.model).eval(), cfg

        def describe(self):
            return {"kind": "test"}

    manifest = export_onnx(Fixed(), tmp_path / "lit")
    assert manifest["min_cosine"] >= 0.9999 and manifest["model_config_hash"] == config_hash(cfg.model)
    encoder = OnnxQueryEncoder.load(tmp_path / "lit")
    texts = ["a red circle on the left", "the large blue star"]
    assert encoder.tokenize(texts)[0, 0] == 2  # [CLS] of the local vocabulary
    model, _ = Fixed().load()
    assert _cosines(encoder.embed_texts(texts), embed_texts(model, cfg, texts)).min() >= 0.9999


def test_export_of_the_index_model_and_damage_detection(exported, tmp_path):
    index_dir, onnx_dir = exported
    out = tmp_path / "from-index"
    assert main(["export", "--index", str(index_dir), "--out", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["model_config_hash"] == \
        json.loads((onnx_dir / "export.json").read_text())["model_config_hash"]
    with open(out / "text.onnx", "r+b") as f:  # one flipped byte in the middle of the graph
        f.seek(os.path.getsize(out / "text.onnx") // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(VclrError, match="does not match its checksum"):
        OnnxQueryEncoder.load(out)


def test_serve_flags_for_onnx_are_checked(capsys):
    assert main(["serve", "--index", "x", "--backend", "onnx"]) == 2
    assert "--backend onnx needs --onnx DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_vit_b_32_exports_and_matches_pytorch(tmp_path):
    """A random-init ViT-B-32 (open_clip's config; no weights offline): the export checks cosine >= 0.9999 on texts
    and on images of several sizes before it writes, and the folder loads and answers."""
    manifest = export_onnx(model_source(model="ViT-B-32"), tmp_path / "vit")
    assert manifest["min_cosine"] >= 0.9999 and manifest["image"]["size"] == 224
    encoder = OnnxQueryEncoder.load(tmp_path / "vit")
    vectors = encoder.embed_texts(["a dog on a beach", "a red car"])
    assert vectors.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert Path(tmp_path / "vit" / "tokenizer.json").is_file()

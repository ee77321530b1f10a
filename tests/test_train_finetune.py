"""Fine-tuning published models: LoRA through peft (fresh adapters compute the base, the merged run computes the
adapters), EMA weights against a hand-computed average, WiSE-FT's end points, gradient checkpointing, the open_clip
export read back by open_clip itself, and one clear line for each mistake."""

import json
from dataclasses import replace

import pytest
import torch
from helpers import train_overrides, untrained_run
from safetensors.torch import load_file

import vclr.train.loop as train_mod
from vclr.cli.main import main
from vclr.config import Config, ModelConfig, load_config
from vclr.errors import ConfigError, VclrError
from vclr.model.build import build_model, get_tokenizer
from vclr.model.source import model_source
from vclr.rundir import TRAIN_REPORT_FILE, save_model_as_run

pytest.importorskip("peft")
VIT = "vclr-tiny-vit"  # an open_clip ViT (image) + transformer (text) config at 64 px: attention and MLP layers
TEXTS = ["a red circle on the left", "a small blue star at the top", "a green square"]


def _probe(model, cfg):
    torch.manual_seed(5)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(get_tokenizer(cfg)(TEXTS), normalize=True)


def _frozen_towers(model):
    for name, parameter in model.named_parameters():
        parameter.requires_grad_("lora_" in name)
    return model.eval()


def test_fresh_adapters_compute_exactly_what_the_base_computes():
    """peft starts B at 0. The base is compared with its towers frozen too: torch's attention takes another kernel
    when no weight needs a gradient, 3e-6 away, in the base as in the adapted model."""
    cfg = ModelConfig(name=VIT, lora_rank=4)
    torch.manual_seed(0)
    base = _frozen_towers(build_model(replace(cfg, lora_rank=0)))
    torch.manual_seed(0)
    adapted = build_model(cfg).eval()
    names = [n for n, _ in adapted.named_parameters() if "lora_" in n]
    assert any(".attn." in n for n in names) and any(".c_fc." in n for n in names)  # attention and MLP layers
    assert any(n.startswith("clip.visual.") for n in names) and any(n.startswith("clip.transformer.") for n in names)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable == set(names) | {"clip.visual.proj", "clip.text_projection", "clip.logit_scale"}
    for ours, theirs in zip(_probe(adapted, cfg), _probe(base, cfg)):
        assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_a_lora_run_trains_only_its_adapters_and_merges_into_plain_weights(small_shapes, tmp_path, capsys):
    run = tmp_path / "lora"
    cfg = load_config(None, train_overrides(small_shapes, run, **{
        "model.name": VIT, "model.lora_rank": 8, "model.lora_alpha": 16, "optim.max_steps": 20,
        "optim.warmup_steps": 2, "train.checkpoint_every": 100, "optim.lr": 0.01}))
    torch.manual_seed(cfg.train.seed)
    initial = build_model(replace(cfg.model, lora_rank=0)).state_dict()
    result = train_mod.train(cfg)
    report = json.loads((run / TRAIN_REPORT_FILE).read_text())
    assert report["trainable_parameters"] < 0.25 * report["total_parameters"] and report["peak_memory_bytes"] > 0
    assert result.report == report
    trained = load_file(run / "model.safetensors")
    block = "clip.visual.transformer.resblocks.0.mlp.c_fc"
    assert torch.equal(trained[f"{block}.base_layer.weight"], initial[f"{block}.weight"])  # the tower stays
    assert trained[f"{block}.lora_B.default.weight"].abs().sum() > 0  # the adapter learned
    assert not torch.equal(trained["clip.visual.proj"], initial["clip.visual.proj"])  # the head trains too

    assert main(["export", "--run", str(run), "--merge-lora", "--out", str(tmp_path / "merged")]) == 0
    merged_model, merged_cfg = model_source(run=str(tmp_path / "merged")).load()
    assert merged_cfg.model.lora_rank == 0
    assert not any("lora_" in k for k in merged_model.state_dict())
    adapted_model, adapted_cfg = model_source(run=str(run)).load()
    for ours, theirs in zip(_probe(merged_model, merged_cfg.model), _probe(adapted_model, adapted_cfg.model)):
        assert torch.allclose(ours, theirs, atol=1e-5)  # W + BA folded once, against BA added each forward
    assert "merged the LoRA adapters" in capsys.readouterr().out


def test_ema_equals_a_hand_computed_moving_average(small_shapes, tmp_path, monkeypatch):
    run, decay = tmp_path / "ema", 0.6
    cfg = load_config(None, train_overrides(small_shapes, run, **{
        "train.ema_decay": decay, "optim.max_steps": 4, "optim.warmup_steps": 1, "data.batch_size": 16,
        "train.checkpoint_every": 100, "loss.triplet_weight": 0}))
    seen = []
    step = train_mod.train_step

    def recording(trainer, batch):
        if not seen:
            seen.append({k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(
                trainer.model).state_dict().items()})
        out = step(trainer, batch)
        seen.append({k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(
            trainer.model).state_dict().items()})
        return out

    monkeypatch.setattr(train_mod, "train_step", recording)
    train_mod.train(cfg)
    expected = dict(seen[0])  # the average starts as the initial weights
    for weights in seen[1:]:
        expected = {k: decay * v + (1 - decay) * weights[k] if v.is_floating_point() else weights[k]
                    for k, v in expected.items()}
    ema, _ = model_source(run=str(run), checkpoint="ema").load()
    for name, value in ema.state_dict().items():
        assert torch.allclose(value, expected[name].to(value.dtype), atol=1e-6), name
    final = load_file(run / "model.safetensors")
    assert not torch.equal(final["clip.logit_scale"], ema.state_dict()["clip.logit_scale"])  # it is not the weights


@pytest.mark.slow
def test_ema_is_validated_beside_the_weights(small_shapes, tmp_path):
    run = tmp_path / "ema-val"
    train_mod.train(load_config(None, train_overrides(small_shapes, run, **{
        "train.ema_decay": 0.9, "optim.max_steps": 6, "optim.warmup_steps": 1, "data.batch_size": 16,
        "train.eval_every": 3, "train.checkpoint_every": 100, "loss.triplet_weight": 0})))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_rsum" in line]
    assert [r["step"] for r in rows] == [3, 6] and all("ema_val_rsum" in r for r in rows)
    assert json.loads((run / "checkpoints" / "ema" / "ema.json").read_text())["step"] == 6


def test_wise_ft_at_0_and_1_gives_the_two_models_and_refuses_other_architectures(tmp_path, capsys):
    base, tuned = untrained_run(tmp_path / "base", seed=0), untrained_run(tmp_path / "tuned", seed=1)
    for alpha, expected in ((0, base), (1, tuned)):
        out = tmp_path / f"wise-{alpha}"
        assert main(["wise-ft", "--base", str(base), "--fine-tuned", str(tuned), "--alpha", str(alpha), "--out",
                     str(out)]) == 0
        ours, theirs = load_file(out / "model.safetensors"), load_file(expected / "model.safetensors")
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    half = load_file(tmp_path / "wise-0" / "model.safetensors")  # and in between, the interpolation
    assert main(["wise-ft", "--base", str(base), "--fine-tuned", str(tuned), "--alpha", "0.25", "--out",
                 str(tmp_path / "w")]) == 0
    quarter, end = load_file(tmp_path / "w" / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert torch.allclose(quarter["clip.text_projection"],
                          0.75 * half["clip.text_projection"] + 0.25 * end["clip.text_projection"], atol=1e-6)
    capsys.readouterr()
    other = untrained_run(tmp_path / "vit", overrides=(f"model.name={VIT}",))
    assert main(["wise-ft", "--base", str(other), "--fine-tuned", str(tuned), "--alpha", "0.5", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "one architecture" in err


def test_lora_mistakes_are_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError, match="lora_targets=.*match no module of the image tower.*c_fc"):
        build_model(ModelConfig(name=VIT, lora_rank=4, lora_targets=("no_such_layer",)))
    run = untrained_run(tmp_path / "plain")
    assert main(["export", "--run", str(run), "--merge-lora", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no LoRA adapters" in err


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_training(small_shapes, tmp_path):
    losses = []
    for flag in ("false", "true"):
        run = tmp_path / f"ckpt-{flag}"
        train_mod.train(load_config(None, train_overrides(small_shapes, run, **{
            "model.name": VIT, "train.grad_checkpointing": flag, "optim.max_steps": 3, "optim.warmup_steps": 1,
            "data.batch_size": 16, "train.checkpoint_every": 100, "train.log_every": 1, "loss.triplet_weight": 0})))
        losses.append([json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                       if '"loss"' in line])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # recomputed activations, the same steps


def _open_clip_embeddings(folder, images, texts):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    model.eval()
    with torch.no_grad():
        return (model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True),
                model.encode_text(open_clip.get_tokenizer(f"local-dir:{folder}")(texts), normalize=True))


def _check_round_trip(run, folder, exact: bool = True):
    import numpy as np
    from PIL import Image

    from vclr.embed.embedding import embed_pil_images

    assert main(["export", "--format", "open_clip", "--run", str(run), "--out", str(folder)]) == 0
    assert (folder / "open_clip_config.json").is_file() and (folder / "open_clip_model.safetensors").is_file()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((70 + 9 * i, 90, 3)) * 255).astype(np.uint8)) for i in range(3)]
    model, cfg = model_source(run=str(run)).load()
    image_theirs, text_theirs = _open_clip_embeddings(folder, images, TEXTS)
    with torch.no_grad():
        text_ours = model.encode_text(get_tokenizer(cfg.model)(TEXTS), normalize=True)
    image_ours = torch.from_numpy(embed_pil_images(model, images))
    if exact:
        assert torch.equal(image_ours, image_theirs) and torch.equal(text_ours, text_theirs)
    else:  # vclr's adapted towers are frozen: torch's attention takes its no-grad kernel there, 1e-6 away
        assert torch.allclose(image_ours, image_theirs, atol=1e-5) and torch.allclose(text_ours, text_theirs,
                                                                                       atol=1e-5)


def test_an_open_clip_config_run_exports_as_an_open_clip_model(tmp_path):
    _check_round_trip(untrained_run(tmp_path / "vit", overrides=(f"model.name={VIT}",)), tmp_path / "export")
    lora = untrained_run(tmp_path / "lora", overrides=(f"model.name={VIT}", "model.lora_rank=4"))
    _check_round_trip(lora, tmp_path / "lora-export", exact=False)  # adapters merged on the way


def test_a_lit_run_with_a_hugging_face_text_tower_exports_as_an_open_clip_model(tiny_hf_text_dir,
                                                                                 tiny_lit_model_name, tmp_path):
    cfg = Config(model=ModelConfig(name=tiny_lit_model_name, text_tower_dir=str(tiny_hf_text_dir)))
    torch.manual_seed(0)
    run = save_model_as_run(tmp_path / "lit", cfg, build_model(cfg.model))  # with the tower's tokenizer files
    _check_round_trip(run, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["hf_model_pretrained"] is False  # its weights are in the safetensors


def test_what_open_clip_cannot_express_is_refused(tmp_path, capsys):
    run = untrained_run(tmp_path / "proj", overrides=("model.projector=true",))
    assert main(["export", "--format", "open_clip", "--run", str(run), "--out", str(tmp_path / "e")]) == 2
    assert "projector" in capsys.readouterr().err
    with pytest.raises(VclrError):
        from vclr.model.adapt import interpolate_states

        interpolate_states({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5)

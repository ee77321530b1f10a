"""A model as an ordinary open_clip model, in open_clip's hub layout: `local-dir:` loads it, `hf-hub:` after an upload.

    vclr export --format open_clip --run runs/ft --out exports/ft [--push-to-hub me/ft]
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exports/ft")   # embeds as vclr does

The folder holds what open_clip's own hub writer (`open_clip.push_to_hf_hub`) puts in a repo: `open_clip_config.json`
(the architecture and the preprocessing, by its `save_config_for_hf`), the weights as `open_clip_model.safetensors`,
and for a Hugging Face text tower that tower's `config.json` and tokenizer files; the tower's `hf_model_name` names
the folder itself (or the hub repo it is pushed to) and `hf_model_pretrained` is off, since the safetensors hold its
weights. LoRA adapters are merged first. What open_clip cannot express is refused: vclr's projector heads
(`model.projector`) and pooled feature levels (`model.image_pool_levels`). After writing, open_clip loads the folder
and its embeddings of probe texts and images are checked against vclr's (tests/test_train_finetune.py: equal).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import torch

from vclr.errors import VclrError
from vclr.storage import write_directory

logger = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"  # open_clip's hub names
PROBE_TEXTS = ("a photo of a dog", "a red circle at the left", "Zwei Katzen auf einem Sofa.", "")


def _check_expressible(cfg) -> None:
    if cfg.model.projector:
        raise VclrError("this run has projector heads (model.projector), which open_clip models do not have: it "
                        "cannot be exported as an open_clip model (export it as ONNX, or train without projector)")
    if cfg.model.image_pool_levels:
        raise VclrError("this run pools extra feature levels (model.image_pool_levels), which open_clip's timm "
                        "towers do not: it cannot be exported as an open_clip model")


def _open_clip_parts(model, cfg, hf_name: str) -> tuple[torch.nn.Module, dict]:
    """The model's open_clip module (adapters merged) and the open_clip config that rebuilds it."""
    import open_clip

    from vclr.model.lora import merge_lora

    clip = merge_lora(copy.deepcopy(model.clip).cpu())
    model_cfg = copy.deepcopy(open_clip.get_model_config(cfg.model.name))
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text_cfg:  # the tower's config and tokenizer travel in the folder (or the repo)
        text_cfg.update(hf_model_name=hf_name, hf_tokenizer_name=hf_name, hf_model_pretrained=False)
    if "init_logit_bias" not in model_cfg and getattr(clip, "logit_bias", None) is not None:
        model_cfg["init_logit_bias"] = float(clip.logit_bias)  # SigLIP's bias, trained (its value is in the weights)
    model_cfg.get("vision_cfg", {}).pop("timm_model_pretrained", None)
    return clip, model_cfg


def _write(folder: Path, clip: torch.nn.Module, model_cfg: dict, tokenizer) -> None:
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / WEIGHTS_FILE))
    save_config_for_hf(clip, folder / CONFIG_FILE, model_config=model_cfg)
    text = getattr(clip, "text", None)
    if hasattr(text, "config") and hasattr(tokenizer, "save_pretrained"):  # a Hugging Face text tower
        text.config.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))


def _probe_images(size: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((size + 13 * i, size + 7, 3)) * 255).astype(np.uint8)) for i in range(3)]


@torch.no_grad()
def check_export(folder: Path, model, cfg) -> float:
    """open_clip's own load of the folder against vclr's model: the largest absolute difference of their unit
    embeddings of probe texts and images (through each one's own tokenizer and preprocess)."""
    import open_clip

    from vclr.embed.embedding import embed_pil_images
    from vclr.model.build import get_tokenizer, image_preprocess_cfg

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    theirs.eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{folder}")(list(PROBE_TEXTS))
    if not torch.equal(tokens, get_tokenizer(cfg.model)(list(PROBE_TEXTS))):
        raise VclrError(f"the export in {folder} tokenizes differently from the model; nothing was kept")
    text_ours = model.encode_text(tokens, normalize=True)
    text_theirs = theirs.encode_text(tokens, normalize=True)
    images = _probe_images(image_preprocess_cfg(model)["size"])
    image_ours = torch.from_numpy(embed_pil_images(model, images))
    image_theirs = theirs.encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
    return float(max((text_ours - text_theirs).abs().max(), (image_ours - image_theirs).abs().max()))


def export_open_clip(source, out: str | os.PathLike, *, repo: str | None = None, tolerance: float = 1e-5) -> dict:
    """Write `source`'s model in open_clip's layout (see the module docstring); `repo`: also upload the folder to the
    Hugging Face hub (huggingface_hub; needs the network and a token). -> what was written and checked."""
    from vclr.model.build import get_tokenizer

    model, cfg = source.load(torch.device("cpu"))
    _check_expressible(cfg)
    out = Path(out)
    clip, model_cfg = _open_clip_parts(model, cfg, repo or str(out.resolve()))
    write_directory(out, lambda folder: _write(folder, clip, model_cfg, get_tokenizer(cfg.model)))
    difference = check_export(out, model, cfg) if not repo else None
    if difference is not None and difference > tolerance:
        raise VclrError(f"open_clip's load of {out} embeds up to {difference:.2e} away from the model (more than "
                        f"{tolerance}); the folder is written but do not trust it")
    if repo:
        from huggingface_hub import create_repo, upload_folder

        create_repo(repo, exist_ok=True)
        upload_folder(repo_id=repo, folder_path=str(out), commit_message="Add a vclr model (open_clip format)")
        logger.info("uploaded %s to the hub as %s", out, repo)
    return {"model": cfg.model.name, "out": str(out), "repo": repo, "max_difference": difference,
            "hf_text_tower": "hf_model_name" in model_cfg.get("text_cfg", {})}

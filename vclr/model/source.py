"""Where the model that embeds comes from: a vclr run, or any open_clip model config with optional weights.

    source = model_source(run="runs/demo")                                  # a vclr training run
    source = model_source(model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # an open_clip tag (downloads)
    source = model_source(model="ViT-B-32", pretrained="weights/vit.safetensors")  # a local checkpoint
    model, cfg = source.load()
    manifest["model_source"] = source.describe()        # an index remembers it: search needs no model flags
    source = source_from_manifest(manifest)

A model source is one class behind one call shape (`load() -> (DualEncoder, Config)`, `describe() -> dict`); a new
one is one class here and one branch in `model_source`/`source_from_manifest`.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from vclr.config import Config, ModelConfig, config_hash
from vclr.errors import ModelSourceError, VclrError
from vclr.rundir import (
    CONFIG_FILE,
    MODEL_FILE,
    best_checkpoint,
    ema_checkpoint,
    inference_model_config,
    load_run_config,
    weights_file,
)

# vclr.model.dual_encoder imports open_clip (seconds), and torch itself is not needed to name a source (a
# service that answers through an ONNX export never imports it): both are loaded when a model is built
if TYPE_CHECKING:
    import torch

    from vclr.model.dual_encoder import DualEncoder

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
CHECKPOINTS = ("final", "best", "ema")  # a run's weights: its final ones, at its best validation, their moving average


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelSource(Protocol):
    def load(self, device: torch.device | None = None) -> tuple[DualEncoder, Config]: ...

    def describe(self) -> dict: ...


def _load_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


@dataclass(frozen=True)
class RunSource:
    """A vclr training run directory: its resolved config and its final (or newest checkpoint's) weights; with
    checkpoint="best", the weights at its best validation figure (checkpoints/best, train.eval_every); with "ema",
    their exponential moving average (checkpoints/ema, train.ema_decay)."""

    run_dir: str
    checkpoint: str = "final"  # or "best"

    def load(self, device: torch.device | None = None) -> tuple[DualEncoder, Config]:
        from vclr.model.build import build_model

        cfg = load_run_config(self.run_dir)
        cfg = replace(cfg, model=inference_model_config(self.run_dir, cfg.model))
        # the weights come from the run: no tower weight files to read, no locking needed for inference
        model = build_model(cfg.model, logit_bias=cfg.loss.siglip_weight > 0, tower_weights=False)
        model.load_state_dict(_load_state(self._weights()))
        return model.to(device or default_device()).eval(), cfg

    def _weights(self) -> Path:
        if self.checkpoint == "final":
            return weights_file(self.run_dir)
        if self.checkpoint not in CHECKPOINTS:
            raise ModelSourceError(f"`checkpoint` must be one of {', '.join(CHECKPOINTS)}, got {self.checkpoint!r}")
        folder = best_checkpoint(self.run_dir) if self.checkpoint == "best" else ema_checkpoint(self.run_dir)
        if not (folder / MODEL_FILE).is_file():
            why = "training validates: train.eval_every" if self.checkpoint == "best" else "training keeps an EMA: " \
                "train.ema_decay"
            raise ModelSourceError(f"`checkpoint` is {self.checkpoint}, but {self.run_dir} has no "
                                   f"checkpoints/{self.checkpoint} (it is kept when {why})")
        return folder / MODEL_FILE

    def describe(self) -> dict:
        described = {"kind": "run", "run_dir": str(Path(self.run_dir).resolve())}
        return {**described, "checkpoint": self.checkpoint} if self.checkpoint != "final" else described


@dataclass(frozen=True)
class OpenClipSource:
    """An open_clip model config (vclr's own included) with random, tagged, hub or local-file weights.

    `pretrained`: "" (random init), an open_clip tag such as laion2b_s34b_b79k (downloads), or a local checkpoint:
    an open_clip state dict (.pt/.bin/.safetensors) or a vclr run's model.safetensors (keys under `clip.`).
    `name` may be `hf-hub:org/repo` (config and weights from the Hugging Face hub: downloads).
    """

    name: str
    pretrained: str = ""

    def _is_file(self) -> bool:
        return bool(self.pretrained) and (Path(self.pretrained).suffix in CHECKPOINT_SUFFIXES
                                          or Path(self.pretrained).is_file())

    def load(self, device: torch.device | None = None) -> tuple[DualEncoder, Config]:
        from vclr.model.build import build_model, list_models

        if ":" not in self.name and self.name not in list_models():  # hf-hub:org/repo, local-dir:path are open_clip's
            raise ModelSourceError(f"`model` {self.name} is not a known model config; `vclr models` lists them")
        # the config names the weights (a file by its absolute path): indexes compare its hash with the querying model
        cfg = Config(model=ModelConfig(name=self.name, pretrained=self.describe()["pretrained"]))
        if not self._is_file():
            _check_download_possible(self.name, self.pretrained)
            model = _build_or_explain(cfg.model)
        else:
            path = Path(cfg.model.pretrained)
            if not path.is_file():
                raise ModelSourceError(f"`pretrained` {self.pretrained}: no such checkpoint file")
            state = _load_state(path)
            if any(k.startswith("clip.") for k in state):  # a vclr model.safetensors: the whole dual encoder
                model = build_model(cfg.model, logit_bias="clip.logit_bias" in state, tower_weights=False)
                _load_checked(model, state, path)
            else:  # an open_clip state dict: open_clip's own loader (it also adapts older layouts)
                model = _build_or_explain(cfg.model)
        return model.to(device or default_device()).eval(), cfg

    def describe(self) -> dict:
        pretrained = str(Path(self.pretrained).resolve()) if self._is_file() else self.pretrained
        return {"kind": "open_clip", "model": self.name, "pretrained": pretrained}


def _load_checked(model: DualEncoder, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ModelSourceError(f"`pretrained` {path} does not fit `model` {model.cfg.name}: {first}") from None


HUB_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0


def _download_host(name: str, tag: str) -> str | None:
    """Where open_clip would fetch these weights from (the hub first, as open_clip does); None: nothing to fetch,
    or already in the local cache."""
    import open_clip

    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:"):]
    elif tag:
        pretrained = open_clip.get_pretrained_cfg(name, tag)
        if not pretrained:  # an unknown tag: open_clip's own error says so
            return None
        if not pretrained.get("hf_hub"):
            url = pretrained.get("url", "")
            cached = Path.home() / ".cache" / "clip" / Path(url).name
            return None if not url or cached.is_file() else urllib.parse.urlparse(url).hostname
        repo = pretrained["hf_hub"].strip("/")
    else:
        return None
    from huggingface_hub.constants import HF_HUB_CACHE

    snapshots = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
    return None if snapshots.is_dir() and any(snapshots.iterdir()) else HUB_HOST


def reachable(host: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can a TCP connection to host:443 be opened within `timeout` (name lookup included, which sockets do not
    time out by themselves: it runs in a thread that is abandoned if it hangs)?"""
    import socket
    import threading

    result = []

    def connect():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _check_download_possible(name: str, tag: str) -> None:
    """Weights that must be downloaded, with no network to do it: one line now, instead of a minute of retries."""
    host = _download_host(name, tag)
    if host is None:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") and host == HUB_HOST
    if offline or not reachable(host):
        what = f"pretrained weights {tag!r} for {name}" if tag else f"the model {name}"
        why = "HF_HUB_OFFLINE is set" if offline else f"no network ({host} cannot be reached)"
        raise ModelSourceError(f"cannot download {what}: {why}; give a local checkpoint file as `pretrained` "
                               "(or run once with a network: the weights are then cached)")


def _build_or_explain(cfg: ModelConfig) -> DualEncoder:
    """Build; a pretrained tag that cannot be fetched is one line, not a traceback of retries."""
    from vclr.model.build import build_model

    try:
        return build_model(cfg)
    except VclrError:
        raise
    except Exception as e:  # network errors, unknown tags (RuntimeError), hub errors
        if not cfg.pretrained and ":" not in cfg.name:
            raise
        what = f"pretrained weights {cfg.pretrained!r} for {cfg.name}" if cfg.pretrained else cfg.name
        raise ModelSourceError(f"cannot load {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                               "check the name and the network, or give a local checkpoint file as `pretrained`"
                               ) from None


def model_source(run: str | None = None, model: str | None = None, pretrained: str | None = None,
                 default: ModelSource | None = None, checkpoint: str = "final") -> ModelSource:
    """The source the command-line flags name; `default` (an index's own) when they name none."""
    if run and model:
        raise ModelSourceError("give either `run` (a run directory) or `model` (an open_clip config, with `pretrained` "
                               "weights), not both")
    if pretrained and not model:
        raise ModelSourceError("`pretrained` needs `model`: the open_clip config the weights are for")
    if run:
        if not (Path(run) / CONFIG_FILE).is_file():
            raise ModelSourceError(f"`run` {run} has no {CONFIG_FILE}: give a `vclr train` output dir")
        return RunSource(str(run), checkpoint)
    if model:
        return OpenClipSource(model, pretrained or "")
    if default is None:
        raise ModelSourceError("no model source: give `run` (a vclr run directory) or `model` (an open_clip "
                               "config, with `pretrained` weights; `vclr models` lists them)")
    return default


def as_source(source: ModelSource | str | Path) -> ModelSource:
    """A model source as given, or a run directory's path as its RunSource."""
    return source if hasattr(source, "load") else RunSource(str(source))


def load_trained(run_dir: str | Path, device: torch.device | None = None) -> tuple[DualEncoder, Config]:
    """The model of a vclr run directory, in eval mode."""
    return RunSource(str(run_dir)).load(device)


def open_run(run_dir: str | Path, checkpoint: str = "final", device: torch.device | None = None
             ) -> tuple[DualEncoder, Config]:
    """The model of a vclr run (its final weights, or `checkpoint="best"`) and its config, in eval mode:

        model, cfg = vclr.open_run("vclr-demo/run")
        vectors = model.encode_text(get_tokenizer(cfg.model)(["a red circle"]), normalize=True)
    """
    return model_source(run=str(run_dir), checkpoint=checkpoint).load(device)


def source_from_manifest(manifest: dict, index_dir: str | Path | None = None) -> ModelSource | None:
    """The model source an index or report recorded (indexes of vclr <= 0.1 recorded only `run_dir`). A run is
    looked for first where it lies relative to `index_dir` (the index and the run moved together), then where it
    was."""
    described = manifest.get("model_source") or ({"kind": "run", "run_dir": manifest["run_dir"]}
                                                  if manifest.get("run_dir") else None)
    if described is None:
        return None
    if described["kind"] == "run":
        return RunSource(_find_run(described, index_dir), described.get("checkpoint", "final"))
    return OpenClipSource(described["model"], described.get("pretrained", ""))


def with_run_from_index(described: dict, index_dir: str | Path) -> dict:
    """A run source's record with the run's path relative to the index, so that the two can move together."""
    if described["kind"] != "run":
        return described
    return {**described, "run_dir_from_index": os.path.relpath(described["run_dir"], Path(index_dir).resolve())}


def _find_run(described: dict, index_dir: str | Path | None) -> str:
    candidates = [Path(described["run_dir"])]
    if index_dir is not None and described.get("run_dir_from_index"):
        candidates.insert(0, Path(index_dir) / described["run_dir_from_index"])
    for run_dir in candidates:
        if (run_dir / CONFIG_FILE).is_file():
            return str(run_dir)
    raise ModelSourceError(f"the index's model, run {described['run_dir']}, is not there any more (nor at "
                           f"{candidates[0]}): give `run` where it lies now")


def model_identity(source: ModelSource, cfg: Config) -> dict:
    """What an index or report records of the model that embedded it."""
    return {"model_source": source.describe(), "model_name": cfg.model.name,
            "model_config_hash": config_hash(cfg.model)}

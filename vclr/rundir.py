"""The run directory: the one module that knows its layout. Readers (embed, evaluate, the CLI) import this, never the
trainer, so that searching and serving need neither the training code nor Accelerate.

    RUN/config.yaml               the resolved config (vclr.config)
    RUN/run.json                  {"format_version": FORMAT_VERSION}: the layout this vclr wrote (runs without it
                                  are of format 1 too)
    RUN/metrics.jsonl             one JSON row per logged step
    RUN/model.safetensors         the final weights
    RUN/data_report.json          what the training data held and what was skipped
    RUN/checkpoints/step_XXXXXXX  accelerate save_state + checksums.json (vclr.storage), newest `keep` kept
    RUN/checkpoints/best          the same, at the best validation figure so far; best.json says which step and why
    RUN/checkpoints/ema           model.safetensors of the weights' moving average (train.ema_decay) + ema.json
    RUN/train_report.json         trainable and total parameters, peak memory, steps per second
    RUN/tensorboard/              event files, when train.log_with includes tensorboard
    RUN/text_tower/               a Hugging Face text tower's config and tokenizer files (its weights are in
                                  model.safetensors): the run needs nothing outside itself to embed, wherever it lies

Checkpoints are written through `vclr.storage`: into an owner-named temp dir that is checksummed, fsynced and renamed
into place, so a crash never leaves a half checkpoint under a final name, and the temp dirs of dead writers go.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

from vclr.config import Config, ModelConfig, load_config, save_config
from vclr.errors import VclrError
from vclr.storage import (
    CHECKSUMS,
    atomic_write_bytes,
    atomic_write_text,
    directory_problem,
    publish_directory,
    read_manifest,
    remove_stale_temp_dirs,
    temp_dir,
    write_directory,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bumped when a file of the run directory changes meaning; readers refuse newer versions
FORMAT_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
MODEL_FILE = "model.safetensors"
DATA_REPORT_FILE = "data_report.json"
CHECKPOINT_DIR = "checkpoints"
BEST_CHECKPOINT = "best"
BEST_FILE = "best.json"
EMA_CHECKPOINT = "ema"
TRAIN_REPORT_FILE = "train_report.json"
TRACKER_DIR = "tensorboard"
TEXT_TOWER_DIR = "text_tower"
# a Hugging Face model dir's weight files; the run's model.safetensors holds the trained weights instead
_HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt", ".ot")


# ------------------------------------------------------------------------------------------------------- reading


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise VclrError(f"run dir {run_dir} has no {CONFIG_FILE}: is it a `vclr train` output_dir?")
    check_format(run_dir)
    return load_config(run_dir / CONFIG_FILE)


def check_format(run_dir: Path) -> None:
    """A clear error for a run written by a newer vclr (a layout this one does not know)."""
    if not (run_dir / FORMAT_FILE).is_file():
        return  # written before run.json existed: format 1
    try:
        version = json.loads((run_dir / FORMAT_FILE).read_text(encoding="utf-8"))["format_version"]
    except (ValueError, KeyError, TypeError):
        raise VclrError(f"{run_dir / FORMAT_FILE} is damaged: it must hold {{\"format_version\": N}}") from None
    if version > FORMAT_VERSION:
        raise VclrError(f"run dir {run_dir} has format {version}, newer than this vclr reads ({FORMAT_VERSION}): "
                        "upgrade vclr")


def inference_model_config(run_dir: str | Path, model: ModelConfig) -> ModelConfig:
    """The run's model config with its text tower read from the run's own copy (RUN/text_tower), so that the run
    embeds from any working directory. Runs of vclr <= 0.2 hold no copy: their configured path is kept."""
    if not model.text_tower_dir:
        return model
    copy = Path(run_dir) / TEXT_TOWER_DIR
    if (copy / "config.json").is_file():
        return dataclasses.replace(model, text_tower_dir=str(copy.resolve()))
    if not (Path(model.text_tower_dir) / "config.json").is_file():
        raise VclrError(f"run dir {run_dir} holds no {TEXT_TOWER_DIR}/ and its model.text_tower_dir="
                        f"{model.text_tower_dir} is not here: run from the directory it was trained in")
    return model


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of saves in progress start with '.' and are not listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    return sorted(folder.glob("step_*")) if folder.is_dir() else []


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}"


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be trusted (missing checksums, a missing or altered file), or None."""
    manifest = None
    if (folder / CHECKSUMS).is_file():
        try:
            manifest = read_manifest(folder)
        except ValueError:
            return f"unreadable {CHECKSUMS}"
        if "files" not in manifest:  # vclr <= 0.1's flat {name: sha256}: no sizes, so compare checksums only
            manifest = {"files": {name: {"sha256": sha, "bytes": (folder / name).stat().st_size
                                         if (folder / name).is_file() else -1} for name, sha in manifest.items()}}
    return directory_problem(folder, CHECKSUMS, manifest=manifest)


def weights_file(run_dir: str | Path) -> Path:
    """The run's final weights, or (a run stopped before it finished) its newest checkpoint's."""
    run_dir = Path(run_dir)
    if (run_dir / MODEL_FILE).is_file():
        return run_dir / MODEL_FILE
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and (ckpt / MODEL_FILE).is_file():
        logger.warning("%s has no %s; using checkpoint %s", run_dir, MODEL_FILE, ckpt.name)
        return ckpt / MODEL_FILE
    raise VclrError(f"run dir {run_dir} has no trained weights ({MODEL_FILE}); train first with `vclr train`")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------- writing


def write_run_config(run_dir: str | Path, cfg: Config) -> None:
    """The resolved config and the run directory's format version."""
    atomic_write_text(Path(run_dir) / FORMAT_FILE, json.dumps({"format_version": FORMAT_VERSION}) + "\n")
    save_config(cfg, Path(run_dir) / CONFIG_FILE)


def save_model_as_run(run_dir: str | Path, cfg: Config, model) -> Path:
    """A model (a DualEncoder, trained or not) saved as a run: its config, its weights and, for a Hugging Face text
    tower, that tower's config and tokenizer files, so that every command that takes a run takes it, wherever it lies
    (tests, benchmarks, converted checkpoints, merged and interpolated models). -> the run directory."""
    from safetensors.torch import save  # torch only when a model is saved

    run_dir = Path(run_dir)
    write_run_config(run_dir, cfg)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(run_dir / MODEL_FILE, save(state))
    if cfg.model.text_tower_dir:
        save_text_tower_files(run_dir, cfg.model.text_tower_dir)
    return run_dir


def save_text_tower_files(run_dir: str | Path, text_tower_dir: str | Path) -> None:
    """Copy a Hugging Face text tower's config and tokenizer files, not its weights, into RUN/text_tower."""
    final = Path(run_dir) / TEXT_TOWER_DIR

    def copy_files(tmp: Path) -> None:
        for path in sorted(Path(text_tower_dir).iterdir()):
            if path.is_file() and path.suffix not in _HF_WEIGHT_SUFFIXES:
                shutil.copy2(path, tmp / path.name)

    write_directory(final, copy_files)


def append_metrics(run_dir: str | Path, row: dict) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only the rows up to `step` (0: none): rows of an attempt killed after its last checkpoint are re-logged."""
    rows = [row for row in read_metrics(run_dir) if row.get("step", 0) <= step]
    if rows or (Path(run_dir) / METRICS_FILE).is_file():
        atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def write_data_report(run_dir: str | Path, report: dict) -> None:
    atomic_write_text(Path(run_dir) / DATA_REPORT_FILE, json.dumps(report, indent=2))


def save_checkpoint(accelerator, run_dir: str | Path, step: int, keep: int) -> Path:
    """accelerate's save_state (every process writes its part) into one temp dir, published atomically by the main
    process with checksums; then the oldest checkpoints beyond `keep` are removed."""
    final = _save_state(accelerator, checkpoint_path(run_dir, step))
    if accelerator.is_main_process:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_best(accelerator, run_dir: str | Path, record: dict) -> Path:
    """The state at a new best validation figure, as checkpoints/best (replacing the previous best atomically);
    `record` (step, metric, value, the validation row) is written inside it as best.json."""
    return _save_state(accelerator, best_checkpoint(run_dir), {BEST_FILE: json.dumps(record, indent=2)})


def best_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / BEST_CHECKPOINT


def read_best(run_dir: str | Path) -> dict | None:
    path = best_checkpoint(run_dir) / BEST_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def ema_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / EMA_CHECKPOINT


def save_ema(run_dir: str | Path, model, record: dict) -> Path:
    """The EMA weights as checkpoints/ema/model.safetensors (replaced atomically), `record` beside them as ema.json."""
    from safetensors.torch import save

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}

    def write(tmp: Path) -> None:
        (tmp / MODEL_FILE).write_bytes(save(state))
        (tmp / "ema.json").write_text(json.dumps(record, indent=2), encoding="utf-8")

    write_directory(ema_checkpoint(run_dir), write)
    return ema_checkpoint(run_dir)


def write_train_report(run_dir: str | Path, report: dict) -> None:
    atomic_write_text(Path(run_dir) / TRAIN_REPORT_FILE, json.dumps(report, indent=2))


def _save_state(accelerator, final: Path, extra_files: dict[str, str] | None = None) -> Path:
    from accelerate.utils import broadcast_object_list

    # one temp dir for all processes, named for the main process (its pid marks it live to stale-dir cleanup)
    tmp = [str(temp_dir(final)) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(tmp)
    tmp = Path(tmp[0])
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        publish_directory(tmp, final)
        remove_stale_temp_dirs(final.parent)
    accelerator.wait_for_everyone()
    return final


def restore_latest(accelerator, run_dir: str | Path) -> Path | None:
    """Load the newest checkpoint that passes its checksums (a damaged one is skipped with a warning); None if none."""
    for candidate in reversed(checkpoints(run_dir)):
        problem = checkpoint_problem(candidate)
        if problem is None:
            accelerator.load_state(str(candidate))
            return candidate
        logger.warning("checkpoint %s is damaged (%s): falling back to the one before it", candidate, problem)
    return None

"""What a benchmark measures: one class per task, one table (`TASKS`); each scores a model's features of a dataset.

    result = TASKS["zeroshot_classification"].run(featurizer, dataset, settings)
    result.metrics      # {"acc1": 0.52, "acc5": 0.91, "mean_per_class_recall": 0.50}: CLIP_benchmark's names
    result.figures      # the per-unit outcomes behind each figure (vclr.bench.stats): intervals, comparisons
    result.failures     # the worst misses, for the report's failure sheets

| task | dataset kind | figures (fractions, as CLIP_benchmark reports them) |
| --- | --- | --- |
| zeroshot_classification | classification | acc1, acc5 (5+ classes), mean_per_class_recall |
| retrieval | retrieval | image_retrieval_recall@k (text -> image), text_retrieval_recall@k (image -> text) |
| linear_probe | classification with a train split | lp_acc1, lp_acc5, lp_mean_per_class_recall, weight_decay |
| compositionality | selection | text_acc (each image's best caption is its own: SugarCrepe's accuracy), image_acc |
| | | (each caption's best image is its own), acc (both: Winoground's group score) |
| multilingual_retrieval | multilingual | <lang>/image_retrieval_recall@k, <lang>/text_retrieval_recall@k, mean/... |

Retrieval uses vclr's exact rank code (vclr.eval.metrics: any number of captions per image, ties to the lower
index) and reports each recall as float32 (CLIP_benchmark's `.float().mean()`), as do the compositionality scores;
classification figures are float64 ratios, as in CLIP_benchmark. Adding a task is one class here and one row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from vclr.bench.datasets import BenchmarkDataset
from vclr.bench.features import Featurizer
from vclr.bench.linear_probe import classification_figures, linear_probe
from vclr.bench.stats import Outcomes
from vclr.config import BenchmarkConfig
from vclr.data.dataset import load_caption_table
from vclr.data.labelled import load_image_groups, load_labelled_images
from vclr.errors import DataError, VclrError
from vclr.eval.metrics import image_to_text_ranks, text_to_image_ranks


@dataclass
class TaskResult:
    metrics: dict[str, float]
    figures: dict[str, Outcomes] = field(default_factory=dict)  # metric name -> per-unit outcomes
    failures: list[dict] = field(default_factory=list)
    units: int = 0


def _f32_mean(hits: np.ndarray) -> float:
    """A 0/1 mean as float32, as torch's `.float().mean().item()` gives it."""
    return float(np.float32(np.count_nonzero(hits)) / np.float32(len(hits)))


def _labelled(dataset: BenchmarkDataset, split: str, features: Featurizer) -> tuple[np.ndarray, np.ndarray, list]:
    paths, labels, _ = load_labelled_images(dataset.split(split))
    vectors, kept = features.images(paths)
    return vectors, labels[kept], [paths[i] for i in kept]


def _classification_outcomes(logits: np.ndarray, labels: np.ndarray, prefix: str = "") -> dict[str, Outcomes]:
    rank = np.argmax(np.argsort(-logits, axis=1, kind="stable") == labels[:, None], axis=1)
    figures = {f"{prefix}acc1": Outcomes(rank == 0),
               f"{prefix}mean_per_class_recall": Outcomes(rank == 0, groups=labels)}
    if logits.shape[1] >= 5:
        figures[f"{prefix}acc5"] = Outcomes(rank < 5)
    return figures


def _confident_mistakes(logits: np.ndarray, labels: np.ndarray, paths: list[str], names: tuple[str, ...],
                        count: int) -> list[dict]:
    """The misclassified images the model was surest of: the largest margin of its pick over the true class."""
    picked = logits.argmax(axis=1)
    wrong = np.flatnonzero(picked != labels)
    margin = logits[wrong, picked[wrong]] - logits[wrong, labels[wrong]]
    return [{"path": paths[i], "label": names[labels[i]] if names else int(labels[i]),
             "predicted": names[picked[i]] if names else int(picked[i]), "margin": float(m)}
            for i, m in sorted(zip(wrong, margin), key=lambda t: -t[1])[:count]]


class ZeroShotClassification:
    name, kind = "zeroshot_classification", "classification"

    def run(self, features: Featurizer, dataset: BenchmarkDataset, settings: BenchmarkConfig) -> TaskResult:
        if not dataset.classnames:
            raise DataError(f"dataset {dataset.name} has no class names for zero-shot classification: add "
                            "classnames.txt (one a line, by label) or a class_name column")
        images, labels, paths = _labelled(dataset, "test", features)
        if labels.max() >= len(dataset.classnames):
            raise DataError(f"dataset {dataset.name}: label {labels.max()} but only {len(dataset.classnames)} class "
                            "names")
        classes = torch.from_numpy(features.classes(dataset.classnames, dataset.templates)).T  # (D, K)
        # CLIP_benchmark's logits: 100 x cosine, a batch of images at a time
        logits = torch.cat([100.0 * torch.from_numpy(images[i:i + settings.batch_size]) @ classes
                            for i in range(0, len(images), settings.batch_size)]).numpy()
        metrics = classification_figures(logits, labels)
        return TaskResult(metrics, _classification_outcomes(logits, labels),
                          _confident_mistakes(logits, labels, paths, dataset.classnames, settings.failures),
                          len(labels))


def retrieval_result(features: Featurizer, image_paths: list[str], captions: list[list[str]],
                     settings: BenchmarkConfig, prefix: str = "") -> TaskResult:
    """Recall@k both ways over the readable images and all their captions; units are the images."""
    images, kept = features.images(image_paths)
    captions = [captions[i] for i in kept]
    texts = features.captions(captions)
    caption_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions]).astype(np.int64)  # (C,)
    t2i = text_to_image_ranks(images, texts, caption_image)  # (C,)
    i2t = image_to_text_ranks(images, texts, caption_image)  # (N,)
    counts = np.bincount(caption_image, minlength=len(images)).astype(np.float64)
    metrics, figures = {}, {}
    for k in settings.recall_ks:
        metrics[f"{prefix}image_retrieval_recall@{k}"] = _f32_mean(t2i <= k)
        metrics[f"{prefix}text_retrieval_recall@{k}"] = _f32_mean(i2t <= k)
        figures[f"{prefix}image_retrieval_recall@{k}"] = Outcomes(
            np.bincount(caption_image, weights=(t2i <= k), minlength=len(images)), counts)
        figures[f"{prefix}text_retrieval_recall@{k}"] = Outcomes(i2t <= k)
    worst = np.argsort(-t2i, kind="stable")[:settings.failures]
    failures = []
    for c in worst:
        top = np.argsort(-(images @ texts[c]), kind="stable")[:5]
        flat = [t for caps in captions for t in caps]
        failures.append({"caption": flat[c], "rank": int(t2i[c]), "image": image_paths[kept[caption_image[c]]],
                         "retrieved": [image_paths[kept[j]] for j in top]})
    return TaskResult(metrics, figures, failures, len(images))


class Retrieval:
    name, kind = "retrieval", "retrieval"

    def run(self, features: Featurizer, dataset: BenchmarkDataset, settings: BenchmarkConfig) -> TaskResult:
        table = load_caption_table(dataset.split("test"))
        return retrieval_result(features, table.image_paths, table.captions, settings)


class MultilingualRetrieval:
    name, kind = "multilingual_retrieval", "multilingual"

    def run(self, features: Featurizer, dataset: BenchmarkDataset, settings: BenchmarkConfig) -> TaskResult:
        if not dataset.languages:
            raise DataError(f"dataset {dataset.name} has no captions_<language> columns")
        merged = TaskResult({})
        for lang in dataset.languages:
            table = load_caption_table(dataset.split("test"), caption_columns=(f"captions_{lang}",))
            result = retrieval_result(features, table.image_paths, table.captions, settings, prefix=f"{lang}/")
            if merged.units and result.units != merged.units:
                raise DataError(f"dataset {dataset.name}: language {lang} has captions for {result.units} images, "
                                f"not all {merged.units}; per-language figures need the same images")
            merged.metrics.update(result.metrics)
            merged.figures.update(result.figures)
            merged.failures += [{**f, "language": lang} for f in result.failures[:max(1, settings.failures // 2)]]
            merged.units = result.units
        for name in [m.split("/", 1)[1] for m in merged.metrics if m.startswith(f"{dataset.languages[0]}/")]:
            merged.metrics[f"mean/{name}"] = float(np.mean([merged.metrics[f"{lang}/{name}"]
                                                            for lang in dataset.languages]))
        return merged


class LinearProbe:
    name, kind = "linear_probe", "classification"

    def run(self, features: Featurizer, dataset: BenchmarkDataset, settings: BenchmarkConfig) -> TaskResult:
        if "train" not in dataset.splits:
            raise DataError(f"dataset {dataset.name} has no train split for a linear probe")
        train_x, train_y, _ = _labelled(dataset, "train", features)
        val_split = next((s for s in ("val", "validation") if s in dataset.splits), None)
        if val_split:
            val_x, val_y, _ = _labelled(dataset, val_split, features)
        elif settings.lp_val_proportion > 0:  # carved from train by a seeded split, as torch's random_split does
            generator = torch.Generator().manual_seed(settings.seed)
            train_rows, val_rows = torch.utils.data.random_split(
                range(len(train_y)), [1 - settings.lp_val_proportion, settings.lp_val_proportion], generator)
            val_x, val_y = train_x[list(val_rows)], train_y[list(val_rows)]
            train_x, train_y = train_x[list(train_rows)], train_y[list(train_rows)]
        else:
            val_x = val_y = None
        test_x, test_y, paths = _labelled(dataset, "test", features)
        result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y,
                              fewshot_k=settings.fewshot_k, lr=settings.lp_lr, epochs=settings.lp_epochs,
                              batch_size=settings.batch_size, seed=settings.seed)
        figures = _classification_outcomes(result.logits, result.labels, "lp_")
        if result.labels.max() < 5:
            figures.pop("lp_acc5", None)
        return TaskResult(result.metrics, figures, _confident_mistakes(result.logits, result.labels, paths,
                                                                       dataset.classnames, settings.failures),
                          len(result.labels))


class Compositionality:
    name, kind = "compositionality", "selection"

    def run(self, features: Featurizer, dataset: BenchmarkDataset, settings: BenchmarkConfig) -> TaskResult:
        groups = load_image_groups(dataset.split("test"))
        nim, nt = len(groups[0].image_paths), len(groups[0].captions)
        # CLIP_benchmark's batches: `batch_size` instances, their images in one call and their captions in another
        images, kept = features.images([p for g in groups for p in g.image_paths])
        if len(kept) != len(groups) * nim:
            raise DataError(f"dataset {dataset.name}: {len(groups) * nim - len(kept)} unreadable images")
        texts = features.captions([g.captions for g in groups], images_per_batch=settings.batch_size)
        images, texts = images.reshape(len(groups), nim, -1), texts.reshape(len(groups), nt, -1)
        matched = np.arange(min(nim, nt))
        scores = np.einsum("gid,gtd->git", images, texts)  # (G, nim, nt)
        text_ok = (scores.argmax(axis=2)[:, :len(matched)] == matched).all(axis=1)  # each image's best caption
        image_ok = (scores.argmax(axis=1)[:, :len(matched)] == matched).all(axis=1)  # each caption's best image
        both = text_ok & image_ok
        metrics = {"text_acc": _f32_mean(text_ok), "image_acc": _f32_mean(image_ok), "acc": _f32_mean(both)}
        figures = {"text_acc": Outcomes(text_ok), "image_acc": Outcomes(image_ok), "acc": Outcomes(both)}
        failures = [{"images": groups[i].image_paths, "captions": groups[i].captions,
                     "scores": scores[i].round(4).tolist()} for i in np.flatnonzero(~both)[:settings.failures]]
        return TaskResult(metrics, figures, failures, len(groups))


# task name -> task; CLIP_benchmark's own names are aliases
TASKS = {task.name: task for task in (ZeroShotClassification(), Retrieval(), LinearProbe(), Compositionality(),
                                      MultilingualRetrieval())}
ALIASES = {"zeroshot_retrieval": "retrieval", "image_caption_selection": "compositionality"}
DEFAULT_TASKS = {"classification": ("zeroshot_classification",), "retrieval": ("retrieval",),
                 "selection": ("compositionality",), "multilingual": ("multilingual_retrieval",)}


def fits(task: str, dataset: BenchmarkDataset) -> bool:
    """Whether a task can run on a dataset: of its kind (retrieval also on classification sets with captions, such
    as Fashion-MNIST's class captions), with a train split for a linear probe."""
    if task == "linear_probe" and "train" not in dataset.splits:
        return False
    return TASKS[task].kind == dataset.kind or (task == "retrieval" and dataset.kind == "classification")


def check_tasks(asked: tuple[str, ...]) -> tuple[str, ...]:
    """Task names (CLIP_benchmark's aliases read as vclr's), or one error naming the known ones."""
    names = tuple(ALIASES.get(task, task) for task in asked)
    unknown = [task for task in names if task != "auto" and task not in TASKS]
    if unknown:
        raise VclrError(f"unknown task {unknown[0]!r}: choose from auto, {', '.join(TASKS)}")
    return names


def tasks_for(dataset: BenchmarkDataset, asked: tuple[str, ...] = ("auto",)) -> list[str]:
    """The tasks to run on `dataset`: its default ones for "auto", and those asked that fit its kind."""
    names: list[str] = []
    for task in check_tasks(asked):
        names += DEFAULT_TASKS[dataset.kind] if task == "auto" else [task] if fits(task, dataset) else []
    return list(dict.fromkeys(names))

"""Linear probes on frozen image features: CLIP_benchmark's protocol, step for step, on any device.

    result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y)   # features unit-norm (N, D)
    result.metrics   # {"lp_acc1": ..., "lp_acc5": ..., "lp_mean_per_class_recall": ..., "weight_decay": ...}

The protocol (CLIP_benchmark's `metrics/linear_probe.py`, itself CLIP's appendix A.3 with AdamW in place of L-BFGS):
a linear layer (torch's default init after `torch.manual_seed(seed)`) trained with AdamW at `lr` and a cosine schedule
without warm-up over `epochs` of shuffled mini-batches (torch's DataLoader shuffle, cross-entropy); with a
validation split, the weight decay is searched over 97 log-spaced values in [1e-6, 100]: 7 of them first, then
bisection around the best (steps of 8, 4, 2, 1 grid points, the first best kept on ties), and the final layer is
trained on train + validation (k-shot: on the k-shot set only); without one the weight decay is 0. `fewshot_k` keeps
the first k examples of each class in a permutation of the training set.

Where vclr differs, on purpose: CLIP_benchmark draws that permutation (and a validation proportion's split) from
torch's global generator wherever model creation and data loading left it, so the same features give different
figures for different models or on a cached rerun; vclr draws both from a generator seeded with `seed` alone, which is
what CLIP_benchmark does when the global generator was just seeded. Each weight decay is trained once (the search
asks for the incumbent again at every step; it would train the same layer). It runs on the CPU (CLIP_benchmark's
asserts CUDA). Tested against CLIP_benchmark itself in tests/test_benchmark_reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from vclr.errors import VclrError

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
FIRST_TRIED = [i for i, wd in enumerate(WEIGHT_DECAYS) if wd in np.logspace(-6, 2, num=7).tolist()]


@dataclass
class ProbeResult:
    logits: np.ndarray  # (N, K) test logits
    labels: np.ndarray  # (N,)
    weight_decay: float
    metrics: dict[str, float]


class _Rows(torch.utils.data.Dataset):
    """Features and labels fetched a whole batch of indices at a time (the batches a per-item DataLoader would
    collate, drawn from the same sampler, without the per-item Python work)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, rows):
        return self.x[rows], self.y[rows]


def train_layer(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, *, lr: float, epochs: int,
                batch_size: int, seed: int) -> torch.nn.Linear:
    """One linear layer trained as CLIP_benchmark's `train` does; torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = torch.nn.Linear(x.shape[1], num_classes)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
        loader = DataLoader(_Rows(x, y), batch_size=None,
                            sampler=BatchSampler(RandomSampler(range(len(x))), batch_size, drop_last=False))
        steps, loss_fn = epochs * len(loader), torch.nn.CrossEntropyLoss()
        for epoch in range(epochs):
            for i, (xb, yb) in enumerate(loader):
                step = i + epoch * len(loader)
                for group in optimizer.param_groups:  # cosine decay, no warm-up (CLIP_benchmark's cosine_lr)
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / steps)) * lr
                optimizer.zero_grad()
                loss_fn(layer(xb), yb).backward()
                optimizer.step()
    return layer


def _accuracy(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((layer(x).argmax(dim=1) == y).sum()) / len(y)


def choose_weight_decay(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        num_classes: int, **train_args) -> float:
    """The search over WEIGHT_DECAYS on the validation split (see the module docstring)."""
    accuracy: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        best, best_acc = 0, 0.0  # each round starts from scratch, as CLIP_benchmark's find_peak does
        for i in candidates:
            if i not in accuracy:
                accuracy[i] = _accuracy(train_layer(*train, num_classes, WEIGHT_DECAYS[i], **train_args), *val)
            if best_acc < accuracy[i]:
                best, best_acc = i, accuracy[i]
        return best

    best = peak(FIRST_TRIED)
    span = 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[best]


def fewshot_rows(labels: torch.Tensor, fewshot_k: int, seed: int) -> list[int]:
    """Training rows in a seeded permutation; with fewshot_k > 0, the first k of each class."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    if fewshot_k < 0:
        return perm
    counts: dict[int, int] = {}
    rows = []
    for row in perm:
        label = int(labels[row])
        if counts.setdefault(label, 0) < fewshot_k:
            counts[label] += 1
            rows.append(row)
    short = sorted(label for label, count in counts.items() if count < fewshot_k)
    if short:
        raise VclrError(f"`fewshot_k` is {fewshot_k} but class {short[0]} has only {counts[short[0]]} training "
                        "examples")
    return rows


def classification_figures(logits: np.ndarray, labels: np.ndarray, prefix: str = "",
                           top5_from: int = 5) -> dict[str, float]:
    """top-1, top-5 (when there are at least `top5_from` classes, else nan) and mean per-class recall, as
    CLIP_benchmark reports them (fractions; mean per-class recall over the classes present, as sklearn's
    balanced_accuracy_score)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = np.argmax(order == labels[:, None], axis=1)  # (N,) 0-based rank of the true class
    n = len(labels)
    acc5 = float(np.count_nonzero(rank < 5)) / n if top5_from <= logits.shape[1] else float("nan")
    recalls = [np.count_nonzero(rank[labels == c] == 0) / np.count_nonzero(labels == c) for c in np.unique(labels)]
    return {f"{prefix}acc1": float(np.count_nonzero(rank == 0)) / n, f"{prefix}acc5": acc5,
            f"{prefix}mean_per_class_recall": float(np.mean(recalls))}


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 val_x: np.ndarray | None = None, val_y: np.ndarray | None = None, fewshot_k: int = -1,
                 lr: float = 0.1, epochs: int = 10, batch_size: int = 64, seed: int = 0) -> ProbeResult:
    """Train and score a linear probe on frozen features; see the module docstring."""
    x, y = torch.as_tensor(train_x, dtype=torch.float32), torch.as_tensor(train_y, dtype=torch.int64)
    rows = fewshot_rows(y, fewshot_k, seed)
    num_classes = int(y.max()) + 1  # from the whole training split, as CLIP_benchmark sizes its layer
    train = (x[rows], y[rows])
    args = {"lr": lr, "epochs": epochs, "batch_size": batch_size, "seed": seed}
    weight_decay = 0.0
    if val_x is not None and len(val_x):
        val = (torch.as_tensor(val_x, dtype=torch.float32), torch.as_tensor(val_y, dtype=torch.int64))
        weight_decay = choose_weight_decay(train, val, num_classes, **args)
        if fewshot_k < 0:  # the final layer sees the validation images too (not in k-shot: it would see more)
            train = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    layer = train_layer(*train, num_classes, weight_decay, **args)
    with torch.no_grad():
        logits = layer(torch.as_tensor(test_x, dtype=torch.float32)).numpy()
    labels = np.asarray(test_y, dtype=np.int64)
    # CLIP_benchmark's linear probe gives top-5 only when the largest test label is at least 5 (6 classes)
    metrics = classification_figures(logits, labels, "lp_", top5_from=5 if labels.max() >= 5 else logits.shape[1] + 1)
    return ProbeResult(logits, labels, weight_decay, {**metrics, "weight_decay": weight_decay})

"""How sure a figure is: bootstrap intervals of every benchmark figure, and paired comparisons of two models.

    figure = Outcomes(num=hits, den=captions)            # a figure is sum(num) / sum(den) over units
    low, high = interval(figure, resamples=1000)         # 95% percentile bootstrap, resampling units
    result = paired_difference(figure_a, figure_b)       # B - A on the same units: interval and permutation p-value

A unit is what a benchmark resamples as a whole: an image with all of its captions for retrieval (so both directions
resample the same images), an image for classification, an instance for compositionality. A figure is a ratio of
sums over units (a mean when every `den` is 1), or, with `groups`, the mean over groups of each group's ratio (mean
per-class recall). Resampling draws each replicate's unit counts from a multinomial, so every figure of one cell sees
the same replicates (`weights`), and the statistic is a matrix product: 1,000 replicates of 100k units cost seconds.

Paired comparisons: the interval of B - A resamples units jointly for both models (the same images); the p-value is
a paired permutation test (each unit's two outcomes swapped with probability 1/2: under "A and B are the same model
up to noise" every swap is equally likely), two-sided, (1 + #|d*| >= |d|) / (1 + permutations). Tested: the intervals
cover the true figure at their nominal rate in a simulation, and the test's false-positive rate stays at or below
5% for two models that differ only by noise (tests/test_benchmark_stats.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

CHUNK = 64  # replicates per block: (CHUNK, units) float64 weights stay near 50 MB at 100k units


@dataclass
class Outcomes:
    """Per-unit outcomes of one figure; see the module docstring."""

    num: np.ndarray  # (U,)
    den: np.ndarray | None = None  # (U,); None: all 1 (a mean over units)
    groups: np.ndarray | None = None  # (U,) int: the figure is the mean over groups of each group's ratio

    def __post_init__(self):
        self.num = np.asarray(self.num, dtype=np.float64)
        self.den = np.ones_like(self.num) if self.den is None else np.asarray(self.den, dtype=np.float64)
        if self.groups is not None:
            self.groups = np.unique(np.asarray(self.groups), return_inverse=True)[1]

    def __len__(self) -> int:
        return len(self.num)

    def statistic(self, weights: np.ndarray) -> np.ndarray:
        """(R,) the figure under each row of unit weights (R, U)."""
        return _figure(weights * self.num, weights * self.den, self.groups)

    def value(self) -> float:
        return float(_figure(self.num[None], self.den[None], self.groups)[0])


def _figure(num: np.ndarray, den: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """(R,) figures of R rows of weighted per-unit numerators and denominators (R, U): the ratio of their sums, or
    with `groups` the mean over the groups present in a row of each group's ratio."""
    if groups is None:
        return num.sum(axis=1) / np.maximum(den.sum(axis=1), 1e-300)
    onehot = np.zeros((num.shape[1], groups.max() + 1))
    onehot[np.arange(num.shape[1]), groups] = 1.0
    group_num, group_den = num @ onehot, den @ onehot  # (R, G)
    present = group_den > 0  # a group a replicate did not draw has no recall: the mean is over the groups drawn
    ratios = np.where(present, group_num / np.where(present, group_den, 1.0), 0.0)
    return ratios.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def bootstrap_weights(units: int, resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Blocks of (R, units) multinomial unit counts, `resamples` rows in all; the same seed, the same replicates."""
    rng = np.random.default_rng(seed)
    uniform = np.full(units, 1.0 / units)
    for start in range(0, resamples, CHUNK):
        yield rng.multinomial(units, uniform, size=min(CHUNK, resamples - start)).astype(np.float64)


def replicates(figures: dict[str, Outcomes], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """(resamples,) bootstrap values of each figure, all under the same replicates (the figures share units)."""
    units = {len(o) for o in figures.values()}
    if len(units) > 1:
        raise ValueError(f"figures resampled together must share their units, got sizes {sorted(units)}")
    out: dict[str, list[np.ndarray]] = {name: [] for name in figures}
    for weights in bootstrap_weights(units.pop(), resamples, seed) if figures else ():
        for name, outcome in figures.items():
            out[name].append(outcome.statistic(weights))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def intervals(figures: dict[str, Outcomes], resamples: int = 1000, confidence: float = 0.95,
              seed: int = 0) -> dict[str, tuple[float, float]]:
    """The percentile bootstrap interval of each figure; {} when `resamples` is 0."""
    if resamples <= 0 or not figures:
        return {}
    return {name: percentile_interval(values, confidence)
            for name, values in replicates(figures, resamples, seed).items()}


def interval(figure: Outcomes, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    return intervals({"figure": figure}, resamples, confidence, seed)["figure"]


@dataclass(frozen=True)
class PairedDifference:
    a: float
    b: float
    difference: float  # b - a
    low: float
    high: float
    p_value: float  # two-sided paired permutation test of "no difference"
    units: int

    def as_dict(self) -> dict:
        return {"value_a": self.a, "value_b": self.b, "difference": self.difference,
                "interval": [self.low, self.high], "p_value": self.p_value, "units": self.units}


def permutation_p_value(a: Outcomes, b: Outcomes, permutations: int = 9999, seed: int = 0) -> float:
    """Two-sided p-value of B - A under random swaps of each unit's two outcomes."""
    observed = abs(b.value() - a.value())
    rng = np.random.default_rng(seed)
    at_least = 0
    for start in range(0, permutations, CHUNK):
        rows = min(CHUNK, permutations - start)
        masks = rng.random((rows, len(a))) < 0.5  # (R, U): which units swap
        num_a, num_b = np.where(masks, b.num, a.num), np.where(masks, a.num, b.num)  # (R, U) each
        den_a, den_b = np.where(masks, b.den, a.den), np.where(masks, a.den, b.den)
        diff = _figure(num_b, den_b, b.groups) - _figure(num_a, den_a, a.groups)
        at_least += int(np.count_nonzero(np.abs(diff) >= observed - 1e-12))
    return (1 + at_least) / (1 + permutations)


def paired_difference(a: Outcomes, b: Outcomes, resamples: int = 1000, confidence: float = 0.95,
                      permutations: int = 9999, seed: int = 0) -> PairedDifference:
    """B - A on the same units: its value, its paired bootstrap interval and its permutation p-value."""
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs the same units: {len(a)} against {len(b)}")
    values = replicates({"a": a, "b": b}, resamples, seed)
    low, high = percentile_interval(values["b"] - values["a"], confidence)
    return PairedDifference(a.value(), b.value(), b.value() - a.value(), low, high,
                            permutation_p_value(a, b, permutations, seed), len(a))

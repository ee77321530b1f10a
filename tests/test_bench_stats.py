"""The benchmark's statistics: bootstrap figures against a naive resampling, intervals that cover the true figure at
their nominal rate, and a paired test whose false positives stay at or below 5% for two models equal up to noise."""

import numpy as np
import pytest

from vclr.bench.stats import Outcomes, bootstrap_weights, interval, paired_difference, permutation_p_value
from vclr.eval.metrics import image_to_text_ranks, text_to_image_ranks


def naive_figure(num, den, groups, rows):
    """The figure recomputed on the units `rows` (a resample, with repeats), the plain way."""
    num, den = np.asarray(num, float)[rows], np.asarray(den, float)[rows]
    if groups is None:
        return num.sum() / den.sum()
    groups = np.asarray(groups)[rows]
    return np.mean([num[groups == g].sum() / den[groups == g].sum() for g in np.unique(groups)])


@pytest.mark.parametrize("grouped", [False, True])
def test_the_weighted_statistic_equals_the_figure_of_the_resampled_units(grouped):
    rng = np.random.default_rng(0)
    num, den = rng.integers(0, 4, 50), rng.integers(1, 5, 50)
    num = np.minimum(num, den)
    groups = rng.integers(0, 6, 50) if grouped else None
    outcome = Outcomes(num, den, groups)
    for _ in range(20):
        rows = rng.integers(0, 50, 50)
        weights = np.bincount(rows, minlength=50)[None].astype(float)
        assert outcome.statistic(weights)[0] == pytest.approx(naive_figure(num, den, groups, rows), abs=1e-12)
    assert outcome.value() == pytest.approx(naive_figure(num, den, groups, np.arange(50)), abs=1e-12)


def test_bootstrap_weights_are_resamples_of_every_unit_count():
    blocks = list(bootstrap_weights(30, 100, seed=3))
    weights = np.concatenate(blocks)
    assert weights.shape == (100, 30) and (weights.sum(axis=1) == 30).all()
    assert np.array_equal(weights, np.concatenate(list(bootstrap_weights(30, 100, seed=3))))  # seeded


def _coverage(draw, true_value, simulations=300, resamples=1000):
    covered = 0
    for seed in range(simulations):
        low, high = interval(draw(np.random.default_rng(seed)), resamples=resamples, seed=seed)
        covered += low <= true_value <= high
    return covered / simulations


def test_intervals_cover_a_recall_at_their_nominal_rate():
    rate = _coverage(lambda rng: Outcomes(rng.random(200) < 0.3), 0.3)
    assert 0.92 <= rate <= 0.98, rate  # 95% nominal; 300 simulations: a standard error of 1.3 points


def test_intervals_of_caption_recall_resample_images_with_their_captions():
    """Text -> image recall over images with 1-5 captions whose hits share an image's difficulty (each simulation
    draws new images): the interval resamples images with their captions, so it covers the population's figure,
    E[captions x p] / E[captions] = 0.4 here."""
    def draw(rng):
        captions, difficulty = rng.integers(1, 6, 150), rng.beta(2, 3, 150)
        return Outcomes(rng.binomial(captions, difficulty), captions)

    rate = _coverage(draw, 0.4)
    assert 0.92 <= rate <= 0.98, rate


def test_intervals_cover_a_mean_per_class_recall():
    labels = np.repeat(np.arange(5), 40)
    recall = np.array([0.2, 0.4, 0.5, 0.7, 0.9])
    rate = _coverage(lambda rng: Outcomes(rng.random(200) < recall[labels], groups=labels), recall.mean())
    assert 0.92 <= rate <= 0.98, rate


def test_the_permutation_p_value_equals_a_naive_swap_count():
    rng = np.random.default_rng(1)
    a, b = Outcomes(rng.random(25) < 0.5), Outcomes(rng.random(25) < 0.7)
    observed = abs(b.value() - a.value())
    masks = np.random.default_rng(7).random((999, 25)) < 0.5  # the same draws the test makes, in one block
    naive = sum(abs(np.where(m, a.num, b.num).mean() - np.where(m, b.num, a.num).mean()) >= observed - 1e-12
                for m in masks)
    assert permutation_p_value(a, b, permutations=999, seed=7) == pytest.approx((1 + naive) / 1000)


def _retrieval_outcomes(images, texts, caption_image):
    t2i = text_to_image_ranks(images, texts, caption_image)
    i2t = image_to_text_ranks(images, texts, caption_image)
    counts = np.bincount(caption_image, minlength=len(images))
    return {"t2i": Outcomes(np.bincount(caption_image, weights=t2i <= 1, minlength=len(images)), counts),
            "i2t": Outcomes(i2t <= 1)}


def _model(base, noise, rng):
    x = base + noise * rng.normal(size=base.shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _paired_p_values(noise_a, noise_b, simulations):
    """p-values of B vs A on simulated retrieval problems: 80 images with 3 captions each in 32 dimensions; each
    model is the true embedding plus its own noise."""
    p_values = {"t2i": [], "i2t": []}
    for seed in range(simulations):
        rng = np.random.default_rng(seed)
        images = rng.normal(size=(80, 32))
        caption_image = np.repeat(np.arange(80), 3)
        texts = images[caption_image] + 0.8 * rng.normal(size=(240, 32))
        a = _retrieval_outcomes(_model(images, noise_a, rng), _model(texts, noise_a, rng), caption_image)
        b = _retrieval_outcomes(_model(images, noise_b, rng), _model(texts, noise_b, rng), caption_image)
        for name in p_values:
            p_values[name].append(paired_difference(a[name], b[name], resamples=100, permutations=499,
                                                    seed=seed).p_value)
    return {name: np.array(values) for name, values in p_values.items()}


def test_the_paired_test_rarely_calls_two_equal_models_different():
    p_values = _paired_p_values(1.0, 1.0, simulations=200)
    for name, values in p_values.items():
        assert np.mean(values < 0.05) <= 0.05, (name, np.mean(values < 0.05))


def test_the_paired_test_finds_a_better_model():
    p_values = _paired_p_values(1.2, 0.7, simulations=20)
    assert all(np.mean(values < 0.05) >= 0.8 for values in p_values.values()), p_values


def test_a_paired_interval_brackets_the_difference_and_needs_the_same_units():
    rng = np.random.default_rng(2)
    a, b = Outcomes(rng.random(300) < 0.4), Outcomes(rng.random(300) < 0.6)
    result = paired_difference(a, b, resamples=500, permutations=999)
    assert result.low < result.difference < result.high and result.low > 0 and result.p_value < 0.01
    with pytest.raises(ValueError, match="same units"):
        paired_difference(a, Outcomes(rng.random(10) < 0.5))

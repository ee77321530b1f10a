"""GradCache gives the full batch's loss and gradients, chunk by chunk (naive reference: one full-batch backward)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vclr.config import LossConfig
from vclr.train.gradcache import chunk_slices, grad_cache_step
from vclr.train.loss import CombinedLoss


class ToyDualEncoder(nn.Module):
    """Two small towers with dropout (so the RNG replay matters) and a learnable temperature, as DualEncoder."""

    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 8))
        self.text = nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Dropout(0.3), nn.Linear(48, 8))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, tokens):
        return {"image_features": F.normalize(self.image(images), dim=-1),  # (B, 8)
                "text_features": F.normalize(self.text(tokens), dim=-1),  # (B, 8)
                "logit_scale": self.logit_scale.exp()}


def _batch(batch=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 2, 2, generator=g), torch.randint(0, 20, (batch, 3), generator=g)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk", [1, 3, 5, 12])
@pytest.mark.parametrize("triplet_weight", [0.0, 1.0])
def test_grad_cache_matches_full_batch(chunk, triplet_weight):
    """Deterministic towers: every chunking gives the full batch's loss and gradients (to fp32 rounding)."""
    images, tokens = _batch(batch=12, seed=1)
    loss_fn = CombinedLoss(LossConfig(triplet_weight=triplet_weight, triplet_margin=0.3))
    torch.manual_seed(0)
    model = ToyDualEncoder().eval()  # dropout off
    out = model(images, tokens)  # reference: the whole batch in one graph
    reference = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    reference["loss"].backward()
    expected = _grads(model)
    model.zero_grad()

    losses, _ = grad_cache_step(model, images, tokens, chunk, loss_fn, lambda loss: loss.backward())
    assert float(losses["loss"]) == pytest.approx(float(reference["loss"].detach()), rel=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=f"chunk {chunk}: {name}")


def test_grad_cache_with_dropout_matches_full_batch_given_the_same_masks():
    images, tokens = _batch(batch=10, seed=0)
    loss_fn = CombinedLoss(LossConfig())
    torch.manual_seed(0)
    model = ToyDualEncoder()  # train mode: dropout on
    torch.manual_seed(123)
    out = model(images, tokens)
    loss_fn(out["image_features"], out["text_features"], out["logit_scale"])["loss"].backward()
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(123)  # one chunk = the whole batch: the same masks, if pass 3 replays pass 1's RNG state
    grad_cache_step(model, images, tokens, 10, loss_fn, lambda loss: loss.backward())
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_dropout_masks_are_replayed_per_chunk():
    """Pass 3 must see pass 1's dropout masks: otherwise the cached feature gradients belong to other features."""
    images, tokens = _batch(batch=8, seed=2)
    loss_fn = CombinedLoss(LossConfig())
    torch.manual_seed(0)
    model = ToyDualEncoder()
    seen = []
    model.image.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    grad_cache_step(model, images, tokens, 4, loss_fn, lambda loss: loss.backward())
    no_grad_chunks, grad_chunks = seen[:2], seen[2:]
    for a, b in zip(no_grad_chunks, grad_chunks):
        torch.testing.assert_close(a, b)


def test_chunk_slices_cover_the_batch_once():
    assert chunk_slices(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert chunk_slices(4, 4) == [slice(0, 4)]

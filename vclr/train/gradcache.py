"""GradCache (Gao et al., 2021): a contrastive batch far larger than activation memory, with the full batch's gradients.

The contrastive loss couples every pair in the batch, so it cannot be split like a cross-entropy loss. It is linear in
nothing but the features, though: with the features' gradients cached, each chunk's parameter gradient follows by the
chain rule. Three passes:

1. embed the batch chunk by chunk without graphs, keeping only the (B, D) features and each chunk's RNG state;
2. the loss over the whole batch of cached features (gathered across processes as usual) -> d loss / d features;
3. re-embed each chunk with a graph, replaying its RNG state, and backprop <features, cached gradient>.

Pass 3 recomputes what pass 1 computed, so one step costs about 1.3x a full-batch step, for the memory of one chunk.
Models with BatchNorm see per-chunk batch statistics (as each process does under DDP); BN running averages are
updated once, in pass 3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager

import torch
from torch import nn


def chunk_slices(batch: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, batch)) for start in range(0, batch, chunk)]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _cached_features(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, slices: list[slice]):
    """Pass 1: (B, D) image and text features and the logit scale and bias (when the model has one), without
    autograd graphs."""
    buffers = [b.detach().clone() for b in model.buffers()]  # BN running stats: pass 3 updates them instead
    rng_states, image_chunks, text_chunks = [], [], []
    with torch.no_grad():
        for part in slices:
            rng_states.append(_rng_state(images.device))
            out = model(images[part], tokens[part])
            image_chunks.append(out["image_features"].float())
            text_chunks.append(out["text_features"].float())
        for buffer, saved in zip(model.buffers(), buffers):
            buffer.copy_(saved)
    scalars = {k: out[k].float() for k in ("logit_scale", "logit_bias") if k in out}
    return torch.cat(image_chunks), torch.cat(text_chunks), scalars, rng_states


def grad_cache_step(model: nn.Module, images: torch.Tensor, tokens: torch.Tensor, chunk: int,
                    loss_fn: Callable[..., dict[str, torch.Tensor]], backward: Callable[[torch.Tensor], None],
                    no_sync: Callable[[nn.Module], ContextManager] = lambda m: contextlib.nullcontext()):
    """Loss and gradients of the whole batch (B pairs), with activations for `chunk` pairs at a time.

    `loss_fn(image_features, text_features, logit_scale, logit_bias=None)` scores the full batch; `backward` is the
    accelerator's (it scales for mixed precision and accumulation); `no_sync(model)` defers DDP's gradient all-reduce
    to the last chunk. Returns the loss terms (detached) and the logit scale.
    """
    slices = chunk_slices(len(images), chunk)
    image_features, text_features, scalars, rng_states = _cached_features(model, images, tokens, slices)

    # pass 2: the full-batch loss on leaf copies of the cached features
    image_leaf = image_features.requires_grad_()  # (B, D)
    text_leaf = text_features.requires_grad_()  # (B, D)
    scalar_leaves = {k: v.detach().requires_grad_() for k, v in scalars.items()}  # scale (and bias)
    losses = loss_fn(image_leaf, text_leaf, *scalar_leaves.values())
    image_grad, text_grad, *scalar_grads = torch.autograd.grad(losses["loss"], [image_leaf, text_leaf,
                                                                                *scalar_leaves.values()])

    # pass 3: replay each chunk with a graph; <features, cached grad> has the chunk's share of the parameter gradient.
    # The temperature's (and bias') gradient is split evenly over the chunks so every chunk's backward touches every
    # parameter.
    device = images.device
    restore = _rng_state(device)
    for i, part in enumerate(slices):
        last = i == len(slices) - 1
        with contextlib.nullcontext() if last else no_sync(model):
            _set_rng_state(rng_states[i], device)
            out = model(images[part], tokens[part])
            surrogate = ((out["image_features"].float() * image_grad[part]).sum()
                         + (out["text_features"].float() * text_grad[part]).sum())
            for name, grad in zip(scalar_leaves, scalar_grads):
                surrogate = surrogate + out[name].float() * grad / len(slices)
            backward(surrogate)
    _set_rng_state(restore, device)
    return {k: v.detach() for k, v in losses.items()}, scalars["logit_scale"].detach()

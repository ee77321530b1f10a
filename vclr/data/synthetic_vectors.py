"""CLIP-like synthetic embedding vectors: for the index benchmarks and tests, and for sizing an index (its kind,
memory and speed) before a collection is embedded. numpy only.

    from vclr.data.synthetic_vectors import structured_pairs
    xb, xq = structured_pairs(1_000_000, 512)    # (n, d) "images", (queries, d) "texts", unit norm
"""

from __future__ import annotations

import numpy as np


def structured_pairs(n: int, d: int, seed: int = 0, clusters: int = 1000, queries: int = 1000,
                     gap: float = 0.35, noise: float = 1.0, latent_dim: int = 48,
                     ambient_noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-like synthetic vectors for benchmarks and tests: -> (images (n, d), texts (queries, d)), unit norm.

    Embeddings of real models have a low intrinsic dimension: points live near a `latent_dim`-dimensional subspace
    (here: `clusters` Gaussian concepts with spread `noise`, mapped into d dimensions by a random linear map) plus a
    little full-rank noise (`ambient_noise` times the signal's norm). Each "text" vector describes a held-out image
    drawn the same way: its latent point plus caption noise, shifted by a shared modality-gap direction of length
    `gap`.
    `latent_dim=0` gives the full-rank, isotropic variant (much harder for every ANN index).
    """
    rng = np.random.default_rng(seed)
    dims = latent_dim or d
    centres = rng.standard_normal((clusters, dims)).astype(np.float32)
    projection = (rng.standard_normal((dims, d)) / np.sqrt(dims)).astype(np.float32) if latent_dim else None

    def embed(z: np.ndarray) -> np.ndarray:
        x = z @ projection if projection is not None else z
        if projection is not None and ambient_noise:  # full-rank noise, `ambient_noise` times the signal's norm
            scale = ambient_noise * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(d)
            x += scale * rng.standard_normal(x.shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def latent(count: int) -> np.ndarray:
        return centres[rng.integers(0, clusters, count)] + noise * rng.standard_normal((count, dims)).astype(np.float32)

    xb = np.concatenate([embed(latent(min(100_000, n - s))) for s in range(0, n, 100_000)])
    caption = latent(queries) + 0.3 * noise * rng.standard_normal((queries, dims)).astype(np.float32)
    direction = rng.standard_normal(d).astype(np.float32)
    texts = embed(caption) + gap * direction / np.linalg.norm(direction)
    return xb, (texts / np.linalg.norm(texts, axis=1, keepdims=True)).astype(np.float32)

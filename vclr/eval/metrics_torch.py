"""The blocked exact ranks of `vclr.eval.metrics`, on a torch device (a GPU when there is one).

Same definitions and tie rule (lower index first) as the numpy version; `tests/test_eval_metrics.py` checks the two
on data with exact ties. Only the score blocks live on the device, so GPU memory stays at one block.
"""

from __future__ import annotations

import numpy as np
import torch

from vclr.eval.metrics import MAX_BLOCK_BYTES, block_rows


def _ranks_of_targets(scores: torch.Tensor, target_scores: torch.Tensor, target_index: torch.Tensor) -> torch.Tensor:
    greater = (scores > target_scores[:, None]).sum(dim=1)  # (b,)
    ties_before = ((scores == target_scores[:, None])
                   & (torch.arange(scores.shape[1], device=scores.device)[None, :] < target_index[:, None])).sum(dim=1)
    return greater + ties_before + 1


@torch.no_grad()
def retrieval_ranks(image_embeddings: np.ndarray, text_embeddings: np.ndarray, caption_image: np.ndarray,
                    device: torch.device, block: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image->text ranks (N,), text->image ranks (C,)), as vclr.eval.metrics computes them."""
    # fp32 matmuls, not TF32: the ranks must match the CPU evaluator's
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        images = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float32)).to(device)  # (N, D)
        texts = torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float32)).to(device)  # (C, D)
        caption_image = torch.from_numpy(np.asarray(caption_image, dtype=np.int64)).to(device)  # (C,)
        t2i = torch.empty(len(texts), dtype=torch.long, device=device)
        step = block or block_rows(len(images))
        for start in range(0, len(texts), step):
            scores = texts[start:start + step] @ images.T  # (b, N)
            targets = caption_image[start:start + step]
            t2i[start:start + step] = _ranks_of_targets(scores, scores.gather(1, targets[:, None])[:, 0], targets)
        i2t = torch.empty(len(images), dtype=torch.long, device=device)
        step = block or block_rows(len(texts), MAX_BLOCK_BYTES // 4)  # masks and an int64 index per score
        for start in range(0, len(images), step):
            scores = images[start:start + step] @ texts.T  # (b, C)
            rows = torch.arange(start, min(start + step, len(images)), device=device)
            positive = caption_image[None, :] == rows[:, None]  # (b, C)
            best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values  # (b,)
            # the lowest-index caption among an image's best-scoring ones
            candidates = torch.where(positive & (scores == best[:, None]),
                                     torch.arange(len(texts), device=device)[None, :], len(texts))
            i2t[start:start + step] = _ranks_of_targets(scores, best, candidates.min(dim=1).values)
        return i2t.cpu().numpy(), t2i.cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous

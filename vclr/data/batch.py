"""A training batch: what the loader hands the training step, with the kind of image input it carries.

    batch = collate_pairs(items, image_input="pixels")   # items of ImageTextDataset / ShardPairs
    batch.image_input, batch.images, batch.tokens       # "pixels" | "encoded" | "rows"; (B, ...); (B, L)
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import torch

ImageInput = Literal["pixels", "encoded", "rows"]
IMAGE_INPUTS: tuple[str, ...] = typing.get_args(ImageInput)


@dataclass
class TrainBatch:
    """One training batch. `image_input` says what `images` holds: "pixels", uint8 (B, 3, S, S); "encoded", B
    encoded files (bytes, decoded in one batched call on the training device); "rows", (B,) row numbers into the
    locked image tower's cached outputs."""

    image_input: ImageInput
    images: torch.Tensor | list[bytes]
    tokens: torch.Tensor  # (B, L)
    image_ids: torch.Tensor  # (B,) stable ids: equal ids, the same image
    caption_rows: torch.Tensor | None = None  # (B,) rows of the dataset's tokens (a cached text tower's rows)

    def __len__(self) -> int:
        return len(self.tokens)

    def to(self, device, non_blocking: bool = False) -> TrainBatch:
        """The tensors on `device` (Accelerate's loader calls this); encoded bytes stay on the CPU for the decoder."""
        def move(x):
            return x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x

        return TrainBatch(self.image_input, move(self.images), move(self.tokens), move(self.image_ids),
                          move(self.caption_rows))


def collate_pairs(items: list, image_input: ImageInput = "pixels") -> TrainBatch:
    """Stack (image, tokens, image id[, caption row]) items of one image input kind into a TrainBatch, dropping
    unreadable items (None)."""
    items = [item for item in items if item is not None]
    if not items:
        empty = torch.zeros(0, dtype=torch.long)
        return TrainBatch(image_input, [] if image_input == "encoded" else empty, empty, empty)
    images, tokens, image_ids, *caption_rows = zip(*items)
    if image_input == "rows":
        stacked = torch.tensor(images, dtype=torch.long)  # (B,)
    elif image_input == "encoded":
        stacked = list(images)  # B x bytes
    else:
        stacked = torch.stack(images)  # (B, 3, S, S) uint8
    return TrainBatch(image_input, stacked, torch.stack(tokens), torch.tensor(image_ids, dtype=torch.long),
                      torch.tensor(caption_rows[0], dtype=torch.long) if caption_rows else None)

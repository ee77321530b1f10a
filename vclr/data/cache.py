"""vclr's cache directory: fetched packages (OpenMoji, Fashion-MNIST), locked-tower outputs, benchmark data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where fetched packages and derived data are kept: $VCLR_CACHE, else ~/.cache/vclr (read at each call)."""
    return Path(os.environ.get("VCLR_CACHE") or Path.home() / ".cache" / "vclr")

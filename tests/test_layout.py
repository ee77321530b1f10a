"""The module map holds: searching and serving never load the trainer or Accelerate."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["vclr.search", "vclr.index", "vclr.metrics", "vclr.serve", "vclr.embed",
                                    "vclr.evaluate", "vclr.rundir"])
def test_readers_do_not_import_training_code(module):
    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m == 'vclr.train' or m == 'accelerate' "
            "or m.startswith('accelerate.')); print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing {module} loaded {out}"

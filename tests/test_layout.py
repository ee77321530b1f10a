"""The module map holds: searching and serving never load the trainer or Accelerate."""

import subprocess
import sys

READERS = ["vclr.rundir", "vclr.index", "vclr.metrics", "vclr.model_source", "vclr.embed", "vclr.embed_shards",
           "vclr.search", "vclr.serve", "vclr.evaluate"]

# one fresh interpreter imports the readers one by one; modules only accumulate in sys.modules, so the first reader
# after which the trainer or Accelerate is loaded is the one that imported it
CHECK = """
import importlib, sys
for module in sys.argv[1:]:
    importlib.import_module(module)
    bad = sorted(m for m in sys.modules if m == "vclr.train" or m == "accelerate" or m.startswith("accelerate."))
    if bad:
        print(module, "loaded", ",".join(bad[:3]))
        break
"""


def test_readers_do_not_import_training_code():
    out = subprocess.run([sys.executable, "-c", CHECK, *READERS], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

"""Runs vclr training once per case under `accelerate launch` (the multi-process half of test_train_distributed.py).

    accelerate launch --num_processes 2 --cpu tests/dist_train_worker.py CASES.json

CASES.json: a list of override lists, each a complete run (train.output_dir included).
"""

import json
import sys

import torch.distributed as dist

from vclr.config import load_config
from vclr.train.loop import train

if __name__ == "__main__":
    for overrides in json.loads(open(sys.argv[1]).read()):
        train(load_config(None, overrides))
        # Accelerate set up torch.distributed from the launcher's environment: make sure two processes really ran
        assert dist.is_initialized() and dist.get_world_size() == 2, "expected 2 processes"

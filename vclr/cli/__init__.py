"""The `vclr` command, on top of the library: argument parsing, printing, and exit codes. Nothing in the library
imports it. Library errors name arguments (`run`, `data`...); `flags_for` turns them into flags (`--run DIR`).

    vclr demo                                  # generate data, train, index, evaluate, search: all on CPU
    vclr train --config configs/demo.yaml optim.lr=0.001
    vclr search --index vclr-demo/index --text "a large red circle on the left" -k 5
"""

from vclr.cli.main import main

__all__ = ["main"]

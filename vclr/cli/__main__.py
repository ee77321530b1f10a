"""`python -m vclr.cli ...` (what `accelerate launch -m vclr.cli` runs)."""

import sys

from vclr.cli.main import main

sys.exit(main())

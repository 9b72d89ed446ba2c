#!/usr/bin/env python
"""Merge LoRA adapters into a base checkpoint; the same as `python -m minillama.merge` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minillama.cli import run  # noqa: E402
from minillama.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))

"""Draw a run's loss curve (train loss per step, eval loss where measured) to a PNG, without matplotlib.

    python train/plot.py out/sft/metrics.jsonl                 # writes out/sft/loss.png
    python train/plot.py out/sft/metrics.jsonl --out curve.png
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.util.cli import ArgumentParser, run  # noqa: E402
from minillama.training.metrics import read_metrics  # noqa: E402
from minillama.util.plot import write_loss_png  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__)
    p.add_argument("metrics", type=Path, help="metrics.jsonl written by train/sft.py")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: loss.png beside the metrics file)")
    args = p.parse_args(argv)
    if not args.metrics.is_file():
        p.error(f"{args.metrics} does not exist")
    records = read_metrics(args.metrics)
    if not any("loss" in r or "eval_loss" in r for r in records):
        p.error(f"{args.metrics}: no records with 'loss' or 'eval_loss'")
    out = write_loss_png(args.out or args.metrics.with_name("loss.png"), records)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

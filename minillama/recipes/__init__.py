"""Console entry points (pyproject's [project.scripts]) for the scripts in generate/, train/ and weights/.

The scripts stay where a reader finds them, as the recipes they are; pyproject maps those folders into the package as
minillama.recipes.generate / .train / .weights, so an installed minillama runs them outside a checkout:
    minillama-chat --ckpt DIR             # = python generate/chat.py --ckpt DIR
    torchrun --nproc_per_node 8 --no-python minillama-sft --ckpt DIR --data d.jsonl
"""

from __future__ import annotations

import sys
from importlib import import_module


def _script(name: str):
    return import_module(f"{__name__}.{name}")


def _run(name: str) -> None:
    from ..cli import run
    sys.exit(run(_script(name).main))


def chat():
    _run("generate.chat")


def complete():
    _run("generate.complete")


def batch():
    _run("generate.batch")


def serve():
    _run("generate.serve")


def sft():
    sys.exit(_script("train.sft").main())


def plot():
    sys.exit(_script("train.plot").main())


def convert():
    from ..checkpoints import convert
    sys.exit(convert.cli())


def merge():
    from ..checkpoints import merge
    from ..cli import run
    sys.exit(run(merge.main))


def prepare_smollm2():
    sys.exit(_script("weights.prepare_smollm2").main())

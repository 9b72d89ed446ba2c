"""Console entry points (pyproject's [project.scripts]): one per tool, each through the one error path (cli.run).

The scripts stay where a reader finds them, as the recipes they are; pyproject maps those folders into the package as
minillama.recipes.generate / .train / .weights, so an installed minillama runs them outside a checkout:
    minillama-chat --ckpt DIR             # = python generate/chat.py --ckpt DIR
    torchrun --nproc_per_node 8 --no-python minillama-sft --ckpt DIR --data d.jsonl
The tools without a recipe file live in minillama/tools/ (`python -m minillama.tools.convert` works too).
"""

from __future__ import annotations

import sys
from importlib import import_module

from ..util.cli import run


def _entry(module: str):
    """A console script: import the tool's module, run its main() through cli.run, exit with its code (what main
    returns when that is an int; 0 when it returns something else, e.g. convert's output dir)."""
    def entry():
        main = import_module(module).main

        def code() -> int:
            out = main()
            return out if isinstance(out, int) and not isinstance(out, bool) else 0
        sys.exit(run(code))
    entry.__name__ = module.rsplit(".", 1)[-1]
    return entry


chat = _entry("minillama.recipes.generate.chat")
complete = _entry("minillama.recipes.generate.complete")
batch = _entry("minillama.recipes.generate.batch")
serve = _entry("minillama.recipes.generate.serve")
eval_long = _entry("minillama.recipes.generate.eval_long")
bench = _entry("minillama.recipes.generate.bench")
bench_serve = _entry("minillama.recipes.generate.bench_serve")
bench_deploy = _entry("minillama.recipes.generate.bench_deploy")
sft = _entry("minillama.recipes.train.sft")
dpo = _entry("minillama.recipes.train.dpo")
grpo = _entry("minillama.recipes.train.grpo")
rejection = _entry("minillama.recipes.train.rejection")
plot = _entry("minillama.recipes.train.plot")
bench_train = _entry("minillama.recipes.train.bench")
prepare_smollm2 = _entry("minillama.recipes.weights.prepare_smollm2")
convert = _entry("minillama.tools.convert")
merge = _entry("minillama.tools.merge")
extract_lora = _entry("minillama.tools.extract_lora")
plan_memory = _entry("minillama.tools.plan_memory")

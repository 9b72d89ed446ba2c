"""The command-line side shared by every script in generate/ and train/: one flag vocabulary, argparse types that
reject bad values before a model is loaded, the default checkpoint, and one-line errors instead of tracebacks.

    p = argparse.ArgumentParser(...); add_model_args(p); add_sampling_args(p)
    sys.exit(run(main))   # a user mistake prints "error: ..." on rank 0 and exits 1
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional

from .chat_format import FORMATS
from .dtypes import DTYPE_NAMES
from .sampling import SamplingParams

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = REPO / "weights" / "smollm2-135m-instruct"
PREPARE_COMMAND = "python weights/prepare_smollm2.py"

# what a user can get wrong: a bad flag value, path or file. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


# ---- argparse types: the value is checked when the command line is parsed ----

def _number(kind, text: str, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(name: str, kind, ok: Callable, rule: str) -> Callable[[str], object]:
    """An argparse type: parse as int/float (finite), then require ok(value), else '... must be {rule}'."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        value = _number(kind, text, what)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{value} must be {rule}")
        return value

    parse.__name__ = name
    return parse


positive_int = _checked("positive_int", int, lambda v: v >= 1, ">= 1")
nonnegative_int = _checked("nonnegative_int", int, lambda v: v >= 0, ">= 0")
positive_float = _checked("positive_float", float, lambda v: v > 0, "> 0")
nonnegative_float = _checked("nonnegative_float", float, lambda v: v >= 0, ">= 0")
probability = _checked("probability", float, lambda v: 0 < v <= 1, "in (0, 1]")  # top_p
unit_fraction = _checked("unit_fraction", float, lambda v: 0 <= v < 1, "in [0, 1)")  # dropout


def adapter_spec(text: str) -> tuple[str, str]:
    """--adapter value: DIR (the adapter named "default") or NAME=DIR. -> (name, dir)"""
    name, sep, path = text.partition("=")
    if not sep or Path(text).is_dir():  # a dir whose name holds "=" is still a dir
        return "default", text
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected DIR or NAME=DIR")
    return name, path


# ---- flags ----

def add_model_args(p: argparse.ArgumentParser) -> None:
    """Which checkpoint, adapter, dtype and device."""
    p.add_argument("--ckpt", "--model", dest="ckpt", default=None,
                   help="checkpoint dir (HF or Meta/Mistral layout); default: "
                        f"{DEFAULT_CKPT.relative_to(REPO)}/ (made by `{PREPARE_COMMAND}`)")
    p.add_argument("--ckpt_dir", default=None, help="Meta-style alias of --ckpt")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer file or dir (default: the checkpoint dir)")
    p.add_argument("--adapter", action="append", type=adapter_spec, default=None,
                   help="LoRA/DoRA adapter dir (PEFT layout) to apply on top (one adapter is merged in); repeat "
                        "as NAME=DIR to load several side by side (generate/batch.py picks one per line)")
    p.add_argument("--quantize", default=None, choices=["nf4"], help="load the weights in NF4 (single process)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--chat_format", default=None, choices=FORMATS,
                   help="force a chat format (default: the checkpoint's, from its chat template or family)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (GPU)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.6, top_p: float = 0.9,
                      max_new_tokens: int = 256) -> None:
    """--max_seq_len, --max_new_tokens and the sampling knobs (HF order: penalty, temperature, top-k, top-p)."""
    p.add_argument("--max_seq_len", type=positive_int, default=None,
                   help="cap on prompt + answer tokens (default: the model's context)")
    p.add_argument("--max_new_tokens", "--max_gen_len", type=positive_int, default=max_new_tokens,
                   help="most tokens to generate per answer (--max_gen_len: Meta's name)")
    p.add_argument("--temperature", type=nonnegative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top_p", type=probability, default=top_p, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top_k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--repetition_penalty", type=positive_float, default=1.0, help="1 = off (CTRL/HF penalty)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty)


def generation_options(args: argparse.Namespace) -> dict:
    """The keyword options of generate() / generate_stream() / generate_continuous() the flags describe."""
    return dict(seed=args.seed, compile=args.compile, max_seq_len=args.max_seq_len)


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path, Path]:
    """(checkpoint dir, tokenizer path) from --ckpt / --ckpt_dir / --tokenizer_path, or the default SmolLM2 dir."""
    if args.ckpt and args.ckpt_dir and Path(args.ckpt) != Path(args.ckpt_dir):
        raise ValueError(f"--ckpt {args.ckpt} and --ckpt_dir {args.ckpt_dir} disagree; give one")
    given = args.ckpt or args.ckpt_dir
    ckpt = Path(given) if given else DEFAULT_CKPT
    if not ckpt.exists():
        if given is None:
            raise FileNotFoundError(f"no --ckpt given and the default model {ckpt} is missing; make it with: "
                                    f"{PREPARE_COMMAND}")
        raise FileNotFoundError(f"--ckpt {ckpt} does not exist")
    tokenizer = Path(args.tokenizer_path) if args.tokenizer_path else ckpt
    if not tokenizer.exists():
        raise FileNotFoundError(f"--tokenizer_path {tokenizer} does not exist")
    names = [name for name, _ in args.adapter or ()]
    for name, path in args.adapter or ():
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--adapter {path} is not a directory")
        if names.count(name) > 1:
            raise ValueError(f"--adapter: the name {name!r} is given twice (name several adapters as NAME=DIR)")
    return ckpt, tokenizer


def context_limit(args: argparse.Namespace, model) -> int:
    """--max_seq_len checked against the model's context (default: all of it)."""
    limit = args.max_seq_len or model.args.max_seq_len
    if limit > model.args.max_seq_len:
        raise ValueError(f"--max_seq_len {limit} exceeds the model's context of {model.args.max_seq_len} tokens")
    if args.max_new_tokens >= limit:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} must be below --max_seq_len {limit}")
    return limit


def load_from_args(args: argparse.Namespace, log=None):
    """loading.load_for_inference with what add_model_args parsed."""
    from .loading import load_for_inference
    ckpt, tokenizer = resolve_checkpoint(args)
    return load_for_inference(ckpt, tokenizer=tokenizer, adapter=dict(args.adapter or {}), quantize=args.quantize,
                              dtype=args.dtype, device=args.device, chat_format=args.chat_format, log=log)


# ---- running a script ----

def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def run(main: Callable[[], Optional[int]]) -> int:
    """main() with user errors as one line on stderr (rank 0 only under torchrun) and exit code 1, no traceback."""
    try:
        code = main()
    except USER_ERRORS as e:
        if is_rank0():
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if is_rank0():
            print("\n[interrupted]", file=sys.stderr, flush=True)
        return 130
    return int(code or 0)

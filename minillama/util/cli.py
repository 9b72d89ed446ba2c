"""The command-line plumbing every tool shares: argparse types that reject bad values before a model is loaded, the
parser and --help formatter, where the checkout and the default checkpoint are, and one-line errors instead of
tracebacks (run). The flags themselves (one vocabulary for every tool) are in minillama/tools/flags.py.

    p = ArgumentParser(description=__doc__)
    sys.exit(run(main))          # a user mistake prints "error: ..." on rank 0 and exits 1

Flags are spelled with underscores (Meta's and HF's scripts do); every parser built here also takes the hyphenated
spelling (--max-new-tokens = --max_new_tokens).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from .files import DiskFull, is_disk_full


PACKAGE = Path(__file__).resolve().parents[1]
REPO = PACKAGE.parent
IN_CHECKOUT = (REPO / "pyproject.toml").is_file()  # else an installed package (site-packages)
# the embedded default model: weights/ in a checkout; an installed package keeps it in the user's cache
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minillama"
DEFAULT_CKPT = (REPO / "weights" if IN_CHECKOUT else USER_CACHE) / "smollm2-135m-instruct"
PREPARE_COMMAND = "python weights/prepare_smollm2.py" if IN_CHECKOUT else "minillama-prepare-smollm2"


def recipe_file(*parts: str) -> Path:
    """A file shipped beside the scripts (e.g. train/data/reviews.jsonl): the checkout's, or the installed copy."""
    return (REPO if IN_CHECKOUT else PACKAGE / "recipes").joinpath(*parts)

# what a user can get wrong: a bad flag value, path or file. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError, DiskFull)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help (once: not when the help text already
    says what the default is, nor for on/off switches)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) \
                or action.default == [] or action.nargs == 0:
            return text
        return super()._get_help_string(action)


_FLAG = re.compile(r"(--[A-Za-z0-9][A-Za-z0-9_-]*)(=|$)")


def dehyphenate(argv: list[str]) -> list[str]:
    """--max-new-tokens=5 -> --max_new_tokens=5: flag names only, never values or anything after a bare '--'."""
    out, rest = [], False
    for a in argv:
        if a == "--":
            rest = True
        m = None if rest else _FLAG.match(a)
        if m:  # a value such as "--x 1 --y 2" (spaces) is not a flag name and stays as it is
            a = "--" + m.group(1)[2:].replace("-", "_") + a[m.end(1):]
        out.append(a)
    return out


class ArgumentParser(argparse.ArgumentParser):
    """argparse with HelpFormatter, the hyphenated spelling of every flag accepted, and one-line errors:
    "PROG: error: MESSAGE (see --help)" on stderr (rank 0 only under torchrun), exit status 2, no usage block."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        kwargs.setdefault("epilog", "Flags also take hyphens: --max-new-tokens is --max_new_tokens.")
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(dehyphenate(sys.argv[1:] if args is None else list(args)), namespace)

    def error(self, message):
        if is_rank0():
            print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr, flush=True)
        sys.exit(2)


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
fraction = _checked("fraction", float, lambda v: 0 <= v <= 1, "in [0, 1]")
openai_penalty = _checked("openai_penalty", float, lambda v: -2 <= v <= 2, "in [-2, 2]")  # frequency/presence
unit_fraction = _checked("unit_fraction", float, lambda v: 0 <= v < 1, "in [0, 1)")  # dropout


MAX_AUTO_THREADS = 4


def auto_threads() -> int:
    """CPU threads for inference: the cores no other process is using (1-minute load average), 1 to 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(MAX_AUTO_THREADS, cores, round(cores - busy)))


# ---- running a script ----

def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


RANK0_GRACE_S = 5.0  # how long another rank's failing exit waits for rank 0 to say why


def report_error(line: str) -> None:
    """A user error's one line on stderr, from rank 0 only. (Under torchrun the launcher still adds its
    ChildFailedError summary: torch.distributed.launcher.api raises it for every non-zero worker exit.)
    Another rank hitting the same error waits before it exits: the launcher stops every worker as soon as one
    exits non-zero, so a rank that exits first would otherwise kill rank 0 before it has printed the line."""
    if is_rank0():
        print(line, file=sys.stderr, flush=True)
    else:
        time.sleep(RANK0_GRACE_S)


def run(main: Callable[[], Optional[int]]) -> int:
    """main() with user errors as one line on stderr (rank 0 only under torchrun) and exit code 1, no traceback."""
    try:
        code = main()
    except USER_ERRORS as e:  # one line: a message that runs on (a library's paragraph) keeps its first line
        text = str(e).strip()
        report_error(f"error: {text.splitlines()[0] if text else type(e).__name__}")
        return 1
    except OSError as e:  # a full disk where no writer named the file: still one line, not a traceback
        if not is_disk_full(e):
            raise
        report_error(f"error: no space left on the device{f' while writing {e.filename}' if e.filename else ''}")
        return 1
    except KeyboardInterrupt:
        if is_rank0():
            print("\n[interrupted]", file=sys.stderr, flush=True)
        return 130
    return int(code or 0)

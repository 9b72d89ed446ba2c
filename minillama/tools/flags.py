"""The flags every tool shares, one vocabulary: which checkpoint/adapter/dtype/device/threads, the context and RoPE
overrides, the sampling knobs (defaults from the checkpoint's generation_config.json, shown in --help), and turning
them into what the library takes.

    p = ArgumentParser(description=__doc__); add_model_args(p); add_sampling_args(p)
    args = parse_args(p, argv)   # sampling defaults from the checkpoint's generation_config.json, shown in --help
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ..inference.constraints import Constraint, check, parse_response_format
from ..inference.engine import SPECULATE, EngineConfig
from ..inference.sampling import SamplingParams
from ..rope import check_rope_scaling, runs_past_context
from ..tokenizer.chat_format import FORMATS
from ..util.cli import (DEFAULT_CKPT, IN_CHECKOUT, MAX_AUTO_THREADS, PREPARE_COMMAND, REPO, auto_threads, dehyphenate,
                        fraction, nonnegative_float, nonnegative_int, openai_penalty, positive_float, positive_int,
                        probability)
from ..util.dtypes import DTYPE_NAMES
from ..util.files import read_json


def json_arg(text: str, flag: str):
    """A flag's JSON value, given inline (an object, or null) or as the path of a JSON file holding an object;
    ArgumentTypeError says what is wrong."""
    stripped = text.strip()
    if stripped.startswith("{") or stripped == "null":
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise argparse.ArgumentTypeError("JSON nested too deeply to read") from None
    if Path(text).is_file():
        try:
            return read_json(Path(text), flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    raise argparse.ArgumentTypeError(f"{text!r} is neither a JSON object nor an existing JSON file")


def rope_scaling_arg(text: str) -> dict:
    """--rope_scaling: a JSON object, or the path of a JSON file holding one; its keys are checked here.

    'null' or {"rope_type": "default"} removes the checkpoint's scaling."""
    value = json_arg(text, "--rope_scaling")
    try:
        return check_rope_scaling(value, "--rope_scaling")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--rope_scaling: ")) from None


def response_format_arg(text: str) -> Optional[Constraint]:
    """--response_format: OpenAI's response_format as JSON or a JSON file -> its Constraint (None: free text); the
    schema or regex is checked here, before the model loads (llguidance needs no tokenizer for that)."""
    try:
        c = parse_response_format(json_arg(text, "--response_format"))
        if c is not None:
            check(c)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return c


def add_rope_args(p: argparse.ArgumentParser) -> None:
    """--rope_theta and --rope_scaling: the same RoPE overrides for every tool that loads a model."""
    p.add_argument("--rope_theta", type=positive_float, default=None,
                   help="RoPE base override, e.g. 1e6 to stretch Llama 3's 500000 (none: the checkpoint's)")
    p.add_argument("--rope_scaling", type=rope_scaling_arg, default=None,
                   help='RoPE scaling override as JSON or a JSON file, e.g. \'{"rope_type": "yarn", "factor": 4.0, '
                        '"original_max_position_embeddings": 8192}\' (linear, dynamic, yarn, llama3; null removes '
                        "one). Without --max_seq_len a linear/yarn/llama3 scaling extends the context to factor x "
                        "the original")


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
    """Which checkpoint, adapter, dtype, device and CPU threads; the context and RoPE to run it with."""
    p.add_argument("--ckpt", "--model", dest="ckpt", default=None,
                   help="checkpoint dir (HF or Meta/Mistral layout); default: "
                        f"{DEFAULT_CKPT.relative_to(REPO) if IN_CHECKOUT else DEFAULT_CKPT}/ (made by "
                        f"`{PREPARE_COMMAND}`)")
    p.add_argument("--ckpt_dir", default=None, help="Meta-style alias of --ckpt")
    p.add_argument("--tokenizer_path", default=None, help="tokenizer file or dir (default: the checkpoint dir)")
    p.add_argument("--adapter", action="append", type=adapter_spec, default=None,
                   help="LoRA/DoRA adapter dir (PEFT layout) to apply on top (one adapter is merged in); repeat "
                        "as NAME=DIR to load several side by side (generate/batch.py picks one per line)")
    p.add_argument("--quantize", default=None, choices=["int8", "int4", "int4-g64", "int4-g128", "nf4"],
                   help="weight-only quantization on load (single process): int8 per row, int4 in groups of 32 "
                        "(or 64/128), or NF4; int4's output head is int8. A checkpoint saved by minillama-convert "
                        "--quantize loads quantized without it (given, it must name the same scheme)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--chat_format", default=None, choices=FORMATS,
                   help="force a chat format (default: the checkpoint's, from its chat template or family)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step (CUDA graphs on GPU; inductor's C++ on CPU, which "
                        "takes minutes to compile on a small CPU: once for one row, once for several; then it "
                        "decodes faster)")
    p.add_argument("--speculate", default=None, choices=SPECULATE,
                   help="speculative decoding: ngram drafts the tokens that followed the answer's last words earlier "
                        "in the prompt or answer (prompt lookup; pays where the answer quotes its input); draft: a "
                        "small model (--draft_ckpt) drafts them. Drafts are verified in one forward; exact under "
                        "greedy, the same distribution when sampling")
    p.add_argument("--draft_ckpt", default=None, metavar="DIR",
                   help="checkpoint dir of a small draft model with the target's tokenizer (e.g. Llama-3.2-1B for a "
                        "Llama 3 8B/70B): it proposes --draft_tokens tokens greedily per step (--speculate draft; "
                        "given alone it turns that on). Loaded with --dtype/--device, no adapter, single process "
                        "only (default: none)")
    p.add_argument("--draft_tokens", type=positive_int, default=4,
                   help="drafts per row and step with --speculate or --draft_ckpt")
    p.add_argument("--prefill_chunk", type=positive_int, default=512,
                   help="prompt tokens a running answer waits for at most between two of its tokens: a long prompt "
                        "is prefilled in chunks of this size between the running answers' decode steps")
    p.add_argument("--prefill_step", type=positive_int, default=None,
                   help="prompt tokens per prefill forward (default: --prefill_chunk): the prompts a forward "
                        "completes get their first token at once, so under a burst of requests the first ones answer "
                        "before the last are prefilled. Smaller forwards cost more per token where streaming the "
                        "weights dominates (on this project's 2-core CPU 85 tokens cost 1.5x per token what 272 "
                        "did); it pays where a forward's cost hardly grows with its tokens (a GPU)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the model (default: $OMP_NUM_THREADS if set, else the idle cores, at most "
                        f"{MAX_AUTO_THREADS}: decoding is memory-bound, and threads that must wait for a busy core "
                        "slow every step down)")
    p.add_argument("--max_seq_len", type=positive_int, default=None,
                   help="the context to run at, a cap on prompt + answer tokens (default: generation_config.json's "
                        "max_length, else the model's context). Above the checkpoint's context it extends the "
                        "model's; with dynamic NTK scaling the trained context stays (the base of the scaling) and "
                        "generation runs past it")
    add_rope_args(p)


def add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.6, top_p: float = 0.9,
                      max_new_tokens: Optional[int] = 256) -> None:
    """--max_new_tokens and the sampling knobs (HF order: penalty, temperature, top-k, top-p).

    The values given here are the fallbacks; parse_args replaces them with the checkpoint's generation_config.json.
    """
    p.add_argument("--max_new_tokens", "--max_gen_len", type=positive_int, default=max_new_tokens,
                   help="most tokens to generate per answer (--max_gen_len: Meta's name)")
    p.add_argument("--temperature", type=nonnegative_float, default=temperature, help="0 = greedy")
    p.add_argument("--top_p", type=probability, default=top_p, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--top_k", type=nonnegative_int, default=0, help="0 = off")
    p.add_argument("--repetition_penalty", type=positive_float, default=1.0, help="1 = off (CTRL/HF penalty)")
    p.add_argument("--frequency_penalty", type=openai_penalty, default=0.0,
                   help="OpenAI's: logit -= (times the token is in the answer so far) x this, in [-2, 2]; 0 = off")
    p.add_argument("--presence_penalty", type=openai_penalty, default=0.0,
                   help="OpenAI's: logit -= this once the token is in the answer, in [-2, 2]; 0 = off")
    p.add_argument("--logit_bias", type=logit_bias, default=(), metavar="ID:BIAS[,ID:BIAS...]",
                   help="OpenAI's: add BIAS (in [-100, 100]) to token ID's logit; -100 bans it, 100 forces it")
    p.add_argument("--min_p", type=fraction, default=0.0,
                   help="drop tokens below min_p x the top token's probability (after temperature); 0 = off")
    p.set_defaults(_checkpoint_defaults=True)


def logit_bias(text: str) -> tuple:
    """--logit_bias "ID:BIAS,ID:BIAS" -> ((id, bias), ...), each id >= 0 and bias in [-100, 100]."""
    out = []
    for part in text.split(","):
        tid, _, bias = part.strip().partition(":")
        try:
            pair = (int(tid), float(bias))
        except ValueError:
            pair = (-1, 0.0)
        if pair[0] < 0 or not -100 <= pair[1] <= 100:
            raise argparse.ArgumentTypeError(f"expected ID:BIAS pairs (token id >= 0, bias in [-100, 100]) separated "
                                             f"by commas, got {part!r}")
        out.append(pair)
    return tuple(sorted(out))


def _given_checkpoint(argv) -> Path:
    """The checkpoint dir the command line names (or the default one), read before the full parse."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt", "--model", "--ckpt_dir", dest="ckpt", default=None)
    known, _ = pre.parse_known_args(dehyphenate(argv))
    return Path(known.ckpt) if known.ckpt else DEFAULT_CKPT


def _short(path: Path) -> str:
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def checkpoint_defaults(p: argparse.ArgumentParser, argv) -> None:
    """Sampling flag defaults from the checkpoint's generation_config.json (flags still win), each one's
    effective value and where it came from written into its --help line."""
    from ..inference.loading import generation_defaults
    ckpt = _given_checkpoint(argv)
    gen = generation_defaults(ckpt) if ckpt.is_dir() else None
    actions = {a.dest: a for a in p._actions}
    values = dict(gen.sampling) if gen and gen.path else {}
    if gen and gen.max_new_tokens:
        values["max_new_tokens"] = gen.max_new_tokens
    if gen and gen.max_length:
        values["max_seq_len"] = gen.max_length
    for dest in ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        a = actions[dest]
        fallback = "the rest of the context" if a.default is None else f"{a.default:g}"
        if dest in values:
            a.default = values[dest]
            why = f", {gen.why}" if dest == "temperature" else ""
            a.help = (f"{a.help} (default here: {a.default:g} from {_short(gen.path)}{why}; without a "
                      f"generation_config.json: {fallback})")
        else:
            a.help = f"{a.help} (default: the checkpoint's generation_config.json, else {fallback})"
    if "max_seq_len" in values:
        actions["max_seq_len"].default = values["max_seq_len"]


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """p.parse_args with the checkpoint's sampling defaults (when add_sampling_args was used)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if p.get_default("_checkpoint_defaults"):
        checkpoint_defaults(p, argv)
    args = p.parse_args(argv)
    args.__dict__.pop("_checkpoint_defaults", None)
    return args


def set_help(p: argparse.ArgumentParser, dest: str, text: str, default=None) -> None:
    """Reword a shared flag's help (and default) for one script."""
    for a in p._actions:
        if a.dest == dest:
            a.help, a.default = text, default if default is not None else a.default


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.frequency_penalty,
                          args.presence_penalty, args.logit_bias, args.min_p)


def set_threads(args: argparse.Namespace) -> int:
    """Apply --threads (or the automatic choice) to torch's CPU thread pool; returns the count in use."""
    import torch
    n = args.threads or (None if os.environ.get("OMP_NUM_THREADS") else auto_threads())
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def speculation(args: argparse.Namespace) -> Optional[str]:
    """The speculative decoding the flags ask for: --speculate's, or "draft" when --draft_ckpt is given (None: off).
    A contradiction is a one-line ValueError."""
    if args.draft_ckpt is None:
        if args.speculate == "draft":
            raise ValueError("--speculate draft needs --draft_ckpt DIR (the draft model's checkpoint)")
        return args.speculate
    if args.speculate not in (None, "draft"):
        raise ValueError(f"--draft_ckpt drafts with a model; drop it or --speculate {args.speculate}")
    return "draft"


def engine_config(args: argparse.Namespace, loaded=None, **fields) -> EngineConfig:
    """The EngineConfig the flags describe (seed, compile, speculative decoding, prefill chunk), plus fields;
    loaded (load_from_args') supplies the tensor-parallel group and the draft model."""
    return EngineConfig(seed=args.seed, compile=args.compile, speculate=speculation(args),
                        draft_tokens=args.draft_tokens, prefill_chunk=args.prefill_chunk,
                        prefill_step=args.prefill_step,
                        process_group=None if loaded is None else loaded.tp_group,
                        draft_model=None if loaded is None else loaded.draft, **fields)


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


def context_limit(args: argparse.Namespace, model, default: Optional[int] = None) -> int:
    """--max_seq_len checked against the model's context (default: `default`, else all of it; dynamic NTK may go
    past it)."""
    limit = args.max_seq_len or default or model.args.max_seq_len
    if limit > model.args.max_seq_len and not runs_past_context(model.args.rope_scaling):
        raise ValueError(f"--max_seq_len {limit} exceeds the model's context of {model.args.max_seq_len} tokens")
    if args.max_new_tokens is not None and args.max_new_tokens >= limit:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} must be below --max_seq_len {limit}")
    return limit


def load_from_args(args: argparse.Namespace, log=None, merge_adapter: bool = True, adapters: Optional[list] = None):
    """loading.load_for_inference with what add_model_args parsed (CPU threads set first), and --draft_ckpt's model
    as loaded.draft; `adapters`, (name, dir) pairs, replaces --adapter's (the server names them for the API)."""
    from ..inference.loading import LoadOptions, load_draft, load_for_inference
    draft = speculation(args) == "draft"  # flag contradictions fail here, before any model loads
    if draft and not Path(args.draft_ckpt).is_dir():
        raise FileNotFoundError(f"--draft_ckpt {args.draft_ckpt} is not a directory")
    if draft and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--draft_ckpt cannot be combined with tensor parallelism (run a single process)")
    ckpt, tokenizer = resolve_checkpoint(args)
    set_threads(args)
    options = LoadOptions(tokenizer=tokenizer, adapter=dict((args.adapter if adapters is None else adapters) or {}), quantize=args.quantize,
                          dtype=args.dtype, device=args.device, chat_format=args.chat_format,
                          merge_adapter=merge_adapter, rope_theta=args.rope_theta, rope_scaling=args.rope_scaling,
                          max_seq_len=args.max_seq_len)
    loaded = load_for_inference(ckpt, options, log=log)
    if draft:
        try:
            loaded.draft = load_draft(args.draft_ckpt, loaded, log=log)
        except ValueError as e:
            raise ValueError(f"--draft_ckpt {e}") from None
    return loaded

"""The training scripts' flags (train/sft.py, train/dpo.py): the parser, config files (.toml/.json/.yaml) whose keys
are flag names, the run's saved flags picked up by --resume, and `train_config`, which turns the resolved flags into
the typed TrainConfig the trainer takes (minillama/training/config.py). `parse_args` returns the resolved flags;
nothing changes them afterwards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..util.cli import DEFAULT_CKPT, ArgumentParser, dehyphenate, fraction, nonnegative_float, nonnegative_int, positive_float, positive_int, recipe_file, unit_fraction
from .flags import add_rope_args, set_help
from ..util.dtypes import DTYPE_NAMES
from ..util.files import read_json
from ..lora.layers import TRAINABLE_MODULES
from ..lora.peft import read_adapter_config
from ..rope import check_rope_scaling
from ..training.config import DataConfig, GenerationEvalConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig

# flags a resumed run re-derives instead of taking them from OUT/config.json
NOT_RESUMED = {"help", "config", "resume", "overwrite", "out", "micro_batch_size", "stop_at_step"}
# keys of runs saved before a flag was renamed (OUT/config.json, --config files) -> today's name
RENAMED = {"model": "ckpt"}
DEMO_DATA = recipe_file("train", "data", "reviews.jsonl")
DEMO_EVAL_DATA = recipe_file("train", "data", "reviews_eval.jsonl")  # held-out reviews for the demo's eval curve
DEMO_EVAL_EVERY = 4
DEMO_EVAL_GENERATE = 6  # the demo's held-out prompts, all answered at each eval
DEMO_REWARD = "minillama.training.rewards:format_reward"  # the demo's generation score: the review headings


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = ArgumentParser(description=description)
    p.add_argument("--config", help="a .toml/.json/.yaml file whose keys are flag names; CLI flags override it")
    p.add_argument("--ckpt", "--model", dest="ckpt", default=str(DEFAULT_CKPT),
                   help="checkpoint dir (HF or Meta layout) to fine-tune")
    p.add_argument("--data", default=str(DEMO_DATA), help="training JSONL")
    p.add_argument("--eval_data", default=None,
                   help="JSONL for the eval loss (default: train/data/reviews_eval.jsonl when --data is the "
                        "demo's, else none)")
    p.add_argument("--eval_every", type=nonnegative_int, default=None,
                   help=f"eval every N steps, 0: only at the end (default: {DEMO_EVAL_EVERY} for the demo's eval "
                        "data, else 0)")
    p.add_argument("--out", default="out/sft", help="output dir")
    p.add_argument("--eval_generate", type=nonnegative_int, default=None,
                   help="at each eval, answer the first N --eval_data prompts greedily and score the answers "
                        "(exact match with the reference, --eval_regex, --reward); samples in OUT/samples/ "
                        f"(default: {DEMO_EVAL_GENERATE} for the demo's eval data, scored by --reward {DEMO_REWARD}; "
                        "else 0)")
    p.add_argument("--eval_max_new_tokens", type=positive_int, default=128, help="--eval_generate: answer length cap")
    p.add_argument("--eval_regex", default=None, help="--eval_generate: score gen/regex, the fraction of answers the "
                                                      "regular expression matches (re.search)")
    p.add_argument("--reward", default=None, help="--eval_generate: score gen/reward with pkg.module:function, "
                                                  "called as f(prompt=, completion=, reference=, **line fields), "
                                                  "or a reward model's dir (train/dpo.py --loss reward's final/)")
    # schedule
    p.add_argument("--max_steps", type=nonnegative_int, default=0,
                   help="optimizer steps; 0 = --epochs passes over the data")
    p.add_argument("--epochs", type=positive_int, default=3, help="passes over the data when --max_steps is 0")
    p.add_argument("--batch_size", type=positive_int, default=8,
                   help="global batch in rows (all ranks, all micro-steps)")
    p.add_argument("--micro_batch_size", type=nonnegative_int, default=0,
                   help="rows per forward per rank; 0 = no accumulation")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: 1e-3 LoRA, 2e-5 full)")
    p.add_argument("--warmup_steps", type=nonnegative_int, default=2, help="steps of linear warmup to --lr")
    p.add_argument("--min_lr_ratio", type=fraction, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--weight_decay", type=nonnegative_float, default=0.1, help="on matrices only (not norms/biases)")
    p.add_argument("--betas", type=unit_fraction, nargs=2, default=(0.9, 0.95), help="AdamW beta1 beta2")
    p.add_argument("--grad_clip", type=nonnegative_float, default=1.0, help="max global grad norm (0: off)")
    # data
    p.add_argument("--seq_len", type=positive_int, default=8192, help="max tokens per row (packed) or per sample")
    p.add_argument("--pack", action="store_true", help="pack whole samples into rows of --seq_len (with doc_ids)")
    p.add_argument("--drop_long", action="store_true", help="drop samples longer than --seq_len instead of cutting")
    p.add_argument("--loss_chunk", type=positive_int, default=1024, help="positions per chunk of the output projection")
    # context
    p.add_argument("--max_seq_len", type=positive_int, default=None,
                   help="the model's context to record (default: the checkpoint's, or what --rope_scaling derives)")
    add_rope_args(p)
    # what is trained
    p.add_argument("--lora_rank", type=nonnegative_int, default=16, help="0 = full fine-tuning")
    p.add_argument("--lora_alpha", type=positive_float, default=32.0, help="LoRA scaling is alpha / rank")
    p.add_argument("--init_adapter", default=None,
                   help="start the LoRA adapter from this PEFT adapter dir (e.g. an SFT run's OUT/final) instead of "
                        "B = 0; its r, lora_alpha and DoRA must equal --lora_rank, --lora_alpha, --use_dora. A frozen "
                        "copy of it is the reference of DPO/KTO/GRPO (the starting policy, as TRL's ref_adapter_name)")
    p.add_argument("--lora_dropout", type=unit_fraction, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lora_targets", nargs="+", default=["all-linear"],
                   help="PEFT names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head experts "
                        "router, or all-linear")
    p.add_argument("--trainable", nargs="+", choices=TRAINABLE_MODULES, default=[],
                   help="whole modules trained beside LoRA (LongLoRA: embed norm), saved as PEFT modules_to_save")
    p.add_argument("--use_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA, PEFT's use_dora): adds a trainable magnitude per output row; "
                        "not for Mixtral experts (target attention/router)")
    p.add_argument("--lora_plus_ratio", type=float, default=0.0,
                   help="LoRA+: the B factors learn at this times --lr (LoRA+ paper: 16; LLaMA-Factory's "
                        "loraplus_lr_ratio); 0 = off")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="QLoRA: NF4 base weights (needs --lora_rank; implied by a --ckpt saved with minillama-convert "
                        "--quantize nf4)")
    p.add_argument("--router_aux_loss_coef", type=nonnegative_float, default=0.02,
                   help="Mixtral load-balancing loss weight")
    # systems
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="compute dtype (default bfloat16 on cuda, float32 on cpu); master weights stay float32")
    p.add_argument("--master_dtype", choices=["float32", "bfloat16"], default="float32",
                   help="full fine-tuning: float32 keeps fp32 master weights and AdamW moments (16 bytes per "
                        "parameter with its gradient); bfloat16 keeps weights, gradients and moments in bf16 (8 "
                        "bytes) and rounds each update stochastically so small steps are not lost. Costs accuracy: "
                        "a bf16 weight holds ~3 significant digits, so the loss curve drifts from fp32 master's; "
                        "measured on a tiny model over 50 steps: within 0.003 (lr 1e-4) / 0.01 (lr 1e-3) of its "
                        "loss of ~5, where round-to-nearest bf16 is 0.39 / 0.08 off (tests/test_master_bf16.py)")
    p.add_argument("--activation_checkpointing", action="store_true", help="recompute each block in backward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block's training forward (one compile serves every block: "
                        "inductor's C++ on CPU, Triton on GPU; the first steps take longer while it compiles, and a "
                        "new row length compiles once more). Generation during training stays eager")
    p.add_argument("--context_parallel", type=positive_int, default=1,
                   help="split every row's sequence over this many processes (all-gathered K/V, load-balanced "
                        "chunks); the processes are then context x data parallel")
    p.add_argument("--cpu_offload", action="store_true", help="FSDP2 CPUOffloadPolicy: params/grads/optimizer on CPU")
    p.add_argument("--peak_tflops", type=positive_float, default=None, help="for MFU (default: the device's bf16 peak)")
    p.add_argument("--seed", type=int, default=0, help="data order, LoRA init and dropout")
    # checkpoints
    p.add_argument("--save_every", type=nonnegative_int, default=0,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=nonnegative_int, default=2, help="keep the last N step_* checkpoints (0: all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT/latest (no value) or a given OUT/step_N dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in a non-empty --out, removing the previous run's outputs there")
    p.add_argument("--stop_at_step", type=nonnegative_int, default=0,
                   help="save and exit after this step, as on SIGTERM")
    p.add_argument("--log_every", type=positive_int, default=10,
                   help="progress line every N steps when stderr is no tty")
    return p


def read_config_file(path: str) -> dict:
    """Flag values from a .toml, .json or .yaml/.yml file (a mapping; nesting too deep to parse is an error)."""
    try:
        values = _read_config_file(path)
    except RecursionError:
        raise ValueError(f"--config {path}: nested too deeply to read") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    return values


def _read_config_file(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {file} does not exist")
    if file.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {file}: not valid TOML ({e})") from None
    if file.suffix == ".json":
        return read_json(file, "--config")
    if file.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {file}: YAML needs PyYAML (pip install pyyaml); or use .toml/.json") from None
        values = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--config {file}: expected a mapping of flag names to values")
        return values
    raise ValueError(f"--config {file}: expected a .toml, .json, .yaml or .yml file")


def parse_args(argv=None, description: str = "", extend=None, default_lr=(1e-3, 2e-5)) -> argparse.Namespace:
    """The resolved flags: defaults < OUT/config.json (with --resume) < --config file < the command line.

    extend(parser) adds a recipe's own flags (train/dpo.py); default_lr: --lr for (LoRA, full) when not given."""
    parser = build_parser(description)
    lora_lr, full_lr = (f"{x:.0e}".replace("e-0", "e-") for x in default_lr)  # 1e-3
    set_help(parser, "lr", f"peak learning rate (default: {lora_lr} LoRA, {full_lr} full)")
    if extend is not None:
        extend(parser)
    pre = ArgumentParser(add_help=False, prog=parser.prog)
    pre.add_argument("--config")
    pre.add_argument("--out", default=parser.get_default("out"))
    pre.add_argument("--resume", nargs="?", const="latest", default=None)
    known, _ = pre.parse_known_args(dehyphenate(argv if argv is not None else sys.argv[1:]))
    saved = Path(known.out) / "config.json"
    if known.resume and not known.config and saved.is_file():
        # resuming picks up the run's own flags (model, data, lr, ...); flags given now still win. Batch splitting
        # is re-derived for the current process count (the loss does not depend on it).
        values = {RENAMED.get(k, k): v for k, v in read_json(saved, "the run's saved flags").items()}
        valid = {a.dest for a in parser._actions} - NOT_RESUMED
        parser.set_defaults(**{k: v for k, v in values.items() if k in valid})
    if known.config:
        values = {RENAMED.get(k, k): v for k, v in
                  ((k.replace("-", "_"), v) for k, v in read_config_file(known.config).items())}
        valid = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"--config {known.config}: unknown keys {unknown}; valid keys: {', '.join(sorted(valid))}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    recheck_values(parser, args, known.config or (str(saved) if known.resume else ""))
    if args.eval_data is None and Path(args.data).resolve() == DEMO_DATA.resolve():
        args.eval_data = str(DEMO_EVAL_DATA)  # the demo run draws a train and an eval curve
    demo_eval = args.eval_data == str(DEMO_EVAL_DATA)
    if args.eval_every is None:
        args.eval_every = DEMO_EVAL_EVERY if demo_eval else 0
    if args.eval_generate is None:
        args.eval_generate = DEMO_EVAL_GENERATE if demo_eval else 0
        if demo_eval and args.reward is None and args.eval_regex is None:
            args.reward = DEMO_REWARD
    if args.lr is None:
        args.lr = default_lr[0] if args.lora_rank > 0 else default_lr[1]
    check_saved_quantization(parser, args)
    if args.quantize and args.lora_rank <= 0:
        parser.error("--quantize nf4 trains LoRA adapters on a frozen NF4 base: give --lora_rank > 0")
    if args.trainable and args.lora_rank <= 0:
        parser.error("--trainable adds whole modules to LoRA training; full fine-tuning (--lora_rank 0) trains all")
    if args.rope_scaling is not None:  # a config file's or a resumed run's value skipped the argparse type
        try:
            args.rope_scaling = check_rope_scaling(args.rope_scaling, "--rope_scaling")
        except ValueError as e:
            parser.error(str(e))
    if args.init_adapter is not None:
        check_init_adapter(parser, args)
    if (args.use_dora or args.lora_plus_ratio) and args.lora_rank <= 0:
        parser.error("--use_dora / --lora_plus_ratio shape a LoRA adapter: give --lora_rank > 0")
    if args.lora_plus_ratio < 0:
        parser.error(f"--lora_plus_ratio {args.lora_plus_ratio} must be >= 0 (0 = off)")
    if args.master_dtype == "bfloat16":
        if args.lora_rank > 0:
            parser.error("--master_dtype bfloat16 is for full fine-tuning (--lora_rank 0); LoRA factors are small "
                         "and stay float32")
        if args.dtype not in (None, "bfloat16", "bf16"):
            parser.error(f"--master_dtype bfloat16 computes in bfloat16; --dtype {args.dtype} contradicts it")
        args.dtype = "bfloat16"
    return args


def check_init_adapter(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--init_adapter names a PEFT adapter whose shape is the one this run trains (checked before loading a model)."""
    if args.lora_rank <= 0:
        parser.error("--init_adapter starts a LoRA adapter: give --lora_rank > 0 (full fine-tuning: merge it first "
                     "with minillama-merge)")
    try:
        cfg = read_adapter_config(args.init_adapter)
    except (OSError, ValueError) as e:
        parser.error(f"--init_adapter: {e}")
    dora = bool(cfg.get("use_dora", False))
    if (cfg["r"], float(cfg["lora_alpha"]), dora) != (args.lora_rank, float(args.lora_alpha), bool(args.use_dora)):
        parser.error(f"--init_adapter {args.init_adapter} has r={cfg['r']}, lora_alpha={cfg['lora_alpha']:g}"
                     f"{', DoRA' if dora else ''}: give --lora_rank {cfg['r']} --lora_alpha {cfg['lora_alpha']:g}"
                     f"{' --use_dora' if dora else ''} (got --lora_rank {args.lora_rank} --lora_alpha "
                     f"{args.lora_alpha:g}{' --use_dora' if args.use_dora else ''})")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        parser.error(f"--init_adapter {args.init_adapter}: per-module ranks (rank_pattern/alpha_pattern) cannot "
                     "start a run; merge it first with minillama-merge")


def check_saved_quantization(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A --ckpt saved quantized (minillama-convert --quantize): NF4 is QLoRA's base as it would be quantized on load,
    so the run trains on it as --quantize nf4; int8/int4 are for inference only (their kernels have no backward)."""
    from ..checkpoints.quantized import is_quantized_dir, read_quant_config
    if not is_quantized_dir(Path(args.ckpt)):
        return
    try:
        saved = read_quant_config(Path(args.ckpt))["quantize"]
    except (OSError, ValueError) as e:
        parser.error(f"--ckpt: {e}")
    if saved != "nf4":
        parser.error(f"--ckpt {args.ckpt} holds {saved} weights saved for inference (minillama-convert --quantize); "
                     "train from the float checkpoint it was made from, or save it with --quantize nf4 for QLoRA")
    if args.quantize is None:
        args.quantize = "nf4"  # the base is NF4 as saved: the run is QLoRA


def recheck_values(parser: argparse.ArgumentParser, args: argparse.Namespace, source: str) -> None:
    """Values from a config file or OUT/config.json skip argparse's type= checks: run them now (parser.error names
    the flag and the file)."""
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if value is None or action.dest == "help":
            continue
        flag = action.option_strings[0] if action.option_strings else action.dest
        where = f" (from {source})" if source else ""
        switch = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
        several = not switch and (action.nargs in ("+", "*") or isinstance(action.nargs, int))
        if switch and not isinstance(value, bool):  # {"overwrite": "false"} is not false: refuse it
            parser.error(f"argument {flag}: {value!r}{where} is not true or false")
        if several and not isinstance(value, (list, tuple)):
            parser.error(f"argument {flag}: {value!r}{where} is not a list")
        if switch or (action.type is None and not action.choices):
            items = value if several else [value]
            if not switch and action.nargs != "?" and not all(isinstance(v, str) for v in items):
                parser.error(f"argument {flag}: {value!r}{where} is not a string" + (" list" if several else ""))
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if action.choices and v not in action.choices:
                parser.error(f"argument {action.option_strings[0]}: {v!r} from {source} is not one of "
                             f"{', '.join(map(str, action.choices))}")
            if action.type is None:
                continue
            if isinstance(v, bool) and action.type is not bool:
                parser.error(f"argument {action.option_strings[0]}: {v!r} from {source} is not a number")
            try:
                action.type(json.dumps(v) if isinstance(v, dict) else str(v))  # a JSON flag's value is a dict here
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"argument {action.option_strings[0]}: {e}" + (f" (from {source})" if source else ""))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The resolved flags as the trainer's typed config (the Namespace stops here)."""
    a = args
    model = ModelConfig(ckpt=a.ckpt, dtype=a.dtype, master_dtype=a.master_dtype, quantize=a.quantize,
                        max_seq_len=a.max_seq_len, rope_theta=a.rope_theta, rope_scaling=a.rope_scaling,
                        activation_checkpointing=a.activation_checkpointing, compile=a.compile,
                        cpu_offload=a.cpu_offload, loss_chunk=a.loss_chunk, router_aux_loss_coef=a.router_aux_loss_coef)
    lora = LoraConfig(rank=a.lora_rank, alpha=a.lora_alpha, dropout=a.lora_dropout, targets=tuple(a.lora_targets),
                      modules_to_save=tuple(a.trainable), use_dora=a.use_dora, plus_ratio=a.lora_plus_ratio,
                      init_adapter=a.init_adapter)
    optim = OptimConfig(lr=a.lr, warmup_steps=a.warmup_steps, min_lr_ratio=a.min_lr_ratio,
                        weight_decay=a.weight_decay, betas=tuple(a.betas), grad_clip=a.grad_clip)
    data = DataConfig(data=a.data, eval_data=a.eval_data or None, seq_len=a.seq_len, pack=a.pack,
                      drop_long=a.drop_long, batch_size=a.batch_size, micro_batch_size=a.micro_batch_size)
    generation = GenerationEvalConfig(n=a.eval_generate, max_new_tokens=a.eval_max_new_tokens, regex=a.eval_regex,
                                      reward=a.reward)
    return TrainConfig(out=a.out, model=model, lora=lora, optim=optim, data=data, generation=generation,
                       max_steps=a.max_steps,
                       epochs=a.epochs, eval_every=a.eval_every, save_every=a.save_every, keep=a.keep,
                       resume=a.resume, overwrite=a.overwrite, stop_at_step=a.stop_at_step, log_every=a.log_every,
                       seed=a.seed, device=a.device, context_parallel=a.context_parallel,
                       peak_tflops=a.peak_tflops, flags=dict(vars(a)))

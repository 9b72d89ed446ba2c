"""train/sft.py's flags: the parser, config files (.toml/.json/.yaml) whose keys are flag names, and the run's
saved flags picked up by --resume. `parse_args` returns the resolved flags; nothing changes them afterwards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli import HelpFormatter, REPO
from ..dtypes import DTYPE_NAMES
from ..files import read_json

# flags a resumed run re-derives instead of taking them from OUT/config.json
NOT_RESUMED = {"help", "config", "resume", "out", "micro_batch_size", "stop_at_step"}


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    p.add_argument("--config", help="a .toml/.json/.yaml file whose keys are flag names; CLI flags override it")
    p.add_argument("--model", default=str(REPO / "weights" / "smollm2-135m-instruct"),
                   help="checkpoint dir (HF or Meta) that minillama.load_model reads")
    p.add_argument("--data", default=str(REPO / "train" / "data" / "reviews.jsonl"), help="training JSONL")
    p.add_argument("--eval_data", default=None, help="JSONL for the eval loss")
    p.add_argument("--eval_every", type=int, default=0, help="eval every N steps (0: only at the end)")
    p.add_argument("--out", default="out/sft", help="output dir")
    # schedule
    p.add_argument("--max_steps", type=int, default=0, help="optimizer steps; 0 = --epochs passes over the data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8, help="global batch in rows (all ranks, all micro-steps)")
    p.add_argument("--micro_batch_size", type=int, default=0, help="rows per forward per rank; 0 = no accumulation")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 LoRA, 2e-5 full)")
    p.add_argument("--warmup_steps", type=int, default=2)
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    p.add_argument("--weight_decay", type=float, default=0.1, help="on matrices only (not norms/biases)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm (0: off)")
    # data
    p.add_argument("--seq_len", type=int, default=8192, help="max tokens per row (packed) or per sample")
    p.add_argument("--pack", action="store_true", help="pack whole samples into rows of --seq_len (with doc_ids)")
    p.add_argument("--drop_long", action="store_true", help="drop samples longer than --seq_len instead of cutting")
    p.add_argument("--loss_chunk", type=int, default=1024, help="positions per chunk of the output projection")
    # what is trained
    p.add_argument("--lora_rank", type=int, default=16, help="0 = full fine-tuning")
    p.add_argument("--lora_alpha", type=float, default=32.0)
    p.add_argument("--lora_dropout", type=float, default=0.0)
    p.add_argument("--lora_targets", nargs="+", default=["all-linear"],
                   help="PEFT names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head experts "
                        "router, or all-linear")
    p.add_argument("--use_dora", action="store_true",
                   help="DoRA (weight-decomposed LoRA, PEFT's use_dora): adds a trainable magnitude per output row; "
                        "not for Mixtral experts (target attention/router)")
    p.add_argument("--lora_plus_ratio", type=float, default=0.0,
                   help="LoRA+: the B factors learn at this times --lr (LoRA+ paper: 16; LLaMA-Factory's "
                        "loraplus_lr_ratio); 0 = off")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: NF4 base weights (needs --lora_rank)")
    p.add_argument("--router_aux_loss_coef", type=float, default=0.02, help="Mixtral load-balancing loss weight")
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
    p.add_argument("--cpu_offload", action="store_true", help="FSDP2 CPUOffloadPolicy: params/grads/optimizer on CPU")
    p.add_argument("--peak_tflops", type=float, default=None, help="for MFU (default: the device's bf16 peak)")
    p.add_argument("--seed", type=int, default=0)
    # checkpoints
    p.add_argument("--save_every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--keep", type=int, default=2, help="keep the last N step_* checkpoints (0: all)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from OUT/latest (no value) or a given OUT/step_N dir")
    p.add_argument("--stop_at_step", type=int, default=0, help="save and exit after this step, as on SIGTERM")
    p.add_argument("--log_every", type=int, default=10, help="progress line every N steps when stderr is no tty")
    return p


def read_config_file(path: str) -> dict:
    """Flag values from a .toml, .json or .yaml/.yml file."""
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
    if extend is not None:
        extend(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--out", default=parser.get_default("out"))
    pre.add_argument("--resume", nargs="?", const="latest", default=None)
    known, _ = pre.parse_known_args(argv)
    saved = Path(known.out) / "config.json"
    if known.resume and not known.config and saved.is_file():
        # resuming picks up the run's own flags (model, data, lr, ...); flags given now still win. Batch splitting
        # is re-derived for the current process count (the loss does not depend on it).
        values = read_json(saved, "the run's saved flags")
        valid = {a.dest for a in parser._actions} - NOT_RESUMED
        parser.set_defaults(**{k: v for k, v in values.items() if k in valid})
    if known.config:
        values = {k.replace("-", "_"): v for k, v in read_config_file(known.config).items()}
        valid = {a.dest for a in parser._actions} - {"help", "config"}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"--config {known.config}: unknown keys {unknown}; valid keys: {', '.join(sorted(valid))}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = default_lr[0] if args.lora_rank > 0 else default_lr[1]
    if args.quantize and args.lora_rank <= 0:
        parser.error("--quantize nf4 trains LoRA adapters on a frozen NF4 base: give --lora_rank > 0")
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


def saved_flags(args: argparse.Namespace, **resolved) -> str:
    """OUT/config.json: every flag as resolved, plus what the run derived (world size, steps, dtype)."""
    return json.dumps({**vars(args), **resolved}, indent=2) + "\n"

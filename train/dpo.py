"""Preference tuning with FSDP2: DPO against a frozen reference, or reference-free ORPO; LoRA, QLoRA or full.

    torchrun --nproc_per_node 1 train/dpo.py                        # the demo: LoRA DPO on SmolLM2, see README
    torchrun --nproc_per_node 8 train/dpo.py --ckpt Llama-3.1-8B-Instruct/ --data pairs.jsonl --pack --seq_len 4096
    torchrun --nproc_per_node 2 train/dpo.py --loss orpo --orpo_lambda 0.1 --lora_rank 0 --lr 5e-6   # full ORPO
    torchrun ... train/dpo.py --out OUT --resume                    # continue exactly (flags from OUT/config.json)

Data: JSONL pairs {"prompt" | "messages", "chosen", "rejected"} or {"chosen": [messages], "rejected": [messages]}
(minillama/training/preference_data.py). Each pair's chosen and rejected answers sit side by side in one row as two
documents (doc_ids keep attention inside each); --pack puts several whole pairs in a row of --seq_len.
--batch_size counts rows (pairs, unless packed) over all processes and micro-steps.

Losses (minillama/training/preference.py, TRL's formulas): DPO's sigmoid loss with --beta and optional
--label_smoothing (conservative DPO); the reference is the base model with the adapters switched off (LoRA, QLoRA:
no second copy of the model) or, for full fine-tuning, the starting model's log-probs computed in a first pass and
kept in OUT/reference_logps.json (so --resume still has them). ORPO: the SFT loss on the chosen answers minus
--orpo_lambda x mean log sigmoid(log odds ratio), no reference. Each step logs loss, rewards/chosen,
rewards/rejected, rewards/margins, rewards/accuracies, logps/* (and ORPO's nll_loss, log_odds_*) to metrics.jsonl;
--eval_data gets the same metrics at step 0, every --eval_every steps and at the end ("pref_accuracy": the
fraction of pairs whose chosen answer has the higher mean token log-prob). Outputs as train/sft.py: config.json,
metrics.jsonl, loss.png, step_N/, latest, final/ (a PEFT adapter, or an HF model for full fine-tuning).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.util.cli import REPO, run as run_cli  # noqa: E402
from minillama.util.files import read_json, write_json  # noqa: E402
from minillama.training import config  # noqa: E402
from minillama.training.build import build_model, load_data, pad_id_of  # noqa: E402
from minillama.training.loop import BatchSplit, Schedule  # noqa: E402
from minillama.training.loss import SequenceLogprobs  # noqa: E402
from minillama.training.optim import lr_at  # noqa: E402
from minillama.training.preference import PrefConfig, preference_eval, preference_step, reference_logps  # noqa: E402
from minillama.training.preference_data import load_pairs, pair_fingerprint  # noqa: E402
from minillama.training.session import (RunCore, Stop, core_fields, export, maybe_save, open_run,  # noqa: E402
                                        restore_state, run_recipe, start_log, stop_on_nonfinite, stopped)

REFERENCE_FILE = "reference_logps.json"


def add_preference_args(p) -> None:
    """train/dpo.py's own flags and defaults on top of train/sft.py's."""
    g = p.add_argument_group("preference tuning")
    g.add_argument("--loss", choices=["dpo", "orpo"], default="dpo", help="DPO (with a reference) or ORPO")
    g.add_argument("--beta", type=float, default=0.1, help="DPO: the KL strength beta of the sigmoid loss")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="DPO: assumed fraction of flipped labels (conservative DPO), in [0, 0.5)")
    g.add_argument("--orpo_lambda", type=float, default=0.1, help="ORPO: weight of the odds-ratio term")
    p.set_defaults(data=str(REPO / "train" / "data" / "preferences.jsonl"),
                   eval_data=str(REPO / "train" / "data" / "preferences_eval.jsonl"), out="out/dpo", epochs=1,
                   batch_size=8, seq_len=1024, warmup_steps=2, weight_decay=0.0)


def parse_args(argv=None):
    args = config.parse_args(argv, description=__doc__, extend=add_preference_args, default_lr=(2e-4, 5e-7))
    if not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing {args.label_smoothing} must be in [0, 0.5)")
    if args.loss == "orpo" and args.label_smoothing:
        raise ValueError("--label_smoothing is DPO's; ORPO has no reference labels to smooth")
    if args.beta <= 0 or args.orpo_lambda < 0:
        raise ValueError(f"--beta {args.beta} must be > 0 and --orpo_lambda {args.orpo_lambda} >= 0")
    return args


def main(argv=None) -> int:
    return run_recipe(train, parse_args(argv))


@dataclass(kw_only=True)
class Run(RunCore):
    """Everything the loop touches; built once by start_run."""

    cfg: PrefConfig
    pairs: list
    eval_pairs: object
    ref: dict  # "train"/"eval" -> (n, 2) reference log-probs (full fine-tuning DPO), else empty
    pad_id: int


def train(args) -> int:
    """The recipe: data, model, reference, optional resume, the step loop, final checkpoint + export."""
    run = start_run(args)
    if run.eval_pairs and run.state.step == 0:
        run_eval(run, 0)  # where the held-out preference accuracy starts
    while run.state.step < run.total_steps:
        batch = run.schedule.next_batch(run.state)
        lr = lr_at(run.state.step + 1, args.lr, args.warmup_steps, run.total_steps, args.min_lr_ratio)
        result = preference_step(run.root, run.model, run.optimizer, run.trainable, run.pairs, batch, run.split,
                                 run.info.rank, run.info.device, lr, run.pad_id, args.grad_clip, run.aux_coef,
                                 run.cfg, run.ref.get("train"), Stop.requested)
        if not result.finite:
            return stop_on_nonfinite(run, result)
        run.state.advance(result.tokens)
        run.log.step(run.state.step, run.state.epoch, result)
        step = run.state.step
        if run.eval_pairs and args.eval_every and step % args.eval_every == 0 and step < run.total_steps:
            run_eval(run, step)
        stop = result.stop_requested or step == args.stop_at_step
        maybe_save(run, stop)
        if stop:
            return stopped(run)
    finish(run)
    return 0


def start_run(args) -> Run:
    """Process group, pairs, model + optimizer, the reference, and the state: fresh or restored from --resume."""
    out = Path(args.out)
    info, compute_dtype, msg, resume_from = open_run(args)  # --out and --resume checked before any loading
    cfg = PrefConfig(args.loss, args.beta, args.label_smoothing, args.orpo_lambda)
    tok, pairs, eval_pairs = load_data(args, msg, load=load_pairs, what=("pairs", "eval pairs"))
    split = BatchSplit.make(args.batch_size, info.world_size, args.micro_batch_size)
    schedule = Schedule([len(p) for p in pairs], args.batch_size, args.seq_len, args.pack, args.seed)
    total_steps = schedule.total_steps(args.max_steps, args.epochs)
    msg.message(f"batches: {len(schedule.plan(0))} per epoch of {args.batch_size} rows "
                f"({'packed pairs' if args.pack else 'one pair per row'}, {info.world_size} processes x "
                f"{split.accumulation} micro-steps of {split.micro_batch_size} rows); {total_steps} steps; "
                f"{args.loss.upper()}")
    model, root, optimizer = build_model(args, info, compute_dtype, msg, wrap=SequenceLogprobs)
    pad_id = pad_id_of(tok)
    ref = {}
    if cfg.loss == "dpo" and args.lora_rank <= 0:  # full fine-tuning: the starting model's, before any step or resume
        ref = reference_tables(args, root, pairs, eval_pairs, split, info, pad_id, out, resume_from is not None, msg)
    state = restore_state(args, resume_from, root, optimizer, info, msg)
    log = start_log(args, info, split, total_steps, compute_dtype, model, state, resume_from is not None)
    return Run(**core_fields(args, info, model, root, optimizer, split, schedule, total_steps, state, log, resume_from),
               cfg=cfg, pairs=pairs, eval_pairs=eval_pairs, ref=ref, pad_id=pad_id)


def reference_tables(args, root, pairs, eval_pairs, split, info, pad_id, out: Path, resuming: bool, log) -> dict:
    """Full fine-tuning DPO: the starting model's log-probs of every pair, computed once and kept in OUT."""
    file = out / REFERENCE_FILE
    sets = {"train": pairs, **({"eval": eval_pairs} if eval_pairs else {})}
    if file.is_file():
        saved = read_json(file, "the run's reference log-probs")
        if all(saved.get(f"{k}_lengths") == pair_fingerprint(v) for k, v in sets.items()):
            log.message(f"reference log-probs from {file}")
            return {k: torch.tensor(saved[k], dtype=torch.float64) for k in sets}
        if resuming:
            raise ValueError(f"{file} was computed for other data than --data/--eval_data now give; resume with the "
                             "run's own data")
    elif resuming:
        raise FileNotFoundError(f"{file} is missing: the reference of a full fine-tuning DPO run is the starting "
                                "model, which a resumed run no longer has")
    log.message(f"reference log-probs: one pass over {sum(len(v) for v in sets.values())} pairs")
    tables = {k: reference_logps(root, v, split, args.seq_len, info.rank, info.device, pad_id) for k, v in sets.items()}
    if info.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(file, {**{k: t.tolist() for k, t in tables.items()},
                          **{f"{k}_lengths": pair_fingerprint(v) for k, v in sets.items()}})
    return tables


def run_eval(run: Run, step: int, final: bool = False) -> None:
    m = preference_eval(run.root, run.model, run.eval_pairs, run.split, run.args.seq_len, run.args.pack,
                        run.info.rank, run.info.device, run.pad_id, run.cfg, run.ref.get("eval"))
    run.log.eval(step, m.pop("loss"), final=final, extra=m)


def finish(run: Run) -> None:
    """Final eval, then the last checkpoint, final/ (PEFT adapter or HF model) and the loss curve."""
    if run.eval_pairs:
        run_eval(run, run.state.step, final=True)
    export(run)


if __name__ == "__main__":
    sys.exit(run_cli(main))

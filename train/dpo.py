"""Preference tuning with FSDP2: DPO, IPO, KTO against a frozen reference, or reference-free SimPO, ORPO; LoRA, QLoRA
or full fine-tuning; and Bradley-Terry reward models (--loss reward).

    torchrun --nproc_per_node 1 train/dpo.py                        # the demo: LoRA DPO on SmolLM2, see README
    torchrun --nproc_per_node 8 train/dpo.py --ckpt Llama-3.1-8B-Instruct/ --data pairs.jsonl --pack --seq_len 4096
    torchrun --nproc_per_node 2 train/dpo.py --loss orpo --orpo_lambda 0.1 --lora_rank 0 --lr 5e-6   # full ORPO
    torchrun --nproc_per_node 1 train/dpo.py --loss kto --data unpaired.jsonl   # {"prompt", "completion", "label"}
    torchrun --nproc_per_node 1 train/dpo.py --loss simpo --beta 2.0 --simpo_gamma 1.0  # SimPO, reference-free
    torchrun --nproc_per_node 1 train/dpo.py --loss reward --out out/rm   # a reward model: --reward out/rm/final
    torchrun ... train/dpo.py --out OUT --resume                    # continue exactly (flags from OUT/config.json)

Data: JSONL pairs {"prompt" | "messages", "chosen", "rejected"} or {"chosen": [messages], "rejected": [messages]}
(minillama/training/preference_data.py). Each pair's chosen and rejected answers sit side by side in one row as two
documents (doc_ids keep attention inside each); --pack puts several whole pairs in a row of --seq_len.
--batch_size counts rows (pairs, unless packed) over all processes and micro-steps. KTO takes unpaired lines
{"prompt", "completion", "label": true|false} (a pair line gives two: chosen desirable, rejected not; see
minillama/training/kto.py).

Losses (TRL's formulas; minillama/training/preference.py, kto.py), chosen by --loss:
  dpo    the sigmoid loss with --beta and optional --label_smoothing (conservative DPO), against a reference
  ipo    (delta - 1/(2 beta))^2, delta the difference of the log-ratios averaged per answer token (TRL's DPO "ipo")
  simpo  reference-free: -log sig(beta (mean logp(chosen) - mean logp(rejected)) - --simpo_gamma), plus
         --cpo_alpha x NLL of the chosen answers (TRL's CPO "simpo")
  orpo   the SFT loss on the chosen answers minus --orpo_lambda x mean log sigmoid(log odds ratio), no reference
  kto    unpaired: 1 - sig(beta (r - z0)) for desirable, 1 - sig(beta (z0 - r)) for undesirable completions
         (--desirable_weight / --undesirable_weight), z0 the batch's KL estimate (TRL's KTOTrainer)
  reward a Bradley-Terry reward model, not a policy: a scalar head (HF's sequence classifier `score`) on each
         answer's last token, -log sig(r_c - r_r) [+ --center_rewards x (r_c + r_r)^2] (TRL's RewardTrainer);
         LoRA only; final/ is a PEFT SEQ_CLS adapter holding the head, which --reward DIR scores with
         (minillama/training/reward_model.py); rewards/* are the scores
The reference (dpo, ipo, kto) is the base model with the adapters switched off (LoRA, QLoRA: no second copy of the
model) or, for full fine-tuning, the starting model's log-probs computed in a first pass and kept in
OUT/reference_logps.json (so --resume still has them). Each step logs loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/* (ORPO's nll_loss, log_odds_*; SimPO's nll_loss; KTO's kl) to
metrics.jsonl; --eval_data gets the same metrics at step 0, every --eval_every steps and at the end
("pref_accuracy": the fraction of pairs whose chosen answer has the higher mean token log-prob). Outputs as
train/sft.py: config.json, metrics.jsonl, loss.png, step_N/, latest, final/ (a PEFT adapter, or an HF model for
full fine-tuning).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from minillama.util.cli import REPO, run as run_cli  # noqa: E402
from minillama.util.files import read_json, write_json  # noqa: E402
from minillama.tools import train_flags  # noqa: E402
from minillama.training.build import build_model, load_data, pad_id_of  # noqa: E402
from minillama.training.config import TrainConfig  # noqa: E402
from minillama.training.generation_eval import GenerationEval  # noqa: E402
from minillama.training.loss import SequenceLogprobs  # noqa: E402
from minillama.training.kto import KTO, load_examples  # noqa: E402
from minillama.training.preference import LOSSES, PrefConfig, Preference, reference_logps  # noqa: E402
from minillama.training.preference_data import load_pairs, pair_fingerprint  # noqa: E402
from minillama.training.reward_model import RewardScores  # noqa: E402
from minillama.training.schedule import BatchSplit, Schedule  # noqa: E402
from minillama.training.session import (Opened, Run, open_run, save, start_run, stop_on_nonfinite,  # noqa: E402
                                        training_session)
from minillama.training.trainer import (clip_gradients, eval_due, evaluate, finish, log_step,  # noqa: E402
                                        save_due, steps)

REFERENCE_FILE = "reference_logps.json"


def add_preference_args(p) -> None:
    """train/dpo.py's own flags and defaults on top of train/sft.py's."""
    g = p.add_argument_group("preference tuning")
    g.add_argument("--loss", choices=LOSSES, default="dpo",
                   help="dpo, ipo (with a reference), simpo, orpo (reference-free), kto (unpaired completions), "
                        "reward (a Bradley-Terry reward model: a scalar head, LoRA)")
    g.add_argument("--beta", type=float, default=0.1,
                   help="the strength beta: DPO/KTO's KL weight, IPO's regularisation (its target margin is "
                        "1/(2 beta)), SimPO's reward scale (its paper uses 2 to 2.5)")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="DPO, SimPO: assumed fraction of flipped labels (conservative DPO), in [0, 0.5)")
    g.add_argument("--orpo_lambda", type=float, default=0.1, help="ORPO: weight of the odds-ratio term")
    g.add_argument("--simpo_gamma", type=float, default=0.5, help="SimPO: the target reward margin gamma")
    g.add_argument("--cpo_alpha", type=float, default=0.0,
                   help="SimPO: weight of the chosen answers' NLL added to the loss (TRL's CPO term; 0: SimPO)")
    g.add_argument("--desirable_weight", type=float, default=1.0, help="KTO: weight of desirable examples' losses")
    g.add_argument("--undesirable_weight", type=float, default=1.0,
                   help="KTO: weight of undesirable examples' losses (KTO's paper: keep w_d n_d / (w_u n_u) in "
                        "[1, 4/3])")
    g.add_argument("--center_rewards", type=float, default=0.0,
                   help="reward: weight of the mean squared sum of a pair's scores, which keeps them centred on 0 "
                        "(TRL's center_rewards_coefficient; 0: off)")
    p.set_defaults(data=str(REPO / "train" / "data" / "preferences.jsonl"),
                   eval_data=str(REPO / "train" / "data" / "preferences_eval.jsonl"), out="out/dpo", epochs=1,
                   batch_size=8, seq_len=1024, warmup_steps=2, weight_decay=0.0)


def parse_args(argv=None):
    args = train_flags.parse_args(argv, description=__doc__, extend=add_preference_args, default_lr=(2e-4, 5e-7))
    if not 0.0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label_smoothing {args.label_smoothing} must be in [0, 0.5)")
    if args.loss == "orpo" and args.label_smoothing:
        raise ValueError("--label_smoothing is DPO's; ORPO has no reference labels to smooth")
    if args.label_smoothing and args.loss not in ("dpo", "simpo"):
        raise ValueError(f"--label_smoothing is DPO's and SimPO's, not {args.loss.upper()}'s")
    if args.beta <= 0 or args.orpo_lambda < 0:
        raise ValueError(f"--beta {args.beta} must be > 0 and --orpo_lambda {args.orpo_lambda} >= 0")
    if min(args.cpo_alpha, args.desirable_weight, args.undesirable_weight) < 0:
        raise ValueError("--cpo_alpha, --desirable_weight and --undesirable_weight must be >= 0")
    if args.loss == "reward" and args.lora_rank == 0:
        raise ValueError("--loss reward trains LoRA adapters and the score head (give --lora_rank > 0); a full "
                         "fine-tuned reward model is not supported")
    if args.loss == "reward" and args.eval_generate:
        raise ValueError("--eval_generate scores a policy's answers; a reward model (--loss reward) generates none")
    if args.center_rewards and args.loss != "reward":
        raise ValueError("--center_rewards is the reward model's (--loss reward)")
    if args.center_rewards < 0:
        raise ValueError(f"--center_rewards {args.center_rewards} must be >= 0")
    if args.context_parallel != 1:
        raise ValueError("--context_parallel is train/sft.py's; preference rows are not split over processes")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = train_flags.train_config(args)
    pref = PrefConfig(loss=args.loss, beta=args.beta, label_smoothing=args.label_smoothing,
                      orpo_lambda=args.orpo_lambda, simpo_gamma=args.simpo_gamma, cpo_alpha=args.cpo_alpha,
                      desirable_weight=args.desirable_weight, undesirable_weight=args.undesirable_weight,
                      center_rewards=args.center_rewards)
    with training_session() as stop:  # SIGTERM: the step in flight finishes, a checkpoint is saved, exit 0
        run, recipe = setup(cfg, pref, stop)
        if recipe.has_eval and run.state.step == 0:
            run.log.eval(0, recipe.evaluate(run.root))  # where the held-out preference accuracy starts
        for step in steps(run, recipe):  # the next global batch of pair rows, its lr set
            for mb in step.micro_batches():
                out = recipe.forward(run.root, mb, step.counts)  # forward: policy (and reference) log-probs -> loss
                out.loss.backward()
                step.add(out)
            grad_norm = clip_gradients(run.trainable, cfg.optim.grad_clip)
            result = step.result(grad_norm)  # every rank's sums -> the step's loss, rewards, accuracies
            if not result.finite:
                return stop_on_nonfinite(run, result.loss, result.grad_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            log_step(run, step, result)
            if eval_due(run):
                evaluate(run, recipe)  # the held-out loss; with --eval_generate, answers generated and scored
            if save_due(run):  # every --save_every, and at the first boundary after a SIGTERM
                save(run)
        return finish(run, recipe)  # final eval, the last checkpoint, final/ and loss.png (or: stopped)


def setup(cfg: TrainConfig, pref: PrefConfig, stop) -> tuple[Run, Preference | KTO]:
    """Process group, pairs (KTO: examples), model + optimizer, the reference, and the state: fresh or restored."""
    opened = open_run(cfg, stop)  # --out and --resume checked before any loading
    info, d, msg = opened.info, cfg.data, opened.log
    kto = pref.loss == "kto"
    data = load_data(cfg, msg, load=load_examples if kto else load_pairs,
                     what=("examples", "eval examples") if kto else ("pairs", "eval pairs"))
    generation = GenerationEval.build(cfg.generation, d.eval_data, data.tok)  # --eval_generate's prompts
    split = BatchSplit.make(d.batch_size, info.world_size, d.micro_batch_size)
    schedule = Schedule([len(p) for p in data.train], d.batch_size, d.seq_len, d.pack, cfg.seed)
    what = "example (beside its mismatched completion)" if kto else "pair"
    msg.message(f"batches: {len(schedule.plan(0))} per epoch of {d.batch_size} rows "
                f"({f'packed {what}s' if d.pack else f'one {what} per row'}, {info.world_size} processes x "
                f"{split.accumulation} micro-steps of {split.micro_batch_size} rows); "
                f"{schedule.total_steps(cfg.max_steps, cfg.epochs)} steps; {pref.loss.upper()}")
    parts = build_model(cfg, info, opened.compute_dtype, msg,
                        wrap=RewardScores if pref.loss == "reward" else SequenceLogprobs)
    shared = dict(cfg=pref, split=split, model=parts.model, device=info.device, pad_id=pad_id_of(data.tok),
                  seq_len=d.seq_len, pack=d.pack, dp_rank=info.rank)
    recipe = (KTO(examples=data.train, eval_examples=data.eval, **shared) if kto else
              Preference(pairs=data.train, eval_pairs=data.eval, **shared))
    if pref.uses_reference and not cfg.lora.enabled:  # full fine-tuning: the starting model's, before any resume
        recipe.ref = reference_tables(cfg, opened, parts.root, recipe)
    run = start_run(cfg, opened, parts, split, schedule)
    run.generation = generation
    recipe.aux_coef = run.aux_coef
    return run, recipe


def reference_tables(cfg: TrainConfig, opened: Opened, root, recipe: Preference | KTO) -> dict:
    """Full fine-tuning DPO/IPO/KTO: the starting model's log-probs of every pair (KTO: of every example and its
    mismatched completion), computed once and kept in OUT."""
    out, info, log = Path(cfg.out), opened.info, opened.log
    file = out / REFERENCE_FILE
    sets = {"train": recipe.pairs, **({"eval": recipe.eval_pairs} if recipe.eval_pairs else {})}
    resuming = opened.resume_from is not None
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
    tables = {k: reference_logps(root, v, recipe.split, cfg.data.seq_len, info.rank, info.device, recipe.pad_id)
              for k, v in sets.items()}
    if info.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(file, {**{k: t.tolist() for k, t in tables.items()},
                          **{f"{k}_lengths": pair_fingerprint(v) for k, v in sets.items()}})
    return tables


if __name__ == "__main__":
    sys.exit(run_cli(main))

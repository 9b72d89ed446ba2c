"""DPO and ORPO: the losses on sequence log-probs (TRL's formulas), one optimizer step over a global batch of pair
rows, the held-out metrics, and the frozen reference's log-probs.

DPO (Rafailov et al. 2023), sigmoid loss with label smoothing eps (conservative DPO; TRL's "sigmoid" up to 0.x,
its "sigmoid" today when eps = 0): with log pi(y) the sum of the answer's token log-probs,
    delta = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)),  loss = -(1 - eps) log sig(beta delta) - eps log sig(-beta delta)
rewards/chosen = beta (log pi(c) - log ref(c)), rewards/rejected likewise, margins = their difference, accuracies =
the fraction with chosen > rejected; pref_accuracy = the fraction of pairs whose chosen answer has the higher
mean token log-prob (meaningful before the first step too, unlike the rewards, which start at 0). The reference: with LoRA the same model with its adapters switched off
(no second copy); with full fine-tuning, log-probs computed once before the first step (reference_logps).
ORPO (Hong et al. 2024), reference-free, as TRL's ORPOTrainer: with lc, lr the per-token mean log-probs,
    log_odds = (lc - lr) - (log(1 - e^lc) - log(1 - e^lr)),  loss = NLL(chosen) - lambda * mean log sig(log_odds)
NLL is the SFT loss on the chosen answers (mean over their tokens in the global batch; TRL's ORPOTrainer also
counts the prompt's tokens); rewards = lambda * lc / lambda * lr. Losses are means over the pairs of the whole
global batch (all ranks, all micro-batches), so they do not depend on the number of processes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..lora.layers import set_lora_enabled
from .loop import BatchSplit, StepResult, clip_gradients, finish_step
from .optim import set_lr
from .packing import plan_epoch
from .preference_data import Pair, collate_pairs

# metric sums per step, in this order: summed over micro-batches and ranks, then divided by the pair count
SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
        "pref_accuracy", "nll", "log_odds_ratio", "log_odds_chosen")


@dataclass
class PrefConfig:
    loss: str  # "dpo" | "orpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    orpo_lambda: float = 0.1


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss and rewards from summed log-probs of policy (pc, pr) and reference (rc, rr). (n,) x3"""
    delta = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(lc, lr, orpo_lambda: float):
    """Per-pair lambda * log sig(log_odds) (subtracted from the NLL), rewards, and the log odds, from per-token mean
    log-probs lc, lr. (n,) x4"""
    lc, lr = lc.float(), lr.float()
    log_odds = (lc - lr) - (log1mexp(lc) - log1mexp(lr))
    return (orpo_lambda * F.logsigmoid(log_odds), orpo_lambda * lc.detach(), orpo_lambda * lr.detach(),
            log_odds.detach())


def _to(mb, device):
    return [t.to(device) for t in (mb.tokens, mb.targets, mb.doc_ids, mb.doc_index, mb.real)]


def _doc_tokens(doc_index: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Learned tokens per document. (n_docs,)"""
    flat = doc_index.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=n_docs).float()


def _pair_terms(cfg: PrefConfig, sums, n_tok, ref, global_pairs: float, global_chosen_tokens: float):
    """(the micro-batch's share of the objective, its metric sums in SUMS order) from per-document log-prob sums."""
    pc, pr = sums[0::2], sums[1::2]
    z = pc.new_zeros(())
    if cfg.loss == "dpo":
        losses, cr, rr = dpo_loss(pc, pr, ref[0::2], ref[1::2], cfg.beta, cfg.label_smoothing)
        objective = losses.sum() / global_pairs
        extra = (z, z, z)
    else:
        lc, lr = pc / n_tok[0::2].clamp(min=1), pr / n_tok[1::2].clamp(min=1)
        terms, cr, rr, log_odds = orpo_loss(lc, lr, cfg.orpo_lambda)
        nll = -pc.sum()
        objective = nll / global_chosen_tokens - terms.sum() / global_pairs
        losses = -terms  # the per-pair part; the NLL is reported on its own
        extra = (nll.detach(), (terms / cfg.orpo_lambda).detach().sum(), log_odds.sum())
    mean_c, mean_r = pc.detach() / n_tok[0::2].clamp(min=1), pr.detach() / n_tok[1::2].clamp(min=1)
    metrics = [losses.detach().sum(), cr.sum(), rr.sum(), (cr > rr).float().sum(), pc.detach().sum(),
               pr.detach().sum(), (mean_c > mean_r).float().sum(), *extra]
    return objective, metrics


@torch.no_grad()
def _reference(root, model, args, n_docs: int, ref_table, pair_ids, lora_ref: bool, device):
    """The reference's log-prob sum per document: adapters off (LoRA), or looked up (precomputed). (n_docs,)"""
    if not lora_ref:
        return ref_table[torch.tensor(pair_ids, dtype=torch.long)].reshape(-1).to(device=device, dtype=torch.float32)
    set_lora_enabled(model, False)
    try:
        return root(*args[:4], n_docs, args[4])[0]
    finally:
        set_lora_enabled(model, True)


def _micro_batches(pairs, rows, split: BatchSplit, pad_id):
    micro = split.micro_batch_size
    for m in range(0, len(rows), micro):
        yield collate_pairs(pairs, rows[m:m + micro], pad_id)


def preference_step(root, model, optimizer, trainable: list, pairs: list[Pair], batch: list, split: BatchSplit,
                    rank: int, device, lr: float, pad_id: int, grad_clip: float, aux_coef: float, cfg: PrefConfig,
                    ref_table: Optional[torch.Tensor], stop_requested: bool) -> StepResult:
    """Forward/backward over the global batch of pair rows, clip, and (if finite) one optimizer step."""
    t0 = time.perf_counter()
    rows = split.rank_rows(batch, rank)
    mine = [i for r in rows for i in r]
    counts = torch.tensor([len(mine), sum(pairs[i].chosen.n_targets() for i in mine)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(counts)  # the loss is a mean over the global batch's pairs (and chosen tokens): count first
    g_pairs, g_tokens = counts.clamp(min=1).tolist()
    set_lr(optimizer, lr)
    totals = torch.zeros(len(SUMS) + 5, dtype=torch.float64)  # + aux, real tokens, padded, doc_len^2, stop
    aux_scale = 1.0 / (split.accumulation * split.world_size)
    for mb in _micro_batches(pairs, rows, split, pad_id):
        args, n_docs = _to(mb, device), 2 * mb.n_pairs
        ref = None if cfg.loss == "orpo" else _reference(root, model, args, n_docs, ref_table, mb.pair_ids,
                                                           ref_table is None, device)
        sums, aux, anchor = root(*args[:4], n_docs, args[4])
        objective, metrics = _pair_terms(cfg, sums, _doc_tokens(args[3], n_docs), ref, g_pairs, g_tokens)
        (objective + aux_coef * aux * aux_scale + anchor).backward()
        totals[:len(SUMS)] += torch.stack([m.double().cpu() for m in metrics])
        totals[len(SUMS):len(SUMS) + 4] += torch.tensor([aux.item(), mb.n_real, mb.tokens.numel(),
                                                         sum(n * n for n in mb.doc_lengths)], dtype=torch.float64)
    totals[-1] = float(stop_requested)
    totals = totals.to(device)
    dist.all_reduce(totals)
    totals = totals.cpu()
    grad_norm = clip_gradients(trainable, grad_clip)
    extra = summarize(totals[:len(SUMS)], counts[0].item(), counts[1].item(), cfg)
    n = len(SUMS)
    result = StepResult(extra.pop("loss"), grad_norm, lr, int(totals[n + 1]), int(totals[n + 2]),
                        float(totals[n + 3]), float(totals[n]) / (split.accumulation * split.world_size),
                        bool(totals[n + 4] > 0), 0.0, extra=extra)
    return finish_step(result, optimizer, device, t0)


def summarize(sums: torch.Tensor, n_pairs: float, n_chosen_tokens: float, cfg: PrefConfig) -> dict:
    """Metric sums -> the step's means (loss first). ORPO's loss is NLL - lambda * mean log sig(log_odds)."""
    mean = {k: float(v) / max(n_pairs, 1) for k, v in zip(SUMS, sums)}
    out = {"loss": mean["loss"]}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
              "pref_accuracy"):
        out[k] = mean[k]
    out["rewards/margins"] = mean["rewards/chosen"] - mean["rewards/rejected"]
    if cfg.loss == "orpo":
        nll = float(sums[SUMS.index("nll")]) / max(n_chosen_tokens, 1)
        out.update({"nll_loss": nll, "log_odds_ratio": mean["log_odds_ratio"],
                    "log_odds_chosen": mean["log_odds_chosen"]})
        out["loss"] = nll + mean["loss"]
    return out


def _eval_rows(pairs: list[Pair], split: BatchSplit, seq_len: int, pack: bool) -> list:
    return plan_epoch([len(p) for p in pairs], split.batch_size, seq_len, pack, 0, 0)


@torch.no_grad()
def preference_eval(root, model, pairs: list[Pair], split: BatchSplit, seq_len: int, pack: bool, rank: int, device,
                    pad_id: int, cfg: PrefConfig, ref_table: Optional[torch.Tensor]) -> dict:
    """The preference metrics over the whole held-out set (every rank takes its share of each batch)."""
    root.eval()
    sums = torch.zeros(len(SUMS) + 2, dtype=torch.float64, device=device)
    for batch in _eval_rows(pairs, split, seq_len, pack):
        rows = split.rank_rows(batch, rank)
        for mb in _micro_batches(pairs, rows, split, pad_id):  # empty ones too: FSDP's collectives must match
            args, n_docs = _to(mb, device), 2 * mb.n_pairs
            ref = None if cfg.loss == "orpo" else _reference(root, model, args, n_docs, ref_table, mb.pair_ids,
                                                               ref_table is None, device)
            s = root(*args[:4], n_docs, args[4])[0]
            _, metrics = _pair_terms(cfg, s, _doc_tokens(args[3], n_docs), ref, 1.0, 1.0)
            sums[:len(SUMS)] += torch.stack(metrics).double()
            sums[len(SUMS):] += torch.tensor([mb.n_pairs, sum(pairs[i].chosen.n_targets() for i in mb.pair_ids)],
                                             dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    root.train()
    return summarize(sums[:len(SUMS)].cpu(), sums[-2].item(), sums[-1].item(), cfg)


@torch.no_grad()
def reference_logps(root, pairs: list[Pair], split: BatchSplit, seq_len: int, rank: int, device,
                    pad_id: int) -> torch.Tensor:
    """The current model's summed answer log-probs for every pair, (n, 2) float64 on every rank: the frozen
    reference of full fine-tuning, computed once before the first step (packed rows, no dropout)."""
    root.eval()
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    for batch in _eval_rows(pairs, split, seq_len, True):
        for mb in _micro_batches(pairs, split.rank_rows(batch, rank), split, pad_id):
            args = _to(mb, device)
            s = root(*args[:4], 2 * mb.n_pairs, args[4])[0]
            table[torch.tensor(mb.pair_ids, dtype=torch.long, device=device)] = s.view(-1, 2).double()
    dist.all_reduce(table)
    root.train()
    return table.cpu()

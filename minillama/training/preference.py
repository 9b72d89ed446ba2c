"""DPO, IPO, SimPO and ORPO: the losses on sequence log-probs (TRL's formulas), the recipe train/dpo.py plugs into the
trainer (count, micro-batches, forward, summarize, evaluate over pair rows), and the frozen reference's log-probs.
(KTO, on unpaired completions, is kto.py; a reward model's Bradley-Terry loss on its scalar head, reward_model.py.)

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
counts the prompt's tokens); rewards = lambda * lc / lambda * lr.
IPO (Azar et al. 2023), as TRL's DPOTrainer "ipo": delta as DPO's but with each log-ratio averaged over its answer's
tokens, loss = (delta - 1/(2 beta))^2; rewards as DPO's.
SimPO (Meng et al. 2024), reference-free, as TRL's CPOTrainer "simpo": with lc, lr the per-token mean log-probs,
    loss = -(1 - eps) log sig(beta (lc - lr) - gamma) - eps log sig(-(beta (lc - lr) - gamma))  [+ cpo_alpha NLL]
rewards = beta lc / beta lr, and logps/* are the per-token means (as TRL logs them).
Losses are means over the pairs of the whole global batch (all ranks, all micro-batches), so they do not depend on
the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..lora.layers import reference_policy
from .packing import plan_epoch
from .preference_data import Pair, PairBatch, collate_pairs
from .reward_model import reward_loss
from .schedule import BatchSplit
from .trainer import Forward


LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto", "reward")
REFERENCE_FREE = ("simpo", "orpo", "reward")


@dataclass
class PrefConfig:
    loss: str  # one of LOSSES
    beta: float = 0.1
    label_smoothing: float = 0.0  # DPO, SimPO
    orpo_lambda: float = 0.1
    simpo_gamma: float = 0.5  # SimPO's target margin (TRL's CPOConfig default)
    cpo_alpha: float = 0.0  # SimPO: weight of the NLL of the chosen answers (TRL's CPO term; 0 = SimPO paper)
    desirable_weight: float = 1.0  # KTO: weight of the losses of desirable (label true) completions
    undesirable_weight: float = 1.0  # KTO: of undesirable ones
    center_rewards: float = 0.0  # reward: weight of mean (r_c + r_r)^2 (TRL's center_rewards_coefficient)

    @property
    def uses_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


def dpo_loss(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss and rewards from summed log-probs of policy (pc, pr) and reference (rc, rr). (n,) x3"""
    delta = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def ipo_loss(pc, pr, rc, rr, n_c, n_r, beta: float):
    """Per-pair IPO loss, as TRL's DPOTrainer "ipo": the log-ratios averaged per answer token, then
    (delta - 1 / (2 beta))^2; rewards beta (log pi - log ref) of the sums, as DPO's. (n,) x3"""
    delta = (pc - rc) / n_c.clamp(min=1) - (pr - rr) / n_r.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def simpo_loss(lc, lr, beta: float, gamma: float, label_smoothing: float = 0.0):
    """Per-pair SimPO loss, reference-free, from per-token mean log-probs lc, lr (TRL's CPO "simpo"):
    logits = (lc - lr) - gamma / beta, loss = -(1 - eps) log sig(beta logits) - eps log sig(-beta logits);
    rewards beta lc, beta lr. (n,) x3"""
    logits = (lc - lr) - gamma / beta
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * logits) - label_smoothing * F.logsigmoid(-beta * logits)
    return losses, beta * lc.detach(), beta * lr.detach()


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


def _inputs(mb: PairBatch, device) -> dict:
    """SequenceLogprobs keyword arguments of a micro-batch."""
    return dict(tokens=mb.tokens.to(device), targets=mb.targets.to(device), doc_ids=mb.doc_ids.to(device),
                doc_index=mb.doc_index.to(device), n_docs=2 * mb.n_pairs, real=mb.real.to(device))


@torch.no_grad()
def reference_doc_logps(root, model, inputs: dict, mb: PairBatch, table: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference's log-prob sum per document of a micro-batch: looked up in a precomputed (n, 2) table (full
    fine-tuning), else the model as its reference policy (LoRA: the starting adapter or none; no second copy). (n_docs,)"""
    if table is not None:
        ids = torch.tensor(mb.pair_ids, dtype=torch.long)
        return table[ids].reshape(-1).to(device=inputs["tokens"].device, dtype=torch.float32)
    with reference_policy(model):
        return root(**inputs)[0]


def _doc_tokens(doc_index: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Learned tokens per document. (n_docs,)"""
    flat = doc_index.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=n_docs).float()


def _pair_terms(cfg: PrefConfig, sums, n_tok, ref, global_pairs: float, global_chosen_tokens: float):
    """(the micro-batch's share of the objective, its metric sums by name) from per-document log-prob sums
    (chosen at even, rejected at odd positions), their learned-token counts and the reference's sums."""
    pc, pr = sums[0::2], sums[1::2]
    n_c, n_r = n_tok[0::2], n_tok[1::2]
    z = pc.new_zeros(())
    nll, odds_term, log_odds = z, z, z
    logps_c, logps_r = pc.detach(), pr.detach()  # the logps/* metrics: sums (TRL's DPO), means (its SimPO)
    if cfg.loss == "reward":  # sums are the reward head's scores (reward_model.RewardScores)
        losses, cr, rr = reward_loss(pc, pr, cfg.center_rewards), pc.detach(), pr.detach()
        objective = losses.sum() / global_pairs
        logps_c, logps_r = pc.new_zeros(pc.shape), pr.new_zeros(pr.shape)
    elif cfg.loss in ("dpo", "ipo"):
        if cfg.loss == "dpo":
            losses, cr, rr = dpo_loss(pc, pr, ref[0::2], ref[1::2], cfg.beta, cfg.label_smoothing)
        else:
            losses, cr, rr = ipo_loss(pc, pr, ref[0::2], ref[1::2], n_c, n_r, cfg.beta)
        objective = losses.sum() / global_pairs
    elif cfg.loss == "simpo":
        lc, lr = pc / n_c.clamp(min=1), pr / n_r.clamp(min=1)
        losses, cr, rr = simpo_loss(lc, lr, cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
        nll = -pc.sum()
        objective = losses.sum() / global_pairs + cfg.cpo_alpha * nll / global_chosen_tokens
        nll, logps_c, logps_r = nll.detach(), lc.detach(), lr.detach()
    else:
        lc, lr = pc / n_tok[0::2].clamp(min=1), pr / n_tok[1::2].clamp(min=1)
        terms, cr, rr, log_odds = orpo_loss(lc, lr, cfg.orpo_lambda)
        nll = -pc.sum()
        objective = nll / global_chosen_tokens - terms.sum() / global_pairs
        losses = -terms  # the per-pair part; the NLL is reported on its own
        nll, odds_term, log_odds = nll.detach(), (terms / cfg.orpo_lambda).detach().sum(), log_odds.sum()
    mean_c, mean_r = pc.detach() / n_tok[0::2].clamp(min=1), pr.detach() / n_tok[1::2].clamp(min=1)
    if cfg.loss == "reward":  # the scores themselves say which answer the model prefers
        mean_c, mean_r = cr, rr
    metrics = {"loss": losses.detach().sum(), "rewards/chosen": cr.sum(), "rewards/rejected": rr.sum(),
               "rewards/accuracies": (cr > rr).float().sum(), "logps/chosen": logps_c.sum(),
               "logps/rejected": logps_r.sum(), "pref_accuracy": (mean_c > mean_r).float().sum(), "nll": nll,
               "log_odds_ratio": odds_term, "log_odds_chosen": log_odds}
    return objective, {k: float(v) for k, v in metrics.items()}


def summarize(sums: dict, n_pairs: float, n_chosen_tokens: float, cfg: PrefConfig) -> dict:
    """Metric sums (by name, over all pairs) -> the means (loss first). ORPO's loss is NLL - lambda * mean log
    sig(log_odds); SimPO's adds cpo_alpha x NLL (TRL's CPO: nll_loss is 0 when cpo_alpha is)."""
    mean = {k: float(v) / max(n_pairs, 1) for k, v in sums.items()}
    out = {"loss": mean["loss"]}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
              "pref_accuracy"):
        if not (cfg.loss == "reward" and k.startswith("logps/")):  # a reward model computes no log-probs
            out[k] = mean[k]
    out["rewards/margins"] = mean["rewards/chosen"] - mean["rewards/rejected"]
    if cfg.loss == "orpo":
        nll = float(sums["nll"]) / max(n_chosen_tokens, 1)
        out.update({"nll_loss": nll, "log_odds_ratio": mean["log_odds_ratio"],
                    "log_odds_chosen": mean["log_odds_chosen"]})
        out["loss"] = nll + mean["loss"]
    if cfg.loss == "simpo":
        nll = float(sums["nll"]) / max(n_chosen_tokens, 1) if cfg.cpo_alpha else 0.0
        out["nll_loss"] = nll
        out["loss"] = mean["loss"] + cfg.cpo_alpha * nll
    return out


@dataclass(kw_only=True)
class PairRecipe:
    """What the pair-row recipes (Preference here, KTO in kto.py) share: the loss, the batch split and the model."""

    cfg: PrefConfig
    split: BatchSplit
    model: torch.nn.Module  # the Transformer under the root (lora.reference_policy makes it the reference)
    device: torch.device
    pad_id: int
    seq_len: int
    pack: bool
    dp_rank: int = 0
    aux_coef: float = 0.0
    ref: dict = field(default_factory=dict)  # "train"/"eval" -> precomputed reference log-probs (full fine-tuning)


@dataclass(kw_only=True)
class Preference(PairRecipe):
    """Preference tuning on pair rows: what train/dpo.py plugs into the trainer (see trainer.Recipe).

    The reference of DPO: with LoRA the same model with its adapters switched off; with full fine-tuning the
    precomputed tables (ref["train"], ref["eval"]: (n, 2) summed log-probs, see reference_logps)."""

    pairs: list[Pair]
    eval_pairs: Optional[list[Pair]]

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_pairs)

    def count(self, root, rows: list) -> dict[str, float]:
        mine = [i for r in rows for i in r]
        return {"pairs": len(mine), "chosen_tokens": sum(self.pairs[i].chosen.n_targets() for i in mine)}

    def micro_batches(self, rows: list, pairs: Optional[list[Pair]] = None) -> Iterator[PairBatch]:
        micro = self.split.micro_batch_size
        for m in range(0, len(rows), micro):
            yield collate_pairs(pairs or self.pairs, rows[m:m + micro], self.pad_id)

    def _reference(self, root, inputs: dict, mb: PairBatch, table: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return reference_doc_logps(root, self.model, inputs, mb, table) if self.cfg.uses_reference else None

    def forward(self, root, mb: PairBatch, counts: dict[str, float]) -> Forward:
        inputs = _inputs(mb, self.device)
        ref = self._reference(root, inputs, mb, self.ref.get("train"))
        sums, aux, anchor = root(**inputs)
        g_pairs, g_tokens = max(counts["pairs"], 1), max(counts["chosen_tokens"], 1)
        objective, metrics = _pair_terms(self.cfg, sums, _doc_tokens(inputs["doc_index"], inputs["n_docs"]), ref,
                                         g_pairs, g_tokens)
        aux_scale = 1.0 / (self.split.accumulation * self.split.world_size)
        return Forward(loss=objective + self.aux_coef * aux * aux_scale + anchor,
                       sums={**metrics, "aux_loss": aux.item(), "tokens": mb.n_real, "padded": mb.tokens.numel(),
                             "doc_len_sq": sum(n * n for n in mb.doc_lengths)})

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        out = summarize(sums, counts["pairs"], counts["chosen_tokens"], self.cfg)
        out["aux_loss"] = sums["aux_loss"] / (self.split.accumulation * self.split.world_size)
        return out

    @torch.no_grad()
    def evaluate(self, root) -> dict[str, float]:
        """The preference metrics over the whole held-out set (every rank takes its share of each batch)."""
        root.eval()
        totals: dict[str, float] = {}
        pairs = self.eval_pairs
        for batch in _eval_rows(pairs, self.split, self.seq_len, self.pack):
            rows = self.split.rank_rows(batch, self.dp_rank)
            for mb in self.micro_batches(rows, pairs):  # empty ones too: FSDP's collectives must match
                inputs = _inputs(mb, self.device)
                ref = self._reference(root, inputs, mb, self.ref.get("eval"))
                s = root(**inputs)[0]
                _, metrics = _pair_terms(self.cfg, s, _doc_tokens(inputs["doc_index"], inputs["n_docs"]), ref, 1.0,
                                         1.0)
                metrics["pairs"] = mb.n_pairs
                metrics["chosen_tokens"] = sum(pairs[i].chosen.n_targets() for i in mb.pair_ids)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
        names = sorted(totals)
        t = torch.tensor([totals[k] for k in names], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        root.train()
        sums = dict(zip(names, t.tolist()))
        return summarize(sums, sums.pop("pairs"), sums.pop("chosen_tokens"), self.cfg)


def _eval_rows(pairs: list[Pair], split: BatchSplit, seq_len: int, pack: bool) -> list:
    return plan_epoch([len(p) for p in pairs], split.batch_size, seq_len, pack, 0, 0)


@torch.no_grad()
def reference_logps(root, pairs: list[Pair], split: BatchSplit, seq_len: int, rank: int, device,
                    pad_id: int) -> torch.Tensor:
    """The current model's summed answer log-probs for every pair, (n, 2) float64 on every rank: the frozen
    reference of full fine-tuning, computed once before the first step (packed rows, no dropout)."""
    root.eval()
    table = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    micro = split.micro_batch_size
    for batch in _eval_rows(pairs, split, seq_len, True):
        rows = split.rank_rows(batch, rank)
        for m in range(0, len(rows), micro):
            mb = collate_pairs(pairs, rows[m:m + micro], pad_id)
            s = root(**_inputs(mb, device))[0]
            table[torch.tensor(mb.pair_ids, dtype=torch.long, device=device)] = s.view(-1, 2).double()
    dist.all_reduce(table)
    root.train()
    return table.cpu()

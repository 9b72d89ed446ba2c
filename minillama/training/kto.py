"""KTO (Ethayarajh et al. 2024) on unpaired completions, as TRL's KTOTrainer computes it: the recipe train/dpo.py
--loss kto plugs into the trainer.

Data: JSONL lines {"prompt": str | [messages], "completion": answer, "label": true | false} (TRL's unpaired
preference shape; "messages" may stand for "prompt"); a preference pair line (train/dpo.py's shapes) gives two
examples, its chosen answer desirable and its rejected one not (TRL's unpair_preference_dataset).
With r = log pi(y|x) - log ref(y|x) (summed over the completion's tokens) and z0 the batch's KL estimate,
    desirable (label true):    loss = w_d (1 - sig(beta (r - z0)))
    undesirable (label false): loss = w_u (1 - sig(beta (z0 - r)))
averaged over the examples of the global batch. z0 = max(0, mean over the batch of log pi(y'|x) - log ref(y'|x)) for
mismatched completions y' (no gradient): TRL cycles completions by one within its batch; here example i's mismatched
completion is that of the nearest example before it from another line (wrapping around), so z0 depends neither on
how rows are split over processes nor on the batch order, and a full fine-tuning run can precompute its reference.
Each example sits in its rows beside its mismatched one as two documents (the pair machinery of preference_data:
chosen = the example, rejected = the mismatched completion). Metrics as TRL's: kl (z0), rewards/chosen and
logps/chosen (means over the desirable examples), rewards/rejected and logps/rejected (over the undesirable),
rewards/margins. A step costs three forwards per micro-batch: the KL pass without gradients (policy and reference,
before the first micro-batch, since z0 is a whole-batch quantity) and the policy with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from .data import DataStats, Sample, check_data_file, jsonl_records, nothing_usable
from .preference import PairRecipe, PrefConfig, _inputs, reference_doc_logps
from .preference_data import Pair, PairBatch, _answer, _messages, collate_pairs, to_pair, tokenize_pair
from .packing import plan_epoch
from .trainer import Forward, all_reduce_values


@dataclass
class Example:
    """An unpaired completion: the prompt with its completion (chosen slot) and with the previous example's
    completion (rejected slot: the mismatched pair of the KL estimate), and whether the completion is desirable."""

    pair: Pair
    desirable: bool

    def __len__(self) -> int:
        return len(self.pair)


def to_examples(record) -> tuple[str, list[tuple[list[dict], dict, bool]]]:
    """(shape, [(prompt messages, completion, label)]) of one line: one example, or two from a preference pair;
    ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" in record and "rejected" in record and "completion" not in record:
        _, prompt, chosen, rejected = to_pair(record)
        return "pair", [(prompt, chosen, True), (prompt, rejected, False)]
    key = "prompt" if "prompt" in record else "messages"
    if key not in record or "completion" not in record or "label" not in record:
        raise ValueError(f"a KTO example needs 'prompt', 'completion' and 'label' (keys here: {sorted(record)[:8]})")
    if not isinstance(record["label"], bool):
        raise ValueError(f"'label' must be true or false, not {record['label']!r}")
    label = record["label"]
    return "desirable" if label else "undesirable", [(_messages(record[key], key),
                                                       _answer(record["completion"], "completion"), label)]


def load_examples(path, tok, seq_len: int, drop_long: bool = False, flag: str = "--data") -> tuple[list[Example],
                                                                                                   DataStats]:
    """Read and tokenize a KTO JSONL; bad lines are skipped and listed in the stats. Each example is fitted to
    seq_len together with its mismatched pair (the previous usable line's completion)."""
    path = check_data_file(path, flag)
    stats, parsed = DataStats(path=str(path)), []
    for lineno, record in jsonl_records(path, stats):
        try:
            shape, found = to_examples(record)
        except (ValueError, KeyError, TypeError) as e:
            stats.bad.append((lineno, str(e)))
            continue
        stats.shapes[shape] = stats.shapes.get(shape, 0) + 1
        parsed += [(lineno, *x) for x in found]
    examples = []
    for i, (lineno, prompt, completion, label) in enumerate(parsed):
        mismatched = _other_line(parsed, i)[2]
        try:
            own, kl, how = tokenize_pair(tok, prompt, completion, mismatched, seq_len)
        except ValueError as e:
            stats.bad.append((lineno, str(e)))
            continue
        if how != "ok" and drop_long:
            stats.dropped_long += 1
            continue
        stats.prompt_cut += how == "prompt_cut"
        stats.answer_cut += how == "answer_cut"
        ex = Example(Pair(Sample(*own, lineno), Sample(*kl, lineno), lineno), label)
        if not ex.pair.chosen.n_targets() or not ex.pair.rejected.n_targets():
            stats.no_target += 1
            continue
        examples.append(ex)
        stats.tokens += len(ex)
        stats.target_tokens += ex.pair.chosen.n_targets()
    stats.samples = len(examples)
    if not examples:
        raise nothing_usable(flag, path, stats, "KTO examples")
    return examples, stats


def _other_line(parsed: list, i: int) -> tuple:
    """The nearest parsed example before i (wrapping around) from another line than i's (i's own if none)."""
    for k in range(1, len(parsed)):
        if parsed[i - k][0] != parsed[i][0]:
            return parsed[i - k]
    return parsed[i]


def kto_loss(logps, ref_logps, desirable, kl: torch.Tensor, cfg: PrefConfig):
    """Per-example weighted KTO losses and rewards beta (log pi - log ref). logps, ref_logps (n,), desirable (n,)
    bool, kl: the batch's (clamped) KL estimate z0."""
    r = logps - ref_logps
    chosen = 1 - torch.sigmoid(cfg.beta * (r - kl))
    rejected = 1 - torch.sigmoid(cfg.beta * (kl - r))
    losses = torch.where(desirable, cfg.desirable_weight * chosen, cfg.undesirable_weight * rejected)
    return losses, cfg.beta * r.detach()


def kto_terms(cfg: PrefConfig, logps, ref_logps, desirable, kl: float, global_examples: float):
    """(the micro-batch's share of the objective, its metric sums by name)."""
    kl_t = torch.tensor(kl, dtype=logps.dtype, device=logps.device)
    losses, rewards = kto_loss(logps, ref_logps, desirable, kl_t, cfg)
    d, u = desirable, ~desirable
    metrics = {"loss": losses.detach().sum(), "rewards/chosen": rewards[d].sum(), "rewards/rejected": rewards[u].sum(),
               "logps/chosen": logps.detach()[d].sum(), "logps/rejected": logps.detach()[u].sum(),
               "desirable": d.sum(), "undesirable": u.sum()}
    return losses.sum() / global_examples, {k: float(v) for k, v in metrics.items()}


def kto_summarize(sums: dict, n_examples: float, kl: float) -> dict:
    """Metric sums -> the means (loss first), as TRL logs them."""
    n_d, n_u = sums["desirable"], sums["undesirable"]
    out = {"loss": sums["loss"] / max(n_examples, 1), "kl": kl}
    if n_d:
        out["rewards/chosen"] = sums["rewards/chosen"] / n_d
        out["logps/chosen"] = sums["logps/chosen"] / n_d
    if n_u:
        out["rewards/rejected"] = sums["rewards/rejected"] / n_u
        out["logps/rejected"] = sums["logps/rejected"] / n_u
    if n_d and n_u:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


@dataclass(kw_only=True)
class KTO(PairRecipe):
    """KTO on unpaired examples: what train/dpo.py --loss kto plugs into the trainer (see trainer.Recipe).

    The reference: with LoRA the model with its adapters off; with full fine-tuning the precomputed tables
    (ref["train"] / ref["eval"]: (n, 2) summed log-probs of each example and of its mismatched pair)."""

    examples: list[Example]
    eval_examples: Optional[list[Example]]
    _ref_cache: dict = field(default_factory=dict)  # example -> reference log-prob, from this step's count

    def __post_init__(self):
        self.pairs = [e.pair for e in self.examples]  # (example, mismatched completion) rows, as DPO's pairs
        self.eval_pairs = [e.pair for e in self.eval_examples] if self.eval_examples else None

    @property
    def has_eval(self) -> bool:
        return bool(self.eval_examples)

    def micro_batches(self, rows: list, pairs: Optional[list[Pair]] = None) -> Iterator[PairBatch]:
        pairs = pairs or self.pairs
        micro = self.split.micro_batch_size
        for m in range(0, len(rows), micro):
            yield collate_pairs(pairs, rows[m:m + micro], self.pad_id)

    @torch.no_grad()
    def _kl_sums(self, root, rows: list, pairs: list[Pair], table) -> tuple[float, dict]:
        """This rank's sum of log pi - log ref over the mismatched completions of its rows, and each example's
        reference log-prob (kept for the forward with gradients)."""
        kl, ref = 0.0, {}
        for mb in self.micro_batches(rows, pairs):
            inputs = _inputs(mb, self.device)
            ref_docs = reference_doc_logps(root, self.model, inputs, mb, table)
            policy = root(**inputs)[0]
            kl += float((policy[1::2] - ref_docs[1::2]).sum())
            ref.update(zip(mb.pair_ids, ref_docs[0::2].tolist()))
        return kl, ref

    def count(self, root, rows: list) -> dict[str, float]:
        """The examples of this rank's rows and (a no-gradient pass over them) their KL sum."""
        n = sum(len(r) for r in rows)
        kl, self._ref_cache = self._kl_sums(root, rows, self.pairs, self.ref.get("train"))
        return {"examples": n, "kl_sum": kl}

    def forward(self, root, mb: PairBatch, counts: dict[str, float]) -> Forward:
        inputs = _inputs(mb, self.device)
        sums, aux, anchor = root(**inputs)
        ref_main = torch.tensor([self._ref_cache[i] for i in mb.pair_ids], dtype=torch.float32, device=self.device)
        desirable = torch.tensor([self.examples[i].desirable for i in mb.pair_ids], dtype=torch.bool,
                                 device=self.device)
        objective, metrics = kto_terms(self.cfg, sums[0::2], ref_main, desirable, kl_estimate(counts),
                                       max(counts["examples"], 1))
        # sums[1::2] (the mismatched completions) take no part in the loss: z0 carries no gradient
        aux_scale = 1.0 / (self.split.accumulation * self.split.world_size)
        return Forward(loss=objective + self.aux_coef * aux * aux_scale + anchor + sums[1::2].sum() * 0.0,
                       sums={**metrics, "aux_loss": aux.item(), "tokens": mb.n_real, "padded": mb.tokens.numel(),
                             "doc_len_sq": sum(n * n for n in mb.doc_lengths)})

    def summarize(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        out = kto_summarize(sums, counts["examples"], kl_estimate(counts))
        out["aux_loss"] = sums["aux_loss"] / (self.split.accumulation * self.split.world_size)
        return out

    @torch.no_grad()
    def evaluate(self, root) -> dict[str, float]:
        """The KTO metrics over the held-out set, each eval batch with its own KL estimate (as a training step)."""
        root.eval()
        examples, table = self.eval_examples, self.ref.get("eval")
        totals: dict[str, float] = {}
        weighted_kl = 0.0
        for batch in plan_epoch([len(e) for e in examples], self.split.batch_size, self.seq_len, self.pack, 0, 0):
            rows = self.split.rank_rows(batch, self.dp_rank)
            kl_sum, ref = self._kl_sums(root, rows, self.eval_pairs, table)
            counts = all_reduce_values({"examples": sum(len(r) for r in rows), "kl_sum": kl_sum}, self.device)
            kl = kl_estimate(counts)
            weighted_kl += kl * counts["examples"]
            for mb in self.micro_batches(rows, self.eval_pairs):
                logps = root(**_inputs(mb, self.device))[0][0::2]
                ref_main = torch.tensor([ref[i] for i in mb.pair_ids], dtype=torch.float32, device=self.device)
                desirable = torch.tensor([examples[i].desirable for i in mb.pair_ids], dtype=torch.bool,
                                 device=self.device)
                _, metrics = kto_terms(self.cfg, logps, ref_main, desirable, kl, 1.0)
                metrics["examples"] = mb.n_pairs
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v
        sums = all_reduce_values(totals, self.device)
        root.train()
        n = sums.pop("examples")
        return kto_summarize(sums, n, weighted_kl / max(n, 1))


def kl_estimate(counts: dict) -> float:
    """z0: the batch's mean log-ratio of the mismatched completions, clamped at 0 (TRL's)."""
    return max(counts["kl_sum"] / max(counts["examples"], 1), 0.0)


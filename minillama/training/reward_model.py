"""A Bradley-Terry reward model: the transformer with a scalar head, `score` (HF's LlamaForSequenceClassification
head: one Linear(dim, 1) without bias), read at the last token of the answer; trained on preference pairs by
train/dpo.py --loss reward, and loaded by RewardModel to score completions wherever a --reward goes (GRPO, rejection
sampling, evaluation by generation).

The loss is TRL's RewardTrainer's: with r_c, r_r the scores of a pair's chosen and rejected answers,
    loss = mean over pairs of -log sig(r_c - r_r)  [+ center_rewards x mean (r_c + r_r)^2]
(Ouyang et al. 2022; the centering term is Eisenstein et al. 2023's, TRL's center_rewards_coefficient). The score of
an answer is the head on the hidden state of its last learned token (the chat format's end-of-turn token), which is
where HF's sequence classifier reads a sequence that ends there.

Trained with LoRA, the head is a whole trained module: the run's final/ is a PEFT adapter with task_type SEQ_CLS and
modules_to_save ["score"], which PEFT loads onto AutoModelForSequenceClassification (num_labels=1) of the base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .loss import SequenceLogprobs, router_aux_loss
from .preference_data import encode_answer

HEAD = "score"  # the module's name, ours and HF's


def add_score_head(model: nn.Module, std: float = 0.02) -> nn.Linear:
    """Give the model its reward head, model.score: Linear(dim, 1), float32, drawn from N(0, std) as HF initialises a
    fresh classifier (initializer_range 0.02). Returns it."""
    head = nn.Linear(model.args.dim, 1, bias=False, device=model.tok_embeddings.weight.device)
    nn.init.normal_(head.weight, std=std)
    model.add_module(HEAD, head)
    return head


def answer_ends(doc_index: torch.Tensor, n_docs: int) -> torch.Tensor:
    """Flat position of each document's last answer token: one past its last learned target. (n_docs,)

    doc_index (B, L): the document of each learned target, -1 elsewhere; a target at t is the token at t + 1, in the
    same row."""
    flat = doc_index.reshape(-1)
    pos = torch.arange(flat.numel(), device=flat.device)
    valid = flat >= 0
    last = torch.full((n_docs,), -1, dtype=torch.long, device=flat.device)
    last = last.scatter_reduce(0, flat[valid], pos[valid], reduce="amax")
    if (last < 0).any():
        raise ValueError("a document of the batch has no learned answer token to score")
    return last + 1


def head_scores(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The reward head on hidden states. (..., D) -> (...) float32"""
    head = getattr(model, HEAD)
    return head(hidden.to(head.weight.dtype)).squeeze(-1).float()


class RewardScores(SequenceLogprobs):
    """The trained unit of reward modelling: DPO's SequenceLogprobs with a score per document instead of a log-prob
    sum (the same doc-masked pair rows in); it gives the model its head (fresh, or the checkpoint's on resume)."""

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        if not hasattr(model, HEAD):
            add_score_head(model)
        super().__init__(model, chunk_size)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor, doc_index: torch.Tensor,
                n_docs: int, real: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(score per document (n_docs,), router loss or 0, a zero that depends on the whole graph); inputs as
        SequenceLogprobs.forward's."""
        hidden = self.model(tokens, doc_ids=doc_ids, return_hidden=True)  # (B, L, D)
        ends = answer_ends(doc_index, n_docs)  # (n_docs,)
        scores = head_scores(self.model, hidden.reshape(-1, hidden.shape[-1])[ends])  # (n_docs,)
        return scores, router_aux_loss(self.moe_layers, self.model.args, real, scores), scores.sum() * 0.0


def reward_loss(rc: torch.Tensor, rr: torch.Tensor, center_rewards: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss from the chosen and rejected scores (TRL's RewardTrainer: its mean over pairs is
    the loss). (n,) x2 -> (n,)"""
    losses = -F.logsigmoid(rc - rr)
    if center_rewards:
        losses = losses + center_rewards * (rc + rr) ** 2
    return losses


class RewardModel:
    """A trained reward model as a reward function: RewardModel(dir)(prompt=..., completion=...) -> float.

    dir: train/dpo.py --loss reward's final/ (or a step_N/adapter): a PEFT adapter whose modules_to_save hold the
    head, on the base its adapter_config names (base_model_name_or_path). The prompt is one user turn (a list of
    messages is the dialog) and the completion the assistant's answer, encoded in the base's chat format as the
    training pairs were; the score is the head at the answer's last token."""

    def __init__(self, path, device: Optional[str] = None, dtype: Optional[torch.dtype] = None):
        from ..checkpoints import load_model
        from ..lora.merge import merge_lora
        from ..lora.peft import load_adapter, read_adapter_config
        from ..tokenizer.tokenizer import load_tokenizer

        path = Path(path)
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise ValueError(f"reward model {path}: no adapter_config.json (expected train/dpo.py --loss reward's "
                             "final/, a PEFT adapter with its score head)")
        cfg = read_adapter_config(path)
        if HEAD not in (cfg.get("modules_to_save") or []):
            raise ValueError(f"reward model {path}: the adapter has no '{HEAD}' head in modules_to_save: a policy "
                             "adapter, not a reward model")
        base = cfg.get("base_model_name_or_path")
        if not base or not Path(base).is_dir():
            raise ValueError(f"reward model {path}: its base model {base!r} (adapter_config.json "
                             "base_model_name_or_path) is not a local checkpoint dir")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)  # as inference loads
        self.model = load_model(base, device=device, dtype=dtype)
        add_score_head(self.model)
        load_adapter(self.model, path)
        merge_lora(self.model)
        self.model.eval()
        self.tok = load_tokenizer(base)

    def encode(self, prompt, completion: str) -> tuple[list[int], int]:
        """(token ids, position of the answer's last token), as the training pairs encode prompt + answer."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, mask = encode_answer(self.tok, messages, {"role": "assistant", "content": completion})
        if True not in mask:
            raise ValueError("reward model: the chat format left no answer token to score")
        return ids, len(mask) - 1 - mask[::-1].index(True)

    @torch.no_grad()
    def batch(self, items: list[tuple], max_tokens: int = 8192) -> list[float]:
        """Scores of many (prompt, completion): right-padded forwards of up to max_tokens tokens (at least one item
        each); causal attention keeps the pads after an answer out of its score."""
        seqs = []
        for prompt, completion in items:
            ids, end = self.encode(prompt, completion)
            seqs.append(ids[:end + 1])
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a forward
        device = self.model.tok_embeddings.weight.device
        out = [0.0] * len(seqs)
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop + 1 - start) * len(seqs[order[stop]]) <= max_tokens:
                stop += 1
            group = order[start:stop]
            width = len(seqs[group[-1]])
            tokens = torch.zeros(len(group), width, dtype=torch.long)  # (n, T)
            for row, i in enumerate(group):
                tokens[row, :len(seqs[i])] = torch.tensor(seqs[i])
            hidden = self.model(tokens.to(device), return_hidden=True)  # (n, T, D)
            ends = torch.tensor([len(seqs[i]) - 1 for i in group], device=device)
            scores = head_scores(self.model, hidden[torch.arange(len(group), device=device), ends])  # (n,)
            for i, v in zip(group, scores.tolist()):
                out[i] = v
            start = stop
        return out

    def score(self, prompt, completion: str) -> float:
        return self.batch([(prompt, completion)])[0]

    def __call__(self, prompt="", completion: str = "", **_) -> float:
        return self.score(prompt, completion)

"""A Python API in the shape of Meta's reference Llama: build once, then complete texts or chat dialogs.

    from minillama.inference.api import Llama

    llama = Llama.build("weights/smollm2-135m-instruct", max_seq_len=512)
    llama.text_completion(["The capital of France is"], temperature=0, max_gen_len=16)
    # [{"generation": " Paris, ..."}]
    llama.chat_completion([[{"role": "user", "content": "Name three colours."}]], temperature=0.6, top_p=0.9)
    # [{"generation": {"role": "assistant", "content": "..."}}]

Both run generate() (one batch, each row cut at its stop token) with keyword sampling settings; logprobs=True adds
each generated token's text and log-probability under the model's raw logits, as Meta's reference reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..checkpoints import load_model
from ..tokenizer.tokenizer import load_tokenizer
from .engine import EngineConfig
from .generate import generate
from .sampling import SamplingParams


@dataclass
class Llama:
    """A loaded model and its tokenizer (Llama.build), with the context its answers must fit in."""

    model: object
    tokenizer: object
    max_seq_len: int

    @staticmethod
    def build(ckpt_dir, max_seq_len: Optional[int] = None, device: str = "cpu", dtype: Optional[str] = "float32",
              chat_format: Optional[str] = None) -> "Llama":
        """Load a checkpoint dir (HF, Meta or minillama layout); max_seq_len caps prompt + answer (default: the
        model's context); chat_format overrides the detected one (e.g. "template": the checkpoint's Jinja)."""
        model = load_model(ckpt_dir, device=device, dtype=dtype, max_seq_len=max_seq_len)
        tok = load_tokenizer(ckpt_dir, chat_format=chat_format)
        return Llama(model, tok, max_seq_len or model.args.max_seq_len)

    def _generate(self, prompts: list[list[int]], temperature: float, top_p: float, max_gen_len: Optional[int],
                  seed: Optional[int]) -> list[list[int]]:
        room = self.max_seq_len - max(len(p) for p in prompts)
        if room < 1:
            raise ValueError(f"a prompt of {max(len(p) for p in prompts)} tokens leaves no room in max_seq_len "
                             f"{self.max_seq_len}")
        n = min(max_gen_len, room) if max_gen_len else room
        return generate(self.model, prompts, n, SamplingParams(temperature, top_p), stop_ids=self.tokenizer.stop_ids,
                        max_seq_len=self.max_seq_len, config=EngineConfig(seed=seed))

    @torch.no_grad()
    def _logprobs(self, prompt: list[int], out: list[int]) -> list[float]:
        """log p(out[i] | prompt + out[:i]) under the raw logits, from one forward over the whole sequence."""
        if not out:
            return []
        seq = torch.tensor([prompt + out], device=self.model.tok_embeddings.weight.device)  # (1, P + N)
        logits = self.model(seq)[0, len(prompt) - 1:-1].float()  # (N, V): the positions that predicted out
        return torch.log_softmax(logits, -1).gather(1, seq[0, len(prompt):, None])[:, 0].tolist()

    def _result(self, prompt: list[int], out: list[int], generation, logprobs: bool) -> dict:
        r = {"generation": generation}
        if logprobs:
            r["tokens"] = [self.tokenizer.decode([t]) for t in out]
            r["logprobs"] = self._logprobs(prompt, out)
        return r

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False,
                        seed: Optional[int] = None) -> list[dict]:
        """Continue each prompt (BOS as the tokenizer adds it): [{"generation": str, + "tokens", "logprobs"}]."""
        ids = [self.tokenizer.encode(p, bos=True) for p in prompts]
        outs = self._generate(ids, temperature, top_p, max_gen_len, seed)
        return [self._result(p, o, (text if echo else "") + self.tokenizer.decode(o), logprobs)
                for p, o, text in zip(ids, outs, prompts)]

    def chat_completion(self, dialogs: list[list[dict]], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False,
                        seed: Optional[int] = None) -> list[dict]:
        """Answer each dialog in the checkpoint's chat format: [{"generation": {"role": "assistant", "content"}}]."""
        ids = [self.tokenizer.encode_dialog(d, add_generation_prompt=True) for d in dialogs]
        outs = self._generate(ids, temperature, top_p, max_gen_len, seed)
        return [self._result(p, o, {"role": "assistant", "content": self.tokenizer.decode(o)}, logprobs)
                for p, o in zip(ids, outs)]

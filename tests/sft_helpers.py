"""Test utilities for the trainer: a tiny ChatML byte-level tokenizer + random model written as a checkpoint dir,
small JSONL sets, and a torchrun launcher for train/sft.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from minillama.tokenizer.bpe import bytes_to_unicode

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_byte_tokenizer(d: Path) -> int:
    """A merge-free byte-level BPE tokenizer.json (3 ChatML specials + 256 bytes) + config; returns vocab size."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for b, c in sorted(bytes_to_unicode().items()):
        vocab[c] = len(SPECIALS) + b
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(SPECIALS)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": []},
    }
    (d / "tokenizer.json").write_text(json.dumps(spec))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHATML}))
    return len(vocab)


def tiny_checkpoint(d: Path, seed: int = 0, moe: bool = False, tie: bool = False, n_layers: int = 2) -> Path:
    """A random tiny model (dense or Mixtral-shaped) saved as an HF dir with the byte tokenizer."""
    from minillama import ModelArgs, Transformer, save_hf

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_tokenizer(d)
    extra = {"n_experts": 4, "n_experts_per_tok": 2, "family": "mixtral"} if moe else {}
    args = ModelArgs(dim=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, vocab_size=vocab + 1, hidden_dim=96,
                     max_seq_len=512, tie_embeddings=tie, **extra)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.02) if "norm" in name else p.normal_(0.0, 0.05)
    save_hf(model, d, tokenizer_src=d, overwrite=True)
    write_byte_tokenizer(d)  # the tokenizer files are ours, whatever save_hf copied
    return d


def qa_samples(n: int, seed: int = 0) -> list[dict]:
    """n short chat samples with distinct deterministic answers."""
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "rock", "star"]
    out = []
    for i in range(n):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))
        a = " ".join(rng.choice(words) for _ in range(rng.randint(1, 5)))
        out.append({"messages": [{"role": "user", "content": f"q{i}: {q}"}, {"role": "assistant", "content": a}]})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(args: list[str], nproc: int = 1, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    """train/sft.py under torchrun with nproc CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(REPO / "train" / "sft.py"), "--device", "cpu", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_safetensors(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in d."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]

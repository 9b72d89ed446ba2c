"""Write a minillama model as a llama.cpp GGUF file, with the keys llama.cpp's own converter (convert_hf_to_gguf.py)
writes, through the `gguf` package's GGUFWriter and its quants module.

    export_gguf(model, tok, "model.q8_0.gguf", quant="q8_0")

Tensors are converted and written one at a time, so only one converted tensor is alive beside the model. q/k rows
need no permutation: minillama keeps Meta's interleaved-pair order, which is llama.cpp's (its converter permutes HF's
rotate-half rows into it; gguf.py undoes that when reading).

Which tensor gets which type (as llama.cpp does it): norms (1-D) and the MoE router (ffn_gate_inp) stay float32;
every other matrix takes the asked type; with q4_0 the output head (token_embd when tied) gets q8_0, because
llama-quantize keeps the head at higher precision (it picks q6_K, which gguf-py cannot write); a matrix whose rows do
not split into the type's blocks falls back to f16, as the converter does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from ..args import ModelArgs
from ..util.files import atomic_path, read_json
from ..rope import base_inv_freq, scaled_inv_freq
from .checkpoint import _plain_state

QUANT_NAMES = ("f16", "bf16", "q8_0", "q4_0")

# minillama state-dict key (inside layers.N) -> llama.cpp tensor name (inside blk.N)
LAYER_TENSORS = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.gate.weight": "ffn_gate_inp.weight",  # Mixtral router (E, D)
    "feed_forward.experts.w1": "ffn_gate_exps.weight",  # (E, F, D)
    "feed_forward.experts.w2": "ffn_down_exps.weight",  # (E, D, F)
    "feed_forward.experts.w3": "ffn_up_exps.weight",  # (E, F, D)
}
TOP_TENSORS = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "output.weight": "output.weight"}

# Meta's Llama 3 Instruct template, for a Llama 3 tokenizer that comes without one (Meta's original tokenizer.model)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# end-of-turn tokens llama.cpp also stops at (it finds them by text too; the id makes it explicit)
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>")


def gguf_tensor_name(key: str) -> str:
    """llama.cpp name of a minillama state-dict key: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    if key in TOP_TENSORS:
        return TOP_TENSORS[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None or m.group(2) not in LAYER_TENSORS:
        raise ValueError(f"export_gguf: tensor {key!r} has no llama.cpp counterpart")
    return f"blk.{m.group(1)}.{LAYER_TENSORS[m.group(2)]}"


# ---- tokenizer ----

@dataclass
class GGUFVocab:
    """The tokenizer.ggml.* arrays llama.cpp reads."""

    model: str  # "llama" (SentencePiece) | "gpt2" (byte-level BPE)
    pre: str  # pre-tokenizer name llama.cpp knows ("default" for SentencePiece)
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    scores: Optional[list[float]] = None  # SentencePiece only
    merges: list[str] = field(default_factory=list)  # BPE only: "left right" in priority order


def _pad_to(vocab: GGUFVocab, n: int) -> GGUFVocab:
    """Rows of the embedding past the tokenizer get [PADi] tokens of type UNUSED, as the converter writes them."""
    from gguf import TokenType
    for i in range(len(vocab.tokens), n):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(TokenType.UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    return vocab


def sentencepiece_vocab(tok) -> GGUFVocab:
    """Pieces, scores and types of a SentencePiece model (tokenizer.ggml.model "llama")."""
    from gguf import TokenType
    sp = tok.sp
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        kind = TokenType.NORMAL
        if sp.is_unknown(i):
            kind = TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = TokenType.CONTROL
        elif sp.is_unused(i):
            kind = TokenType.UNUSED
        elif sp.is_byte(i):
            kind = TokenType.BYTE
        types.append(kind)
    return GGUFVocab("llama", "default", tokens, types, scores)


def _pre_tokenizer_name(vocab) -> str:
    """llama.cpp's name for the BPE pre-tokenizer (it knows them by name, not by regex)."""
    from ..tokenizer.bpe import GPT2_PATTERN, LLAMA3_PATTERN
    known = {(LLAMA3_PATTERN, ()): "llama-bpe", (GPT2_PATTERN, (r"\p{N}",)): "smollm", (GPT2_PATTERN, ()): "gpt-2"}
    key = (vocab.pattern, tuple(vocab.pre_patterns))
    if key not in known:
        raise ValueError(f"export_gguf: the tokenizer's pre-tokenizer ({' then '.join(key[1] + (key[0],))}) is not "
                         f"one llama.cpp knows by name here (Llama 3's, SmolLM's, GPT-2's)")
    return known[key]


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """BPE merges a tiktoken rank table implies: every split of a token into two tokens, ordered by the merged
    token's rank, then by the parts' ranks (what transformers' tiktoken conversion writes; tiktoken merges any
    adjacent pair whose concatenation is a token, lowest rank first, which these merges reproduce)."""
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        parts = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, ranks[a], ranks[b], a, b) for a, b in parts)
    merges.sort()
    return [(a, b) for *_, a, b in merges]


def bpe_vocab(tok) -> GGUFVocab:
    """Tokens (GPT-2 byte-to-unicode text), types and merges of a byte-level BPE tokenizer ("gpt2" model)."""
    from gguf import TokenType

    from ..tokenizer.bpe import bytes_to_unicode
    vocab = tok._vocab
    pre = _pre_tokenizer_name(vocab)
    if tok.kind == "hf-bpe":  # tokenizer.json holds the vocab and merges in llama.cpp's own text form
        spec = read_json(tok.path, "tokenizer")
        model = spec["model"]
        text = {i: t for t, i in model["vocab"].items()}
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        specials = {a["id"]: (a["content"], a.get("special", False)) for a in spec.get("added_tokens", [])}
    else:  # Meta's tiktoken tokenizer.model: bytes -> GPT-2's printable characters, merges from the ranks
        table = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
        as_text = {b: b.decode("latin-1").translate(table) for b in vocab.ranks}  # one char per byte
        text = {i: as_text[b] for b, i in vocab.ranks.items()}
        merges = [f"{as_text[a]} {as_text[b]}" for a, b in _merges_from_ranks(vocab.ranks)]
        specials = {i: (s, True) for s, i in vocab.special.items()}
    n = max([*text, *specials]) + 1
    tokens, types = [f"[PAD{i}]" for i in range(n)], [TokenType.UNUSED] * n
    for i, t in text.items():
        tokens[i], types[i] = t, TokenType.NORMAL
    for i, (t, special) in specials.items():
        tokens[i], types[i] = t, TokenType.CONTROL if special else TokenType.USER_DEFINED
    return GGUFVocab("gpt2", pre, tokens, types, merges=merges)


def gguf_vocab(tok) -> GGUFVocab:
    if tok.kind == "sentencepiece":
        return sentencepiece_vocab(tok)
    if tok.kind in ("hf-bpe", "tiktoken"):
        return bpe_vocab(tok)
    raise ValueError(f"export_gguf: tokenizer kind {tok.kind!r} cannot be written to GGUF")


def _write_tokenizer(w, tok, n_vocab: int, log) -> None:
    vocab = _pad_to(gguf_vocab(tok), n_vocab)
    if len(vocab.tokens) > n_vocab:
        raise ValueError(f"export_gguf: the tokenizer {tok.path} has {len(vocab.tokens)} tokens, the model's "
                         f"embedding only {n_vocab} rows")
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types([int(t) for t in vocab.types])
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    for kind, tid in (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id)):
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    if tok.kind == "sentencepiece" and tok.sp.unk_id() >= 0:
        w.add_unk_token_id(tok.sp.unk_id())
    eot = next((tok.special_tokens[t] for t in EOT_TEXTS if t in tok.special_tokens), None)
    if eot is not None:
        w.add_eot_token_id(eot)
    w.add_add_bos_token(bool(tok.add_bos and tok.bos_id is not None))
    w.add_add_eos_token(False)
    template = tok.chat_template or (LLAMA3_TEMPLATE if "<|eot_id|>" in tok.special_tokens else None)
    if template:
        w.add_chat_template(template)
    else:
        log("note: the tokenizer has no chat template; llama.cpp will fall back to its Llama 2 format")


# ---- hyperparameters and RoPE ----

def _write_hparams(w, args: ModelArgs, ftype: int, name: str, log) -> Optional[torch.Tensor]:
    """The llama.* keys; returns Llama 3.1's per-frequency RoPE divisors (rope_freqs.weight) when it has them."""
    import gguf
    w.add_name(name)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_rope_dimension_count(args.head_dim)
    if args.head_dim != args.dim // args.n_heads:
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    if args.n_experts:
        w.add_expert_count(args.n_experts)
        w.add_expert_used_count(args.n_experts_per_tok)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if args.sliding_window:
        log(f"note: llama.cpp's llama architecture has no sliding window; the model's {args.sliding_window}-token "
            "window is not written (outputs differ past it)")
    return _write_rope_scaling(w, args)


def _write_rope_scaling(w, args: ModelArgs) -> Optional[torch.Tensor]:
    import gguf
    s = args.rope_scaling
    if not s:
        return None
    kind = s["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s["factor"])
        return None
    if kind == "yarn":
        custom = sorted(k for k in ("mscale", "mscale_all_dim", "attention_factor", "beta_fast", "beta_slow")
                        if s.get(k) is not None)
        if custom:
            raise ValueError(f"export_gguf: yarn RoPE scaling with {', '.join(custom)} set is not written (llama.cpp's "
                             "llama architecture derives them from the factor)")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.get("factor") or args.max_seq_len / s["original_max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(s.get("original_max_position_embeddings") or args.max_seq_len)
        return None
    if kind == "llama3":  # llama.cpp divides each base frequency by rope_freqs[i], as the converter writes it
        base = base_inv_freq(args.head_dim, args.rope_theta)
        scaled, _ = scaled_inv_freq(args.head_dim, args.rope_theta, s, args.max_seq_len)
        return (base / scaled).float()  # (hd/2,)
    raise ValueError(f"export_gguf: RoPE scaling {kind!r} has no llama.cpp equivalent (linear, yarn and llama3 do)")


# ---- tensors ----

QUANTS = {  # name -> (tensor type, general.file_type)
    "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}


def tensor_type(name: str, shape: tuple, quant: str, head: str):
    """The GGML type llama.cpp's tools give tensor `name` of `shape` when the file is `quant` (see module doc)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or name == "rope_freqs.weight":
        return Q.F32
    qtype = Q[QUANTS[quant][0]]
    if quant == "q4_0" and name == head:
        qtype = Q.Q8_0
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """A tensor as the bytes GGUF stores for `qtype` (float32/float16 arrays, or uint8 blocks from gguf.quants)."""
    from gguf import GGMLQuantizationType as Q, quants
    x = t.detach().to("cpu", torch.float32).numpy()
    if qtype == Q.F32:
        return np.ascontiguousarray(x)
    if qtype == Q.F16:
        return x.astype(np.float16)
    return quants.quantize(x, qtype)


def _tensor_plan(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(llama.cpp name, tensor) in the converter's order; no output.weight when the head is tied."""
    state = _plain_state(model, "export_gguf")
    if model.args.tie_embeddings:
        state.pop("output.weight", None)
    for key, t in state.items():
        yield gguf_tensor_name(key), t


def export_gguf(model, tok, path: Union[str, Path], quant: str = "f16", name: Optional[str] = None,
                log=None) -> Path:
    """Write `model` (a plain, unquantized minillama Transformer) and its tokenizer as a llama.cpp GGUF file."""
    import gguf
    if quant not in QUANTS:
        raise ValueError(f"export_gguf: quant {quant!r}; expected one of {', '.join(QUANT_NAMES)}")
    log = log or (lambda msg: None)
    path = Path(path)
    tensors = list(_tensor_plan(model))
    head = "token_embd.weight" if model.args.tie_embeddings else "output.weight"
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        rope_freqs = _write_hparams(w, model.args, gguf.LlamaFileType[QUANTS[quant][1]], name or path.stem, log)
        _write_tokenizer(w, tok, model.args.vocab_size, log)
        if rope_freqs is not None:
            tensors.insert(0, ("rope_freqs.weight", rope_freqs))
        types = [tensor_type(n, tuple(t.shape), quant, head) for n, t in tensors]
        for (n, t), qtype in zip(tensors, types):  # headers first: each tensor is converted only when written
            shape = tuple(t.shape)
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                w.add_tensor_info(n, shape, np.float32 if size == 4 else np.float16, nbytes)
            else:
                w.add_tensor_info(n, gguf.quant_shape_to_byte_shape(shape, qtype), np.uint8, nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, ((n, t), qtype) in enumerate(zip(tensors, types)):
            w.write_tensor_data(encode_tensor(t, qtype))
            if (i + 1) % 50 == 0:
                log(f"  wrote {i + 1}/{len(tensors)} tensors")
        w.close()
    return path.resolve()


def export_gguf_lora(model, path: Union[str, Path], name: Optional[str] = None) -> Path:
    """Write the LoRA adapter loaded into `model` (its first adapter) as a llama.cpp LoRA GGUF, for `llama-cli -m
    BASE.gguf --lora FILE`. llama.cpp scales each pair by adapter.lora.alpha / rank; a layer whose own scaling differs
    from that gets it folded into lora_b. DoRA, Mixtral expert and output-head adapters have no llama.cpp form."""
    import gguf
    pairs = []  # (llama.cpp weight name, lora_a (r, in), lora_b (out, r), scaling)
    for key, m in model.named_modules():
        if not hasattr(m, "lora_a") or not hasattr(m, "scaling"):
            continue
        if getattr(m, "lora_magnitude", None) is not None or m.lora_a.dim() != 2:
            raise ValueError(f"export_gguf_lora: {key} is a DoRA or expert adapter; llama.cpp's LoRA GGUF has neither")
        if key == "output":
            raise ValueError("export_gguf_lora: an adapter on the output head has no llama.cpp LoRA form")
        pairs.append((gguf_tensor_name(f"{key}.weight"), m.lora_a, m.lora_b, float(m.scaling)))
    if not pairs:
        raise ValueError("export_gguf_lora: the model holds no LoRA adapter (load one with adapter.load_adapter)")
    rank0, scaling0 = pairs[0][1].shape[0], pairs[0][3]
    alpha = scaling0 * rank0
    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name or path.stem)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for n, a, b, scaling in pairs:
            fold = scaling * a.shape[0] / alpha  # 1 when every layer has the first one's rank and scaling
            w.add_tensor(n.removesuffix(".weight") + ".weight.lora_a", encode_tensor(a, gguf.GGMLQuantizationType.F32))
            w.add_tensor(n.removesuffix(".weight") + ".weight.lora_b",
                         encode_tensor(b.detach().float() * fold, gguf.GGMLQuantizationType.F32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path.resolve()

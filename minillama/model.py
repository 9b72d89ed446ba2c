"""The Llama / Mistral / Mixtral transformer. Weight names follow Meta's reference so official checkpoints load as-is.

Shape letters: B batch, T tokens in this forward, S cached keys, D model dim, H query heads, K kv heads,
hd head dim, F FFN hidden dim, V vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .args import ModelArgs
from .attention import AttnMask, CacheStep, attend, cache_mask, doc_positions, packed_mask, span_mask
from .kv_cache import KVCache
from .linear import Linear
from .moe import MoEFeedForward
from .rope import apply_rope, rope_cos_sin, scaled_inv_freq
from .swiglu import silu_mul

__all__ = ["ModelArgs", "Transformer", "RMSNorm", "FeedForward", "Attention", "TransformerBlock", "CacheStep"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32, round back, then scale: the order HF and Meta both use
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = Linear(dim, hidden_dim, bias=False)
        self.w2 = Linear(hidden_dim, dim, bias=False)
        self.w3 = Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(silu_mul(self.w1(x), self.w3(x)))


class Attention(nn.Module):
    """Grouped-query attention with RoPE and an optional static KV cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnMask,
                step: Optional[CacheStep] = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, hd)
        if step is not None:
            k, v = self.cache.update(step, k, v)  # (B, K, S, hd)
        out = attend(q, k, v, attn)  # (B, H, T, hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        if args.n_experts:
            self.feed_forward = MoEFeedForward(args.dim, args.hidden_dim, args.n_experts, args.n_experts_per_tok)
        else:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttnMask,
                step: Optional[CacheStep] = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, attn, step)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, bias=False)
        inv_freq, self.rope_attention_factor = scaled_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling,
                                                               args.max_seq_len)
        # float32 bits in an int32 buffer: follows .to(device) but not .to(bfloat16), which would round the angles
        self.register_buffer("inv_freq_bits", inv_freq.view(torch.int32), persistent=False)
        self.tie_weights()

    @property
    def inv_freq(self) -> torch.Tensor:
        return self.inv_freq_bits.view(torch.float32)

    def tie_weights(self):
        """Share the embedding matrix with the output projection when the model ties them (Llama 3.2 1B/3B)."""
        if self.args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def reset_rope(self, device=None):
        """Recompute the RoPE frequencies (after building on the meta device, where buffers hold no data)."""
        inv_freq, self.rope_attention_factor = scaled_inv_freq(
            self.args.head_dim, self.args.rope_theta, self.args.rope_scaling, self.args.max_seq_len)
        device = device if device is not None else self.tok_embeddings.weight.device
        self.inv_freq_bits = inv_freq.view(torch.int32).to(device)

    # ---- KV cache ----
    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None, device=None):
        """Allocate each layer's static KV cache (B, K, S, hd) for generation."""
        weight = self.tok_embeddings.weight
        dtype = dtype or (weight.dtype if weight.is_floating_point() else torch.bfloat16)
        device = device or weight.device
        for layer in self.layers:  # the layer's own head count: tensor parallelism leaves each rank a share
            layer.attention.cache = KVCache(max_batch_size, max_seq_len, layer.attention.n_kv_heads,
                                            layer.attention.head_dim, dtype, device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache = None

    @property
    def cache_len(self) -> int:
        cache = self.layers[0].attention.cache
        return 0 if cache is None else cache.k.shape[2]

    # ---- forward ----
    def _positions_and_mask(self, tokens: torch.Tensor, step: Optional[CacheStep],
                            doc_ids: Optional[torch.Tensor]) -> tuple[torch.Tensor, AttnMask]:
        B, T = tokens.shape
        device = tokens.device
        window = self.args.sliding_window
        if step is not None:
            if self.layers[0].attention.cache is None:
                raise ValueError("forward(start_pos=...) needs a KV cache: call model.setup_cache(batch, seq_len) first")
            if doc_ids is not None:
                raise ValueError("doc_ids (packed rows) and start_pos (KV cache) cannot be combined")
            if step.spans is not None:
                if B != 1 or len(step.span_slots) != T or step.pad_lens is not None or step.rows is not None:
                    raise ValueError(f"a packed cache step takes tokens (1, {len(step.span_slots)}), got {(B, T)}")
                return step.slots(B, T, device), span_mask(step.spans, device, window)
            if step.fixed_shape and step.start.dim() == 1 and step.start.shape[0] != B:
                raise ValueError(f"per-row start_pos has {step.start.shape[0]} entries for {B} rows")
            if step.rows is not None and tuple(step.rows.shape) != (B,):
                raise ValueError(f"cache rows must be a LongTensor of shape ({B},), got {tuple(step.rows.shape)}")
            slots = step.slots(B, T, device)  # (B, T)
            positions = slots if step.pad_lens is None else (slots - step.pad_lens.to(device)[:, None]).clamp(min=0)
            return positions, cache_mask(step, T, step.key_len(T, self.cache_len), device, window)
        if doc_ids is not None:
            if doc_ids.shape != tokens.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != tokens shape {tuple(tokens.shape)}")
            half = self.tok_embeddings.weight.dtype in (torch.float16, torch.bfloat16)  # varlen kernels need it
            return doc_positions(doc_ids.to(device)), packed_mask(doc_ids.to(device), window, half)
        positions = torch.arange(T, device=device)[None]
        if window is not None and T > window:
            return positions, packed_mask(torch.zeros_like(tokens), window)
        return positions, AttnMask(causal_only=True)

    def forward(self, tokens: torch.Tensor, start_pos: Optional[int | CacheStep] = None,
                doc_ids: Optional[torch.Tensor] = None, return_hidden: bool = False,
                positions: Optional[torch.Tensor] = None, attn: Optional[AttnMask] = None) -> torch.Tensor:
        """tokens (B, T) -> float32 logits (B, T, V), or the final-normed hidden states (B, T, D) if return_hidden.

        start_pos: read and write the KV cache from this slot on (Meta's int), or a CacheStep for left-padded rows,
        fixed-shape (compiled) decoding and per-row cache slots (see attention.CacheStep). doc_ids (B, T): packed
        documents; attention stays inside a document and positions restart at 0. positions (B, T) with attn: the
        caller's own positions and attention for tokens that are pieces of longer rows (context parallelism in
        training/context_parallel.py supplies both); they replace what doc_ids would give.
        """
        step = CacheStep(start_pos) if isinstance(start_pos, (int, torch.Tensor)) else start_pos
        if (positions is None) != (attn is None) or (attn is not None and step is not None):
            raise ValueError("forward: give positions and attn together, and not with start_pos")
        if attn is None:
            positions, attn = self._positions_and_mask(tokens, step, doc_ids)
        inv_freq, attention_factor = self.inv_freq, self.rope_attention_factor
        if self.args.rope_scaling and self.args.rope_scaling["rope_type"] == "dynamic":
            seq_len = int(positions.max()) + 1  # dynamic NTK depends on the longest position seen in this forward
            inv_freq, attention_factor = scaled_inv_freq(self.args.head_dim, self.args.rope_theta,
                                                         self.args.rope_scaling, self.args.max_seq_len, seq_len)
        cos, sin = rope_cos_sin(inv_freq, positions, attention_factor)  # (B|1, T, hd/2)
        h = self.tok_embeddings(tokens)  # (B, T, D)
        for layer in self.layers:
            h = layer(h, cos, sin, attn, step)
        h = self.norm(h)
        if return_hidden:
            return h
        return self.output(h).float()

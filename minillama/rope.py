"""Rotary position embeddings and their context-extension scalings, matching Hugging Face's definitions.

Layout is Meta's: each head's features are rotated in adjacent pairs (x[2i], x[2i+1]), which is why HF
checkpoints need their q/k rows permuted on load (see checkpoint.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def base_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/d) for i in [0, d/2): the unscaled rotation speed of each feature pair. (hd/2,)"""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def scaled_inv_freq(head_dim: int, theta: float, scaling: Optional[dict], max_seq_len: int,
                    seq_len: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies after context-extension scaling, and the cos/sin multiplier (YaRN's attention factor).

    `seq_len` is only read by dynamic NTK, whose base grows with the longest position in the current forward.
    """
    if not scaling:
        return base_inv_freq(head_dim, theta), 1.0
    kind = scaling["rope_type"]
    factor = scaling.get("factor")
    if kind == "linear":  # position interpolation: positions / factor
        return base_inv_freq(head_dim, theta) / factor, 1.0
    if kind == "dynamic":  # NTK-aware: raise the base once the sequence outgrows the trained context
        seq_len = max(seq_len or max_seq_len, max_seq_len)
        base = theta * ((factor * seq_len / max_seq_len) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return base_inv_freq(head_dim, base), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(head_dim, theta, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(head_dim, theta, scaling, max_seq_len)
    raise ValueError(f"unknown rope_scaling type {kind!r}")


def _llama3_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short kept, a smooth blend in between."""
    inv_freq = base_inv_freq(head_dim, theta)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict, max_seq_len: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; scale cos/sin by the attention factor."""
    orig_len = scaling.get("original_max_position_embeddings") or max_seq_len
    factor = scaling.get("factor") or max_seq_len / orig_len
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(n_rotations: float) -> float:
        # the feature-pair index that completes n_rotations over the original context
        return head_dim * math.log(orig_len / (n_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original (high) frequency
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0):
    """cos/sin of each position's rotation angles, in float32. positions (B, T) or (T,) -> (B|1, T, hd/2) each."""
    if positions.dim() == 1:
        positions = positions[None]
    angles = positions.float()[..., None] * inv_freq.float().to(positions.device)  # (B, T, hd/2)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent feature pairs of x (B, T, H, hd) by per-position angles; computed in float32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, hd/2)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)

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


# rope_type -> (required keys, optional keys) besides rope_type, as transformers validates rope_parameters
SCALING_KEYS = {
    "linear": ({"factor"}, set()),
    "dynamic": ({"factor"}, set()),
    "yarn": ({"factor"}, {"original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                          "mscale_all_dim", "truncate"}),
    "llama3": ({"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"}, set()),
}


def check_rope_scaling(scaling, source: str = "rope_scaling") -> dict:
    """A user's scaling dict checked key by key -> a normalized copy ({"rope_type": "default"} means none).

    Stricter than transformers (which warns): an unknown key is an error, since a typo would silently change nothing.
    A "rope_theta" key (transformers >= 5 keeps theta inside rope_parameters) is passed through for the caller.
    """
    if scaling is None:
        return {"rope_type": "default"}
    if not isinstance(scaling, dict):
        raise ValueError(f"{source}: expected a JSON object like {{\"rope_type\": \"yarn\", \"factor\": 4.0}}, "
                         f"got {type(scaling).__name__}")
    s = dict(scaling)
    if "type" in s:  # transformers' old spelling
        s.setdefault("rope_type", s.pop("type"))
    kind = s.get("rope_type")
    if kind == "default":
        extra = sorted(set(s) - {"rope_type", "rope_theta"})
        if extra:
            raise ValueError(f"{source}: rope_type 'default' takes no other keys, got {extra}")
        return s
    if kind not in SCALING_KEYS:
        raise ValueError(f"{source}: rope_type {kind!r} is not one of default, {', '.join(SCALING_KEYS)}")
    required, optional = SCALING_KEYS[kind]
    missing = sorted(required - set(s))
    if missing:
        raise ValueError(f"{source}: rope_type {kind!r} needs keys {missing}")
    unknown = sorted(set(s) - required - optional - {"rope_type", "rope_theta"})
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} for rope_type {kind!r}; valid: "
                         f"{sorted(required | optional)}")

    def number(key: str, ok, rule: str):
        v = s.get(key)
        if v is None and key not in required:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
            raise ValueError(f"{source}: {key} must be {rule}, got {v!r}")

    number("factor", lambda v: v >= 1, "a number >= 1")
    number("rope_theta", lambda v: v > 0, "a number > 0")
    number("attention_factor", lambda v: v > 0, "a number > 0")
    for key in ("low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        number(key, lambda v: True, "a number")
    orig = s.get("original_max_position_embeddings")
    if orig is not None and (isinstance(orig, bool) or not isinstance(orig, int) or orig < 1):
        raise ValueError(f"{source}: original_max_position_embeddings must be an integer >= 1, got {orig!r}")
    if kind == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ValueError(f"{source}: high_freq_factor {s['high_freq_factor']} must exceed low_freq_factor "
                         f"{s['low_freq_factor']}")
    if kind == "yarn" and (s.get("beta_fast") or 32) <= (s.get("beta_slow") or 1):
        raise ValueError(f"{source}: beta_fast must exceed beta_slow (defaults 32 and 1)")
    if "truncate" in s and not isinstance(s["truncate"], bool):
        raise ValueError(f"{source}: truncate must be true or false, got {s['truncate']!r}")
    return s


def runs_past_context(scaling: Optional[dict]) -> bool:
    """Dynamic NTK rescales to whatever length a forward sees, so it may run past the trained context (as in HF)."""
    return bool(scaling) and scaling.get("rope_type") == "dynamic"


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

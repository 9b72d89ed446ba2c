"""NF4 (4-bit NormalFloat, QLoRA) weights in plain PyTorch: per-block absmax scales with double quantization.

Layout of a quantized weight (*lead, out, in), each matrix (each expert of a stack) quantized on its own:
- 4-bit codes into the 16 NF4 values, blocks of 64 consecutive weights, packed two per uint8 (first in the high
  nibble): 0.5 bytes per weight.
- each block's absmax, double-quantized as in the QLoRA paper: minus the matrix's mean absmax, then linear int8
  (symmetric, round to nearest) in groups of 256 blocks with one float32 scale per group. bitsandbytes uses its
  dynamic 8-bit float code instead of linear int8; the cost is the same (1 byte per 64 weights + 4 bytes per 16384).
Each of the four arrays is a frozen, flat (1-D) nn.Parameter of an integer dtype (uint8 codes, int8 scales, int32
bits of the float32 second-level scales and mean): model.to(bfloat16) leaves integers alone, and FSDP2's
fully_shard shards them along dim 0 like any frozen parameter and all-gathers them per block for its forward and
backward (mixed dtypes go through one uint8 buffer), so under FSDP each rank holds ~1/N of the NF4 base, as
FSDP-QLoRA does (measured in tests/test_qlora_fsdp.py). Flat, because a (1, n) matrix would shard as one row.

Measured (tests/test_quant.py): Gaussian weights round-trip with relative RMS error 0.092 (the same as
bitsandbytes' NF4); on the tiny random test model (2 layers, dim 64, weights N(0, 0.05)) logits move by ~0.09
(dense) / ~0.11 (MoE) relative L2 and greedy argmax agrees on 88-100% of positions. A random net with larger
weights (N(0, 0.2)) amplifies the same weight error to ~0.45, so judge QLoRA on real checkpoints.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts, QuantizedExperts, grouped_linear

# the 16 NF4 values of the QLoRA paper (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0)
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)
BLOCK = 64  # weights per absmax
SCALE_GROUP = 256  # absmax values per second-level float32 scale
CHUNK = BLOCK * SCALE_GROUP * 256  # elements (de)quantized at a time, to bound the float32 temporaries
NF4_ARRAYS = ("packed", "absmax_q", "absmax_scale", "absmax_mean")  # an NF4Weight's parameters, in this order

# layer weights that QLoRA quantizes; embeddings, norms, router and output head stay in their dtype
_LINEAR_KEY = re.compile(r"(layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.w[123]))\.weight")
_EXPERTS_KEY = re.compile(r"(layers\.\d+\.feed_forward\.experts)\.(w[123])")


def _code(device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


_PAIRS: dict = {}


def _byte_pairs(device) -> torch.Tensor:
    """(256, 2) float32: the two code values a packed byte holds, high nibble first (cached per device)."""
    key = str(device)
    if key not in _PAIRS:
        byte, code = torch.arange(256, device=device), _code(device)
        _PAIRS[key] = torch.stack([code[byte >> 4], code[byte & 15]], dim=-1)
    return _PAIRS[key]


def _quantize_matrix(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix, flattened (n,) -> packed codes (nb*32,) uint8 and per-block absmax (nb,) float32."""
    n = flat.numel()
    nb = math.ceil(n / BLOCK)
    code = _code(flat.device)
    mids = (code[1:] + code[:-1]) / 2
    packed = torch.empty(nb * BLOCK // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(nb, dtype=torch.float32, device=flat.device)
    for s in range(0, nb * BLOCK, CHUNK):
        x = flat[s:s + CHUNK].float()
        if x.numel() % BLOCK:
            x = F.pad(x, (0, BLOCK - x.numel() % BLOCK))
        x = x.view(-1, BLOCK)  # (blocks, 64)
        amax = x.abs().amax(-1)
        idx = torch.bucketize(x / amax.clamp_min(1e-30)[:, None], mids).to(torch.uint8).view(-1)  # nearest code
        packed[s // 2:s // 2 + idx.numel() // 2] = (idx[0::2] << 4) | idx[1::2]
        absmax[s // BLOCK:s // BLOCK + amax.numel()] = amax
    return packed, absmax


def _quantize_scales(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, nb) absmax -> int8 (S, ng*256), float32 group scales (S, ng), float32 mean (S, 1)."""
    mean = absmax.mean(-1, keepdim=True)
    centered = absmax - mean
    pad = (-centered.shape[-1]) % SCALE_GROUP
    groups = F.pad(centered, (0, pad)).view(absmax.shape[0], -1, SCALE_GROUP)  # (S, ng, 256)
    scale = groups.abs().amax(-1) / 127
    q = torch.round(groups / scale.clamp_min(1e-30)[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(absmax.shape[0], -1), scale, mean


def nf4_saved_layout(shape: tuple) -> dict[str, tuple[tuple, torch.dtype]]:
    """{array: (shape, dtype)} of the four flat arrays NF4Weight holds for a weight of `shape` (*lead, out, in)."""
    mats = math.prod(shape[:-2])
    nb = math.ceil(shape[-2] * shape[-1] / BLOCK)
    ng = math.ceil(nb / SCALE_GROUP)
    return {"packed": ((mats * nb * BLOCK // 2,), torch.uint8), "absmax_q": ((mats * ng * SCALE_GROUP,), torch.int8),
            "absmax_scale": ((mats * ng,), torch.int32), "absmax_mean": ((mats,), torch.int32)}


def nf4_format(key: str, shape: tuple) -> Optional[tuple[str, None]]:
    """("nf4", None) for a tensor --quantize nf4 stores in 4 bits (a layer linear (out, in), an expert stack
    (E, out, in)); None for one that stays float (embeddings, norms, router, output head)."""
    if (_LINEAR_KEY.fullmatch(key) and len(shape) == 2) or (_EXPERTS_KEY.fullmatch(key) and len(shape) == 3):
        return "nf4", None
    return None


def nf4_tensors(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A float weight's four NF4 arrays, as nf4_saved_layout says (what a quantized checkpoint stores)."""
    w = NF4Weight(weight)
    return {name: getattr(w, name).data for name in NF4_ARRAYS}


def nf4_nbytes(shape: tuple) -> int:
    """Bytes NF4Weight stores for a weight of `shape` (*lead, out, in): codes, int8 scales, their float32 scales
    and mean (~0.516 bytes per weight)."""
    mats = math.prod(shape[:-2])
    nb = math.ceil(shape[-2] * shape[-1] / BLOCK)
    ng = math.ceil(nb / SCALE_GROUP)
    return mats * (nb * BLOCK // 2 + ng * SCALE_GROUP + 4 * ng + 4)


def _frozen_param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.contiguous().view(-1), requires_grad=False)


class NF4Weight(nn.Module):
    """A frozen weight (*lead, out, in) stored in NF4; `dequantize(index)` gives it (or lead slice `index`) back.

    Storage (S = the matrices of the stack, nb = 64-weight blocks per matrix, ng = groups of 256 blocks), each flat:
    packed (S*nb*32,) uint8, absmax_q (S*ng*256,) int8, absmax_scale (S*ng,) and absmax_mean (S,) float32 bits."""

    @classmethod
    def from_saved(cls, shape: tuple, dtype: torch.dtype, tensors: dict[str, torch.Tensor]) -> "NF4Weight":
        """The NF4Weight whose four arrays (nf4_saved_layout's) are `tensors`, as saved; `dtype` is the one it
        dequantizes to."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.shape, self.dtype, self.n_mats = tuple(shape), dtype, math.prod(shape[:-2])
        for name in NF4_ARRAYS:
            setattr(self, name, _frozen_param(tensors[name]))
        return self

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dim() < 2 or not weight.is_floating_point():
            raise ValueError(f"NF4Weight: expected a floating weight of 2+ dims, "
                             f"got {weight.dtype} {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        self.dtype = weight.dtype  # dequantized (compute) dtype
        mats = weight.detach().reshape(-1, self.shape[-2] * self.shape[-1])  # (S, n)
        self.n_mats = mats.shape[0]
        parts = [_quantize_matrix(m) for m in mats]
        absmax = torch.stack([a for _, a in parts])  # (S, nb)
        self.packed = _frozen_param(torch.stack([p for p, _ in parts]))
        q, scale, mean = _quantize_scales(absmax)
        self.absmax_q = _frozen_param(q)
        # float32 scales kept as their int32 bit pattern, so model.to(bfloat16) cannot round them
        self.absmax_scale = _frozen_param(scale.contiguous().view(torch.int32))
        self.absmax_mean = _frozen_param(mean.contiguous().view(torch.int32))

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def nbytes(self) -> int:
        """Bytes of the whole quantized weight (the four arrays, unsharded)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def _codes(self) -> torch.Tensor:
        return self.packed.view(self.n_mats, -1)  # (S, nb*32)

    def absmax(self) -> torch.Tensor:
        """The dequantized per-block absmax (S, nb)."""
        S = self.n_mats
        nb = self.packed.numel() // S * 2 // BLOCK
        scale, mean = self.absmax_scale.view(torch.float32).view(S, -1), self.absmax_mean.view(torch.float32)
        groups = self.absmax_q.view(S, -1, SCALE_GROUP).float() * scale[..., None]
        return groups.view(S, -1)[:, :nb] + mean[:, None]

    def dequantize(self, index: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The whole weight (*lead, out, in), or matrix `index` of a stack (out, in), in `dtype` (default: original).

        Decoded CHUNK weights at a time into the output, so the float32 temporaries stay small (this runs in every
        forward and backward of a QLoRA layer; a 70B down_proj has 235M weights).
        """
        codes = self._codes()
        packed = codes if index is None else codes[index:index + 1]  # (S, nb*32)
        absmax = self.absmax() if index is None else self._absmax_row(index)  # (S, nb)
        S, n = packed.shape[0], self.shape[-2] * self.shape[-1]
        pair = _byte_pairs(packed.device)
        out = torch.empty(S, packed.shape[1] * 2, dtype=dtype or self.dtype, device=packed.device)
        for s in range(0, packed.shape[1], CHUNK // 2):
            p = packed[:, s:s + CHUNK // 2]  # (S, c/2)
            w = F.embedding(p.int(), pair).view(S, -1, BLOCK)  # (S, c/64, 64) float32
            w *= absmax[:, s * 2 // BLOCK:(s + p.shape[1]) * 2 // BLOCK, None]
            out[:, s * 2:s * 2 + w.shape[1] * BLOCK] = w.view(S, -1)
        out = out[:, :n]
        return out.reshape(self.shape) if index is None else out.view(self.shape[-2:])

    def _absmax_row(self, index: int) -> torch.Tensor:
        S = self.n_mats
        nb = self.packed.numel() // S * 2 // BLOCK
        q = self.absmax_q.view(S, -1)[index:index + 1]
        scale = self.absmax_scale.view(torch.float32).view(S, -1)[index:index + 1]
        return ((q.view(1, -1, SCALE_GROUP).float() * scale[..., None]).view(1, -1)[:, :nb]
                + self.absmax_mean.view(torch.float32)[index:index + 1, None])

    def linear(self, x: torch.Tensor, index: Optional[int] = None) -> torch.Tensor:
        """x @ W^T (matrix `index` of a stack): nf4_linear. (..., in) -> (..., out)"""
        return nf4_linear(x, self, index)

    def grouped_linear(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Rows grouped by matrix (offsets: (E,) int32 running ends) times each one's W[e]^T: nf4_grouped_linear.
        (M, in) -> (M, out)"""
        return nf4_grouped_linear(xs, self, offsets)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, nf4"


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward, so no full-precision copy is kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: NF4Weight, index: Optional[int]) -> torch.Tensor:
        ctx.weight, ctx.index = weight, index
        return F.linear(x, weight.dequantize(index, x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        w = ctx.weight.dequantize(ctx.index, grad_out.dtype)  # (out, in)
        return grad_out @ w, None, None  # the 4-bit weight is frozen: no gradient for it


def nf4_linear(x: torch.Tensor, weight: NF4Weight, index: Optional[int] = None) -> torch.Tensor:
    """F.linear(x, W) for an NF4 weight W (matrix `index` of a stack). (..., in) -> (..., out)

    With autograd on (QLoRA training) W is dequantized whole, in forward and again in backward (_NF4Matmul). With
    autograd off (no_grad / inference_mode): on CPU nf4_inference_linear never forms the whole float W; on CUDA one
    row (decoding) goes through the same compiled fused matvec (a Triton kernel there: it reads the 4-bit codes,
    not a dequantized copy), more rows (a prefill, where the matmul dominates) through the whole dequantized W."""
    if not torch.is_grad_enabled():
        if x.device.type == "cpu":
            return nf4_inference_linear(x, weight, index)
        if x.device.type == "cuda":
            y = _nf4_row(x, weight, index)
            if y is not None:
                return y
    return _NF4Matmul.apply(x, weight, index)


# ---- inference on CPU without the whole float weight ----

ROW_BLOCK = 1 << 20  # weights dequantized at a time by the blockwise path (4 MB in float32)
_compiled = {"fn": None, "shapes": set(), "failed": False}  # the fused decode matvec, compiled per device and shape


def _nf4_matvec(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """One row through an NF4 matrix, for torch.compile to fuse into one pass over the codes (the float weight is
    never stored). x (in,) float32, codes (out, in/2) uint8, absmax (out, in/64), pairs (256, 2) -> (out,) float32"""
    out, half = codes.shape
    w = pairs[codes.int()].view(out, half * 2 // BLOCK, BLOCK)  # (out, blocks, 64): the code values, unscaled
    part = (w * x.view(-1, BLOCK)).sum(-1)  # (out, blocks)
    return (part * absmax).sum(-1)  # each block's absmax applied once, to its partial sum


def _fused_matvec(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor) -> Optional[torch.Tensor]:
    """_nf4_matvec compiled by inductor (one C++ kernel per weight shape), or None where that is not possible here:
    compiling failed once (no C++ compiler, say), or the shape would pass dynamo's recompile limit (past it dynamo
    runs the function eagerly, which forms the whole weight)."""
    pairs = _byte_pairs(x.device)
    if torch.compiler.is_compiling():  # inside a compiled decode step: traced into that graph
        return _nf4_matvec(x, codes, absmax, pairs)
    c, key = _compiled, (x.device.type, tuple(codes.shape))
    if c["failed"] or (key not in c["shapes"] and len(c["shapes"]) >= torch._dynamo.config.recompile_limit):
        return None
    if c["fn"] is None:
        c["fn"] = torch.compile(_nf4_matvec, dynamic=False)
    try:
        y = c["fn"](x, codes, absmax, pairs)
    except Exception as e:  # inductor raises many types when it cannot build; the blockwise path gives the same
        c["failed"] = True
        warnings.warn(f"NF4: torch.compile of the decode matvec failed on this machine ({type(e).__name__}); "
                      "using the blockwise dequantize-matmul instead", stacklevel=3)
        return None
    c["shapes"].add(key)
    return y


def _dequantize_rows(codes: torch.Tensor, absmax: torch.Tensor, rows: tuple[int, int], n_in: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """Rows r0:r1 of one NF4 matrix, as NF4Weight.dequantize computes them (the same values, bit for bit), from the
    64-weight blocks they touch. codes (nb*32,) uint8, absmax (nb,) float32 -> (r1 - r0, n_in)"""
    s, e = rows[0] * n_in, rows[1] * n_in
    b0, b1 = s // BLOCK, -(-e // BLOCK)
    w = F.embedding(codes[b0 * BLOCK // 2:b1 * BLOCK // 2].int(), _byte_pairs(codes.device)).view(-1, BLOCK)
    w *= absmax[b0:b1, None]  # (blocks, 64) float32
    return w.view(-1)[s - b0 * BLOCK:e - b0 * BLOCK].view(rows[1] - rows[0], n_in).to(dtype)


def _nf4_row(x: torch.Tensor, weight: NF4Weight, index: Optional[int]) -> Optional[torch.Tensor]:
    """One row of x through the compiled fused matvec (matrix `index` of W), or None where it does not apply: more
    than one row, rows that do not split into whole 64-weight blocks, or no compiled kernel. (..., in) -> (..., out)"""
    out, n_in = weight.shape[-2:]
    if x.numel() != n_in or n_in % BLOCK:  # a block must never straddle two rows
        return None
    mat = 0 if index is None else index
    codes, absmax = weight._codes()[mat], weight._absmax_row(mat)[0]  # (nb*32,), (nb,)
    y = _fused_matvec(x.reshape(n_in).float().contiguous(), codes.view(out, n_in // 2), absmax.view(out, -1))
    return None if y is None else y.to(x.dtype).view(*x.shape[:-1], out)


def nf4_inference_linear(x: torch.Tensor, weight: NF4Weight, index: Optional[int] = None) -> torch.Tensor:
    """F.linear(x, W) for an NF4 W (matrix `index` of a stack) holding at most ROW_BLOCK float weights at a time: one
    row (decode) through the compiled fused matvec when it applies, else W's rows a block at a time. No autograd.
    (..., in) -> (..., out)"""
    y = _nf4_row(x, weight, index)
    if y is not None:
        return y
    out, n_in = weight.shape[-2:]
    mat = 0 if index is None else index
    codes, absmax = weight._codes()[mat], weight._absmax_row(mat)[0]  # (nb*32,), (nb,)
    x2 = x.reshape(-1, n_in)  # (M, in)
    rows = max(1, ROW_BLOCK // n_in)
    y = torch.empty(x2.shape[0], out, dtype=x.dtype, device=x.device)
    for r in range(0, out, rows):
        y[:, r:r + rows] = F.linear(x2, _dequantize_rows(codes, absmax, (r, min(out, r + rows)), n_in, x.dtype))
    return y.view(*x.shape[:-1], out)


class NF4Linear(nn.Module):
    """A bias-free nn.Linear whose frozen weight is NF4."""

    def __init__(self, weight: torch.Tensor | NF4Weight):
        super().__init__()
        self.weight = weight if isinstance(weight, NF4Weight) else NF4Weight(weight)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight)


class _NF4GroupedMatmul(torch.autograd.Function):
    """Grouped x @ W[e]^T over an NF4 expert stack, dequantized in forward and again in backward (nothing kept)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, weight: NF4Weight, offsets: torch.Tensor) -> torch.Tensor:
        ctx.weight = weight
        ctx.save_for_backward(offsets)
        return grouped_linear(xs, weight.dequantize(None, xs.dtype), offsets)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (offsets,) = ctx.saved_tensors
        w = ctx.weight.dequantize(None, grad_out.dtype)  # (E, out, in)
        return torch._grouped_mm(grad_out.contiguous(), w, offs=offsets), None, None


def nf4_grouped_linear(xs: torch.Tensor, weight: NF4Weight, offsets: torch.Tensor) -> torch.Tensor:
    """moe.grouped_linear for an NF4 stack (E, out, in): one dequantized stack alive at a time. (M, in) -> (M, out)"""
    return _NF4GroupedMatmul.apply(xs, weight, offsets)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent, _, leaf = path.rpartition(".")
    return model.get_submodule(parent), leaf


def load_quantized_(model: nn.Module, key: str, tensor: torch.Tensor) -> bool:
    """Quantize `tensor` into the model if `key` is a layer's linear weight; False leaves the key to the caller.

    Works on a model built on the meta device: the module is replaced by its NF4 twin on `tensor`'s device.
    """
    m = _LINEAR_KEY.fullmatch(key) or _EXPERTS_KEY.fullmatch(key)
    if m is None:
        return False
    parent, leaf = _parent(model, m.group(1))
    current = getattr(parent, leaf)
    held = current.weight if m.re is _LINEAR_KEY else getattr(current, m.group(2))
    if held is not None and tuple(held.shape) != tuple(tensor.shape):
        raise ValueError(f"load_quantized_: {key} has shape {tuple(tensor.shape)}, "
                         f"the model expects {tuple(held.shape)}")
    set_nf4_(model, key, NF4Weight(tensor))
    return True


def set_nf4_(model: nn.Module, key: str, weight: NF4Weight) -> None:
    """Put an NF4 weight in the model at `key`: a layer linear's becomes an NF4Linear; an expert stack goes into the
    layer's moe.QuantizedExperts, which replaces its Experts when the first of w1/w2/w3 arrives."""
    m = _LINEAR_KEY.fullmatch(key)
    if m:
        parent, leaf = _parent(model, m.group(1))
        setattr(parent, leaf, NF4Linear(weight))
        return
    m = _EXPERTS_KEY.fullmatch(key)
    parent, leaf = _parent(model, m.group(1))
    experts = getattr(parent, leaf)
    if isinstance(experts, Experts):  # first of w1/w2/w3 to arrive: the rest are filled as they come
        experts = QuantizedExperts()
        setattr(parent, leaf, experts)
    setattr(experts, m.group(2), weight)


@torch.no_grad()
def quantize_model_nf4(model: nn.Module) -> nn.Module:
    """Quantize an already-built model's layer linears (and expert stacks) to NF4 in place."""
    for name, p in list(model.named_parameters()):
        load_quantized_(model, name, p.data)
    return model

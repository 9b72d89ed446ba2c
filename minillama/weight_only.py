"""Weight-only int8 and int4 linears for inference, in the formats gpt-fast and torchao use.

- int8: one scale per output row, symmetric: q = round(w / s) in -127..127, s = max|w_row| / 127; y = (x @ q^T) * s.
- int4: groups of G = 32 (int4; llama.cpp's q4_0 block), 64 or 128 (int4-g64, int4-g128; torchao's default)
  consecutive weights along a row (a smaller G where the row length needs it), asymmetric:
  q in 0..15, w ~ (q - 8) * scale + zero with zero = min + 8 * scale, the layout PyTorch's int4 kernels take.

What is quantized: every layer linear, the output head (int8 under int4 too), and Mixtral's expert stacks w1/w2/w3
(E, out, in), each expert as its own matrix (QuantizedStack, run by moe.QuantizedExperts one routed expert at a
time: no grouped kernel takes these formats). Embeddings, norms and the MoE router stay in float.

On CPU a decode step's int8 product (1-16 rows) runs minillama's own kernel (cpu_kernels.small_linear: the codes
streamed once for all rows, widened to float32, times the row's scale), where it can be built; otherwise, and for
int4, PyTorch's packed kernels (torch._weight_int8pack_mm, torch._weight_int4pack_mm_for_cpu), which read the 1- or
0.5-byte weights directly; on a CUDA GPU (compute capability 8.0 and up) int4 runs
torch._weight_int4pack_mm (gpt-fast's tinygemm kernel, bfloat16 activations). Elsewhere, and for shapes a kernel
refuses (int4 rows not a multiple of 16 on CPU, of 8 on CUDA), the weight is dequantized to the activations' dtype
for each matmul. Scales follow the model's dtype (a bfloat16 model keeps bfloat16 scales, as gpt-fast does; the codes
are computed against the scales as stored). Layers are quantized as they load (checkpoint.load_model), one tensor at
a time, or once by `minillama-convert --quantize` into a checkpoint that loads as saved
(checkpoints/quantized.py; it keeps int4 in the "plain" layout, repacked for the kernel on load). LoRA wraps a
quantized linear like any other (lora.LoRALinear calls `weight.linear`).

Measured (tests/test_weight_only.py): on Gaussian weights the relative RMS weight error is ~0.0045 (int8) and ~0.08
(int4, G=32) / ~0.095 (G=128); on SmolLM2-135M the perplexity change is in the README (Deploy section).
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels
from .moe import Experts, QuantizedExperts

INT4_GROUPS = (128, 64, 32)  # the largest (up to the asked one) that divides a row is used
QUANTIZE_NAMES = ("int8", "int4", "int4-g64", "int4-g128")
# the layer linears and the output head, and Mixtral's expert stacks; embeddings, norms and the router stay float
_LINEAR_KEY = re.compile(r"(layers\.\d+\.(?:attention\.w[qkvo]|feed_forward\.w[123])|output)\.weight")
_EXPERTS_KEY = re.compile(r"(layers\.\d+\.feed_forward\.experts)\.(w[123])")  # stacks (E, out, in)


def int4_group_size(in_features: int, largest: int = 128) -> Optional[int]:
    """The int4 group for rows of `in_features` weights: the largest of 128/64/32 (up to `largest`) dividing it."""
    return next((g for g in INT4_GROUPS if g <= largest and in_features % g == 0), None)


def stored_scale(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """exact (float32) scales as stored in dtype, rounded up where the cast rounded down: the codes are then computed
    with the scale the matmul will use (coding against the float32 scale and storing it in bfloat16 scaled each
    row's weights by up to 0.4 %), and no weight needs a code beyond the largest."""
    stored = exact.to(dtype)
    return torch.where(stored.float() < exact, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)


def int4_kernel(device: torch.device, out: int, in_features: int, group_size: int) -> str:
    """Which int4 layout a weight on `device` is held in: "cpu" (rows a multiple of 16), "cuda" (an Ampere or newer
    GPU: rows a multiple of 8, groups of 32 to 256), else "plain" (dequantized for each matmul)."""
    if device.type == "cpu" and out % 16 == 0:
        return "cpu"
    if (device.type == "cuda" and out % 8 == 0 and group_size in (32, 64, 128, 256) and in_features % 32 == 0
            and torch.cuda.get_device_capability(device) >= (8, 0)):
        return "cuda"
    return "plain"


def inner_k_tiles(in_features: int) -> int:
    """The CUDA int4 layout's inner k-tiles (16 columns each): 8, as gpt-fast packs, where the row length allows."""
    return next(k for k in (8, 4, 2) if in_features % (16 * k) == 0)


def int8_quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A (out, in) weight -> {"packed": int8 codes (out, in) in -127..127, "scale": (out,) in the weight's dtype}."""
    w = weight.detach().float()
    scale = stored_scale(w.abs().amax(1).clamp_min(1e-12) / 127, weight.dtype)  # (out,)
    return {"packed": torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}


def int4_quantize(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A (out, in) weight -> {"packed": (out, in/2) uint8 codes 0..15, two per byte, column 2j in the low nibble,
    "scales_and_zeros": (in/G, out, 2) in the weight's dtype}: w ~ (q - 8) * scale + zero."""
    out, n_in = weight.shape
    if n_in % group_size:
        raise ValueError(f"Int4Weight: rows of {n_in} weights do not split into groups of {group_size}")
    w = weight.detach().float().view(out, n_in // group_size, group_size)  # (out, groups, G)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = stored_scale(((hi - lo) / 15).clamp_min(1e-12), weight.dtype)  # (out, groups)
    zero = (lo + 8 * scale.float()).to(weight.dtype)
    lo = zero.float() - 8 * scale.float()  # code 0's value as stored: the codes are computed against it
    q = torch.round((w - lo[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8).view(out, n_in)
    return {"packed": q[:, 0::2] | (q[:, 1::2] << 4),
            "scales_and_zeros": torch.stack([scale, zero], -1).transpose(0, 1).contiguous()}


def _new(cls):
    """An empty instance of a module class, for the constructors from saved tensors."""
    self = cls.__new__(cls)
    nn.Module.__init__(self)
    return self


DEQUANT_ROWS = 256  # int8 on CPU: from this many rows of input, multiply the dequantized weight in float32


class Int8Weight(nn.Module):
    """A frozen (out, in) weight as int8 codes `packed` (out, in) and per-row `scale` (out,) in the weight's dtype."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self._hold(**int8_quantize(weight))

    @classmethod
    def from_saved(cls, packed: torch.Tensor, scale: torch.Tensor) -> "Int8Weight":
        """From int8_quantize's tensors (a quantized checkpoint's), as they are."""
        self = _new(cls)
        self._hold(packed, scale)
        return self

    def _hold(self, packed: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.shape = tuple(packed.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T. (..., in) -> (..., out). On CPU, a prefill of DEQUANT_ROWS rows or more multiplies the weight
        dequantized to float32 (one matrix at a time): the packed kernel is made for decoding's few rows, and at 256
        rows and more MKL's float32 product plus the conversion took half its time here."""
        if x.device.type == "cpu" and x.numel() >= DEQUANT_ROWS * self.shape[1] and not torch.is_grad_enabled():
            return F.linear(x.float(), self.dequantize(dtype=torch.float32)).to(x.dtype)
        if cpu_kernels.takes(x):  # a decode step: minillama's kernel streams the codes once
            return cpu_kernels.product(x, self.packed, self.scale)  # (..., out)
        scale = self.scale.to(x.dtype)
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            y = torch._weight_int8pack_mm(x.reshape(-1, self.shape[1]).contiguous(), self.packed, scale)  # (M, out)
            return y.view(*x.shape[:-1], self.shape[0])
        return F.linear(x, self.packed.to(x.dtype)) * scale

    def dequantize(self, index: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight as the matmul sees it. (out, in)"""
        return (self.packed.float() * self.scale.float()[:, None]).to(dtype or self.dtype)


class Int4Weight(nn.Module):
    """A frozen (out, in) weight in groupwise int4: `packed` (out, in/2) uint8 and `scales_and_zeros`
    (in/G, out, 2) in the weight's dtype. `kernel` says which layout `packed` has: "cpu" is what
    _convert_weight_to_int4pack_for_cpu makes, "cuda" what _convert_weight_to_int4pack makes (int32 tiles,
    (out/8, in/(16 k), 32, k/2) for k inner k-tiles); "plain" holds two codes per byte, the even column in the low
    nibble."""

    def __init__(self, weight: torch.Tensor, group_size: int):
        super().__init__()
        self._hold(**int4_quantize(weight, group_size), group_size=group_size)

    @classmethod
    def from_saved(cls, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> "Int4Weight":
        """From int4_quantize's tensors (a quantized checkpoint's), repacked for the CPU kernel where it applies."""
        self = _new(cls)
        self._hold(packed, scales_and_zeros, group_size)
        return self

    def _hold(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> None:
        """packed: int4_quantize's plain layout (out, in/2), kept as it is or repacked for the device's kernel
        (an exact reordering)."""
        out, n_in = packed.shape[0], packed.shape[1] * 2
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (groups, out, 2)
        self.kernel = int4_kernel(packed.device, out, n_in, group_size)
        if self.kernel == "cpu":
            q = torch.stack([packed & 15, packed >> 4], -1).view(out, n_in).to(torch.int32)  # (out, in)
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in/2) uint8, the kernel's own order
        elif self.kernel == "cuda":  # tinygemm reads the even column from the high nibble (gpt-fast's packing)
            swapped = ((packed & 15) << 4) | (packed >> 4)  # (out, in/2) uint8
            packed = torch._convert_weight_to_int4pack(swapped.contiguous(), inner_k_tiles(n_in))
        self.register_buffer("packed", packed)
        self.shape, self.group_size = (out, n_in), group_size

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.scales_and_zeros.dtype

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T. (..., in) -> (..., out)"""
        if self._kernel_takes(x):
            y = self._packed_mm(x.reshape(-1, self.shape[1]).contiguous())  # (M, out)
            return y.view(*x.shape[:-1], self.shape[0])
        return F.linear(x, self.dequantize(dtype=x.dtype))

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        if self.kernel == "cpu":
            return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        return self.kernel == "cuda" and x.device.type == "cuda" and x.dtype == torch.bfloat16

    def _packed_mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) @ W^T through the device's kernel -> (M, out) in x's dtype."""
        scales_and_zeros = self.scales_and_zeros.to(x.dtype)
        if self.kernel == "cpu":
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, scales_and_zeros)
        return torch._weight_int4pack_mm(x, self.packed, self.group_size, scales_and_zeros)

    @torch.no_grad()
    def dequantize(self, index: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight as the matmul sees it. (out, in)"""
        dtype = dtype or self.dtype
        out, n_in = self.shape
        if self.kernel != "plain":  # a kernel's own layout is opaque: read W^T back through it, 1024 rows at a time
            eye_dtype = torch.float32 if self.kernel == "cpu" else torch.bfloat16  # what the kernel takes
            cols = []
            for s in range(0, n_in, 1024):
                eye = torch.eye(n_in, dtype=eye_dtype, device=self.device)[s:s + 1024]  # (c, in)
                cols.append(self._packed_mm(eye))  # (c, out)
            return torch.cat(cols).t().to(dtype)
        q = torch.stack([self.packed & 15, self.packed >> 4], -1).view(out, n_in // self.group_size, -1)
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (out, groups) each
        return ((q.float() - 8) * scale[..., None] + zero[..., None]).view(out, n_in).to(dtype)


class QuantizedStack(nn.Module):
    """A frozen stack of E (out, in) weights, one Int8Weight / Int4Weight per matrix: a Mixtral expert stack
    (E, out, in) under weight-only int8/int4. `linear(x, e)` multiplies by matrix e (moe's ExpertStack loop).
    `groupable` False: no grouped GEMM takes these formats (moe.grouped_mm_ok)."""

    groupable = False

    def __init__(self, weights: list[nn.Module]):
        super().__init__()
        self.matrices = nn.ModuleList(weights)
        self.shape = (len(weights), *weights[0].shape)

    @property
    def device(self) -> torch.device:
        return self.matrices[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.matrices[0].dtype

    def linear(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W[e]^T. (..., in) -> (..., out)"""
        return self.matrices[e].linear(x)

    def dequantize(self, index: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Matrix `index` (out, in), or the whole stack (E, out, in), as the matmul sees it."""
        if index is not None:
            return self.matrices[index].dequantize(dtype=dtype)
        return torch.stack([m.dequantize(dtype=dtype) for m in self.matrices])


class QuantLinear(nn.Module):
    """A bias-free linear whose frozen `weight` is an Int8Weight or Int4Weight."""

    def __init__(self, weight: nn.Module):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.linear(x)


def parse_quantize(name: str) -> tuple[str, Optional[int]]:
    """'int8' -> ('int8', None); 'int4' -> ('int4', 32); 'int4-g128' -> ('int4', 128)."""
    if name not in QUANTIZE_NAMES:
        raise ValueError(f"quantize {name!r}: expected one of {', '.join(QUANTIZE_NAMES)} or nf4")
    return ("int8", None) if name == "int8" else ("int4", int(name.split("-g")[1]) if "-g" in name else 32)


def weight_format(name: str, key: str, shape: tuple) -> Optional[tuple[str, Optional[int]]]:
    """How quantize `name` stores the model tensor `key` of `shape`: ('int8', None), ('int4', G), or None when it
    stays in float (not a layer linear, an expert stack (E, out, in) or the head, or no int4 group divides its rows).
    The output head is int8 under int4 too (llama.cpp keeps the head at higher precision). An expert stack's
    matrices each take the format a linear of their shape would."""
    m = _LINEAR_KEY.fullmatch(key)
    if not ((m is not None and len(shape) == 2) or (_EXPERTS_KEY.fullmatch(key) and len(shape) == 3)):
        return None
    kind, largest = parse_quantize(name)
    if kind == "int8" or (m is not None and m.group(1) == "output"):
        return "int8", None
    group = int4_group_size(shape[-1], largest)
    return None if group is None else ("int4", group)


def saved_layout(fmt: tuple[str, Optional[int]], shape: tuple, dtype: torch.dtype) -> dict[str, tuple]:
    """{tensor suffix: (shape, dtype)} that int8_quantize / int4_quantize make for a (out, in) weight of `dtype`;
    an expert stack (E, out, in) holds its E matrices' tensors stacked along a first dim of E."""
    *lead, out, n_in = shape
    lead = tuple(lead)
    if fmt[0] == "int8":
        return {"packed": (lead + (out, n_in), torch.int8), "scale": (lead + (out,), dtype)}
    return {"packed": (lead + (out, n_in // 2), torch.uint8),
            "scales_and_zeros": (lead + (n_in // fmt[1], out, 2), dtype)}


def _matrix_quantize(fmt: tuple[str, Optional[int]], weight: torch.Tensor) -> dict[str, torch.Tensor]:
    return int8_quantize(weight) if fmt[0] == "int8" else int4_quantize(weight, fmt[1])


def quantize_weight(fmt: tuple[str, Optional[int]], weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A (out, in) weight, or an expert stack (E, out, in) matrix by matrix, in format `fmt` (weight_format's), as
    saved_layout says."""
    if weight.dim() == 2:
        return _matrix_quantize(fmt, weight)
    parts = [_matrix_quantize(fmt, w) for w in weight]
    return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}


def _matrix_from_saved(fmt: tuple[str, Optional[int]], tensors: dict[str, torch.Tensor]) -> nn.Module:
    if fmt[0] == "int8":
        return Int8Weight.from_saved(tensors["packed"], tensors["scale"])
    return Int4Weight.from_saved(tensors["packed"], tensors["scales_and_zeros"], fmt[1])


def weight_from_saved(fmt: tuple[str, Optional[int]], tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The Int8Weight / Int4Weight (or, for stacked tensors, the QuantizedStack) quantize_weight's tensors describe
    (shapes checked by the caller)."""
    if tensors["packed"].dim() == 2:
        return _matrix_from_saved(fmt, tensors)
    n = tensors["packed"].shape[0]
    return QuantizedStack([_matrix_from_saved(fmt, {k: t[e].contiguous() for k, t in tensors.items()})
                           for e in range(n)])


def _quantized(fmt: tuple[str, Optional[int]], weight: torch.Tensor) -> nn.Module:
    """The module holding `weight` (a matrix, or an expert stack matrix by matrix) in format `fmt`."""
    if weight.dim() == 3:
        return QuantizedStack([_quantized(fmt, w) for w in weight])
    return Int8Weight(weight) if fmt[0] == "int8" else Int4Weight(weight, fmt[1])


def load_weight_only_(model: nn.Module, key: str, tensor: torch.Tensor, name: str) -> bool:
    """Quantize `tensor` into the model if `key` is a layer linear's weight or an expert stack; False leaves it to
    the caller (checkpoint.load_model, which quantizes the head once it is loaded or tied). Works on a meta-device
    model."""
    if key == "output.weight":
        return False
    fmt = weight_format(name, key, tuple(tensor.shape))
    if fmt is None:
        return False
    set_quantized_(model, key, _quantized(fmt, tensor))
    return True


def set_quantized_(model: nn.Module, key: str, weight: nn.Module) -> None:
    """Put `weight` in the model at `key`: a linear's ('layers.0.attention.wq.weight') becomes a QuantLinear on
    it; an expert stack ('layers.0.feed_forward.experts.w1') goes into the layer's moe.QuantizedExperts, which
    replaces its Experts when the first of w1/w2/w3 arrives."""
    m = _EXPERTS_KEY.fullmatch(key)
    if m is not None:
        parent, _, leaf = m.group(1).rpartition(".")
        experts = getattr(model.get_submodule(parent), leaf)
        if isinstance(experts, Experts):
            experts = QuantizedExperts()
            setattr(model.get_submodule(parent), leaf, experts)
        setattr(experts, m.group(2), weight)
        return
    parent, _, leaf = key.removesuffix(".weight").rpartition(".")
    setattr(model.get_submodule(parent), leaf, QuantLinear(weight))


@torch.no_grad()
def quantize_head_(model: nn.Module, name: str) -> None:
    """The output head as int8 (its own copy when tied: the embedding rows stay in float for the lookup)."""
    if isinstance(model.output, nn.Linear):
        w = model.output.weight.data
        set_quantized_(model, "output.weight", _quantized(weight_format(name, "output.weight", tuple(w.shape)), w))


@torch.no_grad()
def quantize_model_(model: nn.Module, name: str) -> nn.Module:
    """Quantize an already-built model's layer linears, expert stacks and output head in place."""
    for key, p in list(model.named_parameters()):
        load_weight_only_(model, key, p.data, name)
    quantize_head_(model, name)
    return model

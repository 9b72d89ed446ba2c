"""LoRA adapters as PEFT files: adapter_config.json + adapter_model.safetensors that `PeftModel.from_pretrained` loads.

Keys are PEFT's, without the adapter name: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight.
Our wq/wk rows are in Meta (interleaved RoPE) order and HF's q_proj/k_proj rows are not, so lora_B of q/k is
row-permuted on save and load (lora_A acts on the input and is unaffected): the adapter means the same function.
Mixtral experts are written in the hub layout, one module per expert (block_sparse_moe.experts.E.w1/w2/w3, router
block_sparse_moe.gate), which PEFT + transformers >= 5 fuse on load into mlp.experts.gate_up_proj/down_proj.
We also read the fused layout PEFT writes for transformers 5 (mlp.experts.base_layer = gate_up_proj,
mlp.experts = down_proj), splitting gate_up's shared-A factor into w1/w3.
What the dir holds besides the factors (whole modules_to_save, base_rope.json) is in peft_extras.py.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import regex
import torch
from safetensors.torch import save_file

from .peft_extras import (BASE_ROPE_NAME, CONFIG_NAME, PREFIX, SAVED_MODULE, WEIGHTS_NAME, add_modules_to_save,
                          load_modules_to_save, read_adapter_tensors, warn_other_rope)
from ..args import ModelArgs, rope_settings
from ..hf_names import hf_module_to_meta, meta_module_to_hf, permute_to_hf, permute_to_meta
from ..util.files import atomic_dir, read_json, write_json
from .layers import LoRAHParams, LoRALinear, wrap_module
from .experts import LoRAExperts
from .slots import adapter_names, lora_modules, lora_scaling

_V4_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])")
_V5_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts(\.base_layer)?")
_LAYER = re.compile(r"layers\.(\d+)\.")


def _qk_heads(path: str, args: ModelArgs) -> Optional[int]:
    """Heads whose rows a q/k projection holds (for the RoPE row permutation); None for every other module."""
    leaf = path.rpartition(".")[2]
    return {"wq": args.n_heads, "wk": args.n_kv_heads}.get(leaf) if ".attention." in f".{path}" else None


PATTERN_TIMEOUT_S = 1.0  # a module name is short: a pattern that needs longer backtracks catastrophically


def _pattern_value(patterns: dict, name: str, default, source: str = "adapter_config.json"):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name's tail as a regex (run with a time
    bound: the pattern comes from a file)."""
    for key, value in (patterns or {}).items():
        try:
            hit = regex.match(rf"(.*\.)?({key})$", name, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise ValueError(f"{source}: pattern {key!r} took over {PATTERN_TIMEOUT_S:g} s to match the module name "
                             f"{name!r} (catastrophic backtracking?); simplify it") from None
        if hit:
            return value
    return default


def _check_patterns(cfg: dict, cfg_file) -> None:
    """rank_pattern values are ranks >= 1, alpha_pattern values numbers > 0, every key a valid regex."""
    for key, ok, rule in (("rank_pattern", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
                          ("alpha_pattern", lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v > 0,
                           "a number > 0")):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{cfg_file}: {key} must be an object of module pattern -> value")
        for pat, v in patterns.items():
            if isinstance(v, bool) or not ok(v):
                raise ValueError(f"{cfg_file}: {key}[{pat!r}] must be {rule}, got {v!r}")
            try:
                regex.compile(rf"(.*\.)?({pat})$")
            except regex.error as e:
                raise ValueError(f"{cfg_file}: {key} key {pat!r} is not a valid regex ({e})") from None


# ---- save ----
@dataclass
class PeftModule:
    """One PEFT LoRA module as written: its HF path, factors in HF row order, rank, scaling, DoRA magnitude."""

    hf: str
    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    rank: int
    scaling: float
    magnitude: Optional[torch.Tensor] = None  # (out,), HF row order


def peft_module(path: str, a: torch.Tensor, b: torch.Tensor, rank: int, scaling: float, args: ModelArgs,
                magnitude: Optional[torch.Tensor] = None) -> PeftModule:
    """Our linear module `path` with factors in our (Meta) row order -> its PEFT module (q/k rows to HF order)."""
    hf = meta_module_to_hf(path)
    if hf is None:
        raise ValueError(f"save_adapter: LoRA module {path} has no Hugging Face name")
    heads = _qk_heads(path, args)
    if heads is not None:
        b = permute_to_hf(b, heads, args.head_dim)
        magnitude = None if magnitude is None else permute_to_hf(magnitude, heads, args.head_dim)
    return PeftModule(hf, a, b, rank, scaling, magnitude)


def expert_modules(layer: int, w: str, a: torch.Tensor, b: torch.Tensor, rank: int, scaling: float) -> list:
    """Stacked expert factors A (E, r, in), B (E, out, r) -> the hub layout's per-expert PEFT modules."""
    return [PeftModule(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}", a[e], b[e], rank, scaling)
            for e in range(a.shape[0])]


def _the_adapter(model: torch.nn.Module, name: Optional[str]) -> str:
    names = adapter_names(model)
    if name is None:
        if len(names) > 1:
            raise ValueError(f"save_adapter: the model holds adapters {', '.join(names)}; say which (name=...)")
        return names[0]
    if name not in names:
        raise ValueError(f"save_adapter: no adapter named {name!r}; loaded: {', '.join(names)}")
    return name


def _peft_modules(model: torch.nn.Module, name: str) -> list[PeftModule]:
    """Every module of adapter `name` in PEFT's layout: q/k lora_B rows in HF order, experts one module each."""
    args: ModelArgs = model.args
    out = []
    for path, m in lora_modules(model):
        slot = m.slot_of(name)
        if slot is None:
            continue
        o = m.owner(slot)
        if isinstance(m, LoRALinear):
            mag = None if o.lora_magnitude is None else o.lora_magnitude.detach()
            out.append(peft_module(path, o.lora_a.detach(), o.lora_b.detach(), o.rank, o.scaling, args, mag))
            continue
        layer = int(_LAYER.match(path).group(1))
        for w in o.targets:
            out += expert_modules(layer, w, getattr(o, f"lora_{w}_a").detach(), getattr(o, f"lora_{w}_b").detach(),
                                  o.rank[w], o.scaling[w])
    return out


def peft_config(modules: list[PeftModule], base: Optional[str], use_rslora: bool = False,
                dropout: float = 0.0) -> dict:
    """adapter_config.json: the most common rank/alpha as r/lora_alpha, the others as PEFT rank/alpha patterns."""
    def alpha_of(rank, scaling):  # rounded: alpha / r * r can come back as 16.000000000000004
        return round(scaling * (rank ** 0.5 if use_rslora else rank), 9)

    dora = {m.magnitude is not None for m in modules}
    if len(dora) != 1:
        raise ValueError("save_adapter: some layers are DoRA and some are not; PEFT has one use_dora flag")
    r = Counter((m.rank, round(m.scaling, 12)) for m in modules).most_common(1)[0][0][0]
    r_scaling = next(m.scaling for m in modules if m.rank == r)
    lora_alpha = alpha_of(r, r_scaling)
    lora_alpha = int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha
    rank_pattern, alpha_pattern = {}, {}
    for m in modules:  # layers whose rank/scaling differ keep them via PEFT's patterns
        if m.rank != r or abs(m.scaling - r_scaling) > 1e-12 * abs(r_scaling):
            rank_pattern[re.escape(m.hf)] = m.rank
            alpha_pattern[re.escape(m.hf)] = alpha_of(m.rank, m.scaling)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": lora_alpha, "lora_dropout": dropout,
        "target_modules": sorted({m.hf.rpartition(".")[2] for m in modules}),
        "use_rslora": use_rslora, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_dora": dora.pop(), "lora_bias": False,
        "target_parameters": None, "revision": None,
    }


def write_adapter(out_dir: str | os.PathLike, modules: list[PeftModule], config: dict, overwrite: bool = True,
                  extra_files: Optional[dict] = None, extra_tensors: Optional[dict] = None) -> Path:
    """adapter_model.safetensors (+ extra tensors, e.g. modules_to_save) + adapter_config.json (+ extra JSON
    files) into out_dir, atomically."""
    tensors = dict(extra_tensors or {})
    for m in modules:
        tensors[f"{PREFIX}{m.hf}.lora_A.weight"] = m.a.cpu().contiguous()
        tensors[f"{PREFIX}{m.hf}.lora_B.weight"] = m.b.cpu().contiguous()
        if m.magnitude is not None:
            tensors[f"{PREFIX}{m.hf}.lora_magnitude_vector"] = m.magnitude.cpu().contiguous()
    with atomic_dir(out_dir, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config)
        for file_name, value in (extra_files or {}).items():
            write_json(tmp / file_name, value)
    return Path(out_dir)


def save_adapter(model: torch.nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: Optional[str] = None,
                 overwrite: bool = True, name: Optional[str] = None) -> Path:
    """Write one of the model's adapters (`name`; default: the only one) as a PEFT adapter dir, atomically; an
    existing adapter dir is replaced whole (overwrite=False refuses a non-empty dir instead, as save_hf does)."""
    if not lora_modules(model):
        raise ValueError("save_adapter: the model has no LoRA layers; call apply_lora or load_adapter first")
    name = _the_adapter(model, name)
    modules = _peft_modules(model, name)
    owners = [m.owner(m.slot_of(name)) for _, m in lora_modules(model) if m.slot_of(name) is not None]
    rslora = {o.use_rslora for o in owners}
    if len(rslora) != 1:
        raise ValueError("save_adapter: some LoRA layers use rsLoRA and some do not; PEFT has one use_rslora flag")
    mods = [m for _, m in lora_modules(model) if m.slot_of(name) == 0]
    dropout = max((m.dropout.p if isinstance(m.dropout, torch.nn.Dropout) else 0.0 for m in mods), default=0.0)
    config = peft_config(modules, base_model_name_or_path, rslora.pop(), dropout)
    whole: dict = {}
    add_modules_to_save(model, config, whole)
    return write_adapter(out_dir, modules, config, overwrite, extra_files={BASE_ROPE_NAME: rope_settings(model.args)},
                         extra_tensors=whole)


# ---- read / load ----
def read_adapter_config(path: str | os.PathLike) -> dict:
    """adapter_config.json, checked for what this LoRA implementation supports."""
    cfg_file = Path(path) / CONFIG_NAME
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: not a PEFT adapter dir")
    cfg = read_json(cfg_file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, ok in (("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{cfg_file}: {key}={cfg[key]!r} is not supported (expected {ok!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 or not isinstance(alpha, (int, float)) \
            or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{cfg_file}: r={r!r} and lora_alpha={alpha!r} must be positive")
    _check_patterns(cfg, cfg_file)
    saved = cfg.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(n, str) for n in saved)):
        raise ValueError(f"{cfg_file}: modules_to_save must be a list of module names, got {saved!r}")
    return cfg


def _read_pairs(path: Path, use_dora: bool) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """(weights file, {HF module path: {"A": lora_A, "B": lora_B, "M": DoRA magnitude}}) from
    adapter_model.safetensors (or .bin)."""
    wfile, state = read_adapter_tensors(path)
    pairs: dict[str, dict] = defaultdict(dict)
    for key, t in state.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(?:lora_([AB])(?:\.default)?\.weight"
                         r"|(lora_magnitude_vector)(?:\.default)?(?:\.weight)?)", key)
        if m is None and SAVED_MODULE.fullmatch(key):
            continue  # a whole module (modules_to_save): read_modules_to_save checks it
        if m is None:
            raise ValueError(f"{wfile}: unsupported key {key!r} (expected base_model.model.<module>.lora_A/B.weight "
                             "or .lora_magnitude_vector)")
        if not t.is_floating_point():
            raise ValueError(f"{wfile}: {key} is {t.dtype}; LoRA factors must be floating point")
        pairs[m.group(1)][m.group(2) or "M"] = t
    for hf, ab in pairs.items():
        if not {"A", "B"} <= set(ab):
            raise ValueError(f"{wfile}: module {hf} has lora_{'A' if 'A' in ab else 'B'} but not its partner")
        if ("M" in ab) != use_dora:
            raise ValueError(f"{wfile}: module {hf} {'has' if 'M' in ab else 'lacks'} a lora_magnitude_vector but "
                             f"{CONFIG_NAME} says use_dora={use_dora}")
    return wfile, pairs


def _fused_expert_factors(hf: str, a, b, layer: str, args: ModelArgs, scaling_for, wfile) -> dict:
    """PEFT's transformers-5 fused experts (gate_up_proj with one A shared by w1/w3, down_proj) -> stacked factors."""
    E, Fd, D = args.n_experts, args.hidden_dim, args.dim
    if not E or a.shape[0] % E:
        raise ValueError(f"{wfile}: {hf} is a fused-experts LoRA (A {tuple(a.shape)}) but the model has {E} experts")
    rank = a.shape[0] // E
    a3 = a.view(E, rank, -1)  # PEFT ParamWrapper: A rows are (expert, rank)
    b3 = b.view(b.shape[0], rank, E).permute(2, 0, 1)  # B columns are (rank, expert) -> (E, out, r)
    target = f"layers.{layer}.feed_forward.experts"
    if b.shape[0] == 2 * Fd and a.shape[1] == D:  # gate_up_proj: gate rows first, then up
        s = scaling_for(hf.replace(".base_layer", "") + ".gate_up_proj", rank)
        return {(target, "w1"): (a3, b3[:, :Fd], s, None), (target, "w3"): (a3.clone(), b3[:, Fd:], s, None)}
    if b.shape[0] == D and a.shape[1] == Fd:
        return {(target, "w2"): (a3, b3, scaling_for(hf.replace(".base_layer", "") + ".down_proj", rank), None)}
    raise ValueError(f"{wfile}: {hf} factors A {tuple(a.shape)} / B {tuple(b.shape)} fit neither "
                     f"gate_up_proj ({E}x(2*{Fd}), {D}) nor down_proj ({E}x{D}, {Fd}) of this model")


def _linear_factors(hf: str, a, b, magnitude, args: ModelArgs, scaling: float, wfile) -> dict:
    """One HF linear module's factors under our module path, q/k lora_B rows (and magnitude) in Meta order."""
    ours = hf_module_to_meta(hf)
    if ours is None:
        raise ValueError(f"{wfile}: module {hf} is not a module of a Llama/Mistral/Mixtral model")
    heads = _qk_heads(ours, args)
    if heads is not None:
        if b.shape[0] != heads * args.head_dim:
            raise ValueError(f"{wfile}: {hf}.lora_B has {b.shape[0]} rows; this model's {ours} has "
                             f"{heads * args.head_dim} ({heads} heads x {args.head_dim}): another model size?")
        b = permute_to_meta(b, heads, args.head_dim)
        if magnitude is not None:
            magnitude = permute_to_meta(magnitude, heads, args.head_dim)
    return {(ours, None): (a, b, scaling, magnitude)}


def _stack_experts(per_expert: dict[int, tuple], layer: int, w: str, n: int, wfile) -> tuple:
    """Hub-layout per-expert factors {e: (A, B, scaling)} -> stacked (A (E, r, in), B (E, out, r), scaling)."""
    if sorted(per_expert) != list(range(n)):
        raise ValueError(f"{wfile}: layer {layer} {w} has LoRA for experts {sorted(per_expert)}; "
                         f"the model has {n} experts (0..{n - 1})")
    scalings = {s for _, _, s in per_expert.values()}
    if len(scalings) != 1:
        raise ValueError(f"{wfile}: layer {layer} {w}: experts with different LoRA scalings are not supported")
    a = torch.stack([per_expert[e][0] for e in range(n)])
    b = torch.stack([per_expert[e][1] for e in range(n)])
    return a, b, scalings.pop(), None


def read_adapter(path: str | os.PathLike, args: ModelArgs) -> tuple[dict, dict]:
    """A PEFT adapter dir -> (config, {(our module path, expert weight or None): (A, B, scaling, magnitude)}) in our
    layout. A/B are (r, in)/(out, r) for linears and (E, r, in)/(E, out, r) for experts, q/k rows in Meta order;
    magnitude is DoRA's (out,) vector or None.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    wfile, pairs = _read_pairs(path, bool(cfg.get("use_dora", False)))
    use_rslora = bool(cfg.get("use_rslora", False))
    cfg_file = path / CONFIG_NAME

    def scaling_for(name: str, rank: int) -> float:
        """The module's LoRA scaling; its factors' rank must be the one the config gives it (r / rank_pattern)."""
        want = _pattern_value(cfg.get("rank_pattern"), name, cfg["r"], str(cfg_file))
        if rank != want:
            raise ValueError(f"{wfile}: {name} has LoRA factors of rank {rank} but {cfg_file} says r={want}: the "
                             "config and the weights disagree")
        return lora_scaling(rank, _pattern_value(cfg.get("alpha_pattern"), name, cfg["lora_alpha"], str(cfg_file)),
                            use_rslora)

    factors: dict = {}
    experts: dict = defaultdict(dict)  # (layer, w) -> {e: (A, B, scaling)}
    for hf, ab in sorted(pairs.items()):
        a, b = ab["A"].float(), ab["B"].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or 0 in a.shape or 0 in b.shape:
            raise ValueError(f"{wfile}: {hf}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not factors "
                             "(r, in) and (out, r) of one rank r >= 1")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{wfile}: {hf}: the LoRA factors hold NaN or infinite values")
        if "M" in ab and (_V4_EXPERT.fullmatch(hf) or _V5_EXPERTS.fullmatch(hf)):
            raise ValueError(f"{wfile}: {hf} is a DoRA adapter on Mixtral experts, which is not supported")
        if m := _V4_EXPERT.fullmatch(hf):
            experts[(int(m.group(1)), m.group(3))][int(m.group(2))] = (a, b, scaling_for(hf, a.shape[0]))
        elif m := _V5_EXPERTS.fullmatch(hf):
            factors.update(_fused_expert_factors(hf, a, b, m.group(1), args, scaling_for, wfile))
        else:
            mag = ab["M"].float() if "M" in ab else None
            factors.update(_linear_factors(hf, a, b, mag, args, scaling_for(hf, a.shape[0]), wfile))
    for (layer, w), per_expert in experts.items():
        factors[(f"layers.{layer}.feed_forward.experts", w)] = _stack_experts(per_expert, layer, w, args.n_experts,
                                                                            wfile)
    return cfg, factors


def load_adapter(model: torch.nn.Module, path: str | os.PathLike, name: str = "default") -> dict:
    """Load a PEFT LoRA/DoRA adapter under `name`; returns its config. Modules it touches that have no LoRA yet get
    it (with the file's r/alpha); other names already loaded stay side by side (choose with lora.set_adapter /
    set_row_adapters; the first adapter loaded is the one in use). Loading over an existing name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"load_adapter: the adapter name must be a non-empty string, got {name!r}")
    cfg, factors = read_adapter(path, model.args)
    loaded = adapter_names(model)
    selection = lora_modules(model)[0][1].selection if loaded else {name: 1.0}
    hp = LoRAHParams(cfg["r"], cfg["lora_alpha"], float(cfg.get("lora_dropout") or 0.0),
                     bool(cfg.get("use_rslora", False)))
    if not loaded:
        for p in model.parameters():  # as apply_lora does: only adapters train
            p.requires_grad_(False)
    per_module: dict = defaultdict(dict)
    for (mod_path, w), f in factors.items():
        per_module[mod_path][w] = f
    for mod_path, parts in per_module.items():
        try:
            m = model.get_submodule(mod_path)
        except AttributeError:
            raise ValueError(f"{path}: adapter module {mod_path} does not exist in this model "
                             f"({model.args.n_layers} layers): adapter for another model?") from None
        if not isinstance(m, (LoRALinear, LoRAExperts)):
            m = wrap_module(model, mod_path, hp, expert_weights=tuple(w for w in parts if w))
            m.adapter_names[0] = name
        for w, (a, b, scaling, magnitude) in parts.items():
            if isinstance(m, LoRALinear) and w is None:
                m.set_factors(a, b, scaling, name=mod_path, magnitude=magnitude, adapter=name,
                              use_rslora=hp.use_rslora)
            elif isinstance(m, LoRAExperts) and w is not None:
                m.set_factors(a, b, scaling, name=mod_path, w=w, adapter=name, use_rslora=hp.use_rslora)
            else:
                raise ValueError(f"{path}: the adapter has factors for {mod_path}{'.' + w if w else ''} but the "
                                 f"model's module there is {type(m).__name__}")
    for mod_path, m in lora_modules(model):
        if mod_path not in per_module:
            m.clear_slot(name)  # a replaced adapter that touched this module does not any more
        m.selection = selection
        m._reselect()
    load_modules_to_save(model, path, cfg)
    warn_other_rope(model, path)
    return cfg

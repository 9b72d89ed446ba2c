"""What a PEFT adapter dir holds besides the LoRA/DoRA factors (adapter.py writes and reads those): whole modules
trained beside LoRA, and the RoPE of the base the adapter was trained on.

- modules_to_save (lora.set_trainable: embeddings, norms, head; LongLoRA trains embeddings and norms when the
  context grows) are written as PEFT writes them (base_model.model.model.embed_tokens.weight in
  adapter_model.safetensors, their names in adapter_config.json's "modules_to_save"); a tied head is the
  embedding, with PEFT's ensure_weight_tying.
- base_rope.json, which PEFT never reads, records rope_theta, rope_scaling and max_seq_len of the base;
  read_base_rope gives them back as load_model keywords.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..args import ModelArgs, rope_settings, with_rope
from ..hf_names import hf_module_to_meta, meta_module_to_hf
from ..checkpoints.shards import first_line
from ..util.files import read_json
from ..rope import check_rope_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_ROPE_NAME = "base_rope.json"
PREFIX = "base_model.model."  # PEFT's key prefix


def read_adapter_tensors(path: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, its tensors): adapter_model.safetensors, or PEFT's older adapter_model.bin read with
    weights_only=True (tensors only, no code); a damaged or missing file is a ValueError/FileNotFoundError naming it."""
    path = Path(path)
    wfile = path / WEIGHTS_NAME
    if wfile.is_file():
        try:
            return wfile, load_file(str(wfile))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise ValueError(f"{wfile}: not a readable safetensors file ({type(e).__name__}: {first_line(e)})") \
                from None
    wfile = path / "adapter_model.bin"
    if not wfile.is_file():
        raise FileNotFoundError(f"{path / WEIGHTS_NAME} not found (nor adapter_model.bin)")
    try:
        state = torch.load(wfile, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors; a damaged file raises many types
        raise ValueError(f"{wfile}: not a readable tensor file ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{wfile}: expected a dict of tensors, found {type(state).__name__}")
    return wfile, state


# ---- modules_to_save: whole modules trained beside LoRA (lora.set_trainable, LongLoRA's embeddings and norms) ----
SAVED_MODULE = re.compile(r"base_model\.model\.(.+?)(?:\.modules_to_save\.default)?\.weight")


def _trained_modules(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{HF module path: weight} of every trainable parameter that is not a LoRA factor; a tied head is the embedding."""
    out = {}
    for name, p in model.named_parameters():  # named_parameters lists a tied weight once, as tok_embeddings
        if not p.requires_grad or name.rpartition(".")[2].startswith("lora_"):
            continue
        module, _, leaf = name.rpartition(".")
        hf = meta_module_to_hf(module)
        if hf is None or leaf != "weight":
            raise ValueError(f"save_adapter: trainable parameter {name} has no PEFT modules_to_save name")
        out[hf] = p.detach()
    return out


def add_modules_to_save(model: torch.nn.Module, config: dict, tensors: dict) -> None:
    """Put the model's whole trained modules into a PEFT adapter's config and tensors, as PEFT saves them."""
    trained = _trained_modules(model)
    if not trained:
        return
    for hf, w in trained.items():
        tensors[f"{PREFIX}{hf}.weight"] = w.cpu().contiguous()
    config["modules_to_save"] = sorted({hf.rpartition(".")[2] for hf in trained})
    if "score" in trained:  # a reward model (training/reward_model.py): PEFT's sequence-classification adapter
        config["task_type"] = "SEQ_CLS"
    if model.args.tie_embeddings and "model.embed_tokens" in trained:
        # PEFT then re-ties lm_head to the trained embedding copy; its loader wants the head's key too (a copy:
        # safetensors refuses shared storage), which is what PEFT itself writes
        config["ensure_weight_tying"] = True
        tensors[f"{PREFIX}lm_head.weight"] = tensors[f"{PREFIX}model.embed_tokens.weight"].clone()


def read_modules_to_save(path: str | os.PathLike, cfg: dict, args: ModelArgs) -> dict[str, torch.Tensor]:
    """An adapter's whole-module tensors -> {our parameter name: tensor}; a tied head folds into the embedding."""
    names = cfg.get("modules_to_save") or []
    wfile, state = read_adapter_tensors(path)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = SAVED_MODULE.fullmatch(key)
        if m is None or ".lora_" in key:
            continue
        hf = m.group(1)
        tied_head = hf == "lm_head" and cfg.get("ensure_weight_tying")  # PEFT writes the re-tied head too
        if not (any(hf.endswith(n) for n in names) or tied_head):  # PEFT matches module names by suffix
            raise ValueError(f"{wfile}: {key} is not a LoRA factor nor a module listed in modules_to_save {names}")
        ours = hf_module_to_meta(hf)
        if ours is None:
            raise ValueError(f"{wfile}: modules_to_save module {hf} is not a module of a Llama/Mistral/Mixtral model")
        name = f"{ours}.weight"
        if name == "output.weight" and args.tie_embeddings:
            name = "tok_embeddings.weight"
        if name in out and not torch.equal(out[name], t):
            raise ValueError(f"{wfile}: the model ties lm_head to embed_tokens but the adapter holds different "
                             "tensors for them")
        out[name] = t
    found = {m.group(1) for k in state if (m := SAVED_MODULE.fullmatch(k)) and ".lora_" not in k}
    missing = [n for n in names if not any(hf == n or hf.endswith("." + n) for hf in found)]
    if missing:  # loading would silently keep the base's module where the adapter says it trained its own
        raise ValueError(f"{wfile}: modules_to_save lists {missing[0]!r} but the adapter holds no tensor for it")
    for name, t in out.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{wfile}: modules_to_save tensor for {name} holds NaN or infinite values")
    return out


@torch.no_grad()
def load_modules_to_save(model: torch.nn.Module, path: str | os.PathLike, cfg: dict) -> list[str]:
    """Copy an adapter's whole trained modules into the model (in place: a tied head follows); returns their names.

    They become trainable like the LoRA factors, so saving the model again writes them again."""
    params = dict(model.named_parameters())
    loaded = []
    for name, t in read_modules_to_save(path, cfg, model.args).items():
        p = params.get(name)
        if p is None:
            raise ValueError(f"{path}: modules_to_save tensor for {name}, which this model does not have")
        if tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"{path}: modules_to_save {name} is {tuple(t.shape)}, the model's {tuple(p.shape)}: "
                             "adapter for another model?")
        p.copy_(t.to(p.dtype))
        p.requires_grad_(True)
        loaded.append(name)
    return loaded


# ---- the base model's RoPE the adapter was trained with ----
def read_base_rope(path: str | os.PathLike) -> dict:
    """with_rope / load_model keyword arguments recorded beside an adapter; {} when there are none (e.g. PEFT's)."""
    file = Path(path) / BASE_ROPE_NAME
    if not file.is_file():
        return {}
    rope = read_json(file, "the adapter's base RoPE")
    unknown = sorted(set(rope) - {"rope_theta", "rope_scaling", "max_seq_len"})
    if unknown:
        raise ValueError(f"{file}: unknown keys {unknown} (expected rope_theta, rope_scaling, max_seq_len)")
    theta, context = rope.get("rope_theta"), rope.get("max_seq_len")
    if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0):
        raise ValueError(f"{file}: rope_theta must be a number > 0, got {theta!r}")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ValueError(f"{file}: max_seq_len must be an integer >= 1, got {context!r}")
    if "rope_scaling" in rope:
        rope["rope_scaling"] = check_rope_scaling(rope["rope_scaling"], str(file))
    return rope


def warn_other_rope(model: torch.nn.Module, path) -> None:
    """An adapter applied to a base with other RoPE settings than it was trained with means another function."""
    rope = read_base_rope(path)
    if rope and rope_settings(with_rope(model.args, **rope)) != rope_settings(model.args):
        warnings.warn(f"adapter {path} was trained on a base with RoPE {rope}, this model has "
                      f"{rope_settings(model.args)}: load the base with load_model(..., **read_base_rope(adapter))",
                      stacklevel=3)

"""Merge LoRA adapters into a base checkpoint: `python -m minillama.tools.merge --base B --adapter A1 [--adapter A2] --out D`.

The base is loaded in its own dtype on CPU; each targeted weight is merged on its own in float32 and rounded once,
W <- (W.float() + sum_i scaling_i * B_i @ A_i).to(W.dtype) (a DoRA adapter also rescales each row by m / ||row||),
so at most one weight (one expert) is ever in float32.
Whole modules an adapter trained (PEFT modules_to_save, e.g. embeddings and norms) replace the base's. The RoPE the
adapters were trained with (their base_rope.json) is applied to the base and recorded in the merged config, unless
--rope_theta / --rope_scaling / --max_seq_len say otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..lora.peft import read_adapter
from ..lora.peft_extras import read_base_rope, read_modules_to_save
from ..args import ModelArgs
from ..util.cli import ArgumentParser, positive_int, run
from .flags import add_rope_args
from ..util.dtypes import DTYPE_NAMES, parse_dtype
from ..util.files import check_dir_writable, refuse_overlap


def _merged(weight: torch.Tensor, parts: list, name: str, expert: Optional[int] = None) -> torch.Tensor:
    """The weight with every adapter touching it applied in order, in float32: W + scaling * B @ A for LoRA,
    g * (W + scaling * B @ A) with g = m / ||W + scaling * B @ A|| per row for DoRA (as PEFT merges). (out, in)"""
    w = weight.float()
    for a, b, s, magnitude in parts:
        if expert is not None:
            a, b = a[expert], b[expert]
        if (b.shape[0], a.shape[-1]) != tuple(w.shape):
            raise ValueError(f"merge: adapter delta for {name} is ({b.shape[0]}, {a.shape[-1]}) but the base weight is "
                             f"{tuple(w.shape)}: adapter for another model?")
        w = w + (b.float() @ a.float()) * s
        if magnitude is not None:
            w = w * (magnitude.float() / torch.linalg.norm(w, dim=1))[:, None]
    return w


def check_fits(factors: dict, args: ModelArgs, source) -> None:
    """Every factor pair targets a weight of a model with these args, with its shape (checked before loading it)."""
    from ..model import Transformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    for (path, w), (a, b, *_) in factors.items():
        key = f"{path}.{w}" if w is not None else f"{path}.weight"
        if key not in shapes:
            raise ValueError(f"{source}: adapter module {path} does not exist in the base model ({args.n_layers} "
                             "layers): adapter for another model?")
        want = shapes[key][1:] if w is not None else shapes[key]
        stacked = shapes[key][:1] if w is not None else ()
        if tuple(b.shape[:-2]) != stacked or a.shape[-2] != b.shape[-1] or (b.shape[-2], a.shape[-1]) != want[-2:]:
            raise ValueError(f"{source}: the adapter's update for {key} is ({b.shape[-2]}, {a.shape[-1]}) but the "
                             f"base weight is {want}: adapter for another model?")


def read_adapters(adapter_dirs: Iterable[str], args: ModelArgs, log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """({(module path, expert weight or None): [(A, B, scaling) per adapter]}, {parameter: (adapter, tensor)} of
    whole trained modules (modules_to_save)), each checked against args."""
    per_weight: dict = {}
    whole: dict = {}  # whole trained modules: {parameter name: (adapter, tensor)}
    for d in adapter_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--adapter {d}: no such directory")
        cfg, factors = read_adapter(d, args)
        check_fits(factors, args, d)
        log(f"adapter {d}: r={cfg['r']} alpha={cfg['lora_alpha']} rslora={bool(cfg.get('use_rslora'))}"
            f"{' dora' if cfg.get('use_dora') else ''}, "
            f"{len(factors)} weights")
        for key, f in factors.items():
            per_weight.setdefault(key, []).append(f)
        for name, tensor in read_modules_to_save(d, cfg, args).items():
            if name in whole:
                raise ValueError(f"merge: adapters {whole[name][0]} and {d} both replace {name} (modules_to_save)")
            whole[name] = (d, tensor)
    return per_weight, whole


@torch.no_grad()
def merge_adapters_(model: torch.nn.Module, adapter_dirs: Iterable[str],
                    log: Callable[[str], None] = print, read: Optional[tuple] = None) -> torch.nn.Module:
    """Fold PEFT adapters (applied in order, as PEFT's multi-adapter merge does; LoRA updates add up, a DoRA adapter
    rescales what it is applied to) into the base weights in place.
    read: what read_adapters already returned (then adapter_dirs are not read again)."""
    per_weight, whole = read if read is not None else read_adapters(adapter_dirs, model.args, log)
    _replace_modules(model, whole, log)
    emb = getattr(model, "tok_embeddings", None)
    t0, last_layer = time.time(), None
    for i, ((path, w), parts) in enumerate(per_weight.items()):
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"merge: adapter module {path} does not exist in the base model "
                             f"({model.args.n_layers} layers): adapter for another model?") from None
        weight = getattr(module, w if w is not None else "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"merge: {path} has no float weight to merge into ({type(module).__name__})")
        if emb is not None and weight is emb.weight:
            raise ValueError(f"merge: {path} is tied to tok_embeddings; merging would change the embeddings too")
        if w is None:
            weight.copy_(_merged(weight, parts, path).to(weight.dtype))
        else:
            for e in range(weight.shape[0]):  # one expert at a time keeps the float32 temporaries small
                weight[e] = _merged(weight[e], parts, f"{path}.{w}[{e}]", e).to(weight.dtype)
        layer = path.split(".")[1] if path.startswith("layers.") else path
        if layer != last_layer:
            log(f"  merged {path}{'.' + w if w else ''} ({i + 1}/{len(per_weight)} weights, {time.time() - t0:.1f}s)")
            last_layer = layer
    return model


@torch.no_grad()
def _replace_modules(model: torch.nn.Module, whole: dict, log) -> None:
    """Copy the adapters' whole trained modules ({name: (adapter, tensor)}, modules_to_save) over the base's."""
    params = dict(model.named_parameters())
    for name, (adapter, t) in whole.items():
        p = params.get(name)
        if p is None or tuple(p.shape) != tuple(t.shape):
            raise ValueError(f"merge: adapter {adapter} holds {name} {tuple(t.shape)}, which does not fit the base "
                             f"({tuple(p.shape) if p is not None else 'no such weight'})")
        p.copy_(t.to(p.dtype))
    if whole:
        log(f"replaced {len(whole)} whole weights (modules_to_save): {', '.join(sorted(whole)[:4])}"
            f"{' ...' if len(whole) > 4 else ''}")


def adapters_rope(adapter_dirs: list[str], log) -> dict:
    """The base RoPE the adapters were trained with (load_model keywords); adapters that disagree are an error."""
    found = {d: read_base_rope(d) for d in adapter_dirs}
    found = {d: r for d, r in found.items() if r}
    if len({str(sorted(r.items())) for r in found.values()}) > 1:
        raise ValueError("merge: the adapters were trained with different RoPE settings: "
                         + "; ".join(f"{d}: {r}" for d, r in found.items()))
    rope = next(iter(found.values()), {})
    if rope:
        log(f"RoPE the adapters were trained with: {rope}")
    return dict(rope)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minillama.tools.merge", description=__doc__.splitlines()[0])
    p.add_argument("--base", "--ckpt", "--model", dest="base", required=True,
                   help="base checkpoint dir (Hugging Face or Meta format)")
    p.add_argument("--adapter", required=True, action="append", help="PEFT LoRA adapter dir (repeat to add several)")
    p.add_argument("--out", required=True, help="output dir for the merged checkpoint")
    p.add_argument("--format", "--to", dest="format", choices=("hf", "meta"), default="hf",
                   help="output format (--to: convert's name)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype to merge and save in (default: the base checkpoint's own)")
    p.add_argument("--max_seq_len", type=positive_int, default=None,
                   help="context to record (default: the adapters' recorded one, else the base's)")
    add_rope_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # the checkpoint formats live there
    from ..checkpoints.checkpoint import detect_format, load_model, read_model_args, save_hf, save_meta

    # everything that needs no base weights first: the output dir, the base's config, the adapters against it
    if detect_format(args.base)[0] == "quantized":
        raise ValueError(f"--base {args.base} is a quantized checkpoint (minillama-convert --quantize); merge into "
                         "the float checkpoint it was made from, then quantize the merged one")
    refuse_overlap("--out", args.out, {"--base": args.base, **{f"--adapter {d}": d for d in args.adapter}})
    check_dir_writable(args.out, args.overwrite, "--out")
    read = read_adapters(args.adapter, read_model_args(args.base), log=lambda s: print(s, flush=True))
    t0 = time.time()
    print(f"loading base {args.base} ...", flush=True)
    rope = adapters_rope(args.adapter, lambda s: print(s, flush=True))
    if args.rope_scaling is not None:
        rope.pop("max_seq_len", None)  # a new scaling derives its own context
    rope.update({k: v for k, v in (("rope_theta", args.rope_theta), ("rope_scaling", args.rope_scaling),
                                   ("max_seq_len", args.max_seq_len)) if v is not None})
    model = load_model(args.base, device="cpu", dtype=parse_dtype(args.dtype), **rope)
    dtype = next(model.parameters()).dtype
    print(f"  {model.args.family}, {model.args.n_layers} layers, {dtype} ({time.time() - t0:.1f}s)", flush=True)
    merge_adapters_(model, args.adapter, log=lambda s: print(s, flush=True), read=read)
    print(f"saving {args.format} checkpoint to {args.out} ...", flush=True)
    if args.format == "hf":
        save_hf(model, args.out, tokenizer_src=args.base, overwrite=args.overwrite)
    else:
        save_meta(model, args.out, tokenizer_src=args.base, overwrite=args.overwrite)
    print(f"done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(run(main))

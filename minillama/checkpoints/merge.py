"""Merge LoRA adapters into a base checkpoint: `python -m minillama.merge --base B --adapter A1 [--adapter A2] --out D`.

The base is loaded in its own dtype on CPU; each targeted weight is merged on its own in float32 and rounded once,
W <- (W.float() + sum_i scaling_i * B_i @ A_i).to(W.dtype) (a DoRA adapter also rescales each row by m / ||row||),
so at most one weight (one expert) is ever in float32.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Iterable, Optional

import torch

from ..adapter import read_adapter
from ..dtypes import DTYPE_NAMES, parse_dtype


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


@torch.no_grad()
def merge_adapters_(model: torch.nn.Module, adapter_dirs: Iterable[str],
                    log: Callable[[str], None] = print) -> torch.nn.Module:
    """Fold PEFT adapters (applied in order, as PEFT's multi-adapter merge does; LoRA updates add up, a DoRA adapter
    rescales what it is applied to) into the base weights in place."""
    per_weight: dict = {}
    for d in adapter_dirs:
        cfg, factors = read_adapter(d, model.args)
        log(f"adapter {d}: r={cfg['r']} alpha={cfg['lora_alpha']} rslora={bool(cfg.get('use_rslora'))}"
            f"{' dora' if cfg.get('use_dora') else ''}, "
            f"{len(factors)} weights")
        for key, f in factors.items():
            per_weight.setdefault(key, []).append(f)
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minillama.merge", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base checkpoint dir (Hugging Face or Meta format)")
    p.add_argument("--adapter", required=True, action="append", help="PEFT LoRA adapter dir (repeat to add several)")
    p.add_argument("--out", required=True, help="output dir for the merged checkpoint")
    p.add_argument("--format", choices=("hf", "meta"), default="hf", help="output format (default: hf)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype to merge and save in (default: the base checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from .checkpoint import load_model, save_hf, save_meta  # the checkpoint formats live there

    t0 = time.time()
    print(f"loading base {args.base} ...", flush=True)
    model = load_model(args.base, device="cpu", dtype=parse_dtype(args.dtype))
    dtype = next(model.parameters()).dtype
    print(f"  {model.args.family}, {model.args.n_layers} layers, {dtype} ({time.time() - t0:.1f}s)", flush=True)
    merge_adapters_(model, args.adapter, log=lambda s: print(s, flush=True))
    print(f"saving {args.format} checkpoint to {args.out} ...", flush=True)
    if args.format == "hf":
        save_hf(model, args.out, tokenizer_src=args.base, overwrite=args.overwrite)
    else:
        save_meta(model, args.out, tokenizer_src=args.base, overwrite=args.overwrite)
    print(f"done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()

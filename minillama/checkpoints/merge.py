"""Merge LoRA adapters into a base checkpoint: `python -m minillama.merge --base B --adapter A1 [--adapter A2] --out D`.

The base is loaded in its own dtype on CPU; each targeted weight is merged on its own in float32 and rounded once,
W <- (W.float() + sum_i scaling_i * B_i @ A_i).to(W.dtype), so at most one weight (one expert) is ever in float32.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..adapter import read_adapter
from ..args import ModelArgs
from ..cli import ArgumentParser
from ..dtypes import DTYPE_NAMES, parse_dtype
from ..files import check_dir_writable


def _delta(parts: list, shape: tuple, name: str, expert: Optional[int] = None) -> torch.Tensor:
    """Sum of scaling * B @ A over the adapters touching one weight, float32. (out, in)"""
    delta = torch.zeros(shape, dtype=torch.float32)
    for a, b, s in parts:
        if expert is not None:
            a, b = a[expert], b[expert]
        if (b.shape[0], a.shape[-1]) != tuple(shape):
            raise ValueError(f"merge: adapter delta for {name} is ({b.shape[0]}, {a.shape[-1]}) but the base weight is "
                             f"{tuple(shape)}: adapter for another model?")
        delta += (b.float() @ a.float()) * s
    return delta


def check_fits(factors: dict, args: ModelArgs, source) -> None:
    """Every factor pair targets a weight of a model with these args, with its shape (checked before loading it)."""
    from ..model import Transformer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    for (path, w), (a, b, _) in factors.items():
        key = f"{path}.{w}" if w is not None else f"{path}.weight"
        if key not in shapes:
            raise ValueError(f"{source}: adapter module {path} does not exist in the base model ({args.n_layers} "
                             "layers): adapter for another model?")
        want = shapes[key][1:] if w is not None else shapes[key]
        stacked = shapes[key][:1] if w is not None else ()
        if tuple(b.shape[:-2]) != stacked or a.shape[-2] != b.shape[-1] or (b.shape[-2], a.shape[-1]) != want[-2:]:
            raise ValueError(f"{source}: the adapter's update for {key} is ({b.shape[-2]}, {a.shape[-1]}) but the "
                             f"base weight is {want}: adapter for another model?")


def read_adapters(adapter_dirs: Iterable[str], args: ModelArgs, log: Callable[[str], None] = print) -> dict:
    """{(module path, expert weight or None): [(A, B, scaling) per adapter]}, each checked against args."""
    per_weight: dict = {}
    for d in adapter_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--adapter {d}: no such directory")
        cfg, factors = read_adapter(d, args)
        check_fits(factors, args, d)
        log(f"adapter {d}: r={cfg['r']} alpha={cfg['lora_alpha']} rslora={bool(cfg.get('use_rslora'))}, "
            f"{len(factors)} weights")
        for key, f in factors.items():
            per_weight.setdefault(key, []).append(f)
    return per_weight


@torch.no_grad()
def merge_adapters_(model: torch.nn.Module, adapter_dirs: Iterable[str],
                    log: Callable[[str], None] = print, per_weight: Optional[dict] = None) -> torch.nn.Module:
    """Fold PEFT adapters (applied in sum, as PEFT's multi-adapter merge does) into the base weights in place.
    per_weight: what read_adapters already read (then adapter_dirs are not read again)."""
    if per_weight is None:
        per_weight = read_adapters(adapter_dirs, model.args, log)
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
            weight.copy_((weight.float() + _delta(parts, weight.shape, path)).to(weight.dtype))
        else:
            for e in range(weight.shape[0]):  # one expert at a time keeps the float32 temporaries small
                delta = _delta(parts, weight.shape[1:], f"{path}.{w}[{e}]", e)
                weight[e] = (weight[e].float() + delta).to(weight.dtype)
        layer = path.split(".")[1] if path.startswith("layers.") else path
        if layer != last_layer:
            log(f"  merged {path}{'.' + w if w else ''} ({i + 1}/{len(per_weight)} weights, {time.time() - t0:.1f}s)")
            last_layer = layer
    return model


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minillama.merge", description=__doc__.splitlines()[0])
    p.add_argument("--base", "--ckpt", "--model", dest="base", required=True,
                   help="base checkpoint dir (Hugging Face or Meta format)")
    p.add_argument("--adapter", required=True, action="append", help="PEFT LoRA adapter dir (repeat to add several)")
    p.add_argument("--out", required=True, help="output dir for the merged checkpoint")
    p.add_argument("--format", "--to", dest="format", choices=("hf", "meta"), default="hf",
                   help="output format (--to: convert's name)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="dtype to merge and save in (default: the base checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from .checkpoint import load_model, read_model_args, save_hf, save_meta  # the checkpoint formats live there

    # everything that needs no base weights first: the output dir, the base's config, the adapters against it
    check_dir_writable(args.out, args.overwrite, "--out")
    per_weight = read_adapters(args.adapter, read_model_args(args.base), log=lambda s: print(s, flush=True))
    t0 = time.time()
    print(f"loading base {args.base} ...", flush=True)
    model = load_model(args.base, device="cpu", dtype=parse_dtype(args.dtype))
    dtype = next(model.parameters()).dtype
    print(f"  {model.args.family}, {model.args.n_layers} layers, {dtype} ({time.time() - t0:.1f}s)", flush=True)
    merge_adapters_(model, args.adapter, log=lambda s: print(s, flush=True), per_weight=per_weight)
    print(f"saving {args.format} checkpoint to {args.out} ...", flush=True)
    if args.format == "hf":
        save_hf(model, args.out, tokenizer_src=args.base, overwrite=args.overwrite)
    else:
        save_meta(model, args.out, tokenizer_src=args.base, overwrite=args.overwrite)
    print(f"done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    import sys

    from ..cli import run
    sys.exit(run(main))

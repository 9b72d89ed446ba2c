"""Convert a checkpoint between the Meta/Mistral consolidated and Hugging Face formats, or export it for llama.cpp.

    python -m minillama.tools.convert SRC DST [--to hf|meta] [--dtype bfloat16] [--shards N] [--max_shard_size 5GB]
    python -m minillama.tools.convert llama3-8b/ llama3-8b-16k/ --rope_theta 1e6 --max_seq_len 16384   # record a RoPE change
    minillama-convert SRC model.q8_0.gguf --to gguf --quant q8_0   # llama.cpp / ollama (f16 bf16 q8_0 q4_0)
    minillama-convert SRC smol-int8/ --quantize int8   # int8/int4/nf4 saved once; loaded without re-quantizing

The direction comes from SRC (Meta -> HF, HF -> Meta; a DST ending in .gguf means gguf; --quantize means an HF-shaped
quantized dir, checkpoints/quantized.py) unless --to (or its alias --format, merge's name) says. An adapter goes to GGUF merged: run the merge tool first and convert its output. Tensors keep their dtype unless --dtype is
given; the checkpoint is memory-mapped and written shard by shard, never held twice. Tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..util.cli import ArgumentParser, positive_int, run
from .flags import add_rope_args
from ..util.dtypes import DTYPE_NAMES, parse_dtype
from ..util.files import check_dir_writable, refuse_overlap
from ..checkpoints.gguf_export import QUANT_NAMES
from ..checkpoints.checkpoint import (TOKENIZER_FILES, detect_format, load_model, read_model_args, save_hf, save_meta,
                                      save_quantized)
from ..checkpoints.hf_format import parse_size
from ..checkpoints.quantized import SCHEMES
from ..checkpoints.meta_format import check_meta_split


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m minillama.tools.convert", description=__doc__)
    p.add_argument("src", help="checkpoint dir (or a weight file inside it)")
    p.add_argument("dst", help="output dir (must not exist or be empty, unless --overwrite)")
    p.add_argument("--to", "--format", dest="to", choices=("hf", "meta", "gguf"),
                   help="target format (default: gguf for a DST ending in .gguf, else the other one)")
    p.add_argument("--quant", choices=QUANT_NAMES, default=None,
                   help="gguf target: tensor type (default f16; norms stay float32)")
    p.add_argument("--quantize", choices=SCHEMES, default=None,
                   help="write weight-only int8 / int4 linears and experts (hf target; the int4 head is int8), or "
                        "NF4 ones (the head stays float): minillama loads them as saved, with no re-quantizing")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="cast weights (default: keep the checkpoint's dtype)")
    p.add_argument("--shards", type=positive_int, default=None,
                   help="Meta target: model-parallel shards to split into (default 1)")
    p.add_argument("--max_shard_size", default="5GB", help="HF target: largest safetensors file")
    p.add_argument("--max_seq_len", type=positive_int, help="context length to record (params.json does not hold it)")
    add_rope_args(p)  # --rope_theta, --rope_scaling: written into the output's config.json / params.json
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    a = parse_args(argv)
    src_fmt, src_dir = detect_format(a.src)
    if src_fmt == "quantized":
        raise ValueError(f"SRC {src_dir} is a quantized checkpoint (minillama-convert --quantize); converting needs "
                         "the float checkpoint it was made from")
    if a.quantize:
        return to_quantized(a, src_dir)
    to = a.to or ("gguf" if a.dst.endswith(".gguf") else "meta" if src_fmt == "hf" else "hf")
    if a.quant and to != "gguf":
        raise ValueError(f"--quant {a.quant} is for a gguf target; the target here is {to} (see --to)")
    if to == "gguf":
        return to_gguf(a, src_fmt, src_dir)
    # every check that needs no weights, before the slow part
    refuse_overlap("DST", a.dst, {"SRC": src_dir})
    check_dir_writable(a.dst, a.overwrite, "DST")
    if to == "hf" and a.shards not in (None, 1):
        raise ValueError(f"--shards {a.shards} splits a Meta checkpoint; the target here is hf (see --to)")
    if to == "meta":
        check_meta_split(read_model_args(src_dir), a.shards or 1)
    parse_size(a.max_shard_size)
    t0 = time.time()
    print(f"reading {src_fmt} checkpoint {src_dir}", flush=True)
    model = load_model(src_dir, dtype=parse_dtype(a.dtype), max_seq_len=a.max_seq_len, rope_theta=a.rope_theta,
                       rope_scaling=a.rope_scaling)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {model.args.family} model, {n_params / 1e6:.1f}M parameters, "
          f"{model.tok_embeddings.weight.dtype} ({time.time() - t0:.1f}s)", flush=True)
    if to == "hf":
        out = save_hf(model, a.dst, tokenizer_src=src_dir, max_shard_size=a.max_shard_size, overwrite=a.overwrite,
                      log=lambda s: print(s, flush=True))
    else:
        out = save_meta(model, a.dst, n_shards=a.shards or 1, tokenizer_src=src_dir,
                        log=lambda s: print(s, flush=True), overwrite=a.overwrite)
    copied = [n for n in TOKENIZER_FILES if (out / n).is_file()]
    print(f"wrote {to} checkpoint {out} (tokenizer files: {', '.join(copied) or 'none found'}) "
          f"in {time.time() - t0:.1f}s", flush=True)
    return out


def to_quantized(a: argparse.Namespace, src_dir: Path) -> Path:
    """SRC -> an HF-shaped dir of weight-only int8 / int4 (or NF4) tensors (checkpoint.save_quantized), one weight
    at a time."""
    if a.to not in (None, "hf") or a.quant or a.dst.endswith(".gguf"):
        raise ValueError(f"--quantize {a.quantize} writes an hf-shaped directory; for a llama.cpp file use --to gguf "
                         "--quant without --quantize")
    if a.shards not in (None, 1):
        raise ValueError(f"--shards {a.shards} splits a Meta checkpoint; --quantize writes an hf-shaped dir")
    refuse_overlap("DST", a.dst, {"SRC": src_dir})
    check_dir_writable(a.dst, a.overwrite, "DST")
    parse_size(a.max_shard_size)
    t0 = time.time()
    print(f"quantizing {src_dir} to {a.quantize}", flush=True)
    rope = {"rope_theta": a.rope_theta, "rope_scaling": a.rope_scaling, "max_seq_len": a.max_seq_len}
    out = save_quantized(src_dir, a.dst, a.quantize, dtype=parse_dtype(a.dtype), max_shard_size=a.max_shard_size,
                         overwrite=a.overwrite, log=lambda s: print(s, flush=True), rope=rope)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {a.quantize} checkpoint {out} ({size / 1e6:.1f} MB of weights) in {time.time() - t0:.1f}s",
          flush=True)
    return out


def to_gguf(a: argparse.Namespace, src_fmt: str, src_dir: Path) -> Path:
    """SRC -> one llama.cpp GGUF file (export_gguf), the model read in the checkpoint's dtype."""
    from ..tokenizer.tokenizer import load_tokenizer
    from ..checkpoints.gguf_export import export_gguf
    dst = Path(a.dst)
    for flag, value in (("--dtype", a.dtype), ("--shards", a.shards)):
        if value is not None:
            raise ValueError(f"{flag} does not apply to a gguf target (its tensor type is --quant)")
    if dst.is_dir() or (dst.exists() and not a.overwrite):
        raise FileExistsError(f"DST {dst} exists{' and is a directory' if dst.is_dir() else ''}"
                              f"{'' if dst.is_dir() else ' (pass --overwrite to replace it)'}")
    tok = load_tokenizer(src_dir)  # before the weights: a checkpoint without a tokenizer fails fast
    t0 = time.time()
    print(f"reading {src_fmt} checkpoint {src_dir}", flush=True)
    model = load_model(src_dir, dtype=None, max_seq_len=a.max_seq_len, rope_theta=a.rope_theta,
                       rope_scaling=a.rope_scaling)
    out = export_gguf(model, tok, dst, quant=a.quant or "f16", name=src_dir.name, log=lambda s: print(s, flush=True))
    print(f"wrote {out} ({a.quant or 'f16'}, {out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s", flush=True)
    return out


def cli(argv=None) -> int:
    """main() with bad input reported as one line on stderr instead of a traceback (cli.run)."""
    def convert():
        main(argv)

    return run(convert)


if __name__ == "__main__":
    sys.exit(cli())

"""Meta (Llama 1/2/3) and Mistral/Mixtral consolidated checkpoints: params.json + consolidated.NN.pth model-parallel
shards, or consolidated.safetensors. Reading merges the shards; writing splits them.

Model-parallel layout (fairscale): column-parallel wq/wk/wv/w1/w3/output are split on dim 0, row-parallel wo/w2 on
dim 1, norms and the MoE router are replicated; the token embedding is split on dim 1 (Llama 1/2,
ParallelEmbedding) or dim 0 (Llama 3, VocabParallelEmbedding). Mixtral experts come as Mistral's
`feed_forward.experts.E.w1.weight` (mistral-inference) or the first release's stacked `block_sparse_moe.w1` (E*F, D)
with w2 stored transposed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from ..util.files import read_json, write_json
from ..args import ModelArgs, ffn_hidden_dim, from_meta_params
from .shards import (Entry, Pending, Source, TensorFiles, index_weight_files, raise_unknown,
                     write_safetensors)

_SHARD = re.compile(r"consolidated\.(\d+)\.pth")
COLUMN_PARALLEL = ("wq", "wk", "wv", "w1", "w3", "output")
ROW_PARALLEL = ("wo", "w2")


def is_meta_dir(d: Path) -> bool:
    return (d / "params.json").is_file() and (
        any(_SHARD.fullmatch(p.name) for p in d.iterdir()) or (d / "consolidated.safetensors").is_file()
        or (d / "consolidated.safetensors.index.json").is_file())


def meta_weight_files(d: Path) -> tuple[list[Path], bool]:
    """(files, model_parallel): MP .pth shards 00..NN (all must be there) or Mistral's safetensors file(s)."""
    index = d / "consolidated.safetensors.index.json"
    if index.is_file():  # split by tensor like HF, not model-parallel
        return index_weight_files(index), False
    if (d / "consolidated.safetensors").is_file():
        return [d / "consolidated.safetensors"], False
    found = {int(m[1]): p for p in d.iterdir() if (m := _SHARD.fullmatch(p.name))}
    if not found:
        raise FileNotFoundError(f"{d}: params.json but no consolidated.00.pth or consolidated.safetensors")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise FileNotFoundError(f"{d}: model-parallel shard(s) {', '.join(missing)} missing "
                                f"(found {', '.join(found[i].name for i in sorted(found))})")
    return [found[i] for i in sorted(found)], True


# beside params.json: what an HF config says that params.json cannot hold (tie_word_embeddings, pad_token_id, the
# generation config), written by save_meta and read back here and by checkpoint.source_extras
EXTRAS_NAME = "minillama_extras.json"


def read_meta_args(d: Path, files: TensorFiles, weight_files: list[Path]) -> ModelArgs:
    """params.json -> ModelArgs; Llama 1/2's vocab_size -1 comes from tokenizer.model (or the embedding rows)."""
    params = read_json(d / "params.json")
    vocab = None
    if (params.get("vocab_size") or -1) <= 0:
        if (d / "tokenizer.model").is_file():
            import sentencepiece
            vocab = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).GetPieceSize()
        elif "tok_embeddings.weight" in files.keys(weight_files[0]):
            vocab = files.shape(weight_files[0], "tok_embeddings.weight")[0]  # Llama 1/2 split it on dim 1
    args = from_meta_params(params, vocab_size=vocab, source=str(d / "params.json"))
    if (d / EXTRAS_NAME).is_file():
        tie = read_json(d / EXTRAS_NAME).get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ValueError(f"{d / EXTRAS_NAME}: tie_word_embeddings must be true or false, got {tie!r}")
        args.tie_embeddings = args.tie_embeddings or tie  # the equal `output` in the file is then dropped
    return args


def _leaf(key: str) -> str:
    """'layers.0.attention.wq.weight' -> 'wq'; 'layers.0.feed_forward.experts.3.w2.weight' -> 'w2'."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def _cat_dim(key: str, args: ModelArgs, shard_shape: tuple) -> Optional[int]:
    """Dim the MP shards of `key` are split on; None = replicated."""
    if key == "tok_embeddings.weight":  # by shape: Llama 3 splits the vocabulary, Llama 1/2 the model dim
        return 0 if shard_shape[1] == args.dim else 1
    leaf = _leaf(key)
    if leaf in COLUMN_PARALLEL:
        return 0
    if leaf in ROW_PARALLEL:
        return 1
    return None


_MISTRAL_EXPERT = re.compile(r"layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_STACKED_EXPERT = re.compile(r"layers\.(\d+)\.block_sparse_moe\.(w[123])")
_OLD_GATE = re.compile(r"layers\.(\d+)\.block_sparse_moe\.gate\.weight")


def meta_plan(files: TensorFiles, weight_files: list[Path], model_parallel: bool, args: ModelArgs,
              shapes: dict[str, tuple], source: str) -> list[Entry]:
    """Consolidated tensor names -> entries; MP shards of the same name are concatenated tensor by tensor."""
    if model_parallel:
        keys = files.keys(weight_files[0])
        for f in weight_files[1:]:
            other = set(files.keys(f))
            if other != set(keys):
                diff = sorted(set(keys) ^ other)
                raise ValueError(f"{f} and {weight_files[0]} hold different tensor names: {', '.join(diff[:10])}")
        where = {k: weight_files for k in keys}
    else:
        where = {k: [f] for f in weight_files for k in files.keys(f)}
    n = len(weight_files) if model_parallel else 1
    entries, unknown = [], []
    for key, fs in where.items():
        if key == "rope.freqs" or (key == "output.weight" and args.tie_embeddings):
            continue
        dim = _cat_dim(key, args, files.shape(fs[0], key)) if n > 1 else None
        src = [Source(f, key) for f in fs] if dim is not None else [Source(fs[0], key)]
        kw = dict(cat_dim=dim or 0)
        if m := _MISTRAL_EXPERT.fullmatch(key):
            target = f"layers.{m[1]}.feed_forward.experts.{m[3]}"
            if target in shapes and int(m[2]) < shapes[target][0]:
                entries.append(Entry(target, src, shapes[target][1:], slot=int(m[2]), **kw))
                continue
        elif m := _STACKED_EXPERT.fullmatch(key):
            target = f"layers.{m[1]}.feed_forward.experts.{m[2]}"
            if target in shapes and n == 1:
                E, rows, cols = shapes[target]
                F = cols if m[2] == "w2" else rows  # w2 is stored (E*F, D), transposed per expert
                D = rows if m[2] == "w2" else cols
                for e in range(E):
                    take = (lambda t, e=e, F=F: t[e * F:(e + 1) * F].t()) if m[2] == "w2" else \
                        (lambda t, e=e, F=F: t[e * F:(e + 1) * F])
                    entries.append(Entry(target, src, (E * F, D), slot=e, transform=take))
                continue
        elif m := _OLD_GATE.fullmatch(key):
            target = f"layers.{m[1]}.feed_forward.gate.weight"
            if target in shapes:
                entries.append(Entry(target, src, shapes[target], **kw))
                continue
        elif key in shapes:
            entries.append(Entry(key, src, shapes[key], **kw))
            continue
        unknown.append(key)
    raise_unknown(sorted(unknown), source, "Mixtral" if args.n_experts else "Llama/Mistral")
    return entries


# ---- writing ----

def meta_params(args: ModelArgs) -> dict:
    """ModelArgs -> params.json: Meta's keys for Llama families, Mistral's (hidden_dim, head_dim, moe) otherwise."""
    scaling = args.rope_scaling
    llama_family = not uses_mistral_format(args)
    if scaling is not None:
        standard = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        if not (llama_family and scaling["rope_type"] == "llama3"
                and all(scaling.get(k) == v for k, v in standard.items())):
            raise ValueError(f"params.json cannot express rope_scaling {scaling}: Meta's format only knows "
                             "Llama 3.1-style scaling (use_scaled_rope); keep this model in the HF format")
    if llama_family:
        params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
                  "vocab_size": args.vocab_size, **_ffn_rule(args), "norm_eps": args.norm_eps,
                  "rope_theta": args.rope_theta}
        if scaling is not None:
            params["use_scaled_rope"] = True
            if scaling.get("factor") != 8.0:
                params["rope_scaling_factor"] = scaling["factor"]
        return params
    params = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
              "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "norm_eps": args.norm_eps,
              "vocab_size": args.vocab_size, "rope_theta": args.rope_theta, "max_seq_len": args.max_seq_len}
    if args.sliding_window:
        params["sliding_window"] = args.sliding_window
    if args.n_experts:
        params["moe"] = {"num_experts": args.n_experts, "num_experts_per_tok": args.n_experts_per_tok}
    return params


def _ffn_rule(args: ModelArgs) -> dict:
    """multiple_of / ffn_dim_multiplier that reproduce hidden_dim under Meta's rule (the model's own if they do)."""
    tries = [(args.multiple_of, args.ffn_dim_multiplier)]
    tries += [(m, x) for m in (256, 1024, 4096) for x in (None, 1.3, 1.2, 1.5, 1.0)]
    base = int(2 * (4 * args.dim) / 3)
    tries.append((1, (args.hidden_dim + 0.5) / base))  # any width: int(x * base) == hidden_dim exactly
    for multiple_of, mult in tries:
        if ffn_hidden_dim(args.dim, multiple_of, mult) == args.hidden_dim:
            return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
    raise ValueError(f"params.json: no multiple_of/ffn_dim_multiplier gives hidden_dim {args.hidden_dim}")


def _split_dim(key: str, args: ModelArgs) -> Optional[int]:
    if key == "tok_embeddings.weight":
        return 0 if args.family == "llama3" else 1  # VocabParallelEmbedding vs ParallelEmbedding
    return _cat_dim(key, args, ())


def uses_mistral_format(args: ModelArgs) -> bool:
    """Mistral/Mixtral (and Llama shapes Meta's params.json cannot describe) use Mistral's params.json keys."""
    llama_family = args.family in ("llama", "llama2", "codellama", "llama3") and not args.n_experts
    return not (llama_family and args.head_dim == args.dim // args.n_heads)


def _consolidated(state: dict[str, torch.Tensor], args: ModelArgs) -> list[tuple[str, torch.Tensor]]:
    """Our state dict -> (consolidated name, tensor): experts one tensor each, `output` even when tied."""
    named = []
    for key, t in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.feed_forward\.experts\.(w[123])", key)
        if m:
            named += [(f"layers.{m[1]}.feed_forward.experts.{e}.{m[2]}.weight", t[e]) for e in range(t.shape[0])]
        else:
            named.append((key, t))
    if args.tie_embeddings and "output.weight" not in state:
        named.append(("output.weight", state["tok_embeddings.weight"]))  # Meta's model always has `output`
    return named


def check_meta_split(args: ModelArgs, n_shards) -> None:
    """Raise ValueError, before any work, unless the model splits into n_shards model-parallel shards."""
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"shards {n_shards!r}: expected an integer >= 1")
    if n_shards == 1:
        return
    for what, n in (("attention heads", args.n_heads), ("key/value heads", args.n_kv_heads)):
        if n % n_shards:
            raise ValueError(f"{n_shards} model-parallel shards: the model's {n} {what} do not split into "
                             f"{n_shards} (each shard must hold whole heads)")
    from ..model import Transformer

    with torch.device("meta"):
        state = Transformer(args).state_dict()
    for name, t in _consolidated(state, args):
        dim = _split_dim(name, args)
        if dim is not None and t.shape[dim] % n_shards:
            raise ValueError(f"{n_shards} model-parallel shards: {name} dim {dim} ({t.shape[dim]}) does not split "
                             f"into {n_shards}")


def write_meta_weights(state: dict[str, torch.Tensor], args: ModelArgs, out: Path, n_shards: int,
                       log=print) -> list[str]:
    """params.json + consolidated.NN.pth shards, or Mistral's consolidated.safetensors (experts in
    mistral-inference naming) when unsplit. One shard's tensors in memory at a time."""
    check_meta_split(args, n_shards)
    named = _consolidated(state, args)  # (consolidated name, tensor)
    params = meta_params(args)
    names = []
    if n_shards == 1 and uses_mistral_format(args):  # streamed: expert slices are written without copies
        write_safetensors(out / "consolidated.safetensors",
                          [Pending(k, tuple(t.shape), t.dtype, lambda t=t: t) for k, t in named])
        names.append("consolidated.safetensors")
        log(f"wrote consolidated.safetensors ({len(named)} tensors)")
    for rank in range(n_shards if not names else 0):
        shard = {}
        for name, t in named:
            dim = _split_dim(name, args) if n_shards > 1 else None
            if dim is not None:
                if t.shape[dim] % n_shards:
                    raise ValueError(f"save_meta: {name} dim {dim} ({t.shape[dim]}) does not split into "
                                     f"{n_shards} shards")
                t = t.chunk(n_shards, dim=dim)[rank]
            t = t.detach().to("cpu")
            # torch.save writes a view's whole storage: copy pieces, keep whole tensors as they are
            shard[name] = t.clone() if t.untyped_storage().nbytes() != t.nelement() * t.element_size() else t
        fname = f"consolidated.{rank:02d}.pth"
        torch.save(shard, out / fname)
        log(f"wrote {fname} ({len(shard)} tensors)")
        names.append(fname)
        del shard
    write_json(out / "params.json", params)
    return names

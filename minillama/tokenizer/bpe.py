"""Byte-level BPE vocabularies for tiktoken: Meta's Llama 3 `tokenizer.model` and HF `tokenizer.json` files."""

import base64
from dataclasses import dataclass, field
from pathlib import Path

import regex

from ..util.files import read_json

# Meta's Llama 3 pre-tokenization regex (llama_models/llama3/tokenizer.py).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's regex, which HF's ByteLevel pre-tokenizer applies when use_regex is true.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_NAMED_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>",
]
LLAMA3_N_SPECIALS = 256


@dataclass
class BPEVocab:
    """Everything tiktoken needs, plus the HF extras: regex pipeline, added tokens and their flags."""
    ranks: dict[bytes, int]          # mergeable token bytes -> id (used as the BPE rank)
    pattern: str                     # regex tiktoken applies last
    pre_patterns: list[str]          # regexes applied before `pattern`, each isolating its matches
    special: dict[str, int]          # added tokens that only `allow_special` may produce
    added: dict[str, int] = field(default_factory=dict)  # non-special added tokens: always matched, as HF does
    extra_bytes: dict[int, bytes] = field(default_factory=dict)  # vocab ids that no merge produces (decode only)
    add_bos: bool = True             # HF post-processor starts single sequences with a special token
    missing_bytes: list[int] = field(default_factory=list)  # byte values with no token: dropped on encode


def is_tiktoken_file(path: Path) -> bool:
    """True when the file's first line looks like `<base64> <rank>`."""
    with open(path, "rb") as f:
        head = f.read(512)
    line = head.split(b"\n", 1)[0].strip()
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def load_tiktoken_model(path: Path) -> BPEVocab:
    """Meta's Llama 3 `tokenizer.model`: base64 token + rank per line, then 256 reserved special tokens."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                tok, rank = line.split(b" ")
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from e
    n = len(ranks)
    names = LLAMA3_NAMED_SPECIALS + [
        f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_N_SPECIALS - len(LLAMA3_NAMED_SPECIALS))
    ]
    return BPEVocab(ranks, LLAMA3_PATTERN, [], {s: n + i for i, s in enumerate(names)})


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _pre_tokenizer_patterns(spec: dict | None, path: Path) -> list[str]:
    """Flatten HF pre-tokenizers into a list of isolating regexes; ByteLevel must come last."""
    if spec is None:
        raise ValueError(f"{path}: pre_tokenizer is null; expected ByteLevel (byte-level BPE)")
    steps = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    patterns = []
    for i, step in enumerate(steps):
        kind = step.get("type")
        last = i == len(steps) - 1
        if kind == "ByteLevel":
            if not last:
                raise ValueError(f"{path}: pre_tokenizer ByteLevel must be the last step, found at position {i}")
            if step.get("add_prefix_space", False):
                raise ValueError(f"{path}: pre_tokenizer ByteLevel add_prefix_space=true is not supported")
            if step.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
        elif kind == "Split":
            pat = step.get("pattern", {})
            if step.get("behavior") != "Isolated" or step.get("invert", False):
                raise ValueError(f"{path}: pre_tokenizer Split behavior {step.get('behavior')!r} "
                                 f"invert={step.get('invert')} unsupported; expected Isolated, invert=false")
            if "Regex" in pat:
                patterns.append(pat["Regex"])
            elif "String" in pat:
                patterns.append(regex.escape(pat["String"]))
            else:
                raise ValueError(f"{path}: pre_tokenizer Split pattern {pat!r}: expected Regex or String")
        elif kind == "Digits":
            patterns.append(r"\p{N}" if step.get("individual_digits", False) else r"\p{N}+")
        else:
            raise ValueError(f"{path}: pre_tokenizer type {kind!r} unsupported; expected Sequence of "
                             f"Split/Digits followed by ByteLevel")
    if not steps or steps[-1].get("type") != "ByteLevel":
        raise ValueError(f"{path}: pre_tokenizer does not end in ByteLevel; this is not a byte-level BPE "
                         f"tokenizer (a SentencePiece-style tokenizer.json needs its tokenizer.model)")
    return patterns or [r"[\s\S]+"]


def load_hf_tokenizer_json(path: Path) -> BPEVocab:
    """HF byte-level BPE `tokenizer.json` -> tiktoken ranks (id order == merge order, checked) and regexes."""
    spec = read_json(path)
    try:
        return _vocab_from_spec(spec, path)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field missing or of the wrong type
        raise ValueError(f"{path}: malformed tokenizer.json ({type(e).__name__}: {e})") from None


def _vocab_from_spec(spec: dict, path: Path) -> BPEVocab:
    """The byte-level BPE vocabulary a parsed tokenizer.json describes."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type is {model.get('type')!r}; expected 'BPE'")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{path}: normalizer {spec['normalizer'].get('type')!r} unsupported; "
                         f"byte-level BPE files have normalizer null")
    patterns = _pre_tokenizer_patterns(spec.get("pre_tokenizer"), path)

    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def to_bytes(tok: str) -> bytes:
        try:
            return bytes(byte_of[c] for c in tok)
        except KeyError as e:
            raise ValueError(f"{path}: vocab token {tok!r} has character {e.args[0]!r} outside the "
                             f"byte-level alphabet") from None

    vocab: dict[str, int] = model["vocab"]
    if not vocab:
        raise ValueError(f"{path}: model.vocab is empty")
    added_specs = spec.get("added_tokens", [])
    added_ids = {a["id"] for a in added_specs}
    # tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF applies merges in list
    # order. Using id as rank matches only when merge results' ids never decrease along the list (checked
    # here; Llama 3 and SmolLM2 files satisfy it, and the tests compare against transformers).
    merges = model.get("merges", [])
    ranks: dict[bytes, int] = {}
    missing: list[int] = []  # byte values absent from the vocab; HF's BPE drops them (no unk token)
    for b, c in bytes_to_unicode().items():
        if c in vocab:
            ranks[bytes([b])] = vocab[c]
        else:
            missing.append(b)
    prev = -1
    for i, m in enumerate(merges):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        tid = vocab.get(a + b)
        if tid is None:
            raise ValueError(f"{path}: merge {i} {a!r}+{b!r} produces a token missing from vocab")
        if tid < prev:  # equal is fine: converted tiktoken vocabs list every split of a token in a row
            raise ValueError(f"{path}: merge {i} yields id {tid} after id {prev}; ids are not in merge order, "
                             f"so id-as-rank would not reproduce HF's BPE")
        prev = tid
        ranks[to_bytes(a + b)] = tid
    reachable = set(ranks.values())
    extra = {i: to_bytes(t) for t, i in vocab.items() if i not in reachable and i not in added_ids}
    special, added = {}, {}
    for a in added_specs:
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise ValueError(f"{path}: added token {a['content']!r} uses lstrip/rstrip/single_word, unsupported")
        (special if a.get("special", False) else added)[a["content"]] = a["id"]
    post = spec.get("post_processor") or {}
    procs = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    single = next((p.get("single") for p in procs if p.get("type") == "TemplateProcessing"), None)
    add_bos = bool(single) and "SpecialToken" in single[0]
    return BPEVocab(ranks, patterns[-1], patterns[:-1], special, added, extra, add_bos, missing)

"""Tokenizers: SentencePiece (Llama 1/2, Mistral), tiktoken (Llama 3) and HF byte-level BPE, behind one interface."""

import codecs
from pathlib import Path

import regex
import sentencepiece
import tiktoken

from . import chat_format as cf
from ..args import read_family
from .bpe import BPEVocab, is_tiktoken_file, load_hf_tokenizer_json, load_tiktoken_model
from ..util.files import read_json

# Meta's reference splits input so tiktoken never sees huge pieces (openai/tiktoken#195); we do the same.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
_LONG_RUN = regex.compile(r"\s{%d}|\S{%d}" % (MAX_NO_WHITESPACES_CHARS + 1, MAX_NO_WHITESPACES_CHARS + 1))


class Tokenizer:
    """Shared interface; subclasses fill the ids and implement encode/decode/_stream_piece."""

    kind = ""                    # "sentencepiece" | "tiktoken" | "hf-bpe"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos = True               # False for models that never start text with BOS (e.g. SmolLM2)
    stop_ids: list[int]
    special_tokens: dict[str, int]
    vocab_size = 0
    family: str | None = None    # from config.json / params.json when loaded from a checkpoint
    chat_template: str | None = None
    chat_format = "llama2"
    path: Path | None = None

    def token_bytes(self, tid: int) -> bytes:
        """The UTF-8 bytes one token adds to a decoded text (a piece of a character for byte tokens)."""
        return self._stream_piece(tid, False)[0]

    def token_id(self, text: str) -> int:
        """Id of a special token by its text, e.g. '<|eot_id|>'."""
        if text not in self.special_tokens:
            raise ValueError(f"tokenizer {self.path} has no special token {text!r}")
        return self.special_tokens[text]

    def encode_dialog(self, messages: list[dict], add_generation_prompt: bool = True,
                      format: str | None = None, tools: list | None = None) -> list[int]:
        """Token ids of a chat in the given (or default) chat format; tools: OpenAI's tools list."""
        return cf.encode_dialog(self, messages, format or self.chat_format, add_generation_prompt, tools)[0]

    def encode_dialog_with_mask(self, messages: list[dict], format: str | None = None):
        """(ids, mask): mask[i] is True for assistant output tokens and their end-of-turn token."""
        return cf.encode_dialog(self, messages, format or self.chat_format, False)

    def _finish(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids


def _check_text(text) -> None:
    if not isinstance(text, str):
        raise ValueError(f"encode expects a str, got {type(text).__name__}")


def _special_regex(names) -> regex.Pattern | None:
    # Longest first so '<|reserved_special_token_10|>' wins over '<|reserved_special_token_1|>'.
    names = sorted(names, key=len, reverse=True)
    return regex.compile("|".join(regex.escape(n) for n in names)) if names else None


def _split_on(text: str, pattern, table: dict[str, int]):
    """Yield (text, None) for ordinary segments and ('', id) for tokens matched by `pattern`."""
    if pattern is None:
        yield text, None
        return
    pos = 0
    for m in pattern.finditer(text):
        if m.start() > pos:
            yield text[pos:m.start()], None
        yield "", table[m.group()]
        pos = m.end()
    if pos < len(text):
        yield text[pos:], None


class SentencePieceTokenizer(Tokenizer):
    """Llama 1/2 and Mistral 32K SentencePiece BPE."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: neither a tiktoken BPE file nor a SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        self.vocab_size = n
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.stop_ids = [self.eos_id] if self.eos_id is not None else []
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(n) if self.sp.is_control(i)}
        self._special_re = _special_regex(self.special_tokens)
        self._is_control = [self.sp.is_control(i) for i in range(n)]
        self._is_byte = [self.sp.is_byte(i) for i in range(n)]
        self._is_unk = [self.sp.is_unknown(i) for i in range(n)]
        self._pieces = [self.sp.id_to_piece(i) for i in range(n)]

    def encode(self, text: str, bos: bool = True, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids; control-token text ('<s>') is plain text unless allow_special."""
        _check_text(text)
        if not allow_special:
            return self._finish(self.sp.encode(text), bos, eos)
        ids = []
        for seg, tid in _split_on(text, self._special_re, self.special_tokens):
            ids.extend(self.sp.encode(seg) if tid is None else [tid])
        return self._finish(ids, bos, eos)

    def decode(self, ids) -> str:
        """Ids -> text; control tokens (<s>, </s>) decode to nothing, as in SentencePiece."""
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self.sp.decode(ids)

    def _check_id(self, tid: int) -> None:
        if not 0 <= tid < self.vocab_size:
            raise ValueError(f"token id {tid} is not in the vocabulary of {self.path} (size {self.vocab_size})")

    def _stream_piece(self, tid: int, at_start: bool) -> tuple[bytes, bool, bool]:
        """(bytes, is_byte_piece, at_start) mirroring SentencePiece's decoder, which drops one leading '▁'
        of the first visible piece (the dummy prefix)."""
        self._check_id(tid)
        if self._is_control[tid]:
            return b"", False, at_start
        if self._is_byte[tid]:
            return bytes([int(self._pieces[tid][3:5], 16)]), True, False
        if self._is_unk[tid]:
            return " \u2047 ".encode(), False, False
        piece = self._pieces[tid]
        if at_start and piece.startswith("\u2581"):
            piece = piece[1:]
        return piece.replace("\u2581", " ").encode(), False, False


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken: Meta's Llama 3 tokenizer.model or an HF tokenizer.json."""

    def __init__(self, path: Path, vocab: BPEVocab, kind: str):
        self.path = Path(path)
        self.kind = kind
        self._vocab = vocab
        self._pre = [_compile(p, self.path) for p in vocab.pre_patterns]
        self.special_tokens = {**vocab.added, **vocab.special}
        self._special_re = _special_regex(self.special_tokens)
        self._added_re = _special_regex(vocab.added)
        self.vocab_size = 1 + max(max(vocab.ranks.values()), max(self.special_tokens.values(), default=0),
                                  max(vocab.extra_bytes, default=0))
        # tiktoken needs every byte; bytes the vocab lacks get ids >= vocab_size that encode() drops, as HF does.
        ranks = {**vocab.ranks, **{bytes([b]): self.vocab_size + k for k, b in enumerate(vocab.missing_bytes)}}
        _compile(vocab.pattern, self.path)
        try:
            self._enc = tiktoken.Encoding(name=self.path.name, pat_str=vocab.pattern,
                                          mergeable_ranks=ranks, special_tokens={})
        except ValueError as e:  # a pattern Python's regex reads but tiktoken's Rust engine does not
            raise ValueError(f"{self.path}: pre-tokenizer regex {vocab.pattern!r} is not usable: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self._bytes: list[bytes | None] = [None] * self.vocab_size
        for b, i in vocab.ranks.items():
            self._bytes[i] = b
        for i, b in vocab.extra_bytes.items():
            self._bytes[i] = b
        for s, i in self.special_tokens.items():
            self._bytes[i] = s.encode()
        get = self.special_tokens.get
        self.bos_id = get("<|begin_of_text|>", get("<s>"))
        self.eos_id = get("<|end_of_text|>", get("</s>", get("<|endoftext|>")))
        self.pad_id = get("<|finetune_right_pad_id|>", self.eos_id)
        self.stop_ids = []
        self.set_stop_ids()

    def set_stop_ids(self) -> None:
        """Every token that ends an assistant turn: eos plus the chat end-of-turn tokens the vocab has."""
        names = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>"]
        ids = [self.eos_id] + [self.special_tokens.get(n) for n in names]
        self.stop_ids = sorted({i for i in ids if i is not None})

    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = [text]
        for pat in self._pre:  # HF Sequence steps before the last regex, e.g. Digits(individual_digits)
            try:
                pieces = [p for piece in pieces for p in _isolate(pat, piece)]
            except TimeoutError:
                raise ValueError(f"{self.path}: pre-tokenizer regex {pat.pattern!r} took over {REGEX_TIMEOUT_S:g} s "
                                 f"on a text of {len(text)} characters (catastrophic backtracking?)") from None
        long = len(text) > TIKTOKEN_MAX_ENCODE_CHARS or (
            len(text) > MAX_NO_WHITESPACES_CHARS and _LONG_RUN.search(text) is not None)
        if self.kind == "tiktoken" and long:  # Meta's exact cuts, so token ids match its reference
            pieces = [s for p in pieces for i in range(0, len(p), TIKTOKEN_MAX_ENCODE_CHARS)
                      for s in _split_long_runs(p[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS)]
        if len(pieces) == 1:
            ids = self._enc.encode_ordinary(pieces[0])
        else:
            ids = [i for p in pieces for i in self._enc.encode_ordinary(p)]
        if self._vocab.missing_bytes and ids and max(ids) >= self.vocab_size:
            ids = [i for i in ids if i < self.vocab_size]
        return ids

    def encode(self, text: str, bos: bool = True, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text -> ids; special-token text stays plain text unless allow_special."""
        _check_text(text)
        pattern = self._special_re if allow_special else self._added_re
        ids = []
        for seg, tid in _split_on(text, pattern, self.special_tokens):
            if tid is None:
                ids.extend(self._encode_ordinary(seg))
            else:
                ids.append(tid)
        return self._finish(ids, bos, eos)

    def decode(self, ids) -> str:
        """Ids -> text; special tokens decode to their text, invalid UTF-8 to U+FFFD."""
        return b"".join(self._token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def _token_bytes(self, tid: int) -> bytes:
        b = self._bytes[tid] if 0 <= tid < self.vocab_size else None
        if b is None:
            raise ValueError(f"token id {tid} is not in the vocabulary of {self.path} (size {self.vocab_size})")
        return b

    def _stream_piece(self, tid: int, at_start: bool) -> tuple[bytes, bool, bool]:
        return self._token_bytes(tid), True, False


REGEX_TIMEOUT_S = 10.0  # a pre-tokenizer regex comes from tokenizer.json: it runs with a time bound


def _compile(pattern: str, path) -> regex.Pattern:
    try:
        return regex.compile(pattern)
    except (regex.error, TypeError) as e:
        raise ValueError(f"{path}: pre-tokenizer regex {pattern!r} is not valid ({e})") from None


def _isolate(pat: regex.Pattern, text: str) -> list[str]:
    """HF Split(behavior=Isolated): matches and the gaps between them all become pieces (TimeoutError past
    REGEX_TIMEOUT_S)."""
    out, pos = [], 0
    for m in pat.finditer(text, timeout=REGEX_TIMEOUT_S):
        if m.start() > pos:
            out.append(text[pos:m.start()])
        if m.end() > m.start():
            out.append(m.group())
        pos = m.end()
    if pos < len(text):
        out.append(text[pos:])
    return out


def _split_long_runs(s: str, max_len: int):
    """Cut s so no run of whitespace or non-whitespace exceeds max_len chars (Meta's reference rule)."""
    run, is_space, start = 0, s[:1].isspace(), 0
    for i, ch in enumerate(s):
        now = ch.isspace()
        if now != is_space:
            run, is_space = 1, now
        else:
            run += 1
            if run > max_len:
                yield s[start:i]
                start, run = i, 1
    yield s[start:]


class StreamDecoder:
    """Incremental detokenizer: push(id) returns only newly completed text; pushes + flush() == decode(ids)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._sp = tok.kind == "sentencepiece"
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = b""  # SentencePiece: pending bytes of the current run of byte-fallback pieces
        self._at_start = True

    def push(self, token_id: int) -> str:
        """Feed one token id; returns the text it completes (possibly '' mid multi-byte character)."""
        data, is_byte, self._at_start = self.tok._stream_piece(int(token_id), self._at_start)
        if not self._sp:
            return self._utf8.decode(data)
        if is_byte:
            self._buf += data
            return self._drain(final=False)
        return self._drain(final=True) + data.decode("utf-8")  # ordinary pieces are whole characters

    def flush(self) -> str:
        """Text still held back at end of stream (U+FFFD for a truncated multi-byte character)."""
        return self._drain(final=True) if self._sp else self._utf8.decode(b"", final=True)

    def _drain(self, final: bool) -> str:
        # SentencePiece decodes a byte run char by char and maps each byte it cannot decode to one U+FFFD
        # (Python's decoder would use one U+FFFD per maximal invalid subsequence instead).
        out = []
        while self._buf:
            try:
                text, used = codecs.utf_8_decode(self._buf, "strict", False)
            except UnicodeDecodeError as e:
                out.append(self._buf[:e.start].decode("utf-8") + "\ufffd")
                self._buf = self._buf[e.start + 1:]
                continue
            out.append(text)
            self._buf = self._buf[used:]
            if self._buf:  # a valid but incomplete character: wait for more bytes unless the run ended
                if not final:
                    break
                out.append("\ufffd")
                self._buf = self._buf[1:]
        return "".join(out)


def decode_cut(tok: Tokenizer, ids) -> str:
    """Text of an answer cut off by a token limit: a last character left incomplete is dropped, where decode()
    would end it with U+FFFD."""
    decoder = StreamDecoder(tok)
    return "".join(decoder.push(t) for t in ids)


def _token_text(v) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def find_tokenizer_file(d: Path, required: bool = True) -> Path | None:
    """The tokenizer file of a checkpoint dir (tokenizer.model, original/tokenizer.model, tokenizer.json, or
    mistral-common's tokenizer.model.vN); None or FileNotFoundError when there is none."""
    d = Path(d)
    for name in ("tokenizer.model", "original/tokenizer.model", "tokenizer.json"):
        if (d / name).is_file():
            return d / name
    versioned = sorted(d.glob("tokenizer.model.v*"))
    if versioned:
        return versioned[-1]
    if not required:
        return None
    raise FileNotFoundError(f"{d}: no tokenizer.model, original/tokenizer.model or tokenizer.json "
                            f"(found: {sorted(p.name for p in d.iterdir())[:20]})")


def load_tokenizer(path, chat_format: str | None = None) -> Tokenizer:
    """Load a tokenizer.model (SentencePiece or tiktoken), a tokenizer.json, or a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        ckpt_dir, file = path, find_tokenizer_file(path)
    elif path.is_file():
        file = path
        ckpt_dir = path.parent.parent if path.parent.name == "original" else path.parent
    else:
        raise FileNotFoundError(f"tokenizer path {path} does not exist")

    with open(file, "rb") as f:
        head = f.read(64)
    if head.lstrip().startswith(b"{"):
        tok = BPETokenizer(file, load_hf_tokenizer_json(file), "hf-bpe")
    elif is_tiktoken_file(file):
        tok = BPETokenizer(file, load_tiktoken_model(file), "tiktoken")
    else:
        try:
            tok = SentencePieceTokenizer(file)
        except ValueError:
            raise ValueError(f"{file}: unknown tokenizer format; expected SentencePiece protobuf, tiktoken "
                             f"'<base64> <rank>' lines or tokenizer.json, found bytes {head[:32]!r}") from None

    dirs = list(dict.fromkeys([file.parent, ckpt_dir]))
    cfg_files = [d / "tokenizer_config.json" for d in dirs if (d / "tokenizer_config.json").is_file()]
    cfg = read_json(cfg_files[0]) if cfg_files else {}
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{cfg_files[0]}: chat_template must be a string or a list of "
                         f"{{'name', 'template'}} objects, got {type(template).__name__}")
    jinja_files = [d / "chat_template.jinja" for d in dirs if (d / "chat_template.jinja").is_file()]
    if template is None and jinja_files:  # transformers >= 4.5x saves the template beside the config
        template = jinja_files[0].read_text(encoding="utf-8")
    tok.chat_template = template
    if tok.kind == "hf-bpe":
        _apply_hf_config(tok, cfg_files[0] if cfg_files else file, cfg)
    tok.family = read_family(ckpt_dir)
    tok.chat_format = cf.resolve_format(chat_format) if chat_format else cf.detect_chat_format(tok)
    return tok


def _apply_hf_config(tok: BPETokenizer, cfg_file: Path, cfg: dict) -> None:
    """bos/eos/pad and whether BOS is prepended, from tokenizer_config.json and tokenizer.json's post-processor."""
    for key in ("bos", "eos", "pad"):
        text = _token_text(cfg.get(f"{key}_token"))
        if text is None:
            continue
        if text not in tok.special_tokens:
            raise ValueError(f"{cfg_file}: {key}_token {text!r} is not an added token of {tok.path}")
        setattr(tok, f"{key}_id", tok.special_tokens[text])
    if "add_bos_token" in cfg:
        tok.add_bos = bool(cfg["add_bos_token"])
    else:
        tok.add_bos = tok._vocab.add_bos
    if tok.pad_id is None:
        tok.pad_id = tok.eos_id
    tok.set_stop_ids()


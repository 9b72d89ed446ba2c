"""Per-row output constraints (JSON schema, any JSON object, regex, Lark grammar) run by llguidance.

    vocab = grammar_vocab(tok)                               # once per tokenizer (~1 s): token byte strings
    state = new_row_state(vocab, Constraint("json_schema", schema))
    mask = allowed(state, n_vocab)                           # (V,) bool: tokens that keep the output valid
    advance(state, token)                                    # after the row picked `token`

The engine masks a constrained row's logits with `mask_logits` before sampling; free rows in the same batch are left
alone. The grammar engine is llguidance (what llama.cpp and vLLM use), not a hand-written schema compiler: a schema
becomes a grammar, the grammar a token mask computed from the vocabulary's byte strings. Needs the structured extra:
pip install -e '.[structured]'.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("json_object", "json_schema", "regex", "lark")


@dataclass(frozen=True)
class Constraint:
    """What a row's output must match: kind is one of KINDS; spec the schema (dict), regex or grammar (str)."""

    kind: str
    spec: object = None


@dataclass
class GrammarVocab:
    """A tokenizer as the grammar engine sees it (built once per tokenizer by grammar_vocab)."""

    ll: object  # llguidance.LLTokenizer
    size: int  # the tokenizer's vocab_size (the model's may be larger: padded embeddings)
    stop_ids: tuple  # tokens that end the output once the grammar accepts


@dataclass
class RowState:
    """One row's matcher: where its output stands in the grammar."""

    matcher: object  # llguidance.LLMatcher
    vocab: GrammarVocab


def _llguidance():
    try:
        import llguidance
        import llguidance.torch  # noqa: F401
    except ImportError:
        raise ValueError("structured output needs llguidance: pip install 'minillama[structured]' (in a checkout: "
                         "pip install -e '.[structured]')") from None
    return llguidance


def token_byte_strings(tok) -> list[bytes]:
    """The bytes each token id stands for (a special token: its text), as a byte-level decoder writes them."""
    special = {i: text.encode() for text, i in tok.special_tokens.items()}
    out = []
    for i in range(tok.vocab_size):
        try:
            piece = special.get(i) or tok._stream_piece(i, at_start=False)[0]
        except ValueError:  # an id the vocabulary leaves unused
            piece = b""
        out.append(piece)
    return out


class _Wrapped:
    """The duck-typed tokenizer llguidance.TokenizerWrapper reads: ids, byte strings and an encoder."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else tok.stop_ids[0]
        self.bos_token_id = tok.bos_id
        self.tokens = token_byte_strings(tok)
        self.special_token_ids = sorted(set(tok.special_tokens.values()))

    def __call__(self, s):
        text = s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s
        if self.tok.kind != "sentencepiece":
            return self.tok.encode(text, bos=False)
        # SentencePiece puts a dummy "▁" before the text, which is not in the bytes the grammar forces; "\n" is a
        # byte token that merges with nothing, so encoding "\n" + text and dropping its tokens leaves text alone
        nl = self.tok.encode("\n", bos=False)
        ids = self.tok.encode("\n" + text, bos=False)
        return ids[len(nl):] if ids[:len(nl)] == nl else ids


def grammar_vocab(tok) -> GrammarVocab:
    """The grammar engine's view of a minillama Tokenizer; cached on the tokenizer (it takes about a second)."""
    cached = getattr(tok, "_grammar_vocab", None)
    if cached is not None:
        return cached
    ll = _llguidance()
    stops = tuple(tok.stop_ids) or ((tok.eos_id,) if tok.eos_id is not None else ())
    vocab = GrammarVocab(ll.LLTokenizer(ll.TokenizerWrapper(_Wrapped(tok)), n_vocab=tok.vocab_size,
                                        eos_token=list(stops)), tok.vocab_size, stops)
    tok._grammar_vocab = vocab
    return vocab


def grammar_of(c: Constraint) -> str:
    """The llguidance grammar of a constraint; ValueError names what is wrong with it."""
    ll = _llguidance()
    if c.kind == "json_object":
        return ll.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
    if c.kind == "json_schema":
        if not isinstance(c.spec, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(c.spec).__name__}")
        # strict, as OpenAI's structured outputs: no keys beyond "properties" unless the schema allows them
        return ll.LLMatcher.grammar_from_json_schema(c.spec, defaults={"whitespace_flexible": False})
    if c.kind == "regex":
        if not isinstance(c.spec, str):
            raise ValueError(f"a regex must be a string, got {type(c.spec).__name__}")
        return ll.LLMatcher.grammar_from_regex(c.spec)
    if c.kind == "lark":
        if not isinstance(c.spec, str):
            raise ValueError(f"a Lark grammar must be a string, got {type(c.spec).__name__}")
        return ll.LLMatcher.grammar_from_lark(c.spec)
    raise ValueError(f"unknown constraint kind {c.kind!r}; expected one of {', '.join(KINDS)}")


def check(c: Constraint, vocab: Optional[GrammarVocab] = None) -> str:
    """The grammar of c, validated (against the vocabulary when given: without it only the schema / regex itself,
    which needs no tokenizer); ValueError with llguidance's message if it is invalid."""
    grammar = grammar_of(c)
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, vocab.ll if vocab else None)
    if is_error:
        raise ValueError(f"{c.kind}: {_one_line(messages[0])}")
    return grammar


def _one_line(message: str) -> str:
    """llguidance's message without its indented code frame (the source echoed, a caret under it): one line."""
    kept = [line.strip() for line in message.splitlines() if line.strip() and not line[0].isspace()]
    return " ".join(kept) or " ".join(message.split())


def new_row_state(vocab: GrammarVocab, c: Constraint, grammar: Optional[str] = None) -> RowState:
    """A fresh matcher for one row (grammar: check()'s result, to skip compiling c again)."""
    matcher = _llguidance().LLMatcher(vocab.ll, grammar or check(c, vocab), log_level=0)
    if matcher.is_error():
        raise ValueError(f"{c.kind}: {matcher.get_error()}")
    return RowState(matcher, vocab)


def allowed(state: RowState, n_vocab: Optional[int] = None) -> torch.Tensor:
    """(n_vocab,) bool: the tokens the row may pick next; ids past the tokenizer's vocabulary are never allowed.

    Once the output is complete only the stop tokens are allowed; a matcher in error allows only stopping too."""
    ll = _llguidance()
    n_vocab = n_vocab or state.vocab.size
    mask = torch.zeros(n_vocab, dtype=torch.bool)
    if state.matcher.is_error() or state.matcher.is_stopped():
        mask[list(state.vocab.stop_ids)] = True
        return mask
    bits = ll.torch.allocate_token_bitmask(1, state.vocab.size)  # (1, ceil(V/32)) int32, one bit per token
    ll.torch.fill_next_token_bitmask(state.matcher, bits, 0)
    shifts = torch.arange(32, dtype=torch.int32)
    unpacked = ((bits[0].unsqueeze(-1) >> shifts) & 1).bool().flatten()  # (32 * ceil(V/32),)
    n = min(n_vocab, state.vocab.size)
    mask[:n] = unpacked[:n]
    return mask


def advance(state: RowState, token: int) -> None:
    """Move the row past `token`; ValueError if the grammar did not allow it."""
    if state.matcher.is_stopped() and token in state.vocab.stop_ids:
        return
    if not state.matcher.consume_token(int(token)):
        raise ValueError(f"token {token} is not allowed here: {state.matcher.get_error()}")


def is_done(state: RowState) -> bool:
    """True when the output is complete: nothing but a stop token may follow."""
    return state.matcher.is_stopped() or state.matcher.is_error()


def mask_logits(logits: torch.Tensor, states: list) -> torch.Tensor:
    """logits (B, V) with each constrained row's disallowed tokens at -inf; rows whose state is None are free."""
    rows = [b for b, s in enumerate(states) if s is not None]
    if not rows:
        return logits
    masks = torch.stack([allowed(states[b], logits.shape[-1]) for b in rows]).to(logits.device)  # (R, V)
    logits = logits.clone()
    logits[rows] = logits[rows].masked_fill(~masks, float("-inf"))
    return logits


def parse_response_format(rf) -> Optional[Constraint]:
    """OpenAI's response_format -> Constraint (None for text); ValueError names the bad key."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise ValueError("must be an object with a type: text, json_object, json_schema or regex")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
            raise ValueError("json_schema must be an object {name, schema, strict}")
        return Constraint("json_schema", js.get("schema") or {"type": "object"})
    if kind == "regex":
        if not isinstance(rf.get("regex"), str):
            raise ValueError("a regex response_format needs a string regex")
        return Constraint("regex", rf["regex"])
    raise ValueError(f"type {kind!r} is not one of text, json_object, json_schema, regex")


def schema_text(c: Constraint) -> str:
    """A constraint as one line for logs and errors."""
    return f"{c.kind}:{json.dumps(c.spec, separators=(',', ':'))[:200]}"

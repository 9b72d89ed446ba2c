"""A checkpoint's own Jinja chat_template (tokenizer_config.json), rendered as transformers' apply_chat_template does,
but in jinja's immutable sandbox with a bound on work and output: a hostile template fails, it does not hang.

    text = render(tok, messages, tools=None, add_generation_prompt=True)
    ids, mask = encode(tok, messages, tools, add_generation_prompt)     # mask: the assistant turns' tokens
"""

from __future__ import annotations

import json
import sys
import time

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_STEPS = 2_000_000  # template lines executed per render (a real template needs thousands)
MAX_CHARS = 4_000_000  # rendered characters per render
MAX_REPEAT = 1_000_000  # longest string/list a "*" may build


class TemplateLimit(SecurityError):
    """A template over its bounds: what the sandbox refuses, like access to Python's internals."""


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus a cap on "x" * n and ** (which the sandbox leaves to the host's memory)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise TemplateLimit(f"exponent {right} is over the template limit")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_REPEAT:
                    raise TemplateLimit(f"a repetition of {len(seq) * n} items is over the template limit")
        return super().call_binop(context, operator, left, right)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: no HTML escaping, ensure_ascii off (the stock jinja filter escapes <, >, &, ')
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message):
    raise TemplateError(message)


def environment() -> BoundedEnvironment:
    """A fresh sandbox for one render: its range() counts the items it makes against MAX_STEPS (a nested loop
    fails at once, before the line count would catch it)."""
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    left = [MAX_STEPS]

    def bounded_range(*args):
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise TemplateLimit(f"the template loops more than {MAX_STEPS} steps")
        return r

    env.globals["range"] = bounded_range
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env


def bounded(pieces) -> str:
    """Join a template's output pieces, counting template lines run (sys.settrace on this thread) and characters."""
    steps = 0

    def local(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_STEPS:
            raise TemplateLimit(f"the template loops more than {MAX_STEPS} steps")
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == "<template>" else None

    out, n = [], 0
    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for piece in pieces:
            n += len(piece)
            if n > MAX_CHARS:
                raise TemplateLimit(f"the template wrote over {MAX_CHARS} characters")
            out.append(piece)
    finally:
        sys.settrace(previous)
    return "".join(out)


def render_template(template: str, **context) -> str:
    """Any template text rendered in the bounded sandbox (raises TemplateLimit / jinja's errors)."""
    return bounded(environment().from_string(template).generate(**context))


def _special(tok, tid) -> str:
    """A special token's text ("" when the tokenizer has none)."""
    return next((text for text, i in tok.special_tokens.items() if i == tid), "") if tid is not None else ""


def render(tok, messages: list[dict], tools=None, add_generation_prompt: bool = True) -> str:
    """The template's text for a dialog (OpenAI-shaped message dicts); ValueError names the template's error."""
    if not tok.chat_template:
        raise ValueError(f"{tok.path}: --chat_format template needs a chat_template in tokenizer_config.json")
    try:
        template = environment().from_string(tok.chat_template)
        pieces = template.generate(messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                   bos_token=_special(tok, tok.bos_id), eos_token=_special(tok, tok.eos_id))
        return bounded(pieces)
    except (TemplateError, TemplateLimit, TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"chat_template of {tok.path}: {type(e).__name__}: {e}") from None


def encode(tok, messages: list[dict], tools, add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
    """(ids, mask): the rendered text tokenized with special tokens read as such and no extra BOS (as HF's
    apply_chat_template); mask is True on the tokens of each assistant turn (its text and the end-of-turn marks the
    template writes, up to where the next turn's prefix starts)."""
    text = render(tok, messages, tools, add_generation_prompt)
    ids = tok.encode(text, bos=False, allow_special=True)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(tok, messages[:i], tools, True)
        upto = render(tok, messages[:i + 1], tools, False)
        if not (text.startswith(before) and text.startswith(upto)):
            raise ValueError(f"chat_template of {tok.path}: renders a dialog's prefix differently from the whole, so "
                             "the assistant turns cannot be located for a loss mask")
        spans.append((len(before.encode()), len(upto.encode())))
    mask, pos = [], 0
    for t in ids:  # each token's byte span in text (bytes: a token may hold part of a character)
        end = pos + len(tok._stream_piece(t, at_start=pos == 0)[0])
        mask.append(any(a <= pos and end <= b for a, b in spans))
        pos = end
    return ids, mask

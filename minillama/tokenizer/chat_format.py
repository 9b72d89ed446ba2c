"""Chat formats (llama2, llama3, mistral, chatml, and the checkpoint's own Jinja template): dialog -> token ids plus a
loss mask over assistant output. llama3 and mistral also write tools, tool calls and tool results (tools.py)."""

import re
from dataclasses import dataclass, field
from typing import Optional

from . import template as jinja_template
from . import tools as tl

FORMATS = ("llama2", "llama3", "mistral", "chatml", "template")
ROLES = ("system", "user", "assistant", "tool")
TOOL_FORMATS = ("llama3", "mistral", "template")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def resolve_format(name: str) -> str:
    """Check a chat format name; a miss lists the valid names."""
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}; expected one of {', '.join(FORMATS)}")
    return name


def detect_chat_format(tok) -> str:
    """Pick the format from the chat template, then the model family, then the vocabulary."""
    t = tok.chat_template or ""
    if "<|im_start|>" in t:
        return "chatml"
    if "<|start_header_id|>" in t:
        return "llama3"
    if B_INST in t:
        return "llama2" if "<<SYS>>" in t else "mistral"
    if tok.family == "llama3":
        return "llama3"
    if tok.family in ("mistral", "mixtral"):
        return "mistral"
    if "<|start_header_id|>" in tok.special_tokens:
        return "llama3"
    if "<|im_start|>" in tok.special_tokens:
        return "chatml"
    if B_INST in tok.special_tokens:  # Mistral v2/v3 SentencePiece vocab: [INST] is a control token
        return "mistral"
    if tok.path is not None and re.search(r"\.model\.v\d+$", tok.path.name):  # mistral-common's file names
        return "mistral"
    return "llama2"


@dataclass
class Message:
    """One checked turn. An assistant turn may carry tool calls; a tool turn answers the call tool_call_id."""

    role: str  # system | user | assistant | tool
    content: str
    tool_calls: list = field(default_factory=list)  # [tools.ToolCall]
    tool_call_id: Optional[str] = None
    name: Optional[str] = None  # a tool turn: the function's name


def _message(m, i: int) -> Message:
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
    role = "tool" if m["role"] == "ipython" else m["role"]
    content = m.get("content")
    if role not in ROLES:
        raise ValueError(f"message {i}: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
    calls = m.get("tool_calls") or []
    if role == "assistant" and calls:
        if not isinstance(calls, list):
            raise ValueError(f"message {i}: tool_calls must be a list")
        calls = [tl.parse_call(c, f"message {i}: tool_calls[{k}]") for k, c in enumerate(calls)]
        content = content or ""
    elif calls:
        raise ValueError(f"message {i}: only an assistant message has tool_calls")
    if not isinstance(content, str):
        raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
    return Message(role, content, calls, m.get("tool_call_id"), m.get("name"))


def _validate(messages, fmt: str) -> list[Message]:
    """Check roles, order and content types; errors name the message index."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("empty dialog: expected a non-empty list of {'role', 'content'} messages")
    out = [_message(m, i) for i, m in enumerate(messages)]
    if fmt not in TOOL_FORMATS:
        for i, m in enumerate(out):
            if m.role == "tool" or m.tool_calls:
                raise ValueError(f"message {i}: chat format {fmt} has no tool-calling form (llama3, mistral and "
                                 "template have one)")
    if fmt in ("llama2", "mistral"):
        # tool calls and their results sit between a user turn and the answer: the rest alternates
        turns = [(i, m.role) for i, m in enumerate(out) if m.role != "tool" and not m.tool_calls]
        start = 1 if turns and turns[0][1] == "system" else 0
        if start == len(turns):
            raise ValueError(f"message 0: a {fmt} dialog needs a user message after the system prompt")
        for k in range(start, len(turns)):
            i, role = turns[k]
            want = "user" if (k - start) % 2 == 0 else "assistant"
            if role != want:
                raise ValueError(f"message {i}: expected role {want!r}, got {role!r} ({fmt} needs a "
                                 f"leading optional system message, then alternating user/assistant turns)")
    return out


def encode_dialog(tok, messages, fmt: str, add_generation_prompt: bool,
                  tools: Optional[list] = None) -> tuple[list[int], list[bool]]:
    """(ids, mask) for a dialog; mask is True on assistant output tokens and their end-of-turn token.

    add_generation_prompt appends the assistant header (llama3, chatml); [INST] formats end at the user turn.
    tools: OpenAI's tools list, written into the prompt in the format's own way (llama3, mistral, template)."""
    fmt = resolve_format(fmt)
    msgs = _validate(messages, fmt)
    tools = tl.check_tools(tools) if tools else []
    if tools and fmt not in TOOL_FORMATS:
        raise ValueError(f"chat format {fmt} has no tool-calling form (llama3, mistral and template have one)")
    if fmt == "template":
        return jinja_template.encode(tok, list(messages), tools, add_generation_prompt)
    if fmt in ("llama3", "mistral"):
        segments = _ENCODERS[fmt](tok, msgs, add_generation_prompt, tools)
    else:
        segments = _ENCODERS[fmt](tok, [(m.role, m.content) for m in msgs], add_generation_prompt)
    ids = [t for seg, _ in segments for t in seg]
    mask = [learn for seg, learn in segments for _ in seg]
    return ids, mask


def _text(tok, s: str) -> list[int]:
    return tok.encode(s, bos=False, eos=False)


def _split_at_prefix(tok, prefix: str, full: str) -> tuple[list[int], list[int]]:
    """Encode `full` in one piece (as the reference does) and cut it where `prefix`'s tokens end.

    Should a token straddle the boundary, it goes to the answer side: the model must emit it."""
    a, b = _text(tok, prefix), _text(tok, full)
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return b[:k], b[k:]


def _bos(tok) -> list[int]:
    if tok.bos_id is None:
        raise ValueError(f"tokenizer {tok.path} has no BOS token, which this chat format needs")
    return [tok.bos_id]


def _eos(tok) -> list[int]:
    if tok.eos_id is None:
        raise ValueError(f"tokenizer {tok.path} has no EOS token, which this chat format needs")
    return [tok.eos_id]


def _llama2(tok, msgs, add_generation_prompt):
    # Meta's llama/generation.py chat_completion: system folded into the first user turn; each exchange
    # is its own BOS ... EOS sequence.
    if msgs[0][0] == "system":
        msgs = [("user", B_SYS + msgs[0][1] + E_SYS + msgs[1][1])] + msgs[2:]
    segs = []
    for i in range(0, len(msgs) - 1, 2):
        prompt = f"{B_INST} {msgs[i][1].strip()} {E_INST}"
        head, answer = _split_at_prefix(tok, prompt, f"{prompt} {msgs[i + 1][1].strip()} ")
        segs += [(_bos(tok) + head, False), (answer + _eos(tok), True)]
    if len(msgs) % 2 == 1:  # final user turn: the prompt the model answers (the only generation prompt here)
        segs.append((_bos(tok) + _text(tok, f"{B_INST} {msgs[-1][1].strip()} {E_INST}"), False))
    return segs


def _mistral(tok, msgs, add_generation_prompt, tools):
    # mistral-common's SentencePiece instruct tokenizers. v1 (Mistral 7B v0.1, Mixtral 8x7B): one BOS, "[INST]"
    # as text, system prompt prepended to the first user message. v2/v3 (vocab with an [INST] control token,
    # e.g. Mistral 7B v0.3): [INST]/[/INST] control ids, system prompt on the last user message, answers rstrip(" ").
    # Tools follow v3: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] calls, [TOOL_RESULTS] results.
    control = "[INST]" in tok.special_tokens
    if (tools or any(m.role == "tool" or m.tool_calls for m in msgs)) and "[TOOL_CALLS]" not in tok.special_tokens:
        raise ValueError(f"tokenizer {tok.path} has no [TOOL_CALLS] token: this Mistral version has no tool calling")
    system = msgs[0].content if msgs[0].role == "system" else ""
    msgs = msgs[1:] if msgs[0].role == "system" else msgs
    users = [i for i, m in enumerate(msgs) if m.role == "user"]
    gets_system = users[-1] if control else users[0]
    segs = [(_bos(tok), False)]
    for i, m in enumerate(msgs):
        content = m.content
        if m.role == "assistant" and m.tool_calls:
            segs.append(([tok.token_id("[TOOL_CALLS]")] + _text(tok, tl.mistral_calls_text(m.tool_calls))
                         + _eos(tok), True))
        elif m.role == "assistant":
            segs.append((_text(tok, content.rstrip(" ") if control else content) + _eos(tok), True))
        elif m.role == "tool":
            segs.append(([tok.token_id("[TOOL_RESULTS]")] + _text(tok, tl.mistral_result_text(content, m.tool_call_id))
                         + [tok.token_id("[/TOOL_RESULTS]")], False))
        else:
            if i == gets_system and system:
                content = system + "\n\n" + content
            if i == users[-1] and tools:
                segs.append(([tok.token_id("[AVAILABLE_TOOLS]")] + _text(tok, tl.mistral_tools_text(tools))
                             + [tok.token_id("[/AVAILABLE_TOOLS]")], False))
            if control:
                segs.append(([tok.token_id(B_INST)] + _text(tok, content) + [tok.token_id(E_INST)], False))
            else:
                segs.append((_text(tok, f"{B_INST} {content} {E_INST}"), False))
    return segs


def _llama3(tok, msgs, add_generation_prompt, tools):
    # llama-models ChatFormat.encode_dialog_prompt: content is not stripped. With tools, Llama 3.1's JSON tool
    # calling (tools.py): an ipython system prompt, the functions in a user turn, calls ended by <|eom_id|>.
    start, end, eot = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def header(role):
        return [start] + _text(tok, "ipython" if role == "tool" else role) + [end] + _text(tok, "\n\n")

    if tools:
        system = msgs[0].content if msgs[0].role == "system" else ""
        rest = msgs[1:] if msgs[0].role == "system" else msgs
        first_user = next((i for i, m in enumerate(rest) if m.role == "user"), len(rest))
        msgs = ([Message("system", tl.llama3_system(system, tl.today()))] + rest[:first_user]
                + [Message("user", tl.llama3_tools_turn(tools))] + rest[first_user:])
    segs = [([tok.token_id("<|begin_of_text|>")], False)]
    for m in msgs:
        learn = m.role == "assistant"
        body = _text(tok, m.content) + [t for c in m.tool_calls for t in _text(tok, tl.llama3_call_text(c))]
        close = tok.token_id("<|eom_id|>") if m.tool_calls else eot  # a call waits for its result: end of message
        segs += [(header(m.role), False), (body, learn), ([close], learn)]
    if add_generation_prompt:
        segs.append((header("assistant"), False))
    return segs


def _chatml(tok, msgs, add_generation_prompt):
    # Text between special tokens is tokenized as one piece, exactly as HF tokenizes the rendered template.
    im_start, im_end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    use_bos, default_system = chatml_template_info(tok)
    segs = [(_bos(tok), False)] if use_bos else []
    if default_system is not None and msgs[0][0] != "system":
        msgs = [("system", default_system)] + msgs
    for role, content in msgs:
        learn = role == "assistant"
        head, body = _split_at_prefix(tok, role + "\n", role + "\n" + content)
        segs += [([im_start] + head, False), (body + [im_end], learn), (_text(tok, "\n"), False)]
    if add_generation_prompt:
        segs.append(([im_start] + _text(tok, "assistant\n"), False))
    return segs


def chatml_template_info(tok) -> tuple[bool, str | None]:
    """(starts with BOS, default system prompt) of a ChatML chat template, found by rendering it once."""
    cached = getattr(tok, "_chatml_info", None)
    if cached is not None and cached[0] == tok.chat_template:
        return cached[1]
    info = (False, None)
    if tok.chat_template:
        marker = "\x00USER\x00"
        try:
            text = jinja_template.render_template(tok.chat_template, messages=[{"role": "user", "content": marker}],
                                                 bos_token="\x00BOS\x00", eos_token="\x00EOS\x00", add_generation_prompt=False)
        except Exception as e:  # jinja syntax/undefined errors, a bound hit: say which template failed
            raise ValueError(f"chat_template of {tok.path} could not be rendered to find its default system "
                             f"prompt: {type(e).__name__}: {e}") from None
        use_bos = text.startswith("\x00BOS\x00")
        before = text[:text.index(marker)] if marker in text else ""
        head = "<|im_start|>system\n"
        system = None
        if head in before:
            system = before[before.index(head) + len(head):].split("<|im_end|>", 1)[0]
        info = (use_bos, system)
    tok._chatml_info = (tok.chat_template, info)
    return info


_ENCODERS = {"llama2": _llama2, "llama3": _llama3, "mistral": _mistral, "chatml": _chatml}

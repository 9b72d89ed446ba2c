"""Chat formats (llama2, llama3, mistral, chatml): dialog -> token ids plus a loss mask over assistant output."""

import re

FORMATS = ("llama2", "llama3", "mistral", "chatml")
ROLES = ("system", "user", "assistant")
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


def _validate(messages, fmt: str) -> list[tuple[str, str]]:
    """Check roles, order and content types; errors name the message index."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("empty dialog: expected a non-empty list of {'role', 'content'} messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a str, got {type(content).__name__}")
        out.append((role, content))
    if fmt in ("llama2", "mistral"):
        start = 1 if out[0][0] == "system" else 0
        if start == len(out):
            raise ValueError(f"message 0: a {fmt} dialog needs a user message after the system prompt")
        for i in range(start, len(out)):
            want = "user" if (i - start) % 2 == 0 else "assistant"
            if out[i][0] != want:
                raise ValueError(f"message {i}: expected role {want!r}, got {out[i][0]!r} ({fmt} needs a "
                                 f"leading optional system message, then alternating user/assistant turns)")
    return out


def encode_dialog(tok, messages, fmt: str, add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
    """(ids, mask) for a dialog; mask is True on assistant output tokens and their end-of-turn token.

    add_generation_prompt appends the assistant header (llama3, chatml); [INST] formats end at the user turn."""
    fmt = resolve_format(fmt)
    msgs = _validate(messages, fmt)
    segments = _ENCODERS[fmt](tok, msgs, add_generation_prompt)
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


def _mistral(tok, msgs, add_generation_prompt):
    # mistral-common's SentencePiece instruct tokenizers. v1 (Mistral 7B v0.1, Mixtral 8x7B): one BOS, "[INST]"
    # as text, system prompt prepended to the first user message. v2/v3 (vocab with an [INST] control token,
    # e.g. Mistral 7B v0.3): [INST]/[/INST] control ids, system prompt on the last user message, answers rstrip(" ").
    control = "[INST]" in tok.special_tokens
    system = msgs[0][1] if msgs[0][0] == "system" else ""
    msgs = msgs[1:] if msgs[0][0] == "system" else msgs
    users = [i for i, (role, _) in enumerate(msgs) if role == "user"]
    gets_system = users[-1] if control else users[0]
    segs = [(_bos(tok), False)]
    for i, (role, content) in enumerate(msgs):
        if role == "assistant":
            segs.append((_text(tok, content.rstrip(" ") if control else content) + _eos(tok), True))
            continue
        if i == gets_system and system:
            content = system + "\n\n" + content
        if control:
            segs.append(([tok.token_id(B_INST)] + _text(tok, content) + [tok.token_id(E_INST)], False))
        else:
            segs.append((_text(tok, f"{B_INST} {content} {E_INST}"), False))
    return segs


def _llama3(tok, msgs, add_generation_prompt):
    # llama-models ChatFormat.encode_dialog_prompt: content is not stripped.
    start, end, eot = (tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

    def header(role):
        return [start] + _text(tok, role) + [end] + _text(tok, "\n\n")

    segs = [([tok.token_id("<|begin_of_text|>")], False)]
    for role, content in msgs:
        learn = role == "assistant"
        segs += [(header(role), False), (_text(tok, content), learn), ([eot], learn)]
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
            text = render_template(tok.chat_template, messages=[{"role": "user", "content": marker}],
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


# A chat template comes from a file: it renders in jinja's sandbox (no attribute access to Python internals) and
# within bounds, so a template that loops for ever or writes gigabytes fails with an error instead of hanging.
TEMPLATE_MAX_STEPS = 1_000_000  # range() items over the whole render
TEMPLATE_MAX_CHARS = 1_000_000  # rendered text, and any string or list a template builds with * or **
TEMPLATE_MAX_SECONDS = 5.0


def render_template(template: str, **context) -> str:
    """A chat template rendered with jinja's ImmutableSandboxedEnvironment and the TEMPLATE_MAX_* bounds."""
    import time

    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    left = [TEMPLATE_MAX_STEPS]
    deadline = time.monotonic() + TEMPLATE_MAX_SECONDS

    def check_time():
        if time.monotonic() > deadline:
            raise SecurityError(f"the template ran longer than {TEMPLATE_MAX_SECONDS:g} s")

    def bounded_range(*args):
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise SecurityError(f"the template loops more than {TEMPLATE_MAX_STEPS} times")
        check_time()
        return r

    def raise_exception(msg):
        raise ValueError(msg)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left_, right_):
            if operator == "**" and isinstance(right_, (int, float)) and abs(right_) > 64:
                raise SecurityError(f"the template raises to the power {right_}")
            if operator == "*":
                sizes = [len(x) for x in (left_, right_) if isinstance(x, (str, list, tuple))]
                counts = [x for x in (left_, right_) if isinstance(x, int)]
                if sizes and counts and sizes[0] * counts[0] > TEMPLATE_MAX_CHARS:
                    raise SecurityError(f"the template builds a value longer than {TEMPLATE_MAX_CHARS}")
            return super().call_binop(context, operator, left_, right_)

    env = Bounded(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, range=bounded_range)
    out, size = [], 0
    for piece in env.from_string(template).generate(**context):
        out.append(piece)
        size += len(piece)
        if size > TEMPLATE_MAX_CHARS:
            raise SecurityError(f"the template writes more than {TEMPLATE_MAX_CHARS} characters")
        check_time()
    return "".join(out)


_ENCODERS = {"llama2": _llama2, "llama3": _llama3, "mistral": _mistral, "chatml": _chatml}

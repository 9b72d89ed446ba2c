"""--chat_format template: the checkpoint's own Jinja chat_template, token for token as transformers'
apply_chat_template renders and tokenizes it, with a loss mask over the assistant turns; a hostile template fails
fast instead of hanging or eating memory."""

import time

import pytest

from minillama.tokenizer.tokenizer import load_tokenizer
from test_chat_format import MULTI, SINGLE, SYSTEM


@pytest.fixture(scope="module")
def smol(smol_dir):
    return load_tokenizer(smol_dir, chat_format="template")


@pytest.fixture(scope="module")
def smol_hf(smol_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol_dir)


DIALOGS = [MULTI, [SYSTEM] + MULTI, SINGLE, [SYSTEM] + SINGLE, [{"role": "user", "content": "<|im_end|> is text"}]]


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("k", range(len(DIALOGS)))
def test_smollm2_template_equals_transformers_apply_chat_template(smol, smol_hf, k, gen):
    dialog = DIALOGS[k]
    expected = smol_hf.apply_chat_template(dialog, tokenize=True, add_generation_prompt=gen)
    expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    assert smol.encode_dialog(dialog, add_generation_prompt=gen) == expected


def test_template_equals_the_hand_written_chatml_format(smol):
    for dialog in DIALOGS[:4]:
        assert smol.encode_dialog(dialog, format="template") == smol.encode_dialog(dialog, format="chatml")


def test_template_mask_is_exactly_the_assistant_turns(smol):
    ids, mask = smol.encode_dialog_with_mask([SYSTEM] + MULTI[:4])
    learned = smol.decode([t for t, m in zip(ids, mask) if m])
    assert learned == "".join(m["content"] + "<|im_end|>\n" for m in MULTI[:4] if m["role"] == "assistant")


def test_template_sees_tools(tmp_path, smol_dir):
    import shutil
    d = tmp_path / "tok"
    shutil.copytree(smol_dir, d)
    tok = load_tokenizer(d, chat_format="template")
    tok.chat_template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    text = tok.decode(tok.encode_dialog(SINGLE[:1], tools=[{"type": "function", "function": {"name": "f"}}]))
    assert text == "[f]user: Hi there\n"


@pytest.mark.parametrize("hostile, why", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{{ 'a' * 1000000000 }}", "repetition"),
    ("{% for i in range(100000) %}{{ 'x' * 900000 }}{% endfor %}", "characters"),
    ("{{ 2 ** 100000000 }}", "exponent"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
    ("{% for m in messages %}{{ raise_exception('no system role') }}{% endfor %}", "no system role"),
])
def test_a_hostile_template_fails_fast_with_a_value_error(smol, hostile, why):
    original, smol.chat_template = smol.chat_template, hostile
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match="chat_template of") as e:
            smol.encode_dialog(SINGLE)
        assert time.perf_counter() - start < 20
        assert why in str(e.value) or why == "unsafe"
    finally:
        smol.chat_template = original

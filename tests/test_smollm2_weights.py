"""weights/prepare_smollm2.py: the HF directory it writes is the GGUF model, token for token and logit for logit."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from minillama import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "weights" / "prepare_smollm2.py"
# Mixed scripts, digits, code, runs of whitespace, an emoji, a special token (see the digits test for what is left out).
TEXT = ("Héllo, wörld! 你好，世界。Привет мир 🤗 x=3.14159; def f(n):\n\treturn n**2  # 2024\n\n"
        "  <|im_end|> ünïcödé")
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "And in French? ça va"},
]


@pytest.fixture(scope="module")
def gguf_tokenizer(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def prompt_ids(gguf_tokenizer) -> torch.Tensor:
    """(1, T) chat-formatted question, tokenized by transformers from the GGUF."""
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = gguf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def gguf_logits(smollm2_gguf, prompt_ids) -> torch.Tensor:
    """(1, T, V) float32 logits of transformers reading the GGUF itself (its own dequantize + q/k un-permute)."""
    model = transformers.LlamaForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return model(prompt_ids).logits.float()


@pytest.fixture(scope="module")
def hf_model(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).eval()


def test_directory_is_complete_and_float32(smollm2_dir):
    files = sorted(p.name for p in smollm2_dir.iterdir())
    assert files == sorted(["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                            "tokenizer.json", "tokenizer_config.json"])
    assert not list(smollm2_dir.parent.glob(".*tmp*")), "temp dir left next to the output"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (576, 30, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5


def test_rerun_is_a_noop(smollm2_dir):
    before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(smollm2_dir)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "already prepared" in proc.stdout and "generate/chat.py" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before


def test_refuses_to_overwrite_a_partial_directory(tmp_path):
    out = tmp_path / "partial"
    out.mkdir()
    (out / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "lacks" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_logits_match_transformers_reading_the_gguf(hf_model, prompt_ids, gguf_logits):
    with torch.no_grad():
        logits = hf_model(prompt_ids).logits
    assert hf_model.dtype == torch.float32 and logits.shape == gguf_logits.shape
    assert (logits - gguf_logits).abs().max().item() <= 1e-4


def test_tokenizer_matches_transformers_reading_the_gguf(smollm2_dir, gguf_tokenizer):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok(TEXT).input_ids
    assert ids == gguf_tokenizer(TEXT).input_ids
    assert tok.decode(ids) == TEXT  # byte-level: lossless
    assert tok.convert_ids_to_tokens(ids).count("<|im_end|>") == 1  # special token kept whole
    for gen in (False, True):
        chat = CHAT if not gen else CHAT[:-1]
        ours = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
        theirs = gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert ours == theirs
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(gguf_tokenizer, name), name
    assert tok.model_max_length == 8192


def test_digits_split_off_before_the_byte_level_regex_like_llama_cpp_smollm(smollm2_dir):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) isolates each digit first, so a run of
    # spaces before a number stays one chunk. transformers' GGUF tokenizer ignores tokenizer.ggml.pre here and gives
    # ['total', ':', 'ĠĠ', 'Ġ', '1', '0', '0'], which is why TEXT above has no whitespace run right before a digit.
    # Loaded with the `tokenizers` library alone: the file must not need transformers.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tok.encode("total:   100").tokens == ["total", ":", "ĠĠĠ", "1", "0", "0"]
    assert tok.encode("x\n\n3").tokens == ["x", "ĊĊ", "3"]


def test_greedy_answer_mentions_paris(hf_model, prompt_ids, smollm2_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    out = hf_model.generate(prompt_ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt_ids.shape[1]:])


def test_minillama_logits_match_transformers_reading_the_gguf(smollm2_dir, prompt_ids, gguf_logits):
    model = load_model(smollm2_dir).eval()
    with torch.no_grad():
        logits = model(prompt_ids).float()  # (1, T, V)
    assert logits.shape == gguf_logits.shape
    # 1e-4 relative to the logit scale (|logits| reach ~30 here; HF's own sdpa vs eager differ by ~8e-5 absolute)
    scale = gguf_logits.abs().max().item()
    assert (logits - gguf_logits).abs().max().item() <= 1e-4 * scale
    assert (logits - gguf_logits).abs().max().item() <= 2e-4  # measured 9.6e-5; HF sdpa vs eager differ by 8e-5
    assert (logits.argmax(-1) == gguf_logits.argmax(-1)).all()


def test_bad_gguf_is_one_error_line_and_leaves_nothing(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    out = tmp_path / "out"
    for gguf, match in [(junk, "junk.gguf: "), (tmp_path / "absent.gguf", "no such file")]:
        proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--gguf", str(gguf)],
                              capture_output=True, text=True)
        assert proc.returncode == 1 and proc.stderr.startswith("error:") and match in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]  # no output dir, no temp dir

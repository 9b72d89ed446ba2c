"""llama.cpp as the client of our GGUF export: llama-cpp-python loads what export_gguf writes and agrees with us.

Skipped when llama_cpp is not importable (`pip install llama-cpp-python`, in the test extra; it builds llama.cpp from
source, ~8 minutes on 2 cores, then pip's wheel cache has it).

Tolerances: llama.cpp multiplies f16 weights by activations it also rounds to f16, so its logits differ from ours
(float32 on the same f16-rounded weights) by a few 1e-3 of their range: <= 1e-2 * max|logit| on the tiny random
models, <= 2e-2 on SmolLM2 (relative L2 measured 0.0017). q8_0 also rounds the activations to 8 bits in every
matmul: SmolLM2's q8_0 logits are within 0.1 relative L2 of our float32 ones (measured 0.071) with the same argmax
at >= 90% of positions (measured 29 of 31).
"""

import numpy as np
import pytest
import torch

from helpers import MOE_ARGS, random_tokens, tiny_model, train_tiny_spm

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from minillama.checkpoints import load_model  # noqa: E402
from minillama.checkpoints.gguf_export import export_gguf  # noqa: E402
from minillama.inference.generate import generate  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402

from test_gguf_export import LLAMA3_TOKENIZER, through  # noqa: E402

TEXTS = ["Hello world", " The capital of France is Paris.\n\nIt has 2,161,000 inhabitants (2019)!",
         "naïve café — 東京 🙂 don't  stop", "x = [1, 22, 333];\tprint(x)"]


def llama(path, n_ctx: int = 256):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_threads_batch=1, logits_all=True,
                           verbose=False, seed=0)


def cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits at every position of `ids`. (T, V)"""
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))


def cpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    """(our float32 SmolLM2, its tokenizer, f16 GGUF path, q8_0 GGUF path)"""
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    d = tmp_path_factory.mktemp("smol_gguf")
    return model, tok, export_gguf(model, tok, d / "f16.gguf", "f16"), export_gguf(model, tok, d / "q8_0.gguf", "q8_0")


def test_smollm2_f16_tokenizes_and_greedy_decodes_as_we_do(smol, one_thread):
    model, tok, f16, _ = smol
    llm = llama(f16)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text), text
    prompt = tok.encode_dialog([{"role": "user", "content": "Name three colors of the rainbow."}])
    ours = generate(model, [prompt], 16)[0]
    assert cpp_greedy(llm, prompt, 16) == ours
    got, want = cpp_logits(llm, prompt), model(torch.tensor([prompt]))[0].detach()
    assert (got - want).abs().max().item() <= 2e-2 * want.abs().max().item()


def test_smollm2_q8_0_logits_within_quantization_error(smol, one_thread):
    model, tok, _, q8 = smol
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 3)
    got, want = cpp_logits(llama(q8), prompt), model(torch.tensor([prompt]))[0].detach()
    assert ((got - want).norm() / want.norm()).item() <= 0.1
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9


def test_smollm2_chat_completion_uses_the_template_and_stops_at_im_end(smol, one_thread):
    """llama-cpp-python formats the chat with the file's tokenizer.chat_template and stops at its EOS: the answer is
    our greedy answer to our own encoding of the chat, cut at <|im_end|>."""
    model, tok, f16, _ = smol
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Say hello."}]
    out = llama(f16).create_chat_completion(messages, temperature=0.0, max_tokens=48)
    ours = generate(model, [tok.encode_dialog(messages)], 48, stop_ids=tok.stop_ids)[0]
    assert len(ours) < 48 and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["message"]["content"] == tok.decode(ours)
    assert out["usage"]["prompt_tokens"] == len(tok.encode_dialog(messages))


@pytest.mark.parametrize("case", ["llama3_tiktoken", "mixtral_spm", "llama2_spm_tied"])
def test_tiny_models_load_and_agree(case, tmp_path, one_thread):
    if case == "llama3_tiktoken":
        if not LLAMA3_TOKENIZER.is_file():
            pytest.skip("llama-models is not installed")
        tok, model = load_tokenizer(LLAMA3_TOKENIZER), tiny_model(vocab_size=128256, rope_theta=500000.0)
    else:
        tok = load_tokenizer(train_tiny_spm(tmp_path))
        extra = MOE_ARGS if case == "mixtral_spm" else {"tie_embeddings": True}
        model = tiny_model(vocab_size=256, **extra)
        model.tie_weights()
    llm = llama(export_gguf(model, tok, tmp_path / "m.gguf", "f16"), n_ctx=model.args.max_seq_len)
    for text in (TEXTS[:2] if case == "llama3_tiktoken" else ["abc def ghijk lmnop", "pon mlk jih"]):
        assert llm.tokenize(text.encode(), add_bos=True) == tok.encode(text), text
    ids = random_tokens(min(tok.vocab_size, 256), T=24, B=1)[0].tolist()
    want = through(model, lambda n, p: p.half().float())(torch.tensor([ids]))[0].detach()
    got = cpp_logits(llm, ids)
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_lora_adapter_gguf_loads_in_llama_cpp_and_equals_ours(tmp_path, one_thread):
    """export_gguf_lora: llama.cpp applies our adapter (llama-cli --lora) and gives our LoRA model's logits."""
    from helpers import randomize_adapter
    from minillama.checkpoints.gguf_export import export_gguf_lora
    from minillama.lora.layers import apply_lora
    tok = load_tokenizer(train_tiny_spm(tmp_path))
    model = tiny_model(vocab_size=256)
    base = export_gguf(model, tok, tmp_path / "base.gguf", "f16")
    model = through(model, lambda n, p: p.half().float())  # the weights llama.cpp holds
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"))
    randomize_adapter(model, seed=2, std=0.1)
    adapter = export_gguf_lora(model, tmp_path / "lora.gguf")
    ids = random_tokens(200, T=24, B=1)[0].tolist()
    want = model(torch.tensor([ids]))[0].detach()
    llm = llama_cpp.Llama(model_path=str(base), lora_path=str(adapter), n_ctx=64, n_threads=1, logits_all=True,
                          verbose=False)
    got = cpp_logits(llm, ids)
    plain = cpp_logits(llama(base, n_ctx=64), ids)
    assert (plain - want).abs().max().item() > 0.1 * want.abs().max().item()  # the adapter matters
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()

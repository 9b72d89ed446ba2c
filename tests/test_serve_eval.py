"""What evaluation needs from the server, through the official openai client on SmolLM2: logprobs equal HF's
log_softmax of its logits (completions with echo, chat), several prompts and n samples in one request (the samples
share the prompt's prefill), OpenAI's frequency/presence penalties and logit_bias, min_p, and a 400 naming any field
the server does not honour."""

import json

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from minillama import load_model  # noqa: E402
from minillama.inference.engine import Engine, EngineConfig
from minillama.inference.request import Request
from minillama.inference.generate import generate  # noqa: E402
from minillama.inference.sampling import SamplingParams, apply_min_p  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402
from test_serve import post_raw, start_server  # noqa: E402

MODEL = "smol"


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir), hf


@pytest.fixture(scope="module")
def server(smollm2_dir):
    proc, url, _ = start_server(["--ckpt", smollm2_dir, "--model_name", MODEL, "--max_seq_len", 256,
                                 "--max_batch_size", 8, "--temperature", 0])
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """HF's log_softmax of its float32 logits: row j is the distribution of token j + 1. (T, V)"""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_completion_logprobs_with_echo_equal_hf_log_softmax(client, smol):
    """lm-eval's loglikelihood request (token prompts, echo, logprobs, max_tokens=1) plus a text prompt: every
    prompt and answer token's logprob equals HF's to 1e-4, the first is null, top_logprobs hold the top tokens."""
    _, tok, hf = smol
    prompts = [tok.encode("The capital of France is Paris", bos=True), tok.encode("Bees make honey and", bos=True)]
    r = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=3, max_tokens=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, c in zip(prompts, r.choices):
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + 2 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        answer = tok.encode(c.text[len(tok.decode(ids)):], bos=False)
        ref = hf_logprobs(hf, ids + answer[:2])
        want = [ref[j - 1, t].item() for j, t in enumerate(ids + answer[:2]) if j > 0]
        assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), torch.tensor(want), atol=1e-4)
        for j in range(1, len(lp.tokens)):
            top = ref[j - 1].topk(3)
            assert len(lp.top_logprobs[j]) in (3, 4)  # the top 3, plus the chosen token when it is not among them
            assert max(lp.top_logprobs[j].values()) == pytest.approx(top.values[0].item(), abs=1e-4)
        assert "".join(lp.tokens) == c.text and lp.text_offset == sorted(lp.text_offset)
        assert lp.text_offset[-1] == len(c.text) - len(lp.tokens[-1])


def test_chat_logprobs_equal_hf_log_softmax_in_the_chat_shape(client, smol):
    _, tok, hf = smol
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, logprobs=True, top_logprobs=5, max_tokens=6,
                                       temperature=0)
    content = r.choices[0].logprobs.content
    ids = tok.encode_dialog(msgs)
    answer = [tok.encode(bytes(e.bytes).decode("utf-8"), bos=False)[0] for e in content]
    ref = hf_logprobs(hf, ids + answer)
    for j, e in enumerate(content):
        dist = ref[len(ids) - 1 + j]
        assert e.logprob == pytest.approx(dist[answer[j]].item(), abs=1e-4)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(dist.topk(5).values.tolist(), abs=1e-4)
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely one
        assert bytes(e.bytes).decode("utf-8") == e.token
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_a_prompt_list_and_n_samples_in_one_request(client, smol):
    """3 prompts x n=2: six choices indexed prompt * n + sample; greedy samples equal each other and the prompt's
    answer alone; each prompt's tokens count once in usage."""
    model, tok, _ = smol
    texts = ["The capital of France is", "Bees make", "One, two,"]
    r = client.completions.create(model=MODEL, prompt=texts, n=2, max_tokens=5, temperature=0)
    assert [c.index for c in r.choices] == list(range(6))
    ids = [tok.encode(t, bos=True) for t in texts]
    alone = [tok.decode(o) for o in generate(model, ids, 5, stop_ids=tok.stop_ids)]
    assert [c.text for c in r.choices] == [a for a in alone for _ in range(2)]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 30
    sampled = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                                             n=3, max_tokens=12, temperature=1.0, seed=7)
    assert len({c.message.content for c in sampled.choices}) > 1  # the samples differ
    again = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a story."}],
                                           n=3, max_tokens=12, temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in sampled.choices]


def test_streamed_choices_with_logprobs_equal_the_non_streamed_ones(client):
    kw = dict(model=MODEL, prompt=["Once upon a time", "The sea is"], n=2, max_tokens=8, temperature=0, logprobs=2,
              echo=True)
    full = client.completions.create(**kw)
    text, lps = {}, {}
    for ch in client.completions.create(stream=True, **kw):
        for c in ch.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.logprobs is not None:
                lps.setdefault(c.index, []).extend(c.logprobs.token_logprobs)
    assert [text[i] for i in range(4)] == [c.text for c in full.choices]
    for i, c in enumerate(full.choices):  # other batch neighbours: float32 rounding only
        assert lps[i][0] is None and lps[i][1:] == pytest.approx(c.logprobs.token_logprobs[1:], abs=1e-4)


def test_n_samples_prefill_the_prompt_once(smol, one_thread):
    model, tok, _ = smol
    prompt = tok.encode("A long prompt about the sea and its waves, " * 4, bos=True)
    engine = Engine(model, EngineConfig(batch_size=4, cache_len=128, prefill_chunk=16))
    first = engine.submit(Request(prompt, 4, key="s0"))
    forks = [engine.submit(Request(prompt, 4, key=f"s{i}", fork_of="s0")) for i in (1, 2, 3)]
    while engine.busy:
        engine.step()
    assert engine.stats["prefilled"] == len(prompt) and engine.stats["copied"] == 3 * len(prompt)
    assert all(f.output == first.output for f in forks) and all(f.cached_tokens == len(prompt) for f in forks)


def reference_penalised_greedy(hf, ids, n, freq, presence, bias):
    """OpenAI's definition, step by step on HF's logits: logit - count * frequency - (count > 0) * presence + bias,
    counting the answer's tokens only."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids + out])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - counts * freq - (counts > 0).float() * presence
        for t, b in bias.items():
            logits[t] += b
        out.append(int(logits.argmax()))
    return out


def test_penalties_and_logit_bias_follow_openais_definition(client, smol):
    model, tok, hf = smol
    prompt, n = "Repeat after me: la la la la la la", 10
    ids = tok.encode(prompt, bos=True)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    first = tok.encode(plain.choices[0].text, bos=False)[0]
    bias = {first: -100.0, 13: 5.0}
    kw = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={str(k): v for k, v in bias.items()})
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=n, temperature=0, **kw)
    want = reference_penalised_greedy(hf, ids, n, 1.5, 0.5, bias)
    assert r.choices[0].text == tok.decode(want) != plain.choices[0].text
    assert first not in want
    params = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, logit_bias=bias)
    assert generate(model, [ids], n, params)[0] == want  # generate() takes the same SamplingParams
    forced = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0.9, seed=1,
                                       logit_bias={"42": 100})
    assert tok.encode(forced.choices[0].text, bos=False) == [42] * 4 or forced.choices[0].text == tok.decode([42] * 4)


def test_min_p_equals_hf():
    from transformers.generation.logits_process import MinPLogitsWarper
    logits = torch.randn(3, 50) * 3
    want = MinPLogitsWarper(0.1)(None, logits.clone())
    assert torch.equal(apply_min_p(logits, 0.1).isinf(), want.isinf())


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"best_of": 3, "n": 2}, "best_of"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"presence_penalty": -3}, "presence_penalty"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
    ("/v1/completions", {"min_p": 1.5}, "min_p"),
    ("/v1/completions", {"suffix": "x"}, "suffix"),
    ("/v1/completions", {"prompt": ["ok", 5]}, "prompt"),
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"typical_p": 0.5}, "typical_p"),
    ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"echo": True}, "echo"),
])
def test_unsupported_or_bad_fields_get_a_400_naming_them(server, path, body, param):
    base = {"model": MODEL, "max_tokens": 2}
    base.update({"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    status, out = post_raw(server, path, json.dumps({**base, **body}).encode())
    assert status == 400 and out["error"]["param"] == param, out
    status, out = post_raw(server, path, json.dumps({**base, "best_of": 1} if "prompt" in base else base).encode())
    assert status == 200, out

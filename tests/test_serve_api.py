"""The OpenAI surface clients hit, with the official openai client: an API key (401 without it), GET /v1/models/{id},
404 model_not_found, a Prometheus scrape of /metrics, one log line per request; and the Python API (Llama.build)
answering greedily exactly as the server does."""

import json
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
parser = pytest.importorskip("prometheus_client.parser")

from test_serve import start_server  # noqa: E402

KEY = "sk-test-123"
BASE = "smol"


@pytest.fixture(scope="module")
def server(smollm2_dir):
    proc, url, log = start_server(["--ckpt", smollm2_dir, "--model_name", BASE, "--max_seq_len", 256,
                                   "--max_batch_size", 4, "--temperature", 0], env={"MINILLAMA_API_KEY": KEY})
    yield url, log
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def get(url, headers=None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode(), r.headers.get("Content-Type")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), e.headers.get("Content-Type")


def test_without_the_key_every_route_but_health_is_a_401_with_openai_error_shape(server):
    url = server[0]
    wrong = openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    for path in ("/v1/models", "/v1/models/smol", "/metrics", "/v1/completions"):
        status, body, _ = get(url + path)
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key", path
    assert get(url + "/health")[0] == 200


def test_models_retrieve_and_an_unknown_model_is_404_model_not_found(client):
    assert client.models.retrieve(BASE).id == BASE
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert e.value.status_code == 404 and e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model" and BASE in e.value.body["message"]


def test_metrics_scrape_parses_and_counts_requests_tokens_and_first_token_times(client, server):
    url = server[0]
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Name a colour."}],
                                       max_tokens=5)
    list(client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                        stream=True))
    status, text, ctype = get(url + "/metrics", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and ctype.startswith("text/plain")
    fams = {f.name: f for f in parser.text_string_to_metric_families(text)}  # raises on a malformed line
    reqs = {(s.labels["route"], s.labels["status"]): s.value for s in fams["minillama_requests"].samples
            if s.name.endswith("_total")}
    assert reqs[("/v1/chat/completions", "200")] >= 2
    total = lambda name: next(s.value for s in fams[name].samples if s.name == name + "_total")  # noqa: E731
    assert total("minillama_completion_tokens") >= r.usage.completion_tokens + 1
    assert total("minillama_prompt_tokens") >= r.usage.prompt_tokens
    count = next(s.value for s in fams["minillama_time_to_first_token_seconds"].samples if s.name.endswith("_count"))
    assert count >= 2
    assert {"minillama_queue_depth", "minillama_running_rows"} <= set(fams)


def test_one_log_line_per_request_with_id_tokens_and_time(client, server):
    r = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "Say yes."}], max_tokens=4)
    job_id = r.id.removeprefix("chatcmpl-")
    deadline = time.time() + 10
    while time.time() < deadline and not any(job_id in line for line in server[1]):
        time.sleep(0.1)
    (line,) = [line for line in server[1] if job_id in line]
    assert f"POST /v1/chat/completions 200 in={r.usage.prompt_tokens} out={r.usage.completion_tokens} " in line
    assert "ttft=" in line and line.rstrip().endswith("s]")


# ---- the Python API (minillama.inference.api.Llama) answers as the server does ----

@pytest.fixture(scope="module")
def llama(smollm2_dir):
    from minillama.inference.api import Llama
    return Llama.build(smollm2_dir, max_seq_len=256)


def test_python_api_greedy_chat_and_text_equal_the_servers(llama, client):
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    (ours,) = llama.chat_completion([dialog], temperature=0, max_gen_len=24)
    theirs = client.chat.completions.create(model=BASE, messages=dialog, temperature=0, max_tokens=24)
    assert ours["generation"] == {"role": "assistant", "content": theirs.choices[0].message.content}
    (ours,) = llama.text_completion(["The three primary colours are"], temperature=0, max_gen_len=12)
    theirs = client.completions.create(model=BASE, prompt="The three primary colours are", temperature=0,
                                       max_tokens=12)
    assert ours["generation"] == theirs.choices[0].text


def test_python_api_logprobs_of_a_greedy_answer_are_each_steps_best(llama):
    import torch
    (r,) = llama.text_completion(["Once upon a time"], temperature=0, max_gen_len=6, logprobs=True)
    assert "".join(r["tokens"]) == r["generation"] and len(r["logprobs"]) == 6
    ids = llama.tokenizer.encode("Once upon a time", bos=True)
    out = llama.tokenizer.encode(r["generation"], bos=False)
    with torch.no_grad():
        for i, lp in enumerate(r["logprobs"]):  # greedy: the chosen token is the argmax at each step
            logits = llama.model(torch.tensor([ids + out[:i]]))[0, -1]
            assert lp == pytest.approx(torch.log_softmax(logits.float(), -1).max().item(), abs=1e-4)

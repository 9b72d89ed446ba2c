"""The OpenAI surface clients hit, with the official openai client: an API key (401 without it), GET /v1/models/{id},
404 model_not_found, a Prometheus scrape of /metrics, one log line per request; structured output (json_object,
strict json_schema, regex) and tool calls (auto, none, required, named), also through LangChain's
with_structured_output; and the Python API (Llama.build) answering greedily exactly as the server does.
The server runs SmolLM2 with --chat_format template (its own Jinja template, token-identical to chatml)."""

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
    proc, url, log = start_server(["--ckpt", smollm2_dir, "--model_name", BASE, "--max_seq_len", 384,
                                   "--max_batch_size", 4, "--temperature", 0, "--chat_format", "template"],
                                  env={"MINILLAMA_API_KEY": KEY})
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
    return Llama.build(smollm2_dir, max_seq_len=384)


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


# ---- structured output and tool calls ----

REVIEW = {"type": "object", "additionalProperties": False, "required": ["stars", "verdict"],
          "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "verdict": {"type": "string", "enum": ["good", "bad"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Review the film Alien."}]


def test_json_object_and_strict_json_schema_answers_parse(client):
    jsonschema = pytest.importorskip("jsonschema")
    r = client.chat.completions.create(model=BASE, max_tokens=60, response_format={"type": "json_object"},
                                       messages=[{"role": "user", "content": "Give me a JSON object with your name "
                                                                             "and age."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), REVIEW)
    assert r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=BASE, prompt="My phone number is", max_tokens=20,
                                  extra_body={"response_format": {"type": "regex", "regex": " [0-9]{3}-[0-9]{4}"}})
    assert __import__("re").fullmatch(" [0-9]{3}-[0-9]{4}", r.choices[0].text)


def test_pydantic_parse_through_the_openai_client(client):
    from typing import Literal

    from pydantic import BaseModel

    class Review(BaseModel):
        stars: int
        verdict: Literal["good", "bad"]
    r = client.chat.completions.parse(model=BASE, messages=ASK, max_tokens=60, response_format=Review)
    assert isinstance(r.choices[0].message.parsed, Review)


def test_a_constrained_row_and_a_free_row_share_the_batch(client):
    from concurrent.futures import ThreadPoolExecutor
    free = [{"role": "user", "content": "Name three colours."}]
    alone = client.chat.completions.create(model=BASE, messages=free, max_tokens=24).choices[0].message.content
    with ThreadPoolExecutor(4) as ex:
        futs = [ex.submit(client.chat.completions.create, model=BASE, messages=ASK, max_tokens=60,
                          response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": REVIEW}})
                for _ in range(2)]
        mixed = ex.submit(client.chat.completions.create, model=BASE, messages=free, max_tokens=24)
        assert mixed.result().choices[0].message.content == alone
        assert all(isinstance(json.loads(f.result().choices[0].message.content), dict) for f in futs)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_and_named_give_tool_calls(client, stream):
    def ask(choice):
        kw = dict(model=BASE, messages=[{"role": "user", "content": "What's the weather in Oslo?"}], max_tokens=60,
                  tools=[WEATHER, TIME], tool_choice=choice)
        if not stream:
            r = client.chat.completions.create(**kw)
            return r.choices[0].finish_reason, r.choices[0].message.tool_calls
        chunks = list(client.chat.completions.create(stream=True, **kw))
        calls = [c for ch in chunks for choice in ch.choices for c in (choice.delta.tool_calls or [])]
        return [choice.finish_reason for ch in chunks for choice in ch.choices if choice.finish_reason][0], calls
    finish, calls = ask("required")
    assert finish == "tool_calls" and calls[0].function.name in ("get_weather", "get_time")
    json.loads(calls[0].function.arguments)
    finish, (call,) = ask({"type": "function", "function": {"name": "get_time"}})
    assert finish == "tool_calls" and call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET") and call.id


def test_tool_choice_none_and_auto_answer_in_text_or_calls(client):
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8, tools=[WEATHER], tool_choice="auto")
    assert (r.choices[0].finish_reason == "tool_calls") == bool(r.choices[0].message.tool_calls)


def test_a_tool_round_trip_dialog_is_accepted(client):
    msgs = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]
    r = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8, tools=[WEATHER])
    assert r.choices[0].message.content is not None or r.choices[0].message.tool_calls


@pytest.mark.parametrize("body, param, status", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", 400),
    ({"response_format": {"type": "yaml"}}, "response_format", 400),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", 400),
    ({"tool_choice": "required"}, "tool_choice", 400),
    ({"tools": [{"type": "function"}]}, "tools", 400),
])
def test_bad_structured_requests_name_the_field(client, body, param, status):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=BASE, messages=ASK, max_tokens=4, extra_body=body)
    assert e.value.status_code == status and e.value.body["param"] == param, e.value.body


@pytest.mark.parametrize("method", ["function_calling", "json_schema", "json_mode"])
def test_langchain_with_structured_output(server, method):
    lc = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, ConfigDict, Field

    class Verdict(BaseModel):
        """A film's verdict."""
        model_config = ConfigDict(extra="forbid" if method != "json_mode" else "ignore")
        verdict: str = Field("", max_length=24)  # json_mode promises JSON, not this schema: a default for all

    llm = lc.ChatOpenAI(base_url=server[0] + "/v1", api_key=KEY, model=BASE, temperature=0, max_tokens=80,
                        max_retries=0)
    out = llm.with_structured_output(Verdict, method=method).invoke("Give me a JSON object with your name and age.")
    assert isinstance(out, Verdict)

"""generate/serve.py with the official openai client as the client, on SmolLM2 plus two random LoRA adapters:
answers equal chat.py / solo greedy decoding, streaming, concurrency, stop strings, seeds, disconnects, bad requests,
and the chat page driven in headless Chromium."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from minillama import load_model  # noqa: E402
from minillama.lora.peft import load_adapter, save_adapter  # noqa: E402
from minillama.inference.generate import generate  # noqa: E402
from minillama.lora.layers import apply_lora
from minillama.lora.slots import set_adapter
from minillama.tokenizer.tokenizer import decode_cut, load_tokenizer  # noqa: E402
from helpers import tiny_smol_vocab_checkpoint  # noqa: E402
from sft_helpers import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE, ADAPTER, ADAPTER2 = "smol", "noisy", "calm"
MAX_SEQ_LEN = 384
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
             "What is the largest planet?", "Who wrote Hamlet?", "What do bees make?", "Give me a word for happy."]


def start_server(args, env=None, timeout=180):
    """Run generate/serve.py on a free port; returns (process, base URL, stderr lines so far)."""
    cmd = [sys.executable, str(REPO / "generate" / "serve.py"), "--port", "0", *map(str, args)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})})
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("[serving "):
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout):
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines))
    url = next(line for line in lines if line.startswith("[serving ")).split(" on ")[1].split()[0]
    return proc, url.rstrip("/"), lines


@pytest.fixture(scope="module")
def smol(smollm2_dir, tmp_path_factory):
    """SmolLM2 with two random LoRA adapters saved to disk (different targets and ranks); the in-process model holds
    both side by side (solo() picks one) and the tokenizer."""
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    dirs = {}
    for seed, (name, rank, targets) in enumerate([(ADAPTER, 4, ("v_proj", "down_proj")),
                                                   (ADAPTER2, 8, ("q_proj", "o_proj", "up_proj"))]):
        noisy = apply_lora(load_model(smollm2_dir), rank=rank, alpha=2 * rank, targets=targets)
        torch.manual_seed(seed)
        for pname, p in noisy.named_parameters():
            if "lora_b" in pname:
                torch.nn.init.normal_(p, std=0.5)
        dirs[name] = save_adapter(noisy, tmp_path_factory.mktemp("adapter") / name)
        del noisy
        load_adapter(model, dirs[name], name=name)
    return model, tok, dirs


@pytest.fixture(scope="module")
def server(smol, smollm2_dir):
    _, _, dirs = smol
    proc, url, log = start_server(["--ckpt", smollm2_dir, "--adapter", f"{ADAPTER}={dirs[ADAPTER]}", "--adapter",
                                   f"{ADAPTER2}={dirs[ADAPTER2]}", "--model_name", BASE, "--max_seq_len", MAX_SEQ_LEN,
                                   "--max_batch_size", 8, "--temperature", 0])
    yield url, log
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def chat_ids(tok, question):
    return tok.encode_dialog([{"role": "user", "content": question}])


def solo(smol, ids, n, adapter=None):
    """Greedy answer of the prompt alone, in-process, with the named adapter (None: the base model)."""
    model, tok, _ = smol
    set_adapter(model, adapter)
    out = generate(model, [ids], n, stop_ids=tok.stop_ids)[0]
    return out, decode_cut(tok, out) if len(out) == n else tok.decode(out)  # a cut answer: no partial character


def ask(client, question, model=BASE, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        return json.loads(r.read())


def post_raw(url, path, data: bytes):
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_base_and_the_adapters(client):
    models = client.models.list().data
    assert [(m.id, getattr(m, "parent", None)) for m in models] == [(BASE, None), (ADAPTER, BASE), (ADAPTER2, BASE)]


def test_greedy_chat_completion_equals_chat_cli(client, smol, smollm2_dir):
    question, n = "What is the capital of France?", 16
    r = ask(client, question, temperature=0, max_tokens=n)
    cli = subprocess.run([sys.executable, REPO / "generate" / "chat.py", "--ckpt", smollm2_dir, "--prompt", question,
                          "--temperature", "0", "--max_new_tokens", str(n)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert cli.returncode == 0, cli.stderr
    assert "Paris" in r.choices[0].message.content
    assert cli.stdout == r.choices[0].message.content + "\n"
    tokens, _ = solo(smol, chat_ids(smol[1], question), n)
    assert r.usage.prompt_tokens == len(chat_ids(smol[1], question))
    assert r.usage.completion_tokens == len(tokens) and r.choices[0].finish_reason == "stop"
    assert r.model == BASE and r.object == "chat.completion"


def test_streamed_chunks_concatenate_to_the_non_streamed_text(client):
    kw = dict(temperature=0, max_tokens=40)
    full = ask(client, "Write a short poem about the sea.", **kw)
    chunks = list(ask(client, "Write a short poem about the sea.", stream=True,
                      stream_options={"include_usage": True}, **kw))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 10  # really streamed, piece by piece
    assert "".join(pieces) == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 40


def test_eight_concurrent_requests_each_equal_their_solo_greedy_output(client, smol, server):
    n = 12
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: ask(client, q, temperature=0, max_tokens=n), QUESTIONS))
    for q, r in zip(QUESTIONS, answers):
        assert r.choices[0].message.content == solo(smol, chat_ids(smol[1], q), n)[1], q
    assert health(server[0]) == {"status": "ok", "running": 0, "waiting": 0}


def test_each_request_runs_its_adapter_in_one_mixed_batch(client, smol, server):
    """Base and two adapters interleaved: one batch mixes them (set_row_adapters), and each answer equals that
    model's greedy answer alone."""
    n, q = 10, QUESTIONS[0]
    models = [BASE, ADAPTER, ADAPTER2] * 2
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda m: ask(client, q, model=m, temperature=0, max_tokens=n), models))
    ids = chat_ids(smol[1], q)
    want = {m: solo(smol, ids, n, None if m == BASE else m)[1] for m in (BASE, ADAPTER, ADAPTER2)}
    assert len(set(want.values())) == 3  # the adapters really differ from the base and from each other
    assert [r.choices[0].message.content for r in rs] == [want[m] for m in models]
    assert all(r.model == m for r, m in zip(rs, models))


def test_completions_endpoint_and_stop_strings(client, smol):
    model, tok, _ = smol
    prompt, n = "The capital of France is", 12
    ids = tok.encode(prompt, bos=True)
    text = solo(smol, ids, n)[1]
    r = client.completions.create(model=BASE, prompt=prompt, temperature=0, max_tokens=n)
    assert r.choices[0].text == text and r.usage.prompt_tokens == len(ids) and r.object == "text_completion"
    stop = text.split()[2]  # a word in the middle of the answer
    expect = text[:text.index(stop)]
    cut = client.completions.create(model=BASE, prompt=prompt, temperature=0, max_tokens=n, stop=[stop, "zzz"])
    assert (cut.choices[0].text, cut.choices[0].finish_reason) == (expect, "stop")
    streamed = client.completions.create(model=BASE, prompt=prompt, temperature=0, max_tokens=n, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expect
    chat = ask(client, "What is the capital of France?", temperature=0, max_tokens=16, stop="France")
    assert chat.choices[0].message.content == "The capital of " and chat.choices[0].finish_reason == "stop"


def test_a_seed_gives_the_same_sampled_answer_whatever_runs_beside_it(client):
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=20, seed=1234)
    alone = ask(client, "Tell me about cats.", **kw).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        busy = list(pool.map(lambda q: ask(client, q, **kw).choices[0].message.content,
                             ["Tell me about cats.", "Tell me about dogs.", "Tell me about cats.", "Hi"]))
    assert busy[0] == busy[2] == alone
    assert ask(client, "Tell me about cats.", **{**kw, "seed": 99}).choices[0].message.content != alone


def test_a_client_that_disconnects_frees_its_row(client, server):
    url = server[0]
    stream = ask(client, "Tell me a very long story about a dragon.", temperature=0, max_tokens=300, stream=True)
    got = [next(iter(stream)) for _ in range(3)]
    assert got and health(url)["running"] == 1
    stream.close()  # the client goes away mid-answer
    deadline = time.time() + 20
    while health(url)["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert health(url)["running"] == 0


@pytest.mark.parametrize("body, param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"model": 7}, "model"),  # an unknown model name is a 404 (tests/test_serve_api.py)
    ({"messages": [{"role": "user", "content": "word " * 400}]}, "messages"),
    ({"max_tokens": MAX_SEQ_LEN}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"n": 0}, "n"),
    ({"stop": [1, 2]}, "stop"),
])
def test_bad_requests_get_400_naming_the_field_and_the_next_request_succeeds(client, body, param):
    good = {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{**good, **body})
    assert e.value.status_code == 400 and e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    assert client.chat.completions.create(**good).choices[0].message.content


def test_malformed_json_gets_400_and_the_server_keeps_serving(server, client):
    status, body = post_raw(server[0], "/v1/chat/completions", b'{"model": "smol", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"] and "column" in body["error"]["message"]
    status, body = post_raw(server[0], "/v1/completions", b'[1, 2]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    assert ask(client, "Hi", max_tokens=2).choices[0].message.content


# ---- the chat page, in a real browser ----

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,760"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_bin):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for f in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        opts.add_argument(f)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_bin))
    yield driver
    driver.quit()


def wait_for(driver, script, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


RECORD_STREAM = """
window.__seen = [];
new MutationObserver(() => {
  const c = document.querySelectorAll('.msg.assistant .content');
  if (c.length) window.__seen.push(c[c.length - 1].textContent);
}).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
"""
LAST_ANSWER = """const m = document.querySelectorAll('.msg.assistant');
return m.length && m[m.length - 1].dataset.finish ? [m[m.length - 1].dataset.finish,
    m[m.length - 1].querySelector('.content').textContent] : null;"""


def test_chat_page_streams_an_answer_in_a_real_browser(browser, server, smol):
    from selenium.webdriver.common.by import By
    url = server[0]
    browser.get(url + "/")
    assert wait_for(browser, "return document.querySelectorAll('#model option').length === 3")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options == [BASE, ADAPTER, ADAPTER2]
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").send_keys("24")
    question = "What is the capital of France?"
    browser.execute_script(RECORD_STREAM)
    browser.find_element(By.ID, "input").send_keys(question)
    browser.find_element(By.ID, "send").click()
    finish, text = wait_for(browser, LAST_ANSWER)
    assert (finish, text) == ("stop", solo(smol, chat_ids(smol[1], question), 24)[1])
    partial = {s for s in browser.execute_script("return window.__seen") if s and s != text}
    assert partial and all(text.startswith(s) for s in partial)  # rendered piece by piece as it arrived
    assert "tokens/s" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    shot = Path(os.environ.get("MINILLAMA_SCREENSHOT", "") or Path(browser.capabilities["chrome"]["userDataDir"])
                / "chat.png")
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the stop button ends a long answer, and the server frees its row
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("300")
    browser.find_element(By.ID, "input").send_keys("Tell me a very long story about a dragon.")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const c = document.querySelectorAll('.msg.assistant .content');"
                      "return c.length === 2 && c[1].textContent.length > 20")
    browser.find_element(By.ID, "stop").click()
    finish, text = wait_for(browser, LAST_ANSWER)
    assert finish == "stopped" and text
    deadline = time.time() + 20
    while health(url)["running"] and time.time() < deadline:
        time.sleep(0.1)
    assert health(url)["running"] == 0


# ---- tensor parallel: 2 CPU processes under torchrun, rank 0 serving ----

@pytest.fixture(scope="module")
def tiny_ckpt(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (well-separated logits: no argmax ties between layouts)."""
    model, ckpt = tiny_smol_vocab_checkpoint(smollm2_dir, tmp_path_factory.mktemp("tiny") / "tiny")
    return ckpt, model


def test_tensor_parallel_server_answers_concurrent_requests_like_one_process(tiny_ckpt, tmp_path):
    ckpt, model = tiny_ckpt
    tok = load_tokenizer(ckpt)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    proc = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
                             str(REPO / "generate" / "serve.py"), "--ckpt", str(ckpt), "--device", "cpu", "--port", "0",
                             "--max_seq_len", "128", "--temperature", "0", "--max_batch_size", "4"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            ready.set() if line.startswith("[serving ") else None
    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(180), "".join(lines)
        url = next(x for x in lines if x.startswith("[serving ")).split(" on ")[1].split()[0].rstrip("/")
        assert "2 process(es)" in "".join(lines)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        time.sleep(2.5)  # idle: rank 0 keeps the followers' collectives alive with empty plans
        qs = QUESTIONS[:4]
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda q: ask(client, q, model="tiny", max_tokens=6), qs))
        for q, r in zip(qs, rs):
            new = generate(model, [chat_ids(tok, q)], 6, stop_ids=tok.stop_ids)[0]
            assert r.choices[0].message.content == (decode_cut(tok, new) if len(new) == 6 else tok.decode(new))
        with pytest.raises(openai.BadRequestError):  # a bad request does not break the lockstep
            ask(client, "Hi", model="tiny", temperature=-1)
        assert ask(client, "Hi", model="tiny", max_tokens=2).usage.completion_tokens <= 2
    finally:
        proc.terminate()
        proc.wait(60)


STORED = "return JSON.parse(localStorage.getItem('minillama.conversations') || '[]')"


def test_chat_page_renders_code_keeps_conversations_and_counts_a_stopped_answer(browser, server, smol):
    from selenium.webdriver.common.by import By
    url = server[0]
    browser.get(url + "/")
    browser.execute_script("localStorage.clear()")
    browser.get(url + "/")
    assert wait_for(browser, "return document.querySelectorAll('#model option').length === 3")
    rendered = browser.execute_script("return renderMarkdown('Try **this**:\\n\\n```python\\nx = 1 < 2\\n```')")
    assert '<pre class="code" data-lang="python"><code>x = 1 &lt; 2</code></pre>' in rendered
    assert "<strong>this</strong>" in rendered
    assert "<img" not in browser.execute_script("return renderMarkdown('<img src=x onerror=alert(1)>')")

    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").send_keys("40")
    question = "Write a Python function that adds two numbers."
    browser.find_element(By.ID, "input").send_keys(question)
    browser.find_element(By.ID, "send").click()
    finish, _ = wait_for(browser, LAST_ANSWER)
    raw = solo(smol, chat_ids(smol[1], question), 40)[1]
    assert raw.startswith("```python\ndef add_two_numbers")  # the model's answer opens with a code block
    code = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content pre.code code").text
    assert code == raw.split("```python\n")[1].split("\n```")[0]  # rendered as a code block, its text exact
    shot = Path(os.environ.get("MINILLAMA_CHAT_PAGE_PNG", "") or Path(browser.capabilities["chrome"]["userDataDir"])
                / "chat_page.png")
    assert browser.save_screenshot(str(shot))

    # a reload keeps the conversation: the list, the messages, their text and stats
    before = browser.execute_script(STORED)
    assert [m["content"] for m in before[0]["messages"]] == [question, raw] and before[0]["title"] == question
    browser.refresh()
    wait_for(browser, "return document.querySelectorAll('.msg').length === 2")
    assert browser.find_element(By.CSS_SELECTOR, ".msg.assistant .content pre.code code").text == code
    assert [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#conversations .title")] == [question]
    assert "tokens" in browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text

    # regenerate (greedy: the same answer, still one), edit (back in the box, the turn removed)
    assert wait_for(browser, "return document.querySelectorAll('#model option').length === 3")
    browser.find_element(By.ID, "temperature").send_keys("0")
    browser.find_element(By.ID, "max_tokens").send_keys("40")
    browser.find_element(By.CSS_SELECTOR, ".msg.assistant button.regenerate").click()
    wait_for(browser, "const m = document.querySelectorAll('.msg.assistant');"
                      "return m.length === 1 && m[0].dataset.finish && m[0].querySelector('.actions')")
    assert [m["content"] for m in browser.execute_script(STORED)[0]["messages"]] == [question, raw]
    browser.find_element(By.CSS_SELECTOR, ".msg.user button.edit").click()
    assert browser.find_element(By.ID, "input").get_attribute("value") == question
    assert browser.execute_script(STORED)[0]["messages"] == []

    # a stopped answer still shows how many tokens it got
    browser.find_element(By.ID, "max_tokens").clear()
    browser.find_element(By.ID, "max_tokens").send_keys("300")
    browser.find_element(By.ID, "input").clear()
    browser.find_element(By.ID, "input").send_keys("Tell me a very long story about a dragon.")
    browser.find_element(By.ID, "send").click()
    wait_for(browser, "const c = document.querySelectorAll('.msg.assistant .content');"
                      "return c.length === 1 && c[0].textContent.length > 20")
    browser.find_element(By.ID, "stop").click()
    finish, text = wait_for(browser, LAST_ANSWER)
    stats = browser.find_element(By.CSS_SELECTOR, ".msg.assistant .stats").text
    assert finish == "stopped" and int(stats.split(" tokens")[0]) >= 3 and "stopped" in stats

"""generate/batch.py: batched outputs == one-by-one generation, ids/order kept, malformed lines, crash resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillama import load_model
from minillama.inference.generate import generate
from minillama.tokenizer.tokenizer import decode_cut, load_tokenizer
from helpers import stop_reason, tiny_smol_vocab_checkpoint

REPO = Path(__file__).resolve().parents[1]
BATCH = REPO / "generate" / "batch.py"
MAX_NEW = 6

LINES = [
    json.dumps("The capital of France is"),
    json.dumps({"id": "q1", "messages": [{"role": "user", "content": "Hello there, how are you today?"}]}),
    '{"prompt": "unterminated',
    json.dumps({"conversation": [{"system": "Be brief.", "input": "Name a colour.", "output": "Red."},
                                 {"input": "Another one?"}]}),
    "",
    json.dumps({"id": 7, "prompt": "One, two"}),
    json.dumps({"text": "no prompt key"}),
    json.dumps({"prompt": "A much longer prompt than the others, so that the batch has to pad the short rows."}),
]
MESSAGES_3 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}]


def answer_text(tok, new, max_new=MAX_NEW):
    """An answer cut at max_new tokens ends on a whole character (decode() would end it in U+FFFD)."""
    return decode_cut(tok, new) if len(new) == max_new else tok.decode(new)


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as an HF dir."""
    return tiny_smol_vocab_checkpoint(smollm2_dir, tmp_path_factory.mktemp("tiny") / "tiny")[1]


@pytest.fixture(scope="module")
def expected(tiny_dir):
    """index -> (output text, prompt tokens, output tokens, stop reason), each prompt generated alone."""
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    prompts = {0: tok.encode("The capital of France is", bos=True),
               1: tok.encode_dialog([{"role": "user", "content": "Hello there, how are you today?"}]),
               3: tok.encode_dialog(MESSAGES_3),
               5: tok.encode("One, two", bos=True),
               7: tok.encode("A much longer prompt than the others, so that the batch has to pad the short rows.",
                             bos=True)}
    out = {}
    for i, ids in prompts.items():
        new = generate(model, [ids], MAX_NEW, stop_ids=tok.stop_ids)[0]
        out[i] = (answer_text(tok, new), len(ids), len(new), stop_reason(new, MAX_NEW))
    return out


def run_batch(tiny_dir, inp, out, batch_size=3):
    cmd = [sys.executable, BATCH, "--ckpt", tiny_dir, "--input", inp, "--output", out, "--max_new_tokens",
           str(MAX_NEW), "--batch_size", str(batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def check_output(records, expected):
    assert [r["index"] for r in records] == [0, 1, 2, 3, 5, 6, 7]  # input order; blank line 4 is not an input
    for r in records:
        if r["index"] in (2, 6):
            assert r["line"] == r["index"] + 1 and r["error"]
            continue
        text, n_prompt, n_out, reason = expected[r["index"]]
        assert (r["output"], r["prompt_tokens"], r["output_tokens"], r["stop_reason"]) == (text, n_prompt, n_out,
                                                                                         reason)
    assert records[1]["id"] == "q1" and records[4]["id"] == 7 and "id" not in records[0]


def test_batched_outputs_equal_one_by_one_and_bad_lines_are_reported(tiny_dir, expected, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(LINES) + "\n")
    proc = run_batch(tiny_dir, inp, out)
    check_output(read_jsonl(out), expected)
    assert f"{inp}:3: skipped: not valid JSON at column 12: Unterminated string" in proc.stderr
    assert f"{inp}:7: skipped" in proc.stderr
    progress = [line for line in proc.stderr.splitlines() if "tok/s" in line]
    assert progress and "\r" not in proc.stderr  # not a terminal: one plain line per update
    assert progress[-1].startswith("[" + "#" * 30 + "] 7/7")


def test_resume_skips_finished_lines_and_redoes_a_truncated_one(tiny_dir, expected, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(LINES) + "\n")
    run_batch(tiny_dir, inp, out)
    lines = out.read_text().splitlines(keepends=True)
    kept = [json.loads(line) for line in lines[:3]]  # indices 0, 1, 2 stay
    kept[0]["output"] = "SENTINEL"  # a finished line that is redone would lose this
    crashed = "".join(json.dumps(r) + "\n" for r in kept) + lines[5][:25]  # index 6's line cut mid-write
    out.write_text(crashed)
    proc = run_batch(tiny_dir, inp, out, batch_size=2)
    assert "dropping 1 incomplete line" in proc.stderr
    records = read_jsonl(out)
    assert records[0]["output"] == "SENTINEL"
    records[0]["output"] = expected[0][0]
    check_output(records, expected)
    # line 3's earlier attempt ended in an error record: that is not an answer, so the rerun tried it again
    assert "retrying 1 line(s) whose earlier attempt ended in an error" in proc.stderr
    assert f"{inp}:3: skipped: not valid JSON" in proc.stderr


def test_complete_cli_with_adapter_equals_in_process_generation(tiny_dir, tmp_path):
    from minillama.lora.peft import save_adapter
    from minillama.lora.layers import apply_lora
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_b" in name:  # B starts at zero; a non-zero adapter must change the output
            torch.nn.init.normal_(p, std=0.5)
    adapter = save_adapter(model, tmp_path / "adapter")
    prompts = ["The capital of France is", "One, two"]
    ids = [tok.encode(p, bos=True) for p in prompts]
    with_adapter = generate(model, ids, MAX_NEW, stop_ids=tok.stop_ids)
    base = generate(load_model(tiny_dir), ids, MAX_NEW, stop_ids=tok.stop_ids)
    assert with_adapter != base
    cmd = [sys.executable, REPO / "generate" / "complete.py", "--ckpt", tiny_dir, "--adapter", adapter,
           "--temperature", "0", "--max_new_tokens", str(MAX_NEW)]
    for p in prompts:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    for p, new in zip(prompts, with_adapter):
        assert f"{p}\n> {answer_text(tok, new)}\n" in proc.stdout


def test_batch_lines_pick_named_adapters_and_equal_each_adapter_alone(tiny_dir, tmp_path):
    """--adapter a=DIR --adapter b=DIR: each line's "adapter" (or an adapter-naming "model") picks one; null is the
    base model; every output equals generating with that adapter alone."""
    from minillama.lora.peft import load_adapter, save_adapter
    from minillama.lora.layers import apply_lora
    tok = load_tokenizer(tiny_dir)
    dirs = {}
    for seed, name in enumerate(("a", "b")):
        model = apply_lora(load_model(tiny_dir), rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        torch.manual_seed(seed + 1)
        for pname, p in model.named_parameters():
            if "lora_b" in pname:
                torch.nn.init.normal_(p, std=0.5)
        dirs[name] = save_adapter(model, tmp_path / name)
    prompts = ["The capital of France is", "One, two", "Once upon a time"]
    lines = [{"prompt": prompts[0], "adapter": "b"}, {"prompt": prompts[1]}, {"prompt": prompts[2], "adapter": None},
             {"prompt": prompts[0], "model": "a"}, {"prompt": prompts[1], "adapter": "b"},
             {"prompt": prompts[2], "adapter": "zz"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in lines))

    def alone(adapter_dir, text):
        model = load_model(tiny_dir)
        if adapter_dir is not None:
            load_adapter(model, adapter_dir)
        return answer_text(tok, generate(model, [tok.encode(text, bos=True)], MAX_NEW, stop_ids=tok.stop_ids)[0])

    want = [alone(dirs["b"], prompts[0]), alone(dirs["a"], prompts[1]), alone(None, prompts[2]),
            alone(dirs["a"], prompts[0]), alone(dirs["b"], prompts[1])]
    assert len(set(want[:2] + [alone(None, prompts[0])])) == 3  # the adapters really differ
    cmd = [sys.executable, BATCH, "--ckpt", tiny_dir, "--input", inp, "--output", tmp_path / "out.jsonl",
           "--max_new_tokens", str(MAX_NEW), "--batch_size", "2", "--adapter", f"a={dirs['a']}",
           "--adapter", f"b={dirs['b']}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r.get("output") for r in records[:5]] == want
    assert "not a loaded adapter (loaded: a, b)" in records[5]["error"]


def test_a_line_sets_its_own_penalties_and_logit_bias_and_the_flags_set_the_rest(tiny_dir, tmp_path):
    """Per-line "logit_bias" / "frequency_penalty" / "presence_penalty" override the flags and equal
    generate() with those SamplingParams; --logit_bias applies to every other line; a bad field is that line's
    error, naming it."""
    from minillama.inference.sampling import SamplingParams
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    prompt = "One, two, three, four"
    ids = tok.encode(prompt, bos=True)
    line = {"prompt": prompt, "logit_bias": {"42": 100}}
    penal = {"prompt": prompt, "frequency_penalty": -2.0, "presence_penalty": -1.0, "logit_bias": {}}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in [line, penal, prompt, {"prompt": prompt, "presence_penalty": 3}])
                   + "\n")
    cmd = [sys.executable, BATCH, "--ckpt", tiny_dir, "--input", inp, "--output", out, "--max_new_tokens",
           str(MAX_NEW), "--batch_size", "2", "--logit_bias", "7:100"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr
    recs = read_jsonl(out)
    assert recs[0]["output"] == answer_text(tok, [42] * MAX_NEW)  # the line's bias replaced the flag's
    want = generate(model, [ids], MAX_NEW, SamplingParams(frequency_penalty=-2.0, presence_penalty=-1.0))[0]
    assert recs[1]["output"] == answer_text(tok, want)  # (their effect vs HF: tests/test_serve_eval.py)
    assert recs[2]["output"] == answer_text(tok, [7] * MAX_NEW)  # the flag's bias
    assert "presence_penalty" in recs[3]["error"]


# ---- structured output: a per-line response_format ----

REVIEW = {"type": "object", "additionalProperties": False, "required": ["stars", "verdict", "tags"],
          "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "verdict": {"enum": ["good", "bad", "meh"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}}}}
REVIEW_FORMAT = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW, "strict": True}}
REVIEW_MESSAGES = [{"role": "user", "content": "Review the film Alien as JSON."}]
STRUCTURED_NEW = 40


def load_batch_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("batch_structured_script", BATCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def brace_bias(tok) -> dict:
    """+100 on '"' and '}': under json_object the tiny random model then ends its object within a few tokens
    (unbiased it runs on inside one key past any max_new_tokens); free, the same bias writes no JSON at all."""
    ids = [tok.encode(ch, bos=False) for ch in ('"', "}")]
    assert all(len(i) == 1 for i in ids)
    return {str(i[0]): 100 for i in ids}


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def engine_alone(model, tok, ids, constraint, sampling=None):
    """Greedy answer of one constrained Request on its own engine (the server's path): decoded text."""
    from minillama.inference.constraints import grammar_vocab
    from minillama.inference.generate import generate_requests
    from minillama.inference.request import Request
    from minillama.inference.sampling import SamplingParams
    req = Request(ids, STRUCTURED_NEW, sampling or SamplingParams(), frozenset(tok.stop_ids), constraint=constraint)
    with torch.no_grad():
        (done,) = generate_requests(model, [req], grammar=lambda: grammar_vocab(tok))
    assert done.finish == "stop", tok.decode(done.output)
    return tok.decode(done.output)


def run_structured(tiny_dir, inp, out, *extra):
    cmd = [sys.executable, BATCH, "--ckpt", tiny_dir, "--input", inp, "--output", out, "--max_new_tokens",
           str(STRUCTURED_NEW), "--batch_size", "3", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_constrained_and_free_lines_share_a_batch_and_each_answer_is_what_it_would_be_alone(tiny_dir, tmp_path):
    """A json_schema line, a json_object line and free lines in one batch: the schema line's answer validates, the
    object line's parses, both equal the engine's constrained answer alone; a free line equals plain greedy
    generation (the constrained rows beside it changed nothing); bad response_formats are their lines' errors."""
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    from minillama.inference.constraints import Constraint
    from minillama.inference.sampling import SamplingParams
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    bias = brace_bias(tok)
    paris = "Describe Paris as a JSON object."
    lines = [{"id": "r", "messages": REVIEW_MESSAGES, "response_format": REVIEW_FORMAT},
             {"prompt": paris, "response_format": {"type": "json_object"}, "logit_bias": bias},
             {"prompt": "The capital of France is"},
             {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
             {"id": 5, "prompt": "x", "response_format": {"type": "xml"}},
             {"prompt": paris, "logit_bias": bias}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = run_structured(tiny_dir, inp, out)
    assert proc.returncode == 0, proc.stderr
    recs = read_jsonl(out)
    assert [r["index"] for r in recs] == list(range(6))

    review = json.loads(recs[0]["output"])
    jsonschema.validate(review, REVIEW)
    assert recs[0]["id"] == "r" and recs[0]["stop_reason"] == "stop"
    assert recs[0]["output"] == engine_alone(model, tok, tok.encode_dialog(REVIEW_MESSAGES),
                                             Constraint("json_schema", REVIEW))
    assert isinstance(json.loads(recs[1]["output"]), dict) and recs[1]["stop_reason"] == "stop"
    assert recs[1]["output"] == engine_alone(model, tok, tok.encode(paris, bos=True), Constraint("json_object"),
                                             SamplingParams(logit_bias={int(t): b for t, b in bias.items()}))
    free = generate(model, [tok.encode("The capital of France is", bos=True)], STRUCTURED_NEW, stop_ids=tok.stop_ids)
    assert recs[2]["output"] == answer_text(tok, free[0], STRUCTURED_NEW)
    assert not is_json_object(recs[5]["output"])  # the same biased prompt, free: the grammar made line 2's JSON

    assert recs[3]["line"] == 4 and "response_format" in recs[3]["error"] and "nope" in recs[3]["error"]
    assert recs[4] == {"index": 4, "id": 5, "line": 5, "error": recs[4]["error"]} and "xml" in recs[4]["error"]
    assert f"{inp}:4: skipped: " in proc.stderr and f"{inp}:5: skipped: " in proc.stderr


def test_response_format_flag_sets_lines_without_their_own_and_a_bad_value_stops_before_loading(tiny_dir, tmp_path):
    pytest.importorskip("llguidance")
    jsonschema = pytest.importorskip("jsonschema")
    from minillama.inference.constraints import Constraint
    model, tok = load_model(tiny_dir), load_tokenizer(tiny_dir)
    schema_file = tmp_path / "review.json"
    schema_file.write_text(json.dumps(REVIEW_FORMAT))
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in [
        {"messages": REVIEW_MESSAGES}, {"prompt": "The capital of France is", "response_format": {"type": "text"}}]))
    proc = run_structured(tiny_dir, inp, out, "--response_format", schema_file)
    assert proc.returncode == 0, proc.stderr
    recs = read_jsonl(out)
    jsonschema.validate(json.loads(recs[0]["output"]), REVIEW)
    assert recs[0]["output"] == engine_alone(model, tok, tok.encode_dialog(REVIEW_MESSAGES),
                                             Constraint("json_schema", REVIEW))
    free = generate(model, [tok.encode("The capital of France is", bos=True)], STRUCTURED_NEW, stop_ids=tok.stop_ids)
    assert recs[1]["output"] == answer_text(tok, free[0], STRUCTURED_NEW)  # {"type": "text"}: free

    for value, says in [('{"type": "regex", "regex": "(unclosed"}', "unclosed group"),
                        (str(tmp_path / "missing.json"), "neither a JSON object nor an existing JSON file"),
                        ('{"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}', "nope")]:
        proc = run_structured(tmp_path / "no_model", inp, tmp_path / "o2.jsonl", "--response_format", value)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1, err  # no model was looked for
        assert "argument --response_format: " in err and says in err, err


def test_without_llguidance_a_structured_line_says_how_to_install_it(tiny_dir, monkeypatch):
    batch = load_batch_script()
    tok = load_tokenizer(tiny_dir)  # fresh: no grammar vocabulary cached on it
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    with pytest.raises(ValueError, match=r"""needs llguidance: pip install 'minillama\[structured\]'"""):
        batch.line_constraint({"prompt": "x", "response_format": {"type": "json_object"}}, None, tok, False)
    assert batch.line_constraint({"prompt": "x"}, None, tok, False) is None  # free lines need nothing
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="pip install"):
        batch.response_format_arg('{"type": "json_object"}')

"""Hostile inputs, third round (issue 23), one test per class and tool: no tool removes a file it cannot prove it
wrote; every regex, template and size read from a file runs within a bound; a checkpoint's meaning never changes
silently; a user mistake or a full disk is one line (a rerun then succeeds), and a bad server request fails alone."""

import errno
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import tiny_hf, tiny_model
from minillama import load_model, save_hf
from minillama.lora.peft import load_adapter, save_adapter
from minillama.util.cli import run as run_cli
from minillama.lora.layers import apply_lora
from sft_helpers import REPO, qa_samples, tiny_checkpoint, write_jsonl

sys.path.insert(0, str(REPO / "train"))
sys.path.insert(0, str(REPO / "generate"))
import batch  # noqa: E402
import sft  # noqa: E402


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def cli(main, argv, capsys):
    """main(argv) through cli.run: (exit code, stderr)."""
    capsys.readouterr()
    rc = run_cli(lambda: main(argv))
    return rc, capsys.readouterr().err


def tree(d: Path) -> dict:
    return {p.relative_to(d): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def disk_full_after(nbytes: int = 16):
    """A stand-in for a writer (path first) that writes a few bytes of its file, then finds the disk full."""
    def write(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"x" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def no_temps(d: Path) -> bool:
    return not [p for p in Path(d).rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("hard") / "m")


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", qa_samples(8))


def sft_argv(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--device", "cpu", "--batch_size", "4", "--max_steps",
            "4", "--lr", "1e-2", "--lora_rank", "4", "--warmup_steps", "1", "--out", str(out), *extra]


# ---- data loss ----

def test_batch_refuses_its_input_and_any_output_it_did_not_write_and_changes_neither(model_dir, tmp_path, capsys,
                                                                                    monkeypatch):
    monkeypatch.setattr(batch, "load_from_args", lambda *a, **k: pytest.fail("the model was loaded"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(50)))
    os.link(prompts, tmp_path / "hard.jsonl")
    os.symlink(prompts, tmp_path / "soft.jsonl")
    before = prompts.read_bytes()
    for out in (prompts, tmp_path / "hard.jsonl", tmp_path / "soft.jsonl"):
        rc, err = cli(batch.main, ["--ckpt", str(model_dir), "--input", str(prompts), "--output", str(out)], capsys)
        assert rc == 1 and one_line(err) == (f"error: --output {out} is the --input file; give the answers their own "
                                             "file")
    other = tmp_path / "other.jsonl"  # swapped arguments: an unrelated JSONL as --output
    other.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(50)))
    kept = other.read_bytes()
    rc, err = cli(batch.main, ["--ckpt", str(model_dir), "--input", str(prompts), "--output", str(other)], capsys)
    assert rc == 1 and one_line(err).startswith(f"error: {other}:1 is not a record this tool writes; refusing")
    assert prompts.read_bytes() == before and other.read_bytes() == kept


def test_sft_out_never_is_holds_or_lies_in_the_model_and_overwrite_needs_a_run_it_wrote(model_dir, data, tmp_path,
                                                                                        capsys, monkeypatch):
    monkeypatch.setattr(sft, "build_model", lambda *a: pytest.fail("the model was loaded"))
    model = tmp_path / "M"
    shutil.copytree(model_dir, model)
    before = tree(model)
    cases = [(model, "is"), (model / "run", "lies inside"), (tmp_path, "contains")]
    for out, how in cases:
        rc, err = cli(sft.main, sft_argv(model, data, out, "--overwrite"), capsys)
        assert rc == 1 and one_line(err).startswith(f"error: --out {out} {how} --ckpt {model}: "), err
    other = tmp_path / "not_a_run"  # a model dir (or anything) that no run wrote: --overwrite removes nothing
    shutil.copytree(model_dir, other)
    rc, err = cli(sft.main, sft_argv(model_dir, data, other, "--overwrite"), capsys)
    assert rc == 1 and "does not hold a training run of this tool" in one_line(err)
    assert tree(model) == before and tree(other) == tree(model_dir)


def test_convert_merge_and_extract_refuse_an_output_that_overlaps_an_input(model_dir, tmp_path, capsys):
    from minillama.tools import convert as convert_mod
    from minillama.tools import extract_lora as extract_mod
    from minillama.tools import merge as merge_mod
    model = tmp_path / "M"
    shutil.copytree(model_dir, model)
    before = tree(model)
    cases = [(lambda a: convert_mod.main(a) and None, [str(model), str(model), "--overwrite"],
              f"error: DST {model} is SRC {model}: an output must not overlap an input"),
             (convert_mod.main, [str(model), str(tmp_path), "--overwrite"], f"error: DST {tmp_path} contains SRC"),
             (merge_mod.main, ["--base", str(model), "--adapter", str(tmp_path), "--out", str(model / "merged")],
              f"error: --out {model / 'merged'} lies inside --base {model}"),
             (extract_mod.main, ["--base", str(model), "--tuned", str(model), "--rank", "2", "--out", str(model),
                                 "--overwrite"], f"error: --out {model} is --base {model}")]
    for main, argv, message in cases:
        rc, err = cli(main, argv, capsys)
        assert rc == 1 and one_line(err).startswith(message), err
    assert tree(model) == before


def test_config_file_values_are_type_checked_like_flags(model_dir, tmp_path, capsys):
    for values, message in [({"overwrite": "false"}, "argument --overwrite: 'false' (from {}) is not true or false"),
                            ({"lora_targets": "q_proj"}, "argument --lora_targets: 'q_proj' (from {}) is not a list"),
                            ({"data": 3}, "argument --data: 3 (from {}) is not a string"),
                            ({"pack": 1}, "argument --pack: 1 (from {}) is not true or false")]:
        cfg = tmp_path / "c.json"
        cfg.write_text(json.dumps(values))
        with pytest.raises(SystemExit):
            sft.parse_args(["--config", str(cfg), "--ckpt", str(model_dir)])
        assert message.format(cfg) in one_line(capsys.readouterr().err)


# ---- hangs ----

def test_chat_templates_render_within_loop_output_and_power_bounds():
    from jinja2.sandbox import SecurityError

    from minillama.tokenizer.template import render_template
    for template in ["{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                     "{% for i in range(100000) %}{{ 'x' * 50 }}{% endfor %}", "{{ 'a' * 10**9 }}",
                     "{{ 9 ** (10**8) }}", "{% set n = 10 %}{{ 9 ** (n**8) }}"]:
        t0 = time.monotonic()
        with pytest.raises(SecurityError):
            render_template(template, messages=[])
        assert time.monotonic() - t0 < 3, template
    with pytest.raises(SecurityError, match="unsafe"):  # the sandbox keeps Python's internals out of reach
        render_template("{{ ().__class__.__base__.__subclasses__() }}", messages=[])
    assert render_template("{% for m in messages %}{{ m.role }}{% endfor %}", messages=[{"role": "user"}]) == "user"


def test_a_tokenizer_with_a_hostile_template_or_regex_fails_in_bounded_time(model_dir, tmp_path, monkeypatch):
    import minillama.tokenizer.tokenizer as tokenizer_mod
    from minillama.tokenizer.chat_format import chatml_template_info
    d = tmp_path / "tok"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("<|im_start|>{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                            "{% endfor %}")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = tokenizer_mod.load_tokenizer(d)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="could not be rendered.*loops more than"):
        chatml_template_info(tok)
    assert time.monotonic() - t0 < 3
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": False},
        spec["pre_tokenizer"]]}
    (d / "tokenizer.json").write_text(json.dumps(spec))
    monkeypatch.setattr(tokenizer_mod, "REGEX_TIMEOUT_S", 0.2)
    tok = tokenizer_mod.load_tokenizer(d)
    assert tok.encode("aaaa", bos=False) == tok.encode("aa", bos=False) * 2  # the split still works
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"pre-tokenizer regex '\(a\|aa\)\+\$' took over 0.2 s"):
        tok.encode("a" * 60 + "b", bos=False)
    assert time.monotonic() - t0 < 10
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed"
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer.json: pre-tokenizer regex '\(unclosed' is not valid"):
        tokenizer_mod.load_tokenizer(d)


@pytest.mark.parametrize("key,value,rule", [
    ("num_hidden_layers", 10**7, "an integer in [1, 1024]"), ("num_attention_heads", 0, "an integer in [1, 4096]"),
    ("hidden_size", -64, "an integer in [1, 131072]"), ("intermediate_size", "96", "an integer in [1, 1048576]"),
    ("num_hidden_layers", 2.0, "an integer in [1, 1024]"), ("rope_theta", float("nan"), "a finite number > 0"),
    ("rms_norm_eps", -1, "a finite number > 0"), ("rms_norm_eps", 0, "a finite number > 0"),
    ("tie_word_embeddings", "yes", "true or false")])
def test_config_sizes_are_checked_before_anything_is_built(model_dir, tmp_path, key, value, rule):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))  # NaN is written as NaN, which Python's json reads back
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        load_model(d)
    assert str(e.value).startswith(f"{d / 'config.json'}: {key} must be {rule}"), str(e.value)
    assert time.monotonic() - t0 < 5


def test_params_json_sizes_and_gguf_counts_are_checked(tmp_path):
    from minillama.args import from_meta_params
    from minillama.checkpoints.gguf import open_gguf
    with pytest.raises(ValueError, match=r"params.json: n_layers must be an integer in \[1, 1024\], got 10000000"):
        from_meta_params({"dim": 64, "n_layers": 10**7, "n_heads": 4, "vocab_size": 300})
    with pytest.raises(ValueError, match=r"params.json: norm_eps must be a finite number > 0"):
        from_meta_params({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 300, "norm_eps": -1})
    pytest.importorskip("gguf")
    bad = tmp_path / "absurd.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62) + b"\0" * 64)
    with pytest.raises(ValueError, match=f"{bad}: not a readable GGUF file"):
        open_gguf(bad)


# ---- the server: a bad request fails alone ----

def test_server_rejects_seed_out_of_range_and_deep_json_with_400():
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from minillama.inference.sampling import SamplingParams
    from minillama.serve.protocol import APIError, _common, parse_body
    with pytest.raises(APIError) as e:
        parse_body(b"[" * 200000)
    assert e.value.status == 400 and "nested too deeply" in str(e.value)
    with pytest.raises(APIError) as e:
        _common({"seed": 2**70}, SimpleNamespace(sampling=SamplingParams(), tok=SimpleNamespace(vocab_size=100)), "chat")
    assert e.value.status == 400 and e.value.param == "seed"


def test_a_client_that_leaves_mid_body_gets_no_500_and_no_log():
    pytest.importorskip("fastapi")
    import asyncio

    from minillama.serve.app import create_app
    app = create_app(None, None)  # the body is read before the model or the loop is touched
    messages = [{"type": "http.request", "body": b'{"messages": [', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "headers": [], "query_string": b"", "http_version": "1.1", "scheme": "http", "root_path": "",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000)}
    asyncio.run(app(scope, receive, send))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [499]


def test_a_request_that_fails_in_the_batch_loop_fails_alone_and_the_others_are_answered():
    pytest.importorskip("fastapi")
    from types import SimpleNamespace

    from minillama.inference.engine import Engine, EngineConfig
    from minillama.inference.request import Request
    from minillama.inference.sampling import SamplingParams
    from minillama.serve.worker import BatchLoop

    model = tiny_model()

    def row_adapters(model, names):  # a prefill for the adapter "boom" raises, as a broken adapter would
        if "boom" in names:
            raise RuntimeError("boom")

    engine = Engine(model, EngineConfig(batch_size=2, cache_len=32), row_adapters=row_adapters)
    loop = BatchLoop(engine, SimpleNamespace(world_size=1), idle_s=0.05).start()
    events = {}

    def collect(name):
        return lambda ev: events.setdefault(name, []).append(ev)

    greedy = SamplingParams(temperature=0.0)
    loop.submit(Request([1, 2, 3], 5, greedy, key="good"), collect("good"))
    loop.submit(Request([1, 2, 3], 5, greedy, seed=2**70, key="bad_seed"), collect("bad_seed"))  # past the protocol
    loop.submit(Request([4, 5], 5, greedy, adapter="boom", key="bad_prefill"), collect("bad_prefill"))
    loop.submit(Request([6, 7], 4, greedy, key="good2"), collect("good2"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(
            events.get(k) and events[k][-1].finish for k in ("good", "bad_seed", "bad_prefill", "good2")):
        time.sleep(0.05)
    loop.shutdown()
    assert [e.finish for e in events["bad_seed"]] == [e.finish for e in events["bad_prefill"]] == ["error"]
    for name, n in (("good", 5), ("good2", 4)):
        assert events[name][-1].finish == "length" and sum(e.token is not None for e in events[name]) == n


# ---- silently wrong ----

def test_nonfinite_weights_are_refused_on_load_naming_tensor_and_file(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.input_layernorm.weight"][3] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{f}: tensor model.layers.1.input_layernorm.weight holds NaN or infinite"):
        load_model(tmp_path / "hf")


def test_an_index_never_reaches_outside_its_checkpoint_dir(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    index_file = tmp_path / "hf" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    shard = index["weight_map"][name]
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "hf" / shard, tmp_path / "elsewhere" / shard)
    for outside in (f"../elsewhere/{shard}", str(tmp_path / "elsewhere" / shard)):
        edited = {**index, "weight_map": {**index["weight_map"], name: outside}}
        index_file.write_text(json.dumps(edited))
        with pytest.raises(ValueError, match="a file outside the checkpoint dir"):
            load_model(tmp_path / "hf")


def adapter_dir(tmp_path, model=None, name="a"):
    model = model or tiny_model()
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_b" in n:
            torch.nn.init.normal_(p, std=0.1)
    return save_adapter(model, tmp_path / name)


def edit_adapter_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    ({"r": 64}, "has LoRA factors of rank 4 but .* says r=64"),
    ({"rank_pattern": {"q_proj": 8}}, "q_proj has LoRA factors of rank 4 but .* says r=8"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save lists 'lm_head' but the adapter holds no tensor for it"),
    ({"alpha_pattern": {"q_proj": "16"}}, r"alpha_pattern\['q_proj'\] must be a number > 0, got '16'"),
    ({"rank_pattern": {"(unclosed": 4}}, r"rank_pattern key '\(unclosed' is not a valid regex"),
    ({"r": 0}, "r=0 and lora_alpha=8 must be positive")])
def test_adapter_config_that_contradicts_its_tensors_is_refused(tmp_path, changes, message):
    d = adapter_dir(tmp_path)
    edit_adapter_config(d, **changes)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_model(), d)


def test_adapter_of_rank_zero_tensors_and_catastrophic_patterns_are_one_error(tmp_path, monkeypatch):
    import minillama.lora.peft as adapter_mod
    from safetensors.torch import load_file, save_file
    d = adapter_dir(tmp_path)
    edit_adapter_config(d, alpha_pattern={r"(?:.*?\.){1,6}(?:.*?){1,9}X\d": 4})
    monkeypatch.setattr(adapter_mod, "PATTERN_TIMEOUT_S", 0.2)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="took over 0.2 s to match the module name"):
        load_adapter(tiny_model(), d)
    assert time.monotonic() - t0 < 10
    d = adapter_dir(tmp_path, name="zero")
    f = d / "adapter_model.safetensors"
    sd = {k: v[:0] if "lora_A" in k else v[:, :0] for k, v in load_file(str(f)).items()}
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="are not factors .* of one rank r >= 1"):
        load_adapter(tiny_model(), d)


def test_dpo_pairs_with_an_empty_or_identical_answer_are_skipped_and_reported(model_dir, tmp_path):
    from minillama.tokenizer.tokenizer import load_tokenizer
    from minillama.training.preference_data import load_pairs
    lines = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."},
             {"prompt": "Hi?", "chosen": "", "rejected": "Go away."},
             {"prompt": "Hi?", "chosen": "Hello!", "rejected": "  "},
             {"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."},
             "[" * 100000]
    path = write_jsonl(tmp_path / "pairs.jsonl", lines)
    pairs, stats = load_pairs(path, load_tokenizer(model_dir), seq_len=256)
    assert [p.line for p in pairs] == [1]
    assert stats.bad == [(2, "the 'chosen' answer is empty"), (3, "the 'rejected' answer is empty"),
                         (4, "'chosen' and 'rejected' are the same answer"), (5, "JSON nested too deeply to read")]


def test_hf_to_meta_to_hf_keeps_tied_embeddings_and_pad_token_id(tmp_path):
    hf = tiny_hf("llama", tie_word_embeddings=True, pad_token_id=7)
    hf.save_pretrained(tmp_path / "hf")
    gen = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 7, "temperature": 0.3}
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(gen))
    from minillama.tools.convert import main as convert
    convert([str(tmp_path / "hf"), str(tmp_path / "meta"), "--to", "meta"])
    back = convert([str(tmp_path / "meta"), str(tmp_path / "back"), "--to", "hf"])
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["pad_token_id"] == 7
    assert {k: v for k, v in json.loads((back / "generation_config.json").read_text()).items() if k in gen} == gen
    a, b = load_model(tmp_path / "hf"), load_model(back)
    assert b.args.tie_embeddings and sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    tokens = torch.randint(0, 300, (1, 12))
    assert torch.equal(a(tokens), b(tokens))


def test_merge_keeps_the_base_generation_config_and_pad_token_id(tmp_path):
    from minillama.tools.merge import main as merge_main
    base = tmp_path / "base"
    save_hf(tiny_model(), base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "pad_token_id": 5}))
    (base / "generation_config.json").write_text(json.dumps({"pad_token_id": 5, "eos_token_id": 2, "top_p": 0.8}))
    adapter = adapter_dir(tmp_path, load_model(base))
    merge_main(["--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    gen = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert gen["pad_token_id"] == 5 and gen["top_p"] == 0.8 and gen["eos_token_id"] == 2
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["pad_token_id"] == 5


# ---- tracebacks: deep JSON, a full disk ----

def test_deeply_nested_json_is_one_skipped_line_in_batch_and_sft(model_dir, tmp_path):
    from minillama.tokenizer.tokenizer import load_tokenizer
    from minillama.training.data import load_jsonl
    with pytest.raises(ValueError, match="JSON nested too deeply to read"):
        batch.parse_line(b"[" * 200000 + b"\n")
    path = write_jsonl(tmp_path / "d.jsonl", [qa_samples(1)[0], "[" * 200000])
    samples, stats = load_jsonl(path, load_tokenizer(model_dir), seq_len=256)
    assert [s.line for s in samples] == [1] and stats.bad == [(2, "JSON nested too deeply to read")]


def test_full_disk_during_a_training_save_is_one_line_and_resume_finishes(model_dir, data, tmp_path, capsys,
                                                                          monkeypatch):
    import minillama.training.sharded as sharded
    out = tmp_path / "run"
    real, calls = sharded.write_safetensors, []

    def fail_on_second_save(path, *a, **k):  # step 2 saves; step 4's save finds the disk full
        calls.append(path)
        if "step_4" in str(path):
            return disk_full_after()(path)
        return real(path, *a, **k)

    monkeypatch.setattr(sharded, "write_safetensors", fail_on_second_save)
    rc, err = cli(sft.main, sft_argv(model_dir, data, out, "--save_every", "2"), capsys)
    line = err.strip().splitlines()[-1]
    assert rc == 1 and "Traceback" not in err
    assert line == (f"error: no space left on the device while writing {out / 'step_4'}; nothing half-written is "
                    f"left: free some space and continue from {out / 'step_2'} with --resume")
    assert no_temps(out) and (out / "latest").read_text().strip() == "step_2"
    monkeypatch.setattr(sharded, "write_safetensors", real)
    rc, err = cli(sft.main, sft_argv(model_dir, data, out, "--resume"), capsys)
    assert rc == 0, err
    assert "resumed from" in err and (out / "final" / "adapter_model.safetensors").is_file()


def test_full_disk_during_adapter_save_merge_and_convert_leaves_no_temp_and_a_rerun_succeeds(tmp_path, capsys,
                                                                                           monkeypatch):
    import minillama.lora.peft as adapter_mod
    import minillama.checkpoints.hf_format as hf_format
    import minillama.checkpoints.meta_format as meta_format
    from minillama.tools import convert as convert_mod
    from minillama.tools import merge as merge_mod
    def convert(argv):
        convert_mod.main(argv)

    base = tmp_path / "base"
    save_hf(tiny_model(), base)
    model = load_model(base)
    apply_lora(model, rank=4, alpha=8, targets=("q_proj",))
    # adapter save (safetensors' own writer)
    with monkeypatch.context() as m:
        m.setattr(adapter_mod, "save_file", lambda t, path, **k: disk_full_after()(path))
        with pytest.raises(OSError) as e:
            save_adapter(model, tmp_path / "ad")
    assert str(e.value) == f"no space left on the device while writing {(tmp_path / 'ad').absolute()}"
    assert not (tmp_path / "ad").exists() and no_temps(tmp_path)
    save_adapter(model, tmp_path / "ad")
    # merge and HF conversion (the streaming safetensors writer), Meta conversion (torch.save)
    jobs = [(merge_mod.main, ["--base", str(base), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "mg")],
             hf_format, "write_safetensors", tmp_path / "mg"),
            (convert, [str(base), str(tmp_path / "hf2"), "--to", "hf", "--dtype", "bfloat16"],
             hf_format, "write_safetensors", tmp_path / "hf2"),
            (convert, [str(base), str(tmp_path / "meta")], meta_format.torch, "save",
             tmp_path / "meta")]
    for main, argv, module, name, out in jobs:
        with monkeypatch.context() as m:
            if name == "save":
                m.setattr(module, name, lambda obj, path, **k: disk_full_after()(path))
            else:
                m.setattr(module, name, disk_full_after())
            rc, err = cli(main, argv, capsys)
        assert rc == 1 and one_line(err) == f"error: no space left on the device while writing {out.absolute()}"
        assert not out.exists() and no_temps(tmp_path)
        rc, err = cli(main, argv, capsys)
        assert rc == 0 and out.is_dir(), err
    tokens = torch.tensor([[1, 2, 3]])
    assert torch.equal(load_model(tmp_path / "meta")(tokens), load_model(base)(tokens))


def test_full_disk_during_batch_output_is_one_line_and_a_rerun_finishes(model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(4)))
    out = tmp_path / "answers.jsonl"
    argv = ["--ckpt", str(model_dir), "--input", str(prompts), "--output", str(out), "--max_new_tokens", "3",
            "--batch_size", "2", "--device", "cpu"]
    real, written = batch.json.dumps, []

    def dumps_then_full(obj, *a, **k):  # two answers are written, then the disk is full
        if isinstance(obj, dict) and "output" in obj:
            written.append(obj)
            if len(written) > 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(batch.json, "dumps", dumps_then_full)
        rc, err = cli(batch.main, argv, capsys)
    assert rc == 1 and err.strip().splitlines()[-1] == (
        f"error: no space left on the device while writing {out}; free some space and rerun the same command: the "
        "answers written so far are kept")
    assert len(out.read_text().splitlines()) == 2
    rc, err = cli(batch.main, argv, capsys)
    assert rc == 0, err
    assert sorted(json.loads(line)["index"] for line in out.read_text().splitlines()) == [0, 1, 2, 3]

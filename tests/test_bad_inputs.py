"""Every bad input is one clear line (file, line, flag or key named; exit non-zero; no traceback) or a correct
result: checkpoints that lack their head, tie a head that differs or hold integer tensors; invalid shard counts;
a killed convert's leftovers; adapters that do not fit the base; non-UTF-8, empty and missing data; bad batch.py
lines and reruns; sampling flags (rejected at parsing, as the library rejects them); argparse errors; torchrun."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import Payload, tiny_hf, tiny_model, write_meta_dir
from minillama import load_model, save_hf
from minillama.lora.peft import save_adapter
from minillama.checkpoints import save_meta
from minillama.tools import convert as convert_mod
from minillama.util.cli import run as run_cli
from minillama.lora.layers import apply_lora
from minillama.tools.merge import main as merge_main
from minillama.inference.sampling import SamplingParams
from minillama.training.data import load_jsonl, report_bad_lines
from minillama.tokenizer.tokenizer import load_tokenizer
from sft_helpers import REPO, free_port, qa_samples, tiny_checkpoint, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def one_line(err: str) -> str:
    """The single line of a user error (anything more is a usage block or a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


# ---- checkpoints ----

def test_missing_lm_head_is_an_error_unless_the_config_ties_it(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    rewrite_safetensors(tmp_path / "hf" / "model.safetensors", lambda sd: sd.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"no lm_head\.weight and its config does not tie it to the embeddings"):
        load_model(tmp_path / "hf")
    # the same when the head's shard is left out of the index
    tiny_hf("llama").save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    index_file = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    head_file = index["weight_map"]["lm_head.weight"]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != head_file}
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"no lm_head\.weight and its config does not tie it"):
        load_model(tmp_path / "sharded")
    # a config that ties the weights needs no head in the file
    tiny_hf("llama", tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    tied = load_model(tmp_path / "tied")
    assert tied.output.weight is tied.tok_embeddings.weight


def test_tied_config_with_a_different_head_in_the_file_keeps_the_files_head_as_transformers_does(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "hf"
    tiny_hf("llama", tie_word_embeddings=True).save_pretrained(d)
    g = torch.Generator().manual_seed(3)
    rewrite_safetensors(d / "model.safetensors", lambda sd: sd.update(
        {"lm_head.weight": torch.randn(sd["model.embed_tokens.weight"].shape, generator=g) * 0.15}))
    with pytest.warns(UserWarning, match="keeping the checkpoint's head, untied"):
        ours = load_model(d)
    assert not ours.args.tie_embeddings and ours.output.weight is not ours.tok_embeddings.weight
    theirs = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    x = torch.randint(0, 300, (2, 16), generator=g)
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max() <= 1e-4
    # a head equal to the embedding is the tied model the config describes
    rewrite_safetensors(d / "model.safetensors",
                        lambda sd: sd.update({"lm_head.weight": sd["model.embed_tokens.weight"].clone()}))
    tied = load_model(d)
    assert tied.args.tie_embeddings and tied.output.weight is tied.tok_embeddings.weight


@pytest.mark.parametrize("dtype,name", [(torch.int32, "I32"), (torch.int8, "I8")])
def test_integer_tensors_are_refused_with_the_key_named(tmp_path, dtype, name):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    key = "model.layers.0.mlp.up_proj.weight"
    rewrite_safetensors(tmp_path / "hf" / "model.safetensors", lambda sd: sd.update({key: (sd[key] * 100).to(dtype)}))
    with pytest.raises(ValueError, match=rf"tensor {re.escape(key)} is {name}, expected a floating-point weight"):
        load_model(tmp_path / "hf")
    meta = write_meta_dir(tiny_hf("llama"), tmp_path / "meta")
    sd = torch.load(meta / "consolidated.00.pth", weights_only=True)
    sd["layers.1.attention.wv.weight"] = sd["layers.1.attention.wv.weight"].to(dtype)
    torch.save(sd, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match=rf"tensor layers\.1\.attention\.wv\.weight is {dtype}, expected a float"):
        load_model(meta)


def test_pickled_payloads_in_weight_and_adapter_files_never_run(tmp_path):
    from minillama.lora.peft import read_adapter
    marker = tmp_path / "PWNED"
    meta = write_meta_dir(tiny_hf("llama"), tmp_path / "meta")
    torch.save({"tok_embeddings.weight": Payload(marker)}, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"could not read checkpoint file .*consolidated\.00\.pth .*UnpicklingError"):
        load_model(meta)
    model = apply_lora(tiny_model(), rank=2, alpha=4, targets=("q_proj",))
    ad = save_adapter(model, tmp_path / "ad")
    (ad / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.x.lora_A.weight": Payload(marker)}, ad / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin: not a readable tensor file \(UnpicklingError: [^\n]*$"):
        read_adapter(ad, model.args)
    assert not marker.exists()


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_convert_rejects_an_invalid_shard_count_at_parsing(value, capsys):
    with pytest.raises(SystemExit) as e:
        convert_mod.parse_args(["src", "dst", "--shards", value])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("python -m minillama.tools.convert: error: argument --shards:") and line.endswith("(see --help)")


def test_convert_rejects_shard_counts_the_model_cannot_split_before_loading(tmp_path, monkeypatch, capsys):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")  # 4 attention heads, 2 key/value heads
    monkeypatch.setattr(convert_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    dst = tmp_path / "dst"
    for argv, message in ((["--shards", "3"], "the model's 4 attention heads do not split into 3"),
                          (["--shards", "4"], "the model's 2 key/value heads do not split into 4"),
                          (["--shards", "2", "--to", "hf"], "--shards 2 splits a Meta checkpoint; the target here is hf")):
        capsys.readouterr()
        assert convert_mod.cli([str(tmp_path / "hf"), str(dst), *argv]) == 1
        assert message in one_line(capsys.readouterr().err)
    assert not dst.exists()
    with pytest.raises(ValueError, match="shards 0: expected an integer >= 1"):  # the library path too
        save_meta(tiny_model(), dst, n_shards=0)
    assert not dst.exists()


KILLED_CONVERT = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
from minillama.checkpoints import meta_format
save = torch.save
def save_then_die(obj, f, *a, **k):
    save(obj, f, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)  # killed after the first shard file
meta_format.torch.save = save_then_die
from minillama.tools.convert import cli
cli(sys.argv[1:])
"""


def test_a_killed_converts_temp_dir_is_removed_by_the_next_convert(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "hf")
    dst = tmp_path / "dst"
    proc = subprocess.run([sys.executable, "-c", KILLED_CONVERT.format(repo=str(REPO)), str(tmp_path / "hf"),
                           str(dst), "--shards", "2"], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (leftover,) = tmp_path.glob(".dst.tmp-*")
    assert (leftover / "consolidated.00.pth").is_file() and not dst.exists()
    live = tmp_path / ".dst.tmp-1-live"  # another process's (pid 1 runs): not ours to remove
    live.mkdir()
    assert convert_mod.cli([str(tmp_path / "hf"), str(dst), "--shards", "2"]) == 0
    assert not leftover.exists() and live.is_dir() and (dst / "consolidated.01.pth").is_file()


# ---- merge ----

def test_merge_checks_adapter_and_out_before_loading_the_base(tmp_path, monkeypatch, capsys):
    save_hf(tiny_model(), tmp_path / "base")  # 2 layers, dim 64, hidden 96

    def adapter(name, **shape):
        m = apply_lora(tiny_model(**shape), rank=2, alpha=4, targets=("up_proj",))
        return save_adapter(m, tmp_path / name)

    wider, deeper = adapter("wider", hidden_dim=128), adapter("deeper", n_layers=3)
    garbage = tmp_path / "garbage"
    shutil.copytree(adapter("good"), garbage)
    (garbage / "adapter_config.json").write_text('{"r": 2, "lora_alpha": ')
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("x")
    from minillama.checkpoints import checkpoint
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: pytest.fail("the base was loaded"))
    out = tmp_path / "merged"
    cases = [
        ([wider, out], "wider: the adapter's update for layers.0.feed_forward.w3.weight is (128, 64) but the base "
                       "weight is (96, 64): adapter for another model?"),
        ([deeper, out], "deeper: adapter module layers.2.feed_forward.w3 does not exist in the base model"),
        ([garbage, out], f"{garbage / 'adapter_config.json'}: not valid JSON"),
        ([tmp_path / "absent", out], f"--adapter {tmp_path / 'absent'}: no such directory"),
        ([tmp_path / "good", tmp_path / "used"], f"--out {tmp_path / 'used'} exists and is not empty"),
    ]
    for (ad, dst), message in cases:
        capsys.readouterr()
        argv = ["--base", str(tmp_path / "base"), "--adapter", str(ad), "--out", str(dst)]
        assert run_cli(lambda: merge_main(argv)) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith("error: ") and message in line, line
    assert not out.exists()
    proc = subprocess.run([sys.executable, "-m", "minillama.tools.merge", "--base", str(tmp_path / "base"), "--adapter",
                           str(wider), "--out", str(out)], capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=REPO)
    assert proc.returncode == 1 and "adapter for another model?" in one_line(proc.stderr)


# ---- training data ----

@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A tiny random model with the byte-level ChatML tokenizer (sft_helpers)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("bytes") / "m")


def test_non_utf8_lines_in_training_data_are_reported_and_skipped(byte_model, tmp_path, capsys):
    good = json.dumps(qa_samples(1)[0])
    path = tmp_path / "d.jsonl"
    path.write_bytes(f"{good}\n".encode() + b'{"text": "caf\xe9"}\n' + f"{good}\n".encode())
    samples, stats = load_jsonl(path, load_tokenizer(byte_model), seq_len=512)
    assert [s.line for s in samples] == [1, 3] and stats.bad == [(2, "not valid UTF-8")]
    report_bad_lines(stats)
    assert capsys.readouterr().err == f"{path}:2: skipped: not valid UTF-8\n"


def test_bad_data_paths_are_one_line_before_the_model_loads(byte_model, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(REPO / "train"))
    import sft
    monkeypatch.setattr(sft, "build_model", lambda *a: pytest.fail("the model was loaded"))
    good = write_jsonl(tmp_path / "good.jsonl", qa_samples(2))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "bad.jsonl").write_bytes(b"{\n[1]\n\xff\xfe\n")
    cases = [
        (["--data", str(tmp_path / "absent.jsonl")], f"error: --data {tmp_path / 'absent.jsonl'} does not exist"),
        (["--data", str(tmp_path / "a_dir")], f"error: --data {tmp_path / 'a_dir'} is a directory, expected a file"),
        (["--data", str(tmp_path / "empty.jsonl")], f"error: --data {tmp_path / 'empty.jsonl'} is empty"),
        (["--data", str(tmp_path / "bad.jsonl")], f"error: --data {tmp_path / 'bad.jsonl'}: no usable samples in 3 "
                                                  "lines (line 1: "),
        (["--data", str(good), "--eval_data", str(tmp_path / "absent.jsonl")],
         f"error: --eval_data {tmp_path / 'absent.jsonl'} does not exist"),
    ]
    for i, (argv, message) in enumerate(cases):
        capsys.readouterr()
        argv = ["--model", str(byte_model), "--device", "cpu", "--out", str(tmp_path / f"o{i}"), *argv]
        assert run_cli(lambda: sft.main(argv)) == 1
        line = one_line(capsys.readouterr().err)
        assert line.startswith(message), line


# ---- generate/batch.py ----

def run_batch(ckpt, inp, out, *extra):
    cmd = [sys.executable, str(REPO / "generate" / "batch.py"), "--ckpt", str(ckpt), "--input", str(inp),
           "--output", str(out), "--max_new_tokens", "3", "--batch_size", "2", "--device", "cpu", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return proc


def records(path):
    return {r["index"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def test_batch_bad_lines_are_recorded_with_their_id_and_reruns_retry_them(byte_model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": "a", "prompt": "hello"}).encode(), b'{"id": "b", "prompt": "caf\xe9"}',
             json.dumps("").encode(), json.dumps({"id": 7, "prompt": ""}).encode(),
             json.dumps({"id": "c", "prompt": "world"}).encode()]
    inp.write_bytes(b"\n".join(lines) + b"\n")
    proc = run_batch(byte_model, inp, out)
    got = records(out)
    assert sorted(got) == [0, 1, 2, 3, 4]
    assert [got[i].get("error") for i in (1, 2, 3)] == ["not valid UTF-8", "empty prompt", "empty prompt"]
    assert [got[i]["line"] for i in (1, 2, 3)] == [2, 3, 4] and got[3]["id"] == 7 and "id" not in got[2]
    assert got[0]["id"] == "a" and got[4]["id"] == "c" and "output" in got[0] and "output" in got[4]
    for n, why in ((2, "not valid UTF-8"), (3, "empty prompt"), (4, "empty prompt")):
        assert f"{inp}:{n}: skipped: {why}" in proc.stderr
    assert "\r" not in proc.stderr and "5/5" in proc.stderr  # not a terminal: plain progress lines
    # the input is fixed and the output gets a line that is not UTF-8: errors are retried, the bad line redone
    lines[1], lines[3] = json.dumps({"id": "b", "prompt": "cafe"}).encode(), json.dumps({"id": 7, "prompt": "x"}).encode()
    inp.write_bytes(b"\n".join(lines) + b"\n")
    kept = [line for line in out.read_bytes().splitlines(keepends=True) if json.loads(line)["index"] != 0]
    out.write_bytes(b"".join(kept) + b'{"index": 0, "output": "\xff"}\n')
    proc = run_batch(byte_model, inp, out)
    assert "retrying 3 line(s) whose earlier attempt ended in an error" in proc.stderr
    assert f"{out}:5: not valid UTF-8; dropped" in proc.stderr
    got = records(out)
    assert sorted(got) == [0, 1, 2, 3, 4] and got[3]["id"] == 7 and "output" in got[3] and "output" in got[1]
    assert got[2]["error"] == "empty prompt" and "output" in got[0]
    lines[2] = json.dumps("hi").encode()
    inp.write_bytes(b"\n".join(lines) + b"\n")
    run_batch(byte_model, inp, out)
    # nothing left to do: said without loading a model (this --ckpt does not even exist)
    proc = run_batch(tmp_path / "no_such_model", inp, out)
    assert one_line(proc.stderr) == f"{out}: 5 of 5 already done"


# ---- flags ----

def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parsers():
    """Each user-facing script's argument parsing, as a function of argv."""
    sys.path.insert(0, str(REPO / "train"))
    import sft
    from minillama.tools import merge
    chat = load_script(REPO / "generate" / "chat.py", "chat_script")
    complete = load_script(REPO / "generate" / "complete.py", "complete_script")
    batch = load_script(REPO / "generate" / "batch.py", "batch_script")
    plot = load_script(REPO / "train" / "plot.py", "plot_script")
    gen_bench = load_script(REPO / "generate" / "bench.py", "gen_bench_script")
    train_bench = load_script(REPO / "train" / "bench.py", "train_bench_script")

    def with_argv(fn):
        def parse(argv):
            old, sys.argv = sys.argv, ["bench.py", *argv]
            try:
                return fn()
            finally:
                sys.argv = old
        return parse

    return {"chat": chat.get_args, "complete": complete.get_args, "batch": batch.get_args, "sft": sft.parse_args,
            "convert": convert_mod.parse_args, "merge": merge.parse_args, "plot": plot.main,
            "generate/bench": with_argv(gen_bench.get_args), "train/bench": with_argv(train_bench.get_args)}


@pytest.mark.parametrize("script", ["chat", "complete", "batch", "sft", "convert", "merge", "plot", "generate/bench",
                                    "train/bench"])
def test_argparse_errors_are_one_line(script, capsys):
    parse = parsers()[script]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parse(["--no_such_flag"])
    assert e.value.code == 2
    line = one_line(capsys.readouterr().err)
    assert ": error: " in line and line.endswith("(see --help)"), line


BAD_SAMPLING = [("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--top_p", "0"),
                ("--top_p", "1.5"), ("--top_k", "-3"), ("--repetition_penalty", "0"), ("--max_new_tokens", "0"),
                ("--max_new_tokens", "-5"), ("--max_seq_len", "0")]


@pytest.mark.parametrize("script", ["chat", "complete", "batch"])
def test_bad_sampling_flags_are_rejected_at_parsing(script, capsys):
    parse = parsers()[script]
    required = ["--input", "in.jsonl", "--output", "out.jsonl"] if script == "batch" else []
    for flag, value in BAD_SAMPLING:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            parse([flag, value, *required])
        assert e.value.code == 2
        line = one_line(capsys.readouterr().err)
        assert f"argument {flag}" in line and value.lstrip("-") in line, line


def test_the_library_rejects_the_same_sampling_values():
    from minillama.inference.generate import generate
    for flag, value in BAD_SAMPLING:
        name = flag.removeprefix("--")
        if name in ("temperature", "top_p", "repetition_penalty", "top_k"):
            v = int(value) if name == "top_k" else float(value)
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: v})
    model = tiny_model()
    for bad in (0, -5):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            generate(model, [[1, 2]], bad)
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
        generate(model, [[1, 2]], 1, max_seq_len=0)


def test_errors_under_torchrun_are_one_line_from_rank_0(byte_model, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    missing = tmp_path / "no" / "such" / "dir"
    data = write_jsonl(tmp_path / "d.jsonl", qa_samples(4))
    for cmd, message in (
            ([str(REPO / "generate" / "chat.py"), "--ckpt", str(missing), "--prompt", "hi", "--device", "cpu"],
             f"error: --ckpt {missing} does not exist"),
            ([str(REPO / "train" / "sft.py"), "--model", str(missing), "--data", str(data), "--device", "cpu",
              "--out", str(tmp_path / "o")], f"error: --ckpt {missing} does not exist")):  # --model: its alias
        proc = subprocess.run(torchrun + ["--master_port", str(free_port())] + cmd,
                              capture_output=True, text=True, timeout=300, env=ENV)
        assert proc.returncode != 0
        err = proc.stderr.splitlines()
        assert err[0] == message and proc.stderr.count(message) == 1, proc.stderr  # rank 0 only, first
        assert "minillama/" not in proc.stderr and "generate/chat.py\", line" not in proc.stderr  # no script traceback

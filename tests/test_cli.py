"""One flag vocabulary across every script, sampling defaults from generation_config.json, the CPU thread default."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from minillama.tools import flags
from minillama.util import cli
from minillama.util.dtypes import DTYPE_NAMES

REPO = Path(__file__).resolve().parents[1]
# script -> the function that builds and parses its flags
SCRIPTS = {"generate/chat.py": "get_args", "generate/complete.py": "get_args", "generate/batch.py": "get_args",
           "generate/serve.py": "get_args", "generate/bench.py": "get_args", "train/bench.py": "get_args",
           "generate/bench_serve.py": "get_args",
           "train/plot.py": "main", "train/sft.py": "parse_args", "weights/prepare_smollm2.py": "parse_args",
           "minillama/tools/convert.py": "parse_args", "minillama/tools/merge.py": "parse_args"}


class Captured(Exception):
    pass


def load_script(rel: str):
    if rel.startswith("minillama/"):
        return importlib.import_module(rel[:-3].replace("/", "."))
    name = Path(rel).parent.name + "_" + Path(rel).stem + "_script"
    if name not in sys.modules:  # registered first: dataclasses in the script look their module up
        spec = importlib.util.spec_from_file_location(name, REPO / rel)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def parser_of(rel: str, monkeypatch):
    """The parser a script builds (caught as it starts parsing; pre-parsers without --help run as usual)."""
    parse = cli.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        if not self.add_help:
            return parse(self, args, namespace)
        raise Captured(self)
    monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", capture)
    fn = getattr(load_script(rel), SCRIPTS[rel])
    with pytest.raises(Captured) as e:
        fn([]) if fn.__code__.co_argcount else fn()
    return e.value.args[0]


@pytest.mark.parametrize("rel", sorted(SCRIPTS))
def test_every_script_shares_the_flag_vocabulary_and_every_flag_has_help(rel, monkeypatch):
    p = parser_of(rel, monkeypatch)
    assert isinstance(p, cli.ArgumentParser)  # hyphenated spellings accepted, defaults in --help
    fmt = cli.HelpFormatter(rel)
    for a in p._actions:
        if a.dest == "help":
            continue
        assert a.help and a.help.strip(), f"{rel}: {a.option_strings or a.dest} has no help text"
        shown = fmt._get_help_string(a).replace("%(default)s", "").lower()
        assert shown.count("default") <= 1, f"{rel}: {a.dest}'s default shown twice"
        assert not any(re.match(r"--\w+-", o) for o in a.option_strings), f"{rel}: hyphenated {a.option_strings}"
        if a.dest == "dtype":
            assert tuple(a.choices) == DTYPE_NAMES
        if a.dest in ("ckpt", "base"):
            assert {"--ckpt", "--model"} <= set(a.option_strings)


def test_hyphens_are_accepted_and_values_are_left_alone():
    assert cli.dehyphenate(["--max-new-tokens", "5", "--system=be-brief", "--prompt", "a-b", "--server-args",
                            "--max-seq-len 512 --top-k 2", "--", "--x-y"]) == \
        ["--max_new_tokens", "5", "--system=be-brief", "--prompt", "a-b", "--server_args",
         "--max-seq-len 512 --top-k 2", "--", "--x-y"]
    sft = load_script("train/sft.py")
    args = sft.parse_args(["--lora-rank", "4", "--model", "/ckpt", "--max-steps=3"])
    assert (args.lora_rank, args.ckpt, args.max_steps) == (4, "/ckpt", 3)
    convert, merge = load_script("minillama/tools/convert.py"), load_script("minillama/tools/merge.py")
    assert convert.parse_args(["a", "b", "--format", "meta"]).to == convert.parse_args(["a", "b", "--to", "meta"]).to
    m = merge.parse_args(["--ckpt", "b", "--adapter", "a", "--out", "o", "--to", "meta"])
    assert (m.base, m.format) == ("b", "meta")


def test_sft_reads_a_saved_run_whose_flags_said_model(tmp_path):
    sft = load_script("train/sft.py")
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "/old/ckpt", "lr": 3e-4}))  # written before --ckpt
    assert sft.parse_args(["--out", str(out), "--resume"]).ckpt == "/old/ckpt"
    (tmp_path / "c.toml").write_text('model = "/toml/ckpt"\n')
    assert sft.parse_args(["--config", str(tmp_path / "c.toml")]).ckpt == "/toml/ckpt"


def test_default_sft_run_evaluates_on_the_shipped_eval_set(tmp_path):
    sft = load_script("train/sft.py")
    args = sft.parse_args([])
    assert Path(args.eval_data).name == "reviews_eval.jsonl" and Path(args.eval_data).is_file()
    assert args.eval_every > 0
    own = sft.parse_args(["--data", str(tmp_path / "mine.jsonl")])
    assert own.eval_data is None and own.eval_every == 0  # another data set: not the demo's eval set


def chat_args(argv):
    return load_script("generate/chat.py").get_args(argv)


def test_sampling_defaults_come_from_generation_config_and_flags_win(tmp_path, capsys):
    d = tmp_path / "ckpt"
    d.mkdir()
    assert chat_args(["--ckpt", str(d)]).temperature == 0.6  # no generation_config.json: the script's own default
    (d / "generation_config.json").write_text(json.dumps({
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1,
        "max_new_tokens": 33, "max_length": 300, "eos_token_id": [5, 6]}))
    a = chat_args(["--ckpt", str(d)])
    assert (a.temperature, a.top_p, a.top_k, a.repetition_penalty, a.max_new_tokens, a.max_seq_len) == \
        (0.7, 0.8, 20, 1.1, 33, 300)
    a = chat_args(["--ckpt", str(d), "--temperature", "0.1", "--top-k", "0"])
    assert (a.temperature, a.top_k, a.top_p) == (0.1, 0, 0.8)
    (d / "generation_config.json").write_text(json.dumps({"top_p": 0.5, "eos_token_id": 2}))
    a = chat_args(["--ckpt", str(d)])
    assert (a.temperature, a.top_p, a.top_k) == (0.0, 0.5, 50)  # no do_sample: greedy, as transformers decodes
    with pytest.raises(SystemExit):
        chat_args(["--ckpt", str(d), "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "0 = greedy (default here: 0 from" in help_text and "no do_sample, so greedy" in help_text
    assert "without a generation_config.json: 0.6" in help_text
    (d / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match="generation_config.json: temperature"):
        chat_args(["--ckpt", str(d)])


def test_generation_config_eos_ids_stop_generation(tmp_path):
    from minillama.inference.loading import LoadOptions, load_for_inference
    from sft_helpers import tiny_checkpoint
    d = tiny_checkpoint(tmp_path / "tiny")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    stop = load_for_inference(d, LoadOptions(device="cpu")).tok.stop_ids
    assert {7, 9} < set(stop) and len(stop) > 2  # the tokenizer's own end-of-turn ids stay


def test_cpu_threads_default_to_the_idle_cores_at_most_four(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.auto_threads() == 4
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (14.6, 0.0, 0.0))
    assert cli.auto_threads() == 1  # one idle core left
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (40.0, 0.0, 0.0))
    assert cli.auto_threads() == 1
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cli.auto_threads() == 2


def test_threads_flag_sets_torch_threads_and_omp_num_threads_is_respected(monkeypatch):
    import argparse

    import torch
    before = torch.get_num_threads()
    try:
        assert flags.set_threads(argparse.Namespace(threads=1)) == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.setattr(flags, "auto_threads", lambda: pytest.fail("OMP_NUM_THREADS is set: no automatic choice"))
        assert flags.set_threads(argparse.Namespace(threads=None)) == 2
    finally:
        torch.set_num_threads(before)

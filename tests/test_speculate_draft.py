"""Speculative decoding with a draft model (EngineConfig(speculate="draft"), --draft_ckpt): greedy answers are plain
greedy's under continuous batching, a draft with the target's weights has every draft accepted, and contradictory
flags fail in one line before any model loads. (Sampled rows: test_engine_perf's distribution test, both drafters.)"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from minillama import save_hf
from minillama.inference.engine import Engine, EngineConfig
from minillama.inference.generate import generate
from minillama.inference.request import Request
from minillama.util.cli import run as run_cli
from helpers import tiny_model, tiny_smol_vocab_checkpoint

REPO = Path(__file__).resolve().parents[1]
LENGTHS, NEW = [5, 17, 9, 30, 3, 12], [12, 20, 7, 15, 25, 9]


def prompts(lengths, seed=4, vocab=256, prefix=()):
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def noisy_copy(model, std: float, seed: int = 7):
    """The model with noise on every weight: a draft that agrees with it often, not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * std)
    return draft


def run_continuous(model, config: EngineConfig, ps, news, stops=None) -> tuple[list, Engine]:
    """Every prompt through one engine whose rows finish and are refilled; -> (outputs in order, engine)"""
    engine = Engine(model, config)
    for i, (p, n) in enumerate(zip(ps, news)):
        engine.submit(Request(p, n, stop_ids=(stops or {}).get(i, frozenset()), key=i))
    done = {}
    while engine.busy:
        for ev in engine.step():
            if ev.finish is not None:
                done[ev.request.key] = list(ev.request.output)
    return [done[i] for i in range(len(ps))], engine


def test_draft_model_greedy_equals_plain_greedy_under_continuous_batching():
    model = tiny_model(std=0.3, max_seq_len=256)
    draft = noisy_copy(model, 0.02)
    ps = prompts(LENGTHS)
    plain = [generate(model, [p], n)[0] for p, n in zip(ps, NEW)]
    stop = plain[1][6]  # request 1 ends on a stop token mid-answer
    want = list(plain)
    want[1] = plain[1][:plain[1].index(stop)]
    outs, engine = run_continuous(model, EngineConfig(2, 64, speculate="draft", draft_model=draft), ps, NEW,
                                  {1: frozenset({stop})})
    assert outs == want
    assert 0 < engine.stats["accepted"] < engine.stats["drafted"]  # drafts were kept and rejected
    static = EngineConfig(speculate="draft", draft_model=noisy_copy(model, 0.02), draft_tokens=3)
    assert generate(model, ps, 20, config=static) == [generate(model, [p], 20)[0] for p in ps]  # one static batch


def test_a_draft_with_the_targets_weights_has_every_draft_accepted():
    """The draft's cache follows each row through finished rows and refills (prompts that share a prefix with the
    row's previous text, and prompts that do not): a stale draft cache would draft wrong and be rejected."""
    model = tiny_model(std=0.3, max_seq_len=256)
    system = prompts([20], seed=9)[0]
    ps = prompts(LENGTHS[:3], prefix=system) + prompts(LENGTHS[3:], seed=5)
    plain = [generate(model, [p], n)[0] for p, n in zip(ps, NEW)]
    config = EngineConfig(2, 96, speculate="draft", draft_model=copy.deepcopy(model), reuse_prefix=True)
    outs, engine = run_continuous(model, config, ps, NEW)
    assert outs == plain
    assert engine.stats["drafted"] > 50 and engine.stats["accepted"] == engine.stats["drafted"]
    decode_tokens = sum(len(o) for o in plain) - len(ps)  # the first token of each answer comes from its prefill
    assert engine.stats["decode_steps"] < decode_tokens / 4  # up to 1 + 4 tokens per row and forward, 2 rows


def test_draft_engine_settings_are_checked():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs a draft_model"):
        EngineConfig(2, 64, speculate="draft")
    with pytest.raises(ValueError, match="needs speculate='draft'"):
        EngineConfig(2, 64, speculate="ngram", draft_model=tiny_model(seed=1))
    with pytest.raises(ValueError, match="vocabulary has 128 tokens, the target's 256"):
        Engine(model, EngineConfig(2, 64, speculate="draft", draft_model=tiny_model(vocab_size=128)))
    with pytest.raises(ValueError, match="separate model"):
        Engine(model, EngineConfig(2, 64, speculate="draft", draft_model=model))


def test_draft_cache_grows_with_reserve():
    model = tiny_model(std=0.3, max_seq_len=1024)
    engine = Engine(model, EngineConfig(1, 256, speculate="draft", draft_model=copy.deepcopy(model)))
    engine.reserve(300)
    assert engine.drafter.model.cache_len == engine.cache_len == 512
    p = prompts([250])[0]
    engine.submit(Request(p, 30, key=0))
    while engine.busy:
        engine.step()
    assert engine.rows == [None] and engine.stats["accepted"] == engine.stats["drafted"] > 0


def complete_main():
    spec = importlib.util.spec_from_file_location("complete_script", REPO / "generate" / "complete.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("flags, message", [
    (["--speculate", "draft"], "error: --speculate draft needs --draft_ckpt DIR (the draft model's checkpoint)"),
    (["--draft_ckpt", "{tmp}", "--speculate", "ngram"], "error: --draft_ckpt drafts with a model; drop it or "
                                                        "--speculate ngram"),
    (["--draft_ckpt", "{tmp}/nowhere"], "error: --draft_ckpt {tmp}/nowhere is not a directory"),
])
def test_contradictory_draft_flags_fail_in_one_line_before_loading(flags, message, tmp_path, capsys):
    flags = [f.format(tmp=tmp_path) for f in flags]
    rc = run_cli(lambda: complete_main()(["--ckpt", str(tmp_path / "no_model"), "--prompt", "hi", *flags]))
    err = capsys.readouterr().err
    assert rc == 1 and err.strip() == message.format(tmp=tmp_path), err  # not the missing --ckpt: checked first


def test_draft_ckpt_under_tensor_parallel_fails_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets
    rc = run_cli(lambda: complete_main()(["--ckpt", str(tmp_path / "no_model"), "--prompt", "hi",
                                          "--draft_ckpt", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == "error: --draft_ckpt cannot be combined with tensor parallelism (run a single process)"


def test_complete_with_draft_ckpt_equals_plain_and_checks_the_vocabulary(smollm2_dir, tmp_path, capsys, one_thread):
    _, target = tiny_smol_vocab_checkpoint(smollm2_dir, tmp_path / "target")
    _, draft = tiny_smol_vocab_checkpoint(smollm2_dir, tmp_path / "draft", seed=1)
    base = ["--ckpt", str(target), "--device", "cpu", "--threads", "1", "--temperature", "0", "--max_new_tokens",
            "12", "--prompt", "The capital of France is", "--prompt", "One, two, three,"]
    outs = []
    for extra in ([], ["--draft_ckpt", str(draft)], ["--draft_ckpt", str(target), "--speculate", "draft"]):
        capsys.readouterr()
        assert run_cli(lambda: complete_main()(base + extra)) == 0
        out, err = capsys.readouterr()
        assert ("[draft model" in err) == bool(extra), err
        outs.append(out)
    assert outs[0] == outs[1] == outs[2] and "> " in outs[0]
    other = save_hf(tiny_model(), tmp_path / "other_vocab")  # 256 tokens, no tokenizer of its own
    rc = run_cli(lambda: complete_main()(base + ["--draft_ckpt", str(other)]))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == (f"error: --draft_ckpt {other}: the draft's vocabulary has 256 tokens, the target's "
                               f"49152: a draft must share the target's tokenizer"), err

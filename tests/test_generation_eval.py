"""Evaluation by generation during training (--eval_generate N --eval_every K): greedy answers to the first N
held-out prompts from the weights as they are at that step, written to OUT/samples/step_K.jsonl with their scores
(exact match, --eval_regex, --reward pkg.module:function), logged to metrics.jsonl as gen/* and plotted beside
the loss; bad --reward / --eval_regex values are one-line errors before the model loads."""

import json
import sys

import pytest

from minillama.util.cli import run as run_cli
from minillama.util.plot import read_png_size
from minillama.training.generation_eval import load_reward
from sft_helpers import REPO, metrics, qa_samples, run_sft, tiny_checkpoint, write_jsonl

sys.path.insert(0, str(REPO / "train"))
import sft  # noqa: E402

CALLS = []


def answer_words(prompt, completion, reference, **fields):
    """A --reward for the test: the answer's word count; records what it was called with."""
    CALLS.append({"prompt": prompt, "reference": reference, **fields})
    return float(len(completion.split()))


def test_samples_and_scores_are_written_at_the_eval_steps_and_exact_match_rises_to_one(tmp_path, one_thread):
    ckpt = tiny_checkpoint(tmp_path / "dense")
    samples = qa_samples(4, seed=7)
    for i, s in enumerate(samples):
        s["topic"] = f"t{i}"  # a field of the line, handed to the reward function
    data = write_jsonl(tmp_path / "mem.jsonl", samples)
    out = tmp_path / "run"
    CALLS.clear()
    rc = sft.main(["--model", str(ckpt), "--data", str(data), "--eval_data", str(data), "--out", str(out),
                   "--device", "cpu", "--batch_size", "4", "--max_steps", "40", "--lr", "1e-2", "--lora_rank", "0",
                   "--warmup_steps", "3", "--weight_decay", "0", "--eval_every", "20", "--eval_generate", "3",
                   "--eval_regex", "^[a-z ]+$", "--reward", f"{__name__}:answer_words"])
    assert rc == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_20.jsonl", "step_40.jsonl"]
    final = [json.loads(line) for line in (out / "samples" / "step_40.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in final] == [s["messages"][1]["content"] for s in samples[:3]]
    assert [s["prompt"] for s in final] == [s["messages"][:1] for s in samples[:3]]
    for s in final:  # memorized: the answer generated from the trained weights is the reference
        assert s["completion"] == s["reference"]
        assert s["scores"] == {"exact": 1.0, "regex": 1.0, "reward": float(len(s["reference"].split()))}
    gen = [r for r in metrics(out) if any(k.startswith("gen/") for k in r)]
    assert [r["step"] for r in gen] == [20, 40]
    assert gen[-1]["gen/exact"] == 1.0 and set(gen[-1]) == {"step", "gen/exact", "gen/regex", "gen/reward"}
    assert len(CALLS) == 6 and CALLS[0]["topic"] == "t0" and CALLS[0]["prompt"] == samples[0]["messages"][0]["content"]
    width, _ = read_png_size(out / "loss.png")
    assert width == 1600  # the loss chart and the generation scores beside it


def test_two_processes_generate_the_same_samples_as_one_with_lora_adapters_live(tmp_path):
    """Under FSDP every rank decodes the same prompts in lockstep (the blocks gather their shards per step); the
    answers equal one process's, and they change as the adapters train (the adapters are live in generation)."""
    ckpt = tiny_checkpoint(tmp_path / "dense")
    data = write_jsonl(tmp_path / "d.jsonl", qa_samples(8, seed=3))
    common = ["--model", str(ckpt), "--data", str(data), "--eval_data", str(data), "--batch_size", "4",
              "--max_steps", "6", "--lr", "5e-2", "--lora_rank", "8", "--eval_every", "3", "--eval_generate", "3",
              "--eval_max_new_tokens", "12"]
    run_sft(common + ["--out", str(tmp_path / "one")])
    run_sft(common + ["--out", str(tmp_path / "two")], nproc=2)
    for step in (3, 6):
        one, two = ((tmp_path / d / "samples" / f"step_{step}.jsonl").read_text() for d in ("one", "two"))
        assert one == two and len(one.splitlines()) == 3
    first = [json.loads(x)["completion"] for x in (tmp_path / "one" / "samples" / "step_3.jsonl").read_text()
             .splitlines()]
    last = [json.loads(x)["completion"] for x in (tmp_path / "one" / "samples" / "step_6.jsonl").read_text()
            .splitlines()]
    assert first != last  # the adapters trained between the evals are live in the generation


def test_bad_reward_and_regex_are_one_line_errors_before_the_model_loads(tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", qa_samples(2))
    monkeypatch.setattr(sft, "build_model", lambda *a, **k: pytest.fail("the model was loaded"))
    ckpt = tiny_checkpoint(tmp_path / "dense")
    base = ["--model", str(ckpt), "--data", str(data), "--eval_data", str(data), "--device", "cpu",
            "--eval_generate", "2"]
    for extra, message in ((["--reward", "nosuchmodule_xyz:f"], "--reward nosuchmodule_xyz:f: cannot import"),
                           (["--reward", "json:nope"], "--reward json:nope: json has no nope"),
                           (["--reward", "json"], "expected pkg.module:function"),
                           (["--eval_regex", "(unclosed"], "--eval_regex '(unclosed': not a valid regular")):
        capsys.readouterr()
        rc = run_cli(lambda: sft.main(base + extra + ["--out", str(tmp_path / "o")]))
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert rc == 1 and last.startswith("error: ") and message in last and "Traceback" not in err, err
    with pytest.raises(ValueError, match="give --eval_data"):
        sft.main(["--model", str(ckpt), "--data", str(data), "--eval_data", "", "--device", "cpu",
                  "--eval_generate", "2", "--out", str(tmp_path / "o2")])
    assert load_reward(f"{__name__}:answer_words") is answer_words

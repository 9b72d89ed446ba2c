"""generate/chat.py on SmolLM2-135M-Instruct: answers, equals transformers' greedy decoding, REPL over stdin."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillama import load_model
from minillama.generation import generate
from minillama.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT = REPO / "generate" / "chat.py"


def load_chat_module():
    spec = importlib.util.spec_from_file_location("chat_cli", CHAT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(cmd, stdin=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


def greedy_answer(model, tok, messages, n):
    ids = tok.encode_dialog(messages)
    return tok.decode(generate(model, [ids], n, stop_ids=tok.stop_ids)[0])


def test_one_shot_under_torchrun_answers_paris(smollm2_dir):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    proc = run([torchrun, "--nproc_per_node", "1", CHAT, "--ckpt", smollm2_dir,
                "--prompt", "What is the capital of France?", "--temperature", "0", "--max_new_tokens", "8"])
    assert "Paris" in proc.stdout


def test_greedy_tokens_equal_transformers(smol, smollm2_dir):
    transformers = pytest.importorskip("transformers")
    model, tok = smol
    ids = tok.encode_dialog([{"role": "user", "content": "Write a haiku about the sea."}])
    ours = generate(model, [ids], 30, stop_ids=tok.stop_ids)[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=30, do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=tok.stop_ids[0])
    theirs = out[0, len(ids):].tolist()
    if theirs and theirs[-1] in tok.stop_ids:
        theirs = theirs[:-1]  # we return the answer without its stop token
    assert len(ours) >= 20, "pick a prompt with a longer answer so the comparison means something"
    assert ours == theirs


def test_repl_over_stdin_keeps_history_resets_and_exits(smol, smollm2_dir):
    model, tok = smol
    n, system = 6, {"role": "system", "content": "You are a helpful assistant."}
    u1, u2 = "My name is Ada. Say hi.", "What is my name?"
    a1 = greedy_answer(model, tok, [system, {"role": "user", "content": u1}], n)
    a2 = greedy_answer(model, tok, [system, {"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                    {"role": "user", "content": u2}], n)
    a3 = greedy_answer(model, tok, [system, {"role": "user", "content": u2}], n)  # after /reset: no history
    assert a2 != a3  # the history changes the answer, so the transcript shows whether it was kept and cleared
    stdin = f"{u1}\n{u2}\n/reset\n{u2}\n/exit\nthis line is never read\n"
    proc = run([sys.executable, CHAT, "--ckpt", smollm2_dir, "--temperature", "0", "--max_new_tokens", str(n),
                "--system", system["content"]], stdin=stdin)
    assert proc.stdout == f"{a1}\n{a2}\n{a3}\n"
    assert "history cleared" in proc.stderr


def test_history_overflow_drops_oldest_turns_but_keeps_system(smol):
    _, tok = smol
    fit_history = load_chat_module().fit_history
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i}"}]
    msgs.append({"role": "user", "content": "last question"})
    full = len(tok.encode_dialog(msgs))
    ids, dropped = fit_history(tok, msgs, limit=full - 10 + 8, max_new_tokens=8)
    assert dropped == 1 and msgs[0]["role"] == "system" and msgs[1]["content"].startswith("question 1")
    assert ids == tok.encode_dialog(msgs) and len(ids) + 8 <= full - 2
    with pytest.raises(ValueError, match="does not fit"):
        fit_history(tok, [{"role": "user", "content": "x " * 50}], limit=20, max_new_tokens=8)


def test_missing_default_checkpoint_names_the_fetch_command(tmp_path, monkeypatch):
    import argparse

    from minillama import cli
    monkeypatch.setattr(cli, "DEFAULT_CKPT", tmp_path / "absent")
    args = argparse.Namespace(ckpt=None, ckpt_dir=None, tokenizer_path=None, adapter=None)
    with pytest.raises(FileNotFoundError, match="python weights/prepare_smollm2.py"):
        cli.resolve_checkpoint(args)

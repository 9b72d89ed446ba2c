"""generate/chat.py on SmolLM2-135M-Instruct: answers, equals transformers' greedy decoding, REPL over stdin."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillama import load_model
from minillama.inference.generate import generate
from minillama.tokenizer.tokenizer import decode_cut, load_tokenizer
from helpers import tiny_smol_vocab_checkpoint
from sft_helpers import free_port

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
    """The answer as chat.py prints it (one cut at n tokens loses a partial last character)."""
    new = generate(model, [tok.encode_dialog(messages)], n, stop_ids=tok.stop_ids)[0]
    return decode_cut(tok, new) if len(new) == n else tok.decode(new)


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

    from minillama.tools import flags as cli
    monkeypatch.setattr(cli, "DEFAULT_CKPT", tmp_path / "absent")
    args = argparse.Namespace(ckpt=None, ckpt_dir=None, tokenizer_path=None, adapter=None)
    with pytest.raises(FileNotFoundError, match="python weights/prepare_smollm2.py"):
        cli.resolve_checkpoint(args)


class Pty:
    """A command on a pseudo-terminal that is its controlling terminal, as in an interactive shell."""

    def __init__(self, cmd, tmp_path):
        import fcntl
        import termios
        master, slave = os.openpty()
        env = {**os.environ, "OMP_NUM_THREADS": "2", "MINILLAMA_HISTORY": str(tmp_path / "history")}
        self.proc = subprocess.Popen([str(c) for c in cmd], stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                                     env=env, start_new_session=True,
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.master, self.out = master, b""

    def expect(self, text: str, timeout: float = 120) -> bool:
        """Wait until text has appeared since the last expect; True if it did."""
        import select
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text.encode() in self.out:
                self.out = self.out[self.out.index(text.encode()) + len(text.encode()):]
                return True
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.out += os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    break
        return text.encode() in self.out

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)


@pytest.mark.parametrize("launcher", ["python", "torchrun"])
def test_ctrl_c_stops_the_answer_not_the_chat_and_a_second_one_quits(smollm2_dir, tmp_path, launcher):
    """Under torchrun the agent SIGKILLs a worker ~30 s after it sees SIGINT; the chat must never let it see one."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    head = [sys.executable] if launcher == "python" else [torchrun, "--nproc_per_node", "1"]
    term = Pty(head + [CHAT, "--ckpt", smollm2_dir, "--temperature", "0", "--max_new_tokens", "500"], tmp_path)
    try:
        assert term.expect("> ")
        term.send("Tell me a very long story about a dragon.\r")
        assert term.expect("There are many stories")  # the answer is streaming
        term.send("\x03")
        assert term.expect("[interrupted; answer dropped from the history]", 20)
        assert term.expect("> ", 20)
        term.send("What is the capital of France?\r")
        assert term.expect("Paris", 60)  # the chat goes on after the interruption
        assert term.expect("tokens/s", 20)  # the dim stats line after the answer
        assert term.expect("> ", 20)
        term.send("\x03")  # Ctrl-C at the prompt quits cleanly (a torchrun agent that saw SIGINT would exit 1)
        try:
            rc = term.proc.wait(60)
        finally:
            term.expect("never printed", 1)
        assert rc == 0, term.out
        assert b"Traceback" not in term.out and b"KeyboardInterrupt" not in term.out
    finally:
        term.close()


def test_repl_commands_multiline_input_and_ctrl_d(smollm2_dir, tmp_path):
    term = Pty([sys.executable, CHAT, "--ckpt", smollm2_dir, "--temperature", "0", "--max_new_tokens", "8"], tmp_path)
    try:
        assert term.expect("> ")
        term.send("/help\r")
        assert term.expect("/system TEXT") and term.expect("> ")
        term.send("/system Answer in one word.\r")
        assert term.expect("[system prompt: 'Answer in one word.']") and term.expect("> ")
        term.send("What is the capital \\\r")  # a trailing backslash continues the message
        assert term.expect("... ")
        term.send("of France?\r")
        assert term.expect("Paris", 60) and term.expect("> ", 20)
        term.send("\x04")  # Ctrl-D quits, leaving the shell on a fresh line
        assert term.proc.wait(20) == 0
        term.expect("never printed", 1)
        assert term.out.endswith(b"\r\n") and b"Traceback" not in term.out
    finally:
        term.close()
    assert "What is the capital \\" in (tmp_path / "history").read_text()  # readline history is kept


def tiny_chat_model(smollm2_dir, path):
    """A tiny random Llama with SmolLM2's tokenizer and well-separated logits, saved as a checkpoint dir."""
    model, ckpt = tiny_smol_vocab_checkpoint(smollm2_dir, path)
    return model, ckpt, load_tokenizer(ckpt)


def test_repl_keeps_the_cache_between_turns_and_drops_old_turns_when_full(smollm2_dir, tmp_path):
    """Each turn's answer equals encoding the (fitted) history from scratch, also once old turns had to go."""
    model, ckpt, tok = tiny_chat_model(smollm2_dir, tmp_path / "tiny")
    fit_history = load_chat_module().fit_history
    n, limit = 6, 80
    users = ["Tell me about the sea and the sky.", "And the mountains, please?", "What about rivers and lakes?"]
    history, expected, drops = [], [], []
    for u in users:
        msgs = history + [{"role": "user", "content": u}]
        ids, dropped = fit_history(tok, msgs, limit, n)
        new = generate(model, [ids], n, stop_ids=tok.stop_ids)[0]
        expected.append(decode_cut(tok, new) if len(new) == n else tok.decode(new))
        history = msgs + [{"role": "assistant", "content": expected[-1]}]
        drops.append(dropped)
    assert drops[-1] > 0  # the last turn only fits without the oldest one
    proc = run([sys.executable, CHAT, "--ckpt", ckpt, "--temperature", "0", "--max_new_tokens", str(n),
                "--max_seq_len", str(limit)], stdin="".join(u + "\n" for u in users))
    assert proc.stdout == "".join(e + "\n" for e in expected)
    cached = [int(c) for c in re.findall(r"(\d+) of them cached", proc.stderr)]
    assert cached[0] == 0 and cached[1] > 10  # turn 2 reused turn 1's tokens
    assert "dropped the 1 oldest turn(s)" in proc.stderr


def test_repl_under_tensor_parallel_equals_one_process(smollm2_dir, tmp_path):
    """2 CPU processes split the model; rank 0 reads stdin, both step in lockstep and keep the cache between turns."""
    model, ckpt, tok = tiny_chat_model(smollm2_dir, tmp_path / "tiny")
    n, u1, u2 = 5, "Hello there.", "And again?"
    a1 = greedy_answer(model, tok, [{"role": "user", "content": u1}], n)
    a2 = greedy_answer(model, tok, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                    {"role": "user", "content": u2}], n)
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    proc = run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), CHAT, "--ckpt", ckpt,
                "--device", "cpu", "--temperature", "0", "--max_new_tokens", str(n)], stdin=f"{u1}\n{u2}\n")
    assert proc.stdout == f"{a1}\n{a2}\n"
    cached = [int(c) for c in re.findall(r"(\d+) of them cached", proc.stderr)]
    assert cached[0] == 0 and cached[1] > len(tok.encode_dialog([{"role": "user", "content": u1}])) - 2

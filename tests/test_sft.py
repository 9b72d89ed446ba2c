"""train/sft.py end to end on tiny random models (CPU, gloo): FSDP over 2 processes == 1 process (full, LoRA,
Mixtral), resume == uninterrupted (after --stop_at_step and after SIGTERM), memorization, config files, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch

from minillama import load_model
from minillama.lora.peft import load_adapter
from minillama.inference.generate import generate
from minillama.util.plot import BLUE, read_png_size
from minillama.tokenizer.tokenizer import load_tokenizer
from sft_helpers import REPO, metrics, qa_samples, read_safetensors, run_sft, tiny_checkpoint, write_jsonl

sys.path.insert(0, str(REPO / "train"))
import plot as plot_cli  # noqa: E402  (train/plot.py)
import sft  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    data = write_jsonl(d / "train.jsonl", qa_samples(16))
    return d, data, tiny_checkpoint(d / "dense"), tiny_checkpoint(d / "moe", moe=True)


def losses(out):
    return [r["loss"] for r in metrics(out) if "loss" in r]


def png_pixels(path) -> np.ndarray:
    """Decode our PNGs (8-bit RGB, filter 0 on every row) back to (H, W, 3)."""
    data = path.read_bytes()
    w, h = read_png_size(path)
    pos, idat = 8, b""
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def assert_same_tensors(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


def test_full_fsdp_two_processes_and_resume_equal_one_process(setup):
    d, data, dense, _ = setup
    common = ["--model", str(dense), "--data", str(data), "--batch_size", "4", "--max_steps", "6", "--lr", "1e-2",
              "--lora_rank", "0", "--warmup_steps", "2"]
    run_sft(common + ["--out", str(d / "f1")], nproc=1)
    # 2 processes, accumulating 2 micro-batches each; interrupted after step 3, resumed (also on 2 processes)
    run_sft(common + ["--out", str(d / "f2"), "--micro_batch_size", "1", "--stop_at_step", "3"], nproc=2)
    assert len(losses(d / "f2")) == 3 and (d / "f2" / "latest").read_text() == "step_3"
    run_sft(common + ["--out", str(d / "f2"), "--micro_batch_size", "1", "--resume"], nproc=2)
    ref, got = losses(d / "f1"), losses(d / "f2")
    assert len(got) == 6 and ref[-1] < ref[0] - 0.5
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5
    assert_same_tensors(read_safetensors(d / "f1" / "final"), read_safetensors(d / "f2" / "final"))
    # the final HF dir is a loadable checkpoint, and the run left its config, metrics and plot
    assert load_model(d / "f1" / "final").args.n_layers == 2
    cfg = json.loads((d / "f2" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["accumulation_steps"] == 2 and cfg["lora_rank"] == 0
    rec = metrics(d / "f1")[0]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "nonpad_frac", "peak_mem_gb"} <= rec.keys()
    assert 0.5 < rec["nonpad_frac"] <= 1.0
    assert read_png_size(d / "f1" / "loss.png") == (800, 480)
    assert plot_cli.main([str(d / "f2" / "metrics.jsonl"), "--out", str(d / "curve.png")]) == 0
    img = png_pixels(d / "curve.png")
    assert img.shape == (480, 800, 3) and (img == BLUE).all(-1).sum() > 500  # the train curve is drawn


def test_lora_packed_two_processes_equal_one_process(setup):
    d, data, dense, _ = setup
    common = ["--model", str(dense), "--data", str(data), "--batch_size", "4", "--max_steps", "4", "--lr", "1e-2",
              "--lora_rank", "4", "--lora_targets", "q_proj", "v_proj", "down_proj", "--pack", "--seq_len", "128",
              "--eval_data", str(data), "--eval_every", "2"]
    run_sft(common + ["--out", str(d / "l1"), "--micro_batch_size", "1"], nproc=1)
    run_sft(common + ["--out", str(d / "l2"), "--save_every", "1", "--keep", "2"], nproc=2)
    ref, got = losses(d / "l1"), losses(d / "l2")
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5 and ref[-1] < ref[0]
    # eval at step 2 and at the end, over the whole eval set whatever the number of processes
    ev1 = [(r["step"], r["eval_loss"]) for r in metrics(d / "l1") if "eval_loss" in r]
    ev2 = [(r["step"], r["eval_loss"]) for r in metrics(d / "l2") if "eval_loss" in r]
    assert [s for s, _ in ev1] == [s for s, _ in ev2] == [2, 4] and ev1[1][1] < ev1[0][1]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ev1, ev2)) < 1e-5
    a, b = read_safetensors(d / "l1" / "final"), read_safetensors(d / "l2" / "final")
    assert_same_tensors(a, b)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in a.items())  # B moved off its zero init
    model = load_model(dense)
    cfg = load_adapter(model, d / "l2" / "final")
    assert cfg["r"] == 4 and sorted(cfg["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert (d / "l2" / "step_4" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (d / "l2").glob("step_*")) == ["step_3", "step_4"]  # --keep 2 pruned the rest


def test_mixtral_router_loss_and_activation_checkpointing(setup):
    d, data, _, moe = setup
    common = ["--model", str(moe), "--data", str(data), "--batch_size", "4", "--max_steps", "3", "--lr", "1e-2",
              "--lora_rank", "0", "--router_aux_loss_coef", "0.05"]
    run_sft(common + ["--out", str(d / "m1"), "--micro_batch_size", "2"], nproc=1)  # same micro-batches as 2x2
    run_sft(common + ["--out", str(d / "m2"), "--activation_checkpointing"], nproc=2)
    m1, m2 = metrics(d / "m1"), metrics(d / "m2")
    assert all(1.0 < r["aux_loss"] < 4.0 for r in m1)  # top-2 of 4 experts: 2.0 when perfectly balanced
    for a, b in zip(m1, m2):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["aux_loss"] - b["aux_loss"]) < 1e-5
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4
    assert_same_tensors(read_safetensors(d / "m1" / "final"), read_safetensors(d / "m2" / "final"))


def _sft_cmd(args):
    return [sys.executable, str(REPO / "train" / "sft.py"), "--device", "cpu", *args]


def test_qlora_sigterm_saves_a_checkpoint_and_resume_continues_exactly(setup):
    d, data, dense, _ = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["--model", str(dense), "--data", str(data), "--batch_size", "2", "--max_steps", "100", "--lr", "3e-3",
              "--lora_rank", "4", "--lora_dropout", "0.3", "--warmup_steps", "5", "--quantize", "nf4"]
    out = d / "sig"
    proc = subprocess.Popen(_sft_cmd(common + ["--out", str(out)]), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    stopped = int((out / "latest").read_text().removeprefix("step_"))
    assert 3 <= stopped < 100 and "stopped at step" in err
    res = subprocess.run(_sft_cmd(common + ["--out", str(out), "--resume"]), env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ref = d / "sig_ref"
    res = subprocess.run(_sft_cmd(common + ["--out", str(ref)]), env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert [r["step"] for r in metrics(out)] == list(range(1, 101))
    assert max(abs(a - b) for a, b in zip(losses(ref), losses(out))) < 1e-5  # dropout RNG restored too
    assert_same_tensors(read_safetensors(ref / "final"), read_safetensors(out / "final"))


def test_memorizes_samples_and_generate_reproduces_them(setup, one_thread):
    d, _, dense, _ = setup
    samples = qa_samples(4, seed=7)
    data = write_jsonl(d / "mem.jsonl", samples)
    out = d / "mem"
    rc = sft.main(["--model", str(dense), "--data", str(data), "--out", str(out), "--device", "cpu",
                   "--batch_size", "4", "--max_steps", "40", "--lr", "1e-2", "--lora_rank", "0", "--warmup_steps",
                   "3", "--weight_decay", "0"])
    assert rc == 0
    assert losses(out)[-1] < 0.05
    model = load_model(out / "final")
    tok = load_tokenizer(out / "final")
    for s in samples:
        prompt = tok.encode_dialog(s["messages"][:1])
        new = generate(model, [prompt], max_new_tokens=40, stop_ids=tok.stop_ids)[0]
        assert tok.decode(new) == s["messages"][1]["content"]


def test_nan_loss_stops_with_a_clear_message(setup, capsys, one_thread):
    d, data, _, _ = setup
    bad = tiny_checkpoint(d / "nan")
    from safetensors.torch import load_file, save_file
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.norm.weight"][:] = 3e38  # finite (a NaN weight is refused on load) but the logits overflow
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rc = sft.main(["--model", str(bad), "--data", str(data), "--out", str(d / "nanrun"), "--device", "cpu",
                   "--batch_size", "4", "--max_steps", "3"])
    assert rc == 1
    assert "loss is nan" in capsys.readouterr().err
    assert not (d / "nanrun" / "latest").exists()


def test_config_file_keys_are_flags_and_cli_wins(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('lr = 0.5\nbatch_size = 16\npack = true\nlora_targets = ["q_proj"]\n')
    args = sft.parse_args(["--config", str(cfg), "--lr", "0.25"])
    assert (args.lr, args.batch_size, args.pack, args.lora_targets) == (0.25, 16, True, ["q_proj"])
    (tmp_path / "run.json").write_text(json.dumps({"max_steps": 7, "lora_rank": 0}))
    args = sft.parse_args(["--config", str(tmp_path / "run.json")])
    assert args.max_steps == 7 and args.lr == 2e-5  # full fine-tuning's default lr
    (tmp_path / "bad.toml").write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match="bad.toml: unknown keys \\['learning_rate'\\]"):
        sft.parse_args(["--config", str(tmp_path / "bad.toml")])


def test_resume_takes_the_runs_saved_flags_and_new_flags_win(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = vars(sft.parse_args(["--model", "/ckpt/llama3", "--data", "d.jsonl", "--lr", "3e-4", "--pack",
                                 "--micro_batch_size", "2", "--out", str(out)]))
    (out / "config.json").write_text(json.dumps({**saved, "micro_batch_size": 2, "world_size": 2}))
    args = sft.parse_args(["--out", str(out), "--resume"])
    assert (args.ckpt, args.data, args.lr, args.pack, args.resume) == ("/ckpt/llama3", "d.jsonl", 3e-4, True, "latest")
    assert args.micro_batch_size == 0  # re-derived for the current process count
    args = sft.parse_args(["--out", str(out), "--resume", "--lr", "1e-4", "--max_steps", "9"])
    assert (args.lr, args.max_steps, args.ckpt) == (1e-4, 9, "/ckpt/llama3")
    fresh = sft.parse_args(["--out", str(out)])  # without --resume the saved flags are not used
    assert fresh.ckpt != "/ckpt/llama3"


def test_init_adapter_starts_the_run_from_that_adapter(setup, capsys, one_thread):
    d, data, dense, _ = setup
    base = ["--model", str(dense), "--data", str(data), "--device", "cpu", "--batch_size", "4", "--warmup_steps", "0"]
    assert sft.main(base + ["--out", str(d / "first"), "--max_steps", "6", "--lr", "1e-2"]) == 0
    first = read_safetensors(d / "first" / "final")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in first.items())  # it trained
    # one step at a negligible lr: the saved adapter is the one it started from, and its loss is the trained one's
    assert sft.main(base + ["--out", str(d / "cont"), "--max_steps", "1", "--lr", "1e-12",
                            "--init_adapter", str(d / "first" / "final")]) == 0
    assert_same_tensors(read_safetensors(d / "cont" / "final"), first, atol=1e-7)
    assert sft.main(base + ["--out", str(d / "fresh"), "--max_steps", "1", "--lr", "1e-12"]) == 0
    assert losses(d / "cont")[0] < losses(d / "fresh")[0] - 0.1
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        sft.parse_args(["--init_adapter", str(d / "first" / "final"), "--lora_rank", "8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--init_adapter" in err and "r=16" in err and "--lora_rank 16" in err

"""generate/eval_long.py: passkey records with the documented fields (the real SmolLM2 finds the key at short
lengths), a heatmap that shows them, crash-resume, refusing to mix setups, perplexity == the model's own loss on
the same tokens for every length, and tensor parallel (with an adapter and a RoPE override) == one process."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from minillama import load_model
from minillama.lora.peft import save_adapter
from minillama.lora.layers import apply_lora
from minillama.tokenizer.tokenizer import load_tokenizer
from sft_helpers import REPO, free_port, tiny_checkpoint
from test_lora import randomize_lora

sys.path.insert(0, str(REPO / "generate"))
import eval_long  # noqa: E402

FIELDS = {"index", "length", "depth", "trial", "key", "answer", "correct", "prompt_tokens"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("evallong")
    ckpt = tiny_checkpoint(d / "model")
    model = load_model(ckpt)
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_lora(model, std=0.05)
    save_adapter(model, d / "adapter")
    text = d / "book.txt"
    text.write_text("".join(f"Line {i}: the river runs past the old mill and the stone bridge.\n" for i in range(40)))
    return d, ckpt, d / "adapter", text


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def png_pixels(path):
    from test_sft import png_pixels as decode
    return decode(path)


def test_passkey_on_real_smollm2_writes_records_and_heatmap_and_resumes(smollm2_dir, tmp_path, capsys):
    torch.set_num_threads(1)
    argv = ["--ckpt", str(smollm2_dir), "--task", "passkey", "--lengths", "160,320", "--depths", "0,1", "--trials",
            "1", "--out", str(tmp_path)]
    eval_long.main(argv)
    rows = read(tmp_path / "passkey.jsonl")
    assert len(rows) == 4 and all(set(r) == FIELDS for r in rows)
    assert [(r["length"], r["depth"]) for r in rows] == [(160, 0.0), (160, 1.0), (320, 0.0), (320, 1.0)]
    assert all(len(r["key"]) == 5 and r["prompt_tokens"] <= r["length"] - 16 for r in rows)
    assert all(r["correct"] == (r["key"] in r["answer"]) for r in rows)
    assert sum(r["correct"] for r in rows) >= 3  # short contexts: the model retrieves the key (greedy)
    img = png_pixels(tmp_path / "passkey.png")
    green = (img[..., 1] > 140) & (img[..., 0] < 60)
    assert green.sum() > 4 * 40 * 40 * (sum(r["correct"] for r in rows) - 1) / 4
    # a crash mid-write: the cut line is redone, the others are kept
    lines = (tmp_path / "passkey.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "passkey.jsonl").write_text("".join(lines[:3]) + lines[3][:20])
    capsys.readouterr()
    eval_long.main(argv)
    assert "1/1" in capsys.readouterr().err  # only the cut record was run again
    assert read(tmp_path / "passkey.jsonl") == rows


def test_rerun_with_another_setup_is_refused_unless_overwrite(tiny, tmp_path):
    d, ckpt, adapter, _ = tiny
    argv = ["--ckpt", str(ckpt), "--task", "passkey", "--lengths", "256", "--depths", "0.5", "--trials", "1",
            "--out", str(tmp_path), "--max_new_tokens", "4"]
    eval_long.main(argv)
    with pytest.raises(FileExistsError, match="differs in adapter"):
        eval_long.main(argv + ["--adapter", str(adapter)])
    eval_long.main(argv + ["--adapter", str(adapter), "--overwrite"])
    assert len(read(tmp_path / "passkey.jsonl")) == 1
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        eval_long.main(argv[:5] + ["1024"] + argv[6:] + ["--overwrite"])
    with pytest.raises(SystemExit):
        eval_long.get_args(argv + ["--depths", "0.5,1.5"])


def test_perplexity_scores_the_same_tokens_at_every_length_as_the_model_does(tiny, tmp_path):
    d, ckpt, _, text = tiny
    eval_long.main(["--ckpt", str(ckpt), "--task", "perplexity", "--data", str(text), "--lengths", "64,128,256",
                    "--trials", "2", "--batch_size", "3", "--out", str(tmp_path)])
    rows = read(tmp_path / "perplexity.jsonl")
    assert {r["length"]: sum(1 for x in rows if x["length"] == r["length"]) for r in rows} == {64: 8, 128: 4, 256: 2}
    assert {"index", "length", "window", "start", "tokens", "nll"} == set(rows[0])
    tok, model = load_tokenizer(ckpt), load_model(ckpt)
    ids = tok.encode(text.read_text(), bos=True)
    for r in rows[::3]:  # the model's own mean next-token loss on that window
        x = torch.tensor([ids[r["start"]:r["start"] + r["length"]]])
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(model(x)[0, :-1], x[0, 1:]).item()
        assert r["nll"] == pytest.approx(want, rel=1e-5)
    assert (tmp_path / "perplexity.png").is_file()
    ppl = eval_long.perplexity_table(eval_long.get_args(["--task", "perplexity", "--lengths", "64,128,256", "--out",
                                                          "x"]), rows)
    assert all(math.isfinite(p) and p > 1 for p in ppl)


def test_tensor_parallel_with_adapter_and_rope_override_equals_one_process(tiny, tmp_path):
    d, ckpt, adapter, _ = tiny
    args = ["--ckpt", str(ckpt), "--adapter", str(adapter), "--rope_theta", "20000", "--task", "passkey",
            "--lengths", "256,320", "--depths", "0,1", "--trials", "1", "--max_new_tokens", "6", "--device", "cpu"]
    eval_long.main(args + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(REPO / "generate" / "eval_long.py"), *args, "--out",
                           str(tmp_path / "tp")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, tp = read(tmp_path / "one" / "passkey.jsonl"), read(tmp_path / "tp" / "passkey.jsonl")
    assert [r["answer"] for r in one] == [r["answer"] for r in tp] and len(one) == 4
    cfg = json.loads((tmp_path / "tp" / "eval_config.json").read_text())["passkey"]
    assert cfg["rope_theta"] == 20000.0 and cfg["adapter"] == [["default", str(adapter)]]


def test_passkey_training_set_is_deterministic_sized_and_worded_like_the_eval(smol_dir, tmp_path):
    sys.path.insert(0, str(REPO / "train" / "data"))
    import make_passkey
    tok = load_tokenizer(smol_dir)
    a = make_passkey.make_samples(6, 512, 1024, 0, tok)
    assert a == make_passkey.make_samples(6, 512, 1024, 0, tok)  # the same flags, the same file
    assert a != make_passkey.make_samples(6, 512, 1024, 1, tok)
    sizes = [len(tok.encode_dialog(s["messages"], add_generation_prompt=False)) for s in a]
    assert all(480 <= n <= 1024 for n in sizes), sizes
    passkey, facts = a[0]["messages"], a[1]["messages"]
    assert passkey[0]["content"].startswith(eval_long.INTRO) and passkey[0]["content"].endswith(eval_long.QUESTION)
    key = passkey[1]["content"].removeprefix("The pass key is ").rstrip(".")
    assert f"The pass key is {key}. Remember it." in passkey[0]["content"]
    assert eval_long.FILLER.split(".")[0] not in passkey[0]["content"]  # not the eval's haystack
    answers = [m["content"] for m in facts if m["role"] == "assistant"]
    assert len(answers) >= 3 and all(ans.rstrip(".") in facts[0]["content"] for ans in answers)  # every fact there

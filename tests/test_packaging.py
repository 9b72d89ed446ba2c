"""The installed package: console scripts work outside the checkout, with the scripts of generate/ and train/."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from minillama import ModelArgs, Transformer, save_hf
from minillama.inference.generate import generate
from minillama.tokenizer.tokenizer import decode_cut, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["minillama-chat", "minillama-complete", "minillama-batch", "minillama-serve", "minillama-eval-long",
           "minillama-bench", "minillama-bench-serve", "minillama-bench-deploy", "minillama-sft", "minillama-dpo",
           "minillama-grpo", "minillama-rejection", "minillama-plot",
           "minillama-bench-train", "minillama-prepare-smollm2", "minillama-convert", "minillama-merge",
           "minillama-extract-lora", "minillama-plan-memory"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --target` of this checkout (a real wheel build, not editable): (target dir, env to run it)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "HOME": str(target / "home")}
    return target, env


def test_every_console_script_starts_from_an_installed_package(installed, tmp_path):
    target, env = installed
    load_all = ("from importlib.metadata import distribution; import minillama; "
                "eps = [e for e in distribution('minillama').entry_points if e.group == 'console_scripts']; "
                "[e.load() for e in eps]; print(minillama.__file__, sorted(e.name for e in eps))")
    proc = subprocess.run([sys.executable, "-c", load_all], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr  # every entry point's function imports from the installed package
    assert proc.stdout.split(" ", 1) == [str(target / "minillama" / "__init__.py"), f"{sorted(SCRIPTS)}\n"]
    assert all((target / "bin" / name).is_file() for name in SCRIPTS)

    def run(name):
        return subprocess.run([str(target / "bin" / name), "--help"], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=120)
    with ThreadPoolExecutor(2) as pool:  # one script from each mapped folder
        chat, sft = pool.map(run, ["minillama-chat", "minillama-sft"])
    assert chat.returncode == 0 and "usage: minillama-chat" in chat.stdout, chat.stderr
    assert sft.returncode == 0, sft.stderr
    # the demo's data ships with the package
    assert str(target / "minillama" / "recipes" / "train" / "data" / "reviews.jsonl") in sft.stdout.replace("\n", "") \
        .replace(" ", "")


def test_a_console_script_whose_main_returns_a_path_exits_0(installed, tmp_path):
    """minillama-convert's main returns the directory it wrote: the script exits 0 with no traceback (it used to
    pass that Path to sys.exit through int(), a TypeError after the conversion had succeeded)."""
    target, env = installed
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=96))
    save_hf(model, tmp_path / "hf")
    proc = subprocess.run([str(target / "bin" / "minillama-convert"), str(tmp_path / "hf"), str(tmp_path / "q"),
                           "--quantize", "int8"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert (tmp_path / "q" / "quantized.safetensors").is_file()


def test_installed_complete_generates_what_the_library_does(installed, tmp_path, smollm2_dir):
    target, env = installed
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=96,
                                  max_seq_len=128)).eval()
    ckpt = save_hf(model, tmp_path / "tiny", tokenizer_src=smollm2_dir)
    tok = load_tokenizer(ckpt)
    new = generate(model, [tok.encode("Hello there", bos=True)], 4, stop_ids=tok.stop_ids)[0]
    expect = decode_cut(tok, new) if len(new) == 4 else tok.decode(new)
    proc = subprocess.run([str(target / "bin" / "minillama-complete"), "--ckpt", str(ckpt), "--prompt", "Hello there",
                           "--max_new_tokens", "4", "--temperature", "0"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"Hello there\n> {expect}\n" in proc.stdout

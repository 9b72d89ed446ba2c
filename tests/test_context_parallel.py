"""Context parallelism (train/sft.py --context_parallel C, CPU gloo): C processes per row give the losses and gradient
norms of one process (packed and padded rows, full and LoRA + --trainable, activation checkpointing, resume, data x
context layouts), halve the activation memory per process, and two torchrun agents (--nnodes 2, c10d) equal one."""

import os
import subprocess
import sys

import pytest
import torch

from minillama.training.context_parallel import shard_indices
from sft_helpers import REPO, free_port, metrics, run_sft, tiny_checkpoint, write_jsonl

WORDS = ["red", "blue", "cat", "dog", "sun", "moon", "tree", "fish", "rock", "star", "river", "cloud"]


def long_samples(n: int, seed: int = 0) -> list[dict]:
    """Chat samples of 150-450 byte-level tokens: long prompts, short answers."""
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 90)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        out.append({"messages": [{"role": "user", "content": f"{i}: {text}"}, {"role": "assistant", "content": answer}]})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cp")
    return d, write_jsonl(d / "long.jsonl", long_samples(12)), tiny_checkpoint(d / "model")


def records(out):
    return [r for r in metrics(out) if "loss" in r]


def assert_same_run(ref, got, rtol=1e-5):
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert abs(a["loss"] - b["loss"]) <= rtol * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= rtol * abs(a["grad_norm"]), (a["grad_norm"], b["grad_norm"])
        assert a["tokens"] == b["tokens"]


def common(setup, *extra):
    d, data, model = setup
    return ["--model", str(model), "--data", str(data), "--batch_size", "4", "--max_steps", "4", "--lr", "5e-3",
            "--warmup_steps", "1", "--seq_len", "512", *extra]


def test_packed_full_finetune_cp2_with_checkpointing_and_resume_equals_one_process(setup):
    d, data, _ = setup
    args = common(setup, "--pack", "--lora_rank", "0", "--eval_data", str(data))
    run_sft(args + ["--out", str(d / "one")], nproc=1)
    cp = args + ["--out", str(d / "cp"), "--context_parallel", "2", "--activation_checkpointing"]
    run_sft(cp + ["--stop_at_step", "2"], nproc=2)
    proc = run_sft(cp + ["--resume"], nproc=2)
    assert "each row split over 2 processes" in proc.stderr
    ref, got = records(d / "one"), records(d / "cp")
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert_same_run(ref, got)
    evals = [[r["eval_loss"] for r in metrics(d / out) if "eval_loss" in r] for out in ("one", "cp")]
    assert len(evals[0]) == 1 and evals[0][0] == pytest.approx(evals[1][0], rel=1e-5)  # the eval loss too


def test_padded_lora_with_trainable_embed_norm_cp2_equals_one_process_and_halves_activations(setup):
    d = setup[0]
    args = common(setup, "--lora_rank", "4", "--trainable", "embed", "norm")
    one = run_sft(args + ["--out", str(d / "lora1")], nproc=1)
    two = run_sft(args + ["--out", str(d / "lora2"), "--context_parallel", "2"], nproc=2)
    ref, got = records(d / "lora1"), records(d / "lora2")
    assert_same_run(ref, got)
    # measured, not assumed: what autograd saves for backward per process, first micro-batch
    a1, a2 = ref[0]["activation_mb"], got[0]["activation_mb"]
    print(f"activation memory per process: C=1 {a1:.2f} MiB, C=2 {a2:.2f} MiB ({a2 / a1:.0%})")
    assert "activation memory" in one.stderr and "activation memory" in two.stderr
    assert 0.4 < a2 / a1 < 0.62
    # the two final adapters are the same function (embeddings and norms included)
    from safetensors.torch import load_file
    w1 = load_file(str(d / "lora1" / "final" / "adapter_model.safetensors"))
    w2 = load_file(str(d / "lora2" / "final" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.weight" in w1 and w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-5, rtol=1e-4, msg=k)


def test_qlora_with_data_x_context_layout_dp2_cp2_equals_one_process(setup):
    d = setup[0]
    args = common(setup, "--pack", "--lora_rank", "4", "--quantize", "nf4", "--max_steps", "3")
    run_sft(args + ["--out", str(d / "dp1")], nproc=1)
    proc = run_sft(args + ["--out", str(d / "dp2cp2"), "--context_parallel", "2"], nproc=4)
    assert "2 data-parallel" in proc.stderr
    assert_same_run(records(d / "dp1"), records(d / "dp2cp2"))


def test_context_parallel_that_does_not_divide_the_processes_is_a_one_line_error(setup):
    d = setup[0]
    proc = run_sft(common(setup, "--out", str(d / "bad"), "--context_parallel", "3"), nproc=2, check=False)
    assert proc.returncode != 0
    assert "--context_parallel 3 must divide the 2 processes" in proc.stderr


@pytest.mark.parametrize("c", [2, 3, 4])
def test_shards_cover_each_row_once_with_balanced_causal_work(c):
    L = 2 * c * 16
    shards = [shard_indices(L, c, r) for r in range(c)]
    assert sorted(i for s in shards for i in s) == list(range(L))
    work = [sum(i + 1 for i in s) for s in shards]  # causal attention: query i sees i + 1 keys
    assert max(work) == min(work)


def test_two_torchrun_agents_on_two_nodes_equal_one_agent_with_two_processes(setup):
    """--nnodes 2 (one process each, c10d rendezvous on 127.0.0.1) == --nproc_per_node 2, here with the row
    split across the two 'nodes'."""
    d = setup[0]
    args = common(setup, "--pack", "--lora_rank", "4", "--max_steps", "3", "--device", "cpu", "--context_parallel", "2")
    run_sft(args + ["--out", str(d / "node1")], nproc=2)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
         "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
         "--rdzv_id", "minillama-test", str(REPO / "train" / "sft.py"), *args, "--out", str(d / "node2")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outs = [a.communicate(timeout=300) for a in agents]
    for a, (_, err) in zip(agents, outs):
        assert a.returncode == 0, err[-3000:]
    ref, got = records(d / "node1"), records(d / "node2")
    assert len(got) == 3
    for a, b in zip(ref, got):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                   rel=1e-6)

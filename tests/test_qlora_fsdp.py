"""QLoRA under FSDP2 shards the NF4 base: 2 processes give the 1-process losses and adapter, and each rank holds
half of the NF4 bytes (measured from its local shards)."""

import re

from sft_helpers import metrics, qa_samples, read_safetensors, run_sft, tiny_checkpoint, write_jsonl


def nf4_bytes(stderr: str) -> tuple[int, list[int]]:
    m = re.search(r"NF4 base: .*\(bytes: (\d+) in all, per rank ([\d ]+);", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1)), [int(b) for b in m.group(2).split()]


def test_qlora_fsdp_shards_the_nf4_base_and_two_processes_equal_one(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", qa_samples(8))
    ckpt = tiny_checkpoint(tmp_path / "dense", moe=True)  # experts too: stacked NF4 weights
    common = ["--model", str(ckpt), "--data", str(data), "--batch_size", "4", "--max_steps", "3", "--lr", "1e-2",
              "--lora_rank", "4", "--quantize", "nf4", "--lora_targets", "q_proj", "v_proj", "experts"]
    one = run_sft(common + ["--out", str(tmp_path / "one"), "--micro_batch_size", "2"], nproc=1)
    two = run_sft(common + ["--out", str(tmp_path / "two")], nproc=2)
    total1, (alone,) = nf4_bytes(one.stderr)
    total2, shares = nf4_bytes(two.stderr)
    assert total1 == total2 == alone  # one process holds it all
    assert all(abs(s - total2 / 2) <= 0.01 * total2 for s in shares), shares  # about half each (shard padding)
    l1, l2 = [r["loss"] for r in metrics(tmp_path / "one")], [r["loss"] for r in metrics(tmp_path / "two")]
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5 and l1[-1] < l1[0]
    a, b = read_safetensors(tmp_path / "one" / "final"), read_safetensors(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    # AdamW divides by sqrt(v): a near-zero gradient's summation-order noise (two ranks vs two micro-batches) moves
    # its weight by up to ~lr per step, so the factors agree to 1e-5 only mostly; a wrong shard would be ~1e-2 off
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 5e-5, diffs

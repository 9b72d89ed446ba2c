"""Extract a LoRA adapter from a fine-tuned model and its base (as mergekit's extract-lora does):

    python -m minillama.tools.extract_lora --base BASE --tuned TUNED --rank R --out DIR [--targets q_proj v_proj ...]

Per target weight, the rank-R truncated SVD of the float32 difference D = W_tuned - W_base = U S Vh, written as a
PEFT adapter with lora_A = sqrt(S_r) Vh_r (r, in), lora_B = U_r sqrt(S_r) (out, r) and scaling 1 (lora_alpha = r);
q/k rows in Hugging Face order, Mixtral experts one module per expert. The best rank-R approximation of D in
Frobenius norm (Eckart-Young) keeps the fraction sum(S_r^2) / sum(S^2) of the delta's energy; that fraction is
printed per layer (worst weight named) and written per weight to DIR/extraction_report.json. Weights the
fine-tune left unchanged are skipped; tensors no LoRA can hold (embeddings, norms) that differ are reported.

Memory: both checkpoints are read lazily tensor by tensor (safetensors memory-mapped, .pth mmap'd), the base shard
by shard, so at most one weight pair (one expert) is in float32 at a time, with its SVD. --device cuda runs the
SVDs on a GPU (an 8B model's 224 SVDs take minutes on a CPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..args import ModelArgs
from ..util.cli import HelpFormatter, positive_int, run
from ..util.files import check_dir_writable, refuse_overlap
from ..checkpoints.checkpoint import CheckpointPlan, plan_checkpoint
from ..checkpoints.shards import Entry, read_entry

# architecture fields an adapter depends on (RoPE and context do not change any weight's shape or meaning here)
SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "vocab_size", "n_experts",
                "tie_embeddings")
ROW_CHUNK = 4096  # rows compared at a time for tensors no LoRA holds


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m minillama.tools.extract_lora", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--base", required=True, help="base checkpoint dir (Hugging Face or Meta layout)")
    p.add_argument("--tuned", required=True, help="fine-tuned checkpoint dir of the same architecture")
    p.add_argument("--rank", type=positive_int, required=True, help="LoRA rank of the extracted adapter")
    p.add_argument("--out", required=True, help="output adapter dir (PEFT layout)")
    p.add_argument("--targets", nargs="+", default=["all-linear"],
                   help="PEFT names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head experts "
                        "router, or all-linear")
    p.add_argument("--device", default="cpu", help="where the SVDs run (cpu, cuda, cuda:N)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def check_same_architecture(base: CheckpointPlan, tuned: CheckpointPlan) -> None:
    """One-line error naming the first field (or tensor) where the two checkpoints differ."""
    for f in SHAPE_FIELDS:
        a, b = getattr(base.args, f), getattr(tuned.args, f)
        if a != b:
            raise ValueError(f"--base {base.dir} and --tuned {tuned.dir} differ in {f}: {a} vs {b} (an adapter holds "
                             "the weight differences of one architecture)")
    if base.shapes != tuned.shapes:
        key = next(k for k in base.shapes if base.shapes[k] != tuned.shapes.get(k))
        raise ValueError(f"--base and --tuned differ in {key}: {base.shapes[key]} vs {tuned.shapes.get(key)}")


def selected(entry: Entry, linears: set, experts: set, router: bool) -> bool:
    """Whether a checkpoint entry is a weight the --targets ask to extract."""
    parts = entry.target.split(".")
    if entry.slot is not None:
        return parts[-1] in experts  # layers.N.feed_forward.experts.wK
    if entry.target == "output.weight":
        return "output" in linears
    if entry.target.endswith("feed_forward.gate.weight"):
        return router
    return parts[0] == "layers" and len(parts) == 5 and parts[-2] in linears


def truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """D (out, in) float32 -> (A (r, in), B (out, r), fraction of ||D||^2 that B @ A keeps)."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    total = float((s.double() ** 2).sum())
    kept = float((s[:r].double() ** 2).sum()) / total if total > 0 else 1.0
    return (root[:, None] * vh[:r]).cpu(), (u[:, :r] * root[None]).cpu(), kept


def differs(files_a, ea: Entry, files_b, eb: Entry) -> float:
    """Max |a - b| of a tensor no LoRA can hold, compared ROW_CHUNK rows at a time (0.0 when equal)."""
    a, b = read_entry(files_a, ea), read_entry(files_b, eb)
    worst = 0.0
    for r in range(0, a.shape[0], ROW_CHUNK):
        worst = max(worst, float((a[r:r + ROW_CHUNK].float() - b[r:r + ROW_CHUNK].float()).abs().max()))
    return worst


def extract(base: CheckpointPlan, tuned: CheckpointPlan, rank: int, targets, device, log=print) -> tuple[list, dict]:
    """(PEFT modules, report) for every targeted weight that differs between the two checkpoints."""
    from ..lora.peft import expert_modules, peft_module
    from ..lora.layers import _resolve_targets
    args: ModelArgs = base.args
    linears, experts, router = _resolve_targets(tuple(targets), bool(args.n_experts))
    tuned_entries = {(e.target, e.slot): e for e in tuned.entries}
    order = sorted(base.entries, key=lambda e: (str(e.sources[0].file), e.target, e.slot or 0))  # shard by shard
    chosen = [e for e in order if selected(e, linears, experts, router)]
    chosen_ids = {id(e) for e in chosen}
    if not chosen:
        raise ValueError(f"--targets {' '.join(targets)}: no weight of this {args.family} model matches")
    small = min(min(base.shapes[e.target][-2:]) for e in chosen)
    if rank > small:
        raise ValueError(f"--rank {rank} exceeds the smallest targeted weight's dimension ({small})")
    modules, report = [], {"rank": rank, "weights": {}, "layers": {}, "unchanged": [], "not_carried": {}}
    stacks: dict = {}  # (layer, w) -> per-expert (A, B, kept)
    t0, last_layer = time.time(), None
    for e in order:
        te = tuned_entries[(e.target, e.slot)]
        if id(e) not in chosen_ids:
            diff = differs(base.files, e, tuned.files, te)
            if diff > 0:
                report["not_carried"][e.target] = diff
            continue
        delta = read_entry(tuned.files, te).to(device, torch.float32) - read_entry(base.files, e).to(device,
                                                                                                   torch.float32)
        path = e.target.removesuffix(".weight")
        if e.slot is not None:  # Mixtral experts: every expert of a stack keeps its module (PEFT fuses them)
            a, b, kept = truncated_svd(delta, rank)
            stacks.setdefault((int(e.target.split(".")[1]), e.target.rpartition(".")[2]), {})[e.slot] = (a, b, kept)
        elif not delta.any():
            report["unchanged"].append(path)
            continue
        else:
            a, b, kept = truncated_svd(delta, rank)
            m = peft_module(path, a, b, a.shape[0], 1.0, args)
            modules.append(m)
            report["weights"][m.hf] = kept
        layer = path.split(".")[1] if path.startswith("layers.") else path
        if layer != last_layer:
            log(f"  {path} ({time.time() - t0:.1f}s)")
            last_layer = layer
    for (layer, w), per in sorted(stacks.items()):
        a = torch.stack([per[i][0] for i in range(len(per))])
        b = torch.stack([per[i][1] for i in range(len(per))])
        for i, m in enumerate(expert_modules(layer, w, a, b, a.shape[1], 1.0)):
            modules.append(m)
            report["weights"][m.hf] = per[i][2]
    return modules, report


def layer_summary(report: dict, log=print) -> None:
    """Per layer: the mean fraction of energy kept over its weights, and the worst weight."""
    per_layer: dict = {}
    for name, kept in report["weights"].items():
        key = name.split(".")[2] if name.startswith("model.layers.") else name
        per_layer.setdefault(key, []).append((kept, name))
    for key, items in sorted(per_layer.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 1 << 30):
        mean = sum(k for k, _ in items) / len(items)
        worst, worst_name = min(items)
        report["layers"][key] = mean
        where = f"layer {key}" if key.isdigit() else key
        log(f"{where}: {mean:.2%} of the delta's energy kept on average, worst {worst:.2%} "
            f"({worst_name.split('.', 3)[-1] if key.isdigit() else worst_name})")
    for name, diff in report["not_carried"].items():
        log(f"warning: {name} differs (max |delta| {diff:.3g}) but no LoRA target holds it: the adapter does not "
            "carry that change")


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_overlap("--out", args.out, {"--base": args.base, "--tuned": args.tuned})
    check_dir_writable(args.out, args.overwrite, "--out")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"--device {args.device}: {e}") from None
    t0 = time.time()
    base, tuned = plan_checkpoint(args.base), plan_checkpoint(args.tuned)
    check_same_architecture(base, tuned)
    print(f"extracting rank {args.rank} from {tuned.dir} - {base.dir} ({base.args.family}, "
          f"{base.args.n_layers} layers) on {device}", flush=True)
    modules, report = extract(base, tuned, args.rank, args.targets, device, log=lambda s: print(s, flush=True))
    if not modules:
        raise ValueError(f"--tuned {tuned.dir} equals --base {base.dir} on every targeted weight: nothing to extract")
    layer_summary(report, log=lambda s: print(s, flush=True))
    from ..lora.peft import peft_config, write_adapter
    write_adapter(args.out, modules, peft_config(modules, str(base.dir)), overwrite=args.overwrite,
                  extra_files={"extraction_report.json": report})
    print(f"wrote {args.out}: {len(modules)} modules, rank {args.rank} ({time.time() - t0:.1f}s)", flush=True)
    return 0


def cli(argv=None) -> int:
    """main with user errors as one line on stderr and exit code 1."""
    return run(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())

"""The trainer's --compile (training.fsdp.compile_blocks): compiled blocks give the eager model's loss and gradients
with and without activation checkpointing, packed rows with new document spans do not recompile, and cached
(generation) forwards stay eager."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from minillama.lora.layers import apply_lora, lora_parameters
from minillama.training.fsdp import checkpoint_activations, compile_blocks
from minillama.training.loss import CausalLMLoss
from helpers import TINY_ARGS, tiny_model

V = TINY_ARGS["vocab_size"]


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def packed(T: int, cuts: list[int]) -> torch.Tensor:
    doc = torch.zeros(2, T, dtype=torch.long)
    for c in cuts:
        doc[:, c:] += 1
    return doc


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compiled_blocks_equal_eager_and_packed_rows_do_not_recompile(checkpointed):
    torch._dynamo.reset()
    eager = tiny_model(family="llama3").train()
    apply_lora(eager, 4, 8.0, 0.0, targets=["all-linear"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(eager):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B off zero: the adapter path carries gradient
    compiled = copy.deepcopy(eager)
    compile_blocks(compiled)
    if checkpointed:
        checkpoint_activations(eager)
        checkpoint_activations(compiled)
    roots = CausalLMLoss(eager), CausalLMLoss(compiled)
    T = TINY_ARGS["max_seq_len"]
    batches = [None, packed(T, [10, 40]), packed(T, [5, 17, 50])]  # a plain row, then two different packings
    seen = []
    for doc_ids in batches:
        tok = torch.randint(0, V, (2, T), generator=g)
        tgt = torch.roll(tok, -1, 1)
        losses = []
        for root in roots:
            loss, _ = root(tok, tgt, doc_ids=doc_ids)
            loss.backward()
            losses.append(loss.item())
        seen.append(graphs())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.requires_grad:
                assert (b.grad - a.grad).abs().max() <= 1e-4 * a.grad.abs().max(), name  # relative to the largest
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
    assert seen[0] >= 1  # the blocks did compile
    assert seen[2] == seen[1]  # new document spans: no new graph (their attention runs between graphs)

    # a cached forward (generation during training) runs the eager blocks: no new graph, same logits
    for m in (eager, compiled):
        m.setup_cache(1, T)
    with torch.no_grad():
        prompt = torch.randint(0, V, (1, 6), generator=g)
        want, got = eager(prompt, start_pos=0), compiled(prompt, start_pos=0)
    assert graphs() == seen[2]
    torch.testing.assert_close(got, want)

"""Packed and long rows without a (T, T) mask: per-document SDPA and blocked attention equal the dense-mask
reference (outputs and gradients, sliding window included), and a 4K packed row's forward + backward allocates no
tensor anywhere near T x T elements (checked on every op, and shown to catch the dense mask)."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import tiny_model
from minillama import attention
from minillama.blocked_attention import blocked_attention, plan_keys


def dense_packed_mask(doc_ids, sliding_window=None, half_precision=False):
    """The dense (B, 1, T, T) mask packed rows used to get: the reference."""
    T = doc_ids.shape[1]
    q = torch.arange(T, device=doc_ids.device)
    allowed = (q[None, :] <= q[:, None])[None] & (doc_ids[:, :, None] == doc_ids[:, None, :])
    if sliding_window is not None:
        allowed &= (q[:, None] - q[None, :] < sliding_window)[None]
    return attention.AttnMask(causal_only=False, mask=allowed[:, None])


class LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def packed_row(T, lengths):
    assert sum(lengths) == T
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0)), doc_ids


def largest_in_train_step(model, tokens, doc_ids):
    with LargestTensor() as mode:
        model(tokens, doc_ids=doc_ids, return_hidden=True).square().mean().backward()
    return mode.largest


@pytest.mark.parametrize("window", [None, 512])
def test_4k_packed_row_forward_backward_allocates_nothing_like_t_by_t(window, monkeypatch):
    T = 4096
    torch.set_num_threads(1)
    model = tiny_model(max_seq_len=T, sliding_window=window).train()
    tokens, doc_ids = packed_row(T, [1000, 2000, 1096])
    largest = largest_in_train_step(model, tokens, doc_ids)
    # what is left: T x vocab logits (1M), blocked attention's 512 x 512 score blocks per head (1M); a T x T mask
    # alone is 16.7M elements (times the heads once SDPA expands it)
    assert largest <= T * T // 16, largest
    # the check does catch a dense mask
    monkeypatch.setattr(attention, "packed_mask", dense_packed_mask)
    import minillama.model as model_module
    monkeypatch.setattr(model_module, "packed_mask", dense_packed_mask)
    assert largest_in_train_step(model, tokens, doc_ids) >= T * T


@pytest.mark.parametrize("overrides", [{}, {"sliding_window": 6}, {"n_experts": 4, "n_experts_per_tok": 2}])
def test_packed_rows_equal_the_dense_mask_reference_with_gradients(overrides, monkeypatch):
    """Several rows, documents longer and shorter than the window, one-token documents."""
    model = tiny_model(**overrides).train()
    doc_ids = torch.tensor([[0] * 9 + [1] * 1 + [2] * 14, [0] * 3 + [1] * 17 + [2] * 4])
    tokens = torch.randint(0, 256, doc_ids.shape, generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        out = model(tokens, doc_ids=doc_ids)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got, got_grads = run()
    import minillama.model as model_module
    monkeypatch.setattr(model_module, "packed_mask", dense_packed_mask)
    want, want_grads = run()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_long_row_with_sliding_window_equals_dense_reference():
    """An unpacked row longer than the window (Mistral) also goes through blocked attention."""
    model = tiny_model(sliding_window=5)
    tokens = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(2))
    mask = attention.packed_mask(torch.zeros_like(tokens), 5)
    assert mask.plan is not None and mask.mask is None
    with torch.no_grad():
        got = model(tokens)
        import minillama.model as model_module
        orig = model_module.packed_mask
        model_module.packed_mask = dense_packed_mask
        try:
            want = model(tokens)
        finally:
            model_module.packed_mask = orig
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 9])
def test_blocked_attention_equals_masked_sdpa_for_a_subset_of_queries(window):
    """Queries that are two separate chunks of the row (what context parallelism holds), GQA, tiny blocks."""
    torch.manual_seed(0)
    B, H, K, S, D = 2, 4, 2, 40, 8
    doc_ids = torch.tensor([[0] * 13 + [1] * 27, [0] * 30 + [1] * 10])
    q_pos = list(range(5, 15)) + list(range(28, 40))
    q = torch.randn(B, H, len(q_pos), D, dtype=torch.float64).float().requires_grad_()
    k = torch.randn(B, K, S, D).requires_grad_()
    v = torch.randn(B, K, S, D).requires_grad_()
    starts = [min(next(j for j in range(S) if doc_ids[b, j] == doc_ids[b, i]) for b in range(B)) for i in q_pos]
    first = [max(s, i - window + 1) if window else s for s, i in zip(starts, q_pos)]
    plan = plan_keys(q_pos, list(range(S)), first, "cpu", doc_ids[:, q_pos], doc_ids, window, block=7)
    out = blocked_attention(q, k, v, plan)
    full = dense_packed_mask(doc_ids, window).mask[:, :, q_pos]  # (B, 1, Tq, S)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=full)
    g = torch.randn_like(ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # whole key blocks outside every query's view are skipped, not computed and masked
    assert sum(len(kb) for _, _, kb in plan.blocks) < len(plan.blocks) * -(-S // 7)

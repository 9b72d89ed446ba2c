"""Properties of the bare model: packed == separate documents, cached decode == full forward, MoE dispatch, SwiGLU's
gate keeps only its inputs."""

import pytest
import torch

from minillama import ModelArgs
from minillama.attention import CacheStep
from minillama.moe import Experts, load_balancing_loss, route
from helpers import tiny_model


@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "n_experts_per_tok": 2},
                                       {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 16}}])
@torch.no_grad()
def test_packed_row_equals_each_document_alone(overrides):
    model = tiny_model(**overrides)
    lengths = [5, 11, 1, 7]
    docs = [torch.randint(0, 256, (n,)) for n in lengths]
    tokens = torch.cat(docs)[None]  # (1, 24)
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    packed = model(tokens, doc_ids=doc_ids)[0]
    alone = torch.cat([model(d[None])[0] for d in docs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # and without doc_ids attention would leak: the logits of later docs change
    leaky = model(tokens)[0]
    assert (leaky[5:] - alone[5:]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "n_experts_per_tok": 2}, {"sliding_window": 6}])
@torch.no_grad()
def test_cached_prefill_and_decode_equal_full_forward(overrides):
    model = tiny_model(**overrides)
    tokens = torch.randint(0, 256, (2, 20))
    full = model(tokens)
    model.setup_cache(max_batch_size=2, max_seq_len=32)
    parts = [model(tokens[:, :12], start_pos=0)]
    parts += [model(tokens[:, 12:15], start_pos=12)]  # a chunk
    parts += [model(tokens[:, i:i + 1], start_pos=i) for i in range(15, 20)]  # one token at a time
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_left_padded_rows_equal_unpadded():
    model = tiny_model()
    a, b = torch.randint(0, 256, (9,)), torch.randint(0, 256, (4,))
    batch = torch.stack([a, torch.cat([torch.zeros(5, dtype=torch.long), b])])  # b left-padded to 9
    pad_lens = torch.tensor([0, 5])
    model.setup_cache(max_batch_size=2, max_seq_len=16)
    out = model(batch, start_pos=CacheStep(0, pad_lens))
    nxt = torch.randint(0, 256, (2, 1))
    step = model(nxt, start_pos=CacheStep(9, pad_lens))
    model.clear_cache()
    torch.testing.assert_close(out[0], model(a[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 5:], model(b[None])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1, 0], model(torch.cat([b, nxt[1]])[None])[0, -1], atol=1e-5, rtol=1e-5)


def test_moe_dispatch_equals_dense_reference(monkeypatch):
    torch.manual_seed(0)
    experts = Experts(n_experts=6, dim=16, hidden_dim=24)
    x = torch.randn(40, 16)
    logits = torch.randn(40, 6)
    weights, idx = route(logits, top_k=2)
    out = experts(x, weights, idx)
    monkeypatch.setattr(Experts, "grouped_ok", lambda self, x: False)  # the per-expert loop (e.g. GPU fp32)
    torch.testing.assert_close(experts(x, weights, idx), out, atol=1e-5, rtol=1e-5)
    # dense reference: every expert on every token, then pick
    every = torch.stack([experts.expert_forward(e, x) for e in range(6)], dim=1)  # (N, E, D)
    ref = (every.gather(1, idx[:, :, None].expand(-1, -1, 16)) * weights[:, :, None]).sum(1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # softmax over the chosen two only
    torch.testing.assert_close(weights.sum(-1), torch.ones(40))


def test_load_balancing_loss_matches_transformers():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    logits = [torch.randn(30, 8) for _ in range(3)]
    ours = load_balancing_loss(logits, n_experts=8, top_k=2)
    ref = mixtral.load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2)
    torch.testing.assert_close(ours, ref)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :4] = 0
    ours_m = load_balancing_loss(logits, 8, 2, token_mask=mask.flatten())
    ref_m = mixtral.load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2, attention_mask=mask)
    torch.testing.assert_close(ours_m, ref_m)


def test_presets_have_real_shapes():
    assert ModelArgs.from_name("llama3-8b").hidden_dim == 14336
    assert ModelArgs.from_name("llama2-70b").hidden_dim == 28672
    assert ModelArgs.from_name("llama-33b").hidden_dim == 17920
    assert ModelArgs.from_name("llama3.1-405b").hidden_dim == 53248
    assert ModelArgs.from_name("llama3.2-1b").hidden_dim == 8192
    assert ModelArgs.from_name("mixtral-8x22b").head_dim == 128
    with pytest.raises(ValueError, match="valid names: .*llama3-8b"):
        ModelArgs.from_name("llama4")


def test_varlen_path_equals_dense_mask(monkeypatch):
    """The GPU varlen route (flattened B*T with cu_seqlens) gives the dense-mask result; the kernel is mocked on CPU."""
    from minillama import attention

    def reference_varlen(q, k, v, cu_seqlens, max_seqlen):  # (N, H, D): plain causal SDPA per document
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        outs = []
        for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            o = torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 3 + [2] * 6])  # (B=2, T=12)
    assert attention.doc_cu_seqlens(doc_ids).tolist() == [0, 5, 12, 15, 18, 24]
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8)  # (B, H|K, T, D)
    dense = attention.attend(q, k, v, attention.packed_mask(doc_ids))
    monkeypatch.setattr(attention, "has_varlen_kernel", lambda device: True)
    monkeypatch.setattr(attention, "varlen_causal", reference_varlen)
    mask = attention.packed_mask(doc_ids, half_precision=True)
    assert mask.cu_seqlens is not None and mask.max_seqlen == 7
    torch.testing.assert_close(attention.attend(q, k, v, mask), dense, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_casting_the_model_keeps_rope_frequencies_float32():
    model = tiny_model(rope_theta=500000.0)
    ref = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, ref)


@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "n_experts_per_tok": 2}])
@torch.no_grad()
def test_tensor_start_pos_decodes_over_the_whole_cache(overrides):
    """The compile-friendly path (0-d tensor start_pos, attention over the full fixed cache) equals eager decode."""
    model = tiny_model(**overrides)
    tokens = torch.randint(0, 256, (2, 10))
    pad_lens = torch.tensor([0, 3])
    model.setup_cache(2, 24)
    eager = [model(tokens[:, :6], start_pos=CacheStep(0, pad_lens))[:, -1]]
    eager += [model(tokens[:, i:i + 1], start_pos=CacheStep(i, pad_lens))[:, -1] for i in range(6, 10)]
    model.setup_cache(2, 24)
    static = [model(tokens[:, :6], start_pos=CacheStep(0, pad_lens))[:, -1]]
    pos = torch.tensor(6)
    for i in range(6, 10):
        static.append(model(tokens[:, i:i + 1], start_pos=CacheStep(pos, pad_lens))[:, -1])
        pos += 1
    torch.testing.assert_close(torch.stack(static), torch.stack(eager), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "n_experts_per_tok": 2}, {"sliding_window": 5},
                                       {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_seq_len": 16}])
@torch.no_grad()
def test_packed_cache_step_equals_each_row_alone(overrides):
    """Several rows' next tokens packed into one row without padding (CacheStep.packed: prompts prefilled together):
    rows at slot 0 and rows that continue what their cache holds, in any row order, equal each row alone; the
    slots a span does not write keep what they held."""
    model = tiny_model(**overrides)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (9, 3, 12, 1)]  # seqs[r] for cache row r
    held = [0, 2, 5, 0]  # what each row holds before the packed forward (its first tokens, prefilled alone)
    model.setup_cache(5, 24)
    for r, n in enumerate(held):
        if n:
            model(seqs[r][None, :n], start_pos=CacheStep(0, rows=torch.tensor([r])))
    model(torch.randint(0, 256, (1, 20), generator=g), start_pos=CacheStep(0, rows=torch.tensor([4])))  # bystander
    before = model.layers[0].attention.cache.k[4].clone()
    order = [2, 0, 3, 1]  # spans in any row order
    tokens = torch.cat([seqs[r][held[r]:] for r in order])[None]  # (1, N)
    packed = model(tokens, start_pos=CacheStep.packed([(r, held[r], len(seqs[r]) - held[r]) for r in order]))[0]
    torch.testing.assert_close(model.layers[0].attention.cache.k[4], before, atol=0, rtol=0)
    model.clear_cache()
    offset = 0
    for r in order:
        n = len(seqs[r]) - held[r]
        alone = model(seqs[r][None])[0, held[r]:]  # (n, V)
        torch.testing.assert_close(packed[offset:offset + n], alone, atol=1e-5, rtol=1e-5)
        offset += n
    with pytest.raises(ValueError, match="distinct rows"):
        CacheStep.packed([(0, 0, 2), (0, 2, 1)])


def test_span_attention_repeating_kv_heads_equals_grouped_heads():
    """The GPU's way (a masked span's k/v repeated to every query head, for CUDA's masked kernels) equals the CPU's
    (grouped heads, enable_gqa), on CPU."""
    from minillama.attention import span_attention, span_mask
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 4, 9, 8, generator=g)  # (1, H, N, D): spans of 5 and 4 queries
    k, v = torch.randn(3, 2, 20, 8, generator=g), torch.randn(3, 2, 20, 8, generator=g)  # cache (B, K, S, D)
    spans = span_mask(((2, 7, 5), (0, 0, 4)), "cpu").spans  # row 2 continues at slot 7, row 0 starts at 0
    grouped = span_attention(q, k, v, spans, repeat_kv=False)
    torch.testing.assert_close(span_attention(q, k, v, spans, repeat_kv=True), grouped, atol=1e-6, rtol=1e-6)
    full = k.repeat_interleave(2, 1)[2:3, :, :12], v.repeat_interleave(2, 1)[2:3, :, :12]  # row 2's 12 slots
    mask = torch.arange(12)[None] <= 7 + torch.arange(5)[:, None]
    torch.testing.assert_close(grouped[:, :, :5], torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :5], *full, attn_mask=mask), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("overrides", [{}, {"n_experts": 4, "n_experts_per_tok": 2}, {"sliding_window": 5}])
@torch.no_grad()
def test_per_row_start_pos_and_cache_rows_equal_each_row_alone(overrides):
    """Rows prefilled one at a time into chosen cache rows, then decoded together at their own slots."""
    model = tiny_model(**overrides)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=g) for n in (9, 4, 6)]  # seqs[r] lives in cache row r
    new = torch.randint(0, 256, (3, 3), generator=g)  # three decode steps per row
    model.setup_cache(3, 24)
    model(torch.randint(0, 256, (1, 15), generator=g), start_pos=CacheStep(0, rows=torch.tensor([1])))  # stale keys
    prefill = {}
    for r in (2, 0, 1):  # out of order; row 1's shorter prompt must hide the stale slots 4..14
        prefill[r] = model(seqs[r][None], start_pos=CacheStep(0, rows=torch.tensor([r])))[0]
    lens = torch.tensor([len(s) for s in seqs])
    step0 = model(new[:, :1], start_pos=lens)[:, -1]  # (3, V): forward row r = cache row r
    order = torch.tensor([2, 0, 1])
    step1 = model(new[order, 1:2], start_pos=CacheStep(lens[order] + 1, rows=order))[:, -1]  # a permutation
    pair = torch.tensor([1, 2])
    step2 = model(new[pair, 2:3], start_pos=CacheStep(lens[pair] + 2, rows=pair))[:, -1]  # a subset of the rows
    model.clear_cache()
    for r, s in enumerate(seqs):
        alone = model(torch.cat([s, new[r]])[None])[0]  # (len + 3, V)
        n = len(s)
        torch.testing.assert_close(prefill[r], alone[:n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step0[r], alone[n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step1[order.tolist().index(r)], alone[n + 1], atol=1e-5, rtol=1e-5)
        if r in pair.tolist():
            torch.testing.assert_close(step2[pair.tolist().index(r)], alone[n + 2], atol=1e-5, rtol=1e-5)


def test_family_detection_is_one_rule_for_every_reader(tmp_path):
    """A Llama 2 params.json / config.json is "llama2" for the model args and for the tokenizer alike."""
    import json

    from minillama.args import detect_family, from_hf_config, from_meta_params
    from minillama.tokenizer.tokenizer import load_tokenizer
    from helpers import train_tiny_spm

    llama2 = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 256, "norm_eps": 1e-5, "vocab_size": 32000}
    hf_llama2 = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "intermediate_size": 96, "vocab_size": 32000}
    cases = [(llama2, "meta", "llama2"), ({**llama2, "rope_theta": 1e6}, "meta", "codellama"),
             ({**llama2, "vocab_size": 128256}, "meta", "llama3"),
             ({**llama2, "head_dim": 16, "hidden_dim": 96}, "meta", "mistral"),
             ({**llama2, "moe": {"num_experts": 8}}, "meta", "mixtral"),
             (hf_llama2, "hf", "llama2"), ({**hf_llama2, "vocab_size": 49152}, "hf", "llama"),
             ({**hf_llama2, "rope_parameters": {"rope_theta": 1e6}}, "hf", "codellama"),
             ({**hf_llama2, "model_type": "mistral"}, "hf", "mistral")]
    for config, kind, family in cases:
        assert detect_family(config, kind) == family, (config, kind)
    assert from_meta_params(llama2).family == from_hf_config(hf_llama2).family == "llama2"
    for name, config in (("params.json", llama2), ("config.json", hf_llama2)):
        d = tmp_path / name.split(".")[0]
        d.mkdir()
        train_tiny_spm(d)
        (d / name).write_text(json.dumps(config))
        assert load_tokenizer(d).family == "llama2", name


def test_swiglu_gate_keeps_only_its_inputs_and_gives_autograds_exact_gradients():
    from minillama.swiglu import silu_mul
    from minillama.training.metrics import SavedActivations
    torch.manual_seed(0)
    a, b = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24, requires_grad=True)
    g = torch.randn(5, 24)
    saved = SavedActivations()
    with saved:
        ours = silu_mul(a * 1.0, b * 1.0)
    ref = torch.nn.functional.silu(a) * b
    assert torch.equal(ours, ref) and saved.bytes == 2 * a.numel() * 4  # a and b; not silu(a) too
    assert all(torch.equal(x, y) for x, y in zip(torch.autograd.grad(ours, (a, b), g),
                                                 torch.autograd.grad(ref, (a, b), g)))

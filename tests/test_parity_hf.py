"""ours == HF: tiny random transformers models saved to disk, loaded with load_model, same logits on random tokens.
The Meta/Mistral consolidated checkpoints are made from the HF model by the independent conversion in helpers.py."""

import pytest
import torch

pytest.importorskip("transformers")

from helpers import hf_logits, random_tokens, tiny_hf, train_tiny_spm, write_meta_dir  # noqa: E402

from minillama import load_model  # noqa: E402

ATOL = 1e-4

CASES = {
    "llama2_mha": ("llama", dict(num_key_value_heads=4)),
    "llama3_gqa": ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    "codellama": ("llama", dict(num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(sliding_window=8)),
    "mixtral": ("mixtral", dict()),
}


def assert_same_logits(ours, hf_model, T=24, seed=1):
    tokens = random_tokens(hf_model.config.vocab_size, T=T, seed=seed)
    with torch.no_grad():
        got = ours(tokens)
    want = hf_logits(hf_model, tokens)
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= ATOL, f"max |ours - HF| = {diff}"
    assert want.abs().max() > 1.0  # the weights are large enough that a wrong mapping would show


@pytest.mark.parametrize("case", list(CASES))
def test_hf_checkpoint_matches_transformers(case, tmp_path):
    kind, cfg = CASES[case]
    hf = tiny_hf(kind, **cfg)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert not ours.training
    assert ours.args.n_experts == (8 if kind == "mixtral" else 0)
    if case == "tied":
        assert ours.args.tie_embeddings and ours.output.weight is ours.tok_embeddings.weight
    assert_same_logits(ours, hf)


def test_mixtral_fused_transformers5_layout(tmp_path):
    hf = tiny_hf("mixtral", seed=3)
    hf.save_pretrained(tmp_path, save_original_format=False)  # mlp.experts.gate_up_proj / down_proj
    from safetensors import safe_open
    keys = set(safe_open(str(tmp_path / "model.safetensors"), "pt").keys())
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys
    assert_same_logits(load_model(tmp_path), hf)


ROPE = {
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 500000.0},
}


@pytest.mark.parametrize("kind", list(ROPE))
def test_rope_scaling_beyond_original_context(kind, tmp_path):
    # linear/dynamic scale from max_position_embeddings; yarn/llama3 from original_max_position_embeddings
    max_pos = 16 if kind in ("linear", "dynamic") else 64
    hf = tiny_hf("llama", max_position_embeddings=max_pos, rope_parameters=ROPE[kind])
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.args.rope_scaling["rope_type"] == kind
    assert_same_logits(ours, hf, T=48)


def test_sharded_hf_checkpoint_with_index(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    assert_same_logits(load_model(tmp_path), hf)


def test_pytorch_model_bin(tmp_path):
    hf = tiny_hf("llama", num_key_value_heads=4)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path)
    assert_same_logits(load_model(tmp_path / "pytorch_model.bin"), hf)  # a file inside the dir is accepted


# ---- through Meta / Mistral consolidated files made by the independent conversion ----

def test_meta_llama2_two_model_parallel_shards(tmp_path):
    spm = train_tiny_spm(tmp_path)  # Llama 1/2: params.json says vocab_size -1; the tokenizer knows
    import sentencepiece
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm)).GetPieceSize()
    hf = tiny_hf("llama", num_key_value_heads=4, vocab_size=vocab)
    meta = write_meta_dir(hf, tmp_path / "meta", n_shards=2, vocab_split=False, vocab_size=-1)
    spm.rename(meta / "tokenizer.model")
    assert sorted(p.name for p in meta.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    ours = load_model(meta)
    assert ours.args.vocab_size == vocab
    assert_same_logits(ours, hf)


def test_meta_llama3_two_model_parallel_shards(tmp_path):
    hf = tiny_hf("llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    meta = write_meta_dir(hf, tmp_path / "meta", n_shards=2, vocab_split=True)  # embedding split on rows
    shard0 = torch.load(meta / "consolidated.00.pth", weights_only=True)
    assert shard0["tok_embeddings.weight"].shape == (150, 64) and shard0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert_same_logits(load_model(meta / "consolidated.00.pth"), hf)


@pytest.mark.parametrize("layout", ["mistral_safetensors", "stacked_pth"])
def test_mixtral_consolidated(layout, tmp_path):
    hf = tiny_hf("mixtral", seed=5)
    if layout == "mistral_safetensors":  # mistral-inference: feed_forward.experts.E.w1.weight
        meta = write_meta_dir(hf, tmp_path / "meta", safetensors=True)
    else:  # the first Mixtral release: block_sparse_moe.w1 (E*F, D), w2 stored transposed
        meta = write_meta_dir(hf, tmp_path / "meta", stacked_experts=True)
    ours = load_model(meta)
    assert ours.args.family == "mixtral" and ours.args.n_experts == 8
    assert_same_logits(ours, hf)

"""load_model / save_hf properties: saved HF dirs load in transformers with the same logits, dtype is kept, loading
a bf16 checkpoint never makes float32 weights, and every bad input fails with a message naming the file and problem."""

import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from helpers import hf_logits, random_tokens, read_safetensors_dir, tiny_hf, write_meta_dir  # noqa: E402

from minillama import load_model, save_hf  # noqa: E402
from minillama.checkpoints import save_meta  # noqa: E402


def _same_logits(ours, hf_model, T=48):  # past original_max_position_embeddings (16) of the scaled-RoPE case
    tokens = random_tokens(hf_model.config.vocab_size, T=T)
    with torch.no_grad():
        diff = (ours(tokens) - hf_logits(hf_model, tokens)).abs().max().item()
    assert diff <= 1e-4, diff


# ---- save_hf ----

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0}


@pytest.mark.parametrize("kind,cfg", [("llama", {}), ("llama", {"tie_word_embeddings": True}),
                                      ("llama", {"rope_parameters": YARN}),
                                      ("mistral", {"sliding_window": 8}), ("mixtral", {})])
def test_save_hf_loads_in_transformers_with_same_logits(kind, cfg, tmp_path):
    import transformers
    src = tiny_hf(kind, **cfg)
    src.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").write_text("{}")
    ours = load_model(tmp_path / "src")
    out = save_hf(ours, tmp_path / "out", tokenizer_src=tmp_path / "src", max_shard_size="200KB")
    assert (out / "tokenizer_config.json").is_file() and (out / "generation_config.json").is_file()
    assert (out / "model.safetensors.index.json").is_file()  # above max_shard_size: sharded with an index
    keys = set(read_safetensors_dir(out))
    assert ("lm_head.weight" in keys) == (not cfg.get("tie_word_embeddings"))
    if kind == "mixtral":  # the hub's per-expert layout
        assert "model.layers.0.block_sparse_moe.experts.7.w2.weight" in keys
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == type(src).__name__
    _same_logits(ours, reloaded)
    _same_logits(load_model(out), src)
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temp dir was moved into place


def test_save_hf_keeps_bf16_on_disk(tmp_path):
    from safetensors import safe_open
    tiny_hf("llama").save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src", dtype=torch.bfloat16)
    out = save_hf(model, tmp_path / "out")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_save_hf_refuses_lora_like_extra_tensors_and_existing_dirs(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path / "src")
    model = load_model(tmp_path / "src")
    with pytest.raises(FileExistsError, match="not empty"):
        save_hf(model, tmp_path / "src")
    model.layers[0].attention.wq.lora_A = torch.nn.Parameter(torch.zeros(4, 64))
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.lora_A.*merge_lora"):
        save_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- memory / dtype ----

def test_bf16_checkpoint_loads_without_float32_copies(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode
    hf = tiny_hf("mixtral").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    big = min(p.numel() for p in hf.parameters())  # no weight is smaller than a norm vector

    class FloatWatch(TorchDispatchMode):
        """Records every float32 tensor at least as big as a weight that any op creates."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.dtype == torch.float32 \
                        and t.numel() >= big:
                    self.seen.append((str(func), tuple(t.shape)))
            return out

    with FloatWatch() as watch:
        model = load_model(tmp_path, dtype=torch.bfloat16)
    assert watch.seen == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    kept = load_model(tmp_path, dtype=None)
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    as_f32 = load_model(tmp_path)  # the default is float32
    assert {p.dtype for p in as_f32.parameters()} == {torch.float32}
    # the watcher does see float32 work when it happens
    with FloatWatch() as watch:
        load_model(tmp_path, dtype=torch.float32)
    assert watch.seen


def test_max_seq_len_override(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path)
    assert load_model(tmp_path).args.max_seq_len == 64
    assert load_model(tmp_path, max_seq_len=512).args.max_seq_len == 512


# ---- bad input ----

@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    tiny_hf("llama").save_pretrained(d)
    return d


def _rewrite_safetensors(path, edit):
    from safetensors.torch import load_file, save_file
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


def test_error_index_names_missing_shard(tmp_path):
    tiny_hf("llama").save_pretrained(tmp_path, max_shard_size="100KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=rf"model\.safetensors\.index\.json names shard file\(s\) {re.escape(victim.name)}"):
        load_model(tmp_path)


def test_error_missing_model_parallel_shard(tmp_path):
    meta = write_meta_dir(tiny_hf("llama", num_key_value_heads=4), tmp_path / "meta", n_shards=4)
    (meta / "consolidated.01.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"consolidated\.01\.pth missing"):
        load_model(meta)


def _saved(hf, d):
    hf.save_pretrained(d)
    return d


def test_error_unknown_format(tmp_path):
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf("llama").config.to_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_error_shape_mismatch_names_key_expected_and_got(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.\d\.mlp\.\w+_proj\.weight has "
                                         r"shape \[\d+, \d+\], expected \[\d+, \d+\]"):
        load_model(hf_dir)


def test_error_unknown_tensors_listed(hf_dir):
    _rewrite_safetensors(hf_dir / "model.safetensors", lambda sd: sd.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"not part of a Llama model: model\.extra\.weight"):
        load_model(hf_dir)


def test_error_missing_tensors_listed(hf_dir, tmp_path):
    _rewrite_safetensors(hf_dir / "model.safetensors", lambda sd: sd.pop("model.layers.1.self_attn.v_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\) the config needs: layers\.1\.attention\.wv\.weight"):
        load_model(hf_dir)
    mix = _saved(tiny_hf("mixtral"), tmp_path / "mix")
    _rewrite_safetensors(mix / "model.safetensors",
                         lambda sd: sd.pop("model.layers.0.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(ValueError, match=r"layers\.0\.feed_forward\.experts\.w2 \(experts \[3\]\)"):
        load_model(mix)


def test_error_truncated_files_named(hf_dir, tmp_path):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read checkpoint file .*model\.safetensors \(truncated"):
        load_model(hf_dir)
    meta = write_meta_dir(tiny_hf("llama"), tmp_path / "meta")
    pth = meta / "consolidated.00.pth"
    data = pth.read_bytes()
    pth.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"could not read checkpoint file .*consolidated\.00\.pth \(truncated"):
        load_model(meta)


def test_save_meta_shards_split_on_the_right_dims(tmp_path):
    tiny_hf("llama", num_key_value_heads=4).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    out = save_meta(model, tmp_path / "meta", n_shards=2)
    s0 = torch.load(out / "consolidated.01.pth", weights_only=True)
    assert s0["layers.0.attention.wq.weight"].shape == (32, 64)  # column-parallel: rows
    assert s0["layers.0.attention.wo.weight"].shape == (64, 32)  # row-parallel: columns
    assert s0["layers.0.feed_forward.w2.weight"].shape == (64, 48)
    assert s0["tok_embeddings.weight"].shape == (300, 32)  # Llama 1/2: split on the model dim
    assert s0["norm.weight"].shape == (64,)
    torch.testing.assert_close(s0["layers.1.attention.wo.weight"], model.layers[1].attention.wo.weight[:, 32:])
    reloaded = load_model(out)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k


def test_meta_params_round_trip_llama31_rope_and_refuse_what_params_json_cannot_say(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    tiny_hf("llama", max_position_embeddings=131072, rope_parameters=rope).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    out = save_meta(model, tmp_path / "meta")
    params = json.loads((out / "params.json").read_text())
    assert params["use_scaled_rope"] is True and params["rope_theta"] == 500000.0
    back = load_model(out)
    assert back.args.rope_scaling == model.args.rope_scaling and back.args.hidden_dim == 96
    model.args.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="params.json cannot express rope_scaling"):
        save_meta(model, tmp_path / "meta2")
    assert not (tmp_path / "meta2").exists()


def test_save_hf_copies_tokenizer_and_takes_bos_eos_from_it(tmp_path):
    import sentencepiece
    from helpers import train_tiny_spm
    spm = train_tiny_spm(tmp_path)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
    tiny_hf("llama", vocab_size=sp.GetPieceSize()).save_pretrained(tmp_path / "hf")
    out = save_hf(load_model(tmp_path / "hf"), tmp_path / "out", tokenizer_src=spm)  # a file means its dir
    assert (out / "tokenizer.model").read_bytes() == spm.read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (sp.bos_id(), sp.eos_id())


def test_error_json_that_is_not_an_object_or_has_no_weight_map(hf_dir, tmp_path):
    cfg = (hf_dir / "config.json").read_text()
    (hf_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, found a JSON list"):
        load_model(hf_dir)
    (hf_dir / "config.json").write_text(cfg)
    (hf_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: expected a non-empty 'weight_map'"):
        load_model(hf_dir)
    meta = write_meta_dir(tiny_hf("llama"), tmp_path / "meta")
    (meta / "params.json").write_text('"dim"')
    with pytest.raises(ValueError, match=r"params\.json: expected a JSON object, found a JSON str"):
        load_model(meta)

"""GGUF export (minillama/checkpoints/gguf_export.py): what llama.cpp's converter writes, and read back by our loader.

Round trips go export -> minillama's GGUF reader (checkpoints/gguf.py) -> a model. f16/bf16 store each weight
rounded once, so the read-back model equals the original with its weights rounded the same way (to float32
rounding); q8_0/q4_0 logits equal the original with each weight quantized and dequantized by gguf's quants, and the
weights' error is the quantization's: relative RMS <= 0.01 for q8_0 (measured ~0.004), <= 0.12 for q4_0 (~0.09).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import MOE_ARGS, random_tokens, tiny_model, train_tiny_spm

gguf = pytest.importorskip("gguf")

from minillama.checkpoints import load_model  # noqa: E402
from minillama.checkpoints.gguf import hf_config, hf_state_dict, open_gguf, read_metadata  # noqa: E402
from minillama.checkpoints.gguf_export import export_gguf, gguf_tensor_name, tensor_type  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SITE = Path(torch.__file__).parents[1]
LLAMA3_TOKENIZER = SITE / "llama_models/llama3/tokenizer.model"


def read_back(path: Path, out: Path):
    """The GGUF through minillama's reader: an HF dir (config.json + model.safetensors), loaded as a model."""
    from safetensors.torch import save_file
    reader = open_gguf(path)
    cfg = hf_config(read_metadata(reader), [t.name for t in reader.tensors])
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(hf_state_dict(reader, cfg), out / "model.safetensors")
    return load_model(out)


@torch.no_grad()
def through(model, fn):
    """A copy of `model` whose matrices went through fn (the router stays float32, as the file keeps it)."""
    import copy
    m = copy.deepcopy(model)
    for name, p in m.named_parameters():
        if p.dim() > 1 and not name.endswith("feed_forward.gate.weight"):
            p.copy_(fn(name, p))
    if m.args.tie_embeddings:
        m.tie_weights()
    return m


def quant_round_trip(qtype):
    def fn(name, p):
        x = p.float().numpy()
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape))
    return fn


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    return load_tokenizer(train_tiny_spm(tmp_path_factory.mktemp("spm")))


@pytest.fixture(scope="module")
def llama3_tok():
    if not LLAMA3_TOKENIZER.is_file():
        pytest.skip("llama-models is not installed (its Llama 3 tokenizer.model is the real one)")
    return load_tokenizer(LLAMA3_TOKENIZER)


CASES = {  # name -> (model overrides, tokenizer fixture)
    "llama2_spm": (dict(vocab_size=256), "spm_tok"),
    "llama2_spm_tied": (dict(vocab_size=256, tie_embeddings=True), "spm_tok"),
    "mixtral_spm": (dict(vocab_size=256, **MOE_ARGS), "spm_tok"),
    "llama3_tiktoken": (dict(vocab_size=128256, rope_theta=500000.0), "llama3_tok"),
}


ROUND_TRIPS = [(case, quant) for case in CASES for quant in ("f16", "bf16", "q8_0", "q4_0")
               if case != "llama3_tiktoken" or quant == "q8_0"]  # its 128K-token vocab takes seconds to write


@pytest.mark.parametrize("case,quant", ROUND_TRIPS)
def test_export_then_our_reader_gives_the_same_logits(case, quant, request, tmp_path, one_thread):
    overrides, tok_name = CASES[case]
    tok = request.getfixturevalue(tok_name)
    model = tiny_model(**overrides)
    if model.args.tie_embeddings:
        model.tie_weights()
    path = export_gguf(model, tok, tmp_path / f"m.{quant}.gguf", quant)
    back = read_back(path, tmp_path / "back")
    assert back.args.tie_embeddings == model.args.tie_embeddings
    assert back.args.n_experts == model.args.n_experts and back.args.rope_theta == model.args.rope_theta
    Q = gguf.GGMLQuantizationType
    if quant in ("f16", "bf16"):
        dt = torch.float16 if quant == "f16" else torch.bfloat16
        expected = through(model, lambda n, p: p.to(dt).float())
    else:  # q4_0 gives the head q8_0 (module doc of gguf_export)
        head = "tok_embeddings.weight" if model.args.tie_embeddings else "output.weight"
        q8, q = quant_round_trip(Q.Q8_0), quant_round_trip(Q[quant.upper()])
        expected = through(model, lambda n, p: (q8 if n in (head, "output.weight") else q)(n, p))
    x = random_tokens(256, T=16)
    with torch.no_grad():
        got, want = back(x), expected(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    if quant in ("q8_0", "q4_0"):  # the weights' error is the quantization's
        bound = {"q8_0": 0.01, "q4_0": 0.12}[quant]
        back_state = back.state_dict()
        for name, p in model.named_parameters():
            if p.dim() > 1 and "gate.weight" not in name and name != "output.weight":
                err = ((back_state[name] - p).norm() / p.norm()).item()
                assert err <= bound, (name, err)


def test_file_has_the_keys_llama_cpp_reads(spm_tok, llama3_tok, tmp_path):
    """Hyperparameters, tokenizer ids, types, chat template, tied head, expert tensors and their types."""
    model = tiny_model(vocab_size=128256, rope_theta=500000.0, **MOE_ARGS, tie_embeddings=True)
    model.tie_weights()
    reader = open_gguf(export_gguf(model, llama3_tok, tmp_path / "m.gguf", "q4_0"))
    meta = read_metadata(reader)
    a = model.args
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 2  # MOSTLY_Q4_0
    assert (meta["llama.block_count"], meta["llama.embedding_length"], meta["llama.feed_forward_length"],
            meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"], meta["llama.context_length"],
            meta["llama.expert_count"], meta["llama.expert_used_count"], meta["llama.vocab_size"]) == (
        a.n_layers, a.dim, a.hidden_dim, a.n_heads, a.n_kv_heads, a.max_seq_len, a.n_experts, a.n_experts_per_tok,
        a.vocab_size)
    assert meta["llama.rope.freq_base"] == 500000.0 and meta["llama.rope.dimension_count"] == a.head_dim
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (128000, 128001, 128009)
    assert meta["tokenizer.ggml.add_bos_token"] is True
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == 128256 and tokens[128009] == "<|eot_id|>" and types[128009] == gguf.TokenType.CONTROL
    assert tokens[220] == "\u0120" and types[220] == gguf.TokenType.NORMAL  # " " in GPT-2's byte alphabet
    assert meta["tokenizer.ggml.merges"][0] == "\u0120 \u0120"  # Llama 3's first merge: two spaces
    assert "<|start_header_id|>" in meta["tokenizer.chat_template"]
    types_of = {t.name: t.tensor_type for t in reader.tensors}
    Q = gguf.GGMLQuantizationType
    assert "output.weight" not in types_of and types_of["token_embd.weight"] == Q.Q8_0  # tied: the head is q8_0
    assert types_of["blk.0.ffn_gate_exps.weight"] == Q.Q4_0 and types_of["blk.0.ffn_gate_inp.weight"] == Q.F32
    assert types_of["blk.1.attn_norm.weight"] == Q.F32 and types_of["blk.1.attn_q.weight"] == Q.Q4_0
    shape = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    assert shape["blk.0.ffn_down_exps.weight"] == (a.hidden_dim, a.dim, a.n_experts)  # GGUF lists dims fastest-first


def test_sentencepiece_vocab_pads_the_embedding_rows_as_the_converter_does(spm_tok, tmp_path):
    meta = read_metadata(open_gguf(export_gguf(tiny_model(vocab_size=256), spm_tok, tmp_path / "m.gguf")))
    tokens, types, scores = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    sp = spm_tok.sp
    assert meta["tokenizer.ggml.model"] == "llama" and len(tokens) == len(types) == len(scores) == 256
    assert tokens[:200] == [sp.id_to_piece(i) for i in range(200)]
    assert np.allclose(scores[:200], [sp.get_score(i) for i in range(200)])
    assert tokens[200:] == [f"[PAD{i}]" for i in range(200, 256)] and set(types[200:]) == {gguf.TokenType.UNUSED}
    assert types[sp.unk_id()] == gguf.TokenType.UNKNOWN and types[sp.bos_id()] == gguf.TokenType.CONTROL
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (sp.bos_id(), sp.eos_id())
    assert "tokenizer.chat_template" not in meta  # llama.cpp falls back to its Llama 2 format


@pytest.mark.parametrize("scaling,expected", [
    ({"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
     {"type": "yarn", "factor": 4.0, "original_context_length": 64}),
])
def test_rope_scaling_is_written_and_read_back(scaling, expected, spm_tok, tmp_path, one_thread):
    model = tiny_model(vocab_size=256, rope_scaling=scaling, max_seq_len=256)
    path = export_gguf(model, spm_tok, tmp_path / "m.gguf")
    meta = read_metadata(open_gguf(path))
    assert {k: meta[f"llama.rope.scaling.{k}"] for k in expected} == expected
    back = read_back(path, tmp_path / "back")
    assert back.args.rope_scaling["rope_type"] == scaling["rope_type"]
    x = random_tokens(256, T=40)
    with torch.no_grad():
        want = through(model, lambda n, p: p.half().float())(x)
        assert (back(x) - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_llama3_rope_scaling_becomes_llama_cpp_rope_freqs(spm_tok, tmp_path):
    """llama.cpp divides base frequency i by rope_freqs[i]: the ratio of unscaled to Llama 3.1-scaled frequencies."""
    from minillama.rope import base_inv_freq, scaled_inv_freq
    s = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}
    model = tiny_model(vocab_size=256, rope_scaling=s, max_seq_len=32768)
    reader = open_gguf(export_gguf(model, spm_tok, tmp_path / "m.gguf"))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    hd = model.args.head_dim
    want = base_inv_freq(hd, model.args.rope_theta) / scaled_inv_freq(hd, model.args.rope_theta, s, 32768)[0]
    assert torch.allclose(torch.from_numpy(np.array(freqs.data)), want.float())
    assert want.min() == 1.0 and want.max() == 8.0  # short wavelengths kept, long ones divided by the factor
    with pytest.raises(ValueError, match="rope_freqs.weight"):  # not read back (yet): refused, never ignored
        read_back(tmp_path / "m.gguf", tmp_path / "back")


def test_unmerged_lora_and_unknown_quant_are_refused(spm_tok, tmp_path):
    from minillama.lora.layers import apply_lora
    model = apply_lora(tiny_model(vocab_size=256), rank=2, alpha=4)
    with pytest.raises(ValueError, match="merge LoRA"):
        export_gguf(model, spm_tok, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="quant 'q5_k'; expected one of f16, bf16, q8_0, q4_0"):
        export_gguf(tiny_model(vocab_size=256), spm_tok, tmp_path / "m.gguf", "q5_k")
    assert not (tmp_path / "m.gguf").exists()


def test_tensor_types_follow_llama_cpp():
    Q = gguf.GGMLQuantizationType
    assert tensor_type("blk.0.attn_norm.weight", (64,), "q4_0", "output.weight") == Q.F32
    assert tensor_type("output.weight", (256, 64), "q4_0", "output.weight") == Q.Q8_0
    assert tensor_type("blk.0.attn_q.weight", (64, 64), "q4_0", "output.weight") == Q.Q4_0
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "q8_0", "output.weight") == Q.F16  # 48 % 32: no blocks
    assert tensor_type("blk.0.attn_q.weight", (64, 48), "bf16", "output.weight") == Q.BF16
    assert gguf_tensor_name("layers.7.feed_forward.experts.w2") == "blk.7.ffn_down_exps.weight"
    with pytest.raises(ValueError, match="layers.0.attention.wq.lora_a"):
        gguf_tensor_name("layers.0.attention.wq.lora_a")


def test_smollm2_export_writes_what_llama_cpp_converter_wrote(smollm2_dir, smollm2_gguf, tmp_path):
    """Every tokenizer and llama.* key of the shipped SmolLM2 GGUF (made by llama.cpp's converter) is the same in
    ours: tokens, types, merges, pre-tokenizer, chat template, BOS/EOS/pad ids, add_bos, RoPE, context."""
    model = load_model(smollm2_dir, dtype=None)
    ours = read_metadata(open_gguf(export_gguf(model, load_tokenizer(smollm2_dir), tmp_path / "s.gguf", "q8_0")))
    ref = read_metadata(open_gguf(smollm2_gguf))
    # what the shipped file has and we do not write: general.* descriptions, an unk id (SmolLM2's tokenizer.json
    # has none), add_space_prefix false (llama.cpp's default for gpt2 models); file_type differs (q4_1 vs q8_0)
    skip = {"tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_space_prefix"}
    keys = {k for k in ref if not k.startswith("general.") and k not in skip}
    assert keys <= set(ours)
    assert {k: ours[k] for k in keys} == {k: ref[k] for k in keys}
    assert ours["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>


def test_convert_cli_writes_gguf_and_refuses_bad_flags(smollm2_dir, tmp_path):
    from helpers import tiny_smol_vocab_checkpoint
    _, ckpt = tiny_smol_vocab_checkpoint(smollm2_dir, tmp_path / "ckpt")
    out = tmp_path / "m.q8_0.gguf"
    cmd = [sys.executable, "-m", "minillama.tools.convert", str(ckpt), str(out), "--quant", "q8_0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(open_gguf(out))["general.file_type"] == 7  # MOSTLY_Q8_0
    for extra, message in [([], "exists (pass --overwrite"), (["--dtype", "float16"], "--dtype does not apply"),
                           (["--to", "hf"], "--quant q8_0 is for a gguf target")]:
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=REPO)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


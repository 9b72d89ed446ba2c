"""Quantized checkpoints (minillama-convert --quantize, checkpoints/quantized.py): saved then loaded == quantized on
load, bit for bit; the files are the size the formats say; a LoRA adapter on top behaves the same; --quantize on such
a checkpoint may only repeat its scheme; a damaged file or config is one line naming the tensor."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import random_tokens, randomize_adapter
from sft_helpers import tiny_checkpoint
from minillama.checkpoints import load_model
from minillama.checkpoints.checkpoint import plan_checkpoint
from minillama.inference.loading import LoadOptions, load_for_inference
from minillama.lora.layers import apply_lora
from minillama.lora.peft import save_adapter
from minillama.tools.convert import cli, main as convert
from minillama.tools.merge import main as merge
from minillama.util.cli import run
from minillama.moe import QuantizedExperts
from minillama.weight_only import Int4Weight, Int8Weight, QuantizedStack, QuantLinear


def logits(model, vocab: int) -> torch.Tensor:
    with torch.no_grad():
        return model(random_tokens(vocab))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("q") / "float")


@pytest.mark.parametrize("quantize,dtype,tie,moe", [("int8", None, False, False), ("int4", None, True, False),
                                                    ("int4-g64", "bfloat16", False, True),
                                                    ("int8", "bfloat16", True, False)])
def test_saved_then_loaded_equals_quantized_on_load(quantize, dtype, tie, moe, tmp_path, one_thread):
    src = tiny_checkpoint(tmp_path / "float", tie=tie, moe=moe)
    flags = ["--quantize", quantize, "--max_shard_size", "40KB"] + (["--dtype", dtype] if dtype else [])
    out = convert([str(src), str(tmp_path / "q"), *flags])
    assert len(list(out.glob("quantized-*.safetensors"))) > 1 and (out / "quantized.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()
    load_dtype = torch.bfloat16 if dtype else torch.float32
    saved = load_model(out, dtype=load_dtype)
    fresh = load_model(src, dtype=load_dtype, quantize=quantize)
    assert torch.equal(logits(saved, saved.args.vocab_size), logits(fresh, saved.args.vocab_size))
    for (name, a), (_, b) in zip(saved.named_modules(), fresh.named_modules()):  # the same layers, kernels, codes
        assert type(a) is type(b), name
        if isinstance(a, (Int8Weight, Int4Weight)):
            assert getattr(a, "kernel", None) == getattr(b, "kernel", None), name
            # the packed kernels read aligned: a tensor left where the file maps it (8-byte aligned) crashed them
            assert all(x.data_ptr() % 64 == 0 for x in a.buffers()), name
            assert all(torch.equal(x, y) for x, y in zip(a.buffers(), b.buffers())), name
    assert isinstance(saved.output, QuantLinear) and not any(p.is_meta for p in saved.parameters())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "minillama" and cfg["quantize"] == quantize
    assert cfg["weights"]["output.weight"] == {"format": "int8"}
    if moe:  # Mixtral's expert stacks are quantized matrix by matrix, each with the group its row length allows
        experts = saved.layers[0].feed_forward.experts
        assert isinstance(experts, QuantizedExperts) and isinstance(experts.w1, QuantizedStack)
        assert cfg["weights"]["layers.0.feed_forward.experts.w1"] == {"format": "int4", "group_size": 64}
        assert cfg["weights"]["layers.0.feed_forward.experts.w2"] == {"format": "int4", "group_size": 32}
        shapes = {}
        for file in out.glob("quantized-*.safetensors"):
            with safe_open(str(file), "pt") as f:
                shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        assert shapes["layers.0.feed_forward.experts.w2.packed"] == [4, 64, 48]  # (E, out, in/2)
        assert shapes["layers.0.feed_forward.experts.w2.scales_and_zeros"] == [4, 3, 64, 2]  # (E, in/G, out, 2)
    assert load_model(out, dtype=load_dtype, quantize=quantize) is not None  # the same scheme again: accepted


def _linear_bytes(state: dict, per_weight: float) -> float:
    return sum(t.numel() * per_weight for k, t in state.items() if t.dim() == 2 and k != "tok_embeddings.weight")


def test_quantized_dir_is_the_size_the_formats_say(float_dir, tmp_path, one_thread):
    """Against a bf16 copy: int8 linears take 1 byte per weight + a bf16 scale per row (~half of bf16), int4 half a
    byte + 4 bytes per 32-weight group (~0.31x); embeddings and norms stay bf16."""
    bf16 = convert([str(float_dir), str(tmp_path / "bf16"), "--to", "hf", "--dtype", "bfloat16"])
    size = {}
    for q in ("int8", "int4"):
        out = convert([str(float_dir), str(tmp_path / q), "--quantize", q, "--dtype", "bfloat16"])
        size[q] = (out / "quantized.safetensors").stat().st_size
    state = load_model(float_dir, dtype=None).state_dict()
    base = (bf16 / "model.safetensors").stat().st_size
    dim, vocab = state["tok_embeddings.weight"].shape
    linears = _linear_bytes(state, 2.0) - 2 * vocab * dim  # the layers' linears in bf16, without the (tied-size) head
    rows = sum(t.shape[0] for k, t in state.items() if t.dim() == 2 and k.startswith("layers."))
    head_int8 = vocab * dim + 2 * vocab  # the head is int8 in both
    want_int8 = base - linears - 2 * vocab * dim + linears / 2 + 2 * rows + head_int8
    want_int4 = base - linears - 2 * vocab * dim + linears / 4 + linears / 2 / 32 * 4 + head_int8
    for q, want in (("int8", want_int8), ("int4", want_int4)):
        assert abs(size[q] - want) < 8192, (q, size[q], want)  # the headers differ by a few KB
    others = base - linears - 2 * vocab * dim + head_int8  # embeddings and norms as in bf16, the int8 head
    assert 0.5 <= (size["int8"] - others) / linears <= 0.54  # int8 linears: half of bf16 + a bf16 scale per row
    assert 0.31 <= (size["int4"] - others) / linears <= 0.34  # int4: a quarter + a bf16 scale and zero per 32


def test_lora_adapter_on_the_saved_checkpoint_equals_on_quantize_on_load(float_dir, tmp_path, one_thread):
    model = load_model(float_dir)
    apply_lora(model, rank=4, alpha=8, targets="all-linear")
    randomize_adapter(model, seed=3, std=0.1)
    adapter = save_adapter(model, tmp_path / "adapter")
    out = convert([str(float_dir), str(tmp_path / "q"), "--quantize", "int4"])
    got = load_for_inference(out, LoadOptions(adapter=adapter, device="cpu")).model
    want = load_for_inference(float_dir, LoadOptions(adapter=adapter, device="cpu", quantize="int4")).model
    assert isinstance(got.layers[0].attention.wq.weight, Int4Weight)  # the adapter sits unmerged on the int4 base
    assert torch.equal(logits(got, got.args.vocab_size), logits(want, got.args.vocab_size))
    plain = load_for_inference(out, LoadOptions(device="cpu")).model
    assert not torch.equal(logits(got, got.args.vocab_size), logits(plain, got.args.vocab_size))


def test_quantize_flag_on_a_quantized_checkpoint_is_a_no_op_or_one_line(float_dir, tmp_path, capsys):
    out = convert([str(float_dir), str(tmp_path / "q"), "--quantize", "int8"])
    with pytest.raises(ValueError, match=r"already quantized as int8 .* quantize int4 differs"):
        load_model(out, quantize="int4")
    with pytest.raises(ValueError, match="already quantized as int8"):
        load_model(out, quantize="nf4")
    with pytest.raises(ValueError, match="holds int8 weights .* needs a float checkpoint"):
        plan_checkpoint(out)
    with pytest.raises(ValueError, match="--base .* is a quantized checkpoint .* merge into the float checkpoint"):
        merge(["--base", str(out), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    capsys.readouterr()
    assert cli([str(out), str(tmp_path / "again"), "--quantize", "int8"]) == 1  # quantized SRC
    assert "is a quantized checkpoint" in capsys.readouterr().err
    assert cli([str(float_dir), str(out), "--quantize", "int8"]) == 1  # a non-empty DST: only with --overwrite
    assert "not empty (pass --overwrite" in capsys.readouterr().err
    assert cli([str(float_dir), str(out), "--quantize", "int8", "--overwrite"]) == 0
    assert cli([str(float_dir), str(tmp_path / "g.gguf"), "--quantize", "int8"]) == 1
    assert "--quantize int8 writes an hf-shaped directory" in capsys.readouterr().err


def _rewrite(path, edit):
    """Rewrite a safetensors file with edit(tensors) applied (the test plays a damaged save)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("damage,message", [
    (lambda t: t.pop("layers.1.attention.wq.weight.scale"),
     r"lacks tensor layers.1.attention.wq.weight.scale \(the int8 scale of layers.1.attention.wq.weight\)"),
    (lambda t: t.update({"layers.0.feed_forward.w2.weight.scale": t["layers.0.feed_forward.w2.weight.scale"][:-1]}),
     r"tensor layers.0.feed_forward.w2.weight.scale has shape \[63\], expected \[64\]"),
    (lambda t: t.update({"layers.0.attention.wk.weight.packed": t["layers.0.attention.wk.weight.packed"].float()}),
     "tensor layers.0.attention.wk.weight.packed is F32, expected I8"),
    (lambda t: t.update({"norm.weight": torch.full_like(t["norm.weight"], float("nan"))}),
     "tensor norm.weight holds NaN"),
    (lambda t: t.update({"layers.0.attention.wq.weight": torch.zeros(64, 64)}),
     "tensor.s. layers.0.attention.wq.weight are not part of the quantized model"),
])
def test_damaged_tensor_is_one_line_naming_it(damage, message, float_dir, tmp_path, capsys):
    out = convert([str(float_dir), str(tmp_path / "q"), "--quantize", "int8"])
    _rewrite(out / "quantized.safetensors", damage)
    with pytest.raises(ValueError, match=message):
        load_model(out)
    capsys.readouterr()
    assert run(lambda: load_model(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.update({"layers.0.attention.wq.weight": {"format": "int4", "group_size": 32}}),
     r"tensor layers.0.attention.wq.weight.packed has shape \[64, 64\], expected \[64, 32\]"),
    (lambda w: w.update({"layers.0.attention.wq.weight": {"format": "int4", "group_size": 48}}),
     r"weights\['layers.0.attention.wq.weight'\] is .* expected"),
    (lambda w: w.update({"tok_embeddings.weight": {"format": "int8"}}),
     "names 'tok_embeddings.weight', which is not a layer linear"),
    (lambda w: w.pop("layers.0.attention.wv.weight"),
     r"lacks tensor layers.0.attention.wv.weight \(a float tensor\)"),
])
def test_mismatched_quantization_entry_is_one_line_naming_the_key(edit, message, float_dir, tmp_path):
    out = convert([str(float_dir), str(tmp_path / "q"), "--quantize", "int8"])
    cfg = json.loads((out / "config.json").read_text())
    edit(cfg["quantization_config"]["weights"])
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        load_model(out)


def test_transformers_finds_no_weights_and_nothing_is_unpickled(float_dir, tmp_path):
    """transformers skips a quantization_config it does not know: the tensors are not in model.safetensors, so it
    stops instead of loading random weights. An index naming a pickle is refused before anything is read."""
    transformers = pytest.importorskip("transformers")
    out = convert([str(float_dir), str(tmp_path / "q"), "--quantize", "int8"])
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(str(out))
    (out / "evil.bin").write_bytes(b"\x80\x04not a checkpoint")  # would run code if it were unpickled
    (out / "quantized.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"norm.weight": "evil.bin", "tok_embeddings.weight": "quantized.safetensors"}}))
    with pytest.raises(ValueError, match="read from .safetensors files only, found evil.bin"):
        load_model(out)


@pytest.mark.parametrize("dtype,moe", [(None, False), ("bfloat16", True)])
def test_nf4_saved_then_loaded_equals_nf4_on_load(dtype, moe, tmp_path, one_thread):
    """--quantize nf4 saves the four NF4 arrays of every layer linear and expert stack (the head stays float);
    loading them builds the modules NF4 quantize-on-load builds, with the same arrays, bit for bit."""
    from minillama.quant import NF4Linear, NF4Weight, nf4_nbytes
    src = tiny_checkpoint(tmp_path / "float", moe=moe)
    flags = ["--quantize", "nf4", "--max_shard_size", "40KB"] + (["--dtype", dtype] if dtype else [])
    out = convert([str(src), str(tmp_path / "q"), *flags])
    load_dtype = torch.bfloat16 if dtype else torch.float32
    saved = load_model(out, dtype=load_dtype)
    fresh = load_model(src, dtype=load_dtype, quantize="nf4")
    vocab = saved.args.vocab_size
    assert torch.equal(logits(saved, vocab), logits(fresh, vocab))
    for (name, a), (_, b) in zip(saved.named_modules(), fresh.named_modules()):
        assert type(a) is type(b), name
        if isinstance(a, NF4Weight):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), name
            assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters())), name
    assert isinstance(saved.layers[0].attention.wq, NF4Linear) and isinstance(saved.output, torch.nn.Linear)
    if moe:
        experts = saved.layers[0].feed_forward.experts
        assert isinstance(experts, QuantizedExperts) and isinstance(experts.w1, NF4Weight)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quantize"] == "nf4" and "output.weight" not in cfg["weights"]
    assert set(spec["format"] for spec in cfg["weights"].values()) == {"nf4"}
    state = load_model(src, dtype=load_dtype).state_dict()  # the source's float tensors, in the saved dtype
    want = sum(nf4_nbytes(tuple(state[k].shape)) for k in cfg["weights"])  # ~0.52 bytes per weight
    want += sum(t.numel() * t.element_size() for k, t in state.items() if k not in cfg["weights"])
    payload = 0
    for file in out.glob("quantized-*.safetensors"):
        with safe_open(str(file), "pt") as f:
            payload += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert payload == want
    with pytest.raises(ValueError, match="already quantized as nf4"):
        load_model(out, quantize="int8")
    # a LoRA adapter on the saved NF4 base == on NF4 quantize-on-load
    model = load_model(src)
    apply_lora(model, rank=4, alpha=8, targets="all-linear")
    randomize_adapter(model, seed=3, std=0.1)
    adapter = save_adapter(model, tmp_path / "adapter")
    got = load_for_inference(out, LoadOptions(adapter=adapter, device="cpu", dtype=dtype)).model
    want = load_for_inference(src, LoadOptions(adapter=adapter, device="cpu", dtype=dtype, quantize="nf4")).model
    assert isinstance(got.layers[0].attention.wq.weight, NF4Weight)  # the adapter sits unmerged on the NF4 base
    assert torch.equal(logits(got, vocab), logits(want, vocab))


def test_nf4_config_and_tensors_are_checked(tmp_path):
    src = tiny_checkpoint(tmp_path / "float")
    out = convert([str(src), str(tmp_path / "q"), "--quantize", "nf4"])
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["weights"]["layers.0.attention.wq.weight"] = {"format": "int8"}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weights\['layers.0.attention.wq.weight'\] is .*expected "
                                         r"\{\"format\": \"nf4\"\}"):
        load_model(out)
    cfg["quantization_config"]["weights"]["layers.0.attention.wq.weight"] = {"format": "nf4"}
    cfg_path.write_text(json.dumps(cfg))
    _rewrite(out / "quantized.safetensors",
             lambda t: t.update({"layers.1.feed_forward.w2.weight.absmax_scale":
                                 t["layers.1.feed_forward.w2.weight.absmax_scale"].float()}))
    with pytest.raises(ValueError, match="tensor layers.1.feed_forward.w2.weight.absmax_scale is F32, expected I32"):
        load_model(out)


def test_qlora_on_a_saved_nf4_checkpoint_equals_qlora_on_the_float_one(float_dir, tmp_path, capsys):
    """train/sft.py on a checkpoint saved with --quantize nf4 is QLoRA on that NF4 base (--quantize nf4 implied):
    the same losses and adapter as --quantize nf4 on the float checkpoint it was made from. A checkpoint saved in
    int8/int4 (no backward) is one line before anything loads."""
    import sys
    from pathlib import Path
    from sft_helpers import qa_samples, read_safetensors, write_jsonl
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    import sft
    data = write_jsonl(tmp_path / "d.jsonl", qa_samples(4))
    nf4 = convert([str(float_dir), str(tmp_path / "nf4"), "--quantize", "nf4"])
    common = ["--data", str(data), "--device", "cpu", "--batch_size", "2", "--max_steps", "3", "--lr", "3e-3",
              "--lora_rank", "4"]
    capsys.readouterr()
    assert run(lambda: sft.main(["--model", str(nf4), "--out", str(tmp_path / "saved"), *common])) == 0
    assert "NF4 base" in capsys.readouterr().err  # the run knows it is QLoRA (memory plan, log, saved flags)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["quantize"] == "nf4"
    assert run(lambda: sft.main(["--model", str(float_dir), "--quantize", "nf4", "--out", str(tmp_path / "on_load"),
                                 *common])) == 0
    runs = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in ("saved", "on_load")]
    losses = [[m["loss"] for m in run if "loss" in m] for run in runs]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = (read_safetensors(tmp_path / r / "final") for r in ("saved", "on_load"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    int8 = convert([str(float_dir), str(tmp_path / "int8"), "--quantize", "int8"])
    argv = ["--model", str(int8), "--device", "cpu", "--out", str(tmp_path / "run"), "--data", str(data)]
    with pytest.raises(SystemExit):
        sft.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--ckpt {int8} holds int8 weights saved for inference" in err[-1], err
    assert "Traceback" not in "\n".join(err)

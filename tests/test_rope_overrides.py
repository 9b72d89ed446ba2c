"""RoPE overrides (rope_theta / rope_scaling / max_seq_len) == transformers built with the same config values; what
was used is recorded in saved, converted and merged checkpoints and beside adapters; dynamic NTK generates past the
trained context as HF does; bad values are one-line errors at parse time."""

import json
import sys
import warnings

import pytest
import torch

from helpers import random_tokens, tiny_hf
from minillama import load_model, save_hf
from minillama.lora.peft import save_adapter
from minillama.lora.peft_extras import read_base_rope
from minillama.args import with_rope
from minillama.inference.generate import generate
from minillama.lora.layers import apply_lora
from minillama.inference.loading import LoadOptions, load_for_inference
from sft_helpers import REPO, tiny_checkpoint
from test_lora import randomize_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TRAINED = 16  # the tiny HF model's max_position_embeddings
ATOL = 1e-4

# (our override, the HF config values it must equal); positions up to 48 = 3x the trained context
OVERRIDES = {
    "theta": (dict(rope_theta=1e6, max_seq_len=48),
              dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=48)),
    "linear": (dict(rope_scaling={"rope_type": "linear", "factor": 3.0}),
               dict(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 10000.0},
                    max_position_embeddings=48)),
    "dynamic": (dict(rope_theta=20000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 20000.0},
                     max_position_embeddings=TRAINED)),
    "yarn": (dict(rope_scaling={"type": "yarn", "factor": 3.0, "beta_fast": 16}),
             dict(rope_parameters={"rope_type": "yarn", "factor": 3.0, "beta_fast": 16,
                                   "original_max_position_embeddings": TRAINED, "rope_theta": 10000.0},
                  max_position_embeddings=48)),
    "llama3": (dict(rope_scaling={"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": TRAINED,
                                  "rope_theta": 500000.0}),
               dict(rope_parameters={"rope_type": "llama3", "factor": 3.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": TRAINED,
                                     "rope_theta": 500000.0}, max_position_embeddings=48)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny HF Llama (theta 10000, trained context 16) on disk, and its weights."""
    d = tmp_path_factory.mktemp("rope") / "base"
    hf = tiny_hf("llama", max_position_embeddings=TRAINED)
    hf.save_pretrained(d)
    return d, hf.state_dict()


@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tinyckpt") / "m")


def hf_with(state, **config):
    """The same weights in a transformers model whose config carries the given RoPE values."""
    hf = tiny_hf("llama", **config)
    hf.load_state_dict(state)
    return hf.eval()


def max_diff(ours, hf, T=48):
    x = random_tokens(hf.config.vocab_size, T=T, seed=3)
    with torch.no_grad():
        return (ours(x) - hf(x).logits.float()).abs().max().item()


@pytest.mark.parametrize("kind", list(OVERRIDES))
def test_override_logits_equal_transformers_with_same_config_and_saved_config_reloads(kind, base, tmp_path):
    d, state = base
    ours_kw, hf_cfg = OVERRIDES[kind]
    ours = load_model(d, **ours_kw)
    assert ours.args.max_seq_len == hf_cfg["max_position_embeddings"]  # linear/yarn/llama3: factor x 16
    hf = hf_with(state, **hf_cfg)
    assert max_diff(ours, hf) <= ATOL
    assert max_diff(load_model(d), hf) > 1e-2  # the override really changes the function
    # recorded: the saved config.json gives transformers (and us) the same model
    save_hf(ours, tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert max_diff(ours, again) <= ATOL
    assert max_diff(load_model(tmp_path / "saved"), hf) <= ATOL


def test_convert_records_the_override_in_config_json(base, tmp_path):
    d, state = base
    scaling = tmp_path / "yarn.json"
    scaling.write_text(json.dumps({"rope_type": "yarn", "factor": 3.0, "beta_fast": 16}))  # a JSON file works too
    from minillama.tools.convert import main as convert
    convert([str(d), str(tmp_path / "meta"), "--rope_theta", "1e6"])
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["rope_theta"] == 1e6
    convert([str(d), str(tmp_path / "hf"), "--to", "hf", "--rope_scaling", str(scaling)])
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 3.0, "beta_fast": 16,
                                   "original_max_position_embeddings": TRAINED}
    assert cfg["max_position_embeddings"] == 48
    assert max_diff(load_model(tmp_path / "hf"), hf_with(state, **OVERRIDES["yarn"][1])) <= ATOL


def _hf_greedy_scores(hf, prompt, n):
    """HF's own cached greedy loop: per step the logits and the chosen token (its dynamic RoPE updates per step)."""
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits, dim=1).float()


def test_dynamic_ntk_generates_past_trained_context_like_hf(base):
    d, state = base
    ours_kw, hf_cfg = OVERRIDES["dynamic"]
    ours = load_model(d, **ours_kw)
    hf = hf_with(state, **hf_cfg)
    prompt = random_tokens(hf.config.vocab_size, T=10, B=1, seed=4)
    n = 3 * TRAINED - prompt.shape[1]  # decode until 3x the trained context
    want_tokens, want_logits = _hf_greedy_scores(hf, prompt, n)
    got = generate(ours, prompt.tolist(), n, max_seq_len=3 * TRAINED)
    assert got[0] == want_tokens[0].tolist()
    # the same steps through our cache: every step's logits equal HF's (one rescaled RoPE per forward in both)
    ours.setup_cache(1, 3 * TRAINED)
    seq = torch.cat([prompt, want_tokens], dim=1)
    with torch.no_grad():
        logits = [ours(prompt, start_pos=0)[:, -1]]
        for i in range(n - 1):
            pos = prompt.shape[1] + i
            logits.append(ours(seq[:, pos:pos + 1], start_pos=pos)[:, -1])
    assert (torch.stack(logits, dim=1) - want_logits).abs().max().item() <= ATOL
    with pytest.raises(ValueError, match="exceeds the model's context"):  # other scalings still refuse
        generate(load_model(d, rope_theta=1e6), prompt.tolist(), 4, max_seq_len=3 * TRAINED)


def test_adapter_records_base_rope_peft_still_loads_it_and_our_load_restores_it(smol_tiny, tmp_path):
    yarn = {"rope_type": "yarn", "factor": 4.0}
    model = load_model(smol_tiny, rope_theta=20000.0, rope_scaling=yarn)
    assert model.args.max_seq_len == 2048  # 4 x the checkpoint's 512
    apply_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    rope = read_base_rope(tmp_path / "adapter")
    assert rope == {"rope_theta": 20000.0, "max_seq_len": 2048,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}
    x = random_tokens(260, T=40, seed=5)
    with torch.no_grad():
        want = model(x)
    # PEFT loads the adapter (no warning: the record is a file PEFT never reads) onto transformers' model with
    # that RoPE in its config
    save_hf(load_model(smol_tiny, rope_theta=20000.0, rope_scaling=yarn), tmp_path / "hf_base")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base", dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert not [w for w in caught if "nexpected" in str(w.message)]
    with torch.no_grad():
        assert (peft_model(x).logits - want).abs().max().item() <= ATOL
    # our load of the plain base + adapter restores the RoPE the adapter was trained with
    loaded = load_for_inference(smol_tiny, LoadOptions(adapter=tmp_path / "adapter", device="cpu")).model
    assert loaded.args.rope_scaling == model.args.rope_scaling and loaded.args.max_seq_len == 2048
    with torch.no_grad():
        assert (loaded(x) - want).abs().max().item() <= 1e-5
    # an explicit override still wins over the record; loading onto another RoPE warns
    assert load_for_inference(smol_tiny, LoadOptions(adapter=tmp_path / "adapter", device="cpu",
                                                     rope_theta=5e5)).model.args.rope_theta == 5e5
    from minillama.lora.peft import load_adapter
    with pytest.warns(UserWarning, match="was trained on a base with RoPE"):
        load_adapter(load_model(smol_tiny), tmp_path / "adapter")


def test_merge_records_the_adapters_rope_in_the_merged_config(base, tmp_path):
    d, state = base
    model = load_model(d, rope_theta=1e6, max_seq_len=48)
    apply_lora(model, rank=4, alpha=8, targets=("v_proj",))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    from minillama.tools.merge import main as merge
    merge(["--base", str(d), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")])
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and cfg["max_position_embeddings"] == 48
    x = random_tokens(300, T=40, seed=6)
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(x) - model(x)).abs().max().item() <= 1e-4


def test_load_for_inference_max_seq_len_extends_but_never_shrinks_the_context(smol_tiny):
    loaded = load_for_inference(smol_tiny, LoadOptions(device="cpu", max_seq_len=1024))
    assert loaded.model.args.max_seq_len == 1024
    loaded = load_for_inference(smol_tiny, LoadOptions(device="cpu", max_seq_len=100))
    assert loaded.model.args.max_seq_len == 512  # a cap only: the checkpoint's context stays
    dyn = load_for_inference(smol_tiny, LoadOptions(device="cpu", max_seq_len=2048,
                                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert dyn.model.args.max_seq_len == 512  # dynamic NTK keeps its trained context and runs past it


@pytest.mark.parametrize("flags, message", [
    (["--rope_scaling", '{"rope_type": "yarn"}'], "needs keys ['factor']"),
    (["--rope_scaling", '{"rope_type": "yarn", "factor": 4, "factr": 2}'], "unknown keys ['factr']"),
    (["--rope_scaling", '{"rope_type": "yarn", "factor": 0.5}'], "factor must be a number >= 1"),
    (["--rope_scaling", "{oops"], "not valid JSON"),
    (["--rope_scaling", "missing.json"], "neither a JSON object nor an existing JSON file"),
    (["--rope_theta", "-1"], "must be > 0"),
])
def test_bad_rope_flags_fail_at_parse_time_in_one_line(flags, message, capsys, tmp_path):
    sys.path.insert(0, str(REPO / "generate"))
    import chat
    from minillama.tools.convert import parse_args as convert_args
    from minillama.tools.train_flags import parse_args as sft_args
    for parse in (chat.get_args, sft_args, lambda a: convert_args(["src", "dst", *a])):
        with pytest.raises(SystemExit) as e:
            parse(flags)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "--rope" in err[-1]  # argparse: usage line, then the one error line
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(SystemExit):  # a config file's value skips argparse's type and is checked after it
        sft_args(["--config", str(cfg)])
    assert "needs keys ['factor']" in capsys.readouterr().err


def test_with_rope_keeps_what_is_not_overridden():
    from minillama.args import ModelArgs
    args = ModelArgs.from_name("llama3.1-8b")
    same = with_rope(args)
    assert same == args
    assert with_rope(args, rope_scaling={"rope_type": "default"}).rope_scaling is None
    assert with_rope(args, rope_scaling=None).rope_scaling == args.rope_scaling

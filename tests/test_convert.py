"""`python -m minillama.tools.convert`: HF -> Meta -> HF gives back bit-identical tensors, the Meta side matches the
independent conversion, tokenizer files travel along, and dtype is kept unless asked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from helpers import hf_dir_to_meta_state, merge_model_parallel, read_safetensors_dir, tiny_hf  # noqa: E402

from minillama import load_model  # noqa: E402
from minillama.tools.convert import cli, main as convert  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _assert_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind,shards,dtype", [("llama", 2, torch.float32), ("mixtral", 1, torch.bfloat16),
                                               ("mixtral", 2, torch.float32)])
def test_hf_meta_hf_round_trip_is_bit_identical(kind, shards, dtype, tmp_path):
    hf = tiny_hf(kind).to(dtype)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="150KB")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
    convert([str(tmp_path / "hf"), str(tmp_path / "meta"), "--shards", str(shards)])
    meta = tmp_path / "meta"
    if shards == 1 and kind == "mixtral":  # Mistral's format: one streamed consolidated.safetensors
        assert [p.name for p in meta.glob("consolidated*")] == ["consolidated.safetensors"]
        got = load_file(str(meta / "consolidated.safetensors"))
    else:
        pths = sorted(meta.glob("consolidated.*.pth"))
        assert len(pths) == shards
        got = merge_model_parallel([torch.load(p, weights_only=True) for p in pths], vocab_split=False)
    assert (meta / "tokenizer.json").read_text() == '{"fake": true}'
    # the Meta side holds what the independent conversion in helpers.py produces
    want = hf_dir_to_meta_state(tmp_path / "hf", hf.config.to_dict())
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    convert([str(meta), str(tmp_path / "back")])
    _assert_identical(read_safetensors_dir(tmp_path / "hf"), read_safetensors_dir(tmp_path / "back"))
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    cfg_in = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("architectures", "hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size"):
        assert cfg_in[key] == cfg_out[key], key


def test_cli_dtype_and_direction_flags(tmp_path, capsys):
    tiny_hf("llama", num_key_value_heads=4).save_pretrained(tmp_path / "hf")
    cmd = [sys.executable, "-m", "minillama.tools.convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--to", "hf",
           "--dtype", "bfloat16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote hf checkpoint" in proc.stdout and "parameters" in proc.stdout
    assert {t.dtype for t in read_safetensors_dir(tmp_path / "out").values()} == {torch.bfloat16}
    original = load_model(tmp_path / "hf")
    for k, v in load_model(tmp_path / "out", dtype=None).state_dict().items():
        assert torch.equal(v, original.state_dict()[k].to(torch.bfloat16)), k
    # errors are one clear line, not a traceback
    capsys.readouterr()
    assert cli([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "nothing does not exist" in err
    assert cli([str(tmp_path / "hf"), str(tmp_path / "out")]) == 1  # never silently overwrites
    assert "not empty" in capsys.readouterr().err

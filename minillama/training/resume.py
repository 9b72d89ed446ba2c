"""Training checkpoints that resume exactly, with nothing read through pickle: sharded weights + optimizer state
(minillama.training.sharded: safetensors per rank + a JSON index), data position, step and every rank's RNG state
(JSON), a manifest of every file's size and SHA-256, written atomically, with a `latest` pointer updated last.

Layout of OUT/step_N/:  state/ (rank{r}.safetensors + index.json; any number of processes can read it back),
train_state.json, rng/rank{r}.json, for LoRA runs adapter/ (a PEFT adapter, usable directly), and manifest.json
(written last). OUT/latest holds "step_N". On resume every file is checked against the manifest before it is parsed;
when `latest` is unusable the newest intact step_N is used instead, and the run says so.
"""

from __future__ import annotations

import base64
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.tensor import DTensor

from ..util.files import atomic_write, file_digest, is_within, read_json, refuse_overlap, replace_dir, write_json
from .sharded import INDEX, load_sharded, read_index, save_sharded

LATEST = "latest"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
FORMAT = "minillama-train-checkpoint/1"
STEP_DIR = re.compile(r"step_(\d+)")
# what a run writes into --out; --overwrite removes exactly these (never other files of the directory)
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "loss.png", LATEST, "final", "reference_logps.json",  # (DPO)
               "samples")  # (--eval_generate)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode()


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state() -> dict:
    """This process's RNG streams as JSON: torch (and this GPU's) generator bytes, Python's and NumPy's MT state."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": _b64(torch.get_rng_state()), "python": [version, list(mt), gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    # only this rank's own GPU (a CPU run leaves CUDA uninitialized: asking would start a context on GPU 0)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def parse_rng_state(state: dict, source: str = "rng state") -> tuple:
    """rng_state()'s JSON -> (torch, python, numpy, cuda or None) states; a malformed value is a ValueError naming
    `source`."""
    try:
        version, mt, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        torch_state = _unb64(state["torch"])
        if torch_state.numel() != torch.get_rng_state().numel() or len(mt) != 625 or len(keys) != 624:
            raise ValueError("wrong state size")
        py_state = (int(version), tuple(int(x) for x in mt), None if gauss is None else float(gauss))
        np_state = (str(kind), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        cuda = _unb64(state["cuda"]) if "cuda" in state else None
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{source}: not a valid RNG state ({type(e).__name__}: {e})") from None
    return torch_state, py_state, np_state, cuda


def set_rng_state(state: dict, source: str = "rng state") -> None:
    torch_state, py_state, np_state, cuda = parse_rng_state(state, source)
    torch.set_rng_state(torch_state)
    random.setstate(py_state)
    np.random.set_state(np_state)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def _model_and_optim_state(root: nn.Module, optimizer, lora: bool) -> dict:
    model_sd, optim_sd = get_state_dict(root, optimizer, options=_options(lora))
    if lora:  # buffers (an NF4 base's packed weights) come from --model too
        trainable = {n for n, p in root.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return {"model": model_sd, "optim": optim_sd}


def _options(lora: bool) -> StateDictOptions:
    # LoRA: the frozen base comes from --model on resume; only adapters and their optimizer state are saved.
    # Loading then cannot be strict about the (absent) frozen keys; load_sharded still fails on any missing adapter key.
    return StateDictOptions(ignore_frozen_params=lora, strict=not lora)


def save_lora_adapter(model: nn.Module, out_dir: Path, base: Optional[str], rank0: bool) -> None:
    """Gather every LoRA factor and whole trained module (a collective: all ranks call this) and write a PEFT
    adapter on rank 0."""
    from ..lora.peft import save_adapter
    from ..lora.slots import adapter_names

    swapped, full = [], {}
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is None or not (name.startswith("lora_") or p.requires_grad):
                continue
            if id(p) not in full:  # a tied weight is gathered once and stays one tensor
                t = p.full_tensor() if isinstance(p, DTensor) else p
                full[id(p)] = nn.Parameter(t.detach(), requires_grad=p.requires_grad)
            swapped.append((m, name, p))
            m._parameters[name] = full[id(p)]  # plain tensors while save_adapter reads them
    try:
        if rank0:
            save_adapter(model, out_dir, base_model_name_or_path=base, name=adapter_names(model)[0])  # the trained one
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def export_final(root: nn.Module, model: nn.Module, out: Path, base: str, rank0: bool, lora: bool) -> Path:
    """OUT/final: a PEFT adapter (LoRA) or a Hugging Face model (full fine-tuning, gathered on rank 0)."""
    from ..checkpoints import save_hf
    from ..model import Transformer

    final = Path(out) / "final"
    if lora:
        save_lora_adapter(model, final, base, rank0)
        return final
    state = full_state_dict(root)
    if rank0:
        state = {k.removeprefix("model."): v for k, v in state.items()}
        with torch.device("meta"):
            plain = Transformer(model.args)
        missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
        if unexpected or [k for k in missing if not (k == "output.weight" and model.args.tie_embeddings)]:
            raise RuntimeError(f"export_final: state dict mismatch: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        save_hf(plain, final, tokenizer_src=base, overwrite=True)
    dist.barrier()
    return final


def full_state_dict(root: nn.Module) -> dict:
    """Every parameter gathered to full tensors on CPU, on rank 0 (a collective; other ranks get {})."""
    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _gather(obj) -> list:
    """obj from every rank (between this job's own processes, not from a file); [obj] in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _step_dirs(out: Path) -> list[Path]:
    """OUT/step_N directories, newest first."""
    found = [p for p in out.glob("step_*") if p.is_dir() and STEP_DIR.fullmatch(p.name)]
    return sorted(found, key=lambda p: -int(p.name.split("_")[1]))


def save_training_state(out: Path, step: int, root: nn.Module, optimizer, train_state: dict, lora: bool,
                    base: Optional[str] = None, keep: int = 0) -> Path:
    """Write OUT/step_N atomically on all ranks (shared file system), then point OUT/latest at it."""
    rank = dist.get_rank()
    final = out / f"step_{step}"
    tmp = out / f".step_{step}.tmp"
    if rank == 0:
        for stale in out.glob(".step_*.tmp"):  # this one, or a killed run's at another step
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "state").mkdir(parents=True)
        (tmp / "rng").mkdir()
    dist.barrier()
    try:
        written = _write_rank_files(tmp, root, optimizer, lora, base)
        everyone = _gather(written)
        if rank == 0:
            _publish(tmp, final, {**train_state, "step": step}, {k: v for w in everyone for k, v in w.items()}, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # no torn checkpoint is left behind; `latest` still names a whole one
        raise
    dist.barrier()
    return final


def _write_rank_files(tmp: Path, root: nn.Module, optimizer, lora: bool, base: Optional[str]) -> dict:
    """This rank's shards, RNG state (and, on rank 0, the adapter) under tmp. -> {relative path: digest}"""
    rank = dist.get_rank()
    written = {f"state/{k}": v for k, v in save_sharded(_model_and_optim_state(root, optimizer, lora),
                                                        tmp / "state").items()}
    rng = write_json(tmp / "rng" / f"rank{rank}.json", rng_state())
    written[f"rng/{rng.name}"] = file_digest(rng)
    if lora:
        save_lora_adapter(root.model, tmp / "adapter", base, rank == 0)
    return written


def _publish(tmp: Path, final: Path, train_state: dict, files: dict, keep: int) -> None:
    """Rank 0: the train state and the manifest into tmp, tmp renamed to OUT/step_N, `latest` pointed at it, and
    older checkpoints beyond `keep` removed."""
    out, step = final.parent, train_state["step"]
    write_json(tmp / TRAIN_STATE, train_state)
    for f in [tmp / TRAIN_STATE, *sorted((tmp / "adapter").glob("*"))]:
        if f.is_file():
            files[f.relative_to(tmp).as_posix()] = file_digest(f)
    write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": dict(sorted(files.items()))})
    replace_dir(tmp, final)
    atomic_write(out / LATEST, final.name)  # last: a crash before this leaves the previous checkpoint current
    if keep > 0:  # only checkpoints up to this step: newer ones (an abandoned run's) are replaced when reached
        for old in [p for p in _step_dirs(out) if int(p.name.split("_")[1]) <= step][keep:]:
            shutil.rmtree(old, ignore_errors=True)


# ---- reading a checkpoint back: every file is checked before it is parsed ----

def _manifest_files(path: Path) -> dict[str, dict]:
    manifest_file = path / MANIFEST
    if not manifest_file.is_file() and (path / "dcp").is_dir():
        raise ValueError(f"{path} was written by an older minillama (torch.distributed.checkpoint, whose files are "
                         "pickles); it is not read, for safety: start a fresh run (--overwrite)")
    manifest = read_json(manifest_file, "checkpoint manifest")
    files = manifest.get("files")
    ok = manifest.get("format") == FORMAT and isinstance(files, dict) and all(
        isinstance(k, str) and not k.startswith("/") and ".." not in k.split("/") and isinstance(v, dict)
        and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str) for k, v in files.items())
    if not ok:
        raise ValueError(f"{manifest_file}: not a {FORMAT} manifest (expected 'format' and 'files': "
                         "{path: {bytes, sha256}})")
    for need in (TRAIN_STATE, "state/index.json"):
        if need not in files:
            raise ValueError(f"{manifest_file} lists no {need}")
    return files


def verify_training_state(path: Path) -> dict:
    """Check OUT/step_N against its manifest (sizes, SHA-256; the hashing is split over the ranks, a collective) and
    parse its JSON and safetensors headers; returns its train_state. Raises ValueError/FileNotFoundError naming the
    file that is wrong."""
    files = _manifest_files(path)
    for rel, want in files.items():
        f = path / rel
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (listed in {path / MANIFEST})")
        if f.stat().st_size != want["bytes"]:
            raise ValueError(f"{f} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    bad = next((f"{path / rel}: contents changed since it was written (SHA-256 differs from {path / MANIFEST})"
                for i, rel in enumerate(sorted(files)) if i % world == rank
                and file_digest(path / rel)["sha256"] != files[rel]["sha256"]), None)
    problems = [b for b in _gather(bad) if b]
    if problems:
        raise ValueError(problems[0])
    named = read_json(path / "state" / INDEX, "checkpoint index").get("files")
    unlisted = [n for n in named if f"state/{n}" not in files] if isinstance(named, dict) else []
    if unlisted:  # a piece file the manifest does not vouch for is not opened
        raise ValueError(f"{path / MANIFEST} does not list state/{unlisted[0]}, which {path / 'state' / INDEX} names")
    read_index(path / "state")
    for rel in files:
        if rel.startswith("rng/"):
            parse_rng_state(read_json(path / rel, "RNG state"), str(path / rel))
    return read_train_state(path)


def read_train_state(path: Path) -> dict:
    state = read_json(path / TRAIN_STATE, "training state")
    bad = [k for k in ("step", "epoch", "batch_idx", "tokens_seen")
           if isinstance(state.get(k), bool) or not isinstance(state.get(k), int) or state[k] < 0]
    if bad:
        raise ValueError(f"{path / TRAIN_STATE}: {', '.join(bad)} must be integers >= 0")
    return state


def resolve_resume(resume: str, out: Path, log: Callable[[str], None] = print) -> Optional[Path]:
    """--resume value -> a verified step dir (a collective). "latest" follows OUT/latest; when that is missing or
    unusable, the newest intact OUT/step_N is used and `log` says why. None: nothing to resume (a fresh start)."""
    if resume != LATEST:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint directory")
        try:
            verify_training_state(path)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"--resume {resume}: {e}") from None
        return path
    pointer, steps = out / LATEST, _step_dirs(out)
    if not pointer.exists() and not steps:
        return None
    named, problem = None, f"{pointer} does not exist"
    if pointer.exists():
        try:
            text = pointer.read_bytes().decode("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = None
        if text is not None and STEP_DIR.fullmatch(text):
            named, problem = out / text, None
        else:
            problem = f"{pointer} does not name a step_N checkpoint"
    problems = []
    for candidate in ([named] if named else []) + [p for p in steps if p != named]:
        if not candidate.is_dir():
            problem = problem or f"{pointer} names {candidate.name}, which does not exist"
            continue
        try:
            verify_training_state(candidate)
        except (ValueError, FileNotFoundError) as e:
            problem = problem or f"{pointer} names {candidate.name}, which is unusable: {e}"
            problems.append(str(e))
            continue
        if problem:
            log(f"[{problem}; resuming from {candidate}, the newest intact checkpoint]")
        return candidate
    raise ValueError(f"--resume: no intact checkpoint in {out}: {problem}"
                     + (f"; {len(problems) - 1} other step_N unusable too" if len(problems) > 1 else ""))


def load_training_state(path: Path, root: nn.Module, optimizer, lora: bool) -> dict:
    """Restore weights and optimizer from a verified OUT/step_N; returns its train_state (RNG: load_rng_state)."""
    state = _model_and_optim_state(root, optimizer, lora)
    load_sharded(state, path / "state")
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(lora))
    return read_train_state(path)


def load_rng_state(path: Path, rank: int) -> bool:
    """Restore this rank's RNG streams from OUT/step_N (False if the checkpoint has none for this rank)."""
    rng_file = path / "rng" / f"rank{rank}.json"
    if not rng_file.is_file():
        return False
    set_rng_state(read_json(rng_file, "RNG state"), str(rng_file))
    return True


# ---- --out: never overwrite a run by accident ----

def is_run_config(path: Path) -> bool:
    """Whether OUT/config.json is a training run's saved flags (config.saved_flags), not a model's config."""
    try:
        saved = read_json(path)
    except (ValueError, FileNotFoundError):
        return False
    return {"lora_rank", "out", "total_steps"} <= saved.keys() and not {"model_type", "hidden_size"} & saved.keys()


def _run_output_names(out: Path) -> list[Path]:
    return [p for p in sorted(out.iterdir()) if p.name in RUN_OUTPUTS or STEP_DIR.fullmatch(p.name)
            or re.fullmatch(r"\.step_\d+\.tmp", p.name)] if out.is_dir() else []


def check_out_dir(out: Path, resume: Optional[str], overwrite: bool, inputs: Optional[dict] = None) -> None:
    """Before any work: --out is none of the inputs ({flag: path}) and neither holds the other; a non-empty --out
    needs --resume (continue it) or --overwrite (start over), and --overwrite only a directory a run wrote."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: give one of them")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    refuse_overlap("--out", out, inputs or {})
    for flag, given in (inputs or {}).items():
        if given is not None and Path(given).is_file() and any(is_within(given, p) for p in _run_output_names(out)):
            raise ValueError(f"{flag} {given} lies among a previous run's outputs in --out {out}; move it first")
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is not empty (a previous run?): pass --resume to continue it, "
                              "--overwrite to start over, or choose another --out")
    if overwrite and _run_output_names(out) and not is_run_config(out / "config.json"):
        raise FileExistsError(f"--out {out} does not hold a training run of this tool (its config.json is not a "
                              "run's saved flags): --overwrite removes only a previous run's outputs; choose another "
                              "--out")


def remove_run_outputs(out: Path) -> list[str]:
    """--overwrite: delete what a previous run wrote into OUT (step_N/, latest, metrics, final/, ...), nothing else,
    and only when OUT/config.json proves a run wrote them."""
    found = _run_output_names(out)
    if found and not is_run_config(out / "config.json"):
        raise FileExistsError(f"--out {out}: not a training run's directory; nothing removed")
    gone = []
    for p in found:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        gone.append(p.name)
    return gone

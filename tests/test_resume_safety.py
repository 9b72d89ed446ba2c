"""Resumable checkpoints are safe to read and hard to lose: nothing a resume reads can run code (no pickle anywhere),
every file is checked against its SHA-256 manifest, a damaged `latest` falls back to the newest intact step_N,
a run saved on 2 processes resumes on 1, SIGKILL at any point of a checkpoint write resumes to the uninterrupted
run's losses, a used --out is never overwritten without --resume or --overwrite, and a SIGTERM during a slow step
saves at that step's end."""

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import Payload
from minillama.util.cli import run as run_cli
from minillama.util.files import file_digest
from minillama.training.resume import resolve_resume
from minillama.training.sharded import fill_box
from sft_helpers import REPO, metrics, qa_samples, read_safetensors, run_sft, tiny_checkpoint, write_jsonl

sys.path.insert(0, str(REPO / "train"))
import sft  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    return d, write_jsonl(d / "train.jsonl", qa_samples(16)), tiny_checkpoint(d / "dense")


def common(setup, *extra):
    _, data, dense = setup
    return ["--model", str(dense), "--data", str(data), "--device", "cpu", "--batch_size", "4", "--max_steps", "6",
            "--lr", "1e-2", "--lora_rank", "0", "--warmup_steps", "2", *extra]


def sft_run(argv, capsys):
    """train/sft.py in this process through cli.run: (exit code, stderr)."""
    capsys.readouterr()
    rc = run_cli(lambda: sft.main(argv))
    return rc, capsys.readouterr().err


def losses(out):
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


def assert_same_run(out, ref, tol=1e-6):
    got, want = losses(out), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, 7))
    assert max(abs(a - b) for (_, a), (_, b) in zip(got, want)) < tol
    a, b = read_safetensors(out / "final"), read_safetensors(ref / "final")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=1e-4) for k in a)


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted 6-step run, and one stopped after step 4 with checkpoints at steps 2 and 4."""
    d, n = setup[0], torch.get_num_threads()
    torch.set_num_threads(1)
    assert sft.main(common(setup, "--out", str(d / "ref"))) == 0
    assert sft.main(common(setup, "--out", str(d / "stopped"), "--save_every", "2", "--keep", "0",
                           "--stop_at_step", "4")) == 0
    torch.set_num_threads(n)
    assert sorted(p.name for p in (d / "stopped").glob("step_*")) == ["step_2", "step_4"]
    return d / "ref", d / "stopped"


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def payloads(marker) -> dict:
    buf = io.BytesIO()
    torch.save({"state": Payload(marker)}, buf)  # what torch.load(weights_only=False) would execute
    return {"pickle": pickle.dumps(Payload(marker)), "torch.save": buf.getvalue()}


def plant(run_dir, rel, data: bytes) -> None:
    """Replace run_dir/rel with data, and re-sign it in its step's manifest so the file reaches its parser."""
    (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (run_dir / rel).write_bytes(data)
    step, _, inner = rel.partition("/")
    manifest = run_dir / step / "manifest.json"
    if inner and manifest.is_file() and rel != f"{step}/manifest.json":
        m = json.loads(manifest.read_text())
        if inner in m["files"]:
            m["files"][inner] = file_digest(run_dir / rel)
            manifest.write_text(json.dumps(m))


def test_planted_pickle_payloads_are_never_executed(setup, reference, tmp_path, capsys, one_thread):
    _, stopped = reference
    marker = tmp_path / "PWNED"
    probe = tmp_path / "probe"
    pickle.loads(payloads(probe)["pickle"])  # the payload does work when something unpickles it
    assert probe.exists()
    one = copy_run(stopped, tmp_path / "one")  # one checkpoint only: a resume has to read every one of its files
    shutil.rmtree(one / "step_2")
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*") if p.is_file())
    assert {"config.json", "latest", "metrics.jsonl", "step_4/manifest.json", "step_4/train_state.json",
            "step_4/state/index.json", "step_4/state/rank0.safetensors", "step_4/rng/rank0.json"} <= set(files)
    cases = [(rel, "pickle") for rel in files]
    cases += [(rel, "torch.save") for rel in ("step_4/state/rank0.safetensors", "step_4/rng/rank0.json")]
    cases += [("step_4/dcp/.metadata", "pickle"), ("step_4/rng/rank0.pt", "torch.save")]  # the old reader's files
    outcomes = {}
    for i, (rel, kind) in enumerate(cases):
        run_dir = copy_run(one, tmp_path / f"case{i}")
        plant(run_dir, rel, payloads(marker)[kind])
        rc, err = sft_run(common(setup, "--out", str(run_dir), "--resume"), capsys)
        assert not marker.exists(), f"{rel} ({kind}) executed its payload"
        assert "Traceback" not in err, err
        outcomes[(rel, kind)] = rc
        if rc:
            last = err.strip().splitlines()[-1]
            assert last.startswith("error:") and os.path.basename(rel) in last, (rel, last)
    # every file holding data refuses the payload with a one-line error naming it; a bad pointer falls back,
    # garbage in the metrics log is dropped, files the new format does not have are never opened
    assert {k for k, rc in outcomes.items() if rc == 0} == {
        ("latest", "pickle"), ("metrics.jsonl", "pickle"), ("step_4/dcp/.metadata", "pickle"),
        ("step_4/rng/rank0.pt", "torch.save")}


def test_damaged_latest_falls_back_to_the_newest_intact_step_and_says_so(setup, reference, tmp_path, capsys,
                                                                       one_thread):
    ref, stopped = reference
    run_dir = copy_run(stopped, tmp_path / "flip")
    shard = run_dir / "step_4" / "state" / "rank0.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one weight's byte: same size, different contents
    shard.write_bytes(bytes(data))
    rc, err = sft_run(common(setup, "--out", str(run_dir), "--resume"), capsys)
    assert rc == 0, err
    assert "rank0.safetensors: contents changed since it was written" in err and "resuming from" in err
    assert f"resumed from {run_dir / 'step_2'} at step 2" in err
    assert_same_run(run_dir, ref)  # from step 2 on, exactly the uninterrupted run


def damage(run_dir, how):
    """One way a run directory gets damaged; returns the file name the message must name."""
    s4 = run_dir / "step_4"
    if how == "latest names a missing step":
        (run_dir / "latest").write_text("step_9")
        return "step_9"
    if how == "no latest":
        (run_dir / "latest").unlink()
        return "latest"
    if how == "truncated shard":
        f = s4 / "state" / "rank0.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        return "rank0.safetensors"
    if how == "zero-length shard":
        (s4 / "state" / "rank0.safetensors").write_bytes(b"")
        return "rank0.safetensors"
    if how == "truncated index":
        f = s4 / "state" / "index.json"
        f.write_bytes(f.read_bytes()[:40])
        return "index.json"
    if how == "truncated rng":
        f = s4 / "rng" / "rank0.json"
        f.write_bytes(f.read_bytes()[:40])
        return "rank0.json"
    if how == "missing train_state":
        (s4 / "train_state.json").unlink()
        return "train_state.json"
    if how == "garbage train_state":
        plant(run_dir, "step_4/train_state.json", b'{"step": "four"}')
        return "train_state.json"
    if how == "garbage manifest":
        (s4 / "manifest.json").write_text("{")
        return "manifest.json"
    raise AssertionError(how)


DAMAGE = ["latest names a missing step", "no latest", "truncated shard", "zero-length shard", "truncated index",
          "truncated rng", "missing train_state", "garbage train_state", "garbage manifest"]


def test_every_damage_is_named_and_resume_falls_back(reference, tmp_path):
    _, stopped = reference
    for i, how in enumerate(DAMAGE):
        run_dir = copy_run(stopped, tmp_path / f"d{i}")
        name = damage(run_dir, how)
        said = []
        picked = resolve_resume("latest", run_dir, said.append)
        want = "step_4" if how == "latest names a missing step" or how == "no latest" else "step_2"
        assert picked == run_dir / want, how
        assert len(said) == 1 and name in said[0] and f"resuming from {run_dir / want}" in said[0], (how, said)
    # nothing intact: one error naming what is wrong; a named checkpoint never falls back
    run_dir = copy_run(stopped, tmp_path / "all")
    damage(run_dir, "truncated shard")
    (run_dir / "step_2" / "train_state.json").unlink()
    with pytest.raises(ValueError, match=r"no intact checkpoint in .*latest names step_4, which is unusable: .*"
                                         r"rank0\.safetensors has 100 bytes, the manifest says \d+ \(truncated\?\)"):
        resolve_resume("latest", run_dir, print)
    with pytest.raises(FileNotFoundError, match=r"--resume .*step_2: .*train_state\.json is missing"):
        resolve_resume(str(run_dir / "step_2"), run_dir, print)
    # a checkpoint of the old, pickle-based format is refused, not read
    old = tmp_path / "old"
    (old / "step_1" / "dcp").mkdir(parents=True)
    (old / "step_1" / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(tmp_path / "PWNED")))
    (old / "latest").write_text("step_1")
    with pytest.raises(ValueError, match="older minillama .*pickles.*not read"):
        resolve_resume("latest", old, print)
    assert not (tmp_path / "PWNED").exists()


def test_garbage_saved_flags_are_one_line_naming_the_file(setup, reference, tmp_path, capsys):
    _, stopped = reference
    run_dir = copy_run(stopped, tmp_path / "cfg")
    (run_dir / "config.json").write_text('{"lr": 0.01, "batch_size": ')
    rc, err = sft_run(common(setup, "--out", str(run_dir), "--resume"), capsys)
    assert rc == 1 and err.strip().startswith(f"error: the run's saved flags {run_dir / 'config.json'}: not valid "
                                              "JSON (Expecting value at line 1 column ") and err.count("\n") == 1
    (run_dir / "config.json").write_text(json.dumps({"batch_size": 0}))
    with pytest.raises(SystemExit):
        sft.parse_args(["--out", str(run_dir), "--resume"])
    assert "argument --batch_size: 0 must be >= 1 (from " in capsys.readouterr().err


# ---- a used --out ----

def test_used_out_is_refused_before_the_model_loads_and_overwrite_starts_over(setup, reference, tmp_path, capsys,
                                                                             monkeypatch, one_thread):
    _, stopped = reference
    run_dir = copy_run(stopped, tmp_path / "used")
    (run_dir / "notes.txt").write_text("mine")
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    real_build = sft.build_model
    monkeypatch.setattr(sft, "build_model", lambda *a: pytest.fail("the model was loaded"))
    rc, err = sft_run(common(setup, "--out", str(run_dir)), capsys)
    assert rc == 1 and err.strip() == (f"error: --out {run_dir} is not empty (a previous run?): pass --resume to "
                                       "continue it, --overwrite to start over, or choose another --out")
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    rc, err = sft_run(common(setup, "--out", str(run_dir), "--resume", "--overwrite"), capsys)
    assert rc == 1 and "give one of them" in err
    monkeypatch.setattr(sft, "build_model", real_build)
    rc, err = sft_run(common(setup, "--out", str(run_dir), "--overwrite", "--max_steps", "1"), capsys)
    assert rc == 0, err
    assert "--overwrite: removed the previous run's config.json, latest, metrics.jsonl, step_2, step_4" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "final", "latest", "loss.png",
                                                         "metrics.jsonl", "notes.txt", "step_1"]
    assert [r["step"] for r in metrics(run_dir)] == [1] and (run_dir / "notes.txt").read_text() == "mine"


# ---- process counts and kills ----

def test_saved_on_two_processes_resumes_on_one(setup, reference, tmp_path, capsys, one_thread):
    ref, _ = reference
    out = tmp_path / "two"
    run_sft(common(setup, "--out", str(out), "--stop_at_step", "3"), nproc=2)
    index = json.loads((out / "step_3" / "state" / "index.json").read_text())
    assert index["world_size"] == 2 and sorted(index["files"]) == ["rank0.safetensors", "rank1.safetensors"]
    rc, err = sft_run(common(setup, "--out", str(out), "--resume"), capsys)
    assert rc == 0, err
    assert f"resumed from {out / 'step_3'} at step 3" in err
    assert_same_run(out, ref, tol=1e-5)  # 2 ranks sum their losses in another order


def test_fill_box_reshards_uneven_pieces():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(7, 5, generator=g)
    # saved by 3 ranks along dim 0 (torch.chunk: 3, 3, 1 rows), then one rank's box split along dim 1 too
    pieces = [([0, 0], [3, 5]), ([3, 0], [3, 2]), ([3, 2], [3, 3]), ([6, 0], [1, 5])]
    readers = [(o, s, lambda sl, o=o, s=s: full[o[0]:o[0] + s[0], o[1]:o[1] + s[1]][sl]) for o, s in pieces]
    for offset, shape in (([0, 0], [4, 5]), ([4, 0], [3, 5]), ([0, 0], [7, 5]), ([2, 1], [3, 3])):
        dst = torch.zeros(shape)
        fill_box(dst, offset, readers, "w")
        assert torch.equal(dst, full[offset[0]:offset[0] + shape[0], offset[1]:offset[1] + shape[1]])
    with pytest.raises(ValueError, match="cover 15 of this rank's 20 values"):
        fill_box(torch.zeros(4, 5), [0, 0], readers[:1], "w")


KILLER = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {train!r}]
import sft
from minillama.training import resume, sharded
point, step = sys.argv[1], int(sys.argv[2])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "after a shard file":
    write = sharded.write_safetensors
    def patched(path, *a, **k):
        n = write(path, *a, **k)
        if f".step_{{step}}.tmp" in str(path):
            die()
        return n
    sharded.write_safetensors = patched
elif point == "after the manifest":
    move = resume.replace_dir
    resume.replace_dir = lambda tmp, final: die() if final.name == f"step_{{step}}" else move(tmp, final)
elif point == "before latest moves":
    write = resume.atomic_write
    resume.atomic_write = lambda path, data: die() if data == f"step_{{step}}" else write(path, data)
sys.exit(sft.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point", ["after a shard file", "after the manifest", "before latest moves"])
def test_sigkill_during_a_checkpoint_write_then_resume_equals_the_uninterrupted_run(setup, reference, tmp_path,
                                                                                    point, capsys, one_thread):
    ref, _ = reference
    out = tmp_path / "killed"
    args = common(setup, "--out", str(out), "--save_every", "2", "--keep", "1")
    script = KILLER.format(repo=str(REPO), train=str(REPO / "train"))
    proc = subprocess.run([sys.executable, "-c", script, point, "4", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "latest").read_text() == "step_2"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]  # steps 3-4 were logged, their checkpoint was not
    rc, err = sft_run(args + ["--resume"], capsys)
    assert rc == 0, err
    assert f"resumed from {out / 'step_2'} at step 2" in err
    assert_same_run(out, ref)
    assert not list(out.glob(".step_*.tmp"))  # the killed write's temp dir is gone


# ---- SIGTERM ----

SLOW_STEP = 1.5  # seconds: a step slower than the grace period left after the signal


def test_sigterm_in_a_slow_step_is_announced_at_once_and_saved_at_that_steps_end(setup, tmp_path, capsys,
                                                                                 monkeypatch, one_thread):
    """SIGTERM arrives during step 2's forward, each step taking SLOW_STEP: a line says at once that it arrived, and
    the checkpoint is step 2's, written at its end, before step 3 could have ended (no forward of step 3 starts)."""
    forward, save = sft.SFT.forward, sft.save
    calls, times = [], {}

    def slow_forward(self, root, mb, counts):
        calls.append(1)
        if len(calls) == 2:  # one micro-batch per step: this is step 2
            times["signal"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            print("step 2 goes on", file=sys.stderr)
        time.sleep(SLOW_STEP)
        return forward(self, root, mb, counts)

    def timed_save(run):
        save(run)
        times.setdefault("saved", time.monotonic())

    monkeypatch.setattr(sft.SFT, "forward", slow_forward)
    monkeypatch.setattr(sft, "save", timed_save)
    out = tmp_path / "sigterm"
    rc, err = sft_run(common(setup, "--out", str(out)), capsys)
    assert rc == 0, err
    lines = err.splitlines()
    announced = [i for i, line in enumerate(lines) if line.startswith("SIGTERM received")]
    assert announced and announced[0] < lines.index("step 2 goes on")  # before the step in flight goes on
    assert len(calls) == 2 and [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "latest").read_text() == "step_2" and "stopped at step 2" in err
    assert times["saved"] - times["signal"] < 2 * SLOW_STEP  # before the next step would have ended

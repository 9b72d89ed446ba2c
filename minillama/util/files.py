"""Files minillama writes and reads: atomic writes, atomic directories, JSON that names the file when it is bad.

The one overwrite rule: a *file* written with `atomic_write` replaces the old one whole (its new content is the
whole truth: a config, a pointer, a rewritten log); a *directory* written with `atomic_dir` that already exists
and is not empty is replaced only when the caller says `overwrite=True`, otherwise FileExistsError is raised
before any work. Both write beside the target first (a hidden `.NAME.tmp-PID-...`), fsync, then os.replace, so a
crash leaves either the old target or the new one, never half of one. Temp leftovers of a killed process are
removed the next time the same target is written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


class DiskFull(OSError):
    """The disk (or quota) filled up while writing `path`: one line naming the file, plus what the user can do."""

    def __init__(self, path: PathLike, hint: str = ""):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.hint = hint

    def __str__(self) -> str:
        return f"no space left on the device while writing {self.filename}{self.hint}"


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also as reported by writers that wrap the OS error (safetensors, torch.save)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "code: 28," in text or "file write failed" in text


@contextlib.contextmanager
def disk_full_names(path: PathLike, hint: str = "") -> Iterator[None]:
    """Turn a full disk inside the block into DiskFull naming `path`, the thing the user asked for (not a temp file
    inside it); other errors pass through unchanged."""
    try:
        yield
    except Exception as e:
        if is_disk_full(e):
            raise DiskFull(path, hint or getattr(e, "hint", "")) from None
        raise


def loads_json(text: Union[str, bytes], label: str, parse_constant=None):
    """json.loads whose failures (bad syntax, UTF-8, nesting deeper than Python's recursion limit) are one ValueError
    naming `label` (json raises RecursionError for `[` x 100000, which no caller expects)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{label}: not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=parse_constant) if parse_constant else json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{label}: JSON nested too deeply to read") from None


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(final: Path) -> list[Path]:
    """Delete `.NAME.tmp-PID-*` siblings of `final` whose writing process no longer runs; returns them."""
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.glob(_tmp_prefix(final) + "*"):
        pid = p.name[len(_tmp_prefix(final)):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def follow_umask(path: PathLike) -> None:
    """Give a file made owner-only (mkstemp, mkdtemp, some writers) the mode open()/mkdir() would: 666/777 - umask."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, data: Union[str, bytes], fsync: bool = True) -> Path:
    """Replace the file at `path` with `data` (str is written as UTF-8) in one step."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(final)}{os.getpid()}-", dir=final.parent)
    try:
        follow_umask(tmp)
        with disk_full_names(final), os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(final.parent)
    return final


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temp file path beside `path` for a writer that opens files itself (e.g. gguf.GGUFWriter); when the
    block ends without error the file replaces `path` in one step, on error it is removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(final)}{os.getpid()}-", dir=final.parent)
    os.close(fd)
    try:
        follow_umask(tmp)
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def write_json(path: PathLike, obj) -> Path:
    """atomic_write of obj as indented JSON with a trailing newline."""
    return atomic_write(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def check_dir_writable(path: PathLike, overwrite: bool, flag: str = "") -> Path:
    """Raise FileExistsError if `path` is a file, or a non-empty directory and not overwrite (checked before work)."""
    final = Path(path)
    name = f"{flag} {final}" if flag else str(final)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{name} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        hint = " (pass --overwrite to replace it)" if flag else "; pass overwrite=True to replace it"
        raise FileExistsError(f"{name} exists and is not empty{hint}")
    return final


@contextlib.contextmanager
def atomic_dir(path: PathLike, overwrite: bool = False, flag: str = "") -> Iterator[Path]:
    """Yield a temp directory beside `path`; when the block ends without error it becomes `path`.

    An existing non-empty `path` is an error unless overwrite (checked on entry, before the slow part, and again
    at the end); with overwrite it is replaced whole. On error the temp directory is removed and `path` is
    untouched. `flag` names the command-line flag in the error (e.g. "--out").
    """
    final = check_dir_writable(Path(path).absolute(), overwrite, flag)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(final)}{os.getpid()}-", dir=final.parent))
    try:
        follow_umask(tmp)
        with disk_full_names(final):
            yield tmp
            check_dir_writable(final, overwrite, flag)
            replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir to `final`, replacing what is there (the caller decided it may)."""
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{_tmp_prefix(final)}{os.getpid()}-old-", dir=final.parent))
        os.replace(final, old / "d")  # the old dir moves aside first: a crash here leaves it recoverable
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def is_within(inner: PathLike, outer: PathLike) -> bool:
    """Whether `inner` is `outer` or lies inside it, links resolved."""
    inner, outer = Path(os.path.realpath(inner)), Path(os.path.realpath(outer))
    return inner == outer or outer in inner.parents


def refuse_overlap(out_flag: str, out: PathLike, inputs: dict) -> None:
    """An output directory must be none of the input dirs ({flag: path}), nor hold one, nor lie inside one: writing
    it replaces or removes what is there. ValueError naming both flags, before any work."""
    for flag, given in inputs.items():
        if given is None or not Path(given).is_dir():
            continue
        inside, holds = is_within(out, given), is_within(given, out)
        if inside or holds:
            how = "is" if inside and holds else ("lies inside" if inside else "contains")
            raise ValueError(f"{out_flag} {out} {how} {flag} {given}: an output must not overlap an input (writing "
                             "it could replace or remove the input); give it a directory of its own")


def require_file(path: PathLike, what: str = "", nonempty: bool = False) -> Path:
    """`path` if it is a readable file (non-empty if asked); else FileNotFoundError/IsADirectoryError/ValueError
    naming it (and `what` it is, e.g. "--data")."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.is_dir():
        raise IsADirectoryError(f"{label} is a directory, expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"{label} does not exist" if not path.exists() else f"{label} is not a file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{label} is not readable")
    if nonempty and path.stat().st_size == 0:
        raise ValueError(f"{label} is empty")
    return path


def file_digest(path: PathLike) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def read_json(path: PathLike, what: str = "") -> dict:
    """A JSON object from a file; every failure names the file (and `what` it is) in a ValueError/FileNotFoundError."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label} does not exist" if not path.exists() else f"{label} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{label}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{label}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise ValueError(f"{label}: JSON nested too deeply to read") from None
    except OSError as e:
        raise ValueError(f"{label}: cannot read ({e.strerror})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{label}: expected a JSON object, found a JSON {type(obj).__name__}")
    return obj

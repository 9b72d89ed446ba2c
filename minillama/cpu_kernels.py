"""minillama's own CPU kernel (cpu_kernels.cpp), compiled once per machine on first use, for its instruction set.

One kernel: `small_linear`, the matrix product of a decode step (1 to MAX_ROWS rows of input) against a float32 or
bfloat16 weight, or weight-only int8 codes with a per-row scale, streamed from memory once for all rows. torch's
products for so few rows are far from the memory's speed on a CPU: MKL's sgemm leaves its memory-bound path from
3-4 rows, oneDNN's bf16 product reads ~13-16 GB/s where a plain stream reads 25-30 (the project's Intel Xeon, two
threads) and pays ~24 us per call, and _weight_int8pack_mm reads 11-12 GB/s of codes where this kernel reads 21-23.

It needs an x86-64 CPU with AVX2 + FMA (AVX-512 where present) and a C++ compiler (`$CXX`, else `c++`/`g++`: the one
torch.compile's inductor uses on CPU). It is built with torch's headers and OpenMP into `$MINILLAMA_CACHE` (default
`~/.cache/minillama`), named by a hash of the source, torch's version and the CPU's flags, written atomically, and
loaded with `torch.ops.load_library`. Where it cannot be built (no compiler, another CPU, a failed build: said once,
in one line) or `MINILLAMA_CPU_KERNELS=0` is set, linear() takes torch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
MAX_ROWS = 16  # small_linear takes 1..MAX_ROWS rows of input (cpu_kernels.cpp's MAX_ROWS)
BUILD_TIMEOUT_S = 600
_state = {"loaded": False, "tried": False}
_lock = threading.Lock()


def cpuinfo(field: str) -> str:
    """The first value of `field` in Linux /proc/cpuinfo ('vendor_id': 'GenuineIntel', 'AuthenticAMD'; 'flags'), ''
    where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags, empty where they cannot be read."""
    return set(cpuinfo("flags").split())


def compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _why_not() -> Optional[str]:
    """Why the kernel cannot be built here, or None."""
    if os.environ.get("MINILLAMA_CPU_KERNELS", "1") == "0":
        return "MINILLAMA_CPU_KERNELS=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"built for x86-64 Linux only, this is {sys.platform} {platform.machine()}"
    if not {"avx2", "fma"} <= cpu_flags():
        return "the CPU has no AVX2 + FMA"
    if compiler() is None:
        return "no C++ compiler (set CXX)"
    return None


def build(out: Path, arch: str = "native") -> None:
    """Compile cpu_kernels.cpp into the shared library `out` (atomically: a temporary file renamed into place), for
    `-march=arch`, with OpenMP (ATen's parallel_for is OpenMP inlined from its headers: without it, one thread).
    Raises RuntimeError with the compiler's last lines if it fails."""
    from torch.utils.cpp_extension import include_paths
    lib = Path(torch.__file__).parent / "lib"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [compiler(), "-O3", f"-march={arch}", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           *[f"-I{p}" for p in include_paths()], str(SOURCE), f"-L{lib}", "-lc10", "-ltorch_cpu", "-o", tmp]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if r.returncode != 0:
            raise RuntimeError(" | ".join((r.stderr or r.stdout).strip().splitlines()[-3:]))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library_path() -> Path:
    """Where this machine's build lives: named by the source, torch's version and the CPU's flags."""
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MINILLAMA_CACHE") or Path.home() / ".cache" / "minillama")
    return root / f"cpu_kernels-{key}.so"


def available() -> bool:
    """Whether the kernel is loaded, building it on the first call (~15 s, once per machine). Under torch.compile
    it only says whether it is loaded (nothing is built while tracing)."""
    if _state["loaded"] or _state["tried"] or torch.compiler.is_compiling():
        return _state["loaded"]
    with _lock:
        if not _state["tried"]:
            _state["loaded"] = _load()
            _state["tried"] = True
    return _state["loaded"]


def _load() -> bool:
    why = _why_not()
    if why is None:
        path = library_path()
        try:
            if not path.exists():
                print(f"minillama: compiling its CPU kernel for this machine into {path} (once)", file=sys.stderr)
                build(path)
            torch.ops.load_library(str(path))
            torch.library.register_fake("minillama_cpu::small_linear")(_small_linear_shape)
            return True
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            why = f"{type(e).__name__}: {e}"
    if why != "MINILLAMA_CPU_KERNELS=0":
        warnings.warn(f"minillama's CPU kernel is not used ({why}); torch's products run instead", stacklevel=3)
    return False


def takes(x: torch.Tensor) -> bool:
    """Whether small_linear takes this input (..., in): float32 or bf16 on a CPU, 1..MAX_ROWS rows, the kernel built."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and 1 <= rows <= MAX_ROWS
            and available())


def product(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """small_linear over x's leading dims: (..., in) -> (..., out). Call only where `takes(x)`."""
    y = small_linear(x.reshape(-1, x.shape[-1]), weight, scale)  # (M, out)
    return y.view(*x.shape[:-1], weight.shape[0])


def small_linear(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (M, in) @ weight^T, M in 1..MAX_ROWS, weight (out, in) contiguous float32 or bfloat16, or int8 codes with a
    per-row scale (out,) (weight-only int8: x @ codes^T * scale) -> (M, out) in x's dtype, accumulated in float32.
    Call only where `available()`."""
    return torch.ops.minillama_cpu.small_linear(x, weight, scale)


def _small_linear_shape(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """small_linear's output for torch.compile's tracing: (M, out) in x's dtype."""
    return x.new_empty(x.shape[0], weight.shape[0])

"""minillama.linear: the model's linear layer picks its CPU kernel by rows and dtype, and the product stays F.linear's;
minillama's own kernel (cpu_kernels.small_linear) against F.linear, its build and its fallback."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minillama import cpu_kernels
from minillama import linear as L

HAS_KERNEL = cpu_kernels.available()  # builds it on this machine (once) where it can be built
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="minillama's CPU kernel cannot be built here")


@pytest.fixture
def torch_kernels(monkeypatch):
    """linear() as on a machine where minillama's kernel cannot be built: torch's products only."""
    monkeypatch.setattr(L.cpu_kernels, "available", lambda: False)


class KernelCalls:
    """Counts small_linear's calls through linear()."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = L.cpu_kernels.small_linear

        def counted(x, w, scale=None):
            self.calls += 1
            return real(x, w, scale)
        monkeypatch.setattr(L.cpu_kernels, "small_linear", counted)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 24), (2, 576), (3, 100), (4, 1000), (7, 31), (16, 64), (2, 2, 48), (17, 64)])
@pytest.mark.parametrize("out", [40, 7, 1])
def test_few_rows_take_minillamas_kernel_and_equal_f_linear(shape, out, dtype, monkeypatch):
    """1..MAX_ROWS rows of float32 or bfloat16 go through small_linear: any in (vector tails included), any out
    (blocks of 4 weight rows and the rest), any leading dims; more rows, autograd or a bias keep F.linear. The product
    equals F.linear's in float32 to float32 rounding; in bf16 it equals the exact float32 product of the bf16 values,
    rounded once (what a bf16 GEMM computes)."""
    torch.manual_seed(0)
    w, x = torch.randn(out, shape[-1]).to(dtype), torch.randn(*shape).to(dtype)
    counter = KernelCalls(monkeypatch)
    with torch.no_grad():
        y = L.linear(x, w)
    rows = x.numel() // shape[-1]
    assert counter.calls == (1 if rows <= cpu_kernels.MAX_ROWS else 0)
    assert y.shape == (*shape[:-1], out) and y.dtype == dtype and y.is_contiguous()
    exact = F.linear(x.double(), w.double())
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5 * shape[-1] ** 0.5)
    else:
        torch.testing.assert_close(y, exact.to(dtype), rtol=8e-3, atol=1e-2)  # one bf16 rounding (2^-8) apart


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(dtype):
    """Each output is one dot product in a fixed order: row i of 16 rows equals row i alone, bit for bit (a decode
    step's answer does not change with the batch, unlike BLAS kernels chosen by the number of rows)."""
    torch.manual_seed(2)
    w, x = torch.randn(50, 333).to(dtype), torch.randn(16, 333).to(dtype)
    together = cpu_kernels.small_linear(x, w)
    for i in (0, 3, 4, 15):
        assert torch.equal(together[i], cpu_kernels.small_linear(x[i:i + 1], w)[0])
    assert torch.equal(together[5:9], cpu_kernels.small_linear(x[5:9], w))


@needs_kernel
def test_the_kernel_runs_inside_a_compiled_function():
    """torch.compile (the compiled decode step) calls the kernel as an opaque op: its fake gives the output's shape
    and dtype, and the compiled result equals the eager one."""
    torch.manual_seed(3)
    w, x = torch.randn(24, 40), torch.randn(3, 40)
    fn = torch.compile(lambda x: torch.relu(L.linear(x, w)) + 1, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(fn(x), torch.relu(L.linear(x, w)) + 1)


def test_no_kernel_where_it_cannot_be_built_and_one_line_why(tmp_path):
    """MINILLAMA_CPU_KERNELS=0: torch's products, silently; a compiler that fails: one warning line naming why, then
    torch's products (the same results); nothing is left in the cache directory."""
    code = ("import warnings, torch, torch.nn.functional as F; from minillama import cpu_kernels, linear as L; "
            "w, x = torch.randn(8, 16), torch.randn(3, 16); "
            "y = L.linear(x, w); print(cpu_kernels.available(), torch.equal(y, F.linear(x, w)))")
    env = {**os.environ, "MINILLAMA_CACHE": str(tmp_path / "cache")}
    off = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120,
                         env={**env, "MINILLAMA_CPU_KERNELS": "0"})
    assert off.returncode == 0 and off.stdout.split() == ["False", "True"] and "Warning" not in off.stderr, off.stderr
    broken = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, "CXX": "/bin/false"})
    assert broken.returncode == 0 and broken.stdout.split() == ["False", "True"], broken.stderr
    warned = [line for line in broken.stderr.splitlines() if "CPU kernel is not used" in line]
    assert len(warned) == 1 and "RuntimeError" in warned[0], broken.stderr
    assert not any((tmp_path / "cache").glob("*.so")) and not any((tmp_path / "cache").glob("*.tmp*"))


class FirstMmOperand(TorchDispatchMode):
    """Records the data pointer and dtype of each aten.mm's first operand."""

    def __init__(self):
        super().__init__()
        self.first, self.dtypes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.mm.default:
            self.first.append(args[0].data_ptr())
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weight_left", [True, False])  # an AMD CPU / any other
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (3, 24), (4, 24), (5, 24), (16, 24), (2, 2, 24), (1, 3, 24)])
def test_small_float32_rows_take_the_weight_left_product_and_equal_f_linear(shape, weight_left, monkeypatch,
                                                                            torch_kernels):
    monkeypatch.setattr(L, "WEIGHT_LEFT", weight_left)
    torch.manual_seed(0)
    w, x = torch.randn(40, 24), torch.randn(*shape)
    with torch.no_grad(), FirstMmOperand() as mode:
        y = L.linear(x, w)
    rows = x.numel() // 24
    assert (mode.first == [w.data_ptr()]) == (weight_left and L.SMALL_ROWS[0] <= rows <= L.SMALL_ROWS[1])
    assert y.shape == (*shape[:-1], 40) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_autograd_and_bias_keep_f_linear(monkeypatch):
    counter = KernelCalls(monkeypatch)
    monkeypatch.setattr(L, "WEIGHT_LEFT", True)
    w = torch.randn(8, 6, requires_grad=True)
    x = torch.randn(3, 6)
    with FirstMmOperand() as mode:
        y = L.linear(x, w)
    assert mode.first[0] != w.data_ptr()  # training numerics are untouched
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(3, 8).t() @ x)
    lin = L.Linear(6, 8)  # with a bias
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    assert counter.calls == 0


@pytest.mark.parametrize("rows", [1, 3, 4, 32])
def test_bfloat16_rows_multiply_in_float32_without_native_bf16(monkeypatch, rows, torch_kernels):
    monkeypatch.setattr(L, "NATIVE_BF16", False)
    torch.manual_seed(1)
    w, x = torch.randn(64, 48).bfloat16(), torch.randn(rows, 48).bfloat16()
    with torch.no_grad(), FirstMmOperand() as mode:
        y = L.linear(x, w)
    assert y.dtype == torch.bfloat16
    assert mode.dtypes == [torch.float32 if rows >= L.UPCAST_ROWS else torch.bfloat16]
    up = F.linear(x.float(), w.float()).bfloat16()
    if rows >= L.UPCAST_ROWS:
        assert torch.equal(y, up)
    else:
        assert torch.equal(y, F.linear(x, w))
    torch.testing.assert_close(y.float(), up.float(), rtol=1e-2, atol=1e-2)  # either way the same product
    monkeypatch.setattr(L, "NATIVE_BF16", True)
    with torch.no_grad():
        assert torch.equal(L.linear(x, w), F.linear(x, w))


def test_the_model_s_linears_are_this_layer_with_nn_linear_s_names():
    from helpers import tiny_model
    model = tiny_model()
    assert isinstance(model.layers[0].attention.wq, L.Linear) and isinstance(model.output, torch.nn.Linear)
    assert "layers.0.feed_forward.w1.weight" in model.state_dict()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,out,n_in", [(1, 40, 24), (4, 7, 1000), (16, 576, 576)])
def test_the_kernel_s_int8_product_is_codes_times_row_scales(rows, out, n_in, dtype):
    """Weight-only int8 (weight_only.Int8Weight's decode step): x @ codes^T * scale, in float32 to rounding (bf16:
    one rounding of the result); a float weight takes no scale and int8 codes need one."""
    torch.manual_seed(4)
    q = torch.randint(-127, 128, (out, n_in), dtype=torch.int8)
    scale, x = (torch.rand(out) / 100).to(dtype), torch.randn(rows, n_in).to(dtype)
    y = cpu_kernels.small_linear(x, q, scale)
    exact = (x.double() @ q.double().t()) * scale.double()
    assert y.dtype == dtype and y.shape == (rows, out)
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    assert (y.double() - exact).abs().max() <= tol * exact.abs().max()
    with pytest.raises(RuntimeError, match="need a scale"):
        cpu_kernels.small_linear(x, q)
    with pytest.raises(RuntimeError, match="need a scale"):
        cpu_kernels.small_linear(x, q.to(dtype), scale)


@needs_kernel
def test_the_avx2_build_computes_the_same_products(tmp_path):
    """The kernel built for AVX2 + FMA only (-march=haswell: CPUs without AVX-512, e.g. AMD Zen 2/3) gives the same
    products, float32, bf16 and int8, tails included; run in its own process (one minillama_cpu library per
    process)."""
    code = f"""
import torch, torch.nn.functional as F
from pathlib import Path
from minillama import cpu_kernels
out = Path({str(tmp_path / "avx2.so")!r})
cpu_kernels.build(out, arch="haswell")
torch.ops.load_library(str(out))
torch.manual_seed(0)
for dt, tol in ((torch.float32, 1e-6), (torch.bfloat16, 8e-3)):
    for M in (1, 3, 4, 5, 16):
        for o, i in ((40, 24), (7, 1001), (3, 5)):
            x, w = torch.randn(M, i).to(dt), torch.randn(o, i).to(dt)
            q, s = torch.randint(-127, 128, (o, i), dtype=torch.int8), torch.rand(o).to(dt)
            for y, exact in ((torch.ops.minillama_cpu.small_linear(x, w, None), F.linear(x.double(), w.double())),
                             (torch.ops.minillama_cpu.small_linear(x, q, s), (x.double() @ q.double().t()) * s.double())):
                assert y.dtype == dt and (y.double() - exact).abs().max() <= tol * exact.abs().max(), (dt, M, o, i)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok"], proc.stderr[-2000:]
    if shutil.which("objdump"):  # binutils: no AVX-512 register in it
        assert "zmm" not in subprocess.run(["objdump", "-d", str(tmp_path / "avx2.so")], capture_output=True,
                                           text=True).stdout

"""minillama.linear: the model's linear layer picks its CPU kernel by rows and dtype, and the product stays F.linear's."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minillama import linear as L


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
def test_small_float32_rows_take_the_weight_left_product_and_equal_f_linear(shape, weight_left, monkeypatch):
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
    monkeypatch.setattr(L, "WEIGHT_LEFT", True)
    w = torch.randn(8, 6, requires_grad=True)
    x = torch.randn(3, 6)
    with FirstMmOperand() as mode:
        y = L.linear(x, w)
    assert mode.first[0] != w.data_ptr()  # training numerics are untouched
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.ones(3, 8).t() @ x)
    lin = L.Linear(6, 8)  # with a bias
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))


@pytest.mark.parametrize("rows", [1, 3, 4, 32])
def test_bfloat16_rows_multiply_in_float32_without_native_bf16(monkeypatch, rows):
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

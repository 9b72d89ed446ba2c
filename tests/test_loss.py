"""Loss properties: chunked == plain cross-entropy (value and gradients), packed == separate samples, prompt
positions contribute nothing, the router loss is HF's; and the optimizer's groups and LR schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from minillama.training.data import IGNORE, Sample
from minillama.training.loss import CausalLMLoss, chunked_cross_entropy, chunked_token_logprobs
from minillama.training.metrics import SavedActivations
from minillama.moe import load_balancing_loss
from minillama.training.optim import lr_at, param_groups
from minillama.training.packing import collate
from helpers import tiny_model

SMALL = dict(dim=32, vocab_size=97, hidden_dim=48)  # the shapes these tests were written for


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_chunked_equals_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :4] = IGNORE
    targets[2, 5:] = IGNORE
    ours = chunked_cross_entropy(hidden, head, targets, chunk_size=chunk)
    g_ours = torch.autograd.grad(ours, [hidden, head.weight])
    ref = F.cross_entropy(head(hidden).reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    g_ref = torch.autograd.grad(ref, [hidden, head.weight])
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_frozen_head_loss_and_logprobs_equal_plain_ones_and_keep_no_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)  # LoRA: the head does not train
    targets = torch.randint(0, 50, (3, 7))
    targets[0, :4] = IGNORE
    saved = SavedActivations()
    with saved:
        ours = chunked_cross_entropy(hidden * 1.0, head, targets, chunk_size=chunk)
    learned = int((targets != IGNORE).sum())
    assert saved.bytes < learned * 50 * 4 / 2  # rows of hidden and of its gradient, never (positions, vocabulary)
    ref = F.cross_entropy(head(hidden).reshape(-1, 50), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, hidden)[0], torch.autograd.grad(ref, hidden)[0])
    logps, pos = chunked_token_logprobs(hidden, head, targets, chunk_size=chunk)
    plain = torch.log_softmax(head(hidden).reshape(-1, 50), -1)[pos, targets.reshape(-1)[pos]]
    torch.testing.assert_close(logps, plain)
    g = torch.randn(len(pos))
    torch.testing.assert_close(torch.autograd.grad((logps * g).sum(), hidden)[0],
                               torch.autograd.grad((plain * g).sum(), hidden)[0])


def test_no_targets_gives_zero_loss_that_still_backpropagates():
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    loss = chunked_cross_entropy(hidden, head, torch.full((2, 3), IGNORE))
    loss.backward()  # FSDP ranks with nothing to learn must still run the same backward
    assert loss.item() == 0.0 and head.weight.grad is not None and head.weight.grad.abs().max() == 0


def _samples():
    g = torch.Generator().manual_seed(2)
    out = []
    for i, n in enumerate([9, 5, 12]):
        ids = torch.randint(0, 97, (n,), generator=g).tolist()
        mask = [False] * (n // 2) + [True] * (n - n // 2)
        out.append(Sample(ids, mask, i))
    return out


def test_packed_batch_loss_equals_unpacked():
    model = tiny_model(**SMALL)
    root = CausalLMLoss(model, chunk_size=4)
    samples = _samples()
    packed = collate(samples, [[0, 1, 2]], pad_id=0, packed=True)
    loss_p, _ = root(packed.tokens, packed.targets, packed.doc_ids, packed.real)
    grads_p = torch.autograd.grad(loss_p, list(model.parameters()))
    padded = collate(samples, [[0], [1], [2]], pad_id=0, packed=False)
    loss_u, _ = root(padded.tokens, padded.targets, padded.doc_ids, padded.real)
    grads_u = torch.autograd.grad(loss_u, list(model.parameters()))
    torch.testing.assert_close(loss_p, loss_u, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_p, grads_u):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the loss is the one full logits give on the answer tokens only
    ref = sum(F.cross_entropy(model(torch.tensor(s.ids)[None])[0], torch.tensor(s.targets()), ignore_index=IGNORE,
                              reduction="sum") for s in samples)
    torch.testing.assert_close(loss_p, ref, atol=1e-4, rtol=1e-5)


def test_prompt_positions_contribute_no_gradient():
    model = tiny_model(**SMALL)
    s = _samples()[2]
    mb = collate([s], [[0]], 0, packed=False)
    hidden = model(mb.tokens, return_hidden=True)
    hidden.retain_grad()
    chunked_cross_entropy(hidden, model.output, mb.targets).backward()
    learned = mb.targets[0] != IGNORE  # positions whose next token is an answer token
    assert hidden.grad[0, ~learned].abs().max() == 0
    assert (hidden.grad[0, learned].abs().sum(-1) > 0).all()


def test_router_loss_of_the_wrapper_excludes_padding():
    model = tiny_model(**SMALL, n_experts=4, n_experts_per_tok=2)
    root = CausalLMLoss(model)
    mb = collate(_samples(), [[0], [1], [2]], 0, packed=False)
    _, aux = root(mb.tokens, mb.targets, None, mb.real)
    logits = [layer.feed_forward.router_logits for layer in model.layers]
    torch.testing.assert_close(aux, load_balancing_loss(logits, 4, 2, token_mask=mb.real.reshape(-1)))
    assert not torch.allclose(aux, load_balancing_loss(logits, 4, 2))  # padding would change it
    aux.backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().max() > 0


def test_router_loss_of_an_all_padding_micro_batch_is_zero_not_nan():
    model = tiny_model(**SMALL, n_experts=4, n_experts_per_tok=2)
    mb = collate(_samples(), [[], []], 0, packed=True)  # the empty filler rows that top up an epoch's last batch
    assert not mb.real.any()
    ce, aux = CausalLMLoss(model)(mb.tokens, mb.targets, mb.doc_ids, mb.real)
    assert ce.item() == 0.0 and aux.item() == 0.0
    (ce + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_weight_decay_only_on_matrices():
    model = tiny_model(**SMALL)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert any(p is model.tok_embeddings.weight for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])


def test_lr_schedule_warmup_then_cosine_to_ten_percent():
    lrs = [lr_at(s, 1.0, 4, 20) for s in range(1, 21)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # non-increasing after warmup
    assert math.isclose(lrs[-1], 0.1) and math.isclose(lr_at(12, 1.0, 4, 20), 0.55)


def test_loss_png_draws_train_and_eval_curves_with_labelled_axes():
    import numpy as np

    from minillama.util.plot import BLUE, ORANGE, draw_text, draw_text_up, loss_curve_png, text_width
    steps = list(range(1, 25))
    img = loss_curve_png(steps, [3 - s / 12 for s in steps], [4, 8, 12], [3.1, 2.9, 2.6])
    ink = lambda color, part: int((part == np.array(color, np.uint8)).all(-1).sum())  # noqa: E731
    plot = img[40:430, 90:780]
    assert ink(BLUE, plot) > 500 and ink(ORANGE, plot) > 200  # both curves inside the axes
    assert ink(BLUE, img[:35]) and ink(ORANGE, img[:35])  # the legend names both series in their colours
    label = np.full((10, text_width("step"), 3), 255, np.uint8)
    draw_text(label, 0, 0, "step")
    x0 = 90 + 690 // 2 - text_width("step") // 2
    assert (img[480 - 18:480 - 8, x0:x0 + label.shape[1]] == label).all()  # x axis: "step"
    blank = np.full_like(img, 255)
    draw_text_up(blank, 12, 40 + 390 // 2 - text_width("loss") // 2, "loss")
    drawn = (blank != 255).any(-1)
    assert drawn.sum() > 20 and (img[drawn] == blank[drawn]).all()  # y axis: "loss", written upwards
    no_eval = loss_curve_png(steps, [3 - s / 12 for s in steps])
    assert ink(ORANGE, no_eval) == 0

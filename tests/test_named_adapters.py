"""Several named adapters on one model: each gives the logits of loading it alone, per-row selection in one batch
equals each row alone, None is the base model, weighted combinations equal the summed update, errors are clear."""

import pytest
import torch

from minillama.lora.peft import load_adapter, save_adapter
from minillama.lora.layers import apply_lora
from minillama.lora.slots import adapter_names, combine_adapters, set_adapter, set_row_adapters
from minillama.lora.merge import merge_lora, unmerge_lora
from test_dora import randomize_dora
from test_lora import MOE, tiny_model, tokens

# name -> (targets, rank, rslora, dora); each its own random factors
ADAPTERS = {"a": (("q_proj", "v_proj"), 4, False, False), "b": (("all-linear",), 2, False, True),
            "c": (("all-linear", "lm_head"), 8, True, False)}
MOE_ADAPTERS = {"a": (("q_proj", "v_proj"), 4, False, False), "b": (("all-linear",), 2, False, False),
                "c": (("experts", "router"), 8, True, False)}


@pytest.fixture(scope="module", params=["dense", "moe"])
def saved(request, tmp_path_factory):
    """(model overrides, {name: adapter dir}) for three different adapters of one tiny model."""
    overrides = MOE if request.param == "moe" else {}
    specs = MOE_ADAPTERS if overrides else ADAPTERS
    d = tmp_path_factory.mktemp(request.param)
    dirs = {}
    for seed, (name, (targets, rank, rslora, dora)) in enumerate(specs.items()):
        model = apply_lora(tiny_model(**overrides), rank=rank, alpha=2 * rank, targets=targets, use_rslora=rslora,
                           use_dora=dora)
        randomize_dora(model, seed=seed + 1, std=0.1)
        dirs[name] = save_adapter(model, d / name)
    return overrides, dirs


def alone(overrides, path, x):
    model = tiny_model(**overrides)
    load_adapter(model, path)
    with torch.no_grad():
        return model(x)


def all_loaded(overrides, dirs):
    model = tiny_model(**overrides)
    for name, path in dirs.items():
        load_adapter(model, path, name=name)
    return model


def test_each_named_adapter_gives_the_logits_of_loading_it_alone(saved):
    overrides, dirs = saved
    x = tokens()
    model = all_loaded(overrides, dirs)
    assert adapter_names(model) == ["a", "b", "c"]
    with torch.no_grad():
        first = model(x)  # the first adapter loaded is the one in use, as in PEFT
        for name, path in dirs.items():
            set_adapter(model, name)
            ref = alone(overrides, path, x)
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-5, msg=name)
            if name == "a":
                torch.testing.assert_close(first, ref, atol=1e-5, rtol=1e-5)
        set_adapter(model, None)
        assert torch.equal(model(x), tiny_model(**overrides)(x))  # no adapter: the base model, bit for bit
        assert not torch.allclose(alone(overrides, dirs["a"], x), alone(overrides, dirs["c"], x), atol=1e-2)


def test_per_row_selection_in_one_batch_equals_each_row_alone(saved):
    overrides, dirs = saved
    rows = ["c", None, "a", "b", "a"]
    x = tokens(seed=3, shape=(len(rows), 10))
    model = all_loaded(overrides, dirs)
    set_row_adapters(model, rows)
    with torch.no_grad():
        mixed = model(x)
    base = tiny_model(**overrides)
    for i, name in enumerate(rows):
        with torch.no_grad():
            ref = base(x[i:i + 1]) if name is None else alone(overrides, dirs[name], x[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], ref, atol=1e-5, rtol=1e-5, msg=f"row {i} ({name})")


def test_weighted_combination_equals_the_summed_update_and_saves_as_one_adapter(saved, tmp_path):
    overrides, dirs = saved
    x = tokens()
    model = all_loaded(overrides, dirs)
    if not overrides:  # DoRA rescales the whole weight: it does not add up with other updates
        with pytest.raises(ValueError, match="DoRA adapter 'b' can only be used alone"):
            set_adapter(model, {"a": 0.5, "b": 0.5})
    weights = {"a": 0.7, "c": -0.3}
    set_adapter(model, weights)
    with torch.no_grad():
        combined = model(x)
    ref = tiny_model(**overrides)  # W + 0.7 delta_a - 0.3 delta_c, folded into the weights
    load_adapter(ref, dirs["a"], name="a")
    load_adapter(ref, dirs["c"], name="c")
    set_adapter(ref, weights)
    merge_lora(ref)
    with torch.no_grad():
        torch.testing.assert_close(combined, ref(x), atol=1e-4, rtol=1e-4)
    unmerge_lora(ref)
    combine_adapters(model, weights, "ac")  # PEFT's "cat": one adapter of rank 4 + 8
    set_adapter(model, "ac")
    with torch.no_grad():
        torch.testing.assert_close(model(x), combined, atol=1e-5, rtol=1e-5)
    save_adapter(model, tmp_path / "ac", name="ac")
    torch.testing.assert_close(alone(overrides, tmp_path / "ac", x), combined, atol=1e-5, rtol=1e-5)


def test_loading_over_a_name_replaces_that_adapter_only(saved):
    overrides, dirs = saved
    x = tokens()
    model = all_loaded(overrides, dirs)
    load_adapter(model, dirs["a"], name="c")  # "c" now means a's file; a's other modules add nothing for it
    set_adapter(model, "c")
    with torch.no_grad():
        torch.testing.assert_close(model(x), alone(overrides, dirs["a"], x), atol=1e-5, rtol=1e-5)
        set_adapter(model, "b")
        torch.testing.assert_close(model(x), alone(overrides, dirs["b"], x), atol=1e-5, rtol=1e-5)


def test_unknown_names_and_bad_selections_fail_naming_the_loaded_adapters(saved):
    overrides, dirs = saved
    model = all_loaded(overrides, dirs)
    with pytest.raises(ValueError, match="no adapter named 'z'; loaded: a, b, c"):
        set_adapter(model, "z")
    with pytest.raises(ValueError, match="no adapter named 'z'; loaded: a, b, c"):
        set_row_adapters(model, ["a", "z"])
    with pytest.raises(ValueError, match="expected a non-empty list"):
        set_row_adapters(model, "a")
    with pytest.raises(ValueError, match="already loaded"):
        combine_adapters(model, {"a": 1.0}, "b")
    with pytest.raises(ValueError, match="say which"):
        save_adapter(model, "unused")
    set_row_adapters(model, ["a", "b"])
    with pytest.raises(ValueError, match="set_row_adapters named 2 rows"):
        with torch.no_grad():
            model(tokens(shape=(3, 5)))
    with pytest.raises(ValueError, match="no adapters"):
        set_adapter(tiny_model(), "a")

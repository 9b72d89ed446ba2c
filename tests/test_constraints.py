"""minillama/inference/constraints.py on the real SmolLM2 tokenizer: every token path the mask allows ends in output
that matches the schema / regex, and a greedy decode of the embedded model under the mask is valid JSON."""

import json
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from minillama import load_model  # noqa: E402
from minillama.inference import constraints as C  # noqa: E402
from minillama.tokenizer.tokenizer import load_tokenizer  # noqa: E402

REVIEW = {"type": "object", "additionalProperties": False, "required": ["stars", "verdict", "tags"],
          "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "verdict": {"enum": ["good", "bad", "meh"]},
                         "tags": {"type": "array", "maxItems": 2, "items": {"type": "string", "maxLength": 6}},
                         "note": {"type": "boolean"}}}


@pytest.fixture(scope="module")
def tok(smol_dir):
    return load_tokenizer(smol_dir)


@pytest.fixture(scope="module")
def vocab(tok):
    return C.grammar_vocab(tok)


def random_walk(tok, vocab, c, seed, max_steps=300):
    """Pick uniformly among the allowed tokens until only a stop token is allowed; returns the text."""
    g = torch.Generator().manual_seed(seed)
    state, ids = C.new_row_state(vocab, c), []
    for _ in range(max_steps):
        mask = C.allowed(state)
        choices = mask.nonzero().flatten()
        assert len(choices) > 0, "the mask allows nothing: the row would be stuck"
        t = int(choices[torch.randint(len(choices), (1,), generator=g)])
        if t in vocab.stop_ids:
            return tok.decode(ids)
        C.advance(state, t)
        ids.append(t)
    raise AssertionError(f"no end after {max_steps} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("seed", range(6))
def test_every_path_the_schema_mask_allows_is_a_valid_document(tok, vocab, seed):
    text = random_walk(tok, vocab, C.Constraint("json_schema", REVIEW), seed)
    jsonschema.validate(json.loads(text), REVIEW)


@pytest.mark.parametrize("seed", range(4))
def test_every_path_the_regex_mask_allows_matches_the_regex(tok, vocab, seed):
    rx = r"[a-c]{2,5}-[0-9]{3}( ok)?"
    assert re.fullmatch(rx, random_walk(tok, vocab, C.Constraint("regex", rx), seed))


def test_json_object_mask_starts_with_a_brace_and_stops_only_when_complete(tok, vocab):
    state = C.new_row_state(vocab, C.Constraint("json_object"))
    assert all(tok.decode([int(t)]).startswith("{") for t in C.allowed(state).nonzero().flatten())
    for t in tok.encode('{"a":[1,', bos=False):
        C.advance(state, t)
    assert not C.allowed(state)[list(vocab.stop_ids)].any()  # an unfinished object cannot end
    with pytest.raises(ValueError, match="not allowed"):
        C.advance(state, tok.encode("}", bos=False)[0])


def test_mask_covers_a_model_vocab_larger_than_the_tokenizer(vocab):
    state = C.new_row_state(vocab, C.Constraint("regex", "x+"))
    mask = C.allowed(state, vocab.size + 64)
    assert mask.shape == (vocab.size + 64,) and not mask[vocab.size:].any()


def test_mask_logits_leaves_free_rows_alone(vocab):
    logits = torch.randn(2, vocab.size)
    out = C.mask_logits(logits, [None, C.new_row_state(vocab, C.Constraint("regex", "ab"))])
    assert torch.equal(out[0], logits[0]) and torch.isinf(out[1]).sum() == vocab.size - C.allowed(
        C.new_row_state(vocab, C.Constraint("regex", "ab"))).sum()


@pytest.mark.parametrize("bad", [C.Constraint("regex", "(unclosed"), C.Constraint("json_schema", "not a dict"),
                                 C.Constraint("lark", "start: undefined_rule"), C.Constraint("yaml", "")])
def test_a_bad_constraint_is_a_value_error(vocab, bad):
    with pytest.raises(ValueError):
        C.new_row_state(vocab, bad)


@pytest.mark.parametrize("rf, kind", [(None, None), ({"type": "text"}, None), ({"type": "json_object"}, "json_object"),
                                      ({"type": "json_schema", "json_schema": {"name": "r", "schema": REVIEW,
                                                                               "strict": True}}, "json_schema"),
                                      ({"type": "regex", "regex": "a+"}, "regex")])
def test_response_format_parses(rf, kind):
    c = C.parse_response_format(rf)
    assert (c and c.kind) == kind


@torch.no_grad()
def test_greedy_decode_of_smollm2_under_the_mask_is_valid_json(smollm2_dir, one_thread):
    model, tok = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    vocab = C.grammar_vocab(tok)
    state = C.new_row_state(vocab, C.Constraint("json_schema", REVIEW))
    seq = tok.encode_dialog([{"role": "user", "content": "Review the film Alien as JSON."}])
    out = []
    for _ in range(80):
        logits = C.mask_logits(model(torch.tensor([seq]))[:, -1], [state])  # (1, V)
        t = int(logits.argmax(-1))
        if t in vocab.stop_ids:
            break
        C.advance(state, t)
        seq.append(t)
        out.append(t)
    jsonschema.validate(json.loads(tok.decode(out)), REVIEW)

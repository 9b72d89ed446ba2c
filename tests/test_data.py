"""SFT data: every JSONL shape becomes the same dialog, only answers are learned, bad lines are reported, the length
rule keeps answers, packing keeps samples whole and the batch plan is deterministic."""

import json

import pytest
import torch

from minillama.training.data import IGNORE, Sample, fit_to_length, load_jsonl, to_messages
from minillama.training.packing import collate, pack_rows, padded_tokens, plan_epoch
from minillama.tokenizer.tokenizer import load_tokenizer
from sft_helpers import write_byte_tokenizer, write_jsonl

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
          {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(d)
    return load_tokenizer(d)


def test_all_shapes_give_the_same_dialog():
    shapes = {
        "chat": {"messages": DIALOG},
        "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                       {"from": "gpt", "value": "Hello."}]},
        "xtuner": {"conversation": [{"system": "Be brief.", "input": "Hi?", "output": "Hello."}]},
        "alpaca": {"system": "Be brief.", "instruction": "Hi?", "output": "Hello."},
    }
    for name, record in shapes.items():
        shape, msgs = to_messages(record)
        assert shape == name and msgs == DIALOG, name
    assert to_messages({"instruction": "Sum", "input": "1 2", "output": "3"})[1][0]["content"] == "Sum\n\n1 2"
    assert to_messages({"text": "plain"}) == ("text", "plain")


def test_only_assistant_tokens_are_learned(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": DIALOG + [{"role": "user", "content": "More?"},
                                                                     {"role": "assistant", "content": "No."}]}])
    (s,), stats = load_jsonl(path, tok, seq_len=512)
    learned = tok.decode([t for t, m in zip(s.ids, s.mask) if m])
    assert learned == "Hello.<|im_end|>No.<|im_end|>"
    targets = s.targets()
    assert len(targets) == len(s.ids) and targets[-1] == IGNORE
    assert [t for t in targets if t != IGNORE] == [t for t, m in zip(s.ids[1:], s.mask[1:]) if m]
    assert stats.target_tokens == s.n_targets() == len(tok.encode("Hello.No.", bos=False)) + 2


def test_bad_lines_are_reported_and_skipped(tmp_path, tok):
    lines = [{"messages": DIALOG}, "{not json", json.dumps([1, 2]), {"messages": [{"role": "user"}]},
             {"instruction": 3, "output": "x"}, {"foo": 1}, {"messages": [{"role": "robot", "content": "x"}]},
             "", {"text": "fine text"}]
    path = write_jsonl(tmp_path / "d.jsonl", [x if isinstance(x, str) else json.dumps(x) for x in lines])
    samples, stats = load_jsonl(path, tok, seq_len=512)
    assert [s.line for s in samples] == [1, 9]
    assert [n for n, _ in stats.bad] == [2, 3, 4, 5, 6, 7]
    reasons = dict(stats.bad)
    assert "messages[0]" in reasons[4] and "instruction" in reasons[5] and "robot" in reasons[7]
    assert stats.shapes == {"chat": 1, "text": 1} and stats.lines == 8
    bad_only = write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.raises(ValueError, match="no usable samples.*line 1"):
        load_jsonl(bad_only, tok, seq_len=512)


def test_long_prompt_loses_its_middle_and_keeps_the_answer(tok):
    msgs = [{"role": "user", "content": "START " + "x" * 200 + " END?"}, {"role": "assistant", "content": "Answer!"}]
    ids, mask = tok.encode_dialog_with_mask(msgs)
    prompt = mask.index(True)
    cut_ids, cut_mask, how = fit_to_length(ids, mask, 100)
    assert how == "prompt_cut" and len(cut_ids) == 100
    assert cut_ids[-(len(ids) - prompt):] == ids[prompt:] and cut_mask.count(True) == mask.count(True)
    text = tok.decode(cut_ids)
    assert text.startswith("<|im_start|>user\nSTART") and "END?<|im_end|>\n<|im_start|>assistant\n" in text
    # an answer that cannot fit even with the whole prompt gone: the end is cut
    ids2, mask2 = tok.encode_dialog_with_mask([{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "y" * 300}])
    out_ids, _, how2 = fit_to_length(ids2, mask2, 100)
    assert how2 == "answer_cut" and out_ids == ids2[:100]


def test_length_rule_counts_and_drop_long(tmp_path, tok):
    recs = [{"messages": [{"role": "user", "content": "p" * 300}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 300}]},
            {"text": "t" * 250}, {"messages": DIALOG}]
    path = write_jsonl(tmp_path / "d.jsonl", recs)
    samples, stats = load_jsonl(path, tok, seq_len=100)
    assert (stats.prompt_cut, stats.answer_cut, stats.split, stats.dropped_long) == (1, 1, 1, 0)
    assert all(len(s.ids) <= 100 for s in samples) and len(samples) == 1 + 1 + 3 + 1  # text split in 3 pieces
    kept, dstats = load_jsonl(path, tok, seq_len=100, drop_long=True)
    assert dstats.dropped_long == 3 and [s.line for s in kept] == [4]


def _samples(lengths):
    return [Sample(list(range(10, 10 + n)), [False] * (n // 2) + [True] * (n - n // 2), i)
            for i, n in enumerate(lengths)]


def test_packing_keeps_samples_whole_and_rows_within_seq_len():
    lengths = [int(x) for x in torch.randint(1, 40, (300,), generator=torch.Generator().manual_seed(0))]
    rows = pack_rows(lengths, list(range(len(lengths))), seq_len=64)
    assert sorted(i for r in rows for i in r) == list(range(300))  # each sample exactly once
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert sum(lengths) / (64 * len(rows)) > 0.9  # first-fit fills rows well
    with pytest.raises(ValueError, match="seq_len 64"):
        pack_rows([65], [0], 64)


def test_batch_plan_is_deterministic_and_full():
    lengths = [int(x) for x in torch.randint(1, 40, (50,), generator=torch.Generator().manual_seed(1))]
    for pack in (False, True):
        a = plan_epoch(lengths, 8, 64, pack, seed=3, epoch=0)
        assert a == plan_epoch(lengths, 8, 64, pack, seed=3, epoch=0)
        assert a != plan_epoch(lengths, 8, 64, pack, seed=3, epoch=1)
        assert all(len(b) == 8 for b in a)  # the last batch is topped up with empty rows
        assert sorted(i for b in a for r in b for i in r) == list(range(50))
    # grouping by length pads less than a random order
    grouped = plan_epoch(lengths * 20, 8, 64, False, seed=0, epoch=0)
    rng = torch.Generator().manual_seed(0)
    order = torch.randperm(1000, generator=rng).tolist()
    random_batches = [[[i] for i in order[b:b + 8]] for b in range(0, 1000, 8)]
    L = lengths * 20
    assert sum(padded_tokens(b, L, 8) for b in grouped) < 0.8 * sum(padded_tokens(b, L, 8) for b in random_batches)


def test_collate_packed_rows():
    samples = _samples([5, 3, 4])
    mb = collate(samples, [[0, 1], [2]], pad_id=0, packed=True)
    assert mb.tokens.shape == (2, 8) and mb.n_real == 12
    assert mb.doc_ids[0].tolist() == [0] * 5 + [1] * 3 and mb.doc_ids[1].tolist() == [0] * 4 + [1] * 4
    assert mb.real[1].tolist() == [True] * 4 + [False] * 4
    assert mb.targets[0, :5].tolist() == samples[0].targets()  # the last target of a doc never crosses into the next
    assert mb.targets[0, 4] == IGNORE and (mb.targets[1, 4:] == IGNORE).all()
    assert collate(samples, [[0], []], 0, packed=False).doc_ids is None

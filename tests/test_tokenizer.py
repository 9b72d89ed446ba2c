"""Tokenizers match their references token for token: Meta's Llama 3, mistral-common/SentencePiece, HF tokenizers."""

import copy
import json
import random
import shutil
from pathlib import Path

import pytest

from minillama.tokenizer.tokenizer import StreamDecoder, load_tokenizer

SITE = Path(__import__("tiktoken").__file__).parent.parent
LLAMA3_MODEL = SITE / "llama_models/llama3/tokenizer.model"
MISTRAL_MODEL = SITE / "mistral_common/data/tokenizer.model.v1"

CORPUS = [
    "Hello, world! How's it going? I'm fine; they'll see. DON'T SHOUT.",
    "中文分词测试：今天天气很好。我们去公园散步吧！",
    "def f(x):\n    return x**2  # square\n\n\tif x > 10: print(f'{x:>8}')\r\n}",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷 ✨",
    "   leading spaces and\ttabs\n\n\n   trailing   ",
    "numbers 1234567890 3.14159 1e-10 -42 12,345 ٣٤٥ 2024年 x  1\n\n2   33",
    "special lookalikes <|begin_of_text|> <|eot_id|> <s> </s> [INST] <|im_start|>user <<SYS>> <|im_end|>",
    "Ünïcödé façade naïve café Ελληνικά русский العربية हिन्दी 日本語のテキスト 한국어",
    "", " ", "\n", "a", "  ", "\n\n \n", "1", " 12",
]
STREAM_TEXT = "你好，世界！Emoji: 😀🎉👨‍👩‍👧 and ünïcödé, 日本語テキスト, 한국어 텍스트 🇯🇵."


def fuzz_corpus(n: int, seed: int = 0) -> list[str]:
    """Random strings over a pool rich in the cases pre-tokenizers disagree on: digits, space runs, newlines."""
    pool = list("ab Zé1234567890 \t\n\r.,'!?-_()[]{}<>|#") + ["  ", "   ", "\n\n", "中", "文", "😀", "'s", "'LL",
                                                               "٣", "½", "\u00a0", "\u3000", "ñ", "ß"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="session")
def llama3():
    return load_tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="session")
def meta_llama3():
    from llama_models.llama3.tokenizer import Tokenizer
    return Tokenizer(LLAMA3_MODEL)


@pytest.fixture(scope="session")
def mistral():
    return load_tokenizer(MISTRAL_MODEL)


@pytest.fixture(scope="session")
def smol_digits_json(smol_dir, tmp_path_factory) -> Path:
    """The same vocab with SmolLM2's original pre-tokenizer: Sequence[Digits(individual), ByteLevel]."""
    spec = json.loads((smol_dir / "tokenizer.json").read_text())
    byte_level = copy.deepcopy(spec["pre_tokenizer"])
    assert byte_level["type"] == "ByteLevel"
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    path = tmp_path_factory.mktemp("smol_digits") / "tokenizer.json"
    path.write_text(json.dumps(spec))
    return path


def hf_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(path))


# ---- Llama 3 (tiktoken) ----

def test_llama3_matches_meta(llama3, meta_llama3):
    for text in CORPUS + fuzz_corpus(300):
        for bos, eos in [(True, False), (False, True)]:
            ref = meta_llama3.encode(text, bos=bos, eos=eos)
            assert llama3.encode(text, bos=bos, eos=eos) == ref, text
        assert llama3.decode(ref) == meta_llama3.decode(ref)
        assert llama3.encode(text, bos=False, allow_special=True) == \
            meta_llama3.encode(text, bos=False, eos=False, allowed_special="all"), text


def test_llama3_ids(llama3, meta_llama3):
    assert (llama3.bos_id, llama3.eos_id, llama3.pad_id) == (meta_llama3.bos_id, meta_llama3.eos_id,
                                                             meta_llama3.pad_id)
    assert sorted(llama3.stop_ids) == sorted(meta_llama3.stop_tokens)
    assert llama3.vocab_size == meta_llama3.n_words == 128256
    assert llama3.special_tokens == meta_llama3.special_tokens
    assert llama3.chat_format == "llama3"


def test_special_text_never_becomes_special(llama3, mistral, smol_dir):
    smol = load_tokenizer(smol_dir)
    for tok in (llama3, mistral, smol):
        specials = set(tok.special_tokens.values())
        ids = tok.encode(CORPUS[6], bos=False)
        assert not specials & set(ids), tok.kind
        assert tok.decode(ids) == CORPUS[6]
    assert llama3.encode("<|eot_id|>", bos=False, allow_special=True) == [128009]
    assert mistral.encode("</s>", bos=False, allow_special=True) == [mistral.eos_id]
    assert smol.encode("a<|im_end|>", bos=False, allow_special=True)[-1] == 2


# ---- Mistral / Llama 2 (SentencePiece) ----

def test_mistral_matches_mistral_common_and_sentencepiece(mistral):
    import sentencepiece
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    ref = MistralTokenizer.from_file(str(MISTRAL_MODEL)).instruct_tokenizer.tokenizer
    sp = sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL_MODEL))
    for text in CORPUS + fuzz_corpus(300):
        ids = mistral.encode(text, bos=True, eos=True)
        assert ids == ref.encode(text, bos=True, eos=True), text
        assert ids == [sp.bos_id()] + sp.encode(text) + [sp.eos_id()], text
        assert mistral.decode(ids) == ref.decode(ids) == sp.decode(ids)
    assert (mistral.bos_id, mistral.eos_id, mistral.vocab_size, mistral.stop_ids) == (1, 2, 32000, [2])


# ---- HF byte-level BPE tokenizer.json (SmolLM2) ----

@pytest.mark.parametrize("variant", ["transformers_gguf", "digits_sequence"])
def test_smollm2_json_matches_transformers(variant, smol_dir, smol_digits_json):
    path = smol_dir / "tokenizer.json" if variant == "transformers_gguf" else smol_digits_json
    ours, ref = load_tokenizer(path), hf_tokenizer(path)
    for text in CORPUS + fuzz_corpus(300) + ["a\U00040000b"]:  # U+40000: bytes missing from the vocab
        assert ours.encode(text, bos=False, allow_special=True) == \
            ref.encode(text, add_special_tokens=False), text
        plain = ours.encode(text, bos=False)
        assert plain == ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], text
        assert ours.decode(plain) == ref.decode(plain)
    if variant == "digits_sequence":  # Digits(individual_digits) really applied: no multi-digit pieces
        assert ours.encode("  12", bos=False) == ref.encode("  12", add_special_tokens=False)


def test_prepare_smollm2_output_matches_transformers(smollm2_dir):
    """The tokenizer.json/config written by weights/prepare_smollm2.py (no transformers) loads identically."""
    from transformers import AutoTokenizer
    ours, ref = load_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)
    assert (ours.bos_id, ours.eos_id, ours.chat_format) == (ref.bos_token_id, ref.eos_token_id, "chatml")
    for text in CORPUS + fuzz_corpus(100, seed=2):
        ids = ours.encode(text, bos=True, allow_special=True)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=False)
    dialog = [{"role": "user", "content": "Count 1 2 3, 中文 😀"}, {"role": "assistant", "content": "1 2 3!"},
              {"role": "user", "content": "again"}]
    expected = ref.apply_chat_template(dialog, tokenize=True, add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours.encode_dialog(dialog) == list(expected)


def test_smollm2_dir_settings(smol_dir):
    tok = load_tokenizer(smol_dir)
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == ("hf-bpe", 1, 2, 2, 49152)
    assert tok.chat_format == "chatml"
    assert 2 in tok.stop_ids
    assert tok.encode("hi", bos=True) == tok.encode("hi", bos=False)  # SmolLM2 never prepends a BOS


def test_llama3_tokenizer_json_matches_meta(tmp_path, meta_llama3):
    """Llama 3 as HF ships it (tokenizer.json: Split regex + ByteLevel, ignore_merges) == Meta's tiktoken."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from llama_models.llama3.tokenizer import Tokenizer
    conv = TikTokenConverter(vocab_file=str(LLAMA3_MODEL), pattern=Tokenizer.pat_str,
                             extra_special_tokens=list(meta_llama3.special_tokens))
    conv.converted().save(str(tmp_path / "tokenizer.json"))
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert spec["pre_tokenizer"]["type"] == "Sequence"
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    for text in CORPUS + fuzz_corpus(100, seed=1):
        assert tok.encode(text, bos=False) == meta_llama3.encode(text, bos=False, eos=False), text
    assert tok.chat_format == "llama3"


# ---- streaming ----

def _stream(tok, ids):
    dec = StreamDecoder(tok)
    parts = [dec.push(i) for i in ids]
    return parts, "".join(parts) + dec.flush()


def test_stream_decoder_equals_decode(llama3, mistral, smol_dir):
    smol = load_tokenizer(smol_dir)
    for tok in (llama3, mistral, smol):
        for text in [STREAM_TEXT, " " + STREAM_TEXT, "😀", "\n中文 end"] + CORPUS:
            ids = tok.encode(text, bos=True, eos=True)
            parts, joined = _stream(tok, ids)
            assert joined == tok.decode(ids), (tok.kind, text)
            assert not any("\ufffd" in p for p in parts), (tok.kind, parts)  # never half a character


def test_stream_decoder_sentencepiece_any_ids(mistral):
    """Every id sequence (byte pieces, <unk>, controls, '▁' pieces) streams to exactly sp.decode."""
    rng = random.Random(0)
    pool = [0, 1, 2, 3 + 0xE4, 3 + 0xB8, 3 + 0xAD, 3 + 0x41, mistral.sp.piece_to_id("\u2581"),
            mistral.sp.piece_to_id("\u2581Hello"), mistral.sp.piece_to_id("o")]
    for _ in range(300):
        ids = [rng.choice(pool + [rng.randrange(32000)]) for _ in range(rng.randint(1, 8))]
        assert _stream(mistral, ids)[1] == mistral.decode(ids), ids


# ---- loading and bad input ----

def test_checkpoint_dirs_pick_tokenizer_and_format(tmp_path):
    meta = tmp_path / "llama3_hf"
    (meta / "original").mkdir(parents=True)
    shutil.copy(LLAMA3_MODEL, meta / "original/tokenizer.model")
    (meta / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 128256}))
    assert load_tokenizer(meta).chat_format == "llama3"
    assert load_tokenizer(meta / "original/tokenizer.model").family == "llama3"

    mis = tmp_path / "mistral"
    mis.mkdir()
    shutil.copy(MISTRAL_MODEL, mis / "tokenizer.model")
    (mis / "config.json").write_text(json.dumps({"model_type": "mistral", "vocab_size": 32000}))
    assert load_tokenizer(mis).chat_format == "mistral"
    (mis / "config.json").unlink()
    assert load_tokenizer(mis).chat_format == "llama2"  # a bare 32K SentencePiece model: Llama 2 default
    (mis / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ '[INST] ' + m + ' [/INST]' }}"}))
    assert load_tokenizer(mis).chat_format == "mistral"
    assert load_tokenizer(mis, chat_format="chatml").chat_format == "chatml"
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'; expected one of llama2, llama3"):
        load_tokenizer(mis, chat_format="vicuna")


def test_bad_tokenizer_files(tmp_path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n not a tokenizer")
    with pytest.raises(ValueError, match=r"tokenizer\.model: unknown tokenizer format.*PNG"):
        load_tokenizer(junk)
    empty = tmp_path / "empty_ckpt"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_ckpt: no tokenizer.model, original/tokenizer.model or"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    metaspace = tmp_path / "sp_style" / "tokenizer.json"
    metaspace.parent.mkdir()
    metaspace.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}, "merges": []}, "normalizer": None,
                                     "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}))
    with pytest.raises(ValueError, match=r"sp_style/tokenizer\.json: pre_tokenizer type 'Metaspace' unsupported"):
        load_tokenizer(metaspace)
    wordpiece = tmp_path / "wp" / "tokenizer.json"
    wordpiece.parent.mkdir()
    wordpiece.write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(ValueError, match=r"wp/tokenizer\.json: model\.type is 'WordPiece'; expected 'BPE'"):
        load_tokenizer(wordpiece)


def test_bad_encode_decode_input(llama3, mistral):
    for tok in (llama3, mistral):
        with pytest.raises(ValueError, match="encode expects a str, got bytes"):
            tok.encode(b"hi")
    with pytest.raises(ValueError, match="token id 999999 is not in the vocabulary"):
        llama3.decode([1, 999999])


def test_malformed_json_files_are_named_not_crashes(tmp_path, smol_dir):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(smol_dir / "tokenizer.json", d)
    cases = [("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json: expected a JSON object, found a JSON list"),
             ("tokenizer_config.json", '{"chat_template": 5}', r"tokenizer_config\.json: chat_template must be"),
             ("config.json", "[1]", r"config\.json: expected a JSON object")]
    for name, text, match in cases:
        for stale in ("tokenizer_config.json", "config.json"):
            (d / stale).unlink(missing_ok=True)
        (d / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_tokenizer(d)
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    for spec, match in [({"model": {"type": "BPE"}, "pre_tokenizer": byte_level}, r"malformed tokenizer\.json \(KeyError"),
                        ({"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": byte_level}, "model.vocab is empty"),
                        ({"model": "BPE"}, r"malformed tokenizer\.json")]:
        bad.write_text(json.dumps(spec))
        with pytest.raises(ValueError, match=rf"bad/tokenizer\.json: .*{match}"):
            load_tokenizer(bad)


def test_decode_cut_drops_a_character_cut_in_half_where_decode_gives_replacement(smol_dir):
    from minillama.tokenizer.tokenizer import decode_cut
    tok = load_tokenizer(smol_dir)
    ids = tok.encode("Hi \U0001F60A there", bos=False)
    cut = next(k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))  # inside the emoji
    assert decode_cut(tok, ids[:cut]) == tok.decode(ids[:cut]).rstrip("\ufffd") == "Hi "
    assert decode_cut(tok, ids) == tok.decode(ids) == "Hi \U0001F60A there"

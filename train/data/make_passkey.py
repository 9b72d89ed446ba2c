"""A deterministic long-context fine-tuning set: passkey retrieval and multi-fact QA in samples of 2-4K tokens.

    python train/data/make_passkey.py --out out/longctx/passkey.jsonl            # 48 samples, SmolLM2's tokenizer
    python train/data/make_passkey.py --out d.jsonl --samples 200 --min_tokens 4096 --max_tokens 8192 --tokenizer DIR

Two kinds of chat samples, in turn:
  passkey  the task generate/eval_long.py asks (the same instruction, needle and question wording, a random 5-digit
           key at a random depth), answered "The pass key is 12345."
  facts    3-5 "The secret number of NAME is 12345." facts at random depths; then one question per fact, each as a
           user turn answered by an assistant turn, so one long prompt teaches several retrievals
The haystack is drawn from a pool of generated sentences unlike the eval's filler ("The grass is green. ..."): the
evaluation then measures retrieval from a haystack the model was not trained on. Sizes are measured with the
tokenizer (default: the embedded SmolLM2's): each whole sample fills a target drawn from [--min_tokens,
--max_tokens] to within one haystack sentence, never more (train with --seq_len >= --max_tokens: nothing is cut).
The same flags always give the same file; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from generate.eval_long import INTRO, QUESTION, most_that_fit  # noqa: E402  the eval's wording: same task, other haystack
from minillama.util.cli import DEFAULT_CKPT, HelpFormatter, positive_int, run  # noqa: E402
from minillama.util.files import atomic_write  # noqa: E402

FACTS_INTRO = "Below is a long text. Some sentences in it give the secret numbers of people. Remember them.\n\n"

NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lucia",
         "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tamar", "Umar", "Vera", "Wendell", "Yusuf"]
SUBJECTS = ["The old miller", "A tired traveller", "The river", "Our neighbour", "The little dog", "A quiet student",
            "The baker", "The north wind", "A grey heron", "The ferryman", "The village choir", "A lost kite"]
VERBS = ["walked past", "looked at", "waited near", "sang about", "painted", "followed", "forgot", "remembered",
         "circled", "cleaned", "counted", "dreamed of"]
OBJECTS = ["the stone bridge", "a field of barley", "the harbour lights", "an empty market", "the clock tower",
           "a basket of apples", "the frozen pond", "a row of poplars", "the winding road", "an open window",
           "the copper kettle", "a pile of letters"]
ENDINGS = ["before the rain came.", "in the early morning.", "for a long while.", "without a word.",
           "as the bells rang.", "under a pale sky.", "and then went home.", "while the bread was baking."]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)} "


def fit(build, budget: int, tok) -> int:
    """The most haystack sentences n for which the whole sample build(n) has at most budget tokens."""
    return most_that_fit(lambda n: len(tok.encode_dialog(build(n), add_generation_prompt=False)), budget)


def passkey_sample(rng: random.Random, target: int, tok) -> list[dict]:
    key, depth = str(rng.randint(10000, 99999)), rng.random()
    hay = [sentence(rng) for _ in range(target)]  # more than enough (a sentence is several tokens); cut to fit below

    def build(n: int) -> list[dict]:
        at = round(depth * n)
        text = (INTRO + "".join(hay[:at]) + f"The pass key is {key}. Remember it. {key} is the pass key. "
                + "".join(hay[at:n]) + QUESTION)
        return [{"role": "user", "content": text}, {"role": "assistant", "content": f"The pass key is {key}."}]

    return build(fit(build, target, tok))


def facts_sample(rng: random.Random, target: int, tok) -> list[dict]:
    people = rng.sample(NAMES, rng.randint(3, 5))
    numbers = {p: str(rng.randint(10000, 99999)) for p in people}
    depths = sorted(rng.random() for _ in people)
    hay = [sentence(rng) for _ in range(target)]
    order = rng.sample(people, len(people))  # asked in another order than they appear

    def build(n: int) -> list[dict]:
        parts, last = [], 0
        for p, d in zip(people, depths):
            at = round(d * n)
            parts += hay[last:at] + [f"The secret number of {p} is {numbers[p]}. "]
            last = at
        parts += hay[last:n]
        first = f"What is the secret number of {order[0]}?"
        turns = [{"role": "user", "content": FACTS_INTRO + "".join(parts) + "\n\n" + first}]
        for i, p in enumerate(order):
            if i:
                turns.append({"role": "user", "content": f"What is the secret number of {p}?"})
            turns.append({"role": "assistant", "content": f"The secret number of {p} is {numbers[p]}."})
        return turns

    return build(fit(build, target, tok))


def make_samples(n: int, min_tokens: int, max_tokens: int, seed: int, tok) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        target = rng.randint(min_tokens, max_tokens)
        make = passkey_sample if i % 2 == 0 else facts_sample
        out.append({"messages": make(rng, target, tok)})
    return out


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--samples", type=positive_int, default=48)
    p.add_argument("--min_tokens", type=positive_int, default=2048, help="shortest sample, in tokens")
    p.add_argument("--max_tokens", type=positive_int, default=4096, help="longest sample, in tokens")
    p.add_argument("--tokenizer", default=str(DEFAULT_CKPT), help="tokenizer (dir) that measures the sizes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.min_tokens > args.max_tokens:
        p.error(f"--min_tokens {args.min_tokens} exceeds --max_tokens {args.max_tokens}")
    return args


def main(argv=None) -> None:
    args = get_args(argv)
    from minillama.tokenizer.tokenizer import load_tokenizer
    if not Path(args.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer} does not exist (python weights/prepare_smollm2.py)")
    tok = load_tokenizer(args.tokenizer)
    samples = make_samples(args.samples, args.min_tokens, args.max_tokens, args.seed, tok)
    out = atomic_write(args.out, "".join(json.dumps(s) + "\n" for s in samples))
    sizes = [len(tok.encode_dialog(s["messages"], add_generation_prompt=False)) for s in samples]
    print(f"wrote {out}: {len(samples)} samples, {min(sizes)}-{max(sizes)} tokens each, {sum(sizes)} in all",
          file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run(main))

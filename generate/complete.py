"""Plain text completion for base models (like Meta's example_text_completion.py), batched.

    python generate/complete.py --ckpt DIR --prompt "I believe the meaning of life is" --prompt "Simply put, the theory"
    torchrun --nproc_per_node 2 generate/complete.py --ckpt DIR --prompts_file prompts.txt --temperature 0

--prompts_file holds one prompt per line (blank lines skipped; write "\\n" for a newline inside a prompt).
Each prompt is printed, then its completion after "> ".
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a fresh checkout

from minillama.util.cli import ArgumentParser, positive_int, run
from minillama.tools.flags import add_model_args, add_sampling_args, context_limit, engine_config, load_from_args, parse_args, sampling_params
from minillama.util.distributed import cleanup  # noqa: E402
from minillama.inference.generate import generate  # noqa: E402
from minillama.inference.loading import rank0_print  # noqa: E402
from minillama.tokenizer.tokenizer import decode_cut  # noqa: E402


def get_args(argv=None):
    p = ArgumentParser(description=__doc__)
    add_model_args(p)
    add_sampling_args(p, temperature=0.6, top_p=0.9, max_new_tokens=64)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", default=None, help="a text file with one prompt per line")
    p.add_argument("--batch_size", "--max_batch_size", type=positive_int, default=8,
                   help="prompts per batch (--max_batch_size: Meta's name)")
    p.add_argument("--truncate_left", action="store_true", help="keep the end of prompts longer than the context")
    return parse_args(p, argv)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\r\n").replace("\\n", "\n") for line in f if line.strip()]
        except OSError as e:
            raise FileNotFoundError(f"--prompts_file {args.prompts_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts_file {args.prompts_file}: not valid UTF-8 (byte {e.start})") from None
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts_file")
    return prompts


def main(argv=None):
    args = get_args(argv)
    prompts = read_prompts(args)
    loaded = load_from_args(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    tok, info = loaded.tok, loaded.dist
    context_limit(args, loaded.model)
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        ids = [tok.encode(p, bos=True) for p in chunk]
        try:
            outs = generate(loaded.model, ids, args.max_new_tokens, sampling_params(args), stop_ids=tok.stop_ids,
                            truncate_left=args.truncate_left, max_seq_len=args.max_seq_len,
                            config=engine_config(args, loaded))
        except ValueError as e:
            raise ValueError(f"prompts {start}..{start + len(chunk) - 1}: {e}") from None
        for prompt, out in zip(chunk, outs):
            rank0_print(info, prompt)
            text = decode_cut(tok, out) if len(out) == args.max_new_tokens else tok.decode(out)  # no half character
            rank0_print(info, f"> {text}")
            rank0_print(info, "\n==================================\n")
    cleanup()


if __name__ == "__main__":
    sys.exit(run(main))

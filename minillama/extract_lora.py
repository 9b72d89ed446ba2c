"""`python -m minillama.extract_lora`: kept at the top like convert/merge; the code is in checkpoints/."""

from .checkpoints.extract_lora import cli, extract, main, parse_args  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(cli())

"""`python -m minillama.convert`: kept at the top so the documented command works; the code is in checkpoints/."""

from .checkpoints.convert import cli, main, parse_args  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(cli())

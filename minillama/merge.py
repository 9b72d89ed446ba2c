"""`python -m minillama.merge`: kept at the top so the documented command works; the code is in checkpoints/."""

from .checkpoints.merge import main, merge_adapters_, parse_args  # noqa: F401

if __name__ == "__main__":
    from .cli import run
    raise SystemExit(run(main))

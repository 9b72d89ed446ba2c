"""`python -m minillama.plan_memory`: kept at the top like convert/merge; the code is in training/plan_memory.py."""

from .training.plan_memory import cli, main, plan, setup_from  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(cli())

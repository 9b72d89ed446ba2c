"""minillama: a compact, readable PyTorch Llama 1/2/3 and Mixtral that matches Hugging Face to the last digit."""

from .args import ModelArgs
from .checkpoints import load_model, save_hf
from .model import Transformer

__all__ = ["ModelArgs", "Transformer", "load_model", "save_hf"]

"""Checkpoint formats: Meta/Mistral consolidated, Hugging Face safetensors, GGUF; loading, saving, converting,
merging adapters. `load_model` / `save_hf` / `save_meta` are the entry points."""

from .checkpoint import detect_format, load_model, save_hf, save_meta, save_quantized

__all__ = ["detect_format", "load_model", "save_hf", "save_meta", "save_quantized"]

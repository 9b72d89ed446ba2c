"""The trainer's parts: SFT data, packing, losses, FSDP2, optimizer, resumable checkpoints, metrics and plots,
FLOP/byte floors. `train/sft.py` puts them together."""

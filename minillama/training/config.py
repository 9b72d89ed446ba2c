"""A training run's settings, typed: what the trainer's library code takes. The scripts in train/ build one from their
flags (minillama/tools/train_flags.py: `train_config(args)`); nothing below the scripts sees the argparse Namespace.

Each group is one concern: the model and how it is computed, the LoRA adapter (rank 0: full fine-tuning), the
optimizer and its schedule, the data and how it is batched; TrainConfig holds them with the run's own settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ModelConfig:
    """The checkpoint and how it is loaded, computed and sharded."""

    ckpt: str
    dtype: Optional[str] = None  # compute dtype name; None: bfloat16 on CUDA, float32 on CPU
    master_dtype: str = "float32"  # full fine-tuning: "bfloat16" keeps weights and moments in bf16
    quantize: Optional[str] = None  # "nf4": QLoRA's frozen base
    max_seq_len: Optional[int] = None  # context to record; None: the checkpoint's
    rope_theta: Optional[float] = None
    rope_scaling: Optional[dict] = None
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block's training forward (fsdp.compile_blocks)
    cpu_offload: bool = False
    loss_chunk: int = 1024  # positions per chunk of the output projection in the loss
    router_aux_loss_coef: float = 0.02  # Mixtral's load-balancing loss weight (dense models ignore it)

    @property
    def master_bf16(self) -> bool:
        return self.master_dtype == "bfloat16"


@dataclass(frozen=True)
class LoraConfig:
    """The adapter trained on a frozen base; rank 0 means full fine-tuning (everything trains)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all-linear",)
    modules_to_save: tuple[str, ...] = ()  # whole modules trained beside LoRA (--trainable: embed, norm)
    use_dora: bool = False
    plus_ratio: float = 0.0  # LoRA+: B factors learn at this times lr; 0 = off
    init_adapter: Optional[str] = None  # a PEFT adapter dir the adapter starts from (e.g. an SFT run's final/)

    @property
    def enabled(self) -> bool:
        return self.rank > 0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its learning-rate schedule (linear warmup, cosine decay to min_lr_ratio x lr), gradient clipping."""

    lr: float
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0: off


@dataclass(frozen=True)
class DataConfig:
    """The JSONL files and how their samples become global batches of rows."""

    data: str
    eval_data: Optional[str] = None
    seq_len: int = 8192  # max tokens per row (packed) or per sample
    pack: bool = False
    drop_long: bool = False
    batch_size: int = 8  # global rows: all processes, all micro-steps
    micro_batch_size: int = 0  # rows per forward per process; 0: the process's whole share (no accumulation)


@dataclass(frozen=True)
class GenerationEvalConfig:
    """Evaluation by generation (training/generation_eval.py): greedy answers to held-out prompts, scored."""

    n: int = 0  # held-out prompts answered at each eval; 0: off
    max_new_tokens: int = 128
    regex: Optional[str] = None  # gen/regex: the fraction of answers it matches (re.search)
    reward: Optional[str] = None  # gen/reward: "pkg.module:function"


@dataclass(frozen=True)
class TrainConfig:
    """One run: where it writes, how long it runs, when it evaluates and saves, and its four groups above."""

    out: str
    model: ModelConfig
    lora: LoraConfig
    optim: OptimConfig
    data: DataConfig
    generation: GenerationEvalConfig = GenerationEvalConfig()
    max_steps: int = 0  # 0: `epochs` passes over the data
    epochs: int = 1
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    keep: int = 2  # step_N checkpoints kept; 0: all
    resume: Optional[str] = None  # "latest" or a step_N directory
    overwrite: bool = False
    stop_at_step: int = 0  # save and exit after this step, as on SIGTERM
    log_every: int = 10
    seed: int = 0
    device: Optional[str] = None  # None: cuda if available
    context_parallel: int = 1  # processes per row
    peak_tflops: Optional[float] = None  # for MFU; None: the device's known bf16 peak
    flags: dict = field(default_factory=dict)  # the resolved command line, kept in OUT/config.json for --resume

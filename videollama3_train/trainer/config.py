"""Configuration of the training loop (:func:`videollama3_train.trainer.fit.fit`).

Defaults are the values shared by all four official stages (docs/reference.md §2): AdamW (0.9, 0.999, 1e-8), weight
decay 0, cosine schedule with 3% warmup, one epoch, gradient clipping at 1.0, ZeRO-1 in the official scripts (here
the backend is a choice). A component group trains exactly when it has a learning rate.

The run directory is not a field: it belongs to the whole run and is passed to ``fit(out_dir=...)``; the evaluation
cadence is not one either: the evaluator given to ``fit`` owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

LR_SCHEDULES = ("cosine", "linear", "constant")
BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
PRECISIONS = ("auto", "bf16", "fp32")
CHECKPOINTING = ("none", "llm", "vision", "both")


@dataclass
class TrainConfig:
    # --- what trains (per component group; None = frozen, requires_grad False) ---------------------------------
    lr_vision: float | None = 2e-6  # peak lr of the vision tower (model.vision_model.*); stage 2-4 value
    lr_projector: float | None = 1e-5  # peak learning rate of the projector (model.projector.*)
    lr_llm: float | None = 1e-5  # peak lr of the LLM (model.language_model.* and an untied output layer)
    # multiplies every group's learning rate (dimensionless); presets for random weights raise it
    lr_scale: float = 1.0
    lr_max: float | None = None  # upper bound on every scaled learning rate; None = no bound

    # --- optimizer -------------------------------------------------------------------------------------------
    weight_decay: float = 0.0  # decoupled AdamW weight decay (dimensionless); never applied to norms/biases
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    adam_eps: float = 1e-8  # AdamW epsilon (added to the denominator)
    max_grad_norm: float = 1.0  # global L2 norm the gradients are clipped to before each step; <= 0 disables

    # --- schedule --------------------------------------------------------------------------------------------
    lr_schedule: str = "cosine"  # shape of the lr after warmup: "cosine" | "linear" (decay to 0) | "constant"
    warmup_ratio: float = 0.03  # fraction of the total optimizer steps spent ramping the lr linearly from 0
    grad_accum: int = 1  # packed rows per rank per optimizer step; unused when global_batch_samples is set
    # samples per optimizer step over all ranks (the recipes' 128), turned once into G packed rows per step by
    # epoch 0's mean samples per row: the same G on any world size, each rank running ceil(G / world) micro-batches;
    global_batch_samples: int | None = None  # None: trainer.grad_accum rows per rank (G = grad_accum x world)
    epochs: int = 1  # passes over the loader (each = micro-batches per epoch // grad_accum optimizer steps)
    max_steps: int = -1  # optimizer steps to run; -1 = every step of `epochs` epochs

    # --- distribution and numerics ---------------------------------------------------------------------------
    # "ddp" (plain data parallel) | "zero1" | "zero2" | "zero3" (DeepSpeed through accelerate) | "fsdp2" (PyTorch
    # fully_shard + DCP checkpoints); docs/launch.md says when to choose which
    backend: str = "ddp"
    # fsdp2: ranks that shard one copy of the model; 0 = all ranks (FSDP); a node's GPU count = HSDP (shard within a
    # node, replicate across nodes); must divide the world size
    fsdp_shard_size: int = 0
    # fsdp2: free each layer's gathered parameters after its forward (less memory, one more all-gather in backward)
    fsdp_reshard_after_forward: bool = True
    fsdp_offload: bool = False  # fsdp2: keep sharded parameters, gradients and optimizer states in CPU memory
    # ranks that share each packed row (Ulysses sequence parallelism; docs/long_video.md); 1 = off. Must divide the
    # world size and the LLM's attention heads; the loader then gives a group one row of data.max_tokens x N tokens
    sequence_parallel: int = 1
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU) | "bf16" | "fp32"
    # activation checkpointing of the "none" | "llm" | "vision" | "both" towers
    gradient_checkpointing: str = "none"
    # within a checkpointed tower, checkpoint layers 0, n, 2n, ... (1 = all)
    checkpoint_every_n_layers: int = 1
    # label tokens per chunk of the chunked cross-entropy (extra memory ~ chunk * vocab * 4 bytes)
    loss_chunk_size: int = 4096

    # --- bookkeeping -----------------------------------------------------------------------------------------
    save_every: int = 500  # optimizer steps between checkpoints (a final one is always written); 0 = end only
    keep_last: int = 2  # complete checkpoints kept on disk (older ones are deleted); >= 1
    # optimizer steps between host syncs for logging (metrics.jsonl, W&B, on_step, progress bar)
    log_every: int = 10
    seed: int = 42  # seed of python, numpy and torch RNGs on every rank (model init happens before fit)
    # consecutive steps with non-finite loss or gradient norm tolerated before aborting
    nan_tolerance: int = 5
    resume: bool = True  # resume automatically from the newest complete checkpoint in <out_dir>/checkpoints
    # folder of zero{1,2,3}.json; None = the package's configs/deepspeed (videollama3_train.paths.DEEPSPEED_CONFIG_DIR)
    deepspeed_config_dir: str | None = None
    # seconds a rank waits in one collective for the others before failing (set on the process group, every backend).
    # It must outlast the slowest legitimate wait inside a collective: a checkpoint written by rank 0 while the others
    # wait at the barrier (DDP at 2B: 7.3 GiB weights + 14.6 GiB AdamW states, ~4 min at 100 MB/s) or loaded weights
    # read by rank 0 and broadcast (7B bf16, 15 GB: ~1.5 min at 200 MB/s); 30 min is 5x the former, yet minutes:
    # a rank that died is named within seconds by the heartbeat (trainer/liveness.py), one that hangs within this
    collective_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("lr_vision", "lr_projector", "lr_llm"):
            lr = getattr(self, name)
            if lr is not None and not lr > 0:
                raise ValueError(f"{name} must be a positive learning rate or None (frozen), got {lr!r}")
        if all(lr is None for lr in self.base_lrs.values()):
            raise ValueError("lr_vision, lr_projector and lr_llm are all None: nothing would train")
        if not self.lr_scale > 0:
            raise ValueError(f"lr_scale must be > 0, got {self.lr_scale!r}")
        if self.lr_max is not None and not self.lr_max > 0:
            raise ValueError(f"lr_max must be > 0 or None (no bound), got {self.lr_max!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        self.adam_betas = tuple(self.adam_betas)  # YAML gives a list
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            raise ValueError(f"adam_eps must be > 0, got {self.adam_eps}")
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("backend", self.backend, BACKENDS)
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be >= 1 (1 = off), got {self.sequence_parallel}")
        if self.fsdp_shard_size < 0:
            raise ValueError(
                f"fsdp_shard_size must be >= 0 (0 = shard over all ranks), got {self.fsdp_shard_size}"
            )
        _choice("precision", self.precision, PRECISIONS)
        _choice("gradient_checkpointing", self.gradient_checkpointing, CHECKPOINTING)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("grad_accum", "epochs", "checkpoint_every_n_layers", "loss_chunk_size", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be -1 (derive from the loader) or >= 1, got {self.max_steps}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0 = only at the end), got {self.save_every}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if not self.collective_timeout_s > 0:
            raise ValueError(f"collective_timeout_s must be > 0 seconds, got {self.collective_timeout_s}")
        if self.nan_tolerance < 1:
            raise ValueError(f"nan_tolerance must be >= 1, got {self.nan_tolerance}")

    @property
    def base_lrs(self) -> dict[str, float | None]:
        """Learning rate per component group as configured, before ``lr_scale`` and ``lr_max``."""
        return {"vision": self.lr_vision, "projector": self.lr_projector, "llm": self.lr_llm}

    @property
    def lrs(self) -> dict[str, float | None]:
        """The effective peak learning rate per component group, as ``model.groups`` expects it: the configured
        one times ``lr_scale``, capped at ``lr_max``; a frozen group (None) stays frozen."""
        out: dict[str, float | None] = {}
        for group, lr in self.base_lrs.items():
            if lr is not None:
                lr = lr * self.lr_scale
                if self.lr_max is not None:
                    lr = min(lr, self.lr_max)
            out[group] = lr
        return out


def resolve_precision(cfg: TrainConfig) -> str:
    """``"bf16"`` or ``"fp32"``; ``auto`` means bf16 exactly when CUDA is available."""
    if cfg.precision == "auto":
        import torch

        return "bf16" if torch.cuda.is_available() else "fp32"
    return cfg.precision


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")

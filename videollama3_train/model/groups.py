"""Component groups of the native model: what trains in each stage (docs/reference.md §2).

``vision`` = ``model.vision_model.*``; ``projector`` = ``model.projector.*``; ``llm`` = ``model.language_model.*`` and
``lm_head`` (a tied lm_head shares the embedding tensor and is counted once). A group is trainable exactly when it
has a learning rate.
"""

from __future__ import annotations

from torch import nn

GROUPS = ("vision", "projector", "llm")

_PREFIXES = {
    "model.vision_model.": "vision",
    "model.projector.": "projector",
    "model.language_model.": "llm",
    "lm_head.": "llm",
}


def group_of(name: str) -> str:
    """The group of a parameter name of ``VideoLlama3ForConditionalGeneration`` (PEFT/DDP prefixes tolerated)."""
    for wrapper in ("module.", "base_model.model.", "_orig_mod."):
        while name.startswith(wrapper):
            name = name[len(wrapper) :]
    for prefix, group in _PREFIXES.items():
        if name.startswith(prefix):
            return group
    raise KeyError(f"parameter {name!r} belongs to no component group (expected one of {list(_PREFIXES)})")


def named_group_parameters(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters per group, each tensor once (``named_parameters`` already drops the tied duplicate)."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        if "lora_" in name:  # PEFT adapters train with their host group
            out[group_of(name.replace(".lora_A", "").replace(".lora_B", ""))].append((name, p))
            continue
        out[group_of(name)].append((name, p))
    return out


def has_adapters(model: nn.Module) -> bool:
    """True when PEFT adapters (``lora_*`` weights) are injected: then only they train in their groups."""
    return any("lora_" in name for name, _ in model.named_parameters())


def _check_lrs(lrs: dict[str, float | None]) -> None:
    unknown = set(lrs) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown component groups {sorted(unknown)}; the groups are {list(GROUPS)}")
    for g, lr in lrs.items():
        if lr is not None and not lr > 0:
            raise ValueError(f"learning rate of group {g!r} must be positive or None (frozen), got {lr}")
    if all(lrs.get(g) is None for g in GROUPS):
        raise ValueError(
            "every component group is frozen: give at least one of vision/projector/llm a learning rate"
        )


def apply_trainable(model: nn.Module, lrs: dict[str, float | None], *, lora: bool = False) -> None:
    """Set ``requires_grad`` per group: trainable exactly when the group has a learning rate.

    With ``lora`` only the adapter weights of a trainable group train; base weights of that group stay frozen
    unless they belong to a group without adapters (e.g. the projector).
    """
    _check_lrs(lrs)
    groups = named_group_parameters(model)
    adapter_groups = {g for g, ps in groups.items() if any("lora_" in n for n, _ in ps)} if lora else set()
    for g, params in groups.items():
        trainable = lrs.get(g) is not None
        for name, p in params:
            if g in adapter_groups:
                p.requires_grad_(trainable and "lora_" in name)
            else:
                p.requires_grad_(trainable)


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # Biases and every norm weight (LayerNorm/RMSNorm are 1-D) are excluded from weight decay.
    return p.ndim < 2 or name.endswith(".bias") or "norm" in name.lower()


def build_param_groups(
    model: nn.Module, lrs: dict[str, float | None], weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer param groups: one (decay) + one (no decay) per trainable component group.

    Each dict has ``params``, ``lr``, ``weight_decay`` and ``name`` (e.g. ``llm`` / ``llm_no_decay``); frozen
    groups and parameters with ``requires_grad=False`` are left out.
    """
    _check_lrs(lrs)
    out = []
    for g, params in named_group_parameters(model).items():
        lr = lrs.get(g)
        if lr is None:
            continue
        decay = [p for n, p in params if p.requires_grad and not _no_decay(n, p)]
        no_decay = [p for n, p in params if p.requires_grad and _no_decay(n, p)]
        if decay:
            out.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": g})
        if no_decay:
            out.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{g}_no_decay"})
    if not out:
        raise ValueError("no trainable parameter: check the learning rates and requires_grad")
    return out


def group_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{group: (trainable, total)}`` parameter counts."""
    out = {}
    for g, params in named_group_parameters(model).items():
        total = sum(p.numel() for _, p in params)
        trainable = sum(p.numel() for _, p in params if p.requires_grad)
        out[g] = (trainable, total)
    return out


def trainable_table(model: nn.Module, lrs: dict[str, float | None] | None = None) -> str:
    """A printable table of trainable / frozen parameters per group."""
    rows = [("group", "lr", "trainable", "total", "state")]
    tt = ta = 0
    for g, (t, a) in group_counts(model).items():
        lr = "-" if lrs is None or lrs.get(g) is None else f"{lrs[g]:.2e}"
        rows.append((g, lr, f"{t:,}", f"{a:,}", "train" if t else "frozen"))
        tt, ta = tt + t, ta + a
    rows.append(("all", "", f"{tt:,}", f"{ta:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def grads_by_group(model: nn.Module) -> dict[str, float]:
    """Squared-norm sum of gradients per group (diagnostics and tests)."""
    out = {}
    for g, params in named_group_parameters(model).items():
        s = 0.0
        for _, p in params:
            if p.grad is not None:
                s += float(p.grad.detach().float().pow(2).sum())
        out[g] = s
    return out


__all__ = [
    "GROUPS",
    "group_of",
    "named_group_parameters",
    "has_adapters",
    "apply_trainable",
    "build_param_groups",
    "group_counts",
    "trainable_table",
    "grads_by_group",
]

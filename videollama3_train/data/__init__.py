"""Annotations -> model-ready samples (see docs/data_format.md and docs/architecture.md).

Imports nothing from ``model/`` or ``trainer/``: a tokenizer / processor object is passed in. Names are resolved
lazily so that ``import videollama3_train.data.media`` (and every loader worker) does not pay for transformers and
torchvision unless it encodes.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": ".errors",
    "EncodeConfig": ".config",
    "encode_record": ".encode",
    "estimate_cost": ".encode",
    "iter_records": ".annotations",
    "load_annotations": ".annotations",
    "normalize_record": ".annotations",
    "parallel_map": ".pool",
    "plan_record": ".encode",
    "record_at": ".annotations",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

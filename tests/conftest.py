"""Shared fixtures: a tiny tokenizer / processor / model built offline, once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from videollama3_train.model.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_processor(tiny_tokenizer):
    from videollama3_train.model.tokenizer import build_processor

    return build_processor(tiny_tokenizer)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    from videollama3_train.model.core import ModelConfig, build_model

    return build_model(ModelConfig(preset="tiny", attn_implementation="sdpa"), tiny_tokenizer)

"""Where the package's own files are, from a source checkout and from an installed wheel alike (no dependencies).

The Hydra configs live in the repository's ``configs/`` folder; the wheel ships the same files as package data,
``videollama3_train/configs/`` (``pyproject.toml``). Whichever exists is used: the installed copy first, so an
installed package never reads a checkout that happens to sit beside it.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _config_dir() -> Path:
    installed = _PACKAGE / "configs"  # a wheel / regular install
    if (installed / "train.yaml").is_file():
        return installed
    return _PACKAGE.parent / "configs"  # a source checkout (also an editable install)


# The Hydra config folder every command reads: train.yaml, pipeline.yaml, doctor.yaml, prepare.yaml, export.yaml,
# report.yaml and the groups stage/, model/, data/, logger/.
CONFIG_DIR: Path = _config_dir()
# zero1.json, zero2.json, zero3.json: the DeepSpeed configs of trainer.backend=zero1|zero2|zero3 (the default of
# trainer.deepspeed_config_dir).
DEEPSPEED_CONFIG_DIR: Path = CONFIG_DIR / "deepspeed"

__all__ = ["CONFIG_DIR", "DEEPSPEED_CONFIG_DIR"]

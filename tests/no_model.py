"""``python tests/no_model.py MODULE ARGS...`` runs ``python -m MODULE ARGS...`` with building a model made to fail:
the check that a mistake is reported before the model is built (minutes at full size), in a fresh process."""

from __future__ import annotations

import runpy
import sys


class ModelBuilt(BaseException):  # not an Exception: no handler of the command can turn it into a user error
    pass


def refuse(*args, **kwargs):
    raise ModelBuilt("the model was built before the mistake was reported")


if __name__ == "__main__":
    from transformers import VideoLlama3ForConditionalGeneration

    VideoLlama3ForConditionalGeneration.__init__ = refuse
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)

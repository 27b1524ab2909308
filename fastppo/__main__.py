"""``python -m fastppo``: the same command line as ``fastppo``."""

import os
import sys


def _drop_checkout_root() -> None:
    """``python -m`` puts the working directory first on ``sys.path``. Run from a checkout, that makes
    ``kernels/`` (installed as ``fastppo.kernels``) the top-level ``kernels`` and shadows Hugging
    Face's package, which peft and transformers import. fastppo is imported already, so drop it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


_drop_checkout_root()

from .cli import main  # noqa: E402

sys.exit(main())

"""``lcl-train`` and ``lcl-eval``."""

from __future__ import annotations

from vlp_core.cli import eval_main as _eval_main
from vlp_core.cli import train_main as _train_main


def train_main(argv: list[str] | None = None) -> int:
    from vlp_lcl import METHOD

    return _train_main(METHOD, argv)


def eval_main(argv: list[str] | None = None) -> int:
    from vlp_lcl import METHOD

    return _eval_main(METHOD, argv)

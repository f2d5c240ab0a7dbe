"""``dreamlip-train`` and ``dreamlip-eval`` (``dreamlip-prepare`` is in :mod:`vlp_dreamlip.prepare`)."""

from __future__ import annotations

from vlp_core.cli import eval_main as _eval_main
from vlp_core.cli import train_main as _train_main


def train_main(argv: list[str] | None = None) -> int:
    from vlp_dreamlip import METHOD

    return _train_main(METHOD, argv)


def eval_main(argv: list[str] | None = None) -> int:
    from vlp_dreamlip import METHOD

    return _eval_main(METHOD, argv)

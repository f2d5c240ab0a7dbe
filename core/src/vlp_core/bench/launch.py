"""One bench run in its own process: ``python -m vlp_core.bench.launch method <name> <train args...>``.

``method <name>``: the method's ``<m>-train`` CLI (``vlp_core.cli.train_main`` with the ``vlp.methods`` entry
point ``<name>``); ``script <name>``: an installed console script taking the same arguments (e.g.
``llm2clip-finetune-llm``). Going through ``sys.executable`` rather than the console scripts on ``PATH`` runs
the very installation vlp-bench itself comes from, inside a venv or not.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import Any

__all__ = ["load_method", "main"]


def load_method(name: str) -> Any:
    """The ``MethodSpec`` registered as ``name`` in the ``vlp.methods`` entry points (one clear error if none)."""
    found = [ep for ep in entry_points(group="vlp.methods") if ep.name == name]
    if not found:
        known = sorted(ep.name for ep in entry_points(group="vlp.methods"))
        raise ValueError(f"unknown method {name!r}: installed methods are {', '.join(known)} "
                         "(install the method's package, e.g. pip install -e packages/<m>)")
    return found[0].load()


def script_entry(name: str) -> Any:
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    if not found:
        raise ValueError(f"console script {name!r} is not installed")
    return found[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 2 or argv[0] not in ("method", "script"):
        print("usage: python -m vlp_core.bench.launch {method|script} NAME [train arguments...]", file=sys.stderr)
        return 2
    kind, name, rest = argv[0], argv[1], argv[2:]
    try:
        target = load_method(name) if kind == "method" else script_entry(name)
    except ValueError as e:
        print(f"vlp-bench: error: {e}", file=sys.stderr)
        return 2
    if kind == "method":
        from vlp_core.cli import train_main

        return train_main(target, rest)
    sys.argv = [name, *rest]  # console scripts read their arguments from sys.argv
    rc = target.load()()
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())

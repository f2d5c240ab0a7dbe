"""Task runner for the vlp monorepo: ``nox`` runs lint, tests, distributed and build.

torch is installed once per checkout into ``.nox/_torch`` (pinned by ``ci/constraints.txt``) and made
visible to every session's virtualenv through a ``.pth`` file, so no session reinstalls its gigabytes.
Set ``VLP_SYSTEM_TORCH=1`` to use a torch already importable by the interpreter running nox instead.

Packages are discovered by globbing ``core/pyproject.toml`` and ``packages/*/pyproject.toml``.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["lint", "tests", "distributed", "faults", "build"]
nox.options.reuse_existing_virtualenvs = True

ROOT = Path(__file__).parent
CONSTRAINTS = ROOT / "ci" / "constraints.txt"
TORCH_LAYER = ROOT / ".nox" / "_torch"
PACKAGES = [ROOT / "core"] + sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))


def _torch_requirements() -> list[str]:
    return [line.strip() for line in CONSTRAINTS.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _ensure_torch_layer(session: nox.Session) -> Path | None:
    """Install torch + torchvision once into ``.nox/_torch`` (a ``pip --target`` folder)."""
    if os.environ.get("VLP_SYSTEM_TORCH") == "1":
        return None
    marker = TORCH_LAYER / ".complete"
    wanted = "\n".join(_torch_requirements())
    if marker.is_file() and marker.read_text() == wanted:
        return TORCH_LAYER
    shutil.rmtree(TORCH_LAYER, ignore_errors=True)
    session.log(f"installing {wanted.replace(chr(10), ' ')} once into {TORCH_LAYER}")
    session.run(sys.executable, "-m", "pip", "install", "-q", "--target", str(TORCH_LAYER),
                *_torch_requirements(), external=True)
    marker.write_text(wanted)
    return TORCH_LAYER


def _link_torch(session: nox.Session, python: str | None = None) -> None:
    layer = _ensure_torch_layer(session)
    if layer is None:
        return
    python = python or "python"
    purelib = session.run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                          silent=True, external=True).strip().splitlines()[-1]
    Path(purelib, "zz_vlp_torch.pth").write_text(str(layer) + "\n")


def _install_packages(session: nox.Session, *extras: str) -> None:
    args = []
    for pkg in PACKAGES:
        spec = f"{pkg}[{','.join(extras)}]" if extras and pkg.name == "core" else str(pkg)
        args += ["-e", spec]
    session.install("-c", str(CONSTRAINTS), *args, "pytest")


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.run(sys.executable, "-m", "pip", "install", "-q", "ruff>=0.5", external=True)
    session.run(sys.executable, "-m", "ruff", "check", ".", external=True)


# Test-only reference implementations (no runtime package depends on them).
TEST_ONLY = ["open_clip_torch>=2.24"]


def _pytest(session: nox.Session, marker: str, *extras: str) -> None:
    _link_torch(session)
    _install_packages(session, *extras)
    session.install("-c", str(CONSTRAINTS), *TEST_ONLY)
    paths = [str(p / "tests") for p in PACKAGES if (p / "tests").is_dir()]
    session.run("pytest", "-m", marker, *paths, *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests of every package (core and packages/*), single process; vlp-bench's test needs matplotlib."""
    _pytest(session, "not dist and not gpu and not faults", "bench")


@nox.session
def distributed(session: nox.Session) -> None:
    """Tests that launch torchrun with 2 processes on gloo and compare with 1 process."""
    _pytest(session, "dist and not faults")


@nox.session
def faults(session: nox.Session) -> None:
    """The fault-injection suite: signals, damaged checkpoints, dead ranks, full disks, hostile files, bad data."""
    _pytest(session, "faults")


@nox.session
def demo(session: nox.Session) -> None:
    """``clip-train`` with no arguments: the demo preset on the shapes world, then evaluation."""
    _link_torch(session)
    _install_packages(session)
    session.run("clip-train", *session.posargs)


@nox.session(python=False)
def build(session: nox.Session) -> None:
    """Build each wheel, install it into a fresh venv (no editable installs) and run its CLIs' --help."""
    dist = ROOT / ".nox" / "_dist"
    shutil.rmtree(dist, ignore_errors=True)
    for pkg in PACKAGES:
        session.run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(pkg),
                    external=True)
    venv = ROOT / ".nox" / "_wheel_check"
    shutil.rmtree(venv, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", str(venv), external=True)
    py = str(venv / "bin" / "python")
    _link_torch(session, py)
    wheels = sorted(str(w) for w in dist.glob("*.whl"))
    session.run(py, "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), "--find-links", str(dist), *wheels,
                external=True)
    session.run(py, str(ROOT / "ci" / "check_install.py"), external=True)

"""vlp-core: the shared core of vlp (towers, data, distributed losses, trainer, evaluation, CLIP/SigLIP)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlp-core")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]

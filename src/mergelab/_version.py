"""The package version, in a module of its own so that any layer can read it without importing the package root."""

from importlib.metadata import PackageNotFoundError, version

try:  # one source of truth: the version in pyproject.toml, as installed
    __version__ = version("mergelab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

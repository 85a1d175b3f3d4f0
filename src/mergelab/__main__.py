"""``python -m mergelab``: the same command line as ``mergelab``."""

from mergelab.cli import run

run()

"""``python -m mergelab``: the same command line as ``mergelab``."""

from mergelab.cli import app

app(prog_name="mergelab")

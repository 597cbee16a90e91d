"""python tune/sweep.py: the sweep's entry point; the sweep is the package stt.sweep (its docstring, or --help)."""

import sys

from stt.command import run
from stt.sweep import main

if __name__ == "__main__":
    sys.exit(run(main, "sweep"))

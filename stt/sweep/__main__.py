"""python -m stt.sweep: the same command as `python tune/sweep.py`."""

import sys

from stt.command import run
from stt.sweep.cli import main

sys.exit(run(main, "sweep"))

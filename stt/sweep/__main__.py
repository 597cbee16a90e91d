"""python -m stt.sweep: the same command as `python tune/sweep.py`."""

import sys

from stt.cli import run
from stt.sweep.cli import main

sys.exit(run(main, "sweep"))

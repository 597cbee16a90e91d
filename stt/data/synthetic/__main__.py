"""`python -m stt.data.synthetic`: see stt.data.synthetic.cli."""

from stt.data.synthetic.cli import main

main()

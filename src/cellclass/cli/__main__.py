"""Run the command line as ``python -m cellclass.cli``."""

from cellclass.cli import main

main()

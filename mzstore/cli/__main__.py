"""``python -m mzstore.cli``."""

from mzstore.cli import main

main()

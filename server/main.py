"""Server entry point: ``python server/main.py [serve options]`` == ``mzstore serve``."""

import sys

from mzstore.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))

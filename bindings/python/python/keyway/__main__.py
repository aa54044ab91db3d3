"""``python -m keyway --version``: the installed library's version."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import keyway


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keyway", description=keyway.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"keyway {keyway.__version__}")
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

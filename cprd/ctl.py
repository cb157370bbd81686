"""``cprdctl``: the operator's client of the cprd daemon on D-Bus."""

from __future__ import annotations

import argparse
import sys

from cprd import __version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cprdctl", description="Drive the cprd daemon over D-Bus.")
    p.add_argument("--version", action="version", version=f"cprdctl {__version__}")
    p.parse_args(argv)
    print("cprdctl: the D-Bus client is not built yet (issue 5)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

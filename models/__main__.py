"""``python -m models train ...|evaluate ...`` -- the models' subcommands without the node CLI."""

from __future__ import annotations

import argparse
import sys

from models.commands import register


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand."""
    parser = argparse.ArgumentParser(prog="python -m models", description="cxrnode models: train and evaluate")
    sub = parser.add_subparsers(dest="command", metavar="{train,evaluate}", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

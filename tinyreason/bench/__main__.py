"""`python -m tinyreason.bench moe | generate | ce | memory [options]`."""

from __future__ import annotations

import sys

from tinyreason import errors
from tinyreason.bench import ce, generate, memory, moe

COMMANDS = {"moe": moe.main, "generate": generate.main, "ce": ce.main, "memory": memory.main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(
            f"usage: python -m tinyreason.bench {{{' | '.join(COMMANDS)}}} [options] (-h for each)"
        )
    errors.run(lambda: COMMANDS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()

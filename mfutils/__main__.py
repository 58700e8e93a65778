"""``python -m mfutils``: command-line entry point (filled in by the CLI module)."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("error: no command yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

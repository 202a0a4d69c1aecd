"""``python -m prophet.trace ...`` is ``prophet-bench trace ...`` (see `prophet.cli.trace`)."""

from __future__ import annotations

import sys

from prophet.cli import main

if __name__ == "__main__":
    sys.exit(main(["trace", *sys.argv[1:]]))

"""``python -m prophet.cli ...`` is ``prophet-bench ...`` (for a checkout run without installing)."""

import sys

from prophet.cli import main

sys.exit(main())

"""``python -m tremus`` is the ``tremus`` command."""

import sys

from tremus.cli import main

sys.exit(main())

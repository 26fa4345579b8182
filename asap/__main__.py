"""``python -m asap``: the ``asap`` command without an installed entry point (e.g. from a checkout)."""

import sys

from asap.cli import main

sys.exit(main())

"""`python -m scheduler_svc`: the same as `asap serve scheduler`."""

import sys

from asap.cli import main

sys.exit(main(["serve", "scheduler", *sys.argv[1:]]))

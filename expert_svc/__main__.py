"""`python -m expert_svc`: the same as `asap serve expert`."""

import sys

from asap.cli import main

sys.exit(main(["serve", "expert", *sys.argv[1:]]))

"""`python -m attention_svc`: the same as `asap serve attention`."""

import sys

from asap.cli import main

sys.exit(main(["serve", "attention", *sys.argv[1:]]))

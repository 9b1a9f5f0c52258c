"""`python -m saelab ...`: the `saelab` command line."""

import sys

from saelab.cli import main

sys.exit(main())

"""`python -m mambaout.cli` runs the CLI, as `mambaout` and `python -m mambaout` do."""

import sys

from mambaout.cli import main

sys.exit(main())

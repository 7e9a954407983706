import sys

from mambaout.cli import main

sys.exit(main())

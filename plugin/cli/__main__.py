"""`python -m plugin.cli …` runs the `gpushare` command line."""

import sys

from plugin.cli import main

sys.exit(main())

"""`python -m server.cli ...`: the `loraforge` command, for a checkout that is not installed."""

import sys

from server.cli.main import entry

sys.exit(entry())

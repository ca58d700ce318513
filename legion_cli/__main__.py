"""``python -m legion_cli``: the ``legion`` command."""

import sys

from legion_cli.cli import main

sys.exit(main())

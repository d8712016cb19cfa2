"""``python -m agent.cli``: the ``simkeeper`` command line."""

import sys

from agent.cli import main

sys.exit(main())

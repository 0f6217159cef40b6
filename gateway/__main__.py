"""``python -m gateway`` is the same as the ``mailgate`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m cflowad``."""

import sys

from cflowad.cli import main

sys.exit(main())

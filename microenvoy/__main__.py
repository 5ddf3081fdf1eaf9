"""``python -m microenvoy`` = the ``microenvoy`` command."""

import sys

from microenvoy.cli import main

sys.exit(main())

"""``python -m controlplane_lite``: the command line."""

import sys

from controlplane_lite.cli import main

sys.exit(main())

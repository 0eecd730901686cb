"""``python -m growmem.probe capacity``: the capacity probe's command line."""

import sys

from growmem.probe.command import main

sys.exit(main())

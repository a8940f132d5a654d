"""`python -m bridge ...` is the `voicecall` command."""

import sys

from bridge.cli import main

sys.exit(main())

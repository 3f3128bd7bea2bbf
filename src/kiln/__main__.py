"""`python -m kiln` (and `torchrun -m kiln`) is the same as the `kiln` command."""

import sys

from kiln.cli import main

sys.exit(main())

"""`python -m sae ...` (and `torchrun -m sae ...`) run the same command line as `sae`."""

import sys

from sae.cli import main

sys.exit(main())

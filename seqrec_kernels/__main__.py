"""`python -m seqrec_kernels ...` is the `seqrec` command line."""

import sys

from .cli import main

sys.exit(main())

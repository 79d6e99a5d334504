"""``python -m genrec`` (and ``torchrun -m genrec``) runs the ``genrec`` command."""

import sys

from genrec.cli import main

sys.exit(main())

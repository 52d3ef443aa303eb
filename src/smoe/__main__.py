"""``python -m smoe`` (and ``torchrun -m smoe``): the command line."""

import sys

from smoe.cli import main

sys.exit(main())

"""`python -m tools.cuda_emu [--cache DIR] [--jobs N] [-v]`: build the emulated module and print its path."""

import sys

from .build import main

sys.exit(main())

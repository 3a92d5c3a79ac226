"""`python -m ideogram4_gguf ...`: the command line (demo, generate, download)."""

import sys

from .cli import main

sys.exit(main())

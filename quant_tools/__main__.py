"""`python -m quant_tools ...` (from the repository root) or `python -m ideogram4_gguf.quant_tools ...`."""

import sys

from .cli import main

sys.exit(main())

"""``python -m hybridquant.converter``: the ``convert_to_quant`` CLI."""

import sys

from .cli import main

sys.exit(main())

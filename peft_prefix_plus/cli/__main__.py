"""``python -m peft_prefix_plus.cli``: the ``prefix-plus`` command line."""

import sys

from . import main

sys.exit(main())

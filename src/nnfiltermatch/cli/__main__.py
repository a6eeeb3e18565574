"""``python -m nnfiltermatch.cli``."""

import sys

from nnfiltermatch.cli.main import main

sys.exit(main())

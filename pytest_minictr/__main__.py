"""`python -m pytest_minictr` is the `minictr` command."""

import sys

from .cli import main

sys.exit(main())

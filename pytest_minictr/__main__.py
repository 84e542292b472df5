"""`python -m pytest_minictr` is the `minictr` command."""

import sys

from pytest_minictr.cli.main import main

sys.exit(main())

"""`python -m longqlora SUBCOMMAND`: see longqlora.cli."""

import sys

from longqlora.cli import main

sys.exit(main())

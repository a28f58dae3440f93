"""``python -m queries``: see ``queries.cli``."""

import sys

from queries.cli import main

if __name__ == "__main__":
    sys.exit(main())

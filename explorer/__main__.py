"""`python -m explorer ...` (and `torchrun ... -m explorer daemon ...`): the `explorer` command line."""

import sys

from explorer.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m unipred ...`` is the ``unipred`` command, run by this interpreter (a plugin
author's own environment sees their plugin even when another ``unipred`` script is first on
PATH)."""

import sys

from unipred.cli import main

if __name__ == "__main__":
    sys.exit(main())

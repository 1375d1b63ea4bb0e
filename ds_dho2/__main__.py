"""``python -m ds_dho2 ...`` is the ``ds-dho2`` command (``run``, ``bench``, ``--version``)."""

import sys

from ds_dho2.cli import main

if __name__ == "__main__":
    sys.exit(main())

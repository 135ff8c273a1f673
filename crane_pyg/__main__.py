"""``python -m crane_pyg``: the ``crane-pyg`` command (:mod:`crane_pyg.cli`)."""
import sys

from crane_pyg.cli import main

if __name__ == '__main__':
    sys.exit(main())

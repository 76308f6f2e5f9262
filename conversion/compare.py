"""CLI: see `stepwise.convert.compare`."""
import sys

from stepwise.convert.compare import main

if __name__ == "__main__":
    sys.exit(main())

"""CLI: see `stepwise.convert.nemo_import` (also `stepwise convert nemo-to-megatron`)."""
import sys

from stepwise.convert.nemo_import import main

if __name__ == "__main__":
    sys.exit(main())

"""CLI: see `stepwise.convert.megatron_to_hf` (also `stepwise convert megatron-to-hf`)."""
import sys

from stepwise.convert.megatron_to_hf import main

if __name__ == "__main__":
    sys.exit(main())

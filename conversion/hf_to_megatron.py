"""CLI: see `stepwise.convert.hf_to_megatron` (also `stepwise convert hf-to-megatron`)."""
import sys

from stepwise.convert.hf_to_megatron import main

if __name__ == "__main__":
    sys.exit(main())

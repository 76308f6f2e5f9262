"""Worker: rank-symmetric errors over a plain gloo group (no megatron). Prints one JSON line.

Rank 1 fails inside `rank_symmetric()` with a DataError; every rank reports what it caught, then both
pass a clean block and agree on flags, which shows no rank was left behind in a collective.
"""
from __future__ import annotations

import json
import os

import torch.distributed as dist

from stepwise.data.jsonl import DataError
from stepwise.parallel.agree import agree_max, any_rank, rank_symmetric


def main() -> None:
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    caught = None
    try:
        with rank_symmetric():
            if rank == 1:
                raise DataError("train.jsonl:7: key 'prompt' is empty")
    except DataError as error:
        caught = {"type": type(error).__name__, "message": str(error)}
    with rank_symmetric():
        pass
    report = {"rank": rank, "caught": caught, "any": any_rank(rank == 0), "max": agree_max(10 * rank + 3),
              "pid": os.getpid()}
    print(json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

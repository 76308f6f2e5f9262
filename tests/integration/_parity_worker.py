"""Worker: megatron logits of a checkpoint at (TP, PP) on fixed tokens, saved by the logging rank.

    torchrun --nproc-per-node TP*PP _parity_worker.py CKPT OUT TP PP VOCAB
"""
import sys

import torch

from stepwise.convert.compare import megatron_logits

if __name__ == "__main__":
    ckpt, out, tp, pp, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    logits = megatron_logits(ckpt, ids, tp, pp)
    if logits is not None:
        torch.save(logits, out)

"""Data order and batches: a seeded permutation per epoch, a cursor, DP slicing, micro-batches.

The order of samples depends only on (seed, dataset size), never on the DP size: global batch k is
samples [k*G, (k+1)*G) of the epoch's permutation, and DP rank r takes its contiguous slice. Every
rank sees the same global batch, so the global normaliser needs no communication. Batches are
right-padded to a multiple of LENGTH_MULTIPLE tokens, or of what FP8's GEMMs need when FP8 is on
(`length_multiple`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stepwise.data.jsonl import DataError

LENGTH_MULTIPLE = 8


@dataclass
class DataOrder:
    """Deterministic sample order with a resumable cursor (`consumed` samples)."""

    size: int
    global_batch_size: int
    seed: int
    consumed: int = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch_size

    def _permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + 7919 * epoch)
        return torch.randperm(self.size, generator=generator)

    def next_global_batch(self) -> list[int]:
        """Indices of the next global batch; an epoch's incomplete tail is dropped."""
        if self.steps_per_epoch == 0:
            raise ValueError(f"dataset of {self.size} samples is smaller than one global batch ({self.global_batch_size})")
        per_epoch = self.steps_per_epoch * self.global_batch_size
        epoch, offset = divmod(self.consumed, per_epoch)
        indices = self._permutation(epoch)[offset : offset + self.global_batch_size].tolist()
        self.consumed += self.global_batch_size
        return indices

    def state_dict(self) -> dict:
        return {"size": self.size, "global_batch_size": self.global_batch_size, "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if (state["size"], state["seed"]) != (self.size, self.seed):
            raise ValueError(f"data order mismatch: checkpoint has size={state['size']} seed={state['seed']}, "
                             f"this run size={self.size} seed={self.seed}")
        self.consumed = int(state["consumed"])


def too_long(index: int, length: int, max_seq_len: int, source: str, where: list[str] | None, screen) -> None:
    """Report record `index` of `length` tokens: raise DataError naming `where[index]` (else
    `source: record index`), or let a lenient `RecordScreen` skip and count it."""
    label = where[index] if where else f"{source}: record {index}"
    what = f"{length} tokens exceed model.max_seq_len={max_seq_len}"
    if screen is None:
        raise DataError(f"{label}: {what}")
    screen.reject(label, what)


def dp_slice(indices: list[int], dp_rank: int, dp_size: int) -> list[int]:
    per_rank = len(indices) // dp_size
    return indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]


def pad_length(lengths: list[int], max_seq_len: int, multiple: int = LENGTH_MULTIPLE) -> int:
    longest = max(lengths)
    return min(max_seq_len, -(-longest // multiple) * multiple)


def length_multiple(model, parallel) -> int:
    """What a batch's length is padded to a multiple of for `model` (ModelConfig) at `parallel`
    (ParallelConfig): LENGTH_MULTIPLE, or with FP8 on what TE's FP8 GEMMs need (16 tokens, 32 for
    MXFP8, times TP under sequence parallelism). The recipe check makes model.max_seq_len one too."""
    if not model.fp8.enabled:
        return LENGTH_MULTIPLE
    from stepwise.models.precision import fp8_sequence_multiple

    return math.lcm(LENGTH_MULTIPLE, fp8_sequence_multiple(model.fp8.recipe, parallel.tp, parallel.sequence_parallel))


def collate_sft(sequences: list[dict], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch from `{"ids": [...], "mask": [...]}` token records.

    `mask[t]` says whether token t is a target (part of the response)."""
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((batch, length), dtype=torch.float32)
    for row, sequence in enumerate(sequences):
        ids, mask = sequence["ids"], sequence["mask"]
        n = min(len(ids) - 1, length)
        input_ids[row, :n] = torch.tensor(ids[:n])
        labels[row, :n] = torch.tensor(ids[1 : n + 1])
        loss_mask[row, :n] = torch.tensor(mask[1 : n + 1], dtype=torch.float32)
    position_ids = torch.arange(length).unsqueeze(0).expand(batch, -1).contiguous()
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def split_micro_batches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a [B, ...] batch along B; scalars (like `normalizer`) are shared by every micro-batch."""
    size = batch["input_ids"].shape[0]
    micro = []
    for start in range(0, size, micro_batch_size):
        micro.append({k: (v[start : start + micro_batch_size] if v.dim() > 0 else v) for k, v in batch.items()})
    return micro


class SequenceBatches:
    """What every batch builder shares: token records (`{"ids", ...}`), the padding id, the length cap,
    the micro-batch size and a seeded order over the records. Subclasses write `micro_batches`.
    `label_shift` is 1 for next-token records (len(ids) - 1 positions), 0 when every token is read."""

    label_shift = 1
    length_multiple = LENGTH_MULTIPLE  # `length_multiple(model, parallel)` where FP8 needs more

    def __init__(self, sequences: list[dict], pad_id: int, max_seq_len: int, micro_batch_size: int):
        self.sequences = sequences
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len
        self.micro_batch_size = micro_batch_size

    def __len__(self) -> int:
        return len(self.sequences)

    def make_order(self, global_batch_size: int, seed: int) -> DataOrder:
        return DataOrder(len(self.sequences), global_batch_size, seed)

    def tokens(self, indices: list[int]) -> int:
        return sum(len(self.sequences[i]["ids"]) - self.label_shift for i in indices)

    def length(self, sequences: list[dict]) -> int:
        """Padded length of a global batch of `sequences` (every DP rank pads alike)."""
        return pad_length([len(s["ids"]) - self.label_shift for s in sequences], self.max_seq_len, self.length_multiple)

    def micro_batch_count(self, indices: list[int]) -> int:
        """How many micro-batches `micro_batches(indices, 0, 1)` gives (a builder may count without building)."""
        return len(self.micro_batches(indices, 0, 1))

    def mine(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict]:
        return [self.sequences[i] for i in dp_slice(indices, dp_rank, dp_size)]


"""The `action` batch builder for step-level policy losses (`skywork_dapo`): state-wise batches.

A record is `{"state_id", "prompt_ids" (the state s), "action_ids" (the next step a), "advantage",
"ref_logp"}` in the token form the pipeline writes: the state is a prefix and the action a slice of the
exact ids the policy sampled (the eos included when the action ended the solution). Hand-written data
may use the text form `{"state_id", "prompt", "action" (with its separator), "ends" (the action ends the
solution: eos follows), "advantage", "ref_logp"}`, tokenized piece by piece. Every action of a
state lands in the same global batch, which gives the contrastive gradient the paper asks for (§4.1,
"state-wise learning"): states are shuffled per epoch and packed whole into global batches of at most
`global_batch_size` actions; unused slots are padding rows (id -1) that carry no loss.

With `train.pack_prefixes` (the default) a global batch is shared-prefix packed (`stepwise.train.prefix_packing`):
each micro-batch is one row of at most `model.max_seq_len` tokens holding states' prefixes once and
their actions after them; its `loss_mask` has one row per action ([actions, S] against the [1, S]
log-probs, so a loss summing `logprobs * loss_mask` over dim 1 gets each action's log-prob sum), and
the global batch's rows are dealt to the DP ranks in contiguous runs (an empty rank gets a row with
no actions). Every row of a global batch is padded to the same length, as pipeline schedules need.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stepwise.data.jsonl import DataError, _check_field
from stepwise.data.records import RecordScreen, token_form, token_ids
from stepwise.train.batches import SequenceBatches, collate_sft, dp_slice, split_micro_batches, too_long
from stepwise.train.prefix_packing import RowPacker, item_of, rank_rows, row_length

PAD_INDEX = -1


@dataclass
class StatewiseOrder:
    """Seeded order of whole states packed into global batches; resumable by `consumed` batches."""

    groups: list[list[int]]  # sample indices of each state
    global_batch_size: int
    seed: int
    consumed: int = 0
    _epochs: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        largest = max((len(g) for g in self.groups), default=0)
        if largest > self.global_batch_size:
            raise ValueError(f"a state has {largest} actions, more than global_batch_size={self.global_batch_size}")

    def _packed(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            batches, current = [], []
            for state in torch.randperm(len(self.groups), generator=generator).tolist():
                if len(current) + len(self.groups[state]) > self.global_batch_size:
                    batches.append(current)
                    current = []
                current = current + self.groups[state]
            if current:
                batches.append(current)
            self._epochs = {epoch: [b + [PAD_INDEX] * (self.global_batch_size - len(b)) for b in batches]}
        return self._epochs[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return len(self._packed(0))

    def next_global_batch(self) -> list[int]:
        epoch, offset = divmod(self.consumed, self.steps_per_epoch)
        self.consumed += 1
        return self._packed(epoch)[offset]

    def state_dict(self) -> dict:
        return {"states": len(self.groups), "seed": self.seed, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        if (state["states"], state["seed"]) != (len(self.groups), self.seed):
            raise ValueError(f"data order mismatch: checkpoint has {state['states']} states seed={state['seed']}")
        self.consumed = int(state["consumed"])


def tokenize_actions(records: list[dict], tokenizer, max_seq_len: int, source: str = "data", *,
                     where: list[str] | None = None, screen: RecordScreen | None = None) -> list[dict]:
    """Token records `{"ids", "mask", "state", "advantage", "ref_logp"}` (mask: the action's tokens).
    Over-long records: see `batches.too_long`."""
    out = []
    for index, record in enumerate(records):
        label = where[index] if where else f"{source}: record {index}"
        try:
            state, action = _state_and_action(label, record, tokenizer)
        except DataError as error:
            if screen is None:
                raise
            screen.reject_error(error)
            continue
        ids = state + action
        if len(ids) > max_seq_len + 1:
            too_long(index, len(ids), max_seq_len, source, where, screen)
            continue
        out.append({"ids": ids, "mask": [0] * len(state) + [1] * len(action), "state": str(record["state_id"]),
                    "advantage": float(record["advantage"]), "ref_logp": float(record["ref_logp"])})
    return out


def _state_and_action(where: str, record: dict, tokenizer) -> tuple[list[int], list[int]]:
    if token_form(where, record, "action"):
        return token_ids(where, record, "prompt_ids"), token_ids(where, record, "action_ids")
    for key in ("prompt", "action"):
        _check_field(where, record, key, str)
    state = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
    action = tokenizer(record["action"], add_special_tokens=False)["input_ids"]
    if record.get("ends"):
        action = action + [tokenizer.eos_token_id]
    return state, action


class ActionBatches(SequenceBatches):
    """This DP rank's micro-batches of a state-wise global batch (normaliser: real actions); packed
    rows when `pack` (see the module docstring)."""

    def __init__(self, sequences: list[dict], pad_id: int, max_seq_len: int, micro_batch_size: int,
                 pack: bool = False):
        super().__init__(sequences, pad_id, max_seq_len, micro_batch_size)
        self.pack = pack
        self._padding = {"ids": [pad_id, pad_id], "mask": [0, 0], "advantage": 0.0, "ref_logp": 0.0}
        self._packer = RowPacker(max_seq_len)

    def make_order(self, global_batch_size: int, seed: int) -> StatewiseOrder:
        groups: dict[str, list[int]] = {}
        for index, sequence in enumerate(self.sequences):
            groups.setdefault(sequence["state"], []).append(index)
        return StatewiseOrder(list(groups.values()), global_batch_size, seed)

    def _get(self, index: int) -> dict:
        return self._padding if index == PAD_INDEX else self.sequences[index]

    def tokens(self, indices: list[int]) -> int:
        if self.pack:
            return sum(row_length(row) for row in self.packed_rows(indices))
        return sum(len(self.sequences[i]["ids"]) - 1 for i in indices if i != PAD_INDEX)

    def packed_rows(self, indices: list[int]) -> list:
        """The rows (`prefix_packing.pack_rows`) of the real actions among `indices` (kept for the last call)."""
        real = tuple(i for i in indices if i != PAD_INDEX)
        return self._packer.rows(real, lambda: ([item_of(self.sequences[i]) for i in real], None))

    def micro_batch_count(self, indices: list[int]) -> int:
        """How many micro-batches `micro_batches(indices, 0, 1)` gives, without building them."""
        return max(1, len(self.packed_rows(indices))) if self.pack else -(-len(indices) // self.micro_batch_size)

    def micro_batches(self, indices: list[int], dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
        normalizer = torch.tensor(float(max(1, sum(i != PAD_INDEX for i in indices))))
        if self.pack:
            return self._packed_micro_batches(indices, dp_rank, dp_size, normalizer)
        mine = [self._get(i) for i in dp_slice(indices, dp_rank, dp_size)]
        batch = collate_sft(mine, self.length([self._get(i) for i in indices]), self.pad_id)
        batch["advantage"] = torch.tensor([s["advantage"] for s in mine])
        batch["ref_logp"] = torch.tensor([s["ref_logp"] for s in mine])
        batch["normalizer"] = normalizer
        return split_micro_batches(batch, self.micro_batch_size)

    def _packed_micro_batches(self, indices, dp_rank, dp_size, normalizer) -> list[dict[str, torch.Tensor]]:
        real = [i for i in indices if i != PAD_INDEX]
        micro = rank_rows(self.packed_rows(indices), dp_rank, dp_size, self.pad_id, self.max_seq_len)
        for batch in micro:
            records = [self.sequences[real[item]] for item in batch.pop("items").tolist()]
            batch["advantage"] = torch.tensor([s["advantage"] for s in records], dtype=torch.float32)
            batch["ref_logp"] = torch.tensor([s["ref_logp"] for s in records], dtype=torch.float32)
            batch["normalizer"] = normalizer
        return micro


def build_batches(records: list[dict], tokenizer, config, train, source: str = "data", *, where=None,
                  screen=None) -> ActionBatches:
    """The worker's entry point for data kind `action`."""
    sequences = tokenize_actions(records, tokenizer, config.model.max_seq_len, source, where=where, screen=screen)
    return ActionBatches(sequences, tokenizer.pad_token_id, config.model.max_seq_len, train.micro_batch_size,
                         train.pack_prefixes)

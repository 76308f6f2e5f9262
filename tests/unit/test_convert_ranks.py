"""How a conversion is split over ranks: contiguous balanced runs, size-balanced checksum shares,
the writer of each checkpoint file, and the local fall-backs of the collectives."""
from __future__ import annotations

import torch

from stepwise.checkpoint import layout
from stepwise.convert import dist_io, ranks


def test_contiguous_split_is_ordered_balanced_and_total():
    assert ranks.contiguous_split([25, 122, 122, 25], 2) == [0, 0, 1, 1]  # embedding + layer 0 | layer 1 + head
    assert ranks.contiguous_split([1] * 80, 8) == [i // 10 for i in range(80)]
    assert ranks.contiguous_split([5], 1) == [0]
    assert ranks.contiguous_split([0, 0], 4) == [0, 0]
    owners = ranks.contiguous_split([3, 1, 4, 1, 5, 9, 2, 6], 3)
    assert owners == sorted(owners) and set(owners) <= {0, 1, 2}


def test_balanced_split_deals_every_name_once():
    shares = ranks.balanced_split({"a": 10, "b": 5, "c": 4, "d": 1}, 2)
    assert shares == [["a"], ["b", "c", "d"]]
    assert ranks.balanced_split({"b": 1, "a": 2}, 1) == [["a", "b"]]  # one rank: every name, sorted
    assert ranks.balanced_split({"a": 1}, 3) == [["a"], [], []]


def test_writer_rank_reads_the_data_file_names():
    names = ("__0_0.distcp", "__1_0.distcp", ".metadata", "common.pt")
    assert [layout.writer_rank(name, 2) for name in names] == [0, 1, 0, 0]
    assert layout.writer_rank("__7_0.distcp", 2) == 0  # not a rank of this world: rank 0 checks it


def test_rank_share_gives_each_layer_to_one_rank_embedding_first_head_last():
    def entry(name):
        return dist_io.Entry(name, (4, 4), torch.float32, lambda: torch.zeros(4, 4))

    names = (["embedding.word_embeddings.weight"]
             + [f"decoder.layers.{i}.mlp.linear_fc1.weight" for i in range(4)]
             + ["decoder.final_layernorm.weight", "output_layer.weight"])
    entries = [entry(name) for name in names]
    shares = [[e.name for e in dist_io.rank_share(entries, 4, rank, 2)] for rank in range(2)]
    assert shares[0] + shares[1] == names
    assert shares[0][0].startswith("embedding.") and shares[1][-1] == "output_layer.weight"
    assert [e.name for e in dist_io.rank_share(entries, 4, 0, 1)] == names


def test_collectives_run_locally_without_a_process_group():
    assert ranks.gather({"x": 1}) == [{"x": 1}]
    assert ranks.on_rank_zero(lambda: 42) == 42

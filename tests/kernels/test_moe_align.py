"""Align step of the grouped MoE GEMM: pairs grouped by slot and padded per block, in PyTorch
(`prophet.kernels.align.align_pairs_reference`) and in one Triton launch (`prophet.kernels.moe.align_pairs`)."""

from __future__ import annotations

import pytest
import torch

from prophet.kernels.align import align_pairs_reference, max_aligned_blocks
from prophet.kernels.moe import align_pairs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = [pytest.param(align_pairs_reference, id="reference"), pytest.param(align_pairs, id="triton")]
LAYOUTS = [
    pytest.param(1, 2, 4, 16, "distinct", id="one_token"),  # two groups of one pair, 15 padding rows each
    pytest.param(21, 2, 4, 16, "distinct", id="groups_cross_blocks"),  # 42 pairs over 4 slots
    pytest.param(32, 1, 4, 16, "one", id="exact_multiple_of_block"),  # 32 pairs in one slot: no padding
    pytest.param(9, 3, 7, 16, "distinct", id="prime_slots"),
    pytest.param(6, 2, 13, 16, "distinct", id="unused_slots"),  # most slots empty
    pytest.param(19, 1, 5, 16, "one", id="all_pairs_one_slot"),
    pytest.param(10, 3, 4, 32, "dup", id="duplicate_slots_in_token"),
    pytest.param(64, 4, 8, 64, "distinct", id="several_blocks_per_slot"),
    pytest.param(300, 8, 70, 16, "distinct", id="more_pairs_and_slots_than_a_chunk"),  # > 1024 pairs, > 64 slots
]


def make_slot_ids(tokens: int, top_k: int, slots: int, routing: str) -> torch.Tensor:
    if routing == "distinct":
        ids = torch.rand(tokens, slots).topk(top_k, dim=1).indices
    elif routing == "one":
        ids = torch.full((tokens, top_k), slots - 2)
    else:
        ids = torch.randint(0, slots, (tokens, top_k))
    return ids.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tokens, top_k, slots, block_m, routing", LAYOUTS)
def test_align_groups_every_pair_once_by_slot(impl, tokens: int, top_k: int, slots: int, block_m: int, routing: str):
    slot_ids = make_slot_ids(tokens, top_k, slots, routing)
    pairs = tokens * top_k
    flat = slot_ids.reshape(-1).cpu()

    sorted_pairs, block_slot = (t.cpu() for t in impl(slot_ids, slots, block_m))
    num_blocks = max_aligned_blocks(pairs, slots, block_m)
    assert sorted_pairs.dtype == block_slot.dtype == torch.int32
    assert sorted_pairs.shape == (num_blocks * block_m,) and block_slot.shape == (num_blocks,)

    real = sorted_pairs[sorted_pairs < pairs]
    assert sorted(real.tolist()) == list(range(pairs)), "every pair appears exactly once"
    assert (sorted_pairs[sorted_pairs >= pairs] == pairs).all(), "padding is marked with T*k"

    used = block_slot[block_slot >= 0]
    assert (used[1:] >= used[:-1]).all(), "blocks are in increasing slot order"
    assert (block_slot[len(used) :] == -1).all(), "unused blocks come last and are marked -1"
    assert set(used.tolist()) == set(flat.tolist()), "a block for every used slot and none for empty ones"
    for b, slot in enumerate(block_slot.tolist()):
        rows = sorted_pairs[b * block_m : (b + 1) * block_m]
        real_rows = rows[rows < pairs]
        if slot < 0:
            assert real_rows.numel() == 0
            continue
        assert real_rows.numel() > 0, "no block is all padding"
        assert (flat[real_rows.long()] == slot).all(), "every pair of a block has the block's slot"
        assert (rows[: real_rows.numel()] < pairs).all(), "padding only after a block's pairs"
        next_slot = block_slot[b + 1].item() if b + 1 < num_blocks else -1
        if next_slot == slot:
            assert real_rows.numel() == block_m, "only a group's last block is padded"


@pytest.mark.parametrize("tokens, top_k, slots, block_m, routing", LAYOUTS)
def test_triton_align_matches_reference(tokens: int, top_k: int, slots: int, block_m: int, routing: str) -> None:
    slot_ids = make_slot_ids(tokens, top_k, slots, routing)
    pairs = tokens * top_k
    ref_pairs, ref_blocks = (t.cpu() for t in align_pairs_reference(slot_ids, slots, block_m))
    got_pairs, got_blocks = (t.cpu() for t in align_pairs(slot_ids, slots, block_m))
    assert torch.equal(got_blocks, ref_blocks)
    ref_rows, got_rows = ref_pairs.view(-1, block_m), got_pairs.view(-1, block_m)
    assert torch.equal((got_rows < pairs).sum(1), (ref_rows < pairs).sum(1)), "same number of pairs per block"
    # The kernel ranks pairs with atomic counters, so which of a slot's pairs land in which of its blocks may
    # differ from the stable reference; each slot's group as a whole holds the same pairs.
    for slot in ref_blocks.unique().tolist():
        group = ref_blocks == slot
        assert torch.equal(got_rows[group].flatten().sort().values, ref_rows[group].flatten().sort().values)


def test_reference_keeps_pair_order_inside_groups() -> None:
    # stable: the reference lists a group's pairs in increasing pair index (deterministic layout)
    slot_ids = make_slot_ids(40, 2, 3, "dup")
    sorted_pairs, block_slot = align_pairs_reference(slot_ids, 3, 16)
    for slot in block_slot.unique().tolist():
        if slot >= 0:
            rows = sorted_pairs.view(-1, 16)[block_slot == slot].reshape(-1)
            rows = rows[rows < 80]
            assert (rows[1:] > rows[:-1]).all()


def test_align_bound_holds_for_worst_case() -> None:
    # every slot gets exactly one pair: maximal padding, and every block is used
    slot_ids = torch.arange(12, device=DEVICE).view(6, 2)
    for impl in (align_pairs_reference, align_pairs):
        sorted_pairs, block_slot = impl(slot_ids, 12, 16)
        assert (block_slot >= 0).all() and block_slot.numel() == 12
        assert torch.equal(sorted_pairs.view(12, 16)[:, 0].cpu(), torch.arange(12, dtype=torch.int32))

"""Align step of the grouped MoE GEMM: group (token, k) pairs by cache slot and pad each group to a block.

`align_pairs_reference` is the pure-PyTorch definition (vectorized, on the tensors' device, no host sync);
the prefill path runs the same layout as one Triton launch (`kernels.moe.align_pairs`). The number of blocks
is an upper bound computed from shapes alone and blocks past the real end are marked with slot -1, so no
device-to-host copy is needed (and the launch can be captured in a CUDA graph).
"""

from __future__ import annotations

import torch


def max_aligned_blocks(num_pairs: int, num_slots: int, block_m: int) -> int:
    """Upper bound on the blocks of the aligned layout: every non-empty group pads by at most block_m - 1."""
    groups = min(num_slots, num_pairs)
    return -(-(num_pairs + groups * (block_m - 1)) // block_m)


def align_pairs_reference(slot_ids: torch.Tensor, num_slots: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the pairs of ``slot_ids [T, k]`` by slot and pad every slot's group to a multiple of ``block_m``.

    Returns ``(sorted_pairs, block_slot)``:
      ``sorted_pairs [NB*block_m]`` int32: flat pair index ``t*k + j``, groups in increasing slot order, pairs
        in increasing index inside a group (a stable sort, so the result is deterministic); padding rows hold
        ``T*k`` (one past the last pair).
      ``block_slot [NB]`` int32: the slot of each block of ``block_m`` rows, -1 for blocks past the last group.
    ``NB = max_aligned_blocks(T*k, num_slots, block_m)``. Slot ids must lie in ``[0, num_slots)``. The Triton
    version may order the pairs inside a group differently.
    """
    device = slot_ids.device
    flat = slot_ids.reshape(-1).to(torch.int64)  # [P]
    num_pairs = flat.numel()
    num_blocks = max_aligned_blocks(num_pairs, num_slots, block_m)

    # [S] pairs per slot; not bincount, which reads the maximum back to the host on CUDA
    counts = torch.zeros(num_slots, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # [S] rows per slot after padding
    padded_end = torch.cumsum(padded, 0)  # [S] end row of each slot's padded group
    group_start = torch.cumsum(counts, 0) - counts  # [S] first sorted position of each slot

    order = torch.argsort(flat, stable=True)  # [P] pair ids, sorted by slot
    sorted_slot = flat[order]  # [P]
    rank = torch.arange(num_pairs, device=device) - group_start[sorted_slot]  # [P] position inside its group
    dest = padded_end[sorted_slot] - padded[sorted_slot] + rank  # [P] row in the padded layout

    sorted_pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)

    block_start = torch.arange(num_blocks, device=device) * block_m  # [NB]
    block_slot = torch.searchsorted(padded_end, block_start, right=True)  # [NB] first slot ending after it
    block_slot = torch.where(block_slot < num_slots, block_slot, -1).to(torch.int32)
    return sorted_pairs, block_slot

"""Triton helpers shared by the matmul-shaped kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_row_blocks, num_col_blocks, GROUP_ROWS: tl.constexpr):
    """(row block, column block) of program ``pid``, visiting GROUP_ROWS row blocks at a time.

    Consecutive programs then share their column operand's tiles in L2 (the
    grouped ordering of Triton's matmul tutorial), instead of each program
    streaming a different column block.
    """
    tiles_per_group = GROUP_ROWS * num_col_blocks
    first_row_block = (pid // tiles_per_group) * GROUP_ROWS
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_ROWS)
    row_block = first_row_block + (pid % tiles_per_group) % group_rows
    col_block = (pid % tiles_per_group) // group_rows
    return row_block, col_block


@triton.jit
def span(start, end, BLOCK: tl.constexpr):
    """The BLOCK offsets from ``start``, and which of them fall before ``end``: one block of a masked dimension."""
    offsets = start + tl.arange(0, BLOCK)
    return offsets, offsets < end

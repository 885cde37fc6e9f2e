"""Tuning values of the selection kernels: launch shapes, work sizes and the layout planner's cost model."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SelectionSettings:
    """Launch settings and cost model of the selection branch (H100, bf16, D=128, 7:1 GQA, NSA selections of
    random and structured inputs). Measured by benchmarks/tune/tune_selection.py; results in docs/performance.md.

    Costs are ns, per program step of the query-tile kernels (one union block of one tile, by tile height in
    matrix rows) and of the block-major kernels (one step of `by_block_rows` rows), per token, and per call.
    """

    # Query tiles: heights the planner weighs, and the cost of one program step at each height (forward, dq).
    # 128 rows never beat 64 (a 128-row tile walks at least half the union steps per token of two 64-row tiles
    # and costs more than twice as much per step), so it is only run when a caller forces it.
    tile_candidates: tuple[int, ...] = (64, 16)
    tile_step_cost: dict[int, float] = field(default_factory=lambda: {128: 15.0, 64: 7.09, 16: 4.64})
    dq_tile_step_cost: dict[int, float] = field(default_factory=lambda: {128: 16.0, 64: 7.68, 16: 4.65})
    # The planner samples every plan_sample_every-th window of consecutive tokens (a tile's worth per height).
    plan_sample_every: int = 8
    # dk/dv: query rows per step, and the longest token list one program walks (longer ones are cut in pieces
    # whose float32 partials are summed in a fixed order; raised for huge inputs, see `default_dkdv_split`).
    dkdv_rows: int = 16
    dkdv_split: int = 4096
    # dk/dv launch: num_warps and num_stages (None: 4 warps and 3 stages below 128 rows, else 8 and 2).
    dkdv_warps: int | None = None
    dkdv_stages: int | None = None
    # Block-major forward and dq: query rows per step, the longest piece of a list one program walks (without a
    # cap the first chunks of a causal sequence have few blocks with very long lists: few programs, long tails),
    # and the ceiling on one chunk's partial outputs (512 MiB keeps the forward within the operator's 2 GB
    # working memory at 128K; folded into a gated sum for inference no selection output is kept, so 1 GiB).
    by_block_rows: int = 64
    by_block_split: int = 512
    by_block_partial_bytes: int = 512 << 20
    by_block_partial_bytes_folded: int = 1 << 30
    # Launch of the block-major forward: warps, pipeline stages of its token loop (the launch itself has one),
    # register cap (None: the compiler's choice; the kernel computes p v in two value halves so that the cap
    # fits three programs per SM instead of two), and the warps of the merge kernels.
    by_block_warps: int = 4
    by_block_loop_stages: int = 2
    by_block_max_registers: int | None = 168
    merge_warps: int = 4
    # The forward's block-major cost: per step of by_block_rows rows, per token (merge, index sort, small
    # kernels) and per call (launches and the planner's host read, spread over the call's tokens).
    by_block_step_cost: float = 12.5
    by_block_token_cost: float = 80.0
    by_block_call_cost: float = 4.2e5
    # The block-major dq: launch as above (a register cap made it slower), and its cost model.
    dq_by_block_warps: int = 4
    dq_by_block_loop_stages: int = 2
    dq_by_block_max_registers: int | None = None
    dq_by_block_step_cost: float = 18.5
    dq_by_block_token_cost: float = 80.0
    dq_by_block_call_cost: float = 4.2e5


SELECTION_SETTINGS = SelectionSettings()

__all__ = ["SELECTION_SETTINGS", "SelectionSettings"]

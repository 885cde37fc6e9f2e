"""Triton kernels for the NSA operator; `videonsa.ops.triton_nsa` assembles them into an autograd function.

One module (or sub-package) per branch, each importing only `utils` and `host`, never another branch:

* `utils`: constants, launch helpers, varlen packing and tile tables, the row-dot kernel.
* `host`: non-blocking host reads of small device results (`HostCopy`).
* `compression`: block mean pooling and attention over the compressed keys (`CompressionSettings`).
* `topk`: the top-k block choice from the compression softmax (`TopkSettings`).
* `selection/`: attention over the chosen blocks, its layout planner and backward (`SelectionSettings`).
* `window`: sliding-window attention (`WindowSettings`).
* `official_compression`, `official_topk`: the official mode's kernels (docs/official-mode.md).

Tuning values are frozen settings objects with a module-level default, passed to the launchers; the operator's
semantics are in docs/operator.md, the measurements behind the settings in docs/performance.md.
"""

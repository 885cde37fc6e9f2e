"""Host reads of small device results that do not drain the GPU's queue.

A plain `.tolist()` or `int(t)` waits for everything queued before it; the GPU then idles until the host has
decided and launched again (launches of Triton kernels take tens of microseconds each). `HostCopy` starts the
copy at once and waits only for it when the value is asked for, so the caller can queue independent work
(another attention branch, the other gradient) in between and the GPU stays busy while the host waits.
"""

from __future__ import annotations

import torch
from torch import Tensor


class HostCopy:
    """A small device tensor on its way to the host: `tolist()` waits for its copy alone.

    x: any small tensor (a few counts). On CUDA the copy goes to pinned memory without blocking and an event
    marks its end; elsewhere (CPU, the Triton interpreter) it is a plain copy.
    """

    def __init__(self, x: Tensor) -> None:
        self._event = None
        if x.device.type == "cuda":
            self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self._host.copy_(x, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = x.detach().clone()

    def tolist(self) -> list:
        """The values (a list, or a number for a 0-d tensor), waiting for the copy if it is still running."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


__all__ = ["HostCopy"]

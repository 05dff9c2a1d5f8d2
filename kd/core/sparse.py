"""The parts of a top-k soft-target record, computed from full logits on any device.

One definition for the two places that make them: the cache's ``topk:K`` codec
(``kd.cache.codecs``, on the CPU from full logits) and the teacher server (next
to the model, so only K entries per row leave the device). A client that fills
a top-k cache from the server's reply therefore writes the same records (to the
bit on a CPU teacher) as the codec writes from full logits. The arithmetic must
stay the codec's: fp32, ``topk`` of z, and the log-sum-exp of ``z / T`` (not
``z * (1 / T)``), T the cache's temperature.
"""

from __future__ import annotations

import torch


def topk_parts(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (values fp32 [B, K], indices int64 [B, K], logsumexp(z / T) fp32 [B])."""
    z = logits.float()
    values, indices = z.topk(k, dim=1)
    return values, indices, torch.logsumexp(z / temperature, dim=1)

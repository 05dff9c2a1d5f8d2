"""The parts of top-k and sampled soft-target records, computed from full logits on any device.

One definition for the two places that make them: the cache's ``topk:K`` and
``sample:K`` codecs (``kd.cache.codecs``, on the CPU from full logits) and the teacher
server (next to the model, so only K entries per row leave the device). A client that
fills a cache from the server's reply therefore writes the same records (to the bit on
a CPU teacher) as the codec writes from full logits. The arithmetic must stay the
codec's: fp32, ``topk`` of z, and the log-sum-exp of ``z / T`` (not ``z * (1 / T)``),
T the cache's temperature; draws by inverse CDF in float64 from given uniforms.
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


def unique_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws int64 [B, N] -> (unique ids [B, N] ascending, counts [B, N]) on the draws' device;
    unused slots have id 0, count 0 (the ``sample:K`` layout)."""
    s, _ = draws.sort(dim=1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.long().cumsum(dim=1) - 1
    counts = torch.zeros_like(s).scatter_add_(1, group, torch.ones_like(s))
    ids = torch.zeros_like(s).scatter_(1, group, s)
    return ids, counts


def sample_parts(
    logits: torch.Tensor, k: int, rounds: int, temperature: float, uniforms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rounds`` x ``k`` draws per row from softmax(logits / T) by inverse CDF in float64, from
    ``uniforms`` [N, rounds * k] -> (unique ids, counts) int64 [N, rounds, k] per round."""
    n, c = logits.shape
    cdf = torch.softmax(logits.to(torch.float64) / temperature, dim=1).cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]  # exactly 1 at the end
    u = uniforms.to(device=logits.device, dtype=torch.float64).contiguous()
    draws = torch.searchsorted(cdf, u, right=True).clamp(max=c - 1)
    ids, counts = unique_counts(draws.reshape(n * rounds, k))
    return ids.reshape(n, rounds, k), counts.reshape(n, rounds, k)

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

# Row blocks of the [N, V] temporaries below hold at most this many elements (64 MiB in fp32):
# a top-k reply for 64 x 2048 positions of a 150k vocabulary would otherwise allocate [N, V]
# fp32 copies (z / T, the masked logits) beside the logits themselves. Per-row results do not
# depend on the block.
BLOCK_ELEMENTS = 1 << 24


def _blocks(z: torch.Tensor) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // max(z.shape[1], 1))
    return [slice(i, i + step) for i in range(0, len(z), step)]


def topk_parts(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (values fp32 [B, K], indices int64 [B, K], logsumexp(z / T) fp32 [B])."""
    z = logits.float()
    values, indices = z.topk(k, dim=1)
    if temperature == 1.0:  # z / 1 is z to the bit: no copy at all
        return values, indices, torch.logsumexp(z, dim=1)
    lse = torch.empty(len(z), dtype=torch.float32, device=z.device)
    for rows in _blocks(z):
        lse[rows] = torch.logsumexp(z[rows] / temperature, dim=1)
    return values, indices, lse


def sent_topk_logsumexp(
    logits: torch.Tensor, sent_values: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """The log-sum-exp a server sends with top-k values cast to a narrower dtype (fp16, bf16):
    of z / T with the K top logits replaced by the values as sent, fp32 [B].

    fp16 rounds a logit by up to ~0.016 at |z| in 32..64 (bf16 ~0.125): with the exact
    ``logsumexp(z / T)`` the client's ``exp(v / T - lse)`` of a confident row summed to more
    than 1 and left a negative rest. With this one the sent probabilities and the rest sum to 1
    (each probability off by the value's rounding, exp(|dv| / T) - 1, as the dtype asked for
    implies). Rounded up to fp32, so the sent probabilities never sum past 1. fp32 values keep
    ``topk_parts``' exact log-sum-exp. Temporaries: one block of rows (``BLOCK_ELEMENTS``)."""
    rest = torch.empty(len(logits), dtype=torch.float64, device=logits.device)
    for rows in _blocks(logits):
        z = logits[rows].float() / temperature  # a new block: masked in place
        rest[rows] = torch.logsumexp(z.scatter_(1, indices[rows], -torch.inf), dim=1).double()  # -inf when K = C
    exact = torch.logaddexp(rest, torch.logsumexp(sent_values.double() / temperature, dim=1))  # [B] float64
    out = exact.float()
    return torch.where(out.double() < exact, torch.nextafter(out, torch.full_like(out, torch.inf)), out)


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

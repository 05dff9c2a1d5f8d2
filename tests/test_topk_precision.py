"""topk:K caches of confident teachers (top logits of 12 to 40, a real LM's scale): what they decode
to against a float64 reference written here, for token and class caches, the old layout (codec
version 2) read as before, and a server's top-k values sent in fp16.

Codec version 2 stored the top logits themselves in fp16: at |z| in 32..64 fp16 rounds a logit by up
to 0.016, so exp(z_fp16 / T - lse) of a confident row summed to 1.0135 and the rest went negative.

Tolerances (``log_p_tolerance``), from what the record holds:
* the stored log-probabilities l = z / T - lse are fp16, rounded to nearest: |dl| <= 2^-11 |l| (half
  an fp16 step; 2^-25 absolute below fp16's normal range), and the decoder rescales the K
  probabilities by (1 - rest) / sum(stored p), off by at most their p-weighted mean of that;
* the parts they come from are fp32 (``topk_parts``: the logits and logsumexp(z / T), what a server
  sends): a few fp32 ulps of the largest of |lse|, |z / T|, 2^-21 of it;
* the decoded values T * log p are fp32: 2^-23 |l|.
The rest mass carries the parts' error times the stored mass (its digits are kept: it is stored as
its own log, not recovered as 1 - sum of fp16 values) and the decoded fp32 values' error.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd.cache import CacheMeta, CacheReader, CacheWriter
from kd.cache.codecs import get_codec
from kd.core.data import open_source
from kd.core.targets import SparseTargets, sparse_kl
from kd.core.tokens import TokenTargets, next_token_labels
from kd.precompute import LocalTokenTeacher, precompute_tokens
from kd.student_trainer.losses.token_kd import token_kd_loss
from kd.student_trainer.sources import CacheSource

VOCAB = 259
K = 8
TOPS = (12.0, 20.0, 40.0)


class ConfidentLM(nn.Module):
    """A causal token teacher whose largest logit is ``top`` at every position, the others 6 to ~30
    below it (``[B, S]`` int64 -> ``[B, S, V]``): position s sees tokens s and s - 1."""

    input_shape = (-1,)  # token ids: servable (kd serve / load_teacher)

    def __init__(self, top: float, vocab: int = VOCAB, dim: int = 16) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.max_length = 64
        self.embed = nn.Embedding(vocab, dim)
        self.prev = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.top = top

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        z = self.head(torch.tanh(self.embed(tokens) + prev)) * 3.0
        gap = z.amax(-1, keepdim=True) - z
        return torch.where(gap == 0, self.top, self.top - 6.0 - 2.0 * gap)


def confident_logits(rows: int, classes: int, top: float, seed: int) -> torch.Tensor:
    """fp32 class-teacher logits: the top one ``top``, the others 3 to ~15 below it."""
    g = torch.Generator().manual_seed(seed)
    z = top - 3.0 - torch.rand(rows, classes, generator=g) * 12.0
    z[torch.arange(rows), torch.randint(classes, (rows,), generator=g)] = top
    return z


def reference(z: torch.Tensor, k: int, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 from the fp32 logits [N, C]: (top-k ids, their log p at T, the rest mass summed directly)."""
    log_p = torch.log_softmax(z.double() / t, dim=-1)
    ids = z.topk(k, dim=-1).indices
    rest = log_p.exp().scatter(-1, ids, 0.0).sum(-1)
    return ids, log_p.gather(-1, ids), rest


def log_p_tolerance(ref_log_p: torch.Tensor, z: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per stored class, the bound on |log p decoded - log p float64| (module docstring), and the
    per-row part of it the rest mass inherits."""
    fp16 = torch.maximum(ref_log_p.abs() * 2.0**-11, torch.full_like(ref_log_p, 2.0**-25))
    p = ref_log_p.exp()
    rescale = (p * fp16).sum(-1) / p.sum(-1)
    lse = torch.logsumexp(z.double() / t, dim=-1)
    parts = 2.0**-21 * torch.maximum(lse.abs(), (z.double() / t).abs().amax(-1))
    out32 = ref_log_p.abs() * 2.0**-23
    return fp16 + (rescale + 2 * parts)[:, None] + out32, 2 * parts * p.sum(-1) + (p * out32).sum(-1)


def check_decoded(ids, log_p, ref_ids, ref_log_p, ref_rest, z, t) -> None:
    """The decoded top-k log p [N, K] and the rest (1 - their sum, as the losses compute it)."""
    assert torch.equal(ids, ref_ids)
    tol, rest_tol = log_p_tolerance(ref_log_p, z, t)
    err = (log_p - ref_log_p).abs()
    assert bool((err <= tol).all()), float((err / tol).max())
    mass = log_p.exp().sum(-1)
    assert float(mass.max()) <= 1.0 + 2.0**-50  # never more than 1 (float64 summation of K terms aside)
    rest = -torch.expm1(torch.logsumexp(log_p, dim=-1))
    assert bool(((rest - ref_rest).abs() <= rest_tol + 2.0**-52).all())


@pytest.mark.parametrize("top", TOPS)
def test_token_cache_of_a_confident_teacher_decodes_to_its_probabilities(tmp_path: Path, top: float) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: " + "the quick brown fox"[: 5 + i] + "\n" for i in range(10)))
    source = open_source(f"text:{corpus}?doc=line&pack=0&block=32")
    model = ConfidentLM(top)
    teacher = LocalTokenTeacher(model)
    b = source.batch(range(len(source)))
    with torch.no_grad():
        z = model(b.tokens)
    labels = next_token_labels(b.tokens, b.loss_mask)
    real = b.attention_mask
    for t in (1.0, 2.0):
        path = tmp_path / f"topk-T{t}"
        precompute_tokens(source, teacher, path, codec=f"topk:{K}", batch_size=4, temperature=t)
        tt = CacheSource(str(path)).targets(torch.arange(len(source)), b.tokens)
        assert isinstance(tt, TokenTargets) and tt.temperature == t
        ref_ids, ref_log_p, ref_rest = reference(z[real], K, t)
        log_p = tt.logits[real].double() / t - tt.lse[real].double()[:, None]
        check_decoded(tt.ids[real], log_p, ref_ids, ref_log_p, ref_rest, z[real], t)
        if t == 1.0:  # confident: less rest than the error version 2 put on a top probability at 40 (2^-6)
            assert float(ref_rest.median()) < 2.0**-6
        for kind in ("fkl", "rkl"):
            # A student equal to the teacher: the float64 divergence is 0; what is left is the fp16
            # error squared (< 1e-6 here) and fp32 arithmetic of the loss.
            loss = float(token_kd_loss(kind, z.clone(), tt, labels, temperature=t))
            assert abs(loss) < 2e-6, (kind, t, loss)
        assert CacheReader(path).meta.codec_version == 3


@pytest.mark.parametrize("classes", [10, 100])
@pytest.mark.parametrize("top", TOPS)
def test_class_cache_of_a_confident_teacher_decodes_to_its_probabilities(
    tmp_path: Path, top: float, classes: int
) -> None:
    n, k = 64, 5
    z = confident_logits(n, classes, top, seed=int(top) + classes)
    for t in (1.0, 4.0):
        meta = CacheMeta("t", "d", n, f"topk:{k}", classes, temperature=t)
        with CacheWriter(tmp_path / f"c{t}", meta) as w:
            w.put(range(n), z)
        reader = CacheReader(tmp_path / f"c{t}")
        st = reader.targets(range(n))
        assert isinstance(st, SparseTargets) and st.kind == "topk"
        ref_ids, ref_log_p, ref_rest = reference(z, k, t)
        log_p = st.logits.double() / t - st.logsumexp.double()[:, None]
        check_decoded(st.indices, log_p, ref_ids, ref_log_p, ref_rest, z, t)
        lp, lr = st.bucket_log_probs(t, torch.float64)  # what the losses use
        rest_tol = log_p_tolerance(ref_log_p, z, t)[1]
        assert torch.equal(lp, log_p) and bool(((lr.exp() - ref_rest).abs() <= rest_tol + 2.0**-52).all())
        # The dense completion keeps the stored probabilities; a student equal to the teacher: ~0.
        dense = torch.log_softmax(st.dense().double() / t, dim=1).gather(1, ref_ids)
        assert bool(((dense - log_p).abs() <= 1e-6).all())
        loss = float(sparse_kl(z, st, t))
        assert abs(loss) < 2e-6, (t, loss)


def test_the_version_2_layout_still_decodes_as_written(tmp_path: Path) -> None:
    """A version-2 topk cache (fp16 logits, fp32 logsumexp of z / T) decodes to exactly its stored
    values, record bytes as the old layout documents them; version 3 reads them as log-probabilities."""
    n, c, k, t = 6, 300, 4, 2.0
    z = confident_logits(n, c, 40.0, seed=7)
    values, ids = z.topk(k, dim=1)
    lse = torch.logsumexp(z / t, dim=1)
    old_layout = np.concatenate([values.half().numpy().view(np.uint8),  # the documented version-2 record
                                 ids.numpy().astype("<u2").view(np.uint8),
                                 lse.numpy().astype("<f4").reshape(-1, 1).view(np.uint8)], axis=1)  # fmt: skip
    meta = CacheMeta("t", "d", n, f"topk:{k}", c, temperature=t, codec_version=2)
    with CacheWriter(tmp_path / "v2", meta) as w:
        w.put(range(n), z)
    reader = CacheReader(tmp_path / "v2")
    assert reader.meta.codec_version == 2 and reader.codec.version == 2
    raw = reader.read_raw(range(n))
    assert np.array_equal(raw, old_layout)
    st = reader.targets(range(n))
    assert torch.equal(st.indices, ids) and torch.equal(st.logits, values.half().float())
    assert torch.equal(st.logsumexp, lse)
    assert torch.equal(get_codec(f"topk:{k}", t, version=2).decode(raw, c), st.dense())
    # The same bytes under version 3 are another layout: the version in the metadata decides.
    assert not torch.equal(get_codec(f"topk:{k}", t, version=3).decode_targets(raw, c).logits, st.logits)
    # A version-3 cache is refused by a reader that only knows version 2.
    with pytest.raises(ValueError, match="newer than this kd"):
        get_codec(f"topk:{k}", t, version=4)


def test_server_top_k_in_fp16_sends_a_consistent_logsumexp() -> None:
    """A client asking for top-k values in fp16 (the wire's logits_dtype) gets a logsumexp for the
    values as sent: their probabilities and the rest sum to 1. fp32 values keep the exact one."""
    from kd.teacher_server.outputs import postprocess
    from kd.v1 import teacher_pb2 as pb

    z = confident_logits(32, 100, 40.0, seed=11)
    t, k = 1.0, 5
    ref_ids, ref_log_p, ref_rest = reference(z, k, t)
    exact = postprocess(pb.OutputSpec(top_k=k, sparse_temperature=t), {"logits": z}, labels_only=False)
    assert torch.equal(exact["logsumexp"], torch.logsumexp(z / t, dim=1))
    for dtype in (pb.FLOAT16, pb.BFLOAT16):
        out = postprocess(pb.OutputSpec(top_k=k, sparse_temperature=t, logits_dtype=dtype), {"logits": z},
                          labels_only=False)  # fmt: skip
        v = out["topk_values"].double()
        assert torch.equal(out["topk_indices"].long(), ref_ids)
        log_p = v / t - out["logsumexp"].double()[:, None]
        # Each probability is off by its value's rounding (that is what the dtype carries) ...
        rounding = (v - z.gather(1, ref_ids).double()).abs() / t
        assert bool(((log_p - ref_log_p).abs() <= 2 * rounding.amax(1, keepdim=True) + 1e-5).all())
        # ... but together with the rest they make a distribution: the mass never exceeds 1.
        rest_sent = torch.exp(torch.logsumexp((z.double() / t).scatter(1, ref_ids, -math.inf), 1)
                              - out["logsumexp"].double())  # fmt: skip
        total = log_p.exp().sum(1) + rest_sent
        # (to the fp32 logsumexp: a few ulps; it is rounded up, so the stored mass stays <= 1).
        lse_ulps = 2.0**-21 * out["logsumexp"].double().abs()
        assert bool(((total - 1).abs() <= lse_ulps).all()) and float(log_p.exp().sum(1).max()) <= 1.0


def test_resuming_a_version_2_token_cache_keeps_its_layout(tmp_path: Path) -> None:
    """kd precompute onto a topk:K token cache of codec version 2 writes the missing sequences in
    version 2's layout (fp16 logits), not version 3's: one cache, one layout."""
    from dataclasses import replace

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i}: " + "abcdefgh"[: 2 + i % 6] + "\n" for i in range(8)))
    source = open_source(f"text:{corpus}?doc=line&pack=0&block=24")
    model = ConfidentLM(20.0)
    teacher = LocalTokenTeacher(model)
    precompute_tokens(source, teacher, tmp_path / "v3", codec=f"topk:{K}", batch_size=4, temperature=2.0)
    meta = replace(CacheReader(tmp_path / "v3").meta, codec_version=2)
    b = source.batch(range(len(source)))
    with torch.no_grad():
        z = model(b.tokens)
    lengths = b.attention_mask.sum(1).tolist()
    with CacheWriter(tmp_path / "v2", meta) as w:  # the first three sequences, as version 2 wrote them
        w.put_sequences(range(3), [z[i, : lengths[i]] for i in range(3)])
    report = precompute_tokens(source, teacher, tmp_path / "v2", codec=f"topk:{K}", batch_size=4, temperature=2.0)
    assert report.written == len(source) - 3
    reader = CacheReader(tmp_path / "v2")
    assert reader.meta.codec_version == 2 and reader.verify().ok
    tt = reader.token_targets(range(len(source)))
    real = b.attention_mask
    values, ids = z.topk(K, dim=-1)
    assert torch.equal(tt.ids[real], ids[real]) and torch.equal(tt.logits[real], values[real].half().float())
    assert torch.equal(tt.lse[real], torch.logsumexp(z[real] / 2.0, dim=-1))


def confident_lm_40() -> ConfidentLM:
    return ConfidentLM(40.0)


def test_token_server_top_k_in_fp16_sends_a_consistent_logsumexp() -> None:
    """The same for a served language model (``teacher_server.lm``): fp16 top-k values per position
    with the logsumexp of the values as sent; fp32 values with the exact one."""
    from kd.teacher_server.client import TeacherClient
    from kd.teacher_server.loading import load_teacher
    from kd.teacher_server.server import TeacherOptions, start_server

    model = confident_lm_40()
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        z = model(tokens).reshape(-1, VOCAB)
    ref_ids, ref_log_p, _ = reference(z, K, 1.0)
    running = start_server([load_teacher("lm", f"{__name__}:confident_lm_40")],
                           batching=TeacherOptions(max_batch_tokens=256, max_batch_size=8, warmup=False))  # fmt: skip
    try:
        with TeacherClient(f"127.0.0.1:{running.port}") as c:
            exact = c.token_topk("lm", tokens, K)
            half = c.token_topk("lm", tokens, K, dtype=torch.float16)
    finally:
        running.stop(grace=1)
    torch.testing.assert_close(exact.lse.reshape(-1), torch.logsumexp(z, dim=-1), rtol=0, atol=0)
    assert torch.equal(half.ids.reshape(-1, K), ref_ids)
    v = half.logits.reshape(-1, K).double()
    log_p = v - half.lse.reshape(-1).double()[:, None]
    rounding = (v - z.gather(1, ref_ids).double()).abs()
    assert float(rounding.max()) > 1e-3  # fp16 at 40 does round (the values are as asked)
    assert bool(((log_p - ref_log_p).abs() <= 2 * rounding.amax(1, keepdim=True) + 1e-5).all())
    rest = torch.exp(torch.logsumexp(z.double().scatter(1, ref_ids, -math.inf), 1) - half.lse.reshape(-1).double())
    lse_ulps = 2.0**-21 * half.lse.reshape(-1).double().abs()
    assert bool(((log_p.exp().sum(1) + rest - 1).abs() <= lse_ulps).all()) and float(log_p.exp().sum(1).max()) <= 1


def test_top_k_parts_a_block_of_rows_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """topk_parts and sent_topk_logsumexp work a block of rows at a time (their [N, V] temporaries
    are one block): the results are those of one pass over all rows, to the bit, at T = 1 and not."""
    import kd.core.sparse as sparse

    monkeypatch.setattr(sparse, "BLOCK_ELEMENTS", 3 * 1000 + 7)  # blocks of 3 rows, the last of 1
    z = confident_logits(10, 1000, 40.0, seed=5)
    for t in (1.0, 2.0, 0.5):
        values, ids, lse = sparse.topk_parts(z, 5, t)
        assert torch.equal(lse, torch.logsumexp(z / t, dim=1))
        sent = values.half()
        rest = torch.logsumexp((z / t).scatter(1, ids, -math.inf), dim=1).double()
        exact = torch.logaddexp(rest, torch.logsumexp(sent.double() / t, dim=1))
        got = sparse.sent_topk_logsumexp(z, sent, ids, t)
        up = torch.nextafter(exact.float(), torch.tensor(math.inf))
        assert torch.equal(got, torch.where(exact.float().double() < exact, up, exact.float()))  # rounded up


_PEAK = """
import resource, sys, torch
from kd.core.sparse import BLOCK_ELEMENTS, sent_topk_logsumexp, topk_parts
torch.set_num_threads(1)
z = torch.randn(512, 1 << 17)  # 256 MiB of fp32 logits, 4 blocks
values, ids, _ = topk_parts(z, 8, 1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
topk_parts(z, 8, 2.0)
sent_topk_logsumexp(z, values.half(), ids, 2.0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, BLOCK_ELEMENTS * 4)
"""


def test_top_k_parts_allocate_one_block_not_copies_of_the_logits() -> None:
    """Peak memory beside 256 MiB of logits: one block (64 MiB) and its masked copy, not the
    [N, V] copies z / T and the scattered logits (512 MiB more before)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True, timeout=120)
    grown, block = map(int, out.stdout.split())
    assert grown <= 2 * block, f"peak grew by {grown / 2**20:.0f} MiB for a {block / 2**20:.0f} MiB block"

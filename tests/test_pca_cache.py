"""pca:K caches: the low-rank basis is fitted on the first teacher outputs, committed with the
metadata before any record, kept on resume, checked when opened (a damaged one is refused,
naming the cache), shared across shards with --basis or fitted per shard, and trained from."""

from __future__ import annotations

import json
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cache.codecs import LowRankBasis, get_codec
from kd.cache.sharded import open_cache
from kd.cache.store import (
    BASIS_KEY,
    META_KEY,
    CacheError,
    CacheMeta,
    CacheWriter,
    CorruptRecordError,
    _environment,
    _release,
)
from kd.cli import app
from kd.core.data import load_dataset
from kd.precompute import BASIS_FIT_ROWS, basis_fit_sample, precompute, precompute_tokens
from kd.student_trainer.sources import CacheSource, LocalSource
from kd.student_trainer.train import TrainConfig, train_student
from kd.teacher_server.loading import Teacher

CODEC = "pca:4"  # the digits teacher has 10 classes: rank 4 keeps a real projection


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def train():
    return load_dataset("digits", "train")


@pytest.fixture(scope="module")
def logits(teacher: Teacher, train) -> torch.Tensor:
    """The teacher's logits of every training sample, in index order (what precompute sees)."""
    src = LocalSource(teacher)
    idx = torch.arange(len(train))
    return torch.cat([src.targets(idx[i : i + 512], train.get(idx[i : i + 512])) for i in range(0, len(idx), 512)])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, teacher: Teacher, train) -> Path:
    out = tmp_path_factory.mktemp("pca") / "c"
    precompute(train, LocalSource(teacher), out, codec=CODEC, batch_size=256, workers=0, progress=False)
    return out


def roundtrip(basis: bytes, z: torch.Tensor) -> torch.Tensor:
    codec = get_codec(CODEC, basis=basis)
    return codec.decode(codec.encode(z), z.shape[1])


def test_fitted_basis_is_stored_and_records_decode_to_the_in_memory_round_trip(fitted: Path, logits, train) -> None:
    assert len(train) > BASIS_FIT_ROWS  # so the fit sees 1024 rows spread over the split, not all
    want = LowRankBasis.fit(logits[basis_fit_sample(4, len(train))], 4).to_bytes()
    reader = CacheReader(fitted)
    stored = reader._get_raw(BASIS_KEY)
    assert stored == want and stored != LowRankBasis.fit(logits, 4).to_bytes()
    assert reader.basis_bytes == len(want) == LowRankBasis.size(10, 4)
    got = reader.get(torch.arange(len(train)))
    assert torch.equal(got, roundtrip(want, logits))
    assert not torch.equal(got, logits)  # a real (lossy) projection, not fp32 records
    assert reader.verify().ok and reader.record_bytes == 2  # 4 coefficients x 4 bits


def test_cache_info_shows_the_basis_and_amortised_bytes(fitted: Path, train) -> None:
    res = CliRunner().invoke(app, ["cache", "info", str(fitted)])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout[res.stdout.index("{") :])
    size = LowRankBasis.size(10, 4)
    assert info["codec"] == CODEC and info["basis_bytes"] == size and len(info["basis_sha256"]) == 64
    assert info["bytes_per_sample"] == 2 + 8 and info["records"] == len(train)
    assert info["bytes_per_sample_with_basis"] == round(10 + size / len(train), 3)


def test_training_from_a_pca_cache(fitted: Path, train) -> None:
    test = load_dataset("digits", "test")
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    before = [p.detach().clone() for p in student.parameters()]
    cfg = TrainConfig(method="kd", epochs=1, seed=0, views=1, batch_size=64)
    result = train_student(student, train, test, cfg, source=CacheSource(str(fitted)), subset=torch.arange(128))
    assert len(result.acc_per_epoch) == 1 and np.isfinite(result.loss_per_epoch[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))


def test_resume_keeps_the_first_basis_and_its_records(tmp_path: Path, teacher: Teacher, train, logits) -> None:
    out = tmp_path / "c"
    given = LowRankBasis.fit(logits[600:], 4).to_bytes()  # not what a fit on the first rows gives

    def stop(done: int) -> None:
        if done >= 300:
            raise Interrupt

    with pytest.raises(Interrupt):
        precompute(train, LocalSource(teacher), out, codec=CODEC, batch_size=100, commit_every=100, workers=0,
                   progress=False, on_batch=stop, basis=given)  # fmt: skip
    first = CacheReader(out)
    kept = sorted(first.keys())
    assert len(kept) == 300
    raw = first.read_raw([i for i, _ in kept])
    other = LowRankBasis.fit(logits[:50], 4).to_bytes()
    with pytest.raises(ValueError, match="another low-rank basis"):  # asked for explicitly: refused
        precompute(train, LocalSource(teacher), out, codec=CODEC, workers=0, progress=False, basis=other)
    with CacheWriter(out, first.meta, basis=other) as w:  # the store itself: the stored one wins
        assert w.basis == given and w.basis_ignored
    report = precompute(train, LocalSource(teacher), out, codec=CODEC, batch_size=256, workers=0, progress=False)
    assert report.skipped == 300 and report.written == len(train) - 300
    reader = CacheReader(out)
    assert np.array_equal(reader.read_raw([i for i, _ in kept]), raw)
    assert torch.equal(reader.get(torch.arange(len(train))), roundtrip(given, logits))
    assert reader.meta.basis_sha256 == first.meta.basis_sha256


def _small_cache(path: Path, z: torch.Tensor) -> bytes:
    meta = CacheMeta(teacher_fingerprint="t", dataset_id="d", dataset_size=len(z), codec=CODEC, num_classes=10)
    basis = LowRankBasis.fit(z, 4).to_bytes()
    with CacheWriter(path, meta, basis=basis) as w:
        w.put(list(range(len(z))), z)
    return basis


def test_a_missing_or_corrupt_basis_is_refused_naming_the_cache(tmp_path: Path, logits) -> None:
    meta = CacheMeta(teacher_fingerprint="t", dataset_id="d", dataset_size=8, codec=CODEC, num_classes=10)
    with pytest.raises(ValueError, match="needs its low-rank basis before the first record"):
        CacheWriter(tmp_path / "none", meta)
    with pytest.raises(ValueError, match="takes no low-rank basis"):
        CacheWriter(tmp_path / "fp32", CacheMeta("t", "d", 8, "fp32", 10), basis=b"x")
    z = logits[:8]
    for damage in ("flip", "swap", "drop"):
        path = tmp_path / damage
        basis = _small_cache(path, z)
        assert torch.equal(CacheReader(path).get(range(8)), roundtrip(basis, z))
        _release(path)  # this process's handle: LMDB allows one per file
        with lmdb.open(str(path)) as env, env.begin(write=True) as txn:
            if damage == "flip":  # the sha256 in the metadata catches it
                bad = bytearray(basis)
                bad[40] ^= 1
                txn.put(BASIS_KEY, bytes(bad))
            elif damage == "swap":  # a valid basis of another cache: its sha256 differs
                txn.put(BASIS_KEY, LowRankBasis.fit(logits[8:40], 4).to_bytes())
            else:
                txn.delete(BASIS_KEY)
        want = "has no low-rank basis record" if damage == "drop" else "does not match the sha256"
        with pytest.raises(CorruptRecordError, match=want) as e:
            CacheReader(path)
        assert str(path) in str(e.value)
        with pytest.raises(CacheError, match=want):  # a resume refuses it too, before writing anything
            CacheWriter(path, meta_of(path), basis=basis)
        res = CliRunner().invoke(app, ["cache", "verify", str(path)])
        assert res.exit_code != 0 and want in res.output and path.name in res.output


def meta_of(path: Path) -> CacheMeta:
    with _environment(path, write=False).begin() as txn:
        return CacheMeta.from_json(txn.get(META_KEY), path)


def test_shards_fit_their_own_basis_or_share_a_given_one(
    tmp_path: Path, teacher: Teacher, teacher_spec: str, train, logits
) -> None:
    n = len(train)
    for s in range(2):  # without --basis: each shard fits on its own rows
        precompute(train, LocalSource(teacher), tmp_path / "own", codec=CODEC, shard=(s, 2), workers=0, progress=False)
    # --basis: shard 0 fits, `kd cache basis` saves it, shard 1 uses it
    cli = CliRunner()
    args = ["precompute", "--source", f"local:{teacher_spec}", "--out", str(tmp_path / "shared"), "--codec", CODEC,
            "--workers", "0"]  # fmt: skip
    res = cli.invoke(app, [*args, "--shard", "0/2"])
    assert res.exit_code == 0, res.output
    saved = tmp_path / "basis.bin"
    res = cli.invoke(app, ["cache", "basis", str(tmp_path / "shared"), str(saved)])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, [*args, "--shard", "1/2", "--basis", str(tmp_path / "absent.bin")])
    assert res.exit_code != 0 and "absent.bin" in res.output
    res = cli.invoke(app, [*args, "--shard", "1/2", "--basis", str(saved)])
    assert res.exit_code == 0, res.output
    fit = [LowRankBasis.fit(logits[s::2][basis_fit_sample(4, len(logits[s::2]))], 4).to_bytes() for s in range(2)]
    assert fit[0] != fit[1]
    for name, want in (("own", fit), ("shared", [fit[0], fit[0]])):
        reader = open_cache(tmp_path / name)
        bases = [r._get_raw(BASIS_KEY) for r in reader.shards]
        assert bases == want, name
        got = reader.get(torch.arange(n))
        for s in range(2):
            rows = torch.arange(s, n, 2)
            assert torch.equal(got[rows], roundtrip(bases[s], logits[rows]))
        assert reader.verify().ok


class TinyLM(torch.nn.Module):
    """[B, S] tokens -> [B, S, V] logits of a rank-8 head: what a language model's last layer makes."""

    fingerprint = "tiny-lm-pca"

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(torch.tanh(self.embed(tokens)))


def test_token_cache_fits_on_positions(tmp_path: Path) -> None:
    from kd.core.data import open_source

    (tmp_path / "c.txt").write_text("\n".join(f"line {i}: " + "abcdefg"[: 1 + i % 7] * 3 for i in range(20)) + "\n")
    source = open_source(f"text:{tmp_path / 'c.txt'}?doc=line&pack=0&block=24")
    vocab = int(source.vocab_size)
    lm = TinyLM(vocab)
    out = tmp_path / "tok"
    precompute_tokens(source, lm, out, codec="pca:8", batch_size=4)
    b = source.batch(list(range(len(source))))
    lengths = b.attention_mask.sum(dim=1)
    z = lm(b.tokens, lengths)
    positions = torch.cat([z[r, : int(lengths[r])] for r in range(len(source))])
    assert len(positions) < BASIS_FIT_ROWS  # a small corpus: the fit sees every position
    reader = CacheReader(out)
    basis = reader._get_raw(BASIS_KEY)
    assert basis == LowRankBasis.fit(positions, 8).to_bytes()
    codec = get_codec("pca:8", basis=basis)
    dense = reader.token_targets(list(range(len(source))))
    want = codec.decode(codec.encode(positions), vocab)
    assert torch.equal(dense[b.attention_mask.bool()], want)
    assert reader.verify().ok


def test_a_bad_basis_file_is_named_as_such_not_as_a_corrupt_cache(tmp_path: Path) -> None:
    from kd.precompute import cache_basis

    with pytest.raises(ValueError, match="the given low-rank basis is unusable for pca:4: not a kd low-rank basis"):
        cache_basis(tmp_path / "new", "pca:4", b"garbage", fit=lambda: torch.zeros(0))
    low_rank = LowRankBasis.fit(torch.randn(64, 10, generator=torch.Generator().manual_seed(0)), 2).to_bytes()
    with pytest.raises(ValueError, match="unusable for pca:4: codec pca:4 needs a basis of rank 4 or more, got 2"):
        cache_basis(tmp_path / "new", "pca:4", low_rank, fit=lambda: torch.zeros(0))
    assert not (tmp_path / "new").exists()


def eye8() -> torch.nn.Module:
    """A teacher whose logits are its 8 inputs (``local:test_pca_cache:eye8?input_shape=8``)."""
    lin = torch.nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(8))
        lin.bias.zero_()
    return lin


def test_the_basis_is_fitted_on_rows_spread_over_a_class_sorted_dataset(tmp_path: Path) -> None:
    """600 rows of each of 4 classes, sorted by class (an image folder's order): the first 1,024 rows
    hold classes 0 and 1 only. Each class's logits lie along its own direction, so a rank-4 basis
    fitted on rows of every class reconstructs every class; one fitted on the first rows cannot."""
    rs = np.random.RandomState(0)
    y = np.repeat(np.arange(4), 600)
    x = 5 * rs.uniform(0.5, 1.5, (len(y), 1)) * np.eye(8)[y] + 0.01 * rs.randn(len(y), 8)
    np.savez(tmp_path / "sorted.npz", x=x.astype(np.float32), y=y)
    cli = CliRunner()
    res = cli.invoke(app, ["precompute", "--source", "local:test_pca_cache:eye8?input_shape=8", "--dataset",
                           f"npz:{tmp_path / 'sorted.npz'}", "--codec", "pca:4", "--out", str(tmp_path / "c"),
                           "--workers", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["cache", "basis", str(tmp_path / "c"), str(tmp_path / "basis.bin")])
    assert res.exit_code == 0, res.output
    stored = LowRankBasis.from_bytes((tmp_path / "basis.bin").read_bytes())

    # float64 reference: the logits are x (identity teacher), row-centred as LowRankBasis.fit does
    z = x.astype(np.float32).astype(np.float64)
    z -= z.mean(axis=1, keepdims=True)
    first = z[:BASIS_FIT_ROWS]
    first_mean = first.mean(axis=0)
    first_comps = np.linalg.svd(first - first_mean, full_matrices=False)[2][:4]

    def residual(mean: np.ndarray, comps: np.ndarray, rows: np.ndarray) -> float:
        """Relative squared error of the rows' best reconstruction in the basis (mean + span)."""
        d = rows - mean
        coef = np.linalg.lstsq(comps.T, d.T, rcond=None)[0]
        return float(((d - coef.T @ comps) ** 2).sum() / (d**2).sum())

    assert residual(first_mean, first_comps, z[y == 3]) > 0.1  # the first rows' basis misses class 3 (0.26)
    for c in range(4):  # the stored basis: every class, to the fp16 storage and the noise
        assert residual(stored.mean.astype(np.float64), stored.components.astype(np.float64), z[y == c]) < 1e-3, c


class TableLM(torch.nn.Module):
    """[B, S] tokens -> [B, S, V] logits: a fixed random vector per token id (positions of few
    distinct tokens span few directions)."""

    fingerprint = "table-lm-pca"

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def test_token_basis_is_fitted_on_positions_spread_over_a_sorted_corpus(tmp_path: Path) -> None:
    from kd.core.data import open_source

    (tmp_path / "corpus").mkdir()  # two files, read in order: the first 1,024 positions are all of a.txt
    (tmp_path / "corpus" / "a.txt").write_text("abcd" * 1000)
    (tmp_path / "corpus" / "b.txt").write_text("wxyz" * 1000)
    source = open_source(f"text:{tmp_path / 'corpus'}?block=64")
    lm = TableLM(int(source.vocab_size))
    precompute_tokens(source, lm, tmp_path / "tok", codec="pca:12", batch_size=4)
    stored = LowRankBasis.from_bytes(CacheReader(tmp_path / "tok")._get_raw(BASIS_KEY))

    b = source.batch(list(range(len(source))))
    real = b.attention_mask.bool()
    z = lm.table[b.tokens][real].double()  # every position's logits, in corpus order (float64 reference)
    tokens = b.tokens[real]
    z -= z.mean(dim=1, keepdim=True)
    first = z[:BASIS_FIT_ROWS]
    assert not torch.isin(tokens[:BASIS_FIT_ROWS], torch.tensor(list(b"wxyz"))).any()
    first_mean = first.mean(dim=0)
    first_comps = torch.linalg.svd(first - first_mean, full_matrices=False)[2][:12]

    def residual(mean: torch.Tensor, comps: torch.Tensor, rows: torch.Tensor) -> float:
        d = rows - mean
        coef = torch.linalg.lstsq(comps.T, d.T).solution
        return float(((d - coef.T @ comps) ** 2).sum() / (d**2).sum())

    late = z[tokens == ord("w")]  # byte-level tokenizer: a byte's id is its value
    assert len(late) == 1000 and residual(first_mean, first_comps, late) > 0.5  # the first positions': 0.93
    mean, comps = torch.from_numpy(stored.mean).double(), torch.from_numpy(stored.components).double()
    assert residual(mean, comps, late) < 1e-3 and residual(mean, comps, z) < 1e-3  # every position's token

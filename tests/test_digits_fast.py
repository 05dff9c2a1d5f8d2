"""The bundled digits load without importing sklearn.datasets / model_selection (scipy), same bytes.

kd reads sklearn's ``digits.csv.gz`` itself and splits it with the indices pinned in
``kd/core/digits_split.npz``; every array must equal sklearn's exactly, or each cache's
``dataset_id`` and every trained digits model would silently change.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kd.core.data import (
    DIGITS_SPLIT_SEED,
    DIGITS_TEST_FRACTION,
    _digits_split,
    digits_csv_path,
    load_dataset,
    load_digits_arrays,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sk_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_fast_loader_is_sklearns_load_digits_exactly(sk_digits: tuple[np.ndarray, np.ndarray]) -> None:
    assert digits_csv_path() is not None  # the fast path is the one under test here
    x, y = load_digits_arrays()
    assert x.shape == (1797, 64) and x.dtype == np.float64
    assert _same(x, sk_digits[0]) and _same(y, sk_digits[1])


def test_split_is_sklearns_stratified_train_test_split(sk_digits: tuple[np.ndarray, np.ndarray]) -> None:
    from sklearn.model_selection import train_test_split

    x = (sk_digits[0] / 16.0).astype(np.float32)
    y = sk_digits[1].astype(np.int64)
    ref = train_test_split(x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y)
    assert all(_same(a, b) for a, b in zip(_digits_split(), ref))


def test_a_fresh_process_loads_digits_without_sklearn_or_scipy(sk_digits: tuple[np.ndarray, np.ndarray]) -> None:
    code = (
        "import json, sys\n"
        "from kd.core.data import load_dataset\n"
        "ids = [load_dataset('digits', s).dataset_id for s in ('train', 'test')]\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy'))\n"
        "print(json.dumps({'ids': ids, 'heavy': heavy}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["ids"] == [load_dataset("digits", s).dataset_id for s in ("train", "test")]
    # and those ids are the ones sklearn's own arrays give (hash of inputs then labels, as Dataset.dataset_id)
    from sklearn.model_selection import train_test_split

    y = sk_digits[1].astype(np.int64)
    x_tr, _, y_tr, _ = train_test_split((sk_digits[0] / 16.0).astype(np.float32), y, test_size=DIGITS_TEST_FRACTION,
                                        random_state=DIGITS_SPLIT_SEED, stratify=y)  # fmt: skip
    h = hashlib.sha256(x_tr.tobytes() + y_tr.tobytes()).hexdigest()[:16]
    assert out["ids"][0] == f"digits/train@{h}"


def test_missing_file_falls_back_to_sklearn(tmp_path: Path, sk_digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = load_digits_arrays(tmp_path / "no-such-dir" / "digits.csv.gz")
    assert _same(x, sk_digits[0]) and _same(y, sk_digits[1])


@pytest.mark.parametrize(
    "text",
    [
        b"0,12,3\n100,5,1\n7,0,9\n",
        b"1.5,-2,3\n4,5e1,6",
    ],
)
def test_a_given_csv_is_parsed_as_np_loadtxt_parses_it(tmp_path: Path, text: bytes) -> None:
    """The ``csv`` argument is honoured (so the fallback test above really took the fallback),
    and each file parses to what sklearn's ``np.loadtxt(gzip text, delimiter=",")`` gives."""
    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(text))
    with gzip.open(path, "rt") as f:
        want = np.loadtxt(f, delimiter=",")
    x, y = load_digits_arrays(path)
    assert _same(x, want[:, :-1]) and _same(y, want[:, -1].astype(int))

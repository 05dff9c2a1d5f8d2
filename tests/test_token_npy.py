"""Pre-tokenised corpora: ``tokens:FILE.npy`` (a 1-D uint16/uint32 array of ids) is memory-mapped,
cut into blocks, and reads as the text it was tokenised from: the same samples and masks, the same
teacher records; ids outside the tokenizer's vocabulary and arrays that are no token stream are
refused naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import refused
from torch import nn
from typer.testing import CliRunner

from kd.cache import CacheReader
from kd.cli import app
from kd.core.data import DatasetError, open_source
from kd.precompute import LocalTokenTeacher, precompute_tokens

PAD, BOS, EOS = 256, 257, 258


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd-cache"))


class BigramLM(nn.Module):
    input_shape = (-1,)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(259, 8)
        self.head = nn.Linear(8, 259)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


def test_a_pretokenised_npy_reads_as_the_text_it_came_from(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("the cat sat on the mat. " * 3)
    (d / "b.txt").write_text("naïve café 東京 " * 4)
    text = open_source(f"text:{d}?block=8")
    stream = [BOS, *(d / "a.txt").read_bytes(), EOS, BOS, *(d / "b.txt").read_bytes(), EOS]
    for dtype in (np.uint16, np.uint32):
        np.save(tmp_path / "ids.npy", np.asarray(stream, dtype=dtype))
        ids = open_source(f"tokens:{tmp_path / 'ids.npy'}?block=8")
        assert isinstance(ids._arrays[0], np.memmap)  # mapped, not read into memory
        assert len(ids) == len(text) == len(stream) // 8
        a, b = ids.batch(range(len(ids))), text.batch(range(len(text)))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attention_mask, b.attention_mask)
        assert torch.equal(a.loss_mask, b.loss_mask)  # bos no target, eos one
        assert a.tokens.flatten().tolist() == stream[: len(ids) * 8]
    # The same ids through a teacher: the same records as from the text.
    teacher = LocalTokenTeacher(BigramLM(), "bigram")
    precompute_tokens(text, teacher, tmp_path / "from-text", codec="topk:4", batch_size=3)
    precompute_tokens(ids, teacher, tmp_path / "from-ids", codec="topk:4", batch_size=5)
    n = len(ids)
    for x, y in zip(CacheReader(tmp_path / "from-text").read_sequences(range(n)),
                    CacheReader(tmp_path / "from-ids").read_sequences(range(n))):  # fmt: skip
        assert np.array_equal(x, y)
    # The id names the content and the tokenizer.
    first = ids.dataset_id
    assert open_source(f"tokens:{tmp_path / 'ids.npy'}?block=8").dataset_id == first
    np.save(tmp_path / "ids.npy", np.asarray(stream[::-1], dtype=np.uint32))
    assert open_source(f"tokens:{tmp_path / 'ids.npy'}?block=8").dataset_id != first


def test_bad_token_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    def opened(arr: np.ndarray, query: str = "?block=4") -> object:
        np.save(tmp_path / "x.npy", arr)
        src = open_source(f"tokens:{tmp_path / 'x.npy'}{query}")
        len(src)
        return src

    with pytest.raises(DatasetError, match=r"token 5 of .*x.npy is id 259, outside the vocabulary .*\(259 ids"):
        opened(np.asarray([1, 2, 3, 4, 5, 259, 6], dtype=np.uint16))
    with pytest.raises(DatasetError, match=r"token 1 of .*x.npy is id -1"):
        opened(np.asarray([1, -1, 3, 4], dtype=np.int32))
    with pytest.raises(DatasetError, match=r"holds float32 \[8\]; expected a 1-D integer array"):
        opened(np.zeros(8, dtype=np.float32))
    with pytest.raises(DatasetError, match=r"holds uint16 \[2, 4\]"):
        opened(np.zeros((2, 4), dtype=np.uint16))
    with pytest.raises(DatasetError, match=r"tokens: bos, pack= do not apply to pre-tokenised ids"):
        opened(np.zeros(8, dtype=np.uint16), "?pack=0&bos=1")
    (tmp_path / "t.npy").write_text("not numpy")
    with pytest.raises(DatasetError, match=r"t.npy is not a .npy array of token ids"):
        len(open_source(f"tokens:{tmp_path / 't.npy'}"))
    # The command line: exit 2, one error line, before any teacher is loaded.
    np.save(tmp_path / "big.npy", np.asarray([1, 2, 300, 4], dtype=np.uint16))
    r = CliRunner().invoke(app, ["precompute", "--source", "local:nowhere:teacher", "--dataset",
                                 f"tokens:{tmp_path / 'big.npy'}?block=2", "--out", str(tmp_path / "c")])  # fmt: skip
    refused(r, "token 2 of", "is id 300, outside the vocabulary")
    np.save(tmp_path / "short.npy", np.asarray([1, 2, 3], dtype=np.uint16))
    r = CliRunner().invoke(app, ["precompute", "--source", "local:nowhere:teacher", "--dataset",
                                 f"tokens:{tmp_path / 'short.npy'}?block=4", "--out", str(tmp_path / "c")])  # fmt: skip
    refused(r, "3 tokens", "fewer than one block of 4")

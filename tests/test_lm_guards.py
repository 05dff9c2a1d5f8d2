"""Token teachers, students and datasets that do not fit one another are refused up front, by
name: a masked LM as a causal teacher, a dataset of another tokenizer, sequences longer than a
model's positions, token data given to ``kd train``. Real parts: tiny modules and Hugging Face
models built from configs (no downloads), real servers on 127.0.0.1, real caches in tmp dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_checks import refused
from click.testing import Result
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.precompute import LocalTokenTeacher, precompute_tokens
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

VOCAB = 259  # the byte tokenizer's


class BigramLM(nn.Module):
    """A causal token module: position s sees tokens s and s - 1."""

    input_shape = (-1,)

    def __init__(self, vocab: int = VOCAB, max_length: int = 64) -> None:
        super().__init__()
        self.max_length = max_length
        self.embed = nn.Embedding(vocab, 8)
        self.prev = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev)) * 3.0


def bigram(vocab: int = VOCAB, max_length: int = 64) -> BigramLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return BigramLM(int(vocab), int(max_length))


class CopyMLM(nn.Module):
    """A (perfect) masked LM: at position s it predicts the token at s, as an MLM's logits mean."""

    input_shape = (-1,)
    task = "masked-lm"

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(8.0))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return nn.functional.one_hot(tokens, VOCAB).float() * self.scale


def copy_mlm() -> CopyMLM:
    return CopyMLM()


BIGRAM, MLM = f"{__name__}:bigram", f"{__name__}:copy_mlm"


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("lmguards")
    (d / "c.txt").write_text("\n".join(f"line {i}: the cat sat on the mat"[: 8 + 3 * i] for i in range(8)) + "\n")
    return f"text:{d / 'c.txt'}?doc=line&pack=0&block=32"


def _serve(*teachers):
    return start_server(list(teachers), batching=TeacherOptions(max_batch_tokens=512, max_batch_size=8, warmup=False))


def hf_bert_mlm(directory: Path, n_pos: int = 64) -> Path:
    """A tiny BertForMaskedLM saved as safetensors (built from a config: nothing downloaded)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, max_position_embeddings=n_pos, hidden_size=16,
                                  num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)  # fmt: skip
    transformers.BertForMaskedLM(cfg).save_pretrained(directory, safe_serialization=True)
    return directory


# -- 1. a masked LM is no causal teacher -------------------------------------------------------
def test_precompute_refuses_a_masked_lm_teacher_local_hf_and_served(tmp_path: Path, corpus: str) -> None:
    refused(cli("precompute", "--source", f"local:{MLM}", "--dataset", corpus, "--codec", "topk:4",
                "--out", str(tmp_path / "a")), "masked LM", "token s + 1")  # fmt: skip
    bert = hf_bert_mlm(tmp_path / "bert")
    refused(cli("precompute", "--source", f"local:hf:{bert}", "--dataset", corpus, "--codec", "topk:4",
                "--out", str(tmp_path / "b")), "masked LM")  # fmt: skip
    running = _serve(load_teacher("mlm", MLM))
    try:
        refused(cli("precompute", "--source", f"server:127.0.0.1:{running.port}/mlm", "--dataset", corpus,
                    "--codec", "fp16", "--out", str(tmp_path / "c")), "masked LM")  # fmt: skip
    finally:
        running.stop(grace=1)
    assert not (tmp_path / "a" / "data.mdb").exists() and not (tmp_path / "c" / "data.mdb").exists()
    # A causal module is still taken, and a bare masked module given in process is refused as well.
    with pytest.raises(ValueError, match="masked LM"):
        precompute_tokens(open_source(corpus), LocalTokenTeacher(copy_mlm()), tmp_path / "d", codec="topk:4")
    precompute_tokens(open_source(corpus), LocalTokenTeacher.from_spec(BIGRAM), tmp_path / "e", codec="topk:4")


def test_train_lm_and_onpolicy_refuse_a_masked_lm_teacher(tmp_path: Path, corpus: str) -> None:
    from kd.student_trainer.sources import LocalSource
    from kd.student_trainer.train import train_tokens

    with pytest.raises(ValueError, match="masked LM"):
        train_tokens(bigram(), open_source(corpus), LocalSource(MLM), epochs=1, batch_size=4)
    running = _serve(load_teacher("mlm", MLM))
    try:
        refused(cli("onpolicy", "--server", f"127.0.0.1:{running.port}", "--teacher", "mlm", "--dataset", corpus,
                    "--student", BIGRAM, "--steps", "1", "--batch-size", "2", "--prompt-tokens", "4",
                    "--max-new-tokens", "4", "--eval-prompts", "0"), "masked LM")  # fmt: skip
    finally:
        running.stop(grace=1)


# -- 2. the teacher's tokenizer is the dataset's ------------------------------------------------
def byte_bigram() -> BigramLM:
    """A causal module that says it was trained on the byte tokenizer's ids (as kd.demo_lm's ByteLM)."""
    from kd.core.tokens import ByteTokenizer

    model = bigram()
    model.tokenizer_hash = ByteTokenizer().hash
    return model


BYTE_BIGRAM = f"{__name__}:byte_bigram"


def word_tokenizer(path: Path, n: int = VOCAB) -> Path:
    """A WordLevel tokenizer.json of ``n`` ids (``<pad>``, ``<s>``, ``</s>``, then w0, w1, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> dict[str, str]:
    """A corpus tokenised by a 259-word tokenizer: as many ids as the byte tokenizer, other tokens."""
    d = tmp_path_factory.mktemp("words")
    tok = word_tokenizer(d / "tokenizer.json")
    (d / "a.txt").write_text("\n".join(" ".join(f"w{(7 * i + j) % 250}" for j in range(8)) for i in range(6)) + "\n")
    return {"uri": f"text:{d / 'a.txt'}?doc=line&pack=0&tokenizer={tok}", "tokenizer": str(tok), "dir": str(d)}


def test_precompute_refuses_a_dataset_of_another_tokenizer(tmp_path: Path, corpus: str, words) -> None:
    assert open_source(words["uri"]).vocab_size == VOCAB  # the sizes agree: only the identity tells
    refused(cli("precompute", "--source", f"local:{BYTE_BIGRAM}", "--dataset", words["uri"], "--codec", "topk:4",
                "--out", str(tmp_path / "a")), "another tokenizer", "?tokenizer=")  # fmt: skip
    running = _serve(load_teacher("lm", BYTE_BIGRAM))
    try:
        refused(cli("precompute", "--source", f"server:127.0.0.1:{running.port}/lm", "--dataset", words["uri"],
                    "--codec", "topk:4", "--out", str(tmp_path / "b")), "another tokenizer")  # fmt: skip
        assert cli("precompute", "--source", f"server:127.0.0.1:{running.port}/lm", "--dataset", corpus,
                   "--codec", "topk:4", "--out", str(tmp_path / "c")).exit_code == 0  # fmt: skip
    finally:
        running.stop(grace=1)
    # A teacher that states no tokenizer is taken on the vocabulary size alone, as before.
    assert cli("precompute", "--source", f"local:{BIGRAM}", "--dataset", words["uri"], "--codec", "topk:4",
               "--out", str(tmp_path / "d")).exit_code == 0  # fmt: skip


def test_hf_teacher_tokenizer_json_is_compared_with_the_dataset(tmp_path: Path, corpus: str, words) -> None:
    import shutil

    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    d = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    shutil.copy(words["tokenizer"], d / "tokenizer.json")
    teacher = load_teacher("hf", f"hf:{d}")
    assert teacher.signature.extra["tokenizer_json"] == open_source(words["uri"]).tokenizer.hash
    refused(cli("precompute", "--source", f"local:hf:{d}", "--dataset", corpus, "--codec", "topk:4",
                "--out", str(tmp_path / "a")), "another tokenizer")  # fmt: skip
    uri = words["uri"].replace(words["tokenizer"], str(d / "tokenizer.json"))  # the teacher's own file
    r = cli("precompute", "--source", f"local:hf:{d}", "--dataset", uri, "--codec", "topk:4", "--out",
            str(tmp_path / "b"))  # fmt: skip
    assert r.exit_code == 0, r.output
    # The same tokenizer saved with other formatting (another tokenizers version, a copy): other
    # bytes, the same id for every token. It was refused when the files' bytes were compared.
    import json

    same = tmp_path / "same" / "tokenizer.json"
    same.parent.mkdir()
    same.write_text(json.dumps(json.loads((d / "tokenizer.json").read_text()), indent=4, sort_keys=True))
    assert (
        open_source(uri.replace(str(d / "tokenizer.json"), str(same))).tokenizer.hash
        != teacher.signature.extra["tokenizer_json"]
    )
    r = cli("precompute", "--source", f"local:hf:{d}", "--dataset", uri.replace(str(d / "tokenizer.json"), str(same)),
            "--codec", "topk:4", "--out", str(tmp_path / "c"))  # fmt: skip
    assert r.exit_code == 0, r.output
    # Two ids swapped, as many tokens: the sizes agree, the ids mean other tokens: refused.
    spec = json.loads((d / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = list(vocab)[3], list(vocab)[4]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = tmp_path / "swapped" / "tokenizer.json"
    swapped.parent.mkdir()
    swapped.write_text(json.dumps(spec))
    refused(cli("precompute", "--source", f"local:hf:{d}", "--dataset",
                uri.replace(str(d / "tokenizer.json"), str(swapped)), "--codec", "topk:4", "--out",
                str(tmp_path / "e")), "another tokenizer")  # fmt: skip


def test_onpolicy_and_train_lm_refuse_data_of_another_tokenizer(tmp_path: Path, corpus: str, words) -> None:
    running = _serve(load_teacher("lm", BYTE_BIGRAM))
    base = ["onpolicy", "--server", f"127.0.0.1:{running.port}", "--teacher", "lm", "--student", BIGRAM,
            "--steps", "1", "--batch-size", "2", "--prompt-tokens", "2", "--max-new-tokens", "2",
            "--eval-prompts", "0"]  # fmt: skip
    try:
        refused(cli(*base, "--dataset", words["uri"]), "--dataset", "another tokenizer")
        refused(cli(*base, "--dataset", corpus, "--val-dataset", words["uri"]), "--val-dataset", "another tokenizer")
    finally:
        running.stop(grace=1)
    cache = tmp_path / "cache"
    assert cli("precompute", "--source", f"local:{BIGRAM}", "--dataset", corpus, "--codec", "topk:4",
               "--out", str(cache)).exit_code == 0  # fmt: skip
    refused(cli("train-lm", "--source", f"cache:{cache}", "--dataset", corpus, "--val-dataset", words["uri"],
                "--student", BIGRAM, "--batch-size", "4"), "--val-dataset", "tokenised by")  # fmt: skip


# -- 3. sequences longer than a model's positions: one line, before work --------------------------
def hf_gpt2(n_pos: int = 16):
    """A tiny GPT-2 causal LM of ``n_pos`` positions (no max_length attribute: its config says it)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=int(n_pos), n_embd=16, n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


HF_STUDENT = f"{__name__}:hf_gpt2?n_pos=16"


def test_precompute_refuses_sequences_longer_than_the_teachers_positions(tmp_path: Path, corpus: str) -> None:
    hf_gpt2(16).save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    longest = int(open_source(corpus).batch(range(8)).attention_mask.sum(1).max())
    assert longest > 16
    refused(cli("precompute", "--source", f"local:hf:{tmp_path / 'gpt2'}", "--dataset", corpus, "--codec", "fp16",
                "--out", str(tmp_path / "a")),
            f"a row of {longest} tokens is longer than the maximum length 16 of teacher 'teacher':",
            "?block=")  # fmt: skip
    refused(cli("precompute", "--source", f"local:{BIGRAM}?max_length=16", "--dataset", corpus, "--codec", "topk:4",
                "--out", str(tmp_path / "b")), "maximum length 16")  # fmt: skip
    # An in-process model given as it is: its config's positions.
    with pytest.raises(ValueError, match="maximum length 16"):
        precompute_tokens(open_source(corpus), LocalTokenTeacher(hf_gpt2(16)), tmp_path / "c", codec="fp16")
    assert not (tmp_path / "a" / "data.mdb").exists() and not (tmp_path / "c" / "data.mdb").exists()
    ok = corpus.replace("block=32", "block=16")  # cut to the positions: taken
    r = cli("precompute", "--source", f"local:hf:{tmp_path / 'gpt2'}", "--dataset", ok, "--codec", "fp16",
            "--out", str(tmp_path / "d"))  # fmt: skip
    assert r.exit_code == 0, r.output


def test_train_lm_refuses_a_student_with_fewer_positions_than_the_data(tmp_path: Path, corpus: str) -> None:
    short = corpus.replace("block=32", "block=16")
    for name, uri in (("long", corpus), ("short", short)):
        assert cli("precompute", "--source", f"local:{BIGRAM}", "--dataset", uri, "--codec", "topk:4",
                   "--out", str(tmp_path / name)).exit_code == 0  # fmt: skip
    refused(cli("train-lm", "--source", f"cache:{tmp_path / 'long'}", "--dataset", corpus, "--val-dataset", short,
                "--student", HF_STUDENT, "--batch-size", "4"), "the maximum length 16 of the student:",
            "lower --dataset")  # fmt: skip
    refused(cli("train-lm", "--source", f"cache:{tmp_path / 'short'}", "--dataset", short, "--val-dataset", corpus,
                "--student", HF_STUDENT, "--batch-size", "4"), "the maximum length 16 of the student:",
            "--val-dataset")  # fmt: skip
    r = cli("train-lm", "--source", f"cache:{tmp_path / 'short'}", "--dataset", short, "--val-dataset", short,
            "--student", HF_STUDENT, "--batch-size", "4")  # fmt: skip
    assert r.exit_code == 0, r.output


def test_onpolicy_reads_a_hf_students_positions_and_the_teachers(corpus: str) -> None:
    running = _serve(load_teacher("lm", f"{BIGRAM}?max_length=24"))
    base = ["onpolicy", "--server", f"127.0.0.1:{running.port}", "--teacher", "lm", "--dataset", corpus,
            "--steps", "1", "--batch-size", "2", "--eval-prompts", "0"]  # fmt: skip
    try:
        refused(cli(*base, "--student", HF_STUDENT, "--prompt-tokens", "12", "--max-new-tokens", "8"),
                "exceed the student's max_length 16")  # fmt: skip
        refused(cli(*base, "--student", BIGRAM, "--prompt-tokens", "20", "--max-new-tokens", "8"),
                "a row of 28 tokens is longer than the maximum length 24 of teacher 'lm':")  # fmt: skip
        # Short rollouts, but the perplexity runs the student over whole --val-dataset samples.
        refused(cli(*base, "--student", HF_STUDENT, "--prompt-tokens", "4", "--max-new-tokens", "4",
                    "--val-dataset", corpus), "the maximum length 16 of the student:", "--val-dataset")  # fmt: skip
    finally:
        running.stop(grace=1)


# -- 5. kd train takes no token data -----------------------------------------------------------
def test_kd_train_refuses_token_data_naming_train_lm(tmp_path: Path, corpus: str) -> None:
    cache = tmp_path / "cache"
    assert cli("precompute", "--source", f"local:{BIGRAM}", "--dataset", corpus, "--codec", "topk:8",
               "--out", str(cache)).exit_code == 0  # fmt: skip
    base = ["train", "--dataset", corpus, "--val-dataset", corpus, "--student", BIGRAM, "--epochs", "1",
            "--batch-size", "4"]  # fmt: skip
    for extra in (["--method", "ce"], ["--method", "kd", "--source", f"cache:{cache}"],
                  ["--method", "token-fkl", "--source", f"cache:{cache}"],
                  ["--method", "kd", "--source", f"local:{BIGRAM}"]):  # fmt: skip
        refused(cli(*base, *extra), "kd train-lm", "kd onpolicy")
    # The held-out split alone is token data: refused as well, naming the flag.
    refused(cli("train", "--dataset", "digits", "--val-dataset", corpus, "--epochs", "1"), "--val-dataset",
            "token dataset")  # fmt: skip
    refused(
        cli("online", "one", "--dataset", corpus, "--val-dataset", corpus, "--epochs", "1"), "kd online", "kd train-lm"
    )


# -- 6. a token file shorter than one block holds no sample: named, before work ----------------------
def test_a_token_file_shorter_than_one_block_is_refused_naming_it(tmp_path: Path, corpus: str) -> None:
    """The text "hello" is 7 byte-tokenizer ids with bos and eos: no block of 16. Every command that opens a
    token dataset names the file, its token count and the block (the cache said "dataset_size must
    be a positive integer, got 0"; onpolicy "has no samples"), and nothing is created."""
    from kd.core.data import DatasetError
    from kd.student_trainer.sources import LocalSource
    from kd.student_trainer.train import train_tokens

    text = "hello"
    (tmp_path / "short.txt").write_text(text)
    count = 1 + len(text.encode()) + 1  # bos, the bytes, eos
    short = f"text:{tmp_path / 'short.txt'}?block=16"
    needles = (str(tmp_path / "short.txt"), f"{count} tokens", "one block of 16", f"at most {count}")
    out = tmp_path / "c"
    refused(cli("precompute", "--source", f"local:{BIGRAM}", "--dataset", short, "--codec", "topk:4",
                "--out", str(out)), "--dataset", *needles)  # fmt: skip
    assert not (out / "data.mdb").exists()
    (tmp_path / "blank.txt").write_text("\n \n")
    refused(cli("precompute", "--source", f"local:{BIGRAM}", "--dataset",
                f"text:{tmp_path / 'blank.txt'}?doc=line&pack=0", "--out", str(out)),
            str(tmp_path / "blank.txt"), "no document")  # fmt: skip
    with pytest.raises(DatasetError, match=f"{count} tokens"):
        precompute_tokens(open_source(short), LocalTokenTeacher(bigram()), out, codec="topk:4")
    with pytest.raises(DatasetError, match=f"{count} tokens"):
        train_tokens(bigram(), open_source(short), LocalSource(BIGRAM), epochs=1, batch_size=4)
    assert not out.exists()

    cache = tmp_path / "cache"
    assert cli("precompute", "--source", f"local:{BIGRAM}", "--dataset", corpus, "--codec", "topk:4",
               "--out", str(cache)).exit_code == 0  # fmt: skip
    base = ["train-lm", "--source", f"cache:{cache}", "--student", BIGRAM, "--batch-size", "4"]
    refused(cli(*base, "--dataset", short, "--val-dataset", corpus), "--dataset", *needles)
    refused(cli(*base, "--dataset", corpus, "--val-dataset", short), "--val-dataset", *needles)
    running = _serve(load_teacher("lm", BIGRAM))
    base = ["onpolicy", "--server", f"127.0.0.1:{running.port}", "--teacher", "lm", "--student", BIGRAM,
            "--steps", "1", "--batch-size", "2", "--prompt-tokens", "2", "--max-new-tokens", "2"]  # fmt: skip
    try:
        refused(cli(*base, "--dataset", short), "--dataset", *needles)
        refused(cli(*base, "--dataset", corpus, "--val-dataset", short), "--val-dataset", *needles)
    finally:
        running.stop(grace=1)

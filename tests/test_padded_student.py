"""A student whose vocabulary is padded past its tokenizer's ids (a Hugging Face causal LM with
``vocab_size`` 320 for a tokenizer of fewer ids, as Pythia, OPT, Phi and Qwen pad theirs) in
``kd train-lm`` and ``kd onpolicy``: kd refused it at the first step ("teacher logits [.., 290] !=
student logits [.., 320]") or, on policy, drew ids no text has. Now its logits are cut to the
tokenizer's ids (the first V columns) before the loss, the sampling and the metrics; the saved
student keeps its own shape; a student narrower than the vocabulary is refused before any step.
Tiny GPT-2 configs and a BPE tokenizer.json the test trains and writes; losses and perplexities
against float64 references on the cut logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_checks import refused
from safetensors.torch import load_file
from tiny_lm import BigramLM
from torch import nn
from typer.testing import CliRunner

from kd.cli import app
from kd.core.data import open_source
from kd.core.tokens import IGNORE_INDEX, JsonTokenizer, next_token_labels
from kd.student_trainer.onpolicy import OnPolicyConfig, generate, prompt_lengths, train_onpolicy
from kd.student_trainer.sources import LocalSource
from kd.student_trainer.train import train_tokens
from kd.teacher_server.client import TeacherClient
from kd.teacher_server.loading import load_teacher
from kd.teacher_server.server import TeacherOptions, start_server

PADDED = 320


def gpt2(vocab: int = PADDED, seed: int = 3):
    """A tiny GPT-2 causal LM of ``vocab`` rows (embedding and tied output)."""
    import transformers

    torch.manual_seed(seed)
    # no dropout: the training forward is the reference's
    cfg = transformers.GPT2Config(
        vocab_size=int(vocab),
        n_positions=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(cfg)


class NarrowHead(nn.Module):
    """Embeds every id of the vocabulary but gives fewer logits than it has ids."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


def narrow_head(vocab: int = 290, width: int = 250) -> NarrowHead:
    return NarrowHead(int(vocab), int(width))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("transformers")
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("padded_student")
    words = "the cat sat on the mat and the dog ate the cat food while it rained".split()
    lines = [" ".join(words[i:] + words[:i])[: 12 + 3 * i] for i in range(len(words))]
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    (d / "val.txt").write_text("the dog sat on the mat\nit rained on the cat\n")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        [(d / "train.txt").read_text()] * 10,
        trainers.BpeTrainer(
            vocab_size=290,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),  # fmt: skip
    )
    teacher_dir = d / "teacher"
    teacher_dir.mkdir()
    tk.save(str(teacher_dir / "tokenizer.json"))
    gpt2(PADDED, seed=11).save_pretrained(teacher_dir, safe_serialization=True)  # padded too: kd cuts it
    tok = teacher_dir / "tokenizer.json"
    uri = "text:{}?tokenizer=" + str(tok) + "&doc=line&pack=0&block=32"
    vocab = JsonTokenizer(tok).vocab_size
    assert vocab < PADDED
    return {"dir": teacher_dir, "train": uri.format(d / "train.txt"), "val": uri.format(d / "val.txt"),
            "vocab": vocab}  # fmt: skip


def _fkl_reference(student: nn.Module, teacher: nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor,
                   vocab: int) -> float:  # fmt: skip
    """Forward KL(p_t || p_s) per counted token in float64, the student's logits cut to ``vocab``
    columns, each sequence run alone at its real length."""
    labels = next_token_labels(tokens, loss_mask)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(tokens.shape[0]):
            keep = labels[i] != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            length = int(keep.nonzero().max()) + 2  # the last counted position predicts the next token
            row = tokens[i : i + 1, :length]
            s = student.double()(input_ids=row).logits[0, :, :vocab]
            t = teacher.double()(input_ids=row).logits[0]
            log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            total += float(kl[keep[:length]].sum())
            n += int(keep[:length].sum())
    student.float(), teacher.float()
    return total / n


def test_a_padded_student_trains_on_its_first_vocab_logits(setup) -> None:
    train = open_source(setup["train"])
    source = LocalSource(f"hf:{setup['dir']}")
    vocab = setup["vocab"]
    assert source.num_classes == vocab  # the teacher is cut to the tokenizer's ids next to it
    b = train.batch(range(len(train)))
    want = _fkl_reference(gpt2(), source.teacher.model, b.tokens, b.loss_mask, vocab)
    uncut = gpt2()
    with torch.no_grad():  # the same loss over all 320 columns is another number: the cut matters
        wide = uncut(input_ids=b.tokens).logits.double()
        t = source.teacher.model(input_ids=b.tokens).logits.double()
        t = F.pad(t, (0, PADDED - vocab), value=-math.inf)
        labels = next_token_labels(b.tokens, b.loss_mask)
        kl = (t.softmax(-1) * (t.log_softmax(-1) - wide.log_softmax(-1))).nan_to_num(0).sum(-1)
        assert abs(float(kl[labels != IGNORE_INDEX].mean()) - want) > 1e-2
    # one step over the whole corpus: the epoch's loss is the loss at the initial weights
    student = gpt2()
    losses = train_tokens(student, train, source, epochs=1, batch_size=len(train), lr=0.0, optimizer="sgd")
    assert losses[0] == pytest.approx(want, rel=1e-5)
    assert student.get_output_embeddings().weight.shape[0] == PADDED  # the user's model keeps its shape


def _perplexity_reference(model: nn.Module, data, vocab: int) -> float:
    b = data.batch(range(len(data)))
    labels = next_token_labels(b.tokens, b.loss_mask)
    with torch.no_grad():
        logits = model.double()(input_ids=b.tokens).logits[..., :vocab]
    model.float()
    keep = labels != IGNORE_INDEX
    nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return math.exp(float(nll[keep].mean()))


def test_cli_train_lm_saves_the_padded_student_whole_and_scores_the_real_ids(setup, tmp_path: Path) -> None:
    out = tmp_path / "student.safetensors"
    r = CliRunner().invoke(app, ["train-lm", "--source", f"local:hf:{setup['dir']}", "--dataset", setup["train"],
                                 "--val-dataset", setup["val"], "--student", f"{__name__}:gpt2", "--epochs", "2",
                                 "--batch-size", "4", "--lr", "0.01", "--out", str(out)])  # fmt: skip
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout.strip().splitlines()[-1])
    weights = load_file(str(out))
    assert weights["transformer.wte.weight"].shape[0] == PADDED
    trained = gpt2()
    trained.load_state_dict(weights, strict=False)  # lm_head.weight is tied to wte
    trained.tie_weights()
    val = open_source(setup["val"])
    assert result["val_ppl"] == pytest.approx(_perplexity_reference(trained, val, setup["vocab"]), rel=1e-5)
    assert result["val_ppl"] != pytest.approx(_perplexity_reference(trained, val, PADDED), rel=1e-3)


def test_a_student_narrower_than_the_vocabulary_is_refused_before_any_step(setup, tmp_path: Path) -> None:
    base = ["train-lm", "--source", f"local:hf:{setup['dir']}", "--dataset", setup["train"], "--val-dataset",
            setup["val"], "--out", str(tmp_path / "s.safetensors")]  # fmt: skip
    vocab = setup["vocab"]
    refused(CliRunner().invoke(app, [*base, "--student", f"{__name__}:gpt2?vocab=200"]), "embeds 200 token ids",
            f"fewer than the {vocab} ids")  # fmt: skip
    refused(CliRunner().invoke(app, [*base, "--student", f"{__name__}:narrow_head?vocab={vocab}&width=250"]),
            "gives 250 logits per position", f"fewer than the {vocab} ids")  # fmt: skip
    assert not (tmp_path / "s.safetensors").exists()


# -- on policy: a byte corpus (259 ids), a bigram teacher served, a student of 320 rows ---------------
V = 259


def padded_bigram() -> BigramLM:
    """A student of 320 logits whose padded columns hold almost all the mass (bias +20): any draw
    over its whole width is a padded id."""
    torch.manual_seed(9)
    model = BigramLM(8, 1.0, vocab=PADDED)
    with torch.no_grad():
        model.head.bias[V:] = 20.0
    return model


def byte_teacher() -> BigramLM:
    torch.manual_seed(8)
    return BigramLM(16, 2.0)


@pytest.fixture(scope="module")
def byte_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("padded_onpolicy")
    (d / "train.txt").write_text("\n".join(f"the cat {i} sat on the mat" for i in range(12)) + "\n")
    (d / "val.txt").write_text("the dog sat on the log\nthe bird sang\n")
    uri = "text:{}?doc=line&pack=0&block=24"
    return uri.format(d / "train.txt"), uri.format(d / "val.txt")


def test_onpolicy_never_draws_a_padded_id_and_scores_the_real_ones(byte_corpus) -> None:
    train, val = (open_source(u) for u in byte_corpus)
    batch = train.batch(range(4))
    plens = prompt_lengths(batch, 4, False)
    student = padded_bigram()
    wide = generate(student, batch.tokens, plens, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert int(wide.tokens.max()) >= V  # over its whole width the student draws padded ids
    seqs = generate(student, batch.tokens, plens, max_new_tokens=6, generator=torch.Generator().manual_seed(0),
                    vocab=V)  # fmt: skip
    assert int(seqs.tokens.max()) < V and int(seqs.lengths.min()) > int(plens.max())

    running = start_server([load_teacher("bigram", f"{__name__}:byte_teacher")],
                           batching=TeacherOptions(max_batch_tokens=4096, warmup=False))  # fmt: skip
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            config = OnPolicyConfig(steps=3, batch_size=4, prompt_tokens=4, max_new_tokens=6, lmbda=1.0,
                                    eval_prompts=0, lr=0.01, seed=0)  # fmt: skip
            result = train_onpolicy(student, client, "bigram", train, config, val=val)
    finally:
        running.stop(grace=1)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert result.on_policy_batches == 3
    # the perplexity before training is the untrained student's over the real ids
    fresh = padded_bigram()
    b = val.batch(range(len(val)))
    labels = next_token_labels(b.tokens, b.loss_mask)
    with torch.no_grad():
        logits = fresh.double()(b.tokens)[..., :V]
    keep = labels != IGNORE_INDEX
    nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert result.val_before["ppl"] == pytest.approx(math.exp(float(nll[keep].mean())), rel=1e-5)
    assert student.head.weight.shape[0] == PADDED


def test_onpolicy_refuses_a_narrower_student(byte_corpus) -> None:
    train = open_source(byte_corpus[0])
    running = start_server([load_teacher("bigram", f"{__name__}:byte_teacher")],
                           batching=TeacherOptions(max_batch_tokens=4096, warmup=False))  # fmt: skip
    try:
        with TeacherClient(f"127.0.0.1:{running.port}", timeout=60) as client:
            config = OnPolicyConfig(steps=1, batch_size=4, prompt_tokens=4, max_new_tokens=4, eval_prompts=0)
            with pytest.raises(ValueError, match="gives 200 logits per position, fewer than the 259 ids"):
                train_onpolicy(narrow_head(V, 200), client, "bigram", train, config)
    finally:
        running.stop(grace=1)

"""A Hugging Face LM whose ``vocab_size`` is padded past its tokenizer's ids (Pythia, OPT, Phi, Qwen
pad to a multiple of 64 or 128) served and precomputed with its own tokenizer: kd refused it ("has
a vocabulary of 320 but the dataset's tokenizer has 290 ... give ?tokenizer= of the teacher", which
was given). ``hf:DIR`` now cuts the embedding and output rows to the tokenizer's ids: the real ids'
logits are the model's own, and no top-k or draw can pick an id no text has. A tiny GPT-2 and a
tokenizer trained here, saved as a model directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cli_checks import refused
from typer.testing import CliRunner

from kd.cache.store import CacheReader
from kd.cli import app
from kd.core.data import open_source
from kd.core.tokens import JsonTokenizer
from kd.teacher_server.lm import load_token_teacher


@pytest.fixture(scope="module")
def padded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, torch.nn.Module]:
    import tokenizers
    import transformers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    d = tmp_path_factory.mktemp("padded")
    words = "the cat sat on the mat and the dog ate the cat food while it rained".split()
    (d / "corpus.txt").write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) + "\n")
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        [(d / "corpus.txt").read_text()] * 10,
        trainers.BpeTrainer(
            vocab_size=290,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),  # fmt: skip
    )
    model_dir = d / "model"
    model_dir.mkdir()
    tk.save(str(model_dir / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=320, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    return model_dir, d / "corpus.txt", model


def test_a_padded_model_is_cut_to_its_tokenizers_ids(padded) -> None:
    model_dir, _, original = padded
    ids = JsonTokenizer(model_dir / "tokenizer.json").vocab_size
    assert ids < 320
    teacher = load_token_teacher("lm", f"hf:{model_dir}")
    assert teacher.num_classes == ids and teacher.signature.extra["vocab_size"] == str(ids)
    tokens = torch.randint(0, ids, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = original(input_ids=tokens).logits[..., :ids]
        got = teacher.model(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the real ids' logits, exactly


def test_precompute_with_the_models_own_tokenizer(padded, tmp_path: Path) -> None:
    model_dir, corpus, original = padded
    data = f"text:{corpus}?tokenizer={model_dir / 'tokenizer.json'}&doc=line&pack=0&block=32"
    r = CliRunner().invoke(app, ["precompute", "--source", f"local:hf:{model_dir}", "--dataset", data,
                                 "--codec", "topk:4", "--out", str(tmp_path / "c")])  # fmt: skip
    assert r.exit_code == 0, r.output
    source = open_source(data)
    reader = CacheReader(tmp_path / "c")
    assert reader.meta.num_classes == source.vocab_size and len(reader) == len(source)
    t = reader.token_targets(range(len(source)))
    assert int(t.ids.max()) < source.vocab_size  # no padded id among the top-k
    # A dataset of another tokenizer is still refused.
    refused(CliRunner().invoke(app, ["precompute", "--source", f"local:hf:{model_dir}", "--dataset",
                                     f"text:{corpus}?doc=line&pack=0&block=32", "--out", str(tmp_path / "d")]),
            "tokenised by byte", "by another tokenizer")  # fmt: skip

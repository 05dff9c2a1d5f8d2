"""The tiny causal token model the token tests share (teachers and students alike): each position
sees its own token and the one before, so right padding never changes a real position, and a
shifted or mis-unpacked answer shows. Byte-tokenizer vocabulary by default."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 259  # the byte tokenizer's


class BigramLM(nn.Module):
    input_shape = (-1,)  # a token module: kd serve / local: take it as a token teacher

    def __init__(self, dim: int = 8, scale: float = 2.0, vocab: int = VOCAB, max_length: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.prev = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.scale = scale
        if max_length is not None:
            self.max_length = max_length

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        prev = nn.functional.pad(self.prev(tokens)[:, :-1], (0, 0, 1, 0))
        return self.head(torch.tanh(self.embed(tokens) + prev)) * self.scale

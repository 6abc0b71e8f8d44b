"""Training data for the small training runs: a real text corpus or a synthetic Zipf stream.

- "text": the Python reference documentation that ships with the interpreter
  (`pydoc_data.topics`, ~465 kB of English prose and code: what `help("assert")` prints),
  tokenised by bytes. No download, same bytes on every machine with the same Python.
- "zipf": an order-1 Markov stream whose next-token distribution is a Zipf law over a
  per-token random permutation of the vocabulary: heavy-tailed like text and learnable
  (the bigram entropy is well below the unigram entropy).

Both return one long int64 token tensor; `sample_batch` cuts random windows from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from model.config import ConfigError

DataKind = Literal["text", "zipf"]


def text_corpus() -> bytes:
    """The Python documentation topics shipped with the interpreter, as UTF-8 bytes."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


@dataclass
class ByteTokenizer:
    """Bytes → ids 0..vocab_size−1, most frequent byte first.

    When the model's vocabulary is smaller than the number of distinct bytes, the rarest
    bytes share the last id (ids are then not invertible for them; fine for training).
    `byte_to_id`: int64 [256].
    """

    byte_to_id: torch.Tensor

    @classmethod
    def fit(cls, corpus: bytes, vocab_size: int) -> "ByteTokenizer":
        if vocab_size < 2:
            raise ConfigError(f"vocab_size: a byte tokenizer needs at least 2 ids, got {vocab_size}")
        raw = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        freq = torch.bincount(raw, minlength=256)
        order = torch.argsort(-freq, stable=True)  # byte values, most frequent first
        byte_to_id = torch.empty(256, dtype=torch.int64)
        byte_to_id[order] = torch.arange(256).clamp(max=vocab_size - 1)
        return cls(byte_to_id)

    def encode(self, data: bytes) -> torch.Tensor:
        return self.byte_to_id[torch.frombuffer(bytearray(data), dtype=torch.uint8).long()]


def zipf_stream(
    vocab_size: int, n_tokens: int, generator: torch.Generator, alpha: float = 1.1
) -> torch.Tensor:
    """Order-1 Markov tokens (int64 [n_tokens]): next = perm_prev[r], r ~ Zipf(alpha) rank."""
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    zipf_V = ranks.pow(-alpha)
    zipf_V /= zipf_V.sum()
    perm_VV = torch.argsort(torch.rand(vocab_size, vocab_size, generator=generator), dim=1)
    rank_draws = torch.multinomial(zipf_V, n_tokens, replacement=True, generator=generator)
    out = torch.empty(n_tokens, dtype=torch.int64)
    prev = 0
    for i, r in enumerate(rank_draws.tolist()):  # 1e5 steps of pure indexing: ~0.1 s
        prev = int(perm_VV[prev, r])
        out[i] = prev
    return out


def token_stream(kind: DataKind, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """The whole token stream for `kind` (int64 [n])."""
    if kind == "text":
        corpus = text_corpus()
        return ByteTokenizer.fit(corpus, vocab_size).encode(corpus)
    if kind == "zipf":
        return zipf_stream(vocab_size, 200_000, generator)
    raise ConfigError(f"data: expected 'text' or 'zipf', got {kind!r}")


def split_stream(tokens: torch.Tensor, holdout_fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last `holdout_fraction` of the stream is held out."""
    cut = int(len(tokens) * (1 - holdout_fraction))
    return tokens[:cut], tokens[cut:]


def sample_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """batch_size random windows of seq_len tokens (int64 [B, S]); labels = the same ids
    (the model shifts them)."""
    if len(tokens) <= seq_len:
        raise ConfigError(f"seq_len: {seq_len} is longer than the token stream ({len(tokens)})")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])

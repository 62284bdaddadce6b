"""A GPT-2-shaped model on lowcomm's built-in text corpus, for the Trainer and for ``lowcomm join``.

Nothing is downloaded: the model is a `GPT2LMHeadModel` built from
`gpt2_config` (2 blocks, 2 heads, width 64, context 64 and the 256-byte
vocabulary of `lowcomm.tasks.tinylm`: 120k parameters), and the text is
tinylm's corpus (the Python standard library's sources, or a folder given as
``data``; `lowcomm.tasks.tinylm.corpus`, with its split: every tenth file is
held out).

- `TokenBlocks`: the corpus cut into fixed-length blocks, a torch Dataset of
  ``{"input_ids", "labels"}`` for the Trainer; worker r of W takes every W-th
  block.
- `task`: the same model on the same corpus as a `lowcomm.tasks.Task`, so that
  ``lowcomm join --task lowcomm.integrations.transformers.gpt2:task`` trains it
  across machines (tinylm's batches, loss, evaluation and inner AdamW; only
  the model differs).

Dropout is off (``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop`` 0): it draws
from torch's global generator, which all the Trainers of a `LocalSwarm` share
across threads, so with it a run would not repeat; a model this small does
not overfit a corpus of 28 MB in the steps it trains here. Weights come from
a private generator (`lowcomm.tasks.tinylm.init_weights`), so every worker
builds the same model from the same seed, from any thread.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from lowcomm.tasks.base import Task
from lowcomm.tasks.tinylm import VOCAB, corpus, init_weights, tinylm

SPLITS = ("train", "validation")


def gpt2_config(n_layer: int = 2, n_head: int = 2, n_embd: int = 64, n_positions: int = 64) -> GPT2Config:
    """GPT-2's architecture at toy size, over bytes (``vocab_size`` 256), without dropout
    and without special tokens (bytes need none)."""
    return GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def make_model(seed: int = 0, config: GPT2Config | None = None) -> GPT2LMHeadModel:
    """A `GPT2LMHeadModel` of ``config`` (default `gpt2_config()`), weights drawn from ``seed``."""
    model = GPT2LMHeadModel(config or gpt2_config())
    model.loss_type = "ForCausalLM"  # the loss it takes anyway; named, so transformers does not warn that it guessed
    init_weights(model, seed)
    return model


class TokenBlocks(Dataset):
    """tinylm's corpus cut into blocks of ``block_size`` bytes, as examples for a causal LM.

    Item i is ``{"input_ids": block, "labels": block}``, int64 of shape
    (block_size,) (the model shifts the labels itself). ``split``: ``"train"``
    or ``"validation"``; worker ``rank`` of ``workers`` takes blocks rank,
    rank + workers, ... (disjoint shards spread over the whole corpus);
    ``limit``: at most this many blocks (e.g. a small evaluation set);
    ``data``: a folder of text files (None: the standard library's sources).
    """

    def __init__(self, block_size: int = 64, *, split: str = "train", rank: int = 0, workers: int = 1,
                 limit: int | None = None, data: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use one of {', '.join(SPLITS)}")
        if not 0 <= rank < workers:
            raise ValueError(f"rank={rank} is not one of the {workers} workers: use 0 <= rank < workers")
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: a block needs at least 2 bytes (one to predict from)")
        text = corpus(data)[SPLITS.index(split)]
        n = len(text) // block_size
        self.blocks = text[: n * block_size].view(n, block_size)[rank::workers][:limit]  # (N, block_size) uint8

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i].long()
        return {"input_ids": ids, "labels": ids.clone()}


class Logits(nn.Module):
    """A causal LM as the tasks' models are: token ids (B, T) in, logits (B, T, V) out.
    The Hugging Face model is ``.lm`` (``.lm.save_pretrained(...)`` exports it)."""

    def __init__(self, lm: GPT2LMHeadModel):
        super().__init__()
        self.lm = lm

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=idx).logits  # (B, T, VOCAB)


def task(data: str | None = None, seq_len: int = 64, batch_size: int = 16, n_layer: int = 2, n_head: int = 2,
         n_embd: int = 64, shards: str = "iid") -> Task:
    """The GPT-2-shaped model on tinylm's data, as a `Task` (``lowcomm join --task
    lowcomm.integrations.transformers.gpt2:task``); ``data``, ``seq_len``,
    ``batch_size`` and ``shards`` as `lowcomm.tasks.tinylm.tinylm`, the rest as
    `gpt2_config` (the context is ``seq_len``)."""
    config = gpt2_config(n_layer, n_head, n_embd, n_positions=seq_len)
    base = tinylm(data, seq_len=seq_len, batch_size=batch_size, shards=shards)
    return replace(base, name="gpt2", make_model=lambda seed: Logits(make_model(seed, config)))

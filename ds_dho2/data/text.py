"""Character-level tokenisation and fixed-length blocks for language modelling."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class CharTokenizer:
    """Maps each distinct character of a corpus to an id (ids follow sorted character order)."""

    def __init__(self, chars: Iterable[str]):
        self.itos: list[str] = sorted(set(chars))
        if any(len(c) != 1 for c in self.itos):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.itos[i] for i in ids)


def char_lm_blocks(
    text: str,
    block_size: int,
    split: str = "train",
    val_fraction: float = 0.1,
    tokenizer: CharTokenizer | None = None,
) -> tuple[torch.Tensor, CharTokenizer]:
    """Cut ``text`` into non-overlapping blocks for next-character prediction.

    The first ``1 - val_fraction`` of the characters form the ``"train"`` split and the rest ``"val"``.
    Returns ``(blocks, tokenizer)``: ``blocks`` is a LongTensor ``[N, block_size + 1]`` whose row ``i``
    holds ids ``[i*block_size, (i+1)*block_size]`` of the split (inputs ``[:, :-1]``, targets ``[:, 1:]``).
    The tokenizer is built from the whole text, so both splits share one vocabulary.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError("val_fraction must be in (0, 1)")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    tok = tokenizer or CharTokenizer.from_text(text)
    n_train = int(len(text) * (1.0 - val_fraction))
    part = text[:n_train] if split == "train" else text[n_train:]
    ids = torch.tensor(tok.encode(part), dtype=torch.long)
    n_blocks = (ids.numel() - 1) // block_size
    if n_blocks < 1:
        raise ValueError(f"{split} split has {ids.numel()} characters, too few for block_size={block_size}")
    starts = torch.arange(n_blocks) * block_size
    blocks = ids[starts.unsqueeze(1) + torch.arange(block_size + 1)]
    return blocks, tok

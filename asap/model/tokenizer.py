"""Prompt text <-> token ids, through a checkpoint's ``tokenizer.json`` (Hugging Face ``tokenizers``).

Also builds the byte-level tokenizer shipped with the built-in tiny model: 256 byte tokens (id = byte
value) plus a few special tokens and no merges, so any UTF-8 text round-trips and one byte is one token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from asap.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
BYTE_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""Special tokens of the byte-level tokenizer, ids 256, 257, ... in this order."""


class PromptTokenizer:
    """Encodes prompts and decodes token ids with a ``tokenizer.json``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"{self.path}: cannot load tokenizer: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce, special tokens included."""
        size: int = self._tokenizer.get_vocab_size(with_added_tokens=True)
        return size

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's own BOS/post-processing, as HF does by default)."""
        ids: list[int] = self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``."""
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def token_id(self, token: str) -> int | None:
        """Id of a (special) token string, or None when the vocabulary lacks it."""
        found: int | None = self._tokenizer.token_to_id(token)
        return found


def load_tokenizer(model_dir: str | Path) -> PromptTokenizer | None:
    """The checkpoint's tokenizer, or None when the directory has no ``tokenizer.json``."""
    path = Path(model_dir) / TOKENIZER_FILE
    return PromptTokenizer(path) if path.is_file() else None


def build_byte_level_tokenizer(special_tokens: Sequence[str] = BYTE_SPECIAL_TOKENS) -> Tokenizer:
    """A GPT-2 style byte-level BPE with no merges: byte ``b`` is token ``b``; specials follow from 256."""
    # ByteLevel maps each byte to a printable character; its alphabet sorted by byte value gives id = byte.
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(special_tokens))
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the one the ByteLevel pre-tokenizer uses)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table

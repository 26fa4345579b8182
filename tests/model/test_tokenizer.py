"""PromptTokenizer over tokenizer.json, and the byte-level tokenizer of the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from asap.errors import CheckpointError
from asap.model.tiny import make_tiny
from asap.model.tokenizer import BYTE_SPECIAL_TOKENS, PromptTokenizer, load_tokenizer

TEXTS = ["Hello, world!", "  leading and  double spaces\n\ttabs", "héllo wörld — 世界 🙂 Ωμέγα", ""]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tok") / "m", layers=1, experts=2, top_k=1)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(model_dir: Path, text: str) -> None:
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer is not None
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))  # one byte, one token, id = byte value
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_vocab(model_dir: Path) -> None:
    tokenizer = load_tokenizer(model_dir)
    assert tokenizer is not None
    assert tokenizer.vocab_size == 256 + len(BYTE_SPECIAL_TOKENS)
    eos = tokenizer.token_id("<|endoftext|>")
    assert eos == 256
    assert tokenizer.encode("a<|endoftext|>") == [97, 256]
    assert tokenizer.decode([104, 105, 256]) == "hi<|endoftext|>"
    assert tokenizer.decode([104, 105, 256], skip_special_tokens=True) == "hi"
    assert tokenizer.token_id("<|not-a-token|>") is None


def test_transformers_reads_the_same_tokenizer(model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    ours = load_tokenizer(model_dir)
    assert ours is not None
    text = TEXTS[2]
    assert hf(text)["input_ids"] == ours.encode(text)
    assert hf.eos_token_id == 256


def test_missing_and_broken_tokenizer(tmp_path: Path) -> None:
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match="cannot load tokenizer"):
        PromptTokenizer(tmp_path / "absent.json")

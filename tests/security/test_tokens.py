"""``TokenAuth``: the token file, the bearer check and its reload (no gRPC here)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from asap.auth import TokenAuth, bearer, read_tokens
from asap.errors import InvalidArgument


def _token_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_one_token_per_line_with_comments_and_blank_lines(tmp_path: Path) -> None:
    path = _token_file(tmp_path, "# team a\nalpha-1\n\n  beta-2  \n")
    assert read_tokens(path) == (b"alpha-1", b"beta-2")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_a_file_without_tokens_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(InvalidArgument, match="holds no token"):
        TokenAuth.from_file(_token_file(tmp_path, text))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"cannot read the token file .*absent"):
        TokenAuth.from_file(tmp_path / "absent")


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer ", False),
        ("alpha-1", False),  # no scheme
        ("Basic alpha-1", False),
        ("Bearer alpha-", False),  # a prefix
        ("Bearer alpha-12", False),  # an extension
        ("Bearer wrong", False),
        ("Bearer # team a", False),  # a comment is no token
        ("Bearer alpha-1", True),
        ("bearer beta-2", True),  # the scheme is case-insensitive
        (b"Bearer beta-2", True),
        ("  Bearer   alpha-1 ", True),
    ],
)
def test_check(tmp_path: Path, header: str | bytes | None, accepted: bool) -> None:
    auth = TokenAuth.from_file(_token_file(tmp_path, "# team a\nalpha-1\nbeta-2\n"))
    assert auth.check(header) is accepted


def test_reload_swaps_the_tokens_and_keeps_them_when_the_file_is_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _token_file(tmp_path, "old-token\n")
    auth = TokenAuth.from_file(path)
    path.write_text("new-token\nsecond\n")
    assert auth.reload() is True
    assert auth.check(bearer("new-token")) and auth.check(bearer("second"))
    assert not auth.check(bearer("old-token"))
    path.write_text("")  # emptied by mistake: the tokens in force stay
    with caplog.at_level(logging.INFO, logger="asap.auth"):
        assert auth.reload() is False
        path.unlink()
        assert auth.reload() is False
    assert auth.check(bearer("new-token")) and auth.count == 2
    assert "new-token" not in caplog.text and "second" not in caplog.text


def test_repr_shows_no_token(tmp_path: Path) -> None:
    auth = TokenAuth.from_file(_token_file(tmp_path, "s3cret-value\n"))
    assert "s3cret" not in repr(auth) and "1 tokens" in repr(auth)

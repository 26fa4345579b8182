"""The progress bar: plain periodic lines off a terminal, one redrawn line on one."""

from __future__ import annotations

import io

from asap.bench.progress import ProgressBar


def test_non_tty_prints_a_line_per_tenth_and_a_final_line() -> None:
    out = io.StringIO()
    with ProgressBar(50, "async @ 2 rps", stream=out) as bar:
        for i in range(50):
            bar.advance(failed=i % 10 == 0)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # 10%..90%, then the final line
    assert lines[0].startswith("async @ 2 rps:  10% 5/50 done, 1 failed")
    assert lines[-1].startswith("async @ 2 rps: 100% 50/50 done, 5 failed")


def test_close_is_idempotent_and_empty_total_is_fine() -> None:
    out = io.StringIO()
    bar = ProgressBar(0, "x", stream=out)
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert "100% 0/0 done" in out.getvalue()


def test_tty_redraws_in_place() -> None:
    out = io.StringIO()
    with ProgressBar(3, "sync", stream=out, is_tty=True) as bar:
        for _ in range(3):
            bar.advance()
    text = out.getvalue()
    assert text.startswith("\rsync [") and text.endswith("\n")
    assert text.count("\n") == 1
    assert "[" + "#" * 30 + "] 100% 3/3 done, 0 failed" in text

"""The progress line (``xnatmigrate.progress.Progress``): counts, and what the work waits on."""

from __future__ import annotations

import io

from xnatmigrate.progress import Progress


def test_a_note_is_drawn_at_once_after_the_counts_and_cleared_when_working_again():
    out = io.StringIO()
    bar = Progress("applying", stream=out, enabled=True)
    bar(5, 10)
    assert "5/10 files" in out.getvalue() and "waiting" not in out.getvalue()
    bar.note("waiting on XNAT")
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "5/10 files" in last and last.rstrip().endswith("waiting on XNAT")
    bar.note("")
    assert "waiting" not in out.getvalue().rsplit("\r", 1)[-1]


def test_a_progress_line_off_the_terminal_draws_nothing_notes_included():
    out = io.StringIO()
    bar = Progress("applying", stream=out, enabled=False)
    bar(1, 2)
    bar.note("waiting on XNAT")
    assert out.getvalue() == ""

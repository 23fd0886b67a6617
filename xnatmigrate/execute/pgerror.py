"""A psycopg failure as the one line our messages quote, in libpq's words.

psycopg prefixes libpq's text with what it was doing ("connection failed: …") and keeps the server's
report ("ERROR:  …", severity first) on the failed result; the messages quote libpq's words as before.
"""

from __future__ import annotations

import psycopg


def _first(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def said(exc: psycopg.Error) -> str:
    """The first line of what failed: libpq's message for a connection it could not make, else the
    server's message (no severity) or psycopg's; "" when there is none."""
    conn = exc.pgconn
    if exc.pgresult is None and conn is not None and conn.error_message:
        # Bytes: a closed connection's get_error_message() says only "the connection is closed".
        return _first(conn.error_message.decode("utf-8", "replace"))
    return _first(str(exc))


def reported(exc: psycopg.Error) -> str:
    """The first line of the server's report, its severity first (``ERROR:  relation "x" does not
    exist``) as libpq formats it; ``said`` when the server reported nothing."""
    diag = exc.diag
    if exc.pgresult is not None and diag.severity and diag.message_primary:
        return _first(f"{diag.severity}:  {diag.message_primary}")
    return said(exc)

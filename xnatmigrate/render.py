"""The one SQL chokepoint: Jinja templates in ``sql/`` → statements with bind parameters.

Invariants:
- Templates decide only the *shape* of SQL (column lists, guards). Every value reaches SQL through
  ``bind()``, as a ``%(name)s`` parameter; no value is ever formatted into SQL text.
- The same ``Statement`` is either executed (psycopg binds the parameters) or printed for review
  (``to_sql_text``: values as quoted literals). Printed and executed text therefore differ only in
  how values are spelled, and tests compare the two through the driver's own ``mogrify``.
- Printed literals assume ``standard_conforming_strings = on`` (PostgreSQL's default since 9.1),
  which every printed script sets first. NOTE: literals for review are produced here, not by the
  driver, so plan.sql reads the same with or without a connection: psycopg doubles a backslash
  inside ``E'…'`` and puts a space before a negative number (equally correct SQL), and a test proves
  each literal here reads back as the value the driver's own quoting gives.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jinja2

from .errors import XnatMigrateError
from .resources import sql_dir

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


@dataclass(frozen=True)
class Statement:
    """One SQL statement: text with ``%(name)s`` placeholders and the values to bind."""

    name: str
    sql: str
    params: Mapping[str, Any] = field(default_factory=dict)


class _Binder:
    def __init__(self) -> None:
        self.params: dict[str, Any] = {}

    def __call__(self, name: str, value: Any, cast: str | None = None) -> str:
        if isinstance(value, jinja2.Undefined):
            raise XnatMigrateError(f"SQL template binds {name!r} to an undefined value (bug)")
        if name in self.params and self.params[name] != value:
            raise XnatMigrateError(f"SQL template binds {name!r} twice with different values (bug)")
        self.params[name] = value
        ph = f"%({name})s"
        return f"CAST({ph} AS {cast})" if cast else ph


_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_.,:/ ^+=@-]")


def comment_text(value: Any) -> str:
    """``value`` made safe inside a ``--`` comment: one line, no ``%`` (a parameter marker to the
    driver), nothing outside a plain set. NOTE: header values (a StudyInstanceUID with a newline)
    and paths reach comments; printed raw they could end the comment and start a statement."""
    return _COMMENT_UNSAFE.sub("?", str(value))


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(sql_dir())),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["comment"] = comment_text
    return env


def render_statements(template: str, **context: Any) -> list[Statement]:
    """Render a template holding one or more statements, each ending with ``;`` on its line end.

    Statements are split on a line that ends with ``;`` (templates keep values out of the text, so
    a ``;`` inside a value cannot split anything).
    """
    binder = _Binder()
    text = _env().get_template(template).render(bind=binder, **context)
    out: list[Statement] = []
    chunk: list[str] = []
    for line in text.splitlines():
        if not line.strip() and not chunk:
            continue
        chunk.append(line)
        if line.rstrip().endswith(";"):
            sql = "\n".join(chunk).strip()
            names = set(_PLACEHOLDER.findall(sql))
            out.append(Statement(template, sql, {k: binder.params[k] for k in sorted(names)}))
            chunk = []
    if any(line.strip() and not line.strip().startswith("--") for line in chunk):
        raise XnatMigrateError(f"SQL template {template} has a statement without ';' (bug)")
    return out


def render_statement(template: str, **context: Any) -> Statement:
    stmts = render_statements(template, **context)
    if len(stmts) != 1:
        raise XnatMigrateError(f"SQL template {template} renders {len(stmts)} statements, not 1 (bug)")
    return stmts[0]


def batched(parts: Sequence[Sequence[Statement]]) -> Statement:
    """Several renders' statements sent as one text, in order: one round trip for them all.

    Each part's values are renamed apart (``name__k``), so the text printed for review
    (``to_sql_text``) is the parts' own texts, each as printed alone, joined by a blank line. One
    result (and row count) stands for them all: for statements whose results nobody reads (advisory
    locks, guarded INSERTs whose effect is read back afterwards).
    """
    sqls: list[str] = []
    params: dict[str, Any] = {}
    for k, part in enumerate(parts):
        texts = []
        for st in part:
            texts.append(_PLACEHOLDER.sub(f"%(\\1__{k})s", st.sql))
            params.update({f"{name}__{k}": v for name, v in st.params.items()})
        sqls.append("\n".join(texts))
    if not sqls:
        raise XnatMigrateError("no statements to send (bug)")
    return Statement(parts[-1][-1].name, "\n\n".join(sqls), params)


def literal(value: Any) -> str:
    """A PostgreSQL literal for review scripts (``standard_conforming_strings = on``)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise XnatMigrateError("a value holds a NUL character, which PostgreSQL text cannot store")
        return "'" + value.replace("'", "''") + "'"
    raise XnatMigrateError(f"cannot write a {type(value).__name__} as an SQL literal (bug)")


def to_sql_text(stmt: Statement) -> str:
    """The statement with every parameter spelled as a literal, for plan.sql and dry runs."""
    return _PLACEHOLDER.sub(lambda m: literal(stmt.params[m.group(1)]), stmt.sql)


def render_script(template: str, **context: Any) -> str:
    """Render a whole reviewable script (e.g. plan.sql); values arrive already as literals."""
    return _env().get_template(template).render(literal=literal, to_sql_text=to_sql_text, **context)


def render_script_pieces(template: str, **context: Any) -> Iterator[str]:
    """``render_script`` piece by piece, as Jinja produces it: iterables in ``context`` are read as
    the template gets to them, so a script of many statements is never held whole."""
    return _env().get_template(template).generate(literal=literal, to_sql_text=to_sql_text, **context)

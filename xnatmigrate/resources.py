"""Where the shipped schemas and SQL templates are.

In a wheel they live inside the package (``xnatmigrate/_data/{schemas,sql}``, placed there by
pyproject's force-include); in a source checkout or editable install they are the top-level
``schemas/`` and ``sql/`` folders a reviewer reads. Both are found the same way.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def _data_dir(name: str) -> Path:
    packaged = Path(str(files("xnatmigrate"))) / "_data" / name
    if packaged.is_dir():
        return packaged
    return _REPO / name


def schema_path(name: str) -> Path:
    return _data_dir("schemas") / name


def sql_dir() -> Path:
    return _data_dir("sql")

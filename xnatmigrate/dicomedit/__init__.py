"""A DicomEdit 6 interpreter: parse XNAT's anonymisation scripts and apply them to pydicom datasets.

The language and its functions are those of XNAT's DicomEdit 6 (dicom-edit6: DE6Parser.g4, DE6Lexer.g4,
DicomEditParseTreeVisitor, functions/*). What xnatmigrate does not implement is refused by ``parse`` with
``DicomEditError`` naming the line and the construct; nothing is skipped. The one deliberate departure:
``newUID`` and ``mapReferencedUIDs`` derive their UIDs from the input and ``XNATMIGRATE_ANON_SECRET``
instead of drawing random ones (see ``interpret``).

This package imports only ``xnatmigrate.errors``, pydicom and lark.
"""

from xnatmigrate.dicomedit.interpret import (
    SECRET_ENV,
    XNAT_VARIABLES,
    Change,
    Script,
    ScriptChain,
    combine,
    parse,
    preview,
)
from xnatmigrate.errors import DicomEditError

__all__ = [
    "SECRET_ENV",
    "XNAT_VARIABLES",
    "Change",
    "DicomEditError",
    "Script",
    "ScriptChain",
    "combine",
    "parse",
    "preview",
]

"""The syntax tree of a DicomEdit 6 script: frozen data, one class per construct, each with its line.

The classes mirror the alternatives of DE6Parser.g4 (dicom-edit6 src/main/antlr/org/nrg/dicom/dicomedit/
DE6Parser.g4, in danielmarcus/xnat-monorepo libs/dicom-edit6); the semantics live in ``interpret.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# --- tag paths -------------------------------------------------------------------------------------

HEX_WILDCARDS = frozenset("X@#")


@dataclass(frozen=True)
class TagStep:
    """One element of a tag path (DE6Parser.g4 ``element`` / ``seq_element``).

    ``group`` is 4 and ``element`` 4 (public) or 2 (private, the byte inside the creator's block)
    upper-case pattern characters: a hex digit, ``X`` any digit, ``@`` an even and ``#`` an odd one
    (DE6Lexer.g4 HEXDIGIT). ``item`` is the sequence item (``None`` for the last step, ``"%"`` for any
    item, DE6Lexer.g4 ITEM_WILDCARD).
    """

    group: str
    element: str
    creator: str | None
    item: int | Literal["%"] | None
    text: str

    @property
    def singular(self) -> bool:
        """True when the step names one attribute: no digit wildcard and no ``%`` item."""
        return not (HEX_WILDCARDS & set(self.group + self.element)) and self.item != "%"


@dataclass(frozen=True)
class TagPath:
    """A path from the dataset to an attribute, through sequence items (DE6Parser.g4 ``tagpath``).

    NOTE: every step but the last has an item number or ``%``; the last has none (parser.py refuses
    the rest).
    """

    steps: tuple[TagStep, ...]
    text: str

    @property
    def singular(self) -> bool:
        return all(s.singular for s in self.steps)


# --- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Str:
    """A string literal, its value already unescaped as DicomEditParseTreeVisitor.extractStringValue does."""

    value: str


@dataclass(frozen=True)
class Num:
    """An INTEGER or FLOAT literal; DicomEdit keeps its text (visitNumberValue → ConstantValue(text))."""

    text: str


@dataclass(frozen=True)
class Var:
    name: str
    line: int


@dataclass(frozen=True)
class TagRef:
    """A tag path used as a value: its string value at the time (visitTagpathValue); as a function
    argument the function receives the path itself (visitTagpathArgument)."""

    path: TagPath
    line: int


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Value, ...]
    line: int
    column: int


@dataclass(frozen=True)
class ListValue:
    items: tuple[Value, ...]


Value = Str | Num | Var | TagRef | Call | ListValue

# --- conditions ------------------------------------------------------------------------------------

CondOp = Literal["=", "!=", "~", "!~"]


@dataclass(frozen=True)
class Compare:
    """DE6Parser.g4 ``booleanExpression``: value conditionOperator value."""

    left: Value
    op: CondOp
    right: Value


@dataclass(frozen=True)
class BoolCall:
    """DE6Parser.g4 ``booleanFunction``."""

    call: Call


Condition = Compare | BoolCall

# --- statements ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    """``tagpath := value`` (``if_exists``: ``tagpath ?= value``, DE6Parser.g4 assign_if_exists)."""

    path: TagPath
    value: Value
    if_exists: bool
    line: int


@dataclass(frozen=True)
class Initialize:
    """``name := value`` (DE6Parser.g4 initialize)."""

    name: str
    value: Value
    line: int


@dataclass(frozen=True)
class Delete:
    path: TagPath
    line: int


@dataclass(frozen=True)
class CallStatement:
    """A function called for its effect (DE6Parser.g4 action → function), e.g. mapReferencedUIDs."""

    call: Call
    line: int


@dataclass(frozen=True)
class Echo:
    value: Value | None
    line: int


@dataclass(frozen=True)
class Conditional:
    """``condition ? action : action`` (DE6Parser.g4 conditional_statement)."""

    condition: Condition
    then: Statement
    otherwise: Statement | None
    line: int


@dataclass(frozen=True)
class IfElse:
    """``if (c) {…} elseif (c) {…} else {…}`` (DE6Parser.g4 if_elseif_else)."""

    branches: tuple[tuple[Condition, tuple[Statement, ...]], ...]
    otherwise: tuple[Statement, ...] | None
    line: int


@dataclass(frozen=True)
class Describe:
    """``describe name "text" | hidden | const | immutable``: metadata for XNAT's UI, no effect on a file."""

    name: str
    kind: Literal["named", "hidden", "const", "immutable"]
    line: int


@dataclass(frozen=True)
class RemoveAllPrivateTags:
    line: int


@dataclass(frozen=True)
class Version:
    version: str
    line: int


Statement = (
    Assign
    | Initialize
    | Delete
    | CallStatement
    | Echo
    | Conditional
    | IfElse
    | Describe
    | RemoveAllPrivateTags
    | Version
)

"""Who the XNAT REST client is (xnat-reference.md §4.1): a user and password or an alias token.

Invariants:
- Credentials come from the environment (XNAT_USER/XNAT_PASSWORD, XNAT_ALIAS/XNAT_SECRET) or
  ``~/.netrc``, never from a manifest or plan; a world-readable netrc is refused.
- The password never appears in a message, a log line or a repr (``Credentials.mask``).
"""

from __future__ import annotations

import base64
import netrc
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import XnatRestError


@dataclass(frozen=True, repr=False)
class Credentials:
    """A user and password for HTTP Basic (a password or an alias token's secret, §4.1).

    NOTE: ``repr``/``str`` mask the password; nothing in this module formats it.
    """

    user: str
    password: str = field(compare=False)
    source: str = "explicit"

    def basic_header(self) -> str:
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    def mask(self, text: str) -> str:
        """``text`` with any occurrence of the password replaced by ``***``."""
        return text.replace(self.password, "***") if self.password else text

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password='***', source={self.source!r})"

    __str__ = __repr__


def _pair(env: Mapping[str, str], user_var: str, secret_var: str) -> tuple[str, str] | None:
    user, secret = env.get(user_var, ""), env.get(secret_var, "")
    if user and secret:
        return user, secret
    if user or secret:
        have, missing = (user_var, secret_var) if user else (secret_var, user_var)
        raise XnatRestError(
            f"{have} is set but {missing} is not: set both (or neither, to use another source)"
        )
    return None


def credentials_from_env(
    base_url: str, environ: Mapping[str, str] | None = None, netrc_file: str | Path | None = None
) -> Credentials:
    """Resolve XNAT credentials, first match wins.

    1. ``XNAT_USER`` / ``XNAT_PASSWORD``;
    2. ``XNAT_ALIAS`` / ``XNAT_SECRET``: an alias token from ``/data/services/tokens/issue``, used as the
       Basic user/password (§4.1 AliasTokenRestlet);
    3. ``~/.netrc`` (or ``netrc_file``), ``machine`` = host of ``base_url``.

    Raises:
        XnatRestError: nothing found (the message names every variable and the netrc entry), only half
            of a pair is set, or the netrc file is unusable.
    """
    env = os.environ if environ is None else environ
    host = urlsplit(base_url).hostname or base_url
    pair = _pair(env, "XNAT_USER", "XNAT_PASSWORD")
    if pair:
        return Credentials(pair[0], pair[1], "XNAT_USER/XNAT_PASSWORD")
    pair = _pair(env, "XNAT_ALIAS", "XNAT_SECRET")
    if pair:
        return Credentials(pair[0], pair[1], "XNAT_ALIAS/XNAT_SECRET")
    shown = str(netrc_file) if netrc_file is not None else "~/.netrc"
    found = _from_netrc(netrc_file, host, shown)
    if found:
        return found
    raise XnatRestError(
        f"no XNAT credentials for {base_url}: set XNAT_USER and XNAT_PASSWORD, or XNAT_ALIAS and "
        f"XNAT_SECRET (an alias token), or add 'machine {host} login USER password PASSWORD' to {shown}"
    )


def _from_netrc(netrc_file: str | Path | None, host: str, shown: str) -> Credentials | None:
    try:
        # file=None makes the stdlib read ~/.netrc *and* refuse one that others can read.
        parsed = netrc.netrc(None if netrc_file is None else str(netrc_file))
    except FileNotFoundError:
        return None
    except netrc.NetrcParseError as exc:
        # NOTE: exc.msg may quote a token of the file (a password): only permission messages are shown.
        msg = exc.msg if ("access" in exc.msg or "owner" in exc.msg) else "syntax error"
        raise XnatRestError(
            f"cannot use {shown} (line {exc.lineno}): {msg}; fix it or set XNAT_USER/XNAT_PASSWORD"
        ) from None
    except OSError as exc:
        raise XnatRestError(
            f"cannot read {shown}: {exc.strerror}; fix it or set XNAT_USER/XNAT_PASSWORD"
        ) from None
    entry = parsed.authenticators(host)
    if entry is None:
        return None
    login, _account, password = entry
    if not login or not password:
        raise XnatRestError(f"{shown}: the entry for machine {host} needs both login and password")
    return Credentials(login, password, f"{shown} machine {host}")

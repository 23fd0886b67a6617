"""pynetdicom's own ``Association``: ``python -m bench.pynetdicom_send HOST PORT CALLED CALLING DIR``.

What a user of pynetdicom would write instead of our hand-written sender (``xnatmigrate.execute.dicom``):
one ``AE().associate(...)``, then ``send_c_store`` for every file under DIR, then release. It is
given pynetdicom's fastest options, so the gap it shows is a lower bound: files are sent by path
(pynetdicom's chunked sending, no dataset decoded, sent as stored like ``storescu +sd +r``),
TCP_NODELAY is set on its socket as ours does, and the presentation contexts are read from the file
metas first (a fast pass, included in the time).

NOTE: now and then (measured here: one run of 2,000 files in six, more when the machine is busy)
pynetdicom's reactor thread takes a C-STORE response meant for the waiting ``send_c_store``
("Received unexpected C-STORE service message"); that call then waits out the DIMSE timeout and
aborts the association: a race in pynetdicom's own threading (pydicom/pynetdicom#435 describes one
like it). As any user would have to, the loop then opens a new association and sends that file
again; the 2 s DIMSE timeout set here keeps what such a loss costs small and counted.

Prints ``<files stored> <associations lost>``; exits 1 unless every file was stored.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE
from pynetdicom.association import Association

_DIMSE_TIMEOUT = 2.0  # a response takes milliseconds; this is only how long a lost one costs
_MAX_LOST = 50


def _associate(ae: AE, host: str, port: int, called: str) -> Association | None:
    assoc = ae.associate(host, port, ae_title=called)
    if not assoc.is_established:
        return None
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)  # why an association ended, if it does
    host, port, called, calling, root = argv[0], int(argv[1]), argv[2], argv[3], argv[4]
    paths = sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names)
    pairs: dict[str, set[str]] = {}
    for path in paths:
        meta = read_file_meta_info(path)
        pairs.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    ae = AE(ae_title=calling)
    ae.dimse_timeout = _DIMSE_TIMEOUT
    for sop_class, syntaxes in sorted(pairs.items()):
        for ts in sorted(syntaxes):  # one context per pair, as ours proposes: nothing is transcoded
            ae.add_requested_context(sop_class, ts)
    stored = lost = i = 0
    assoc = _associate(ae, host, port, called)
    try:
        while assoc is not None and i < len(paths):
            status = assoc.send_c_store(paths[i])
            if status and status.Status == 0x0000:
                stored += 1
            elif not assoc.is_established:  # the race above: the same file again, on a new association
                lost += 1
                assoc = _associate(ae, host, port, called) if lost <= _MAX_LOST else None
                continue
            i += 1
    finally:
        if assoc is not None:
            assoc.release()
    print(stored, lost)
    return 0 if stored == len(paths) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""XNAT's C-STORE receiver, emulated for tests: route like XNAT's default identifier, then file
each instance into the prearchive and its row into ``xdat_search.prearchive`` as XNAT's
GradualDicomImporter does, so the REST stand-in then sees the session (xnat-reference.md §2, §3, §5).

Rules followed (each from xnat-reference.md):
- routing: ClassicDicomObjectIdentifier order (§5), via ``tests.dicom_peers.xnat_route``;
- a file joins the row with the same (project, tag, name), whatever its timestamp (§3); a new
  session gets a fresh ``yyyyMMdd_HHmmssSSS`` timestamp folder, status RECEIVING (§3);
- layout ``<prearchive>/<P>/<ts>/<label>/SCANS/<scan>/DICOM/<name>``, Unassigned without the
  project level (§2), scan folder by Restructurer.determineScanSubdir, name by the default template.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from tests.dicom_peers import Route, XnatRoutingSCP
from xnatmigrate import labels, xnat_table


class XnatReceiverSCP(XnatRoutingSCP):
    """A routing SCP that writes what it receives into a prearchive folder and XNAT's table."""

    def __init__(self, *args: Any, dsn: str, prearchive: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dsn = dsn
        self.prearchive = Path(prearchive)
        self._file_lock = threading.Lock()

    def route(self, ds: Dataset) -> Route:
        route = super().route(ds)
        with self._file_lock:
            self._file(ds, route)
        return route

    def _file(self, ds: Dataset, route: Route) -> None:
        study = str(ds.StudyInstanceUID)
        with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT timestamp, url FROM xdat_search.prearchive "
                "WHERE project IS NOT DISTINCT FROM %s AND tag = %s AND name = %s",
                (route.project, study, route.session),
            )
            row = cur.fetchone()
            if row is None:
                ts = xnat_table.timestamp_folder(datetime.now())
                time.sleep(0.002)  # keep timestamps unique, as wall-clock ms would
                base = self.prearchive / route.project if route.project else self.prearchive
                sdir = base / ts / route.session
                cur.execute(
                    "INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, subject, "
                    "foldername, name, tag, status, url, prevent_anon, prevent_auto_commit) "
                    "VALUES (%s, %s, LOCALTIMESTAMP, NULL, %s, %s, %s, %s, 'RECEIVING', %s, false, false)",
                    (route.project, ts, route.subject, route.session, route.session, study, str(sdir)),
                )
            else:
                sdir = Path(row[1])
                cur.execute(
                    "UPDATE xdat_search.prearchive SET lastmod = LOCALTIMESTAMP, status = 'RECEIVING' "
                    "WHERE project IS NOT DISTINCT FROM %s AND tag = %s AND name = %s",
                    (route.project, study, route.session),
                )
        conn.close()
        values = {
            k: str(ds.get(k, "") or "")
            for k in ("StudyInstanceUID", "SeriesNumber", "InstanceNumber", "SOPClassUID", "SOPInstanceUID")
        }
        scan = labels.scan_folder(
            values["SeriesNumber"] or None, str(ds.get("SeriesInstanceUID", "")) or None
        )
        dest = sdir / "SCANS" / scan / "DICOM" / labels.file_name(values)
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = ds.copy()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = values["SOPClassUID"]
        meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.file_meta = meta
        out.save_as(dest, enforce_file_format=True)

"""The XNAT stand-in and the emulated receiver, over HTTP and DICOM, on real PostgreSQL (XNAT's table) and real
folders: each test checks one behaviour the stand-in reproduces from XNAT's source (tests/xnat_standin.py cites
the class and line), and fails if the stand-in falls back to a kinder answer."""

from __future__ import annotations

import ast
import base64
import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import psycopg
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from tests.xnat_receiver import XnatReceiverSCP, file_name
from tests.xnat_standin import COLUMNS, DEFAULT_ANON_SCRIPT, XnatStandIn, java_timestamp
from xnatmigrate.errors import XnatRestError
from xnatmigrate.execute.xnat import Credentials, XnatClient
from xnatmigrate.testing.pg import PgDb

TS = "20240131_101112123"
STUDY_UID = "1.2.840.113654.2.45.2.108105"
ADMIN = Credentials("admin", "admin", "test")
ROOT = Path(__file__).resolve().parents[2]

# Modelled on the documented example row (xnat-reference.md §7 step 3; test_rig_pg.DOC_EXAMPLE_INSERT).
INSERT = """
INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, scan_date, scan_time, subject,
                                    foldername, name, tag, status, autoarchive, prevent_anon,
                                    prevent_auto_commit, url, source, timezone)
VALUES (%(project)s, %(timestamp)s, %(lastmod)s, '2024-01-31 10:11:12.123', NULL, NULL, %(subject)s,
        %(folder)s, %(name)s, %(tag)s, %(status)s, %(autoarchive)s, %(prevent_anon)s,
        %(prevent_auto_commit)s, %(url)s, %(source)s, %(timezone)s)
"""


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def xnat(pg_db_17: PgDb, tmp_path: Path) -> Iterator[XnatStandIn]:
    with XnatStandIn(
        pg_db_17.dsn, tmp_path / "prearchive", tmp_path / "archive", projects={"prj001": 0, "prj002": 0}
    ) as standin:
        standin.build_delay = 0.05
        yield standin
        standin.wait_idle()
    assert standin.errors == []


@pytest.fixture
def client(xnat: XnatStandIn) -> Iterator[XnatClient]:
    with XnatClient(xnat.url, ADMIN, timeout=5, retries=3, backoff=0.01) as c:
        yield c


def make_dataset(series: str, instance: int, **extra: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "DOE^JOHN", "prj001_001"
    ds.StudyDate, ds.StudyTime, ds.StudyInstanceUID = "20131211", "151818.000", STUDY_UID
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = f"{STUDY_UID}.{series}", series, instance
    ds.SeriesDescription = f"series {series}"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(path: Path, series: str, instance: int) -> None:
    ds = make_dataset(series, instance)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def make_session(
    xnat: XnatStandIn, project: str | None, folder: str, series: dict[str, int] | None = None, ts: str = TS
) -> Path:
    """Files laid out as §2: ``<ts>/<folder>/SCANS/<scan>/DICOM/<name>.dcm``."""
    sdir = xnat.session_dir(project, ts, folder)
    for scan, count in (series or {"1": 2, "2": 1}).items():
        for i in range(1, count + 1):
            write_dicom(sdir / "SCANS" / scan / "DICOM" / f"{STUDY_UID}-{scan}-{i}-abc.dcm", scan, i)
    return sdir


def insert_row(
    dsn: str,
    project: str | None,
    folder: str,
    *,
    xnat: XnatStandIn,
    status: str = "RECEIVING",
    url: str | None = None,
    name: str | None = None,
    subject: str | None = "prj001_001",
    tag: str | None = STUDY_UID,
    autoarchive: str | None = "Manual",
    prevent_anon: bool | None = False,
    prevent_auto_commit: bool | None = True,
    source: str | None = None,
    timezone: str | None = None,
    lastmod: datetime | None = None,
    ts: str = TS,
) -> None:
    sql(
        dsn,
        INSERT,
        {
            "project": project,
            "timestamp": ts,
            "lastmod": lastmod or datetime.now(),
            "subject": subject,
            "folder": folder,
            "name": name or folder,
            "tag": tag,
            "status": status,
            "url": url or str(xnat.session_dir(project, ts, folder)),
            "autoarchive": autoarchive,
            "prevent_anon": prevent_anon,
            "prevent_auto_commit": prevent_auto_commit,
            "source": source,
            "timezone": timezone,
        },
    )


def sql(dsn: str, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


def db_row(xnat: XnatStandIn, project: str | None, folder: str, ts: str = TS) -> dict[str, Any] | None:
    rows = sql(
        xnat.dsn,
        "SELECT * FROM xdat_search.prearchive WHERE project IS NOT DISTINCT FROM %s "
        "AND timestamp = %s AND foldername = %s",
        (project, ts, folder),
    )
    return dict(zip(COLUMNS, rows[0])) if rows else None


def request(
    xnat: XnatStandIn,
    method: str,
    path: str,
    data: bytes | None = None,
    *,
    auth: bool = True,
    cookie: str = "",
    content_type: str = "application/x-www-form-urlencoded",
    timeout: float = 30,
) -> tuple[int, dict[str, str], str]:
    """One request outside any client, redirects not followed: (status, headers lower-cased, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(xnat.url.rsplit(":", 1)[1]), timeout=timeout)
    headers = {}
    if cookie:
        headers["Cookie"] = f"JSESSIONID={cookie}"
    elif auth:
        headers["Authorization"] = "Basic " + base64.b64encode(b"admin:admin").decode()
    if data is not None:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode()
    finally:
        conn.close()


def raw(
    xnat: XnatStandIn, method: str, path: str, data: bytes | None = None, auth: bool = True, cookie: str = ""
) -> tuple[int, str]:
    status, _, body = request(xnat, method, path, data, auth=auth, cookie=cookie)
    return status, body


def uri(project: str | None, folder: str, ts: str = TS) -> str:
    return f"/prearchive/projects/{project or 'Unassigned'}/{ts}/{folder}"


def table(body: str) -> list[dict[str, str]]:
    return list(json.loads(body)["ResultSet"]["Result"])


def get_row(xnat: XnatStandIn, project: str | None, folder: str, ts: str = TS) -> dict[str, str] | None:
    status, body = raw(xnat, "GET", f"/data{uri(project, folder, ts)}?format=json")
    assert status == 200, body
    rows = table(body)
    return rows[0] if rows else None


def rebuild(xnat: XnatStandIn, *srcs: str, override: bool = False) -> tuple[int, str]:
    form = [("src", s) for s in srcs] + ([("overrideLock", "true")] if override else [])
    return raw(xnat, "POST", "/data/services/prearchive/rebuild?format=json", urlencode(form).encode())


def archive(
    xnat: XnatStandIn, project: str | None, folder: str, **params: str
) -> tuple[int, dict[str, str], str]:
    form = urlencode({"src": uri(project, folder), **params}).encode()
    return request(xnat, "POST", "/data/services/archive", form)


def wait_status(
    xnat: XnatStandIn, project: str | None, folder: str, done: set[str], timeout: float = 10
) -> dict[str, str] | None:
    end = time.monotonic() + timeout
    while True:
        row = get_row(xnat, project, folder)
        if row is None or row["status"] in done or time.monotonic() > end:
            return row
        time.sleep(0.02)


def sync_build(xnat: XnatStandIn, project: str | None, folder: str) -> tuple[int, str]:
    """``POST .../<ts>/<folder>?action=build`` (§4.4): (status, body)."""
    return raw(xnat, "POST", f"/data{uri(project, folder)}?action=build")


def built(xnat: XnatStandIn, project: str | None, folder: str) -> None:
    status, body = sync_build(xnat, project, folder)
    assert status == 200, body


def archive_path(project: str, subject: str, label: str) -> str:
    return f"/data/archive/projects/{project}/subjects/{subject}/experiments/{label}"


def send(port: int, datasets: list[Dataset], called: str = "XNAT") -> list[int]:
    """C-STORE ``datasets`` to 127.0.0.1:``port``; the status of each."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    for ds in datasets:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


# --- independence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["tests/xnat_standin.py", "tests/xnat_receiver.py"])
def test_the_stand_ins_import_no_product_code(module: str) -> None:
    """Issue 12 §1: the stand-in is an independent check, so it takes none of the product's XNAT knowledge."""
    tree = ast.parse((ROOT / module).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "xnatmigrate"]
    text = (ROOT / module).read_text()
    if module.endswith("standin.py"):
        assert "Departures from XNAT" in text.split('"""')[1]  # one place, in the module docstring


# --- auth (§4.1) ------------------------------------------------------------------------------------


def test_bad_credentials_are_401(xnat: XnatStandIn) -> None:
    with pytest.raises(XnatRestError) as err:
        XnatClient(xnat.url, Credentials("admin", "wrong", "test"), retries=0).prearchive_code("prj001")
    assert err.value.status == 401
    assert raw(xnat, "GET", "/data/projects?format=json", auth=False)[0] == 401
    assert xnat.calls[-1].user is None and xnat.calls[-1].status == 401


def test_xapi_endpoints_need_authentication(xnat: XnatStandIn) -> None:
    for path in (
        "/xapi/anonymize/site/enabled",
        "/xapi/anonymize/site",
        "/xapi/dicomscp",
        "/xapi/siteConfig/dicomFileNameTemplate",
        f"/xapi/direct-archive/prj001/{STUDY_UID}/S1",
    ):
        assert raw(xnat, "GET", path, auth=False)[0] == 401, path


def test_jsession_is_reused_and_renewed_after_invalidation(xnat: XnatStandIn, client: XnatClient) -> None:
    for _ in range(3):
        assert client.prearchive_code("prj001") == 0
    assert [(c.method, c.path, c.auth) for c in xnat.calls] == [
        ("POST", "/data/JSESSION", "basic"),
        *[("GET", "/data/projects/prj001/prearchive_code", "session")] * 3,
    ]
    # DELETE /data/JSESSION invalidates the session; the client logs in again on the 401.
    sid = client._session_id
    assert sid and raw(xnat, "DELETE", "/data/JSESSION", cookie=sid)[0] == 200
    assert raw(xnat, "GET", "/data/projects/prj001?format=json", cookie=sid)[0] == 401


# --- projects, version, site settings (§4.2, §4.3, §9) -------------------------------------------


def test_projects_and_prearchive_codes(xnat: XnatStandIn) -> None:
    assert raw(xnat, "GET", "/data/projects/prj001?format=json")[0] == 200
    assert raw(xnat, "GET", "/data/projects/nope?format=json")[0] == 404
    assert raw(xnat, "GET", "/data/projects/prj001/prearchive_code") == (200, "0")
    for code in ("4", "5", "0"):
        assert raw(xnat, "PUT", f"/data/projects/prj001/prearchive_code/{code}") == (200, "")
        assert raw(xnat, "GET", "/data/projects/prj001/prearchive_code") == (200, code)
    assert raw(xnat, "PUT", "/data/projects/prj001/prearchive_code/3") == (400, "Invalid prearchive code 3")
    status, body = raw(xnat, "GET", "/xapi/siteConfig/buildInfo")
    assert status == 200 and json.loads(body)["version"] == "1.8.10"
    with pytest.raises(ValueError, match="0, 4 or 5"):
        XnatStandIn(xnat.dsn, xnat.prearchive, xnat.archive, projects={"p": 2})


def test_site_anonymisation_switch_and_script(xnat: XnatStandIn) -> None:
    # SiteConfigPreferences:578 defaults the switch to true; the script is XNAT's id.das.
    assert raw(xnat, "GET", "/xapi/anonymize/site/enabled") == (200, "true")
    assert raw(xnat, "GET", "/xapi/anonymize/site") == (200, DEFAULT_ANON_SCRIPT)
    assert "(0010,0010) := subject" in DEFAULT_ANON_SCRIPT
    assert raw(xnat, "PUT", "/xapi/anonymize/site/enabled?enable=false")[0] == 200
    assert raw(xnat, "GET", "/xapi/anonymize/site/enabled") == (200, "false")
    xnat.anonymize_site_enabled = True
    assert raw(xnat, "GET", "/xapi/anonymize/site/enabled") == (200, "true")
    status, _, _ = request(xnat, "PUT", "/xapi/anonymize/site", b'version "6.1"\n', content_type="text/plain")
    assert status == 200 and raw(xnat, "GET", "/xapi/anonymize/site") == (200, 'version "6.1"\n')


def test_site_config_values(xnat: XnatStandIn) -> None:
    template = "${StudyInstanceUID}-${SeriesNumber}-${InstanceNumber}-${HashSOPClassUIDWithSOPInstanceUID}"
    assert raw(xnat, "GET", "/xapi/siteConfig/dicomFileNameTemplate") == (200, template)
    assert raw(xnat, "GET", "/xapi/siteConfig/sessionArchiveTimeoutInterval") == (200, "600")
    assert raw(xnat, "GET", "/xapi/siteConfig/sessionXmlRebuilderInterval") == (200, "5")
    status, body = raw(xnat, "GET", "/xapi/siteConfig/noSuchThing")
    assert status == 404 and "No site configuration property named noSuchThing" in body
    status, _, _ = request(
        xnat,
        "POST",
        "/xapi/siteConfig/dicomFileNameTemplate",
        b"${SOPInstanceUID}",
        content_type="text/plain",
    )
    assert status == 200 and raw(xnat, "GET", "/xapi/siteConfig/dicomFileNameTemplate") == (
        200,
        "${SOPInstanceUID}",
    )


def test_dicomscp_lists_receivers(xnat: XnatStandIn) -> None:
    status, body = raw(xnat, "GET", "/xapi/dicomscp")
    assert status == 200
    (default,) = json.loads(body)
    # DicomSCPInstance.createDefault: XNAT:8104, anonymisation on, no direct archive, no routing expressions.
    assert default["aeTitle"] == "XNAT" and default["port"] == 8104 and default["enabled"] is True
    assert default["directArchive"] is False and default["anonymizationEnabled"] is True
    assert default["routingExpressionsEnabled"] is False and "projectRoutingExpression" not in default
    entry = xnat.register_receiver(
        {
            "aeTitle": "DA",
            "port": 8105,
            "directArchive": True,
            "routingExpressionsEnabled": True,
            "projectRoutingExpression": "(0008,1030):(.*)",
        }
    )
    status, body = raw(xnat, "GET", "/xapi/dicomscp")
    second = json.loads(body)[1]
    assert second["directArchive"] is True and second["projectRoutingExpression"] == "(0008,1030):(.*)"
    assert second["label"] == "DA:8105" and second["anonymizationEnabled"] is True
    assert raw(xnat, "GET", f"/xapi/dicomscp/{entry['id']}")[0] == 200
    assert raw(xnat, "GET", "/xapi/dicomscp/99")[0] == 404


# --- listings and rows (§4, §4.4, §9) --------------------------------------------------------------


def test_rows_render_as_xnat_strings(xnat: XnatStandIn) -> None:
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    row = get_row(xnat, "prj001", "S1")
    assert row is not None and list(row) == list(COLUMNS)
    assert all(isinstance(v, str) for v in row.values())
    assert row["url"] == f"/prearchive/projects/prj001/{TS}/S1"  # not the filesystem path (§4.4)
    assert row["uploaded"] == "2024-01-31 10:11:12.123" and row["scan_date"] == ""
    assert row["prevent_anon"] == "false" and row["status"] == "RECEIVING" and row["TIMEZONE"] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+", row["lastmod"])
    assert raw(xnat, "GET", f"/data/prearchive/projects/unassigned/{TS}/S1?format=json")[0] == 200


def test_java_timestamp_format() -> None:
    assert java_timestamp(datetime(2024, 1, 31, 10, 11, 12, 123000)) == "2024-01-31 10:11:12.123"
    assert java_timestamp(datetime(2024, 1, 31, 10, 11, 12)) == "2024-01-31 10:11:12.0"
    assert java_timestamp(datetime(2024, 1, 31, 10, 11, 12, 120000)) == "2024-01-31 10:11:12.12"


def test_a_status_outside_the_enum_breaks_listings(xnat: XnatStandIn) -> None:
    insert_row(xnat.dsn, "prj001", "S1", status="DONE", xnat=xnat)  # not a PrearcStatus (§1)
    status, body = raw(xnat, "GET", "/data/prearchive/projects/prj001?format=json")
    assert status == 500 and "No enum constant" in body


def test_a_session_without_a_row_is_an_empty_result_set(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")  # files without a row stay invisible (§1 "no periodic rescan")
    # PrearcSessionResource:191-200: 200 with no rows, not 404.
    status, body = raw(xnat, "GET", f"/data{uri('prj001', 'S1')}?format=json")
    assert status == 200 and table(body) == []
    assert json.loads(body)["ResultSet"]["totalRecords"] == "0"
    # an unknown project fails in getPrearcDir: 500 (PrearcSessionResource:109-111)
    assert raw(xnat, "GET", f"/data{uri('nope', 'S1')}?format=json")[0] == 500


def test_admin_listings_include_unassigned_rows(xnat: XnatStandIn) -> None:
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    insert_row(xnat.dsn, "prj002", "S2", xnat=xnat)
    insert_row(xnat.dsn, None, "U1", xnat=xnat)
    # PrearcSessionListResource:115-118: the asked projects, plus NULL for a user with all-data access.
    status, body = raw(xnat, "GET", "/data/prearchive/projects/prj001?format=json")
    assert status == 200
    assert sorted((r["project"], r["folderName"]) for r in table(body)) == [
        ("Unassigned", "U1"),
        ("prj001", "S1"),
    ]
    # an unknown project is no error: it holds nothing, and Unassigned rows still come back.
    status, body = raw(xnat, "GET", "/data/prearchive/projects/nope?format=json")
    assert status == 200 and [r["folderName"] for r in table(body)] == ["U1"]
    # :112-113 ?tag= lists the study's rows in every project, whatever project the path names.
    status, body = raw(xnat, "GET", f"/data/prearchive/projects/prj001?format=json&tag={STUDY_UID}")
    assert sorted(r["folderName"] for r in table(body)) == ["S1", "S2", "U1"]
    status, body = raw(xnat, "GET", "/data/prearchive?format=json")
    assert len(table(body)) == 3


# --- builds (§3, §4.4, §4.5, §9) ---------------------------------------------------------------------


def test_rebuild_is_async_and_writes_the_session_xml(xnat: XnatStandIn) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    status, body = raw(xnat, "GET", f"/data{uri('prj001', 'S1')}?format=xml")
    assert status == 404 and "XNAT session document is not available" in body
    xnat.build_delay = 0.3
    status, body = rebuild(xnat, uri("prj001", "S1"))
    assert status == 200 and [r["status"] for r in table(body)] == ["QUEUED_BUILDING"]
    seen = set()
    end = time.monotonic() + 10
    while (row := get_row(xnat, "prj001", "S1")) and row["status"] != "READY" and time.monotonic() < end:
        seen.add(row["status"])
        time.sleep(0.02)
    assert row is not None and row["status"] == "READY"
    assert "_BUILDING" in seen  # the build holds the locked status (LockAndSync)
    assert (row["scan_date"], row["scan_time"]) == ("2013-12-11 00:00:00.0", "15:18:18")
    xml = (sdir.parent / "S1.xml").read_text()
    assert 'label="S1"' in xml and "<xnat:subject_ID>prj001_001</xnat:subject_ID>" in xml
    assert ' ID="' not in xml.split("\n")[1]  # no session ID attribute (§1)
    assert (sdir / "SCANS" / "1" / "DICOM" / "scan_1_catalog.xml").is_file()
    assert raw(xnat, "GET", f"/data{uri('prj001', 'S1')}?format=xml")[0] == 200
    assert xnat.experiments == {}  # REST builds never auto-archive (§3)


def test_rebuild_of_a_missing_row_is_500(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S2", xnat=xnat)
    make_session(xnat, "prj001", "S2")
    # PrearchiveBatchRebuild:71-73: getSession throws for the missing row; the other one is still queued.
    status, body = rebuild(xnat, uri("prj001", "S1"), uri("prj001", "S2"))
    assert status == 500
    assert [r["folderName"] for r in table(body)] == ["S2"]
    assert wait_status(xnat, "prj001", "S2", {"READY"}) is not None
    assert rebuild(xnat, uri("nope", "S1"))[0] == 500  # an unknown project has no row either
    assert db_row(xnat, "prj001", "S1") is None


def test_rebuild_of_a_locked_row_answers_200_and_queues_nothing(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="_BUILDING", xnat=xnat)
    # PrearcUtils.queuePrearchiveOperation:1117-1121 refuses the locked row silently; overrideLock is
    # handed to the handler only, which never runs.
    for override in (False, True):
        status, body = rebuild(xnat, uri("prj001", "S1"), override=override)
        assert status == 200 and [r["status"] for r in table(body)] == ["_BUILDING"]
    xnat.wait_idle()
    time.sleep(0.2)
    assert db_row(xnat, "prj001", "S1")["status"] == "_BUILDING"  # type: ignore[index]
    assert not (xnat.session_dir("prj001", TS, "S1").parent / "S1.xml").exists()


def test_failed_build_is_error_with_the_log(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    xnat.fail_builds("S1", "XNATSessionBuilder: boom")
    rebuild(xnat, uri("prj001", "S1"))
    assert wait_status(xnat, "prj001", "S1", {"ERROR", "READY"})["status"] == "ERROR"  # type: ignore[index]
    assert raw(xnat, "GET", f"/data{uri('prj001', 'S1')}/logs/last") == (200, "XNATSessionBuilder: boom")


def test_build_with_no_dicom_is_error(xnat: XnatStandIn) -> None:
    xnat.session_dir("prj001", TS, "S1").mkdir(parents=True)
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    rebuild(xnat, uri("prj001", "S1"))
    assert wait_status(xnat, "prj001", "S1", {"ERROR", "READY"})["status"] == "ERROR"  # type: ignore[index]
    assert "no DICOM files" in raw(xnat, "GET", f"/data{uri('prj001', 'S1')}/logs/last")[1]


def test_rebuild_deletes_the_row_when_the_timestamp_dir_is_missing(xnat: XnatStandIn) -> None:
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)  # no files at all
    rebuild(xnat, uri("prj001", "S1"))
    xnat.wait_idle()
    assert db_row(xnat, "prj001", "S1") is None  # PrearchiveRebuildHandler:78-87


def test_sync_build(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    uri_list = f"/data/prearchive/projects/prj001/{TS}/S1\r\n"  # text/uri-list lines end in CRLF
    assert sync_build(xnat, "prj001", "S1") == (200, uri_list)
    assert get_row(xnat, "prj001", "S1")["status"] == "READY"  # type: ignore[index]
    # PrearcSessionResource.postActionBuild:332-350: a locked row is 409, a missing one 500.
    insert_row(xnat.dsn, "prj001", "S2", status="_ARCHIVING", xnat=xnat)
    assert sync_build(xnat, "prj001", "S2") == (409, "session document locked")
    assert sync_build(xnat, "prj001", "S3")[0] == 500


def test_sync_build_of_a_building_row_goes_ahead(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="BUILDING", xnat=xnat)
    # BUILDING is not a locked status: setStatus(BUILDING) succeeds (PrearcDatabase.setStatus:1219-1226).
    assert sync_build(xnat, "prj001", "S1")[0] == 200


def test_a_build_rewrites_the_row_from_the_xml_and_keeps_four_columns(xnat: XnatStandIn) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(
        xnat.dsn,
        "prj001",
        "S1",
        xnat=xnat,
        url="/somewhere/else/S1",
        name="LABEL1",
        subject=None,
        autoarchive="AutoArchive",
        prevent_anon=True,
        prevent_auto_commit=True,
        source="mytool",
        timezone="Europe/London",
        lastmod=datetime(2020, 1, 1),
    )
    sql(xnat.dsn, "UPDATE xdat_search.prearchive SET uploaded = NULL, scan_time = '00:00:00'")
    built(xnat, "prj001", "S1")
    row = db_row(xnat, "prj001", "S1")
    assert row is not None
    xml = sdir.parent / "S1.xml"
    # PrearcTableBuilder.Session:60-73, getSessionData:114-130, makeSessionFromXml:538-540 (§9).
    assert row["lastmod"] == datetime.fromtimestamp(xml.stat().st_mtime)
    assert row["url"] == str(sdir.absolute())
    assert row["name"] == "LABEL1" and 'label="LABEL1"' in xml.read_text()  # the row's name is the label
    assert row["subject"] == "DOE^JOHN"  # no subject_ID: dcmPatientName, not sanitised
    assert row["TIMEZONE"] is None
    assert row["uploaded"] == datetime(2024, 1, 31, 10, 11, 12, 123000)
    assert row["scan_time"] == "15:18:18" and row["scan_date"] == datetime(2013, 12, 11)
    assert row["status"] == "READY" and row["tag"] == STUDY_UID
    # PrearcUtils:926-931: the four configuration columns survive the build.
    assert (row["autoarchive"], row["prevent_anon"], row["prevent_auto_commit"], row["SOURCE"]) == (
        "AutoArchive",
        True,
        True,
        "mytool",
    )


def test_a_build_of_a_row_without_a_tag_resets_the_four_columns(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    xnat.projects["prj001"] = 5
    insert_row(
        xnat.dsn,
        "prj001",
        "S1",
        xnat=xnat,
        tag=None,
        autoarchive="Manual",
        prevent_anon=True,
        source="mytool",
    )
    built(xnat, "prj001", "S1")
    row = db_row(xnat, "prj001", "S1")
    assert row is not None
    # updateNewSessionMetadataWithExistingObject:909-912 copies nothing from a row without a tag:
    # autoarchive from the project code (PrearcTableBuilder:277-291), SessionData defaults, no source.
    assert (row["autoarchive"], row["prevent_anon"], row["prevent_auto_commit"], row["SOURCE"]) == (
        "AutoArchiveOverwrite",
        False,
        False,
        None,
    )
    assert row["tag"] == STUDY_UID  # from the XML


def test_the_url_column_is_rewritten_by_a_build_and_read_by_delete(xnat: XnatStandIn) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    elsewhere = xnat.prearchive / "elsewhere" / "S1"
    insert_row(xnat.dsn, "prj001", "S1", url=str(elsewhere), xnat=xnat)
    # FileSystemSessionDataModifier.delete:383-403 deletes where url points: here nothing; the row goes.
    assert raw(xnat, "DELETE", f"/data{uri('prj001', 'S1')}") == (200, "")
    assert db_row(xnat, "prj001", "S1") is None and sdir.is_dir()
    insert_row(xnat.dsn, "prj001", "S1", url=str(elsewhere), xnat=xnat)
    built(xnat, "prj001", "S1")  # builds from the layout path, then rewrites url
    assert db_row(xnat, "prj001", "S1")["url"] == str(sdir.absolute())  # type: ignore[index]


def test_scans_have_no_counts_and_resources_count_the_catalogs(xnat: XnatStandIn) -> None:
    sdir = make_session(xnat, "prj001", "S1", {"1": 2, "2": 1})
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    # no session XML yet: PrearcSessionResourceA:84-86
    for sub in ("scans", "resources"):
        status, body = raw(xnat, "GET", f"/data{uri('prj001', 'S1')}/{sub}?format=json")
        assert (status, body) == (404, "Unable to locate prearc resource.")
    built(xnat, "prj001", "S1")
    status, body = raw(xnat, "GET", f"/data{uri('prj001', 'S1')}/scans?format=json")
    assert status == 200
    assert table(body) == [  # PrearcScansListResource:34-40
        {"ID": "1", "xsiType": "xnat:mrScanData", "series_description": "series 1"},
        {"ID": "2", "xsiType": "xnat:mrScanData", "series_description": "series 2"},
    ]
    status, body = raw(xnat, "GET", f"/data{uri('prj001', 'S1')}/resources?format=json")
    rows = table(body)
    assert [(r["category"], r["cat_id"], r["label"], r["file_count"]) for r in rows] == [
        ("scans", "1", "DICOM", "2"),
        ("scans", "2", "DICOM", "1"),
    ]
    assert int(rows[0]["file_size"]) == sum(
        p.stat().st_size for p in (sdir / "SCANS" / "1" / "DICOM").glob("*.dcm")
    )
    # a file that arrives after the build is in no catalog until the next build (CatalogUtils.Stats)
    write_dicom(sdir / "SCANS" / "1" / "DICOM" / "late.dcm", "1", 3)
    status, body = raw(xnat, "GET", f"/data{uri('prj001', 'S1')}/resources?format=json")
    assert table(body)[0]["file_count"] == "2"


# --- archive (§4.5, §9) -------------------------------------------------------------------------------


def test_archive_moves_the_session_and_deletes_the_row(xnat: XnatStandIn) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    status, headers, body = archive(xnat, "prj001", "S1")
    exp = archive_path("prj001", "prj001_001", "S1")
    assert (status, body) == (200, exp + "\r\n") and headers["content-type"].startswith("text/uri-list")
    target = xnat.archive / "prj001" / "arc001" / "S1"
    assert not sdir.exists() and not (sdir.parent / "S1.xml").exists()
    assert len(list((target / "SCANS" / "1" / "DICOM").glob("*.dcm"))) == 2
    assert db_row(xnat, "prj001", "S1") is None
    status, body = raw(xnat, "GET", exp + "?format=json")
    fields = json.loads(body)["items"][0]["data_fields"]
    assert status == 200 and fields["label"] == "S1" and fields["ID"].startswith("XNAT_E")
    status, body = raw(xnat, "GET", exp + "/scans/1/resources?format=json")
    assert table(body)[0]["file_count"] == "2"


@pytest.mark.parametrize(
    ("code", "autoarchive", "params", "redirected"),
    [
        (0, "Manual", {"redirect": "true"}, True),  # Archiver:131 _redirect
        (4, "Manual", {}, True),  # the project code, once the row is gone
        (5, None, {}, True),
        (0, "Manual", {"AA": "true"}, True),  # an AA parameter (PrearcSession:103-106)
        (4, "Manual", {"auto-archive": "false"}, False),  # the parameter wins over the code
        (0, "Manual", {}, False),
        # the row says AutoArchive, but Archiver:131 reads it after the archive deleted it: 200
        (0, "AutoArchive", {}, False),
    ],
)
def test_archive_answers_303_when_redirected_or_auto_archive(
    xnat: XnatStandIn, code: int, autoarchive: str | None, params: dict[str, str], redirected: bool
) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat, autoarchive=autoarchive)
    built(xnat, "prj001", "S1")
    xnat.projects["prj001"] = code
    status, headers, body = archive(xnat, "prj001", "S1", **params)
    exp = archive_path("prj001", "prj001_001", "S1")
    if redirected:
        assert status == 303 and headers["location"] == xnat.url + exp  # XDAT.getSiteUrl() + uri
    else:
        assert (status, body) == (200, exp + "\r\n")
    assert ("prj001", "S1") in xnat.experiments


def test_archive_is_synchronous_and_a_retry_is_not_idempotent(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    xnat.archive_delay = 0.6
    result: list[tuple[int, dict[str, str], str]] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: result.append(archive(xnat, "prj001", "S1")))
    worker.start()
    time.sleep(0.2)
    assert get_row(xnat, "prj001", "S1")["status"] == "_ARCHIVING"  # type: ignore[index]
    # a second POST meanwhile: setStatus(ARCHIVING) refuses the locked row (Archiver:166-171)
    status, _, body = archive(xnat, "prj001", "S1")
    assert (status, body) == (403, "Operation already in progress on this prearchive entry.")
    worker.join()
    assert time.monotonic() - started >= 0.6 and result[0][0] == 200
    # retried after it finished: the session folder is gone (BatchPrearchiveActionsA:163-165)
    status, _, body = archive(xnat, "prj001", "S1")
    assert (status, body) == (404, f"{uri('prj001', 'S1')} not found.")
    # folder back but no row: setStatus → getSession throws, 500 (:197-199)
    make_session(xnat, "prj001", "S1")
    assert archive(xnat, "prj001", "S1")[0] == 500


def test_archive_times_out_with_500_and_goes_on(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    xnat.site_config["sessionArchiveTimeoutInterval"] = "0"
    xnat.archive_delay = 0.5
    status, _, body = archive(xnat, "prj001", "S1")
    # Archiver:139-141 after QueueBasedImageCommit:140-147
    assert status == 500
    assert body == f"The session prj001/{TS}/S1 did not complete within the configured timeout interval."
    xnat.wait_idle()
    assert ("prj001", "S1") in xnat.experiments and db_row(xnat, "prj001", "S1") is None


def test_archive_conflict_is_500_and_leaves_conflict_then_append(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1", {"1": 1})
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    assert archive(xnat, "prj001", "S1")[0] == 200
    make_session(xnat, "prj001", "S1", {"3": 1})  # the same label again (§5 session grouping)
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    status, _, body = archive(xnat, "prj001", "S1")
    # QueueBasedImageCommit:168-170 turns the handler's failure into a ServerException: 500, not 409.
    assert status == 500 and body.startswith("FAILED: Unable to archive S1: Operation Failed: ")
    assert "Session already exists, retry with overwrite enabled" in body
    assert db_row(xnat, "prj001", "S1")["status"] == "CONFLICT"  # type: ignore[index]
    assert archive(xnat, "prj001", "S1", overwrite="append")[0] == 200
    assert sorted(xnat.experiments[("prj001", "S1")].scans) == ["1", "3"]


def test_archive_refuses_unassigned(xnat: XnatStandIn) -> None:
    make_session(xnat, None, "U1")
    insert_row(xnat.dsn, None, "U1", xnat=xnat)
    built(xnat, None, "U1")
    assert (xnat.prearchive / TS / "U1.xml").is_file()  # Unassigned has no project level (§2)
    status, _, body = archive(xnat, None, "U1")
    assert (status, body) == (400, "Cannot archive sessions from the Unassigned folder.")


def test_archive_of_an_unbuilt_session_fails_with_error(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="READY", xnat=xnat)  # READY but never built: no XML
    status, _, body = archive(xnat, "prj001", "S1")
    assert status == 500 and "build the session first" in body
    assert db_row(xnat, "prj001", "S1")["status"] == "ERROR"  # type: ignore[index]
    insert_row(xnat.dsn, "prj001", "S2", status="RECEIVING", xnat=xnat)
    make_session(xnat, "prj001", "S2")
    assert archive(xnat, "prj001", "S2")[0] == 403  # departure 3


def test_malformed_service_requests(xnat: XnatStandIn) -> None:
    assert raw(xnat, "POST", "/data/services/prearchive/rebuild", b"")[0] == 400  # departure 10
    # BatchPrearchiveActionsA.getSessionDataTriples:258-263: a malformed src is 500 on a rebuild …
    assert raw(xnat, "POST", "/data/services/prearchive/rebuild", b"src=/prearchive/prj001/x")[0] == 500
    # … and 400 on an archive (:114-121); no src at all is "Unknown prearchive session." (:103-106)
    assert raw(xnat, "POST", "/data/services/archive", b"src=/archive/projects/prj001")[0] == 400
    assert raw(xnat, "POST", "/data/services/archive", b"overwrite=none") == (
        404,
        "Unknown prearchive session.",
    )
    assert raw(xnat, "GET", "/data/services/prearchive/rebuild")[0] == 405
    assert raw(xnat, "GET", "/data/nothing/here")[0] == 404
    assert raw(xnat, "POST", f"/data{uri('prj001', 'S1')}?action=commit")[0] == 501


# --- delete (§4.4, §9) -------------------------------------------------------------------------------


def test_delete_removes_files_and_row(xnat: XnatStandIn) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    assert raw(xnat, "DELETE", f"/data{uri('prj001', 'S1')}") == (200, "")
    assert not sdir.exists() and not (sdir.parent / "S1.xml").exists()
    assert db_row(xnat, "prj001", "S1") is None


def test_delete_of_a_missing_or_locked_row_answers_200_and_keeps_it(xnat: XnatStandIn) -> None:
    assert raw(xnat, "DELETE", f"/data{uri('prj001', 'S9')}") == (200, "")  # no row: still 200
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="_BUILDING", xnat=xnat)
    # PrearcDatabase.deleteSession:1445-1472: markSession cannot set DELETING on a locked row
    assert raw(xnat, "DELETE", f"/data{uri('prj001', 'S1')}") == (200, "")
    assert db_row(xnat, "prj001", "S1")["status"] == "_BUILDING" and sdir.is_dir()  # type: ignore[index]
    assert raw(xnat, "DELETE", f"/data{uri('nope', 'S1')}")[0] == 500  # getPrearcDir (:301-304)


# --- scheduled builds and auto-archive (§3, §9) ------------------------------------------------------


def old() -> datetime:
    return datetime.now() - timedelta(minutes=6)


@pytest.mark.parametrize(
    ("code", "autoarchive", "archived"),
    [
        (4, "Manual", True),  # Manual is "not decided": the project code archives (PrearcSession:92-110)
        (5, None, True),
        (0, "AutoArchive", True),
        (0, "Manual", False),
        (0, None, False),
    ],
)
def test_the_scheduled_build_auto_archives_on_codes_4_and_5(
    xnat: XnatStandIn, code: int, autoarchive: str | None, archived: bool
) -> None:
    make_session(xnat, "prj001", "S1")
    xnat.projects["prj001"] = code
    insert_row(
        xnat.dsn, "prj001", "S1", xnat=xnat, autoarchive=autoarchive, prevent_auto_commit=False, lastmod=old()
    )
    assert xnat.rebuilder_pass() == [("prj001", TS, "S1")]
    xnat.wait_idle()
    if archived:
        assert db_row(xnat, "prj001", "S1") is None and ("prj001", "S1") in xnat.experiments
    else:
        assert db_row(xnat, "prj001", "S1")["status"] == "READY"  # type: ignore[index]
        assert xnat.experiments == {}


def test_the_rebuilder_skips_what_xnat_skips(xnat: XnatStandIn) -> None:
    xnat.projects["prj001"] = 4
    for folder in ("PAC", "UPL", "NEW", "RDY"):
        make_session(xnat, "prj001", folder)
    insert_row(xnat.dsn, "prj001", "PAC", xnat=xnat, prevent_auto_commit=True, lastmod=old())
    insert_row(
        xnat.dsn, "prj001", "UPL", xnat=xnat, prevent_auto_commit=False, source=" uploader ", lastmod=old()
    )
    insert_row(xnat.dsn, "prj001", "NEW", xnat=xnat, prevent_auto_commit=False)  # idle 0 min < 5
    insert_row(xnat.dsn, "prj001", "RDY", xnat=xnat, prevent_auto_commit=False, status="READY", lastmod=old())
    assert xnat.rebuilder_pass() == []  # SessionXMLRebuilder:91 and :99
    xnat.wait_idle()
    assert xnat.experiments == {}


def test_a_null_prevent_auto_commit_aborts_the_whole_rebuilder_pass(xnat: XnatStandIn) -> None:
    for folder in ("A", "B"):
        make_session(xnat, "prj001", folder)
    insert_row(xnat.dsn, "prj001", "A", xnat=xnat, prevent_auto_commit=None, lastmod=old())
    insert_row(xnat.dsn, "prj001", "B", xnat=xnat, prevent_auto_commit=False, lastmod=old())
    queued = xnat.rebuilder_pass()
    # SessionXMLRebuilder:91 unboxes NULL outside the per-row try: the pass ends at that row (§1), and B,
    # read after A (a fresh table is scanned in insertion order), is not built either.
    assert queued == []
    assert any("NullPointerException" in line for line in xnat.task_log)
    xnat.wait_idle()


def test_rest_rebuilds_never_auto_archive(xnat: XnatStandIn) -> None:
    make_session(xnat, "prj001", "S1")
    xnat.projects["prj001"] = 4
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat, prevent_auto_commit=False, lastmod=old())
    rebuild(xnat, uri("prj001", "S1"))  # PrearchiveBatchRebuild:63 autoArchiveBlocked
    assert wait_status(xnat, "prj001", "S1", {"READY"})["status"] == "READY"  # type: ignore[index]
    xnat.wait_idle()
    assert xnat.experiments == {}


def test_the_scheduler_thread_builds_idle_sessions(pg_db_17: PgDb, tmp_path: Path) -> None:
    with XnatStandIn(pg_db_17.dsn, tmp_path / "pre", tmp_path / "arc", projects={"prj001": 4}) as standin:
        standin.time_scale = 0.002  # 5 min → 0.6 s, the 60 s repeat → 0.12 s
        make_session(standin, "prj001", "S1")
        insert_row(standin.dsn, "prj001", "S1", xnat=standin, prevent_auto_commit=False)
        time.sleep(0.3)
        assert db_row(standin, "prj001", "S1")["status"] == "RECEIVING"  # type: ignore[index]
        end = time.monotonic() + 10
        while ("prj001", "S1") not in standin.experiments and time.monotonic() < end:
            time.sleep(0.05)
        assert ("prj001", "S1") in standin.experiments
    assert standin.errors == []


# --- the emulated receiver (§5, §9) ----------------------------------------------------------------


@pytest.fixture
def receiver_factory(xnat: XnatStandIn) -> Iterator[Any]:
    started: list[XnatReceiverSCP] = []

    def make(**settings: Any) -> XnatReceiverSCP:
        scp = XnatReceiverSCP(dsn=xnat.dsn, prearchive=xnat.prearchive, xnat=xnat, **settings)
        scp.start()
        started.append(scp)
        return scp

    yield make
    for scp in started:
        scp.stop()


def study(n: int = 2, **extra: Any) -> list[Dataset]:
    return [
        make_dataset("1", i, PatientComments="Project: prj001 Subject: SUBJ1 Session: SESS1", **extra)
        for i in range(1, n + 1)
    ]


def test_the_receiver_files_a_row_with_the_project_code(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.projects["prj001"] = 4
    xnat.anonymize_site_enabled = False
    scp = receiver_factory()
    assert send(scp.port, study()) == [0, 0]
    (row,) = [dict(zip(COLUMNS, r)) for r in sql(xnat.dsn, "SELECT * FROM xdat_search.prearchive")]
    # GDI:506 / :687-702 stores the project's code; GDI:314-320 the other columns.
    assert (row["project"], row["folderName"], row["name"], row["subject"]) == (
        "prj001",
        "SESS1",
        "SESS1",
        "SUBJ1",
    )
    assert (row["status"], row["autoarchive"], row["prevent_anon"], row["prevent_auto_commit"]) == (
        "RECEIVING",
        "AutoArchive",
        False,
        False,
    )
    assert row["uploaded"] is None and row["scan_date"] == datetime(2013, 12, 11, 15, 18, 18)
    files = sorted(Path(row["url"]).glob("SCANS/1/DICOM/*.dcm"))
    assert len(files) == 2
    # the default template (SiteConfigPreferences:773); the receiver's namer is its own
    ds = pydicom.dcmread(files[0])
    assert files[0].name == file_name(ds, xnat.site_config["dicomFileNameTemplate"])
    assert files[0].name.startswith(f"{STUDY_UID}-1-") and files[0].name.endswith(".dcm")


def test_the_receiver_follows_the_site_file_name_template(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.site_config["dicomFileNameTemplate"] = "${PatientID}-${InstanceNumber}-${StudyComments}"
    xnat.anonymize_site_enabled = False
    scp = receiver_factory()
    send(scp.port, study(1))
    (url,) = sql(xnat.dsn, "SELECT url FROM xdat_search.prearchive")[0]
    names = [p.name for p in Path(url).glob("SCANS/1/DICOM/*")]
    assert names == ["prj001_001-1-no-value-for-StudyComments.dcm"]  # TemplatizedDicomFileNamer:53, :80


def test_the_receiver_applies_the_site_script(xnat: XnatStandIn, receiver_factory: Any) -> None:
    scp = receiver_factory()  # site script on by default, XNAT's id.das
    send(scp.port, study(1, StudyDescription="orig"))
    (url,) = sql(xnat.dsn, "SELECT url FROM xdat_search.prearchive")[0]
    ds = pydicom.dcmread(next(Path(url).glob("SCANS/1/DICOM/*.dcm")))
    # GDI:390-405: PatientName := subject, PatientID := session, StudyDescription := project
    assert (str(ds.PatientName), ds.PatientID, ds.StudyDescription) == ("SUBJ1", "SESS1", "prj001")


def test_a_receiver_without_anonymisation_sets_prevent_anon(xnat: XnatStandIn, receiver_factory: Any) -> None:
    scp = receiver_factory(anonymization_enabled=False)  # CStoreService:293, :303
    send(scp.port, study(1))
    url, prevent_anon = sql(xnat.dsn, "SELECT url, prevent_anon FROM xdat_search.prearchive")[0]
    ds = pydicom.dcmread(next(Path(url).glob("SCANS/1/DICOM/*.dcm")))
    assert prevent_anon is True and str(ds.PatientName) == "DOE^JOHN"


def test_a_script_the_receiver_cannot_apply_refuses_the_instance(
    xnat: XnatStandIn, receiver_factory: Any
) -> None:
    xnat.anonymize_site_script = 'version "6.1"\n(0010,0010) := format["{0}", subject]'
    scp = receiver_factory()
    assert send(scp.port, study(1)) == [0xA700]  # departure 15: never stored unanonymised
    assert sql(xnat.dsn, "SELECT count(*) FROM xdat_search.prearchive") == [(0,)]
    assert not list(xnat.prearchive.rglob("*.dcm"))


def test_the_receiver_joins_rows_and_interrupts_builds(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.anonymize_site_enabled = False
    scp = receiver_factory()
    send(scp.port, study(1))
    (ts,) = sql(xnat.dsn, "SELECT timestamp FROM xdat_search.prearchive")[0]
    for status, after in (
        ("READY", "RECEIVING"),
        ("BUILDING", "RECEIVING_INTERRUPT"),
        ("_ARCHIVING", "RECEIVING"),
    ):
        sql(xnat.dsn, "UPDATE xdat_search.prearchive SET status = %s", (status,))
        send(
            scp.port, [make_dataset("1", 9, PatientComments="Project: prj001 Subject: SUBJ1 Session: SESS1")]
        )
        # eitherGetOrCreateSession:2088-2115: the same row, whatever its timestamp
        assert sql(xnat.dsn, "SELECT timestamp, status FROM xdat_search.prearchive") == [(ts, after)]


def test_routing_expressions_come_first_when_enabled(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.anonymize_site_enabled = False
    scp = receiver_factory(
        routing_expressions_enabled=True,
        project_routing_expression="(0008,1030):nothing-(.*)\n(0008,1030):SITE-(\\w+)",
        session_routing_expression="(0020,0010):(.*) t:\\. r:_",
    )
    send(scp.port, study(1, StudyDescription="SITE-prj002", StudyID="A.B"))
    rows = sql(xnat.dsn, "SELECT project, foldername, subject FROM xdat_search.prearchive")
    # the receiver's expressions before PatientComments (Xnat15PerReceiverDicomProjectIdentifier:42-51)
    assert rows == [("prj002", "A_B", "SUBJ1")]
    scp.settings["routingExpressionsEnabled"] = False
    send(
        scp.port,
        [
            make_dataset(
                "1",
                5,
                PatientComments="Project: prj001 Subject: SUBJ1 Session: SESS1",
                StudyDescription="SITE-prj002",
                StudyID="A.B",
            )
        ],
    )
    rows = sql(xnat.dsn, "SELECT project, foldername FROM xdat_search.prearchive ORDER BY project")
    assert rows == [("prj001", "SESS1"), ("prj002", "A_B")]


def test_an_unknown_project_from_an_expression_is_skipped(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.anonymize_site_enabled = False
    scp = receiver_factory(routing_expressions_enabled=True, project_routing_expression="(0008,1030):(.*)")
    send(scp.port, study(1, StudyDescription="nosuchproject"))
    assert sql(xnat.dsn, "SELECT project FROM xdat_search.prearchive") == [("prj001",)]  # :65-72


def test_direct_archive_skips_the_prearchive(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.anonymize_site_enabled = False
    scp = receiver_factory(direct_archive=True)
    status, body = raw(xnat, "GET", f"/xapi/direct-archive/prj001/{STUDY_UID}/SESS1")
    assert (status, body) == (404, "No matching direct archive session")
    assert send(scp.port, study(2)) == [0, 0]
    # GDI:268-276: no prearchive row, the files in the archive
    assert sql(xnat.dsn, "SELECT count(*) FROM xdat_search.prearchive") == [(0,)]
    location = xnat.archive / "prj001" / "arc001" / "SESS1"
    assert len(list(location.glob("SCANS/1/DICOM/*.dcm"))) == 2
    status, body = raw(xnat, "GET", f"/xapi/direct-archive/prj001/{STUDY_UID}/SESS1")
    progress = json.loads(body)
    assert status == 200 and progress["status"] == "RECEIVING" and progress["url"] == str(location)
    assert progress["folderName"] == "SESS1" and progress["subject"] == "SUBJ1"
    assert isinstance(progress["lastBuiltDate"], int) and "uploadDate" not in progress  # NON_NULL
    # receiver settings show it (/xapi/dicomscp)
    entries = json.loads(raw(xnat, "GET", "/xapi/dicomscp")[1])
    assert [e["directArchive"] for e in entries if e["port"] == scp.port] == [True]
    # not idle yet: nothing happens; idle for the rebuilder interval: built and archived
    assert xnat.direct_archive_pass() == []
    xnat.time_scale = 0.0001
    assert len(xnat.direct_archive_pass()) == 1
    xnat.wait_idle()
    assert raw(xnat, "GET", f"/xapi/direct-archive/prj001/{STUDY_UID}/SESS1")[0] == 404
    exp = xnat.experiments[("prj001", "SESS1")]
    assert exp.subject == "SUBJ1" and exp.scans == {"1": 2} and not Path(str(location) + ".xml").exists()


def test_direct_archive_falls_back_to_the_prearchive(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.anonymize_site_enabled = False
    (xnat.archive / "prj001" / "arc001" / "SESS1").mkdir(parents=True)  # data already there
    scp = receiver_factory(direct_archive=True)
    send(scp.port, study(1))
    # DirectArchiveSessionServiceImpl.getOrCreate:131-134 refuses; GDI:496-501 uses the prearchive
    assert sql(xnat.dsn, "SELECT project, foldername FROM xdat_search.prearchive") == [("prj001", "SESS1")]
    assert xnat.direct_archives == {}


def test_unassigned_data_is_never_direct_archived(xnat: XnatStandIn, receiver_factory: Any) -> None:
    xnat.anonymize_site_enabled = False
    scp = receiver_factory(direct_archive=True)
    send(scp.port, [make_dataset("1", 1, PatientComments="Project: nope Session: S9")])
    rows = sql(xnat.dsn, "SELECT project, foldername, url FROM xdat_search.prearchive")
    assert [(p, f) for p, f, _ in rows] == [(None, "S9")]  # GDI:269-272
    assert Path(rows[0][2]).parent.parent == xnat.prearchive  # <prearchive>/<ts>/<label>


# --- faults ------------------------------------------------------------------------------------------


def test_injected_faults_are_retried_and_recovered(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    xnat.fail_next(2, 503, path_prefix="/data/services/prearchive/rebuild")
    client.rebuild("prj001", TS, "S1")
    assert [c.status for c in xnat.calls if c.path == "/data/services/prearchive/rebuild"] == [503, 503, 200]
    assert wait_status(xnat, "prj001", "S1", {"READY"})["status"] == "READY"  # type: ignore[index]


def test_injected_faults_beyond_the_retries_fail_clearly(xnat: XnatStandIn, client: XnatClient) -> None:
    xnat.fail_next(10, 502, path_prefix="/data/projects")
    with pytest.raises(XnatRestError) as err:
        client.prearchive_code("prj001")
    assert err.value.status == 502
    assert len([c for c in xnat.calls if c.path.startswith("/data/projects")]) == 4  # 1 + 3 retries


def test_both_table_profiles(pg_dsn: PgDb, tmp_path: Path) -> None:
    with XnatStandIn(pg_dsn.dsn, tmp_path / "pre", tmp_path / "arc") as standin:
        make_session(standin, "prj001", "S1")
        insert_row(standin.dsn, "prj001", "S1", xnat=standin)
        built(standin, "prj001", "S1")
        status, _, body = archive(standin, "prj001", "S1")
        assert status == 200 and body.endswith("/experiments/S1\r\n")
    assert standin.errors == []


def test_refuses_a_table_xnat_would_rebuild(pg_db_17: PgDb, tmp_path: Path) -> None:
    sql(pg_db_17.dsn, "ALTER TABLE xdat_search.prearchive ADD COLUMN extra VARCHAR")
    with pytest.raises(RuntimeError, match="19 columns"), XnatStandIn(pg_db_17.dsn, tmp_path, tmp_path):
        pass

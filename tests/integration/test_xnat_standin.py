"""The XNAT stand-in driven through XnatClient, on real PostgreSQL (XNAT's table) and real folders."""

from __future__ import annotations

import base64
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psycopg2
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.xnat_standin import COLUMNS, XnatStandIn, java_timestamp
from xnatmigrate.errors import XnatRestError
from xnatmigrate.execute.xnat import Credentials, XnatClient
from xnatmigrate.testing.pg import PgDb

TS = "20240131_101112123"
STUDY_UID = "1.2.840.113654.2.45.2.108105"
ADMIN = Credentials("admin", "admin", "test")

# Modelled on the documented example row (xnat-reference.md §7 step 3; test_rig_pg.DOC_EXAMPLE_INSERT).
INSERT = """
INSERT INTO xdat_search.prearchive (project, timestamp, lastmod, uploaded, scan_date, scan_time, subject,
                                    foldername, name, tag, status, autoarchive, prevent_anon,
                                    prevent_auto_commit, url)
VALUES (%(project)s, %(timestamp)s, LOCALTIMESTAMP, '2024-01-31 10:11:12.123', NULL, NULL, %(subject)s,
        %(folder)s, %(name)s, %(tag)s, %(status)s, 'Manual', false, true, %(url)s)
"""


# --- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def xnat(pg_db_17: PgDb, tmp_path: Path) -> Iterator[XnatStandIn]:
    with XnatStandIn(pg_db_17.dsn, tmp_path / "prearchive", tmp_path / "archive") as standin:
        standin.build_delay = 0.05
        yield standin
        standin.wait_idle()
    assert standin.errors == []


@pytest.fixture
def client(xnat: XnatStandIn) -> Iterator[XnatClient]:
    with XnatClient(xnat.url, ADMIN, timeout=5, retries=3, backoff=0.01) as c:
        yield c


def write_dicom(path: Path, series: str, instance: int) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "DOE^JOHN", "prj001_001"
    ds.StudyDate, ds.StudyTime, ds.StudyInstanceUID = "20131211", "151818.000", STUDY_UID
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = f"{STUDY_UID}.{series}", series, instance
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def make_session(
    xnat: XnatStandIn, project: str | None, folder: str, series: dict[str, int] | None = None
) -> Path:
    """Files laid out as §2: ``<ts>/<folder>/SCANS/<scan>/DICOM/<name>.dcm``."""
    sdir = xnat.session_dir(project, TS, folder)
    for scan, count in (series or {"1": 2, "2": 1}).items():
        for i in range(1, count + 1):
            write_dicom(sdir / "SCANS" / scan / "DICOM" / f"{STUDY_UID}-{scan}-{i}-abc.dcm", scan, i)
    return sdir


def insert_row(
    dsn: str,
    project: str | None,
    folder: str,
    *,
    status: str = "RECEIVING",
    url: str | None = None,
    xnat: XnatStandIn,
) -> None:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                INSERT,
                {
                    "project": project,
                    "timestamp": TS,
                    "subject": "prj001_001",
                    "folder": folder,
                    "name": folder,
                    "tag": STUDY_UID,
                    "status": status,
                    "url": url or str(xnat.session_dir(project, TS, folder)),
                },
            )
    finally:
        conn.close()


def sql(dsn: str, query: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def raw(
    xnat: XnatStandIn, method: str, path: str, data: bytes | None = None, auth: bool = True, cookie: str = ""
) -> tuple[int, str]:
    """A request outside the client (for malformed requests the client never sends)."""
    req = urllib.request.Request(xnat.url + path, data=data, method=method)
    if cookie:
        req.add_header("Cookie", f"JSESSIONID={cookie}")
    elif auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(b"admin:admin").decode())
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def sync_build(xnat: XnatStandIn, project: str | None, folder: str) -> tuple[int, str]:
    """``POST .../<ts>/<folder>?action=build`` (§4.4), which the client does not send: (status, body)."""
    return raw(
        xnat, "POST", f"/data/prearchive/projects/{project or 'Unassigned'}/{TS}/{folder}?action=build"
    )


def built(xnat: XnatStandIn, project: str | None, folder: str) -> None:
    status, body = sync_build(xnat, project, folder)
    assert status == 200, body


# --- auth (§4.1) ------------------------------------------------------------------------------------


def test_bad_credentials_are_401(xnat: XnatStandIn) -> None:
    with pytest.raises(XnatRestError) as err:
        XnatClient(xnat.url, Credentials("admin", "wrong", "test"), retries=0).prearchive_code("prj001")
    assert err.value.status == 401 and "check XNAT_USER/XNAT_PASSWORD" in str(err.value)
    assert raw(xnat, "GET", "/data/projects?format=json", auth=False)[0] == 401
    assert xnat.calls[-1].user is None and xnat.calls[-1].status == 401


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
    assert client.prearchive_code("prj001") == 0
    assert [(c.path, c.status) for c in xnat.calls[-3:]] == [
        ("/data/projects/prj001/prearchive_code", 401),
        ("/data/JSESSION", 200),
        ("/data/projects/prj001/prearchive_code", 200),
    ]


# --- projects, version (§4.2, §4.3) ------------------------------------------------------------------


def test_projects_and_prearchive_code(xnat: XnatStandIn, client: XnatClient) -> None:
    assert raw(xnat, "GET", "/data/projects/prj001?format=json")[0] == 200
    assert raw(xnat, "GET", "/data/projects/nope?format=json")[0] == 404
    assert client.prearchive_code("prj001") == 0
    assert raw(xnat, "PUT", "/data/projects/prj001/prearchive_code/4") == (200, "")
    assert client.prearchive_code("prj001") == 4
    assert raw(xnat, "PUT", "/data/projects/prj001/prearchive_code/3") == (400, "Invalid prearchive code 3")
    assert client.prearchive_code("prj001") == 4
    status, body = raw(xnat, "GET", "/xapi/siteConfig/buildInfo")
    assert status == 200 and json.loads(body)["version"] == "1.8.10"
    status, body = raw(xnat, "GET", "/data/projects?format=json")
    assert status == 200
    assert json.loads(body)["ResultSet"]["Result"][0]["URI"] == "/data/projects/prj001"


# --- listings and rows (§4, §4.4) -------------------------------------------------------------------


def test_rows_render_as_xnat_strings(xnat: XnatStandIn, client: XnatClient) -> None:
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    insert_row(xnat.dsn, None, "U1", xnat=xnat)
    row = client.prearchive_session("prj001", TS, "S1")
    assert row is not None and list(row) == list(COLUMNS)
    assert all(isinstance(v, str) for v in row.values())
    assert row["url"] == f"/prearchive/projects/prj001/{TS}/S1"  # not the filesystem path (§4.4)
    assert row["uploaded"] == "2024-01-31 10:11:12.123" and row["scan_date"] == ""
    assert row["prevent_anon"] == "false" and row["status"] == "RECEIVING" and row["TIMEZONE"] == ""
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+", row["lastmod"])
    unassigned = client.prearchive_session(None, TS, "U1")
    assert unassigned is not None and unassigned["project"] == "Unassigned"
    assert [r["folderName"] for r in client.prearchive_sessions("prj001", tag=STUDY_UID)] == ["S1"]
    assert client.prearchive_sessions("prj001", tag="9.9") == []
    assert raw(xnat, "GET", "/data/prearchive/projects/unassigned?format=json")[0] == 200  # case-insensitive


def test_java_timestamp_format() -> None:
    assert java_timestamp(datetime(2024, 1, 31, 10, 11, 12, 123000)) == "2024-01-31 10:11:12.123"
    assert java_timestamp(datetime(2024, 1, 31, 10, 11, 12)) == "2024-01-31 10:11:12.0"
    assert java_timestamp(datetime(2024, 1, 31, 10, 11, 12, 120000)) == "2024-01-31 10:11:12.12"


def test_a_status_outside_the_enum_breaks_listings(xnat: XnatStandIn, client: XnatClient) -> None:
    insert_row(xnat.dsn, "prj001", "S1", status="DONE", xnat=xnat)  # not a PrearcStatus (§1)
    with pytest.raises(XnatRestError, match=r"HTTP 500 .*No enum constant"):
        client.prearchive_sessions("prj001")


def test_missing_rows_are_404(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")  # files without a row stay invisible (§1 "no periodic rescan")
    assert client.prearchive_session("prj001", TS, "S1") is None
    assert client.delete_prearchive_session("prj001", TS, "S1") is True  # no row afterwards: gone
    for call in (client.rebuild, client.archive):
        with pytest.raises(XnatRestError) as err:
            call("prj001", TS, "S1")
        assert err.value.status == 404
    assert sync_build(xnat, "prj001", "S1")[0] == 404
    with pytest.raises(XnatRestError) as err:
        client.prearchive_sessions("nope")
    assert err.value.status == 404


# --- builds (§3, §4.4, §4.5) -------------------------------------------------------------------------


def test_rebuild_is_async_and_writes_the_session_xml(xnat: XnatStandIn, client: XnatClient) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    assert raw(xnat, "GET", f"/data/prearchive/projects/prj001/{TS}/S1?format=xml") == (
        404,
        "XNAT session document is not available",
    )
    xnat.build_delay = 0.3
    queued = client.rebuild("prj001", TS, "S1")
    assert [r["status"] for r in queued] == ["QUEUED_BUILDING"]
    seen: list[str] = []
    row = client.wait_for_status(
        "prj001", TS, "S1", timeout=10, poll=0.02, on_poll=lambda r: seen.append(r["status"])
    )
    assert row["status"] == "READY" and "BUILDING" in seen
    assert (row["scan_date"], row["scan_time"]) == ("2013-12-11 00:00:00.0", "15:18:18")
    xml = (sdir.parent / "S1.xml").read_text()
    assert 'label="S1"' in xml and "<xnat:subject_ID>prj001_001</xnat:subject_ID>" in xml
    assert 'ID="1"' in xml and 'file_count="2"' in xml and 'ID="2"' in xml
    assert ' ID="' not in xml.split("\n")[1]  # no session ID attribute (§1)
    assert (sdir / "SCANS" / "1" / "DICOM" / "scan_1_catalog.xml").is_file()
    assert raw(xnat, "GET", f"/data/prearchive/projects/prj001/{TS}/S1?format=xml")[0] == 200
    assert client.prearchive_code("prj001") == 0 and sql(
        xnat.dsn, "SELECT count(*) FROM xdat_search.prearchive"
    ) == [(1,)]  # REST builds never auto-archive (§3)


def test_failed_build_is_error_with_the_log(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    xnat.fail_builds("S1", "XNATSessionBuilder: boom")
    client.rebuild("prj001", TS, "S1")
    assert client.wait_for_status("prj001", TS, "S1", timeout=10, poll=0.02)["status"] == "ERROR"
    assert client.last_log("prj001", TS, "S1") == "XNATSessionBuilder: boom"


def test_build_with_no_dicom_is_error(xnat: XnatStandIn, client: XnatClient) -> None:
    xnat.session_dir("prj001", TS, "S1").mkdir(parents=True)
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    client.rebuild("prj001", TS, "S1")
    assert client.wait_for_status("prj001", TS, "S1", timeout=10, poll=0.02)["status"] == "ERROR"
    assert "no DICOM files" in client.last_log("prj001", TS, "S1")


def test_wrong_url_column_fails_the_build(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", url="/data/xnat/prearchive/prj001/x/S1", xnat=xnat)
    status, body = sync_build(xnat, "prj001", "S1")
    assert status == 500 and "url column" in body
    assert sql(xnat.dsn, "SELECT status FROM xdat_search.prearchive") == [("ERROR",)]


def test_rebuild_deletes_the_row_when_the_timestamp_dir_is_missing(
    xnat: XnatStandIn, client: XnatClient
) -> None:
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)  # no files at all
    client.rebuild("prj001", TS, "S1")
    with pytest.raises(XnatRestError, match="disappeared"):
        client.wait_for_status("prj001", TS, "S1", timeout=10, poll=0.02)
    assert sql(xnat.dsn, "SELECT count(*) FROM xdat_search.prearchive") == [(0,)]


def test_sync_build(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    uri_list = f"/data/prearchive/projects/prj001/{TS}/S1\r\n"  # text/uri-list lines end in CRLF
    assert sync_build(xnat, "prj001", "S1") == (200, uri_list)
    row = client.prearchive_session("prj001", TS, "S1")
    assert row is not None and row["status"] == "READY"


def test_locked_sessions_are_refused(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="_BUILDING", xnat=xnat)
    with pytest.raises(XnatRestError) as err:
        client.rebuild("prj001", TS, "S1")
    assert err.value.status == 409
    assert sync_build(xnat, "prj001", "S1")[0] == 409
    with pytest.raises(XnatRestError, match="Operation already in progress") as err:
        client.archive("prj001", TS, "S1")
    assert err.value.status == 403
    with pytest.raises(XnatRestError) as err:
        client.delete_prearchive_session("prj001", TS, "S1")
    assert err.value.status == 409
    # overrideLock=true (§4.5) lets a rebuild through
    status, _ = raw(
        xnat,
        "POST",
        "/data/services/prearchive/rebuild",
        f"src=/prearchive/projects/prj001/{TS}/S1&overrideLock=true".encode(),
    )
    assert status == 200
    assert client.wait_for_status("prj001", TS, "S1", timeout=10, poll=0.02)["status"] == "READY"


def test_sync_build_refuses_building(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="BUILDING", xnat=xnat)
    assert sync_build(xnat, "prj001", "S1") == (409, "session document locked")


def test_malformed_service_requests_are_400(xnat: XnatStandIn) -> None:
    assert raw(xnat, "POST", "/data/services/prearchive/rebuild", b"")[0] == 400
    assert raw(xnat, "POST", "/data/services/prearchive/rebuild", b"src=/prearchive/prj001/x")[0] == 400
    assert raw(xnat, "POST", "/data/services/archive", b"src=/archive/projects/prj001")[0] == 400
    assert (
        raw(xnat, "POST", f"/data/services/prearchive/rebuild?src=/prearchive/projects/zz/{TS}/S1")[0] == 404
    )
    assert raw(xnat, "GET", "/data/services/prearchive/rebuild")[0] == 405
    assert raw(xnat, "GET", "/data/nothing/here")[0] == 404
    assert raw(xnat, "POST", f"/data/prearchive/projects/prj001/{TS}/S1?action=commit")[0] == 501


# --- archive (§4.5) ----------------------------------------------------------------------------------


def test_archive_moves_the_session_and_deletes_the_row(xnat: XnatStandIn, client: XnatClient) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    uri, finished = client.archive("prj001", TS, "S1")
    assert finished
    assert uri == "/data/archive/projects/prj001/subjects/prj001_001/experiments/S1"
    target = xnat.archive / "prj001" / "arc001" / "S1"
    assert not sdir.exists() and not (sdir.parent / "S1.xml").exists()
    assert len(list((target / "SCANS" / "1" / "DICOM").glob("*.dcm"))) == 2
    assert client.prearchive_session("prj001", TS, "S1") is None
    status, body = raw(xnat, "GET", uri + "?format=json")
    assert status == 200
    fields = json.loads(body)["items"][0]["data_fields"]
    assert fields["label"] == "S1" and fields["ID"].startswith("XNAT_E")
    status, body = raw(xnat, "GET", uri + "/scans?format=json")
    assert [r["ID"] for r in json.loads(body)["ResultSet"]["Result"]] == ["1", "2"]
    status, body = raw(xnat, "GET", uri + "/scans/1/resources?format=json")
    assert json.loads(body)["ResultSet"]["Result"][0]["file_count"] == "2"
    assert (
        raw(xnat, "GET", "/data/archive/projects/prj001/subjects/prj001_001/experiments/nope?format=json")[0]
        == 404
    )


def test_archive_conflict_then_append(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1", {"1": 1})
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    client.archive("prj001", TS, "S1")
    # the same label again, e.g. a study re-sent after archiving (§5 session grouping)
    make_session(xnat, "prj001", "S1", {"3": 1})
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    with pytest.raises(XnatRestError) as err:
        client.archive("prj001", TS, "S1")
    assert err.value.status == 409 and "Session already exists" in str(err.value)
    row = client.prearchive_session("prj001", TS, "S1")
    assert row is not None and row["status"] == "CONFLICT"
    client.archive("prj001", TS, "S1", overwrite="append")
    assert sorted(xnat.experiments[("prj001", "S1")].scans) == ["1", "3"]


def test_archive_refuses_unassigned(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, None, "U1")
    insert_row(xnat.dsn, None, "U1", xnat=xnat)
    built(xnat, None, "U1")
    assert (xnat.prearchive / TS / "U1.xml").is_file()  # Unassigned has no project level (§2)
    with pytest.raises(XnatRestError, match="Cannot archive sessions from the Unassigned folder") as err:
        client.archive(None, TS, "U1")
    assert err.value.status == 400


def test_archive_refuses_unbuilt_sessions(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", status="READY", xnat=xnat)  # READY but never built: no XML
    with pytest.raises(XnatRestError) as err:
        client.archive("prj001", TS, "S1")
    assert err.value.status == 400 and "build the session first" in str(err.value)
    assert sql(xnat.dsn, "SELECT status FROM xdat_search.prearchive") == [("ERROR",)]
    insert_row(xnat.dsn, "prj001", "S2", status="RECEIVING", xnat=xnat)
    make_session(xnat, "prj001", "S2")
    with pytest.raises(XnatRestError) as err:
        client.archive("prj001", TS, "S2")
    assert err.value.status == 403


# --- delete (§4.4) -----------------------------------------------------------------------------------


def test_delete_removes_files_and_row(xnat: XnatStandIn, client: XnatClient) -> None:
    sdir = make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    built(xnat, "prj001", "S1")
    assert client.delete_prearchive_session("prj001", TS, "S1") is True
    assert not sdir.exists() and not (sdir.parent / "S1.xml").exists()
    assert sql(xnat.dsn, "SELECT count(*) FROM xdat_search.prearchive") == [(0,)]


# --- faults ------------------------------------------------------------------------------------------


def test_injected_faults_are_retried_and_recovered(xnat: XnatStandIn, client: XnatClient) -> None:
    make_session(xnat, "prj001", "S1")
    insert_row(xnat.dsn, "prj001", "S1", xnat=xnat)
    xnat.fail_next(2, 503, path_prefix="/data/services/prearchive/rebuild")
    client.rebuild("prj001", TS, "S1")
    assert [c.status for c in xnat.calls if c.path == "/data/services/prearchive/rebuild"] == [503, 503, 200]
    assert client.wait_for_status("prj001", TS, "S1", timeout=10, poll=0.02)["status"] == "READY"


def test_injected_faults_beyond_the_retries_fail_clearly(xnat: XnatStandIn, client: XnatClient) -> None:
    xnat.fail_next(10, 502, path_prefix="/data/projects")
    with pytest.raises(XnatRestError, match="HTTP 502 injected failure 502.*rerun resumes") as err:
        client.prearchive_code("prj001")
    assert err.value.status == 502
    assert len([c for c in xnat.calls if c.path.startswith("/data/projects")]) == 4  # 1 + 3 retries


def test_both_table_profiles(pg_dsn: PgDb, tmp_path: Path) -> None:
    with XnatStandIn(pg_dsn.dsn, tmp_path / "pre", tmp_path / "arc") as standin:
        make_session(standin, "prj001", "S1")
        insert_row(standin.dsn, "prj001", "S1", xnat=standin)
        with XnatClient(standin.url, ADMIN) as c:
            built(standin, "prj001", "S1")
            assert c.archive("prj001", TS, "S1")[0].endswith("/experiments/S1")
    assert standin.errors == []


def test_refuses_a_table_xnat_would_rebuild(pg_db_17: PgDb, tmp_path: Path) -> None:
    sql(pg_db_17.dsn, "ALTER TABLE xdat_search.prearchive ADD COLUMN extra VARCHAR")
    with pytest.raises(RuntimeError, match="19 columns"), XnatStandIn(pg_db_17.dsn, tmp_path, tmp_path):
        pass

"""A throwaway XNAT-like site for integration tests: prearchive and archive folders, a database
holding XNAT's table, a manifest over a generated corpus (the REST stand-in is started by fixtures)."""

from __future__ import annotations

import textwrap
from datetime import datetime
from pathlib import Path

import psycopg

from xnatmigrate.testing.corpus import CorpusSpec, build_corpus

NOW = datetime(2024, 5, 6, 7, 8, 9, 100000)
SPEC = CorpusSpec(patients=2, studies_per_patient=1, series_per_study=2, images_per_series=3, rows=16, seed=3)


class Site:
    """One isolated XNAT-like target: prearchive + archive folders, a database, REST stand-in."""

    def __init__(
        self, root: Path, dsn: str, build: str = "rest", archive: bool = False, spec: CorpusSpec = SPEC
    ) -> None:
        self.root = root
        self.dsn = dsn
        self.source = root / "legacy"
        self.prearchive = root / "prearchive"
        self.archive_dir = root / "archive"
        self.state = root / "state"
        self.prearchive.mkdir(parents=True)
        self.archive_dir.mkdir()
        self.files = build_corpus(self.source, spec)
        self.manifest = root / "manifest.yaml"
        self.build, self.archive = build, archive

    def write_manifest(self, url: str | None) -> None:
        url_line = f"  url: {url}\n" if url else ""
        self.manifest.write_text(
            textwrap.dedent(
                f"""\
                version: 1
                xnat:
                  prearchive: {self.prearchive}
                  database: {{dsn_env: XNATMIGRATE_TEST_SITE_DSN}}
                """
            )
            + url_line
            + textwrap.dedent(
                f"""\
                defaults:
                  anonymization: none   # synthetic data; the stand-in has XNAT's default: site script on
                  build: {self.build}
                  archive: {str(self.archive).lower()}
                  build_timeout: 30
                sources:
                  - source: {self.source}
                    project: prj001
                    subject: "{{{{ PatientID }}}}"
                    session: "{{{{ PatientID }}}}_{{{{ StudyDate }}}}"
                """
            )
        )

    def env(self) -> dict[str, str]:
        return {"XNATMIGRATE_TEST_SITE_DSN": self.dsn, "XNAT_USER": "admin", "XNAT_PASSWORD": "admin"}

    def tree(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.prearchive)) + ("/" if p.is_dir() else f" {p.stat().st_size}")
            for p in self.prearchive.rglob("*")
        )

    def rows(self) -> list[tuple]:
        with psycopg.connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT project, timestamp, subject, foldername, name, tag, status, url, autoarchive, "
                "prevent_anon, prevent_auto_commit, source, uploaded, scan_date FROM xdat_search.prearchive "
                "ORDER BY timestamp"
            )
            rows = cur.fetchall()
        return [tuple(str(v).replace(str(self.root), "<root>") for v in r) for r in rows]

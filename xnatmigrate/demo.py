"""``make demo``: a whole migration on an embedded default, with no server of the user's.

It generates a small DICOM corpus (with the nuisances real exports contain), starts an embedded
PostgreSQL holding XNAT's ``xdat_search.prearchive`` table, and runs the real CLI:
validate → plan → apply → status → apply again (nothing to do), then shows the prearchive tree
and the rows XNAT would now see. Everything lives under ``--dir`` and the database is stopped at
the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

from . import cli


def _say(text: str) -> None:
    print(f"\n\033[1m{text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def _run(*argv: str) -> int:
    print("$ xnatmigrate " + " ".join(argv), flush=True)
    return cli.main(list(argv))


def _tree(root: Path, limit: int = 24) -> None:
    shown = 0
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        depth = len(Path(dirpath).relative_to(root).parts)
        if shown < limit:
            print("  " * depth + Path(dirpath).name + "/")
            shown += 1
        for name in sorted(filenames)[:2]:
            if shown < limit:
                print("  " * (depth + 1) + name)
                shown += 1
        if len(filenames) > 2 and shown < limit:
            print("  " * (depth + 1) + f"… {len(filenames) - 2} more")
            shown += 1
    if shown >= limit:
        print("  …")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xnatmigrate.demo")
    ap.add_argument("--dir", default=".demo", help="working folder (emptied first)")
    ap.add_argument("--patients", type=int, default=3)
    args = ap.parse_args(argv)

    from .testing.corpus import CorpusSpec, build_corpus
    from .testing.pg import EmbeddedPostgres, create_database, install_prearchive_table

    work = Path(args.dir).resolve()
    if work.exists():
        shutil.rmtree(work)
    source, prearchive, state = work / "legacy", work / "prearchive", work / "state"
    prearchive.mkdir(parents=True)

    _say("1. A legacy DICOM export (synthetic, with a DICOMDIR, a text file, a truncated image …)")
    files = build_corpus(
        source,
        CorpusSpec(
            patients=args.patients,
            studies_per_patient=2,
            series_per_study=2,
            images_per_series=5,
            rows=64,
            seed=7,
            nuisances=True,
        ),
    )
    print(f"{len(files)} files under {source}")

    _say("2. An embedded PostgreSQL holding XNAT's xdat_search.prearchive table (profile 1.8.2)")
    with EmbeddedPostgres() as pg:
        dsn = create_database(pg.dsn, "xnat")
        install_prearchive_table(dsn, "1.8.2")
        print(f"database: {dsn}")

        # A lookup table: hospital IDs to study subject IDs, as a site's spreadsheet would hold them.
        # Every patient but the last is listed; the last one's studies are held back, naming the row missing.
        subjects = work / "subjects.csv"
        subjects.write_text(
            "mrn,subject_id\n"
            + "".join(f"PAT{p + 1:03d},SUBJ-{101 + p}\n" for p in range(max(args.patients - 1, 1)))
        )
        # De-identification as the files are staged: a DicomEdit 6 script of the kind XNAT sites use
        # (XNAT's default site script, plus removing the birth date and the institution).
        anon = work / "anon" / "site.das"
        anon.parent.mkdir()
        anon.write_text(
            'version "6.1"\n'
            "// XNAT's default site script, and two deletions\n"
            'project != "Unassigned" ? (0008,1030) := project\n'
            "(0010,0010) := subject\n"
            "(0010,0020) := session\n"
            "-(0010,0030)\n"
            "-(0008,0080)\n"
        )
        manifest = work / "manifest.yaml"
        manifest.write_text(
            textwrap.dedent(
                f"""\
                # yaml-language-server: $schema=../../schemas/manifest.schema.json
                version: 1
                xnat:
                  prearchive: {prearchive}
                  database:
                    dsn_env: XNATMIGRATE_DEMO_DSN
                lookups:
                  subjects: {{file: subjects.csv, key: mrn}}
                defaults:
                  method: prearchive
                  transfer: copy
                  build: scheduler        # XNAT's own SessionXMLRebuilder builds after ~5 minutes
                  anonymization: anon/site.das   # applied to every file as it is staged
                sources:
                  - source: {source}
                    exclude: ["**/*.txt", "**/*.png"]
                    project: demo
                    subject: "{{{{ lookups.subjects[PatientID].subject_id }}}}"
                    session: "{{{{ lookups.subjects[PatientID].subject_id }}}}_{{{{ StudyDate }}}}_{{{{ Modality }}}}"
                """
            )
        )
        os.environ["XNATMIGRATE_DEMO_DSN"] = dsn
        _say("3. The manifest, its lookup table subjects.csv and its anonymisation script anon/site.das")
        print(manifest.read_text())
        print(subjects.read_text())
        print(anon.read_text())
        steps = [
            ("4. Validate it (as CI would)", ["validate", str(manifest)]),
            (
                "5. Plan: scan headers, check, write plan.json and plan.sql",
                ["plan", str(manifest), "--state-dir", str(state)],
            ),
            ("6. Apply: stage → publish → INSERT, each step recorded", ["apply", "--state-dir", str(state)]),
            ("7. Status", ["status", "--state-dir", str(state)]),
            ("8. Apply again: a finished plan is a no-op", ["apply", "--state-dir", str(state)]),
        ]
        for title, argv_ in steps:
            _say(title)
            rc = _run(*argv_)
            if rc != 0:
                print(f"demo: step failed with exit code {rc}", file=sys.stderr)
                return rc
        _say("9. The prearchive as XNAT sees it")
        _tree(prearchive)
        import pydicom

        first = min(p for p in prearchive.rglob("*.dcm") if ".xnatmigrate-staging" not in p.parts)
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        print(
            f"\n{first.name}: PatientName={ds.get('PatientName')}, PatientID={ds.get('PatientID')}, "
            f"StudyDescription={ds.get('StudyDescription')}, PatientBirthDate "
            f"{'present' if 'PatientBirthDate' in ds else 'removed'}, InstitutionName "
            f"{'present' if 'InstitutionName' in ds else 'removed'} (the source keeps them)"
        )
        print(f"\nplan.sql: {state / 'plan.sql'} (first lines)")
        print("\n".join((state / "plan.sql").read_text().splitlines()[:12]))
        import psycopg

        with psycopg.connect(dsn) as conn, conn.cursor() as cur:  # closed when the block ends
            cur.execute(
                "SELECT project, timestamp, subject, foldername, tag, status, prevent_auto_commit "
                "FROM xdat_search.prearchive ORDER BY timestamp"
            )
            print("\nxdat_search.prearchive:")
            for row in cur.fetchall():
                print("  " + " | ".join(str(v) for v in row))
    _say(f"Done. Everything is under {work}; the embedded database has been stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Command line: parse → api → print → exit code. Nothing imports this module.

Exit codes follow Terraform's convention: 0 success (or nothing to do), 1 any error, and for
``plan --detailed-exitcode`` only, 2 = success with changes to apply.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, api
from .errors import ManifestError, XnatMigrateError
from .explain import plan_json, plan_text
from .progress import Progress

if TYPE_CHECKING:
    from .api import Observation, SessionCheck, SessionResult

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2
_MARKS = {api.Result.DONE: "+", api.Result.NOOP: "=", api.Result.FAILED: "!", api.Result.SKIPPED: "-"}


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xnatmigrate",
        description="Migrate DICOM collections into XNAT: declarative manifests, reviewable plans, "
        "resumable applies.",
    )
    p.add_argument("--version", action="version", version=f"xnatmigrate {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, state: bool = True) -> None:
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON")
        if state:
            sp.add_argument(
                "--state-dir",
                default=None,
                help=f"state directory (default: ${api.STATE_DIR_ENV} or ./.xnatmigrate)",
            )
            sp.add_argument(
                "--state-url",
                default=None,
                metavar="URL",
                help="keep the ledger and scan cache in PostgreSQL: postgresql://user@host/dbname?schema=NAME "
                f"(default: ${api.STATE_URL_ENV}; not XNAT's database; the password in PGPASSWORD or "
                "~/.pgpass); plan.json and plan.sql stay in the state directory",
            )

    v = sub.add_parser("validate", help="check manifests without touching sources, databases or XNAT")
    v.add_argument("manifests", nargs="+", metavar="FILE")
    v.add_argument("--check-sources", action="store_true", help="also check each source folder is readable")
    common(v, state=False)

    pl = sub.add_parser("plan", help="scan the sources, check everything, write plan.json and plan.sql")
    pl.add_argument("manifest", metavar="MANIFEST")
    pl.add_argument("--out", help="write the plan here instead of <state-dir>/plan.json")
    pl.add_argument("--sql", help="write the SQL here instead of <state-dir>/plan.sql")
    pl.add_argument("--jobs", type=int, default=None, help="scan processes (default: CPU count)")
    pl.add_argument("--offline", action="store_true", help="plan without the database or XNAT")
    pl.add_argument("--strict", action="store_true", help="any held-back study is an error (for CI)")
    pl.add_argument(
        "--detailed-exitcode", action="store_true", help="exit 0 nothing to do, 2 changes to apply, 1 error"
    )
    common(pl)

    ap = sub.add_parser("apply", help="carry out a saved plan (resumable, idempotent)")
    ap.add_argument(
        "plan",
        nargs="?",
        metavar="PLAN.json",
        help="default: the plan saved in the --state-url ledger, else <state-dir>/plan.json",
    )
    ap.add_argument("--jobs", type=int, default=None, help="copy workers / C-STORE associations")
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --state-url: work units this process applies at once (default 1; each with --jobs)",
    )
    ap.add_argument(
        "--path-map",
        action="append",
        metavar="FROM=TO",
        help="sources planned under FROM are under TO on this host (repeatable; default: "
        "$XNATMIGRATE_PATH_MAP, entries separated by ;)",
    )
    common(ap)

    st = sub.add_parser("status", help="per session: the last step done and what remains")
    st.add_argument(
        "--fleet",
        action="store_true",
        help="with --state-url: the plan's work units on every host (workers, rates, ETA) instead",
    )
    common(st)

    ve = sub.add_parser("verify", help="prove that what was applied is in XNAT, intact")
    ve.add_argument("--quick", action="store_true", help="compare sizes, not SHA-256")
    ve.add_argument("--junit", metavar="FILE", help="also write a JUnit XML report")
    common(ve)

    rv = sub.add_parser("revert", help="remove what this tool created and XNAT has not taken over")
    rv.add_argument("--yes", action="store_true", help="really remove (default: only show)")
    rv.add_argument("--session", action="append", default=[], help="only this session label")
    rv.add_argument("--project", action="append", default=[], help="only this project")
    rv.add_argument("--force", action="store_true", help="also sessions whose files or row changed")
    rv.add_argument("--archived", action="store_true", help="also delete archived sessions via REST")
    common(rv)

    rf = sub.add_parser("refresh", help="compare the state with XNAT now and report what changed")
    common(rf)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # A file name that is not UTF-8 is a str with lone surrogates (surrogateescape): printed as
    # "\udcff" instead of failing the print; in --json output that is the JSON escape for it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except ManifestError as exc:
        if args.debug:
            raise
        if getattr(args, "json", False):
            _print_json({"valid": False, "problems": [p.as_dict() for p in exc.problems]})
        for p in exc.problems:
            print(p.render(), file=sys.stderr)
        return EXIT_ERROR
    except XnatMigrateError as exc:
        if args.debug:
            raise
        if getattr(args, "json", False):
            _print_json({"error": str(exc), "kind": type(exc).__name__})
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


def cmd_validate(args: argparse.Namespace) -> int:
    problems = api.validate(args.manifests, check_sources=args.check_sources)
    errors = [p for p in problems if p.severity == "error"]
    if args.json:
        _print_json({"valid": not errors, "problems": [p.as_dict() for p in problems]})
    else:
        for p in problems:
            print(p.render(), file=sys.stderr if p.severity == "error" else sys.stdout)
        if not errors:
            print(f"{len(args.manifests)} manifest(s) valid")
    return EXIT_ERROR if errors else EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    bar = Progress("scanning", "files", enabled=None if not args.json else False)
    try:
        outcome = api.plan(
            args.manifest,
            state_dir=args.state_dir,
            state_url=args.state_url,
            offline=args.offline,
            jobs=args.jobs,
            out=args.out,
            sql_out=args.sql,
            progress=bar,
        )
    finally:
        bar.close()
    plan = outcome.plan
    if args.json:
        doc = plan_json(plan, str(outcome.plan_path), str(outcome.sql_path))
        doc["scan"] = {
            "files_seen": outcome.files_seen,
            "cache_hits": outcome.cache_hits,
            "seconds": round(outcome.seconds, 3),
        }
        doc["fleet_budget"] = api.fleet_budget(args.state_url)
        _print_json(doc)
    else:
        print(plan_text(plan, str(outcome.plan_path), str(outcome.sql_path)))
        budget = api.fleet_budget(args.state_url)
        if budget:
            print(f"Applied through --state-url by any number of hosts, with a budget for XNAT: {budget}.")
        print(
            f"(scanned {outcome.files_seen} file(s), {outcome.cache_hits} from cache, "
            f"in {outcome.seconds:.1f} s)",
            file=sys.stderr,
        )
    if args.strict and plan.held_back:
        print(f"error: {len(plan.held_back)} study(ies) held back and --strict is set", file=sys.stderr)
        return EXIT_ERROR
    if args.detailed_exitcode and plan.has_changes:
        return EXIT_CHANGES
    return EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    bar = Progress("applying", "files", enabled=None if not args.json else False)

    def on_session(res: SessionResult) -> None:
        if args.json:
            return
        bar.close()
        steps = ", ".join(f"{k}:{o}" for k, o in res.steps) or res.message or ""
        print(f"  {_MARKS[res.outcome]} {res.label:<40} {res.outcome:<7} {steps}")
        if res.outcome is api.Result.FAILED:
            print(f"    error: {res.message}", file=sys.stderr)

    try:
        report = api.apply(
            args.plan,
            state_dir=args.state_dir,
            state_url=args.state_url,
            jobs=args.jobs,
            progress=bar if bar.enabled else None,  # none to show: apply need not count the plan's files
            status=bar.note if bar.enabled else None,
            on_session=on_session,
            path_map=args.path_map,
            workers=args.workers,
        )
    finally:
        bar.close()
    counts = {k.value: sum(1 for s in report.sessions if s.outcome is k) for k in api.Result}
    # What this run moved (a resumed session counts only the files it still had to copy or send).
    files = sum(s.files for s in report.sessions)
    size = sum(s.bytes for s in report.sessions)
    if args.json:
        _print_json(
            {
                "plan_id": report.plan_id,
                "summary": {
                    **counts,
                    "files": files,
                    "bytes": size,
                    "seconds": round(report.seconds, 3),
                    "xnat_seconds": round(report.xnat_seconds, 3),
                },
                "stopped": report.stopped,
                "fleet": dataclasses.asdict(report.fleet) if report.fleet else None,
                "sessions": [
                    {
                        "action_id": s.action_id,
                        "session": s.label,
                        "outcome": s.outcome,
                        "steps": [{"step": k, "outcome": o} for k, o in s.steps],
                        "message": s.message,
                    }
                    for s in report.sessions
                ],
            }
        )
    else:
        if not (counts[api.Result.DONE] or counts[api.Result.FAILED] or counts[api.Result.SKIPPED]):
            print(
                f"Nothing to do: all {len(report.sessions)} session(s) of plan {report.plan_id[:12]} are applied."
            )
        else:
            rate = size / report.seconds / 1e6 if report.seconds > 0 else 0.0
            print(
                f"Apply: {counts[api.Result.DONE]} session(s) changed, {counts[api.Result.NOOP]} already done, "
                f"{counts[api.Result.FAILED]} failed, {counts[api.Result.SKIPPED]} not attempted; "
                f"{files} file(s), {size / 1e6:.1f} MB in {report.seconds:.1f} s ({rate:.1f} MB/s)"
                + (f", {report.xnat_seconds:.1f} s of it waiting on XNAT." if report.xnat_seconds else ".")
            )
    fleet = report.fleet
    unfinished = fleet is not None and fleet.applied < fleet.sessions
    if fleet and not args.json:
        print(
            f"Fleet: {fleet.units_run_here} of {fleet.units} unit(s) applied by this process "
            f"({', '.join(fleet.hosts) or 'no host yet'}); {fleet.applied} of {fleet.sessions} session(s) "
            "of the plan applied."
        )
        print(f"Budget for XNAT: {fleet.budget}.")
    if report.stopped:
        print(f"error: stopped: {report.stopped}", file=sys.stderr)
    if unfinished and not (report.failures or report.stopped):
        assert fleet is not None
        print(
            f"error: {fleet.sessions - fleet.applied} session(s) of the plan are not applied (failed on "
            "this or another host): `xnatmigrate status` names each",
            file=sys.stderr,
        )
    if report.failures or report.stopped or unfinished:
        print(
            "Fix the cause and run `xnatmigrate apply` again: it resumes where it stopped.", file=sys.stderr
        )
        return EXIT_ERROR
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if args.fleet:
        return _fleet_status(args)
    rows = api.status(args.state_dir, state_url=args.state_url)
    if args.json:
        _print_json([r.__dict__ for r in rows])
        return EXIT_OK
    if not rows:
        print("No sessions applied yet.")
        return EXIT_OK
    for r in rows:
        left = ", ".join(r.remaining) if r.remaining else "nothing"
        last = f"{r.last_step}:{r.last_outcome}" if r.last_step else "-"
        seen = f" (XNAT: {r.observed.get('state')})" if r.observed else ""
        print(
            f"{r.project or 'Unassigned'}/{r.session:<28} {r.method:<10} {r.status:<9} last {last:<16} remaining {left}{seen}"
        )
    return EXIT_OK


def _fleet_status(args: argparse.Namespace) -> int:
    fs = api.fleet_status(args.state_dir, state_url=args.state_url)
    if args.json:
        _print_json(dataclasses.asdict(fs) if fs else None)
        return EXIT_OK
    if fs is None:
        print("No fleet: the plan was not applied through a --state-url ledger (or not yet).")
        return EXIT_OK
    states = ", ".join(f"{n} {k}" for k, n in sorted(fs.units.items())) or "none queued"
    eta = f"{fs.eta_s:.0f} s" if fs.eta_s is not None else "unknown"
    print(
        f"Plan {fs.plan_id[:12]}, round {fs.round}: units {states}; {fs.files_done} of {fs.files} file(s) "
        f"done at {fs.files_per_s:.1f} files/s, ETA {eta}; {fs.xnat_share:.0%} of the time in units waiting on XNAT"
    )
    if fs.budget:
        print(f"Budget for XNAT: {fs.budget}.")
    states = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(fs.sessions_by_state.items()))
    planned = f"{fs.sessions} planned; " if fs.sessions is not None else ""
    print(f"Sessions: {planned}{states or 'none started'}.")
    if fs.builds_slowdown is not None:
        print(f"Builds: {fs.builds_slowdown:.1f}× as long as the plan's first ones.")
    if fs.errors:
        print("Errors by cause:")
        for e in fs.errors:
            more = ", …" if e.sessions > len(e.labels) else ""
            print(f"  {e.sessions} session(s): {e.cause} ({', '.join(e.labels)}{more}); e.g. {e.example}")
    for w in fs.workers:
        running = ", ".join(map(str, w.running)) or "none"
        print(
            f"  {w.host} pid {w.pid}: {w.units_done} unit(s), {w.files_done} file(s), {w.files_per_s:.1f} files/s; "
            f"running unit(s) {running}; last seen {w.last_seen or '-'}"
        )
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    def line(res: SessionCheck) -> None:
        if args.json:
            return
        for p in res.problems:
            print(f"FAIL {p.session}: {p.check}: {p.message}")
        if not res.problems:
            print(
                f"ok   {res.label} ({res.checks} check(s))"
                + (f"; not checked: {'; '.join(res.skipped)}" if res.skipped else "")
            )

    report = api.verify(args.state_dir, quick=args.quick, on_session=line, state_url=args.state_url)
    if args.junit:
        api.atomic_write(Path(args.junit), api.junit_xml(report))
    if args.json:
        _print_json(
            {
                "ok": report.ok,
                "sessions": [
                    {
                        "session": s.label,
                        "method": s.method,
                        "checks": s.checks,
                        "problems": [p.__dict__ for p in s.problems],
                        "not_checked": s.skipped,
                    }
                    for s in report.sessions
                ],
            }
        )
    else:
        bad = sum(1 for s in report.sessions if s.problems)
        unapplied = sum(1 for p in report.problems if p.check is api.Check.NOT_APPLIED)
        print(
            f"Verify: {len(report.sessions) - bad} of {len(report.sessions)} session(s) hold; "
            f"{len(report.problems)} problem(s)"
            + (f", {unapplied} session(s) not applied." if unapplied else ".")
        )
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_revert(args: argparse.Namespace) -> int:
    def confirm(what: str) -> bool:
        if not sys.stdin.isatty():
            return False
        answer = input(f"Type the session {what} to delete it from XNAT's archive: ")
        return answer.strip() == what

    report = api.revert(
        args.state_dir,
        state_url=args.state_url,
        yes=args.yes,
        sessions=args.session,
        projects=args.project,
        force=args.force,
        archived=args.archived,
        confirm=None if args.yes else confirm,
    )
    if args.json:
        _print_json({"dry_run": report.dry_run, "items": [i.__dict__ for i in report.items]})
    else:
        for i in report.items:
            print(f"  {i.outcome:<12} {i.label:<40} {i.reason}")
        if report.dry_run and any(i.outcome is api.RevertOutcome.WOULD_REMOVE for i in report.items):
            print(
                "Nothing was removed. Run `xnatmigrate revert --yes` to remove the sessions marked would-remove."
            )
        elif not report.items:
            print("Nothing to revert.")
    for i in report.refused:
        print(f"refused: {i.label}: {i.reason}", file=sys.stderr)
    return EXIT_ERROR if report.refused else EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    def line(o: Observation) -> None:
        if not args.json:
            print(f"  {o.state:<9} {o.label:<40} {o.detail}")

    observations = api.refresh(args.state_dir, on_session=line, state_url=args.state_url)
    if args.json:
        _print_json([{"action_id": o.action_id, "session": o.label, **o.as_dict()} for o in observations])
    elif not observations:
        print("No applied sessions to refresh.")
    return EXIT_OK


_COMMANDS = {
    "validate": cmd_validate,
    "plan": cmd_plan,
    "apply": cmd_apply,
    "status": cmd_status,
    "verify": cmd_verify,
    "revert": cmd_revert,
    "refresh": cmd_refresh,
}


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())

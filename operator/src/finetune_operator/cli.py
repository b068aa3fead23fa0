"""``finetune``: the user's command line (validate manifests; more commands join as they land)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune_operator.validation import DocumentReport, validate_text


def _read(source: str) -> str:
    return sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when every FinetuneJob in every file is valid, 1 otherwise (listing every error)."""
    reports: list[DocumentReport] = []
    for source in args.files:
        try:
            reports += validate_text(_read(source), source)
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or str(error)
            print(f"{source}: cannot read: {reason}")
            reports.append(DocumentReport(source, 0, skipped="unreadable"))
    checked = [r for r in reports if r.skipped is None]
    invalid = [r for r in checked if r.issues]
    for report in reports:
        if report.skipped == "unreadable":
            continue
        if report.skipped:
            print(f"{report.label}: skipped, {report.skipped}")
        elif report.issues:
            count = len(report.issues)
            print(f"{report.label}: {count} error{'s' if count > 1 else ''}")
            for issue in report.issues:
                print(f"  {issue}")
        else:
            print(f"{report.label}: valid")
    unreadable = [r for r in reports if r.skipped == "unreadable"]
    print(
        f"{len(checked)} FinetuneJob(s) checked: {len(checked) - len(invalid)} valid, {len(invalid)} invalid"
    )
    return 1 if invalid or unreadable or not checked else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune", description="Fine-tune LLMs from one FinetuneJob manifest."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser(
        "validate", help="check FinetuneJob manifests with the rules the cluster enforces"
    )
    validate.add_argument(
        "files", nargs="+", metavar="FILE", help="YAML files (multi-document allowed); - for stdin"
    )
    validate.set_defaults(handler=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, without a traceback at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

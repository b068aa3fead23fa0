"""``finetune``: the user's command line: validate and render manifests, run them here, a demo."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.spec import FinetuneJob
from finetune_operator.api.validation import (
    MAX_FILE_BYTES,
    DocumentReport,
    generated_name,
    validate_bytes,
)
from finetune_operator.controller.manifests import (
    DEFAULT_TRAINER_IMAGE,
    UNASSIGNED_UID,
    WorkerSettings,
    build_gang,
)


def _read(source: str) -> bytes:
    """The file's bytes, at most one more than validate reads (so that /dev/zero is no hang)."""
    if source == "-":
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None:  # a text stream (tests replace stdin)
            return sys.stdin.read(MAX_FILE_BYTES + 1).encode("utf-8", "surrogateescape")
        return stream.read(MAX_FILE_BYTES + 1)
    with Path(source).open("rb") as file:
        return file.read(MAX_FILE_BYTES + 1)


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when every FinetuneJob in every file is valid, 1 otherwise (listing every error)."""
    reports: list[DocumentReport] = []
    for source in args.files:
        try:
            reports += validate_bytes(_read(source), source)
        except OSError as error:
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


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line strings (the trainer's JSON configuration) as literal blocks, readable in diffs."""


_ReadableDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar(
        "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None
    ),
)


def cmd_render(args: argparse.Namespace) -> int:
    """Prints the objects the operator would create for each FinetuneJob, as multi-document YAML."""
    documents: list[dict[str, Any]] = []
    notes: list[str] = []
    for source in args.files:
        jobs = _jobs_in(source)
        if jobs is None:
            return 1
        for job in jobs:
            if not job.metadata.namespace:
                job.metadata.namespace = args.namespace
            name = generated_name(job)
            if name is not None:
                # As the API server does before the operator sees the job; another apply, another name.
                notes.append(
                    f"# metadata.generateName {job.metadata.generate_name!r}: the API server names the job "
                    f"{job.metadata.generate_name}<5 random characters>; rendered here as {name!r}\n"
                )
            settings = WorkerSettings(default_image=args.default_image)
            documents += build_gang(job, UNASSIGNED_UID, attempt=0, settings=settings)
    sys.stdout.write("".join(notes))
    sys.stdout.write(yaml.dump_all(documents, Dumper=_ReadableDumper, sort_keys=False, width=100))
    return 0


def _jobs_in(source: str) -> list[FinetuneJob] | None:
    """The valid FinetuneJobs of a file, or None after printing every problem (as validate does)."""
    try:
        data = _read(source)
    except OSError as error:
        print(f"{source}: cannot read: {getattr(error, 'strerror', None) or error}", file=sys.stderr)
        return None
    reports = validate_bytes(data, source)
    invalid = [r for r in reports if r.issues]
    for report in invalid:
        print(f"{report.label}: {len(report.issues)} error(s)", file=sys.stderr)
        for issue in report.issues:
            print(f"  {issue}", file=sys.stderr)
    if invalid:
        return None
    # The jobs as validate parsed them (one reading, with its limits), not a second, laxer load.
    return [report.job for report in reports if report.job is not None]


def cmd_run(args: argparse.Namespace) -> int:
    """Runs one FinetuneJob on this machine; exits with the trainer's code, or 128 + the signal that
    stopped it (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) after the ranks saved a checkpoint."""
    from finetune_operator.local.run import LocalRunError, run_local

    jobs = _jobs_in(args.file)
    if jobs is None:
        return 1
    chosen = [job for job in jobs if args.name in (None, job.metadata.name)]
    if len(chosen) != 1:
        names = ", ".join(str(job.metadata.name) for job in jobs) or "none"
        print(f"{args.file}: pick one FinetuneJob with --name (found: {names})", file=sys.stderr)
        return 1
    name = generated_name(chosen[0])  # as the API server would name it
    if name is not None:
        print(f"note: metadata.generateName {chosen[0].metadata.generate_name!r}: running as {name!r}")
    store = args.store
    if args.embedded_s3 is not None:
        print(
            "finetune run: --embedded-s3 is deprecated and goes in the next release; use --store DIR "
            "(the same folder layout, without a server)",
            file=sys.stderr,
        )
        store = args.embedded_s3
    try:
        code, _ = run_local(chosen[0], store)
    except LocalRunError as error:
        print(f"finetune run: {error}", file=sys.stderr)
        return 1
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    """A 2-rank LoRA fine-tune of SmolLM2-135M-Instruct on this machine, scored before and after."""
    from finetune_operator.local.demo import run_demo

    return run_demo(args.dir)


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
    render = commands.add_parser(
        "render", help="print the Kubernetes objects the operator would create (for review and GitOps diffs)"
    )
    render.add_argument("files", nargs="+", metavar="FILE", help="YAML files with FinetuneJobs; - for stdin")
    render.add_argument("--namespace", default="default", help="namespace for jobs that name none")
    render.add_argument(
        "--default-image", default=DEFAULT_TRAINER_IMAGE, help="the operator's default trainer image"
    )
    render.set_defaults(handler=cmd_render)
    run = commands.add_parser("run", help="run a FinetuneJob on this machine (local GPUs, or CPU processes)")
    run.add_argument("file", metavar="FILE", help="YAML file with the FinetuneJob")
    run.add_argument("--name", help="which FinetuneJob of the file, when it holds several")
    stores = run.add_mutually_exclusive_group()
    stores.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="use the folder DIR as the store: s3://bucket/key is DIR/bucket/key; outputs land there too",
    )
    stores.add_argument("--embedded-s3", type=Path, metavar="DIR", help="deprecated: the same as --store DIR")
    run.set_defaults(handler=cmd_run)
    demo = commands.add_parser(
        "demo", help="LoRA fine-tune a real 135M chat model on this machine, scored before and after"
    )
    demo.add_argument("--dir", type=Path, default=Path("finetune-demo"), help="where the demo's files go")
    demo.set_defaults(handler=cmd_demo)
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

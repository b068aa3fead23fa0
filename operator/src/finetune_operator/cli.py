"""``finetune``: the user's command line: validate and render manifests, run them here, a demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from finetune_operator.api.memory_fit import (
    DEFAULT_GPU_MEMORY,
    MODEL_CONFIG_ANNOTATION,
    FitReport,
    ModelConfigError,
    ModelShape,
    Plan,
    annotation_value,
    check_fit,
    gib,
    gpu_memory_for,
    parse_memory,
)
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
    misfits = 0
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
            if args.fit and report.job is not None:
                lines, fits = fit_lines(report.job, args.store, args.gpu_memory)
                print("\n".join(f"  {line}" for line in lines))
                misfits += not fits
    unreadable = [r for r in reports if r.skipped == "unreadable"]
    print(
        f"{len(checked)} FinetuneJob(s) checked: {len(checked) - len(invalid)} valid, {len(invalid)} invalid"
        + (f", {misfits} clearly too big for their GPUs" if args.fit else "")
    )
    return 1 if invalid or unreadable or not checked or misfits else 0


# The most of a config.json read (real ones are a few KiB).
MAX_CONFIG_BYTES = 1024 * 1024


def read_model_config(job: FinetuneJob, store: Path | None) -> tuple[dict[str, Any] | None, str]:
    """(the model's config.json, where it was read) or (None, why it could not be read, in one line).

    With ``store`` the folder DIR/bucket/key is s3://bucket/key (as ``finetune run --store``); otherwise
    S3 through boto3's default credential chain and the spec's endpoint and region, with short timeouts:
    an unreachable store is a line of output, not a hang."""
    uri = job.spec.model.uri.rstrip("/") + "/config.json"
    try:
        if store is not None:
            from finetune_operator.local.run import local_path

            path = local_path(uri, store)
            with path.open("rb") as file:
                data = file.read(MAX_CONFIG_BYTES + 1)
            where = str(path)
        else:
            data, where = _read_s3(job, uri), uri
    except OSError as error:
        return None, f"cannot read {uri}: {getattr(error, 'strerror', None) or error}"
    except Exception as error:  # boto3's and botocore's errors: any of them is "unreachable" here
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return None, f"cannot read {uri}: {reason}"
    if len(data) > MAX_CONFIG_BYTES:
        return None, f"{where}: larger than {MAX_CONFIG_BYTES} bytes, not a config.json"
    try:
        config = json.loads(data)
    except ValueError as error:
        return None, f"{where}: not JSON ({error})"
    if not isinstance(config, dict):
        return None, f"{where}: expected a JSON object, got {type(config).__name__}"
    return config, where


def _read_s3(job: FinetuneJob, uri: str) -> bytes:
    import boto3
    from botocore.config import Config
    from finetune_trainer.storage import parse_s3_uri

    storage = job.spec.storage
    client = boto3.client(
        "s3",
        endpoint_url=storage.endpoint or None,
        region_name=storage.region or None,
        config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2, "mode": "standard"}),
    )
    bucket, key = parse_s3_uri(uri)
    body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_CONFIG_BYTES}")["Body"]
    return body.read(MAX_CONFIG_BYTES + 1)


def fit_lines(job: FinetuneJob, store: Path | None, gpu_memory: int | None) -> tuple[list[str], bool]:
    """What --fit prints for one job, and False when it clearly does not fit (above 100 %)."""
    config, where = read_model_config(job, store)
    lines: list[str] = []
    shape: ModelShape | None = None
    if config is not None:
        try:
            shape = ModelShape.from_config(config, where)
        except ModelConfigError as error:
            lines.append(f"memory fit: unknown: {error}")
    else:
        lines.append(f"memory fit: {where}")
    declared = job.metadata.annotations.get(MODEL_CONFIG_ANNOTATION)
    if shape is None and declared is not None:
        try:
            shape = ModelShape.from_config(json.loads(declared), f"annotation {MODEL_CONFIG_ANNOTATION}")
        except (ValueError, ModelConfigError) as error:
            lines.append(f"memory fit: unknown: {error}")
            return lines, True
        lines.append(f"memory fit: using the model shape of annotation {MODEL_CONFIG_ANNOTATION}")
    if shape is None:
        lines.append("memory fit: unknown (no model shape); the job was not checked")
        return lines, True
    if job.spec.resources.gpus_per_node == 0:
        lines.append("memory fit: not applicable: spec.resources.gpusPerNode 0 trains on CPUs")
        return lines, True
    if gpu_memory is not None:
        memory, origin = gpu_memory, f"{gib(gpu_memory)}, from --gpu-memory"
    else:
        found, origin = gpu_memory_for(job, None)
        memory = found if found is not None else DEFAULT_GPU_MEMORY
        if found is None:
            origin = f"{gib(DEFAULT_GPU_MEMORY)}, the default (an 80 GB A100/H100; set --gpu-memory)"
    report = check_fit(shape, Plan.from_job(job), memory)
    lines += _report_lines(report, shape, origin)
    if config is not None:
        value = annotation_value(config)
        if declared is None:
            lines.append(
                f"  for the operator's MemoryFit check, annotate the job: "
                f"{MODEL_CONFIG_ANNOTATION}: '{value}'"
            )
        elif _shape_or_none(declared) != shape:
            lines.append(
                f"  warning: annotation {MODEL_CONFIG_ANNOTATION} does not match {where}; set it to '{value}'"
            )
    return lines, report.fits


def _shape_or_none(text: str) -> ModelShape | None:
    try:
        return ModelShape.from_config(json.loads(text))
    except (ValueError, ModelConfigError):
        return None


def _report_lines(report: FitReport, shape: ModelShape, origin: str) -> list[str]:
    e = report.estimate
    lines = [
        f"memory fit: {shape.parameters / 1e9:.2f}B parameters, "
        f"{e.trainable_parameters / 1e6:.1f}M trainable, "
        f"{e.world_size} GPU(s); per GPU:"
    ]
    lines += [f"  {name:<12}{gib(size):>12}" for name, size in e.terms()]
    lines.append(f"  {'total':<12}{gib(e.total):>12}   GPU memory: {origin}")
    if e.ignored_targets:
        lines.append(
            f"  LoRA targets not counted (no projection of a Llama block): {', '.join(e.ignored_targets)}"
        )
    share = f"{100 * e.total / report.gpu_memory:.0f} %"
    if report.verdict == "fits":
        lines.append(f"  fits ({share} of the GPU)")
    elif report.verdict == "tight":
        lines.append(f"  tight ({share} of the GPU): it may run out of memory")
    else:
        lines.append(f"  does not fit ({share} of the GPU)")
        for alternative in report.alternatives:
            verdict = "would fit" if alternative.fits else "not enough"
            lines.append(f"    {verdict}: {alternative.change}: {gib(alternative.total)}")
    return lines


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
            lines, _ = fit_lines(job, args.store, args.gpu_memory)
            notes.append(f"# {job.metadata.name or name}:\n" + "".join(f"# {line}\n" for line in lines))
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


def _gpu_memory(text: str) -> int:
    try:
        return parse_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu-memory",
        type=_gpu_memory,
        metavar="SIZE",
        help="memory of one GPU, e.g. 80GiB, 40GB or 81559MiB; default: the job's nodeSelector on "
        "nvidia.com/gpu.memory, else 80GiB (an A100/H100 80GB)",
    )
    parser.add_argument(
        "--store",
        type=Path,
        metavar="DIR",
        help="read the model's config.json from the folder DIR (s3://bucket/key is DIR/bucket/key) "
        "instead of S3",
    )


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
    validate.add_argument(
        "--fit",
        action="store_true",
        help="also estimate GPU memory per rank from the model's config.json; exit 1 when a job clearly "
        "does not fit",
    )
    _fit_arguments(validate)
    validate.set_defaults(handler=cmd_validate)
    render = commands.add_parser(
        "render", help="print the Kubernetes objects the operator would create (for review and GitOps diffs)"
    )
    render.add_argument("files", nargs="+", metavar="FILE", help="YAML files with FinetuneJobs; - for stdin")
    render.add_argument("--namespace", default="default", help="namespace for jobs that name none")
    render.add_argument(
        "--default-image", default=DEFAULT_TRAINER_IMAGE, help="the operator's default trainer image"
    )
    _fit_arguments(render)
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

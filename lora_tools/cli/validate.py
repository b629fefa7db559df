"""``loratool validate PATH... [--base BASE] [--profile NAME[:VERSION],...] [--max-lora-rank N]
[--target-modules NAMES] [--select IDS] [--ignore IDS] [--fail-on LEVEL]
[--output-format text|json|github|sarif | --json] [--exit-zero]``."""

from __future__ import annotations

from typing import Any

import click

from lora_tools.cli._common import console, print_json
from lora_tools.cli.options import blas_threads, progress_bar, quiet_option

_EPILOG = """\b
Rules: docs/rules.md (LT0xx file integrity, LT1xx structure, LT2xx values,
LT3xx config and metadata, LT4xx base, LT5xx deployment profiles).
--ignore LT2 reads headers only.
Defaults may live in pyproject.toml under [tool.loratool.validate]
(select, ignore, fail-on, output-format).
Exit codes: 0 clean, 1 findings at or above --fail-on, 2 usage, 3 could not
run (e.g. BASE unreadable), 130 interrupted."""


@click.command("validate", epilog=_EPILOG)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option(
    "--base",
    metavar="BASE",
    help="Base checkpoint (file, HF folder, sharded, diffusers folder or Hub id): every module "
    "must resolve to exactly one base weight.",
)
@click.option(
    "--profile",
    "profiles",
    multiple=True,
    metavar="NAME[:VERSION]",
    help="Check that a consumer loads the adapter and applies it as trained: vllm, sglang, tgi, "
    "llamacpp, diffusers, comfyui, peft (LT5xx rules). Comma-separated or repeated; VERSION "
    "defaults to the newest checked (vllm:0.30).",
)
@click.option(
    "--max-lora-rank",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="The server's --max-lora-rank (with --profile; vLLM's default is 16).",
)
@click.option(
    "--target-modules",
    "target_modules",
    multiple=True,
    metavar="NAMES",
    help="The server's --lora-target-modules, e.g. q_proj,v_proj (with --profile; default: "
    "no restriction).",
)
@click.option(
    "--select",
    "select",
    multiple=True,
    metavar="IDS",
    help="Rules to run: codes (LT012), prefixes (LT2), names (truncated) or ALL; comma-separated "
    "or repeated. Default: ALL.",
)
@click.option(
    "--ignore", "ignore", multiple=True, metavar="IDS", help="Rules to leave out (same spelling)."
)
@click.option(
    "--fail-on",
    type=click.Choice(["error", "warning"]),
    default=None,
    help="Lowest severity that makes the exit code 1. Default: error.",
)
@click.option(
    "--output-format",
    type=click.Choice(["text", "json", "github", "sarif"]),
    default=None,
    help="text (grouped by file), json (docs/json.md), github (workflow annotations) or sarif "
    "(2.1.0, for code scanning). Default: text.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document: the same as --output-format json.",
)
@click.option("--exit-zero", is_flag=True, help="Exit 0 even when there are findings.")
@quiet_option
@click.pass_context
def command(
    ctx: click.Context,
    paths: tuple[str, ...],
    base: str | None,
    profiles: tuple[str, ...],
    max_lora_rank: int | None,
    target_modules: tuple[str, ...],
    select: tuple[str, ...],
    ignore: tuple[str, ...],
    fail_on: str | None,
    output_format: str | None,
    as_json: bool,
    exit_zero: bool,
    quiet: bool,
) -> None:
    """Check adapter files and folders: file integrity, structure, values, config and metadata,
    and (with --base) that every module fits the base model. A llama.cpp LoRA GGUF is checked
    against what llama.cpp's loader refuses (needs the gguf extra).

    \b
    Example:
      loratool validate adapters/ --fail-on warning
      loratool validate my-lora/ --base meta-llama/Llama-3.1-8B --output-format github
      loratool validate my-lora/ --profile vllm,sglang --max-lora-rank 32
    """
    blas_threads()
    from lora_tools.errors import UsageError
    from lora_tools.ops.validate import (
        load_settings,
        to_github,
        to_json,
        to_sarif,
        validate,
    )

    if as_json and output_format not in (None, "json"):
        raise UsageError(f"--json asks for json output, --output-format for {output_format}")
    settings = load_settings()
    output_format = "json" if as_json else output_format
    fail_on = fail_on or settings.fail_on
    output_format = output_format or settings.output_format
    with progress_bar("validate", quiet, unit="bytes") as progress:
        report = validate(
            paths,
            base=base,
            select=list(select) or list(settings.select) or None,
            ignore=list(ignore) or list(settings.ignore) or None,
            progress=progress,
            profiles=list(profiles) or None,
            max_lora_rank=max_lora_rank,
            target_modules=list(target_modules) or None,
        )
    if output_format == "json":
        print_json(to_json(report, fail_on))
    elif output_format == "sarif":
        print_json(to_sarif(report))
    elif output_format == "github":
        for line in to_github(report):
            click.echo(line)
    else:
        render(report, fail_on)
    failed = report.failed(fail_on) and not exit_zero
    ctx.exit(1 if failed else 0)


_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def render(report: Any, fail_on: str) -> None:
    """Findings grouped by file, then a one-line summary."""
    from rich.markup import escape as escape_markup

    from lora_tools.errors import printable

    def escape(text: str) -> str:  # file and tensor names: no markup, no control characters
        return escape_markup(printable(text))

    out = console(soft_wrap=True)
    for fr in report.files:
        if not fr.findings:
            continue
        fmt = f" [dim]({fr.format})[/dim]" if fr.format else ""
        out.print(f"[bold]{escape(fr.path)}[/bold]{fmt}")
        for f in fr.findings:
            where = f"[dim]{escape(f.path)}:[/dim] " if f.path != fr.path else ""
            hint = f" [dim](hint: {escape(f.hint)})[/dim]" if f.hint else ""
            out.print(
                f"  [{_STYLE[f.severity]}]{f.severity:<7}[/] {f.rule.code} "
                f"[dim]{f.rule.name}[/dim]  {where}{escape(f.message)}{hint}"
            )
        out.print()
    counts = report.counts()
    total = sum(counts.values())
    files_with = sum(1 for fr in report.files if fr.findings)
    if not total:
        out.print(f"[green]All checks passed[/green]: {len(report.files)} adapter(s), no findings.")
        return
    parts = ", ".join(f"{n} {sev}{'s' if n != 1 else ''}" for sev, n in counts.items() if n)
    verdict = "[red]failed[/red]" if report.failed(fail_on) else "[green]passed[/green]"
    out.print(
        f"{parts} in {files_with} of {len(report.files)} adapter(s); {verdict} "
        f"(--fail-on {fail_on})"
    )

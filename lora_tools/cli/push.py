"""``loratool push REPO_ID PATH [--private] [--revision B] [--create-pr] [--commit-message M]
[--dry-run] [--no-validate] [--base-model ID] [--token T] [--json]``."""

from __future__ import annotations

import os

import click

from lora_tools.cli._common import (
    column_room,
    command_hints,
    console,
    error_line,
    fit_names,
    print_json,
)
from lora_tools.cli.options import json_option, quiet_option


@click.command("push")
@click.argument("repo_id")
@click.argument("path")
@click.option(
    "--private", is_flag=True, help="Create the repo private (only if it is created now)."
)
@click.option("--revision", metavar="BRANCH", help="Commit to this branch (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option(
    "--commit-message",
    "-m",
    "--message",
    "message",
    metavar="M",
    help="Commit title (as hf upload spells it; -m/--message: old spelling, still accepted).",
)
@click.option("--dry-run", is_flag=True, help="Print files, sizes and the card; no network.")
@click.option("--no-validate", is_flag=True, help="Skip `loratool validate` on an adapter.")
@click.option(
    "--base-model",
    metavar="USER/NAME",
    help="The base's Hub id for the card, when the files record a local path or nothing.",
)
@click.option(
    "--token",
    metavar="T",
    help="Hub token (default: HF_TOKEN or the stored `hf auth login`). Never printed.",
)
@json_option
@quiet_option
@command_hints(
    {
        "hub-auth": "log in with `hf auth login`, set HF_TOKEN, or pass --token",
        "hub-repo-not-found": "check the repo id, and that the token (--token, HF_TOKEN or "
        "`hf auth login`) can see it",
        "hub-revision-not-found": "check --revision",
    }
)
def command(
    repo_id: str,
    path: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    message: str | None,
    dry_run: bool,
    no_validate: bool,
    base_model: str | None,
    token: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Publish an adapter (file or folder) or a merged model folder to the Hub in one commit.

    Validates an adapter first and refuses one with errors. Writes or updates README.md: base
    model, relation, library, tags and license in the front matter, and a summary of the files;
    an existing card's text is kept. Prints the commit URL (or the pull request's).

    REPO_ID comes first, as in `hf upload REPO_ID LOCAL_PATH`; the old order PATH REPO_ID is
    still accepted when exactly one of the two is a local file or folder.

    \b
    Example:
      loratool push me/llama-lora out/llama-lora --base-model meta-llama/Llama-3.2-1B
      loratool push me/llama-merged merged/ --private --create-pr
      loratool push me/style adapter.safetensors --dry-run
    """
    from lora_tools.ops.push import default_validator, plan_push, publish

    repo_id, path = repo_and_path(repo_id, path)

    plan = plan_push(
        path,
        repo_id,
        base_model=base_model,
        validator=None if no_validate else default_validator,
    )
    if dry_run:
        if as_json:
            print_json(plan.to_json())
            return
        _render_plan(plan)
        for note in plan.notes:
            error_line(note, "note")
        return
    for note in plan.notes:
        error_line(note, "note")
    result = publish(
        plan,
        private=private,
        revision=revision,
        create_pr=create_pr,
        message=message,
        token=token,
    )
    for note in result.notes:
        error_line(note, "note")
    if as_json:
        print_json(result.to_json())
    else:
        click.echo(result.url)


def repo_and_path(first: str, second: str) -> tuple[str, str]:
    """``(repo_id, path)`` from the two arguments: ``REPO_ID PATH``, or the old ``PATH REPO_ID``
    when only the first one is on the disk.

    Raises:
        UsageError: both or neither exist locally, so the order cannot be told.
    """
    from lora_tools.errors import UsageError

    here = [os.path.lexists(first), os.path.lexists(second)]
    if here == [False, True]:
        return first, second
    if here == [True, False]:
        return second, first
    if not any(here):
        from lora_tools.io.hub import repo_id_problem

        readable = [repo_id_problem(first) is None, repo_id_problem(second) is None]
        if readable != [False, False] and readable != [True, True]:
            # only one reading has a valid repo id: the other argument is the missing path
            missing = second if readable[0] else first
            raise UsageError(
                f"{missing}: no such file or folder to push",
                hint="give REPO_ID first and an existing PATH second",
            )
    found = "both exist" if all(here) else "neither exists"
    raise UsageError(
        f"cannot tell the repo from the local path: {found} on the disk "
        f"(REPO_ID PATH reads repo {first!r}, path {second!r}; the old order reads repo "
        f"{second!r}, path {first!r})",
        hint="give REPO_ID first and an existing PATH second",
    )


def _render_plan(plan) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lora_tools.errors import printable
    from lora_tools.ops.inspect import human_size

    out = console()
    sizes = [human_size(f.size) for f in plan.files]
    total = human_size(sum(f.size for f in plan.files))
    names = fit_names(
        [printable(f.path_in_repo) for f in plan.files],
        column_room(out.width, ("size",), [[s] for s in [*sizes, total]]),
    )
    where = printable(str(plan.path))
    out.print(f"would push {plan.kind} {where} to {plan.repo_id} (one commit):", markup=False)
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in zip(names, sizes, strict=True):
        table.add_row(escape(name), size)
    table.add_row("total", total, style="bold")
    out.print(table)
    out.print()
    out.print("README.md:", style="bold")
    click.echo(plan.card)

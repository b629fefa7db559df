"""``loratool push PATH REPO_ID [--private] [--revision B] [--create-pr] [--message M]
[--dry-run] [--no-validate] [--base-model ID] [--token T] [--json]``."""

from __future__ import annotations

import click

from lora_tools.cli._common import command_hints, console, error_line, print_json


@click.command("push")
@click.argument("path")
@click.argument("repo_id")
@click.option(
    "--private", is_flag=True, help="Create the repo private (only if it is created now)."
)
@click.option("--revision", metavar="BRANCH", help="Commit to this branch (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--message", "-m", metavar="M", help="Commit title.")
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@command_hints(
    {
        "hub-auth": "log in with `hf auth login`, set HF_TOKEN, or pass --token",
        "hub-repo-not-found": "check the repo id, and that the token (--token, HF_TOKEN or "
        "`hf auth login`) can see it",
        "hub-revision-not-found": "check --revision",
    }
)
def command(
    path: str,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    message: str | None,
    dry_run: bool,
    no_validate: bool,
    base_model: str | None,
    token: str | None,
    as_json: bool,
) -> None:
    """Publish an adapter (file or folder) or a merged model folder to the Hub in one commit.

    Validates an adapter first and refuses one with errors. Writes or updates README.md: base
    model, relation, library, tags and license in the front matter, and a summary of the files;
    an existing card's text is kept. Prints the commit URL (or the pull request's).

    \b
    Example:
      loratool push out/llama-lora me/llama-lora --base-model meta-llama/Llama-3.2-1B
      loratool push merged/ me/llama-merged --private --create-pr
      loratool push adapter.safetensors me/style --dry-run
    """
    from lora_tools.ops.push import default_validator, plan_push, publish

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


def _render_plan(plan) -> None:
    from rich.markup import escape
    from rich.table import Table

    from lora_tools.errors import printable
    from lora_tools.ops.inspect import human_size

    out = console()
    where = printable(str(plan.path))
    out.print(f"would push {plan.kind} {where} to {plan.repo_id} (one commit):", markup=False)
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("file")
    table.add_column("size", justify="right")
    for f in plan.files:
        table.add_row(escape(printable(f.path_in_repo)), human_size(f.size))
    table.add_row("total", human_size(sum(f.size for f in plan.files)), style="bold")
    out.print(table)
    out.print()
    out.print("README.md:", style="bold")
    click.echo(plan.card)

"""``loratool hf-extension install|remove|status``: make ``hf lora ...`` run loratool.

The ``hf`` CLI of huggingface_hub (2.x) does not look for ``hf-<name>`` programs on PATH: it runs
an extension only if ``~/.local/share/hf/extensions/hf-<name>/manifest.json`` exists, and runs
the program named by its ``executable_path`` with the remaining arguments. ``hf extensions
install`` writes such manifests for extensions fetched from GitHub; for a loratool installed with
pip, ``loratool hf-extension install`` writes one that points at this environment's ``hf-lora``
console script. ``hf extensions list`` then shows it and ``hf extensions remove lora`` removes it.

The manifest's owner, ``loratool.local``, cannot be a GitHub account (GitHub names have no dots),
so ``hf extensions update`` can never replace this local install with someone else's repository.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from lora_tools import __version__
from lora_tools.errors import LoraToolError
from lora_tools.io.jsonfile import read_json_object

SHORT_NAME = "lora"
SCRIPT_NAME = "hf-lora"
LOCAL_OWNER = "loratool.local"


def extensions_root() -> Path:
    """Where the hf CLI keeps its extensions (read from huggingface_hub, not guessed)."""
    try:
        from huggingface_hub.cli.extensions import EXTENSIONS_ROOT
    except ImportError:
        raise LoraToolError(
            "this huggingface_hub has no CLI extensions (hf extensions ...)",
            hint="upgrade it: pip install -U huggingface_hub",
        ) from None
    return Path(EXTENSIONS_ROOT).expanduser()


def script_path() -> Path:
    """The ``hf-lora`` console script of the environment loratool runs from."""
    name = SCRIPT_NAME + (".exe" if os.name == "nt" else "")
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside.resolve()
    found = shutil.which(SCRIPT_NAME)
    if found is None:
        raise LoraToolError(
            f"no {SCRIPT_NAME} console script beside {sys.executable} or on PATH",
            hint="reinstall loratool (pip install loratool) so its console scripts exist",
        )
    return Path(found).resolve()


def install(force: bool = False) -> Path:
    """Write the manifest that makes ``hf lora`` run ``hf-lora``; return its folder."""
    folder = extensions_root() / f"hf-{SHORT_NAME}"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and not force:
        current = read_json_object(manifest_path)
        if current.get("owner") != LOCAL_OWNER:
            raise LoraToolError(
                f"another `hf lora` extension is installed ({current.get('repo_id')})",
                path=folder,
                hint="pass --force to replace it, or `hf extensions remove lora` first",
            )
    manifest = {
        "owner": LOCAL_OWNER,
        "repo": f"hf-{SHORT_NAME}",
        "repo_id": f"{LOCAL_OWNER}/hf-{SHORT_NAME}",
        "short_name": SHORT_NAME,
        "executable_path": str(script_path()),
        "type": "binary",
        "installed_at": datetime.now(timezone.utc).isoformat(),
        "description": f"LoRA adapters: inspect, validate, merge, push... (loratool {__version__})",
        "commit_sha": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, manifest_path)
    # An empty "latest commit" marks the update check as done for a day, so `hf lora` does not
    # ask GitHub about a repository that does not exist.
    (folder / ".latest_commit").write_text("", encoding="utf-8")
    return folder


def remove() -> bool:
    """Remove loratool's manifest; False if none (or another extension's) is installed."""
    folder = extensions_root() / f"hf-{SHORT_NAME}"
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return False
    if read_json_object(manifest_path).get("owner") != LOCAL_OWNER:
        return False
    shutil.rmtree(folder)
    return True


@click.group("hf-extension")
def command() -> None:
    """Register loratool as the `hf lora` extension of the hf CLI.

    \b
    Example:
      loratool hf-extension install
      hf lora inspect user/my-lora
    """


@command.command("install")
@click.option("--force", is_flag=True, help="Replace another `hf lora` extension.")
def install_command(force: bool) -> None:
    """Make `hf lora ...` run this loratool."""
    folder = install(force=force)
    click.echo(f"installed: `hf lora` runs {script_path()} (manifest in {folder})")


@command.command("remove")
def remove_command() -> None:
    """Unregister `hf lora`."""
    click.echo("removed" if remove() else "not installed by loratool; nothing to remove")


@command.command("status")
def status_command() -> None:
    """Show whether `hf lora` runs loratool, and which one."""
    manifest_path = extensions_root() / f"hf-{SHORT_NAME}" / "manifest.json"
    if not manifest_path.is_file():
        click.echo("not installed (run: loratool hf-extension install)")
        return
    manifest = read_json_object(manifest_path)
    click.echo(f"installed: `hf lora` runs {manifest.get('executable_path')}")

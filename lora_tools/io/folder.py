"""Which entries of a folder loratool copies or uploads: plain files, nothing a link smuggles in.

``merge`` copies the base folder's side files (config, tokenizer...) into the output, and
``push`` uploads a folder's files. Both take regular files, and symbolic links that resolve to a
regular file inside the folder itself or, for a Hugging Face Hub cache snapshot
(``models--org--name/snapshots/REV/``), inside that repository's ``blobs/`` folder, where the
cache keeps the snapshot's files. Everything else is skipped and reported: a link leaving the
folder (``notes.txt -> /etc/passwd`` or a token file would be published; ``tokenizer.model ->
/dev/zero`` would fill the disk), a broken link, a link to a folder, a FIFO, a socket, a device.

Example:
    >>> import os, pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> os.symlink("/etc/hostname", root / "notes.txt")
    >>> skip_reason(root, root / "notes.txt")
    'a symbolic link to /etc/hostname, outside the folder'
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _cache_blobs(root: Path) -> Path | None:
    """``REPO/blobs`` when ``root`` (resolved) lies in a Hub cache snapshot ``REPO/snapshots/REV``."""
    for folder in (root, *root.parents):
        if folder.parent.name == "snapshots":
            return folder.parent.parent / "blobs"
    return None


def skip_reason(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> str | None:
    """Why ``path``, an entry under the folder ``root``, must not be copied or uploaded, or None.

    None for a regular file, and for a symbolic link (or chain of links) that resolves to a
    regular file inside ``root`` or in its Hub cache repository's ``blobs/`` folder.
    """
    path = Path(path)
    try:
        st = path.lstat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if stat.S_ISREG(st.st_mode):
        return None
    if not stat.S_ISLNK(st.st_mode):
        return _kind(st.st_mode)
    target = Path(os.path.realpath(path))
    try:
        mode = target.stat().st_mode
    except OSError:
        return f"a broken symbolic link (to {os.readlink(path)})"
    real_root = Path(os.path.realpath(root))
    blobs = _cache_blobs(real_root)
    inside = real_root in target.parents or (blobs is not None and target.parent == blobs)
    if not inside:
        return f"a symbolic link to {target}, outside the folder"
    if not stat.S_ISREG(mode):
        return f"a symbolic link to {_kind(mode)} ({target})"
    return None

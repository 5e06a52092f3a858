"""Writing files safely: the checks before a write and the atomic write itself (temporary file,
then rename or an exclusive link), and the pixel limit every image reader shares. The bottom of
layerctl.io: image, PSD and weight writers all build on it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from layerctl.errors import LayerctlError


NAME_MAX = 255  # bytes of one file name on the common file systems (ext4, APFS, NTFS: 255 units)


def _exists(p: Path) -> bool:
    """Exists, or is a symlink (even a dangling one): writing there would replace something."""
    return os.path.lexists(p)


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (exit 2, one line) when an output cannot be written; creates nothing.

    Refused: an existing file or symlink without --overwrite, a folder of that name (even with
    --overwrite), a file name over NAME_MAX bytes, a parent that is a file, a folder that cannot
    be created or written to.
    """
    p = Path(path)
    if not p.name:
        raise LayerctlError(f"cannot write '{p}': no file name")
    if len(os.fsencode(p.name)) > NAME_MAX:
        raise LayerctlError(f"cannot write '{str(p)[:60]}...': the file name is {len(os.fsencode(p.name))} bytes, over the limit of {NAME_MAX}")
    if p.is_dir() and not p.is_symlink():
        raise LayerctlError(f"cannot write '{p}': a folder of that name exists")
    if _exists(p) and not overwrite:
        what = " as a symlink" if p.is_symlink() else ""
        raise LayerctlError(f"{p} exists{what} (use --overwrite to replace it)")
    for part in p.parent.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise LayerctlError(f"cannot write '{str(p)[:60]}...': a folder name is over {NAME_MAX} bytes")
    # the nearest existing ancestor must be a writable folder (missing folders are made when writing)
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists():
        if probe.is_symlink():
            raise LayerctlError(f"cannot write '{p}': {probe} is a broken symlink")
        probe = probe.parent
    if not probe.is_dir():
        raise LayerctlError(f"cannot write '{p}': {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise LayerctlError(f"cannot write to folder {probe}")
    return p


def _publish_exclusive(tmp: str, p: Path) -> None:
    """Put tmp at p only if p does not exist yet, atomically: a hard link fails when the name is taken
    (two writers: one wins, the other gets a one-line error), then the temporary name goes."""
    try:
        os.link(tmp, p)
    except FileExistsError:
        raise LayerctlError(f"{p} exists (use --overwrite to replace it)") from None
    except OSError:
        # no hard links on this file system: reserve the name with O_EXCL, then rename onto it
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            raise LayerctlError(f"{p} exists (use --overwrite to replace it)") from None
        os.close(fd)
        os.replace(tmp, p)
        return
    os.unlink(tmp)


def atomic_write(path: str | os.PathLike, write, overwrite: bool = False, suffix: str | None = None) -> Path:
    """Call write(tmp_path) then move it onto path; the temporary file is removed on any failure.

    Without `overwrite` the final step is an exclusive create (never replaces a file or symlink that
    appeared meanwhile); with it, an atomic rename.
    """
    p = check_writable(path, overwrite)
    parent = p.parent if str(p.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LayerctlError(f"cannot create folder {parent}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name[:200]}.", suffix=suffix or p.suffix or ".tmp", dir=parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if overwrite:
            if p.is_dir() and not p.is_symlink():
                raise LayerctlError(f"cannot write '{p}': a folder of that name exists")
            os.replace(tmp, p)
        else:
            _publish_exclusive(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def check_pixel_limit(path, width: int, height: int) -> None:
    """Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS), for readers that bypass Pillow."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > 2 * limit:
        raise LayerctlError(
            f"{path}: {width}x{height} is {width * height} pixels, over Pillow's decompression-bomb limit "
            f"of {2 * limit}; refusing to open it (could be a decompression bomb)"
        )

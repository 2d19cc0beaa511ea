"""Atomic file writes (temporary file + rename), clean-up of the temporary files a killed
writer left behind, and the output-folder checks made at the start of a run."""
import json
import os
import pickle
import re
import shutil
import tempfile
from typing import Any, Callable, List, Tuple

from utils.distributed import is_main_process
from utils.errors import UserError


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Temporary files of `atomic_write`: ".tmp_{name}.{pid}.{random}.partial" beside the target,
# so that a later run can recognise (and remove) those left behind by a killed writer.
TEMP_PREFIX, TEMP_SUFFIX = ".tmp_", ".partial"
_TEMP_NAME = re.compile(rf"^{re.escape(TEMP_PREFIX)}(?P<target>.+)\.(?P<pid>\d+)\.[a-z0-9_]+{re.escape(TEMP_SUFFIX)}$")


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.{os.getpid()}.",
                               suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the data is on disk before the rename makes it the file at `path`
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        _fsync(directory)  # and the rename itself survives a crash
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(directory: str) -> List[Tuple[str, int]]:
    """Delete the temporary files that killed atomic writers left in `directory`.

    Only names of `atomic_write`'s pattern whose writer process is gone (or is this
    process, which writes nothing yet when a run starts) are removed; anything else,
    and the files of a writer still running, stay. Call it on one rank only.

    Returns:
        (name, size in bytes) of each file removed.
    """
    removed = []
    if not directory or not os.path.isdir(directory):
        return removed
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        match = _TEMP_NAME.match(entry.name)
        if not match or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group("pid"))
        if pid != os.getpid() and _pid_alive(pid):
            continue
        size = entry.stat(follow_symlinks=False).st_size
        try:
            os.remove(entry.path)
        except FileNotFoundError:  # gone meanwhile
            continue
        removed.append((entry.name, size))
    return removed


def refuse_to_clobber(output_dir: str, name: str, resuming: bool, overwrite: bool, how: str = "") -> None:
    """Refuse a run that would overwrite an earlier run's `name` in `output_dir` (unless resuming or `overwrite`).

    Args:
        how: the script's way of continuing instead, e.g. "resume it with --auto_resume, ".
    """
    if not output_dir or resuming or overwrite:
        return
    if os.path.exists(os.path.join(output_dir, name)):
        raise UserError(f"{output_dir!r} already holds {name} of an earlier run: {how}choose another "
                        f"--output_dir, or pass --overwrite to replace it", field="output_dir")


def prepare_output_dir(output_dir: str, log: Callable[[str], None]) -> None:
    """Rank 0, at the start of a run: remove the temporary files of interrupted atomic writes, and say so."""
    if not output_dir or not is_main_process():
        return
    removed = remove_stale_temp_files(output_dir)
    if removed:
        log(f"removed {len(removed)} temporary file(s) left in {output_dir} by an interrupted write "
            f"({sum(size for _, size in removed)} bytes): "
            + ", ".join(f"{name} ({size} bytes)" for name, size in removed))


def atomic_write_text(text: str, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def atomic_write_pickle(obj: Any, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)

    atomic_write(path, write)


def atomic_write_json(obj: Any, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=1) + "\n", path)


def atomic_copy(src: str, dst: str) -> None:
    """Copy the file `src` to `dst` atomically (the bytes only, not the permissions)."""
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))

"""Writing a file whole or not at all; reading a JSON object with a one-line error.

    with atomic_write("results/eval.json") as tmp:      # tmp: a Path in the same folder
        tmp.write_text(text)                             # or save_file(tensors, str(tmp)), fig.savefig(tmp)

The body writes a temporary file beside the target; when it returns, the temporary file is renamed
over the target (os.replace: atomic within one file system), so a reader sees the old file or the
new one, never half of one. If the body raises (an error, Ctrl-C), the temporary file is removed
and the old target is left as it was. Imports nothing of the project.
"""
import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary Path beside `path` (same suffix, so tools that read the format from the name
    still work; the process id, so concurrent writers do not collide); rename it over `path` on success."""
    path = Path(path)
    if path.is_symlink():  # write where the link points, as a plain open() would, not over the link
        path = path.resolve()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, file_mode(path))
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: no half file is left behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def file_mode(path: Path) -> int:
    """The permissions a plain open(path, "w") would leave: the old file's, else 0o666 less the umask
    (some writers, safetensors among them, create their files owner-only)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def read_json_object(path: Path, remedy: str, what: str = "a JSON object") -> dict:
    """The JSON object in file `path`; text that is not JSON, or JSON that is not an object, is a
    one-line ValueError naming the file, what it should hold and the remedy (what to do)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}): {remedy}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not {what}: {remedy}")
    return data

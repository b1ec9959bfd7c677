"""A task's identity: the exact bytes of its code and the distributions it imports, pinned by one hash.

What a site approves, what the manifest names and what every site endorses is
``TaskCode.sha256``: SHA-256 over the canonical JSON of

- ``files``: every file of the task's package, by relative path (sorted,
  POSIX separators), each the SHA-256 of its exact bytes, nothing normalised:
  a changed byte anywhere is another task;
- ``dependencies``: each installed distribution the package's code imports,
  by name: its version and the SHA-256 of the hashed rows of its ``RECORD``
  (the installer's list of every file it put in place, each with its own
  hash), so a different release or a rebuilt wheel is another task.

The package is found from the task's reference without importing it, so a
site hashes code before running any of it:

- ``path/to/study/tasks.py:Chest`` where ``study/`` holds an ``__init__.py``,
  or ``study.tasks:Chest``: the top-level package's folder, every file in it
  (``__pycache__`` folders aside: the interpreter writes them);
- ``path/to/tasks.py:Chest`` in a plain folder: the file and, transitively,
  the modules beside it that it imports (``import cnn`` with ``cnn.py``
  beside it); other files in the folder (data, run folders) are not code.

A module the code imports that is neither in the package, nor in Python's
standard library, nor an installed distribution is refused: unpinned code.
A dependency that is not installed is refused with the list: a site never
installs anything at run time. What the lock does not cover: a distribution's
own dependencies (torch's, say), and the framework itself, which the
manifest pins separately (its ``code_sha256``).
"""

from __future__ import annotations

import ast
import csv
import functools
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from consortium.errors import ConfigError

FRAMEWORK = "consortium"  # pinned by the manifest's code hash, not here


@dataclass(frozen=True)
class TaskCode:
    """A task's code as this machine holds it: its package's files and its imported distributions.

    Attributes:
        ref: the task's reference (``path/to/tasks.py:Chest``, ``study.tasks:Chest``).
        root: the folder the file paths are relative to.
        files: relative path -> SHA-256 of the file's bytes.
        dependencies: distribution name -> ``{"version": ..., "record": SHA-256 of its RECORD's hashed rows}``.
    """

    ref: str
    root: Path
    files: dict[str, str]
    dependencies: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """The task's identity (``code_digest`` of its files and dependencies)."""
        return code_digest(self.files, self.dependencies)

    def differences(self, files: dict[str, str], dependencies: dict[str, dict[str, str]]) -> list[str]:
        """What differs from an earlier ``files`` and ``dependencies`` (an approval's), one phrase each,
        naming the file or the distribution; empty when nothing does."""
        out = [f"{self.root / p} differs" for p in sorted(files) if p in self.files and self.files[p] != files[p]]
        out += [f"{self.root / p} is new" for p in sorted(set(self.files) - set(files))]
        out += [f"{self.root / p} is missing" for p in sorted(set(files) - set(self.files))]
        for name in sorted(set(dependencies) | set(self.dependencies)):
            was, now = dependencies.get(name), self.dependencies.get(name)
            if was is None:
                out.append(f"it now imports {name} {now['version']}")  # type: ignore[index]
            elif now is None:
                out.append(f"it no longer imports {name}")
            elif was["version"] != now["version"]:
                out.append(f"{name} is {now['version']}, approved at {was['version']}")
            elif was["record"] != now["record"]:
                out.append(f"{name} {now['version']} is installed from other files than the ones approved")
        return out


def code_digest(files: dict[str, str], dependencies: dict[str, dict[str, str]]) -> str:
    """SHA-256 of the canonical JSON of ``{"files": ..., "dependencies": ...}``: a task's identity."""
    body = {"files": files, "dependencies": dependencies}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def task_code(ref: str) -> TaskCode:
    """The code the task reference ``ref`` names, read and hashed here, none of it run.

    Raises:
        ConfigError: the file or module does not exist, a file cannot be parsed, the code imports a
            module that is not installed (the list) or one that is in no distribution.
    """
    where = ref.rpartition(":")[0] if ":" in ref else ref
    root, paths = _package(where)
    files = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    local = {p.relative_to(root).parts[0].removesuffix(".py") for p in paths} | {root.name}
    return TaskCode(ref=ref, root=root, files=dict(sorted(files.items())), dependencies=_lock(paths, local, ref))


def is_file_ref(where: str) -> bool:
    """Whether a task reference's module part names a file (``path/to/tasks.py``) rather than a module."""
    return where.endswith(".py") or "/" in where or "\\" in where


def _package(where: str) -> tuple[Path, list[Path]]:
    """(the folder paths are relative to, the files of the task's code)."""
    if is_file_ref(where):
        path = Path(where).resolve()
        if not path.is_file():
            raise ConfigError(f"task file '{where}' does not exist: give the path of the .py file that defines the task")
        if not (path.parent / "__init__.py").is_file():
            return path.parent, _closure(path)
        top = path.parent
        while (top.parent / "__init__.py").is_file():
            top = top.parent
        return top.parent, _tree(top)
    top_name = where.split(".")[0]
    spec = importlib.util.find_spec(top_name)
    if spec is None:
        raise ConfigError(f"task module '{where}' is not installed here: install it, or name its file (path/to/file.py:Class)")
    if spec.submodule_search_locations:
        top = Path(next(iter(spec.submodule_search_locations))).resolve()
        return top.parent, _tree(top)
    if spec.origin is None or not spec.origin.endswith(".py"):
        raise ConfigError(f"task module '{top_name}' has no Python source to hash ({spec.origin}): ship it as .py files")
    path = Path(spec.origin).resolve()
    return path.parent, _closure(path)


def _tree(top: Path) -> list[Path]:
    """Every regular file under ``top`` but the interpreter's ``__pycache__``; a link is refused (its
    target could change under the hash)."""
    out = []
    for path in sorted(top.rglob("*")):
        if "__pycache__" in path.relative_to(top).parts:
            continue
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link: a task package holds regular files only, copy it in")
        if path.is_file():
            out.append(path)
    return out


def _closure(start: Path) -> list[Path]:
    """``start`` and the modules beside it that it imports, transitively (a sibling package: all its files).
    The folder's own name as a namespace (``from study.cnn import Net`` in ``study/`` with no
    ``__init__.py``) names a module beside it too."""
    folder, seen, todo = start.parent, {start}, [start]
    while todo:
        for dotted in _imported(todo.pop(), dotted=True):
            parts = dotted.split(".")
            name = parts[1] if parts[0] == folder.name and len(parts) > 1 else parts[0]
            for candidate in (folder / f"{name}.py", folder / name):
                if candidate.is_file() and candidate not in seen:
                    seen.add(candidate)
                    todo.append(candidate)
                elif candidate.is_dir() and (candidate / "__init__.py").is_file() and candidate not in seen:
                    seen.add(candidate)
                    inside = [f for f in _tree(candidate) if f not in seen]
                    seen.update(inside)
                    todo.extend(inside)  # what the package's own modules import beside it, too
    return sorted(p for p in seen if p.is_file())


def _imported(path: Path, dotted: bool = False) -> set[str]:
    """The top-level names a Python file imports absolutely (``import a.b``, ``from a import b``: ``a``),
    or with ``dotted`` the whole module names (``a.b``, ``a``)."""
    if path.suffix != ".py":
        return set()
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid Python ({exc}): fix it before it is hashed") from None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names if dotted else {n.split(".")[0] for n in names}


def _lock(paths: list[Path], local: set[str], ref: str) -> dict[str, dict[str, str]]:
    """Each distribution the code imports (but the ``local`` names, its own modules): its version and the
    hash of its RECORD's hashed rows."""
    imported = set().union(*(_imported(p) for p in paths)) - local - set(sys.stdlib_module_names) - {"__future__"}
    providers = _providers()
    missing = sorted(n for n in imported if n not in providers and importlib.util.find_spec(n) is None)
    if missing:
        raise ConfigError(
            f"task '{ref}' imports {', '.join(missing)}, not installed here: install the versions the consortium "
            "approved (a site never installs anything at run time)"
        )
    unpinned = sorted(n for n in imported if n not in providers)
    if unpinned:
        raise ConfigError(
            f"task '{ref}' imports {', '.join(unpinned)}, which is neither in its package nor an installed "
            "distribution, so no hash could pin it: move it into the task's package"
        )
    lock = {}
    for name in sorted(imported):
        for dist_name in providers[name]:
            if dist_name.lower() == FRAMEWORK:
                continue
            dist = importlib.metadata.distribution(dist_name)
            lock[dist.metadata["Name"].lower()] = {"version": dist.version, "record": _record_hash(dist)}
    return dict(sorted(lock.items()))


@functools.lru_cache(maxsize=1)
def _providers() -> dict[str, list[str]]:
    """Top-level module -> the distributions providing it (read once per process: 0.1 s)."""
    return importlib.metadata.packages_distributions()


def _record_hash(dist: importlib.metadata.Distribution) -> str:
    """SHA-256 over the sorted rows of a distribution's RECORD that carry a hash and lie inside its
    installation (a script's row outside it embeds this machine's interpreter path)."""
    text = dist.read_text("RECORD")
    if text is None:
        raise ConfigError(
            f"{dist.metadata['Name']} {dist.version} has no RECORD, so its files cannot be pinned: install it with pip"
        )
    rows = sorted(
        f"{row[0]},{row[1]}" for row in csv.reader(io.StringIO(text))
        if len(row) >= 2 and row[1] and not row[0].startswith("..")
    )
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()

"""Dataset versioning with DVC: the raw demo dataset, DVC-compatible hashes, manifest stamps.

* :func:`write_demo_raw` writes the raw demo dataset (PNG files plus ``captions.csv`` with the
  open_clip ``filepath,caption`` columns and a ``split`` column) from
  :mod:`clip_core.synthetic`. The bytes are a pure function of the arguments, so the dataset
  tracked by the top-level ``data.dvc`` can always be regenerated exactly.
* :func:`dvc_md5` is the md5 DVC records for a file or directory output (``dvc add``), computed
  in-process with DVC's own hashing library (``dvc_data``). Directory hashes end in ``.dir``.
* :func:`stamp_manifest` writes the dataset version of an ingest output (DVC md5 of the shard
  directory *without* ``manifest.json``) into its ``manifest.json``.
* :func:`dvc` runs the DVC command line of this interpreter's environment with analytics off
  and raises :class:`DvcError` (with DVC's stderr and the remote involved) on failure.

Command line (run from the repository root)::

    python -m clip_data.versioning restore   # dvc pull, or regenerate data/raw and cache it
    python -m clip_data.versioning push      # dvc push data.dvc to the default (or -r) remote
    python -m clip_data.versioning md5 PATH  # print the DVC md5 of PATH

See ``docs/data.md`` for the remotes (local default, S3-compatible endpoints).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from clip_core.synthetic import SyntheticConfig, encode_png, generate
from clip_data.shards import MANIFEST_NAME, read_manifest

_UNHASHED = frozenset({MANIFEST_NAME, "validation.json"})  # files about the data

__all__ = [
    "CAPTIONS_NAME",
    "DATA_DVC",
    "RAW_DIR",
    "DvcError",
    "dvc",
    "dvc_md5",
    "main",
    "recorded_md5",
    "restore",
    "stamp_manifest",
    "write_demo_raw",
]

CAPTIONS_NAME = "captions.csv"
IMAGES_DIR = "images"
DATA_DIR = "data"  # the DVC output tracked by the top-level data.dvc
DATA_DVC = "data.dvc"
RAW_DIR = "data/raw"  # the raw demo dataset inside the tracked output
SCHEME = "dvc-md5"
# Subcommands that talk to a remote: a failure message names the remote they used.
_REMOTE_COMMANDS = frozenset({"push", "pull", "fetch", "status", "gc"})


class DvcError(RuntimeError):
    """A DVC command failed; the message holds the command, exit code, remote and stderr."""

    def __init__(self, message: str, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


# --------------------------------------------------------------------------- demo dataset


def _demo_bytes(train: int, test: int, seed: int) -> dict[str, bytes]:
    """Relative path -> file bytes of the raw demo dataset."""
    config = SyntheticConfig(seed=seed)
    files: dict[str, bytes] = {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["filepath", "caption", "split"])
    for split, n in (("train", train), ("test", test)):
        for sample in generate(n, split, config):
            rel = f"{IMAGES_DIR}/{sample.key}.png"
            files[rel] = encode_png(sample.image)
            writer.writerow([rel, sample.caption, split])
    files[CAPTIONS_NAME] = buf.getvalue().encode("utf-8")
    return files


def write_demo_raw(
    dest: str | os.PathLike[str],
    train: int = 512,
    test: int = 128,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the raw demo dataset into ``dest`` and return ``dest`` as a ``Path``.

    Layout: ``images/synth-{split}-{index:08d}.png`` and ``captions.csv`` with the columns
    ``filepath`` (relative to the CSV), ``caption`` and ``split``; train rows come first. The
    bytes depend only on ``(train, test, seed)``. ``dest`` must be missing or empty unless
    ``overwrite`` is true, in which case it is replaced. The dataset is written into a
    temporary directory beside ``dest`` and renamed into place, so ``dest`` never holds a
    partial dataset.
    """
    for name, value in (("train", train), ("test", test), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rel, data in _demo_bytes(train, test, seed).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        tmp.chmod(0o755)  # mkdtemp creates 0700; match an ordinary directory
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------- hashing


def _local_fs() -> Any:
    from dvc_objects.fs.local import LocalFileSystem

    return LocalFileSystem()


def _forget_tree_bytes(tree: Any) -> None:
    """Drop the directory listing ``Tree.digest`` leaves in dvc_objects' global memory fs."""
    fs: Any = getattr(tree, "fs", None)
    path = getattr(tree, "path", None)
    if fs is not None and path and getattr(fs, "protocol", None) in ("memory", ("memory",)):
        with contextlib.suppress(Exception):
            fs.rm(path)


def dvc_md5(path: str | os.PathLike[str]) -> str:
    """The md5 ``dvc add`` records for ``path`` (a file, or a directory with a ``.dir`` suffix).

    Computed with ``dvc_data.hashfile.build`` (DVC 3 ``md5`` hashing, no ``.dvcignore``
    patterns applied), so it equals the ``outs[0].md5`` of the ``.dvc`` file ``dvc add`` writes
    for the same content.
    """
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.fs import MemoryFileSystem

    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist")
    odb = HashFileDB(MemoryFileSystem(), "memory://clipops-dvc-md5")
    _, _, obj = build(odb, os.fspath(target.resolve()), _local_fs(), "md5", dry_run=True)
    value = obj.hash_info.value
    if isinstance(obj, Tree):
        _forget_tree_bytes(obj)
    if not value:
        raise RuntimeError(f"dvc_data returned no md5 for {target}")
    return str(value)


def _files_md5(root: Path, rel_paths: Sequence[str], known: Mapping[str, str]) -> str:
    """DVC directory md5 of the given files under ``root`` (as if they were the only ones).

    ``known``: md5s already computed for some of the files (by relative path); the others
    are hashed here.
    """
    from dvc_data.hashfile.hash import hash_file
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.meta import Meta
    from dvc_data.hashfile.tree import Tree

    fs = _local_fs()
    tree = Tree()
    for rel in sorted(rel_paths):
        path = root / rel
        if rel in known:
            meta, hash_info = Meta(size=path.stat().st_size), HashInfo("md5", known[rel])
        else:
            meta, hash_info = hash_file(os.fspath(path), fs, "md5")
        tree.add(tuple(rel.split("/")), meta, hash_info)
    tree.digest()
    value = str(tree.hash_info.value)
    _forget_tree_bytes(tree)
    return value


def stamp_manifest(
    dest: str | os.PathLike[str], known_md5s: Mapping[str, str] | None = None
) -> str:
    """Write the dataset version of the ingest output ``dest`` into its manifest; return it.

    The version is the md5 ``dvc add`` would record for ``dest`` without its top-level
    ``manifest.json`` and ``validation.json``: the shards and the quarantine. Excluding the
    files written about the data keeps stamping idempotent and independent of validation.
    The manifest gains
    ``"dataset_version": {"dvc_md5": ..., "scheme": "dvc-md5"}`` and is rewritten atomically in
    the shard writer's format (sorted keys, two-space indent).

    ``known_md5s``: the md5 of files whose bytes the caller hashed as it wrote them (by path
    relative to ``dest``; :attr:`clip_data.shards.ShardWriter.file_md5s`), so they are not
    read again; every other file is hashed here.
    """
    root = Path(dest)
    manifest = read_manifest(root)  # also checks the schema version
    rel_paths = [
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).as_posix() not in _UNHASHED
    ]
    if not rel_paths:
        raise ValueError(f"{root} holds no files besides {MANIFEST_NAME}")
    md5 = _files_md5(root, rel_paths, known_md5s or {})
    manifest["dataset_version"] = {"dvc_md5": md5, "scheme": SCHEME}
    text = json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{MANIFEST_NAME}.", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        Path(tmp_name).chmod(0o644)
        Path(tmp_name).replace(root / MANIFEST_NAME)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return md5


def recorded_md5(dvc_file: str | os.PathLike[str]) -> str:
    """The md5 of the single output recorded in a ``.dvc`` file."""
    path = Path(dvc_file)
    with path.open(encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    outs = data.get("outs") if isinstance(data, dict) else None
    if not isinstance(outs, list) or len(outs) != 1 or not outs[0].get("md5"):
        raise ValueError(f"{path}: expected exactly one output with an md5")
    return str(outs[0]["md5"])


# --------------------------------------------------------------------------- DVC command line


def _remote_of(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("-r", "--remote") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--remote="):
            return arg.split("=", 1)[1]
    return None


def dvc(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``dvc ARGS`` with this interpreter (``python -m dvc``) and analytics disabled.

    ``env`` adds to (and overrides) the inherited environment. With ``check`` (the default) a
    non-zero exit raises :class:`DvcError` whose message names the command, the directory, the
    remote (the ``-r`` argument, else the repository's default remote for commands that use
    one) and DVC's stderr.
    """
    full_env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        where = f" in {cwd}" if cwd is not None else ""
        remote = _remote_of(args)
        if remote is None and args and args[0] in _REMOTE_COMMANDS:
            default = subprocess.run(
                [sys.executable, "-m", "dvc", "config", "core.remote"],
                cwd=cwd,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            remote = default.stdout.strip() or None
        via = f" (remote {remote!r})" if remote else ""
        detail = (proc.stderr.strip() or proc.stdout.strip() or "no output").strip()
        message = (
            f"dvc {' '.join(args)} failed with exit code {proc.returncode}{where}{via}:\n{detail}"
        )
        raise DvcError(message, proc.returncode, proc.stderr)
    return proc


# --------------------------------------------------------------------------- restore / push


def restore(repo: str | os.PathLike[str] = ".", remote: str | None = None) -> str:
    """Make ``data/`` of ``repo`` match ``data.dvc``; return what was done.

    Tries ``dvc pull data.dvc`` first. If the remote lacks the data (a fresh clone with an
    empty local remote), regenerates ``data/raw`` with :func:`write_demo_raw`, checks that its
    md5 equals the one in ``data.dvc`` and stores it in the DVC cache (``dvc commit``), so
    ``dvc status`` is clean and ``dvc push`` can fill the remote.
    """
    root = Path(repo)
    expected = recorded_md5(root / DATA_DVC)
    remote_args = ("-r", remote) if remote else ()
    try:
        dvc("pull", *remote_args, DATA_DVC, cwd=root)
        return "pulled"
    except DvcError as exc:
        print(f"dvc pull failed; regenerating {RAW_DIR}:\n{exc}", file=sys.stderr)
    data = root / DATA_DIR
    write_demo_raw(root / RAW_DIR, overwrite=True)
    extra = sorted(p.name for p in data.iterdir() if p.name != Path(RAW_DIR).name)
    actual = dvc_md5(data)
    if actual != expected:
        raise RuntimeError(
            f"regenerated {DATA_DIR}/ has md5 {actual}, but {DATA_DVC} records {expected}"
            + (f"; unexpected entries in {DATA_DIR}/: {extra}" if extra else "")
        )
    dvc("commit", "--force", DATA_DVC, cwd=root)
    return "regenerated"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m clip_data.versioning {restore,push,md5}``."""
    parser = argparse.ArgumentParser(prog="python -m clip_data.versioning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_restore = sub.add_parser("restore", help="dvc pull data.dvc, else regenerate data/raw")
    p_push = sub.add_parser("push", help="dvc push data.dvc")
    for p in (p_restore, p_push):
        p.add_argument("--repo", default=".", help="repository root (default: .)")
        p.add_argument("-r", "--remote", default=None, help="DVC remote (default: core.remote)")
    p_md5 = sub.add_parser("md5", help="print the DVC md5 of a file or directory")
    p_md5.add_argument("path")
    ns = parser.parse_args(argv)
    try:
        if ns.command == "restore":
            print(f"{DATA_DVC}: {restore(ns.repo, ns.remote)}")
        elif ns.command == "push":
            remote_args = ("-r", ns.remote) if ns.remote else ()
            proc = dvc("push", *remote_args, DATA_DVC, cwd=ns.repo)
            print(proc.stdout.strip())
        else:
            print(dvc_md5(ns.path))
    except (DvcError, RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

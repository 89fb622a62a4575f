"""Which Feast feature repository a command uses, and ``llmfeat init``'s copy of it.

The repository ``feast_repo/`` at the top of a source checkout is the one source of the Feast
definitions. The wheel ships it as package data (``llm_features/feast_repo/``, mapped from
``feast_repo/`` by ``setup.py``), so an installed ``llmfeat`` has it too:

- the default ``--repo feast_repo`` means ``./feast_repo`` when the current directory has one (a
  checkout, or a project where ``llmfeat init`` wrote it), else the packaged repository (the
  installed copy, or in a checkout used from another directory, the checkout's own ``feast_repo/``);
- the default data dir stays ``./feast_repo/data`` (or ``$LLMFEAT_DATA_DIR``) either way: nothing is
  ever written into an installed package;
- ``llmfeat init DIR`` copies the packaged repository to ``DIR`` (like ``feast init``) for a project
  that wants definitions of its own.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from llm_features.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_REPO = Path("feast_repo")
PACKAGE_DIR = Path(__file__).resolve().parent
INSTALLED_REPO = PACKAGE_DIR / "feast_repo"  # only in an installed wheel
CHECKOUT_REPO = PACKAGE_DIR.parent / "feast_repo"  # a source checkout (editable install, PYTHONPATH)
# what `llmfeat init` copies: the definitions and configurations, never a data dir or byte code
REPO_FILES = ("*.py", "*.yaml", "*.md", "production/*.yaml")

_announced = False


def _is_repo(path: Path) -> bool:
    return (path / "feature_store.yaml").is_file() and (path / "feature_definitions.py").is_file()


def packaged_repo() -> Path:
    """The feature repository that comes with llmfeat: the installed copy, else the checkout's."""
    for path in (INSTALLED_REPO, CHECKOUT_REPO):
        if _is_repo(path):
            return path
    raise UserError(
        f"llmfeat's own feature repository is missing (looked in {INSTALLED_REPO} and {CHECKOUT_REPO})",
        fix="Reinstall llmfeat (`pip install --force-reinstall llmfeat`).",
    )


def is_installed_repo(repo: str | os.PathLike) -> bool:
    """Is ``repo`` the copy inside the installed package (never to be written into)?"""
    return Path(repo).resolve() == INSTALLED_REPO


def find_repo(repo: str | os.PathLike = DEFAULT_REPO) -> Path:
    """``repo`` as an absolute path; the default ``feast_repo`` falls back to :func:`packaged_repo`
    when the current directory has no ``feast_repo/feature_store.yaml``."""
    global _announced
    path = Path(repo)
    if path != DEFAULT_REPO or (DEFAULT_REPO / "feature_store.yaml").is_file():
        return path.resolve()
    packaged = packaged_repo()
    if not _announced:
        _announced = True
        log.info("no feast_repo/ in %s: using the feature repository packaged with llmfeat (%s); "
                 "`llmfeat init` writes one of your own", Path.cwd(), packaged)
    return packaged


def repo_files(repo: Path) -> list[Path]:
    """The files of ``repo`` that make up the repository (relative paths), sorted."""
    found = {p.relative_to(repo) for pattern in REPO_FILES for p in repo.glob(pattern) if p.is_file()}
    return sorted(found)


def init_repo(dest: str | os.PathLike) -> list[Path]:
    """Copy the packaged feature repository to ``dest`` (created; it may exist with other files,
    e.g. a ``data/`` dir, but none of the repository's own). Returns the files written."""
    src = packaged_repo()
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError("exists and is not a directory", file=dest, fix="Pass a new directory.")
    files = repo_files(src)
    clash = [f for f in files if (dest / f).exists()]
    if clash:
        raise UserError(
            f"already holds a feature repository ({', '.join(str(c) for c in clash)} exist); llmfeat init "
            "never overwrites one", file=dest, fix="Pass a new directory, or remove those files first.",
        )
    written = []
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest / rel)
        written.append(dest / rel)
    gitignore = dest / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text("# the default data dir: parquet tables, registry, online store\ndata/\n")
        written.append(gitignore)
    return written

"""``llmfeat init``: a Feast feature repository of your own, copied from the one packaged with llmfeat."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False), default=Path("feast_repo"))
def command(directory: Path) -> None:
    """Write llmfeat's Feast feature repository to DIRECTORY [default: feast_repo] (like `feast init`).

    It copies feature_store.yaml, feature_definitions.py, production/*.yaml and README.md, and adds a
    .gitignore for data/; it never overwrites a repository. Without it, commands
    run outside a project with a feast_repo/ use the repository packaged with llmfeat; with it, you
    can edit the definitions and the store configuration. Run it where you run llmfeat: the default
    --repo is ./feast_repo, with its data dir ./feast_repo/data. Another DIRECTORY is used with
    --repo DIRECTORY (and --data-dir, or $LLMFEAT_DATA_DIR, for the stages).

    \b
    Example:  llmfeat init && llmfeat ingest --source ml-100k && llmfeat encode && llmfeat feast materialize
    """
    from llm_features.feature_repo import DEFAULT_REPO, init_repo

    written = init_repo(directory)
    click.echo(f"wrote the feature repository {directory}:")
    for path in written:
        click.echo(f"  {path}")
    if directory != DEFAULT_REPO:
        click.echo(f"use it with --repo {directory} (llmfeat feast, ranker, demo) and --data-dir {directory / 'data'} "
                   f"(or LLMFEAT_DATA_DIR={directory / 'data'}) for the stages")

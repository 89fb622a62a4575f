"""Which feature repository a command uses (./feast_repo, else the packaged one) and `llmfeat init`.

tests/test_wheel.py runs the same from an installed wheel; these run in the checkout, in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from llm_features import feature_repo
from llm_features.cli import main
from llm_features.feature_repo import find_repo, packaged_repo, repo_files
from llm_features.store import open_store
from llm_features.workspace import Workspace, default_data_dir, resolve_data_dir

CHECKOUT = Path(__file__).resolve().parents[1]
REPO = CHECKOUT / "feast_repo"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A CWD without a feast_repo/, and no $LLMFEAT_DATA_DIR."""
    cwd = tmp_path / "project"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("LLMFEAT_DATA_DIR", raising=False)
    return cwd


def test_repo_files_are_the_definitions_and_configs_only():
    names = [str(p) for p in repo_files(REPO)]
    assert "feature_store.yaml" in names and "feature_definitions.py" in names
    assert "production/feature_store.postgres.yaml" in names
    assert not [n for n in names if n.startswith("data") or "__pycache__" in n]


def test_default_repo_falls_back_to_the_packaged_one_and_data_stays_in_the_cwd(elsewhere):
    # in a checkout, the packaged repository is the checkout's own feast_repo/ (no copy)
    assert packaged_repo() == REPO
    assert find_repo("feast_repo") == REPO
    assert default_data_dir() == elsewhere / "feast_repo" / "data"
    assert resolve_data_dir("feast_repo") == elsewhere / "feast_repo" / "data"
    assert Workspace.at().root == elsewhere / "feast_repo" / "data"
    store = open_store()
    assert Path(store.config.repo_path) == REPO
    assert store.config.online_store.path == str(elsewhere / "feast_repo" / "data" / "online_store.db")
    # an explicit repo is taken as given, never replaced by the packaged one
    assert find_repo(elsewhere / "mine") == elsewhere / "mine"
    res = CliRunner().invoke(main, ["feast", "apply", "--repo", "mine"])
    assert res.exit_code == 1 and "has no feature_store.yaml" in res.output, res.output


def test_installed_repo_is_never_the_data_dir(tmp_path, elsewhere, monkeypatch):
    installed = tmp_path / "site-packages" / "llm_features" / "feast_repo"
    installed.mkdir(parents=True)
    for rel in repo_files(REPO):
        (installed / rel).parent.mkdir(parents=True, exist_ok=True)
        (installed / rel).write_bytes((REPO / rel).read_bytes())
    monkeypatch.setattr(feature_repo, "INSTALLED_REPO", installed)
    assert packaged_repo() == installed  # the installed copy wins over a checkout's
    assert find_repo() == installed
    # asked by its own path (as feature_definitions.py and store_data_dir do), it still maps to the CWD
    assert default_data_dir(installed) == elsewhere / "feast_repo" / "data"
    assert default_data_dir(REPO) == REPO / "data"


def test_init_copies_the_packaged_repository_byte_for_byte(elsewhere):
    res = CliRunner().invoke(main, ["init"])
    assert res.exit_code == 0, res.output
    mine = elsewhere / "feast_repo"
    assert repo_files(mine) == repo_files(REPO)
    for rel in repo_files(REPO):
        assert (mine / rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert (mine / ".gitignore").read_text().splitlines()[-1] == "data/"
    # from now on the default repo is this one
    assert find_repo() == mine
    assert Path(open_store().config.repo_path) == mine

    # never over an existing repository
    res = CliRunner().invoke(main, ["init"])
    assert res.exit_code == 1
    assert "feast_repo: already holds a feature repository" in res.output and "never overwrites" in res.output
    # another directory: the hint names --repo and --data-dir
    res = CliRunner().invoke(main, ["init", "features/repo"])
    assert res.exit_code == 0, res.output
    assert "--repo features/repo" in res.output and "--data-dir features/repo/data" in res.output
    assert (elsewhere / "features" / "repo" / "feature_definitions.py").is_file()


def test_init_keeps_an_existing_data_dir(elsewhere):
    (elsewhere / "feast_repo" / "data" / "canonical").mkdir(parents=True)
    (elsewhere / "feast_repo" / "data" / "canonical" / "split.json").write_text("{}")
    res = CliRunner().invoke(main, ["init"])
    assert res.exit_code == 0, res.output
    assert (elsewhere / "feast_repo" / "data" / "canonical" / "split.json").read_text() == "{}"
    assert (elsewhere / "feast_repo" / "feature_store.yaml").is_file()


def test_init_refuses_a_file(elsewhere):
    (elsewhere / "taken").write_text("x")
    res = CliRunner().invoke(main, ["init", "taken"])
    assert res.exit_code != 0 and "taken" in res.output


def test_ranker_without_torchrec_says_how_to_install_it(tmp_path):
    """The console script turns a missing ranker dependency into one line naming the extra."""
    code = ("import sys; sys.modules['torchrec'] = None; sys.argv = ['llmfeat', 'ranker', 'train', "
            f"'--data-dir', {str(tmp_path)!r}, '--out', {str(tmp_path / 'out')!r}]; "
            "from llm_features.cli import run; run()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "needs the module 'torchrec'" in proc.stderr and "llmfeat[ranker]" in proc.stderr, proc.stderr

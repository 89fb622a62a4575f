"""The README's CLI reference is the commands' own --help (regenerate with `make docs`)."""

from pathlib import Path

from click.testing import CliRunner

from llm_features.cli import COMMANDS, main
from llm_features.cli.reference import cli_reference, readme_block

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cli_reference_matches_help():
    assert readme_block(README.read_text()) == cli_reference().strip("\n"), (
        "README.md's command-line reference is stale: run `make docs` and commit README.md"
    )


def test_every_registered_command_loads_and_helps():
    runner = CliRunner()
    for name in COMMANDS:
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, f"llmfeat {name} --help failed: {res.output}"
        assert "Usage:" in res.output

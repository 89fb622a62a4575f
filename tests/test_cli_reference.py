"""docs/cli.md's command-line reference is the commands' own --help (regenerate with `make docs`)."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from llm_features.cli import COMMANDS, main
from llm_features.cli.reference import cli_reference, reference_block, write_reference

CLI_DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_doc_reference_matches_help():
    assert reference_block(CLI_DOC.read_text()) == cli_reference().strip("\n"), (
        "docs/cli.md's command-line reference is stale: run `make docs` and commit docs/cli.md"
    )


def test_write_reference_keeps_the_text_around_the_block(tmp_path):
    doc = tmp_path / "cli.md"
    doc.write_text("# head\n\n<!-- cli-reference:start -->\nstale\n<!-- cli-reference:end -->\n\ntail\n")
    write_reference(doc)
    text = doc.read_text()
    assert text.startswith("# head\n\n<!-- cli-reference:start -->\n#### `llmfeat`\n")
    assert text.endswith("<!-- cli-reference:end -->\n\ntail\n")
    assert reference_block(text) == cli_reference().strip("\n")


def test_a_document_without_markers_is_refused(tmp_path):
    doc = tmp_path / "README.md"
    doc.write_text("# no reference here\n")
    with pytest.raises(ValueError, match="docs/cli.md"):
        write_reference(doc)
    assert doc.read_text() == "# no reference here\n"


def test_every_registered_command_loads_and_helps():
    runner = CliRunner()
    for name in COMMANDS:
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, f"llmfeat {name} --help failed: {res.output}"
        assert "Usage:" in res.output

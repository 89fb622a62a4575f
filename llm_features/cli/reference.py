"""The README's command-line reference, generated from the commands' own ``--help``.

``python -m llm_features.cli.reference --write README.md`` rewrites the block between the
``<!-- cli-reference:start -->`` and ``<!-- cli-reference:end -->`` markers; a test fails when the
README and ``--help`` drift apart.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from llm_features.atomic import write_text

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"


def _walk(cmd: click.Command, ctx: click.Context, path: list[str]) -> list[tuple[str, str]]:
    # click caches a command's help option the first time it is built, with the help option names of
    # that context: a subcommand invoked on its own before (a test's CliRunner) would show "--help"
    # without the group's "-h". Rebuild it under this context.
    if hasattr(cmd, "_help_option"):
        cmd._help_option = None
    out = [(" ".join(path), cmd.get_help(ctx).replace("\x08", ""))]
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None:
                out += _walk(sub, click.Context(sub, info_name=name, parent=ctx, max_content_width=100), [*path, name])
    return out


def cli_reference() -> str:
    """Markdown: one ``--help`` block per command and subcommand."""
    from llm_features.cli import main

    ctx = click.Context(main, info_name="llmfeat", max_content_width=100, terminal_width=100)
    parts = []
    for name, text in _walk(main, ctx, ["llmfeat"]):
        parts.append(f"#### `{name}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(parts)


def readme_block(readme: str) -> str:
    if START not in readme or END not in readme:
        raise ValueError(f"README has no {START} ... {END} block")
    return readme.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write_readme(path: Path) -> None:
    text = path.read_text()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text(path, f"{head}{START}\n{cli_reference()}\n{END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        write_readme(Path(sys.argv[2]))
    else:
        print(cli_reference())

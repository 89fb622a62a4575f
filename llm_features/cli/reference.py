"""The command-line reference in ``docs/cli.md``, generated from the commands' own ``--help``.

``python -m llm_features.cli.reference --write docs/cli.md`` (``make docs``) rewrites the block between
the ``<!-- cli-reference:start -->`` and ``<!-- cli-reference:end -->`` markers; a test fails when
``docs/cli.md`` and ``--help`` drift apart.
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


DOC = Path("docs/cli.md")


def reference_block(text: str) -> str:
    """The generated block of a document (``docs/cli.md``), without its markers."""
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} block (the reference lives in {DOC})")
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write_reference(path: Path) -> None:
    """Rewrite the generated block of ``path`` in place (atomically), keeping the text around it."""
    text = path.read_text()
    reference_block(text)  # markers present, else a clear error
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    write_text(path, f"{head}{START}\n{cli_reference()}\n{END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        try:
            write_reference(Path(sys.argv[2]))
        except ValueError as e:
            sys.exit(f"{sys.argv[2]}: {e}; run `make docs`")
    else:
        print(cli_reference())

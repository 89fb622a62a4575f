"""The ``llmfeat`` command line: a thin shell over library functions.

Each subcommand lives in its own module and exposes a click ``command``; modules are imported
only when their command runs, so ``llmfeat --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import warnings

import click

from llm_features.errors import shown_as_click_error

# name -> module that defines `command`
COMMANDS: dict[str, str] = {
    "init": "llm_features.cli.init",
    "ingest": "llm_features.cli.ingest",
    "encode": "llm_features.cli.encode",
    "feast": "llm_features.cli.feast",
    "finetune": "llm_features.cli.finetune",
    "embed-users": "llm_features.cli.embed_users",
    "push-events": "llm_features.cli.push_events",
    "export": "llm_features.cli.export",
    "ranker": "ranker.cli",
    "serve": "llm_features.cli.serve",
    "demo": "llm_features.cli.demo",
    "bench": "llm_features.cli.bench",
}


def _exit_1(fn):
    """Bad usage exits with 1 like every other bad input (click's own convention is 2), and a
    :class:`~llm_features.errors.UserError` from the library is shown as a click error."""
    def wrapped(*args, **kwargs):
        try:
            with shown_as_click_error():
                return fn(*args, **kwargs)
        except click.UsageError as e:
            e.exit_code = 1
            raise
    return wrapped


class LazyGroup(click.Group):
    make_context = _exit_1(click.Group.make_context)
    invoke = _exit_1(click.Group.invoke)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, mod in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod = COMMANDS.get(name)
        if mod is None or importlib.util.find_spec(mod) is None:
            return None
        return importlib.import_module(mod).command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """llmfeat: LLM-derived user and item features (BAHE + DTI) for Feast and TorchRec."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # feast/duckdb/ibis deprecations are theirs to fix and drown the progress output
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # our own progress at INFO; libraries (fbgemm logs every .so it loads) only from WARNING up
    for name in ("llm_features", "ranker"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


# the ranker's own dependencies (extra "ranker"): a command that needs one of them says how to install it
RANKER_MODULES = {"torchrec", "fbgemm_gpu", "tensordict", "torchmetrics", "pyre_extensions", "iopath"}


def run() -> None:
    """Console-script entry point.

    DuckDB 2.x (used by Feast's offline store) prints dozens of nanobind "leaked instance" lines when
    the interpreter finalises with a connection still cached by ibis. They are harmless but look
    like a crash to a user, so after the command has finished and its output is flushed, exit
    without running interpreter finalisation.
    """
    code: int | str | None = 0
    try:
        main(standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in RANKER_MODULES:
            raise
        code = (f"Error: the TorchRec ranker needs the module '{e.name}', which is not installed. Install the "
                "ranker extra: on CUDA pip install 'llmfeat[ranker]'; on CPU pip install 'llmfeat[ranker-cpu]', "
                "then pip install --no-deps 'torchrec>=1.9.2,<1.10' (docs/install.md).")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe must not change the exit code
            pass
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    os._exit(code or 0)

"""``llmfeat serve``: the ranker behind HTTP; a thin shell over :func:`ranker.service.serve`."""

from __future__ import annotations

import click

from llm_features.config import dataclass_options
from ranker.config import ServeConfig


@click.command("serve")
@dataclass_options(ServeConfig)
def command(cfg: ServeConfig) -> None:
    """Serve a trained ranker over HTTP: POST /score and /rank, GET /health and /metrics.

    Checks first that the online store was materialised and holds the embedding model the ranker
    was trained on (else exit 1). Binds 127.0.0.1 unless --host says otherwise.

    Example: llmfeat serve --ranker runs/ranker_llm --data-dir data --port 8000
    """
    from ranker.service import serve

    serve(cfg, echo=click.echo)

"""Train and evaluate the ranker on Feast point-in-time rows.

The entity rows are the labelled interactions of a split (``canonical/interactions.parquet``:
``user_id, item_id, event_timestamp, label``); their features come only from
``store.get_historical_features(entity_df, features=<feature service>)`` (DuckDB offline store).

One process trains the unsharded model with a plain loop. Under ``torchrun`` (``WORLD_SIZE`` >
1) the same function shards the tables with ``DistributedModelParallel`` (gloo on CPU,
table-wise / column-wise / data-parallel), fuses a row-wise Adagrad into the backward pass and
runs ``TrainPipelineSparseDist``; every rank reads its own share of the entity rows. Either way
the checkpoint is one unsharded ``model.safetensors`` next to ``ranker.json`` (configuration and
vocabularies), so serving loads it without a process group::

    llmfeat ranker train --out runs/ranker_llm
    torchrun --nproc_per_node=2 -m ranker.cli train --out runs/ranker_llm

Where each part lives: :mod:`ranker.train.sources` (entity rows, Feast point-in-time features),
:mod:`ranker.train.recipe` (``train``), :mod:`ranker.train.loop` (the single-process loop),
:mod:`ranker.train.distributed` (the sharded run), :mod:`ranker.train.checkpoint` (the checkpoint,
the tower) and :mod:`ranker.train.evaluation` (prediction, metrics, ``evaluate``). Import them from here.
"""

from ranker.train.checkpoint import (
    CHECKPOINT_FORMAT,
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    resolve_tower,
    save_checkpoint,
)
from ranker.train.evaluation import (METRICS_FILE, PREDICTIONS_FILE, binary_metrics, evaluate, evaluate_rows,
                                     predict)
from ranker.train.recipe import train
from ranker.train.sources import (ENTITY_COLUMNS, FeatureSource, PrefetchedSource, feast_source, fetch_rows,
                                  load_entities, service_attributes, workspace_for)

__all__ = [
    "CHECKPOINT_FORMAT", "CONFIG_FILE", "ENTITY_COLUMNS", "METRICS_FILE", "PREDICTIONS_FILE", "WEIGHTS_FILE",
    "FeatureSource", "PrefetchedSource", "binary_metrics", "evaluate", "evaluate_rows", "feast_source",
    "fetch_rows", "load_checkpoint", "load_entities", "predict", "resolve_tower", "save_checkpoint",
    "service_attributes", "train",
    "workspace_for",
]

"""Typed configuration of the ranker: one dataclass per command, the model's fields shared.

``ModelConfig`` holds what shapes the network; ``TrainConfig`` nests it (``cfg.model``, its
fields still flat options: ``--llm-mode``) next to the data and optimisation fields of
``llmfeat ranker train``. The CLI options, a JSON/YAML ``--config`` file and a Python
call all build the same dataclass (see :mod:`llm_features.config`); numeric options carry their
ranges as field metadata (``"min"``, ``"max"``, ``"min_open"``), checked on the command line, in a
config file and by :func:`llm_features.config.validate_config` (``train`` and ``evaluate`` call it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llm_features.config import data_dir_field, threads_field
from llm_features.errors import UserError

FEATURE_SERVICE_LLM = "ranker_llm"
FEATURE_SERVICE_ID_ONLY = "ranker_id_only"


def default_checkpoint(repo: Path, data_dir: Path | None, llm_features: bool = True) -> Path:
    """``<data_dir>/runs/ranker_llm`` (or ``ranker_id_only``): where ``ranker train`` writes by default
    and ``llmfeat demo`` writes its twins."""
    from llm_features.workspace import runs_dir

    return runs_dir(data_dir, repo) / (FEATURE_SERVICE_LLM if llm_features else FEATURE_SERVICE_ID_ONLY)


@dataclass
class ModelConfig:
    """The network: sparse tables, dense inputs and the DLRM interaction."""

    llm_features: bool = field(
        default=True,
        metadata={"help": "Feed the LLM user and item embeddings as dense inputs (feature service ranker_llm); "
                          "--no-llm-features builds the id-only twin (ranker_id_only)."},
    )
    llm_inputs: tuple[str, ...] = field(
        default=("user_embedding", "item_embedding"),
        metadata={"help": "Which LLM embeddings the LLM twin reads (repeatable): user_embedding, item_embedding."},
    )
    recent_items_bag: bool = field(
        default=True,
        metadata={"help": "Add the user's recent item ids as a sparse bag (both twins: the LLM twin is the id-only "
                          "twin plus LLM features)."},
    )
    llm_mode: Literal["score", "interaction", "dense"] = field(
        default="score",
        metadata={"help": "How LLM vectors enter. score (default): the fine-tuned tower's own CTR head scores the "
                          "(user, item) pair and that logit joins the dense arch's numeric inputs (the vectors "
                          "themselves do not); interaction projects each vector (LayerNorm, dropout, Linear d->D) "
                          "to one more feature of the interaction arch; dense feeds the vectors to the dense arch."},
    )
    score_offset: bool = field(
        default=False,
        metadata={"help": "llm_mode=score: also add the tower's logit to the ranker's output, so the ids and the "
                          "other features learn the rest (a residual on the tower) rather than weigh it."},
    )
    llm_dropout: float = field(
        default=0.0, metadata={"min": 0.0, "help": "Dropout on the normalised LLM vectors during training (< 1)."}
    )
    extra_numeric: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Numeric feature columns of the feature rows to feed the dense arch as they are (repeatable); "
                          "a missing value becomes 0."},
    )
    embedding_dim: int = field(default=16, metadata={"min": 1,
        "help": "Width D of every sparse embedding table."})
    dense_hidden: tuple[int, ...] = field(
        default=(128,), metadata={"min": 1, "help": "Hidden sizes of the dense arch (its last layer is D)."}
    )
    over_hidden: tuple[int, ...] = field(
        default=(64, 32), metadata={"min": 1,
            "help": "Hidden sizes of the over arch (its last layer is the logit)."}
    )
    interaction: Literal["dcn", "dot"] = field(
        default="dcn", metadata={"help": "dcn: DLRM_DCN (low-rank DCNv2 cross net); dot: DLRM pairwise dots."}
    )
    dcn_num_layers: int = field(default=2, metadata={"min": 1,
        "help": "Cross layers of the DCN interaction."})
    dcn_low_rank_dim: int = field(default=16, metadata={"min": 1,
        "help": "Low-rank width of each DCN cross layer."})
    max_recent_items: int = field(default=30, metadata={"min": 1,
        "help": "Keep at most this many recent items per row."})

    def __post_init__(self) -> None:
        if self.llm_mode not in ("score", "interaction", "dense"):
            raise UserError(f"llm_mode must be score, interaction or dense, got {self.llm_mode!r}",
                            option="--llm-mode")
        if not 0.0 <= self.llm_dropout < 1.0:
            raise UserError(f"llm_dropout must be in [0, 1), got {self.llm_dropout}", option="--llm-dropout")
        unknown = sorted(set(self.llm_inputs) - {"user_embedding", "item_embedding"})
        if unknown or not self.llm_inputs:
            raise UserError(
                f"llm_inputs must name user_embedding and/or item_embedding, got {list(self.llm_inputs)}",
                option="--llm-inputs",
            )
        self.llm_inputs = tuple(self.llm_inputs)
        if self.llm_features and self.llm_mode == "score" and set(self.llm_inputs) != {"user_embedding",
                                                                                        "item_embedding"}:
            raise UserError("llm_mode=score scores (user_embedding, item_embedding) pairs: it needs both "
                            f"--llm-inputs, got {list(self.llm_inputs)}", option="--llm-inputs",
                            fix="Use --llm-mode interaction for one.")
        self.extra_numeric = tuple(self.extra_numeric)
        self.dense_hidden = tuple(self.dense_hidden)
        self.over_hidden = tuple(self.over_hidden)

    @property
    def use_recent_items(self) -> bool:
        return self.recent_items_bag

    @property
    def feature_service(self) -> str:
        return FEATURE_SERVICE_LLM if self.llm_features else FEATURE_SERVICE_ID_ONLY

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(ModelConfig)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """The config a checkpoint saved: its encoder's ``model``, or a saved ``train_config`` (the
        nested form, ``{"model": {...}, ...}``, or the flat one of checkpoints written before)."""
        if isinstance(data.get("model"), dict):
            data = data["model"]
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        kwargs.setdefault("llm_mode", "dense")  # checkpoints written before the option existed
        if kwargs.get("recent_items_bag", False) is None:  # checkpoints of the old "id-only twin only" default
            kwargs["recent_items_bag"] = not kwargs.get("llm_features", True)
        return cls(**kwargs)


@dataclass
class TrainConfig:
    """``llmfeat ranker train``: Feast point-in-time rows of the train split in, a checkpoint out."""

    model: ModelConfig = field(default_factory=ModelConfig)
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "Feast repository (feature_store.yaml)."})
    data_dir: Path | None = data_dir_field()
    out: Path | None = field(default=None, metadata={
        "help": "Checkpoint directory to write (default: <data_dir>/runs/ranker_llm, with --no-llm-features "
                "<data_dir>/runs/ranker_id_only, as in llmfeat demo)."})
    tower: Path | None = field(
        default=None,
        metadata={"help": "llm_mode=score: the fine-tuned checkpoint (llmfeat finetune --out) whose CTR head scores "
                          "the pairs; default: the one that wrote the workspace's user_embeddings (checked either "
                          "way). Its head is copied, frozen, into the ranker checkpoint."},
    )
    epochs: int = field(
        default=8,
        metadata={"min": 1,
            "help": "Most passes over the train split. With the valid split (--validate), training stops once "
                          "the valid AUC has not improved for --patience epochs and keeps the best epoch's weights."},
    )
    patience: int = field(
        default=1, metadata={"min": 1,
            "help": "Epochs without a better valid AUC before training stops (early stopping)."}
    )
    batch_size: int = field(default=512, metadata={"min": 1,
        "help": "Rows per step (per process when distributed)."})
    lr: float = field(default=1e-3, metadata={"min_open": 0.0,
        "help": "Adam learning rate of the dense parts."})
    sparse_lr: float = field(default=0.05, metadata={"min_open": 0.0,
        "help": "(Row-wise) Adagrad learning rate of the tables."})
    oov_dropout: float = field(
        default=0.02,
        metadata={"min": 0.0, "max": 1.0,
            "help": "Training-time probability of replacing a user/item id by the OOV row, so that row "
                          "learns what an unseen id means."},
    )
    missing_dropout: float = field(
        default=0.02,
        metadata={"min": 0.0, "max": 1.0,
            "help": "Training-time probability of marking an LLM embedding missing, so the learned "
                          "'missing' vector is trained even when every training row has one."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and shuffling."})
    max_train_rows: int | None = field(
        default=None, metadata={"min": 1, "help": "Use only the last N train interactions (quick runs)."}
    )
    validate: bool = field(
        default=True, metadata={"help": "Report AUC/LogLoss on the valid split after training."}
    )
    chunk_rows: int = field(
        default=100_000, metadata={"min": 1,
            "help": "Entity rows per get_historical_features call (bounds memory)."}
    )
    sharding: Literal["auto", "table_wise", "column_wise", "data_parallel"] = field(
        default="auto", metadata={"help": "Table sharding under torchrun (ignored in a single process)."}
    )
    threads: int | None = threads_field(aliases=("--num-threads",))
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"must be at least 1, got {self.epochs}", option="--epochs")
        if self.patience < 1:
            raise UserError(f"must be at least 1, got {self.patience}", option="--patience")
        if self.out is None:
            self.out = default_checkpoint(self.repo, self.data_dir, self.model.llm_features)


@dataclass
class EvaluateConfig:
    """``llmfeat ranker evaluate``: AUC and LogLoss of a checkpoint on one split."""

    checkpoint: Path | None = field(default=None, metadata={
        "help": "Directory written by ranker train (default: <data_dir>/runs/ranker_llm)."})
    split: Literal["train", "valid", "test"] = field(default="test", metadata={"help": "Split to evaluate."})
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "Feast repository (feature_store.yaml)."})
    data_dir: Path | None = data_dir_field()
    out: Path | None = field(
        default=None, metadata={"help": "Where metrics.json goes; default <checkpoint>/eval-<split>."}
    )
    batch_size: int = field(default=4096, metadata={"min": 1, "help": "Rows per forward pass."})
    chunk_rows: int = field(default=100_000, metadata={"min": 1,
        "help": "Entity rows per get_historical_features call."})
    max_rows: int | None = field(default=None, metadata={"min": 1,
        "help": "Evaluate only the first N rows of the split."})
    threads: int | None = threads_field(aliases=("--num-threads",))

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            self.checkpoint = default_checkpoint(self.repo, self.data_dir)


@dataclass
class ScoreConfig:
    """``llmfeat ranker score``: rank candidate items for one user from the online store."""

    checkpoint: Path | None = field(default=None, metadata={
        "help": "Directory written by ranker train (default: <data_dir>/runs/ranker_llm)."})
    user_id: int = field(default=1, metadata={"help": "The user to score for."})
    items: tuple[str, ...] = field(
        default=(), metadata={"help": "Candidate item ids: repeat the option or give a comma-separated list."}
    )
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "Feast repository (feature_store.yaml)."})
    data_dir: Path | None = data_dir_field()
    top_k: int | None = field(default=None, metadata={"min": 1, "help": "Print only the best K items."})
    out: Path | None = field(
        default=None, metadata={"help": "Where metrics.json goes; default <checkpoint>/score."}
    )

    def __post_init__(self) -> None:
        if self.checkpoint is None:
            self.checkpoint = default_checkpoint(self.repo, self.data_dir)

    def item_ids(self) -> list[int]:
        ids: list[int] = []
        for chunk in self.items:
            for tok in str(chunk).replace(",", " ").split():
                try:
                    ids.append(int(tok))
                except ValueError:
                    raise UserError(f"{tok!r} is not an item id (an integer)", option="--items",
                                    fix="Give integer ids: --items 1,2,3 or repeat --items.") from None
        return ids


@dataclass
class ServeConfig:
    """``llmfeat serve``: the ranker behind HTTP (:mod:`ranker.service`)."""

    ranker: Path | None = field(default=None, metadata={
        "help": "Directory written by ranker train (default: <data_dir>/runs/ranker_llm)."})
    repo: Path = field(default=Path("feast_repo"), metadata={"help": "Feast repository (feature_store.yaml)."})
    data_dir: Path | None = data_dir_field()
    feature_store_yaml: Path | None = field(default=None, metadata={
        "help": "Another configuration of the repo to serve from, e.g. production/feature_store.redis.yaml "
                "(relative to the repo; default feature_store.yaml)."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to bind (0.0.0.0: every interface; put TLS and access control in front)."})
    port: int = field(default=8000, metadata={"min": 1, "max": 65535, "help": "TCP port."})
    workers: int = field(default=1, metadata={"min": 1, "help": (
        "Worker processes (each loads the model and scores one request at a time; about one per core).")})
    threads: int = threads_field(1, "torch intra-op threads per worker (a 100-candidate forward pass gains nothing "
                                    "from more).", aliases=("--num-threads",))
    max_candidates: int = field(default=1000, metadata={"min": 1,
        "help": "Most item_ids one request may ask for (more: 422)."})
    max_body_bytes: int = field(default=1_048_576, metadata={"min": 64,
        "help": "Largest request body (more: 413, refused before it is read)."})
    refresh_seconds: float = field(default=5.0, metadata={"min_open": 0.0, "help": (
        "How often each worker looks in the registry for a new materialisation of the item views (its "
        "cached item inputs are then re-read).")})
    finetune: Path | None = field(default=None, metadata={
        "help": "Fine-tuned checkpoint that POST /events runs (default: <data_dir>/runs/finetune)."})
    enable_events: bool = field(default=False, metadata={"help": (
        "Serve POST /events; clients must send `Authorization: Bearer $LLMFEAT_SERVE_TOKEN` (the token is "
        "read from that environment variable only).")})

    def __post_init__(self) -> None:
        if self.ranker is None:
            self.ranker = default_checkpoint(self.repo, self.data_dir)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value

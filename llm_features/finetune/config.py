"""The ``llmfeat finetune`` configuration: one typed dataclass, the CLI options map onto it one to one."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from llm_features.backbone import Backbone, BackboneConfig
from llm_features.config import RuntimeArgs, config_dict, data_dir_field, validate_config
from llm_features.errors import UserError

if TYPE_CHECKING:
    from llm_features.finetune.checkpoint import ResumeSet

# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "log_every", "save_every", "device", "num_threads",
                     "eval_batch_size", "attention", "micro_batch_tokens", "out", "trust_remote_code",
                     "measure_memory"}


@dataclass
class FinetuneConfig:
    """Train the deep layers and the CTR head (BAHE), with DTI or sliding-window packing.

    ``backbone`` (``--model``, ``--split-layer``, ``--pooling``, ...) must describe the model that
    encoded the workspace's atomic behaviour and item embeddings.
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data_dir: Path | None = data_dir_field()
    out: Path | None = field(default=None, metadata={
        "help": "Checkpoint directory to write (default: <data_dir>/runs/finetune, as in llmfeat demo)."})
    granularity: Literal["behavior", "token"] = field(
        default="behavior",
        metadata={"help": "behavior: deep layers over cached behaviour vectors (BAHE); token: all layers over text."},
    )
    packing: Literal["dti", "sliding-window"] = field(
        default="dti", metadata={"help": "dti: k targets per sequence; sliding-window: one target per sequence."}
    )
    context_size: int = field(
        default=30, metadata={"help": "n: strictly earlier interactions a target sees.", "min": 1}
    )
    targets_per_sequence: int = field(default=128, metadata={
        "help": "k: targets packed per sequence (DTI).", "min": 1})
    leakage: Literal["windowed", "block", "isolated"] = field(
        default="isolated",
        metadata={"help": "How far back a context token may look: its own n-window, the whole packed block, "
                          "or only itself (isolated: exact DTI = sliding window for any k, so embed-users packs "
                          "k snapshots per sequence and serves the states the tower trained on)."},
    )
    eval_targets_per_sequence: int | None = field(default=None, metadata={
        "help": "k used for valid/test (default: the training k; 1 = sliding window).", "min": 1})
    feedback: Literal["rating", "label"] = field(
        default="rating", metadata={"help": "Feedback f_j added to a context: the rating where known, or the label."}
    )
    distance_bias: Literal["auto", "learned", "alibi", "none"] = field(
        default="auto",
        metadata={"help": "Relative behaviour-distance attention bias; auto: learned for absolute-position "
                          "models (MiniLM), none for RoPE models (explicit position ids)."},
    )
    attention: Literal["auto", "dense", "tiled"] = field(
        default="auto",
        metadata={"help": "Attention over the deep layers: dense L x L masks, tiled (block-sparse: only the mask "
                          "tiles that allow attention are computed) or auto (tiled where clearly cheaper: long "
                          "DTI rows). The same mask either way."},
    )
    dropout: float | None = field(default=None, metadata={
        "help": "Override the dropout probability of the deep layers (default: the model's).", "min": 0.0, "max": 1.0})
    head_hidden: int = field(
        default=256, metadata={"help": "Hidden width of the CTR head MLP over [u, v, u*v].", "min": 1}
    )
    epochs: int = field(
        default=2,
        metadata={"help": "Passes over the training targets; the epoch with the best valid AUC is the one saved.",
            "min": 1},
    )
    max_steps: int | None = field(default=None, metadata={"help": "Stop after this many optimizer steps.",
        "min": 1})
    batch_size: int = field(
        default=512,
        metadata={"help": "Targets per optimizer step (sequences per step = about batch_size / k, at least one).",
            "min": 1},
    )
    micro_batch_tokens: int = field(
        default=4096,
        metadata={"help": "Run each optimizer step in forward/backward passes of at most this many sequence "
                          "positions, accumulating gradients (the same step; bounds memory and keeps "
                          "CPU caches warm). 0 = one pass per step.", "min": 0},
    )
    eval_batch_size: int = field(default=1024, metadata={"help": "Targets per evaluation batch.", "min": 1})
    lr: float = field(default=1e-4, metadata={"help": "Learning rate of the deep layers (or LoRA adapters).",
        "min_open": 0.0})
    head_lr: float = field(
        default=2e-3, metadata={"help": "Learning rate of the new parts (head, Q, F, bias).", "min_open": 0.0}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay.", "min": 0.0})
    adam_beta1: float = field(
        default=0.9,
        metadata={"help": "AdamW beta1 (gradient momentum, below 1): higher averages the gradients of more steps.",
                  "min": 0.0},
    )
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2 (below 1).", "min": 0.0})
    warmup_steps: int = field(default=30, metadata={"help": "Linear warm-up steps, then linear decay to 0.",
        "min": 0})
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm (0 = off).", "min": 0.0})
    ema_decay: float = field(
        default=0.0,
        metadata={"help": "Keep an exponential moving average of the trained weights with this decay (e.g. "
                          "0.995) and evaluate, save and export it instead of the last weights (0 = off; below 1).",
                              "min": 0.0},
    )
    seed: int = field(default=0, metadata={"help": "Random seed (data order, initialisation, dropout).",
        "min": 0})
    data_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the --limit-users sample and the --max-targets cap (default: --seed), so that "
                          "runs with different --seed can train on the same users.", "min": 0},
    )
    limit_users: int | None = field(
        default=None, metadata={"help": "Use a seeded sample of this many users.", "min": 1}
    )
    max_targets: int | None = field(
        default=None, metadata={"help": "Cap the targets of each split (whole users in a seeded order; the same targets for every k).",
            "min": 1}
    )
    folds: int = field(
        default=1,
        metadata={"help": "Cross-fitting: users fall into this many folds by a fixed hash of their id (see --fold).",
            "min": 1},
    )
    fold: int | None = field(
        default=None,
        metadata={"help": "Train only on users outside this fold (0..folds-1), so that the embeddings of its users "
                          "come from a tower that never saw their labels; valid/test keep every user.",
                              "min": 0},
    )
    lora: bool = field(
        default=False, metadata={"help": "Train LoRA adapters on the deep layers (default: full FT)."}
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank.", "min": 1})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha.", "min": 1})
    runtime: RuntimeArgs = field(default_factory=RuntimeArgs)
    log_every: int = field(default=50, metadata={"help": "Log the training loss every this many steps.",
        "min": 0})
    save_every: int = field(
        default=0, metadata={"help": "Also checkpoint every this many steps (0: per epoch).", "min": 0}
    )
    measure_memory: bool = field(
        default=False,
        metadata={"help": "Also report the memory the training steps add over what loading left "
                          "(train_rss_increase_mb, ...; for benchmarks: it collects garbage, trims malloc and resets "
                          "the process's peak-RSS counter around training)."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the last complete checkpoint in --out (its resume/ set) if there is one."},
    )

    def __post_init__(self) -> None:
        if self.out is None:
            from llm_features.workspace import runs_dir

            self.out = runs_dir(self.data_dir) / "finetune"
        if self.folds < 1:
            raise UserError(f"--folds must be >= 1, got {self.folds}")
        if self.fold is not None and not 0 <= self.fold < self.folds:
            raise UserError(f"--fold must be in 0..{self.folds - 1} (with --folds {self.folds}), got {self.fold}")

    @property
    def sample_seed(self) -> int:
        """The seed that picks the users and targets of the run."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def k(self) -> int:
        """Training targets per sequence after ``packing``."""
        return 1 if self.packing == "sliding-window" else self.targets_per_sequence

    @property
    def eval_k(self) -> int:
        return self.eval_targets_per_sequence or self.k


def check_finetune_config(cfg: FinetuneConfig) -> None:
    """Every option of ``cfg`` in its range (as on the command line), and the rules between options:
    a :class:`UserError` naming the first bad one. The library entry points call it, so the Python
    API refuses what the command line refuses."""
    validate_config(cfg)
    for name in ("adam_beta1", "adam_beta2", "ema_decay"):
        value = getattr(cfg, name)
        if value >= 1.0:
            raise UserError(f"{value!r} must be less than 1", option="--" + name.replace("_", "-"),
                            fix="AdamW's betas and the weight average's decay are in [0, 1).")
    if cfg.fold is not None and not 0 <= cfg.fold < cfg.folds:
        raise UserError(f"{cfg.fold} is outside 0..{cfg.folds - 1} (with --folds {cfg.folds})", option="--fold")


def config_to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """The options of ``cfg``, one key per command-line option (``metrics.json``'s ``options``)."""
    return config_dict(cfg, nested=False)


def check_resume(cfg: FinetuneConfig, saved: ResumeSet) -> None:
    """Refuse to resume ``saved`` with options that change what is trained."""
    then, now = config_to_dict(saved.cfg), config_to_dict(cfg)
    changed = [k for k, v in then.items() if k not in RESUMABLE_CHANGES and now.get(k) != v]
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')} {then[k]} (now {now.get(k)})" for k in changed[:3])
        raise UserError(f"was trained with {what}", file=Path(cfg.out), option="--resume",
                        fix="Resume with the same options, or choose a new --out.")


def check_split(backbone: Backbone) -> None:
    """Fine-tuning needs layers on both sides of ``--split-layer``."""
    n, split = backbone.num_layers, backbone.split_layer
    if not 1 <= split <= n - 1:
        raise UserError(
            f"{split} leaves the {'shallow' if split == 0 else 'deep'} stack empty: "
            f"{backbone.fingerprint.model_name} has {n} layers", option="--split-layer",
            fix=f"Use 1..{n - 1} (layers below it encode behaviours, the others are fine-tuned)."
            if n > 1 else "Fine-tuning needs a model of two layers or more.")

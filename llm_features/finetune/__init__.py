"""``llmfeat finetune``: train the deep layers and a CTR head over packed behaviour sequences (BAHE + DTI).

Modules, in data-flow order:

- :mod:`~llm_features.finetune.config`: the options (:class:`FinetuneConfig`) and their checks;
- :mod:`~llm_features.finetune.histories`: interactions grouped by user and time, the feedback vocabulary;
- :mod:`~llm_features.finetune.masks`: THE attention-mask builder for every mode;
- :mod:`~llm_features.finetune.packing`: histories to sliding-window / DTI sequences, both granularities;
- :mod:`~llm_features.finetune.batch_rows`: the sequences of a batch laid into its rows;
- :mod:`~llm_features.finetune.data`: a workspace to histories and frozen tables;
- :mod:`~llm_features.finetune.model`: context/query tokens, distance bias, CTR head;
- :mod:`~llm_features.finetune.batches`: each split's targets, the batches of an epoch, the passes of a step;
- :mod:`~llm_features.finetune.optim`: AdamW and the learning-rate schedule;
- :mod:`~llm_features.finetune.evaluation`: logits and AUC / LogLoss over blocks;
- :mod:`~llm_features.finetune.train`: the recipe (:class:`FinetuneRecipe`: setup, train, evaluate, save, cleanup);
- :mod:`~llm_features.finetune.checkpoint_files`: the files of a checkpoint directory, by name;
- :mod:`~llm_features.finetune.checkpoint`: writing and resuming a run's checkpoint;
- :mod:`~llm_features.finetune.loading`: a finished checkpoint checked and loaded (:func:`load_finetuned`).
"""

from llm_features.finetune.config import FinetuneConfig
from llm_features.finetune.loading import load_finetuned
from llm_features.finetune.masks import SequenceLayout, allowed_attention, attention_bias, interaction_distance
from llm_features.finetune.model import CTRHead, DistanceBias, FinetuneModel
from llm_features.finetune.packing import (
    BehaviorPacker,
    Blocks,
    PackedBatch,
    TokenPacker,
    UserHistories,
    batch_indices,
    make_blocks,
    make_packer,
)
from llm_features.finetune.train import FinetuneRecipe, evaluate, finetune

__all__ = [
    "BehaviorPacker", "Blocks", "CTRHead", "DistanceBias", "FinetuneConfig", "FinetuneModel", "FinetuneRecipe",
    "PackedBatch",
    "SequenceLayout", "TokenPacker", "UserHistories", "allowed_attention", "attention_bias", "evaluate",
    "finetune", "interaction_distance", "batch_indices", "load_finetuned", "make_blocks", "make_packer",
]

"""TorchRec ranker over the llmfeat Feast features.

- :mod:`ranker.features` -- Feast feature rows to batches (vocabularies with an OOV row, dense LLM
  slots with missing flags, KeyedJaggedTensors) and the missing-feature policy.
- :mod:`ranker.model` -- ``RankingModel`` (DLRM / DLRM_DCN arches + LLM dense slots), ``RankingTrain``.
- :mod:`ranker.train` -- ``train`` (single process, or DMP + TrainPipelineSparseDist under torchrun),
  ``evaluate``, checkpoints.
- :mod:`ranker.serve` -- ``Ranker.load(path).score(user_id, item_ids)`` from the online store.
- :mod:`ranker.cli` -- ``llmfeat ranker train|evaluate|score``.

Submodules are imported on use: ``import ranker`` does not import torchrec.
"""

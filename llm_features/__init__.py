"""llmfeat: LLM-derived user and item features (BAHE + DTI) served through Feast.

Data flows one way through the stages of this package:
``ingest -> encode -> finetune -> embed -> store``; the TorchRec ranker in ``ranker/``
consumes what the store serves.
"""

__version__ = "0.1.0"

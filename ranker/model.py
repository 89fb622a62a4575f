"""The ranking network: TorchRec's DLRM arches over sparse ids plus LLM vectors as dense input.

Shapes: ``B`` rows, ``F`` sparse features, ``D`` embedding width, ``F_dense`` dense columns.

The LLM user and item embeddings enter as dense features (option A of the TorchRec notes): the
dense block ``[numeric | user_vec, user_flag | item_vec, item_flag]`` goes through
:class:`LLMVectorInput` per LLM slot and then the DLRM dense arch. The id-only twin is the same
class with no LLM slots (``ModelConfig.llm_features=False``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN

from ranker.features import NUMERIC_FEATURES, FeatureEncoder


class LLMVectorInput(nn.Module):
    """One LLM embedding slot: normalised vector, or a learned "missing" vector when flagged.

    Args:
        dim: width ``d`` of the LLM embedding.

    Input ``[B, d + 1]`` (vector, missing flag in the last column); output ``[B, d + 1]``: rows
    with flag 1 carry the learned ``missing`` vector, the others the LayerNorm of their vector;
    the flag is passed on so the next layers know which is which.

    Example::

        slot = LLMVectorInput(4)
        x = torch.cat([torch.randn(2, 4), torch.tensor([[0.0], [1.0]])], dim=1)
        slot(x).shape  # torch.Size([2, 5])
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.missing = nn.Parameter(torch.randn(dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vec, flag = x[:, :-1], x[:, -1:]
        vec = torch.where(flag > 0.5, self.missing.expand_as(vec), self.norm(vec))
        return torch.cat([vec, flag], dim=1)


class RankingModel(nn.Module):
    """DLRM / DLRM_DCN over an ``EmbeddingBagCollection`` with optional LLM dense slots.

    Args:
        encoder: the fitted :class:`FeatureEncoder` (tables, dense layout, model config).
        device: device of the dense parts.
        sparse_device: device of the embedding tables (``meta`` to let DMP allocate shards).

    Call with ``dense_features [B, F_dense]`` and a KJT of the ``F`` sparse features; returns
    logits ``[B]``.

    Example::

        model = RankingModel(encoder)
        batch = encoder.encode(frame).batch(np.arange(8))
        model(batch.dense_features, batch.sparse_features).shape  # torch.Size([8])
    """

    def __init__(
        self,
        encoder: FeatureEncoder,
        device: torch.device | None = None,
        sparse_device: torch.device | None = None,
    ) -> None:
        super().__init__()
        cfg = encoder.model
        ebc = EmbeddingBagCollection(tables=encoder.tables(), device=sparse_device or device)
        llm_dims = list(encoder.llm_dims.values())
        self.llm_inputs = nn.ModuleList(LLMVectorInput(d) for d in llm_dims)
        if device is not None:
            self.llm_inputs.to(device)
        # Column ranges of the dense block: numeric first, then (vector, flag) per LLM slot.
        self._numeric = len(NUMERIC_FEATURES)
        starts = [self._numeric + sum(d + 1 for d in llm_dims[:i]) for i in range(len(llm_dims))]
        self._slots = [(s, s + d + 1) for s, d in zip(starts, llm_dims)]
        dense_sizes = list(cfg.dense_hidden) + [cfg.embedding_dim]
        over_sizes = list(cfg.over_hidden) + [1]
        if cfg.interaction == "dcn":
            self.dlrm: DLRM = DLRM_DCN(
                embedding_bag_collection=ebc,
                dense_in_features=encoder.dense_dim,
                dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes,
                dcn_num_layers=cfg.dcn_num_layers,
                dcn_low_rank_dim=cfg.dcn_low_rank_dim,
                dense_device=device,
            )
        else:
            self.dlrm = DLRM(
                embedding_bag_collection=ebc,
                dense_in_features=encoder.dense_dim,
                dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes,
                dense_device=device,
            )

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollection:
        return self.dlrm.sparse_arch.embedding_bag_collection

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        if self._slots:  # plain slicing keeps the module fx-traceable (TrainPipelineSparseDist traces it)
            pieces = [dense_features[:, : self._numeric]]
            for slot, (start, end) in zip(self.llm_inputs, self._slots):
                pieces.append(slot(dense_features[:, start:end]))
            dense_features = torch.cat(pieces, dim=1)
        return self.dlrm(dense_features, sparse_features).squeeze(-1)


class RankingTrain(nn.Module):
    """Training wrapper (like ``DLRMTrain``): owns the BCE loss.

    Returns ``(loss, (loss, logits [B], labels [B]))``, detached in the inner tuple, which is the
    contract of ``TrainPipelineSparseDist``.
    """

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features)
        loss = self.loss_fn(logits, batch.labels.float())
        return loss, (loss.detach(), logits.detach(), batch.labels.detach())

"""The ranking network: TorchRec's DLRM arches over sparse ids plus LLM vectors as dense input.

Shapes: ``B`` rows, ``F`` sparse features, ``D`` embedding width, ``F_dense`` dense columns.

The LLM user and item embeddings arrive in the dense block ``[numeric | user_vec, user_flag |
item_vec, item_flag]``. By default (``llm_mode=score``) the fine-tuned tower's frozen CTR head
(:class:`TowerScore`) turns each (user, item) pair into one logit that joins the numeric inputs of
the DLRM dense arch; the other modes feed the vectors themselves (:class:`LLMVectorInput` per
slot). The id-only twin is the same class with no LLM slots (``ModelConfig.llm_features=False``).
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN, InteractionArch, InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet

from ranker.features import FeatureEncoder


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


class TowerScore(nn.Module):
    """The fine-tuned tower's CTR head ``H(u, v)``, frozen: its logit for each (user, item) pair.

    Args:
        user_dim: width of the user embedding ``u``.
        item_dim: width of the item embedding ``v``.
        hidden: hidden width of the head (``llmfeat finetune --head-hidden``).

    Input ``u [B, d_u]``, ``v [B, d_v]`` and the two missing flags ``[B, 1]``; output ``[B, 1]``:
    the head's logit, 0 where either vector is missing (the flags go to the dense arch beside it,
    so the model knows a 0 from a missing score). The weights come from the finetune checkpoint
    (:meth:`load_tower`) and are saved with the ranker, so serving needs nothing else.

    Example::

        score = TowerScore(384, 384, 256)
        score(torch.randn(2, 384), torch.randn(2, 384), torch.zeros(2, 1), torch.zeros(2, 1)).shape  # [2, 1]
    """

    def __init__(self, user_dim: int, item_dim: int, hidden: int) -> None:
        super().__init__()
        from llm_features.finetune.model import CTRHead

        self.head = CTRHead(user_dim, item_dim, hidden)
        self.head.requires_grad_(False)

    def forward(self, user: torch.Tensor, item: torch.Tensor, user_missing: torch.Tensor,
                item_missing: torch.Tensor, one_user: bool = False) -> torch.Tensor:
        # one_user: every row is the same user (serving): the head folds it into its first layer
        logit = (self.head.one_user(user[:1], item) if one_user else self.head(user, item)).unsqueeze(-1)
        return torch.where((user_missing > 0.5) | (item_missing > 0.5), torch.zeros_like(logit), logit)

    def load_tower(self, state: dict[str, torch.Tensor]) -> None:
        """Copy the ``head.*`` tensors of a finetune checkpoint's ``model.safetensors``."""
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        self.head.load_state_dict(head)


class RankingModel(nn.Module):
    """DLRM / DLRM_DCN over an ``EmbeddingBagCollection`` with optional LLM slots.

    Args:
        encoder: the fitted :class:`FeatureEncoder` (tables, dense layout, model config).
        device: device of the dense parts.
        sparse_device: device of the embedding tables (``meta`` to let DMP allocate shards).

    Call with ``dense_features [B, F_dense]`` and a KJT of the ``F`` sparse features; returns
    logits ``[B]``.

    How an LLM slot enters (``ModelConfig.llm_mode``):

    * ``score`` (default): ``H(u, v)`` of the tower's frozen head (:class:`TowerScore`) and the two
      missing flags join the numeric features of the dense arch; with ``score_offset`` the logit is
      also added to the output.
    * ``interaction``: the slot's vector (normalised, or the learned missing vector) is
      projected ``d -> D`` and joins the ``F`` id embeddings as one more feature of the
      interaction arch, so the cross net / dot products pair it with the ids and with the other
      LLM vector; the missing flags go to the dense arch with the numeric features. The arches
      are torchrec's own (``DenseArch``, ``SparseArch``, ``InteractionDCNArch`` /
      ``InteractionArch``, ``OverArch``), sized for ``F + n_llm`` features.
    * ``dense``: the whole ``[numeric | vector, flag | ...]`` block goes through the dense arch.

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
        self._score = bool(llm_dims) and cfg.llm_mode == "score"
        self._score_offset = self._score and cfg.score_offset
        self.tower_score = None
        if self._score:
            if encoder.tower_hidden is None:
                raise ValueError("llm_mode=score needs the tower's head: train with --tower (or embed-users first)")
            self.tower_score = TowerScore(encoder.llm_dims["user_embedding"], encoder.llm_dims["item_embedding"],
                                          encoder.tower_hidden)
            if device is not None:
                self.tower_score.to(device)
        self.llm_inputs = nn.ModuleList(LLMVectorInput(d) for d in llm_dims)
        self.llm_dropout = nn.Dropout(cfg.llm_dropout)
        self._interaction = bool(llm_dims) and cfg.llm_mode == "interaction"
        self.llm_proj = nn.ModuleList(
            nn.Linear(d, cfg.embedding_dim) for d in (llm_dims if self._interaction else [])
        )
        if device is not None:
            self.llm_inputs.to(device)
            self.llm_proj.to(device)
        # Column ranges of the dense block: numeric first, then (vector, flag) per LLM slot.
        self._numeric = encoder.numeric_dim
        starts = [self._numeric + sum(d + 1 for d in llm_dims[:i]) for i in range(len(llm_dims))]
        self._slots = [(s, s + d + 1) for s, d in zip(starts, llm_dims)]
        dense_in = self._numeric + len(llm_dims) if self._interaction else encoder.dense_dim
        if self._score:  # numeric, the tower's logit and the two missing flags
            self._slot_names = list(encoder.llm_dims)
            dense_in = self._numeric + 1 + len(llm_dims)
        dense_sizes = list(cfg.dense_hidden) + [cfg.embedding_dim]
        over_sizes = list(cfg.over_hidden) + [1]
        if cfg.interaction == "dcn":
            self.dlrm: DLRM = DLRM_DCN(
                embedding_bag_collection=ebc,
                dense_in_features=dense_in,
                dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes,
                dcn_num_layers=cfg.dcn_num_layers,
                dcn_low_rank_dim=cfg.dcn_low_rank_dim,
                dense_device=device,
            )
        else:
            self.dlrm = DLRM(
                embedding_bag_collection=ebc,
                dense_in_features=dense_in,
                dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes,
                dense_device=device,
            )
        if self._interaction:  # resize the interaction and over arches for F + n_llm features
            num = len(self.dlrm.sparse_arch.sparse_feature_names) + len(llm_dims)
            dim = cfg.embedding_dim
            if cfg.interaction == "dcn":
                width = (num + 1) * dim
                cross = LowRankCrossNet(in_features=width, num_layers=cfg.dcn_num_layers,
                                        low_rank=cfg.dcn_low_rank_dim)
                self.dlrm.inter_arch = InteractionDCNArch(num_sparse_features=num, crossnet=cross)
            else:
                width = dim + num * (num + 1) // 2
                self.dlrm.inter_arch = InteractionArch(num_sparse_features=num)
            self.dlrm.over_arch = OverArch(in_features=width, layer_sizes=over_sizes, device=device)
            if device is not None:
                self.dlrm.inter_arch.to(device)

    @property
    def embedding_bag_collection(self) -> EmbeddingBagCollection:
        return self.dlrm.sparse_arch.embedding_bag_collection

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        return self._logits(dense_features, sparse_features)

    def pooled_embeddings(self, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """The sparse features' pooled embeddings ``[B, F, D]`` (what the interaction arch reads)."""
        return self.dlrm.sparse_arch(sparse_features)

    def forward_one_user(self, dense_features: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for ``B`` candidates of one user (every row's user columns are equal), from
        the pooled embeddings ``[B, F, D]`` (:meth:`pooled_embeddings`, which a server can cache per
        item) instead of the KJT: the same logits ``[B]`` up to float rounding."""
        return self._logits(dense_features, pooled, pooled=True, one_user=True)

    def _dlrm(self, dense: torch.Tensor, sparse: KeyedJaggedTensor | torch.Tensor, pooled: bool) -> torch.Tensor:
        if not pooled:
            return self.dlrm(dense, sparse)
        d = self.dlrm  # DLRM.forward with the sparse arch's output given
        return d.over_arch(d.inter_arch(dense_features=d.dense_arch(dense), sparse_features=sparse))

    def _logits(self, dense_features: torch.Tensor, sparse: KeyedJaggedTensor | torch.Tensor,
                pooled: bool = False, one_user: bool = False) -> torch.Tensor:
        # (pooled and one_user are Python constants, so forward stays fx-traceable)
        if not self._slots:
            return self._dlrm(dense_features, sparse, pooled).squeeze(-1)
        # plain slicing keeps the module fx-traceable (TrainPipelineSparseDist traces it)
        numeric = dense_features[:, : self._numeric]
        if self._score:
            raw = {name: dense_features[:, start:end] for name, (start, end) in zip(self._slot_names, self._slots)}
            u, v = raw["user_embedding"], raw["item_embedding"]
            flags = [u[:, -1:], v[:, -1:]]
            score = self.tower_score(u[:, :-1], v[:, :-1], *flags, one_user=one_user)
            out = self._dlrm(torch.cat([numeric, score] + flags, dim=1), sparse, pooled).squeeze(-1)
            return out + score.squeeze(-1) if self._score_offset else out
        slots = [slot(dense_features[:, start:end]) for slot, (start, end) in zip(self.llm_inputs, self._slots)]
        if not self._interaction:
            pieces = [numeric] + [torch.cat([self.llm_dropout(x[:, :-1]), x[:, -1:]], dim=1) for x in slots]
            return self._dlrm(torch.cat(pieces, dim=1), sparse, pooled).squeeze(-1)
        flags = [x[:, -1:] for x in slots]
        projected = [proj(self.llm_dropout(x[:, :-1])).unsqueeze(1) for proj, x in zip(self.llm_proj, slots)]
        embedded_dense = self.dlrm.dense_arch(torch.cat([numeric] + flags, dim=1))
        embedded_sparse = sparse if pooled else self.dlrm.sparse_arch(sparse)
        combined = torch.cat([embedded_sparse] + projected, dim=1)
        interacted = self.dlrm.inter_arch(dense_features=embedded_dense, sparse_features=combined)
        return self.dlrm.over_arch(interacted).squeeze(-1)


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

"""The fine-tuning recipe (:class:`FinetuneRecipe`): setup, train, evaluate, save, cleanup.

The deep layers and the CTR head are trained on the targets of the train split; their contexts
may be any strictly earlier interaction of the user, whatever its split. Validation runs on the
valid split after each epoch, and the final AUC / LogLoss are reported on valid and test.

Example::

    from llm_features.finetune import FinetuneConfig, finetune
    metrics = finetune(FinetuneConfig(data_dir=Path("feast_repo/data"), packing="dti", targets_per_sequence=16))
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm_features.atomic import write_json
from llm_features.backbone import Backbone, configure_threads
from llm_features.devices import resolve_device
from llm_features.distributed import init_from_env as init_distributed, round_robin
from llm_features.errors import UserError
from llm_features.finetune.batches import epoch_batches, split_blocks, split_targets, token_groups
from llm_features.finetune.checkpoint import (
    link_into_place, load_resume_set, restore_rng_state, rng_state, save_checkpoint, save_weights,
)
from llm_features.finetune.checkpoint_files import BEST_WEIGHTS, CONFIG, METRICS, TEST_PREDICTIONS, WEIGHTS
from llm_features.finetune.config import (
    FinetuneConfig, check_finetune_config, check_resume, check_split, config_to_dict,
)
from llm_features.finetune.data import FinetuneData, load_finetune_data
from llm_features.finetune.ema import WeightAverage
from llm_features.finetune.evaluation import evaluate, predict
from llm_features.finetune.loading import check_model_files, load_trainable
from llm_features.finetune.memory import ProcessPeakMemory, TrainingMemory, peak_rss_mb
from llm_features.finetune.model import build_model, count_parameters
from llm_features.finetune.optim import make_optimizer, make_scheduler
from llm_features.finetune.packing import Blocks, batch_indices, make_packer
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

# Optimizer steps of each process left out of the steady-state throughput (allocator and optimizer-state
# warm-up, first-touch page faults).
TIMING_WARMUP_STEPS = 2


# ------------------------------------------------------------------------------------------ recipe
BatchSampler = Callable[[Blocks, int, int, int], list[np.ndarray]]
"""``(train blocks, targets per batch, seed, epoch) -> block indices of each batch`` (see :func:`epoch_batches`)."""
PackerFactory = Callable[[FinetuneConfig, FinetuneData, Backbone], Any]
"""``(cfg, data, backbone) -> packer``: a callable ``Blocks -> PackedBatch`` with ``lengths(Blocks)``."""


class FinetuneRecipe:
    """The fine-tuning recipe in the torchtune shape: :meth:`setup`, :meth:`train`, :meth:`evaluate`,
    :meth:`save`, :meth:`cleanup` (:meth:`run` calls them in that order; :func:`finetune` is ``run``).

    Args:
        cfg: every option of the run.
        backbone: an already loaded backbone matching ``cfg`` (tests, notebooks); loaded if None.
        data: already loaded data (tests); read from ``cfg.data_dir`` if None.
        batch_sampler: the training batches of each epoch (default :func:`epoch_batches`); a subclass
            may override :meth:`epoch_batches` instead, to see the recipe's data.
        packer: builds the packer from ``(cfg, data, backbone)`` (default :func:`make_packer`).

    Example::

        recipe = FinetuneRecipe(cfg, batch_sampler=my_batches)
        metrics = recipe.run()
    """

    def __init__(self, cfg: FinetuneConfig, *, backbone: Backbone | None = None, data: FinetuneData | None = None,
                 batch_sampler: BatchSampler = epoch_batches, packer: PackerFactory = make_packer) -> None:
        self.cfg, self.backbone, self.data = cfg, backbone, data
        self.batch_sampler, self.packer_factory = batch_sampler, packer
        self.out = Path(cfg.out)

    # ---------------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Check the options, load the backbone and data, build model, packer, blocks and optimizer; resume."""
        self.started = time.perf_counter()
        self._check_and_load()
        self._build_model()
        self.packer = self.packer_factory(self.cfg, self.data, self.backbone)
        self._make_blocks()
        self._build_optimizer()
        if self.resume is not None:
            self._load_resume()
        self.memory = (TrainingMemory if self.cfg.measure_memory else ProcessPeakMemory)(self.device)
        self.steps_this_process = 0

    def _check_and_load(self) -> None:
        cfg = self.cfg
        # Everything that can refuse the run is checked before any model is loaded or any file written.
        check_finetune_config(cfg)
        self.device = device = resolve_device(cfg.runtime.device)
        self.resume = resume = load_resume_set(self.out) if cfg.resume else None
        if resume is not None:
            check_resume(cfg, resume)
            if self.backbone is None:
                check_model_files(cfg, resume.fingerprint, resume.path / CONFIG)
        if self.data is None:
            interactions = Workspace.at(cfg.data_dir).interactions
            if not interactions.exists():
                raise UserError("not found", file=interactions, option="--data-dir",
                                fix="Run `llmfeat ingest` and `llmfeat encode` for this data dir first.")
        self.rank, self.world = init_distributed(device)
        configure_threads(cfg.runtime.num_threads)
        torch.manual_seed(cfg.seed)
        self.backbone = backbone = self.backbone or Backbone.load(cfg.backbone, device=device)
        check_split(backbone)
        if resume is not None:
            resume.fingerprint.require_same(
                backbone.fingerprint, lambda loaded, trained: f"was trained on fingerprint {trained}, the model "
                f"loaded now is {loaded}", file=resume.path / CONFIG, option="--resume",
                fix="Resume with the model options it was trained with, or choose a new --out.")
        if self.data is None:
            self.data = load_finetune_data(
                cfg.data_dir, backbone.fingerprint, feedback=cfg.feedback,
                need_behavior_vectors=cfg.granularity == "behavior", limit_users=cfg.limit_users,
                seed=cfg.sample_seed,
            )

    def _build_model(self) -> None:
        cfg, backbone, data = self.cfg, self.backbone, self.data
        self.item_dim = int(data.item_table.shape[1])
        self.model = model = build_model(cfg, backbone, self.item_dim)
        if cfg.granularity == "behavior":
            model.init_query(data.behavior_table.mean(0))
        else:
            first = backbone.tokenizer.cls_token_id or backbone.tokenizer.bos_token_id
            if first is not None:
                with torch.no_grad():
                    model.init_query(backbone.embed(torch.tensor([[first]], device=backbone.device))[0, 0]
                                     .float().cpu())
        model.to(self.device)

    def _make_blocks(self) -> None:
        cfg, data = self.cfg, self.data
        self.train_blocks = split_blocks(cfg, data, "train", cfg.k)
        self.valid_blocks = split_blocks(cfg, data, "valid", cfg.eval_k)
        self.test_blocks = split_blocks(cfg, data, "test", cfg.eval_k)
        if len(self.train_blocks) == 0:
            raise UserError("no training targets: the train split is empty (or --fold, --limit-users or "
                            "--max-targets left none)", file=Workspace.at(cfg.data_dir).interactions,
                            fix="Check the split of `llmfeat ingest` and those options.")
        steps_per_epoch = len(batch_indices(self.train_blocks.num_targets, cfg.batch_size))
        self.total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

    def _build_optimizer(self) -> None:
        cfg, model, device = self.cfg, self.model, self.device
        self.optimizer = make_optimizer(model, cfg)
        self.ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        # DDP averages gradients over ranks: each rank's loss is its share of the global batch mean, times world.
        self.forward = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                   else None)
        self.scheduler = make_scheduler(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "train_targets": 0,
                                      "history": []}

    def _load_resume(self) -> None:
        resume = self.resume
        load_trainable(self.model, resume.path / WEIGHTS)
        saved = resume.trainer_state  # unpickled with weights_only=True: tensors and plain data only
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state = state = saved["state"]
        if self.ema is not None:  # model.safetensors holds the average; the trained weights are in the trainer state
            self.ema.load_state_dict(saved["ema"])
            self.ema.load_raw_state(saved["raw_weights"])
        restore_rng_state(saved["rng"])
        if self.rank == 0 and "best" in state and (resume.path / BEST_WEIGHTS).exists():
            # the best epoch as of that step (a later one may have been written before the kill)
            link_into_place(resume.path / BEST_WEIGHTS, self.out / BEST_WEIGHTS)
        log.info("resuming from %s at step %d (epoch %d, batch %d)", resume.path, state["step"], state["epoch"],
                 state["batch"])

    def averaged(self):
        """Evaluate and save the weight average when there is one."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    # ---------------------------------------------------------------------------------------- train
    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The block indices of ``self.train_blocks`` in each batch of ``epoch`` (the batch-sampler seam)."""
        return self.batch_sampler(self.train_blocks, self.cfg.batch_size, self.cfg.seed, epoch)

    def train(self) -> None:
        """Train up to ``total_steps``, validating and checkpointing after each epoch."""
        cfg, state = self.cfg, self.state
        log.info(
            "finetune: %s level, %s (k=%d, n=%d, leakage=%s), %d train targets in %d sequences, %d steps; "
            "%d trainable parameters", cfg.granularity, cfg.packing, cfg.k, cfg.context_size, cfg.leakage,
            int(self.train_blocks.num_targets.sum()), len(self.train_blocks), self.total_steps,
            count_parameters(self.model),
        )
        self.model.train()
        self.done = state["step"] >= self.total_steps
        self.memory.start()
        while not self.done and state["epoch"] < cfg.epochs:
            epoch_loss, epoch_targets = self._train_epoch()
            if len(self.valid_blocks) and state["batch"] == 0 and not self.done:
                self._validate_epoch(epoch_loss / max(1, epoch_targets))
            self.memory.pause()
            self.save()
            self.memory.resume()
        self.memory.stop()

    def _train_epoch(self) -> tuple[float, int]:
        """The rest of the current epoch (or up to ``total_steps``): (summed loss, targets)."""
        cfg, state = self.cfg, self.state
        batches = self.epoch_batches(state["epoch"])
        window_loss, window_targets, t_window = 0.0, 0, time.perf_counter()
        epoch_loss, epoch_targets = 0.0, 0
        while state["batch"] < len(batches):
            batch_loss, global_targets = self._train_step(batches[state["batch"]])
            window_loss += batch_loss
            epoch_loss += batch_loss
            window_targets += global_targets
            epoch_targets += global_targets
            if cfg.log_every and state["step"] % cfg.log_every == 0:
                log.info("step %d/%d epoch %d: loss %.4f, %.0f targets/s", state["step"], self.total_steps,
                         state["epoch"], window_loss / window_targets,
                         window_targets / (time.perf_counter() - t_window))
                window_loss, window_targets, t_window = 0.0, 0, time.perf_counter()
            if state["step"] >= self.total_steps:
                self.done = True
                break
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                self.save()
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
        return epoch_loss, epoch_targets

    def _train_step(self, global_idx: np.ndarray) -> tuple[float, int]:
        """One optimizer step over the blocks ``global_idx`` (this rank's share): (summed loss, targets)."""
        cfg, state, device, rank, world = self.cfg, self.state, self.device, self.rank, self.world
        t0 = time.perf_counter()
        global_targets = int(self.train_blocks.num_targets[global_idx].sum())
        local_idx = round_robin(global_idx, rank, world)  # this rank's blocks of the batch
        weight = 1.0
        if len(local_idx) == 0:  # fewer blocks than ranks: run one block with zero weight to keep DDP in step
            local_idx, weight = global_idx[:1], 0.0
        self.optimizer.zero_grad(set_to_none=True)
        # one optimizer step, in passes of at most micro_batch_tokens positions (gradient accumulation)
        passes = token_groups(self.packer.lengths(self.train_blocks.take(local_idx)), cfg.micro_batch_tokens)
        loss = torch.zeros((), device=device)
        for i, part in enumerate(passes):
            batch = self.packer(self.train_blocks.take(local_idx[part])).to(device)
            # DDP: average gradients over ranks once, on the last pass of the step
            sync = self.forward.no_sync() if world > 1 and i < len(passes) - 1 else nullcontext()
            with sync:
                logits = self.forward(batch)
                loss_sum = F.binary_cross_entropy_with_logits(logits.float(), batch.labels.float(), reduction="sum")
                part_loss = loss_sum * (weight * world / global_targets)
                part_loss.backward()
            loss = loss + part_loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.scheduler.step()
        state["step"] += 1
        state["batch"] += 1
        state["train_targets"] += global_targets
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        state["train_seconds"] += seconds
        self.steps_this_process += 1
        if self.steps_this_process > TIMING_WARMUP_STEPS:
            state["steady_seconds"] = state.get("steady_seconds", 0.0) + seconds
            state["steady_targets"] = state.get("steady_targets", 0) + global_targets
        batch_loss = loss.detach() * global_targets / world  # this rank's share of the batch loss
        if world > 1:
            torch.distributed.all_reduce(batch_loss)
        batch_loss = float(batch_loss)
        state.setdefault("step_losses", []).append(batch_loss / global_targets)
        return batch_loss, global_targets

    def _validate_epoch(self, train_loss: float) -> None:
        """Valid AUC after an epoch; the best epoch so far is kept on disk."""
        state = self.state
        self.memory.pause()
        with self.averaged():
            v = evaluate(self.model, self.packer, self.valid_blocks, self.cfg.eval_batch_size, self.device,
                         self.rank, self.world)
        self.memory.resume()
        state["history"].append({"epoch": state["epoch"], "step": state["step"], "valid": v,
                                 "train_loss": train_loss})
        log.info("epoch %d step %d: valid AUC %.4f LogLoss %.4f", state["epoch"], state["step"], v["auc"],
                 v["logloss"])
        if self.rank == 0 and v["auc"] > state.get("best", {}).get("auc", float("-inf")):
            # the best epoch so far, kept on disk so a resumed run can still select it at the end
            with self.averaged():
                save_weights(self.out / BEST_WEIGHTS, self.model)
            state["best"] = {"epoch": state["epoch"], "step": state["step"], "auc": v["auc"]}

    # ---------------------------------------------------------------------------------------- evaluate
    def evaluate(self) -> dict[str, Any]:
        """Select the epoch with the best valid AUC (loading its weights if not the last) and evaluate it
        on valid and test (writing the test predictions); returns ``{"valid", "test", "selected"}``."""
        cfg, state, out = self.cfg, self.state, self.out
        args = (cfg.eval_batch_size, self.device, self.rank, self.world)
        with self.averaged():
            valid = evaluate(self.model, self.packer, self.valid_blocks, *args)
        selected = {"epoch": state["epoch"], "step": state["step"], "auc": valid["auc"]}
        best = state.get("best")
        if best is not None and best["auc"] > valid["auc"] and (out / BEST_WEIGHTS).exists():
            # an earlier epoch had the better valid AUC: that one is evaluated, saved and exported
            load_trainable(self.model, out / BEST_WEIGHTS)
            self.ema = None  # the file holds the weights to export (the average, when there was one)
            valid = evaluate(self.model, self.packer, self.valid_blocks, *args)
            selected = dict(best)
            log.info("selected epoch %d (valid AUC %.4f) over the last one", best["epoch"], best["auc"])
        with self.averaged():
            test = evaluate(self.model, self.packer, self.test_blocks, *args, predictions=out / TEST_PREDICTIONS)
        return {"valid": valid, "test": test, "selected": selected}

    def metrics(self, result: dict[str, Any]) -> dict[str, Any]:
        """What ``metrics.json`` holds: ``result`` of :meth:`evaluate`, speed, memory, the run's options."""
        state, device, valid, test = self.state, self.device, result["valid"], result["test"]
        losses = np.asarray(state.get("step_losses", []))
        metrics = {
            "valid": valid,
            "test": test,
            "auc": test["auc"],
            "logloss": test["logloss"],
            "train_seconds": state["train_seconds"],
            "train_targets": state["train_targets"],
            "train_sequences": int(len(self.train_blocks)),
            "targets_per_s": (state["train_targets"] / state["train_seconds"] if state["train_seconds"]
                              else float("nan")),
            # the same without the first TIMING_WARMUP_STEPS steps of each process (all steps if there are no more)
            "steady_targets_per_s": (state["steady_targets"] / state["steady_seconds"] if state.get("steady_seconds")
                                     else state["train_targets"] / state["train_seconds"] if state["train_seconds"]
                                     else float("nan")),
            "steady_steps": max(0, self.steps_this_process - TIMING_WARMUP_STEPS),
            "steps": state["step"],
            "peak_rss_mb": self.memory.process_peak_mb(),  # the whole process: includes loading and evaluation
            **self.memory.metrics(),  # with --measure-memory: the training steps alone, over what was held before
            "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "trainable_parameters": count_parameters(self.model),
            "history": state["history"],
            "selected": result["selected"],  # the epoch whose weights are saved: the best valid AUC
            # mean training loss per 25 steps: the curve `llmfeat demo` plots
            "loss_curve": [float(np.mean(chunk)) for chunk in np.array_split(losses, max(1, len(losses) // 25))
                           if len(chunk)],
            "wall_seconds": time.perf_counter() - self.started,
            "device": str(device),
            "fingerprint": self.backbone.fingerprint.to_dict(),
            "options": config_to_dict(self.cfg),
        }
        metrics["world_size"] = self.world
        return metrics

    # ---------------------------------------------------------------------------------------- save
    def save(self, metrics: dict[str, Any] | None = None) -> None:
        """Checkpoint (rank 0): the weights to export, options and trainer state; and ``metrics.json`` if given."""
        if self.rank != 0:
            return
        trainer_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                         "state": self.state, "rng": rng_state()}
        if self.ema is not None:
            trainer_state.update(ema=self.ema.state_dict(), raw_weights=self.ema.raw_state())
        with self.averaged():
            save_checkpoint(self.out, self.model, self.cfg, item_dim=self.item_dim, trainer_state=trainer_state,
                            best_weights=self.out / BEST_WEIGHTS if "best" in self.state else None)
        if metrics is not None:
            write_json(self.out / METRICS, metrics)

    def cleanup(self) -> None:
        """Drop the references to the model, optimizer and data (the metrics and files stay)."""
        for name in ("forward", "model", "optimizer", "scheduler", "ema", "packer", "data"):
            setattr(self, name, None)

    def run(self) -> dict[str, Any]:
        """setup, train, evaluate, save, cleanup; returns the metrics also written to ``<out>/metrics.json``."""
        self.setup()
        self.train()
        metrics = self.metrics(self.evaluate())
        self.save(metrics)
        log.info("test AUC %.4f LogLoss %.4f; %.0f train targets/s; checkpoint in %s", metrics["test"]["auc"],
                 metrics["test"]["logloss"], metrics["targets_per_s"], self.out)
        self.cleanup()
        return metrics


def finetune(
    cfg: FinetuneConfig, *, backbone: Backbone | None = None, data: FinetuneData | None = None
) -> dict[str, Any]:
    """Train, evaluate and checkpoint; returns the metrics also written to ``<out>/metrics.json``.

    Args:
        cfg: every option of the run.
        backbone: an already loaded backbone matching ``cfg`` (tests, notebooks); loaded if None.
        data: already loaded data (tests); read from ``cfg.data_dir`` if None.
    """
    return FinetuneRecipe(cfg, backbone=backbone, data=data).run()


__all__ = [
    "BatchSampler", "FinetuneRecipe", "PackerFactory", "finetune",
    # re-exported from their homes (batches, evaluation, optim, memory, distributed), for older importers
    "epoch_batches", "evaluate", "init_distributed", "make_optimizer", "peak_rss_mb", "predict",
    "split_blocks", "split_targets", "token_groups",
]

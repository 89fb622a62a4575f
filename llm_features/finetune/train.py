"""The fine-tuning recipe: setup, train, evaluate, checkpoint.

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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llm_features.atomic import write_json
from llm_features.backbone import Backbone, configure_threads
from llm_features.devices import resolve_device
from llm_features.errors import UserError
from llm_features.finetune.checkpoint import (
    METRICS,
    TEST_PREDICTIONS,
    ResumeSet,
    link_into_place,
    build_model,
    check_model_files,
    config_to_dict,
    load_resume_set,
    load_trainable,
    save_checkpoint,
    write_predictions,
    save_weights,
    BEST_WEIGHTS,
    CONFIG,
    WEIGHTS,
)
from llm_features.finetune.config import FinetuneConfig, check_finetune_config
from llm_features.finetune.data import FinetuneData, limit_targets, load_finetune_data
from llm_features.finetune.ema import WeightAverage
from llm_features.finetune.memory import TrainingMemory, peak_rss_mb  # noqa: F401 (re-exported)
from llm_features.finetune.model import FinetuneModel, count_parameters
from llm_features.finetune.packing import BehaviorPacker, Blocks, TokenPacker, batch_indices, make_blocks
from llm_features.ingest.split import SPLIT_CODES
from llm_features.metrics import log_loss_from_logits, roc_auc
from llm_features.workspace import Workspace

log = logging.getLogger(__name__)

# Options that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"resume", "epochs", "max_steps", "log_every", "save_every", "device", "num_threads",
                     "eval_batch_size", "attention", "micro_batch_tokens", "out", "trust_remote_code"}
# Optimizer steps of each process left out of the steady-state throughput (allocator and optimizer-state
# warm-up, first-touch page faults).
TIMING_WARMUP_STEPS = 2


# ------------------------------------------------------------------------------------------ helpers
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


def make_packer(cfg: FinetuneConfig, data: FinetuneData, backbone: Backbone) -> BehaviorPacker | TokenPacker:
    if cfg.granularity == "behavior":
        return BehaviorPacker(data.hist, data.behavior_table, data.item_table)
    return TokenPacker(data.hist, data.behavior_texts, data.item_table, backbone.tokenize,
                       pad_id=int(backbone.tokenizer.pad_token_id))


def split_targets(cfg: FinetuneConfig, data: FinetuneData, split: str) -> np.ndarray:
    """``[N]`` boolean: the rows of ``split`` this run trains on or evaluates (after ``max_targets``).

    Baselines that must see exactly the same targets (``bench/bench_finetune.py``) call this too.
    """
    mask = data.split_mask(split)
    if split == "train" and cfg.fold is not None:
        from llm_features.ids import user_fold

        user_of_row = np.repeat(data.hist.user_ids, np.diff(data.hist.offsets))
        mask = mask & (user_fold(user_of_row, cfg.folds) != cfg.fold)
    return limit_targets(data.hist, mask, cfg.max_targets, cfg.sample_seed + SPLIT_CODES[split])


def split_blocks(cfg: FinetuneConfig, data: FinetuneData, split: str, k: int) -> Blocks:
    return make_blocks(data.hist, split_targets(cfg, data, split), k, cfg.context_size)


def token_groups(lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Split sequences (in order) into consecutive groups of at most ``max_tokens`` positions (0: one group).

    A sequence longer than ``max_tokens`` forms a group of its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_tokens <= 0 or lengths.sum() <= max_tokens:
        return [np.arange(len(lengths))]
    groups, start, used = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used and used + n > max_tokens:
            groups.append(np.arange(start, i))
            start, used = i, 0
        used += n
    groups.append(np.arange(start, len(lengths)))
    return groups


def epoch_batches(blocks: Blocks, targets_per_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The block indices of each batch of ``epoch``: a pure function of (seed, epoch), so resume can skip ahead."""
    order = np.random.default_rng([seed, epoch]).permutation(len(blocks))
    return [order[i] for i in batch_indices(blocks.num_targets[order], targets_per_batch)]


@torch.no_grad()
def predict(
    model: FinetuneModel, packer, blocks: Blocks, targets_per_batch: int, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target rows, labels, logits) of every target in ``blocks``, in block order."""
    was_training = model.training
    model.eval()
    rows, labels, logits = [], [], []
    for idx in batch_indices(blocks.num_targets, targets_per_batch):
        batch = packer(blocks.take(idx)).to(device)
        logits.append(model(batch).float().cpu().numpy())
        rows.append(batch.target_rows.cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
    model.train(was_training)
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(rows), np.concatenate(labels), np.concatenate(logits)


def evaluate(
    model: FinetuneModel, packer, blocks: Blocks, targets_per_batch: int, device: torch.device,
    rank: int = 0, world: int = 1, predictions: Path | None = None,
) -> dict:
    """AUC / LogLoss over the targets of ``blocks`` (each rank predicts a share, all ranks get the metrics).

    With ``predictions``, rank 0 also writes the history rows, labels and logits of every target there
    (``.npz``), so that two runs on the same data can be compared target by target.
    """
    t0 = time.perf_counter()
    local = blocks.take(np.arange(rank, len(blocks), world)) if world > 1 else blocks
    rows, labels, logits = predict(model, packer, local, targets_per_batch, device)
    rows, labels, logits = _gather([rows, labels, logits], world)
    seconds = time.perf_counter() - t0
    if predictions is not None and rank == 0:
        write_predictions(predictions, rows, labels, logits)
    return {
        "auc": roc_auc(labels, logits),
        "logloss": log_loss_from_logits(labels, logits),
        "targets": int(len(labels)),
        "positive_rate": float(labels.mean()) if len(labels) else float("nan"),
        "seconds": seconds,
        "targets_per_s": len(labels) / seconds if seconds > 0 else float("nan"),
    }


def make_optimizer(model: FinetuneModel, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the model's parameter groups, fused where the device supports it.

    Fused: one kernel for all parameters instead of a loop over tensors. The optimizer step is a
    fixed cost per step, so this matters most for short steps (DTI packs many targets in few tokens).
    """
    groups = model.param_groups(cfg.lr, cfg.head_lr, cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    try:
        return torch.optim.AdamW(groups, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, betas=betas)


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ distributed
def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    from llm_features.distributed import init_from_env

    return init_from_env(device)


def _shard(idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's blocks of one global batch (round robin)."""
    return idx[rank::world]


def _gather(arrays: list[np.ndarray], world: int) -> list[np.ndarray]:
    if world == 1:
        return arrays
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, arrays)
    return [np.concatenate([o[i] for o in out]) for i in range(len(arrays))]


# ------------------------------------------------------------------------------------------ recipe
def finetune(
    cfg: FinetuneConfig, *, backbone: Backbone | None = None, data: FinetuneData | None = None
) -> dict[str, Any]:
    """Train, evaluate and checkpoint; returns the metrics also written to ``<out>/metrics.json``.

    Args:
        cfg: every option of the run.
        backbone: an already loaded backbone matching ``cfg`` (tests, notebooks); loaded if None.
        data: already loaded data (tests); read from ``cfg.data_dir`` if None.
    """
    started = time.perf_counter()
    # Everything that can refuse the run is checked before any model is loaded or any file written.
    check_finetune_config(cfg)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    resume = load_resume_set(out) if cfg.resume else None
    if resume is not None:
        check_resume(cfg, resume)
        if backbone is None:
            check_model_files(cfg, resume.fingerprint, resume.path / CONFIG)
    if data is None:
        interactions = Workspace.at(cfg.data_dir).interactions
        if not interactions.exists():
            raise UserError("not found", file=interactions, option="--data-dir",
                            fix="Run `llmfeat ingest` and `llmfeat encode` for this data dir first.")
    rank, world = init_distributed(device)
    configure_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    backbone = backbone or Backbone.load(cfg.backbone_config(), device=device)
    check_split(backbone)
    if resume is not None:
        resume.fingerprint.require_same(
            backbone.fingerprint, lambda loaded, trained: f"was trained on fingerprint {trained}, the model loaded "
            f"now is {loaded}", file=resume.path / CONFIG, option="--resume",
            fix="Resume with the model options it was trained with, or choose a new --out.")
    if data is None:
        data = load_finetune_data(
            cfg.data_dir, backbone.fingerprint, feedback=cfg.feedback,
            need_behavior_vectors=cfg.granularity == "behavior", limit_users=cfg.limit_users, seed=cfg.sample_seed,
        )
    item_dim = int(data.item_table.shape[1])
    model = build_model(cfg, backbone, item_dim)
    if cfg.granularity == "behavior":
        model.init_query(data.behavior_table.mean(0))
    else:
        first = backbone.tokenizer.cls_token_id or backbone.tokenizer.bos_token_id
        if first is not None:
            with torch.no_grad():
                model.init_query(backbone.embed(torch.tensor([[first]], device=backbone.device))[0, 0].float().cpu())
    model.to(device)
    packer = make_packer(cfg, data, backbone)

    train_blocks = split_blocks(cfg, data, "train", cfg.k)
    valid_blocks = split_blocks(cfg, data, "valid", cfg.eval_k)
    test_blocks = split_blocks(cfg, data, "test", cfg.eval_k)
    if len(train_blocks) == 0:
        raise UserError("no training targets: the train split is empty (or --fold, --limit-users or "
                        "--max-targets left none)", file=Workspace.at(cfg.data_dir).interactions,
                        fix="Check the split of `llmfeat ingest` and those options.")
    steps_per_epoch = len(batch_indices(train_blocks.num_targets, cfg.batch_size))
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    optimizer = make_optimizer(model, cfg)
    ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay > 0 else None

    def averaged():
        """Evaluate and save the weight average when there is one."""
        return ema.applied() if ema is not None else nullcontext()
    # DDP averages gradients over ranks: each rank's loss is its share of the global batch mean, times world.
    forward = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch": 0, "train_seconds": 0.0, "train_targets": 0,
                             "history": []}
    if resume is not None:
        load_trainable(model, resume.path / WEIGHTS)
        saved = resume.trainer_state  # unpickled with weights_only=True: tensors and plain data only
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        if ema is not None:  # model.safetensors holds the average; the trained weights are in the trainer state
            ema.load_state_dict(saved["ema"])
            ema.load_raw_state(saved["raw_weights"])
        _set_rng_state(saved["rng"])
        if rank == 0 and "best" in state and (resume.path / BEST_WEIGHTS).exists():
            # the best epoch as of that step (a later one may have been written before the kill)
            link_into_place(resume.path / BEST_WEIGHTS, out / BEST_WEIGHTS)
        log.info("resuming from %s at step %d (epoch %d, batch %d)", resume.path, state["step"], state["epoch"],
                 state["batch"])

    def checkpoint() -> None:
        if rank != 0:
            return
        trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state,
                         "rng": _rng_state()}
        if ema is not None:
            trainer_state.update(ema=ema.state_dict(), raw_weights=ema.raw_state())
        with averaged():
            save_checkpoint(out, model, cfg, item_dim=item_dim, trainer_state=trainer_state,
                            best_weights=out / BEST_WEIGHTS if "best" in state else None)

    log.info(
        "finetune: %s level, %s (k=%d, n=%d, leakage=%s), %d train targets in %d sequences, %d steps; "
        "%d trainable parameters", cfg.granularity, cfg.packing, cfg.k, cfg.context_size, cfg.leakage,
        int(train_blocks.num_targets.sum()), len(train_blocks), total_steps, count_parameters(model),
    )
    memory = TrainingMemory(device)  # also resets the CUDA peak statistics
    steps_this_process = 0
    model.train()
    done = state["step"] >= total_steps
    memory.start()
    while not done and state["epoch"] < cfg.epochs:
        batches = epoch_batches(train_blocks, cfg.batch_size, cfg.seed, state["epoch"])
        window_loss, window_targets, t_window = 0.0, 0, time.perf_counter()
        epoch_loss, epoch_targets = 0.0, 0
        while state["batch"] < len(batches):
            t0 = time.perf_counter()
            global_idx = batches[state["batch"]]
            global_targets = int(train_blocks.num_targets[global_idx].sum())
            local_idx = _shard(global_idx, rank, world)
            weight = 1.0
            if len(local_idx) == 0:  # fewer blocks than ranks: run one block with zero weight to keep DDP in step
                local_idx, weight = global_idx[:1], 0.0
            optimizer.zero_grad(set_to_none=True)
            # one optimizer step, in passes of at most micro_batch_tokens positions (gradient accumulation)
            passes = token_groups(packer.lengths(train_blocks.take(local_idx)), cfg.micro_batch_tokens)
            loss = torch.zeros((), device=device)
            for i, part in enumerate(passes):
                batch = packer(train_blocks.take(local_idx[part])).to(device)
                # DDP: average gradients over ranks once, on the last pass of the step
                sync = forward.no_sync() if world > 1 and i < len(passes) - 1 else nullcontext()
                with sync:
                    logits = forward(batch)
                    loss_sum = F.binary_cross_entropy_with_logits(logits.float(), batch.labels.float(),
                                                                  reduction="sum")
                    part_loss = loss_sum * (weight * world / global_targets)
                    part_loss.backward()
                loss = loss + part_loss.detach()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if ema is not None:
                ema.update()
            scheduler.step()
            state["step"] += 1
            state["batch"] += 1
            state["train_targets"] += global_targets
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            steps_this_process += 1
            if steps_this_process > TIMING_WARMUP_STEPS:
                state["steady_seconds"] = state.get("steady_seconds", 0.0) + seconds
                state["steady_targets"] = state.get("steady_targets", 0) + global_targets
            batch_loss = loss.detach() * global_targets / world  # this rank's share of the batch loss
            if world > 1:
                torch.distributed.all_reduce(batch_loss)
            batch_loss = float(batch_loss)
            state.setdefault("step_losses", []).append(batch_loss / global_targets)
            window_loss += batch_loss
            epoch_loss += batch_loss
            window_targets += global_targets
            epoch_targets += global_targets
            if cfg.log_every and state["step"] % cfg.log_every == 0:
                log.info("step %d/%d epoch %d: loss %.4f, %.0f targets/s", state["step"], total_steps,
                         state["epoch"], window_loss / window_targets,
                         window_targets / (time.perf_counter() - t_window))
                window_loss, window_targets, t_window = 0.0, 0, time.perf_counter()
            if state["step"] >= total_steps:
                done = True
                break
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                checkpoint()
        if state["batch"] >= len(batches):
            state["epoch"] += 1
            state["batch"] = 0
        if len(valid_blocks) and state["batch"] == 0 and not done:
            memory.pause()
            with averaged():
                v = evaluate(model, packer, valid_blocks, cfg.eval_batch_size, device, rank, world)
            memory.resume()
            state["history"].append({"epoch": state["epoch"], "step": state["step"], "valid": v,
                                     "train_loss": epoch_loss / max(1, epoch_targets)})
            log.info("epoch %d step %d: valid AUC %.4f LogLoss %.4f", state["epoch"], state["step"], v["auc"],
                     v["logloss"])
            if rank == 0 and v["auc"] > state.get("best", {}).get("auc", float("-inf")):
                # the best epoch so far, kept on disk so a resumed run can still select it at the end
                with averaged():
                    save_weights(out / BEST_WEIGHTS, model)
                state["best"] = {"epoch": state["epoch"], "step": state["step"], "auc": v["auc"]}
        memory.pause()
        checkpoint()
        memory.resume()

    memory.stop()
    with averaged():
        valid = evaluate(model, packer, valid_blocks, cfg.eval_batch_size, device, rank, world)
    selected = {"epoch": state["epoch"], "step": state["step"], "auc": valid["auc"]}
    best = state.get("best")
    if best is not None and best["auc"] > valid["auc"] and (out / BEST_WEIGHTS).exists():
        # an earlier epoch had the better valid AUC: that one is evaluated, saved and exported
        load_trainable(model, out / BEST_WEIGHTS)
        ema = None  # the file holds the weights to export (the average, when there was one)
        valid = evaluate(model, packer, valid_blocks, cfg.eval_batch_size, device, rank, world)
        selected = dict(best)
        log.info("selected epoch %d (valid AUC %.4f) over the last one", best["epoch"], best["auc"])
    with averaged():
        test = evaluate(model, packer, test_blocks, cfg.eval_batch_size, device, rank, world,
                        predictions=out / TEST_PREDICTIONS)
    metrics = {
        "valid": valid,
        "test": test,
        "auc": test["auc"],
        "logloss": test["logloss"],
        "train_seconds": state["train_seconds"],
        "train_targets": state["train_targets"],
        "train_sequences": int(len(train_blocks)),
        "targets_per_s": state["train_targets"] / state["train_seconds"] if state["train_seconds"] else float("nan"),
        # the same without the first TIMING_WARMUP_STEPS steps of each process (all steps if there are no more)
        "steady_targets_per_s": (state["steady_targets"] / state["steady_seconds"] if state.get("steady_seconds")
                                 else state["train_targets"] / state["train_seconds"] if state["train_seconds"]
                                 else float("nan")),
        "steady_steps": max(0, steps_this_process - TIMING_WARMUP_STEPS),
        "steps": state["step"],
        "peak_rss_mb": memory.process_peak_mb(),  # the whole process: includes loading and evaluation
        **memory.metrics(),  # the training steps alone, as an increase over the memory held before them
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "trainable_parameters": count_parameters(model),
        "history": state["history"],
        "selected": selected,  # the epoch whose weights are saved: the best valid AUC
        # mean training loss per 25 steps: the curve `llmfeat demo` plots
        "loss_curve": [float(np.mean(chunk)) for chunk in np.array_split(
            np.asarray(state.get("step_losses", [])), max(1, len(state.get("step_losses", [])) // 25))
            if len(chunk)],
        "wall_seconds": time.perf_counter() - started,
        "device": str(device),
        "fingerprint": backbone.fingerprint.to_dict(),
        "options": config_to_dict(cfg),
    }
    metrics["world_size"] = world
    checkpoint()
    if rank == 0:
        write_json(out / METRICS, metrics)
    log.info("test AUC %.4f LogLoss %.4f; %.0f train targets/s; checkpoint in %s", test["auc"], test["logloss"],
             metrics["targets_per_s"], out)
    return metrics


__all__ = ["evaluate", "finetune", "peak_rss_mb", "predict", "split_targets"]

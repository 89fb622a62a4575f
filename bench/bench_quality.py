"""Quality benchmark: does the LLM tower make the ranker better? Twins, ablations, baselines, slices.

Per dataset (ML-1M users 1-2999 and ML-100K), through the commands a user runs (ingest, encode,
feast apply, finetune, embed-users, then ``ranker train`` / ``ranker evaluate`` on Feast's
``get_historical_features``, joined once per feature service and reused across seeds):

* the twins: the id-only ranker and the default +LLM ranker (the id-only twin plus the tower's
  score of each (user, item) pair), each trained until its valid AUC stops improving, 3+ seeds;
* ablations, each one hypothesis of issue 14, trained on the same rows and seeds. They read the
  tower's *exact* per-row state (every event, no snapshot staleness) from memory, so the row
  ``score, exact per-row states`` is their reference; the twins read Feast's snapshots;
  ``llm_exact_states`` (freshness: every event instead of every 8th), ``score_residual`` (the
  logit also added to the output), ``vectors_interaction`` (the raw vectors projected into the
  interaction arch, the earlier default), ``user_and_item_scores`` (the logit split into
  ``H(u, v_mean)`` and the rest), ``cross_fit_score`` / ``no_cross_fit_score`` (stacking leakage:
  two fold towers against one), ``frozen_mean_pool`` (no fine-tuning: the mean frozen item vector
  of the last 30 interactions, the plain alternative) and ``sliding_window_equal_time`` /
  ``dti_equal_time`` (a sliding-window tower given the DTI tower's training time), and the two
  blends of :mod:`quality_blend` (``blend_valid``: the id-only ranker's logit and the tower's
  fresh scores, stacked by a logistic regression fitted on the valid rows; ``blend_valid_window_start``:
  the same with the user's state frozen at the start of each split window): where the lift comes from;
* simple baselines fitted on the same split (item / user+item positive rate, the user's last 30
  interactions' positive rate, matrix factorisation) and the tower's own test AUC, each also as a
  per-user AUC, and the tower's scores alone (its logit, its user-level part ``H(u, v_mean)``, the
  rest), fresh and frozen at the window start: which signal orders a user's own rows and which does not;
* per variant: test AUC, LogLoss, per-user AUC; +LLM minus id-only with a 95% interval from a
  bootstrap over test users; slices (users unseen in train, users and items with < 20 train rows).

Writes ``bench/results/quality.json``, ``quality.md`` and ``quality.png``. Runs are kept under
``--runs`` and reused with ``--reuse`` (towers, user embeddings, each ranker seed)::

    python bench/bench_quality.py --source ../shared/data/ml-1m --ml100k ../shared/data/ml-100k --reuse
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import quality_metrics as qm

log = logging.getLogger("bench_quality")
REPO = Path(__file__).resolve().parents[1]
KEYS = ["user_id", "item_id", "event_timestamp"]
# the tower every +LLM row reads: llmfeat finetune's defaults, leakage=isolated (exact DTI, so embed-users packs)
TOWER = {"packing": "dti", "leakage": "isolated"}
NON_SEMANTIC = {"out", "data_dir", "num_threads", "log_every", "save_every", "resume", "device", "eval_batch_size",
                "measure_memory"}


# ------------------------------------------------------------------------------------------ pipeline steps
def prepare(source: Path, data_dir: Path) -> None:
    """ingest + encode + feast apply (each incremental: a rerun only checks)."""
    from llm_features.encode import EncodeConfig, encode
    from llm_features.ingest import IngestConfig, ingest
    from llm_features.store import apply_definitions, open_store

    ingest(IngestConfig(source=source, data_dir=data_dir))
    encode(EncodeConfig(data_dir=data_dir, progress=False))
    store = open_store(REPO / "feast_repo", data_dir)
    with open(os.devnull, "w") as null, __import__("contextlib").redirect_stdout(null):
        apply_definitions(store)


def tower(data_dir: Path, out: Path, reuse: bool, **options: Any) -> dict:
    """``llmfeat finetune`` with ``options``; a finished run with the same options is reused."""
    from llm_features.finetune import FinetuneConfig, finetune
    from llm_features.config import config_from_options
    from llm_features.finetune.config import config_to_dict

    cfg = config_from_options(FinetuneConfig, data_dir=data_dir, out=out, **{**TOWER, **options})
    want = {k: v for k, v in config_to_dict(cfg).items() if k not in NON_SEMANTIC}
    if reuse and (out / "metrics.json").exists():
        m = json.loads((out / "metrics.json").read_text())
        if {k: v for k, v in m["options"].items() if k not in NON_SEMANTIC} == want:
            log.info("reusing %s", out)
            return m
    return finetune(cfg)


def exact_states(data_dir: Path, towers: list[Path]) -> pd.DataFrame:
    """Every interaction's exact tower state ``u`` and logit; with several towers, cross-fitted by user fold.

    Also the tower's user-level score ``H(u, v_mean)`` (v_mean: the mean train item vector) and
    the rest of the logit, for the decomposition ablation; and the same two scores of the state at
    the start of the row's split window (``*_window_start``: the state after the user's last
    interaction before the window, frozen through it), for the freshness diagnosis.
    """
    from llm_features.embed_users import compute_user_states
    from llm_features.finetune.loading import load_finetuned
    from llm_features.finetune.data import load_finetune_data
    from llm_features.finetune.packing import make_packer
    from llm_features.ids import user_fold

    model, ft = load_finetuned(towers[0])
    data = load_finetune_data(data_dir, model.backbone.fingerprint, feedback=ft.feedback)
    h = data.hist
    users = np.repeat(h.user_ids, np.diff(h.offsets))
    fold = user_fold(users, len(towers)) if len(towers) > 1 else np.zeros(len(users), np.int64)
    u = np.zeros((len(h), model.backbone.hidden_size), np.float32)
    logit, ubias = np.zeros(len(h), np.float32), np.zeros(len(h), np.float32)
    vmean = data.item_table[h.item_row[data.split_mask("train")]].mean(0, keepdim=True)
    packer = make_packer(ft, data, model.backbone)
    for f, path in enumerate(towers):
        if f:
            model, ft = load_finetuned(path, backbone=model.backbone)
        rows = np.flatnonzero(fold == f)
        states, _ = compute_user_states(model, packer, h, rows, context_size=ft.context_size,
                                        targets_per_sequence=128, batch_size=2048)
        with torch.no_grad():
            st = torch.from_numpy(states)
            logit[rows] = model.head(st, data.item_table[h.item_row[rows]]).numpy()
            ubias[rows] = model.head(st, vmean.expand(len(rows), -1)).numpy()
        u[rows] = states
    # the state at the first row of each (user, split) block: history before the window only
    split = np.asarray(h.split)
    first = np.ones(len(h), bool)
    first[1:] = (users[1:] != users[:-1]) | (split[1:] != split[:-1])
    start = np.maximum.accumulate(np.where(first, np.arange(len(h)), 0))
    w_logit, w_ubias = np.zeros(len(h), np.float32), np.zeros(len(h), np.float32)
    with torch.no_grad():
        for f, path in enumerate(towers):
            if len(towers) > 1:
                model, ft = load_finetuned(path, backbone=model.backbone)
            rows = np.flatnonzero(fold == f)
            st = torch.from_numpy(u[start[rows]])
            w_logit[rows] = model.head(st, data.item_table[h.item_row[rows]]).numpy()
            w_ubias[rows] = model.head(st, vmean.expand(len(rows), -1)).numpy()
    item_ids = pd.read_parquet(data_dir / "canonical" / "interactions.parquet", columns=["item_id"]).item_id
    frame = pd.DataFrame({"user_id": users, "item_id": np.unique(item_ids.to_numpy())[h.item_row],
                          "event_timestamp": pd.to_datetime(h.time, unit="us", utc=True)})
    frame["user_embedding"] = list(u)
    frame["tower_logit"], frame["tower_user_score"], frame["tower_item_score"] = logit, ubias, logit - ubias
    frame["tower_user_score_window_start"], frame["tower_item_score_window_start"] = w_ubias, w_logit - w_ubias
    user_first = np.repeat(np.asarray(h.offsets[:-1]), np.diff(h.offsets))
    frame["user_history_window_start"] = (start > user_first).astype(np.float32)  # 0: no state before the window
    return frame


def frozen_mean_states(data_dir: Path, n: int = 30) -> pd.DataFrame:
    """The plain alternative: the mean frozen item vector of the user's last ``n`` earlier interactions."""
    from llm_features.finetune.data import load_finetune_data

    data = load_finetune_data(data_dir, None, need_behavior_vectors=False)
    h = data.hist
    vec = data.item_table.numpy().astype(np.float64)[h.item_row]
    csum = np.concatenate([np.zeros((1, vec.shape[1])), np.cumsum(vec, axis=0)])
    end, start = h.time_start, np.maximum(h.user_start, h.time_start - n)
    u = ((csum[end] - csum[start]) / np.maximum(end - start, 1)[:, None]).astype(np.float32)
    item_ids = pd.read_parquet(data_dir / "canonical" / "interactions.parquet", columns=["item_id"]).item_id
    frame = pd.DataFrame({"user_id": np.repeat(h.user_ids, np.diff(h.offsets)),
                          "item_id": np.unique(item_ids.to_numpy())[h.item_row],
                          "event_timestamp": pd.to_datetime(h.time, unit="us", utc=True)})
    frame["user_embedding"] = [None if e == s else x for x, s, e in zip(u, start, end)]  # no history: missing
    return frame


class FrameSource:
    """A feature source answering from an in-memory frame keyed by ``(user_id, item_id, event_timestamp)``."""

    def __init__(self, frame: pd.DataFrame) -> None:
        frame = frame.copy()
        frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
        self.frame = frame.drop(columns=["label", "split"], errors="ignore").set_index(KEYS)

    def __call__(self, entities: pd.DataFrame) -> pd.DataFrame:
        keys = entities[KEYS].copy()
        keys["event_timestamp"] = pd.to_datetime(keys["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
        out = self.frame.loc[pd.MultiIndex.from_frame(keys)].reset_index()
        out["label"] = entities["label"].to_numpy()
        return out

    def with_columns(self, extra: pd.DataFrame) -> "FrameSource":
        extra = extra.copy()
        extra["event_timestamp"] = extra["event_timestamp"].astype("datetime64[us, UTC]")
        merged = self.frame.drop(columns=[c for c in extra.columns if c in self.frame.columns and c not in KEYS])
        return FrameSource(merged.reset_index().merge(extra, on=KEYS, how="left", validate="1:1"))


def rank(out: Path, entities: pd.DataFrame, source, seed: int, reuse: bool, inputs: str,
         **options: Any) -> pd.DataFrame:
    """Train one ranker (early stopping on valid) and return its test predictions.

    A finished run is reused only when its seed, options and ``inputs`` (what its features were
    made from: towers, snapshot cadence) are the same.
    """
    from llm_features.config import config_from_options
    from ranker.config import EvaluateConfig, TrainConfig
    from ranker.train import evaluate, train

    pred = out / "eval-test" / "predictions.parquet"
    stamp = json.dumps({"seed": seed, "inputs": inputs, **{k: str(v) for k, v in options.items()}},
                       sort_keys=True)
    if not (reuse and pred.exists() and (out / "bench_stamp.json").exists()
            and (out / "bench_stamp.json").read_text() == stamp):
        shutil.rmtree(out / "eval-valid", ignore_errors=True)  # the blends' valid predictions of an older run
        m = train(config_from_options(TrainConfig, out=out, seed=seed, progress=False, threads=1, **options),
                  entities=entities, source=source)
        evaluate(EvaluateConfig(checkpoint=out, split="test"), entities=entities, source=source)
        (out / "bench_stamp.json").write_text(stamp)
        (out / "bench_train.json").write_text(json.dumps({k: m.get(k) for k in (
            "best_epoch", "epochs_run", "train_seconds", "samples_per_second", "history")}, default=str))
    frame = pd.read_parquet(pred)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True).astype("datetime64[us, UTC]")
    return frame


# ------------------------------------------------------------------------------------------ one dataset
def run_dataset(name: str, source: Path, args: argparse.Namespace) -> dict:
    from llm_features.embed_users import CheckpointMismatchError, EmbedUsersConfig, embed_users
    from llm_features.store import open_store
    from ranker.config import ModelConfig
    from ranker.features import feature_columns
    from ranker.train import ENTITY_COLUMNS, PrefetchedSource, feast_source

    root = args.runs / name
    data_dir = root / "data"
    t0 = time.perf_counter()
    prepare(source, data_dir)
    tower_opts = {"epochs": 1, "max_steps": 20} if args.quick else {}
    towers = {"default": root / "tower"}
    metrics = {"default": tower(data_dir, towers["default"], args.reuse, **tower_opts)}
    eu_cfg = EmbedUsersConfig(checkpoint=towers["default"], data_dir=data_dir, every=args.every)
    try:  # incremental: rows of this very checkpoint are kept
        embed_users(eu_cfg)
    except CheckpointMismatchError:  # rows of another (earlier) tower: replaced
        embed_users(replace(eu_cfg, overwrite=True))

    inter = pd.read_parquet(data_dir / "canonical" / "interactions.parquet", columns=ENTITY_COLUMNS + ["split"])
    inter["event_timestamp"] = inter["event_timestamp"].astype("datetime64[us, UTC]")
    store = open_store(REPO / "feast_repo", data_dir)
    t_join = time.perf_counter()
    cfg_llm, cfg_id = ModelConfig(), ModelConfig(llm_features=False)
    joined = {
        "llm": PrefetchedSource(feast_source(store, cfg_llm.feature_service, feature_columns(cfg_llm)), inter),
        "id_only": PrefetchedSource(feast_source(store, cfg_id.feature_service, feature_columns(cfg_id)), inter),
    }
    join_seconds = time.perf_counter() - t_join
    # the in-memory frame of the ablations: Feast's id features and item vectors, exact tower states
    base = FrameSource(joined["llm"].frame.reset_index().drop(columns=["user_embedding"]))
    states = exact_states(data_dir, [towers["default"]])

    variants: dict[str, tuple[Any, dict]] = {
        "id_only": (joined["id_only"], {"llm_features": False}),
        "llm": (joined["llm"], {"tower": towers["default"]}),
    }
    abl = set(args.ablations)
    if "exact" in abl:
        variants["llm_exact_states"] = (base.with_columns(states[KEYS + ["user_embedding"]]),
                                        {"tower": towers["default"]})
    if "residual" in abl:  # the tower's logit also added to the output: the ranker learns a residual on it
        variants["score_residual"] = (base.with_columns(states[KEYS + ["user_embedding"]]),
                                      {"tower": towers["default"], "score_offset": True})
    if "vectors" in abl:
        variants["vectors_interaction"] = (base.with_columns(states[KEYS + ["user_embedding"]]),
                                           {"llm_mode": "interaction"})
    if "decomposed" in abl:
        variants["user_and_item_scores"] = (base.with_columns(states[KEYS + ["tower_user_score", "tower_item_score"]]),
                                            {"llm_features": False,
                                             "extra_numeric": ("tower_user_score", "tower_item_score")})
    if "cross_fit" in abl:
        folds = [root / f"tower_fold{f}" for f in range(2)]
        for f, path in enumerate(folds):
            metrics[f"fold{f}"] = tower(data_dir, path, args.reuse, folds=2, fold=f, **tower_opts)
        cf = exact_states(data_dir, folds)
        variants["cross_fit_score"] = (base.with_columns(cf[KEYS + ["tower_logit"]]),
                                       {"llm_features": False, "extra_numeric": ("tower_logit",)})
        variants["no_cross_fit_score"] = (base.with_columns(states[KEYS + ["tower_logit"]]),
                                          {"llm_features": False, "extra_numeric": ("tower_logit",)})
    if "frozen" in abl:
        variants["frozen_mean_pool"] = (base.with_columns(frozen_mean_states(data_dir)), {"llm_mode": "interaction"})
    if "sliding_window" in abl:  # the same training time as the DTI tower, spent on one target per sequence
        sw_rate = tower(data_dir, root / "tower_sw_probe", args.reuse, packing="sliding-window", max_steps=10,
                        epochs=1)["steady_targets_per_s"]
        budget = metrics["default"]["train_seconds"]
        steps = max(1, int(budget * sw_rate / 512))
        metrics["sliding_window"] = tower(data_dir, root / "tower_sw", args.reuse, packing="sliding-window",
                                          max_steps=steps, epochs=max(1, int(tower_opts.get("epochs", 2))))
        sw = exact_states(data_dir, [root / "tower_sw"])
        variants["sliding_window_equal_time"] = (base.with_columns(sw[KEYS + ["tower_logit"]]),
                                                 {"llm_features": False, "extra_numeric": ("tower_logit",)})
        variants["dti_equal_time"] = variants.get("no_cross_fit_score") or (
            base.with_columns(states[KEYS + ["tower_logit"]]),
            {"llm_features": False, "extra_numeric": ("tower_logit",)})

    from llm_features.embed_users import checkpoint_identity

    # what each variant's features come from, so a reused ranker run never outlives its inputs
    ids = {p.name: checkpoint_identity(p)["id"] for p in root.glob("tower*") if (p / "config.json").exists()}
    own = {"llm": f"every{args.every}", "cross_fit_score": f"{ids.get('tower_fold0')}+{ids.get('tower_fold1')}",
           "sliding_window_equal_time": str(ids.get("tower_sw"))}
    preds: dict[str, list[pd.DataFrame]] = {}
    for vname, (src, opts) in variants.items():
        if args.quick:
            opts = {**opts, "epochs": 1}
        inputs = f"{ids['tower']}/{own.get(vname, '')}"
        preds[vname] = [rank(root / "rankers" / f"{vname}-s{s}", inter, src, s, args.reuse, inputs, **opts)
                        for s in args.seeds]
        log.info("%s %s: test AUC %s", name, vname, [round(qm_auc(p), 4) for p in preds[vname]])
    blend_seconds: dict[str, float] = {}
    if "blend" in abl:  # the id-only ranker's logit blended with the tower's scores on the valid rows
        from quality_blend import BLENDS, blend_predictions
        from ranker.config import EvaluateConfig
        from ranker.train import evaluate

        valid_preds, test_preds = [], []
        for s in args.seeds:
            run = root / "rankers" / f"id_only-s{s}"
            if not (run / "eval-valid" / "predictions.parquet").exists():
                evaluate(EvaluateConfig(checkpoint=run, split="valid", out=run / "eval-valid"), entities=inter,
                         source=joined["id_only"])
            valid_preds.append(pd.read_parquet(run / "eval-valid" / "predictions.parquet"))
            test_preds.append(pd.read_parquet(run / "eval-test" / "predictions.parquet"))
        for bname, cols in BLENDS.items():
            fitted = [blend_predictions(v, t, states, cols) for v, t in zip(valid_preds, test_preds)]
            preds[bname] = [p for p, _ in fitted]
            blend_seconds[bname] = float(np.mean([sec for _, sec in fitted]))
    result = summarize_dataset(inter, preds, metrics, states)
    for bname, sec in blend_seconds.items():
        result["variants"][bname].update(train_seconds=sec, best_epochs=[])
    for vname in variants:  # the ranker's own cost: training time, throughput and the epoch kept
        runs = [json.loads((root / "rankers" / f"{vname}-s{s}" / "bench_train.json").read_text()) for s in args.seeds]
        result["variants"][vname].update(
            train_seconds=float(np.mean([r["train_seconds"] for r in runs])),
            samples_per_second=float(np.mean([r["samples_per_second"] for r in runs])),
            best_epochs=[r["best_epoch"] for r in runs])
    # the headline numbers where issue 14 asks for them
    result["llm_minus_id_only"] = result["variants"]["llm"]["minus_id_only"]
    result["per_user_auc_llm_minus_id_only"] = result["variants"]["llm"]["per_user_minus_id_only"]
    result.update(embed_every=args.every, join_seconds=round(join_seconds, 1), seconds=round(time.perf_counter() - t0, 1),
                  towers={k: tower_summary(m) for k, m in metrics.items()}, data_dir=str(data_dir))
    return result


def qm_auc(pred: pd.DataFrame) -> float:
    from llm_features.metrics import roc_auc

    return roc_auc(pred["label"].to_numpy(), pred["logit"].to_numpy())


def tower_summary(m: dict) -> dict:
    return {"test_auc": m["test"]["auc"], "valid_auc": m["valid"]["auc"], "train_seconds": m["train_seconds"],
            "targets_per_s": m["targets_per_s"], "train_targets": m["train_targets"],
            "selected_epoch": (m.get("selected") or {}).get("epoch"), "options": {
                k: m["options"].get(k) for k in ("packing", "leakage", "epochs", "folds", "fold", "max_steps")}}


# ------------------------------------------------------------------------------------------ statistics
def summarize_dataset(inter: pd.DataFrame, preds: dict[str, list[pd.DataFrame]], towers: dict,
                      states: pd.DataFrame) -> dict:
    """Per-variant metrics over seeds, paired differences against id-only, slices, baselines."""
    from llm_features.metrics import log_loss_from_probs, mean_per_user_auc, roc_auc

    test = inter[inter.split == "test"].sort_values(KEYS + ["label"], kind="stable", ignore_index=True)
    train = inter[inter.split == "train"]
    aligned = {v: [test[KEYS].merge(p, on=KEYS, how="left", validate="1:1") for p in ps] for v, ps in preds.items()}
    users, labels = test["user_id"].to_numpy(), test["label"].to_numpy()
    out: dict[str, Any] = {"rows": {"train": int(len(train)), "test": int(len(test))}, "variants": {}}
    for v, ps in aligned.items():
        sig = [1 / (1 + np.exp(-p["logit"].to_numpy())) for p in ps]
        out["variants"][v] = {
            "auc": qm.seed_summary([roc_auc(labels, p["logit"].to_numpy()) for p in ps]),
            "logloss": qm.seed_summary([log_loss_from_probs(labels, s) for s in sig]),
            "per_user_auc": qm.seed_summary([mean_per_user_auc(users, labels, p["logit"].to_numpy()) for p in ps]),
        }
        if v != "id_only":
            for metric, key in (("auc", "minus_id_only"), ("per_user_auc", "per_user_minus_id_only")):
                out["variants"][v][key] = paired(users, labels, aligned["id_only"], ps, metric)
    masks = qm.slice_masks(train, test)
    out["slices"] = {}
    for sname, mask in masks.items():
        entry: dict[str, Any] = {"rows": int(mask.sum())}
        if mask.sum() and len(np.unique(labels[mask])) == 2:
            for v in ("id_only", "llm"):
                entry[v] = qm.seed_summary([roc_auc(labels[mask], p["logit"].to_numpy()[mask]) for p in aligned[v]])
            entry["llm_minus_id_only"] = paired(users[mask], labels[mask], [p[mask] for p in aligned["id_only"]],
                                                [p[mask] for p in aligned["llm"]], "auc")
        out["slices"][sname] = entry
    base = qm.simple_baselines(inter, split="test")
    order = test[KEYS].merge(inter[inter.split == "test"][KEYS].assign(_i=np.arange((inter.split == "test").sum())),
                             on=KEYS, how="left")["_i"].to_numpy()
    out["baselines"] = {k: roc_auc(labels, s[order]) for k, s in base.items()}
    out["baselines_per_user"] = {k: mean_per_user_auc(users, labels, s[order]) for k, s in base.items()}
    # each score alone, pooled and within users: where the tower's signal is and where it is not
    parts = [c for c in ("tower_logit", "tower_user_score", "tower_item_score", "tower_user_score_window_start",
                         "tower_item_score_window_start") if c in states.columns]
    joined_parts = test[KEYS].merge(states[KEYS + parts], on=KEYS, how="left")
    out["diagnosis"] = {c: {"auc": roc_auc(labels, joined_parts[c].to_numpy()),
                            "per_user_auc": mean_per_user_auc(users, labels, joined_parts[c].to_numpy())} for c in parts}
    tower_logit = test[KEYS].merge(states[KEYS + ["tower_logit"]], on=KEYS, how="left")["tower_logit"].to_numpy()
    out["tower_test_auc_same_rows"] = roc_auc(labels, tower_logit)
    out["tower_test_per_user_auc"] = mean_per_user_auc(users, labels, tower_logit)
    for sname, mask in masks.items():
        if mask.sum() and len(np.unique(labels[mask])) == 2:
            out["slices"][sname]["tower"] = roc_auc(labels[mask], tower_logit[mask])
    return out


def paired(users: np.ndarray, labels: np.ndarray, a: list[pd.DataFrame], b: list[pd.DataFrame],
           metric: str) -> dict:
    """Mean over seeds of b minus a, with a 95% interval from a bootstrap over users (same draws for every seed)."""
    per_seed = [qm.paired_bootstrap(users, labels, x["logit"].to_numpy(), y["logit"].to_numpy(), n_boot=1000,
                                    seed=0, metric=metric, return_samples=True) for x, y in zip(a, b)]
    samples = np.mean([p["samples"] for p in per_seed], axis=0)
    samples = samples[np.isfinite(samples)]
    return {"mean": float(np.mean([p["mean"] for p in per_seed])),
            "ci95": [float(np.quantile(samples, 0.025)), float(np.quantile(samples, 0.975))],
            "seeds": [float(p["mean"]) for p in per_seed]}


# ------------------------------------------------------------------------------------------ report
def write_report(result: dict, out: Path, stem: str = "quality") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    lines = ["# Quality: the +LLM ranker against its id-only twin", "",
             "Commands: " + "; ".join(f"{k}: `{v}`" for k, v in result["commands"].items())
             + f". Seeds {result['seeds']}; 95% intervals: a bootstrap over test "
             "users (paired differences) or a t-interval over seeds (levels). Twins read Feast "
             "(`get_historical_features`, user-embedding snapshots at a user's first N interaction times, then every N-th; N in the dataset's heading); ablations read the tower's exact "
             "per-row states from memory (compare them with `llm_exact_states`).", ""]
    for name, d in result["datasets"].items():
        lines += [f"## {name} (Feast snapshots every {d.get('embed_every', 8)})", "",
                  f"{d['rows']['train']:,} train and {d['rows']['test']:,} test rows; "
                  f"tower test AUC {d['tower_test_auc_same_rows']:.4f} (per-user "
                  f"{d['tower_test_per_user_auc']:.4f}), trained in {d['towers']['default']['train_seconds']:.0f} s "
                  f"at {d['towers']['default']['targets_per_s']:.0f} targets/s.", "",
                  "| variant | test AUC | minus id-only [95% CI] | per-user AUC | minus id-only [95% CI] | LogLoss "
                  "| ranker train s (best epochs) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for v, m in d["variants"].items():
            def ci(x: dict | None) -> str:
                return "" if x is None else f"{x['mean']:+.4f} [{x['ci95'][0]:+.4f}, {x['ci95'][1]:+.4f}]"
            lines.append(f"| {v} | {m['auc']['mean']:.4f} | {ci(m.get('minus_id_only'))} | "
                         f"{m['per_user_auc']['mean']:.4f} | {ci(m.get('per_user_minus_id_only'))} | "
                         f"{m['logloss']['mean']:.4f} | {m.get('train_seconds', float('nan')):.0f} "
                         f"({', '.join(map(str, m.get('best_epochs', [])))}) |")
        lines += ["", "| slice | rows | id-only | +LLM | +LLM minus id-only [95% CI] | tower |", "| --- | --- | --- | --- | --- | --- |"]
        for s, e in d["slices"].items():
            if "llm" in e:
                x = e["llm_minus_id_only"]
                lines.append(f"| {s} | {e['rows']:,} | {e['id_only']['mean']:.4f} | {e['llm']['mean']:.4f} | "
                             f"{x['mean']:+.4f} [{x['ci95'][0]:+.4f}, {x['ci95'][1]:+.4f}] | {e.get('tower', float('nan')):.4f} |")
        lines += ["", "| tower | test AUC | valid AUC | train s | targets/s | train targets | options |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for t, m in d["towers"].items():
            opts = ", ".join(f"{k}={v}" for k, v in m["options"].items() if v is not None)
            lines.append(f"| {t} | {m['test_auc']:.4f} | {m['valid_auc']:.4f} | {m['train_seconds']:.0f} | "
                         f"{m['targets_per_s']:.0f} | {m['train_targets']:,} | {opts} |")
        lines += ["", "| simple baseline | test AUC | per-user AUC |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v:.4f} | {d.get('baselines_per_user', {}).get(k, float('nan')):.4f} |"
                  for k, v in d["baselines"].items()]
        if d.get("diagnosis"):
            lines += ["", "| tower score alone (exact states) | test AUC | per-user AUC |", "| --- | --- | --- |"]
            lines += [f"| {k} | {v['auc']:.4f} | {v['per_user_auc']:.4f} |" for k, v in d["diagnosis"].items()]
        lines.append("")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(result, out / f"{stem}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        d = result["datasets"][name]
        vs = [v for v in d["variants"] if v != "id_only"]
        for i, key in enumerate(("minus_id_only", "per_user_minus_id_only")):
            mean = [d["variants"][v][key]["mean"] for v in vs]
            lo = [m - d["variants"][v][key]["ci95"][0] for m, v in zip(mean, vs)]
            hi = [d["variants"][v][key]["ci95"][1] - m for m, v in zip(mean, vs)]
            ax.errorbar(np.arange(len(vs)) + (i - 0.5) * 0.25, mean, yerr=[lo, hi], fmt="o",
                        label="pooled AUC" if i == 0 else "per-user AUC")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(vs)), vs, rotation=35, ha="right", fontsize=8)
        ax.set(title=f"{name}: minus the id-only twin (95% CI)", ylabel="AUC difference")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "ml-1m", help="ML-1M directory.")
    ap.add_argument("--ml100k", type=Path, default=REPO.parent / "shared" / "data" / "ml-100k")
    ap.add_argument("--datasets", nargs="+", default=["ml-1m", "ml-100k"])
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench_quality")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ablations", nargs="*", default=["exact", "residual", "vectors", "decomposed", "cross_fit",
                                                        "frozen", "sliding_window", "blend"])
    ap.add_argument("--every", type=int, default=2,
                    help="embed-users --every of the +LLM twin's Feast snapshots (llmfeat demo's default).")
    ap.add_argument("--reuse", action="store_true", help="Keep finished towers and ranker runs of the same options.")
    ap.add_argument("--quick", action="store_true", help="A smoke test: 20 tower steps, 1 ranker epoch, one seed.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    stem = "quality_quick" if args.quick else "quality"  # a smoke test never overwrites real results
    if args.quick:
        args.seeds = args.seeds[:1]
    sources = {"ml-1m": args.source, "ml-100k": args.ml100k}
    command = "python bench/bench_quality.py " + " ".join(sys.argv[1:])
    result = {"seeds": args.seeds, "machine": platform.platform(), "torch_threads": torch.get_num_threads(),
              "datasets": {}, "commands": {}}
    for name in args.datasets:
        done = run_dataset(name, sources[name], args)
        previous = args.out / f"{stem}.json"
        if previous.exists():  # datasets of other invocations are kept, with the commands that made them
            old = json.loads(previous.read_text())
            result["datasets"] = {**old.get("datasets", {}), **result["datasets"]}
            result["commands"] = {**old.get("commands", {}), **result["commands"]}
        result["datasets"][name], result["commands"][name] = done, command
        write_report(result, args.out, stem)  # after each dataset: a long run leaves its results as it goes
    print((args.out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()

"""Build ``bench/results/SUMMARY.md`` from the benchmarks' JSON files, without re-running them.

    python bench/summarize.py [RESULTS_DIR]       # or: llmfeat bench --summary-only

Each JSON file is read defensively: a missing or unreadable file, or a missing key, gives a
"not run" row instead of an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

NOT_RUN = "not run"
# The floors of bench_finetune.py, shown even when its results are missing.
FINETUNE_FLOORS = {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_speed": 10.0, "dti_auc_gap": 0.002, "bahe_dti_speed": 50.0}


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(x: Any, fmt: str) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or x != x:  # NaN
        return NOT_RUN
    return fmt.format(x)


def _met(flag: Any, value: str) -> str:
    if value == NOT_RUN:
        return "-"
    return "met" if flag is True else ("**not met**" if flag is False else "-")


def _ci(x: Any) -> str:
    """``+0.0060 [+0.0041, +0.0079]`` from ``{"mean", "ci95"}``, else "not run"."""
    mean, ci = _get(x, "mean"), _get(x, "ci95")
    if _num(mean, "{}") == NOT_RUN or not isinstance(ci, list) or len(ci) != 2:
        return NOT_RUN
    return f"{mean:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def quality_rows(q: dict | None) -> list[tuple[str, str, str, str, str, str]]:
    """The floors of issue 14 from ``quality.json`` (bench_quality.py)."""
    rows = []

    def row(comparison: str, x: Any, floor: float, need_ci: bool = False) -> None:
        v = _ci(x)
        ok = None
        if v != NOT_RUN:
            ok = x["mean"] >= floor and (not need_ci or x["ci95"][0] > 0)
        rows.append(("quality", comparison, v, f"{floor:+.3f}" + (", CI above 0" if need_ci else ""), "-",
                     _met(ok, v)))

    for name, d in (_get(q, "datasets") or {}).items():
        if name == "ml-1m":
            row("ML-1M: +LLM minus id-only twin, test AUC [95% CI over users]", _get(d, "llm_minus_id_only"),
                0.003, need_ci=True)
            row("ML-1M: +LLM minus id-only twin, per-user AUC", _get(d, "per_user_auc_llm_minus_id_only"), 0.0)
            row("ML-1M, users unseen in train: +LLM minus id-only twin, test AUC",
                _get(d, "slices", "unseen_users", "llm_minus_id_only"), 0.01)
        else:
            row(f"{name}: +LLM minus id-only twin, test AUC", _get(d, "llm_minus_id_only"), 0.0)
        best = max((_get(d, "baselines") or {}).values(), default=None)
        worst_twin = min((_get(d, "variants", v, "auc", "mean") for v in ("id_only", "llm")
                          if isinstance(_get(d, "variants", v, "auc", "mean"), (int, float))), default=None)
        if isinstance(best, (int, float)) and worst_twin is not None:
            rows.append(("quality", f"{name}: the weaker twin minus the best simple baseline, test AUC",
                         f"{worst_twin - best:+.4f}", "> 0", "-", "met" if worst_twin > best else "**not met**"))
    return rows


def summary_rows(results: Path) -> list[tuple[str, str, str, str, str, str]]:
    """(benchmark, comparison, measured, floor, paper, floor met) rows."""
    rows: list[tuple[str, str, str, str, str, str]] = []

    enc = _load(results / "encode.json")
    v = _num(_get(enc, "speedup_bucketed_vs_naive"), "{:.2f}x")
    floor = _get(enc, "floor_speedup")
    rows.append(("encode", "length-bucketed vs naive batching: texts/s", v,
                 _num(floor, "{:.1f}x") if floor is not None else "1.5x", "-", _met(_get(enc, "meets_floor"), v)))
    v = _num(_get(enc, "dedup_ratio"), "{:.0f}x")
    rows.append(("encode", "distinct behaviour texts vs every occurrence (encodings saved)", v, "-",
                 "-", "-"))

    feast = _load(results / "feast.json")
    v = _num(_get(feast, "lookup", "feast_get_online_features", "p50_ms"), "{:.1f} ms")
    p99 = _num(_get(feast, "lookup", "feast_get_online_features", "p99_ms"), "{:.1f} ms")
    rows.append(("feast", "online lookup, 1 user + 100 items: p50 / p99", v if v == NOT_RUN else f"{v} / {p99}",
                 "-", "-", "-"))
    v = _num(_get(feast, "materialize", "item_embeddings", "rows_per_s"), "{:.0f} rows/s")
    rows.append(("feast", "materialize item_embeddings", v, "-", "-", "-"))

    rk = _load(results / "ranker.json")
    # the quality of the +LLM twin is bench_quality's (seeds, CIs, slices); ranker.json keeps serving numbers
    rows.extend(quality_rows(_load(results / "quality.json")))
    v = _num(_get(rk, "serving_latency_llm", "p50_ms"), "{:.1f} ms")
    rows.append(("ranker", "serving, 1 user + 100 candidates: p50", v, "-", "-", "-"))
    v = _get(rk, "serving_latency_llm", "p99_ms")
    rows.append(("ranker", "serving, 1 user + 100 candidates: p99", _num(v, "{:.1f} ms"), "50 ms", "-",
                 "-" if not isinstance(v, (int, float)) else ("met" if v <= 50 else "**not met**")))

    serving = _load(results / "serving.json")  # bench_serving.py: `llmfeat serve` under closed-loop load
    for store, label in (("sqlite", "SQLite"), ("redis", "Redis")):
        levels = _get(serving, "stores", store, "levels") or {}
        p99, ratio = _get(levels, "1", "p99_ms"), _get(levels, "1", "p99_ratio_to_feast")
        v = _num(p99, "{:.1f} ms")
        if v != NOT_RUN:
            v += f" ({_num(ratio, '{:.2f}x')} bare Feast's)" if ratio is not None else ""
            v += "; " + ", ".join(f"{c}: {_num(_get(lv, 'rps'), '{:.0f}')}" for c, lv in levels.items())
        errors = [_get(lv, "errors") for c, lv in levels.items() if int(c) <= 32]
        met = "-" if not isinstance(p99, (int, float)) or not isinstance(ratio, (int, float)) else (
            "met" if p99 <= 10 and ratio <= 0.5 and errors and all(e == 0 for e in errors) else "**not met**")
        rows.append(("serving", f"`llmfeat serve` on {label}, 1 user + 100 candidates: p99 at 1 client; rps by "
                     "clients", v, "10 ms, 0.5x; no errors up to 32 clients", "-", met))

    ft = _load(results / "finetune.json")
    rt, fl, mt = _get(ft, "ratios") or {}, {**FINETUNE_FLOORS, **(_get(ft, "floors") or {})}, _get(ft, "meets_floor") or {}
    k = rt.get("default_k", 32)

    def frow(comparison: str, key: str, fmt: str, floor_key: str, floor_fmt: str, paper: str, met_key: str) -> None:
        val = _num(rt.get(key), fmt)
        fv = fl.get(floor_key)
        rows.append(("finetune", comparison, val, _num(fv, floor_fmt) if fv is not None else "-", paper,
                     _met(mt.get(met_key), val)))

    frow("BAHE vs token level (sliding window): training time", "bahe_vs_token_time", "{:.1f}x", "bahe_time",
         "{:.0f}x", "5x (BAHE)", "bahe_time")
    frow("BAHE vs token level (sliding window): training memory (peak RSS increase while training)",
         "bahe_vs_token_memory", "{:.1f}x", "bahe_memory", "{:.0f}x", "5x (BAHE)", "bahe_memory")
    frow(f"DTI (k={k}) vs sliding window (behaviour level): targets/s", "dti_vs_sw_speed", "{:.1f}x", "dti_speed",
         "{:.0f}x", "92% less time (13.3x) (DTI)", "dti_speed")
    frow(f"DTI (k={k}) minus sliding window: test AUC", "dti_auc_gap", "{:+.4f}", "dti_auc_gap", "within {}",
         "equal AUC (DTI)", "dti_auc")
    frow("BAHE + DTI vs token-level sliding window: targets/s", "bahe_dti_vs_token_sw_speed", "{:.0f}x",
         "bahe_dti_speed", "{:.0f}x", "-", "bahe_dti_speed")
    frow(f"DTI (k={k}) vs the sliding window at its fastest batch ({rt.get('sw_best_batch')} targets/step): "
         "targets/s", "dti_vs_sw_best_batch_speed", "{:.1f}x", "dti_speed", "{:.0f}x", "-", "dti_speed_vs_best_batch")
    sw_epochs = _get(ft, "settings", "epochs") or 1
    best = rt.get("dti_equal_auc_best")
    if best:
        rows.append(("finetune", f"DTI (k={k}) reaching a sliding-window run's test AUC: largest training time ratio "
                     f"(DTI {best['dti_epochs']} epochs vs {best.get('sw_recipe', 'same recipe')} sliding window "
                     f"{best['sw_epochs']}; AUC {_num(best.get('gap'), '{:+.4f}')})", _num(best.get("time_ratio"), "{:.1f}x"),
                     f"{_num(fl.get('dti_speed'), '{:.0f}x')} at AUC within {fl['dti_auc_gap']}",
                     "92% less time (13.3x) (DTI)",
                     "met" if (best.get("time_ratio") or 0) >= (fl.get("dti_speed") or 10) else "**not met**"))
    for e in _get(ft, "equal_auc") or []:  # equal epochs beyond the first: does the AUC gap close?
        if e.get("dti_epochs") == e.get("sw_epochs", 0) > sw_epochs and e.get("sw_recipe", "same recipe") == "same recipe":
            gap = e.get("gap")
            rows.append(("finetune", f"DTI (k={k}) minus sliding window, both {e['dti_epochs']} epochs: test AUC gap; "
                         "training time ratio", f"{_num(gap, '{:+.4f}')}; {_num(e.get('time_ratio'), '{:.1f}x')}",
                         f"within {fl['dti_auc_gap']}", "equal AUC (DTI)",
                         "-" if gap is None else ("met" if gap >= -fl["dti_auc_gap"] else "**not met**") + " (AUC)"))
    for e in _get(ft, "equal_auc") or []:
        if e.get("sw_epochs") != sw_epochs or e.get("dti_epochs", 0) <= sw_epochs:
            continue
        recipe = "" if e.get("sw_recipe", "same recipe") == "same recipe" else f" ({e['sw_recipe']})"
        rows.append(("finetune", f"DTI (k={k}) for {e['dti_epochs']} epochs vs sliding window{recipe} for "
                     f"{e['sw_epochs']}: test AUC gap; training time ratio", f"{_num(e.get('gap'), '{:+.4f}')}; "
                     f"{_num(e.get('time_ratio'), '{:.1f}x')}", f"within {fl['dti_auc_gap']}",
                     "92% less time (13.3x) (DTI)", "-"))
    v = _num(rt.get("bahe_dti_minus_id_only_auc"), "{:+.4f}")
    rows.append(("finetune", f"BAHE + DTI (k={k}) minus the best id-only baseline (same targets): test AUC", v, "-",
                 "-", "-"))

    cost = _load(results / "cost.json")
    n = str(_get(cost, "settings", "sweep_n") or 30)
    for key, label in (("by_n", "n"), ("by_batch", "targets per step")):
        sweep = _get(cost, key) or {}
        last = max(sweep, key=int) if sweep else None
        time_ratio = _get(sweep, n if key == "by_n" and n in sweep else last, "ratios", "time")
        mem_ratio = _get(sweep, last, "ratios", "memory")
        if key == "by_n":
            at = n if n in sweep else last
            rows.append(("cost", f"BAHE vs token level, sliding window, n = {at if at else n}: training time",
                         _num(time_ratio, "{:.1f}x"), "5x", "5x (BAHE)",
                         _met(None if time_ratio is None else time_ratio >= 5.0, _num(time_ratio, "{:.1f}x"))))
            xs = ", ".join(f"{x}: {_num(_get(sweep, x, 'ratios', 'time'), '{:.0f}x')}" for x in sorted(sweep, key=int))
            rows.append(("cost", "the same as n grows (n: time ratio)", xs or NOT_RUN, "-", "-", "-"))
        else:
            xs = ", ".join(f"{x}: {_num(_get(sweep, x, 'ratios', 'memory'), '{:.1f}x')}"
                           for x in sorted(sweep, key=int))
            rows.append(("cost", f"BAHE vs token level, n = {n}: training memory as the batch grows "
                         "(targets per step: ratio)", xs or NOT_RUN, "5x", "5x (BAHE)",
                         _met(None if mem_ratio is None else mem_ratio >= 5.0, _num(mem_ratio, "{:.1f}x"))))

    threads = _get(_load(results / "threads.json"), "runs") or {}
    busy = [r for r in threads.values() if r.get("condition") != "as is" and "error" not in r]
    by = {r.get("variant", "").split(" ")[0]: r.get("steady_targets_per_s") for r in busy}
    v = NOT_RUN
    if by.get("default") and by.get("all") and by.get("1"):
        v = f"{by['default'] / by['all']:.1f}x ({by['default'] / by['1']:.2f} of 1 thread)"
    rows.append(("threads", "finetune with a busy-loop competitor: default threads vs every core, targets/s", v,
                 "-", "-", "-"))
    return rows


def build_summary(results: Path | str) -> Path:
    """Write ``<results>/SUMMARY.md`` from the JSON files there; returns its path."""
    results = Path(results)
    results.mkdir(parents=True, exist_ok=True)
    present = [n for n in ("encode", "feast", "ranker", "serving", "finetune", "cost", "threads")
               if (results / f"{n}.json").exists()]
    lines = [
        "# Benchmark summary",
        "",
        "Built from " + (", ".join(f"`{n}.json`" for n in present) if present else "no result files") +
        " in this directory (details in the per-benchmark `.md` files). Papers: BAHE (Geng et al., SIGIR 2024) "
        "reports 5x less training time and memory than token-level encoding; DTI (Lin et al., 2025) reports 92% "
        "less training time (70.5 h to 5.31 h) at equal AUC. \"not run\" means the benchmark's JSON file (or the "
        "value) is missing.",
        "",
        "| benchmark | comparison | measured | floor | paper | floor met |",
        "| --- | --- | ---: | ---: | --- | --- |",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in summary_rows(results)]
    out = results / "SUMMARY.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(build_summary(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"))

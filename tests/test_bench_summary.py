"""bench/summarize.py builds SUMMARY.md from the benchmarks' JSON files (no benchmark is run)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize_under_test", BENCH / "summarize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_from_fake_results(tmp_path: Path) -> None:
    (tmp_path / "encode.json").write_text(json.dumps(
        {"speedup_bucketed_vs_naive": 1.64, "floor_speedup": 1.5, "meets_floor": True, "dedup_ratio": 134.9}))
    (tmp_path / "finetune.json").write_text(json.dumps({
        "ratios": {"bahe_vs_token_time": 12.3, "bahe_vs_token_memory": 2.5, "dti_vs_sw_speed": 7.25,
                   "dti_auc_gap": -0.0011, "bahe_dti_vs_token_sw_speed": 88.0, "default_k": 32,
                   "dti_vs_sw_best_batch_speed": 6.9, "sw_best_batch": 64,
                   "dti_equal_auc_best": {"dti_epochs": 3, "sw_epochs": 2, "sw_recipe": "same recipe",
                                          "gap": -0.0003, "time_ratio": 6.6}},
        "settings": {"epochs": 1},
        "equal_auc": [{"dti_epochs": 1, "sw_epochs": 1, "gap": -0.0011, "time_ratio": 7.25},
                      {"dti_epochs": 2, "sw_epochs": 1, "gap": -0.0009, "time_ratio": 3.63},
                      {"dti_epochs": 2, "sw_epochs": 2, "gap": -0.0030, "time_ratio": 7.1},
                      {"dti_epochs": 3, "sw_epochs": 1, "sw_recipe": "small batch", "gap": 0.0025,
                       "time_ratio": 2.9}],
        "floors": {"bahe_time": 5.0, "bahe_memory": 5.0, "dti_speed": 10.0, "dti_auc_gap": 0.002,
                   "bahe_dti_speed": 50.0},
        "meets_floor": {"bahe_time": True, "bahe_memory": False, "dti_speed": False, "dti_auc": True,
                        "bahe_dti_speed": True, "dti_speed_vs_best_batch": False},
    }))
    (tmp_path / "cost.json").write_text(json.dumps({
        "settings": {"sweep_n": 30},
        "by_n": {"10": {"ratios": {"time": 3.2, "memory": 1.5}}, "30": {"ratios": {"time": 41.0, "memory": 2.0}}},
        "by_batch": {"2": {"ratios": {"time": 40.0, "memory": 2.1}}, "16": {"ratios": {"time": 44.0, "memory": 9.7}}},
    }))
    (tmp_path / "ranker.json").write_text("{not json")  # unreadable -> not run, no crash
    out = _summarize().build_summary(tmp_path)
    text = out.read_text()
    assert out == tmp_path / "SUMMARY.md"
    assert "| encode | length-bucketed vs naive batching: texts/s | 1.64x | 1.5x |" in text
    assert "12.3x" in text and "2.5x" in text and "7.2x" in text and "-0.0011" in text and "88x" in text
    assert "5x (BAHE)" in text and "92% less time" in text
    memory = next(line for line in text.splitlines() if "| finetune |" in line and "training memory" in line)
    assert "**not met**" in memory
    speed = next(line for line in text.splitlines() if "BAHE + DTI" in line)
    assert speed.endswith("| 50x | - | met |")
    longer = [line for line in text.splitlines() if "epochs vs sliding window for" in line]
    assert len(longer) == 1 and "for 2 epochs vs sliding window for 1" in longer[0]
    assert "| -0.0009; 3.6x | within 0.002 |" in longer[0]
    same = [line for line in text.splitlines() if "both 2 epochs" in line]
    assert len(same) == 1 and "| -0.0030; 7.1x | within 0.002 |" in same[0] and same[0].endswith("| **not met** (AUC) |")
    best_time = next(line for line in text.splitlines() if "largest training time ratio" in line)
    assert "DTI 3 epochs vs same recipe sliding window 2; AUC -0.0003" in best_time
    assert "| 6.6x | 10x at AUC within 0.002 |" in best_time and best_time.endswith("| **not met** |")
    reference = [line for line in text.splitlines() if "sliding window (small batch) for 1" in line]
    assert len(reference) == 1 and "for 3 epochs" in reference[0] and "| +0.0025; 2.9x |" in reference[0]
    best = next(line for line in text.splitlines() if "fastest batch (64 targets/step)" in line)
    assert "| 6.9x | 10x |" in best and best.endswith("| **not met** |")
    cost_time = next(line for line in text.splitlines() if line.startswith("| cost | BAHE vs token level, sliding"))
    assert "n = 30" in cost_time and "| 41.0x | 5x | 5x (BAHE) | met |" in cost_time
    assert "| 10: 3x, 30: 41x |" in text
    cost_memory = next(line for line in text.splitlines() if line.startswith("| cost |") and "memory" in line)
    assert "2: 2.1x, 16: 9.7x" in cost_memory and cost_memory.endswith("| met |")
    feast = next(line for line in text.splitlines() if line.startswith("| feast | online lookup"))
    assert "not run" in feast
    ranker = next(line for line in text.splitlines() if line.startswith("| ranker | serving") and "p99" in line)
    assert "not run" in ranker


def test_summary_with_no_results(tmp_path: Path) -> None:
    text = _summarize().build_summary(tmp_path / "empty").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows and all("not run" in r for r in rows)


def test_quality_rows_read_the_issue_14_floors(tmp_path: Path) -> None:
    ci = lambda m, lo, hi: {"mean": m, "ci95": [lo, hi], "seeds": [m]}  # noqa: E731
    (tmp_path / "quality.json").write_text(json.dumps({"datasets": {
        "ml-1m": {"llm_minus_id_only": ci(0.006, 0.004, 0.008), "per_user_auc_llm_minus_id_only": ci(-0.005, -0.008, -0.002),
                  "slices": {"unseen_users": {"llm_minus_id_only": ci(0.004, -0.001, 0.009)}},
                  "baselines": {"matrix_factorization": 0.77}, "variants": {"id_only": {"auc": {"mean": 0.791}},
                                                                            "llm": {"auc": {"mean": 0.797}}}},
        "ml-100k": {"llm_minus_id_only": ci(0.002, -0.001, 0.004), "baselines": {"item_positive_rate": 0.80},
                    "variants": {"id_only": {"auc": {"mean": 0.72}}, "llm": {"auc": {"mean": 0.73}}}},
    }}))
    rows = {r[1]: r for r in _summarize().summary_rows(tmp_path) if r[0] == "quality"}
    lift = rows["ML-1M: +LLM minus id-only twin, test AUC [95% CI over users]"]
    assert lift[2] == "+0.0060 [+0.0040, +0.0080]" and lift[5] == "met"
    assert rows["ML-1M: +LLM minus id-only twin, per-user AUC"][5] == "**not met**"
    assert rows["ML-1M, users unseen in train: +LLM minus id-only twin, test AUC"][5] == "**not met**"
    assert rows["ml-100k: +LLM minus id-only twin, test AUC"][5] == "met"
    assert rows["ml-1m: the weaker twin minus the best simple baseline, test AUC"][5] == "met"
    assert rows["ml-100k: the weaker twin minus the best simple baseline, test AUC"][5] == "**not met**"


# ------------------------------------------------------------------- llmfeat bench: script options
COMMON = {"source": "--source", "data_dir": "--data-dir", "quick": "--quick"}


def _argparse_options(script: Path) -> set[str]:
    """The option strings of every ``add_argument("--x", ...)`` call in a script, and in the functions it
    imports from the other modules of ``bench/`` (a shared parser such as ``workspace_parser``)."""
    import ast

    def options(tree: ast.AST) -> set[str]:
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"]
        return {a.value for c in calls for a in c.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}

    tree = ast.parse(script.read_text())
    found = options(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (script.parent / f"{node.module}.py").is_file():
            names = {a.name for a in node.names}
            module = ast.parse((script.parent / f"{node.module}.py").read_text())
            for fn in module.body:
                if isinstance(fn, ast.FunctionDef) and fn.name in names:
                    found |= options(fn)
    return found


def test_script_options_declare_exactly_the_common_options_each_script_parses() -> None:
    from llm_features.cli.bench import SCRIPT_OPTIONS

    scripts = {p.stem: p for p in BENCH.glob("bench_*.py")}
    assert set(SCRIPT_OPTIONS) == set(scripts), "one SCRIPT_OPTIONS row per bench/bench_*.py"
    for name, script in scripts.items():
        parsed = _argparse_options(script)
        assert SCRIPT_OPTIONS[name] == {k for k, opt in COMMON.items() if opt in parsed}, name


def test_script_args_pass_only_the_declared_options(tmp_path: Path) -> None:
    import click
    import pytest

    from llm_features.cli.bench import script_args

    src, ws = tmp_path / "ml-1m", tmp_path / "ws"
    assert script_args(BENCH / "bench_finetune.py", src, True, ws) == [
        "--source", str(src), "--data-dir", str(ws), "--quick"]
    assert script_args(BENCH / "bench_cost.py", src, True, ws) == [
        "--source", str(src), "--data-dir", str(ws), "--quick"]
    assert script_args(BENCH / "bench_scale.py", src, True, ws) == ["--quick"]
    assert script_args(BENCH / "bench_ranker.py", src, True, None) == []
    with pytest.raises(click.ClickException, match="bench_new.py has no row in SCRIPT_OPTIONS"):
        script_args(tmp_path / "bench_new.py", src, False, ws)

"""The README's "Step by step" block is `make demo`, one command per stage.

- fast: each command of the block, parsed as the command line parses it, gives the configuration the
  demo builds for that stage (``llm_features.pipeline.stage_configs``), field for field; and the demo
  departs from a stage's own defaults only where ``DEMO_ONLY`` says (and the block passes those);
- end to end: the block, run as written (``--source`` pointed at a 40-user sample of ML-100K) in one
  directory, and ``llmfeat demo --source <the same>`` in another: the same files, the same tables,
  the tower's and both twins' test metrics, and the same scores for the block's ranked list.

Both runs use one torch thread (``$OMP_NUM_THREADS``, which the default thread choice follows):
the default thread count depends on how busy the machine is at each start, and a different count
sums floats in a different order. With it fixed the two runs agree to the last digit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from tests.datasets import ML100K, require_ml100k

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_SOURCE = "../shared/data/ml-1m"  # what the block (and `make demo`) reads

# command -> demo stage key; the ranker twins and their evaluations are told apart by their options
STAGES = {"ingest": "ingest", "encode": "encode", "finetune": "finetune", "embed-users": "embed_users"}
# files only the demo writes: its report, plots, apply log and up-to-date stamps
DEMO_ONLY_FILES = ("demo_report.json", "feast_apply.log", "plots/", "demo_stamp.json")


def readme_commands() -> list[list[str]]:
    """The command lines of the README's "Step by step" bash block, in order."""
    section = README.read_text().split("### Step by step\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [tokens for line in block.replace("\\\n", " ").splitlines()
            if (tokens := shlex.split(line, comments=True))]


def _stage_key(tokens: list[str]) -> str | None:
    args = tokens[1:]
    if args[0] in STAGES:
        return STAGES[args[0]]
    if args[:2] == ["ranker", "train"]:
        return "ranker_id_only" if "--no-llm-features" in args else "ranker_llm"
    if args[:2] == ["ranker", "evaluate"]:
        ckpt = args[args.index("--checkpoint") + 1] if "--checkpoint" in args else ""
        return "evaluate_id_only" if ckpt.endswith("ranker_id_only") else "evaluate_llm"
    return None  # feast apply / materialize / ranker score: no stage options the demo sets


def _parsed_config(tokens: list[str]):
    """The configuration the command line builds for ``tokens`` (nothing runs)."""
    import click

    from llm_features.cli import main
    from llm_features.config import build_config, leaf_fields

    cmd, args = main, list(tokens[1:])
    while isinstance(cmd, click.Group):
        name, args = args[0], args[1:]
        cmd = cmd.get_command(None, name)
    params = cmd.make_context(name, args).params
    cls = _config_class(tokens)
    values = {f.name: params[f.name] for f, _ in leaf_fields(cls)}
    return build_config(cls, values, checked=frozenset(values))


def _normalized(cfg, data_dir: Path) -> dict:
    """Field values with paths resolved (the working directory is the checkout) and the default data dir
    written out."""
    out = {}
    for name, v in _options(cfg).items():
        if name == "data_dir" and v is None:
            v = data_dir
        out[name] = Path(v).resolve() if isinstance(v, Path) else v
    return out


def _options(cfg) -> dict:
    """Every option's value, keyed by its name (a nested config's fields in its place)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out.update(_options(v) if dataclasses.is_dataclass(v) else {f.name: v})
    return out


def _config_class(tokens: list[str]):
    from llm_features.embed_users import EmbedUsersConfig
    from llm_features.encode import EncodeConfig
    from llm_features.finetune import FinetuneConfig
    from llm_features.ingest import IngestConfig
    from ranker.config import EvaluateConfig, TrainConfig

    key = _stage_key(tokens)
    return {"ingest": IngestConfig, "encode": EncodeConfig, "finetune": FinetuneConfig,
            "embed_users": EmbedUsersConfig}.get(key) or (TrainConfig if key.startswith("ranker") else EvaluateConfig)


@pytest.fixture
def checkout_like(tmp_path, monkeypatch):
    """A directory laid out like the checkout (feast_repo/ without data), as the working directory."""
    def make(name: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        shutil.copytree(ROOT / "feast_repo", d / "feast_repo", ignore=shutil.ignore_patterns("data", "__pycache__"))
        monkeypatch.chdir(d)
        return d
    monkeypatch.delenv("LLMFEAT_DATA_DIR", raising=False)
    return make


def test_readme_block_builds_the_demos_stage_configs(checkout_like):
    from llm_features.pipeline import DEMO_ONLY, PipelineConfig, stage_configs
    from llm_features.workspace import resolve_data_dir

    commands = readme_commands()
    assert [c[0] for c in commands] == ["llmfeat"] * len(commands)
    checkout_like("block")
    source = next(c[c.index("--source") + 1] for c in commands if c[1] == "ingest")
    assert source == DEMO_SOURCE
    data_dir = resolve_data_dir("feast_repo", None)
    demo = stage_configs(PipelineConfig(source=Path(source)), data_dir)
    keys = [_stage_key(c) for c in commands]
    # every stage the demo runs, in the demo's order, each once
    assert [k for k in keys if k] == list(demo), keys
    for tokens, key in zip(commands, keys):
        if key is None:
            continue
        got, want = _normalized(_parsed_config(tokens), data_dir), _normalized(demo[key], data_dir)
        diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        assert not diff, f"{shlex.join(tokens)}: README block != demo: {diff}"
        # the options the block writes out are the demo's departures from the defaults, or paths
        for stage, options in DEMO_ONLY.items():
            if key == stage:
                for option in options:
                    assert f"--{option.replace('_', '-')}" in tokens, (tokens, option)


def test_demo_departs_from_stage_defaults_only_where_declared(checkout_like):
    """Every stage default is the demo's, except DEMO_ONLY (and, with --size small, SMALL_ONLY)."""
    from llm_features.config import config_from_options
    from llm_features.pipeline import DEMO_ONLY, SMALL_ONLY, PipelineConfig, stage_configs
    from llm_features.workspace import resolve_data_dir

    checkout_like("defaults")
    data_dir = resolve_data_dir("feast_repo", None)
    identity = {"source", "repo", "data_dir", "llm_features"}  # what a stage is run on, and which twin
    for size in ("default", "small"):
        demo = stage_configs(PipelineConfig(size=size), data_dir)
        for key, cfg in demo.items():
            options = _options(cfg)
            given = {f: options[f] for f in identity if f in options}
            if key == "evaluate_id_only":  # the id-only twin's checkpoint is named (README: --checkpoint)
                given["checkpoint"] = demo["ranker_id_only"].out
            default = config_from_options(type(cfg), **given)
            stage = "ranker" if key.startswith("ranker") else key
            allowed = set(DEMO_ONLY.get(stage, ())) | (set(SMALL_ONLY.get(stage, ())) if size == "small" else set())
            diff = {name for name, v in options.items() if v != _options(default)[name]}
            assert diff <= allowed, f"{size} demo, {key}: {sorted(diff - allowed)} differ from the stage defaults"
            if size == "default":
                assert diff == allowed, (key, diff)  # DEMO_ONLY names real departures only
    # outputs under the data dir, in the demo's layout
    demo = stage_configs(PipelineConfig(), data_dir)
    assert demo["finetune"].out == data_dir / "runs/finetune" == demo["embed_users"].checkpoint
    assert demo["ranker_llm"].out == data_dir / "runs/ranker_llm" == demo["evaluate_llm"].checkpoint
    assert demo["ranker_id_only"].out == data_dir / "runs/ranker_id_only"


# ---------------------------------------------------------------------------------------- end to end
def ml100k_sample(dest: Path, users: int = 40, keep_items: int = 10) -> Path:
    """ML-100K's first ``users`` users: their ratings, their items (and items 1..keep_items), the genres."""
    require_ml100k()
    dest.mkdir(parents=True)
    ratings = [line for line in (ML100K / "u.data").read_text().splitlines() if int(line.split("\t")[0]) <= users]
    (dest / "u.data").write_text("\n".join(ratings) + "\n")
    items = {int(line.split("\t")[1]) for line in ratings} | set(range(1, keep_items + 1))
    raw = (ML100K / "u.item").read_bytes().decode("latin-1").splitlines()
    (dest / "u.item").write_bytes(("\n".join(x for x in raw if int(x.split("|")[0]) in items) + "\n").encode("latin-1"))
    (dest / "u.user").write_text("\n".join(x for x in (ML100K / "u.user").read_text().splitlines()
                                           if int(x.split("|")[0]) <= users) + "\n")
    shutil.copy(ML100K / "u.genre", dest / "u.genre")
    return dest


def _run(tokens: list[str]) -> str:
    from llm_features.cli import main

    res = CliRunner().invoke(main, tokens[1:], catch_exceptions=False)
    assert res.exit_code == 0, f"{shlex.join(tokens)} failed:\n{res.output[-3000:]}"
    return res.output


def _files(data: Path, leave_out: tuple[str, ...]) -> set[str]:
    out = set()
    for p in data.rglob("*"):
        rel = p.relative_to(data).as_posix()
        if p.is_file() and not any(rel == x or rel.startswith(x) or rel.endswith("/" + x) for x in leave_out):
            out.add(rel)
    return out


def _table(path: Path) -> pd.DataFrame:
    df = pd.read_parquet(path)
    cols = [c for c in df.columns if not isinstance(df[c].iloc[0] if len(df) else None, (np.ndarray, list))]
    return df.sort_values(cols).reset_index(drop=True) if cols else df


def _same_metrics(a: dict, b: dict, keys=("auc", "logloss", "per_user_auc")) -> None:
    for k in keys:
        x, y = a.get(k), b.get(k)
        assert (x is None and y is None) or (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-9), \
            (k, x, y)


@pytest.mark.integration
@pytest.mark.slow
def test_readme_block_reproduces_the_demo(tmp_path, checkout_like, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # see the module doc
    sample = ml100k_sample(tmp_path / "ml-100k-sample")
    commands = [[str(sample) if t == DEMO_SOURCE else t for t in c] for c in readme_commands()]

    block = checkout_like("block")
    for c in commands:
        _run(c)
    demo_dir = checkout_like("demo")
    _run(["llmfeat", "demo", "--source", str(sample), "--no-progress"])
    score = next(c for c in commands if c[1:3] == ["ranker", "score"])
    _run(score)  # the block's ranked list, from the demo's data dir

    a, b = block / "feast_repo/data", demo_dir / "feast_repo/data"
    report = json.loads((b / "demo_report.json").read_text())
    # the same files, each table with the same rows
    files = _files(a, ())
    assert files == _files(b, DEMO_ONLY_FILES), sorted(files ^ _files(b, DEMO_ONLY_FILES))
    for rel in sorted(f for f in files if f.endswith(".parquet") and not f.startswith("runs/")):
        ta, tb = _table(a / rel), _table(b / rel)
        assert list(ta.columns) == list(tb.columns) and len(ta) == len(tb), rel
        for col in ta.columns:
            if isinstance(ta[col].iloc[0] if len(ta) else None, (np.ndarray, list)):  # vectors, id lists
                for x, y in zip(ta[col], tb[col]):
                    x, y = np.asarray(x), np.asarray(y)
                    if x.dtype.kind in "fc":
                        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6, err_msg=f"{rel} {col}")
                    else:
                        assert np.array_equal(x, y), (rel, col, x, y)
            else:
                assert ta[col].equals(tb[col]), (rel, col)
    # the tower, both twins on the test split
    ft = json.loads((a / "runs/finetune/metrics.json").read_text())
    _same_metrics(ft["test"], report["finetune"]["test"])
    for name in ("id_only", "llm"):
        test = json.loads((a / f"runs/ranker_{name}/eval-test/metrics.json").read_text())
        assert 0.0 < test["auc"] < 1.0
        _same_metrics(test, report["ranker"][name]["test"])
    # the same ranked list, read from each run's online store
    ra = json.loads((a / "runs/ranker_llm/score/metrics.json").read_text())["ranked"]
    rb = json.loads((b / "runs/ranker_llm/score/metrics.json").read_text())["ranked"]
    assert [r["item_id"] for r in ra] == [r["item_id"] for r in rb]
    np.testing.assert_allclose([r["probability"] for r in ra], [r["probability"] for r in rb], rtol=0, atol=1e-6)

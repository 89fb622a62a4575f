"""Robustness of the main job, end to end, on real MovieLens-100K data.

* ``llmfeat demo`` interrupted inside any stage, then rerun, ends with the outputs of an
  uninterrupted run: the same rows in every parquet dataset, no duplicated keys, equal embeddings,
  and the same values in the online store;
* a second run with nothing new writes nothing but its reports;
* a new day of interactions appended to the source: only the new texts are encoded, only the users
  active that day are re-embedded, every old row stays as it was (and ``llmfeat demo`` itself
  copes with it).

To keep each demo run to well under a minute on a 2-core machine, the source is a slice of ML-100K
in its own layout: every user, only the movies with ids 1..ITEMS (among the most rated), and every
day but the last. The last day is held back whole (all of its movies, most of them new to the
slice, with their ``u.item`` lines) for the new-day tests. ``tests/test_demo.py`` runs the demo on
the full ML-100K.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.datasets import ML100K, require_ml100k

REPO = Path(__file__).resolve().parents[1] / "feast_repo"

pytestmark = pytest.mark.integration

ITEMS = 50  # the slice: movies 1..ITEMS
FINETUNE_USERS = 8
DAY_S = 86_400
US_PER_S = 1_000_000
US_PER_DAY = DAY_S * US_PER_S
ATOL = 1e-5  # re-encoding a text in another batch may move its vector by float noise

# name -> (path in the data dir, key columns); a directory means every *.parquet in it (what DuckDB reads)
DATASETS = {
    "interactions": ("canonical/interactions.parquet", ["user_id", "item_id", "event_timestamp"]),
    "items": ("canonical/items.parquet", ["item_id"]),
    "users": ("canonical/users.parquet", ["user_id"]),
    "atomic_behavior_embeddings": ("atomic_behavior_embeddings", ["behavior_id"]),
    "item_embeddings": ("item_embeddings", ["item_id"]),
    "user_embeddings": ("user_embeddings", ["user_id", "event_timestamp"]),
    "user_recent_behaviors": ("user_recent_behaviors", ["user_id", "event_timestamp"]),
}
# files a run with nothing new may rewrite: its reports, the plots, and feast apply's registry
REPORT_FILES = {"demo_report.json", "encode_report.json", "feast_apply.log", "registry.db",
                "plots/training_curves.png", "plots/ranker_auc.png"}


class Interrupted(Exception):
    """Stands in for a kill: raised inside a stage, after it has written part of its output."""


# ----------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class Slice:
    base: list[str]  # u.data lines of the slice, every day but the last
    new_day: list[str]  # every u.data line of the last day (all movies)
    items: dict[int, bytes]  # u.item lines (Latin-1) by movie id


@pytest.fixture(scope="module")
def ml100k() -> Slice:
    require_ml100k()
    lines = [line for line in (ML100K / "u.data").read_text().splitlines() if line.strip()]
    day = [int(line.split("\t")[3]) // DAY_S for line in lines]
    last = max(day)
    base = [line for line, d in zip(lines, day) if d < last and int(line.split("\t")[1]) <= ITEMS]
    new_day = [line for line, d in zip(lines, day) if d == last]
    items = {int(line.split(b"|")[0]): line for line in (ML100K / "u.item").read_bytes().splitlines()
             if line.strip()}
    return Slice(base, new_day, items)


def write_source(dest: Path, s: Slice) -> Path:
    dest.mkdir(parents=True)
    (dest / "u.data").write_text("".join(line + "\n" for line in s.base))
    (dest / "u.item").write_bytes(b"".join(s.items[i] + b"\n" for i in range(1, ITEMS + 1)))
    for name in ("u.user", "u.genre"):
        shutil.copy(ML100K / name, dest / name)
    return dest


def append_new_day(src: Path, s: Slice) -> None:
    """Append the held-back day to u.data, and the u.item lines of the movies it brings."""
    with open(src / "u.data", "a") as f:
        f.writelines(line + "\n" for line in s.new_day)
    known = {int(line.split(b"|")[0]) for line in (src / "u.item").read_bytes().splitlines() if line.strip()}
    new_items = sorted({int(line.split("\t")[1]) for line in s.new_day} - known)
    with open(src / "u.item", "ab") as f:
        f.writelines(s.items[i] + b"\n" for i in new_items)


@pytest.fixture(scope="module")
def base_source(ml100k, tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("source") / "ml-100k-slice", ml100k)


# ----------------------------------------------------------------------------------------- demo runs
@dataclass
class Run:
    root: Path
    source: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def repo(self) -> Path:
        return self.root / "feast_repo"

    def config(self):
        from llm_features.pipeline import PipelineConfig

        if not self.repo.exists():
            shutil.copytree(REPO, self.repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
        return PipelineConfig(source=self.source, repo=self.repo, data_dir=self.data_dir, size="small",
                          finetune_users=FINETUNE_USERS, num_candidates=20, progress=False)

    def demo(self) -> dict:
        from llm_features.pipeline import run_pipeline

        return run_pipeline(self.config())


@dataclass
class Reference:
    run: Run
    report: dict
    datasets: dict[str, pd.DataFrame]
    rerun_report: dict  # the second run in place, with nothing new
    rerun_changed: set[str]  # the files of the data dir it wrote


@pytest.fixture(scope="module")
def reference(base_source, tmp_path_factory) -> Reference:
    """One uninterrupted demo run on the slice (what every interrupted run must end with), then a
    second run in place with nothing new. The rerun happens here, before any test reads the
    reference, so that no test depends on which test runs first; it reruns in place because a copy
    would move the data dir, which the finetune stamp includes."""
    run = Run(tmp_path_factory.mktemp("reference"), base_source)
    report = run.demo()
    datasets = {name: read_dataset(run.data_dir, name) for name in DATASETS}
    before = file_states(run.data_dir)
    rerun = run.demo()
    after = file_states(run.data_dir)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return Reference(run, report, datasets, rerun, changed)


def read_dataset(data_dir: Path, name: str) -> pd.DataFrame:
    rel, keys = DATASETS[name]
    path = data_dir / rel
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    assert files and all(f.exists() for f in files), f"{name}: nothing at {path}"
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    return table.to_pandas().sort_values(keys, kind="stable").reset_index(drop=True)


def assert_same_rows(name: str, got: pd.DataFrame, want: pd.DataFrame) -> None:
    keys = DATASETS[name][1]
    dup = got.duplicated(keys)
    assert not dup.any(), f"{name}: {int(dup.sum())} duplicated {keys}, e.g. {got.loc[dup, keys].head(3)}"
    assert len(got) == len(want), f"{name}: {len(got)} rows, uninterrupted run has {len(want)}"
    assert sorted(got.columns) == sorted(want.columns), name
    pd.testing.assert_frame_equal(got[keys], want[keys], obj=f"{name} keys")
    for col in want.columns:
        if col in keys:
            continue
        a, b = got[col], want[col]
        if col.endswith("_embedding"):
            np.testing.assert_allclose(np.stack(a.to_numpy()), np.stack(b.to_numpy()), rtol=0, atol=ATOL,
                                       err_msg=f"{name}.{col}")
        elif len(b) and isinstance(b.iloc[0], np.ndarray):
            assert [x.tolist() for x in a] == [x.tolist() for x in b], f"{name}.{col} differs"
        else:
            pd.testing.assert_series_equal(a, b, obj=f"{name}.{col}")


def online_values(run: Run, user_ids: list[int], item_ids: list[int]) -> dict[str, list]:
    """What the online store serves for these users and items."""
    from llm_features.store import open_store

    store = open_store(run.repo, run.data_dir)
    users = store.get_online_features(
        features=["user_embeddings:user_embedding", "user_recent_behaviors:recent_behavior_ids",
                  "user_recent_behaviors:recent_item_ids"],
        entity_rows=[{"user_id": u} for u in user_ids]).to_dict()
    if not item_ids:
        return users
    items = store.get_online_features(features=["item_embeddings:item_embedding"],
                                      entity_rows=[{"item_id": i} for i in item_ids]).to_dict()
    return {**users, **items}


def assert_same_online(got: dict[str, list], want: dict[str, list]) -> None:
    assert got.keys() == want.keys()
    for name, values in want.items():
        assert [v is None for v in got[name]] == [v is None for v in values], f"online {name}: presence"
        if name.endswith("_embedding"):
            present = [v is not None for v in values]
            assert any(present), f"online {name}: nothing served"
            np.testing.assert_allclose(np.array([v for v in got[name] if v is not None]),
                                       np.array([v for v in values if v is not None]), rtol=0, atol=ATOL,
                                       err_msg=f"online {name}")
        else:
            assert got[name] == values, f"online {name} differs"


def file_states(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def parquet_parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def embed_settings(data_dir: Path) -> dict:
    """The snapshot options the demo exported user embeddings with, as EmbedUsersConfig keywords.

    Each part records its cadence: ``event``, ``day``, ``last``, or ``event<N>`` for cadence=event
    with every=N.
    """
    from llm_features.embed_users import STATE_METADATA_KEY
    from llm_features.parquet_io import file_metadata

    recorded = {json.loads(file_metadata(p)[STATE_METADATA_KEY])["cadence"]
                for p in parquet_parts(data_dir / "user_embeddings")}
    assert len(recorded) == 1, recorded
    value = recorded.pop()
    m = re.fullmatch(r"(event|day|last)(\d*)", value)
    assert m is not None, f"unknown cadence {value!r}"
    return {"cadence": m[1], **({"every": int(m[2])} if m[2] else {})}


def expected_snapshot_keys(interactions: pd.DataFrame, cadence: str, every: int = 1) -> set[tuple[int, int]]:
    """(user_id, stamp in µs) of every row embed-users documents for ``cadence``.

    event: each distinct interaction time but the user's first (time 0), with every=N only times
    1..N and then the multiples of N, plus last + 1 s; day: the start of each active UTC day but the
    first, plus the start of the day after the last; last: last + 1 s.
    """
    ts = interactions["event_timestamp"].astype("datetime64[us, UTC]").astype("int64")
    keys: set[tuple[int, int]] = set()
    for uid, t in ts.groupby(interactions["user_id"].to_numpy()):
        t = np.unique(t.to_numpy())
        if cadence == "event":
            idx = np.arange(len(t))
            stamps = [*t[(idx >= 1) & ((idx <= every) | (idx % every == 0))], t[-1] + US_PER_S]
        elif cadence == "day":
            days = np.unique(t // US_PER_DAY) * US_PER_DAY
            stamps = [*days[1:], days[-1] + US_PER_DAY]
        elif cadence == "last":
            stamps = [t[-1] + US_PER_S]
        else:
            raise AssertionError(f"unknown cadence {cadence!r}")
        keys.update((int(uid), int(s)) for s in stamps)
    return keys


def row_keys(frame: pd.DataFrame) -> set[tuple[int, int]]:
    ts = frame["event_timestamp"].astype("datetime64[us, UTC]").astype("int64")
    return set(zip(frame["user_id"].astype("int64").tolist(), ts.tolist()))


def by_key(frame: pd.DataFrame) -> dict[tuple[int, int], np.ndarray]:
    ts = frame["event_timestamp"].astype("datetime64[us, UTC]").astype("int64")
    return dict(zip(zip(frame["user_id"].astype("int64").tolist(), ts.tolist()), frame["user_embedding"]))


# ----------------------------------------------------------------------------------------- 2. no-op rerun
def test_second_run_with_nothing_new_writes_only_its_reports(reference):
    """The reference's own workspace, rerun in place by the fixture. Beyond test_demo.py's report flags:
    no data file is written at all."""
    run, first, second, changed = reference.run, reference.report, reference.rerun_report, reference.rerun_changed
    assert changed <= REPORT_FILES, f"a run with nothing new wrote {sorted(changed - REPORT_FILES)}"
    assert second["ingest"]["skipped"] and second["finetune"]["skipped"]
    assert all(r["skipped"] for r in second["ranker"].values())
    assert second["encode"]["texts_encoded"] == 0
    assert second["encode"]["already_encoded"] == second["encode"]["distinct_texts"] \
        == first["encode"]["distinct_texts"]
    assert second["embed_users"]["rows_written"] == 0
    assert second["embed_users"]["rows_existing"] == first["embed_users"]["rows_written"] \
        == len(reference.datasets["user_embeddings"])
    assert second["materialize"]["entities"] == first["materialize"]["entities"]
    for name, want in reference.datasets.items():
        assert_same_rows(name, read_dataset(run.data_dir, name), want)


# ----------------------------------------------------------------------------------------- 1. interrupted
def _fail_on_call(monkeypatch, module, name: str, *, allow: int = 0, write_first: bool = False, when=None):
    """Replace ``module.name``: the first ``allow`` matching calls run as usual, the next one raises
    :class:`Interrupted` (after running the real function when ``write_first``)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        if when is not None and not when(*args, **kwargs):
            return real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] <= allow:
            return real(*args, **kwargs)
        if write_first:
            real(*args, **kwargs)
        raise Interrupted(f"{module.__name__}.{name}, call {calls['n']}")

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _interrupt_ingest(monkeypatch):
    import llm_features.recent

    # the canonical tables and split.json are written; the recent lists and the report are not
    _fail_on_call(monkeypatch, llm_features.recent, "write_recent_behaviors")

    def check(data_dir: Path, ref: Reference) -> None:
        canonical = data_dir / "canonical"
        assert (canonical / "interactions.parquet").exists() and (canonical / "split.json").exists()
        assert not (canonical / "ingest_report.json").exists()
        assert not parquet_parts(data_dir / "user_recent_behaviors")
    return check


def _interrupt_encode(monkeypatch):
    import llm_features.encode

    # killed between the behaviour part and the item part
    _fail_on_call(monkeypatch, llm_features.encode, "write_part", allow=1)

    def check(data_dir: Path, ref: Reference) -> None:
        assert len(parquet_parts(data_dir / "atomic_behavior_embeddings")) == 1
        assert not parquet_parts(data_dir / "item_embeddings")
    return check


def _interrupt_finetune(monkeypatch):
    import llm_features.finetune.train

    # killed right after the first checkpoint is on disk, before the demo marks the step done
    _fail_on_call(monkeypatch, llm_features.finetune.train, "save_checkpoint", write_first=True)

    def check(data_dir: Path, ref: Reference) -> None:
        out = data_dir / "runs/finetune"
        assert (out / "model.safetensors").exists() and not (out / "demo_stamp.json").exists()
    return check


def _interrupt_embed_users(monkeypatch):
    import llm_features.embed_users

    # one part of user embeddings written, then killed
    _fail_on_call(monkeypatch, llm_features.embed_users, "write_part", allow=1)

    def check(data_dir: Path, ref: Reference) -> None:
        assert len(parquet_parts(ref.run.data_dir / "user_embeddings")) >= 2, "the slice must give 2+ parts"
        assert len(parquet_parts(data_dir / "user_embeddings")) == 1
    return check


def _interrupt_materialize(monkeypatch):
    from feast import FeatureStore

    real = FeatureStore.materialize
    seen: list[list[str]] = []

    def first_two_views_then_die(self, start_date, end_date, feature_views=None, **kwargs):
        seen.append(list(feature_views))
        real(self, start_date, end_date, feature_views=list(feature_views)[:2], **kwargs)
        raise Interrupted("feast materialize, after 2 views")

    monkeypatch.setattr(FeatureStore, "materialize", first_two_views_then_die)

    def check(data_dir: Path, ref: Reference) -> None:
        assert len(seen) == 1 and len(seen[0]) > 2
    return check


def _interrupt_ranker(monkeypatch):
    import ranker.train

    # the id-only twin is done; the +LLM twin has written its checkpoint but is not evaluated yet
    _fail_on_call(monkeypatch, ranker.train, "train", write_first=True, when=lambda cfg: cfg.model.llm_features)

    def check(data_dir: Path, ref: Reference) -> None:
        assert (data_dir / "runs/ranker_id_only/demo_stamp.json").exists()
        assert (data_dir / "runs/ranker_llm/metrics.json").exists()
        assert not (data_dir / "runs/ranker_llm/demo_stamp.json").exists()
    return check


INTERRUPTIONS = {
    "ingest": _interrupt_ingest,
    "encode": _interrupt_encode,
    "finetune": _interrupt_finetune,
    "embed_users": _interrupt_embed_users,
    "materialize": _interrupt_materialize,
    "ranker": _interrupt_ranker,
}


def _check_rerun_report(stage: str, rerun: dict, ref: dict, partial_user_rows: int) -> None:
    """What the rerun had left to do: the stages before the interruption are skipped."""
    done_before = list(INTERRUPTIONS)[: list(INTERRUPTIONS).index(stage)]
    assert rerun["ingest"]["skipped"] == ("ingest" in done_before)
    assert rerun["ingest"]["counts"] == ref["ingest"]["counts"]
    # the interrupted ingest may have recorded the split already: then the rerun reuses it
    split, ref_split = (dict(r["ingest"]["split"], reused=None) for r in (rerun, ref))
    assert split == ref_split
    enc, ref_enc = rerun["encode"], ref["encode"]
    for k in ("distinct_texts", "distinct_behaviors", "distinct_items", "occurrences"):
        assert enc[k] == ref_enc[k], k
    if stage == "encode":  # the behaviour part survived; only the items were left
        assert enc["behavior_rows_written"] == 0
        assert enc["item_rows_written"] == ref_enc["item_rows_written"]
        assert enc["texts_encoded"] == ref_enc["distinct_texts"] - ref_enc["distinct_behaviors"]
    elif "encode" in done_before:
        assert enc["texts_encoded"] == 0
    else:
        assert enc["texts_encoded"] == ref_enc["texts_encoded"]
    assert rerun["finetune"]["skipped"] == ("finetune" in done_before)
    eu, total = rerun["embed_users"], ref["embed_users"]["rows_written"]
    assert eu["rows_existing"] == partial_user_rows
    assert eu["rows_written"] == total - partial_user_rows
    assert rerun["materialize"]["entities"] == ref["materialize"]["entities"]
    assert rerun["ranker"]["id_only"]["skipped"] == (stage == "ranker")
    assert not rerun["ranker"]["llm"]["skipped"]
    for r in rerun["ranker"].values():
        assert 0.0 < r["test"]["auc"] < 1.0
    assert rerun["online"]["user_id"] == ref["online"]["user_id"] and len(rerun["online"]["top10"]) == 10


@pytest.mark.parametrize("stage", [
    pytest.param("ingest", marks=pytest.mark.slow),
    "encode",
    pytest.param("finetune", marks=pytest.mark.slow),
    "embed_users",
    pytest.param("materialize", marks=pytest.mark.slow),
    pytest.param("ranker", marks=pytest.mark.slow),
])
def test_interrupted_demo_reruns_to_the_outputs_of_an_uninterrupted_run(stage, reference, tmp_path,
                                                                        monkeypatch):
    run = Run(tmp_path, reference.run.source)
    check_partial = INTERRUPTIONS[stage](monkeypatch)
    with pytest.raises(Interrupted):
        run.demo()
    monkeypatch.undo()
    check_partial(run.data_dir, reference)
    partial_user_rows = sum(pq.read_metadata(p).num_rows
                            for p in parquet_parts(run.data_dir / "user_embeddings"))

    rerun = run.demo()

    _check_rerun_report(stage, rerun, reference.report, partial_user_rows)
    for name, want in reference.datasets.items():
        assert_same_rows(name, read_dataset(run.data_dir, name), want)
    assert len(parquet_parts(run.data_dir / "user_recent_behaviors")) == 1
    users = sorted({reference.report["online"]["user_id"], *reference.datasets["users"]["user_id"][:20]})
    items = reference.datasets["items"]["item_id"].tolist()[:20]
    assert_same_online(online_values(run, users, items), online_values(reference.run, users, items))
    # and a third run has nothing left to do
    third = run.demo()
    assert third["finetune"]["skipped"] and third["embed_users"]["rows_written"] == 0
    assert all(r["skipped"] for r in third["ranker"].values())


# ----------------------------------------------------------------------------------------- 3. new day
def _new_day_workspace(reference: Reference, ml100k: Slice, root: Path) -> Run:
    """A copy of the reference workspace and of its source, with the held-back day appended."""
    src = write_source(root / "source", ml100k)
    append_new_day(src, ml100k)
    run = Run(root, src)
    shutil.copytree(reference.run.data_dir, run.data_dir)
    return run


def _expected_new_texts(reference: Reference, data_dir: Path) -> tuple[set[int], set[int], set[int]]:
    """(new behaviour ids, new item ids, new distinct text keys) of the extended canonical tables."""
    from llm_features.ids import stable_id

    old_inter, old_items = reference.datasets["interactions"], reference.datasets["items"]
    inter, items = read_dataset(data_dir, "interactions"), read_dataset(data_dir, "items")
    new_b = set(inter["behavior_id"]) - set(old_inter["behavior_id"])
    new_items = set(items["item_id"]) - set(old_items["item_id"])
    new_item_keys = {stable_id(t) for t in items.loc[items["item_id"].isin(new_items), "item_text"]}
    encoded = set(old_inter["behavior_id"]) | {stable_id(t) for t in old_items["item_text"]}
    return new_b, new_items, (new_b | new_item_keys) - encoded


def test_new_day_encodes_only_new_texts_and_reembeds_only_its_users(reference, ml100k, tmp_path):
    from llm_features.embed_users import EmbedUsersConfig, embed_users
    from llm_features.encode import EncodeConfig, encode
    from llm_features.ingest import IngestConfig, ingest

    run = _new_day_workspace(reference, ml100k, tmp_path)
    ws = run.data_dir
    new_day_users = {int(line.split("\t")[0]) for line in ml100k.new_day}
    ref_split = json.loads((reference.run.data_dir / "canonical/split.json").read_text())

    # ingest: the split recorded once is kept; the whole new day lands in the test split
    ing = ingest(IngestConfig(source=run.source, data_dir=ws))
    assert not ing["skipped"] and ing["split"]["reused"]
    split = json.loads((ws / "canonical/split.json").read_text())
    assert (split["valid_start"], split["test_start"]) == (ref_split["valid_start"], ref_split["test_start"])
    old_counts = reference.report["ingest"]["split"]["counts"]
    assert split["counts"] == {**old_counts, "test": old_counts["test"] + len(ml100k.new_day)}
    assert ing["counts"]["interactions"] == len(reference.datasets["interactions"]) + len(ml100k.new_day)
    assert len(parquet_parts(ws / "user_recent_behaviors")) == 1
    recent = read_dataset(ws, "user_recent_behaviors")
    assert not recent.duplicated(["user_id", "event_timestamp"]).any()

    # encode: exactly the texts no table holds yet, each once
    new_b, new_items, new_texts = _expected_new_texts(reference, ws)
    assert new_b and new_items, "the held-back day must bring movies new to the slice"
    old_parts = {d: file_states(ws / d) for d in ("atomic_behavior_embeddings", "item_embeddings")}
    stats = encode(EncodeConfig(data_dir=ws, progress=False))
    assert stats.texts_encoded == len(new_texts)
    assert stats.behavior_rows_written == len(new_b)
    assert stats.item_rows_written == len(new_items)
    assert stats.already_encoded == stats.distinct_texts - len(new_texts)
    for d, key, new_ids in (("atomic_behavior_embeddings", "behavior_id", new_b),
                            ("item_embeddings", "item_id", new_items)):
        states = file_states(ws / d)
        kept = {p: s for p, s in states.items() if p in old_parts[d]}
        assert kept == old_parts[d], f"{d}: old parts changed"
        added = [ws / d / p for p in states.keys() - old_parts[d].keys()]
        got = pa.concat_tables([pq.read_table(p) for p in added])[key].to_pylist()
        assert sorted(got) == sorted(new_ids), d
        table = read_dataset(ws, d)
        assert not table.duplicated([key]).any() and len(table) == len(reference.datasets[d]) + len(new_ids)

    # embed-users with the same checkpoint: rows only for the new day's users, old rows untouched
    snapshots = embed_settings(ws)
    old = reference.datasets["user_embeddings"]
    old_keys, old_vecs = row_keys(old), by_key(old)
    old_files = file_states(ws / "user_embeddings")
    eu_cfg = EmbedUsersConfig(checkpoint=ws / "runs/finetune", data_dir=ws, **snapshots)
    rep = embed_users(eu_cfg)
    after = read_dataset(ws, "user_embeddings")
    assert not after.duplicated(["user_id", "event_timestamp"]).any()
    states = file_states(ws / "user_embeddings")
    assert {p: s for p, s in states.items() if p in old_files} == old_files, "old parts changed"
    after_keys, after_vecs = row_keys(after), by_key(after)
    assert old_keys <= after_keys
    for k in old_keys:
        np.testing.assert_array_equal(after_vecs[k], old_vecs[k])
    new_keys = after_keys - old_keys
    assert rep.rows_written == len(new_keys) > 0
    assert {u for u, _ in new_keys} == new_day_users
    inter = read_dataset(ws, "interactions")
    assert new_keys == expected_snapshot_keys(inter, **snapshots) - old_keys
    assert embed_users(eu_cfg).rows_written == 0

    # and the incremental rows are those of an export from scratch on the extended data
    fresh = tmp_path / "fresh"
    shutil.copytree(ws, fresh, ignore=shutil.ignore_patterns("user_embeddings", ".user_embeddings.staging"))
    embed_users(EmbedUsersConfig(checkpoint=fresh / "runs/finetune", data_dir=fresh, **snapshots))
    want = by_key(read_dataset(fresh, "user_embeddings"))
    assert set(want) == expected_snapshot_keys(inter, **snapshots)
    assert set(want) <= after_keys
    # the only extra rows: the affected users' old last rows, which still hold their past history
    assert {u for u, _ in after_keys - set(want)} <= new_day_users
    for k, v in want.items():
        np.testing.assert_allclose(after_vecs[k], v, rtol=0, atol=ATOL, err_msg=str(k))


def test_demo_after_a_new_day_updates_every_output(reference, ml100k, tmp_path):
    """The demo retrains on the extended data, so the user embeddings of the old checkpoint are
    replaced (not mixed, not refused); the rest is incremental."""
    from llm_features.embed_users import CHECKPOINT_METADATA_KEY, checkpoint_identity
    from llm_features.parquet_io import file_metadata

    run = _new_day_workspace(reference, ml100k, tmp_path)
    shutil.copytree(reference.run.repo, run.repo)
    new_day_users = {int(line.split("\t")[0]) for line in ml100k.new_day}

    report = run.demo()

    ws = run.data_dir
    assert not report["ingest"]["skipped"] and report["ingest"]["split"]["reused"]
    _, _, new_texts = _expected_new_texts(reference, ws)
    assert report["encode"]["texts_encoded"] == len(new_texts)
    assert not report["finetune"]["skipped"]
    ident = checkpoint_identity(ws / "runs/finetune")["id"]
    parts = parquet_parts(ws / "user_embeddings")
    assert {json.loads(file_metadata(p)[CHECKPOINT_METADATA_KEY])["id"] for p in parts} == {ident}
    emb = read_dataset(ws, "user_embeddings")
    inter = read_dataset(ws, "interactions")
    assert row_keys(emb) == expected_snapshot_keys(inter, **embed_settings(ws))
    assert report["embed_users"]["rows_written"] == len(emb)
    for name in ("interactions", "atomic_behavior_embeddings", "item_embeddings", "user_recent_behaviors"):
        table = read_dataset(ws, name)
        assert not table.duplicated(DATASETS[name][1]).any(), name
    assert not any(r["skipped"] for r in report["ranker"].values())
    # the online store serves the new latest rows
    users = sorted(new_day_users)
    online = online_values(run, users, [])
    latest = emb.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")
    for u, v in zip(users, online["user_embedding"]):
        np.testing.assert_allclose(v, latest.loc[u, "user_embedding"], rtol=0, atol=ATOL, err_msg=f"user {u}")

"""Ingest: MovieLens and generic adapters, errors that name file/line/column, split, incremental reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from llm_features.ids import stable_id
from llm_features.ingest import IngestConfig, IngestError, ingest, movielens_text
from llm_features.workspace import Workspace

from tests.datasets import ML100K, ML1M, require_ml100k, require_ml1m


MOVIES = [
    "1::Toy Story (1995)::Animation|Children's|Comedy",
    "2::Jumanji (1995)::Adventure|Children's|Fantasy",
    "3::Misérables, Les (1995)::Drama|Musical",
]
USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]
# user, item, rating, ts: 10 rows, two share ts 1000 (user 1 and 2)
RATINGS = [
    (1, 1, 5, 100),
    (1, 2, 3, 200),
    (2, 1, 4, 300),
    (2, 3, 1, 400),
    (3, 2, 5, 500),
    (3, 3, 4, 600),
    (1, 3, 2, 700),
    (2, 2, 4, 800),
    (1, 1, 4, 1000),
    (2, 3, 5, 1000),
]


def write_ml1m(d: Path, ratings=RATINGS, movies=MOVIES, users=USERS, encoding: str = "latin-1") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "movies.dat").write_bytes(("\n".join(movies) + "\n").encode(encoding))
    (d / "users.dat").write_bytes(("\n".join(users) + "\n").encode(encoding))
    lines = [r if isinstance(r, str) else "::".join(map(str, r)) for r in ratings]
    (d / "ratings.dat").write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return d


# the synthetic logs here are stamped in 1970 (ts 100...): accept them explicitly
OLD_TIMES = "1970-01-01"


def run(tmp_path: Path, **kw) -> tuple[dict, Workspace]:
    ws = Workspace.at(tmp_path / "data")
    return ingest(IngestConfig(**{"min_timestamp": OLD_TIMES, **kw}), ws), ws


def error_of(tmp_path: Path, **kw) -> str:
    with pytest.raises(IngestError) as ei:
        run(tmp_path, **kw)
    assert isinstance(ei.value, ValueError)
    return str(ei.value)


# ----------------------------------------------------------------------------- text and MovieLens


def test_movielens_text_is_the_one_builder():
    t = movielens_text("Toy Story (1995) ", ["Animation", "Children's", ""])
    assert t == "Toy Story (1995) | Animation, Children's"
    assert movielens_text("Heat (1995)", []) == "Heat (1995)"


def test_ml1m_tiny(tmp_path):
    src = write_ml1m(tmp_path / "ml")
    report, ws = run(tmp_path, source=src)
    assert report["format"] == "ml-1m" and not report["skipped"]
    t = pq.read_table(ws.interactions)
    assert t.schema.names == [
        "user_id",
        "item_id",
        "event_timestamp",
        "behavior_id",
        "behavior_text",
        "label",
        "rating",
        "split",
    ]
    assert str(t.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
    df = t.to_pandas()
    assert len(df) == 10
    key = list(zip(df.event_timestamp, df.user_id, df.item_id))
    assert key == sorted(key)
    assert (df.label == (df.rating > 3)).all() and df.label.dtype == np.int8
    texts = dict(zip(df.item_id, df.behavior_text))
    assert texts[3] == "Misérables, Les (1995) | Drama, Musical"  # Latin-1 decoded
    assert all(stable_id(x) == b for x, b in zip(df.behavior_text, df.behavior_id))
    # 8:1:1 of 10 rows: the two rows at ts 1000 share a side
    assert list(df.split) == ["train"] * 8 + ["test"] * 2
    split = json.loads(ws.split.read_text())
    assert split["method"] == "global_time" and split["counts"] == {"train": 8, "valid": 0, "test": 2}
    items = pq.read_table(ws.items).to_pandas()
    assert list(items.item_id) == [1, 2, 3] and list(items.item_genres[2]) == ["Drama", "Musical"]
    assert items.genres[0] == "Animation|Children's|Comedy"
    users = pq.read_table(ws.users).to_pandas()
    assert list(users.columns) == ["user_id", "event_timestamp", "gender", "age", "occupation", "zip"]
    assert users.event_timestamp[0].value // 1000 == 100 * 1_000_000
    rep = json.loads((ws.canonical / "ingest_report.json").read_text())
    assert rep["counts"]["interactions"] == 10 and rep["label"]["positive_rate"] == 0.7


def test_ml100k_tiny_genre_flags(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    flags = ["0"] * 19
    flags[3] = flags[5] = "1"  # Animation, Comedy
    (d / "u.item").write_bytes(
        (
            "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n"
            "2|Mis\xe9rables, Les (1995)|01-Jan-1995||http://y|" + "|".join(["0"] * 19) + "\n"
        ).encode("latin-1")
    )
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    (d / "u.data").write_text("1\t1\t4\t881250949\n2\t2\t2\t881250950\n")
    report, ws = run(tmp_path, source=d)
    assert report["format"] == "ml-100k"
    items = pq.read_table(ws.items).to_pandas()
    assert items.item_text[0] == "Toy Story (1995) | Animation, Comedy"
    assert items.item_text[1] == "Misérables, Les (1995)"
    users = pq.read_table(ws.users).to_pandas()
    assert users.occupation[0] == "technician" and users.age[1] == 53


# ----------------------------------------------------------------------------- generic


def test_generic_csv_with_mapping_iso_and_label_rule(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text(
        "uid,sku,ts,stars\n"
        "7,100,2024-01-01T00:00:00Z,5\n"
        "7,101,2024-01-02 10:00:00,2\n"
        "8,100,2024-01-03T00:00:00+01:00,4\n"
    )
    items = tmp_path / "items.csv"
    items.write_text("sku,title,cat\n100,Red shoes,Shoes|Red\n101,Blue hat,Hats\n102,Unused,\n")
    report, ws = run(
        tmp_path,
        format="generic",
        interactions=(log,),
        items=items,
        map=("user_id=uid", "item_id=sku", "event_timestamp=ts", "rating=stars", "genres=cat"),
        item_text_column="title",
        label_rule="rating>=4",
        recent_cadence="none",
    )
    df = pq.read_table(ws.interactions).to_pandas()
    assert list(df.user_id) == [7, 7, 8] and list(df.label) == [1, 0, 1]
    assert str(df.event_timestamp[2]) == "2024-01-02 23:00:00+00:00"
    assert df.behavior_text[0] == "Red shoes"
    items_t = pq.read_table(ws.items).to_pandas()
    assert list(items_t.item_genres[0]) == ["Shoes", "Red"] and list(items_t.item_genres[2]) == []
    assert report["counts"]["items_without_interactions"] == 1
    users = pq.read_table(ws.users).to_pandas()
    assert list(users.columns) == ["user_id", "event_timestamp"]


def test_generic_epoch_label_column_hash_ids_parquet(tmp_path):
    import pandas as pd

    log = tmp_path / "log.parquet"
    pd.DataFrame(
        {
            "user": ["a", "b", "a"],
            "item": ["x", "y", "y"],
            "time": [1_700_000_000, 1_700_000_100, 1_700_000_200],
            "clicked": [True, False, True],
            "query": ["red shoes", "hat", "blue hat"],
            "name": ["X thing", "Y thing", "Y thing"],
        }
    ).to_parquet(log)
    report, ws = run(
        tmp_path,
        interactions=(log,),
        map=("user_id=user", "item_id=item", "event_timestamp=time"),
        label_column="clicked",
        behavior_text_column="query",
        item_text_column="name",
        hash_ids=True,
    )
    assert report["format"] == "generic" and report["label"]["source"] == "column clicked"
    df = pq.read_table(ws.interactions).to_pandas()
    assert list(df.label) == [1, 0, 1] and list(df.behavior_text) == ["red shoes", "hat", "blue hat"]
    assert df.user_id[0] == df.user_id[2] == stable_id("user:a")
    assert df.rating.isna().all()
    assert set(pq.read_table(ws.items).to_pandas().item_text) == {"X thing", "Y thing"}


# ----------------------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    src = write_ml1m(tmp_path / "ml")
    (src / "movies.dat").unlink()
    msg = error_of(tmp_path, source=src)
    assert "movies.dat" in msg and "not found" in msg and "--items" in msg
    msg = error_of(tmp_path, interactions=(tmp_path / "nope.csv",), format="generic")
    assert "nope.csv" in msg and "not found" in msg


def test_missing_column(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user,sku,ts\n1,2,3\n")
    msg = error_of(
        tmp_path,
        interactions=(log,),
        map=("user_id=uid", "item_id=sku", "event_timestamp=ts"),
        item_text_column="sku",
    )
    assert (
        "log.csv" in msg and "no column 'uid'" in msg and "user, sku, ts" in msg and "--map user_id=" in msg
    )


def test_unparsable_timestamp(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,ts,title,rating\n1,2,2024-01-01,A,4\n1,3,yesterday,B,4\n")
    msg = error_of(tmp_path, interactions=(log,), item_text_column="title")
    assert "log.csv, line 3, column 'ts'" in msg and "cannot parse timestamp" in msg and "'yesterday'" in msg
    assert "--timestamp-unit" in msg


def test_empty_text(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("user_id,item_id,ts,rating\n1,2,5,4\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\n2,Fine\n3,\n")
    msg = error_of(tmp_path, interactions=(log,), items=items, item_text_column="title")
    assert "items.csv, line 3, column 'title'" in msg and "empty item text" in msg
    src = write_ml1m(tmp_path / "ml", movies=MOVIES[:2] + ["3:: ::Drama"])
    msg = error_of(tmp_path, source=src)
    assert "movies.dat, line 3, column 'Title'" in msg and "empty title" in msg


def test_unknown_item_errors_or_drops_counted(tmp_path):
    src = write_ml1m(tmp_path / "ml", ratings=RATINGS + [(3, 99, 4, 1200)])
    msg = error_of(tmp_path, source=src)
    assert "ratings.dat, line 11, column 'MovieID'" in msg and "item 99 is not in" in msg
    assert "--drop-unknown-items" in msg
    report, ws = run(tmp_path, source=src, drop_unknown_items=True)
    assert report["counts"]["unknown_item_rows_dropped"] == 1 and report["counts"]["interactions"] == 10


def test_duplicates_exact_dropped_conflicting_named(tmp_path):
    src = write_ml1m(tmp_path / "ml", ratings=RATINGS + [RATINGS[3]])
    report, ws = run(tmp_path, source=src)
    assert report["counts"]["exact_duplicates_dropped"] == 1 and report["counts"]["interactions"] == 10
    src = write_ml1m(tmp_path / "ml2", ratings=RATINGS + [(2, 3, 5, 400)])
    msg = error_of(tmp_path, source=src)
    assert "ratings.dat" in msg and "line 4 and line 11" in msg and "rating differs" in msg
    assert "column 'Rating'" in msg


def test_wrong_encoding_utf16_and_invalid_bytes(tmp_path):
    src = write_ml1m(tmp_path / "ml")
    (src / "ratings.dat").write_bytes("1::1::5::100\n".encode("utf-16"))
    msg = error_of(tmp_path, source=src)
    assert "ratings.dat" in msg and "byte offset 0" in msg and "--encoding utf-16" in msg
    log = tmp_path / "log.csv"
    log.write_bytes(b"user_id,item_id,ts,title,rating\n1,2,5,ok,4\n1,3,6,caf\xe9,2\n")
    msg = error_of(tmp_path, interactions=(log,), item_text_column="title")
    assert "log.csv" in msg and "byte offset 52 (line 3)" in msg and "not valid utf-8" in msg
    assert "--encoding latin-1" in msg
    report, _ = run(tmp_path, interactions=(log,), item_text_column="title", encoding="latin-1")
    assert report["counts"]["interactions"] == 2


def test_utf8_movielens_is_refused_without_encoding(tmp_path):
    src = write_ml1m(tmp_path / "ml", encoding="utf-8")
    msg = error_of(tmp_path, source=src)
    assert "movies.dat" in msg and "UTF-8" in msg and "--encoding utf-8" in msg
    report, ws = run(tmp_path, source=src, encoding="utf-8")
    assert "Misérables, Les (1995) | Drama, Musical" in set(
        pq.read_table(ws.items).column("item_text").to_pylist()
    )


def test_bad_lines_name_the_line_after_blank_lines(tmp_path):
    src = write_ml1m(tmp_path / "ml", ratings=["1::1::5::100", "", "1::2::4::200", "1::x::4::300"])
    msg = error_of(tmp_path, source=src)
    assert "ratings.dat, line 4, column 'MovieID'" in msg and "'x'" in msg
    src = write_ml1m(tmp_path / "ml2", ratings=["1::1::5::100", "1::2::4"])
    msg = error_of(tmp_path, source=src)
    assert "ratings.dat, line 2" in msg and "expected 4 fields" in msg
    src = write_ml1m(tmp_path / "ml3", ratings=["1::1::5::100", "", "1::2::2::200"])
    report, _ = run(tmp_path, source=src)
    assert report["counts"]["blank_lines_skipped"] == 1


def test_label_rule_errors(tmp_path):
    src = write_ml1m(tmp_path / "ml")
    assert "--label-rule 'rating>>3'" in error_of(tmp_path, source=src, label_rule="rating>>3")
    report, ws = run(tmp_path, source=src, label_rule="rating==5")
    assert report["label"]["positive_rate"] == 0.3


def test_cli_shows_clean_error_and_summary(tmp_path):
    from llm_features.cli.ingest import command

    src = write_ml1m(tmp_path / "ml", ratings=RATINGS + [(3, 99, 4, 1200)])
    r = CliRunner().invoke(
        command, ["--source", str(src), "--data-dir", str(tmp_path / "d"), "--min-timestamp", OLD_TIMES]
    )
    assert r.exit_code == 1 and "Error: " in r.output and "Traceback" not in r.output
    assert "item 99" in r.output
    r = CliRunner().invoke(
        command,
        [
            "--source",
            str(src),
            "--data-dir",
            str(tmp_path / "d"),
            "--drop-unknown-items",
            "--recent-cadence",
            "day",
            "--recent-n",
            "5",
            "--min-timestamp",
            OLD_TIMES,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "interactions 10" in r.output and "1 rows with unknown items" in r.output


# ----------------------------------------------------------------------------- split and reruns


def test_split_equal_timestamps_never_straddle(tmp_path):
    ratings = [(u, 1, 4 - i % 2 * 2, 100 + i) for i, u in enumerate(range(1, 8))] + [(u, 2, 4, 500) for u in range(1, 4)]
    src = write_ml1m(tmp_path / "ml", ratings=ratings)  # 10 rows: the 80% boundary falls inside ts 500
    report, ws = run(tmp_path, source=src)
    df = pq.read_table(ws.interactions).to_pandas()
    for _, g in df.groupby("event_timestamp"):
        assert g.split.nunique() == 1
    assert report["split"]["counts"]["train"] == 7


def test_recorded_split_is_kept_for_appended_data(tmp_path):
    src = write_ml1m(tmp_path / "ml")
    report, ws = run(tmp_path, source=src)
    before = json.loads(ws.split.read_text())
    write_ml1m(src, ratings=RATINGS + [(3, 1, 5, 2000), (3, 2, 1, 2001), (1, 2, 4, 150)])
    report, ws = run(tmp_path, source=src)
    after = json.loads(ws.split.read_text())
    assert (after["valid_start"], after["test_start"]) == (before["valid_start"], before["test_start"])
    assert report["split"]["reused"] and after["counts"] == {"train": 9, "valid": 0, "test": 4}
    df = pq.read_table(ws.interactions).to_pandas()
    assert set(df[df.event_timestamp.astype("int64") >= 2_000_000_000].split) == {"test"}
    msg = error_of(tmp_path, source=src, split_ratios="0.7,0.2,0.1")
    assert "split.json" in msg and "--resplit" in msg
    report, ws = run(tmp_path, source=src, split_ratios="7:2:1", resplit=True)
    assert not report["split"]["reused"] and json.loads(ws.split.read_text())["ratios"] == [0.7, 0.2, 0.1]


def test_rerun_is_noop_and_changes_are_picked_up(tmp_path):
    src = write_ml1m(tmp_path / "ml")
    r1, ws = run(tmp_path, source=src)
    mtimes = {p: p.stat().st_mtime_ns for p in ws.root.rglob("*.parquet")}
    r2, _ = run(tmp_path, source=src)
    assert r2["skipped"] and r2["input_fingerprint"] == r1["input_fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in ws.root.rglob("*.parquet")} == mtimes
    r3, _ = run(tmp_path, source=src, force=True)
    assert not r3["skipped"]
    r4, _ = run(tmp_path, source=src, recent_n=5)  # a setting changed
    assert not r4["skipped"]
    assert len(list(ws.user_recent_behaviors.glob("part-*.parquet"))) == 1
    write_ml1m(src, ratings=RATINGS[:-1])
    r5, _ = run(tmp_path, source=src, recent_n=5)
    assert not r5["skipped"] and r5["counts"]["interactions"] == 9
    assert not list(ws.root.rglob("*.tmp"))


# ----------------------------------------------------------------------------- real data


def test_real_ml100k(tmp_path):
    require_ml100k()
    report, ws = run(tmp_path, source=ML100K)
    assert report["counts"]["interactions"] == 100_000 and report["counts"]["items"] == 1682
    assert report["counts"]["users"] == 943
    assert abs(report["label"]["positive_rate"] - 0.55375) < 1e-4
    c = report["split"]["counts"]
    assert sum(c.values()) == 100_000 and abs(c["train"] - 80_000) < 100


def test_real_ml1m(tmp_path):
    require_ml1m()
    report, ws = run(tmp_path, source=ML1M)
    assert report["counts"]["interactions"] == 487_650
    assert round(report["label"]["positive_rate"], 3) == 0.572
    t = pq.read_table(ws.interactions, columns=["behavior_id"])
    assert t.num_rows == 487_650


def test_recorded_split_of_another_dataset_is_refused(tmp_path):
    run(tmp_path, source=write_ml1m(tmp_path / "ml"))
    later = [(u, i, r, t + 10**9) for u, i, r, t in RATINGS]  # all after the recorded test_start
    msg = error_of(tmp_path, source=write_ml1m(tmp_path / "other", ratings=later))
    assert "split.json" in msg and "another dataset" in msg and "--resplit" in msg


def test_config_file_paths(tmp_path):
    from llm_features.cli.ingest import command

    src = write_ml1m(tmp_path / "ml")
    conf = tmp_path / "ingest.json"
    conf.write_text(
        json.dumps(
            {
                "interactions": [str(src / "ratings.dat")],
                "items": str(src / "movies.dat"),
                "users": str(src / "users.dat"),
                "data_dir": str(tmp_path / "d"),
                "recent_cadence": "none",
                "min_timestamp": OLD_TIMES,
            }
        )
    )
    r = CliRunner().invoke(command, ["--config", str(conf)])
    assert r.exit_code == 0, r.output
    assert "ingest (ml-1m)" in r.output

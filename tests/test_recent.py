"""user_recent_behaviors: strictly-before history, final 'current' row, cadences, deterministic parts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_features.recent import build_recent_behaviors, iter_recent_behaviors, write_recent_behaviors
from llm_features.workspace import Workspace

S = 1_000_000  # µs per second
DAY = 86_400 * S


def frame(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    """rows of (user, item, ts seconds, label); behavior_id = item + 1000."""
    u, i, t, y = map(np.array, zip(*rows))
    return pd.DataFrame(
        {
            "user_id": u,
            "item_id": i,
            "behavior_id": i + 1000,
            "label": y.astype(np.int8),
            "event_timestamp": pd.to_datetime(t * S, unit="us", utc=True),
        }
    )


def rows_of(table) -> list[tuple[int, int, list[int], list[int], list[int]]]:
    d = table.to_pydict()
    ts = table.column("event_timestamp").cast("int64").to_pylist()
    return list(zip(d["user_id"], ts, d["recent_item_ids"], d["recent_behavior_ids"], d["recent_labels"]))


def test_event_cadence_strictly_before_and_final_row():
    df = frame([(1, 10, 100, 1), (1, 11, 200, 0), (1, 12, 200, 1), (1, 13, 300, 1), (2, 20, 50, 0)])
    t = build_recent_behaviors(df, n=2, cadence="event")
    assert t.schema.names == [
        "user_id",
        "recent_behavior_ids",
        "recent_item_ids",
        "recent_labels",
        "event_timestamp",
    ]
    assert str(t.schema.field("recent_labels").type) == "list<item: int8>"
    assert str(t.schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
    got = [(u, ts // S, items) for u, ts, items, _, _ in rows_of(t)]
    assert got == [
        (1, 100, []),  # nothing before the first interaction
        (1, 200, [10]),  # both ts-200 interactions excluded (strictly before)
        (1, 300, [11, 12]),  # last n=2
        (1, 301, [12, 13]),  # final row: latest n, stamped last + 1 s
        (2, 50, []),
        (2, 51, [20]),
    ]
    r = rows_of(t)
    assert r[2][3] == [1011, 1012] and r[2][4] == [0, 1]


def test_day_cadence():
    df = frame([(1, 10, DAY // S + 5, 1), (1, 11, DAY // S + 99, 0), (1, 12, 3 * DAY // S + 7, 1)])
    got = [(u, ts, items) for u, ts, items, _, _ in rows_of(build_recent_behaviors(df, n=30, cadence="day"))]
    assert got == [(1, DAY, []), (1, 3 * DAY, [10, 11]), (1, 4 * DAY, [10, 11, 12])]


def brute_force(df: pd.DataFrame, n: int) -> list[tuple[int, int, list[int]]]:
    out = []
    ts = df.event_timestamp.astype("int64").to_numpy() // 1000
    d = df.assign(ts=ts).sort_values(["user_id", "ts", "item_id"])
    for u, g in d.groupby("user_id"):
        stamps = sorted(set(g.ts)) + [g.ts.max() + S]
        for s in stamps:
            out.append((u, s, g[g.ts < s].item_id.tolist()[-n:]))
    return out


@pytest.mark.parametrize("n", [1, 3, 30])
def test_matches_brute_force(n):
    rng = np.random.default_rng(n)
    m = 400
    rows = list(
        zip(
            rng.integers(0, 15, m).tolist(),
            rng.integers(0, 50, m).tolist(),
            rng.integers(0, 60, m).tolist(),
            rng.integers(0, 2, m).tolist(),
        )
    )
    df = frame(rows).drop_duplicates(["user_id", "item_id", "event_timestamp"])
    got = [(u, ts, items) for u, ts, items, _, _ in rows_of(build_recent_behaviors(df, n=n))]
    assert got == brute_force(df, n)


def brute_force_rows(df: pd.DataFrame, n: int, cadence: str) -> list[tuple[int, int, list[int], list[int], list[int]]]:
    """Every snapshot row, user by user: each distinct event time (cadence "event") or the start of
    each active day ("day"), then a final row after the last; the user's last ``n`` interactions
    strictly before the stamp, ties in item order."""
    d = df.assign(ts=df.event_timestamp.astype("int64").to_numpy() // 1000).sort_values(["user_id", "ts", "item_id"])
    out = []
    for u, g in d.groupby("user_id"):
        if cadence == "event":
            stamps = sorted(set(g.ts)) + [g.ts.max() + S]
        else:
            days = sorted(set(g.ts // DAY))
            stamps = [k * DAY for k in days] + [(days[-1] + 1) * DAY]
        for stamp in stamps:
            last = g[g.ts < stamp].tail(n)
            out.append((u, stamp, last.item_id.tolist(), last.behavior_id.tolist(), last.label.tolist()))
    return out


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 5),
                  # seconds on and around day boundaries: ties, and events a second apart across midnight
                  st.sampled_from([0, 1, 7, DAY // S - 1, DAY // S, DAY // S + 1, 2 * DAY // S, 5 * DAY // S - 1]),
                  st.integers(0, 1)),
        min_size=1, max_size=25, unique_by=lambda r: r[:3]),
    n=st.integers(1, 4),
    cadence=st.sampled_from(["event", "day"]),
    block_rows=st.integers(1, 30),
)
def test_any_log_matches_brute_force_in_any_blocks(rows, n, cadence, block_rows):
    """Any small log (both cadences, any block size): every row, list and label is the brute force's."""
    df = frame(rows)
    blocks = list(iter_recent_behaviors(df, n=n, cadence=cadence, block_rows=block_rows))
    assert rows_of(pa.concat_tables(blocks)) == brute_force_rows(df, n, cadence)


@pytest.mark.parametrize("cadence", ["event", "day"])
@pytest.mark.parametrize("block_rows", [1, 7, 100])
def test_blocks_of_users_equal_one_block(cadence, block_rows, tmp_path):
    """Built (and written) block by block of whole users, the table equals the one-block build."""
    rng = np.random.default_rng(block_rows)
    m = 300
    rows = list(zip(rng.integers(0, 20, m).tolist(), rng.integers(0, 40, m).tolist(),
                    (rng.integers(0, 30, m) * (DAY // S // 3)).tolist(), rng.integers(0, 2, m).tolist()))
    df = frame(rows).drop_duplicates(["user_id", "item_id", "event_timestamp"])
    whole = list(iter_recent_behaviors(df, n=4, cadence=cadence, block_rows=10**9))
    assert len(whole) == 1
    blocks = list(iter_recent_behaviors(df, n=4, cadence=cadence, block_rows=block_rows))
    assert len(blocks) == (20 if block_rows == 1 else len(blocks)) and (block_rows == 100 or len(blocks) > 1)
    for b in blocks:  # whole users only: no user in two blocks
        assert b.num_rows
    users = [set(b.column("user_id").to_pylist()) for b in blocks]
    assert all(not (a & b) for i, a in enumerate(users) for b in users[i + 1:])
    assert rows_of(pa.concat_tables(blocks)) == rows_of(whole[0])
    part = write_recent_behaviors(Workspace.at(tmp_path), df, n=4, cadence=cadence, block_rows=block_rows)[0]
    assert rows_of(pq.read_table(part)) == rows_of(whole[0])


def test_write_parts_deterministic(tmp_path):
    ws = Workspace.at(tmp_path)
    df = frame([(1, 10, 100, 1), (1, 11, 200, 0)])
    p1 = write_recent_behaviors(ws, df, n=5)
    mtime = p1[0].stat().st_mtime_ns
    assert write_recent_behaviors(ws, df, n=5) == p1 and p1[0].stat().st_mtime_ns == mtime
    p2 = write_recent_behaviors(ws, frame([(1, 10, 100, 1), (1, 11, 200, 0), (2, 3, 5, 1)]), n=5)
    parts = sorted(ws.user_recent_behaviors.glob("part-*.parquet"))
    assert parts == p2 and p2 != p1
    assert pq.read_table(parts[0]).num_rows == 5

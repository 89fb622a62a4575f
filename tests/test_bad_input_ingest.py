"""Bad input to ``llmfeat ingest`` (issue 16): each class of bad input or misuse ends with exit code 1,
a one- or two-line message naming the file, line, column or option and what to do, no traceback,
and the data directory (and the sources) exactly as they were: every option and every row is
checked before anything is written, so a rerun after a refused run is a fresh run.

Classes (48):

Found in issue 16 (each test fails on commit d7dd912):
1. timestamps mixing epoch seconds and milliseconds (named by the first offending line; nothing
   written, and the corrected rerun computes a fresh split)
2. ``--recent-n 0`` (on the command line and in a --config file)
3. timestamps before the plausible range (negative, zero, 1970s; generic and MovieLens)
4. timestamps in the future of the run (year 2100; epoch and ISO 8601)
5. an explicit ``--timestamp-unit`` that does not fit the data (seconds read as milliseconds)
6. non-finite ratings (inf, -inf)
7. ids beyond int64 (never wrapped)
8. ``--hash-ids`` ids that get the same hashed id
9. ``--split-ratios`` that leave the valid or test split empty
10. an unparsable timestamp among epoch numbers: the error names its own line, not line 2
11. an empty timestamp among epoch numbers: named as empty, on its own line
12. a row after a quoted field that spans lines: the error names the row's real line
13. ``--delimiter`` of more than one character
14. ``--min-timestamp`` that is not an ISO 8601 date

Classes handled before (one test each):
15. --source directory not found
16. --source directory without MovieLens files
17. no input at all
18. interaction file not found (or a directory)
19. a --map'ed column that is not in the file
20. malformed --map (no '=', unknown canonical name)
21. a non-integer id
22. an empty (0-byte) file
23. a header but no interactions
24. an unknown --encoding name
25. bytes that are not valid in the encoding
26. a UTF-16 file read as UTF-8
27. a UTF-8 MovieLens file read with the default Latin-1
28. a MovieLens line with the wrong number of fields
29. a CSV row with more fields than the header
30. an empty item text
31. an item listed twice in the item table
32. conflicting duplicate interactions
33. an interaction whose item is not in the item table
34. every interaction dropped by --drop-unknown-items
35. malformed --label-rule
36. --label-rule on a column that is not the rating
37. a --label-column value that is not 0/1
38. an empty rating under --label-rule
39. --split-ratios that are not three numbers (not finite: found, it was a traceback)
40. --split-ratios different from the ratios split.json records
41. a recorded split that leaves this data no validation/test rows (another dataset)
42. an unreadable split.json
43. an interaction file that is not parquet
44. no item text column and no --items
45. an unknown --format
46. an empty id under --hash-ids
47. a non-numeric user age in the user table
48. a log with one label only (positives only, or a --label-rule no row passes)
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from llm_features.cli import main
from tests.bad_input import run_bad

T0 = 1_600_000_000  # 2020-09-13, epoch seconds
HEADER = "user_id,item_id,ts,title,rating"


def rows(n: int = 10, t0: int = T0) -> list[str]:
    """n good rows: 3 users, 4 items, one title per item, ratings 1..5, 100 s apart."""
    return [f"{1 + k % 3},{1 + k % 4},{t0 + 100 * k},Item {1 + k % 4},{1 + k % 5}" for k in range(n)]


def write(path: Path, lines: list[str], header: str | None = HEADER) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(([header] if header else []) + lines) + "\n")
    return path


def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(source dir, data dir): inputs go in the first, the workspace is the second."""
    return tmp_path / "src", tmp_path / "data"


def generic(tmp_path: Path, log: Path, *extra) -> list:
    return ["ingest", "--interactions", log, "--item-text-column", "title",
            "--data-dir", dirs(tmp_path)[1], *extra]


def refused(tmp_path: Path, args: list, expect: str) -> str:
    """run_bad with the source and data dirs unchanged, and a fresh data dir still absent."""
    src, data = dirs(tmp_path)
    fresh = not data.exists()
    msg = run_bad(args, expect=expect, unchanged=[src, data])
    if fresh:
        assert not data.exists(), f"a refused ingest created {data}"
    return msg


def ok(args: list) -> None:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output


def bad_log(tmp_path: Path, lines: list[str], header: str = HEADER, name: str = "log.csv") -> Path:
    return write(dirs(tmp_path)[0] / name, lines, header)


ML_MOVIES = ["1::Toy Story (1995)::Animation|Comedy", "2::Jumanji (1995)::Adventure",
             "3::Heat (1995)::Action"]
ML_USERS = ["1::F::1::10::48067", "2::M::56::16::70072", "3::M::25::15::55117"]


def ml1m(tmp_path: Path, ratings: list[str] | None = None, movies: list[str] = ML_MOVIES,
         encoding: str = "latin-1") -> Path:
    d = dirs(tmp_path)[0]
    d.mkdir(parents=True, exist_ok=True)
    ratings = ratings or [f"{1 + k % 3}::{1 + k % 3}::{1 + k % 5}::{T0 + 100 * k}" for k in range(10)]
    for name, lines in (("movies.dat", movies), ("users.dat", ML_USERS), ("ratings.dat", ratings)):
        (d / name).write_bytes(("\n".join(lines) + "\n").encode(encoding))
    return d


def ml_args(tmp_path: Path, *extra) -> list:
    return ["ingest", "--source", dirs(tmp_path)[0], "--data-dir", dirs(tmp_path)[1], *extra]


# ============================================================================ found in issue 16


def test_mixed_second_and_millisecond_timestamps_then_fresh_rerun(tmp_path):
    good = rows(300)
    lines = list(good)
    u, i, t, title, r = lines[240].split(",")
    lines[240] = ",".join([u, i, str(int(t) * 1000), title, r])  # file line 242
    log = bad_log(tmp_path, lines)
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv, line 242, column 'ts'.*mixed timestamp units.*--timestamp-unit")
    # the corrected rerun is a fresh run: its split is computed, not reused from the refused run
    write(log, good)
    ok(generic(tmp_path, log))
    report = json.loads((dirs(tmp_path)[1] / "canonical/ingest_report.json").read_text())
    assert report["split"]["reused"] is False
    assert report["split"]["counts"] == {"train": 240, "valid": 30, "test": 30}


def test_recent_n_zero_on_the_command_line_and_in_a_config_file(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--recent-n", "0"), r"--recent-n.*0")
    conf = write(dirs(tmp_path)[0] / "ingest.json", [json.dumps({"recent_n": 0})], header=None)
    refused(tmp_path, generic(tmp_path, log, "--config", conf), r"ingest\.json.*--recent-n.*at least 1")


@pytest.mark.parametrize("value", ["-5", "0", "86400"])
def test_timestamp_before_the_plausible_range(tmp_path, value):
    log = bad_log(tmp_path, rows() + [f"1,2,{value},Item 2,4"])
    refused(tmp_path, generic(tmp_path, log),
            rf"log\.csv, line 12, column 'ts'.*'{value}'.*before 1990-01-01.*--min-timestamp")


def test_movielens_timestamp_zero(tmp_path):
    ml1m(tmp_path, ratings=["1::1::5::978300760", "1::2::3::0"])
    refused(tmp_path, ml_args(tmp_path), r"ratings\.dat, line 2, column 'Timestamp'.*'0'.*before 1990")


@pytest.mark.parametrize("value", ["4102444800", "2100-01-01T00:00:00Z"])
def test_timestamp_in_the_future(tmp_path, value):
    lines = rows() if value.isdigit() else [",".join([*r.split(",")[:2], "2020-09-13T12:00:00Z",
                                                       *r.split(",")[3:]]) for r in rows()]
    log = bad_log(tmp_path, lines + [f"1,2,{value},Item 2,4"])
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv, line 12, column 'ts'.*2100-01-01.*future.*--allow-future")


def test_explicit_timestamp_unit_that_does_not_fit(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--timestamp-unit", "ms"),
            r"log\.csv, line 2, column 'ts'.*read as epoch milliseconds.*before 1990")


@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_non_finite_rating(tmp_path, value):
    log = bad_log(tmp_path, rows() + [f"1,2,{T0 + 5000},Item 2,{value}"])
    refused(tmp_path, generic(tmp_path, log), rf"log\.csv, line 12, column 'rating'.*finite.*'{value}'")


def test_id_beyond_int64_is_refused_not_wrapped(tmp_path):
    big = ["99999999999999999999", "99999999999999999998"]  # both used to become -2**63
    log = bad_log(tmp_path, rows() + [f"{b},2,{T0 + 5000},Item 2,4" for b in big])
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv, line 12, column 'user_id'.*int64 range.*99999999999999999999.*--hash-ids")


def test_hash_ids_that_collide(tmp_path):
    lines = [r.replace("1,", "a b,", 1) if r.startswith("1,") else r for r in rows()]
    log = bad_log(tmp_path, lines + [f"a  b,2,{T0 + 5000},Item 2,4"])  # normalises to the same text
    refused(tmp_path, generic(tmp_path, log, "--hash-ids"),
            r"log\.csv, line 12, column 'user_id'.*'a b' \(line 2\) and 'a  b'.*same hashed id")


@pytest.mark.parametrize("ratios", ["1,0,0", "0.9,0.1,0"])
def test_split_ratios_that_leave_a_split_empty(tmp_path, ratios):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--split-ratios", ratios), r"--split-ratios.*empty.*> 0")


@pytest.mark.parametrize("value", ["1600001000x", "yesterday"])  # among epoch numbers / ISO dates
def test_unparsable_timestamp_names_its_own_line(tmp_path, value):
    lines = rows(300)
    if value == "yesterday":
        lines = [",".join([*r.split(",")[:2], "2020-09-13T12:00:00", *r.split(",")[3:]]) for r in lines]
    lines.insert(240, f"1,2,{value},Item 2,4")  # file line 242
    log = bad_log(tmp_path, lines)
    refused(tmp_path, generic(tmp_path, log),
            rf"log\.csv, line 242, column 'ts'.*cannot parse timestamp.*'{value}'")


def test_empty_timestamp(tmp_path):
    log = bad_log(tmp_path, rows() + ["1,2,,Item 2,4"])
    refused(tmp_path, generic(tmp_path, log), r"log\.csv, line 12, column 'ts': empty timestamp")


def test_row_after_a_multiline_quoted_field_names_its_real_line(tmp_path):
    lines = rows(4) + [f'1,2,{T0 + 900},"Item 2, the\nlong title",4'] + rows(3, T0 + 1000)
    lines.append(f"1,2,{T0 + 5000},Item 2,x")  # header 1, rows 2-5, quoted 6-7, rows 8-10, this 11
    log = bad_log(tmp_path, lines)
    refused(tmp_path, generic(tmp_path, log), r"log\.csv, line 11, column 'rating'.*not a number.*'x'")


def test_delimiter_of_several_characters(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--delimiter", ";;"), r"--delimiter.*';;'.*single")


def test_min_timestamp_not_a_date(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--min-timestamp", "last year"), r"--min-timestamp.*ISO 8601")


# ============================================================================ handled before


def test_source_directory_not_found(tmp_path):
    refused(tmp_path, ml_args(tmp_path), r"src: source directory not found.*--source")


def test_source_directory_without_movielens_files(tmp_path):
    dirs(tmp_path)[0].mkdir()
    refused(tmp_path, ml_args(tmp_path), r"src: neither ratings\.dat .* nor u\.data")


def test_no_input_at_all(tmp_path):
    refused(tmp_path, ["ingest", "--data-dir", dirs(tmp_path)[1]], r"no input given.*--interactions")


@pytest.mark.parametrize("make_dir", [False, True])
def test_interaction_file_not_found(tmp_path, make_dir):
    missing = dirs(tmp_path)[0] / "log.csv"
    if make_dir:
        missing.mkdir(parents=True)
    refused(tmp_path, generic(tmp_path, missing, "--format", "generic"),
            r"log\.csv: interaction file not found.*--interactions")


def test_mapped_column_not_in_file(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--map", "user_id=uid"),
            r"log\.csv, column 'uid': no column 'uid'.*--map user_id=")


@pytest.mark.parametrize("pair", ["user_id", "uid=user_id"])
def test_malformed_map(tmp_path, pair):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--map", pair), rf"--map '{pair}'")


def test_non_integer_id(tmp_path):
    log = bad_log(tmp_path, rows() + [f"u7,2,{T0 + 5000},Item 2,4"])
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv, line 12, column 'user_id'.*not an integer.*--hash-ids")


def test_empty_file(tmp_path):
    log = dirs(tmp_path)[0] / "log.csv"
    log.parent.mkdir()
    log.write_text("")
    refused(tmp_path, generic(tmp_path, log), r"log\.csv: the file is empty")


def test_header_without_rows(tmp_path):
    log = bad_log(tmp_path, [])
    refused(tmp_path, generic(tmp_path, log), r"log\.csv: no interactions")


def test_unknown_encoding_name(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--encoding", "klingon-8"),
            r"unknown encoding 'klingon-8'.*--encoding")


def test_bytes_not_valid_in_the_encoding(tmp_path):
    log = bad_log(tmp_path, rows())
    log.write_bytes(log.read_bytes() + f"1,2,{T0 + 5000},caf\xe9,4\n".encode("latin-1"))
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv: byte 0xe9 .*\(line 12\) is not valid utf-8.*--encoding")


def test_utf16_read_as_utf8(tmp_path):
    log = bad_log(tmp_path, rows())
    log.write_bytes(log.read_text().encode("utf-16"))
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv: starts with a UTF-16 byte-order mark.*--encoding utf-16")


def test_utf8_movielens_without_encoding(tmp_path):
    ml1m(tmp_path, movies=[*ML_MOVIES[:2], "3::Misérables, Les (1995)::Drama"], encoding="utf-8")
    refused(tmp_path, ml_args(tmp_path), r"movies\.dat: expected Latin-1.*UTF-8.*line 3.*--encoding utf-8")


def test_movielens_line_with_wrong_field_count(tmp_path):
    ml1m(tmp_path, ratings=[f"1::1::5::{T0}", "1::2::4"])
    refused(tmp_path, ml_args(tmp_path), r"ratings\.dat, line 2: expected 4 fields")


def test_csv_row_with_extra_fields(tmp_path):
    log = bad_log(tmp_path, rows(3) + [f"1,2,{T0 + 5000},Item 2,4,extra"] + rows(3, T0 + 6000))
    refused(tmp_path, generic(tmp_path, log), r"log\.csv(?=.*line 5\b)(?=.*5 fields)(?=.*\b6\b).*--delimiter")


def test_empty_item_text(tmp_path):
    log = bad_log(tmp_path, rows() + [f"1,2,{T0 + 5000}, ,4"])
    refused(tmp_path, generic(tmp_path, log), r"log\.csv, line 12, column 'title': empty item text")


def test_item_listed_twice_in_the_item_table(tmp_path):
    log = bad_log(tmp_path, rows())
    items = write(dirs(tmp_path)[0] / "items.csv", ["1,A", "2,B", "3,C", "4,D", "2,B again"], "item_id,title")
    refused(tmp_path, generic(tmp_path, log, "--items", items),
            r"items\.csv, column 'item_id': item 2 is listed more than once \(lines 3 and 6\)")


def test_conflicting_duplicate_interactions(tmp_path):
    good = rows()
    u, i, t, title, r = good[3].split(",")
    log = bad_log(tmp_path, good + [",".join([u, i, t, title, "1" if r != "1" else "2"])])
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv, column 'rating': conflicting duplicates: line 5 and line 12")


def test_item_not_in_the_item_table(tmp_path):
    log = bad_log(tmp_path, rows() + [f"1,9,{T0 + 5000},Item 9,4"])
    items = write(dirs(tmp_path)[0] / "items.csv", ["1,A", "2,B", "3,C", "4,D"], "item_id,title")
    refused(tmp_path, generic(tmp_path, log, "--items", items),
            r"log\.csv, line 12, column 'item_id': item 9 is not in .*items\.csv.*--drop-unknown-items")


def test_every_interaction_dropped_as_unknown(tmp_path):
    log = bad_log(tmp_path, rows())
    items = write(dirs(tmp_path)[0] / "items.csv", ["7,A"], "item_id,title")
    refused(tmp_path, generic(tmp_path, log, "--items", items, "--drop-unknown-items"),
            r"every interaction refers to an unknown item.*--items")


def test_malformed_label_rule(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--label-rule", "rating>>3"),
            r"--label-rule 'rating>>3'.*COLUMN OP NUMBER")


def test_label_rule_on_another_column(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--label-rule", "ts>3"),
            r"--label-rule 'ts>3' refers to 'ts'.*--label-column")


def test_label_column_not_zero_or_one(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--label-column", "rating"),
            r"log\.csv, line 3, column 'rating': label must be 0 or 1.*'2'")


def test_empty_rating_under_the_label_rule(tmp_path):
    log = bad_log(tmp_path, rows() + [f"1,2,{T0 + 5000},Item 2,"])
    refused(tmp_path, generic(tmp_path, log),
            r"log\.csv, line 12, column 'rating': empty rating.*--label-column")


@pytest.mark.parametrize("ratios", ["0.8,0.2", "inf,1,1"])
def test_split_ratios_not_three_numbers(tmp_path, ratios):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--split-ratios", ratios),
            r"--split-ratios.*not three non-negative numbers")


def test_split_ratios_other_than_recorded(tmp_path):
    log = bad_log(tmp_path, rows())
    ok(generic(tmp_path, log))
    refused(tmp_path, generic(tmp_path, log, "--split-ratios", "0.7,0.2,0.1"),
            r"split\.json: the recorded split has ratios.*--resplit")


def test_recorded_split_of_another_dataset(tmp_path):
    log = bad_log(tmp_path, rows())
    ok(generic(tmp_path, log))
    write(log, rows(t0=T0 + 10**8))  # all after the recorded test start
    refused(tmp_path, generic(tmp_path, log),
            r"split\.json: the recorded split .* another dataset.*--resplit")


def test_unreadable_split_json(tmp_path):
    log = bad_log(tmp_path, rows())
    ok(generic(tmp_path, log))
    (dirs(tmp_path)[1] / "canonical/split.json").write_text("{not json")
    refused(tmp_path, generic(tmp_path, log, "--force"),
            r"split\.json: cannot read the recorded split.*--resplit")


def test_interaction_file_that_is_not_parquet(tmp_path):
    log = bad_log(tmp_path, rows(), name="log.parquet")
    refused(tmp_path, generic(tmp_path, log), r"log\.parquet: cannot read as parquet")


def test_no_item_text_and_no_items_file(tmp_path):
    log = bad_log(tmp_path, [r.rsplit(",", 2)[0] + "," + r.rsplit(",", 1)[1] for r in rows()],
                  header="user_id,item_id,ts,rating")
    refused(tmp_path, ["ingest", "--interactions", log, "--data-dir", dirs(tmp_path)[1]],
            r"log\.csv: no item text column and no --items file.*--item-text-column")


def test_unknown_format(tmp_path):
    log = bad_log(tmp_path, rows())
    refused(tmp_path, generic(tmp_path, log, "--format", "ml-10m"), r"--format.*'ml-10m'")


def test_empty_id_under_hash_ids(tmp_path):
    log = bad_log(tmp_path, rows() + [f"1,,{T0 + 5000},Item 2,4"])
    refused(tmp_path, generic(tmp_path, log, "--hash-ids"),
            r"log\.csv, line 12, column 'item_id': empty item id")


def test_non_numeric_user_age(tmp_path):
    log = bad_log(tmp_path, rows())
    users = write(dirs(tmp_path)[0] / "users.csv", ["1,24", "2,old", "3,31"], "user_id,age")
    refused(tmp_path, generic(tmp_path, log, "--users", users),
            r"users\.csv, line 3, column 'age': not a number: 'old'")


def test_good_inputs_pass_and_the_options_that_widen_the_range_work(tmp_path):
    """The checks refuse only what they should: 1970s times with --min-timestamp, a 2100 time with
    --allow-future, ms timestamps (by magnitude or --timestamp-unit ms), big ids with --hash-ids."""
    src, data = dirs(tmp_path)
    ms = [",".join([*r.split(",")[:2], str(int(r.split(",")[2]) * 1000), *r.split(",")[3:]]) for r in rows()]
    for lines, extra in [
        (rows(t0=86_400), ["--min-timestamp", "1970-01-01"]),
        (rows() + ["1,2,4102444800,Item 2,4"], ["--allow-future"]),
        (ms, []),
        (ms, ["--timestamp-unit", "ms"]),
        (rows() + [f"99999999999999999999,2,{T0 + 5000},Item 2,4"], ["--hash-ids"]),
    ]:
        log = bad_log(tmp_path, lines)
        ok(generic(tmp_path, log, "--force", "--resplit", *extra))
        df = pd.read_parquet(data / "canonical/interactions.parquet")
        assert len(df) == len(lines)


@pytest.mark.parametrize("extra, expect", [
    (["--label-rule", "rating>0"], r"every interaction is labelled 1 \(positive\) by the rule rating>0"),
    (["--label-rule", "rating>5"], r"every interaction is labelled 0 \(negative\) by the rule rating>5"),
])
def test_one_label_only(tmp_path: Path, extra: list, expect: str) -> None:
    """48: nothing to train a click-through model on; refused before anything is written."""
    log = write(dirs(tmp_path)[0] / "log.csv", rows(12))
    msg = refused(tmp_path, generic(tmp_path, log, *extra), expect)
    assert "--label-rule" in msg and "positives only are not supported" in msg


def test_one_label_only_column(tmp_path: Path) -> None:
    """48: a click log that holds only its clicks (every 0/1 label is 1)."""
    lines = [f"{1 + k % 3},{1 + k % 4},{T0 + 100 * k},Item {1 + k % 4},1" for k in range(12)]
    log = write(dirs(tmp_path)[0] / "clicks.csv", lines, header="user_id,item_id,ts,title,clicked")
    msg = refused(tmp_path, generic(tmp_path, log, "--label-column", "clicked"), r"labelled 1 \(positive\) by the column clicked")
    assert "--label-column" in msg

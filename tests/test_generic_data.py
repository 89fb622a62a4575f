"""Generic interaction logs of several shapes, each through the whole pipeline: ingest -> encode ->
feast apply -> finetune -> embed-users -> materialize -> both ranker twins -> an online ranking.

* ``clicks``: a parquet impression log with string ids (``--hash-ids``), a 0/1 ``clicked`` column
  and no rating, no user or item table; the item text, a category, ';'-separated tags, the user's
  country and a numeric loyalty score are columns of the log (declared);
* ``ratings``: CSV ratings with a user table and an item table, every attribute inferred (text,
  true/false, integer codes, numbers, '|'-separated lists; an identifier column is skipped);
* ``ml100k``: a slice of MovieLens-100K written out as CSV (``u.user``, ``u.item`` with the genre
  flags as a '|' list, ``u.data``), ingested as generic data: it must give the features the
  MovieLens adapter gives.

The features of the Feast views and of the ranker must be what each log has, and nothing else.
Tiny BERT (tests/tiny_models.py), a few fine-tuning steps and one ranker epoch keep each shape at
about half a minute on 2 cores. Bad attribute declarations are refused with the file and column.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from llm_features.ids import stable_id
from tests.bad_input import run_bad
from tests.datasets import ML100K, require_ml100k

ROOT = Path(__file__).resolve().parents[1]
T0 = pd.Timestamp("2024-01-01T00:00:00Z")
MOVIELENS_SPARSE = ["user_id", "item_id", "gender", "age", "occupation", "zip_prefix", "item_genres",
                    "recent_item_ids"]  # the ranker's features on MovieLens, before and after


# ----------------------------------------------------------------------------------------- logs
def clicks_log(d: Path, n_users: int = 30, n_items: int = 24, per_user: int = 16, seed: int = 1) -> dict:
    """Impressions with a clicked flag; users click their country's favourite category more often."""
    rng = np.random.default_rng(seed)
    cats = ["books", "games", "music", "garden"]
    countries = ["FR", "DE", "US"]
    item_cat = [cats[i % len(cats)] for i in range(n_items)]
    item_tags = [";".join(sorted({f"t{i % 5}", f"t{i % 3}"})) if i % 4 else "" for i in range(n_items)]
    rows = []
    for u in range(n_users):
        country = countries[u % 3]
        loyalty = round(float(rng.uniform(0, 100)), 1) if u % 5 else None  # some users without a score
        for k, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            likes = item_cat[i] == cats[u % 3]
            rows.append({
                "visitor": f"visitor-{u:03d}", "product": f"SKU-{i:04d}",
                "shown_at": T0 + pd.Timedelta(minutes=int(k * 211 + u * 7)),
                "clicked": bool(rng.random() < (0.7 if likes else 0.15)),
                "product_name": f"{item_cat[i].title()} thing {i}", "category": item_cat[i], "tags": item_tags[i],
                "country": country, "loyalty": loyalty,
            })
    path = d / "impressions.parquet"
    pd.DataFrame(rows).to_parquet(path, index=False)
    return dict(format="generic", interactions=(path,), hash_ids=True, label_column="clicked",
                map=("user_id=visitor", "item_id=product", "event_timestamp=shown_at"),
                item_text_column="product_name",
                item_attribute=("category", "tags:multi:;"),
                user_attribute=("country", "loyalty:numeric"))


def ratings_log(d: Path, n_users: int = 30, n_items: int = 24, per_user: int = 16, seed: int = 2) -> dict:
    """Ratings 1-5 with a user table and an item table whose attributes are all left to inference."""
    rng = np.random.default_rng(seed)
    brands = ["acme", "globex", "initech"]
    items = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1),
        "title": [f"Gadget {i}" for i in range(n_items)],
        "brand": [brands[i % 3] for i in range(n_items)],
        "colors": ["|".join(["red", "blue", "green"][: 1 + i % 3]) for i in range(n_items)],
        "weight_kg": np.round(rng.uniform(0.1, 3.0, n_items), 3),
        "sku_code": [f"X{i:05d}-{rng.integers(1e6)}" for i in range(n_items)],  # an identifier: skipped
    })
    items.to_csv(d / "items.csv", index=False)
    users = pd.DataFrame({
        "user_id": np.arange(1, n_users + 1),
        "segment": [["student", "pro", "family"][u % 3] if u % 7 else "" for u in range(n_users)],
        "premium": [bool(u % 2) for u in range(n_users)],
        "region_code": [u % 4 for u in range(n_users)],  # few integer values: categorical
        "lifetime_value": np.round(rng.gamma(2.0, 50.0, n_users), 2),  # numbers: numeric
    })
    users.to_csv(d / "users.csv", index=False)
    rows = []
    for u in range(n_users):
        for k, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            good = (i % 3) == (u % 3)
            rows.append((u + 1, i + 1, int(T0.timestamp()) + k * 3600 + u * 60,
                         int(rng.integers(4, 6) if good else rng.integers(1, 5))))
    pd.DataFrame(rows, columns=["user_id", "item_id", "time", "stars"]).to_csv(d / "ratings.csv", index=False)
    return dict(format="generic", interactions=(d / "ratings.csv",), items=d / "items.csv", users=d / "users.csv",
                map=("event_timestamp=time", "rating=stars"),
                item_text_column="title", label_rule="rating>3")


def ml100k_csv(d: Path, n_users: int = 40) -> dict:
    """The first ``n_users`` users of ML-100K, their ratings and every movie, as three CSV files."""
    from llm_features.ingest import load_ml100k

    loaded = load_ml100k(ML100K)
    inter = loaded.interactions[loaded.interactions.user_id <= n_users]
    pd.DataFrame({"user_id": inter.user_id, "item_id": inter.item_id, "rating": inter.rating.astype(int),
                  "timestamp": inter.ts_us // 1_000_000}).to_csv(d / "ratings.csv", index=False)
    items = loaded.items
    pd.DataFrame({"item_id": items.item_id, "title": items.title,
                  "genres": ["|".join(g) for g in items.genres]}).to_csv(d / "items.csv", index=False)
    loaded.users[["user_id", "age", "gender", "occupation", "zip"]].to_csv(d / "users.csv", index=False)
    return dict(format="generic", interactions=(d / "ratings.csv",), items=d / "items.csv", users=d / "users.csv",
                item_text_column="title,genres")


SHAPES = {"clicks": clicks_log, "ratings": ratings_log, "ml100k": ml100k_csv}


# ----------------------------------------------------------------------------------------- pipeline
@dataclass
class Run:
    root: Path
    report: dict
    store: object
    metrics: dict  # twin name -> ranker metrics.json
    ranked: list
    user: int
    candidates: list[int]

    @property
    def data(self) -> Path:
        return self.root / "data"


def pipeline(root: Path, tiny_bert_dir: Path, ingest_kw: dict) -> Run:
    import torch

    from llm_features.backbone import BackboneConfig
    from llm_features.config import RuntimeArgs
    from llm_features.embed_users import EmbedUsersConfig, embed_users
    from llm_features.encode import EncodeConfig, encode
    from llm_features.finetune import FinetuneConfig, finetune
    from llm_features.ingest import IngestConfig, ingest
    from llm_features.store import apply_definitions, materialize_all, open_store
    from llm_features.workspace import Workspace
    from ranker.config import ModelConfig, TrainConfig
    from ranker.serve import Ranker
    from ranker.train import train

    torch.set_num_threads(1)
    data = root / "data"
    repo = Path(shutil.copytree(ROOT / "feast_repo", root / "feast_repo",
                                ignore=shutil.ignore_patterns("data", "__pycache__")))
    report = ingest(IngestConfig(data_dir=data, recent_n=8, **ingest_kw))
    tiny = BackboneConfig(model=tiny_bert_dir, split_layer=2)
    encode(EncodeConfig(backbone=tiny, data_dir=data, progress=False, batch_size=256))
    store = open_store(repo, data)
    apply_definitions(store)
    ft = root / "finetune"
    finetune(FinetuneConfig(backbone=tiny, data_dir=data, out=ft, context_size=8,
                            targets_per_sequence=16, batch_size=32, head_hidden=8, max_steps=4, warmup_steps=1,
                            log_every=0, runtime=RuntimeArgs(num_threads=1)))
    embed_users(EmbedUsersConfig(checkpoint=ft, data_dir=data, every=4,
                                 runtime=RuntimeArgs(device="cpu", num_threads=1)))
    materialize_all(store, Workspace.at(data))
    metrics = {}
    for name, llm in (("ranker_id_only", False), ("ranker_llm", True)):
        cfg = TrainConfig(model=ModelConfig(llm_features=llm), repo=repo, data_dir=data, out=root / name,
                          epochs=1, batch_size=64, progress=False, threads=1)
        train(cfg)
        metrics[name] = json.loads((cfg.out / "metrics.json").read_text())
    inter = pd.read_parquet(data / "canonical/interactions.parquet", columns=["user_id", "item_id"])
    user = int(inter.user_id.iloc[-1])
    candidates = [int(i) for i in pd.unique(inter.item_id)[:5]]
    ranked = Ranker.load(root / "ranker_llm", store=store).rank(user, candidates)
    return Run(root, report, store, metrics, ranked, user, candidates)


@pytest.fixture(scope="module", params=list(SHAPES))
def run(request, tmp_path_factory, tiny_bert_dir) -> tuple[str, Run]:
    shape = request.param
    if shape == "ml100k":
        require_ml100k()
    root = tmp_path_factory.mktemp(shape)
    src = root / "src"
    src.mkdir()
    return shape, pipeline(root, tiny_bert_dir, SHAPES[shape](src))


def _kept(run: Run, entity: str) -> dict[str, dict]:
    return {a["name"]: a for a in run.report["attributes"][entity]["kept"]}


EXPECTED = {  # shape -> (user attributes, item attributes) by kind
    "clicks": ({"country": "categorical", "loyalty": "numeric"}, {"category": "categorical", "tags": "multi"}),
    "ratings": ({"segment": "categorical", "premium": "categorical", "region_code": "categorical",
                 "lifetime_value": "numeric"},
                {"brand": "categorical", "colors": "multi", "weight_kg": "numeric"}),
    "ml100k": ({"gender": "categorical", "age": "categorical", "occupation": "categorical", "zip": "categorical"},
               {"item_genres": "multi"}),
}


def test_ingest_records_and_shows_the_attributes(run):
    shape, r = run
    users_want, items_want = EXPECTED[shape]
    assert {n: a["kind"] for n, a in _kept(r, "user").items()} == users_want
    assert {n: a["kind"] for n, a in _kept(r, "item").items()} == items_want
    for entity, table in (("user", "users"), ("item", "items")):
        schema = pq.read_schema(r.data / "canonical" / f"{table}.parquet")
        recorded = json.loads(schema.metadata[b"llmfeat.attributes"])
        assert [a["name"] for a in recorded] == list(_kept(r, entity))
        assert all(a["rows_with_value"] > 0 for a in _kept(r, entity).values())
    if shape == "ratings":
        assert [s["column"] for s in r.report["attributes"]["item"]["skipped"]] == ["sku_code"]
    from llm_features.ingest import format_summary

    summary = format_summary(r.report)
    for name in (*users_want, *items_want):
        assert name in summary


def test_values_land_in_the_tables(run):
    shape, r = run
    users = pd.read_parquet(r.data / "canonical/users.parquet").set_index("user_id")
    items = pd.read_parquet(r.data / "canonical/items.parquet").set_index("item_id")
    if shape == "clicks":  # string ids, hashed; one value per user/item read from the log
        assert users.loc[stable_id("user:visitor-004"), "country"] == "DE"
        assert np.isnan(users.loc[stable_id("user:visitor-005"), "loyalty"])  # no score: missing, not 0
        assert list(items.loc[stable_id("item:SKU-0001"), "tags"]) == ["t1"]
        assert list(items.loc[stable_id("item:SKU-0004"), "tags"]) == []
        assert items.loc[stable_id("item:SKU-0005"), "category"] == "games"
    elif shape == "ratings":
        assert users.loc[8, "segment"] is None and users.loc[2, "segment"] == "pro"  # empty -> missing
        assert users.loc[2, "premium"] == "True" and users.loc[3, "region_code"] == 2
        assert list(items.loc[3, "colors"]) == ["red", "blue", "green"]
        assert "sku_code" not in items.columns and "title" in items.columns
    else:  # the same values the MovieLens adapter reads
        from llm_features.ingest import load_ml100k

        loaded = load_ml100k(ML100K)
        ml_users = loaded.users.set_index("user_id")
        for u in (1, 7, 33):
            assert users.loc[u, "gender"] == ml_users.loc[u, "gender"]
            assert users.loc[u, "age"] == ml_users.loc[u, "age"] and users.loc[u, "zip"] == ml_users.loc[u, "zip"]
        ml_items = loaded.items.set_index("item_id")
        for i in (1, 50, 1682):
            assert list(items.loc[i, "item_genres"]) == list(ml_items.loc[i, "genres"])


def test_feast_views_hold_what_the_data_has(run):
    shape, r = run
    users_want, items_want = EXPECTED[shape]
    views = {v.name: v for v in r.store.list_feature_views()}
    assert {f.name for f in views["user_profile"].features} == set(users_want)
    item_fields = {f.name for f in views["item_profile"].features}
    assert item_fields - {"title"} == set(items_want)
    tagged = {f.name: f.tags["llmfeat_attribute"] for v in ("user_profile", "item_profile")
              for f in views[v].features if "llmfeat_attribute" in f.tags}
    assert tagged == {**users_want, **items_want}
    if shape == "ml100k":  # typed from the table: ML-100K's occupation is text, its age an integer
        types = {f.name: str(f.dtype) for f in views["user_profile"].features}
        assert types["occupation"] == "String" and types["age"] == "Int64"
        assert views["user_profile"].features[3].tags.get("llmfeat_prefix") == "2"


def test_both_twins_train_on_the_data_features_and_serve(run):
    shape, r = run
    users_want, items_want = EXPECTED[shape]
    sparse = ["user_id", "item_id"]
    for name, kind in {**users_want, **items_want}.items():
        if kind != "numeric":
            sparse.append(f"{name}_prefix" if name == "zip" else name)
    sparse.append("recent_item_ids")
    numeric = [n for n, k in {**users_want, **items_want}.items() if k == "numeric"]
    for twin, m in r.metrics.items():
        assert m["features"]["sparse"] == sparse, (twin, m["features"])
        assert m["features"]["dense"][3:3 + len(numeric)] == numeric
        assert m["train_rows"] > 0 and np.isfinite(m["valid"]["auc"])
    assert r.metrics["ranker_llm"]["features"]["dense"][-2:] == ["user_embedding (+ missing flag)",
                                                              "item_embedding (+ missing flag)"]
    if shape == "ml100k":
        assert r.metrics["ranker_llm"]["features"]["sparse"] == MOVIELENS_SPARSE
    # the checkpoint records them, so serving rebuilds the same model from the online store
    from ranker.train import load_checkpoint

    _, encoder, _ = load_checkpoint(r.root / "ranker_llm")
    assert encoder.sparse_names == sparse and list(encoder.numeric_stats) == numeric
    assert sorted(i for i, _ in r.ranked) == sorted(r.candidates)
    assert all(0.0 < p < 1.0 for _, p in r.ranked)
    # the request path (cached item inputs, the user read directly, the one-user forward) scores as the
    # reference path does, numeric attributes of either entity included
    from ranker.serve import Ranker

    ranker = Ranker.load(r.root / "ranker_llm", store=r.store)
    candidates = [*r.candidates, 10**12]  # the last: no item of the store
    for user in (r.user, 10**12):
        expected = ranker.score_frame(ranker.online_frame(user, candidates))
        np.testing.assert_allclose(ranker.score(user, candidates), expected, rtol=1e-5, atol=1e-6)


def test_ml100k_adapter_gives_the_same_ranker_features(tmp_path):
    """The MovieLens adapter declares its attributes through the same mechanism: same features."""
    require_ml100k()
    from llm_features.attributes import read_attributes
    from llm_features.ingest import IngestConfig, ingest
    from ranker.config import ModelConfig
    from ranker.features import sparse_features

    report = ingest(IngestConfig(source=ML100K, data_dir=tmp_path / "data", recent_cadence="none"))
    attrs = [*read_attributes(pq.read_schema(tmp_path / "data/canonical/users.parquet"), "user"),
             *read_attributes(pq.read_schema(tmp_path / "data/canonical/items.parquet"), "item")]
    assert [f.name for f in sparse_features(attrs)] == MOVIELENS_SPARSE
    assert {a["origin"] for e in report["attributes"].values() for a in e["kept"]} == {"format"}
    assert ModelConfig().to_dict().get("zip_prefix_len") is None


def test_old_checkpoints_read_as_the_movielens_features():
    from ranker.features import FeatureEncoder

    enc = FeatureEncoder.from_dict({
        "model": {"llm_features": False, "zip_prefix_len": 3}, "llm_dims": {},
        "sparse_names": MOVIELENS_SPARSE, "vocabs": {n: {"kind": "str", "keys": []} for n in MOVIELENS_SPARSE}})
    assert [a.name for a in enc.attributes] == ["gender", "age", "occupation", "zip", "item_genres"]
    assert enc.features["zip_prefix"].prefix == 3 and enc.features["item_genres"].multi


# ----------------------------------------------------------------------------------------- bad input
def _bad_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = tmp_path / "src"
    src.mkdir()
    (src / "log.csv").write_text("uid,sku,ts,stars,country\n" + "".join(
        f"{u},{i},{1_700_000_000 + 60 * k},{1 + k % 5},{'FR' if u == 1 else 'DE'}\n"
        for k, (u, i) in enumerate([(1, 10), (1, 11), (2, 10), (2, 12), (1, 12)])))
    (src / "items.csv").write_text("sku,title,price\n10,Ten,9.5\n11,Eleven,cheap\n12,Twelve,3\n")
    return src, src / "log.csv", tmp_path / "data"


def _ingest_args(log: Path, data: Path, *extra) -> list:
    return ["ingest", "--format", "generic", "--interactions", log, "--data-dir", data,
            "--map", "user_id=uid", "--map", "item_id=sku", "--map", "event_timestamp=ts", "--map", "rating=stars",
            *extra]


def test_bad_attributes_are_refused_with_file_and_column(tmp_path):
    src, log, data = _bad_setup(tmp_path)
    items = src / "items.csv"
    ok_items = ["--items", items, "--item-text-column", "title"]
    run_bad(_ingest_args(log, data, *ok_items, "--item-attribute", "colour"), unchanged=[src, data],
            expect=r"items\.csv, column 'colour': no column 'colour' \(given by --item-attribute colour\); "
                   r"the columns are: sku, title, price")
    run_bad(_ingest_args(log, data, *ok_items, "--item-attribute", "price:numeric"), unchanged=[src, data],
            expect=r"items\.csv, line 3, column 'price': not a number: 'cheap'")
    run_bad(_ingest_args(log, data, *ok_items, "--item-attribute", "price:float"), unchanged=[src, data],
            expect=r"--item-attribute: 'price:float': unknown type 'float'.*categorical")
    run_bad(_ingest_args(log, data, *ok_items, "--item-attribute", "rating=price:numeric"), unchanged=[src, data],
            expect=r"--item-attribute: attribute name 'rating' is taken.*NEW_NAME=price")
    (src / "items_ok.csv").write_text("sku,title,price\n10,Ten,9.5\n11,Eleven,4\n12,Twelve,3\n")
    run_bad(_ingest_args(log, data, "--items", src / "items_ok.csv", "--item-text-column", "title",
                         "--user-attribute", "country", "--item-attribute", "country=price"), unchanged=[src, data],
            expect=r"attribute name 'country' is used twice")
    # from the log (no user table), a user's value must not change
    (src / "log2.csv").write_text(log.read_text().replace("\n1,12,1700000240,5,FR", "\n1,12,1700000240,5,ES"))
    run_bad(_ingest_args(src / "log2.csv", data, "--items", src / "items_ok.csv", "--item-text-column", "title",
                         "--user-attribute", "country"), unchanged=[src, data],
            expect=r"log2\.csv, line 2, column 'country': user attribute 'country' changes for user 1: 'FR' here, "
                   r"'ES' at line 6")
    run_bad(["ingest", "--source", ML100K, "--data-dir", data, "--user-attribute", "zip"], unchanged=[data],
            expect=r"--user-attribute: --user-attribute and --item-attribute are for generic data")


def test_a_registry_without_attribute_tags_reads_the_old_profile_fields(caplog):
    """A registry applied by definitions that did not tag attributes yet: its profile fields are read as
    the fixed set they were, with a warning to re-apply; tagged fields are read from their tags."""
    from types import SimpleNamespace as NS

    from llm_features.attributes import Attribute
    from ranker.train import service_attributes

    def field(name, tags=None):
        return NS(name=name, tags=tags or {})

    views = {"user_profile": ["user_id"], "item_profile": ["item_id"], "item_embeddings": ["item_id"]}
    store = NS(get_feature_view=lambda name: NS(join_keys=views[name]))
    old = NS(feature_view_projections=[
        NS(name="user_profile", features=[field("gender"), field("zip")]),
        NS(name="item_profile", features=[field("item_genres"), field("title")]),
        NS(name="item_embeddings", features=[field("item_embedding")])])
    got = service_attributes(store, old)
    assert [(a.name, a.kind, a.prefix) for a in got] == [("gender", "categorical", None), ("zip", "categorical", 2),
                                                         ("item_genres", "multi", None)]
    assert "llmfeat feast apply" in caplog.text
    tagged = NS(feature_view_projections=[NS(name="item_profile", features=[
        field("brand", Attribute("brand", "categorical", "item").tags()), field("title")])])
    assert [(a.name, a.entity) for a in service_attributes(store, tagged)] == [("brand", "item")]

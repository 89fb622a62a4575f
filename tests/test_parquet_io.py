import json

import numpy as np
import pyarrow as pa
import pytest

from llm_features import parquet_io
from llm_features.fingerprint import FingerprintMismatchError, ModelFingerprint
from llm_features.ids import normalize_text, stable_id
from llm_features.workspace import Workspace


def _fp(**kw) -> ModelFingerprint:
    base = dict(model_name="m", weights_sha256="ab" * 32, split_layer=3, pooling="mean", max_tokens=64,
                dtype="float32", hidden_size=4)
    base.update(kw)
    return ModelFingerprint(**base)


def test_embedding_roundtrip_is_float32_list():
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    col = parquet_io.embedding_array(x)
    assert col.type == pa.list_(pa.float32())
    np.testing.assert_array_equal(parquet_io.embedding_matrix(col), x)


def test_write_part_is_atomic_and_listed(tmp_path):
    d = tmp_path / "emb"
    t = pa.table({"item_id": pa.array([1, 2], pa.int64())})
    p = parquet_io.write_part(d, t, metadata={"k": "v"}, name="a")
    assert p.name == "part-a.parquet"
    assert parquet_io.list_parts(d) == [p]
    assert parquet_io.file_metadata(p)["k"] == "v"
    # staging lives beside the directory, never inside it (Feast reads the whole directory)
    assert not any(x.suffix == ".tmp" for x in d.iterdir())
    assert (tmp_path / ".emb.staging").is_dir()
    assert parquet_io.read_parts(d).num_rows == 2


def test_utc_us_casts_naive_and_ns():
    import pandas as pd

    arr = parquet_io.utc_us(pd.to_datetime(["2000-01-01 00:00:01"]).values)
    assert arr.type == pa.timestamp("us", tz="UTC")


def test_stable_id_normalises_whitespace_and_unicode():
    assert stable_id("Toy  Story (1995) ") == stable_id("Toy Story (1995)")
    assert stable_id("Ｔoy") == stable_id("Toy")  # NFKC full-width
    assert stable_id("a") != stable_id("b")
    assert 0 <= stable_id("x") < 2**63
    assert normalize_text(" a \n b ") == "a b"


def test_fingerprint_digest_ignores_name_and_detects_changes():
    assert _fp().digest == _fp(model_name="other/path").digest
    assert _fp().digest != _fp(split_layer=2).digest
    assert ModelFingerprint.from_json(_fp().to_json()) == _fp()
    bad = json.loads(_fp().to_json())
    bad["pooling"] = "last"
    with pytest.raises(ValueError, match="digest mismatch"):
        ModelFingerprint.from_dict(bad)


def test_workspace_refuses_second_model(tmp_path):
    ws = Workspace.at(tmp_path)
    ws.claim_fingerprint(_fp())
    ws.claim_fingerprint(_fp())  # same model: fine
    with pytest.raises(FingerprintMismatchError, match="refusing to mix"):
        ws.claim_fingerprint(_fp(pooling="last"))


def test_require_same_compares_digests_and_describes_both_sides():
    fp = _fp()
    fp.require_same(_fp(model_name="a copy elsewhere"), lambda found, this: "not raised")  # the name is no part
    fp.require_same(fp.digest, lambda found, this: "not raised")
    problem = lambda found, this: f"x.parquet holds {found}, this run is {this}"  # noqa: E731
    with pytest.raises(FingerprintMismatchError) as err:
        fp.require_same(_fp(model_name="other", pooling="last"), problem, option="--pooling", fix="Re-encode.")
    assert str(err.value) == (f"--pooling: x.parquet holds {_fp(pooling='last').digest} (other, split_layer=3, "
                              f"pooling=last), this run is {fp.digest} (m, split_layer=3, pooling=mean). Re-encode.")
    with pytest.raises(FingerprintMismatchError, match=r"holds 0{16}, this run"):
        fp.require_same("0" * 16, problem)
    with pytest.raises(FingerprintMismatchError, match=r"holds none, this run"):
        fp.require_same(None, problem)

"""Bad input to ``llmfeat encode`` (issue 16): each class exits 1 with a one- or two-line message
naming the file, column or option, no traceback, and leaves the data dir as it was.

Classes (10):
1. encode before ingest (no canonical tables in the data dir)
2. a canonical table that is not parquet (truncated or overwritten)
3. a canonical items table without its ``item_text`` column
4. a ``behavior_id`` that is not the stable id of its text (an edited table)
5. ``--batch-size 0``
6. ``--part-size 0``
7. a ``pooling`` value outside its choices in a ``--config`` file (ran with mean, fingerprinted ``max``)
8. a ``--device`` that is not a device, and ``cuda`` on a machine without one
9. a data dir holding embeddings of another model (fingerprint mismatch)
10. a ``--config`` file that is not valid JSON
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from bad_input import run_bad
from test_encode import write_canonical

from llm_features.backbone import BackboneConfig
from llm_features.encode import EncodeConfig, encode


@pytest.fixture
def ws(tmp_path):
    write_canonical(tmp_path / "data")
    return tmp_path / "data"


def enc(model, data, *extra):
    return ["encode", "--model", model, "--data-dir", data, "--no-progress", *extra]


def test_encode_before_ingest(tiny_bert_dir, tmp_path):
    run_bad(enc(tiny_bert_dir, tmp_path / "empty"), expect=r"interactions\.parquet: not found\. Run `llmfeat ingest`",
            unchanged=[tmp_path])


def test_canonical_table_not_parquet(tiny_bert_dir, ws):
    (ws / "canonical/items.parquet").write_bytes(b"PAR1 this is not a parquet file")
    run_bad(enc(tiny_bert_dir, ws), expect=r"items\.parquet: not a readable parquet table", unchanged=[ws])


def test_items_table_without_text_column(tiny_bert_dir, ws):
    t = pq.read_table(ws / "canonical/items.parquet").drop_columns(["item_text"])
    pq.write_table(t, ws / "canonical/items.parquet")
    run_bad(enc(tiny_bert_dir, ws), expect=r"items\.parquet, column 'item_text': missing", unchanged=[ws])


def test_behavior_id_not_stable_id_of_text(tiny_bert_dir, ws):
    t = pq.read_table(ws / "canonical/interactions.parquet")
    ids = t["behavior_id"].to_pylist()
    ids[0] += 1
    t = t.set_column(t.schema.get_field_index("behavior_id"), "behavior_id", pa.array(ids, pa.int64()))
    pq.write_table(t, ws / "canonical/interactions.parquet")
    run_bad(enc(tiny_bert_dir, ws), expect=r"column 'behavior_id': behavior_id \d+ is not stable_id", unchanged=[ws])


@pytest.mark.parametrize("option", ["--batch-size", "--part-size"])
def test_zero_sizes(tiny_bert_dir, ws, option):
    run_bad(enc(tiny_bert_dir, ws, option, "0"), expect=rf"{option}", unchanged=[ws])


def test_config_value_outside_choices(tiny_bert_dir, ws, tmp_path):
    conf = tmp_path / "encode.json"
    conf.write_text(json.dumps({"pooling": "max"}))
    run_bad(enc(tiny_bert_dir, ws, "--config", conf), expect=r"encode\.json, --pooling: 'max' is not one of",
            unchanged=[ws])
    with pytest.raises(ValueError, match="--pooling"):  # the Python API checks the same
        bad = BackboneConfig(model=tiny_bert_dir, pooling="max")  # type: ignore[arg-type]
        encode(EncodeConfig(backbone=bad, data_dir=ws))


def test_bad_device(tiny_bert_dir, ws):
    run_bad(enc(tiny_bert_dir, ws, "--device", "gpu"), expect=r"--device: 'gpu' is not a device", unchanged=[ws])
    if not torch.cuda.is_available():
        run_bad(enc(tiny_bert_dir, ws, "--device", "cuda"), expect=r"--device: cuda asked for, but this machine has no",
                unchanged=[ws])


def test_embeddings_of_another_model(tiny_bert_dir, tiny_llama_dir, ws):
    encode(EncodeConfig(backbone=BackboneConfig(model=tiny_bert_dir), data_dir=ws, progress=False))
    run_bad(enc(tiny_llama_dir, ws), expect=r"was written by model fingerprint .* use a fresh --data-dir",
            unchanged=[ws])


def test_config_not_json(tiny_bert_dir, ws, tmp_path):
    conf = tmp_path / "encode.json"
    conf.write_text("{'pooling': mean")
    run_bad(enc(tiny_bert_dir, ws, "--config", conf), expect=r"encode\.json, --config: not valid JSON", unchanged=[ws])

"""A materialisation killed mid-write leaves its view MATERIALIZING, which Feast refuses to serve:
llmfeat's read paths say so and name the fix, and the fix (materialize again) completes the view."""

from __future__ import annotations

import re

import numpy as np
import pytest
from click.testing import CliRunner

from llm_features import parquet_io
from llm_features.errors import UserError
from llm_features.fingerprint import FINGERPRINT_METADATA_KEY
from llm_features.store import (
    apply_definitions,
    check_materialized,
    materialize_all,
    online_features,
    open_store,
)
from llm_features.workspace import Workspace
from tests.store_data import DIM, T2, copy_repo, embedding_table, write_synthetic_workspace


def _interrupt_while_writing(monkeypatch, store, view: str) -> None:
    """The online store writes half of ``view``'s rows, then the run is interrupted (Ctrl-C: a
    ``BaseException``, which Feast's rollback of the view's state does not catch; a kill or a time
    budget leaves the same state behind)."""
    online = type(store._get_provider().online_store)
    real = online.online_write_batch

    def write_half_then_interrupt(self, config, table, data, progress):
        if table.name != view:
            return real(self, config, table, data, progress)
        real(self, config, table, data[: len(data) // 2], progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(online, "online_write_batch", write_half_then_interrupt)


def test_interrupted_materialisation_is_named_and_materialize_again_completes_it(tmp_path, monkeypatch):
    repo = copy_repo(tmp_path / "feast_repo")
    data = tmp_path / "data"
    syn = write_synthetic_workspace(data)
    store = open_store(repo, data)
    apply_definitions(store)
    materialize_all(store)  # served: each view AVAILABLE_ONLINE
    # new user embeddings (users 20..29), then a materialisation of them that is interrupted
    new = np.random.default_rng(3).standard_normal((10, DIM)).astype(np.float32)
    parquet_io.write_part(Workspace.at(data).user_embeddings,
                          embedding_table("user_id", "user_embedding", list(range(20, 30)), new, [T2] * 10),
                          metadata={FINGERPRINT_METADATA_KEY: syn.fingerprint.to_json()})
    with monkeypatch.context() as m:
        _interrupt_while_writing(m, store, "user_embeddings")
        with pytest.raises(KeyboardInterrupt):
            materialize_all(store)

    reader = open_store(repo, data)  # another process: the state is in the registry
    assert reader.get_feature_view("user_embeddings").state.name == "MATERIALIZING"
    assert reader.get_feature_view("item_embeddings").state.name == "AVAILABLE_ONLINE"
    with pytest.raises(ValueError, match="is in state 'MATERIALIZING' and cannot serve features"):
        reader.get_online_features(features=["user_embeddings:user_embedding"], entity_rows=[{"user_id": 1}])

    want = (f"{data}: a materialisation of feature view(s) user_embeddings (MATERIALIZING) of ranker_llm was "
            "interrupted, and Feast serves no view until its materialisation completes. Run `llmfeat feast "
            f"materialize --data-dir {data}` again; it completes the view.")
    with pytest.raises(UserError) as err:
        online_features(reader, 1, [3])
    assert str(err.value) == want
    with pytest.raises(UserError) as err:
        check_materialized(reader, "ranker_llm")  # what ranker serving checks at start-up
    assert str(err.value) == want
    check_materialized(reader, "ranker_id_only")  # its views were not touched
    assert online_features(reader, 1, [3], service="ranker_id_only").present["recent_item_ids"].all()

    # the fix, as the message words it, from the directory holding ./feast_repo
    from llm_features.cli.feast import command

    args = re.search(r"Run `llmfeat feast (materialize [^`]*)` again", want).group(1).split()
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(command, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output

    served = open_store(repo, data)
    assert served.get_feature_view("user_embeddings").state.name == "AVAILABLE_ONLINE"
    check_materialized(served, "ranker_llm")
    for user, vec in zip(range(20, 30), new):
        np.testing.assert_array_equal(online_features(served, user, [3]).values["user_embedding"][0], vec)
    old_user = online_features(served, 1, [3]).values["user_embedding"][0]
    np.testing.assert_array_equal(old_user, syn.users_v2[1])

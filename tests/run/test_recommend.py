"""Recommendations from a saved checkpoint: the evaluator's view equals RecBole's full_sort_topk, external ids
round-trip, the default view never lists a history item, bad input is refused with nothing written."""

import csv
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

import recbole_llm
from recbole_llm.run.cli import main
from recbole_llm.run.quick_start import load_data_and_model, run_recbole_llm
from recbole_llm.run.recommendations import ChangedDataError, Recommender, UnknownUsersError
from tests import helpers_laser, helpers_seralm

PLUGIN_MODELS = ["Laser", "CaserSeRALM", "SASRecSeRALM", "PAUPSeRALM", "LightSANsSeRALM", "PAUP", "SASRec"]
_SAVED = {}


def _train(model, root):
    """Train ``model`` for one epoch on a tiny dataset; returns (checkpoint, data folder)."""
    if model == "Laser":
        config = helpers_laser.tiny_config_dict(root)
        helpers_laser.write_tiny_dataset(root)
        dataset, folder = "tiny-laser", os.path.join(str(root), "tiny-laser")
    else:
        config = helpers_seralm.tiny_config_dict(root, knowledge_source="item_text", MAX_ITEM_LIST_LENGTH=4,
                                                   kernel_size=2)
        dataset = helpers_seralm.DATASET
        folder = os.path.join(config["data_path"], dataset)
    result = run_recbole_llm(model, dataset, config_dict=config, cmd_args=[])
    return result["saved_model_file"], folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One trained checkpoint per model, made on first use (module-scoped: each model trains once)."""
    def get(model):
        if model not in _SAVED:
            root = tmp_path_factory.mktemp(model)
            cwd = os.getcwd()
            os.chdir(root)  # RecBole's logger writes ./log
            try:
                _SAVED[model] = _train(model, root)
            finally:
                os.chdir(cwd)
        return _SAVED[model]
    yield get
    _SAVED.clear()


def _external_ids(folder, column):
    name = os.path.basename(folder)
    suffix = "inter" if column == "user_id" else "item"
    frame = pd.read_csv(os.path.join(folder, f"{name}.{suffix}"), sep="\t", dtype=str)
    return set(frame[f"{column}:token"])


def _histories(folder):
    name = os.path.basename(folder)
    frame = pd.read_csv(os.path.join(folder, f"{name}.inter"), sep="\t", dtype=str)
    return frame.groupby("user_id:token")["item_id:token"].apply(set).to_dict()


@pytest.mark.parametrize("model", PLUGIN_MODELS)
def test_test_split_equals_recbole_full_sort_topk(model, saved, monkeypatch, tmp_path):
    from recbole.utils.case_study import full_sort_topk

    checkpoint, folder = saved(model)
    monkeypatch.chdir(tmp_path)
    users = sorted(_external_ids(folder, "user_id"))[:5]
    got = recbole_llm.recommend(checkpoint, users=users, topk=5, split="test")

    _, net, dataset, _, _, test_data = load_data_and_model(checkpoint)
    uids = dataset.token2id(dataset.uid_field, users)
    scores, items = full_sort_topk(uids, net, test_data, k=5)
    expected_items = dataset.id2token(dataset.iid_field, items.numpy().reshape(-1)).tolist()
    assert got["user_id"].tolist() == [u for u in users for _ in range(5)]
    assert got["rank"].tolist() == list(range(1, 6)) * len(users)
    assert got["item_id"].tolist() == expected_items
    np.testing.assert_allclose(got["score"].to_numpy(), scores.numpy().reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["Laser", "SASRecSeRALM", "CaserSeRALM", "PAUP"])
def test_default_view_excludes_history_and_round_trips_ids(model, saved, monkeypatch, tmp_path):
    checkpoint, folder = saved(model)
    monkeypatch.chdir(tmp_path)
    frame = recbole_llm.recommend(checkpoint, users="all", topk=3, batch_size=4)
    histories = _histories(folder)
    assert set(frame["user_id"]) == set(histories)
    assert set(frame["item_id"]) <= _external_ids(folder, "item_id")
    for user, items in frame.groupby("user_id")["item_id"]:
        assert not set(items) & histories[user], f"user {user} was recommended an item of its history"
    assert (frame.groupby("user_id").size() == 3).all()
    assert frame["title"].str.len().gt(0).all()


def test_default_view_reads_the_whole_history(saved, monkeypatch, tmp_path):
    """The input is the user's history through the test item (the evaluator's test input plus its target)."""
    checkpoint, folder = saved("SASRec")
    monkeypatch.chdir(tmp_path)
    rec = Recommender(checkpoint)
    test = rec.splits["test"]
    uid = int(test.inter_feat[rec.uid_field][0])
    shifted = rec._inputs(np.array([uid]), None)
    before = test.inter_feat[0:1]
    length = int(before["item_length"][0])
    seq = before["item_id_list"][0].tolist()
    expected = (seq[:length] + [int(before["item_id"][0])])[-seq.__len__():]
    got = shifted["item_id_list"][0].tolist()[: int(shifted["item_length"][0])]
    assert got == expected


def test_laser_and_seralm_reuse_the_checkpoint_matrices(saved, monkeypatch, tmp_path):
    from recbole_llm.laser.model import Laser
    from recbole_llm.seralm import knowledge

    laser_ckpt, _ = saved("Laser")
    seralm_ckpt, _ = saved("SASRecSeRALM")
    monkeypatch.chdir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("an LLM pass over the items ran")

    monkeypatch.setattr(Laser, "encode_items", refuse)
    monkeypatch.setattr(knowledge, "knowledge_matrix", refuse)
    assert len(recbole_llm.recommend(laser_ckpt, users="all", topk=2)) > 0
    assert len(recbole_llm.recommend(seralm_ckpt, users="all", topk=2)) > 0


def test_cli_writes_csv_and_jsonl(saved, monkeypatch, tmp_path):
    checkpoint, folder = saved("SASRec")
    monkeypatch.chdir(tmp_path)
    users = sorted(_external_ids(folder, "user_id"))[:2]
    main(["--recommend", f"--checkpoint={checkpoint}", f"--users={','.join(users)}", "--topk=4",
          "--out=recs.csv"])
    with open("recs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["user_id"] for r in rows] == [u for u in users for _ in range(4)]
    assert list(rows[0]) == ["user_id", "rank", "item_id", "title", "score"]
    (tmp_path / "ids.txt").write_text("\n".join(users) + "\n")
    main(["recommend", f"--checkpoint={checkpoint}", "--users_file=ids.txt", "--topk=4", "--split=test",
          "--out=recs.jsonl"])
    lines = [json.loads(line) for line in open("recs.jsonl")]
    assert len(lines) == 8 and lines[0]["rank"] == 1


def test_unknown_users_are_listed_and_nothing_is_written(saved, monkeypatch, tmp_path, capsys):
    checkpoint, folder = saved("SASRec")
    monkeypatch.chdir(tmp_path)
    known = sorted(_external_ids(folder, "user_id"))[0]
    with pytest.raises(SystemExit, match="nobody.*ghost"):
        main(["--recommend", f"--checkpoint={checkpoint}", f"--users={known},nobody,ghost", "--out=recs.csv"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith("recs")]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="nobody"):
        main(["--recommend", f"--checkpoint={checkpoint}", f"--users={known},nobody"])  # CSV on stdout
    assert capsys.readouterr().out == ""
    with pytest.raises(UnknownUsersError, match="2 not in dataset"):
        recbole_llm.recommend(checkpoint, users=[known, "nobody", "ghost"])
    frame = recbole_llm.recommend(checkpoint, users=[known, "nobody"], topk=2, skip_unknown=True)
    assert set(frame["user_id"]) == {known}
    with pytest.raises(SystemExit, match=r"\.csv or \.jsonl"):
        main(["--recommend", f"--checkpoint={checkpoint}", "--out=recs.txt"])


def test_changed_data_is_refused(saved, monkeypatch, tmp_path):
    checkpoint, folder = saved("SASRec")
    monkeypatch.chdir(tmp_path)
    state = torch.load(checkpoint, weights_only=False)
    state["data_digest"] = "0" * 16
    changed = str(tmp_path / "changed.pth")
    torch.save(state, changed)
    with pytest.raises(ChangedDataError, match="trained on other data"):
        Recommender(changed)
    with pytest.raises(SystemExit, match="trained on other data"):
        main(["--recommend", f"--checkpoint={changed}", "--out=recs.csv"])
    assert not os.path.exists(tmp_path / "recs.csv")

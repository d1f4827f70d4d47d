"""Converters to RecBole atomic files: Scientific JSON pair, Amazon 2018 raw files, fetch, missing data."""

import filecmp
import gzip
import json
import os

import pytest

from tests.helpers_data import (BUNDLED_SCIENTIFIC, REPO_DIR, SHARED_SCIENTIFIC, TINY_SCIENTIFIC_INTER,
                          TINY_SCIENTIFIC_ITEMS, bundled, load_dataset, read_scientific_json, write_amazon_raw,
                          write_tiny_scientific)
from recbole_llm.datasets import amazon2018, scientific
from recbole_llm.datasets.atomic import write_atomic
from recbole_llm.llm.item_text import item_attributes


def _histories(dataset):
    """{user token: [item tokens in time order]} from a loaded RecBole dataset."""
    inter = dataset.inter_feat
    users = dataset.id2token(dataset.uid_field, inter[dataset.uid_field].to_numpy().astype(int))
    items = dataset.id2token(dataset.iid_field, inter[dataset.iid_field].to_numpy().astype(int))
    times = inter[dataset.time_field].to_numpy()
    rows = sorted(zip(users, times, range(len(times)), items))
    histories = {}
    for user, _, _, item in rows:
        histories.setdefault(str(user), []).append(str(item))
    return histories


def _expected_attrs(meta):
    """What the .item file must give back for one JSON item (empty / pandas-NA strings are missing)."""
    expected = {"title": meta["title"]}
    if meta["brand"] and meta["brand"] != "N/A":
        expected["brand"] = meta["brand"]
    if meta["categories"]:
        expected["categories"] = meta["categories"].split(",")
    if meta["description"]:
        expected["description"] = meta["description"]
    return expected


# ---------------------------------------------------------------- Scientific JSON pair

# Bare carriage returns (found by review: csv's minimal quoting left a lone CR unquoted and the .item file
# then failed RecBole's reader) in a title, a brand and a description, plus a CRLF.
CR_ITEMS = {"2": {"title": "Item 2\rwith CR", "brand": "Hy\rdrion", "categories": "Lab",
                  "description": "ends with CR\r"},
            "4": {"title": "Gloves\r\n(M)", "brand": "N/A", "categories": "Safety", "description": "\rstarts"}}


@pytest.mark.parametrize("extra_items", [{}, CR_ITEMS], ids=["tabs-newlines-quotes", "carriage-returns"])
def test_scientific_converter_round_trips_tricky_text(tmp_path, extra_items):
    src, out = tmp_path / "src", tmp_path / "out"
    write_tiny_scientific(src)
    items = dict(TINY_SCIENTIFIC_ITEMS, **extra_items)
    (src / "Scientific.item.json").write_text(json.dumps(items), encoding="utf-8")
    counts = scientific.main(["--src", str(src), "--out", str(out)])
    assert counts == {"users": 5, "items": 5, "interactions": 25}
    assert (out / "amazon-scientific" / "LICENSE").read_text().startswith("MIT")
    assert not [p for p in os.listdir(out / "amazon-scientific") if p.endswith(".tmp")]

    _, dataset = load_dataset("amazon-scientific", data_path=out)
    assert _histories(dataset) == {u: [str(i) for i in seq] for u, seq in TINY_SCIENTIFIC_INTER.items()}
    attrs = item_attributes(dataset)
    assert attrs[0] == {}
    for token, meta in items.items():
        got = attrs[dataset.token2id(dataset.iid_field, token)]
        assert got == _expected_attrs(meta), token


def test_scientific_converter_rejects_unknown_items(tmp_path):
    src = tmp_path / "src"
    write_tiny_scientific(src)
    (src / "Scientific.inter.json").write_text(json.dumps({"0": [0, 1, 99]}))
    with pytest.raises(ValueError, match="missing from Scientific.item.json"):
        scientific.convert(str(src), str(tmp_path / "out"))


def test_atomic_writer_refuses_separator_inside_a_list_element(tmp_path):
    with pytest.raises(ValueError, match="seq_separator"):
        write_atomic(str(tmp_path / "x.item"), [("item_id", "token"), ("categories", "token_seq")],
                     [("1", ["a|b"])])
    assert os.listdir(tmp_path) == []  # nothing half-written


@pytest.mark.skipif(not os.path.isdir(SHARED_SCIENTIFIC), reason="shared Scientific JSON not present")
def test_bundled_scientific_matches_the_shared_json(tmp_path):
    # The committed files are exactly what the converter makes from the shared JSON.
    counts = scientific.convert(SHARED_SCIENTIFIC, str(tmp_path))
    assert counts == {"users": 8317, "items": 4344, "interactions": 58492}
    for name in ("amazon-scientific.inter", "amazon-scientific.item", "LICENSE"):
        assert filecmp.cmp(tmp_path / "amazon-scientific" / name, os.path.join(BUNDLED_SCIENTIFIC, name),
                           shallow=False), name

    # And RecBole loads them back to the same histories and the same text, item for item.
    inter, items = read_scientific_json()
    _, dataset = bundled("amazon-scientific")
    assert dataset.user_num - 1 == 8317 and dataset.item_num - 1 == 4344 and dataset.inter_num == 58492
    assert _histories(dataset) == {u: [str(i) for i in seq] for u, seq in inter.items()}
    attrs = item_attributes(dataset)
    mismatched = [t for t, meta in items.items()
                  if attrs[dataset.token2id(dataset.iid_field, t)] != _expected_attrs(meta)]
    assert mismatched == []


# ---------------------------------------------------------------- Amazon 2018 raw files

def test_amazon2018_convert_filters_sorts_and_loads(tmp_path):
    reviews, meta = write_amazon_raw(tmp_path / "raw")
    out = tmp_path / "dataset"
    counts = amazon2018.main(["convert", f"--reviews={reviews}", f"--meta={meta}", "--name=amazon-pet",
                              f"--out={out}"])
    # NOTITLE dropped -> U6 below 5 -> I6 below 5 on the next pass; the repeated (U1, I1) dropped.
    assert counts == {"users": 5, "items": 5, "interactions": 25}

    lines = (out / "amazon-pet" / "amazon-pet.inter").read_text().splitlines()
    assert lines[0] == "user_id:token\titem_id:token\ttimestamp:float"
    rows = [line.split("\t") for line in lines[1:]]
    times = [int(r[2]) for r in rows]
    assert times == sorted(times)
    assert {r[0] for r in rows} == {f"U{u}" for u in range(1, 6)}
    assert {r[1] for r in rows} == {f"I{i}" for i in range(1, 6)}
    u1 = [r for r in rows if r[0] == "U1"]
    assert [r[1] for r in u1] == ["I5", "I4", "I3", "I2", "I1"]  # time order, not file order
    assert int([r for r in u1 if r[1] == "I1"][0][2]) < 1_500_000_000 + 9999  # earliest review kept

    config, dataset = load_dataset("amazon-pet", data_path=out)
    assert dataset.item_num - 1 == 5 and dataset.inter_num == 25
    from recbole.data import data_preparation

    train, valid, test = data_preparation(config, dataset)  # leave-one-out split works on the output
    assert len(test.dataset) == 5
    attrs = item_attributes(dataset)
    by_asin = {dataset.id2token(dataset.iid_field, i): a for i, a in enumerate(attrs) if i}
    assert by_asin["I1"] == {"title": "Kaytee Aspen Bedding Bag", "brand": "Kaytee",
                             "categories": ["Pet Supplies", "Small Animals", "Bedding"], "description": "Soft."}
    # HTML cleaned minimally; missing brand omitted; "|" kept out of category names; description joined.
    assert by_asin["I2"] == {"title": "Chew & Play Toy", "categories": ["Pet Supplies", "Birds & Co", "A/B"],
                             "description": "Fun Safe."}
    assert by_asin["I3"]["title"] == "Hamster's Wheel"  # the Python-literal metadata line
    assert "categories" not in by_asin["I4"] and "description" not in by_asin["I5"]


def test_amazon2018_reads_plain_json_lines_and_reports_bad_lines(tmp_path):
    plain = tmp_path / "meta.json"
    plain.write_text('{"asin": "A", "title": "T"}\n\nnot a record\n')
    records = amazon2018.read_records(str(plain))
    assert next(records) == {"asin": "A", "title": "T"}
    with pytest.raises(ValueError, match=r"meta.json:3"):
        next(records)
    with pytest.raises(FileNotFoundError, match="nothere.json.gz"):
        next(amazon2018.read_records(str(tmp_path / "nothere.json.gz")))


def test_amazon2018_fetch_downloads_to_raw_then_converts(tmp_path, monkeypatch):
    source = tmp_path / "server"
    reviews, meta = write_amazon_raw(source)
    calls = []

    def fake_download(url, dest):
        calls.append(url)
        name = os.path.basename(url)
        with open(os.path.join(source, name), "rb") as f, open(dest, "wb") as g:
            g.write(f.read())

    monkeypatch.setattr(amazon2018, "download", fake_download)
    out = tmp_path / "dataset"
    counts = amazon2018.main(["fetch", "--category=Pet_Supplies", "--name=amazon-pet", f"--out={out}"])
    assert counts["interactions"] == 25
    assert calls == [f"{amazon2018.BASE_URL}/categoryFilesSmall/Pet_Supplies_5.json.gz",
                     f"{amazon2018.BASE_URL}/metaFiles2/meta_Pet_Supplies.json.gz"]
    raw = out / "amazon-pet" / "raw"
    with gzip.open(raw / "Pet_Supplies_5.json.gz", "rt") as f:
        assert json.loads(f.readline())["reviewerID"] == "U1"
    assert (out / "amazon-pet" / "amazon-pet.item").is_file()

    # Files already there are reused, not downloaded again.
    amazon2018.main(["fetch", "--category=Pet_Supplies", "--name=amazon-pet", f"--out={out}"])
    assert len(calls) == 2


def test_amazon2018_fetch_argument_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(amazon2018, "download", lambda url, dest: pytest.fail("must not download"))
    with pytest.raises(ValueError, match="--category"):
        amazon2018.fetch("../Pet Supplies", "amazon-pet", str(tmp_path))
    with pytest.raises(SystemExit):
        amazon2018.parse_args(["fetch", "--name=amazon-pet"])  # --category missing


def test_download_leaves_no_partial_file(tmp_path, monkeypatch):
    import urllib.request

    def broken(url):
        raise OSError("network down")

    monkeypatch.setattr(urllib.request, "urlopen", broken)
    with pytest.raises(OSError, match="network down"):
        amazon2018.download("https://example.invalid/x.gz", str(tmp_path / "x.gz"))
    assert os.listdir(tmp_path) == []


def test_missing_fetchable_dataset_names_the_fetch_command(tmp_path):
    if os.path.isfile(os.path.join(REPO_DIR, "dataset", "amazon-pet", "amazon-pet.inter")):
        pytest.skip("amazon-pet has been fetched into this checkout")
    from recbole_llm.run.quick_start import build_config

    with pytest.raises(FileNotFoundError) as err:
        build_config("SASRec", "amazon-pet", config_dict={"data_path": str(tmp_path)}, cmd_args=[])
    message = str(err.value)
    assert "python -m recbole_llm.datasets.amazon2018 fetch --category=Pet_Supplies --name=amazon-pet --out=dataset" \
        in message
    assert "convert --reviews=" in message


# ---------------------------------------------------------------- dataset YAMLs

@pytest.mark.parametrize("name, users, items", [("amazon-scientific", 8317, 4344), ("ml-100k", 943, 1349)])
def test_dataset_yaml_loads_and_splits_for_sasrec(name, users, items):
    from recbole.data import data_preparation

    config, dataset = bundled(name)
    assert config["MAX_ITEM_LIST_LENGTH"] == 20 and config["valid_metric"] == "NDCG@10"
    assert config["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert config["eval_args"]["mode"] == {"valid": "full", "test": "full"}
    assert config["train_neg_sample_args"]["distribution"] == "none"  # no negative sampling (CE losses)
    assert config["item_text_fields"][0] in dataset.item_feat.columns  # title field loaded
    assert (dataset.user_num - 1, dataset.item_num - 1) == (users, items)
    train, valid, test = data_preparation(config, dataset)
    assert len(test.dataset) == users  # one test target per user (leave-one-out)

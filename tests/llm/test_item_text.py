"""Item text from RecBole item features: exact values, formatting, missing fields, errors, caching."""

import os

import pytest

from recbole_llm.datasets.atomic import write_atomic
from recbole_llm.llm.item_text import (find_title_field, format_item, item_attributes, item_fields,
                                       item_texts)
from tests.helpers_data import (SHARED_SCIENTIFIC, TINY_SCIENTIFIC_ITEMS, bundled, load_dataset,
                                read_scientific_json, write_tiny_scientific)


def _laser_text(meta):
    """The expected Laser-style text of one Scientific JSON item."""
    pairs = []
    if meta["brand"] and meta["brand"] != "N/A":
        pairs.append(f"brand: {meta['brand']}")
    if meta["categories"]:
        pairs.append("category: " + ", ".join(meta["categories"].split(",")))
    return f"{meta['title']} ({', '.join(pairs)})" if pairs else meta["title"]


@pytest.fixture
def tiny_scientific(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_tiny_scientific(src)
    from recbole_llm.datasets import scientific

    scientific.convert(str(src), str(out))
    return out


def _text_of(dataset, texts, token):
    return texts[dataset.token2id(dataset.iid_field, token)]


def test_tiny_scientific_texts_are_exact(tiny_scientific):
    config, dataset = load_dataset("amazon-scientific", data_path=tiny_scientific)
    texts = item_texts(dataset, config)
    assert len(texts) == dataset.item_num and texts[0] == ""
    for token, meta in TINY_SCIENTIFIC_ITEMS.items():
        assert _text_of(dataset, texts, token) == _laser_text(meta)
    # Missing brand ("" and the pandas-NA "N/A") and missing categories are left out, not "[PAD]".
    assert _text_of(dataset, texts, "1") == "Funnel  (double  space) (category: Industrial & Scientific, Lab)"
    assert _text_of(dataset, texts, "2") == "pH Strips; 100/pk (brand: Hydrion)"
    assert _text_of(dataset, texts, "4") == "Gloves (M) (category: Safety, Gloves)"
    assert "[PAD]" not in " ".join(texts)


@pytest.mark.skipif(not os.path.isdir(SHARED_SCIENTIFIC), reason="shared Scientific JSON not present")
def test_bundled_scientific_texts_match_the_json():
    config, dataset = bundled("amazon-scientific")
    _, items = read_scientific_json()
    texts = item_texts(dataset, config)
    no_brand = next(t for t, m in items.items() if not m["brand"])
    no_categories = next(t for t, m in items.items() if not m["categories"])
    for token in ["0", "1", "2", "4343", no_brand, no_categories]:
        assert _text_of(dataset, texts, token) == _laser_text(items[token]), token
    assert _text_of(dataset, texts, "0") == (
        "SUPCO SPP6 Relay/Capacitor Hard Start Kit with 500% Increase Starting Torque. (brand: Sealed Unit Parts "
        "Co., Inc., category: Industrial & Scientific, Industrial Electrical, Passive Components, Capacitors)")
    description = item_attributes(dataset, ["description"])[dataset.token2id(dataset.iid_field, "1")]["description"]
    assert description == items["1"]["description"]


def test_ml100k_titles_year_and_genres():
    config, dataset = bundled("ml-100k")
    assert find_title_field(dataset) == "movie_title"
    texts = item_texts(dataset, config)
    assert _text_of(dataset, texts, "1") == "Toy Story (year: 1995, genre: Animation, Children's, Comedy)"
    attrs = item_attributes(dataset)[dataset.token2id(dataset.iid_field, "1")]
    assert attrs == {"movie_title": ["Toy", "Story"], "release_year": "1995",
                     "class": ["Animation", "Children's", "Comedy"]}
    titles = item_texts(dataset, {"item_text_fields": ["movie_title"]})
    assert _text_of(dataset, titles, "2") == "GoldenEye"


def _write_tinytext(root, with_name=True):
    """A dataset of 5 users x 5 items with float and list item fields and a `name` title field."""
    folder = os.path.join(root, "tinytext")
    write_atomic(os.path.join(folder, "tinytext.inter"),
                 [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")],
                 [(f"u{u}", f"i{i}", float(10 * u + i)) for u in range(5) for i in range(5)])
    rows = [(f"i{i}", f"Item {i}", 1990.0 + i, 2.5 * i, [f"tag{i}", "shared"] if i else []) for i in range(5)]
    fields = [("item_id", "token"), ("name", "token"), ("year", "float"), ("price", "float"), ("tags", "token_seq")]
    write_atomic(os.path.join(folder, "tinytext.item"), fields, rows, seq_separator="|")
    return root


def _tinytext(root, **config):
    config_dict = {"seq_separator": "|", "normalize_all": False,
                   "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                                "item": ["item_id", "name", "year", "price", "tags"]}}
    config_dict.update(config)
    return load_dataset("tinytext", data_path=root, config_dict=config_dict)


def test_floats_lists_and_title_lookup_on_a_generic_dataset(tmp_path):
    config, dataset = _tinytext(_write_tinytext(tmp_path))
    assert find_title_field(dataset) == "name"  # not configured: found among the common names
    attrs = item_attributes(dataset)
    i3 = attrs[dataset.token2id(dataset.iid_field, "i3")]
    assert i3 == {"name": "Item 3", "year": "1993", "price": "7.5", "tags": ["tag3", "shared"]}
    assert "tags" not in attrs[dataset.token2id(dataset.iid_field, "i0")]  # empty list = missing

    # Default fields [title, brand, categories]: none exist here, so the title field alone.
    assert _text_of(dataset, item_texts(dataset, config), "i3") == "Item 3"
    texts = item_texts(dataset, {"item_text_fields": ["name", "year", "tags", "not_there"],
                                 "item_text_display_names": {"tags": "tag"}})
    assert _text_of(dataset, texts, "i3") == "Item 3 (year: 1993, tag: tag3, shared)"
    assert _text_of(dataset, texts, "i0") == "Item 0 (year: 1990)"

    with pytest.raises(ValueError, match=r"not_there.*loaded item fields"):
        item_attributes(dataset, ["name", "not_there"])

    # data_preparation turns item_feat from a DataFrame into an Interaction: same attributes after it.
    from recbole.data import data_preparation

    data_preparation(config, dataset)
    assert type(dataset.item_feat).__name__ == "Interaction"
    assert item_attributes(dataset) == attrs


def test_max_chars_and_cache(tmp_path):
    _, dataset = _tinytext(_write_tinytext(tmp_path))
    full = {"item_text_fields": ["name", "year", "price"]}
    first = item_texts(dataset, full)
    assert item_texts(dataset, full) is first  # cached per dataset and settings
    short = item_texts(dataset, dict(full, item_text_max_chars=6))
    assert short is not first
    assert [len(t) for t in short[1:]] == [6] * 5 and short[1] == first[1][:6]
    with pytest.raises(ValueError, match="item_text_max_chars"):
        item_texts(dataset, dict(full, item_text_max_chars=0))


def test_no_title_like_field_is_a_clear_error(tmp_path):
    root = _write_tinytext(tmp_path)
    _, dataset = _tinytext(root, load_col={"inter": ["user_id", "item_id", "timestamp"],
                                           "item": ["item_id", "year", "price"]})
    assert item_fields(dataset) == ["year", "price"]
    with pytest.raises(ValueError, match=r"no title-like item field.*\['year', 'price'\]"):
        find_title_field(dataset)
    with pytest.raises(ValueError, match="no title-like"):
        item_texts(dataset, {})
    # Without any .item fields loaded the message says so.
    _, bare = _tinytext(root, load_col={"inter": ["user_id", "item_id", "timestamp"]})
    with pytest.raises(ValueError, match=r"\.item file"):
        find_title_field(bare)


def test_format_item():
    attrs = {"title": "Kaytee Aspen Bedding Bag", "brand": "Kaytee", "categories": ["Small Animals", "Bedding"]}
    fields = ["title", "brand", "categories"]
    assert format_item(attrs, fields) == "Kaytee Aspen Bedding Bag (brand: Kaytee, category: Small Animals, Bedding)"
    assert format_item(attrs, fields, style="title") == "Kaytee Aspen Bedding Bag"
    assert format_item(attrs, fields, display_names={"categories": "type"}) == \
        "Kaytee Aspen Bedding Bag (brand: Kaytee, type: Small Animals, Bedding)"
    assert format_item({"title": "Hay"}, fields) == "Hay"
    assert format_item({"movie_title": ["Toy", "Story"]}, ["movie_title"]) == "Toy Story"
    with pytest.raises(ValueError, match="style"):
        format_item(attrs, fields, style="fancy")

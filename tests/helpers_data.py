"""Shared helpers for the data tests: tiny raw files in the real formats, and RecBole loading."""

import functools
import gzip
import json
import os
import warnings

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CI keeps the shared data beside the clone (<repo>/../shared); so does the development machine.
SHARED_SCIENTIFIC = os.path.join(os.path.dirname(REPO_DIR), "shared", "data", "amazon-scientific-2018")
BUNDLED_SCIENTIFIC = os.path.join(REPO_DIR, "dataset", "amazon-scientific")
# the .inter columns of the tiny datasets the Laser, SeRALM and alignment helpers write
INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]


def load_dataset(name, data_path=None, config_dict=None):
    """(config, dataset) for ``name`` built like the CLI does (dataset YAML auto-loaded), model SASRec."""
    from recbole.data import create_dataset

    from recbole_llm.run.quick_start import build_config

    config_dict = dict(config_dict or {})
    if data_path is not None:
        config_dict["data_path"] = str(data_path)
    config_dict.setdefault("show_progress", False)
    config = build_config("SASRec", name, config_dict=config_dict, cmd_args=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RecBole's pandas FutureWarnings
        dataset = create_dataset(config)
    return config, dataset


@functools.lru_cache(maxsize=None)
def bundled(name):
    """The bundled/built-in dataset ``name`` (amazon-scientific, ml-100k), loaded once per test session."""
    return load_dataset(name)


def read_scientific_json(src=SHARED_SCIENTIFIC):
    with open(os.path.join(src, "Scientific.inter.json"), encoding="utf-8") as f:
        inter = json.load(f)
    with open(os.path.join(src, "Scientific.item.json"), encoding="utf-8") as f:
        items = json.load(f)
    return inter, items


# Text chosen to break naive writers: a leading quote, a tab, a trailing space, a newline, CSV-ish commas.
TINY_SCIENTIFIC_ITEMS = {
    "0": {"title": '"Quoted" Beaker, 250ml.', "brand": "Pyrex", "categories": "Industrial & Scientific,Lab,Beakers",
          "description": "Glass.\tHeat resistant. "},
    "1": {"title": "Funnel  (double  space)", "brand": "", "categories": "Industrial & Scientific,Lab",
          "description": "Line one\nline two"},
    "2": {"title": "pH Strips; 100/pk", "brand": "Hydrion", "categories": "", "description": ""},
    "3": {"title": "Caliper 6\" \u00b10.02mm", "brand": "iGaging", "categories": "Measurement",
          "description": "Stainless \u2013 digital."},
    "4": {"title": "Gloves (M)", "brand": "N/A", "categories": "Safety,Gloves", "description": "Nitrile"},
}
TINY_SCIENTIFIC_INTER = {
    "0": [0, 1, 2, 3, 4],
    "1": [4, 3, 2, 1, 0],
    "2": [2, 0, 4, 1, 3],
    "3": [1, 2, 3, 4, 0],
    "4": [3, 4, 0, 2, 1],
}


def write_tiny_scientific(src):
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "Scientific.inter.json"), "w", encoding="utf-8") as f:
        json.dump(TINY_SCIENTIFIC_INTER, f)
    with open(os.path.join(src, "Scientific.item.json"), "w", encoding="utf-8") as f:
        json.dump(TINY_SCIENTIFIC_ITEMS, f)
    with open(os.path.join(src, "LICENSE"), "w") as f:
        f.write("MIT License (test copy)\n")


def _review(user, item, time):
    return {"overall": 5.0, "verified": True, "reviewTime": "01 1, 2015", "reviewerID": user, "asin": item,
            "reviewerName": "x", "reviewText": "ok", "summary": "ok", "unixReviewTime": time}


def tiny_amazon_reviews():
    """Reviews in the 2018 format: a stable 5-core U1..U5 x I1..I5, plus records that filtering must drop.

    - U6 reviews I1, I2, I3, I6 and NOTITLE: NOTITLE has no title, so U6 falls to 4 and goes; then I6
      (reviewed by U1..U4 and U6) falls to 4 and goes in the next pass.
    - U1 reviews I1 a second time, later: the repeat is dropped.
    Times are shuffled against file order so sorting matters.
    """
    reviews = []
    time = 1_500_000_000
    for u in range(1, 6):
        for i in range(5, 0, -1):  # written newest-last in reverse item order, times decreasing per user
            reviews.append(_review(f"U{u}", f"I{i}", time + 1000 * u + 100 * (6 - i)))
    for u in range(1, 5):
        reviews.append(_review(f"U{u}", "I6", time + 1000 * u + 900))
    for j, item in enumerate(["I1", "I2", "I3", "I6", "NOTITLE"]):
        reviews.append(_review("U6", item, time + 7000 + j))
    reviews.append(_review("U1", "I1", time + 9999))
    return reviews


def tiny_amazon_meta_lines():
    """Metadata lines in the 2018 format; I3's is a Python dict literal as in some metadata dumps."""
    def meta(asin, title, brand="Kaytee", category=("Pet Supplies", "Small Animals"), description=("Soft.",)):
        return {"category": list(category), "tech1": "", "description": list(description), "fit": "",
                "title": title, "also_buy": [], "brand": brand, "feature": [], "asin": asin}

    lines = [
        json.dumps(meta("I1", "Kaytee Aspen Bedding Bag", category=["Pet Supplies", "Small Animals", "Bedding"])),
        json.dumps(meta("I2", "<span class=\"a\">Chew</span> &amp; Play   Toy\n", brand="",
                        category=["Pet Supplies", "Birds &amp; Co", "A|B"], description=["<p>Fun</p>", "", "Safe."])),
        repr(meta("I3", "Hamster's Wheel", brand="Ware")),
        json.dumps(meta("I4", "Water Bottle", category=[])),
        json.dumps(meta("I5", "Hay", description=[])),
        json.dumps(meta("I6", "Tunnel")),
        json.dumps(meta("NOTITLE", "")),
        json.dumps(meta("I1", "Duplicate record of I1, ignored")),
        "",
    ]
    return lines


def write_amazon_raw(folder, category="Pet_Supplies"):
    """Write ``<Category>_5.json.gz`` and ``meta_<Category>.json.gz`` into ``folder``; return their paths."""
    os.makedirs(folder, exist_ok=True)
    reviews = os.path.join(folder, f"{category}_5.json.gz")
    meta = os.path.join(folder, f"meta_{category}.json.gz")
    with gzip.open(reviews, "wt", encoding="utf-8") as f:
        for record in tiny_amazon_reviews():
            f.write(json.dumps(record) + "\n")
    with gzip.open(meta, "wt", encoding="utf-8") as f:
        for line in tiny_amazon_meta_lines():
            f.write(line + "\n")
    return reviews, meta

"""Convert the preprocessed Amazon 2018 "Scientific" JSON pair to RecBole atomic files.

Input (``--src``): ``Scientific.inter.json`` ({user: [item, ...]} in chronological order) and
``Scientific.item.json`` ({item: {title, brand, categories, description}}), as published in
Nishikata97/CollisionGenRec (data/Scientific/), plus its LICENSE.

Output (``--out``/amazon-scientific/):

- ``amazon-scientific.inter``: ``user_id:token  item_id:token  timestamp:float``. The JSON keeps only the
  order of each history, so ``timestamp`` is the position in the user's sequence (0, 1, ...); RecBole's
  time ordering then reproduces that order exactly.
- ``amazon-scientific.item``: ``item_id:token  title:token  brand:token  categories:token_seq
  description:token``. Each text field is one whole ``token``, so ``dataset.id2token`` gives back the
  exact string (casing, punctuation, spacing). ``categories`` is the JSON's comma-joined string split on
  "," into a list, written with ``seq_separator`` "|" (never present in a category), so categories stay
  apart and ``",".join`` of the list gives the JSON string back. Empty strings (no brand, no categories, no
  description) are written as missing values.

Run: ``python -m recbole_llm.datasets.scientific --src /path/to/amazon-scientific-2018 --out dataset``
"""

import argparse
import json
import os

from recbole_llm.datasets.atomic import TEXT_SEQ_SEPARATOR, copy_file_atomic, write_atomic

DATASET_NAME = "amazon-scientific"
INTER_JSON = "Scientific.inter.json"
ITEM_JSON = "Scientific.item.json"
CATEGORY_JOINER = ","  # how the JSON joins an item's categories into one string

INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]
ITEM_FIELDS = [("item_id", "token"), ("title", "token"), ("brand", "token"), ("categories", "token_seq"),
               ("description", "token")]
TEXT_KEYS = ("title", "brand", "categories", "description")


def _load_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected the Scientific JSON file '{path}'")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _id_order(key):
    """Numeric keys in numeric order, anything else after them in string order."""
    key = str(key)
    return (0, int(key), "") if key.isdigit() else (1, 0, key)


def split_categories(text):
    """The JSON's comma-joined category string as a list of category names (empty pieces dropped)."""
    return [part for part in (text or "").split(CATEGORY_JOINER) if part]


def inter_rows(sequences):
    """(user, item, position) rows, users in id order, each history in its given order."""
    for user in sorted(sequences, key=_id_order):
        history = sequences[user]
        if not isinstance(history, list):
            raise ValueError(f"{INTER_JSON}: user {user!r} should map to a list of items, got {type(history).__name__}")
        for position, item in enumerate(history):
            yield str(user), str(item), float(position)


def item_rows(items):
    for item in sorted(items, key=_id_order):
        meta = items[item]
        if not isinstance(meta, dict):
            raise ValueError(f"{ITEM_JSON}: item {item!r} should map to an object, got {type(meta).__name__}")
        if not meta.get("title"):
            raise ValueError(f"{ITEM_JSON}: item {item!r} has no title")
        yield (str(item), meta["title"], meta.get("brand") or None, split_categories(meta.get("categories")),
               meta.get("description") or None)


def convert(src, out, name=DATASET_NAME):
    """Write ``<out>/<name>/<name>.inter`` and ``.item`` from the JSON pair in ``src``; return counts."""
    sequences = _load_json(os.path.join(src, INTER_JSON))
    items = _load_json(os.path.join(src, ITEM_JSON))
    unknown = sorted({str(i) for seq in sequences.values() for i in seq} - {str(i) for i in items}, key=_id_order)
    if unknown:
        raise ValueError(f"{INTER_JSON} uses {len(unknown)} items missing from {ITEM_JSON}, e.g. {unknown[:5]}")

    target = os.path.join(out, name)
    n_inter = write_atomic(os.path.join(target, f"{name}.inter"), INTER_FIELDS, inter_rows(sequences))
    n_items = write_atomic(os.path.join(target, f"{name}.item"), ITEM_FIELDS, item_rows(items),
                           seq_separator=TEXT_SEQ_SEPARATOR)
    license_path = os.path.join(src, "LICENSE")
    if os.path.isfile(license_path):
        copy_file_atomic(license_path, os.path.join(target, "LICENSE"))
    return {"users": len(sequences), "items": n_items, "interactions": n_inter}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert the Amazon 2018 Scientific JSON pair to RecBole atomic files.")
    parser.add_argument("--src", required=True, help=f"folder holding {INTER_JSON} and {ITEM_JSON}")
    parser.add_argument("--out", default="dataset", help="output root; files go to <out>/<name>/")
    parser.add_argument("--name", default=DATASET_NAME, help="dataset name (file prefix)")
    args = parser.parse_args(argv)
    counts = convert(args.src, args.out, args.name)
    print(f"{args.name}: {counts['users']:,} users, {counts['items']:,} items, "
          f"{counts['interactions']:,} interactions -> {os.path.join(args.out, args.name)}")
    return counts


if __name__ == "__main__":
    main()

"""Amazon Review Data 2018 (Ni, Li, McAuley, EMNLP 2019) raw files of one category -> RecBole atomic files.

Inputs: the category's 5-core reviews (``<Category>_5.json.gz``: reviewerID, asin, unixReviewTime, ...) and
its metadata (``meta_<Category>.json.gz``: asin, title, brand, category (list), description (list), ...).
Both are JSON lines, gzipped or not; lines that are Python dict literals (as in some metadata dumps) are
read with ``ast.literal_eval``.

Processing, as in the papers' preprocessing:

1. metadata: keep items with a title after cleaning; the first record of a repeated asin wins;
2. reviews: keep those of kept items; sort by time (stable, so ties keep file order); drop repeated
   (user, item) pairs, keeping the earliest;
3. repeat 5-core filtering (users and items with >= ``k`` interactions) until nothing changes.

Text cleaning (titles, brands, categories, description pieces), deliberately minimal: HTML entities
unescaped (``&amp;`` -> ``&``), HTML tags removed, runs of whitespace (tabs, newlines) made one space,
ends stripped. "|" inside a category name becomes "/" since "|" separates categories in the ``.item`` file.
The description list is joined with single spaces.

Output (``<out>/<name>/``): ``<name>.inter`` (user_id:token, item_id:token = asin, timestamp:float =
unixReviewTime) in time order, and ``<name>.item`` (item_id, title, brand, description as ``token``,
categories as ``token_seq`` separated by "|"), the same format as the bundled amazon-scientific.

CLI::

    python -m recbole_llm.datasets.amazon2018 fetch --category=Pet_Supplies --name=amazon-pet --out=dataset
    python -m recbole_llm.datasets.amazon2018 convert --reviews=Pet_Supplies_5.json.gz \
        --meta=meta_Pet_Supplies.json.gz --name=amazon-pet --out=dataset
"""

import argparse
import ast
import gzip
import html
import json
import os
import re
import urllib.request
from collections import Counter

from tqdm import tqdm

from recbole_llm.core.fileio import atomic_path
from recbole_llm.datasets.atomic import TEXT_SEQ_SEPARATOR, write_atomic

BASE_URL = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_v2"
REVIEWS_URL = BASE_URL + "/categoryFilesSmall/{category}_5.json.gz"
META_URL = BASE_URL + "/metaFiles2/meta_{category}.json.gz"

INTER_FIELDS = [("user_id", "token"), ("item_id", "token"), ("timestamp", "float")]
ITEM_FIELDS = [("item_id", "token"), ("title", "token"), ("brand", "token"), ("categories", "token_seq"),
               ("description", "token")]

_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
_CATEGORY_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def clean_text(value):
    """Unescape HTML entities, drop HTML tags, collapse whitespace; "" for None."""
    if value is None:
        return ""
    text = html.unescape(str(value))
    text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def _open_text(path):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def read_records(path, desc=None):
    """Yield one dict per non-empty line of a JSON-lines file (gzipped or not; Python literals accepted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected an Amazon 2018 JSON-lines file at '{path}'")
    with _open_text(path) as f:
        for number, line in enumerate(tqdm(f, desc=desc or os.path.basename(path), unit=" lines",
                                           mininterval=2.0), start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError) as err:
                    raise ValueError(f"{path}:{number}: neither JSON nor a Python literal ({err})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected an object, got {type(record).__name__}")
            yield record


def _as_list(value):
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def item_from_meta(record):
    """(asin, title, brand, categories, description) of one metadata record, or None without a title."""
    asin = record.get("asin")
    title = clean_text(record.get("title"))
    if not asin or not title:
        return None
    categories = []
    for name in _as_list(record.get("category")):
        name = clean_text(name).replace(TEXT_SEQ_SEPARATOR, "/")
        if name:
            categories.append(name)
    description = " ".join(p for p in (clean_text(d) for d in _as_list(record.get("description"))) if p)
    return str(asin), title, clean_text(record.get("brand")) or None, categories, description or None


def load_items(meta_path):
    """{asin: item row} for metadata records with a title (first record of an asin wins)."""
    items = {}
    for record in read_records(meta_path, desc="metadata"):
        row = item_from_meta(record)
        if row is not None and row[0] not in items:
            items[row[0]] = row
    return items


def load_interactions(reviews_path, keep_items):
    """Time-sorted, de-duplicated (user, item, time) triples of reviews of ``keep_items``."""
    triples = []
    for record in read_records(reviews_path, desc="reviews"):
        user, item, time = record.get("reviewerID"), record.get("asin"), record.get("unixReviewTime")
        if user is None or item is None or time is None or str(item) not in keep_items:
            continue
        triples.append((str(user), str(item), int(time)))
    triples.sort(key=lambda t: t[2])  # stable: equal times keep file order
    seen, unique = set(), []
    for user, item, time in triples:
        if (user, item) not in seen:
            seen.add((user, item))
            unique.append((user, item, time))
    return unique


def k_core(triples, k=5):
    """Drop users and items with fewer than ``k`` interactions, repeatedly, until none is left to drop."""
    while True:
        users = Counter(t[0] for t in triples)
        items = Counter(t[1] for t in triples)
        kept = [t for t in triples if users[t[0]] >= k and items[t[1]] >= k]
        if len(kept) == len(triples):
            return kept
        triples = kept


def convert(reviews, meta, name, out="dataset", k=5):
    """Write ``<out>/<name>/<name>.inter`` and ``.item``; return counts."""
    items = load_items(meta)
    triples = k_core(load_interactions(reviews, items), k)
    if not triples:
        raise ValueError(f"no interactions left after keeping titled items and {k}-core filtering "
                         f"(reviews '{reviews}', metadata '{meta}'): are they the same category?")
    kept_items = sorted({t[1] for t in triples})
    target = os.path.join(out, name)
    write_atomic(os.path.join(target, f"{name}.inter"), INTER_FIELDS,
                 ((u, i, float(t)) for u, i, t in triples))
    write_atomic(os.path.join(target, f"{name}.item"), ITEM_FIELDS, (items[i] for i in kept_items),
                 seq_separator=TEXT_SEQ_SEPARATOR)
    return {"users": len({t[0] for t in triples}), "items": len(kept_items), "interactions": len(triples)}


def download(url, dest):
    """Download ``url`` to ``dest`` with a progress bar, through a temporary file renamed at the end."""
    with atomic_path(dest, suffix=".part") as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest)) as bar:
                while True:
                    chunk = response.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))


def raw_paths(category, raw_dir):
    return (os.path.join(raw_dir, f"{category}_5.json.gz"), os.path.join(raw_dir, f"meta_{category}.json.gz"))


def fetch(category, name, out="dataset", raw_dir=None, k=5):
    """Download the category's two raw files (kept under ``<out>/<name>/raw`` unless ``raw_dir``; files
    already there are reused) and convert them."""
    if not _CATEGORY_NAME.match(category or ""):
        raise ValueError(f"--category must be an Amazon 2018 file name such as Pet_Supplies or "
                         f"Arts_Crafts_and_Sewing, got {category!r}")
    raw_dir = raw_dir or os.path.join(out, name, "raw")
    reviews, meta = raw_paths(category, raw_dir)
    os.makedirs(raw_dir, exist_ok=True)
    for url, path in ((REVIEWS_URL.format(category=category), reviews), (META_URL.format(category=category), meta)):
        if not os.path.isfile(path):
            download(url, path)
    return convert(reviews, meta, name, out, k)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Amazon Review Data 2018 -> RecBole atomic files.")
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="convert downloaded raw files")
    conv.add_argument("--reviews", required=True, help="<Category>_5.json(.gz): 5-core reviews, JSON lines")
    conv.add_argument("--meta", required=True, help="meta_<Category>.json(.gz): item metadata, JSON lines")
    fet = sub.add_parser("fetch", help="download a category's raw files, then convert them")
    fet.add_argument("--category", required=True, help="e.g. Pet_Supplies, Arts_Crafts_and_Sewing")
    fet.add_argument("--raw_dir", default=None, help="where the raw files go (default <out>/<name>/raw)")
    for p in (conv, fet):
        p.add_argument("--name", required=True, help="dataset name, e.g. amazon-pet")
        p.add_argument("--out", default="dataset", help="output root; files go to <out>/<name>/")
        p.add_argument("--k", type=int, default=5, help="k of the k-core filter (default 5)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.command == "convert":
        counts = convert(args.reviews, args.meta, args.name, args.out, args.k)
    else:
        counts = fetch(args.category, args.name, args.out, args.raw_dir, args.k)
    print(f"{args.name}: {counts['users']:,} users, {counts['items']:,} items, "
          f"{counts['interactions']:,} interactions -> {os.path.join(args.out, args.name)}")
    return counts


if __name__ == "__main__":
    main()

"""Item text from RecBole item features, for any dataset whose ``.item`` file has a title-like field.

The text follows Laser's template (paper 3.1.1): the title, then the other configured fields as
``name: value`` pairs in parentheses, e.g.
``"Kaytee Aspen Bedding Bag (brand: Kaytee, category: Small Animals, Bedding)"``.

Config keys (dataset YAMLs under ``properties/dataset`` set them):

- ``item_text_fields``: item fields making the text, title first (fields the dataset lacks are skipped, except
  the title; absent from the config: the title alone). Its default for every model that reads item text is in
  ``llm/LLM.yaml``.
- ``item_text_max_chars``: cut each item's text to this many characters (``~``: no limit).
- ``item_text_display_names``: ``{field: name shown in the text}``, merged over ``DISPLAY_NAMES`` (``~``: none).

Values come back as stored (see ``recbole_llm.datasets.atomic``): ``token`` fields as the exact string,
``token_seq`` fields as a list of strings, floats without a spurious ``.0``. A title stored as ``token_seq``
(RecBole's ml-100k splits titles on spaces) is joined with spaces; other lists with ", ".
"""

import weakref

from recbole.utils import FeatureType

from recbole_llm.core.config import config_get

TITLE_FIELD_NAMES = ("title", "movie_title", "name", "item_name")
# Names shown in the text for fields whose column name reads badly; "category" as in the Laser paper.
DISPLAY_NAMES = {"categories": "category", "category": "category", "class": "genre", "release_year": "year",
                 "movie_title": "title"}
STYLES = ("laser", "title")

_CACHE = weakref.WeakKeyDictionary()


def item_fields(dataset):
    """Item feature fields of ``dataset`` (without the item id), in file order."""
    if dataset.item_feat is None:
        return []
    return [field for field in dataset.item_feat.columns if field != dataset.iid_field]


def pick_title_field(present, configured):
    """(title field or None, the names looked for): ``configured[0]`` (``item_text_fields``) when present,
    else the first common title name present."""
    expected = ([configured[0]] if configured else []) + list(TITLE_FIELD_NAMES)
    return next((name for name in expected if name in present), None), expected


def find_title_field(dataset):
    """The field holding item titles: ``item_text_fields[0]`` when configured and present, else a common name."""
    present = item_fields(dataset)
    title, expected = pick_title_field(present, config_get(dataset.config, "item_text_fields"))
    if title:
        return title
    raise ValueError(
        f"dataset '{dataset.dataset_name}' has no title-like item field (looked for {expected}); item fields "
        f"loaded: {present or 'none (is there a .item file, and is it in load_col?)'}. Set item_text_fields "
        f"with the title field first."
    )


def _display_float(value):
    """A float as an item text shows it: short (%g), not lossless (the atomic writer's job)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"


def item_attributes(dataset, fields=None):
    """Decoded item features, one dict per internal item id (index 0, the padding item, is ``{}``).

    Args:
        dataset: a RecBole Dataset after ``create_dataset`` (its ``item_feat`` is indexed by item id).
        fields (list[str] | None): fields to decode; default all item fields. Unknown fields raise ValueError.

    Returns:
        list[dict[str, str | list[str]]]: missing values (padding tokens, empty lists) are left out.
    """
    present = item_fields(dataset)
    fields = present if fields is None else list(fields)
    unknown = [f for f in fields if f not in present]
    if unknown:
        raise ValueError(f"item fields {unknown} are not loaded for dataset '{dataset.dataset_name}'; "
                         f"loaded item fields: {present}")
    attrs = [{} for _ in range(dataset.item_num)]
    if not fields:
        return attrs
    # item_feat is a DataFrame after create_dataset and an Interaction after data_preparation; token columns
    # can be floats (RecBole fills missing tokens after remapping), so every id goes through int().
    feat = dataset.item_feat
    ids = [int(i) for i in feat[dataset.iid_field].tolist()]
    for field in fields:
        ftype = dataset.field2type[field]
        column = feat[field].tolist()
        if ftype in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ):
            id2token = dataset.field2id_token[field]
        for item, value in zip(ids, column):
            if item == 0:
                continue
            if ftype == FeatureType.TOKEN:
                if int(value) != 0:
                    attrs[item][field] = str(id2token[int(value)])
            elif ftype == FeatureType.TOKEN_SEQ:
                tokens = [str(id2token[int(v)]) for v in value if int(v) != 0]
                if tokens:
                    attrs[item][field] = tokens
            elif ftype == FeatureType.FLOAT:
                attrs[item][field] = _display_float(value)
            elif ftype == FeatureType.FLOAT_SEQ:
                values = [_display_float(v) for v in value]
                if values:
                    attrs[item][field] = values
    return attrs


def format_item(attrs, fields, style="laser", display_names=None):
    """One item's text: ``"<title> (name: value, name: value)"`` (``style="laser"``) or the title alone.

    Args:
        attrs (dict): one entry of :func:`item_attributes`.
        fields (list[str]): the title field first, then the fields to show after it (absent ones skipped).
        style (str): "laser" or "title".
        display_names (dict | None): ``{field: shown name}`` over :data:`DISPLAY_NAMES`.
    """
    if style not in STYLES:
        raise ValueError(f"item text style '{style}' is not one of {STYLES}")
    if not fields:
        raise ValueError("format_item needs at least the title field")
    names = dict(DISPLAY_NAMES, **(display_names or {}))
    title = attrs.get(fields[0], "")
    text = " ".join(title) if isinstance(title, list) else title
    if style == "title":
        return text
    pairs = []
    for field in fields[1:]:
        value = attrs.get(field)
        if value is None or value == [] or value == "":
            continue
        value = ", ".join(value) if isinstance(value, list) else value
        pairs.append(f"{names.get(field, field)}: {value}")
    if pairs:
        text = f"{text} ({', '.join(pairs)})" if text else ", ".join(pairs)
    return text


def item_texts(dataset, config, style="laser"):
    """Text of every item, indexed by internal item id (index 0, padding, is ``""``); cached per dataset.

    Uses ``item_text_fields``, ``item_text_max_chars`` and ``item_text_display_names`` from ``config``.
    """
    configured = list(config_get(config, "item_text_fields") or [])
    max_chars = config_get(config, "item_text_max_chars")
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
        raise ValueError(f"item_text_max_chars must be a positive integer or ~, got {max_chars!r}")
    display_names = dict(config_get(config, "item_text_display_names") or {})
    present = item_fields(dataset)
    if not configured or configured[0] not in present:
        title = find_title_field(dataset)
        configured = [title] + [f for f in configured if f != title]
    fields = [f for f in configured if f in present]

    key = (tuple(fields), max_chars, style, tuple(sorted(display_names.items())))
    try:
        per_dataset = _CACHE.setdefault(dataset, {})
    except TypeError:  # not weak-referenceable: no caching
        per_dataset = {}
    if key not in per_dataset:
        attrs = item_attributes(dataset, fields)
        texts = [""] + [format_item(a, fields, style, display_names) for a in attrs[1:]]
        if max_chars is not None:
            texts = [t[:max_chars] for t in texts]
        per_dataset[key] = texts
    return per_dataset[key]

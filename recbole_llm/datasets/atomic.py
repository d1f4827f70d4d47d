"""Writing RecBole atomic files (``.inter``, ``.item``) so that every text value reads back exactly.

RecBole 1.2.1 reads atomic files with ``pandas.read_csv(delimiter=field_separator, engine="python")``,
i.e. with CSV quoting rules. So values are written with Python's ``csv`` module (tab separated, minimal
quoting): a value holding a tab, a line break (LF or a bare CR) or a double quote is written in double quotes
(inner quotes doubled) and comes back unchanged. Two things RecBole's reader does that no writer can avoid:

- strings that pandas reads as missing ("", "NA", "N/A", "null", "None", "nan", ...) become missing values;
  the writer writes them as empty, so a file never claims a value that will not survive loading;
- ``token_seq`` values are split on ``seq_separator`` and empty pieces dropped; the writer refuses elements
  that contain the separator or are empty, so lists come back element for element.

Files are written to a temporary name beside the target and renamed, so a failed run leaves nothing
half-written.
"""

import csv
import io
import math

from recbole_llm.core.fileio import atomic_path

# pandas' default NA strings (pandas.io.parsers: STR_NA_VALUES): RecBole reads these as missing values.
PANDAS_NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")

# Separator for token_seq text fields (categories) in the plugin's Amazon datasets; set as seq_separator in
# their dataset YAMLs. Category names never contain it (checked when writing).
TEXT_SEQ_SEPARATOR = "|"


def is_missing(value):
    """True for None, NaN and strings RecBole would read back as missing."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value in PANDAS_NA_STRINGS


def _lossless_float(value):
    """A float written so that reading it back gives the same float (repr), integers without a decimal point."""
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 2 ** 53 else repr(value)


def _format_value(name, ftype, value, seq_separator):
    if ftype == "token":
        return "" if is_missing(value) else str(value)
    if ftype == "float":
        return "" if is_missing(value) else _lossless_float(value)
    if value is None:
        return ""
    if isinstance(value, str):
        raise TypeError(f"field '{name}' ({ftype}) expects a list of values, got the string {value!r}")
    parts = []
    for element in value:
        if ftype == "float_seq":
            parts.append(_lossless_float(element))
            continue
        element = str(element)
        if is_missing(element):
            raise ValueError(f"field '{name}' (token_seq): element {element!r} would be read back as missing")
        if seq_separator in element:
            raise ValueError(f"field '{name}' (token_seq): element {element!r} contains the seq_separator "
                             f"{seq_separator!r}; choose another separator or clean the data")
        parts.append(element)
    return seq_separator.join(parts)


def write_atomic(path, fields, rows, seq_separator=TEXT_SEQ_SEPARATOR):
    """Write one atomic file.

    Args:
        path (str): target file, e.g. ``dataset/x/x.item``.
        fields (list[tuple[str, str]]): ``(name, type)`` pairs, type one of token, token_seq, float, float_seq.
        rows (iterable): one sequence of values per row, in ``fields`` order; lists for ``*_seq`` fields;
            None (or a string pandas reads as missing) for a missing value.
        seq_separator (str): separator inside sequence fields (the dataset YAML's ``seq_separator``).

    Returns:
        int: number of rows written.
    """
    for name, ftype in fields:
        if ftype not in FIELD_TYPES:
            raise ValueError(f"field '{name}': type '{ftype}' is not one of {FIELD_TYPES}")
        if not name or any(c in name for c in ":\t\n\r\" "):
            raise ValueError(f"field name {name!r} must be non-empty without ':', spaces, tabs, quotes or newlines")
    if not seq_separator or any(c in seq_separator for c in "\t\n\r\""):
        raise ValueError(f"seq_separator {seq_separator!r} must be non-empty without tabs, quotes or newlines")

    count = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            # csv quotes a value holding a character of the line terminator; with "\n" alone a bare "\r" would
            # be written raw and split the row when read back. So each row is formatted with "\r\n" (quoting
            # any value with "\r" or "\n") and written with "\n".
            buffer = io.StringIO()
            writer = csv.writer(buffer, delimiter="\t", quotechar='"', quoting=csv.QUOTE_MINIMAL,
                                lineterminator="\r\n")
            f.write("\t".join(f"{name}:{ftype}" for name, ftype in fields) + "\n")
            for row in rows:
                if len(row) != len(fields):
                    raise ValueError(f"row {count + 1} of '{path}' has {len(row)} values, expected {len(fields)}")
                buffer.seek(0)
                buffer.truncate()
                writer.writerow([_format_value(name, ftype, value, seq_separator)
                                 for (name, ftype), value in zip(fields, row)])
                f.write(buffer.getvalue()[:-2] + "\n")
                count += 1
    return count


def copy_file_atomic(src, dst):
    """Copy ``src`` to ``dst`` through a temporary file and a rename."""
    with atomic_path(dst) as tmp:
        with open(tmp, "wb") as out, open(src, "rb") as inp:
            out.write(inp.read())

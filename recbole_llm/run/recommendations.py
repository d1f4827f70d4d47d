"""Top-K recommendations from a saved checkpoint, with external ids: ``recommend()`` and ``--recommend``.

Two views of a user:

- default (``split=None``): the next items after the user's whole known history (train + valid + test
  interactions as input, the latest ``MAX_ITEM_LIST_LENGTH`` of them); every item the user interacted with is
  left out of the list.
- ``split="test"`` / ``"valid"``: exactly what RecBole's evaluator scores: that split's row of the user (the
  history before its target) as input, and RecBole's mask for sequential models (only the padding item;
  equal to ``recbole.utils.case_study.full_sort_topk``).

The model is rebuilt from the checkpoint's config and weights; what the checkpoint holds is reused: Laser's
item matrix (only its user side runs the LLM), SeRALM's knowledge matrix (read from the checkpoint, never
regenerated). A checkpoint whose dataset files changed since it was saved is refused. Users are scored in
batches and the output file is written in chunks, then renamed into place: nothing is left on error.
"""

import argparse
import csv
import json
import os
import sys
from logging import getLogger

import numpy as np
import pandas as pd
import torch
from recbole.data import create_dataset
from recbole.data import data_preparation as recbole_data_preparation
from recbole.data.interaction import Interaction, cat_interactions
from recbole.utils import init_seed
from tqdm import tqdm

from recbole_llm.core.checkpoint import load_checkpoint
from recbole_llm.core.config import config_get
from recbole_llm.core.errors import ConfigError, UserInputError
from recbole_llm.core.fileio import atomic_path
from recbole_llm.core.resume import data_files_digest
from recbole_llm.llm.item_text import item_attributes, item_fields, pick_title_field
from recbole_llm.run.quick_start import build_model

COLUMNS = ["user_id", "rank", "item_id", "title", "score"]
SPLITS = (None, "valid", "test")


class UnknownUsersError(UserInputError, KeyError):
    """Requested users that the checkpoint's dataset (or the chosen split) does not have."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


class ChangedDataError(UserInputError, ValueError):
    """The dataset files differ from those the checkpoint was trained on."""


class Recommender:
    """A checkpoint's model with its dataset, ready to rank items for external user ids."""

    def __init__(self, checkpoint, trust_pickled_code=False):
        state = load_checkpoint(checkpoint, trust_pickled_code=trust_pickled_code)
        if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
            raise ConfigError(f"'{checkpoint}' is not a model checkpoint (expected a dict with 'config' and "
                              "'state_dict', as RecBole's trainers save).")
        config = state["config"]
        if torch.device(config["device"]).type == "cuda" and not torch.cuda.is_available():
            config["device"] = torch.device("cpu")
            config["use_gpu"] = False
        self._check_data(checkpoint, state, config)
        if "knowledge_source" in config and config["knowledge_text_dim"]:
            config["knowledge_source"] = "checkpoint"  # SeRALM: the knowledge matrix comes with the weights
        config["show_progress"] = False
        init_seed(config["seed"], config["reproducibility"])
        self.config = config
        self.dataset = create_dataset(config)
        self._history = _user_item_index(self.dataset)  # before the split, which leaves inter_feat cut
        train_data, valid_data, test_data = recbole_data_preparation(config, self.dataset)
        self.splits = {"train": train_data._dataset, "valid": valid_data._dataset, "test": test_data._dataset}
        init_seed(config["seed"], config["reproducibility"])
        model = build_model(config, train_data._dataset)
        model.load_state_dict(state["state_dict"])
        model.load_other_parameter(state.get("other_parameter"))
        self.model = model.eval()
        self.device = torch.device(config["device"])
        self.uid_field, self.iid_field = self.dataset.uid_field, self.dataset.iid_field
        self._titles = None

    @staticmethod
    def _check_data(path, state, config):
        saved = state.get("data_digest")
        if saved is None:
            getLogger().warning(f"Checkpoint '{path}' records no digest of its dataset files (saved by an older "
                                "version or by plain RecBole): the data cannot be checked against it.")
            return
        now = data_files_digest(config)
        if now != saved:
            raise ChangedDataError(
                f"Checkpoint '{path}' was trained on other data: the atomic files of dataset '{config['dataset']}' "
                f"under '{config['data_path']}' have digest {now}, the checkpoint's are {saved}. Item and user ids "
                "would not match; train on the current files or restore the old ones.")

    # ----------------------------------------------------------------------------------------- users
    def internal_users(self, users, split=None, skip_unknown=False):
        """Internal ids of external ``users`` (``None`` or ``"all"``: every user that has a row to score)."""
        rows = self._rows(split)
        if users is None or (isinstance(users, str) and users == "all"):
            return np.array(sorted(rows), dtype=np.int64)
        if isinstance(users, str):
            raise ConfigError(f"users must be a list of external user ids or 'all', got the string {users!r}")
        token_id = self.dataset.field2token_id[self.uid_field]
        ids, unknown, no_row = [], [], []
        for user in users:
            uid = token_id.get(str(user))
            if uid is None or uid == 0:
                unknown.append(str(user))
            elif uid not in rows:
                no_row.append(str(user))
            else:
                ids.append(uid)
        missing = unknown + no_row
        if missing and not skip_unknown:
            parts = []
            if unknown:
                parts.append(f"{len(unknown)} not in dataset '{self.config['dataset']}': {_listing(unknown)}")
            if no_row:
                where = f"the {split} split" if split else "any split"
                parts.append(f"{len(no_row)} without an interaction in {where}: {_listing(no_row)}")
            raise UnknownUsersError(f"unknown user ids ({'; '.join(parts)}). Expected external ids as in the "
                                    f".inter file's {self.uid_field} column; --skip_unknown (skip_unknown=True) skips them.")
        if missing:
            getLogger().warning(f"recommend: skipped {len(missing)} unknown user id(s): {_listing(missing)}")
        return np.array(ids, dtype=np.int64)

    def _rows(self, split):
        """{internal uid: row} of the input each user is scored with. A split: the user's last row of that split's
        dataset. Default: the last row of the latest split holding the user, extended by its target below."""
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {list(SPLITS)} (None: after the whole history), got {split!r}")
        order = [split] if split else ["train", "valid", "test"]  # later splits overwrite earlier ones
        rows = {}
        for name in order:
            uids = self.splits[name].inter_feat[self.uid_field].numpy()
            users, first_from_end = np.unique(uids[::-1], return_index=True)
            for uid, row in zip(users.tolist(), (len(uids) - 1 - first_from_end).tolist()):
                rows[uid] = (name, row)
        return rows

    # ----------------------------------------------------------------------------------------- scores
    def _inputs(self, uids, split):
        rows = self._rows_cache(split)
        parts = {}
        for position, uid in enumerate(uids):
            name, row = rows[int(uid)]
            parts.setdefault(name, []).append((position, row))
        pieces, order = [], []
        for name, items in parts.items():
            positions, index = zip(*items)
            pieces.append(self.splits[name][torch.tensor(index)])
            order.extend(positions)
        interaction = pieces[0] if len(pieces) == 1 else _cat(pieces)
        interaction = interaction[torch.argsort(torch.tensor(order))]
        if split is None:
            interaction = self._append_targets(interaction)
        return interaction

    def _rows_cache(self, split):
        if not hasattr(self, "_row_maps"):
            self._row_maps = {}
        if split not in self._row_maps:
            self._row_maps[split] = self._rows(split)
        return self._row_maps[split]

    def _append_targets(self, interaction):
        """Each row's history plus its target (the user's latest interaction), the oldest item dropped when full:
        the input RecBole would build for the interaction after the last one."""
        suffix = self.config["LIST_SUFFIX"]
        length_field = self.config["ITEM_LIST_LENGTH_FIELD"]
        lengths = interaction[length_field].long()
        full = None
        for field in list(interaction.columns):
            list_field = field + suffix
            if list_field not in interaction.columns:
                continue
            seq = interaction[list_field].clone()
            max_len = seq.size(1)
            full = lengths >= max_len
            if full.any():
                seq[full] = torch.roll(seq[full], shifts=-1, dims=1)
            at = torch.where(full, torch.full_like(lengths, max_len - 1), lengths)
            seq[torch.arange(seq.size(0)), at] = interaction[field].to(seq.dtype)
            interaction.update(_interaction({list_field: seq}))
        if full is not None:
            new_lengths = torch.clamp(lengths + 1, max=interaction[self.iid_field + suffix].size(1))
            interaction.update(_interaction({length_field: new_lengths.to(interaction[length_field].dtype)}))
        return interaction

    @torch.no_grad()
    def scores(self, uids, split=None):
        """[len(uids), n_items] scores, -inf for the padding item and (default view) the user's history items."""
        interaction = self._inputs(uids, split).to(self.device)
        scores = self.model.full_sort_predict(interaction).view(len(uids), -1).float()
        scores[:, 0] = -np.inf
        if split is None:
            indptr, items = self._history
            starts, ends = indptr[uids], indptr[np.asarray(uids) + 1]
            rows = np.repeat(np.arange(len(uids)), ends - starts)
            cols = np.concatenate([items[a:b] for a, b in zip(starts, ends)]) if len(uids) else items[:0]
            scores[torch.from_numpy(rows).to(scores.device), torch.from_numpy(cols).to(scores.device)] = -np.inf
        return scores

    def titles(self):
        if self._titles is None:
            field, _ = pick_title_field(item_fields(self.dataset), config_get(self.config, "item_text_fields"))
            titles = [""] * self.dataset.item_num
            if field:
                for item, attrs in enumerate(item_attributes(self.dataset, [field])):
                    value = attrs.get(field, "")
                    titles[item] = " ".join(value) if isinstance(value, list) else value
            self._titles = titles
        return self._titles

    def topk_frame(self, uids, topk, split=None):
        """A DataFrame (COLUMNS) of the top ``topk`` items of each internal user id in ``uids``."""
        scores = self.scores(uids, split)
        k = min(int(topk), scores.size(1) - 1)
        values, items = torch.topk(scores, k)
        values, items = values.cpu(), items.cpu()
        user_tokens = self.dataset.id2token(self.uid_field, np.asarray(uids))
        item_tokens = self.dataset.id2token(self.iid_field, items.numpy().reshape(-1)).reshape(items.shape)
        titles = self.titles()
        records = []
        for row, user in enumerate(user_tokens):
            for rank in range(k):
                if not np.isfinite(values[row, rank]):
                    break  # fewer items left than topk (all others are history)
                item = int(items[row, rank])
                records.append((str(user), rank + 1, str(item_tokens[row, rank]), titles[item],
                                float(values[row, rank])))
        return pd.DataFrame.from_records(records, columns=COLUMNS)

    def iter_frames(self, users=None, topk=10, split=None, skip_unknown=False, batch_size=256,
                    show_progress=False):
        """DataFrames of ``batch_size`` users at a time (bounded memory for every user of a large dataset)."""
        if int(topk) < 1:
            raise ConfigError(f"topk must be a positive integer, got {topk!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        uids = self.internal_users(users, split, skip_unknown)  # checked now, before any output
        batches = range(0, len(uids), int(batch_size))
        if show_progress:
            batches = tqdm(batches, desc="recommend", unit="batch", total=len(batches), file=sys.stderr)
        return (self.topk_frame(uids[start:start + int(batch_size)], topk, split) for start in batches)


def _user_item_index(dataset):
    """(indptr, items): the internal item ids of user u's interactions (all splits) are
    ``items[indptr[u]:indptr[u + 1]]``."""
    users = np.asarray(dataset.inter_feat[dataset.uid_field], dtype=np.int64)
    items = np.asarray(dataset.inter_feat[dataset.iid_field], dtype=np.int64)
    order = np.argsort(users, kind="stable")
    indptr = np.zeros(dataset.user_num + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=dataset.user_num), out=indptr[1:])
    return indptr, items[order]


def _listing(ids, limit=20):
    shown = ", ".join(ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def _interaction(values):
    return Interaction(values)


def _cat(pieces):
    return cat_interactions(pieces)


def recommend(checkpoint, users=None, topk=10, split=None, skip_unknown=False, batch_size=256,
              trust_pickled_code=False, show_progress=False):
    """Top-``topk`` items for external user ids, as a DataFrame with columns user_id, rank, item_id, title, score.

    Args:
        checkpoint (str): a checkpoint saved by a RecBole trainer (``saved/<Model>-<time>.pth``).
        users (list[str] | "all" | None): external user ids (as in the ``.inter`` file); None or "all": every user.
        topk (int): items per user.
        split (None | "valid" | "test"): None ranks the items after the user's whole history, none of them listed;
            "test"/"valid" gives the evaluator's view of that split (equal to RecBole's ``full_sort_topk``).
        skip_unknown (bool): skip unknown user ids (logged with a count) instead of raising ``UnknownUsersError``.
    """
    model = Recommender(checkpoint, trust_pickled_code=trust_pickled_code)
    frames = list(model.iter_frames(users, topk, split, skip_unknown, batch_size, show_progress))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def write_recommendations(frames, out):
    """Write DataFrame chunks to ``out`` (``.csv``, ``.jsonl`` or ``.json`` lines; ``-``: CSV on stdout) as they
    come; the file appears complete or not at all."""
    if out == "-":
        _write(frames, sys.stdout, "csv")
        return
    kind = output_kind(out)
    with atomic_path(out) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            _write(frames, handle, kind)


def output_kind(out):
    ext = os.path.splitext(out)[1].lower()
    if ext == ".csv":
        return "csv"
    if ext in (".jsonl", ".json"):
        return "jsonl"
    raise ConfigError(f"--out '{out}': expected a file name ending in .csv or .jsonl (or '-' for CSV on stdout)")


def _write(frames, handle, kind):
    count = 0
    if kind == "csv":
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
    for frame in frames:
        for record in frame.itertuples(index=False):
            if kind == "csv":
                writer.writerow(record)
            else:
                handle.write(json.dumps(dict(zip(COLUMNS, record)), ensure_ascii=False) + "\n")
            count += 1
    return count


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="run_recbole_llm.py --recommend",
        description="Top-K recommendations of a saved checkpoint, with external user and item ids.")
    parser.add_argument("--recommend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint saved by training, e.g. saved/Laser-<time>.pth")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--users", default="all", help="comma-separated external user ids, or 'all' (default)")
    who.add_argument("--users_file", default=None, help="a file of external user ids, one per line")
    parser.add_argument("--topk", type=int, default=10, help="items per user (default 10)")
    parser.add_argument("--split", choices=["valid", "test"], default=None,
                        help="the evaluator's view of that split (default: after the user's whole history)")
    parser.add_argument("--out", default="-", help="output file, .csv or .jsonl (default: CSV on stdout)")
    parser.add_argument("--skip_unknown", action="store_true", help="skip unknown user ids instead of failing")
    parser.add_argument("--batch_size", type=int, default=256, help="users scored at once (default 256)")
    parser.add_argument("--trust_pickled_checkpoint", action="store_true",
                        help="load a checkpoint made by plain RecBole (runs code from the file; only your own files)")
    return parser.parse_args(argv)


def read_users(args):
    if args.users_file:
        if not os.path.isfile(args.users_file):
            raise ConfigError(f"--users_file '{args.users_file}' does not exist; expected one external user id per line")
        with open(args.users_file, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    if args.users == "all":
        return "all"
    users = [u.strip() for u in args.users.split(",") if u.strip()]
    if not users:
        raise ConfigError("--users is empty; give comma-separated external user ids or 'all'")
    return users


def main(argv=None):
    """``--recommend`` entry point (see ``parse_args``)."""
    args = parse_args(argv)
    users = read_users(args)
    if args.out != "-":
        output_kind(args.out)  # a wrong extension fails before the model is loaded
    model = Recommender(args.checkpoint, trust_pickled_code=args.trust_pickled_checkpoint)
    frames = model.iter_frames(users, args.topk, args.split, args.skip_unknown, args.batch_size,
                               show_progress=args.out != "-")
    write_recommendations(frames, args.out)
    if args.out != "-":
        print(f"recommendations written to {args.out}", file=sys.stderr)

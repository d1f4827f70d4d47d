"""Laser's validation NDCG@10 every N training steps, from its untrained state on: does training help?

    python benchmarks/laser_steps.py --steps 100 --eval_every 50 learning_rate=1e-4 score_centering=item_mean

The CPU profile's model on a fixed random subset of validation users (``--users``, drawn with seed 0), ranked over
all items against an item matrix recomputed from the current weights before every evaluation (ties counted
against the positive). Training is the model's own ``calculate_loss`` with Adam at the config's learning rate,
over RecBole's training loader, as stage 1 (shared towers) or, with ``--stage2``, as stage 2 (item side frozen).
Besides NDCG@10 it prints the cross-entropy the current scores would give at several temperatures, the NDCG of
popularity alone, how popular the top-10 are (ratio to the mean item) and the mean cosine between user embeddings:
a model that lowers its loss by making every user alike shows a rising user cosine and popular top-10s. The last
line is ``RESULT <json>`` with every evaluation (step, NDCG@10 ties against, NDCG@10 ties for, MRR, geometric mean
rank, seconds).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import yaml

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recbole.data import create_dataset  # noqa: E402
from recbole.data.interaction import Interaction  # noqa: E402
from recbole.utils import init_seed  # noqa: E402

from recbole_llm.core.preparation import data_preparation  # noqa: E402
from recbole_llm.run.quick_start import build_config, build_model  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="amazon-scientific")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refresh_every", type=int, default=0,
                        help="also recompute the item matrix every N training steps (0: only before evaluations)")
    parser.add_argument("--stage2", action="store_true",
                        help="train as stage 2 does: the item side (its prefix module and suffix) frozen at the "
                             "initial weights, so the item matrix stays fixed while the user side trains")
    parser.add_argument("--tag", default="")
    parser.add_argument("set", nargs="*", metavar="KEY=VALUE", help="config overrides (YAML values)")
    return parser.parse_args(argv)


def ndcg_at_10(ranks):
    return torch.where(ranks < 10, 1 / torch.log2(ranks.float() + 2), torch.zeros_like(ranks.float()))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {key: yaml.safe_load(value) for key, value in (kv.split("=", 1) for kv in args.set)}
    overrides.setdefault("seed", args.seed)
    overrides.update(show_progress=False, state="ERROR")
    config = build_config("Laser", args.dataset, config_dict=overrides, cmd_args=[], profile=args.profile)
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = build_model(config, train._dataset)
    optimizer = torch.optim.Adam(model.parameter_groups(config["learning_rate"]))

    rows = [(inter[model.ITEM_SEQ], inter[model.ITEM_SEQ_LEN], positives) for inter, _, _, positives in valid]
    seq, seq_len, pos = (torch.cat([row[i] for row in rows]) for i in range(3))
    keep = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))[:args.users]
    seq, seq_len, pos = seq[keep], seq_len[keep], pos[keep]
    popularity = torch.bincount(train.dataset.inter_feat[model.POS_ITEM_ID], minlength=model.n_items).float()

    @torch.no_grad()
    def evaluate():
        model.eval()
        model.refresh_item_matrix(force=True, show_progress=False)
        users = torch.cat([model.full_sort_predict(Interaction({model.ITEM_SEQ: seq[s:s + 256],
                                                                 model.ITEM_SEQ_LEN: seq_len[s:s + 256]}))
                           for s in range(0, len(pos), 256)])
        users[:, 0] = -1e9
        positive = users.gather(1, pos[:, None])
        above, tied = (users > positive).sum(1), (users == positive).sum(1) - 1
        against, for_ = ndcg_at_10(above + tied), ndcg_at_10(above)
        ranks = (above + tied).float()
        user_vectors = torch.cat([model._user_embeddings_chunked(seq[s:s + 256], seq_len[s:s + 256])
                                  for s in range(0, len(pos), 256)])
        ce = {t: round(float(F.cross_entropy(users / t, pos)), 3) for t in (0.05, 0.1, 0.3, 1.0)}
        pop_scores = popularity.expand(len(pos), -1).clone()
        pop_scores[:, 0] = -1e9
        pop_rank = (pop_scores >= pop_scores.gather(1, pos[:, None])).sum(1) - 1
        top_pop = float(popularity[users.topk(10, dim=1).indices].mean() / popularity[1:].mean())
        print(f"   CE at tau {ce}; popularity-only NDCG@10 {float(ndcg_at_10(pop_rank).mean()):.4f}; top-10 "
              f"popularity x{top_pop:.2f}; mean user cosine {float((user_vectors @ user_vectors.t()).mean()):.3f}",
              flush=True)
        model.train()
        return (float(against.mean()), float(for_.mean()), float((1 / (ranks + 1)).mean()),
                float(torch.exp(torch.log(ranks + 1).mean())))

    start = time.time()
    if args.stage2:
        model.freeze_item_side()
    result = {"tag": args.tag, "set": overrides, "steps": args.steps, "refresh_every": args.refresh_every,
              "stage2": args.stage2, "evals": []}

    def record(step, losses):
        values = evaluate()
        result["evals"].append((step, *values, round(time.time() - start, 1)))
        loss = f" loss {sum(losses) / len(losses):.3f}" if losses else ""
        print(f"step {step}{loss} NDCG@10 {values[0]:.4f} (ties for {values[1]:.4f}) MRR {values[2]:.4f} "
              f"geometric mean rank {values[3]:.0f} t={time.time() - start:.0f}s", flush=True)

    record(0, [])
    step, losses = 0, []
    while step < args.steps:
        for interaction in train:
            if step >= args.steps:
                break
            if args.refresh_every and step % args.refresh_every == 0:
                model.refresh_item_matrix(force=True, show_progress=False)
                model.train()
            optimizer.zero_grad()
            parts = model.calculate_loss(interaction)
            sum(parts).backward()
            optimizer.step()
            model.mark_parameters_updated()
            losses.append(parts[0].item())
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                record(step, losses[-args.eval_every:])
    print("RESULT", json.dumps(result))


if __name__ == "__main__":
    main()

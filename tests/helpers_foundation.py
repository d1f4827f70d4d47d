"""Tiny SASRec settings on ml-100k (ships inside the recbole wheel) for fast end-to-end runs."""

TINY_SASREC = {
    "epochs": 1,
    "train_batch_size": 512,
    "eval_batch_size": 4096,
    "hidden_size": 16,
    "inner_size": 16,
    "n_layers": 1,
    "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 10,
    "train_neg_sample_args": None,
    "show_progress": False,
    "state": "WARNING",
    "seed": 2020,
    "reproducibility": True,
}


def tiny_sasrec_config(tmp_path, **overrides):
    cfg = dict(TINY_SASREC, checkpoint_dir=str(tmp_path / "saved"), log_wandb=False)
    cfg.update(overrides)
    return cfg

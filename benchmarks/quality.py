"""Quality benchmark: the plugin's models against RecBole's on one split, one evaluator, several seeds.

    python benchmarks/quality.py                                  # CPU profiles, amazon-scientific + ml-100k, seeds 1 2 3
    python benchmarks/quality.py --quick                          # < 10 min on 2 cores: ml-100k, 1 seed, tiny settings
    python benchmarks/quality.py --gpu                            # the papers' sizes (profile "paper"), for a CUDA machine
    python benchmarks/quality.py --models SASRec Laser --seeds 1  # a subset (model names or variant ids, see --list)
    python benchmarks/quality.py --report-only                    # rebuild the table from the finished runs

Every (dataset, variant, seed) goes through ``recbole_llm.run.quick_start.run_recbole_llm`` in its own child process
(so one run cannot affect the next, and the child's peak memory is known) with the same dataset YAML
(leave-one-out, time order, full ranking over all items, Recall/NDCG/MRR@10), the model's profile YAML
(``-cpu`` or paper sizes) and the variant's overrides below. Each finished run is appended to
``benchmarks/results/quality-<mode>.jsonl``; a second invocation skips the runs already there, so an interrupted
benchmark resumes, and the run that was in flight continues from its resume state (``--resume=True``: the epoch or
alignment step it had reached, same results; its time is then partial and left out of ``time/run``). The table
(mean ± sample std over seeds) goes to ``quality-<mode>.md`` and NDCG@10 to ``quality-<mode>.png``.
"""

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

METRICS = (("recall@10", "Recall@10"), ("ndcg@10", "NDCG@10"), ("mrr@10", "MRR@10"))
BASELINES = ("SASRec", "BERT4Rec", "Caser", "LightSANs", "PAUP")
SERALM_BASES = ("Caser", "SASRec", "PAUP", "LightSANs")
DATASETS = ("amazon-scientific", "ml-100k")

# One training schedule for every ID-based model in CPU mode, RecBole baselines and SeRALM variants alike (it
# overrides the SeRALM -cpu profiles' 4 epochs, which are sized for a cold run that also generates knowledge), so a
# SeRALM variant and its base differ only by the knowledge. Every run trains to early stopping: 3 validations without
# a better NDCG@10 end it, long before the epoch cap, so its best epoch is never its last.
CPU_TRAIN = {"epochs": 200, "stopping_step": 3, "train_batch_size": 1024, "eval_batch_size": 4096,
             "learning_rate": 0.002}
# Aligned SeRALM on CPU: Algorithm 1 for 20 steps on the first 32 rows of each batch (every row costs one sampled
# text from the full 30-layer SmolLM2, the CPU bottleneck), synchronous generator (a Ray actor would compete with
# the trainer for the 2 cores), 16-token samples as long as the -cpu profile's greedy knowledge. The regeneration
# of every item's knowledge with the aligned LLM follows (as long as the first generation).
# Algorithm 1 as written within the steps that run: the synchronous generator samples with the current weights
# (refresh_every: 1), knowledge is sampled for the 3 most recent history items of each instance.
CPU_ALIGNED = {"alignment": True, "alignment_steps": 20, "align_batch_size": 32, "generator_mode": "sync",
               "align_max_new_tokens": 16, "align_generation_batch_size": 32, "align_warmup_epochs": 1,
               "refresh_every": 1, "align_history_items": 3}
# Quick mode (one pass through every code path of the selected models, minutes not hours).
QUICK_TRAIN = {"epochs": 1, "train_batch_size": 1024, "eval_batch_size": 4096, "learning_rate": 0.002}
QUICK_SERALM = {"knowledge_source": "item_text", "alignment": False}
QUICK_LASER = {"llm_num_layers": 1, "stage1_epochs": 1, "stage2_epochs": 1, "frozen_sr_epochs": 1,
               "train_samples_per_epoch": 64, "encode_batch_size": 64}
QUICK_MODELS = ("SASRec", "PAUP", "SASRecSeRALM-NA", "Laser")


@dataclass
class Variant:
    """One row of the table: a model with config overrides."""
    id: str                      # short name for --models, e.g. SASRecSeRALM-aligned
    label: str                   # row label in the table
    model: str                   # RecBole / plugin model name
    family: str                  # baseline | seralm | laser
    overrides: dict = field(default_factory=dict)
    base: str = None             # seralm: the base model's variant id
    profile: str = None          # a profile other than the mode's (e.g. "cpu-long"); None = the mode's


# Controls: each differs from the main variant named in its id in one switch (run only when asked for by --variants).
SERALM_NA_CONTROLS = {
    "split": ({"knowledge_concat": "split"}, "the ID embedding halved to make room (the former default)"),
    "warm": ({"base_warm_start": True}, "started from the trained base"),
    # one switch from "warm": the rate it trains on from there
    "warm_lr5e-4": ({"base_warm_start": True, "warm_start_learning_rate": 0.0005},
                    "started from the trained base, trained on at 5e-4 (a quarter of the rate)"),
    "grounded": ({"knowledge_grounding": "joint"}, "item text encoded with the knowledge"),
    "itemtext": ({"knowledge_source": "item_text"}, "the item's own text instead of LLM knowledge"),
}
# the collaborative route of issue 25 (point 3): BERT4Rec's predictive state, its item embeddings, a prefix from 0
COLLAB_ROUTE = {"sr_user_state": "predictive", "sr_item_state": "embedding", "prefix_init": "zero"}
LASER_CONTROLS = {
    "lr1e-3": ({"learning_rate": 0.001}, "learning rate 1e-3 (the former CPU profile's)"),
    "centred": ({"score_centering": "item_mean"}, "cosine of embeddings centred by the item-matrix mean"),
    "centred_untrained": ({"score_centering": "item_mean", "epochs": 0}, "centred by the item-matrix mean, not "
                                                                         "whitened, untrained (0 epochs)"),
    "sampled": ({"sampled_negatives": 16}, "16 sampled negatives, items encoded with gradient"),
    "collab_route": (dict(COLLAB_ROUTE),
                     "BERT4Rec's predictive state and item embeddings, zero-initialised prefix"),
    "allvalid": ({"valid_users": None}, "validation on every user, not a fixed 1,000"),
    "prefix_zero": ({"prefix_init": "zero"}, "M-Former's output projection zero-initialised (the prefix starts at 0)"),
    "prefix_zero_untrained": ({"prefix_init": "zero", "epochs": 0}, "M-Former's prefix starts at 0, untrained "
                                                                     "(0 epochs)"),
    "suffix_eos": ({"suffix_init": "eos"}, "the suffix starts at the [EOS] token's embedding, not at random (now the "
                                           "CPU profile's own value, so the same run as Laser)"),
    "suffix_eos_untrained": ({"suffix_init": "eos", "epochs": 0}, "the suffix starts at [EOS], untrained (0 epochs)"),
    "suffix_random": ({"suffix_init": "random"}, "the suffix starts at random (the paper's; the CPU profile before "
                                                 "suffix_init: eos)"),
    "suffix_random_untrained": ({"suffix_init": "random", "epochs": 0}, "the suffix starts at random, untrained "
                                                                       "(0 epochs)"),
    "prefix_token": ({"prefix_init": "token_scale"}, "M-Former's prefix starts at the scale of the LLM's tokens"),
    "no_mformer_untrained": ({"use_mformer": False, "epochs": 0}, "w/o M-Former, untrained (0 epochs)"),
    "no_moe_untrained": ({"use_moe": False, "epochs": 0}, "w/o MoE, untrained (0 epochs)"),
    "no_prefix_untrained": ({"use_prefix": False, "epochs": 0}, "w/o prefix, untrained (0 epochs)"),
    "prefix_lr6": ({"prefix_learning_rate": 1e-6}, "prefix generator (M-Former) at learning rate 1e-6 (now the "
                                                   "CPU profile's own value, so the same run as Laser)"),
    "prefix_lr5": ({"prefix_learning_rate": 1e-5}, "prefix generator at learning rate 1e-5"),
    "prefix_lr4": ({"prefix_learning_rate": 1e-4}, "prefix generator at the suffix's learning rate 1e-4 (one rate, as "
                                                   "the paper)"),
    "item_bias": ({"item_bias": True}, "a trainable per-item logit bias, zero at the start (now the CPU profile's "
                                       "own value, so the same run as Laser)"),
    "no_item_bias": ({"item_bias": False}, "no item bias (the paper's cosine alone; the CPU profile before "
                                           "item_bias: True)"),
    "posgrad_plr5": ({"iic_positive_grad": True, "prefix_learning_rate": 1e-5},
                     "positive re-encoded with gradient, M-Former at learning rate 1e-5"),
    "steps10k": ({"stage1_epochs": 4, "train_samples_per_epoch": 2048},
                 "4 + 1 epochs of 2,048 training sequences (now the CPU profile's own budget, so the same run as "
                 "Laser)"),
    "bias_only": ({"learning_rate": 1e-12, "prefix_learning_rate": 1e-12},
                  "only the item bias learns (suffix and M-Former at learning rate 1e-12: the keys must be > 0)"),
    "steps1536": ({"stage1_epochs": 2, "train_samples_per_epoch": 512},
                  "2 + 1 epochs of 512 training sequences (the CPU profile's budget before 4 + 1 of 2,048)"),
    "user_mean": ({"user_centering": "user_mean"}, "users centred by the mean user embedding, not the item mean"),
    "user_mean_untrained": ({"user_centering": "user_mean", "epochs": 0},
                            "users centred by the mean user embedding, untrained (0 epochs)"),
    "user_mean_no_item_bias": ({"user_centering": "user_mean", "item_bias": False},
                               "users centred by their mean, no item bias (what Bi-Tuning learns on its own)"),
    "user_mean_tau": ({"user_centering": "user_mean", "temperature_learning_rate": 0.01},
                      "users centred by their mean, tau learned (rate 0.01 on log 1/tau)"),
    "user_mean_route_noshared": (dict(COLLAB_ROUTE, user_centering="user_mean", prefix_learning_rate=1e-4,
                                      remove_shared_user_gradient=True),
                                 "users centred by their mean, the collaborative route with M-Former at 1e-4, and "
                                 "no gradient that moves a batch's users alike"),
    "collab_route_plr4_no_item_bias": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, item_bias=False),
                                       "the collaborative route with M-Former at 1e-4, no item bias (what the "
                                       "M-Former learns without it)"),
    "sasrec_route_plr4": (dict(COLLAB_ROUTE, frozen_sr_model="SASRec", prefix_learning_rate=1e-4),
                          "the collaborative route with M-Former at 1e-4, from a frozen SASRec instead of BERT4Rec "
                          "(paper Figure 4)"),
    "user_mean_route": (dict(COLLAB_ROUTE, user_centering="user_mean", prefix_learning_rate=1e-4),
                        "users centred by their mean, and the collaborative route with M-Former at 1e-4"),
    "collab_route_plr4": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4),
                          "BERT4Rec's predictive state and item embeddings, zero-initialised prefix, M-Former at "
                          "learning rate 1e-4"),
    "collab_route_plr3e-5": (dict(COLLAB_ROUTE, prefix_learning_rate=3e-5),
                             "the collaborative route with M-Former at 3e-5 (between the profile's 1e-6 and 1e-4)"),
    "collab_route_plr4_bias_lr1": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, item_bias_learning_rate=0.1),
                                   "the collaborative route with M-Former at 1e-4, the item bias at rate 0.1"),
    "collab_route_plr4_x4": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, train_samples_per_epoch=8192),
                             "the collaborative route with M-Former at 1e-4, 4x the training samples per epoch"),
    "collab_route_plr4_default_init": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, prefix_init="default"),
                                       "the collaborative route with M-Former at 1e-4, its prefix from PyTorch's "
                                       "default init (random, as the profile) instead of 0"),
    # the item bias starts at log(1 + training count): a popularity prior (logit adjustment)
    "pop_prior": ({"item_bias_init": "log_popularity"}, "the item bias starts at the log training count"),
    "pop_prior_untrained": ({"item_bias_init": "log_popularity", "epochs": 0},
                            "the item bias starts at the log training count, untrained (0 epochs)"),
    "collab_route_plr4_pop_prior_x4": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4,
                                            item_bias_init="log_popularity", train_samples_per_epoch=8192),
                                       "the collaborative route with M-Former at 1e-4, the item bias starting at the "
                                       "log training count, 4x the training samples per epoch"),
    "collab_route_plr4_default_init_pop_prior": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, prefix_init="default",
                                                      item_bias_init="log_popularity"),
                                                 "the collaborative route with M-Former at 1e-4 and its default "
                                                 "(random) prefix init, the item bias starting at the log training "
                                                 "count"),
    "collab_route_default_init_pop_prior_untrained": (dict(COLLAB_ROUTE, prefix_init="default",
                                                           item_bias_init="log_popularity", epochs=0),
                                                      "the collaborative route's inputs, default prefix init, the "
                                                      "item bias at the log training count, untrained (0 epochs)"),
    "collab_route_plr4_pop_prior_tau": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4,
                                             item_bias_init="log_popularity", temperature_learning_rate=0.01),
                                        "the collaborative route with M-Former at 1e-4, the item bias starting at the "
                                        "log training count, tau learned (rate 0.01 on log 1/tau)"),
    # the same 5 epochs of samples, 1 in stage 1 (items refreshed, shared suffix) and 4 in stage 2 (items fixed)
    "stage2_heavy": ({"stage1_epochs": 1, "stage2_epochs": 4},
                     "1 epoch in stage 1 and 4 in stage 2 (the profile: 4 and 1)"),
    "collab_route_plr4_stage2_heavy": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, stage1_epochs=1,
                                            stage2_epochs=4),
                                       "the collaborative route with M-Former at 1e-4, 1 epoch in stage 1 and 4 "
                                       "in stage 2"),
    # stage 1's re-encoding of the items removed, nothing else: all 5 epochs train the user side against the
    # item matrix of the initial weights (the item side frozen with it, as stage 2 does)
    "collab_route_plr4_default_init_items_fixed": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4,
                                                        prefix_init="default", stage1_epochs=0, stage2_epochs=5),
                                                   "the collaborative route with M-Former at 1e-4 from the default "
                                                   "start, the items fixed at the initial weights' matrix for all "
                                                   "5 epochs (no stage-1 re-encoding)"),
    "user_mean_pop_prior_untrained": ({"user_centering": "user_mean", "item_bias_init": "log_popularity",
                                       "epochs": 0},
                                      "users centred by their mean, the item bias at the log training count, "
                                      "untrained (0 epochs)"),
    "user_mean_pop_prior": ({"user_centering": "user_mean", "item_bias_init": "log_popularity"},
                            "users centred by their mean, the item bias starting at the log training count"),
    "collab_route_plr4_pop_prior": (dict(COLLAB_ROUTE, prefix_learning_rate=1e-4, item_bias_init="log_popularity"),
                                    "the collaborative route with M-Former at 1e-4, the item bias starting at the "
                                    "log training count"),
}
SERALM_ALIGNED_CONTROLS = {
    "nobaseline": ({"align_baseline": "none"}, "no baseline in the weight"),
    "refresh50": ({"refresh_every": 50}, "generator snapshot every 50 steps"),
    "hist1": ({"align_history_items": 1}, "knowledge sampled for the last history item only"),
}


def variants(mode):
    """Every variant of the benchmark for ``mode`` ("quick", "cpu" or "gpu"), cheapest first; controls last."""
    quick, cpu = mode.startswith("quick"), mode == "cpu"
    train = QUICK_TRAIN if quick else (CPU_TRAIN if cpu else {})
    out = [Variant(name, name, name, "baseline", dict(train)) for name in BASELINES]
    # for scale only (never in the main table): items ranked by their training-set popularity. Batches of 1:
    # RecBole's Pop counts an item once per batch however often it occurs there (a minute or two of CPU)
    out.append(Variant("Pop", "Pop (training-set popularity)", "Pop", "control",
                       {"epochs": 1, "train_batch_size": 1, "eval_batch_size": 4096}))
    for base in SERALM_BASES:
        model = f"{base}SeRALM"
        na = dict(train, alignment=False)
        na.update(QUICK_SERALM if quick else {})
        knowledge = "item text" if quick else "LLM"
        out.append(Variant(f"{model}-NA", f"{model} (NA_LLM, {knowledge} knowledge)", model, "seralm", na, base))
    for base in SERALM_BASES:
        model = f"{base}SeRALM"
        aligned = dict(train, **(CPU_ALIGNED if cpu else {"alignment": True}))
        if quick:
            aligned.update(knowledge_source="llm", alignment_steps=2, align_batch_size=8, generator_mode="sync",
                           align_max_new_tokens=8, align_warmup_epochs=0, knowledge_max_new_tokens=8)
        out.append(Variant(f"{model}-aligned", f"{model} (aligned LLM)", model, "seralm", aligned, base))
    laser = dict(QUICK_LASER) if quick else {}
    out += [
        Variant("Laser", "Laser", "Laser", "laser", dict(laser)),
        Variant("Laser-untrained", "Laser untrained (0 epochs)", "Laser", "laser", dict(laser, epochs=0)),
        Variant("Laser-no_mformer", "Laser w/o M-Former", "Laser", "laser", dict(laser, use_mformer=False)),
        Variant("Laser-no_prefix", "Laser w/o prefix", "Laser", "laser", dict(laser, use_prefix=False)),
        Variant("Laser-no_stage1", "Laser w/o stage 1", "Laser", "laser", dict(laser, skip_stage1=True)),
        Variant("Laser-no_moe", "Laser w/o MoE", "Laser", "laser", dict(laser, use_moe=False)),
    ]
    if cpu:
        out.append(Variant("Laser-long", "Laser long (profile cpu-long)", "Laser", "laser", {}, profile="cpu-long"))
        out.append(Variant("Laser-long-lr5", "Laser long, control: suffix learning rate 1e-5", "Laser", "control",
                           {"learning_rate": 1e-5}, profile="cpu-long"))
        out.append(Variant("Laser-long-no_item_bias", "Laser long, control: no item bias", "Laser", "control",
                           {"item_bias": False}, profile="cpu-long"))
    for suffix, (switch, what) in LASER_CONTROLS.items():
        out.append(Variant(f"Laser-{suffix}", f"Laser, control: {what}", "Laser", "control", dict(laser, **switch)))
    for base in SERALM_BASES:
        model = f"{base}SeRALM"
        main = {v.id: v for v in out}
        for suffix, (switch, what) in SERALM_NA_CONTROLS.items():
            na = main[f"{model}-NA"]
            out.append(Variant(f"{model}-NA-{suffix}", f"{model} NA_LLM, control: {what}", model, "control",
                               dict(na.overrides, **switch), base))
        for suffix, (switch, what) in SERALM_ALIGNED_CONTROLS.items():
            aligned = main[f"{model}-aligned"]
            out.append(Variant(f"{model}-aligned-{suffix}", f"{model} aligned, control: {what}", model, "control",
                               dict(aligned.overrides, **switch), base))
    return out


def select(all_variants, names, ids=None):
    """Variants named by model name (all its variants) or variant id in ``names``, plus those whose id is exactly
    in ``ids`` (``--variants``: "Laser" there is the plain Laser row only, not its ablations); unknown names are an
    error."""
    if not names and not ids:
        return all_variants
    names, ids = names or [], ids or []
    known_ids = {v.id for v in all_variants}
    known = known_ids | {v.model for v in all_variants}
    for flag, given, allowed in (("--models", names, known), ("--variants", ids, known_ids)):
        unknown = [n for n in given if n not in allowed]
        if unknown:
            raise SystemExit(f"error: unknown {flag} {unknown}; choose from {sorted(allowed)}")
    return [v for v in all_variants
            if v.id in names or v.id in ids or (v.model in names and v.family != "control")]


def config_digest(config_dict):
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:10]


def profile_contents(model, dataset, profile):
    """{file name: digest} of the settings in the YAMLs the run loads under its overrides (dataset settings, size
    profile): a run recorded under other settings is not taken as already done (the overrides in its id do not say
    it), while the report still shows it (each record has its commit). Parsed, so a comment edit changes nothing."""
    import yaml
    from recbole_llm.core.locate import default_config_files
    files = {}
    for path in default_config_files(model, dataset, profile):
        with open(path) as f:
            settings = json.dumps(yaml.safe_load(f), sort_keys=True, default=str)
        files[os.path.basename(path)] = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return files


def plan(args, mode):
    """The (dataset, variant, seed, config_dict) runs of this invocation, seed-major so a partial run covers models."""
    if args.models or args.variants:
        chosen = select(variants(mode), args.models, args.variants)
    elif mode.startswith("quick"):
        chosen = [v for v in variants(mode) if v.id in QUICK_MODELS]
    else:
        chosen = [v for v in variants(mode) if v.family != "control"]
    extra = common.parse_overrides(args.set)
    runs = []
    for seed in args.seeds:
        for dataset in args.datasets:
            for variant in chosen:
                config_dict = dict(variant.overrides, **extra, seed=seed, show_progress=False)
                profile = variant.profile or args.profile
                digest = config_digest({"model": variant.model, "dataset": dataset, "profile": profile,
                                        **config_dict})
                run_id = f"{dataset}|{variant.id}|seed={seed}|{digest}"
                runs.append({"run_id": run_id, "dataset": dataset, "variant": variant, "seed": seed,
                             "config_dict": config_dict, "profile": profile,
                             "config_files": profile_contents(variant.model, dataset, profile)})
    return runs


# ------------------------------------------------------------------------------------------ child side
def child_main(spec_path):
    """In the child process: one run_recbole_llm, result written as JSON next to the spec."""
    common.apply_thread_cap()
    with open(spec_path) as f:
        spec = json.load(f)
    os.chdir(spec["work_dir"])  # RecBole writes log/ and log_tensorboard/ into the working directory
    from recbole_llm.run.quick_start import run_recbole_llm

    start = time.perf_counter()
    result = run_recbole_llm(spec["model"], spec["dataset"], config_dict=spec["config_dict"], cmd_args=[],
                             profile=spec["profile"], saved=True)
    elapsed = time.perf_counter() - start
    saved_file = result.get("saved_model_file")
    if saved_file and not spec.get("keep_checkpoints"):
        from recbole_llm.seralm.alignment.trainer import adapter_path

        for path in (saved_file, adapter_path(saved_file)):  # the checkpoint and a SeRALM LoRA adapter
            if os.path.isfile(path):
                os.remove(path)
    peak_cuda = None
    import torch

    if torch.cuda.is_available():
        peak_cuda = torch.cuda.max_memory_allocated() / 2 ** 20
    common.write_json(spec["result_path"], {
        "test": {k: float(v) for k, v in result["test_result"].items()},
        "valid": {k: float(v) for k, v in (result["best_valid_result"] or {}).items()},
        "run_s": elapsed, "cuda_peak_mib": peak_cuda, "torch_threads": torch.get_num_threads(),
        "best_epoch": result.get("best_epoch"), "epochs_run": result.get("epochs_run"),
    })


# ----------------------------------------------------------------------------------------- parent side
def run_one(run, args, mode, jsonl_path):
    variant = run["variant"]
    work_dir = args.work_dir or common.default_work_dir(mode)
    slug = run["run_id"].replace("|", "_").replace("=", "")
    spec_dir = os.path.join(work_dir, "runs")
    spec_path = os.path.join(spec_dir, f"{slug}.json")
    result_path = os.path.join(spec_dir, f"{slug}.result.json")
    log_path = os.path.join(work_dir, "logs", f"{slug}.log")
    # resume: a run whose earlier attempt was killed continues from its resume state (same results).
    config_dict = dict(run["config_dict"], checkpoint_dir=os.path.join(work_dir, "saved"), resume=True)
    if os.path.exists(result_path):
        os.remove(result_path)
    common.write_json(spec_path, {"model": variant.model, "dataset": run["dataset"], "config_dict": config_dict,
                                  "profile": run["profile"], "work_dir": work_dir, "result_path": result_path})
    loads = [common.load_average()]
    started = common.now_utc()
    log_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    rc, wall, peak = common.run_child([sys.executable, os.path.abspath(__file__), "--child", spec_path], log_path,
                                      env=common.child_env(args.threads), timeout=args.timeout)
    loads.append(common.load_average())
    record = {"run_id": run["run_id"], "config_files": run["config_files"], "mode": mode, "dataset": run["dataset"],
              "variant": variant.id,
              "label": variant.label, "model": variant.model, "family": variant.family, "base": variant.base,
              "seed": run["seed"], "profile": run["profile"], "overrides": run["config_dict"],
              "started": started, "wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1),
              "loadavg_start": loads[0], "loadavg_end": loads[1], "log": log_path,
              "resumed": resumed_in_log(log_path, log_offset),
              "env": common.environment()}  # which code, versions and machine made this row
    if rc == 0 and os.path.isfile(result_path):
        with open(result_path) as f:
            record.update(status="ok", **json.load(f))
    else:
        record.update(status="failed", returncode=rc, error=common.log_tail(log_path))
    common.append_jsonl(jsonl_path, record)
    return record


def resumed_in_log(path, offset):
    """Whether this attempt's part of the (appended) log says it continued an interrupted attempt: then its
    wall time covers only the rest of the run."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return b"Resuming the interrupted" in f.read()
    except OSError:
        return False


def done_key(run_id, config_files):
    """What a finished run is known by: its id and the digests of the YAMLs it loaded (None in a record made before
    runs recorded them, so such a run is done again)."""
    return run_id, json.dumps(config_files, sort_keys=True)


def finished_ids(jsonl_path):
    return {done_key(r["run_id"], r.get("config_files"))
            for r in common.read_jsonl(jsonl_path) if r.get("status") == "ok"}


def is_finished(run, done):
    return done_key(run["run_id"], run["config_files"]) in done


# --------------------------------------------------------------------------------------------- report
def _latest_by_run(records, wanted_ids):
    """The last record of each planned run id (a retried failure is replaced by its success)."""
    latest = {}
    for record in records:
        if record["run_id"] in wanted_ids:
            if record.get("status") == "ok" or latest.get(record["run_id"], {}).get("status") != "ok":
                latest[record["run_id"]] = record
    return latest


def aggregate(records, runs):
    """{dataset: {variant_id: {"label", "ok": [records], "failed": [records]}}} in plan order."""
    latest = _latest_by_run(records, {r["run_id"] for r in runs})
    table = {}
    for run in runs:
        variant = run["variant"]
        row = table.setdefault(run["dataset"], {}).setdefault(
            variant.id, {"variant": variant, "ok": [], "failed": [], "pending": 0})
        record = latest.get(run["run_id"])
        if record is None:
            row["pending"] += 1
        elif record.get("status") == "ok":
            row["ok"].append(record)
        else:
            row["failed"].append(record)
    return table


def _values(row, key):
    return [r["test"][key] for r in row["ok"] if key in r.get("test", {})]


def _mean(row, key):
    mean, _ = common.mean_std(_values(row, key))
    return mean


def claims(table):
    """Lines comparing each SeRALM variant with its base and Laser with every other model (NDCG@10)."""
    lines = []
    for dataset, rows in table.items():
        for vid, row in rows.items():
            variant = row["variant"]
            if variant.family == "seralm" and variant.base in rows:
                lines.append(_claim_line(dataset, row, rows[variant.base], "beats its base"))
        laser = rows.get("Laser")
        if laser and laser["ok"]:
            others = [r for r in rows.values() if r["variant"].family != "laser" and r["ok"]]
            beaten = [r["variant"].label for r in others if _mean(laser, "ndcg@10") > _mean(r, "ndcg@10")]
            not_beaten = [r["variant"].label for r in others if r["variant"].label not in beaten]
            if others:
                verdict = "holds" if not not_beaten else "does not hold"
                lines.append(f"- {dataset}: Laser beats every other model: **{verdict}** (NDCG@10 "
                             f"{_mean(laser, 'ndcg@10'):.4f}; beats {len(beaten)}/{len(others)}"
                             + (f"; not: {', '.join(not_beaten)}" if not_beaten else "") + ")")
    return lines


def _by_seed(row, key):
    return {r["seed"]: r["test"][key] for r in row["ok"] if key in r.get("test", {})}


def _claim_line(dataset, row, base, what):
    """The comparison on the seeds both rows have: a one-seed row against a 3-seed mean would compare one
    draw with the average of others."""
    label, base_label = row["variant"].label, base["variant"].label
    by_seed, base_by_seed = _by_seed(row, "ndcg@10"), _by_seed(base, "ndcg@10")
    seeds = sorted(set(by_seed) & set(base_by_seed))
    if not seeds:
        return f"- {dataset}: {label} {what} ({base_label}): not measured" + \
            (" on a common seed" if by_seed and base_by_seed else "")
    a, b = [by_seed[s] for s in seeds], [base_by_seed[s] for s in seeds]
    plural = len(seeds) > 1
    matched = "" if set(by_seed) == set(base_by_seed) else \
        f"on seed{'s' * plural} {', '.join(map(str, seeds))} only (both rows have {'them' if plural else 'it'}); "
    mean_a, std_a = common.mean_std(a)
    mean_b, std_b = common.mean_std(b)
    delta = mean_a - mean_b
    spread = max(s for s in (std_a, std_b, 0.0) if s is not None)
    verdict = "holds" if delta > 0 else "does not hold"
    if len(a) < 2 or len(b) < 2:
        qualifier = "single seed: no spread"
    elif abs(delta) <= spread:
        qualifier = "difference within the seed spread"
    else:
        qualifier = "difference larger than the seed spread"
    rel = f"{100 * delta / mean_b:+.1f}%" if mean_b else "n/a"
    return (f"- {dataset}: {label} {what} ({base_label}): **{verdict}** (NDCG@10 {mean_a:.4f} vs {mean_b:.4f}, "
            f"{delta:+.4f}, {rel}; {matched}{qualifier})")


def render(table, mode, env, command, started, finished, loads, settings_notes):
    out = [f"# Quality benchmark ({mode})", "", common.environment_markdown(env, command, started, finished, loads),
           "", "Test-set metrics of the best validation epoch (NDCG@10), mean ± sample std over seeds; same "
           "leave-one-out split (time order), full ranking over all items. `time/run` is the whole run "
           "(data, one-time caches such as frozen recommenders or knowledge generation, training, evaluation); "
           "`peak RSS` the child process's maximum resident memory. A run that continued a killed attempt "
           "(`--resume=True`, same results) is left out of `time/run` and marked *. Rows may mix thread counts "
           "and machine load (each JSONL record has `torch_threads` and load averages), so `time/run` is a rough "
           "guide across rows, not a speed comparison: `speed.py` makes those. RecBole rounds each metric to "
           "4 decimals (`metric_decimal_place`), so a value carries up to ±0.00005 of rounding; the digits are "
           "kept as RecBole gives them because its early stopping compares the rounded validation values.", ""]
    cuda = any(r.get("cuda_peak_mib") is not None for rows in table.values() for row in rows.values()
               for r in row["ok"])
    commits = sorted({r.get("env", {}).get("git_commit", "not recorded (runs before 2026-11-30)")
                      for rows in table.values() for row in rows.values() for r in row["ok"]})
    if commits:
        out += [f"Rows come from runs at these commits (each JSONL record has its own `env`): {', '.join(commits)}.",
                ""]
    for dataset, rows in table.items():
        out += [f"## {dataset}", ""]
        body = []
        for row in rows.values():
            n = len(row["ok"])
            status = f"{n}" + (f" ({len(row['failed'])} failed)" if row["failed"] else "") + \
                (f" ({row['pending']} not run)" if row["pending"] else "")
            walls = [r["wall_s"] for r in row["ok"] if not r.get("resumed")]
            resumed = sum(1 for r in row["ok"] if r.get("resumed"))
            peaks = [r["peak_rss_mib"] for r in row["ok"]]
            cuda_peaks = [r["cuda_peak_mib"] for r in row["ok"] if r.get("cuda_peak_mib") is not None]
            body.append([row["variant"].label] + [common.fmt_mean_std(_values(row, key)) for key, _ in METRICS]
                        + [status + "*" * bool(resumed), f"{common.mean_std(walls)[0]:.0f}" if walls else "-",
                           f"{max(peaks):.0f}" if peaks else "-"]
                        + ([f"{max(cuda_peaks):.0f}" if cuda_peaks else "-"] if cuda else []))
        out += [common.markdown_table(["model"] + [name for _, name in METRICS]
                                      + ["seeds", "time/run (s)", "peak RSS (MiB)"]
                                      + (["CUDA peak (MiB)"] if cuda else []), body), ""]
    lines = claims(table)
    if lines:
        out += ["## Paper claims, as measured here", ""] + lines + [""]
    failed = [r for rows in table.values() for row in rows.values() for r in row["failed"]]
    if failed:
        out += ["## Failed runs", ""]
        for r in failed:
            tail = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            out.append(f"- {r['run_id']}: exit {r.get('returncode')}: `{tail[0][:200]}` (log: {r['log']})")
        out.append("")
    out += ["## Settings", ""] + settings_notes + [""]
    return "\n".join(out)


def settings_notes(mode, selected, profile, extra=None):
    notes = [f"- profile `{profile}`: dataset YAML `properties/dataset/<dataset>.yaml`"
             + (", then `properties/model/<Model>-cpu.yaml` where it exists" if profile == "cpu" else
                ", model YAML defaults (the papers' sizes)")]
    if extra:
        notes.append(f"- `--set` overrides for every run: `{json.dumps(extra)}`")
    seen = set()
    for variant in selected:
        if variant.id in seen:
            continue
        seen.add(variant.id)
        overrides = {k: v for k, v in variant.overrides.items()}
        notes.append(f"- {variant.label} (`--variants {variant.id}`): overrides `{json.dumps(overrides)}`")
    return notes


def plot(table, path):
    """Horizontal bars of NDCG@10 (mean, sample std as error bar), one panel per dataset; skipped without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from recbole_llm.core.fileio import atomic_path

    datasets = [d for d, rows in table.items() if any(r["ok"] for r in rows.values())]
    if not datasets:
        return None
    height = max(len(rows) for rows in table.values()) * 0.35 + 1.2
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), height), squeeze=False)
    colors = {"baseline": "#8c8c8c", "seralm": "#4c72b0", "laser": "#dd8452"}
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in table[dataset].values() if r["ok"]]
        means = [_mean(r, "ndcg@10") for r in rows]
        stds = [common.mean_std(_values(r, "ndcg@10"))[1] or 0.0 for r in rows]
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, means, xerr=stds if any(stds) else None, capsize=3,
                color=[colors[r["variant"].family] for r in rows])
        ax.set_yticks(ys)
        ax.set_yticklabels([r["variant"].label for r in rows], fontsize=8)
        ax.set_xlabel("NDCG@10 (test)")
        ax.set_title(dataset)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:  # the suffix tells savefig the format
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_report(args, mode, runs, jsonl_path, started, loads, env):
    records = common.read_jsonl(jsonl_path)
    table = aggregate(records, runs)
    selected = [r["variant"] for r in runs]
    md_path = os.path.join(args.results_dir, f"quality-{mode}.md")
    png_path = os.path.join(args.results_dir, f"quality-{mode}.png")
    text = render(table, mode, env, common.command_line(), started, common.now_utc(), loads,
                  settings_notes(mode, selected, args.profile, common.parse_overrides(args.set)))
    if args.plot and plot(table, png_path):
        text += f"\n![NDCG@10 per model]({os.path.basename(png_path)})\n"
    text += common.notes_section(os.path.join(args.results_dir, f"quality-{mode}-notes.md"))
    common.write_text(md_path, text)
    return md_path


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=None, help=f"default: {' '.join(DATASETS)} (quick: ml-100k)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 1 2 3 (quick: 1)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="model names (all their variants) or variant ids; see --list")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="variant ids, matched exactly (--variants Laser: Laser without its ablations)")
    parser.add_argument("--quick", action="store_true", help="quick mode: < 10 min on 2 cores")
    parser.add_argument("--gpu", action="store_true", help='the papers\' sizes (profile "paper"); for a CUDA GPU')
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides for every run (YAML values)")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR, help="where the JSONL/Markdown/PNG go")
    parser.add_argument("--work-dir", default=None, help="checkpoints and logs (default: under the plugin cache)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one run is killed")
    parser.add_argument("--no-retry", action="store_true", help="do not rerun runs recorded as failed "
                        "(default: a failed run is run again)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the table from the JSONL")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    parser.add_argument("--list", action="store_true", help="list the variants of this mode and exit")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args, None
    mode = common.resolve_mode(args)
    args.datasets = args.datasets or (["ml-100k"] if args.quick else list(DATASETS))
    args.seeds = args.seeds or ([1] if args.quick else [1, 2, 3])
    return args, mode


def main(argv=None):
    args, mode = parse_args(argv)
    if args.child:
        return child_main(args.child)
    if args.list:
        for v in variants(mode):
            print(f"{v.id:28s} {v.label:45s} {json.dumps(v.overrides)}")
        return None
    runs = plan(args, mode)
    jsonl_path = os.path.join(args.results_dir, f"quality-{mode}.jsonl")
    env = common.environment()
    started, loads = common.now_utc(), [common.load_average()]
    if not args.report_only:
        done = finished_ids(jsonl_path)
        failed = {r["run_id"] for r in common.read_jsonl(jsonl_path) if r.get("status") == "failed"}
        todo = [r for r in runs if not is_finished(r, done) and not (args.no_retry and r["run_id"] in failed)]
        print(f"quality ({mode}): {len(runs)} runs planned, {len(runs) - len(todo)} already finished, "
              f"{len(todo)} to run; results -> {jsonl_path}", flush=True)
        try:
            for index, run in enumerate(todo, 1):
                print(f"[{index}/{len(todo)}] {run['dataset']} {run['variant'].label} seed {run['seed']} ...",
                      end=" ", flush=True)
                record = run_one(run, args, mode, jsonl_path)
                if record["status"] == "ok":
                    print(f"NDCG@10 {record['test'].get('ndcg@10', float('nan')):.4f} in {record['wall_s']:.0f} s, "
                          f"peak {record['peak_rss_mib']:.0f} MiB", flush=True)
                else:
                    print(f"FAILED (exit {record['returncode']}; log {record['log']})", flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted: finished runs are kept; run the same command again to resume", flush=True)
    loads.append(common.load_average())
    md_path = write_report(args, mode, runs, jsonl_path, started, loads, env)
    print(f"table: {md_path}")
    return md_path


if __name__ == "__main__":
    main()

"""Speed benchmark of the expensive steps, each against a ceiling measured on the same machine and shapes.

    python benchmarks/speed.py                      # CPU profiles on amazon-scientific
    python benchmarks/speed.py --quick              # ml-100k, small counts, 1 repeat: a few minutes
    python benchmarks/speed.py --gpu                # the papers' sizes (profile "paper") on a CUDA GPU
    python benchmarks/speed.py --sections refresh generation

Sections (each in its own child process, whose peak RSS is reported; on CUDA also max_memory_allocated):

- refresh: Laser's item-embedding refresh (``Laser.refresh_item_matrix``: all items, batched by text length)
  in items/s, against the frozen LLM backbone's own forward on the SAME batch shapes (the [B, T] of every
  batch the refresh ran, recorded with a forward pre-hook, replayed with random embeddings and the same
  masks). ratio = refresh items/s / backbone items/s; 1.0 is the ceiling (no overhead around the LLM).
- generation: SeRALM knowledge generation (``recbole_llm.seralm.knowledge.generate_knowledge``: prompts, batched
  greedy decoding, resumable cache writes) on a subset of items, against a plain ``model.generate()`` of the
  same prompts in the same batches. ratio = pipeline items/s / plain items/s: 1.0 = as fast as plain
  generate(); the pipeline may pass 1.0 because it encodes the prompts' shared prefix once per batch
  (``knowledge_shared_prefix``), which plain generate() cannot.
- workers: SeRALM knowledge generation of the same items in this process with all the child's threads
  (``llm_workers: 1``) and on 2 local Ray workers with half the threads each (``llm_workers: 2``), end to end
  (LLM loading, and Ray's start for the workers, included); ratio = 2-worker items/s / 1-worker items/s, and
  whether both wrote the same texts. On a machine with as many cores as threads the ratio is bounded by the
  cores, not by the workers.
- train: training samples/s of each model (optimizer steps on real batches of the training data, after a
  warm-up step; Laser's item matrix is computed before the clock starts); also with the data loader's batch
  assembly and the copy to the device counted, as the trainer sees it.
- eval: full-ranking test evaluation time (RecBole's evaluator, all users x all items) of each SeRALM variant
  against its base model; ratio = SeRALM / base (paper: about 1.2x). Each model's own memory is given too: its
  weights and buffers, and on CUDA the peak one evaluation of it allocates on top.

Timings: ``time.perf_counter`` around the step (CUDA synchronised), warm-up excluded, ``--repeats`` repeats, min
and median quoted. A step and its ceiling alternate (A B, B A, ...) so that a change in machine load hits both
sides of a pair alike; ratios are the median of the per-pair ratios. The CUDA peak is reset after set-up, so it
is the peak during the measured steps (with the model's weights resident); RSS is the child's whole life.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks import quality  # noqa: E402

SECTIONS = ("refresh", "generation", "workers", "train", "eval")
TRAIN_MODELS = ("SASRec", "BERT4Rec", "Caser", "LightSANs", "PAUP", "CaserSeRALM", "SASRecSeRALM",
                "PAUPSeRALM", "LightSANsSeRALM", "Laser")
QUICK_TRAIN_MODELS = ("SASRec", "PAUP", "SASRecSeRALM", "Laser")
EVAL_PAIRS = tuple((f"{base}SeRALM", base) for base in quality.SERALM_BASES)

# Sizes per mode: items for the generation section, training batches timed, repeats
# (evaluations are cheap next to the LLM steps: always 5 repeats, so the ratio is not one noisy pair)
SIZES = {"quick": {"gen_items": 32, "gen_batch": 32, "train_batches": 3, "repeats": 1, "eval_repeats": 5,
                   "workers_batch": 8},
         "cpu": {"gen_items": 128, "gen_batch": None, "train_batches": 10, "repeats": 3, "eval_repeats": 5,
                 "workers_batch": 16},
         "gpu": {"gen_items": 512, "gen_batch": None, "train_batches": 20, "repeats": 3, "eval_repeats": 5,
                 "workers_batch": 32}}


def _mode_key(mode):
    return "quick" if mode.startswith("quick") else mode


def model_overrides(model, mode):
    """The quality benchmark's overrides for the model's main variant (NA for SeRALM), so the speed runs use the
    same settings. SeRALM knowledge comes from the items' own text here: the vectors' content does not change
    the cost of training or evaluation (same shapes), and it spares an LLM generation per section."""
    by_id = {v.id: v for v in quality.variants(mode)}
    variant = by_id.get(f"{model}-NA") or by_id[model]
    overrides = dict(variant.overrides)
    if variant.family == "seralm":
        overrides["knowledge_source"] = "item_text"
    return overrides


# ------------------------------------------------------------------------------------------- child side
def _build(model, dataset, config_dict, profile):
    """Config, dataset, splits, model and trainer, as run_recbole_llm builds them."""
    from recbole.data import create_dataset
    from recbole.utils import init_logger, init_seed

    from recbole_llm.core.lookup import get_trainer
    from recbole_llm.core.preparation import data_preparation
    from recbole_llm.run.quick_start import build_config, build_model

    config = build_config(model, dataset, config_dict=config_dict, cmd_args=[], profile=profile)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    data = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, data)
    init_seed(config["seed"], config["reproducibility"])
    net = build_model(config, train_data._dataset)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, net)
    return config, data, (train_data, valid_data, test_data), net, trainer


def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _cuda_peak():
    import torch

    return torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None


def _reset_cuda_peak():
    """Start the CUDA peak counter at the measured step (set-up, caches and warm-up are not in it)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _alternate(repeats, device, first, second):
    """Time ``first()`` and ``second()`` in turn, ``repeats`` pairs, the order alternating (A B, B A, ...), so a
    change in machine load hits both sides of a pair alike; returns (first's times, second's times)."""
    times = ([], [])
    for repeat in range(repeats):
        for side in ((0, 1) if repeat % 2 == 0 else (1, 0)):
            _sync(device)
            start = time.perf_counter()
            (first, second)[side]()
            _sync(device)
            times[side].append(time.perf_counter() - start)
    return times


def _summary(times):
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def section_refresh(spec):
    """Laser item refresh vs the backbone forward on the recorded batch shapes."""
    import torch

    from recbole_llm.llm.encode import positions_from_mask
    from recbole_llm.llm.loader import backbone_of

    config, _, _, model, _ = _build("Laser", spec["dataset"], spec["config_dict"], spec["profile"])
    device = config["device"]
    backbone = backbone_of(model.llm)
    shapes = []

    def record(_module, _args, kwargs):
        shapes.append((tuple(kwargs["inputs_embeds"].shape), kwargs["attention_mask"].detach().cpu().clone()))

    model.eval()
    # Untimed first refresh: records the backbone's batch shapes and warms every shape up.
    handle = backbone.register_forward_pre_hook(record, with_kwargs=True)
    model.refresh_item_matrix(force=True, show_progress=False)
    handle.remove()
    n_items = model.n_items - 1
    dtype = next(model.llm.parameters()).dtype
    masks = [mask.to(device) for _, mask in shapes]
    # One random buffer of the largest batch, viewed per batch: the replay holds one batch of inputs at a time,
    # as the refresh does (values do not matter for the timing).
    largest = max(shape[0] * shape[1] * shape[2] for shape, _ in shapes)
    buffer = torch.randn(largest, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype) * 0.02

    def replay():
        for (shape, _), mask in zip(shapes, masks):
            embeds = buffer[:shape[0] * shape[1] * shape[2]].view(shape)
            backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                     use_cache=False)

    _reset_cuda_peak()
    with torch.no_grad():
        replay()  # warm-up of the replay path
        refresh_times, backbone_times = _alternate(
            spec["repeats"], device, lambda: model.refresh_item_matrix(force=True, show_progress=False), replay)
    lengths = [shape[1] for shape, _ in shapes]
    refresh, plain = _summary(refresh_times), _summary(backbone_times)
    pair_ratios = [b / r for b, r in zip(backbone_times, refresh_times)]
    return {"items": n_items, "batches": len(shapes), "batch_size": max(s[0] for s, _ in shapes),
            "mean_T": sum(lengths) / len(lengths), "max_T": max(lengths),
            "llm_layers": int(model.llm.config.num_hidden_layers), "dtype": str(dtype).replace("torch.", ""),
            "refresh": refresh, "backbone": plain,
            "refresh_items_per_s": n_items / refresh["median_s"], "backbone_items_per_s": n_items / plain["median_s"],
            "ratio": statistics.median(pair_ratios), "pair_ratios": pair_ratios, "cuda_peak_mib": _cuda_peak()}


def section_generation(spec):
    """generate_knowledge on a subset of items vs plain model.generate() of the same batches."""
    import torch
    from recbole.data import create_dataset
    from recbole.utils import init_seed

    from recbole_llm.seralm.knowledge import (KnowledgeCache, generation_settings, item_source_texts,
                                              knowledge_key, knowledge_prompts, load_knowledge_llm,
                                              generate_knowledge)
    from recbole_llm.run.quick_start import build_config

    config_dict = dict(spec["config_dict"], knowledge_source="llm")
    if spec.get("gen_batch"):
        config_dict["knowledge_batch_size"] = spec["gen_batch"]
    config = build_config(spec["model"], spec["dataset"], config_dict=config_dict, cmd_args=[],
                          profile=spec["profile"])
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    device = config["device"]
    source_texts = item_source_texts(dataset, config)
    n = len(source_texts) - 1
    count = min(spec["gen_items"], n)
    step = n / count
    chosen = sorted({1 + int(k * step) for k in range(count)})  # evenly spread over the item ids (all lengths)
    llm, tokenizer = load_knowledge_llm(config)
    settings = generation_settings(config)
    batch_size = int(config["knowledge_batch_size"])
    eos = set()
    for value in (getattr(llm.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            eos.update(value if isinstance(value, (list, tuple)) else [value])
    options = dict(max_new_tokens=settings["max_new_tokens"], repetition_penalty=settings["repetition_penalty"],
                   do_sample=False, temperature=None, top_p=None, top_k=None,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))
    # the pipeline's batches: items sorted by text length, knowledge_batch_size per batch
    order = sorted(chosen, key=lambda i: len(source_texts[i]))
    batches = [knowledge_prompts([source_texts[i] for i in order[b:b + batch_size]], tokenizer)
               for b in range(0, len(order), batch_size)]
    special = not (tokenizer.bos_token and all(p.startswith(tokenizer.bos_token) for b in batches for p in b))

    def plain():
        new_tokens = 0
        for prompts in batches:
            batch = tokenizer(prompts, padding=True, add_special_tokens=special, return_tensors="pt").to(device)
            out = llm.generate(**batch, **options)
            new_tokens += int((out[:, batch["input_ids"].size(1):] != tokenizer.pad_token_id).sum())
        return new_tokens

    def others(items):
        wanted = set(items)
        return [i for i in range(1, n + 1) if i not in wanted]

    def pipeline(done):
        with tempfile.TemporaryDirectory() as directory:
            config["knowledge_cache_dir"] = directory
            key, meta = knowledge_key(config["dataset"], source_texts, config)
            # the items in `done` are marked done, so the resumable pipeline generates exactly the others
            KnowledgeCache(directory, key, meta).append_batch(done, [""] * len(done))
            texts = generate_knowledge(dataset, config, llm=llm, tokenizer=tokenizer, progress=False)
        return texts

    with torch.no_grad():  # warm-up of both paths (the pipeline's shared-prefix cache included)
        llm.generate(**tokenizer(batches[0][:2], padding=True, add_special_tokens=special,
                                 return_tensors="pt").to(device), **dict(options, max_new_tokens=2))
    pipeline(others(order[:2]))
    not_chosen = others(chosen)  # outside the clock
    _reset_cuda_peak()
    tokens, texts = 0, None

    def timed_pipeline():
        nonlocal texts
        texts = pipeline(not_chosen)

    def timed_plain():
        nonlocal tokens
        with torch.no_grad():
            tokens = plain()

    pipe_times, plain_times = _alternate(spec["repeats"], device, timed_pipeline, timed_plain)
    pipe, base = _summary(pipe_times), _summary(plain_times)
    prompt_lengths = [len(tokenizer(p, add_special_tokens=special)["input_ids"]) for b in batches for p in b]
    return {"items": len(chosen), "batch_size": batch_size, "batches": len(batches),
            "max_new_tokens": settings["max_new_tokens"], "new_tokens": tokens,
            "mean_prompt_tokens": sum(prompt_lengths) / len(prompt_lengths),
            "llm_layers": int(llm.config.num_hidden_layers),
            "example": next((texts[i] for i in chosen if texts[i]), ""),
            "pipeline": pipe, "plain": base, "pipeline_items_per_s": len(chosen) / pipe["median_s"],
            "plain_items_per_s": len(chosen) / base["median_s"],
            "ratio": statistics.median([b / p for b, p in zip(plain_times, pipe_times)]),
            "cuda_peak_mib": _cuda_peak()}


def section_train(spec):
    """Training samples/s of one model: optimizer steps on real training batches."""
    import torch

    config, _, (train_data, _, _), model, trainer = _build(spec["model"], spec["dataset"], spec["config_dict"],
                                                           spec["profile"])
    device = config["device"]
    if hasattr(model, "refresh_item_matrix"):
        model.refresh_item_matrix(show_progress=False)  # Laser: the epoch-start refresh, timed in "refresh"
    model.train()
    optimizer = trainer.optimizer
    times, load_times, samples = [], [], []
    batches = iter(train_data)
    for step in range(spec["train_batches"] + 1):  # step 0 is the warm-up
        if step == 1:
            _reset_cuda_peak()
        loading = time.perf_counter()
        try:
            interaction = next(batches)
        except StopIteration:
            batches = iter(train_data)
            interaction = next(batches)
        interaction = interaction.to(device)
        _sync(device)
        start = time.perf_counter()
        if step:
            load_times.append(start - loading)
        optimizer.zero_grad()
        losses = model.calculate_loss(interaction)
        loss = sum(losses) if isinstance(losses, tuple) else losses
        loss.backward()
        optimizer.step()
        if hasattr(model, "mark_parameters_updated"):
            model.mark_parameters_updated()
        _sync(device)
        if step:
            times.append(time.perf_counter() - start)
            samples.append(len(interaction))
    total = sum(times)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": spec["model"], "batch_size": int(config["train_batch_size"]), "steps": len(times),
            "samples": sum(samples), "seconds": total, "samples_per_s": sum(samples) / total,
            # with the data loader's batch assembly and the copy to the device, as the trainer sees it
            "samples_per_s_with_loading": sum(samples) / (total + sum(load_times)),
            "median_step_s": statistics.median(times), "trainable_params": trainable,
            "train_sequences": len(train_data.dataset), "cuda_peak_mib": _cuda_peak(),
            "torch_threads": torch.get_num_threads()}


def section_eval(spec):
    """Full-ranking test evaluation of a SeRALM variant and of its base: alternating, warm-up excluded."""
    runs = {}
    for name in (spec["model"], spec["base"]):
        config, _, (_, _, test_data), model, trainer = _build(name, spec["dataset"], spec["configs"][name],
                                                              spec["profile"])
        runs[name] = (trainer, test_data, config["device"])
        trainer.evaluate(test_data, load_best_model=False, show_progress=False)  # warm-up
    times = {name: [] for name in runs}
    for _ in range(spec["repeats"]):
        for name, (trainer, test_data, device) in runs.items():
            _sync(device)
            start = time.perf_counter()
            trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    cuda_peak = _cuda_peak()  # both models' evaluations, before the per-model passes below reset it
    memory = {name: _eval_memory(trainer, test_data, device) for name, (trainer, test_data, device) in runs.items()}
    model, base = _summary(times[spec["model"]]), _summary(times[spec["base"]])
    test_users = len(runs[spec["base"]][1].dataset) if hasattr(runs[spec["base"]][1], "dataset") else None
    return {"model": spec["model"], "base": spec["base"], "seralm": model, "base_time": base,
            "ratio": model["median_s"] / base["median_s"], "test_rows": test_users, "cuda_peak_mib": cuda_peak,
            "seralm_memory": memory[spec["model"]], "base_memory": memory[spec["base"]]}


def _eval_memory(trainer, test_data, device):
    """One model's own memory: its weights and buffers (SeRALM's knowledge vectors are buffers) and, on CUDA, the
    peak one evaluation allocates over what was allocated before it. The child holds both models, so its peak RSS
    cannot tell them apart. On the CPU the evaluation's part is not given: RSS moves with what the allocator keeps
    from earlier evaluations (tried: 0 to 107 MiB for the same evaluation), not with what this one needs."""
    import torch

    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20
    if not str(device).startswith("cuda"):
        return {"weights_mib": weights, "eval_added_cuda_mib": None}
    _sync(device)
    before = torch.cuda.memory_allocated() / 2 ** 20
    _reset_cuda_peak()
    trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    _sync(device)
    return {"weights_mib": weights, "eval_added_cuda_mib": _cuda_peak() - before}


def section_workers(spec):
    """generate_knowledge of the same items: 1 worker (this process, all threads) vs 2 Ray workers (half each)."""
    import torch
    from recbole.data import create_dataset
    from recbole.utils import init_seed

    from recbole_llm.run.quick_start import build_config
    from recbole_llm.seralm.knowledge import KnowledgeCache, generate_knowledge, item_source_texts, knowledge_key

    config_dict = dict(spec["config_dict"], knowledge_source="llm", knowledge_batch_size=spec["workers_batch"])
    config = build_config(spec["model"], spec["dataset"], config_dict=config_dict, cmd_args=[],
                          profile=spec["profile"])
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    source_texts = item_source_texts(dataset, config)
    n = len(source_texts) - 1
    count = min(spec["gen_items"], n)
    chosen = sorted({1 + int(k * n / count) for k in range(count)})
    wanted = set(chosen)
    not_chosen = [i for i in range(1, n + 1) if i not in wanted]
    threads = torch.get_num_threads()
    texts = {}

    def run(workers):
        with tempfile.TemporaryDirectory() as directory:
            config["knowledge_cache_dir"] = directory
            config["llm_workers"] = workers
            config["llm_worker_cpus"] = max(1, threads // workers)
            config["llm_worker_gpus"] = 0 if _device_type(config) == "cpu" else 1.0 / workers
            key, meta = knowledge_key(config["dataset"], source_texts, config)
            KnowledgeCache(directory, key, meta).append_batch(not_chosen, [""] * len(not_chosen))  # only `chosen` left
            texts[workers] = [t for i, t in enumerate(generate_knowledge(dataset, config, progress=False)) if i in wanted]

    one_times, two_times = _alternate(spec["repeats"], config["device"], lambda: run(1), lambda: run(2))
    one, two = _summary(one_times), _summary(two_times)
    return {"items": len(chosen), "batch_size": int(spec["workers_batch"]), "threads": threads,
            "worker_threads": max(1, threads // 2), "llm_layers": config["llm_num_layers"],
            "max_new_tokens": int(config["knowledge_max_new_tokens"]),
            "one": one, "two": two, "one_items_per_s": len(chosen) / one["median_s"],
            "two_items_per_s": len(chosen) / two["median_s"],
            "ratio": statistics.median([a / b for a, b in zip(one_times, two_times)]),
            "same_texts": texts[1] == texts[2], "cuda_peak_mib": _cuda_peak()}


def _device_type(config):
    import torch

    return torch.device(config["device"]).type


CHILD_SECTIONS = {"refresh": section_refresh, "generation": section_generation, "workers": section_workers,
                  "train": section_train, "eval": section_eval}


def child_main(spec_path):
    common.apply_thread_cap()
    with open(spec_path) as f:
        spec = json.load(f)
    os.chdir(spec["work_dir"])
    result = CHILD_SECTIONS[spec["section"]](spec)
    import torch

    result["torch_threads"] = torch.get_num_threads()  # what the numbers were taken with (--threads or torch's)
    common.write_json(spec["result_path"], result)


# ------------------------------------------------------------------------------------------ parent side
def jobs(args, mode):
    """(name, spec) of every child this invocation runs."""
    sizes = SIZES[_mode_key(mode)]
    repeats = args.repeats or sizes["repeats"]
    work_dir = args.work_dir or common.default_work_dir(mode)
    extra = common.parse_overrides(args.set)
    base = {"dataset": args.dataset, "profile": args.profile, "repeats": repeats, "work_dir": work_dir}

    def conf(model):
        return dict(model_overrides(model, mode), **extra, seed=args.seed, show_progress=False,
                    checkpoint_dir=os.path.join(work_dir, "saved"))

    out = []
    if "refresh" in args.sections:
        out.append(("refresh", dict(base, section="refresh", config_dict=conf("Laser"))))
    if "generation" in args.sections:
        model = "SASRecSeRALM"
        gen_conf = {k: v for k, v in conf(model).items() if k != "knowledge_source"}
        out.append(("generation", dict(base, section="generation", model=model, config_dict=gen_conf,
                                       gen_items=args.gen_items or sizes["gen_items"], gen_batch=sizes["gen_batch"])))
    if "workers" in args.sections:
        model = "SASRecSeRALM"
        gen_conf = {k: v for k, v in conf(model).items() if k != "knowledge_source"}
        out.append(("workers", dict(base, section="workers", model=model, config_dict=gen_conf,
                                    gen_items=args.gen_items or sizes["gen_items"],
                                    workers_batch=sizes["workers_batch"])))
    if "train" in args.sections:
        models = args.models or (QUICK_TRAIN_MODELS if mode.startswith("quick") else TRAIN_MODELS)
        for model in models:
            out.append((f"train:{model}", dict(base, section="train", model=model, config_dict=conf(model),
                                               train_batches=args.train_batches or sizes["train_batches"])))
    if "eval" in args.sections:
        pairs = [p for p in EVAL_PAIRS if not args.models or p[0] in args.models or p[1] in args.models]
        for model, base_model in pairs:
            out.append((f"eval:{model}", dict(base, section="eval", model=model, base=base_model,
                                              repeats=args.repeats or sizes["eval_repeats"],
                                              configs={model: conf(model), base_model: conf(base_model)})))
    return out


def run_jobs(args, mode, on_result=None):
    """Run each job in its own child; ``on_result(results)`` after each, so a kill from outside (a device's time
    limit) still leaves the table of the jobs that finished."""
    results = {}
    for index, (name, spec) in enumerate(jobs(args, mode), 1):
        slug = name.replace(":", "-")
        spec_path = os.path.join(spec["work_dir"], "speed", f"{slug}.json")
        result_path = os.path.join(spec["work_dir"], "speed", f"{slug}.result.json")
        log_path = os.path.join(spec["work_dir"], "logs", f"speed-{slug}.log")
        spec["result_path"] = result_path
        if os.path.exists(result_path):
            os.remove(result_path)
        common.write_json(spec_path, spec)
        print(f"[{index}] {name} ...", end=" ", flush=True)
        load_start = common.load_average()
        rc, wall, peak = common.run_child([sys.executable, os.path.abspath(__file__), "--child", spec_path],
                                          log_path, env=common.child_env(args.threads), timeout=args.timeout)
        record = {"name": name, "wall_s": round(wall, 1), "peak_rss_mib": round(peak, 1),
                  "loadavg_start": load_start, "loadavg_end": common.load_average(), "log": log_path}
        if rc == 0 and os.path.isfile(result_path):
            with open(result_path) as f:
                record.update(status="ok", **json.load(f))
            print(f"done in {wall:.0f} s", flush=True)
        else:
            record.update(status="failed", returncode=rc, error=common.log_tail(log_path))
            print(f"FAILED (exit {rc}; log {log_path})", flush=True)
        results[name] = record
        if on_result:
            on_result(results)
    return results


def _f(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def _mem(r):
    cuda = r.get("cuda_peak_mib")
    return f"{r['peak_rss_mib']:.0f}" + (f" / {cuda:.0f}" if cuda is not None else "")


def _own_mem(memory):
    """weights (+ the evaluation's CUDA peak over them, where measured), MiB."""
    if not memory:
        return "-"  # a result from before the per-model measurement
    cuda = memory.get("eval_added_cuda_mib")
    return f"{memory['weights_mib']:.1f}" + (f" + {cuda:.0f}" if cuda is not None else "")


def render(results, mode, env, command, started, finished, loads, dataset, standins=""):
    mem_header = "peak RSS (MiB)" + (" / CUDA peak" if env["gpu"] != "none" else "")
    out = [f"# Speed benchmark ({mode}, {dataset})", "",
           common.environment_markdown(env, command, started, finished, loads), ""]
    out += [standins, ""] if standins else []
    out += ["Median over repeats (min in brackets), warm-up excluded; each row ran in its own process, whose peak "
            "resident memory is given. The load average is the machine's (other work on it slows every number).",
            ""]
    ok = {k: v for k, v in results.items() if v.get("status") == "ok"}
    if "refresh" in ok:
        r = ok["refresh"]
        out += ["## Laser item-embedding refresh vs the LLM backbone forward (same batch shapes)", "",
                common.markdown_table(
                    ["items", "batches x B", "mean / max T", "LLM layers", "refresh items/s", "backbone items/s",
                     "ratio (ceiling 1.0)", mem_header, "load avg"],
                    [[r["items"], f"{r['batches']} x {r['batch_size']}", f"{r['mean_T']:.0f} / {r['max_T']}",
                      r["llm_layers"],
                      f"{r['refresh_items_per_s']:.1f} ({r['items'] / r['refresh']['min_s']:.1f})",
                      f"{r['backbone_items_per_s']:.1f} ({r['items'] / r['backbone']['min_s']:.1f})",
                      f"{r['ratio']:.2f}", _mem(r), r["loadavg_end"][0] if r["loadavg_end"] else "-"]]), ""]
    if "generation" in ok:
        r = ok["generation"]
        out += ["## SeRALM knowledge generation vs plain `generate()` (same prompts and batches)", "",
                common.markdown_table(
                    ["items", "batches x B", "prompt tokens (mean)", "new tokens (max / total)", "LLM layers",
                     "pipeline items/s", "plain items/s", "ratio (1.0 = plain)", mem_header, "load avg"],
                    [[r["items"], f"{r['batches']} x {r['batch_size']}", f"{r['mean_prompt_tokens']:.0f}",
                      f"{r['max_new_tokens']} / {r['new_tokens']}", r["llm_layers"],
                      f"{r['pipeline_items_per_s']:.2f} ({r['items'] / r['pipeline']['min_s']:.2f})",
                      f"{r['plain_items_per_s']:.2f} ({r['items'] / r['plain']['min_s']:.2f})",
                      f"{r['ratio']:.2f}", _mem(r), r["loadavg_end"][0] if r["loadavg_end"] else "-"]]), "",
                f"Example knowledge text: \"{r['example'][:160]}\"", ""]
    if "workers" in ok:
        r = ok["workers"]
        out += ["## SeRALM knowledge generation on 2 Ray workers vs 1 (same items, same total threads)", "",
                common.markdown_table(
                    ["items", "batch", "new tokens", "threads: 1 worker / each of 2", "1 worker items/s",
                     "2 workers items/s", "ratio 2 / 1", "same texts", mem_header, "load avg"],
                    [[r["items"], r["batch_size"], r["max_new_tokens"], f"{r['threads']} / {r['worker_threads']}",
                      f"{r['one_items_per_s']:.2f} ({r['items'] / r['one']['min_s']:.2f})",
                      f"{r['two_items_per_s']:.2f} ({r['items'] / r['two']['min_s']:.2f})",
                      f"{r['ratio']:.2f}", "yes" if r["same_texts"] else "no", _mem(r),
                      r["loadavg_end"][0] if r["loadavg_end"] else "-"]]), "",
                "End to end: each side loads its LLM (the 2 workers one copy each) and the workers' side starts a "
                "local Ray. The RSS column is the child's only; Ray's worker processes are not in it.", ""]
    trains = [v for k, v in ok.items() if k.startswith("train:")]
    if trains:
        out += ["## Training throughput", "",
                common.markdown_table(
                    ["model", "batch", "steps", "samples/s", "with loading", "median step (s)", "trainable params",
                     mem_header, "load avg"],
                    [[r["model"], r["batch_size"], r["steps"], f"{r['samples_per_s']:.1f}",
                      _f(r.get("samples_per_s_with_loading"), 1),
                      _f(r["median_step_s"], 3), f"{r['trainable_params']:,}", _mem(r),
                      r["loadavg_end"][0] if r["loadavg_end"] else "-"] for r in trains]), ""]
    evals = [v for k, v in ok.items() if k.startswith("eval:")]
    if evals:
        out += ["## Full-ranking evaluation time: SeRALM variant vs its base (paper: about 1.2x)", "",
                common.markdown_table(
                    ["model", "base", "model (s)", "base (s)", "ratio", "model memory (MiB)", "base memory (MiB)",
                     mem_header + ", both", "load avg"],
                    [[r["model"], r["base"], f"{r['seralm']['median_s']:.2f} ({r['seralm']['min_s']:.2f})",
                      f"{r['base_time']['median_s']:.2f} ({r['base_time']['min_s']:.2f})", f"{r['ratio']:.2f}x",
                      _own_mem(r.get("seralm_memory")), _own_mem(r.get("base_memory")),
                      _mem(r), r["loadavg_end"][0] if r["loadavg_end"] else "-"] for r in evals]), "",
                "Model and base memory: each one's weights and buffers (SeRALM's knowledge vectors included); on "
                "CUDA + the peak one evaluation of that model alone allocates over them. The last memory column is "
                "the child's, which held both models; on the CPU the evaluations' own share of it is not "
                "separable (RSS follows what the allocator keeps, not what one evaluation needs).", ""]
    failed = {k: v for k, v in results.items() if v.get("status") != "ok"}
    if failed:
        out += ["## Failed", ""]
        for name, r in failed.items():
            tail = (r.get("error") or "").strip().splitlines()[-1:] or [""]
            out.append(f"- {name}: exit {r.get('returncode')}: `{tail[0][:200]}` (log: {r['log']})")
        out.append("")
    return "\n".join(out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="default amazon-scientific (quick: ml-100k)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--models", nargs="+", default=None, help="models for the train/eval sections")
    parser.add_argument("--quick", action="store_true", help="small counts, ml-100k, 1 repeat")
    parser.add_argument("--gpu", action="store_true", help='the papers\' sizes (profile "paper") on a CUDA GPU')
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--gen-items", type=int, default=None, help="items generated in the generation section")
    parser.add_argument("--train-batches", type=int, default=None, help="timed optimizer steps per model")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per child (default: torch's)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds after which one child is killed")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args, None
    mode = common.resolve_mode(args)
    args.dataset = args.dataset or ("ml-100k" if args.quick else "amazon-scientific")
    return args, mode


def main(argv=None):
    args, mode = parse_args(argv)
    if args.child:
        return child_main(args.child)
    env = common.environment()
    started, loads = common.now_utc(), [common.load_average()]
    md_path = os.path.join(args.results_dir, f"speed-{mode}.md")

    def write(results, final=False):
        ends = loads + [common.load_average()]
        common.write_json(os.path.join(args.results_dir, f"speed-{mode}.json"), results)
        text = render(results, mode, env, common.command_line(), started, common.now_utc(), ends, args.dataset,
                      common.standin_warning(common.parse_overrides(args.set)))
        if not final:
            text += f"\n**Partial: {len(results)} of the planned jobs have finished so far.**\n"
        text += common.notes_section(os.path.join(args.results_dir, f"speed-{mode}-notes.md"))
        common.write_text(md_path, text)

    results = run_jobs(args, mode, on_result=write)
    write(results, final=True)
    print(f"table: {md_path}")
    return md_path


if __name__ == "__main__":
    main()

"""Hyperparameter search over plugin or RecBole models: RecBole's HyperTuning (hyperopt) or Ray Tune.

The search space is a RecBole hyper-parameter file, one parameter a line:
    learning_rate loguniform -8,0        (hyperopt convention: bounds of log(value))
    hidden_size choice [32,64]
    dropout_prob uniform 0.1,0.5
    n_layers quniform 1,3,1
"""

import ast
import functools
import json
import math
import os

import pandas as pd
from recbole.trainer import HyperTuning

from recbole_llm.core.errors import ConfigError
from recbole_llm.core.fileio import atomic_write_text
from recbole_llm.core.locate import bundled_dataset_dir
from recbole_llm.run import quick_start

KINDS = ("choice", "uniform", "quniform", "loguniform")


def read_hyper_file(path):
    """[(name, kind, values)] from a RecBole hyper-parameter file, with a clear error per bad line."""
    if not os.path.isfile(path):
        raise ConfigError(f"params_file '{path}' does not exist.")
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) < 3 or parts[1] not in KINDS:
                raise ConfigError(f"{path}:{lineno}: expected '<name> <{'|'.join(KINDS)}> <values>', "
                                  f"got '{line.strip()}'")
            raw = "".join(parts[2:])
            try:
                values = ast.literal_eval(raw) if parts[1] == "choice" else [float(v) for v in raw.split(",")]
            except (ValueError, SyntaxError):
                raise ConfigError(f"{path}:{lineno}: cannot read values '{raw}' of {parts[0]}") from None
            entries.append((parts[0], parts[1], values))
    if not entries:
        raise ConfigError(f"params_file '{path}' defines no parameter.")
    return entries


def ray_search_space(entries):
    from ray import tune  # heavy: ray, ~0.4 s to import; only Ray Tune searches need it

    space = {}
    for name, kind, values in entries:
        if kind == "choice":
            space[name] = tune.choice(list(values))
        elif kind == "uniform":
            space[name] = tune.uniform(*values)
        elif kind == "quniform":
            space[name] = tune.quniform(*values)
        else:  # hyperopt's loguniform bounds are logs of the values
            space[name] = tune.loguniform(math.exp(values[0]), math.exp(values[1]))
    return space


def results_table(rows, columns):
    """Markdown table of trial rows (dicts)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col, "")
            cells.append(f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(path, text):
    atomic_write_text(path, text + "\n")


def _absolute(paths):
    return [os.path.abspath(p) for p in paths] if paths else []


def run_hyperopt(model, dataset, params_file, config_files=None, algo="exhaustive", max_evals=100,
                 early_stop=10, output_file="hyper_result.md", profile="none", config_dict=None, display_file=None):
    """RecBole's HyperTuning with the plugin's objective; returns the HyperTuning object.

    ``display_file``: HTML plot of the trials (RecBole's ``plot_hyper``; needs plotly)."""
    entries = read_hyper_file(params_file)
    fixed = dict(config_dict or {})
    trials = []  # (params dict, result) per trial: RecBole's params2result keys are strings that cannot be
    # split back reliably (a list-valued choice such as [64, 64] holds the separator ", ")

    def objective(params, fixed_config_files):
        result = quick_start.objective_function(dict(fixed, **params), fixed_config_files, model=model,
                                                dataset=dataset, profile=profile)
        trials.append((dict(params), result))
        return result

    tuner = HyperTuning(objective, algo=algo, params_file=params_file, fixed_config_file_list=_absolute(config_files),
                        display_file=display_file, max_evals=max_evals, early_stop=early_stop)
    tuner.run()
    names = [name for name, _, _ in entries]
    rows = []
    for params, result in trials:
        row = {name: params[name] for name in names if name in params}
        row["best_valid_score"] = float(result["best_valid_score"])
        row.update({f"test_{k}": float(v) for k, v in result["test_result"].items()})
        rows.append(row)
    metrics = sorted({k for row in rows for k in row if k.startswith("test_")})
    table = results_table(rows, names + ["best_valid_score"] + metrics)
    print(table)
    print(f"best params: {tuner.best_params}  (valid score {tuner.best_score})")
    _write(output_file, table)
    return tuner


def _ray_trial(config, model, dataset, config_files, profile, report):
    quick_start.objective_function(config, config_files, model=model, dataset=dataset, profile=profile,
                                   report_to_ray=report)


def _last_report(result):
    """A trial's final report. Ray's progress table keeps only the keys of the first report (the per-epoch
    ones), so read the last line of the trial's result.json, which has every key."""
    path = os.path.join(str(result.log_dir), "result.json")
    if os.path.isfile(path):
        with open(path) as f:
            lines = [line for line in f if line.strip()]
        if lines:
            return json.loads(lines[-1])
    return dict(result.metrics or {})


def run_ray(model, dataset, params_file, config_files=None, num_samples=4, cpus_per_trial=1, gpus_per_trial=0,
            address=None, report="epoch", max_epochs=None, output_file="hyper_result.md", profile="none",
            config_dict=None, local_dir=None, valid_bigger=True):
    """Ray Tune search (ASHA early stopping on the validation score); returns the result DataFrame."""
    # heavy: ray takes ~0.4 s to import; only Ray Tune searches need it
    import ray
    from ray import air, tune
    from ray.tune.schedulers import ASHAScheduler

    space = ray_search_space(read_hyper_file(params_file))
    fixed = dict(config_dict or {})
    # Trials run in their own working directories: every path they see must be absolute.
    fixed.setdefault("checkpoint_dir", os.path.abspath("saved"))
    for key in ("data_path", "checkpoint_dir", "knowledge_cache_dir"):
        if key in fixed:
            fixed[key] = os.path.abspath(fixed[key])
    if "data_path" not in fixed:
        bundled = bundled_dataset_dir(dataset)
        fixed["data_path"] = os.path.dirname(bundled) if bundled else os.path.abspath("dataset")
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError) as err:
            raise ConfigError(f"Cannot reach the Ray cluster at address '{address}': {err}") from None
    elif not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    trainable = tune.with_resources(
        functools.partial(_ray_trial, model=model, dataset=dataset, config_files=_absolute(config_files),
                          profile=profile, report=report),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
    # One report per evaluated epoch plus the final one with the test metrics: ASHA must let a trial that
    # was not stopped early reach that last report.
    scheduler = ASHAScheduler(max_t=(max_epochs or 100) + 1, grace_period=1) if report == "epoch" else None
    tuner = tune.Tuner(
        trainable,
        param_space={**fixed, **space},
        tune_config=tune.TuneConfig(num_samples=num_samples, scheduler=scheduler, metric="valid_score",
                                    mode="max" if valid_bigger else "min"),
        run_config=air.RunConfig(local_dir=os.path.abspath(local_dir or "ray_results"), verbose=1,
                                 name=f"{model}-{dataset}"),
    )
    grid = tuner.fit()
    rows = []
    for result in grid:
        last = _last_report(result)
        row = {name: result.config.get(name) for name in space}
        row.update({k: v for k, v in last.items() if k == "valid_score" or k.startswith("test_")})
        if result.error is not None:
            row["error"] = type(result.error).__name__
        rows.append(row)
    frame = pd.DataFrame(rows)
    columns = list(space) + [c for c in frame.columns if c not in space]
    table = results_table(rows, columns)
    print(table)
    best = grid.get_best_result(metric="valid_score", mode="max" if valid_bigger else "min", scope="all")
    print(f"best params: { {k: best.config[k] for k in space} }")
    _write(output_file, table)
    return frame

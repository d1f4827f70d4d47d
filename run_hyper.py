"""Hyperparameter search, RecBole style.

    python run_hyper.py --model=Laser --dataset=amazon-scientific --params_file=properties/hyper/laser.hyper
    python run_hyper.py ... --tool=ray --num_samples=8 --cpus_per_trial=2 [--address=HOST:PORT]
As in RecBole's run_hyper.py: --tool is case-insensitive (Hyperopt, Ray), --model/--dataset may come from
--config_files instead, and --display_file writes hyperopt's HTML plot of the trials.
Extra --key=value flags are fixed config values for every trial.
"""

import argparse

from recbole_llm.core.errors import UserInputError
from recbole_llm.core.locate import PROFILES
from recbole_llm.run.hyper import read_hyper_file, run_hyperopt, run_ray


def parse_value(text):
    import yaml

    return yaml.safe_load(text)


def model_and_dataset(args, config_files):
    """--model/--dataset, else the last value set in the config files, as RecBole's run_hyper.py."""
    from recbole_llm.run.quick_start import read_config_files

    found = {}
    for _, content in read_config_files(config_files or []):
        found.update({k: content[k] for k in ("model", "dataset") if k in content})
    model = args.model or found.get("model")
    dataset = args.dataset or found.get("dataset")
    missing = [name for name, value in (("model", model), ("dataset", dataset)) if not value]
    if missing:
        raise SystemExit(f"error: no {' and no '.join(missing)} given: pass --{missing[0]}=... or set "
                         f"'{missing[0]}:' in one of the --config_files")
    return model, dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name (or 'model:' in a config file)")
    parser.add_argument("--dataset", default=None, help="dataset name (or 'dataset:' in a config file)")
    parser.add_argument("--params_file", required=True, help="RecBole hyper-parameter file")
    parser.add_argument("--config_files", default=None, help="space-separated fixed config files")
    parser.add_argument("--profile", default="auto", choices=PROFILES)
    parser.add_argument("--tool", default="hyperopt", type=str.lower, choices=["hyperopt", "ray"],
                        help="hyperopt or ray (any case, as RecBole's Hyperopt/Ray)")
    parser.add_argument("--algo", default="exhaustive", choices=["exhaustive", "random", "bayes"],
                        help="hyperopt search algorithm")
    parser.add_argument("--max_evals", type=int, default=100, help="hyperopt trials (random/bayes)")
    parser.add_argument("--early_stop", type=int, default=10, help="hyperopt: stop after N trials without gain")
    parser.add_argument("--num_samples", type=int, default=4, help="ray: number of trials")
    parser.add_argument("--cpus_per_trial", type=float, default=1)
    parser.add_argument("--gpus_per_trial", type=float, default=0)
    parser.add_argument("--address", default=None, help="ray: address of an existing cluster")
    parser.add_argument("--report", default="epoch", choices=["epoch", "trial"],
                        help="ray: report after every evaluation (ASHA can stop trials) or once per trial")
    parser.add_argument("--output_file", default="hyper_result.md", help="results table (Markdown)")
    parser.add_argument("--display_file", default=None,
                        help="hyperopt: HTML plot of the trials (needs plotly); ignored for ray")
    args, extra = parser.parse_known_args(argv)
    fixed = {}
    for item in extra:
        if not (item.startswith("--") and "=" in item):
            raise SystemExit(f"error: unrecognised argument '{item}'; fixed config values are --key=value")
        key, value = item[2:].split("=", 1)
        fixed[key] = parse_value(value)
    from recbole_llm.core.locate import resolve_profile
    from recbole_llm.run.quick_start import split_config_files

    profile = resolve_profile(args.profile)
    config_files = split_config_files(args.config_files)
    try:
        model, dataset = model_and_dataset(args, config_files)
        if args.tool == "hyperopt":
            run_hyperopt(model, dataset, args.params_file, config_files, args.algo, args.max_evals,
                         args.early_stop, args.output_file, profile, fixed, display_file=args.display_file)
        else:
            if args.display_file:
                print(f"note: --display_file={args.display_file} is for hyperopt; ignored with --tool=ray")
            from recbole_llm.run.quick_start import build_config

            # Minimise or maximise as the config's valid metric says (RMSE/MAE: smaller is better).
            config = build_config(model, dataset, config_files, dict(fixed), cmd_args=[], profile=profile)
            searched = {name for name, _, _ in read_hyper_file(args.params_file)}
            max_epochs = None if "epochs" in searched else config["epochs"]  # ASHA's horizon
            run_ray(model, dataset, args.params_file, config_files, args.num_samples,
                    args.cpus_per_trial, args.gpus_per_trial, args.address, args.report,
                    max_epochs, args.output_file, profile, fixed,
                    valid_bigger=bool(config["valid_metric_bigger"]))
    except UserInputError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()

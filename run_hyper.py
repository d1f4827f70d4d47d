"""Hyperparameter search, RecBole style.

    python run_hyper.py --model=Laser --dataset=amazon-scientific --params_file=properties/hyper/laser.hyper
    python run_hyper.py ... --tool=ray --num_samples=8 --cpus_per_trial=2 [--address=HOST:PORT]
Extra --key=value flags are fixed config values for every trial.
"""

import argparse

from recbole_llm.errors import UserInputError
from recbole_llm.hyper import run_hyperopt, run_ray


def parse_value(text):
    import yaml

    return yaml.safe_load(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params_file", required=True, help="RecBole hyper-parameter file")
    parser.add_argument("--config_files", default=None, help="space-separated fixed config files")
    parser.add_argument("--profile", default="auto", choices=["auto", "cpu", "paper", "none"])
    parser.add_argument("--tool", default="hyperopt", choices=["hyperopt", "ray"])
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
    args, extra = parser.parse_known_args(argv)
    fixed = {}
    for item in extra:
        if not (item.startswith("--") and "=" in item):
            raise SystemExit(f"error: unrecognised argument '{item}'; fixed config values are --key=value")
        key, value = item[2:].split("=", 1)
        fixed[key] = parse_value(value)
    from recbole_llm.data.locate import resolve_profile

    profile = resolve_profile(args.profile)
    config_files = args.config_files.split() if args.config_files else None
    try:
        if args.tool == "hyperopt":
            run_hyperopt(args.model, args.dataset, args.params_file, config_files, args.algo, args.max_evals,
                         args.early_stop, args.output_file, profile, fixed)
        else:
            run_ray(args.model, args.dataset, args.params_file, config_files, args.num_samples,
                    args.cpus_per_trial, args.gpus_per_trial, args.address, args.report,
                    fixed.get("epochs"), args.output_file, profile, fixed)
    except UserInputError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()

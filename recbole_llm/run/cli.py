"""The command line: ``python run_recbole_llm.py`` and the ``recbole-llm`` console script.

``--model= --dataset= --config_files= --profile=`` plus any ``--key=value`` config flag runs a model
(``quick_start.run_recbole_llm``), ``--nproc N`` under DDP, ``--recommend`` / ``recommend`` writes recommendations
of a trained checkpoint (``recommendations.main``). A user's mistake (``recbole_llm.core.errors.UserInputError``) ends
with its message, not a traceback.
"""

import argparse
import os
import sys

from recbole_llm.core.errors import UserInputError
from recbole_llm.core.locate import PROFILES
from recbole_llm.core.registry import get_model
from recbole_llm.run import quick_start
from recbole_llm.run.distributed import spawn_ddp
from recbole_llm.run.recommendations import main as recommend_main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Run a recbole_llm (or RecBole) model. Extra --key=value flags override config keys.")
    parser.add_argument("--model", "-m", type=str, default="Laser", help="model name, e.g. Laser, SASRecSeRALM, SASRec")
    parser.add_argument("--dataset", "-d", type=str, default="amazon-scientific", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated config files")
    parser.add_argument("--profile", type=str, default="auto", choices=PROFILES,
                        help="model size profile: cpu (small, for 2-core runs), cpu-long (cpu plus a longer schedule, "
                             "where a model has one), paper (the papers' sizes), auto = paper on CUDA, cpu otherwise; "
                             "none = only the model YAML defaults")
    parser.add_argument("--nproc", type=int, default=1, help="number of DDP processes on this machine")
    parser.add_argument("--ip", type=str, default="localhost", help="master address for DDP")
    parser.add_argument("--port", type=str, default="5678", help="master port for DDP")
    parser.add_argument("--world_size", type=int, default=-1, help="total DDP processes (all nodes)")
    parser.add_argument("--group_offset", type=int, default=0, help="global rank offset of this node")
    return parser.parse_known_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--recommend" in argv or argv[:1] == ["recommend"]:
        return _recommend(argv[1:] if argv[:1] == ["recommend"] else argv)
    args, extra = parse_args(argv)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        raise SystemExit(f"error: unrecognised arguments {bad}; config keys are given as --key=value")
    config_files = quick_start.split_config_files(args.config_files)
    try:
        get_model(args.model)
        if args.nproc == 1 and args.world_size <= 0:
            return quick_start.run_recbole_llm(args.model, args.dataset, config_files, cmd_args=extra,
                                               profile=args.profile)
        return spawn_ddp(args, config_files, extra)
    except UserInputError as err:
        # A user's mistake gets its message, not a traceback (RECBOLE_LLM_DEBUG=1 shows it); errors are typed where
        # they are raised (recbole_llm.core.errors), RecBole's config ValueErrors by the plugin's Config.
        if os.environ.get("RECBOLE_LLM_DEBUG"):
            raise
        raise SystemExit(f"error: {err}") from None


def _recommend(argv):
    try:
        return recommend_main(argv)
    except UserInputError as err:
        if os.environ.get("RECBOLE_LLM_DEBUG"):
            raise
        raise SystemExit(f"error: {err}") from None


def cli(argv=None):
    """The ``recbole-llm`` console script: like ``main`` but returns None, so the wrapper's
    ``sys.exit(cli())`` exits 0 after a successful run (``sys.exit(dict)`` would print the dict and exit 1)."""
    main(argv)


if __name__ == "__main__":
    main()

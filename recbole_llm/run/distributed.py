"""``--nproc N``: RecBole's DDP with plugin models, on CUDA (NCCL) or on the CPU (gloo)."""

import os

import torch.multiprocessing as mp

from recbole_llm.run.quick_start import build_config, run_recbole_llms


def spawn_ddp(args, config_files, cmd_args):
    """Spawn ``args.nproc`` processes on this node; returns rank 0's result dict (None if it had none)."""
    # RecBole's ranks each create ./log/<model>, log_tensorboard/ and the checkpoint dir with a check-then-
    # mkdir that races (FileExistsError in one rank); create them once here. Building the config here also
    # reports a bad key before any process is spawned.
    config = build_config(args.model, args.dataset, config_files, None, cmd_args, args.profile)
    for directory in (os.path.join("log", config["model"]), "log_tensorboard", config["checkpoint_dir"]):
        os.makedirs(directory, exist_ok=True)
    world_size = args.world_size if args.world_size > 0 else args.nproc
    queue = mp.get_context("spawn").SimpleQueue()
    kwargs = {
        "config_dict": {"world_size": world_size, "ip": args.ip, "port": args.port, "nproc": args.nproc,
                        "offset": args.group_offset},
        "queue": queue,
        "cmd_args": cmd_args,
        "profile": args.profile,
    }
    mp.spawn(run_recbole_llms, args=(args.model, args.dataset, config_files, kwargs), nprocs=args.nproc,
             join=True)
    return None if queue.empty() else queue.get()

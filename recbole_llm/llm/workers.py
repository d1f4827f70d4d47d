"""LLM work over a large catalog spread across Ray actors, each holding its own copy of the model.

``WorkerPool`` starts ``n`` actors of a worker class (``num_cpus``/``num_gpus`` each; a local Ray unless
``ray_address`` names a cluster) and runs tasks on them: the caller hands out the same batches one process
would run and stores each result as it arrives (in the run's resumable cache), so the output is the
single-process output and progress survives a lost worker. A task on a worker that dies is given to a live
worker; when none is left, ``WorkersLost`` says what was kept and that a rerun does only the rest.

Config keys (recbole_llm/llm/LLM.yaml documents them): ``llm_workers`` (1 = no Ray, the work runs in this process),
``llm_worker_cpus``, ``llm_worker_gpus`` (~ = 1 on a CUDA machine, else 0), ``ray_address``.
"""

import logging
import os
from collections import deque

import torch

from recbole_llm.core.errors import ConfigError
from recbole_llm.core.keys import llm_get

logger = logging.getLogger(__name__)


class WorkersLost(RuntimeError):
    """Every worker died before the work was done; what finished is stored."""


def worker_settings(config):
    """(workers, cpus per worker, gpus per worker, ray address) from the config, checked."""
    workers = llm_get(config, "llm_workers")
    cpus = llm_get(config, "llm_worker_cpus")
    gpus = llm_get(config, "llm_worker_gpus")
    for key, value in (("llm_workers", workers), ("llm_worker_cpus", cpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    if gpus is None:
        gpus = 1 if torch.cuda.is_available() else 0
    if not isinstance(gpus, (int, float)) or isinstance(gpus, bool) or gpus < 0:
        raise ConfigError(f"llm_worker_gpus must be a number >= 0 (a fraction shares a GPU) or ~, got {gpus!r}")
    return workers, cpus, gpus, llm_get(config, "ray_address")


def start_ray(address=None, num_cpus=1):
    """(ray, started): Ray as it runs, else started here, locally with ``num_cpus`` (rounded up; Ray finds the GPUs
    itself) or connected to the cluster at ``address``."""
    import ray  # heavy: ray takes ~0.4 s to import; only llm_workers > 1 needs it

    if ray.is_initialized():
        return ray, False
    init = dict(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                logging_level=logging.WARNING)
    if address is None:
        init["num_cpus"] = max(int(-(-num_cpus // 1)), 1)
    ray.init(**init)
    return ray, True


def stop_ray(ray, started):
    """Shut down a Ray that ``start_ray`` started (one that was running before is left alone); returns False."""
    if started and ray.is_initialized():
        ray.shutdown()
    return False


class WorkerPool:
    """``n`` Ray actors of ``worker_class(*args)``; ``run`` maps tasks over them."""

    def __init__(self, worker_class, args, n, num_cpus=1, num_gpus=0, ray_address=None, in_flight=2):
        self._ray, self._owns_ray = start_ray(ray_address, n * num_cpus)
        ray = self._ray
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(worker_class)
        self.actors = [remote.remote(*args) for _ in range(int(n))]
        self.in_flight = int(in_flight)

    def put(self, value):
        """A Ray object reference of ``value``: sent to the workers once, whatever the number of tasks using it."""
        return self._ray.put(value)

    def run(self, tasks, method, on_result, progress=None):
        """Call ``actor.<method>(*task)`` for every task and ``on_result(task, result)`` in the order results
        arrive; at most ``in_flight`` tasks wait per actor. ``progress(task)`` after each stored result."""
        ray = self._ray
        queue = deque(tasks)
        alive = list(self.actors)
        load = {id(actor): 0 for actor in alive}
        pending = {}  # future -> (actor, task)
        lost = []
        while queue or pending:
            for actor in alive:
                while queue and load[id(actor)] < self.in_flight:
                    task = queue.popleft()
                    pending[getattr(actor, method).remote(*task)] = (actor, task)
                    load[id(actor)] += 1
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            actor, task = pending.pop(done[0])
            load[id(actor)] -= 1
            try:
                result = ray.get(done[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as err:
                if actor in alive:
                    alive.remove(actor)
                    logger.warning(f"LLM worker lost ({type(err).__name__}); {len(alive)} left")
                (queue.appendleft if alive else lost.append)(task)
                continue
            on_result(task, result)
            if progress is not None:
                progress(task)
        if lost or queue:
            raise WorkersLost(f"all {len(self.actors)} LLM workers died; {len(lost) + len(queue)} task(s) were not "
                              "done. Everything that finished is stored: rerun to do only the rest.")

    def close(self):
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors = []
        self._owns_ray = stop_ray(ray, self._owns_ray)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def set_worker_threads(num_cpus):
    """Torch threads of a worker process: its share of the CPUs (Ray leaves OMP_NUM_THREADS at 1)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, int(num_cpus)))

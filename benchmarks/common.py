"""Shared pieces of the benchmarks: environment report, child processes with their peak memory, JSONL
records, Markdown tables.

Every measured step runs in its own child process (started by the benchmark script itself with a hidden
``--child`` flag): a crash or a leak in one run cannot spoil the next, and ``os.wait4`` gives that child's
own peak resident memory (the largest of it and the processes it waited for, as the kernel counts it).
"""

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


def default_work_dir(mode):
    """Checkpoints, logs and caches of benchmark runs: outside the repository, under the plugin cache."""
    base = os.environ.get("RECBOLE_LLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "recbole_llm")
    return os.path.join(os.path.abspath(base), "benchmarks", mode)


def now_utc():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- machine
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def _version(module):
    try:
        return __import__(module).__version__
    except Exception:  # not installed or no version attribute
        return "n/a"


def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_DIR,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + (" (uncommitted changes in tracked files)" if dirty else "") if commit else "n/a"
    except (OSError, subprocess.SubprocessError):
        return "n/a"


def environment():
    """Machine and versions, as plain values (for the Markdown header and the JSONL records)."""
    import torch

    gpu = "none"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / 2 ** 30:.0f} GiB)"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "recbole": _version("recbole"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "recbole_llm": _version("recbole_llm"),
        "git_commit": _git_commit(),
    }


def environment_markdown(env, command, started, finished, loads):
    """The header every results file starts with: what ran, where, with which versions."""
    lines = [
        f"- command: `{command}`",
        f"- run: {started} to {finished}; load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}",
        f"- machine: {env['cpu']}, {env['cores']} cores ({env['usable_cores']} usable), "
        f"{env['memory_gib']} GiB RAM, GPU: {env['gpu']}, {env['os']}",
        f"- versions: python {env['python']}, torch {env['torch']}, recbole {env['recbole']}, transformers "
        f"{env['transformers']}, peft {env['peft']}, recbole_llm {env['recbole_llm']}, git {env['git_commit']}",
    ]
    return "\n".join(lines)


def command_line(argv=None):
    argv = sys.argv if argv is None else argv
    script = os.path.relpath(os.path.abspath(argv[0]), REPO_DIR) if argv else ""
    return "python " + " ".join(shlex.quote(a) for a in [script] + list(argv[1:]))


# ------------------------------------------------------------------------------------------- children
def run_child(argv, log_path, env=None, cwd=None, timeout=None):
    """Run ``argv`` with stdout+stderr to ``log_path``; returns (exit code, wall seconds, peak RSS MiB).

    The peak is ``ru_maxrss`` of this child from ``os.wait4`` (not of earlier children, unlike
    RUSAGE_CHILDREN). ``timeout`` kills the child's process group after that many seconds (exit code -9).
    """
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from reaping it again
    wall = time.perf_counter() - start
    return proc.returncode, wall, usage.ru_maxrss / 1024.0  # Linux reports KiB


def log_tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def write_json(path, obj):
    """Atomic JSON write (temp file + rename)."""
    from recbole_llm.core.fileio import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, default=float)


def write_text(path, text):
    from recbole_llm.core.fileio import atomic_write_text

    atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------- JSONL
def append_jsonl(path, record):
    """One line per finished run, flushed and fsynced: an interrupted benchmark loses at most the run in flight."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path):
    """Records of a JSONL file; a truncated last line (a run killed while writing) is skipped."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


# --------------------------------------------------------------------------------------------- tables
def mean_std(values):
    """(mean, sample standard deviation or None for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(values, digits=4):
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def child_env(threads=None):
    """Environment for children: the repository importable, quiet tokenizers, optional thread cap."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_DIR + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
        env["RECBOLE_LLM_BENCH_THREADS"] = str(threads)
    return env


def apply_thread_cap():
    """In a child: honour the parent's --threads (torch reads OMP_NUM_THREADS too, this makes it explicit)."""
    threads = os.environ.get("RECBOLE_LLM_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def parse_overrides(items):
    """``key=value`` strings -> dict, values read as YAML (numbers, booleans, ~, lists)."""
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"error: --set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def standin_warning(overrides):
    """A Markdown line when --set points a model path at random-weight stand-ins (benchmarks/standin_models.py),
    so no table made with them can pass for real-model numbers; "" otherwise."""
    paths = [str(v) for k, v in overrides.items()
             if k in ("llm_path", "encoder_path") and v and os.path.isfile(os.path.join(str(v), "STANDIN.json"))]
    if not paths:
        return ""
    return (f"**Stand-in models with random weights** ({', '.join(paths)}; benchmarks/standin_models.py): same "
            "shapes as the bundled models, so times are comparable; generated texts, metrics and knowledge mean "
            "nothing, and generation always runs to max_new_tokens (no EOS).")


def notes_section(path):
    """A hand-written analysis kept beside the generated table (``<table>-notes.md``), appended to it, so that
    regenerating the table does not lose it."""
    if not os.path.isfile(path):
        return ""
    with open(path, encoding="utf-8") as f:
        return "\n## Notes on the measurements\n\n" + f.read().strip() + "\n"


def resolve_mode(args):
    """Results-file mode from --quick/--gpu; sets ``args.profile`` and refuses --gpu without CUDA."""
    mode = ("quick-gpu" if args.gpu else "quick") if args.quick else ("gpu" if args.gpu else "cpu")
    args.profile = "paper" if args.gpu else "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: --gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    return mode

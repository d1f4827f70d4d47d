"""The resume state of SeRALM's alignment (phases B and C of ``AlignmentTrainer``).

The run's ordinary resume state (``recbole_llm.core.resume``) is written by the training epochs that follow
alignment. Alignment writes its own file, ``<checkpoint_dir>/<model>-<dataset>-<fingerprint>.align.pth``: at
step 0 of phase B (so the warm-up is kept), every ``align_resume_every`` steps, and once more when phase B ends
(phase C, the regeneration, then resumes from the knowledge cache's partial file). It holds what an exact
continuation needs: the recommender and its optimizer, the LoRA values and their optimizer, the generator's
last snapshot, the train loader's shuffling state at the start of phase B (the resumed run replays the loader
to the same batch), the global random state and the alignment log.

With the sync generator on CPU a resumed run ends with the metrics of an uninterrupted one. With Ray the
batches and their sampling seeds are the same, but which snapshot generated a batch depends on timing, as in
any Ray run. A kill during the warm-up (phase A) starts alignment over.
"""

import os

from recbole_llm.core.resume import resume_state_path


def alignment_state_path(config):
    return resume_state_path(config)[: -len(".resume.pth")] + ".align.pth"


def loader_state(train_data):
    """The train loader's shuffling generator state (None for a loader without one)."""
    generator = getattr(train_data, "generator", None)
    return generator.get_state() if generator is not None else None


def replay_loader(train_data, state, batches, count):
    """Put the loader back at ``state`` and draw ``count`` batches from ``batches`` (its iterator), so the
    next batch is the one the interrupted run would have drawn next."""
    generator = getattr(train_data, "generator", None)
    if state is not None and generator is not None:
        generator.set_state(state)
    for _ in range(count):
        next(batches)


def remove_alignment_state(path):
    if os.path.exists(path):
        os.remove(path)

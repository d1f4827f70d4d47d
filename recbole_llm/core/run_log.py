"""RecBole's logger, with the log file held back until the run has started.

RecBole opens ``log/<model>/<model>-<dataset>-<time>-<hash>.log`` before reading any data, so a run that stops
on a missing file or a bad model path still leaves a log (and ``log/`` folders) behind. Here the console
shows everything at once, while the file's records are held in memory and written when ``release()`` is
called (the data is loaded and the model built); ``discard()`` drops them and removes the folders this run
created, so a rejected input leaves nothing on disk.
"""

import logging
import logging.handlers
import os

from recbole.utils import init_logger


class HeldLogFile:
    def __init__(self, config):
        root = logging.getLogger()
        before = set(root.handlers)
        model_dir = os.path.join("log", str(config["model"]))
        created = [d for d in ("log", model_dir) if not os.path.isdir(d)]
        old_logs = set(os.listdir(model_dir)) if os.path.isdir(model_dir) else set()
        init_logger(config)
        new_files = [h for h in root.handlers if h not in before and isinstance(h, logging.FileHandler)]
        self._memory = None
        self.path = None
        self._created_dirs = created
        if not new_files:
            # Root already had handlers (an earlier run in this process), so RecBole's basicConfig kept them:
            # log there as RecBole does, and drop the empty file its FileHandler created but never uses.
            for name in set(os.listdir(model_dir)) - old_logs:
                path = os.path.join(model_dir, name)
                if os.path.getsize(path) == 0:
                    os.remove(path)
            return
        file_handler = new_files[0]
        self.path = file_handler.baseFilename
        self._level, self._formatter, self._filters = file_handler.level, file_handler.formatter, file_handler.filters
        root.removeHandler(file_handler)
        file_handler.close()
        if os.path.isfile(self.path) and os.path.getsize(self.path) == 0:
            os.remove(self.path)
        self._remove_created_dirs()
        self._memory = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        self._memory.setLevel(self._level)
        root.addHandler(self._memory)

    def _remove_created_dirs(self):
        for directory in reversed(self._created_dirs):
            try:
                os.rmdir(directory)
            except OSError:
                pass  # not empty (another run wrote into it) or already gone

    def release(self):
        """Create the log file with every record so far; the run logs to it from now on."""
        if self._memory is None:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handler = logging.FileHandler(self.path)
        handler.setLevel(self._level)
        handler.setFormatter(self._formatter)
        for log_filter in self._filters:
            handler.addFilter(log_filter)
        root = logging.getLogger()
        self._memory.setTarget(handler)
        self._memory.flush()
        root.removeHandler(self._memory)
        self._memory.close()
        self._memory = None
        root.addHandler(handler)

    def discard(self):
        """Drop the held records: the run wrote no log file."""
        if self._memory is not None:
            logging.getLogger().removeHandler(self._memory)
            self._memory.buffer.clear()
            self._memory.close()
            self._memory = None
        self._remove_created_dirs()

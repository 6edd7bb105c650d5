"""The run folder appears whole or not at all: stages write into a hidden staging folder that is
renamed into place only after every file is written.

Used as a context manager, a run folder commits when its block finishes and discards the staging
folder when the block raises, Ctrl-C and SIGTERM included; a disk that fills up (or any other
write failure the user can fix) becomes one ``BadInput`` line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import secrets
import signal
import threading
from pathlib import Path

from ..errors import BadInput

# Write failures the user can fix, with how.
WRITE_FIXES = {
    errno.ENOSPC: "free disk space or choose another --out",
    errno.EDQUOT: "free space within your quota or choose another --out",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or choose another --out",
    errno.EROFS: "choose a writable --out",
    errno.EACCES: "choose a writable --out",
    errno.EPERM: "choose a writable --out",
}


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done, so a rename or clean-up never stops half-way.

    Their handlers only record a signal during the block; the first one recorded is raised again right
    after it, with the handlers as they were (so it raises KeyboardInterrupt where it would have). Masking
    the signals in this thread would not do: the kernel hands them to another thread (a progress bar's, a
    thread pool's), and Python runs the handler in the main thread all the same.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    try:
        for signum in DEFERRED_SIGNALS:
            previous[signum] = signal.signal(signum, lambda received, _frame: caught.append(received))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


class RunFolder:
    """A run folder written whole or not at all: ``with RunFolder(out) as folder`` writes into a hidden
    staging folder beside ``out`` and moves it into place when the block ends without an error; on any
    error or signal the staging folder (and any folder this run created above it) is removed."""

    def __init__(self, out: str | Path, overwrite: bool = False):
        self.final = Path(out)
        if self.final.exists() and not self.final.is_dir():
            raise BadInput(f"output {self.final} is a file, not a folder; choose another --out")
        if self.final.exists() and not overwrite and any(self.final.iterdir()):
            raise BadInput(f"output folder {self.final} already exists; pass --overwrite or choose another --out")
        parent = self.final.parent
        # The folders this run creates above the run folder, deepest first: removed again on failure.
        self.created = [p for p in (parent, *parent.parents) if not p.exists()]
        self.staging: Path | None = None

    def __enter__(self) -> "RunFolder":
        # Created here, not in __init__: a signal between __init__ and the with block would otherwise
        # leave the staging folder behind (no __exit__ runs for a block that never started).
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            # Named before it exists, so that discard() knows it whenever a signal arrives; the process id
            # and 64 random bits keep two runs apart. Mode 0o777 less the umask, as any folder the user makes.
            self.staging = parent / f".{self.final.name}.{os.getpid()}-{secrets.token_hex(8)}"
            try:
                self.staging.mkdir()
            except FileExistsError:  # another process's folder (never in practice): not this run's to remove
                self.staging = None
                raise
        except OSError as exc:
            self.discard()
            raise BadInput(f"cannot write to {parent} ({exc.strerror}); choose a writable --out") from None
        except BaseException:
            self.discard()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.commit()
            return False
        self.discard()
        if isinstance(exc, OSError) and exc.errno in WRITE_FIXES:
            raise self.write_failure(exc) from None
        return False

    def write_failure(self, exc: OSError) -> BadInput:
        """One line for a write the user can fix (disk full, file-size limit, read-only)."""
        return BadInput(f"cannot write the run folder {self.final} ({exc.strerror or exc}); "
                        f"nothing was kept: {WRITE_FIXES.get(exc.errno, 'choose another --out')}")

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_json(self, name: str, data: dict) -> Path:
        target = self.path(name)
        target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return target

    def commit(self) -> Path:
        """Move the finished folder into place (replacing an old one only now)."""
        with signals_deferred():
            if self.final.exists():
                old = self.final.with_name(f".{self.final.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.final, old)
                os.replace(self.staging, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.staging, self.final)
        return self.final

    def discard(self) -> None:
        with signals_deferred():
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # only while empty: never anything this run did not make
            with contextlib.suppress(OSError):
                folder.rmdir()

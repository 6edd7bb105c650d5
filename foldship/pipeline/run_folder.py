"""The run folder appears whole or not at all: stages write into a hidden staging folder that is
renamed into place only after every file is written."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BadInput


class RunFolder:
    def __init__(self, out: str | Path, overwrite: bool = False):
        self.final = Path(out)
        if self.final.exists() and not overwrite and any(self.final.iterdir()):
            raise BadInput(f"output folder {self.final} already exists; pass --overwrite or choose another --out")
        parent = self.final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=parent))
            umask = os.umask(0)
            os.umask(umask)
            self.staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the run folder private
        except OSError as exc:
            raise BadInput(f"cannot write to {parent} ({exc.strerror}); choose a writable --out") from None

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_json(self, name: str, data: dict) -> Path:
        target = self.path(name)
        target.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        return target

    def commit(self) -> Path:
        """Move the finished folder into place (replacing an old one only now)."""
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
        shutil.rmtree(self.staging, ignore_errors=True)
        parent = self.final.parent
        # Leave no empty parent behind that this run created.
        try:
            if parent != Path(".") and not any(parent.iterdir()):
                parent.rmdir()
        except OSError:
            pass

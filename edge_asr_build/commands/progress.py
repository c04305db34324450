"""Progress of the build step's long jobs on stderr."""

from __future__ import annotations

import sys


class StepProgress:
    """Progress of a multi-step job: a bar on a terminal, one line per step in logs."""

    def __init__(self, total: int, desc: str):
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)

    def __call__(self, message: str) -> None:
        if self.bar is None:
            print(f"  {message}", file=sys.stderr, flush=True)
            return
        if self.bar.postfix:  # the previous step is done
            self.bar.update(1)
        self.bar.set_postfix_str(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

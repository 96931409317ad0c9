"""Progress display pieces shared by commands: remote reads (requests and bytes fetched) beside a rich progress bar.

Data flow: `sources.remote` counts every ranged request it answers in this process (`read_counts`) -> the column
reads the counts each time the bar is drawn, less those before the bar started, so headers, the layer map and the
streaming pass all show as they happen. Reads made in worker processes (--workers, --ray) are not counted here.
"""

from __future__ import annotations

import sys

from rich.progress import ProgressColumn, Task
from rich.text import Text

__all__ = ["RemoteReadsColumn"]


def _counts() -> tuple[int, int]:
    """(requests, bytes) answered so far in this process; (0, 0) while the remote reader (and its HTTP stack, ~0.3 s
    of imports) has not been loaded, since then nothing remote was read."""
    remote = sys.modules.get("modeltrace.sources.remote")
    return (0, 0) if remote is None else remote.read_counts()


class RemoteReadsColumn(ProgressColumn):
    """"1,234 requests, 56.7 MB fetched" since the column was made; empty while nothing remote was read."""

    def __init__(self) -> None:
        super().__init__()
        self.start = _counts()

    def render(self, task: Task) -> Text:
        n, nbytes = (now - then for now, then in zip(_counts(), self.start, strict=True))
        if n <= 0:
            return Text("")
        return Text(f"{n:,} request{'s' if n > 1 else ''}, {nbytes / 1e6:,.1f} MB fetched", style="progress.download")

"""`tunedex watch`: keep the index as fresh as the corpus, between nightly runs.

One incremental pass at start (to catch up), then one after each settled batch of changes under the corpus
root: inotify through `watchfiles`, or polling where inotify sees nothing (network volumes, some container
mounts). Every pass is `index_corpus`, so it takes the collection's index lock (never two passes on one
collection, the nightly flow's included), keeps S1's guarantees when killed, and leaves deleted documents out
of the index. A pass that fails (Milvus down) is logged and retried after `retry_s` without a new change.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from tunedex.infra.config import TunedexConfig
from tunedex.infra.errors import TunedexError
from tunedex.workers.embed import IndexReport, index_corpus

log = logging.getLogger(__name__)

OnPass = Callable[[IndexReport, str], None]


def watch_corpus(cfg: TunedexConfig, root: Path, on_pass: OnPass, debounce_s: float = 1.0, poll: bool = False,
                 retry_s: float = 30.0, stop: threading.Event | None = None) -> None:
    """Index `root` now and after each change that has been quiet for `debounce_s`, until `stop` is set or
    Ctrl-C. `on_pass(report, why)` hears of each completed pass."""
    import watchfiles

    if not root.is_dir():
        raise TunedexError(f"corpus {root} is not a directory; pass the corpus root to `tunedex watch`")
    # The generator wakes every second with an empty set when nothing changed; the start pass runs on its
    # first wake-up, once the watch is in place, so a change made while that pass runs is seen, not lost.
    changes = watchfiles.watch(root, debounce=int(debounce_s * 1000), stop_event=stop, force_polling=poll or None,
                               poll_delay_ms=max(100, int(debounce_s * 500)), rust_timeout=1000,
                               yield_on_timeout=True, raise_interrupt=False)
    started, failed_at = False, None
    for changed in changes:
        if not started:
            started, failed_at = True, run_pass(cfg, root, on_pass, "start")
        elif changed:
            failed_at = run_pass(cfg, root, on_pass, f"{len(changed)} change(s)")
        elif failed_at is not None and time.monotonic() - failed_at >= retry_s:
            failed_at = run_pass(cfg, root, on_pass, "retry")


def run_pass(cfg: TunedexConfig, root: Path, on_pass: OnPass, why: str) -> float | None:
    """One index pass; the time it failed at, or None when it completed."""
    try:
        report = index_corpus(cfg, root)
    except TunedexError as exc:
        log.warning("watch: the pass after %s failed: %s; retrying", why, exc)
        return time.monotonic()
    on_pass(report, why)
    return None

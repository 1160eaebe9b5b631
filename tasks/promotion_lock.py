"""The promotion lock: one critical section for every alias change Turnstile makes on a registry.

MLflow's registry has no atomic compare-and-set on aliases (`set_registered_model_alias`
overwrites). Turnstile makes one: every alias change it makes (`promote`, `rollback`) reads the
champion, compares and writes inside one critical section under an exclusive lock
(`promotion_lock`, an OS file lock through the `filelock` package, released by the OS if the
holder dies, so no lock is ever left stale), and reads the champion back after writing.
Where the lock lives, and what that guarantees, depends on the store:

- SQLite store (`sqlite:///<path>`, the default `<run_dir>/mlflow.db`): the lock file is
  `<path>.promotion.lock`, next to the database, so every process that opens the database takes
  the same lock. Guarantee: **linearizable compare-and-set among Turnstile promoters**: the
  promotions and rollbacks of all processes run one at a time, each moves `champion` only away
  from the version its decision was made against, and `previous` is always the champion that
  was actually replaced. (On a network filesystem this holds where the filesystem honours
  `flock`, which SQLite needs too.) A local file store (`file:` URI or a path) is the same, with
  `<root>/.promotion.lock`.
- MLflow server (`http(s)://`, `databricks`) or a database URI (`postgresql://`, `mysql://`, ...):
  there is no file every promoter shares. The lock is machine-local
  (`<tempdir>/turnstile-promotion-<hash of the URI>.lock`), so promoters on one machine get the
  guarantee above. Across machines it is **read-check-set with a re-read after setting**: the
  lost-update window is from our read of the champion to the end of our alias writes (three
  requests: read `champion`, set `previous`, set `champion`). If another machine's promoter
  writes in that window and its read-back comes before our write, our write replaces its champion
  unnoticed by either side (a better
  champion can be replaced by a worse one, and `previous` names the champion we read). Any
  other overlap is detected: whoever reads back a champion other than its own returns
  `applied=False` and decides again against it. Serialise promotions on a shared server
  (one promote queue, or `concurrency_limit: 1` on the deployments that promote) when that
  window matters.

Alias writes made outside Turnstile (the MLflow UI, `mlflow` commands) take no lock; a
promotion notices them only through the read-back.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from filelock import FileLock, Timeout
from mlflow import MlflowClient

PROMOTION_LOCK_TIMEOUT_S = (
    60.0  # how long a promotion waits for another one to finish before giving up (transient: retried)
)


class PromotionLockTimeout(TimeoutError):
    """Another promotion held the registry's promotion lock for longer than the timeout (transient: retried)."""


def promotion_lock_path(uri: str) -> Path:
    """The lock file that serialises alias changes on the registry at `uri` (see this module's docstring).

    `sqlite:///<path>` -> `<path>.promotion.lock`; a local file store (`file:` URI or a plain
    path) -> `<root>/.promotion.lock`; anything else (a server, another database, in-memory
    SQLite) -> `<tempdir>/turnstile-promotion-<sha256(uri)[:12]>.lock`, shared by this machine only.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        database = unquote(uri.removeprefix("sqlite:///").split("?", 1)[0]) if uri.startswith("sqlite:///") else ""
        if database and database != ":memory:":
            path = Path(database).resolve()
            return path.with_name(path.name + ".promotion.lock")
    elif parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve() / ".promotion.lock"
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and uri[1:3] in (":\\", ":/")):  # a path (or a Windows drive)
        return Path(uri).resolve() / ".promotion.lock"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"turnstile-promotion-{digest}.lock"


def registry_uri(client: MlflowClient) -> str:
    """The registry URI `client` talks to."""
    return client._registry_uri  # MlflowClient keeps it only privately; set by its constructor


@contextmanager
def promotion_lock(uri: str, timeout_s: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[Path]:
    """Hold the exclusive promotion lock of the registry at `uri` (a new lock object per call, so it
    also excludes other threads of this process); yields the lock file's path.

    Raises `PromotionLockTimeout` after `timeout_s` seconds of waiting."""
    path = promotion_lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout_s, thread_local=False)
    try:
        lock.acquire()
    except Timeout as exc:
        raise PromotionLockTimeout(f"another promotion has held {path} for more than {timeout_s:.0f} s") from exc
    try:
        yield path
    finally:
        lock.release()

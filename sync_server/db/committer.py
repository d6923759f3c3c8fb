"""Group commit: one thread per process puts the updates that arrive together into one
transaction, so one fsync acknowledges many devices.

The committer knows nothing of SQL: it is given the function that inserts a batch in one
transaction (``Store.insert_updates``) and hands each waiter its own receipt or error.
"""
from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .records import Receipt, StoreBusy, StoreError, UpdateRecord

InsertBatch = Callable[[Sequence[UpdateRecord]], "list[Receipt]"]


@dataclass
class _Pending:
    record: UpdateRecord
    done: threading.Event = field(default_factory=threading.Event)
    receipt: Optional[Receipt] = None
    error: Optional[BaseException] = None


class GroupCommitter:
    """One thread per process that commits the updates waiting at that moment together."""

    def __init__(self, insert_batch: InsertBatch, max_batch: int = 128, on_commit: Optional[Callable[[], None]] = None):
        self.insert_batch = insert_batch
        self.max_batch = max_batch
        self.on_commit = on_commit
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="infantino-group-commit", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._pid == os.getpid() and self._thread.is_alive()

    def submit(self, record: UpdateRecord, timeout_s: float) -> Receipt:
        item = _Pending(record)
        self._queue.put(item)
        if not item.done.wait(timeout_s):
            raise StoreBusy("the store did not commit the update in time")
        if item.error is not None:
            raise item.error
        assert item.receipt is not None
        return item.receipt

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._commit(batch)

    def _next_batch(self) -> Optional[list[_Pending]]:
        """Block for one update, then take what else is waiting (None: stop)."""
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            receipts = self.insert_batch([p.record for p in batch])
            for p, r in zip(batch, receipts):
                p.receipt = r
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            err = exc if isinstance(exc, StoreError) else StoreBusy(
                f"store write failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            for p in batch:
                p.error = err
        for p in batch:
            p.done.set()
        if self.on_commit is not None and any(p.receipt is not None for p in batch):
            try:
                self.on_commit()
            except Exception:  # noqa: BLE001 - a failed trigger must not stop the committer
                pass

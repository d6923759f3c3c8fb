"""``infantino-edge watch``: the process a nursery camera runs for weeks.

One frame loop owns the ``Device``; everything slow or unreliable happens beside it:

``sources``   what SOURCE names (camera, stream URL, video file, image folder) -> frames
``sampler``   which frames to analyse at ``--fps`` (on the source's clock, drift-free)
``slot``      the one-frame hand-over from reader to loop: the newest frame wins
``reader``    the thread that reads the source, paces files, reopens dropped streams
``distress``  the hysteresis state machine that turns negative valence into alerts
``summary``   per-minute shares of expressions and valence
``jsonl``     crash-tolerant append-only JSON-lines files
``timeline``  frame lines and minute summaries, one file per day, pruned after ``--keep-days``
``events``    ``events.jsonl`` and the ``--on-alert`` hook, run off the frame loop
``sync_worker`` periodic push/pull in a thread; a new package switches the loop's ``Device`` in place
``status``    the human status line and the ``--json`` one
``live``      what the annotation page reads back (no Flask here)
``loop``      ``Watch``: the frame loop, signals, shutdown
``cli``       the ``watch`` subcommand

Nothing here imports OpenCV until a source is opened, and nothing imports torch, timm,
mlflow or flask.
"""
from __future__ import annotations

WATCH_DIR = "watch"  # <state>/watch/: timeline, events, status

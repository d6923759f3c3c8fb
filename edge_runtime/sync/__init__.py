"""Sync with the fleet server, one job per module:

* ``transport``: HTTP (``Http``, ``Response``, ``SyncError``, ``AuthError``) with timeouts and
  jittered retries; also used by ``export.publish`` and ``sync_server.process``.
* ``state``: the on-disk sync state (``SyncState``, ``RefPoint``, ``managed_model_dir``).
* ``merge``: the pure merge policy (``MergePolicy``, ``adopt_and_replay``).
* ``fetch``: downloading a verified package and global head.
* ``client``: one sync, snapshot -> push -> pull -> merge (``Syncer``, ``sync_device``,
  ``SyncReport``, ``DeviceLearner``).

Nothing is imported here, so ``transport`` stays light for its other users.
"""

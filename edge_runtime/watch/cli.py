"""The ``watch`` subcommand's options and its run (the parser itself lives in ``infantino.edge_runtime.cli``).

Exit codes: 0 at the end of a file or folder, or after SIGTERM / SIGINT; 2 when SOURCE
cannot be opened (one line on stderr); 3 when a video file ends before the frames its header
states (truncated or damaged; a warning line says how many arrived); 1 for any other error,
as every ``infantino-edge`` command.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..core.clitools import FAILURE_EXIT
from .distress import DistressSettings
from ..queue_policy import QueueSettings

SOURCE_EXIT = FAILURE_EXIT  # a camera not there (yet): the command failed, its command line is fine


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="camera index or device (0, /dev/video0), stream URL (rtsp://, http://), "
                                                      "video file, or folder of images (played in name order)")
    p.add_argument("--fps", type=float, default=2.0, help="frames analysed per second (default: %(default)s)")
    p.add_argument("--fast", action="store_true", help="play a file or folder as fast as it can be analysed, not in real time")
    p.add_argument("--loop", action="store_true", help="start a file or folder over at its end instead of exiting")
    p.add_argument("--queue-every", type=float, default=QueueSettings.every_s, metavar="S",
                   help="queue at most one uncertain face for the caregiver per S seconds (default: %(default)s)")
    p.add_argument("--alert-after", type=float, default=DistressSettings.alert_after_s, metavar="S",
                   help="alert after S seconds of mostly negative expressions (default: %(default)s)")
    p.add_argument("--alert-clear", type=float, default=DistressSettings.clear_after_s, metavar="S",
                   help="an alert ends after S calm seconds (default: %(default)s)")
    p.add_argument("--on-alert", metavar="CMD", help="run CMD at each alert, the event as JSON on stdin (no shell: use sh -c '...')")
    p.add_argument("--on-alert-timeout", type=float, default=10.0, metavar="S", help="kill the alert command after S seconds")
    p.add_argument("--keep-days", type=int, default=7, metavar="N", help="days of timeline kept on disk (default: %(default)s)")
    p.add_argument("--timeline-max-mb", type=float, default=None, metavar="MB", help="also delete the oldest days past this size")
    p.add_argument("--fsync-every", type=float, default=0.0, metavar="S",
                   help="make timeline lines durable every S seconds (default: each line; raise it to spare an SD card)")
    p.add_argument("--server", metavar="URL", help="sync server: push and pull in the background")
    p.add_argument("--token", default=os.environ.get("INFANTINO_DEVICE_TOKEN"), metavar="T",
                   help="this device's token (default: $INFANTINO_DEVICE_TOKEN)")
    p.add_argument("--sync-every", type=float, default=900.0, metavar="S", help="seconds between syncs, jittered (default: %(default)s)")
    p.add_argument("--exit-sync-timeout", type=float, default=30.0, metavar="S", help="wait at most S seconds for the sync at exit")
    p.add_argument("--status-every", type=float, default=60.0, metavar="S", help="status line every S seconds (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="status and event lines as JSON on stdout")
    p.add_argument("--open-timeout", type=float, default=10.0, metavar="S", help="seconds to wait for a stream to open or deliver")
    p.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N analysed frames (benchmarks)")


def settings_from(args: argparse.Namespace):
    """``WatchSettings`` from the parsed options (ValueError, one line, for bad ones)."""
    from .loop import WatchSettings
    from .sync_worker import SyncSettings

    sync = None
    if args.server:
        if not args.token:
            raise ValueError("--server needs --token (or INFANTINO_DEVICE_TOKEN)")
        sync = SyncSettings(args.server, args.token, every_s=args.sync_every, timeout_s=min(15.0, max(1.0, args.sync_every / 2)))
    return WatchSettings(
        fps=args.fps, fast=args.fast, loop=args.loop, queue=QueueSettings(every_s=args.queue_every),
        distress=DistressSettings(alert_after_s=args.alert_after, clear_after_s=args.alert_clear), keep_days=args.keep_days,
        max_timeline_bytes=None if args.timeline_max_mb is None else int(args.timeline_max_mb * 2**20),
        fsync_every_s=args.fsync_every, status_every_s=args.status_every, json=args.json, on_alert=args.on_alert,
        on_alert_timeout_s=args.on_alert_timeout, sync=sync, exit_sync_timeout_s=args.exit_sync_timeout, max_frames=args.max_frames)


def run(args: argparse.Namespace, config, prog: str = "infantino-edge") -> int:
    """Open SOURCE (exit 1 if it cannot be), then the device, then watch."""
    from ..device import Device, default_model_dir, default_state_dir
    from ..sync.state import managed_model_dir
    from .loop import Watch
    from .sources import SourceError, open_source, parse_source

    settings = settings_from(args)
    try:
        source = open_source(parse_source(args.source), folder_fps=args.fps, timeout_s=args.open_timeout, verbose=args.verbose)
    except SourceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return SOURCE_EXIT
    state = Path(args.state_dir) if args.state_dir is not None else default_state_dir()
    model = managed_model_dir(state) or args.model_dir or default_model_dir()  # a package sync installed wins
    try:
        return Watch(Device(model, state, config), source, settings).run()
    except SourceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return SOURCE_EXIT
    finally:
        source.close()

"""A camera on the network for the watch tests: an MJPEG stream over HTTP (multipart/x-mixed-replace),
the way many IP cameras serve it. ``python tests/mjpeg_server.py PORT``; frames of changing grey at 10 fps."""
from __future__ import annotations

import http.server
import sys
import time

import cv2
import numpy as np


class Camera(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        try:
            while True:
                ok, jpg = cv2.imencode(".jpg", np.full((120, 160, 3), 40 + (i * 7) % 200, np.uint8))
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpg) + jpg.tobytes() + b"\r\n")
                i += 1
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            return

    def log_message(self, *args) -> None:
        return


if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Camera).serve_forever()

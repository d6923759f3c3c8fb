"""The caregiver page's token cannot be guessed: long tokens only, lockout per client, a real process measured."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("flask")

from conftest import REPO
from edge_helpers import open_device
from infantino.edge_runtime.annotate import create_app, new_token
from infantino.edge_runtime.annotate.throttle import FailureThrottle, client_key, token_problem

TOKEN = "Vq7-Ls0_pWz4nYd2Kx9c"


@pytest.fixture()
def device(tiny_package_dir, tmp_path):
    return open_device(tiny_package_dir, tmp_path / "state")


@pytest.mark.parametrize("weak, message", [
    ("4711", "at least 16 characters"),  # the docs' old example
    ("correct-horse", "at least 16 characters"),
    ("aaaaaaaaaaaaaaaaaaaa", "at least 6 different"),
    ("1212121212121212", "at least 6 different"),
])
def test_short_or_weak_tokens_are_refused(device, weak, message):
    with pytest.raises(ValueError, match=message):
        create_app(device, host="0.0.0.0", token=weak)
    with pytest.raises(ValueError, match=message):
        create_app(device, token=weak)  # on loopback too: a token that is given must be a real one


def test_the_made_up_token_is_strong():
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20 and all(len(t) == 32 and token_problem(t) is None for t in tokens)


def test_the_cli_refuses_a_weak_token_with_one_line(tiny_package_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "infantino.edge_runtime.cli", "annotate", "--model-dir", str(tiny_package_dir),
                          "--state-dir", str(tmp_path / "state"), "--host", "0.0.0.0", "--port", "0", "--token", "4711",
                          "--no-face-detect", "--threads", "1"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "at least 16 characters" in run.stderr


def _wrong(client, addr: str = "10.0.0.7", n: int = 1):
    return [client.get("/api/state", headers={"Authorization": "Bearer wrong-guess-000000"},
                       environ_base={"REMOTE_ADDR": addr}) for _ in range(n)]


def test_wrong_tokens_lock_the_client_out_for_longer_and_longer(device):
    # Prepare: a page beyond loopback, lockouts of 0.2 s doubling
    app = create_app(device, host="0.0.0.0", token=TOKEN, test_config={"TOKEN_LOCKOUT_BASE_S": 0.2})
    client = app.test_client()
    right = {"Authorization": f"Bearer {TOKEN}"}
    # Execute / Assert: five free mistakes; the sixth earns a lockout, during which tokens are not even checked
    free = _wrong(client, n=5)
    assert [r.status_code for r in free] == [401] * 5 and "Retry-After" not in free[-1].headers
    sixth = _wrong(client)[0]
    assert sixth.status_code == 401 and sixth.headers["Retry-After"] == "1"
    locked = _wrong(client)[0]
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "1" and "try again" in locked.get_json()["error"]
    # while locked out, even the right token waits (otherwise the lockout would not slow guessing) ...
    assert client.get("/api/state", headers=right, environ_base={"REMOTE_ADDR": "10.0.0.7"}).status_code == 429
    # ... but another client is not affected
    assert client.get("/api/state", headers=right, environ_base={"REMOTE_ADDR": "10.0.0.8"}).status_code == 200
    time.sleep(0.25)
    assert _wrong(client)[0].status_code == 401  # checked again after the wait; this mistake costs twice as long
    assert app.extensions["infantino"]["throttle"].retry_after("10.0.0.7") > 0.3
    time.sleep(0.45)
    login = client.get(f"/?token={TOKEN}", environ_base={"REMOTE_ADDR": "10.0.0.7"})
    assert login.status_code == 302  # the right token, after waiting, works and clears the record
    assert [r.status_code for r in _wrong(app.test_client(), n=5)] == [401] * 5


def test_the_throttle_keys_ipv6_by_its_64_and_stays_bounded():
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("::ffff:10.0.0.7") == "10.0.0.7" and client_key("10.0.0.7") == "10.0.0.7"
    now = [0.0]
    throttle = FailureThrottle(free=0, base_s=1.0, max_lockout_s=4.0, max_clients=3, clock=lambda: now[0])
    assert [throttle.failed("10.0.0.1") for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]  # doubling, capped
    for i in range(2, 6):
        throttle.failed(f"10.0.0.{i}")
    assert throttle.retry_after("10.0.0.1") == 0.0  # pushed out: at most max_clients records are kept
    assert throttle.retry_after("10.0.0.5") == 1.0


def _hammer(url: str, seconds: float) -> dict[int, int]:
    """Guess wrong tokens as fast as one client can for ``seconds``; counts of each status."""
    counts: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer guess-{n:016d}"})
        n += 1
        try:
            status = urllib.request.urlopen(req, timeout=10).status
        except urllib.error.HTTPError as exc:
            status = exc.code
        counts[status] = counts.get(status, 0) + 1
    return counts


def test_guessing_against_a_running_page_is_slowed_to_a_handful(tiny_package_dir, tmp_path):
    from server_helpers import free_port

    # Prepare: `infantino-edge annotate` in its own process, with a token
    port = free_port()
    log = open(tmp_path / "page.log", "wb")
    page = subprocess.Popen([sys.executable, "-m", "infantino.edge_runtime.cli", "annotate", "--model-dir", str(tiny_package_dir),
                             "--state-dir", str(tmp_path / "state"), "--port", str(port), "--token", TOKEN,
                             "--no-face-detect", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=log, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # a file: a full pipe would stall the page's request log
    url = f"http://127.0.0.1:{port}/api/state"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"}), timeout=2)
                break
            except (urllib.error.URLError, OSError):
                assert page.poll() is None and time.monotonic() < deadline, (tmp_path / "page.log").read_text()[-2000:]
                time.sleep(0.2)
        # Execute: 3.5 s of guessing from one client (before: ~1,000 guesses a second were checked)
        counts = _hammer(url, 3.5)
    finally:
        page.terminate()
        page.wait(timeout=30)
        log.close()
    # Assert: 5 free guesses, a 6th that earns 1 s, one after it (2 s) and one after that (4 s) were checked
    # (401); every other guess got 429 unchecked
    checked = counts.get(401, 0)
    assert 7 <= checked <= 8 and counts.get(429, 0) > 0 and set(counts) <= {401, 429}, counts

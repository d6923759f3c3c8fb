"""The annotation page's handlers through Flask's test client: labels, ids, tokens, CSRF, traversal."""
from __future__ import annotations

import threading

import pytest

pytest.importorskip("flask")

from edge_helpers import face, open_device

from infantino.edge_runtime.annotate import create_app

TOKEN = "kX3v-9Qe_t2LmZ8wRb"  # 18 characters: long enough for a page beyond loopback


@pytest.fixture()
def device(tiny_package_dir, tmp_path):
    dev = open_device(tiny_package_dir, tmp_path / "state", uncertainty_threshold=0.0)
    for k in range(3):
        assert dev.predict(face(k, seed=k)).queued_id is not None
    return dev


@pytest.fixture()
def app(device):
    return create_app(device)


def _csrf(client) -> str:
    page = client.get("/")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    return text.split('name="csrf-token" content="', 1)[1].split('"', 1)[0]


def _post(client, path, body, csrf, **headers):
    return client.post(path, json=body, headers={"X-CSRF-Token": csrf, **headers})


def test_state_lists_the_queue_most_uncertain_first(app, device):
    client = app.test_client()
    data = client.get("/api/state").get_json()
    uncertainties = [i["uncertainty"] for i in data["items"]]
    assert len(uncertainties) == 3 and uncertainties == sorted(uncertainties, reverse=True)
    assert data["classes"] == list(device.classes) and len(data["items"][0]["probabilities"]) == 7
    assert len(data["timeline"]) == 3 and data["status"]["queue"] == 3
    crop = client.get(f"/crop/{data['items'][0]['id']}.png")
    assert crop.status_code == 200 and crop.data.startswith(b"\x89PNG")


def test_a_label_is_learned_and_the_frame_leaves_the_queue(app, device):
    client = app.test_client()
    csrf = _csrf(client)
    item_id = device.queue.items()[0].id
    before = device.head.version
    r = _post(client, "/api/label", {"id": item_id, "label": "happy"}, csrf)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["outcome"] == "learned" and r.get_json()["status"]["head_version"] == before + 1
    assert item_id not in [i.id for i in device.queue.items()]
    assert device.counters["from_queue"] == 1
    [entry] = [e for e in client.get("/api/state").get_json()["timeline"] if e["id"] == item_id]
    assert entry["label"] == "happy"


def test_a_bad_label_is_refused(app, device):
    client = app.test_client()
    csrf = _csrf(client)
    item_id = device.queue.items()[0].id
    for bad in ("sleepy", 3, None, "../happy"):
        r = _post(client, "/api/label", {"id": item_id, "label": bad}, csrf)
        assert r.status_code == 400 and "unknown label" in r.get_json()["error"]
    assert device.counters["labels"] == 0 and len(device.queue) == 3


def test_an_unknown_or_malformed_frame_id_is_404(app, device):
    client = app.test_client()
    csrf = _csrf(client)
    for bad in ("0000000000000000-00000000", "../state/head", "x" * 500):
        r = _post(client, "/api/label", {"id": bad, "label": "sad"}, csrf)
        assert r.status_code == 404, (bad, r.status_code)
    assert _post(client, "/api/dismiss", {"id": "0000000000000000-00000000"}, csrf).status_code == 404
    assert _post(client, "/api/label", {"label": "sad"}, csrf).status_code == 400
    assert device.counters["labels"] == 0


def test_a_double_label_counts_once(app, device):
    client = app.test_client()
    csrf = _csrf(client)
    item_id = device.queue.items()[0].id
    first = _post(client, "/api/label", {"id": item_id, "label": "sad"}, csrf)
    again = _post(client, "/api/label", {"id": item_id, "label": "angry"}, csrf)
    assert first.get_json()["outcome"] == "learned" and again.get_json()["outcome"] == "duplicate"
    assert device.counters["labels"] == 1 and device.counters["from_queue"] == 1


def test_concurrent_labels_of_one_frame_count_once(app, device):
    item_id = device.queue.items()[0].id
    clients = [app.test_client() for _ in range(6)]
    tokens = [_csrf(c) for c in clients]
    barrier = threading.Barrier(len(clients))
    outcomes: list[str] = []

    def go(client, csrf, name):
        barrier.wait()
        outcomes.append(_post(client, "/api/label", {"id": item_id, "label": name}, csrf).get_json()["outcome"])

    threads = [threading.Thread(target=go, args=(c, t, n)) for c, t, n in zip(clients, tokens, ["sad", "happy"] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["duplicate"] * 5 + ["learned"]
    assert device.counters["labels"] == 1


def test_not_a_face_removes_the_frame_without_learning(app, device):
    client = app.test_client()
    csrf = _csrf(client)
    item_id = device.queue.items()[0].id
    r = _post(client, "/api/dismiss", {"id": item_id}, csrf)
    assert r.status_code == 200 and len(device.queue) == 2 and device.counters["labels"] == 0


def test_posts_without_the_csrf_token_or_from_another_site_are_refused(app, device):
    client = app.test_client()
    csrf = _csrf(client)
    item_id = device.queue.items()[0].id
    body = {"id": item_id, "label": "sad"}
    assert client.post("/api/label", json=body).status_code == 403  # no token
    assert _post(client, "/api/label", body, "wrong").status_code == 403
    assert _post(client, "/api/label", body, csrf, Origin="http://evil.example").status_code == 403
    assert _post(client, "/api/label", body, csrf, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    form = client.post("/api/label", data=body, headers={"X-CSRF-Token": csrf})  # a plain HTML form
    assert form.status_code == 415
    assert _csrf(app.test_client()) != csrf  # per session
    assert _post(app.test_client(), "/api/label", body, csrf).status_code == 403  # another session's token
    assert device.counters["labels"] == 0
    ok = _post(client, "/api/label", body, csrf, Origin="http://localhost", **{"Sec-Fetch-Site": "same-origin"})
    assert ok.status_code == 200


def test_a_public_bind_needs_a_token(device):
    with pytest.raises(ValueError, match="token"):
        create_app(device, host="0.0.0.0")
    app = create_app(device, host="0.0.0.0", token=TOKEN)
    client = app.test_client()
    assert client.get("/").status_code == 401
    assert client.get("/api/state").status_code == 401
    assert client.get("/?token=wrong").status_code == 401
    item_id = device.queue.items()[0].id
    assert client.get(f"/crop/{item_id}.png").status_code == 401
    assert client.get("/api/state", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    login = client.get(f"/?token={TOKEN}")
    assert login.status_code == 302 and "token" not in login.headers["Location"]
    assert client.get("/api/state").status_code == 200  # the session cookie now carries it
    assert app.test_client().get("/api/state").status_code == 401


def test_loopback_answers_only_to_loopback_host_names(app):
    client = app.test_client()
    assert client.get("/api/state", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    assert client.get("/api/state", headers={"Host": "rebind.evil.example:8765"}).status_code == 403


@pytest.mark.parametrize("path", [
    "/crop/../state.json", "/crop/..%2f..%2fetc%2fpasswd.png", "/crop/%2e%2e%2fqueue.png",
    "/static/../__init__.py", "/static/..%2f__init__.py", "/static/%2e%2e/views.py",
    "/crop/0000000000000000-00000000.png", "/queue/", "/state/", "/../../etc/passwd",
])
def test_nothing_but_crops_and_the_page_is_served(app, path):
    r = app.test_client().get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert b"import" not in r.data and b"root:" not in r.data


def test_security_headers(app):
    r = app.test_client().get("/")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY" and r.headers["X-Content-Type-Options"] == "nosniff"
    assert "SameSite=Strict" in r.headers["Set-Cookie"] and "HttpOnly" in r.headers["Set-Cookie"]


def test_the_cli_has_an_annotate_command_that_loads_flask_only_when_run(capsys):
    from infantino.edge_runtime.cli import build_parser

    args = build_parser().parse_args(["annotate", "--state-dir", "s", "--host", "0.0.0.0", "--port", "9000", "--token", "1234"])
    assert (args.host, args.port, args.token, args.func.__name__) == ("0.0.0.0", 9000, "1234", "run_annotate")
    defaults = build_parser().parse_args(["annotate"])
    assert (defaults.host, defaults.port) == ("127.0.0.1", 8765)


def test_json_nested_beyond_a_few_levels_is_400_not_500(app):
    # Prepare: 3 KB nested 1,500 deep (issue 20: RecursionError, 500), and nesting hidden in strings
    client = app.test_client()
    csrf = _csrf(client)
    headers = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
    deep = '{"id": "x", "label": ' + "[" * 1500 + "]" * 1500 + "}"
    in_string = '{"id": "' + "[" * 1500 + '", "label": "sad"}'
    # Execute / Assert
    for path in ("/api/label", "/api/dismiss"):
        r = client.post(path, data=deep, headers=headers)
        assert r.status_code == 400 and "nested" in r.json["error"]
        r = client.post(path, data='{"id": {"a": {"b": {"c": {"d": 1}}}}}', headers=headers)
        assert r.status_code == 400
    r = client.post("/api/label", data=in_string, headers=headers)  # brackets inside a string are not nesting
    assert r.status_code in (400, 404) and "nested" not in r.json["error"]

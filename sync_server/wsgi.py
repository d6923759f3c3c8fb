"""WSGI entry point for gunicorn: settings come from ``INFANTINO_*`` environment variables.

    INFANTINO_DATA_DIR=/srv/infantino gunicorn -c python:infantino.sync_server.gunicorn_conf -w 2 --threads 16 \
        -b 127.0.0.1:8080 'infantino.sync_server.wsgi:app'

(``infantino.sync_server.gunicorn_conf``: the slow-client-safe worker and the /metrics multiprocess folder.)
"""
from . import create_app

app = create_app()

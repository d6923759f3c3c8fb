"""WSGI entry point for gunicorn: settings come from ``INFANTINO_*`` environment variables.

    INFANTINO_DATA_DIR=/srv/infantino gunicorn -w 2 -k gthread --threads 8 -b 127.0.0.1:8080 'sync_server.wsgi:app'
"""
from . import create_app

app = create_app()

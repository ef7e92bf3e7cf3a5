"""Turning a config into a running service: the app builder (`app.py`), the HTTP ingress
(`ingress.py`, bodies in `api.py`), the default config (`default.py`, `default.yaml`) and the
job entrypoint (`job.py`)."""

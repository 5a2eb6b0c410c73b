"""The render service: an HTTP API, NATS JetStream for jobs, leases and state, and
long-lived workers (``runner.Runner``). Everything here imports its third-party
packages (fastapi, uvicorn, nats-py) lazily: install them with ``pip install wanrender[serve]``."""

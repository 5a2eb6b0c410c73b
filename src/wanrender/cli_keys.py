"""``wanrender keys add|list|revoke`` (the clients' API keys, service/auth.py) and
``wanrender nats-creds DIR`` (the NATS users of a fleet, service/natsauth.py).

Keys live in ``DATA/keys.json`` of the service's --data folder; they can be changed
while the service runs (it re-reads the file) or while it is stopped."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
keys_app = typer.Typer(no_args_is_help=True, help="The service's client API keys (stored hashed under --data).")
DATA_HELP = "The service's data folder (the one given to 'wanrender serve --data')."


def _store(data: Path):
    from wanrender.errors import WanrenderError, shown
    from wanrender.service.auth import KeyStore

    if data.exists() and not data.is_dir():
        raise WanrenderError(f"--data {shown(data)}: not a folder — pass the service's data folder")
    return KeyStore(data)


@keys_app.command("add")
def add(
    name: str = typer.Argument(..., help="Who the key is for (a-z 0-9 . _ -)."),
    data: Path = typer.Option(Path("wanrender-data"), "--data", help=DATA_HELP),
    rate: int = typer.Option(30, "--rate", help="Job submissions a minute (a token bucket: bursts up to the same)."),
    max_jobs: int = typer.Option(4, "--max-jobs", help="Unfinished jobs (queued or running) at a time."),
) -> None:
    """Create a key and print it once (only its SHA-256 is stored: a lost key cannot be shown again)."""
    key = _store(data).add(name, rate, max_jobs)
    console.print(f"key {name!r}: {rate} jobs/min, {max_jobs} at a time — it is shown only now:", highlight=False)
    typer.echo(key)


@keys_app.command("list")
def list_keys(data: Path = typer.Option(Path("wanrender-data"), "--data", help=DATA_HELP)) -> None:
    """The keys' names and limits (never the keys)."""
    import time

    store = _store(data)
    keys = store.load()
    if not keys:
        why = ("every key was revoked: the service refuses all /v1 requests" if store.exists
               else "the service runs open, on loopback only")  # fmt: skip
        console.print(f"no API keys under {data} — {why}; add one with 'wanrender keys add NAME'", highlight=False)
        return
    for k in sorted(keys.values(), key=lambda k: k.name):
        made = time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created_at))
        typer.echo(f"{k.name}\t{k.rate_per_min}/min\t{k.max_jobs} at a time\tadded {made}")


@keys_app.command("revoke")
def revoke(
    name: str = typer.Argument(..., help="The key's name."),
    data: Path = typer.Option(Path("wanrender-data"), "--data", help=DATA_HELP),
) -> None:
    """Delete a key; a running service refuses it from its next request on."""
    _store(data).revoke(name)
    console.print(f"revoked {name!r}", highlight=False)


def nats_creds(
    folder: Path = typer.Argument(..., help="Where to write nats.conf, api.creds and worker.creds."),
) -> None:
    """Write the NATS users of a fleet (docker-compose.yml): nats.conf for nats-server (bcrypt hashes and subject
    permissions), api.creds for the API and worker.creds for the workers (mode 0600; existing ones are kept)."""
    import importlib.util

    from wanrender.errors import WanrenderError
    from wanrender.service.natsauth import write_fleet

    if importlib.util.find_spec("bcrypt") is None:
        raise WanrenderError("nats-creds needs bcrypt — install it with 'pip install \"wanrender[serve]\"'")
    paths = write_fleet(folder)
    for what in ("config", "api", "worker"):
        typer.echo(str(paths[what]))


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
    app.command("nats-creds")(nats_creds)

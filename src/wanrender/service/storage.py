"""Where a job's files live: a small key/value interface with a local-disk backend (the
service's ``--data`` folder) and an S3-compatible one (``--s3 URL --bucket B``).

Keys are the server's own (``jobs/<job id>/input.png``, ``jobs/<job id>/attempt-2/result.mp4``):
no request value ever becomes part of one. Queue messages carry only the job id; the
record names the keys.

Publishing a job's outputs (``publish``) differs by backend because S3 has no rename:

- local: the attempt's folder is renamed onto ``jobs/<id>/result/`` (one rename: a
  reader sees all the outputs or none), as the first slice did;
- S3: the objects stay under the attempt's prefix and the job record's ``result`` names
  them; the compare-and-set update of the record (which checks that the attempt is still
  the current one) is the atomic step. Other attempts' objects are deleted after it.

A late attempt that lost its job deletes its own objects; what a dead attempt left is
deleted when another attempt publishes, or when the job expires.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wanrender.errors import WanrenderError
from wanrender.service.jobs import JOB_ID, SIDECAR, VIDEO

CHUNK = 1 << 20


def job_prefix(job_id: str) -> str:
    if not JOB_ID.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return f"jobs/{job_id}/"


def attempt_prefix(job_id: str, attempt: int) -> str:
    return f"{job_prefix(job_id)}attempt-{int(attempt)}/"


class LocalStorage:
    """Keys are paths under ``root`` (the service's data folder)."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def describe(self) -> str:
        return f"data {self.root}"

    def path(self, key: str) -> Path:
        return self.root / key

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def put_file(self, key: str, src: Path) -> None:
        target = self.path(key)
        if Path(src).resolve() == target.resolve():
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
        shutil.copyfile(src, tmp)
        os.replace(tmp, target)

    def get_file(self, key: str, dest: Path) -> Path:
        shutil.copyfile(self.path(key), dest)
        return Path(dest)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        base = folder if prefix.endswith("/") else folder.parent
        if not base.is_dir():
            return []
        out = [p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file()]
        return sorted(k for k in out if k.startswith(prefix))

    def delete(self, prefix: str) -> None:
        """The key, or everything under a prefix ending in '/'."""
        target = self.path(prefix)
        if prefix.endswith("/"):
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def stream(self, key: str) -> Iterator[bytes]:
        with open(self.path(key), "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    # --- a job's attempt: where the render writes, and how the outputs become the result
    def attempt_folder(self, job_id: str, attempt: int, scratch: Path | None = None) -> Path:
        """Renders write straight into the attempt's folder: the publish is a rename."""
        return self.path(attempt_prefix(job_id, attempt))

    def upload_attempt(self, job_id: str, attempt: int, folder: Path) -> None:
        pass  # already in place

    def publish(self, job_id: str, attempt: int) -> dict:
        """The attempt's folder renamed onto the result folder; returns the result's keys."""
        root = self.path(job_prefix(job_id))
        final = root / "result"
        if final.exists():  # an earlier publish whose record update never landed: this attempt replaces it
            aside = root / f".result-old-{attempt}"
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(self.path(attempt_prefix(job_id, attempt)), final)
        return {"video": f"{job_prefix(job_id)}result/{VIDEO}", "sidecar": f"{job_prefix(job_id)}result/{SIDECAR}"}

    def drop_other_attempts(self, job_id: str, keep: int | None) -> None:
        for dead in self.path(job_prefix(job_id)).glob("attempt-*"):
            if keep is None or dead.name != f"attempt-{keep}":
                shutil.rmtree(dead, ignore_errors=True)


class S3Storage:
    """An S3-compatible bucket through boto3; ``endpoint`` is any S3 API (AWS, MinIO,
    Ceph, moto). Credentials come from the standard AWS environment variables or profile."""

    kind = "s3"

    def __init__(self, endpoint: str | None, bucket: str, client=None) -> None:
        self.endpoint, self.bucket = endpoint, bucket
        self._client = client

    def describe(self) -> str:
        return f"s3 {self.endpoint or 'AWS'} bucket {self.bucket}"

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=self.endpoint,
                                        config=Config(retries={"max_attempts": 3, "mode": "standard"}))  # fmt: skip
        return self._client

    def check(self) -> None:
        """The bucket is reachable with these credentials: refused in one line before anything starts."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - botocore's ClientError, NoCredentialsError, EndpointConnectionError
            raise WanrenderError(
                f"--s3 {self.endpoint or 'AWS'} --bucket {self.bucket}: cannot use the bucket ({_why(e)}) — check "
                "the URL, the bucket name and the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
            ) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)  # a PUT is atomic: whole or absent

    def put_file(self, key: str, src: Path) -> None:
        self.client.upload_file(str(src), self.bucket, key)

    def get_file(self, key: str, dest: Path) -> Path:
        tmp = Path(dest).with_name(f".{Path(dest).name}.partial")
        try:
            self.client.download_file(self.bucket, key, str(tmp))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return Path(dest)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as e:  # noqa: BLE001 - ClientError 404
            if _status(e) == 404:
                return False
            raise
        return True

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", ())]
        return sorted(keys)

    def delete(self, prefix: str) -> None:
        keys = self.list(prefix) if prefix.endswith("/") else [prefix]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def stream(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        try:
            while chunk := body.read(CHUNK):
                yield chunk
        finally:
            body.close()

    def attempt_folder(self, job_id: str, attempt: int, scratch: Path | None = None) -> Path:
        """A local scratch folder to render into; its files are uploaded afterwards."""
        base = Path(scratch) if scratch is not None else Path(tempfile.gettempdir())
        return base / "wanrender-scratch" / job_id / f"attempt-{int(attempt)}"

    def upload_attempt(self, job_id: str, attempt: int, folder: Path) -> None:
        prefix = attempt_prefix(job_id, attempt)
        for name in (VIDEO, SIDECAR):
            self.put_file(prefix + name, Path(folder) / name)

    def publish(self, job_id: str, attempt: int) -> dict:
        prefix = attempt_prefix(job_id, attempt)
        return {"video": prefix + VIDEO, "sidecar": prefix + SIDECAR}

    def drop_other_attempts(self, job_id: str, keep: int | None) -> None:
        for key in self.list(job_prefix(job_id)):
            rest = key[len(job_prefix(job_id)) :]
            if rest.startswith("attempt-") and (keep is None or not rest.startswith(f"attempt-{keep}/")):
                self.delete(key)


def _status(e: Exception) -> int | None:
    return getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


def _why(e: Exception) -> str:
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    return f"{type(e).__name__}{': ' + str(code) if code else ''}"


def as_storage(where) -> LocalStorage | S3Storage:
    """A storage, or a data folder (the first slice's calls) as local storage."""
    return where if hasattr(where, "publish") else LocalStorage(Path(where))


def input_key(job_id: str, request: dict) -> str:
    """The upload's key: the job's folder plus the name the checked request gives it."""
    name = Path(str(request.get("image", "input.png"))).name
    if not name.startswith("input."):
        raise ValueError(f"job {job_id}: unexpected input name {name!r}")
    return job_prefix(job_id) + name


def result_key(record, what: str) -> str:
    """The key of a succeeded job's ``what`` ("video" | "sidecar"); the first slice's
    records name files under the result folder."""
    name = (record.result or {}).get(what) or (VIDEO if what == "video" else SIDECAR)
    return name if "/" in name else f"{job_prefix(record.id)}result/{name}"

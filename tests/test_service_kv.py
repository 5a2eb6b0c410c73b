"""Listing a JetStream key-value bucket without a consumer (broker.kv_keys / kv_values),
against a real nats-server: deleted keys, an empty bucket, and the fallback past one
stream-info page (nats-server answers at most 100,000 subjects; the page is made small
here so that the fallback runs on three keys)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("nats")

from wanrender.service import broker  # noqa: E402


def _run(tmp_path: Path, body):
    async def main(url: str):
        nc = await broker.connect(url, "kv-test")
        try:
            js = nc.jetstream()
            from nats.js.api import KeyValueConfig

            kv = await js.create_key_value(KeyValueConfig(bucket="t", history=1))
            return await body(kv)
        finally:
            await nc.close()

    with broker.EmbeddedBroker(tmp_path / "nats") as b:
        return asyncio.run(main(b.url))


def test_keys_and_values_skip_deleted_keys_in_both_listings(tmp_path: Path, monkeypatch) -> None:
    async def body(kv):
        assert await broker.kv_keys(kv) == [] and await broker.kv_values(kv) == []  # empty bucket
        for k in ("a", "b", "c"):
            await kv.put(k, json.dumps({"k": k}).encode())
        await kv.delete("b")
        fast = await broker.kv_keys(kv)  # one stream-info page: the tombstone's subject is listed
        values = await broker.kv_values(kv)
        monkeypatch.setattr(broker, "SUBJECTS_PAGE", 2)  # a "full page": nats-py's consumer lists them
        slow = await broker.kv_keys(kv)
        slow_values = await broker.kv_values(kv)
        return fast, values, slow, slow_values

    fast, values, slow, slow_values = _run(tmp_path, body)
    assert set(fast) >= {"a", "c"} and fast == sorted(fast)
    assert slow == ["a", "c"]
    assert values == slow_values == [{"k": "a"}, {"k": "c"}]  # the deleted key reads as nothing

"""Scraping a running server's ``GET /v1/metrics`` as Prometheus would: the text is parsed by
``prometheus_client``'s own parser, and samples are looked up by name and labels."""

from __future__ import annotations

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from crdtsync_server import Server

from .conftest import ADMIN_TOKEN

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Every sample of one scrape: ``(name, labels) -> value``."""


async def metrics_text(server: Server) -> str:
    """The exposition text, fetched with the admin token (200 and the text format checked)."""
    async with aiohttp.ClientSession() as session, session.get(
            server.url + "/v1/metrics",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return await resp.text()


def parse(text: str) -> Samples:
    """Every sample of an exposition; a family named twice fails (Prometheus refuses it)."""
    samples: Samples = {}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        assert family.name not in names, f"family {family.name} appears twice"
        names.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(server: Server) -> Samples:
    return parse(await metrics_text(server))


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample ``name{labels}``; a KeyError names what is missing."""
    key = (name, frozenset(labels.items()))
    if key not in samples:
        raise KeyError(f"no sample {name}{labels}")
    return samples[key]

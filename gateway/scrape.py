"""Reading a running gateway from outside: its /metrics and /health over HTTP.

The demo's live view and the tests both watch a gateway this way, as a technician's
Prometheus would; the series names are those of metrics.py.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from .metrics import PREFIX


def fetch_metrics(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> str:
    """The Prometheus text of /metrics; OSError when the gateway does not answer."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
        return resp.read().decode()


def fetch_health(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> dict | None:
    """The /health JSON (also when it says unhealthy, with a 503), or None if unreachable."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


def metric_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the series of `name` (without the citynode_gateway_ prefix) whose labels
    include `labels`, e.g. metric_sum(text, "rejected_total", reason="bad_signature")."""
    total = 0.0
    for series, value in _samples(text, name):
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += value
    return total


def metric_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """The series of `name` summed by one label's value, e.g. rejected_total by reason."""
    out: dict[str, float] = {}
    needle = f'{label}="'
    for series, value in _samples(text, name):
        start = series.find(needle)
        if start < 0:
            continue
        start += len(needle)
        key = series[start:series.index('"', start)]
        out[key] = out.get(key, 0.0) + value
    return out


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    full = PREFIX + name
    samples = []
    for line in text.splitlines():
        if not line.startswith(full):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == full:
            samples.append((series, float(value)))
    return samples

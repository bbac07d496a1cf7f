"""Triton replicas: who they are (each configured endpoint resolved to its addresses), their load, the choice.

Each entry of ``GATEWAY_TRITON_URLS`` is a ``host:port``. An IP address is one replica; a host name
is resolved (the standard library's ``getaddrinfo``, the resolver the rest of the host uses) to every
address it has, so a Kubernetes headless Service is one replica per ready Triton pod, and resolved
again every ``triton_resolve_interval_s``. An address that appears becomes a replica (probed before it
gets traffic); one that disappears is *retired*: it gets no new request and its channel is closed
once its last request ended, so a pod that leaves the Service finishes what it serves.

Why by hand: gRPC's own resolver and ``round_robin`` policy spread *calls* over a name's addresses
inside one channel, but gRPC Python exposes neither the addresses nor a way to choose one per call,
and round robin knows nothing of how long each generation runs. So each address gets its own channel
(gRPC still does the connecting, keepalive and reconnect backoff), and the choice among them is
made here: power of two choices on outstanding tokens (:func:`choose`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.metrics import RoutingMetrics

logger = logging.getLogger("gateway")

Resolver = Callable[[str, int], Awaitable[list[str]]]


def split_target(target: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) as (host, port)."""
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` has (IPv4 when it has any, else IPv6), sorted; [] when the name does not exist.

    One family only: a dual-stack name lists each pod twice (A and AAAA), which would count one
    Triton as two replicas. A lookup that fails for another reason (no DNS server answering)
    raises ``OSError``, so the caller keeps the addresses it had.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        if err.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []  # a headless Service with no ready pod: no address is the truth
        raise
    return one_family(infos)


def one_family(infos: Sequence[tuple[Any, ...]]) -> list[str]:
    """The distinct addresses of ``getaddrinfo`` results, IPv4 ones if there are any, else IPv6 ones, sorted."""
    v4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    return v4 or sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET6})


@dataclass(eq=False)
class Replica:
    """One Triton server: its channel, health, and the work the gateway has in flight on it."""

    address: str  # host:port the channel goes to; the metrics' `replica` label
    target: str  # the GATEWAY_TRITON_URLS entry it was resolved from
    client: Any  # tritonclient.grpc.aio.InferenceServerClient (a fake in unit tests)
    healthy: bool = False
    retired: bool = False  # its name no longer resolves to it: no new request; closed once idle
    last_error: str | None = "not probed yet"
    ready_models: set[str] = field(default_factory=set)
    in_flight: int = 0
    outstanding_tokens: int = 0
    # Set when the replica is taken out; requests waiting for their first token on it then move.
    # A new event replaces it when the replica is admitted again.
    down: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: RoutingMetrics | None = field(default=None, repr=False)  # None: a registry of its own (tests)

    def __post_init__(self) -> None:
        metrics = self.metrics or RoutingMetrics(CollectorRegistry())
        # Its series, looked up once (a lookup takes a lock); they exist from the start, at 0.
        self._routed = metrics.routed.labels(self.address)
        self._in_flight_gauge = metrics.in_flight.labels(self.address)
        self._outstanding_gauge = metrics.outstanding_tokens.labels(self.address)

    def publish(self, routed: bool = False) -> None:
        """Export its load (and one more routed request)."""
        if routed:
            self._routed.inc()
        self._in_flight_gauge.set(self.in_flight)
        self._outstanding_gauge.set(self.outstanding_tokens)

    @property
    def url(self) -> str:
        return self.address

    def serves(self, model: str | None, watched: set[str]) -> bool:
        """Whether a new request for `model` may go here: ready, not retired, and the model ready on it."""
        return self.healthy and not self.retired and (
            model is None or model not in watched or model in self.ready_models)


def choose(candidates: Sequence[Replica], rng: random.Random) -> Replica:
    """Power of two choices: of two replicas drawn at random, the one with fewer outstanding tokens.

    Outstanding tokens (the `max_tokens` still to come of every request in flight) weigh a request
    by the decoding it will cost, so a replica busy with long generations is avoided for as long as
    they run; in-flight requests break ties. Two random draws rather than the global minimum keep
    several gateways, each seeing only its own requests, from all piling onto the same replica.
    """
    if len(candidates) == 1:
        return candidates[0]
    first, second = rng.sample(list(candidates), 2)
    return min((first, second), key=lambda r: (r.outstanding_tokens, r.in_flight))


class Lease:
    """One request's share of a replica's load, from dispatch to its end; released exactly once."""

    def __init__(self, replica: Replica, max_tokens: int) -> None:
        self.replica, self.remaining = replica, max(1, max_tokens)
        self.down = replica.down  # the event current at dispatch: a later re-admission does not clear it
        self.released = False
        replica.in_flight += 1
        replica.outstanding_tokens += self.remaining
        replica.publish(routed=True)

    def consumed(self, tokens: int) -> None:
        """`tokens` arrived: that much less decoding is outstanding."""
        done = min(tokens, self.remaining)
        self.remaining -= done
        self.replica.outstanding_tokens -= done
        self.replica.publish()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.replica.in_flight -= 1
        self.replica.outstanding_tokens -= self.remaining
        self.remaining = 0
        self.replica.publish()


class ReplicaSet:
    """The replicas of the configured targets, kept in step with what their names resolve to."""

    def __init__(self, targets: Sequence[str], new_client: Callable[[str], Any], resolver: Resolver = resolve,
                 metrics: RoutingMetrics | None = None) -> None:
        self.targets = list(targets)
        self._new_client, self._resolver = new_client, resolver
        self.metrics = metrics or RoutingMetrics(CollectorRegistry())
        self.replicas: dict[str, Replica] = {}
        self.unresolved: dict[str, str] = {}  # target -> why it has no address now
        for target in self.targets:  # addresses need no lookup: their replicas exist from the start
            host, port = split_target(target)
            if is_address(host):
                self._add(join_address(host, port), target)

    @property
    def names(self) -> list[str]:
        """Targets given as host names (resolved periodically)."""
        return [t for t in self.targets if not is_address(split_target(t)[0])]

    def current(self) -> list[Replica]:
        """Replicas not retired, in the order they were found."""
        return [r for r in self.replicas.values() if not r.retired]

    def _add(self, address: str, target: str) -> Replica:
        replica = Replica(address, target, self._new_client(address), metrics=self.metrics)
        self.replicas[address] = replica
        return replica

    async def refresh(self) -> list[Replica]:
        """Resolve every host name again; add new addresses, retire vanished ones; return the added ones.

        A failed lookup keeps that name's replicas as they are (a DNS hiccup must not empty the set).
        """
        added: list[Replica] = []
        for target in self.names:
            host, port = split_target(target)
            try:
                addresses = {join_address(a, port) for a in await self._resolver(host, port)}
            except OSError as err:
                why = f"cannot resolve {host}: {err}"
                if self.unresolved.get(target) != why:
                    logger.warning("Triton %s: %s; keeping its %d replicas", target, why,
                                   sum(r.target == target for r in self.current()))
                self.unresolved[target] = why
                continue
            if addresses:
                self.unresolved.pop(target, None)
            else:
                self.unresolved[target] = f"{host} has no address"
            for replica in [r for r in self.replicas.values() if r.target == target]:
                if replica.retired != (replica.address not in addresses):
                    replica.retired = not replica.retired
                    logger.warning("Triton %s (%s) %s", replica.address, target,
                                   "retired: no longer resolved; finishing its requests" if replica.retired
                                   else "resolved again")
            for address in sorted(addresses - self.replicas.keys()):
                added.append(self._add(address, target))
                logger.info("Triton %s (%s) found", address, target)
        return added

    async def close_retired(self) -> None:
        """Close the channels of retired replicas whose last request has ended."""
        for replica in [r for r in self.replicas.values() if r.retired and r.in_flight == 0]:
            del self.replicas[replica.address]
            self.metrics.forget(replica.address)
            await replica.client.close()

    async def close(self) -> None:
        for replica in self.replicas.values():
            await replica.client.close()

"""Replica membership and choice without Triton: power of two choices on outstanding tokens, the load each
request holds, and a host name resolved again and again (a resolver function stands in for DNS)."""

from __future__ import annotations

import random
import socket
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.metrics import RoutingMetrics
from gateway.replicas import Lease, Replica, ReplicaSet, choose, one_family, resolve


class FakeClient:
    def __init__(self, address: str) -> None:
        self.address, self.closed = address, False

    async def close(self) -> None:
        self.closed = True


def _replicas(*loads: int) -> list[Replica]:
    return [Replica(f"10.0.0.{i}:8001", "triton:8001", FakeClient(""), healthy=True, outstanding_tokens=load)
            for i, load in enumerate(loads)]


def test_a_replica_with_long_generations_is_never_chosen_while_others_have_less() -> None:
    replicas = _replicas(2000, 16, 40)
    rng = random.Random(3)
    chosen = Counter(choose(replicas, rng).address for _ in range(600))
    assert chosen[replicas[0].address] == 0
    # the lighter of each drawn pair: replica 1 beats replica 2 whenever both are drawn
    assert chosen[replicas[1].address] > chosen[replicas[2].address] > 0


def test_equal_load_spreads_over_every_replica() -> None:
    replicas = _replicas(0, 0, 0)
    rng = random.Random(5)
    chosen = Counter(choose(replicas, rng).address for _ in range(900))
    assert set(chosen) == {r.address for r in replicas} and min(chosen.values()) > 200


def test_in_flight_breaks_ties() -> None:
    light, heavy = _replicas(10, 10)
    heavy.in_flight = 3
    assert {choose([light, heavy], random.Random(i)).address for i in range(20)} == {light.address}


def test_a_lease_holds_its_requests_load_until_released_once() -> None:
    registry = CollectorRegistry()
    replica = Replica("10.0.0.1:8001", "triton:8001", FakeClient(""), healthy=True, metrics=RoutingMetrics(registry))
    lease = Lease(replica, max_tokens=100)
    other = Lease(replica, max_tokens=20)
    assert (replica.in_flight, replica.outstanding_tokens) == (2, 120)
    lease.consumed(30)
    assert replica.outstanding_tokens == 90
    assert registry.get_sample_value("gateway_triton_replica_outstanding_tokens", {"replica": replica.address}) == 90
    lease.consumed(500)  # never below what the request asked for
    assert replica.outstanding_tokens == 20
    lease.release()
    lease.release()
    assert (replica.in_flight, replica.outstanding_tokens) == (1, 20)
    other.release()
    assert (replica.in_flight, replica.outstanding_tokens) == (0, 0)
    assert registry.get_sample_value("gateway_triton_routed_requests_total", {"replica": replica.address}) == 2


class Dns:
    """A resolver we control: what each name resolves to now, or an OSError for a failing lookup."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str] | OSError] = {}
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answer = self.answers[host]
        if isinstance(answer, OSError):
            raise answer
        return answer


async def test_a_name_is_every_address_it_resolves_to_and_follows_them() -> None:
    dns = Dns()
    replicas = ReplicaSet(["triton:8001", "127.0.0.1:9001"], FakeClient, dns)
    assert [r.address for r in replicas.current()] == ["127.0.0.1:9001"]  # an address needs no lookup
    dns.answers["triton"] = ["10.0.0.2", "10.0.0.1"]
    added = await replicas.refresh()
    assert [r.address for r in added] == ["10.0.0.1:8001", "10.0.0.2:8001"] and dns.asked == ["triton"]
    assert all(r.target == "triton:8001" and not r.healthy for r in added)  # admitted only once probed
    first = added[0]
    lease = Lease(first, 50)  # a request in flight on a pod about to leave

    dns.answers["triton"] = ["10.0.0.2", "10.0.0.3"]  # pod 1 left the Service, pod 3 joined
    [new] = await replicas.refresh()
    assert new.address == "10.0.0.3:8001"
    assert first.retired and first not in replicas.current() and not first.serves(None, set())
    await replicas.close_retired()
    assert not first.client.closed, "closed under a request still streaming"
    lease.release()
    await replicas.close_retired()
    assert first.client.closed and "10.0.0.1:8001" not in replicas.replicas

    dns.answers["triton"] = OSError("Temporary failure in name resolution")
    assert await replicas.refresh() == []
    assert {r.address for r in replicas.current()} == {"127.0.0.1:9001", "10.0.0.2:8001", "10.0.0.3:8001"}
    assert "Temporary failure" in replicas.unresolved["triton:8001"]

    dns.answers["triton"] = []  # no ready pod at all
    await replicas.refresh()
    assert [r.address for r in replicas.current()] == ["127.0.0.1:9001"]
    assert replicas.unresolved["triton:8001"] == "triton has no address"
    dns.answers["triton"] = ["10.0.0.2"]  # back before its channel was closed: the same replica again
    second = replicas.replicas["10.0.0.2:8001"]
    assert await replicas.refresh() == [] and not second.retired and "triton:8001" not in replicas.unresolved


async def test_ipv6_addresses_are_bracketed() -> None:
    dns = Dns()
    dns.answers["triton"] = ["fd00::5"]
    replicas = ReplicaSet(["triton:8001", "[::1]:8001"], FakeClient, dns)
    await replicas.refresh()
    assert [r.address for r in replicas.current()] == ["[::1]:8001", "[fd00::5]:8001"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
async def test_the_system_resolver_finds_loopback(host: str) -> None:
    assert await resolve(host, 8001) == ["127.0.0.1"]


def test_a_dual_stack_name_counts_each_pod_once() -> None:
    """A dual-stack headless Service answers A and AAAA records for each pod: one Triton, not two."""
    tcp = socket.SOCK_STREAM
    both = [(socket.AF_INET6, tcp, 6, "", ("fd00::7", 8001, 0, 0)), (socket.AF_INET, tcp, 6, "", ("10.0.0.7", 8001)),
            (socket.AF_INET, tcp, 6, "", ("10.0.0.7", 8001)), (socket.AF_INET, tcp, 6, "", ("10.0.0.3", 8001))]
    assert one_family(both) == ["10.0.0.3", "10.0.0.7"]
    assert one_family([both[0]]) == ["fd00::7"]  # an IPv6-only cluster


def test_readiness_names_a_host_without_an_address(tmp_path: Path) -> None:
    """A Service with no ready pod: the gateway starts, is not ready, and says which name has no address."""
    from fastapi.testclient import TestClient

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from gateway.triton import TritonPool
    from tests.unit.gateway_fakes import write_repository

    dns = Dns()
    dns.answers["triton"] = []
    settings = GatewaySettings(repository=write_repository(tmp_path), triton_urls=["triton:8001"])
    app = create_app(settings, pool_factory=lambda s: TritonPool(s.triton_urls, 1.0, 60, resolver=dns))
    with TestClient(app, base_url="http://localhost") as client:
        response = client.get("/health/ready")
        assert response.status_code == 503
        assert response.json()["triton"] == {"triton:8001": "triton has no address"}
        chat = client.post("/v1/chat", json={"message": "hi"})
        assert chat.status_code == 503 and "triton:8001: triton has no address" in chat.json()["error"]["message"]

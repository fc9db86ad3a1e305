"""Test helpers: two hosts on one machine (network namespaces joined by a veth pair) and a Ray
cluster across them (a head in one, a worker node in the other).

Everything made here is removed by the context managers' exits: namespaces (their veth pair goes
with them) and the Ray processes, stopped by their process group (never ``ray stop``). Names are
unique per process (pid suffix). Each namespace has its own network stack, so the Ray ports
cannot collide with any other cluster on the machine; the subnet is private and only exists
inside the two namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IFACE = "nlhf0"  # the veth end's name inside each namespace (the same name on both hosts)
RAY = str(Path(sys.executable).parent / "ray")


def netns_unavailable() -> str | None:
    """Why two network namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"nlhfprobe{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_subnet() -> str:
    """A /24 in 10.213.0.0/16 (derived from the pid) that no address or route on the machine uses."""
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    for k in range(256):
        third = (os.getpid() + k) % 250 + 1
        prefix = f"10.213.{third}."
        if prefix not in used:
            return prefix
    raise RuntimeError("no free /24 in 10.213.0.0/16")


@dataclass
class Hosts:
    """Two namespaces ``names`` with addresses ``ips`` (``ips[0]``: the head's host)."""

    names: tuple[str, str]
    ips: tuple[str, str]

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]


@contextlib.contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Two network namespaces joined by one veth pair, each with its own address; removed on exit."""
    pid = os.getpid()
    names = (f"nlhfA{pid}", f"nlhfB{pid}")
    prefix = _free_subnet()
    ips = (prefix + "1", prefix + "2")
    made: list[str] = []
    try:
        for n in names:
            _ip("netns", "add", n)
            made.append(n)
        _ip("link", "add", f"nlhfa{pid}", "netns", names[0], "type", "veth", "peer", "name", f"nlhfb{pid}",
            "netns", names[1])
        for n, ip, dev in zip(names, ips, (f"nlhfa{pid}", f"nlhfb{pid}")):
            _ip("-n", n, "link", "set", dev, "name", IFACE)
            _ip("-n", n, "addr", "add", f"{ip}/24", "dev", IFACE)
            _ip("-n", n, "link", "set", "lo", "up")
            _ip("-n", n, "link", "set", IFACE, "up")
        yield Hosts(names, ips)
    finally:
        for n in made:  # deleting a namespace deletes its veth end, and so the pair
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)


def ray_env() -> dict[str, str]:
    """Environment of every Ray process and driver of the two-host cluster.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``: with 0 (the single-node setting of conftest) a
    worker node refuses to join ("Multi-node Ray clusters are not supported") and the driver's
    node address falls back to 127.0.0.1. ``GLOO_SOCKET_IFNAME``: the machine's hostname resolves
    to an address that does not exist in the namespaces, so gloo would fall back to loopback.
    """
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
               RAY_USAGE_STATS_ENABLED="0", GLOO_SOCKET_IFNAME=IFACE,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    return env


# Every listener of a node on an explicit port (each namespace has its own ports, all free).
GCS_PORT, DASHBOARD_PORT, CLIENT_PORT = 6380, 8266, 10002


def _node_ports() -> list[str]:
    return ["--node-manager-port=6381", "--object-manager-port=6382", "--min-worker-port=11000",
            "--max-worker-port=11999", "--metrics-export-port=6383", "--dashboard-agent-grpc-port=6384",
            "--dashboard-agent-listen-port=6385", "--runtime-env-agent-port=6386"]


@dataclass
class Cluster:
    hosts: Hosts
    temp_root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.hosts.ips[0]}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.hosts.ips[0]}:{DASHBOARD_PORT}"

    def run(self, host: int, cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` on host ``host`` (0: the head's) as a driver of this cluster."""
        env = dict(ray_env(), RAY_ADDRESS=self.address, **kw.pop("env", {}))
        return subprocess.run(self.hosts.exec_prefix(host) + cmd, env=env, capture_output=True, text=True, **kw)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop `ray start --block` processes and their children: their process groups, TERM (all at
    once, up to 20 s) then KILL."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.time() + wait
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        if all(proc.poll() is not None for proc in procs) and sig == signal.SIGTERM:
            break
    for proc in procs:  # children that outlived `ray start`
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_nodes(cluster: Cluster, n: int, timeout: float) -> None:
    code = ("import ray, json; ray.init(log_to_driver=False); "
            "print(json.dumps(sum(1 for x in ray.nodes() if x['Alive'])))")
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        res = cluster.run(0, [sys.executable, "-c", code], timeout=60)
        last = res.stdout + res.stderr
        if res.returncode == 0 and json.loads(res.stdout.strip().splitlines()[-1]) >= n:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster did not reach {n} nodes within {timeout}s: {last[-2000:]}")


@contextlib.contextmanager
def ray_cluster(hosts: Hosts, temp_root: Path, cpus: tuple[int, int],
                resources: tuple[dict[str, float], dict[str, float]]) -> Iterator[Cluster]:
    """A Ray head on host 0 and a worker node on host 1 (``cpus``/``resources`` per node), each
    with its own ``--temp-dir``; stopped by process group on exit."""
    cluster = Cluster(hosts, temp_root)
    env = ray_env()
    try:
        for i in (0, 1):
            tmp = temp_root / f"n{i}"  # short: Ray's unix socket paths must stay under 107 characters
            tmp.mkdir(parents=True, exist_ok=True)
            role = (["--head", f"--port={GCS_PORT}", f"--dashboard-host={hosts.ips[0]}",
                     f"--dashboard-port={DASHBOARD_PORT}", f"--ray-client-server-port={CLIENT_PORT}",
                     "--include-dashboard=true"] if i == 0 else [f"--address={cluster.address}"])
            cmd = hosts.exec_prefix(i) + [RAY, "start", "--block", *role, f"--node-ip-address={hosts.ips[i]}",
                                          *_node_ports(), f"--num-cpus={cpus[i]}",
                                          f"--resources={json.dumps(resources[i])}", f"--temp-dir={tmp}"]
            log = open(temp_root / f"ray-start-{i}.log", "w")
            cluster.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            if i == 0:
                _wait_nodes(cluster, 1, 120)
        _wait_nodes(cluster, 2, 120)
        yield cluster
    finally:
        _stop(cluster.procs)

"""The machines of a fit on several of them, as its user sees them gather: the node flags,
node 0's address checked before torchrun starts, a line while the nodes wait for each other,
and one line when one does not come.

``--nnodes`` runs torchrun's static rendezvous: node 0's torchrun serves a TCPStore at
``--master``, and every node's torchrun joins it. Left to itself, torchrun waits 600 s in
silence for a node that never comes and ends in a traceback, and a node whose master does
not answer repeats torch's connection warnings until then. Here a name that does not resolve,
or a node 0 that its own ``--master`` does not reach, is one line at once; a node other than
0 waits for node 0's store to answer before it starts torchrun, so node 0 may start later;
and every node prints ``waiting for node 1 of 2 at HOST:PORT, 45 s of 600 s`` every
WAIT_LINE_EVERY seconds until all are there, or ``--join-timeout`` has passed, which stops
its torchrun (no worker has started then) and ends the command in one line naming who did
not come.

Who has come: each node's torchrun agent writes ``<rdzv id>/torchelastic/role_info/<node
rank>`` into the store once it has joined, node 0's once every other node has (torch's
``SimpleElasticAgent._assign_worker_ranks``), so the keys name the missing nodes exactly.

Nothing here imports torch until a fit starts: the command line reads JOIN_TIMEOUT for its
help.
"""

from __future__ import annotations

import errno
import math
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import ImagefitError

# Seconds a node waits for the others: torchrun's own default, and time enough to start the
# nodes by hand one after another (log in, change to the data, type the command); the
# waiting line says what is happening meanwhile, so a long wait is not a silent one.
JOIN_TIMEOUT = 600
WAIT_LINE_EVERY = 15  # seconds between waiting lines
CONNECT_BOUND = 3  # seconds for one attempt to reach node 0
RDZV_ID = "imagefit"


@dataclass(frozen=True)
class Nodes:
    """The machines of a multi-node fit: how many, this one's number, node 0's address, and
    how long they wait for each other."""

    count: int
    rank: int
    host: str
    port: int
    join_timeout: float = JOIN_TIMEOUT

    @property
    def master(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def torchrun_args(self) -> list[str]:
        """torchrun's static rendezvous at node 0: node R's ranks follow node R-1's, so rank 0
        (the run directory's writer) is on node 0. torchrun's own timeout is a minute past
        ours, so that ours ends the wait, in one line."""
        return [f"--nnodes={self.count}", f"--node-rank={self.rank}",
                f"--master-addr={self.host}", f"--master-port={self.port}",
                f"--rdzv-id={RDZV_ID}", f"--rdzv-conf=timeout={math.ceil(self.join_timeout) + 60}"]


def parse_nodes(count: str, node_rank: str, master: str | None,
                join_timeout: str | None = None) -> Nodes | None:
    """``--nnodes``, ``--node-rank``, ``--master HOST:PORT`` and ``--join-timeout``, checked
    (the name of node 0 resolved here: torch's client would repeat its warnings for one that
    does not); None for one machine."""
    try:
        count_value = int(count)
    except ValueError:
        count_value = 0
    if count_value < 1:
        raise ImagefitError(f"--nnodes {count}: give the number of machines, 1 or more")
    try:
        rank_value = int(node_rank)
    except ValueError:
        rank_value = -1
    if not 0 <= rank_value < count_value:
        raise ImagefitError(f"--node-rank {node_rank}: give this machine's number, 0 to "
                            f"{count_value - 1} (--nnodes {count_value})")
    if count_value == 1:
        if master is not None or rank_value or join_timeout is not None:
            raise ImagefitError("--master, --node-rank and --join-timeout are for fits on "
                                "several machines: give --nnodes N too")
        return None
    if master is None:
        raise ImagefitError(f"--nnodes {count_value} needs --master HOST:PORT: node 0's "
                            "address and a free port, the same on every node")
    host, _, port = master.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ImagefitError(f"--master {master}: give node 0's address and a port, e.g. "
                            "--master 10.0.0.1:29500")
    timeout = JOIN_TIMEOUT if join_timeout is None else _seconds(join_timeout)
    nodes = Nodes(count_value, rank_value, host.strip("[]"), int(port), timeout)
    try:
        socket.getaddrinfo(nodes.host, nodes.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        reason = error.strerror if isinstance(error, socket.gaierror) else str(error)
        raise ImagefitError(f"--master {master}: the name {nodes.host} does not resolve on "
                            f"this machine ({reason}): give node 0's IP address, or a name "
                            "every node resolves") from None
    return nodes


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ImagefitError(f"--join-timeout {text}: give the seconds each node waits for the "
                            f"others, e.g. --join-timeout {JOIN_TIMEOUT}")
    return value


def check_master_is_here(nodes: Nodes) -> None:
    """On node 0, which serves the rendezvous at its own ``--master``: one line at once for
    a port in use or an address that does not reach this machine. It listens on the port as
    the store will, and connects to ``--master``: the connection must arrive here."""
    try:
        listener = socket.create_server(("", nodes.port), family=socket.AF_INET6,
                                        dualstack_ipv6=True) if socket.has_dualstack_ipv6() \
            else socket.create_server(("", nodes.port))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ImagefitError(f"--master {nodes.master}: port {nodes.port} is in use on this "
                                "machine (node 0): give a free port, the same on every "
                                "node") from None
        raise ImagefitError(f"--master {nodes.master}: node 0 cannot listen on port "
                            f"{nodes.port} ({error.strerror}): give another port, the same "
                            "on every node") from None
    with listener:
        listener.settimeout(CONNECT_BOUND)
        try:
            with socket.create_connection((nodes.host, nodes.port), timeout=CONNECT_BOUND):
                accepted, _ = listener.accept()
        except OSError:
            raise ImagefitError(f"--master {nodes.master}: this is node 0 (--node-rank 0), "
                                f"which serves the rendezvous there, and {nodes.host} does "
                                "not reach this machine: give this machine's address in "
                                f"--master on every node, or run --node-rank 0 on "
                                f"{nodes.host}") from None
        accepted.close()  # after the client: its port, not the store's, waits out the close


class JoinClock:
    """``--join-timeout``'s clock, from the start of the launch, and the waiting line."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes
        self.started = time.monotonic()
        self.next_line = self.started

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def passed(self) -> bool:
        return self.elapsed() >= self.nodes.join_timeout

    def tell(self, waiting_for: str, note: str = "") -> None:
        """The waiting line, when its turn has come."""
        if time.monotonic() < self.next_line:
            return
        print(f"imagefit: waiting for {waiting_for} at {self.nodes.master}{note}, "
              f"{self.elapsed():.0f} s of {self.nodes.join_timeout:g} s", file=sys.stderr,
              flush=True)
        self.next_line = time.monotonic() + WAIT_LINE_EVERY


def prepare(nodes: Nodes) -> JoinClock:
    """Before torchrun starts: on node 0, ``--master`` reaching this machine; on the others,
    node 0's store answering (torchrun's connection warnings would repeat while it does
    not). Returns the join timeout's clock, started."""
    clock = JoinClock(nodes)
    if nodes.rank:
        wait_for_master(nodes, clock)
    else:
        check_master_is_here(nodes)
    return clock


def wait_for_master(nodes: Nodes, clock: JoinClock) -> None:
    """Return once node 0's store answers, saying meanwhile that this node waits for it; an
    error once ``--join-timeout`` has passed."""
    while _missing_nodes(nodes) is None:
        if clock.passed():
            raise ImagefitError(
                f"node 0 did not answer at {nodes.master} within {nodes.join_timeout:g} s "
                f"(--join-timeout): start it with the same command and --node-rank 0 on "
                f"{nodes.host}, check that this machine reaches {nodes.host} on port "
                f"{nodes.port} (a firewall may block it), or wait longer with --join-timeout "
                "SECONDS")
        clock.tell("node 0", " (nothing answers there yet)")
        time.sleep(1)


def watch(launcher: subprocess.Popen, clock: JoinClock) -> bool:
    """Until every node has joined: the waiting line, naming who is missing. Returns False
    when torchrun ended first. Once ``--join-timeout`` has passed, or at Ctrl-C (which
    torchrun does not act on while it waits in the store), torchrun is stopped (its workers
    start only once every node has joined) and the command ends."""
    nodes = clock.nodes
    try:
        while launcher.poll() is None:
            missing = _missing_nodes(nodes)
            if missing is None and nodes.rank == 0:
                missing = list(range(1, nodes.count))  # no one can join before the store is up
            if missing == [] or _workers_started(launcher):
                return True
            if clock.passed():
                launcher.kill()
                launcher.wait()
                raise ImagefitError(_not_joined(nodes, missing))
            if missing:
                clock.tell(_named(missing, nodes.count))
            else:
                clock.tell("node 0", " (it no longer answers)")
            try:
                launcher.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
    except KeyboardInterrupt:
        launcher.kill()
        launcher.wait()
        raise
    return False


def _missing_nodes(nodes: Nodes) -> list[int] | None:
    """The nodes other than 0 that have not joined yet ([]: the rendezvous is complete);
    None while node 0's store does not answer. A plain connection is tried first: a
    TCPStore client that cannot connect repeats torch's warnings."""
    try:
        socket.create_connection((nodes.host, nodes.port), timeout=CONNECT_BOUND).close()
    except OSError:
        return None
    from torch.distributed import TCPStore

    try:
        store = TCPStore(nodes.host, nodes.port, is_master=False, wait_for_workers=False,
                         timeout=timedelta(seconds=CONNECT_BOUND))
        return [rank for rank in range(1, nodes.count)
                if not store.check([f"{RDZV_ID}/torchelastic/role_info/{rank}"])]
    except RuntimeError:  # torch's DistError: the store went away meanwhile
        return None


def _workers_started(launcher: subprocess.Popen) -> bool:
    """Whether torchrun has started its workers, which it does once every node has joined:
    the keys above are torch's own, and should a version name them otherwise, a fit that
    trains is still never stopped at the join timeout (Linux; elsewhere False)."""
    try:
        return bool(Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
                    .split())
    except OSError:
        return False


def _named(missing: list[int], count: int) -> str:
    if len(missing) == 1:
        return f"node {missing[0]} of {count}"
    return f"nodes {', '.join(map(str, missing))} of {count}"


def _not_joined(nodes: Nodes, missing: list[int] | None) -> str:
    if missing is None:  # on a node other than 0, whose store stopped answering
        return (f"node 0 stopped answering at {nodes.master} before every node joined, and "
                f"{nodes.join_timeout:g} s (--join-timeout) have passed: start every node "
                "again with the same command")
    each = "it" if len(missing) == 1 else "each"
    rank = "--node-rank " + str(missing[0]) if len(missing) == 1 else "its --node-rank"
    return (f"{_named(missing, nodes.count)} did not join at {nodes.master} within "
            f"{nodes.join_timeout:g} s (--join-timeout): start {each} with the same command "
            f"and {rank}, check that it reaches {nodes.master} (a firewall may block the "
            "port), or wait longer with --join-timeout SECONDS")

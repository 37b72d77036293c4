"""A real two-node Slurm cluster on this machine, for the tests and for trying the launcher.

    python launch/testcluster.py start /tmp/slurm     # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    python launch/testcluster.py start /tmp/slurm --netns   # each node its own host (network namespace)
    python launch/testcluster.py stop /tmp/slurm

Debian's Slurm 22.05 (``slurmctld slurmd slurm-client munge``, installed with apt-get if
missing: needs root) started from nothing: a private munged (own key and socket),
slurmctld, and two slurmd on 127.0.0.1 with distinct ports (``slurmd -N node1`` /
``node2``; Debian's build allows several slurmd per host). No systemd, no cgroups
(``proctrack/pgid``, ``task/none``: linuxproc let one job's end kill a sibling array
task on the other "node"), no accounting (so ``sacct`` does not work:
every wait on a job must be bounded). Short credential expiry and scheduler
intervals make a requeued job start again in seconds instead of ~140 s.
``stop`` kills only the processes whose pid files this script wrote.

``--netns`` (root): each node is a host of its own: a network namespace with its own
address on a bridge made for the cluster (10.213.N.0/24; slurmctld on the bridge's
.1), its own hostname (``node1``, ``node2``: a UTS namespace) and a hosts file
bind-mounted over /etc/hosts (a mount namespace) that names every node. slurmd starts
as ``nsenter --net=<ns> unshare --uts --mount ...`` (``ip netns exec`` remounts /sys,
and slurmd 22.05 then fails to initialise its cgroup plugin). Rendezvous and gloo
traffic between ranks then crosses a real (virtual) link, which a test can take down
(:func:`link`) to fail a whole node. The filesystem is shared, as on a cluster.
``stop`` also removes the namespaces, links and bridge it made (their names are in
``<state>/netns.json``), and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = ("node1", "node2")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Unavailable(RuntimeError):
    """Slurm is not installed and cannot be installed here (no apt-get, not root, no
    package source): a test skips with this reason instead of erroring."""


def install(netns: bool = False) -> None:
    needed = ("slurmctld", "slurmd", "sbatch", "munged", *(("ip", "nsenter", "unshare") if netns else ()))
    if all(shutil.which(b) for b in needed):
        return
    if not shutil.which("apt-get") or os.geteuid() != 0:
        missing = [b for b in needed if not shutil.which(b)]
        raise Unavailable(
            f"Slurm is not installed ({', '.join(missing)} not found) and installing it needs apt-get as root"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES, *(("iproute2", "util-linux") if netns else ())]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(
                f"apt-get could not install {' '.join(PACKAGES)}: "
                f"{(done.stderr.strip().splitlines() or ['?'])[-1][:300]}"
            )


def config(state: str, cpus: int, memory_mb: int, net: dict | None = None) -> str:
    ctld, *node_ports = _free_ports(1 + len(NODES))
    if net:  # one host per node: the default ports, each on its own address
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={n} NodeAddr={net['nodes'][n]} CPUs={cpus} RealMemory={memory_mb}"
            for n in NODES
        )
        ctl_host, ctl_ip = socket.gethostname(), net["ctl"]  # slurmctld checks that it runs on SlurmctldHost
    else:
        nodes = "\n".join(
            f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={cpus} RealMemory={memory_mb}"
            for n, p in zip(NODES, node_ports)
        )
        ctl_host, ctl_ip = "localhost", "127.0.0.1"
    return f"""ClusterName=tntpipe
SlurmctldHost={ctl_host}({ctl_ip})
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={state}/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
SlurmdTimeout={10 if net else 300}
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _pids(state: str) -> list[str]:
    return [os.path.join(state, f) for f in ("munged.pid", "slurmctld.pid", *[f"slurmd-{n}.pid" for n in NODES])]


def start(state: str, timeout: float = 30, netns: bool = False) -> dict:
    """Start the cluster; returns the environment (SLURM_CONF) its commands need."""
    install(netns)
    state = os.path.abspath(state)
    stop(state)
    for sub in ("ctld", "spool"):
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    key = os.path.join(state, "munge.key")
    if not os.path.isfile(key):
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
    net = _make_network(state) if netns else None
    conf = os.path.join(state, "slurm.conf")
    with open(conf, "w") as f:
        f.write(config(state, os.cpu_count() or 2, 8000, net))
    env = dict(os.environ, SLURM_CONF=conf)
    subprocess.run(
        [
            "munged",
            f"--socket={state}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={state}/munged.pid",
            f"--log-file={state}/munged.log",
            f"--seed-file={state}/munged.seed",
            "--force",
        ],
        check=True,
        env=env,
    )
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env)
    for node in NODES:
        subprocess.run([*_on_node(net, node), "slurmd", "-f", conf, "-N", node], check=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
        if len(out) >= 1 and all(s == "idle" for s in out) and out:
            return {"SLURM_CONF": conf}
        time.sleep(0.2)
    raise RuntimeError(f"Slurm did not come up within {timeout}s (logs in {state})")


def _names(state: str) -> dict:
    tag = hashlib.sha1(state.encode()).hexdigest()[:5]
    subnet = f"10.213.{int(tag[:2], 16)}"
    return {
        "bridge": f"tp{tag}br",
        "ctl": f"{subnet}.1",
        "nodes": {n: f"{subnet}.{11 + i}" for i, n in enumerate(NODES)},
        "ns": {n: f"tp{tag}{n}" for n in NODES},
        "veth": {n: f"tp{tag}v{i + 1}" for i, n in enumerate(NODES)},
    }


def _make_network(state: str) -> dict:
    """The bridge, and per node a namespace with a veth on it; ``netns.json`` first, so
    that ``stop`` removes whatever part of it was made."""
    net = _names(state)
    with open(os.path.join(state, "netns.json"), "w") as f:
        json.dump(net, f)
    ip = lambda *a: subprocess.run(["ip", *a], check=True, capture_output=True)  # noqa: E731
    ip("link", "add", net["bridge"], "type", "bridge")
    ip("addr", "add", f"{net['ctl']}/24", "dev", net["bridge"])
    ip("link", "set", net["bridge"], "up")
    hosts = os.path.join(state, "hosts")
    with open(hosts, "w") as f:
        f.write(
            "127.0.0.1 localhost\n"
            + f"{net['ctl']} {socket.gethostname()}\n"
            + "".join(f"{a} {n}\n" for n, a in net["nodes"].items())
        )
    for node in NODES:
        ns, veth = net["ns"][node], net["veth"][node]
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("link", "set", veth, "master", net["bridge"], "up")
        ip("-n", ns, "addr", "add", f"{net['nodes'][node]}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
    net["hosts"] = hosts
    return net


def _on_node(net: dict | None, node: str) -> list[str]:
    """The command prefix that runs a program on ``node``: its network, hostname and
    hosts file (nothing on the loopback cluster)."""
    if not net:
        return []
    return [
        "nsenter",
        f"--net=/run/netns/{net['ns'][node]}",
        "unshare",
        "--uts",
        "--mount",
        "sh",
        "-c",
        f'hostname {node} && mount --bind {net["hosts"]} /etc/hosts && exec "$@"',
        node,
    ]


def link(state: str, node: str, up: bool) -> None:
    """Take a node's network link down (the node is cut off: a node failure as its
    peers and the controller see it) or bring it back."""
    net = _names(os.path.abspath(state))
    subprocess.run(["ip", "link", "set", net["veth"][node], "up" if up else "down"], check=True)


def node_pids(state: str, node: str) -> list[int]:
    """Every process on ``node`` (its slurmd, job steps and tasks)."""
    net = _names(os.path.abspath(state))
    out = subprocess.run(["ip", "netns", "pids", net["ns"][node]], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def stop(state: str) -> None:
    """Cancel the cluster's jobs, then stop the daemons this script started (by their
    pid files only)."""
    state = os.path.abspath(state)
    conf = os.path.join(state, "slurm.conf")
    if os.path.isfile(os.path.join(state, "slurmctld.pid")) and os.path.isfile(conf):
        env = dict(os.environ, SLURM_CONF=conf)
        run = lambda *cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10).stdout  # noqa: E731
        try:
            jobs = run("squeue", "-h", "-o", "%i").split()
            if jobs:
                run("scancel", *jobs)
                for _ in range(100):
                    if not run("squeue", "-h", "-o", "%i").split():
                        break
                    time.sleep(0.1)
        except (OSError, subprocess.SubprocessError):
            pass
    for path in reversed(_pids(state)):
        try:
            with open(path) as f:
                pid = int(f.read().strip())
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        try:
            os.remove(path)
        except OSError:
            pass
    _remove_network(state)


def _remove_network(state: str) -> None:
    """What _make_network made for this state directory, and nothing else."""
    path = os.path.join(state, "netns.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        net = json.load(f)
    for node, ns in net["ns"].items():
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        for pid in out.split():  # job steps left on the node
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # its end of the veth goes with it
        subprocess.run(["ip", "link", "del", net["veth"][node]], capture_output=True)
    subprocess.run(["ip", "link", "del", net["bridge"]], capture_output=True)
    os.remove(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    netns = "--netns" in argv
    argv = [a for a in argv if a != "--netns"]
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "start":
        env = start(argv[1], netns=netns)
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    else:
        stop(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

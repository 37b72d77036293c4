"""A real two-node Slurm cluster on this machine, for the tests and for trying the launcher.

    python launch/testcluster.py start /tmp/slurm     # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
    python launch/testcluster.py stop /tmp/slurm

Debian's Slurm 22.05 (``slurmctld slurmd slurm-client munge``, installed with apt-get if
missing: needs root) started from nothing: a private munged (own key and socket),
slurmctld, and two slurmd on 127.0.0.1 with distinct ports (``slurmd -N node1`` /
``node2``; Debian's build allows several slurmd per host). No systemd, no cgroups
(``proctrack/pgid``, ``task/none``: linuxproc let one job's end kill a sibling array task on the other "node"), no accounting (so ``sacct`` does not work:
every wait on a job must be bounded). Short credential expiry and scheduler
intervals make a requeued job start again in seconds instead of ~140 s.
``stop`` kills only the processes whose pid files this script wrote.
"""

from __future__ import annotations

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


def install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)


def config(state: str, cpus: int, memory_mb: int) -> str:
    ctld, *node_ports = _free_ports(1 + len(NODES))
    nodes = "\n".join(
        f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={cpus} RealMemory={memory_mb}"
        for n, p in zip(NODES, node_ports)
    )
    return f"""ClusterName=tntpipe
SlurmctldHost=localhost(127.0.0.1)
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
MinJobAge=600
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _pids(state: str) -> list[str]:
    return [os.path.join(state, f) for f in ("munged.pid", "slurmctld.pid", *[f"slurmd-{n}.pid" for n in NODES])]


def start(state: str, timeout: float = 30) -> dict:
    """Start the cluster; returns the environment (SLURM_CONF) its commands need."""
    install()
    state = os.path.abspath(state)
    stop(state)
    for sub in ("ctld", "spool"):
        os.makedirs(os.path.join(state, sub), exist_ok=True)
    key = os.path.join(state, "munge.key")
    if not os.path.isfile(key):
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
    conf = os.path.join(state, "slurm.conf")
    with open(conf, "w") as f:
        f.write(config(state, os.cpu_count() or 2, 8000))
    env = dict(os.environ, SLURM_CONF=conf)
    subprocess.run(
        ["munged", f"--socket={state}/munge.socket", f"--key-file={key}", f"--pid-file={state}/munged.pid",
         f"--log-file={state}/munged.log", f"--seed-file={state}/munged.seed", "--force"],
        check=True, env=env,
    )
    subprocess.run(["slurmctld", "-f", conf], check=True, env=env)
    for node in NODES:
        subprocess.run(["slurmd", "-f", conf, "-N", node], check=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
        if len(out) >= 1 and all(s == "idle" for s in out) and out:
            return {"SLURM_CONF": conf}
        time.sleep(0.2)
    raise RuntimeError(f"Slurm did not come up within {timeout}s (logs in {state})")


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


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "start":
        env = start(argv[1])
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    else:
        stop(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measured WAN: the two parties in two network namespaces joined by a rate-limited veth pair.

    with wan_namespaces(WanLink.parse("100mbit:80ms")) as net:
        net.run(["python", ...], side=0)   # a command inside the client's namespace

Each party's namespace holds one end of a veth pair; a `tc tbf` qdisc on each end limits the rate in
that direction (this kernel has tbf and htb but not netem). The one-way delay is added in user space by
`privlm.spu.delayproxy`: in each namespace a proxy listens on 127.0.0.1 and forwards to the peer's veth
address, delivering every chunk DELAY after it arrived, so each message flight from one party to the
other takes DELAY plus its transfer time at RATE. Everything is created with unique names and removed in
``finally``, or by `privlm.proc`'s janitor when this process is killed first; the proxies die with this
process. Where namespaces cannot be created (not root, no `ip`), `WanError` says why in one line. Runs in
the main environment (standard library only).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

from privlm.errors import PrivlmError
from privlm.proc import JANITOR, spawn, stop


class WanError(PrivlmError):
    """The WAN emulation could not be set up."""


_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_DELAY = re.compile(r"^(\d+(?:\.\d+)?)ms$")
_BITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


@dataclass(frozen=True)
class WanLink:
    rate: str  # tc rate, e.g. "100mbit"
    delay_ms: float  # one-way delay of every message flight

    @property
    def bits_per_second(self) -> float:
        value, unit = _RATE.match(self.rate).groups()
        return float(value) * _BITS[unit]

    @classmethod
    def parse(cls, spec: str) -> "WanLink":
        """'RATE:DELAY', e.g. '100mbit:80ms' (rate in kbit/mbit/gbit, one-way delay in ms)."""
        rate, _, delay = spec.partition(":")
        if not _RATE.match(rate) or not _DELAY.match(delay):
            raise WanError(f"--wan '{spec}' must be RATE:DELAY such as 100mbit:80ms (rate in kbit|mbit|gbit, "
                           f"one-way delay in ms)")
        return cls(rate, float(_DELAY.match(delay).group(1)))

    def to_dict(self) -> dict:
        return {"rate": self.rate, "bits_per_second": self.bits_per_second, "one_way_delay_ms": self.delay_ms}


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise WanError(f"cannot set up the WAN namespaces: `{' '.join(cmd)}` failed: {msg}")


@dataclass
class WanNet:
    link: WanLink
    namespaces: tuple[str, str]
    addresses: tuple[str, str]  # veth address of party 0 and party 1

    def prefix(self, side: int) -> list[str]:
        """Command prefix that runs a program inside party ``side``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[side]]

    def delay_proxy(self, side: int, listen_port: int, target_port: int) -> subprocess.Popen:
        """A delay proxy in ``side``'s namespace: 127.0.0.1:listen_port -> the peer's veth address."""
        peer = self.addresses[1 - side]
        proc = spawn([*self.prefix(side), sys.executable, "-m", "privlm.spu.delayproxy", str(self.link.delay_ms),
                      f"{listen_port}:{peer}:{target_port}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True, env=_proxy_env())  # dies with this process
        if proc.stdout.readline().strip() != "ready":
            stop([proc])
            raise WanError(f"the delay proxy did not start: {proc.stderr.read().strip()[-200:]}")
        return proc


def _proxy_env() -> dict:
    from pathlib import Path
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    return env


def check_available() -> None:
    if os.geteuid() != 0:
        raise WanError("--wan needs root to create network namespaces (ip netns) and tc qdiscs; run as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise WanError(f"--wan needs the '{tool}' command (iproute2), which is not installed")


@contextlib.contextmanager
def wan_namespaces(link: WanLink) -> Iterator[WanNet]:
    """Two namespaces joined by a veth pair, each end rate-limited by tbf; removed on exit."""
    check_available()
    tag = f"{os.getpid() % 100000}"
    ns = (f"privlm-c{tag}", f"privlm-s{tag}")
    veth = (f"pvc{tag}", f"pvs{tag}")
    octet = os.getpid() % 250 + 1
    addr = (f"10.231.{octet}.1", f"10.231.{octet}.2")
    created: list[tuple[str, int]] = []
    try:
        for name in ns:
            # removed by the janitor if this process is killed before the `finally` below
            created.append((name, JANITOR.register(run=["ip", "netns", "del", name])))
            _ip("ip", "netns", "add", name)
            _ip("ip", "link", "set", "lo", "up", ns=name)
        _ip("ip", "link", "add", veth[0], "netns", ns[0], "type", "veth", "peer", "name", veth[1], "netns", ns[1])
        for side in (0, 1):
            _ip("ip", "addr", "add", f"{addr[side]}/30", "dev", veth[side], ns=ns[side])
            _ip("ip", "link", "set", veth[side], "up", ns=ns[side])
            # queue up to ~0.5 s of traffic at the rate; bursts beyond are paced by TCP
            _ip("tc", "qdisc", "add", "dev", veth[side], "root", "tbf", "rate", link.rate, "burst", "64kb",
                "latency", "500ms", ns=ns[side])
        yield WanNet(link, ns, addr)
    finally:
        for name, token in reversed(created):  # deleting a namespace removes its veth end and qdisc too
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            JANITOR.done(token)

"""The link between the two parties of a 2PC run: in memory (both parties in one process) or brpc between two
OS processes. A leaf module (nothing of privlm imported), so that the threaded simulators
(`privlm.spu.simulator`) and the parties (`privlm.spu.party`) build their links in one place."""
from __future__ import annotations

# How long a party waits for its peer by default (`--peer-timeout`).
PEER_TIMEOUT_S = 60.0
# How long a party waits for one message (see `make_link`).
RECV_TIMEOUT_S = 3600.0


def make_link(rank: int, peers: list[str] | None, recv_timeout_s: float = RECV_TIMEOUT_S,
              peer_timeout_s: float = PEER_TIMEOUT_S):
    """An in-memory link for the threaded simulator (peers None) or brpc between two OS processes.

    brpc: connecting is retried every 0.5 s for ``peer_timeout_s`` (`PeerWatch` bounds the whole connect,
    which also waits for the peer to reach back). A message is waited for up to ``recv_timeout_s``: a big HE
    product on a busy machine can keep the other party silent for minutes, so silence alone is no sign of
    death; a peer whose process ended is noticed by `PeerWatch` from its closed connections instead."""
    import spu.libspu as libspu

    desc = libspu.link.Desc()
    desc.recv_timeout_ms = int(recv_timeout_s * 1000)
    if peers is None:
        for r in range(2):
            desc.add_party(f"party{r}", f"thread_{r}")
        return libspu.link.create_mem(desc, rank)
    desc.http_max_payload_size = 32 << 20
    desc.connect_retry_interval_ms = 500
    desc.connect_retry_times = max(1, int(peer_timeout_s * 2))
    for r, addr in enumerate(peers):
        desc.add_party(f"party{r}", addr)
    return libspu.link.create_brpc(desc, rank)

"""Both parties of a 2PC computation in this process, one thread each, with runtimes that outlive a program.

`spu.utils.simulation.Simulator` builds a new link and a new runtime for every program it runs, and a fresh
CHEETAH runtime pays its setup again (silent-OT and HE keys: about ten CPU-seconds, several times the cost of a
kernel over one 8,192-element HE batch). `pair_simulator` keeps one runtime pair per runtime configuration for
the life of the process, so measuring many kernels (`privlm.spu.kernels.measure_errors`) pays the setup once per
configuration. The computation is the same: a program's inputs are fresh secret shares, its variables are
deleted after it ran, and nothing but the protocol's setup state carries over. Not for byte counts: a reused
runtime does not repeat the setup traffic that `privlm pi calibrate` measures on fresh runtimes.
"""
from __future__ import annotations

import threading

import numpy as np
import spu.api as spu_api
import spu.libspu as libspu
import spu.utils.simulation as spsim

from privlm.spu.link import make_link


class PairSimulator(spsim.Simulator):
    """A drop-in `spsim.Simulator` (for `spsim.sim_jax`) whose two runtimes are created once."""

    def __init__(self, rt_config):
        super().__init__(2, rt_config)
        self._runtimes: list = [None, None]

        # the mem link's two ends connect to each other: one thread per party; its receive timeout is the parties'
        # (an hour), not yacl's default, which a long kernel on a busy machine can outlast
        def make(rank: int) -> None:
            self._runtimes[rank] = spu_api.Runtime(make_link(rank, None), libspu.RuntimeConfig(rt_config))
        threads = [spsim.PropagatingThread(target=make, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._lock = threading.Lock()

    def __call__(self, executable, *flat_args):
        params = [self.io.make_shares(np.asarray(x), libspu.Visibility.VIS_SECRET) for x in flat_args]

        def party(rank: int):
            rt = self._runtimes[rank]
            for name, share in zip(executable.input_names, params):
                rt.set_var(name, share[rank])
            rt.run(executable)
            out = [rt.get_var(name) for name in executable.output_names]
            for name in (*executable.input_names, *executable.output_names):
                rt.del_var(name)
            return out

        with self._lock:  # one program at a time on the pair
            jobs = [spsim.PropagatingThread(target=party, args=(r,)) for r in range(2)]
            for j in jobs:
                j.start()
            parties = [j.join() for j in jobs]
        return [self.io.reconstruct(list(shares)) for shares in zip(*parties)]


_PAIRS: dict[bytes, PairSimulator] = {}


def pair_simulator(rt_config) -> PairSimulator:
    """The process's runtime pair for ``rt_config`` (a `libspu.RuntimeConfig`), created on first use."""
    key = rt_config.SerializeToString()
    if key not in _PAIRS:
        _PAIRS[key] = PairSimulator(rt_config)
    return _PAIRS[key]

"""User-space one-way delay on loopback (``tc netem`` is not available in this kernel).

    python -m privlm.spu.delayproxy DELAY_MS LISTEN_PORT:[TARGET_HOST:]TARGET_PORT [...]

Every TCP connection to 127.0.0.1:LISTEN_PORT is forwarded to TARGET_HOST:TARGET_PORT (default host
127.0.0.1; `privlm.spu.wan` runs one proxy per network namespace, targeting the peer's veth address), and every chunk of
bytes, in either direction, is delivered DELAY_MS after it arrived (order preserved, no bandwidth limit).
A party that reaches its peer through the proxy therefore sees each message flight delayed by DELAY_MS:
a protocol with R sequential flights slows down by R·DELAY_MS, which is how `privlm pi calibrate
--rounds` counts CHEETAH's rounds. Standard library only; runs in either environment. Started through
`privlm.proc.spawn`, it dies with the process that started it.
"""
from __future__ import annotations

import asyncio
import socket
import sys
import time


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def receive() -> None:
        while True:
            data = await reader.read(1 << 20)
            await queue.put((time.monotonic(), data))
            if not data:
                return

    async def deliver() -> None:
        while True:
            arrived, data = await queue.get()
            wait = arrived + delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:  # the sender closed: close our side after the delayed bytes
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    await asyncio.gather(receive(), deliver())


def _handler(target: tuple[str, int], delay: float):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        for w in (writer, t_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(reader, t_writer, delay), _pump(t_reader, writer, delay),
                             return_exceptions=True)
    return handle


async def serve(delay_ms: float, routes: list[tuple[int, tuple[str, int]]]) -> None:
    servers = [await asyncio.start_server(_handler(target, delay_ms / 1000.0), "127.0.0.1", listen)
               for listen, target in routes]
    print("ready", flush=True)  # the launcher waits for this line before starting the parties
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> int:
    from privlm.proc import adopt_parent

    adopt_parent()  # started by a launcher (`privlm.proc.spawn`): die with it
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    routes = []
    for spec in argv[1:]:
        listen, *target = spec.split(":")
        host = target[0] if len(target) == 2 else "127.0.0.1"
        routes.append((int(listen), (host, int(target[-1]))))
    asyncio.run(serve(float(argv[0]), routes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

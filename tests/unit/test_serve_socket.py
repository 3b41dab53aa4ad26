"""``cloud.api.serve.bind``: the listening socket the API serves on.

Its accepted connections must have TCP_NODELAY, which asyncio sets only when the socket
says it is TCP (``proto``): without it Nagle's algorithm holds every keep-alive
response's body until the client has acknowledged its headers, ~40 ms of delayed ACK
per request (a terminal's sync took 44 ms instead of 2 ms).
"""

from __future__ import annotations

import asyncio
import socket

from cloud.api.serve import bind


def test_bind__socket_says_it_is_tcp() -> None:
    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_bind__asyncio_server_accepts_connections_with_nodelay() -> None:
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    seen: list[int] = []

    async def main() -> None:
        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw = writer.get_extra_info("socket")
            seen.append(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            await writer.drain()
            for _ in range(200):  # the callback runs on the next loop turns
                if seen:
                    break
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(main())
    assert seen and seen[0] != 0

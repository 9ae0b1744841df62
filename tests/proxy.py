"""A TCP proxy for transfer tests: it sits between a client and one server port, counts the
bytes each way, and can flip one bit or cut the connection at chosen byte offsets (the
cut closes both sides, as a broken network would).

Offsets count the bytes of one direction of one connection from its first byte ("up":
client to server, "down": server to client). Each rule fires once, on the first
connection that reaches its offset.
"""

from __future__ import annotations

import contextlib
import socket
import threading

HOST = "127.0.0.1"


class Proxy:
    def __init__(
        self,
        target_port: int,
        *,
        flip_up: int | None = None,
        flip_down: int | None = None,
        cut_up: int | None = None,
        cut_down: int | None = None,
        host: str = HOST,
    ) -> None:
        """Listens on `host` (another of this machine's addresses: the client then sees a
        server that is not on loopback) and forwards to `target_port` on loopback."""
        self.target_port = target_port
        self.rules = {"up": flip_up, "down": flip_down}
        self.cuts = {"up": cut_up, "down": cut_down}
        self.lock = threading.Lock()
        #: Bytes forwarded each way, over every connection.
        self.bytes = {"up": 0, "down": 0}
        self.listener = socket.create_server((host, 0))
        self.port = self.listener.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection((HOST, self.target_port))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        seen = 0
        cut = False
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                with self.lock:
                    at = self.rules[way]
                    if at is not None and seen <= at < seen + len(chunk):
                        flipped = bytearray(chunk)
                        flipped[at - seen] ^= 0x01
                        chunk = bytes(flipped)
                        self.rules[way] = None  # once
                    stop = self.cuts[way]
                    if stop is not None and seen + len(chunk) >= stop:
                        chunk = chunk[: stop - seen]
                        self.cuts[way] = None  # once
                        cut = True
                    self.bytes[way] += len(chunk)
                seen += len(chunk)
                dst.sendall(chunk)
                if cut:
                    # Both ends lose the connection at this byte, as if the network broke.
                    for s in (src, dst):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                    return
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self.lock:
            self._closed = True
            socks = list(self._socks)
        self.listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

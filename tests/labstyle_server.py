"""A stand-in for the lab's own server, for compatibility tests of our client.

It reproduces the lab server's documented behaviour (lab report §2-§7), which is what our
client must cope with: a thread per connection, the username read with one `recv(1024)`,
each command read with ONE `recv(4096)` and stripped (never split into lines), command
words matched with `startswith`, upload headers read byte by byte up to `\\n`, files saved
whole and then forwarded as `sender|filename|size\\n` + bytes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path


class LabStyleServer:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.clients: dict[str, socket.socket] = {}
        self.file_clients: dict[str, socket.socket] = {}
        self.groups: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self._listeners = [self._listen(self._chat), self._listen(self._file)]
        self.chat_port = self._listeners[0].getsockname()[1]
        self.file_port = self._listeners[1].getsockname()[1]
        self._conns: list[socket.socket] = []

    def _listen(self, handler) -> socket.socket:
        srv = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(srv, handler), daemon=True).start()
        return srv

    def _accept(self, srv: socket.socket, handler) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    def close(self) -> None:
        for s in self._listeners + self._conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _send(self, user: str, text: str) -> None:
        with self.lock:
            conn = self.clients.get(user)
        if conn is not None:
            conn.sendall(text.encode())

    def _chat(self, conn: socket.socket) -> None:
        user = conn.recv(1024).decode().strip()
        with self.lock:
            self.clients[user] = conn
        conn.sendall(f"Welcome, {user}!\n".encode())
        while True:
            try:
                data = conn.recv(4096)
            except OSError:
                return
            if not data:
                return
            msg = data.decode().strip()
            word = msg.split(" ", 1)[0].lower()
            if msg.startswith("FILE_RECEIVED|"):
                _, sender, filename = msg.split("|", 2)
                self._send(sender, f"[ACK] {user} received file '{filename}'\n")
            elif word.startswith("msg"):
                parts = msg.split(" ", 2)
                if len(parts) < 3:
                    conn.sendall(b"Usage: msg <username> <message>\n")
                elif parts[1] in self.clients:
                    self._send(parts[1], f"[PRIVATE from {user}]: {parts[2]}\n")
                else:
                    conn.sendall(f"User {parts[1]} not found.\n".encode())
            elif word.startswith("broadcast"):
                text = msg.split(" ", 1)[1]
                for other in list(self.clients):
                    if other != user:
                        self._send(other, f"[BROADCAST from {user}]: {text}\n")
            elif word.startswith("list"):
                others = [u for u in self.clients if u != user]
                conn.sendall(f"Connected users: {', '.join(others)}\n".encode())
            elif word.startswith("join"):
                group = msg.split(" ", 1)[1]
                members = self.groups.setdefault(group, [])
                if user not in members:
                    members.append(user)
                conn.sendall(f"You joined group '{group}'\n".encode())
            elif word.startswith("send_group"):
                _, group, text = msg.split(" ", 2)
                if user not in self.groups.get(group, []):
                    conn.sendall(f"You are not in group '{group}'\n".encode())
                    continue
                for member in self.groups[group]:
                    if member != user:
                        self._send(member, f"[GROUP {group}] {user}: {text}\n")
            else:
                conn.sendall(b"Unknown command. Use msg/broadcast/list/join/send_group\n")

    def _file(self, conn: socket.socket) -> None:
        user = conn.recv(1024).decode().strip()
        with self.lock:
            self.file_clients[user] = conn
        conn.sendall(b"FILE_SOCKET_CONNECTED\n")
        while True:
            header = bytearray()
            while not header.endswith(b"\n"):
                b = conn.recv(1)
                if not b:
                    return
                header += b
            sender, target, filename, size = header[:-1].decode().split("|")
            body = bytearray()
            while len(body) < int(size):
                chunk = conn.recv(min(4096, int(size) - len(body)))
                if not chunk:
                    return
                body += chunk
            saved = f"received_from_{sender}_{filename}"
            (self.data_dir / saved).write_bytes(body)
            if target == sender:
                self._send(sender, f"[FILE] You sent file '{filename}' (saved as {saved}).\n")
                continue
            recipients = (
                [m for m in self.groups.get(target[6:], []) if m != sender]
                if target.startswith("GROUP:")
                else [target]
            )
            for r in recipients:
                if target.startswith("GROUP:"):
                    note = f"[FILE] {sender} sent file '{filename}' to group '{target[6:]}'.\n"
                else:
                    note = (
                        f"[FILE] {sender} sent you file '{filename}' ({size} bytes)."
                        " Incoming on file socket.\n"
                    )
                self._send(r, note)
                fc = self.file_clients.get(r)
                if fc is None:
                    self._send(sender, f"User {r} has no file socket; file saved as {saved}\n")
                    continue
                fc.sendall(f"{sender}|{filename}|{len(body)}\n".encode() + bytes(body))

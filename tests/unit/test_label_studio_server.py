"""devstack/label_studio_server.py: the sockets Label Studio's development server accepts have Nagle off."""

from __future__ import annotations

import socket
import socketserver
import threading
from typing import ClassVar

from devstack.label_studio_server import _get_request_without_nagle


class Recorder(socketserver.BaseRequestHandler):
    options: ClassVar[list[int]] = []

    def handle(self) -> None:
        Recorder.options.append(self.request.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class PatchedServer(socketserver.TCPServer):
    get_request = _get_request_without_nagle


def accepted_nodelay(server_class: type[socketserver.TCPServer]) -> int:
    Recorder.options = []
    with server_class(("127.0.0.1", 0), Recorder) as server:
        thread = threading.Thread(target=server.handle_request)
        thread.start()
        with socket.create_connection(server.server_address):
            thread.join(timeout=10)
    return Recorder.options[0]


def test_accepted_connections_have_nodelay():
    assert accepted_nodelay(socketserver.TCPServer) == 0  # what the development server gets by default
    assert accepted_nodelay(PatchedServer) != 0

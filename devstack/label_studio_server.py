"""`label-studio` with TCP_NODELAY on its connections; run by Label Studio's own interpreter, not ours.

`label-studio start` serves with Django's development server, which writes a reply in several pieces.
On a kept-alive connection, as a browser's or an API client's, Nagle's algorithm holds the last piece
until the client acknowledges the first, and the client delays that acknowledgement by up to 40 ms:
every request then takes about 40 ms longer (GET /health: 56 ms instead of 10 ms on this machine). The
annotator's wait for a caption goes through Label Studio twice, so the dev stack switches Nagle off
for the sockets Label Studio accepts. A production Label Studio (its Docker image, uWSGI) does not serve
with the development server.

Usage: <label-studio venv>/bin/python devstack/label_studio_server.py start ... (the arguments of `label-studio`).
"""

import socket
import socketserver
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and devstack/label_studio.py would stand
# in for the label_studio package.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]

_accept = socketserver.TCPServer.get_request


def _get_request_without_nagle(server):
    connection, address = _accept(server)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection, address


if __name__ == "__main__":
    socketserver.TCPServer.get_request = _get_request_without_nagle
    from label_studio.server import main

    sys.exit(main())

"""A threaded server written for the standard library, as a user already has one.

Plain ``socketserver`` and ``threading``: no shardio anywhere. The tests host
it on shards, unmodified (``shardio.tame.servers``).

Protocol: one command per line — ``SET k v``, ``GET k``, ``SLEEP seconds``,
``PID``, ``QUIT`` — and one reply line each.
"""

import os
import socketserver
import threading
import time


class KVServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address, handler):
        self.data = {}
        self.lock = threading.Lock()
        self.served = 0
        super().__init__(address, handler)


class KVHandler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            command, *args = line.decode().split()
            if command == "SET":
                with self.server.lock:
                    self.server.data[args[0]] = args[1]
                reply = "OK"
            elif command == "GET":
                with self.server.lock:
                    reply = self.server.data.get(args[0], "-")
            elif command == "SLEEP":
                time.sleep(float(args[0]))
                reply = "SLEPT"
            elif command == "PID":
                reply = str(os.getpid())
            elif command == "QUIT":
                return
            else:
                reply = "ERR unknown command"
            with self.server.lock:
                self.server.served += 1
            self.wfile.write((reply + "\n").encode())

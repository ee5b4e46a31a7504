"""One socket's transitions on two CPUs, microseconds apart.

A server thread pinned to CPU 1 accepts each connection and closes it at once (an active close:
the client's socket enters CLOSE_WAIT in softirq on CPU 1); the client, pinned to CPU 0, reads
the EOF and closes too (CLOSE_WAIT -> LAST_ACK on CPU 0), one connection after the other.
Prints the listening port, then the client's local ports, one line each.
"""
import os
import socket
import sys
import threading

count = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(count)
port = listener.getsockname()[1]


def serve():
    os.sched_setaffinity(0, {1})  # this thread only
    for _ in range(count):
        conn, _ = listener.accept()
        conn.close()


server = threading.Thread(target=serve)
server.start()
os.sched_setaffinity(0, {0})
ports = []
for _ in range(count):
    c = socket.create_connection(("127.0.0.1", port))
    ports.append(c.getsockname()[1])
    if c.recv(1) != b"":
        sys.exit("expected EOF")
    c.close()
server.join()
print(port)
print(" ".join(map(str, ports)), flush=True)

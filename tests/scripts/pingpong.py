#!/usr/bin/env python3
"""Request/response traffic for the TCP latency tests.

server: pingpong.py serve ADDR PORT...
  echoes every 100-byte request (one thread, selectors: thousands of connections are fine)
client: pingpong.py client ADDR PORT CONNS ROUNDS GAP_MS HOLD_S
  opens CONNS connections, sends ROUNDS requests on each (round robin, GAP_MS apart), waits
  for each reply, then keeps the connections open HOLD_S seconds (so `ss -ti` can see them)
  and closes them. Prints each connection's local port, one per line, then "connected".
churn:  pingpong.py churn ADDR PORT LONG SHORT HOLD_S
  opens LONG connections and keeps them, then makes SHORT connections that each send one
  request and close; prints "done" and holds the long ones HOLD_S seconds.
"""
import resource
import selectors
import socket
import sys
import time

SIZE = 100


def raise_fd_limit():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(addr, ports):
    sel = selectors.DefaultSelector()
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for port in ports:
        s = socket.socket(family)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(4096)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, None)
    pending = {}
    while True:
        for key, _ in sel.select():
            if key.data is None:
                conn, _ = key.fileobj.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setblocking(False)
                pending[conn] = b""
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj
            try:
                chunk = conn.recv(SIZE)
            except ConnectionError:
                chunk = b""
            if not chunk:
                sel.unregister(conn)
                pending.pop(conn, None)
                conn.close()
                continue
            buf = pending[conn] + chunk
            while len(buf) >= SIZE:
                conn.setblocking(True)
                conn.sendall(buf[:SIZE])
                conn.setblocking(False)
                buf = buf[SIZE:]
            pending[conn] = buf


def request(s):
    s.sendall(b"x" * SIZE)
    got = 0
    while got < SIZE:
        chunk = s.recv(SIZE - got)
        if not chunk:
            sys.exit("server closed")
        got += len(chunk)


def connect(addr, port):
    s = socket.create_connection((addr, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def client(addr, port, conns, rounds, gap_ms, hold_s):
    socks = []
    for _ in range(conns):
        s = connect(addr, port)
        socks.append(s)
        print(s.getsockname()[1], flush=True)
    print("connected", flush=True)
    for _ in range(rounds):
        for s in socks:
            request(s)
            time.sleep(gap_ms / 1000.0)
    print("done", flush=True)
    time.sleep(hold_s)
    for s in socks:
        s.close()


def churn(addr, port, long, short, hold_s):
    raise_fd_limit()
    keep = []
    for _ in range(long):
        s = connect(addr, port)
        request(s)
        keep.append(s)
    for _ in range(short):
        s = connect(addr, port)
        request(s)
        s.close()
    print("done", flush=True)
    time.sleep(hold_s)


if __name__ == "__main__":
    mode, a = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        raise_fd_limit()
        serve(a[0], [int(p) for p in a[1:]])
    elif mode == "client":
        client(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), float(a[5]))
    else:
        churn(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]))

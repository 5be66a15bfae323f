#!/usr/bin/env python3
"""Clients that pause between requests, and a bulk sender, for tests/tests/tcp_think_time.rs.

client: think.py client ADDR PORT CONNS ROUNDS PAUSE_MS HOLD_S
  runs CONNS connections (one thread each, connecting 40 ms apart, so that handshakes meet the
  same queue in the delay line as the requests of the connections already running); each
  sends ROUNDS 100-byte requests to the pingpong.py server, waits for each reply, then pauses
  PAUSE_MS before the next. Prints each connection's local port, one per line, then
  "connected" once all are up; "done" when every thread is done; keeps the connections open
  HOLD_S seconds (so `ss -ti` can see them).
sink:   think.py sink ADDR PORT
  accepts connections and reads and discards everything.
bulk:   think.py bulk ADDR PORT MBYTES HOLD_S
  one connection that sends MBYTES MiB as fast as TCP allows; prints its local port, then
  "connected", then "done", and keeps the connection open HOLD_S seconds.
"""
import socket
import sys
import threading
import time

SIZE = 100


def request(s):
    s.sendall(b"x" * SIZE)
    got = 0
    while got < SIZE:
        chunk = s.recv(SIZE - got)
        if not chunk:
            sys.exit("server closed")
        got += len(chunk)


def client(addr, port, conns, rounds, pause_ms, hold_s):
    lock = threading.Condition()
    socks = []

    def run(i):
        time.sleep(0.04 * i)
        s = socket.create_connection((addr, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with lock:
            socks.append(s)
            print(s.getsockname()[1], flush=True)
            lock.notify_all()
        for _ in range(rounds):
            request(s)
            time.sleep(pause_ms / 1000.0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    with lock:
        lock.wait_for(lambda: len(socks) == conns)
        print("connected", flush=True)
    for t in threads:
        t.join()
    print("done", flush=True)
    time.sleep(hold_s)
    for s in socks:
        s.close()


def sink(addr, port):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(64)

    def drain(c):
        while c.recv(1 << 16):
            pass
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()


def bulk(addr, port, mbytes, hold_s):
    s = socket.create_connection((addr, port))
    print(s.getsockname()[1], flush=True)
    print("connected", flush=True)
    chunk = b"y" * (1 << 16)
    for _ in range(int(mbytes * 16)):
        s.sendall(chunk)
    print("done", flush=True)
    time.sleep(hold_s)
    s.close()


if __name__ == "__main__":
    mode, a = sys.argv[1], sys.argv[2:]
    if mode == "client":
        client(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), float(a[5]))
    elif mode == "sink":
        sink(a[0], int(a[1]))
    else:
        bulk(a[0], int(a[1]), float(a[2]), float(a[3]))

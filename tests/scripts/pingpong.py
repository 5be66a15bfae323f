#!/usr/bin/env python3
"""Request/response traffic for the TCP latency tests.

server: python3 pingpong.py serve ADDR PORT...   (echoes each 100-byte request)
client: python3 pingpong.py client ADDR PORT CONNS ROUNDS GAP_MS HOLD_S
  opens CONNS connections, sends ROUNDS requests on each (round robin, GAP_MS apart),
  waits for each reply, then keeps the connections open HOLD_S seconds (so `ss -ti` can see
  them) and closes them. Prints each connection's local port, one per line, once connected.
"""
import socket
import sys
import threading
import time

SIZE = 100


def serve(addr, ports):
    def handle(conn):
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                data = b""
                while len(data) < SIZE:
                    chunk = conn.recv(SIZE - len(data))
                    if not chunk:
                        return
                    data += chunk
                conn.sendall(data)

    def listen(port):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(128)
        while True:
            conn, _ = s.accept()
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    for p in ports[1:]:
        threading.Thread(target=listen, args=(p,), daemon=True).start()
    listen(ports[0])


def client(addr, port, conns, rounds, gap_ms, hold_s):
    socks = []
    for _ in range(conns):
        s = socket.create_connection((addr, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
        print(s.getsockname()[1], flush=True)
    print("connected", flush=True)
    for _ in range(rounds):
        for s in socks:
            s.sendall(b"x" * SIZE)
            got = 0
            while got < SIZE:
                chunk = s.recv(SIZE - got)
                if not chunk:
                    sys.exit("server closed")
                got += len(chunk)
            time.sleep(gap_ms / 1000.0)
    print("done", flush=True)
    time.sleep(hold_s)
    for s in socks:
        s.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], [int(p) for p in sys.argv[3:]])
    else:
        a = sys.argv[2:]
        client(a[0], int(a[1]), int(a[2]), int(a[3]), float(a[4]), float(a[5]))

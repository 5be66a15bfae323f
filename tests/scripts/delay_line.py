#!/usr/bin/env python3
"""A delay line for the TCP latency tests (this kernel has no netem).

Takes packets from an NFQUEUE, holds each for a delay drawn uniformly from
[mean - jitter, mean + jitter] ms, and accepts them in arrival order (a packet never
overtakes the one before it, so TCP sees no reordering: the effective delay is
max(drawn, previous release - arrival)). Optionally drops a fraction of the packets that carry
TCP payload, to cause retransmits.

Every packet's fate is written to the log as one JSON object per line, when it is released
(the delay is the hold actually applied, measured after the verdict):
  {"sport": 40000, "dport": 5000, "len": 100, "delay_ms": 19.7}   (payload packets)
  {"sport": 40000, "dport": 5000, "len": 100, "dropped": true}
Pure ACKs and handshakes are delayed too but logged with "len": 0.

usage: delay_line.py QUEUE MEAN_MS JITTER_MS DROP_FRACTION SEED LOG READY_FILE
"""
import heapq
import json
import random
import sys
import threading
import time

from netfilterqueue import NetfilterQueue


def tcp_ports_and_payload(raw):
    ihl = (raw[0] & 0x0F) * 4
    total = int.from_bytes(raw[2:4], "big")
    tcp = raw[ihl:]
    sport = int.from_bytes(tcp[0:2], "big")
    dport = int.from_bytes(tcp[2:4], "big")
    doff = (tcp[12] >> 4) * 4
    return sport, dport, total - ihl - doff


def main():
    qnum, mean, jitter, drop = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    rng = random.Random(int(sys.argv[5]))
    log = open(sys.argv[6], "w", buffering=1)
    heap, cond = [], threading.Condition()
    state = {"last": 0.0, "seq": 0}

    def releaser():
        while True:
            with cond:
                while not heap or heap[0][0] > time.monotonic():
                    cond.wait(None if not heap else max(0.0, heap[0][0] - time.monotonic()))
                _, _, arrived, meta, pkt = heapq.heappop(heap)
            pkt.accept()
            # The hold actually applied, wake-up lateness included: that is what TCP sees.
            meta["delay_ms"] = (time.monotonic() - arrived) * 1000.0
            log.write(json.dumps(meta) + "\n")

    def on_packet(pkt):
        now = time.monotonic()
        sport, dport, payload = tcp_ports_and_payload(pkt.get_payload())
        if payload > 0 and drop > 0 and rng.random() < drop:
            pkt.drop()
            log.write(json.dumps({"sport": sport, "dport": dport, "len": payload, "dropped": True}) + "\n")
            return
        release = max(now + rng.uniform(mean - jitter, mean + jitter) / 1000.0, state["last"])
        state["last"] = release
        meta = {"sport": sport, "dport": dport, "len": payload}
        with cond:
            state["seq"] += 1
            heapq.heappush(heap, (release, state["seq"], now, meta, pkt))
            cond.notify()

    threading.Thread(target=releaser, daemon=True).start()
    q = NetfilterQueue()
    q.bind(qnum, on_packet)
    open(sys.argv[7], "w").close()
    try:
        q.run()
    finally:
        q.unbind()


if __name__ == "__main__":
    main()

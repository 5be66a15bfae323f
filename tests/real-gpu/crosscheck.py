#!/usr/bin/env python3
"""Cross-checks what nodeward reads from a real NVIDIA GPU against an independent reader.

Ground truth is NVIDIA's own Python NVML bindings (`pynvml`, package nvidia-ml-py), read just
before and just after each `nodeward gpu-check`, so a value that moves is checked against the
range it moved in. Phases: idle, then under a load this script starts (a PyTorch bf16 matrix
product loop, holding a known amount of GPU memory), then the agent daemon itself (`nodeward
run`: the GPU as the API and /metrics report it).

Usage (on a machine with a GPU, root):
    python3 tests/real-gpu/crosscheck.py --nodeward target/release/nodeward --out /tmp/xcheck

Writes <out>/report.txt (one line per check: PASS/FAIL/INFO), <out>/idle.json, <out>/load.json
(gpu-check snapshots), <out>/agent.txt (API reply, GPU metrics, agent log). Exit 1 when a check
failed. Needs: pynvml (nvidia-ml-py); torch for the load phase (skipped with a reason if absent).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pynvml as N

REPORT = []
METRICS_ADDR = "127.0.0.1:19464"


def line(kind, what, detail=""):
    s = f"{kind:4} {what}" + (f": {detail}" if detail else "")
    REPORT.append(s)
    print(s, flush=True)


def check(ok, what, detail=""):
    line("PASS" if ok else "FAIL", what, detail)


def val(reading):
    """nodeward's Reading: {"supported": v} | "not_supported" | {"error": "..."}."""
    if isinstance(reading, dict) and "supported" in reading:
        return reading["supported"]
    return None


def s(x):
    return x.decode() if isinstance(x, bytes) else x


def nvml_sample(h):
    """One independent reading of the fields nodeward reports."""
    out = {}

    def get(key, f):
        try:
            out[key] = f()
        except N.NVMLError as e:
            out[key] = f"error: {e}"

    get("name", lambda: s(N.nvmlDeviceGetName(h)))
    get("uuid", lambda: s(N.nvmlDeviceGetUUID(h)))
    get("pci_bus_id", lambda: s(N.nvmlDeviceGetPciInfo(h).busId))
    get("util_gpu", lambda: N.nvmlDeviceGetUtilizationRates(h).gpu)
    get("util_mem", lambda: N.nvmlDeviceGetUtilizationRates(h).memory)
    # The v2 call, as the agent makes it (v1's "used" also counts memory the driver reserves).
    get("mem_used", lambda: N.nvmlDeviceGetMemoryInfo(h, N.nvmlMemory_v2).used)
    get("mem_total", lambda: N.nvmlDeviceGetMemoryInfo(h, N.nvmlMemory_v2).total)
    get("temp", lambda: N.nvmlDeviceGetTemperature(h, N.NVML_TEMPERATURE_GPU))
    get("power", lambda: N.nvmlDeviceGetPowerUsage(h))
    get("power_limit", lambda: N.nvmlDeviceGetEnforcedPowerLimit(h))
    get("clk_graphics", lambda: N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_GRAPHICS))
    get("clk_sm", lambda: N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_SM))
    get("clk_mem", lambda: N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_MEM))
    get("clk_video", lambda: N.nvmlDeviceGetClockInfo(h, N.NVML_CLOCK_VIDEO))
    get("ecc_mode", lambda: N.nvmlDeviceGetEccMode(h)[0] == 1)
    get(
        "ecc_uncorrected_volatile",
        lambda: N.nvmlDeviceGetTotalEccErrors(
            h, N.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, N.NVML_VOLATILE_ECC
        ),
    )
    get(
        "ecc_corrected_volatile",
        lambda: N.nvmlDeviceGetTotalEccErrors(
            h, N.NVML_MEMORY_ERROR_TYPE_CORRECTED, N.NVML_VOLATILE_ECC
        ),
    )
    get("pcie_replay", lambda: N.nvmlDeviceGetPcieReplayCounter(h))
    get("enc_util", lambda: N.nvmlDeviceGetEncoderUtilization(h)[0])
    get("dec_util", lambda: N.nvmlDeviceGetDecoderUtilization(h)[0])
    get(
        "procs",
        lambda: {p.pid: p.usedGpuMemory for p in N.nvmlDeviceGetComputeRunningProcesses(h)},
    )
    return out


def gpu_check(nodeward, path):
    r = subprocess.run(
        [nodeward, "gpu-check", "--json", "--events", "1s"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    with open(path, "w") as f:
        f.write(r.stdout)
    if r.returncode != 0:
        line("FAIL", "nodeward gpu-check", f"exit {r.returncode}: {r.stderr.strip()[-400:]}")
        return None
    return json.loads(r.stdout)


def num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def between(x, a, b, slack):
    if not (num(x) and num(a) and num(b)):
        return False
    lo, hi = min(a, b), max(a, b)
    return lo - slack <= x <= hi + slack


def compare(phase, dev, before, after):
    p = f"[{phase}] GPU {dev['index']}"
    for key, field in [
        ("name", "name"),
        ("uuid", "uuid"),
        ("pci_bus_id", "pci_bus_id"),
        ("mem_total", "memory_total_bytes"),
        ("power_limit", "power_limit_milliwatts"),
        ("pcie_replay", "pcie_replay_count"),
    ]:
        got = val(dev[field])
        check(got == before[key] == after[key], f"{p} {field}", f"nodeward {got!r}, NVML {before[key]!r}")
    ecc = dev["ecc"]
    check(val(ecc["enabled"]) == before["ecc_mode"], f"{p} ecc.enabled", f"nodeward {val(ecc['enabled'])!r}, NVML {before['ecc_mode']!r}")
    for key, field in [("ecc_uncorrected_volatile", "uncorrected_volatile"), ("ecc_corrected_volatile", "corrected_volatile")]:
        got = val(ecc[field])
        check(got == before[key], f"{p} ecc.{field}", f"nodeward {got!r}, NVML {before[key]!r}")
    # Values that move: within what the independent reader saw just before and just after.
    mib = 1 << 20
    for key, field, slack, unit in [
        ("mem_used", "memory_used_bytes", 64 * mib, "B"),
        ("temp", "temperature_celsius", 2, "C"),
        ("power", "power_draw_milliwatts", 0.15 * max([v for v in (before["power"], after["power"]) if num(v)] or [0]), "mW"),
        ("util_gpu", "utilization_gpu_percent", 10, "%"),
        ("util_mem", "utilization_memory_percent", 10, "%"),
    ]:
        got = val(dev[field])
        ok = got is not None and between(got, before[key], after[key], slack)
        check(ok, f"{p} {field}", f"nodeward {got} {unit}, NVML {before[key]} .. {after[key]} (slack {slack:.0f})")
    clocks = dev["clocks_mhz"]
    for key, field in [("clk_graphics", "graphics"), ("clk_sm", "sm"), ("clk_mem", "memory"), ("clk_video", "video")]:
        got = val(clocks[field])
        b, a = before[key], after[key]
        ok = between(got, b, a, 0.1 * max(b, a) if num(a) and num(b) else 0)
        check(ok, f"{p} clocks.{field}", f"nodeward {got} MHz, NVML {b} .. {a}")
    line("INFO", f"{p} throttle_reasons", json.dumps(dev.get("throttle_reasons")))
    line("INFO", f"{p} media", json.dumps(dev.get("media")))
    line("INFO", f"{p} row_remapping", json.dumps(dev.get("row_remapping")))
    line("INFO", f"{p} nvlink links read", str(len(val(dev["nvlink"]) or [])))
    errs = dev.get("nvml_errors_total", {})
    check(not errs, f"{p} no NVML call failed", json.dumps(errs))


def compare_procs(phase, dev, before, after, load_pid):
    p = f"[{phase}] GPU {dev['index']}"
    ours = {q["pid"]: q for q in (val(dev["processes"]) or [])}
    theirs = before["procs"] if isinstance(before["procs"], dict) else {}
    line("INFO", f"{p} processes", f"nodeward {sorted(ours)}, NVML {sorted(theirs)}, load pid {load_pid}")
    later = after["procs"] if isinstance(after["procs"], dict) else {}
    # A process NVML listed both before and after must be in nodeward's list, and nodeward
    # lists nothing NVML listed at neither moment.
    check(set(theirs) & set(later) <= set(ours) <= set(theirs) | set(later),
          f"{p} process list matches NVML's")
    for pid, mem in theirs.items():
        q = ours.get(pid)
        got = q and q.get("used_memory_bytes")
        check(got == mem, f"{p} pid {pid} used memory", f"nodeward {got}, NVML {mem}")
        if q:
            line("INFO", f"{p} pid {pid} attribution", f"cgroup {q.get('cgroup')!r}, container {q.get('container_id')!r}, sample {q.get('sample')}")
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    line("INFO", f"{p} pid {pid} /proc cgroup", f.read().strip().replace("\n", " | "))
            except OSError as e:
                line("INFO", f"{p} pid {pid} /proc cgroup", str(e))


LOAD = r"""
import sys, time, torch
x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
hold = torch.empty(4 << 30, dtype=torch.uint8, device="cuda")  # 4 GiB more, a known amount
torch.cuda.synchronize()
print("ready", flush=True)
end = time.time() + float(sys.argv[1])
while time.time() < end:
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodeward", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--poll-samples", type=int, default=20, help="ticks of the daemon's GPU poll time to read")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    nodeward = os.path.abspath(args.nodeward)

    N.nvmlInit()
    line("INFO", "driver", f"{s(N.nvmlSystemGetDriverVersion())}, NVML {s(N.nvmlSystemGetNVMLVersion())}")
    n = N.nvmlDeviceGetCount()
    handles = [N.nvmlDeviceGetHandleByIndex(i) for i in range(n)]

    def phase(name, load_pid=None):
        before = [nvml_sample(h) for h in handles]
        t0 = time.monotonic()
        snap = gpu_check(nodeward, os.path.join(args.out, f"{name}.json"))
        took = time.monotonic() - t0
        after = [nvml_sample(h) for h in handles]
        if snap is None:
            return
        line("INFO", f"[{name}] gpu-check", f"{took:.2f} s, one poll {snap.get('poll_micros')} us")
        check(val(snap["driver_version"]) == s(N.nvmlSystemGetDriverVersion()), f"[{name}] driver_version", str(val(snap["driver_version"])))
        check(len(snap["devices"]) == n, f"[{name}] device count", f"nodeward {len(snap['devices'])}, NVML {n}")
        for dev in snap["devices"]:
            i = dev["index"]
            check(not dev["lost"], f"[{name}] GPU {i} not lost")
            compare(name, dev, before[i], after[i])
            compare_procs(name, dev, before[i], after[i], load_pid)

    phase("idle")

    load = None
    try:
        load = subprocess.Popen([sys.executable, "-c", LOAD, "120"], stdout=subprocess.PIPE, text=True)
        ready = load.stdout.readline().strip()
        if ready != "ready":
            line("INFO", "load phase skipped", f"the load did not start ({ready!r}; torch missing?)")
        else:
            time.sleep(3)  # let utilisation, clocks and power settle
            phase("load", load.pid)
        agent_phase(nodeward, args.out, handles, args.poll_samples)
    finally:
        if load:
            load.kill()
            load.wait()

    N.nvmlShutdown()
    with open(os.path.join(args.out, "report.txt"), "w") as f:
        f.write("\n".join(REPORT) + "\n")
    fails = sum(1 for r in REPORT if r.startswith("FAIL"))
    passes = sum(1 for r in REPORT if r.startswith("PASS"))
    print(f"{passes} passed, {fails} failed", flush=True)
    sys.exit(1 if fails else 0)


def scrape():
    return urllib.request.urlopen(f"http://{METRICS_ADDR}/metrics", timeout=5).read().decode()


def agent_phase(nodeward, out, handles, poll_samples):
    """The daemon: the GPU through the API (`nodeward gpus --json`) and /metrics."""
    sock = "/tmp/nodeward-xcheck/nodeward.sock"
    os.makedirs(os.path.dirname(sock), exist_ok=True)
    log = open(os.path.join(out, "agent.log"), "w")
    agent = subprocess.Popen(
        [nodeward, "--set", f"api.unix_socket={sock}", "--set", "api.tcp_listen=127.0.0.1:50551",
         "--set", f"metrics.listen={METRICS_ADDR}", "--set", "agent.tick=1s", "run"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        reply = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and agent.poll() is None:
            r = subprocess.run([nodeward, "gpus", "--json", "--addr", f"unix:{sock}"], capture_output=True, text=True)
            if r.returncode == 0 and '"uuid"' in r.stdout:
                reply = r.stdout
                break
            time.sleep(0.5)
        check(reply is not None, "[agent] nodeward gpus answers with the GPU", "" if reply else f"agent exit {agent.poll()}")
        uuid = s(N.nvmlDeviceGetUUID(handles[0]))
        if reply:
            check(uuid in reply, "[agent] the API names GPU 0 by its NVML UUID", uuid)
        metrics = ""
        try:
            metrics = scrape()
        except OSError as e:
            line("FAIL", "[agent] /metrics", str(e))
        gpu_lines = [m for m in metrics.splitlines() if m.startswith("nodeward_gpu")]
        check(any("nodeward_gpu_temperature" in m and uuid in m for m in gpu_lines), "[agent] /metrics has GPU 0's temperature under its UUID")
        temp = N.nvmlDeviceGetTemperature(handles[0], N.NVML_TEMPERATURE_GPU)
        for m in gpu_lines:
            if m.startswith("nodeward_gpu_temperature") and uuid in m:
                got = float(m.rsplit(" ", 1)[1])
                check(abs(got - temp) <= 3, "[agent] /metrics temperature", f"{got} vs NVML {temp}")
        # The daemon's own poll time, once per tick for a while (INFO: a figure, not a check).
        polls = []
        for _ in range(poll_samples):
            try:
                for m in scrape().splitlines():
                    if m.startswith("nodeward_gpu_poll_duration_seconds "):
                        polls.append(float(m.split()[1]) * 1000)
            except OSError:
                pass
            time.sleep(1.0)
        if polls:
            polls.sort()
            line("INFO", "[agent] GPU poll time, ms", f"{len(polls)} ticks: min {polls[0]:.2f}, median {polls[len(polls) // 2]:.2f}, max {polls[-1]:.2f}")
        with open(os.path.join(out, "agent.txt"), "w") as f:
            f.write((reply or "") + "\n\n" + "\n".join(gpu_lines) + "\n")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=15)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()


if __name__ == "__main__":
    main()

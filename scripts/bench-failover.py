#!/usr/bin/env python3
"""Failover timing: N greedy streams run on a 4-node `flotilla up` cluster (one replica per node);
one node that serves part of them is killed (SIGKILL) or hung (SIGSTOP) mid-generation. For each
stream that was running on it, the recovery time is the gap from the fault to its next token; the
script also checks that every stream completes and reports throughput before, during and after.

Usage: scripts/bench-failover.py [KILL|STOP] [streams]   (needs target/release/flotilla and the model)
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

SIG = sys.argv[1] if len(sys.argv) > 1 else "KILL"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 16
BIN = "./target/release/flotilla"
MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
CP, HP = 7800, 8800

up = subprocess.Popen([BIN, "up", "--nodes", "4", "--cluster-port", str(CP), "--http-port", str(HP), "--model", MODEL],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def status():
    out = subprocess.run([BIN, "admin", "--node", f"127.0.0.1:{CP}", "status", "--json"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def pids():
    out = subprocess.run(["pgrep", "-f", f"name node4 --cluster-listen 127.0.0.1:{CP + 3}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


try:
    for _ in range(300):
        s = status()
        if s and s.get("scheduler") and s["scheduler"]["ready"] and len(s["scheduler"]["placement"]["replicas"]) == 4:
            break
        time.sleep(0.2)
    else:
        sys.exit("cluster not ready")
    stamps = [[] for _ in range(N)]
    finished = [False] * N
    errors = []

    def stream(i):
        body = json.dumps({"prompt": f"Tell a long story, part {i}:", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{HP + i % 2}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    if b'"finish_reason":"length"' in line:
                        finished[i] = True
                    if line.startswith(b"data: ") and b'"text":"' in line and b'"text":""' not in line:
                        stamps[i].append(time.monotonic())
        except Exception as e:  # noqa: BLE001
            errors.append(f"stream {i}: {e}")

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(N)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(3)
    victim = pids()[0]
    fault = time.monotonic()
    os.kill(victim, signal.SIGKILL if SIG == "KILL" else signal.SIGSTOP)
    if SIG == "STOP":
        threading.Timer(10, lambda: os.kill(victim, signal.SIGCONT)).start()
    for t in threads:
        t.join()
    end = max(s[-1] for s in stamps if s)
    hit = []
    for s in stamps:
        before = [x for x in s if x < fault]
        after = [x for x in s if x >= fault]
        if before and after and (after[0] - fault) > 3 * max(0.05, (before[-1] - before[0]) / max(1, len(before) - 1)):
            hit.append(after[0] - fault)
    def rate(a, b):
        return sum(1 for s in stamps for x in s if a <= x < b) / (b - a)
    print(json.dumps({
        "fault": "kill -9" if SIG == "KILL" else "SIGSTOP (10 s)",
        "streams": N,
        "completed": sum(finished),
        "errors": errors,
        "affected_streams": len(hit),
        "recovery_s_max": round(max(hit), 3) if hit else None,
        "recovery_s_median": round(sorted(hit)[len(hit) // 2], 3) if hit else None,
        "tok_s_before": round(rate(t0 + 1, fault), 1),
        "tok_s_first_5s_after": round(rate(fault, fault + 5), 1),
        "tok_s_after": round(rate(fault + 5, end), 1) if end > fault + 6 else None,
    }))
finally:
    up.send_signal(signal.SIGTERM)
    try:
        up.wait(20)
    except subprocess.TimeoutExpired:
        up.kill()

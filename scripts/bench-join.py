#!/usr/bin/env python3
"""Join timing: a 2-node `flotilla up` cluster under closed-loop load (C clients, each sending
64-token greedy streams back to back to node1 and node2); after a while two more nodes start and join.
Reports the time from starting a node to its worker running its first batch, and throughput before
and after (tokens streamed per second, all clients).

Usage: scripts/bench-join.py [clients]   (needs target/release/flotilla and the model)
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

C = int(sys.argv[1]) if len(sys.argv) > 1 else 16
BIN = "./target/release/flotilla"
MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
CP, HP = 7900, 8900
env = dict(os.environ, FLOTILLA__NODE__THREADS="1")
procs = [subprocess.Popen([BIN, "up", "--nodes", "2", "--cluster-port", str(CP), "--http-port", str(HP), "--model", MODEL],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]


def status():
    out = subprocess.run([BIN, "admin", "--node", f"127.0.0.1:{CP}", "status", "--json"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait(pred, within, what):
    end = time.monotonic() + within
    while time.monotonic() < end:
        s = status()
        if s and pred(s):
            return s
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


try:
    wait(lambda s: s.get("scheduler") and s["scheduler"]["ready"] and len(s["scheduler"]["placement"]["replicas"]) == 2, 60, "2 replicas")
    stamps = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i):
        n = 0
        while not stop.is_set():
            body = json.dumps({"prompt": f"Client {i} request {n}:", "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{HP + i % 2}/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                for line in r:
                    if line.startswith(b"data: ") and b'"text":"' in line and b'"text":""' not in line:
                        with lock:
                            stamps.append(time.monotonic())
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(C)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(8)
    join = time.monotonic()
    for k in (3, 4):
        procs.append(subprocess.Popen([BIN, "node", "--name", f"node{k}", "--cluster-listen", f"127.0.0.1:{CP + k - 1}", "--http-listen", f"127.0.0.1:{HP + k - 1}",
                                       "--seeds", f"127.0.0.1:{CP},127.0.0.1:{CP + 1}", "--model", MODEL], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
    first_batch = {}
    end = time.monotonic() + 60
    while len(first_batch) < 2 and time.monotonic() < end:
        s = status()
        for w in (s or {}).get("workers", []):
            if w["node"] in ("node3", "node4") and w["batches"] > 0 and w["node"] not in first_batch:
                first_batch[w["node"]] = round(time.monotonic() - join, 2)
        time.sleep(0.05)
    ready = wait(lambda s: s["scheduler"]["ready"] and len(s["scheduler"]["placement"]["replicas"]) == 4, 60, "4 replicas")
    placed = round(time.monotonic() - join, 2)
    time.sleep(10)
    stop.set()
    fin = time.monotonic()

    def rate(a, b):
        return round(sum(1 for x in stamps if a <= x < b) / (b - a), 1)

    print(json.dumps({
        "clients": C,
        "join_to_first_batch_s": first_batch,
        "join_to_4_replicas_ready_s": placed,
        "tok_s_before": rate(t0 + 2, join),
        "tok_s_after": rate(join + max(first_batch.values(), default=0) + 1, fin),
    }))
finally:
    for p in procs[1:]:
        p.send_signal(signal.SIGTERM)
    procs[0].send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()

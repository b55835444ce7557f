#!/usr/bin/env python3
"""Mail flow while one owner reads hard, and mail flow's throughput against an older module.

    python3 bench/bench_mailflow.py [--handles 2000] [--connections 50] [--seconds 10]
                                    [--old-module PATH] [--json FILE]

Starts the server (``incognitomail.py`` beside this folder, in a process of its own) with its
socketmap, policy service and web listener on loopback; no Postfix is needed. One account holds
``--handles`` handles with 200-character labels, another (the victim) a few. Then:

1. idle: for ``--seconds``, one socketmap client and one policy client, each on a connection of
   its own, ask about the victim's handles one question at a time, and the victim makes a new
   handle over the control socket twice a second: p50, p90 and max of each;
2. the attack: ``--connections`` WebSocket connections from one address, each keeping 16
   ``list_handles`` with the first account's token in flight and reading every reply, while
   the same three are measured again; the server's peak RSS during the attack, against its RSS
   before;
3. throughput: 8 and then 32 persistent clients (in 4 processes) ask the socketmap, then the
   policy service, as fast as they are answered, for ``--seconds`` each: answers per second.
   Given ``--old-module PATH`` (e.g. ``git show 858d407:incognitomail.py > /tmp/old.py``), the
   same for that module, started the same way, alternately with the current one (twice each;
   the better run counts), and the ratio.

Prints a table and the targets: under attack, mail flow's p90 within 5 x its idle p90 plus
10 ms and its max under 250 ms; the victim's new handle p90 within 5 x idle plus 20 ms and its
max under 1 s; RSS growth under 128 MB; throughput at least 1.0 x the old module's.

Needs root only for the socket folders it makes; standard library only. Leaves nothing behind.
"""

import argparse
import importlib.util
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from test_incognitomail import client_frame, read_server_frame  # noqa: E402

CURRENT = os.path.join(os.path.dirname(HERE), "incognitomail.py")
DOMAIN = "incognito.test"
IN_FLIGHT = 16
VICTIM_HANDLES = 50


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else None


def summary(values):
    return {"p50_ms": 1000 * percentile(values, 0.5), "p90_ms": 1000 * percentile(values, 0.9),
            "max_ms": 1000 * max(values), "count": len(values)}


class Server:
    """One module's server in a folder of its own, with its accounts seeded by its own Store."""

    def __init__(self, module_path, handles):
        self.module_path = module_path
        self.folder = tempfile.mkdtemp(prefix="bench-mailflow-")
        os.chmod(self.folder, 0o755)
        self.web_port, self.policy_port = free_port(), free_port()
        self.control = os.path.join(self.folder, "run", "control.sock")
        self.socketmap = os.path.join(self.folder, "postfix", "socketmap.sock")
        os.makedirs(os.path.dirname(self.socketmap), mode=0o700)
        self.config_path = os.path.join(self.folder, "incognitomail.ini")
        with open(self.config_path, "w") as f:
            f.write("[General]\nUnixSockPath = %s\nLockFilePath = run/lock\nListenAddress = "
                    "127.0.0.1:%d\nPolicyListen = inet:127.0.0.1:%d\nSocketmapListen = unix:%s\n"
                    "LogLevel = warning\n[Persistence]\nDatabasePath = db.sqlite3\n"
                    "[PostfixConfig]\nDomain = %s\nMapFilePath = hash:%s/virtual\n[Limits]\n"
                    "MaxConnectionsPerClient = 0\nHandlesPerMinutePerClient = 0\n"
                    "HandlesPerMinutePerAccount = 0\n"
                    % (self.control, self.web_port, self.policy_port, self.socketmap, DOMAIN,
                       self.folder))
        module = load_module(module_path, "bench_module_%d" % id(self))
        store = module.Store(os.path.join(self.folder, "db.sqlite3"))
        self.reader_token, self.victim_token = module.new_token(), module.new_token()
        self.victim_handles = []
        now = time.time()
        with store.transaction():
            reader = store.add_account("reader@example.org", module.token_digest(self.reader_token),
                                       now)
            victim = store.add_account("victim@example.org", module.token_digest(self.victim_token),
                                       now)
            for number in range(handles):
                store.add_handle(reader, "r%015d" % number, DOMAIN, "x" * 200, now)
            for number in range(VICTIM_HANDLES):
                self.victim_handles.append("v%015d@%s" % (number, DOMAIN))
                store.add_handle(victim, "v%015d" % number, DOMAIN, "victim", now)
        store.close()
        self.process = None

    def start(self):
        self.log = open(os.path.join(self.folder, "server.log"), "ab")
        self.process = subprocess.Popen([sys.executable, self.module_path, "-c", self.config_path],
                                        stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited; see %s" % self.log.name)
            try:
                self.control_request(op="status")
                if os.path.exists(self.socketmap):
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("the server did not start")

    def control_request(self, **request):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(60)
            sock.connect(self.control)
            sock.sendall((json.dumps(request) + "\n").encode())
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("closed")
                data += chunk
        reply = json.loads(data)
        if not reply.get("ok"):
            raise RuntimeError(reply)
        return reply

    def rss_mb(self):
        with open("/proc/%d/status" % self.process.pid) as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# -- Postfix's questions ------------------------------------------------------------------------

def netstring(data):
    return b"%d:%s," % (len(data), data)


class SocketmapClient:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(60)
        self.sock.connect(path)
        self.buffer = b""

    def ask(self, key):
        self.sock.sendall(netstring(b"virtual " + key.encode()))
        while True:
            length, colon, rest = self.buffer.partition(b":")
            if colon and len(rest) > int(length):
                self.buffer = rest[int(length) + 1:]
                return rest[:int(length)]
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("the socketmap closed")
            self.buffer += chunk


class PolicyClient:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buffer = b""

    def ask(self, recipient):
        self.sock.sendall(("request=smtpd_access_policy\nprotocol_state=RCPT\ninstance=%s\n"
                           "sender=s@example.org\nrecipient=%s\nclient_address=127.0.0.1\n\n"
                           % (uuid.uuid4().hex, recipient)).encode())
        while b"\n\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("the policy service closed")
            self.buffer += chunk
        answer, self.buffer = self.buffer.split(b"\n\n", 1)
        return answer


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - started


def probe(server, seconds):
    """Socketmap, policy and the victim's new handle, each one at a time, for ``seconds``."""
    results = {"socketmap": [], "policy": [], "new_handle": []}
    stop = time.monotonic() + seconds

    def ask(name, client):
        while time.monotonic() < stop:
            results[name].append(timed(client.ask, secrets.choice(server.victim_handles)))
            time.sleep(0.01)

    def create():
        while time.monotonic() < stop:
            results["new_handle"].append(timed(server.control_request, op="new_handle",
                                               token=server.victim_token))
            time.sleep(0.5)
    threads = [threading.Thread(target=ask, args=("socketmap", SocketmapClient(server.socketmap))),
               threading.Thread(target=ask, args=("policy", PolicyClient(server.policy_port))),
               threading.Thread(target=create)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {name: summary(values) for name, values in results.items()}


# -- the attack: one owner reading hard ---------------------------------------------------------

def websocket(port):
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(("GET /incognitomail HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13"
                  "\r\n\r\n" % (port, "dGhlIHNhbXBsZSBub25jZQ==")).encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError("handshake refused: %r" % head[:80])
    return sock


def reader_attack(server, connections, stopping, counts):
    frame = client_frame(0x1, json.dumps({"id": 1, "op": "list_handles",
                                          "token": server.reader_token}).encode())

    def run():
        sock = websocket(server.web_port)
        buffer = [b""]

        def read_exactly(n):
            while len(buffer[0]) < n:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    raise OSError("closed")
                buffer[0] += chunk
            data, buffer[0] = buffer[0][:n], buffer[0][n:]
            return data
        try:
            sock.sendall(frame * IN_FLIGHT)
            while not stopping.is_set():
                read_server_frame(read_exactly)
                counts[0] += 1
                sock.sendall(frame)
        except OSError:
            if not stopping.is_set():
                counts[1] += 1
        finally:
            sock.close()
    threads = [threading.Thread(target=run, daemon=True) for _ in range(connections)]
    for thread in threads:
        thread.start()
    return threads


def under_attack(server, connections, seconds):
    before = server.rss_mb()
    stopping, counts, peak = threading.Event(), [0, 0], [before]
    threads = reader_attack(server, connections, stopping, counts)

    def sample():
        while not stopping.is_set():
            peak[0] = max(peak[0], server.rss_mb())
            time.sleep(0.1)
    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(2)                       # the attack is in full swing
    figures = probe(server, seconds)
    stopping.set()
    sampler.join()
    for thread in threads:
        thread.join(30)
    figures.update(rss_before_mb=before, rss_peak_mb=peak[0], replies=counts[0],
                   replies_per_second=counts[0] / (seconds + 2), broken_connections=counts[1])
    return figures


# -- throughput ---------------------------------------------------------------------------------

def _hammer(kind, target, keys, clients, seconds, results):
    connect = (lambda: SocketmapClient(target)) if kind == "socketmap" else \
        (lambda: PolicyClient(target))
    made = [connect() for _ in range(clients)]
    counts = [0] * clients
    start = time.monotonic() + 0.2
    stop = start + seconds

    def run(number):
        client = made[number]
        while time.monotonic() < start:
            time.sleep(0.001)
        while time.monotonic() < stop:
            client.ask(keys[counts[number] % len(keys)])
            counts[number] += 1
    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put(sum(counts))


def throughput(server, kind, clients, seconds, processes=4):
    """Answers per second with ``clients`` persistent clients in ``processes`` processes."""
    target = server.socketmap if kind == "socketmap" else server.policy_port
    results = multiprocessing.Queue()
    shares = [clients // processes + (1 if n < clients % processes else 0) for n in range(processes)]
    workers = [multiprocessing.Process(target=_hammer, args=(kind, target, server.victim_handles,
                                                            share, seconds, results))
               for share in shares if share]
    for worker in workers:
        worker.start()
    total = sum(results.get(timeout=seconds + 120) for _ in workers)
    for worker in workers:
        worker.join()
    return total / seconds


def rates(module_path, handles, seconds):
    server = Server(module_path, handles).start()
    try:
        return {"%s_%d" % (kind, clients): throughput(server, kind, clients, seconds)
                for kind in ("socketmap", "policy") for clients in (8, 32)}
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handles", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--old-module", metavar="PATH")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    result = {"handles": args.handles, "connections": args.connections}
    server = Server(CURRENT, args.handles).start()
    try:
        result["idle"] = probe(server, args.seconds)
        result["attack"] = under_attack(server, args.connections, args.seconds)
    finally:
        server.stop()
    runs = {"current": []}
    if args.old_module:
        runs["old"] = []
    for _ in range(2):
        for name in runs:
            runs[name].append(rates(CURRENT if name == "current" else args.old_module,
                                    args.handles, args.seconds))
    result["throughput"] = {name: {key: max(run[key] for run in measured) for key in measured[0]}
                            for name, measured in runs.items()}
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


def report(result):
    idle, attack = result["idle"], result["attack"]
    print("%-26s %-28s %-28s" % ("", "idle p50 / p90 / max ms", "under attack p50 / p90 / max ms"))
    for name in ("socketmap", "policy", "new_handle"):
        print("%-26s %-28s %-28s" % (name, "%.1f / %.1f / %.1f" % tuple(
            idle[name][k] for k in ("p50_ms", "p90_ms", "max_ms")), "%.1f / %.1f / %.1f" % tuple(
            attack[name][k] for k in ("p50_ms", "p90_ms", "max_ms"))))
    print("attack: %d replies (%.0f/s), %d connections broken; RSS %.1f MB before, %.1f MB at "
          "most" % (attack["replies"], attack["replies_per_second"],
                    attack["broken_connections"], attack["rss_before_mb"],
                    attack["rss_peak_mb"]))
    targets = []
    for name in ("socketmap", "policy"):
        bound = min(5 * idle[name]["p90_ms"] + 10, 250)
        targets.append(("%s p90 under attack <= %.1f ms" % (name, bound),
                        attack[name]["p90_ms"] <= bound))
        targets.append(("%s max under attack < 250 ms" % name, attack[name]["max_ms"] < 250))
    bound = 5 * idle["new_handle"]["p90_ms"] + 20
    targets.append(("new handle p90 under attack <= %.1f ms" % bound,
                    attack["new_handle"]["p90_ms"] <= bound))
    targets.append(("new handle max under attack < 1000 ms", attack["new_handle"]["max_ms"] < 1000))
    targets.append(("RSS growth < 128 MB",
                    attack["rss_peak_mb"] - attack["rss_before_mb"] < 128))
    measured = result["throughput"]
    print("\nanswers per second      %s" % "  ".join("%12s" % name for name in measured))
    for key in measured["current"]:
        line = "%-22s  %s" % (key, "  ".join("%12.0f" % measured[name][key] for name in measured))
        if "old" in measured:
            ratio = measured["current"][key] / measured["old"][key]
            line += "   %.2f x" % ratio
            targets.append(("%s at least 1.0 x the old module's" % key, ratio >= 1.0))
        print(line)
    print()
    for text, met in targets:
        print("%-7s %s" % ("met" if met else "MISSED", text))


if __name__ == "__main__":
    main()

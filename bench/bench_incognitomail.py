#!/usr/bin/env python3
"""Benchmark IncognitoMail as a user's Postfix server would see it, at up to a million handles.

    python3 bench/bench_incognitomail.py [--handles N] [--clients C] [--seconds S]
                                         [--mode hash|lmdb|socketmap] [--json FILE]

Starts a real server (``incognitomail.py`` in its own process) against a throw-away map and a
private Postfix instance on loopback, pre-loads N handles straight into a fresh database (a
bulk path of the benchmark's own, not N requests), then measures:

1. new handle over WebSocket, one at a time, a new connection per handle as the add-on does
2. new handles per second with C concurrent clients for S seconds
3. create a handle, then at once send a message to it through Postfix, 200 times
4. the server's RSS in total (with its postmap helper) idle and holding 10,000 idle WebSocket
   connections
5. server start time with N handles, with the map in step and with the map missing
6. ``list`` and ``delete account`` of an account with 10,000 handles

Needs root and Postfix (apt-get install postfix postfix-lmdb). Standard library only. Honours
TMPDIR; leaves no process behind. Rate limits are configured off: this measures capacity.
"""

import argparse
import asyncio
import base64
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import incognitomail  # noqa: E402
from test_incognitomail import PostfixInstance  # noqa: E402

DOMAIN = "incognito.test"
TARGET = "alice@mbox.test"
ACCOUNT_HANDLES = 10000
IDLE_CONNECTIONS = 10000
SEQUENTIAL_COUNT = 300
SEND_COUNT = 200


# -- a minimal WebSocket client, as the add-on uses it ----------------------------------------

async def ws_connect(port, source="127.0.0.1"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=65536, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(("GET /incognitomail HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  % (port, key)).encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise RuntimeError("handshake refused: %r" % head.split(b"\r\n")[0])
    return reader, writer


def ws_frame(opcode, payload):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | opcode])
    head += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def ws_read_text(reader):
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return (await reader.readexactly(n)).decode()


async def ws_new_handle(port, token):
    """connect, ``new handle <secret>``, read the address, close: the add-on's whole visit."""
    reader, writer = await ws_connect(port)
    writer.write(ws_frame(1, ("new handle " + token).encode()))
    reply = await ws_read_text(reader)
    writer.write(ws_frame(8, (1000).to_bytes(2, "big")))
    try:
        await asyncio.wait_for(reader.read(64), 2)
    except asyncio.TimeoutError:
        pass
    writer.close()
    if reply.startswith("error"):
        raise RuntimeError(reply)
    return reply


# -- the server under test ------------------------------------------------------------------------

class Server:
    def __init__(self, config_path):
        self.config_path = config_path
        self.config = incognitomail.load_config(config_path)
        self.process = None

    def start(self):
        """Start and wait until the control socket answers; return seconds taken."""
        started = time.monotonic()
        self.log = open(os.path.join(os.path.dirname(self.config_path), "server.log"), "ab")
        self.process = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(HERE), "incognitomail.py"),
                                         "-c", self.config_path], stdout=self.log, stderr=self.log)
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("the server exited with %d; see %s" % (self.process.returncode, self.log.name))
            try:
                self.request("status")
                return time.monotonic() - started
            except incognitomail.ServerError:
                time.sleep(0.01)

    def request(self, op, **fields):
        return incognitomail.ControlClient(self.config).request(op, **fields)

    def rss_mb(self):
        """The server's RSS in total: its process and its children (the postmap helper)."""
        pids = [self.process.pid]
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open("/proc/%s/stat" % name) as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                            pids.append(int(name))
                except (OSError, IndexError, ValueError):
                    pass
        total = 0
        for pid in pids:
            with open("/proc/%d/status" % pid) as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return total / 1024.0

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self.process = None


def write_config(folder, mode, map_path, config_dir, ws_port):
    socketmap = "unix:%s/socketmap.sock" % folder if mode == "socketmap" else ""
    text = """[General]
UnixSockPath = run/control.sock
LockFilePath = run/server.lock
ListenAddress = 127.0.0.1:{ws_port}
LogLevel = warning
SocketmapListen = {socketmap}
[Persistence]
DatabasePath = incognitomail.sqlite3
[PostfixConfig]
Domain = {domain}
MapFilePath = {map}
ConfigDir = {config_dir}
[Limits]
IdleTimeout = 0
HandlesPerMinutePerClient = 0
HandlesPerMinutePerAccount = 0
FailedTokensPerMinutePerClient = 0
MaxConnections = 0
MaxConnectionsPerClient = 0
""".format(ws_port=ws_port, socketmap=socketmap, domain=DOMAIN, config_dir=config_dir,
           map=("%s:%s" % (mode, map_path)) if mode != "socketmap" else map_path)
    path = os.path.join(folder, "incognitomail.ini")
    with open(path, "w") as f:
        f.write(text)
    return path


def preload(database_path, handles):
    """Fill a fresh database directly: N handles, of which two accounts hold 10,000 each."""
    store = incognitomail.Store(database_path)
    tokens = {name: incognitomail.new_token() for name in ("new", "bulk", "list", "delete")}
    now = int(time.time()) - 86400
    with store.transaction():
        ids = {name: store.add_account(TARGET, incognitomail.token_digest(token), now)
               for name, token in tokens.items()}
        plan = [("list", ACCOUNT_HANDLES), ("delete", ACCOUNT_HANDLES),
                ("bulk", max(0, handles - 2 * ACCOUNT_HANDLES))]
        number = 0
        for name, count in plan:
            rows = []
            for _ in range(count):
                number += 1
                # A bijection of the counter onto 64 bits, written as 16 hex digits: unique, handle-shaped.
                rows.append(("%016x" % ((number * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF), DOMAIN, ids[name], now))
                if len(rows) == 50000:
                    store.db.executemany("INSERT INTO handles (local, domain, account_id, created) VALUES (?,?,?,?)", rows)
                    rows = []
            store.db.executemany("INSERT INTO handles (local, domain, account_id, created) VALUES (?,?,?,?)", rows)
    store.close()
    return tokens


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# -- the measurements ---------------------------------------------------------------------------------

async def sequential(port, token, count):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await ws_new_handle(port, token)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def concurrent(port, token, clients, seconds):
    times = []
    deadline = time.monotonic() + seconds

    async def client():
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await ws_new_handle(port, token)
            times.append((time.perf_counter() - started) * 1000)
    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return times, time.monotonic() - started


async def create_then_send(port, token, postfix):
    sent = []
    for _ in range(SEND_COUNT):
        address = await ws_new_handle(port, token)
        ok, code, text, mark = await asyncio.get_running_loop().run_in_executor(None, postfix.send, address)
        if ok:
            sent.append(mark)
        else:
            print("  not accepted: %s %s %s" % (address, code, text), file=sys.stderr)
    delivered = sum(1 for mark in sent if postfix.wait_for_mail("alice", mark, timeout=30))
    return len(sent), delivered


async def hold_idle_connections(port, server, token, count):
    held = []
    for start in range(0, count, 500):
        # Spread over 127.0.0.2-21 as distinct browsers would be: one source address would make
        # the kernel hunt for a free ephemeral port on every later connection from 127.0.0.1.
        source = "127.0.0.%d" % (2 + start // 500 % 20)
        results = await asyncio.gather(*(ws_connect(port, source) for _ in range(min(500, count - start))),
                                       return_exceptions=True)
        held += [r for r in results if not isinstance(r, BaseException)]
    await asyncio.sleep(1)
    rss = server.rss_mb()
    probe = await sequential(port, token, 50)      # others are not slowed while they are held
    for _, writer in held:
        writer.close()
    return rss, len(held), statistics.median(probe)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handles", type=int, default=100000, help="handles pre-loaded (default 100000)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients in step 2 (default 20)")
    parser.add_argument("--seconds", type=float, default=10, help="length of step 2 (default 10)")
    parser.add_argument("--mode", choices=("hash", "lmdb", "socketmap"), default="lmdb")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("postfix", path=os.environ.get("PATH", "") + ":/usr/sbin"):
        sys.exit("bench: needs root and Postfix (apt-get install postfix postfix-lmdb)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: stopped by SIGTERM"))   # still clean up
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    folder = tempfile.mkdtemp(prefix="incognitomail-bench-")
    os.chmod(folder, 0o755)          # Postfix's daemons (user postfix) reach the socketmap socket
    extra = ["virtual_alias_maps = socketmap:unix:%s/socketmap.sock:virtual" % folder] if args.mode == "socketmap" else []
    postfix = PostfixInstance(os.path.join(folder, "postfix"), map_type="lmdb" if args.mode == "lmdb" else "hash",
                              extra_main_cf=extra)
    server = None
    try:
        postfix.create()
        postfix.start()
        ws_port = _free_port()
        config_path = write_config(folder, args.mode, postfix.map_path, postfix.config_dir, ws_port)
        server = Server(config_path)

        print("pre-loading %d handles ..." % args.handles, file=sys.stderr)
        started = time.monotonic()
        tokens = preload(server.config.database_path, args.handles)
        print("  %.1f s" % (time.monotonic() - started), file=sys.stderr)

        for path in (postfix.map_path, postfix.map_path + (".lmdb" if args.mode == "lmdb" else ".db")):
            if os.path.exists(path) and args.mode != "socketmap":
                os.unlink(path)
        start_missing = server.start()
        server.stop()
        start_in_step = server.start()
        rss_idle = server.rss_mb()
        print("started: map missing %.2f s, in step %.2f s" % (start_missing, start_in_step), file=sys.stderr)

        seq = asyncio.run(sequential(ws_port, tokens["new"], SEQUENTIAL_COUNT))
        print("sequential done", file=sys.stderr)
        conc, elapsed = asyncio.run(concurrent(ws_port, tokens["new"], args.clients, args.seconds))
        print("concurrent done", file=sys.stderr)
        sent, delivered = asyncio.run(create_then_send(ws_port, tokens["new"], postfix))
        print("create-then-send done", file=sys.stderr)
        rss_held, held, probe_median = asyncio.run(hold_idle_connections(ws_port, server, tokens["new"], IDLE_CONNECTIONS))

        started = time.monotonic()
        listed = server.request("list_handles", token=tokens["list"])["handles"]
        list_s = time.monotonic() - started
        assert len(listed) == ACCOUNT_HANDLES, len(listed)
        started = time.monotonic()
        server.request("delete_account", token=tokens["delete"])
        delete_s = time.monotonic() - started

        result = {
            "mode": args.mode, "handles": args.handles,
            "sequential_ms": {"median": round(statistics.median(seq), 2), "p99": round(percentile(seq, 0.99), 2)},
            "concurrent": {"clients": args.clients, "seconds": args.seconds,
                           "per_second": round(len(conc) / elapsed, 1),
                           "median_ms": round(statistics.median(conc), 2), "p99_ms": round(percentile(conc, 0.99), 2)},
            "create_then_send": {"sent": SEND_COUNT, "delivered": delivered},
            "rss_mb": {"idle": round(rss_idle, 1), "idle_connections": round(rss_held, 1), "connections": held},
            "start_s": {"in_step": round(start_in_step, 2), "map_missing": round(start_missing, 2)},
            "list_10000_s": round(list_s, 3),
            "delete_account_10000_s": round(delete_s, 3),
        }
        rows = [
            ("mode / handles", "%s / %d" % (args.mode, args.handles)),
            ("1. sequential new handle", "median %.2f ms, p99 %.2f ms" % (result["sequential_ms"]["median"],
                                                                          result["sequential_ms"]["p99"])),
            ("2. %d concurrent clients, %g s" % (args.clients, args.seconds),
             "%.1f handles/s, median %.2f ms, p99 %.2f ms" % (result["concurrent"]["per_second"],
                                                             result["concurrent"]["median_ms"],
                                                             result["concurrent"]["p99_ms"])),
            ("3. create then send", "%d of %d delivered (%d accepted)" % (delivered, SEND_COUNT, sent)),
            ("4. RSS idle / with idle conns", "%.1f MB / %.1f MB holding %d (new handle meanwhile: median %.2f ms)"
             % (rss_idle, rss_held, held, probe_median)),
            ("5. start, map in step / missing", "%.2f s / %.2f s" % (start_in_step, start_missing)),
            ("6. list / delete account (10,000)", "%.3f s / %.3f s" % (list_s, delete_s)),
        ]
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print("%-*s  %s" % (width, name, value))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if server is not None:
            server.stop()
        postfix.destroy()
        shutil.rmtree(folder, ignore_errors=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Benchmark IncognitoMail as a user's Postfix server would see it, at up to a million handles.

    python3 bench/bench_incognitomail.py [--handles N] [--clients C] [--seconds S]
                                         [--mode hash|lmdb|socketmap] [--json FILE]
                                         [--server-log FILE]

Starts a real server (``incognitomail.py`` in its own process) against a throw-away map and a
private Postfix instance on loopback, pre-loads N handles straight into a fresh database (a
bulk path of the benchmark's own, not N requests, into the schema the module creates), then
measures:

1. new handle over WebSocket, one at a time, a new connection per handle as the add-on does;
   and the same over the HTTP API (``POST /api/v1/aliases`` in addy.io's dialect, a new TCP
   connection per request with ``Connection: close``, as Bitwarden does), as many times
2. new handles per second with C concurrent clients for S seconds, over WebSocket, then over HTTP
3. create a handle, then at once send a message to it through Postfix, 200 times
4. the server's RSS in total (with any postmap it runs) idle and holding 10,000 idle WebSocket
   connections
5. server start time with N handles, with the map in step and with the map missing
6. ``list`` and ``delete account`` of an account with 10,000 handles
7. ``postmap -c ETC -i TYPE:MAP`` with one line on stdin, 20 times, against a copy of the
   benchmark's map (socketmap: of the Postfix instance's empty hash map): a yardstick of the
   machine, so figures from different machines can be compared
8. the expiry sweep: 10,000 of the pre-loaded handles expire a few seconds before a sweep (the
   server is restarted for this with SWEEP_SECONDS set to 8 s through a small wrapper, and at
   log level info); measured from the sweep's own log line "N handles expired" (written when
   the sweep has chosen what expired, before the map is changed; its timestamp has 1 ms
   resolution) until the last of 200 sampled expired handles is gone from ``postmap -q``
   (polled every 50 ms). New handles are requested over WebSocket one at a time meanwhile;
   those whose request overlapped the sweep (from its log line until the samples are gone, at
   least 1 s) give the latency during the sweep. With socketmap there is no map file: the
   figure is how long after the expiry time the samples still answered OK on the socketmap
   socket (expected 0: NOTFOUND from the first second); latency is taken around the sweep the
   same way.

Prints a table, the targets that are ratios in the same run (HTTP sequential median within 1.1x
the WebSocket's, HTTP throughput at least 0.9x, HTTP p99 <= 100 ms) and the sweep's targets
(out of the map within 2 s; new handles meanwhile median <= 8 ms, p99 <= 25 ms, socketmap
median <= 3 ms), each with whether it is met. ``--json FILE`` writes::

    {"mode", "handles", "sequential_ms": {"median", "p99"},
     "concurrent": {"clients", "seconds", "per_second", "median_ms", "p99_ms"},
     "create_then_send": {"sent", "delivered"},
     "rss_mb": {"idle", "idle_connections", "connections"},
     "start_s": {"in_step", "map_missing"}, "list_10000_s", "delete_account_10000_s",
     "http": {"sequential_ms": {"median", "p99"}, "concurrent": {"per_second", "median_ms", "p99_ms"}},
     "postmap_insert_ms",
     "sweep": {"expired", "out_of_map_s", "new_handle_during_ms": {"median", "p99", "max", "count"},
               "measured_from": "sweep log line" | "expiry time" | "first sample gone",
               "sampled", "left_in_map", "swept_after_expiry_s"}}

``expired`` is the count in the sweep's log line; ``out_of_map_s`` is null when the samples did
not all leave within 30 s of the expected sweep; ``left_in_map``: samples still routable at the
last poll (socketmap: at the first poll after the expiry time). ``--server-log FILE`` keeps the
server's log (all its starts) for a look at warnings and errors.

Needs root and Postfix (apt-get install postfix postfix-lmdb). Standard library only. Honours
TMPDIR; leaves no process behind. Rate limits are configured off: this measures capacity.
"""

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import incognitomail  # noqa: E402
# The tests' clients, not copies: one frame encoder and decoder, one upgrade request, one HTTP request.
from test_incognitomail import (PostfixInstance, addy_auth, bitwarden_headers, client_frame,  # noqa: E402
                                free_port, read_frame, request_bytes, upgrade_head)

DOMAIN = "incognito.test"
TARGET = "alice@mbox.test"
ACCOUNT_HANDLES = 10000
IDLE_CONNECTIONS = 10000
SEQUENTIAL_COUNT = 300
SEND_COUNT = 200
POSTMAP_RUNS = 20
EXPIRING = 10000            # pre-loaded handles that expire just before a sweep (step 8)
SWEEP_SAMPLE = 200          # of which this many are watched leave the map
SWEEP_PERIOD = 8.0          # SWEEP_SECONDS of the server restarted for step 8
EXPIRY_LEAD = 4             # they expire this long after that restart begins, before its sweep
POLL_SECONDS = 0.05
HTTP_DESCRIPTION = "Website: example.com. Generated by Bitwarden."


# -- a minimal WebSocket client, as the add-on uses it ----------------------------------------

async def ws_connect(port, source="127.0.0.1"):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=65536, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(upgrade_head("/incognitomail", Host="127.0.0.1:%d" % port, Sec_WebSocket_Key=key))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        raise RuntimeError("handshake refused: %r" % head.split(b"\r\n")[0])
    return reader, writer


async def ws_new_handle(port, token):
    """connect, ``new handle <secret>``, read the address, close: the add-on's whole visit."""
    reader, writer = await ws_connect(port)
    writer.write(client_frame(1, ("new handle " + token).encode()))
    reply = (await read_frame(reader))[1].decode()
    writer.write(client_frame(8, (1000).to_bytes(2, "big")))
    try:
        await asyncio.wait_for(reader.read(64), 2)
    except asyncio.TimeoutError:
        pass
    writer.close()
    if reply.startswith("error"):
        raise RuntimeError(reply)
    return reply


# -- an HTTP client, as Bitwarden's addy.io generator uses the API ------------------------------

async def http_new_handle(port, token):
    """connect, ``POST /api/v1/aliases``, read the reply until the server closes: a new TCP
    connection per request, as Bitwarden opens one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=65536)
    try:
        writer.write(request_bytes("POST", "/api/v1/aliases",
                                   bitwarden_headers(addy_auth(token)) + [("Connection", "close")],
                                   {"domain": DOMAIN, "description": HTTP_DESCRIPTION}, "127.0.0.1:%d" % port))
        head = await reader.readuntil(b"\r\n\r\n")
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        data = await (reader.readexactly(length) if length is not None else reader.read())
        try:
            await asyncio.wait_for(reader.read(64), 2)     # the server's close, as it said
        except asyncio.TimeoutError:
            pass
    finally:
        writer.close()
    status = int(head.split(None, 2)[1])
    if status != 201:
        raise RuntimeError("HTTP %d: %r" % (status, data[:300]))
    return json.loads(data)["data"]["email"]


# -- the server under test ------------------------------------------------------------------------

class Server:
    def __init__(self, config_path):
        self.config_path = config_path
        self.config = incognitomail.load_config(config_path)
        self.process = None
        self.log = None
        self.sweep_seconds = None       # set: started through a wrapper with SWEEP_SECONDS patched

    @property
    def log_path(self):
        return os.path.join(os.path.dirname(self.config_path), "server.log")

    def start(self):
        """Start and wait until the control socket answers; return seconds taken."""
        started = time.monotonic()
        self.log = open(self.log_path, "ab")
        if self.sweep_seconds is None:
            program = [os.path.join(os.path.dirname(HERE), "incognitomail.py")]
        else:
            program = ["-c", "import sys; sys.path.insert(0, %r); import incognitomail as im; "
                             "im.SWEEP_SECONDS = %r; sys.exit(im.main(sys.argv[1:]))"
                       % (os.path.dirname(HERE), float(self.sweep_seconds))]
        self.process = subprocess.Popen([sys.executable] + program + ["-c", self.config_path],
                                        stdout=self.log, stderr=self.log)
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
        if self.log is not None:
            self.log.close()
            self.log = None


def write_config(folder, mode, map_path, config_dir, ws_port, log_level="warning"):
    socketmap = "unix:%s/socketmap.sock" % folder if mode == "socketmap" else ""
    text = """[General]
UnixSockPath = run/control.sock
LockFilePath = run/server.lock
ListenAddress = 127.0.0.1:{ws_port}
LogLevel = {log_level}
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
""".format(ws_port=ws_port, log_level=log_level, socketmap=socketmap, domain=DOMAIN, config_dir=config_dir,
           map=("%s:%s" % (mode, map_path)) if mode != "socketmap" else map_path)
    path = os.path.join(folder, "incognitomail.ini")
    with open(path, "w") as f:
        f.write(text)
    return path


def preload(database_path, handles):
    """Fill a fresh database directly: N handles, of which two accounts hold 10,000 each and
    EXPIRING, spread over the rest, expire (in ten years: step 8 moves their time).

    The module's Store creates the database, so the schema is the one the server expects.
    Returns the tokens and the addresses of the handles that expire."""
    store = incognitomail.Store(database_path)
    tokens = {name: incognitomail.new_token() for name in ("new", "bulk", "list", "delete")}
    now = int(time.time()) - 86400
    later = now + 10 * 365 * 86400
    bulk = max(0, handles - 2 * ACCOUNT_HANDLES)
    every = max(1, bulk // EXPIRING)
    expiring = []
    insert = ("INSERT INTO handles (local, domain, account_id, created, expires, number) "
              "VALUES (?,?,?,?,?,?)")
    with store.transaction():
        ids = {name: store.add_account(TARGET, incognitomail.token_digest(token), now)
               for name, token in tokens.items()}
        plan = [("list", ACCOUNT_HANDLES), ("delete", ACCOUNT_HANDLES), ("bulk", bulk)]
        number = 0
        for name, count in plan:
            rows = []
            for i in range(count):
                number += 1
                # A bijection of the counter onto 64 bits, written as 16 hex digits: unique, handle-shaped.
                local = "%016x" % ((number * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
                expires = None
                if name == "bulk" and i % every == 0 and len(expiring) < EXPIRING:
                    expires = later
                    expiring.append("%s@%s" % (local, DOMAIN))
                rows.append((local, DOMAIN, ids[name], now, expires, i + 1))
                if len(rows) == 50000:
                    store.db.executemany(insert, rows)
                    rows = []
            store.db.executemany(insert, rows)
            store.db.execute("UPDATE accounts SET next_number = ? WHERE id = ?", (count + 1, ids[name]))
    store.close()
    return tokens, expiring


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


# -- the measurements ---------------------------------------------------------------------------------

async def sequential(port, token, count, visit=ws_new_handle):
    times = []
    for _ in range(count):
        started = time.perf_counter()
        await visit(port, token)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def concurrent(port, token, clients, seconds, visit=ws_new_handle):
    times = []
    deadline = time.monotonic() + seconds

    async def client():
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await visit(port, token)
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


def map_kind(mode):
    """The indexed map type Postfix reads in this mode (socketmap: the instance's own hash map)."""
    return "lmdb" if mode == "lmdb" else "hash"


def postmap_insert_ms(postfix, mode, folder, runs=POSTMAP_RUNS):
    """Median ms of ``postmap -c ETC -i TYPE:MAP`` with one line on stdin, against a copy of the
    map as it stands: what each batch's insert costs on this machine."""
    kind = map_kind(mode)
    suffix = ".lmdb" if kind == "lmdb" else ".db"
    probe = os.path.join(folder, "postmap-probe")
    os.makedirs(probe)
    try:
        shutil.copyfile(postfix.map_path + suffix, os.path.join(probe, "virtual" + suffix))
        command = [incognitomail.find_postfix_command("postmap"), "-c", postfix.config_dir, "-i",
                   "%s:%s" % (kind, os.path.join(probe, "virtual"))]
        times = []
        for number in range(runs):
            line = ("postmap-probe-%d@%s %s\n" % (number, DOMAIN, TARGET)).encode()
            started = time.perf_counter()
            done = subprocess.run(command, input=line, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=60)
            times.append((time.perf_counter() - started) * 1000)
            if done.returncode != 0:
                raise RuntimeError("postmap -i failed: %s" % done.stderr.decode(errors="replace").strip())
        return statistics.median(times)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def map_present(postfix, mode, keys):
    """How many of ``keys`` ``postmap -q`` finds in the benchmark's map (one postmap for all)."""
    done = subprocess.run([incognitomail.find_postfix_command("postmap"), "-c", postfix.config_dir,
                           "-q", "-", "%s:%s" % (map_kind(mode), postfix.map_path)],
                          input="".join(k + "\n" for k in keys).encode(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    if done.returncode not in (0, 1):
        raise RuntimeError("postmap -q failed: %s" % done.stderr.decode(errors="replace").strip())
    return sum(1 for line in done.stdout.splitlines() if line.strip())


def socketmap_present(path, keys):
    """How many of ``keys`` the server's socketmap answers OK (one connection, all at once)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(path)
        s.sendall(b"".join(incognitomail.netstring(b"virtual " + k.encode()) for k in keys))
        parser, replies = incognitomail.NetstringParser(), []
        while len(replies) < len(keys):
            data = s.recv(65536)
            if not data:
                raise RuntimeError("the socketmap closed after %d replies" % len(replies))
            replies += parser.feed(data)
    for reply in replies:
        if not reply.startswith((b"OK ", b"NOTFOUND")):
            raise RuntimeError("socketmap answered %r" % reply)
    return sum(1 for reply in replies if reply.startswith(b"OK "))


_SWEEP_LINE = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .* (\d+) handles expired\s*$", re.M)


class LogWatch:
    """New lines of the server's log from ``offset`` on: the first sweep line that reports
    expired handles, as (epoch seconds, count). The log's times are local, to the millisecond."""

    def __init__(self, path, offset):
        self.path, self.offset, self.sweep, self._rest = path, offset, None, b""

    def poll(self):
        if self.sweep is None:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
            self.offset += len(data)
            text, _, self._rest = (self._rest + data).rpartition(b"\n")
            match = _SWEEP_LINE.search(text)
            if match:
                when = time.mktime(time.strptime(match.group(1).decode(), "%Y-%m-%d %H:%M:%S"))
                self.sweep = (when + int(match.group(2)) / 1000.0, int(match.group(3)))
        return self.sweep


async def sweep_watch(port, token, present, samples, watch, sweep_due, give_up):
    """New handles one at a time over WebSocket while a thread polls the samples and the log;
    until the samples are all out, the sweep was logged and one more second passed (or, with
    no sweep logged, 5 s after both the samples were out and ``sweep_due``; or ``give_up``;
    epoch seconds). Returns the polls [(started, finished, present)] and the
    requests [(started, finished, ms)], times in epoch seconds."""
    polls, requests = [], []
    stop = threading.Event()        # set when the requests stop for any reason (SIGTERM too)

    def poll():
        all_out = None
        while time.time() < give_up and not stop.is_set():
            started = time.time()
            count = present(samples)
            polls.append((started, time.time(), count))
            sweep = watch.poll()
            if count == 0 and all_out is None:
                all_out = time.time()
            if all_out is not None and ((sweep is not None and time.time() >= sweep[0] + 1.0)
                                        or time.time() >= max(all_out, sweep_due) + 5.0):
                return
            time.sleep(POLL_SECONDS)
    poller = asyncio.get_running_loop().run_in_executor(None, poll)
    try:
        while not poller.done():
            started, clock = time.time(), time.perf_counter()
            await ws_new_handle(port, token)
            requests.append((started, time.time(), (time.perf_counter() - clock) * 1000))
    finally:
        stop.set()
    await poller
    return polls, requests


def sweep_phase(server, mode, postfix, folder, port, expiring, token):
    """Step 8: restart the server with a short sweep period, make the EXPIRING handles expire
    EXPIRY_LEAD s later (after the restart's own sweep, before its first periodic one), and
    watch the sweep take them out while new handles are asked for."""
    server.stop()
    config = server.config
    expire_at = int(time.time()) + EXPIRY_LEAD
    store = incognitomail.Store(config.database_path)
    with store.transaction():
        moved = store.db.execute("UPDATE handles SET expires = ? WHERE expires IS NOT NULL",
                                 (expire_at,)).rowcount
    store.close()
    write_config(folder, mode, postfix.map_path, postfix.config_dir, port, log_level="info")
    offset = os.path.getsize(server.log_path) if os.path.exists(server.log_path) else 0
    server.sweep_seconds = SWEEP_PERIOD
    started = time.time()
    server.start()
    samples = expiring[::max(1, len(expiring) // SWEEP_SAMPLE)][:SWEEP_SAMPLE]
    if mode == "socketmap":
        sock = os.path.join(folder, "socketmap.sock")
        present = lambda keys: socketmap_present(sock, keys)     # noqa: E731
    else:
        present = lambda keys: map_present(postfix, mode, keys)  # noqa: E731
    before = present(samples)
    if time.time() >= expire_at or before != len(samples):
        raise RuntimeError("sweep phase: %d of %d samples routable before their expiry (the restart "
                           "took too long?)" % (before, len(samples)))
    watch = LogWatch(server.log_path, offset)
    polls, requests = asyncio.run(sweep_watch(port, token, present, samples, watch,
                                              started + SWEEP_PERIOD, started + SWEEP_PERIOD + 40))
    sweep = watch.poll()
    swept_at, expired = sweep if sweep else (None, moved)
    after = [p for p in polls if p[0] >= expire_at]
    gone = next((p for p in after if p[2] == 0), None)
    first_out = next((p for p in after if p[2] < len(samples)), None)
    if mode == "socketmap":
        # No map file: an expired handle answers NOTFOUND as soon as its time has passed.
        start, measured_from = expire_at, "expiry time"
    elif swept_at is not None:
        start, measured_from = swept_at, "sweep log line"
    else:
        start, measured_from = (first_out[0] if first_out else None), "first sample gone"
    out_of_map = round(gone[1] - start, 3) if gone and start is not None else None
    window_start = swept_at if swept_at is not None else (first_out[0] if first_out else expire_at)
    window_end = max(gone[1] if gone else time.time(), window_start + 1.0)
    during = [ms for started, finished, ms in requests if finished >= window_start and started <= window_end]
    return {
        "expired": expired, "out_of_map_s": out_of_map, "measured_from": measured_from,
        "sampled": len(samples),
        "left_in_map": after[0][2] if mode == "socketmap" and after else (polls[-1][2] if polls else None),
        "swept_after_expiry_s": round(swept_at - expire_at, 3) if swept_at is not None else None,
        "new_handle_during_ms": {
            "median": round(statistics.median(during), 2) if during else None,
            "p99": round(percentile(during, 0.99), 2) if during else None,
            "max": round(max(during), 2) if during else None, "count": len(during)},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handles", type=int, default=100000, help="handles pre-loaded (default 100000)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients in step 2 (default 20)")
    parser.add_argument("--seconds", type=float, default=10, help="length of step 2 (default 10)")
    parser.add_argument("--mode", choices=("hash", "lmdb", "socketmap"), default="lmdb")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument("--server-log", metavar="FILE", help="keep a copy of the server's log in FILE")
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
        ws_port = free_port()
        config_path = write_config(folder, args.mode, postfix.map_path, postfix.config_dir, ws_port)
        server = Server(config_path)

        print("pre-loading %d handles ..." % args.handles, file=sys.stderr)
        started = time.monotonic()
        tokens, expiring = preload(server.config.database_path, args.handles)
        print("  %.1f s" % (time.monotonic() - started), file=sys.stderr)

        for path in (postfix.map_path, postfix.map_path + (".lmdb" if args.mode == "lmdb" else ".db")):
            if os.path.exists(path) and args.mode != "socketmap":
                os.unlink(path)
        start_missing = server.start()
        server.stop()
        insert_ms = postmap_insert_ms(postfix, args.mode, folder)
        print("postmap -i: median %.2f ms" % insert_ms, file=sys.stderr)
        start_in_step = server.start()
        rss_idle = server.rss_mb()
        print("started: map missing %.2f s, in step %.2f s" % (start_missing, start_in_step), file=sys.stderr)

        seq = asyncio.run(sequential(ws_port, tokens["new"], SEQUENTIAL_COUNT))
        http_seq = asyncio.run(sequential(ws_port, tokens["new"], SEQUENTIAL_COUNT, http_new_handle))
        print("sequential done (WebSocket, HTTP)", file=sys.stderr)
        conc, elapsed = asyncio.run(concurrent(ws_port, tokens["new"], args.clients, args.seconds))
        http_conc, http_elapsed = asyncio.run(concurrent(ws_port, tokens["new"], args.clients, args.seconds,
                                                         http_new_handle))
        print("concurrent done (WebSocket, HTTP)", file=sys.stderr)
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

        print("sweep of %d expiring handles ..." % len(expiring), file=sys.stderr)
        sweep = sweep_phase(server, args.mode, postfix, folder, ws_port, expiring, tokens["new"])

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
            "http": {"sequential_ms": {"median": round(statistics.median(http_seq), 2),
                                       "p99": round(percentile(http_seq, 0.99), 2)},
                     "concurrent": {"per_second": round(len(http_conc) / http_elapsed, 1),
                                    "median_ms": round(statistics.median(http_conc), 2),
                                    "p99_ms": round(percentile(http_conc, 0.99), 2)}},
            "postmap_insert_ms": round(insert_ms, 2),
            "sweep": sweep,
        }
        http = result["http"]
        during = sweep["new_handle_during_ms"]
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
            ("1h. sequential new handle, HTTP", "median %.2f ms, p99 %.2f ms" % (http["sequential_ms"]["median"],
                                                                                 http["sequential_ms"]["p99"])),
            ("2h. %d concurrent HTTP clients" % args.clients,
             "%.1f handles/s, median %.2f ms, p99 %.2f ms" % (http["concurrent"]["per_second"],
                                                             http["concurrent"]["median_ms"],
                                                             http["concurrent"]["p99_ms"])),
            ("7. postmap -i (%s%s), median of %d" % (map_kind(args.mode), ", empty map" if args.mode == "socketmap"
                                                    else "", POSTMAP_RUNS), "%.2f ms" % insert_ms),
            ("8. sweep of %s expired handles" % sweep["expired"],
             "%s %s s after the %s (%d sampled; %s left)%s; new handles meanwhile: median %s ms, p99 %s ms, "
             "max %s ms (%d requests)"
             % ("all answer NOTFOUND" if args.mode == "socketmap" else "out of the map",
                sweep["out_of_map_s"], sweep["measured_from"], sweep["sampled"], sweep["left_in_map"],
                "" if sweep["swept_after_expiry_s"] is None else
                "; swept %.2f s after they expired" % sweep["swept_after_expiry_s"],
                during["median"], during["p99"], during["max"], during["count"])),
        ]
        width = max(len(r[0]) for r in rows)
        for name, value in rows:
            print("%-*s  %s" % (width, name, value))
        ws_median, ws_rate = result["sequential_ms"]["median"], result["concurrent"]["per_second"]
        seq_ratio = http["sequential_ms"]["median"] / ws_median
        rate_ratio = http["concurrent"]["per_second"] / ws_rate
        median_target = 3.0 if args.mode == "socketmap" else 8.0
        targets = [
            ("HTTP sequential median <= 1.1x WebSocket's", "%.2f / %.2f ms = %.3fx"
             % (http["sequential_ms"]["median"], ws_median, seq_ratio), seq_ratio <= 1.1),
            ("HTTP concurrent >= 0.9x WebSocket's", "%.1f / %.1f per s = %.3fx"
             % (http["concurrent"]["per_second"], ws_rate, rate_ratio), rate_ratio >= 0.9),
            ("HTTP p99 <= 100 ms", "concurrent %.2f ms, sequential %.2f ms"
             % (http["concurrent"]["p99_ms"], http["sequential_ms"]["p99"]),
             max(http["concurrent"]["p99_ms"], http["sequential_ms"]["p99"]) <= 100),
            ("sweep: expired handles out within 2 s", "%s s" % sweep["out_of_map_s"],
             sweep["out_of_map_s"] is not None and sweep["out_of_map_s"] <= 2.0),
            ("sweep: new handle median <= %g ms, p99 <= 25 ms" % median_target,
             "%s / %s ms" % (during["median"], during["p99"]),
             during["median"] is not None and during["median"] <= median_target and during["p99"] <= 25),
        ]
        print()
        width = max(len(t[0]) for t in targets)
        for name, value, met in targets:
            print("%-*s  %-40s %s" % (width, name, value, "met" if met else "MISSED"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    finally:
        if server is not None:
            server.stop()
            if args.server_log and os.path.exists(server.log_path):
                shutil.copyfile(server.log_path, args.server_log)
        postfix.destroy()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

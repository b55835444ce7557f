#!/usr/bin/env python3
"""Benchmark the milter: what it costs Postfix to ask IncognitoMail about every message.

    python3 bench/bench_milter.py [--messages N] [--clients C] [--latency N] [--rounds R]
                                  [--handles H] [--socket inet|unix] [--json FILE]

One private Postfix on loopback (the tests' PostfixInstance) with two smtpd listeners that
differ in one thing: the second has ``smtpd_milters`` naming the daemon's milter (MilterListen:
``inet:127.0.0.1:PORT`` as README.md shows, or with ``--socket unix`` a unix socket in a
root:postfix 0750 folder); the first has none. The daemon (``incognitomail.py`` in its own
process, log level warning) serves H handles of four accounts whose targets are virtual
mailboxes of the instance; no policy service, so the milter is the only difference. Each
message goes to a random handle, from a sender outside, over a new SMTP connection, as mail
from the Internet arrives. Both listeners are measured in the same run, in alternating rounds:

1. throughput: N messages with C concurrent clients; accepted per second (from the first
   connection to the last 250 after DATA) and delivered per second (until the last is in its
   mailbox);
2. latency: N messages one at a time; each SMTP dialog, from connect to the 250 after DATA;
   the milter's added latency per message is the difference of the two listeners' p50 and
   p99;
3. the milter alone: a client playing Postfix over the milter socket (negotiation, macros,
   connect, MAIL, RCPT, DATA, six headers, end of message, the changes back; each command
   written on its own and answered as negotiated, without TCP_NODELAY, as Postfix does), one
   connection per message as Postfix opens one per SMTP session: p50 and p99 of that exchange.

The throughput rounds also take the CPU time per message of the whole machine and of the
daemon (/proc): where the messages per second go when the machine is busy.

Prints a table and the goal: with the milter, at least 0.8 x the messages per second without
it (delivered; accepted shown too), the median of the rounds' ratios: each round measures both
listeners one after the other, so a machine whose speed drifts (a virtual machine's stolen
time) skews a round's pair the least. ``--json FILE`` writes every figure. Needs root and Postfix
(apt-get install postfix postfix-lmdb). Standard library only; imports the tests' support
(test_incognitomail.py) as bench_incognitomail.py does. Leaves no process behind.
"""

import argparse
import json
import os
import random
import shutil
import smtplib
import socket
import statistics
import struct
import sys
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from test_incognitomail import (  # noqa: E402
    DaemonProcess, MilterClient, PostfixInstance, Site, free_port, make_folder, mta_macros,
    mta_packet, mta_strings, new_account, new_handle, postfix_folder, wait_until)

GOAL = 0.8
OWNERS = ("alice", "bob", "carol", "dave")
SENDER = "news@shop.example"


def cpu_seconds(pid=None):
    """CPU time (user and system) used so far by process ``pid``, or by the whole machine."""
    if pid is None:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:4]      # user, nice, system
    else:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()[11:13]     # utime, stime
    return sum(int(n) for n in fields) / os.sysconf("SC_CLK_TCK")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def message(handle, run, number):
    return ("From: Shop News <%s>\r\nTo: %s\r\nReply-To: help@shop.example\r\n"
            "Subject: bench %s %d\r\nMessage-ID: <%s.%d@shop.example>\r\nX-Bench: %s\r\n\r\n"
            "Hello %d\r\n" % (SENDER, handle, run, number, run, number, run, number)).encode()


class Bench:
    """The instance, the daemon and the handles."""

    def __init__(self, handles, kind="inet"):
        self.folder, self.daemon, self.pf = make_folder(prefix="bench-milter-"), None, None
        try:
            self._start(handles, kind)
        except BaseException:
            self.close()
            raise

    def _start(self, handles, kind):
        self.milter_port = free_port()
        if kind == "unix":
            self.milter_path = os.path.join(postfix_folder(os.path.join(self.folder, "run")), "milter.sock")
            self.endpoint = "unix:" + self.milter_path
        else:
            self.milter_path, self.endpoint = None, "inet:127.0.0.1:%d" % self.milter_port
        self.pf = PostfixInstance(os.path.join(self.folder, "pf"), users=OWNERS, extra_main_cf=[
            "recipient_delimiter = +", "propagate_unmatched_extensions = canonical",
            "milter_default_action = tempfail", "smtpd_client_connection_count_limit = 0",
            "smtpd_client_connection_rate_limit = 0", "default_process_limit = 200"])
        self.pf.create()
        self.milter_smtp_port = free_port()
        with open(os.path.join(self.pf.config_dir, "master.cf")) as f:
            master = f.read()
        self.pf._write("master.cf", master + "127.0.0.1:%d inet n - n - - smtpd -o smtpd_milters=%s\n"
                       % (self.milter_smtp_port, self.endpoint))
        self.pf.start()
        os.makedirs(os.path.join(self.folder, "site"))
        self.site = Site(os.path.join(self.folder, "site"), map_path=self.pf.map_path,
                         config_dir=self.pf.config_dir, domains="incognito.test", sections={
                             "General": {"MilterListen": self.endpoint, "LogLevel": "warning"}})
        self.daemon = DaemonProcess(self.site)
        self.daemon.start()
        if not wait_until(self._milter_up, timeout=30):
            raise SystemExit("bench: the milter never listened:\n%s" % self.daemon.log())
        self.handles = []
        for owner in OWNERS:
            token = new_account(self.site, self.pf.address(owner))
            self.handles += [new_handle(self.site, token) for _ in range(max(1, handles // 4))]
        time.sleep(1.1)         # the hash map's last change a second old: every process sees it

    def connect(self):
        """A connection to the milter, as Postfix opens one (no TCP_NODELAY)."""
        if self.milter_path is None:
            return MilterClient(self.milter_port)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(self.milter_path)
        except OSError:
            sock.close()
            raise
        return MilterClient(None, sock=sock)

    def _milter_up(self):
        try:
            self.connect().close()
            return True
        except OSError:
            return False

    def close(self):
        try:
            if self.daemon is not None:
                self.daemon.stop()
        finally:
            if self.pf is not None:
                self.pf.destroy()
            shutil.rmtree(self.folder, ignore_errors=True)

    def delivered(self, run):
        mark = ("X-Bench: %s" % run).encode()
        total = 0
        for owner in OWNERS:
            try:
                with open(os.path.join(self.pf.root_dir, "vmail", owner), "rb") as f:
                    total += f.read().count(mark)
            except FileNotFoundError:
                pass
        return total

    def send(self, port, handle, run, number):
        """One message on a new connection: its dialog's seconds, connect to the 250 after DATA."""
        started = time.perf_counter()
        client = smtplib.SMTP("127.0.0.1", port, local_hostname="mx.shop.example", timeout=60)
        try:
            client.sendmail(SENDER, [handle], message(handle, run, number))
            took = time.perf_counter() - started
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()
        return took

    def throughput(self, port, count, clients):
        """(accepted per second, delivered per second, CPU ms per message of the daemon and of
        the whole machine)."""
        run = uuid.uuid4().hex
        daemon_cpu, machine_cpu = cpu_seconds(self.daemon.proc.pid), cpu_seconds()
        numbers = iter(range(count))
        lock, failures = threading.Lock(), []

        def work():
            while True:
                with lock:
                    number = next(numbers, None)
                if number is None:
                    return
                try:
                    self.send(port, random.choice(self.handles), run, number)
                except (OSError, smtplib.SMTPException) as e:
                    failures.append(e)

        started = time.perf_counter()
        threads = [threading.Thread(target=work) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        accepted = time.perf_counter() - started
        if failures:
            raise SystemExit("bench: %d messages refused, e.g. %s" % (len(failures), failures[0]))
        if not wait_until(lambda: self.delivered(run) >= count, timeout=300, interval=0.05):
            raise SystemExit("bench: only %d of %d messages delivered:\n%s"
                             % (self.delivered(run), count, self.pf.maillog()[-2000:]))
        delivered = time.perf_counter() - started
        return (count / accepted, count / delivered,
                1000 * (cpu_seconds(self.daemon.proc.pid) - daemon_cpu) / count,
                1000 * (cpu_seconds() - machine_cpu) / count)

    def latencies(self, port, count):
        run = uuid.uuid4().hex
        took = [self.send(port, random.choice(self.handles), run, n) for n in range(count)]
        wait_until(lambda: self.delivered(run) >= count, timeout=300, interval=0.05)   # quiet again
        return took

    def milter_alone(self, count):
        """The daemon's milter for one message as Postfix asks it, connect to final reply."""
        took = []
        for number in range(count):
            handle = random.choice(self.handles)
            started = time.perf_counter()
            client = self.connect()
            try:
                client.negotiate()
                client.tell(mta_macros(b"C", _j="mail.incognito.test"))
                client.tell(mta_packet(b"C", b"mx.shop.example\x004\x9c\x40192.0.2.10\x00"))
                client.tell(mta_strings(b"M", "<%s>" % SENDER, "SIZE=300"))
                client.tell(mta_strings(b"R", "<%s>" % handle))
                client.data()
                for name, value in (("From", "Shop News <%s>" % SENDER), ("To", handle),
                                    ("Reply-To", "help@shop.example"), ("Subject", "bench %d" % number),
                                    ("Message-ID", "<%d@shop.example>" % number),
                                    ("Date", "Mon, 7 Dec 2026")):
                    client.tell(mta_strings(b"L", name, value))
                end = client.ask(mta_packet(b"E"))
                client.send(mta_packet(b"A") + mta_packet(b"Q"))
            finally:
                client.close()
            took.append(time.perf_counter() - started)
            assert [code for code, _ in end] == [b"e", b"m", b"m", b"c"], end
        return took


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=400, help="per round and listener")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency", type=int, default=200, help="sequential messages per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--handles", type=int, default=40)
    parser.add_argument("--socket", choices=("inet", "unix"), default="inet", help="MilterListen's kind")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("postfix", path=os.environ.get("PATH", "") + ":/usr/sbin"):
        raise SystemExit("bench: needs root and Postfix (apt-get install postfix postfix-lmdb)")
    bench = Bench(args.handles, args.socket)
    try:
        listeners = {"without": bench.pf.port, "with milter": bench.milter_smtp_port}
        for port in listeners.values():         # warm up: processes started, maps opened
            bench.throughput(port, 4 * args.clients, args.clients)
        rates = {name: [] for name in listeners}
        dialogs = {name: [] for name in listeners}
        for _ in range(args.rounds):
            for name, port in listeners.items():
                rates[name].append(bench.throughput(port, args.messages, args.clients))
                dialogs[name] += bench.latencies(port, args.latency)
        alone = bench.milter_alone(args.latency * args.rounds)
    finally:
        bench.close()
    result = {"messages": args.messages, "clients": args.clients, "rounds": args.rounds,
              "handles": len(bench.handles), "milter": bench.endpoint.split(":")[0]}
    for name in listeners:
        result[name] = {
            "accepted_per_second": statistics.median(r[0] for r in rates[name]),
            "delivered_per_second": statistics.median(r[1] for r in rates[name]),
            "cpu_ms_per_message": {"daemon": statistics.median(r[2] for r in rates[name]),
                                   "machine": statistics.median(r[3] for r in rates[name])},
            "dialog_ms": {"p50": 1000 * percentile(dialogs[name], 0.5),
                          "p99": 1000 * percentile(dialogs[name], 0.99)}}
    without, with_milter = result["without"], result["with milter"]
    result["added_ms"] = {p: with_milter["dialog_ms"][p] - without["dialog_ms"][p] for p in ("p50", "p99")}
    result["milter_alone_ms"] = {"p50": 1000 * percentile(alone, 0.5), "p99": 1000 * percentile(alone, 0.99)}
    # each round's two listeners ran one after the other, so a round's ratio is the fairest on a
    # machine whose speed drifts (a virtual machine's stolen time); the goal takes their median
    paired = list(zip(rates["without"], rates["with milter"]))
    result["ratio_per_round"] = {key: [w[index] / o[index] for o, w in paired] for index, key in
                                 enumerate(("accepted_per_second", "delivered_per_second"))}
    result["ratio"] = {key: statistics.median(ratios)
                       for key, ratios in result["ratio_per_round"].items()}
    report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["ratio"]["delivered_per_second"] >= GOAL else 1


def report(result):
    print("%d messages x %d rounds, %d clients, %d handles; a new SMTP connection per message; "
          "MilterListen %s:" % (result["messages"], result["rounds"], result["clients"], result["handles"],
                                 result["milter"]))
    print("%-14s %14s %14s %14s %14s %18s" % ("", "accepted/s", "delivered/s", "dialog p50 ms",
                                              "dialog p99 ms", "CPU ms/message"))
    for name in ("without", "with milter"):
        row = result[name]
        print("%-14s %14.0f %14.0f %14.1f %14.1f %9.2f (%.2f)" % (
            name, row["accepted_per_second"], row["delivered_per_second"], row["dialog_ms"]["p50"],
            row["dialog_ms"]["p99"], row["cpu_ms_per_message"]["machine"],
            row["cpu_ms_per_message"]["daemon"]))
    print("%-14s %14.2f %14.2f   (the median of the rounds': delivered %s)" % (
        "ratio", result["ratio"]["accepted_per_second"], result["ratio"]["delivered_per_second"],
        " ".join("%.2f" % r for r in result["ratio_per_round"]["delivered_per_second"])))
    print("\nthe milter's added latency per message (dialog with minus without): p50 %.1f ms, "
          "p99 %.1f ms" % (result["added_ms"]["p50"], result["added_ms"]["p99"]))
    print("the milter alone (a client playing Postfix, one connection per message): p50 %.2f ms, "
          "p99 %.2f ms" % (result["milter_alone_ms"]["p50"], result["milter_alone_ms"]["p99"]))
    print("CPU ms/message: the whole machine's while the messages were sent and delivered (in "
          "brackets: the daemon's)")
    met = result["ratio"]["delivered_per_second"] >= GOAL
    print("\ngoal: with the milter at least %.1f x the messages per second without it: %.2f x, %s"
          % (GOAL, result["ratio"]["delivered_per_second"], "met" if met else "NOT met"))


if __name__ == "__main__":
    sys.exit(main())

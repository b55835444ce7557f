"""IncognitoMail's specification, as tests.

Run from the repository's folder:

    python3 -m unittest -v test_incognitomail

Standard library only, but for the mail lab's verifier (dkimpy, pyspf). Each TestCase class
is one capability; each test's name states the behaviour it checks. The file mirrors the
module: first the test support, one helper per action (new_account, new_handle, listed,
handles_of, run_cli, make_site, seed_account, start_daemon, ...), the clients and the base
TestCases; then one banner per section of incognitomail.py, in the module's order, holding the
classes that specify that section. Data only one class uses sits just above it. Read them top
to bottom:

    Test support            what the tests need (Postfix, openssl, Chromium); temp folders, sites,
                            times, waiting; the module in-process (ServiceFixture) and in
                            subprocesses (run_cli, DaemonProcess, MovedClockDaemon); a private
                            Postfix; the WebSocket, Postfix (policy, socketmap, milter),
                            command-line and HTTP clients (one frame encoder and decoder, which
                            bench/ imports too); a mail lab (sender, forwarder, receiver, a DNS
                            table, a receiver's SPF/DKIM/DMARC verifier); the servers and
                            daemons the clients talk to (base TestCases); headless Chromium
    Errors and OS helpers   SymlinkTest, PrivateFilesTest
    Configuration           ConfigurationTest, DocumentedKeysTest, ListenAddressTest, ExampleConfigTest
    Names and secrets       TokensAndHandleNamesTest, AddressValidationTest, LabelCharactersTest,
                            MilterAddressesTest
    Store                   StoreTest, StoreQueryPlanTest
    Postfix                 MapFileTest, LmdbMapFileTest, HashVisibilityTest, ReconcileTest,
                            RollbackTest; with a real Postfix: EndToEndDeliveryTest,
                            CreateThenSendHashTest, CreateThenSendLmdbTest
    Service                 NewHandleNamesTest, ServiceBatchingTest, PruneTest; handles that end by
                            themselves: HandleExpiryTest, HandleLifetimeDefaultTest,
                            LifetimeInputTest, PruneExpiredHandlesTest
    Operations (the Gate)   TokenBucketTest, WrongTokenLimitTest, HandleLifetimeFrontEndsTest
    Wire formats            JsonRequestFormatTest, JsonNonNumbersTest; PolicyProtocolTest,
                            SocketmapProtocolTest; MilterParserTest, MilterEncodersTest;
                            ParseRequestTest, CheckUpgradeTest, ResponsesTest, HttpParserTest;
                            FrameParserMessagesTest ... UnmaskTest; RouteApiTest,
                            ClientRequestsRouteTest, ApiAliasShapeTest, ApiErrorTest (byte
                            strings only, except JsonNonNumbersTest)
    Fronts: shared pieces   ClientKeyTest, StreamClientCapsTest, IdleStreamClientsTest
    Fronts: connections     WebSocketEchoTest ... HttpConnectionDeadlineTest (loopback sockets);
                            PipeliningTest, UnreadRepliesTest
    Fronts: web listener    the WebSocket: WebSocketListeningTest ... RealBrowserTest; the HTTP API:
                            HttpKeepAliveTest ... BrowserApiDeliveryTest (BulkAndClientsLiveTest:
                            bulk routes, sorting, account totals); TLS, descriptors and
                            proxies: TlsConnectionLimitTest ... ClientAddressTest
    Fronts: Postfix         the milter's session with byte strings: MilterSessionTest (a fake
                            front); the daemon's milter over a socket (and miltertest):
                            MilterListenerTest; PolicyCountingTest, BurnerAndBlockedCountsTest,
                            RefuseAsUnknownTest; with a real Postfix:
                            PolicyServiceTest, HandleLifetimeDeliveryTest, SocketmapTest,
                            SocketmapExpiryTest; a mail lab of three Postfix instances (dkimpy,
                            pyspf): DeliverabilityTest, DeliverabilityWithoutReplyAddressesTest
    Fronts: control socket  ControlSocketAccessTest
    Daemon                  DaemonLifecycleTest
    Command line            CommandLineTest, BulkExportImportBackupTest, BackupRestoreTest,
                            FirstUseTest, WireCommandTest, StatusWhenStoppedTest,
                            CheckCommandTest, MilterCheckTest, LoggingTest
    Data: the owner page    OwnerPageEndToEndTest ... OwnerPageOpenPartsLookTest (headless
                            Chromium)

Postfix: tests that need ``postmap`` (and, for a private running instance on loopback,
root) skip when it is missing, unless ``INCOGNITOMAIL_REQUIRE_POSTFIX`` is set: then they
fail instead (CI sets it). The same holds for Debian's ``miltertest`` and for PyPI's dkimpy and
pyspf (the mail lab's verifier), the only packages beyond the standard library. A private
instance never touches /etc/postfix/main.cf or port 25.
Every instance and daemon a test starts is stopped by that test (or its class); one still
running when the module ends is stopped, and the run fails naming it (tearDownModule).
"""

import asyncio
import base64
import calendar
import collections
import email.header
import email.utils
import errno
import grp
import hashlib
import http.server
import io
import json
import logging
import os
import re
import resource
import secrets
import select
import shutil
import signal
import smtplib
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.parse
import urllib.request
import uuid
import warnings
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = os.path.join(HERE, "incognitomail.py")
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import incognitomail as im  # noqa: E402

REQUIRE_POSTFIX_VARIABLE = "INCOGNITOMAIL_REQUIRE_POSTFIX"
BROWSER_VARIABLE = "INCOGNITOMAIL_REQUIRE_BROWSER"
SCREENSHOTS_VARIABLE = "INCOGNITOMAIL_SCREENSHOTS"
NOBODY_UID = 65534
# A Python that user nobody may run (this one may live under /root): the system's.
OTHER_USERS_PYTHON = "/usr/bin/python3"


###############################################################################
# Test support: Postfix, openssl and Chromium: skip without them, or fail when they are required
###############################################################################

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _which(name):
    """A Postfix program even when PATH lacks the sbin folders; None if absent."""
    path = shutil.which(name)
    if path:
        return path
    for folder in _SBIN_DIRS:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _backdate(*paths):
    """Postfix re-reads a main.cf (or texthash: file) younger than ~2 s for ~2 s: back-date it."""
    then = time.time() - 60
    for path in paths:
        if os.path.exists(path):
            os.utime(path, (then, then))


_map_types_cache = None


def supported_map_types():
    """``postconf -m`` against an empty config folder (/etc/postfix/main.cf may be absent)."""
    global _map_types_cache
    if _map_types_cache is None:
        _map_types_cache = set()
        postconf = _which("postconf")
        if postconf:
            folder = tempfile.mkdtemp(prefix="incognitomail-test-maps-")
            try:
                open(os.path.join(folder, "main.cf"), "w").close()
                _backdate(os.path.join(folder, "main.cf"))
                done = subprocess.run([postconf, "-c", folder, "-m"], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
                if done.returncode == 0:
                    _map_types_cache = set(done.stdout.split())
            finally:
                shutil.rmtree(folder, ignore_errors=True)
    return _map_types_cache


def require(condition, problem):
    """Skip when ``condition`` is false, or fail when INCOGNITOMAIL_REQUIRE_POSTFIX is set."""
    if condition:
        return
    if os.environ.get(REQUIRE_POSTFIX_VARIABLE):
        raise AssertionError("%s, and %s is set, so this fails instead of skipping" % (problem, REQUIRE_POSTFIX_VARIABLE))
    raise unittest.SkipTest(problem)


def require_root_tools(*programs):
    """Root, and the given programs (e.g. runuser, /usr/bin/python3 for another user)."""
    require(os.geteuid() == 0, "acting as another user needs root")
    for program in programs:
        path = program if os.path.isabs(program) else _which(program)
        require(path and os.access(path, os.X_OK), "%s is not installed" % program)


def require_postfix(instance=False, map_type="hash"):
    """Skip (or, with INCOGNITOMAIL_REQUIRE_POSTFIX set, fail) when Postfix can't be used.

    ``instance=False``: postmap and postconf are enough. ``instance=True``: a private
    running Postfix, which needs the postfix command and root.
    """
    problem = None
    for program in ("postmap", "postconf") + (("postfix",) if instance else ()):
        if not _which(program):
            problem = "Postfix's %s is not installed (apt-get install postfix postfix-lmdb)" % program
            break
    if problem is None and instance and os.geteuid() != 0:
        problem = "a private Postfix instance needs root"
    if problem is None and map_type not in supported_map_types():
        problem = "Postfix lacks the %s map type (apt-get install postfix-%s)" % (map_type, map_type)
    require(problem is None, problem)


def require_openssl():
    require(shutil.which("openssl"), "openssl is not installed")


def require_chromium():
    """Chromium's path; skip without it, or fail when INCOGNITOMAIL_REQUIRE_BROWSER is set."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        if os.environ.get(BROWSER_VARIABLE):
            raise AssertionError("chromium is not installed, and %s is set" % BROWSER_VARIABLE)
        raise unittest.SkipTest("chromium is not installed (apt-get install chromium)")
    return chromium


###############################################################################
# Test support: temp folders, configuration files, sites, times, waiting
###############################################################################

def make_folder(testcase=None, prefix="incognitomail-test-"):
    """A temp folder every user may traverse (Postfix's daemons run as postfix and nobody)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    os.chmod(folder, 0o755)
    if testcase is not None:
        testcase.addCleanup(shutil.rmtree, folder, True)
    return folder


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def write_ini(path, sections):
    """Write an INI file from {section: {key: value}}; a value of None leaves the key out."""
    lines = []
    for section, keys in sections.items():
        lines.append("[%s]" % section)
        lines += ["%s = %s" % (key, value) for key, value in keys.items() if value is not None]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def minimal_ini_sections(folder):
    """A valid configuration (no Postfix needed to load it)."""
    return {
        "General": {"UnixSockPath": "run/incognitomail.sock", "LockFilePath": "run/incognitomail.lock",
                    "ListenAddress": ""},
        "Persistence": {"Type": "sqlite", "DatabasePath": "incognitomail.sqlite3"},
        "PostfixConfig": {"Domain": "incognito.test", "MapFilePath": "virtual"},
    }


def minimal_config_file(folder, **sections):
    """A valid configuration file in ``folder`` (no Postfix needed to load it), with the keys
    of ``sections`` ({key: value} by section name) added or changed; its path."""
    ini = minimal_ini_sections(folder)
    for section, keys in sections.items():
        ini.setdefault(section, {}).update(keys)
    path = os.path.join(folder, "incognitomail.ini")
    write_ini(path, ini)
    return path


def write_postfix_config_dir(folder, main_cf=""):
    """A folder with a main.cf and an empty master.cf, enough for postmap -c and postconf -c."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "main.cf")
    with open(path, "w") as f:
        f.write(main_cf)
    open(os.path.join(folder, "master.cf"), "w").close()
    _backdate(path)
    return folder


class Site:
    """One installation in a folder: config file, database, map and Postfix config dir.

    By default the map is ``FOLDER/postfix/virtual`` with its own minimal main.cf in
    ``FOLDER/postfix`` (all postmap needs); give ``map_path``/``config_dir`` to use a
    private Postfix instance's. ``sections`` overrides or adds keys: {section: {key: value}}.
    """

    def __init__(self, folder, map_type="hash", map_path=None, config_dir=None,
                 domains="incognito.test, @other.test", sections=None, admin_lines=None):
        self.folder = folder
        if config_dir is None:
            config_dir = write_postfix_config_dir(os.path.join(folder, "postfix"))
        if map_path is None:
            map_path = os.path.join(config_dir, "virtual")
        if admin_lines is not None:
            with open(map_path, "wb") as f:
                f.write(admin_lines)
        self.config_path = os.path.join(folder, "incognitomail.ini")
        ini = {
            "General": {"UnixSockPath": "run/incognitomail.sock", "LockFilePath": "run/incognitomail.lock",
                        "ListenAddress": "", "LogLevel": "info"},
            "Persistence": {"DatabasePath": "incognitomail.sqlite3"},
            "PostfixConfig": {"Domain": domains, "MapFilePath": "%s:%s" % (map_type, map_path),
                              "ConfigDir": config_dir},
        }
        for section, keys in (sections or {}).items():
            ini.setdefault(section, {}).update(keys)
        write_ini(self.config_path, ini)
        self.config = im.load_config(self.config_path)

    @classmethod
    def from_config_file(cls, config_path):
        """A site for a configuration file written elsewhere (e.g. the shipped example)."""
        site = cls.__new__(cls)
        site.folder, site.config_path = os.path.dirname(config_path), config_path
        site.config = im.load_config(config_path)
        return site

    @property
    def map_path(self):
        return self.config.map_file_path

    @property
    def indexed_path(self):
        return self.map_path + (".lmdb" if self.config.map_type == "lmdb" else ".db")

    @property
    def socket_path(self):
        return self.config.unix_sock_path

    def map_text(self):
        with open(self.map_path, "rb") as f:
            return f.read()

    def our_lines(self):
        """The map's lines below IncognitoMail's marker, as a set of str."""
        text = self.map_text()
        self_part = text.split(im.MAP_MARKER, 1)[1] if im.MAP_MARKER in text else b""
        return set(line for line in self_part.decode().splitlines() if line.strip())

    def postmap(self, *args, stdin=None):
        """Run the real postmap with this site's config dir."""
        command = [_which("postmap"), "-c", self.config.postfix_config_dir] + list(args)
        return subprocess.run(command, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)

    def query(self, key):
        """What Postfix sees for ``key``: ``postmap -q``; None when absent."""
        done = self.postmap("-q", key, "%s:%s" % (self.config.map_type, self.map_path))
        if done.returncode == 0:
            return done.stdout.strip()
        if done.returncode == 1:
            return None
        raise AssertionError("postmap -q failed: %s" % done.stderr)


def make_site(testcase, **kwargs):
    """A Site in a temp folder of its own, removed when the test ends."""
    return Site(make_folder(testcase), **kwargs)


def socketmap_site(testcase, **kwargs):
    """A site whose Service needs no Postfix at all (SocketmapListen: nothing is written)."""
    folder = make_folder(testcase)
    sections = {"General": {"SocketmapListen": "unix:run/socketmap.sock"}}
    for section, keys in kwargs.pop("sections", {}).items():
        sections.setdefault(section, {}).update(keys)
    return Site(folder, config_dir="", map_path=os.path.join(folder, "virtual"), sections=sections, **kwargs)


def policy_page_site(testcase, **limits):
    """A site serving the page with the policy service on ``testcase.policy_port`` (message
    limits need it; ask_policy tells what it answers), needing no Postfix."""
    sections = testcase.listen_sections(**limits)
    testcase.policy_port = free_port()
    sections["General"]["PolicyListen"] = "inet:127.0.0.1:%d" % testcase.policy_port
    return socketmap_site(testcase, sections=sections)


# An admin's own lines in the map file: odd bytes, CRLF, tabs, blank and continued lines.
ADMIN_LINES = (b"# the admin's own aliases: caf\xe9 in latin-1, \xf0\x9f\x93\xab in UTF-8\r\n"
               b"postmaster@incognito.test\troot@example.org\n"
               b"\n"
               b"   # an indented comment\n"
               b"sales@incognito.test   alice@example.org,\n"
               b"\tbob@example.org\n"
               b"info@other.test carol@example.org\n")


def failing_postmap_folder(testcase, mode="fail-when-flagged"):
    """A folder holding a ``postmap`` that fails (or is slow) while a flag file exists.

    Put it first in PATH: incognitomail finds postmap through PATH (find_postfix_command).
    Returns (folder, fail_flag, slow_flag); the flags start absent, except with
    ``mode="always-fail"``. A slow postmap touches ``slow_flag + ".started"`` first.
    """
    folder = make_folder(testcase, prefix="incognitomail-test-bin-")
    fail_flag, slow_flag = os.path.join(folder, "fail"), os.path.join(folder, "slow")
    script = os.path.join(folder, "postmap")
    with open(script, "w") as f:
        f.write("#!/bin/sh\n"
                "if [ -e %s ]; then echo 'postmap: fatal: simulated failure for a test' >&2; exit 75; fi\n"
                "if [ -e %s ]; then touch %s.started; sleep 1; fi\n"
                "exec %s \"$@\"\n" % (fail_flag, slow_flag, slow_flag, _which("postmap") or "/usr/sbin/postmap"))
    os.chmod(script, 0o755)
    if mode == "always-fail":
        open(fail_flag, "w").close()
    return folder, fail_flag, slow_flag


def plant_victim(testcase, mode=0o640):
    """A file the daemon must never write: (path, its bytes, its mode)."""
    path = os.path.join(make_folder(testcase, prefix="incognitomail-test-victim-"), "victim")
    content = b"root:precious:0:0\n"
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, mode)
    return path, content, mode


def postfix_folder(path):
    """A folder for the daemon's Postfix-facing sockets, as README.md says: root:postfix 0750."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    os.chown(path, 0, grp.getgrnam("postfix").gr_gid)
    os.chmod(path, 0o750)
    return path


def path_with(folder):
    return folder + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.02):
    """Poll ``predicate`` until it returns something true; return that, or the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


DAY = 86400
T0 = 1700000000.0           # 2023-11-14T22:13:20Z: the in-process clocks start here


def from_iso(text):
    """``2026-11-25T01:27:23Z`` -> seconds since the epoch."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


###############################################################################
# Test support: the module in-process and in subprocesses (command line, daemon)
###############################################################################

# The module runs in subprocesses as ``python3 -m incognitomail`` from HERE: the same program
# as ``python3 incognitomail.py``, but its bytecode is compiled once for the whole run instead
# of once in each of several hundred processes (a script is never cached). The bytecode goes
# to a temp folder (PYTHONPYCACHEPREFIX), never beside the module; tearDownModule removes it.
_pycache_folder = None


def module_command(*argv):
    return [sys.executable, "-m", "incognitomail"] + list(argv)


def module_env(env=None):
    """``env`` (default: ours) for a process running the module."""
    global _pycache_folder
    if _pycache_folder is None:
        _pycache_folder = tempfile.mkdtemp(prefix="incognitomail-test-pycache-")
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = _pycache_folder
    return env


def run_module(*argv, input=None, env=None, timeout=120):
    """``python3 incognitomail.py ARGV...`` -> CompletedProcess with text stdout and stderr."""
    return subprocess.run(module_command(*argv), input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=module_env(env),
                          timeout=timeout, cwd=HERE)


def cli(site, *args, **kwargs):
    """The command line against ``site``: ``incognitomail.py -c CONFIG ARGS...``."""
    return run_module("-c", site.config_path, *args, **kwargs)


def run_cli(testcase, site, *args, input=None, rc=0):
    """The command line against ``site`` as a step of a test: it must exit with status ``rc``
    and without a traceback; the CompletedProcess."""
    done = cli(site, *args, input=input)
    testcase.assertEqual(done.returncode, rc, "%s -> stdout %r, stderr %r" % (args, done.stdout, done.stderr))
    testcase.assertNotIn("Traceback", done.stderr)
    return done


def tuned_command(constants, *argv):
    """The module's command line, with module constants set first (a shortened timeout, a
    smaller cap): ``python3 -c "import incognitomail as im; im.X = ...; im.main(...)" ARGV``."""
    settings = "".join("im.%s = %r; " % item for item in sorted(constants.items()))
    program = "import sys, incognitomail as im; %ssys.exit(im.main(sys.argv[1:]))" % settings
    return [sys.executable, "-c", program] + list(argv)


_LIVE_DAEMONS = set()       # every DaemonProcess started and not yet stopped


class DaemonProcess:
    """``python3 incognitomail.py -c CONFIG`` in the background, its stderr in a file; with
    ``constants``, module constants are set before it runs (see tuned_command)."""

    def __init__(self, site, env=None, preexec_fn=None, constants=None):
        self.site = site
        self.env = env
        self.preexec_fn = preexec_fn
        self.constants = dict(constants or {})
        self.proc = None
        self.log_path = None
        self._log_file = None
        self.returncode = None

    def command(self):
        if self.constants:
            return tuned_command(self.constants, "-c", self.site.config_path)
        return module_command("-c", self.site.config_path)

    def start(self, wait=True):
        number = len([n for n in os.listdir(self.site.folder) if n.startswith("daemon-")])
        self.log_path = os.path.join(self.site.folder, "daemon-%d.log" % number)
        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._log_file, env=module_env(self.env), cwd=HERE,
                                     preexec_fn=self.preexec_fn)
        self.returncode = None
        _LIVE_DAEMONS.add(self)
        if wait:
            self.wait_ready()
        return self

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, timeout=30):
        """Until the control socket accepts connections; fail with the log if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._finished()
                raise AssertionError("the daemon exited with %s before it was ready:\n%s"
                                     % (self.proc.returncode, self.log()))
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.site.socket_path)
                return
            except OSError:
                time.sleep(0.01)
        raise AssertionError("the daemon was not ready within %d s:\n%s" % (timeout, self.log()))

    def wait_serving(self, timeout=30):
        """Until every listener is up: the control socket is up before the others."""
        self.wait_ready(timeout)
        if not wait_until(lambda: " serving " in self.log() or self.proc.poll() is not None,
                          timeout):
            raise AssertionError("the daemon never logged that it serves:\n%s" % self.log())
        if self.proc.poll() is not None:
            self._finished()
            raise AssertionError("the daemon exited with %s:\n%s" % (self.returncode, self.log()))
        return self

    def wait_exit(self, timeout=30):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._finished()
            raise AssertionError("the daemon did not exit within %d s:\n%s" % (timeout, self.log()))
        self._finished()
        return self.returncode

    def send_signal(self, signum):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, signum=signal.SIGTERM, timeout=30):
        """Stop it (SIGTERM) and return its exit status; a no-op when it has exited."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.wait_exit(timeout)

    def kill(self):
        return self.stop(signal.SIGKILL)

    def _finished(self):
        self.returncode = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        _LIVE_DAEMONS.discard(self)

    def log(self):
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


# ``python3 -c CODE -c CONFIG CLOCK_FILE SWEEP_SECONDS FLUSH_SECONDS``: the daemon with a clock
# that is time.time() plus the seconds in CLOCK_FILE, sweeping what expired every SWEEP_SECONDS
# and writing the policy service's counts every FLUSH_SECONDS.
_MOVED_CLOCK_DAEMON = """\
import sys, time
import incognitomail as im
config_path, clock_path, sweep_seconds, flush_seconds = sys.argv[2:6]
im.SWEEP_SECONDS = float(sweep_seconds)
im.RECEIVED_FLUSH_SECONDS = float(flush_seconds)


def clock():
    with open(clock_path) as f:
        return time.time() + float(f.read() or 0)


config = im.load_config(config_path)
im.setup_logging(config)
im.Daemon(config, clock=clock).run()
"""


class MovedClockDaemon(DaemonProcess):
    """A DaemonProcess whose clock is ahead (or behind) by an offset the test sets.

    The offset lives in ``SITE/clock-offset``, so a daemon started again on the same site
    keeps the moved clock. ``sweep_seconds`` replaces SWEEP_SECONDS (60 s), ``flush_seconds``
    RECEIVED_FLUSH_SECONDS.
    """

    def __init__(self, site, env=None, sweep_seconds=0.2, flush_seconds=im.RECEIVED_FLUSH_SECONDS):
        super().__init__(site, env=env)
        self.clock_path = os.path.join(site.folder, "clock-offset")
        self.sweep_seconds, self.flush_seconds = sweep_seconds, flush_seconds
        if not os.path.exists(self.clock_path):
            self.set_offset(0)

    def set_offset(self, seconds):
        """Replaced atomically: the daemon never reads half a number."""
        with open(self.clock_path + ".tmp", "w") as f:
            f.write(repr(float(seconds)))
        os.replace(self.clock_path + ".tmp", self.clock_path)

    def offset(self):
        with open(self.clock_path) as f:
            return float(f.read() or 0)

    def now(self):
        """The daemon's time."""
        return time.time() + self.offset()

    def move_clock_to(self, when):
        self.set_offset(when - time.time())

    def command(self):
        return [sys.executable, "-c", _MOVED_CLOCK_DAEMON, "-c", self.site.config_path,
                self.clock_path, str(self.sweep_seconds), str(self.flush_seconds)]


def open_file_limit(soft, hard):
    """A preexec_fn: the daemon starts with RLIMIT_NOFILE (soft, hard)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start_daemon(testcase, site, kind=DaemonProcess, wait=True, **options):
    """A daemon (a DaemonProcess, or a ``kind`` of it, with its ``options``) serving ``site``
    until the test ends; with ``wait=False``, not waited for (a start expected to fail)."""
    daemon = kind(site, **options)
    testcase.addCleanup(daemon.stop)
    return daemon.start(wait)


def failed_start(testcase, site, **options):
    """A start of the daemon that must fail: it exits with status 1, without a traceback; its
    log."""
    daemon = start_daemon(testcase, site, wait=False, **options)
    testcase.assertEqual(daemon.wait_exit(), 1, daemon.log())
    testcase.assertNotIn("Traceback", daemon.log())
    return daemon.log()


def control(site, op, **fields):
    """Set-up and checks through the control socket, in-process (as the command line asks),
    not the command line under test: the server's reply."""
    return im.ControlClient(site.config).request(op, **fields)


def new_account(site, address="alice@example.org"):
    """A new account's token (set-up, through the control socket)."""
    return control(site, "new_account", address=address)["token"]


def new_handle(site, token, **fields):
    """A new handle's address (set-up, through the control socket)."""
    return control(site, "new_handle", token=token, **fields)["handle"]["address"]


def handles_of(site, token):
    """The account's handles as the server lists them (one page, up to 100, through the control
    socket: quick enough to poll): {address: handle}, newest first."""
    return {h["address"]: h for h in control(site, "list_handles", token=token)["handles"]}


def listed(testcase, site, token):
    """The account's handles as the command line lists them (``list --json``): {address:
    handle}, newest first."""
    return {h["address"]: h for h in json.loads(run_cli(testcase, site, "--json", "list", token).stdout)}


def wait_counted(testcase, site, token, address, received=0, blocked=0):
    """Until the handle's counts of received and blocked messages reach these (the policy
    service writes them about once a second); the handle."""
    def handle():
        return handles_of(site, token)[address]
    counted = wait_until(lambda: handle()["received"] >= received and handle()["blocked"] >= blocked,
                         timeout=15, interval=0.05)
    testcase.assertTrue(counted, "never counted %d received, %d blocked: %s" % (received, blocked, handle()))
    return handle()


def seed_account(site, handles=(), address="alice@example.org", token=None):
    """An account and its handles written straight into the database (before the daemon
    starts, or beside it); its token, ``token`` or a new one. Each handle is a dict of columns
    (local, domain and created needed; see numbered_handles)."""
    token = token or im.new_token()
    columns = ("account_id", "local", "domain", "label", "created", "enabled", "received",
               "last_received", "blocked", "last_blocked", "expires", "max_messages")
    store = im.Store(site.config.database_path)
    try:
        with store.transaction():
            account_id = store.add_account(address, im.token_digest(token), time.time())
            defaults = dict.fromkeys(columns)
            defaults.update(account_id=account_id, enabled=1, received=0, blocked=0)
            columns += ("number",)
            handles = list(handles)
            store.db.executemany(
                "INSERT INTO handles (%s) VALUES (%s)" % (", ".join(columns),
                                                          ", ".join(":" + c for c in columns)),
                (dict(defaults, number=number, **handle) for number, handle in enumerate(handles, 1)))
            store.db.execute("UPDATE accounts SET next_number = ? WHERE id = ?",
                             (len(handles) + 1, account_id))
    finally:
        store.close()
    return token


def set_seeded_columns(site, local, **columns):
    """Columns of a seeded handle that seed_account leaves as they start (bounced, sent,
    refuse_as_unknown), written straight into the database before the daemon starts."""
    store = im.Store(site.config.database_path)
    try:
        with store.transaction():
            store.db.execute("UPDATE handles SET %s WHERE local = ?" % ", ".join(
                "%s = ?" % name for name in columns), tuple(columns.values()) + (local,))
    finally:
        store.close()


def numbered_handles(count, domain="incognito.test", **columns):
    """``count`` handles for seed_account, seed000000000000 on, made now, with ``columns``."""
    now = int(time.time())
    return [dict(columns, local="seed%012d" % number, domain=domain, created=now) for number in range(count)]


class ServiceFixture:
    """An in-process Service on a site, reached through its gate, with an injectable clock."""

    def __init__(self, testcase, site, clock=time.time):
        self.site = site
        self.clock = clock
        self.store = im.Store(site.config.database_path)
        self.table = im.make_table(site.config)
        self.service = im.Service(site.config, self.store, self.table, clock=clock)
        self.gate = im.Gate(site.config, self.service, clock)
        self.stopped = False
        testcase.addCleanup(self.close)

    def start(self):
        self.service.start()
        return self

    def submit(self, operation, **fields):
        """The operation, as the first front end allowed to call it asks: a Future of its result."""
        checked = self.gate.check(im.OPERATIONS[operation].callers[0], operation, fields)
        return self.gate.submit(*checked)

    def result(self, operation, **fields):
        return self.submit(operation, **fields).result(30)

    def call(self, operation, **fields):
        """The result as JSON values, states as at the fixture's clock; a list of handles for
        list_handles (one page)."""
        value = im.json_value(self.result(operation, **fields), self.clock())
        return value["handles"] if operation == "list_handles" else value

    def new_account(self, address="me@example.org"):
        return self.call("new_account", address=address)

    def new_handle(self, token, **fields):
        """A new handle's address."""
        return self.call("new_handle", token=token, **fields)["address"]

    def handle(self, token, address):
        """The handle as list_handles shows it (JSON values, as at the fixture's clock)."""
        return next(h for h in self.call("list_handles", token=token) if h["address"] == address)

    def sweep(self):
        return self.service.write(im._sweep, {}).result(30)

    def stop(self):
        if not self.stopped:
            self.stopped = True
            self.service.stop()

    def close(self):
        try:
            self.stop()
        finally:
            self.store.close()


class PostmapTestCase(unittest.TestCase):
    """Base: a real postmap (no running Postfix), a fresh site and Service per test."""

    MAP_TYPE = "hash"

    @classmethod
    def setUpClass(cls):
        require_postfix(map_type=cls.MAP_TYPE)

    def make_site(self, **kwargs):
        kwargs.setdefault("map_type", self.MAP_TYPE)
        return make_site(self, **kwargs)

    def start_service(self, site, clock=time.time):
        return ServiceFixture(self, site, clock).start()


class ServerPerClassTestCase(PostmapTestCase):
    """Base: one running server for the whole class (each test makes its own accounts), and
    its command line."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        folder = make_folder()
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.site = Site(folder, admin_lines=ADMIN_LINES)
        cls.daemon = DaemonProcess(cls.site).start()
        cls.addClassCleanup(cls.daemon.stop)

    def run_cli(self, *args, input=None, rc=0):
        return run_cli(self, self.site, *args, input=input, rc=rc)


def count_refused(socks):
    """How many of these connections the web listener refused (503: no descriptor to spare)."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            count += sock.recv(12, socket.MSG_PEEK).startswith(b"HTTP/1.1 503")
        except (BlockingIOError, ConnectionResetError):
            pass
    return count


def run_as_user(uid, function):
    """Run ``function()`` in a forked child that became ``uid``; its result or error as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                                        # the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result = "ok: %s" % (function(),)
            except BaseException as e:
                result = "%s: %s" % (type(e).__name__, e)
            os.write(write_end, result.encode("utf-8", "replace")[:60000])
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode("utf-8", "replace")


def rss_bytes(pid):
    """The process's resident memory (VmRSS)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


def busy(pid):
    """True while a thread of the process runs, waits to run or waits on the disk."""
    for task in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/stat" % (pid, task)) as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("R", "D"):
                    return True
        except FileNotFoundError:
            pass
    return False


def settled_rss(pid, limit, settle=1.0, timeout=15.0):
    """The RSS once the process has settled: for ``settle`` seconds its RSS grew by less than
    1 MiB and none of its threads was seen running (the work it took on is done). None as
    soon as the RSS exceeds ``limit``, or if it has not settled after ``timeout``."""
    samples = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now, rss = time.monotonic(), rss_bytes(pid)
        if rss > limit:
            return None
        samples.append((now, rss, busy(pid)))
        window = [(r, b) for when, r, b in samples if when >= now - settle]
        if (samples[0][0] <= now - settle and max(r for r, _ in window) - window[0][0] < 1 << 20
                and not any(b for _, b in window)):
            return rss
        time.sleep(0.02)
    return None


###############################################################################
# Test support: a private, throw-away Postfix instance on loopback
# (from the Postfix lab's harness: postfix -c DIR, no chroot, no DNS, no port 25)
###############################################################################

_MASTER_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _decode(data):
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)


_INSTANCES = []             # every PostfixInstance of this run, stopped or not


class PostfixInstance:
    """A private Postfix living under ``root_dir``, listening on IP:PORT only (127.0.0.1 unless
    given).

    mode "virtual": DOMAIN in virtual_alias_domains, ``virtual_alias_maps = TYPE:ROOT/etc/virtual``.
    Targets USER@mbox.test are virtual(8) mailboxes ROOT/vmail/USER (no system users needed).
    ``extra_main_cf`` lines are appended to main.cf (later lines win in Postfix).
    Postfix logs to ROOT/maillog. Everything needs root (master runs as root).
    """

    MAILBOX_DOMAIN = "mbox.test"

    def __init__(self, root_dir, map_type="hash", domain="incognito.test", extra_main_cf=(),
                 users=("alice", "bob", "carol", "dave"), ip="127.0.0.1"):
        self.root_dir = os.path.abspath(root_dir)
        self.ip = ip                # where its smtpd listens (a 127.0.0.x of its own in the lab)
        self.port = free_port()
        self.map_type = map_type
        self.domain = domain
        self.extra_main_cf = list(extra_main_cf)
        self.users = tuple(users)
        self._daemon_dir = None
        _INSTANCES.append(self)

    @property
    def config_dir(self):
        return os.path.join(self.root_dir, "etc")

    @property
    def map_path(self):
        return os.path.join(self.config_dir, "virtual")

    @property
    def map_spec(self):
        return "%s:%s" % (self.map_type, self.map_path)

    @property
    def maillog_path(self):
        return os.path.join(self.root_dir, "maillog")

    @property
    def pid_file(self):
        return os.path.join(self.root_dir, "spool", "pid", "master.pid")

    def address(self, user):
        return "%s@%s" % (user, self.MAILBOX_DOMAIN)

    def _main_cf(self):
        r, c = self.root_dir, self.config_dir
        lines = [
            "compatibility_level = 3.6",
            "queue_directory = %s/spool" % r,
            "data_directory = %s/data" % r,
            "maillog_file_prefixes = %s" % r,
            "maillog_file = %s/maillog" % r,
            "myhostname = mail.pflab.test",
            "mydomain = pflab.test",
            "myorigin = $myhostname",
            "mydestination = localhost, $myhostname",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "relayhost =",
            "default_transport = error:5.7.1 off-machine delivery disabled in test instance",
            "relay_transport = error:5.7.1 off-machine delivery disabled in test instance",
            "smtp_dns_support_level = disabled",
            "smtpd_peername_lookup = no",
            "alias_maps = hash:%s/aliases" % c,
            "alias_database = hash:%s/aliases" % c,
            "mail_spool_directory = %s/mail" % r,
            "biff = no",
            "virtual_mailbox_domains = %s" % self.MAILBOX_DOMAIN,
            "virtual_mailbox_base = %s/vmail" % r,
            "virtual_mailbox_maps = texthash:%s/vmailbox" % c,
            "virtual_uid_maps = static:65534",
            "virtual_gid_maps = static:65534",
            "smtpd_reject_unlisted_recipient = yes",
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            "virtual_alias_domains = %s" % self.domain,
            "virtual_alias_maps = %s" % self.map_spec,
        ] + self.extra_main_cf
        return "\n".join(lines) + "\n"

    def _write(self, name, text, backdate=True):
        path = os.path.join(self.config_dir, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
        if backdate:
            _backdate(path)
        return path

    def run(self, program, *args, check=True, **kwargs):
        """``PROGRAM -c ETC ARGS...`` (postmap, postfix, postalias, postconf)."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("universal_newlines", True)
        kwargs.setdefault("timeout", 60)
        done = subprocess.run([_which(program) or program, "-c", self.config_dir] + list(args), **kwargs)
        if check and done.returncode != 0:
            raise AssertionError("%s %s failed (rc=%d): %s" % (program, " ".join(args), done.returncode,
                                                                done.stderr.strip()))
        return done

    def query(self, key):
        done = self.run("postmap", "-q", key, self.map_spec, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    def create(self, map_text=""):
        """Write config, mailbox map and the map under test (``map_text``), make the spool."""
        os.makedirs(self.root_dir, exist_ok=True)
        os.chmod(self.root_dir, 0o755)
        for folder in ("etc", "spool", "mail", "vmail"):
            os.makedirs(os.path.join(self.root_dir, folder), exist_ok=True)
        os.chmod(self.config_dir, 0o755)
        os.chmod(os.path.join(self.root_dir, "mail"), 0o1777)
        os.chown(os.path.join(self.root_dir, "vmail"), NOBODY_UID, NOBODY_UID)
        self._write("main.cf", self._main_cf())
        self._write("master.cf", "%s:%d inet n - n - - smtpd\n" % (self.ip, self.port) + _MASTER_SERVICES)
        self._write("aliases", "postmaster: root\n", backdate=False)
        self._write("vmailbox", "".join("%s %s\n" % (self.address(u), u) for u in self.users))
        self._write("virtual", map_text, backdate=False)
        self.run("postalias", "hash:%s" % os.path.join(self.config_dir, "aliases"))
        self.run("postmap", self.map_spec)
        self.run("postfix", "check")
        return self

    def start(self, timeout=20.0):
        done = self.run("postfix", "start", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.ip, self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return self
            except OSError:
                pass
            time.sleep(0.01)
        self.stop()
        raise AssertionError("Postfix did not start (postfix start rc=%d: %s)\n%s"
                             % (done.returncode, done.stderr, self.maillog()[-3000:]))

    def master_pid(self):
        try:
            with open(self.pid_file) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _pid_alive(pid) else None

    def _master_lock_free(self):
        if self._daemon_dir is None:
            done = self.run("postconf", "-h", "daemon_directory", check=False)
            self._daemon_dir = done.stdout.strip() or "/usr/lib/postfix/sbin"
        env = dict(os.environ, MAIL_CONFIG=self.config_dir)
        return subprocess.run([os.path.join(self._daemon_dir, "master"), "-t"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30).returncode == 0

    def _instance_pids(self):
        """Its live processes: those whose MAIL_CONFIG is its config folder."""
        needle = ("MAIL_CONFIG=%s" % self.config_dir).encode()
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open("/proc/%s/environ" % name, "rb") as f:
                        if needle in f.read().split(b"\0") and _pid_alive(int(name)):
                            pids.append(int(name))
                except OSError:
                    pass
        return pids

    def stop(self, timeout=10.0):
        """SIGTERM the master, wait until its lock is free and no process of it is left."""
        if not os.path.isdir(self.config_dir):
            return
        pid = self.master_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.002)
        while not self._master_lock_free() and time.monotonic() < deadline:
            time.sleep(0.005)
        while True:
            left = self._instance_pids()
            if not left:
                return
            if time.monotonic() > deadline:
                for leftover in left:
                    try:
                        os.kill(leftover, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return
            time.sleep(0.005)

    def destroy(self):
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    # -- SMTP, always over a NEW connection --------------------------------------------------

    def send(self, rcpt, sender="sender@example.org", timeout=30):
        """Send one message; ``(ok, code, text, mark)``: code/text of RCPT when refused, else of DATA.

        ``mark`` is unique and in the Subject and body; look for it with ``wait_for_mail``.
        """
        mark = uuid.uuid4().hex
        message = ("From: %s\r\nTo: %s\r\nSubject: %s\r\nMessage-ID: <%s@pflab.test>\r\nDate: %s\r\n\r\n"
                   "body %s\r\n" % (sender, rcpt, mark, mark, email.utils.formatdate(), mark))
        try:
            client = smtplib.SMTP(self.ip, self.port, local_hostname="client.pflab.test", timeout=timeout)
        except (OSError, smtplib.SMTPException) as e:
            return False, None, "connect failed: %s" % e, mark
        try:
            client.ehlo()
            code, text = client.mail(sender)
            if code != 250:
                return False, code, _decode(text), mark
            code, text = client.rcpt(rcpt)
            if code not in (250, 251):
                return False, code, _decode(text), mark
            code, text = client.data(message)
            return code == 250, code, _decode(text), mark
        except smtplib.SMTPResponseException as e:
            return False, e.smtp_code, _decode(e.smtp_error), mark
        except (OSError, smtplib.SMTPException) as e:
            return False, None, "%s: %s" % (type(e).__name__, e), mark
        finally:
            try:
                client.quit()
            except (OSError, smtplib.SMTPException):
                client.close()

    def rcpt_check(self, rcpt, sender="sender@example.org", timeout=30):
        """MAIL + RCPT on a new connection, nothing queued: ``(code, text)``."""
        try:
            with smtplib.SMTP(self.ip, self.port, local_hostname="client.pflab.test", timeout=timeout) as s:
                s.ehlo()
                s.mail(sender)
                code, text = s.rcpt(rcpt)
                s.rset()
                return code, _decode(text)
        except smtplib.SMTPResponseException as e:
            return e.smtp_code, _decode(e.smtp_error)
        except (OSError, smtplib.SMTPException) as e:
            return None, "%s: %s" % (type(e).__name__, e)

    def mailbox(self, user):
        try:
            with open(os.path.join(self.root_dir, "vmail", user), encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_for_mail(self, user, mark, timeout=10):
        return bool(wait_until(lambda: mark in self.mailbox(user), timeout, 0.005))

    def maillog(self):
        try:
            with open(self.maillog_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


def start_postfix_instance(cls, map_type="hash", map_text="", extra_main_cf=()):
    """One private Postfix for a TestCase class (setUpClass); destroyed in tearDownClass."""
    folder = make_folder(prefix="incognitomail-test-postfix-")
    instance = PostfixInstance(os.path.join(folder, "pf"), map_type=map_type, extra_main_cf=extra_main_cf)
    try:
        instance.create(map_text).start()
    except BaseException:
        instance.destroy()
        shutil.rmtree(folder, ignore_errors=True)
        raise
    cls.addClassCleanup(shutil.rmtree, folder, True)
    cls.addClassCleanup(instance.destroy)
    return instance


def tearDownModule():
    """Never leave a daemon or a Postfix running: stop what is left, and fail naming it.

    Each test (or class) stops what it starts, so anything still running here is a leak.
    """
    leaks = []
    for daemon in list(_LIVE_DAEMONS):
        if daemon.proc.poll() is None:
            leaks.append("daemon pid %d (%s)" % (daemon.pid, daemon.site.config_path))
        try:
            daemon.kill()
        except Exception:
            pass
    for instance in _INSTANCES:
        pids = instance._instance_pids()         # the master and its children, found in /proc
        if pids:
            leaks.append("Postfix instance %s (pids %s)" % (instance.config_dir, " ".join(map(str, pids))))
            try:
                instance.stop()
            except Exception:
                pass
    if _pycache_folder is not None:
        shutil.rmtree(_pycache_folder, ignore_errors=True)
    if leaks:
        raise AssertionError("still running when the tests ended; a test must stop what it starts: %s"
                             % "; ".join(leaks))


# An admin's own line in the map Postfix uses: it must survive everything and keep routing.
FOREIGN_LINE = b"admin@incognito.test bob@mbox.test\n"


class PostfixInstanceTestCase(unittest.TestCase):
    """Base: one private Postfix per class; a fresh daemon and database per test."""

    MAP_TYPE = "hash"
    DOMAINS = "incognito.test"

    @classmethod
    def setUpClass(cls):
        require_postfix(instance=True, map_type=cls.MAP_TYPE)
        cls.pf = start_postfix_instance(cls, cls.MAP_TYPE, FOREIGN_LINE.decode(), cls.extra_main_cf())

    @classmethod
    def extra_main_cf(cls):
        return []

    def daemon_sections(self):
        return {}

    def make_site(self):
        return make_site(self, map_type=self.pf.map_type, map_path=self.pf.map_path,
                         config_dir=self.pf.config_dir, domains=self.DOMAINS, sections=self.daemon_sections())

    def start(self, env=None):
        site = self.make_site()
        return site, start_daemon(self, site, env=env)

    def run_cli(self, site, *args, input=None, rc=0):
        """run_cli, its output stripped."""
        return run_cli(self, site, *args, input=input, rc=rc).stdout.strip()

    def assert_delivered(self, rcpt, user):
        ok, code, text, mark = self.pf.send(rcpt)
        self.assertTrue(ok, "mail to %s refused: %s %s" % (rcpt, code, text))
        self.assertTrue(self.pf.wait_for_mail(user, mark), "mail to %s never reached %s:\n%s"
                        % (rcpt, user, self.pf.maillog()[-2000:]))
        return mark

    def assert_rejected_at_rcpt(self, rcpt, code=550):
        ok, got, text, mark = self.pf.send(rcpt)
        self.assertFalse(ok, "mail to %s was accepted" % rcpt)
        self.assertEqual(got, code, text)
        return text

    def assert_foreign_line_kept(self):
        with open(self.pf.map_path, "rb") as f:
            self.assertTrue(f.read().startswith(FOREIGN_LINE))
        self.assert_delivered("admin@incognito.test", "bob")


class PolicyInstanceTestCase(PostfixInstanceTestCase):
    """A private Postfix asking the daemon's policy service about every recipient."""

    @classmethod
    def extra_main_cf(cls):
        cls.policy_port = free_port()
        endpoint = "inet:127.0.0.1:%d" % cls.policy_port
        return ["smtpd_recipient_restrictions = check_policy_service %s" % endpoint,
                # Postfix asks again at the end of the message: that must not count twice
                "smtpd_end_of_data_restrictions = check_policy_service %s" % endpoint,
                "smtpd_policy_service_default_action = DUNNO"]

    def daemon_sections(self):
        return {"General": {"PolicyListen": "inet:127.0.0.1:%d" % self.policy_port}}


class SocketmapInstanceTestCase(PostfixInstanceTestCase):
    """A private Postfix asking the daemon's socketmap (``SocketmapListen``) instead of a map."""

    @classmethod
    def extra_main_cf(cls):
        folder = make_folder(prefix="incognitomail-test-socketmap-")
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.socket_path = os.path.join(folder, "run", "socketmap.sock")
        postfix_folder(os.path.dirname(cls.socket_path))
        return ["virtual_alias_maps = socketmap:unix:%s:virtual" % cls.socket_path]

    def daemon_sections(self):
        return {"General": {"SocketmapListen": "unix:%s" % self.socket_path}}

    def start_without_postmap(self, kind=DaemonProcess, **options):
        """A site and its daemon, which must never need postmap (it fails here)."""
        folder, _, _ = failing_postmap_folder(self, mode="always-fail")
        site = self.make_site()
        return site, start_daemon(self, site, kind, env=dict(os.environ, PATH=path_with(folder)), **options)


###############################################################################
# Test support: WebSocket, Postfix and command-line clients (one frame encoder, one frame decoder)
###############################################################################

MASK = b'\x37\xfa\x21\x3d'
KEY = 'dGhlIHNhbXBsZSBub25jZQ=='   # the RFC 6455 section 1.3 example


def client_frame(opcode, payload=b'', fin=True, rsv=0, masked=True, length=None):
    """A client-to-server frame, masked with a plain per-byte loop (independent of the module's own)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack('!BB', first, mask_bit | n)
    elif n < 1 << 16:
        head = struct.pack('!BBH', first, mask_bit | 126, n)
    else:
        head = struct.pack('!BBQ', first, mask_bit | 127, n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def json_frame(**request):
    """A client's text frame holding one JSON request."""
    return client_frame(0x1, json.dumps(request).encode("utf-8"))


def server_frame_decoder():
    """Decodes one server frame without I/O: yields how many bytes it needs next, is sent
    exactly those, and returns (opcode, payload). Server frames must not be masked."""
    head = yield 2
    assert not head[1] & 0x80, 'server frames must not be masked'
    n = head[1] & 0x7F
    if n >= 126:
        n = int.from_bytes((yield 2 if n == 126 else 8), 'big')
    payload = yield n
    return head[0] & 0x0F, payload


def read_server_frame(read_exactly):
    """(opcode, payload) of the next server frame, read with ``read_exactly(n)``."""
    decoder = server_frame_decoder()
    wanted = next(decoder)
    while True:
        try:
            wanted = decoder.send(read_exactly(wanted))
        except StopIteration as done:
            return done.value


async def read_frame(reader):
    """The same, from an asyncio stream."""
    decoder = server_frame_decoder()
    wanted = next(decoder)
    while True:
        try:
            wanted = decoder.send(await reader.readexactly(wanted))
        except StopIteration as done:
            return done.value


def decode_server_frame(frame):
    """(opcode, payload) of a whole server frame given as bytes."""
    return read_server_frame(io.BytesIO(frame).read)


def upgrade_head(target='/ws', **overrides):
    """An upgrade request head; overrides use header names with '_' for '-', None drops one."""
    headers = {'Host': 'localhost', 'Upgrade': 'websocket', 'Connection': 'Upgrade',
               'Sec-WebSocket-Key': KEY, 'Sec-WebSocket-Version': '13'}
    request_line = overrides.pop('request_line', 'GET %s HTTP/1.1' % target)
    for name, value in overrides.items():
        headers[name.replace('_', '-')] = value
    lines = [request_line] + ['%s: %s' % (k, v) for k, v in headers.items() if v is not None]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def events(parser, *chunks):
    """Feed each chunk to a pull parser (frames, HTTP, policy or socketmap requests); what is
    complete after it."""
    take = getattr(parser, "next_event", None) or parser.next_request
    result = []
    for chunk in chunks:
        parser.feed(chunk)
        result.extend(iter(take, None))
    return result


class ProtocolErrorAssertions(unittest.TestCase):
    def assertProtocolError(self, code, parser, *chunks):
        with self.assertRaises(im.WebSocketProtocolError) as ctx:
            events(parser, *chunks)
        self.assertEqual(ctx.exception.close_code, code)
        return ctx.exception


class WsClient:
    """A blocking WebSocket client for tests: what a browser add-on does, byte by byte. Its
    socket may be made to order (a source address; a small receive buffer, set before it
    connects), and its opening handshake may carry an Origin and other ``headers``."""

    def __init__(self, port, path="/incognitomail", host="127.0.0.1", source=None, origin=None,
                 tls_context=None, timeout=10, headers=None, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.settimeout(timeout)
            if source:
                self.sock.bind((source, 0))
            self.sock.connect((host, port))
            if tls_context is not None:
                self.sock = tls_context.wrap_socket(self.sock, server_hostname="localhost")
            self._handshake(port, path, host, origin, headers or {})
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, port, path, host, origin, headers):
        self.buffer = b""
        key = base64.b64encode(os.urandom(16)).decode()
        fields = {"Host": "%s:%d" % (host, port)}
        fields.update((name.replace("-", "_"), value) for name, value in headers.items())
        self.sock.sendall(upgrade_head(path, Sec_WebSocket_Key=key, Origin=origin, **fields))
        self.status_line, self.headers = self._read_head()
        self.status = int(self.status_line.split()[1])
        if self.status == 101:
            expected = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
                                                     .encode()).digest()).decode()
            assert self.headers.get("sec-websocket-accept") == expected, self.headers

    def _read_head(self):
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake: %r" % self.buffer)
            self.buffer += chunk
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return lines[0], headers

    def _read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, text):
        self.send_raw(client_frame(0x1, text.encode("utf-8")))

    def send_json(self, **request):
        self.send_raw(json_frame(**request))

    def recv_frame(self):
        """(opcode, payload) of the next server frame."""
        return read_server_frame(self._read)

    def recv(self):
        opcode, payload = self.recv_frame()
        assert opcode == 0x1, (opcode, payload)
        return payload.decode("utf-8")

    def recv_json(self):
        return json.loads(self.recv())

    def request(self, **request):
        self.send_json(**request)
        return self.recv_json()

    def close_code(self):
        """Read frames until the server's close frame; its status code."""
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big") if payload else None

    def close(self):
        try:
            self.send_raw(client_frame(0x8, (1000).to_bytes(2, "big")))
            self.close_code()
        except (OSError, ConnectionError, AssertionError):
            pass
        self.sock.close()


def _try_ws_client(port):
    """A WebSocket client whose handshake succeeded, or None (refused, or 503: not yet)."""
    try:
        client = WsClient(port, timeout=2)
    except (OSError, ConnectionError):
        return None
    if client.status != 101:
        client.sock.close()
        return None
    return client


def make_certificate(folder, name="server"):
    """A self-signed certificate for localhost made with Debian's openssl: (cert, key) paths."""
    cert, key = os.path.join(folder, name + ".pem"), os.path.join(folder, name + ".key")
    done = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                           "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                           "-keyout", key, "-out", cert], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise AssertionError("openssl failed: %s" % done.stderr.decode())
    return cert, key


def tcp_state(local, remote):
    """The state of the TCP socket from ``local`` to ``remote`` ((IPv4 address, port) pairs) as
    /proc/net/tcp shows it ("01": established, "04": closed by this end, FIN sent), or None."""
    def hex_address(address):
        return "%08X:%04X" % (struct.unpack("=I", socket.inet_aton(address[0]))[0], address[1])
    wanted = [hex_address(local), hex_address(remote)]
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1:3] == wanted:
                return fields[3]
    return None


def accept_queue(port):
    """How many connections wait in the accept queue of the listener on 127.0.0.1:``port``
    (/proc/net/tcp shows it as the receive queue of a socket in state LISTEN, 0A)."""
    local = "%08X:%04X" % (struct.unpack("=I", socket.inet_aton("127.0.0.1"))[0], port)
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":
                return int(fields[4].split(":")[1], 16)
    return None


def connect_unix(path, timeout=10):
    """A connection to a Unix socket, waiting while its backlog is full (EAGAIN)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)
        except BaseException:
            sock.close()
            raise


def closed_by_peer(sock):
    """Read until the peer closes; True when it did (end of file or reset) within the socket's
    timeout, False when it is still open."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def still_open(sock):
    """True when the peer has neither closed nor sent anything (a read would block)."""
    sock.setblocking(False)
    try:
        sock.recv(1)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def socketmap_ask(sock, key, name="virtual"):
    """One socketmap lookup on an open connection: the payload of its reply, which must be one
    netstring."""
    sock.sendall(im.netstring(("%s %s" % (name, key)).encode()))
    data = b""
    while True:
        length, colon, rest = data.partition(b":")
        if colon and len(rest) >= int(length) + 1:
            assert rest[int(length):int(length) + 1] == b",", "not a netstring: %r" % data
            return rest[:int(length)]
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("the socketmap closed the connection: %r" % data)
        data += chunk


def policy_request(recipient, state="RCPT", instance=None, **extra):
    fields = dict(request="smtpd_access_policy", protocol_state=state, protocol_name="ESMTP",
                  client_address="127.0.0.1", sender="sender@example.org", recipient=recipient,
                  instance=instance or uuid.uuid4().hex, **extra)
    return "".join("%s=%s\n" % item for item in fields.items()).encode() + b"\n"


def read_policy_answer(sock):
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def ask_policy(port, recipient, instance=None):
    """What the daemon's policy service answers about one recipient of one message."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(policy_request(recipient, instance=instance))
        return read_policy_answer(s).decode()


async def policy_action(front, request):
    """A PostfixFront's policy action, in-process: at once, or once a burner's count is in."""
    action = front.policy_action(request)
    return action if isinstance(action, str) else await action


# The milter protocol from Postfix's side (the test's own framing, not the module's encoder):
# a packet is a 4-byte big-endian length, a command byte and its payload.
SMFIR_ADDHEADER = b"h"
MILTER_FINAL_REPLIES = b"acdrty4"        # what ends a milter's answer to end of message


def mta_packet(code, payload=b""):
    """A packet as Postfix sends it."""
    return struct.pack("!I", len(payload) + 1) + code + payload


def mta_strings(code, *strings):
    """A packet of NUL-terminated strings (MAIL, RCPT, HEADER ...), as Postfix sends it."""
    return mta_packet(code, b"".join(s.encode("utf-8") + b"\0" for s in strings))


def mta_macros(stage, **macros):
    """A macro packet (``D``): the stage, then name and value pairs; ``_j`` stands for ``j``."""
    return mta_packet(b"D", stage + b"".join(
        b"%s\0%s\0" % (name.lstrip("_").encode(), value.encode()) for name, value in macros.items()))


def milter_replies(data):
    """A milter's answer bytes -> [(code, payload)], every packet whole."""
    packets = []
    while data:
        length = struct.unpack("!I", data[:4])[0]
        assert len(data) >= 4 + length, "a packet cut short: %r" % data
        packets.append((data[4:5], data[5:4 + length]))
        data = data[4 + length:]
    return packets


# Which protocol step (SMFIP_NR_*) lets a milter leave each command unanswered; macros, abort
# and quit are never answered, the end of a message always.
MILTER_NO_REPLY_STEPS = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
                         b"U": 0x20000, b"N": 0x40000, b"B": 0x80000, b"L": 0x80}


def milter_answers(code, steps):
    """Does a milter that negotiated ``steps`` answer command ``code``?"""
    if code in (b"D", b"A", b"Q", b"K"):
        return False
    return not steps & MILTER_NO_REPLY_STEPS.get(code, 0)


class MilterClient:
    """Postfix's side of one milter connection, over a socket (without TCP_NODELAY, as
    Postfix): send a command, read the answer (one packet; at the end of a message, the
    changes and the final reply), as the negotiated steps say."""

    def __init__(self, port, host="127.0.0.1", sock=None):
        """``port`` on ``host``, or ``sock``, connected already (a unix socket)."""
        self.sock = sock or socket.create_connection((host, port), timeout=10)
        self.steps = 0
        self._macros = b""          # sent with the next command, in one write, as Postfix does

    def read(self):
        head = self._exactly(4)
        length = struct.unpack("!I", head)[0]
        body = self._exactly(length)
        return body[:1], body[1:]

    def _exactly(self, size):
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the milter closed the connection after %r" % data)
            data += chunk
        return data

    def send(self, packet):
        if packet[4:5] == b"D":
            self._macros += packet
            return
        self.sock.sendall(self._macros + packet)
        self._macros = b""

    def ask(self, packet):
        """Send a command that gets an answer: [(code, payload)] of that answer."""
        self.send(packet)
        replies = [self.read()]
        if packet[4:5] == b"E":
            while replies[-1][0] not in MILTER_FINAL_REPLIES:
                replies.append(self.read())
        return replies

    def data(self):
        """What smtpd sends at DATA before cleanup(8) takes the connection over for the headers:
        the DATA macros, and the DATA command unless the milter asked not to be told
        (SMFIP_NODATA); the answer, if any. The macros are written then, alone if need be."""
        self.send(mta_macros(b"T", i="4F3A120C0CD"))
        if not self.steps & 0x200:
            return self.tell(mta_packet(b"T"))
        self.sock.sendall(self._macros)
        self._macros = b""
        return []

    def continued(self, code):
        """What a command the milter lets continue gets back, as negotiated: its continue, or
        nothing (an SMFIP_NR_* step)."""
        return MILTER_CONTINUE if milter_answers(code, self.steps) else []

    def tell(self, packet):
        """Send a command as Postfix does: its answer when the negotiation says there is one,
        else []."""
        if milter_answers(packet[4:5], self.steps):
            return self.ask(packet)
        self.send(packet)
        return []

    def negotiate(self, version=6, actions=0x1FF, steps=0x1FFFFF):
        [(code, payload)] = self.ask(mta_packet(b"O", struct.pack("!III", version, actions, steps)))
        assert code == b"O", (code, payload)
        version, actions, self.steps = struct.unpack("!III", payload[:12])
        return version, actions, self.steps

    def close(self):
        self.sock.close()


def milter_secret(site):
    """The milter's key, as the daemon keeps it in the database."""
    store = im.Store(site.config.database_path, readonly=True)
    try:
        return bytes.fromhex(store.get_meta("milter_secret"))
    finally:
        store.close()


def refuse_constant(name):
    raise ValueError("%s is not JSON" % name)


ATTACK_CONNECTIONS = 10
ATTACK_BYTES = 256 * 1024           # pipelined requests each attacking connection sends
ATTACK_HANDLES = 500                # the account's handles: a list_handles reply is ~130 KB
# Measured (rss_attack.py): 2.8 to 4.5 MB a connection, about MAX_PENDING replies of ~130 KB
# plus the unparsed read-ahead; before the fix the daemon grew without end (+150 MB in 2 s).
MAX_GROWTH_PER_CONNECTION = 8 << 20


def list_handles_frame(token):
    return json_frame(id=1, op="list_handles", token=token)


def list_handles_burst(token, size=ATTACK_BYTES):
    """As many pipelined list_handles frames as fit in ``size`` bytes."""
    frame = list_handles_frame(token)
    return frame * (size // len(frame))


def pipelining_attack(testcase, port, token, connections=ATTACK_CONNECTIONS):
    """Connections that each send ATTACK_BYTES of list_handles requests and read nothing."""
    burst = list_handles_burst(token)
    clients = []
    for _ in range(connections):
        client = WsClient(port)
        testcase.addCleanup(client.sock.close)
        testcase.assertEqual(client.status, 101)
        client.sock.sendall(burst)
        clients.append(client)
    return clients


###############################################################################
# Test support: an HTTP client (raw bytes, one connection per request, as Bitwarden)
###############################################################################

# A moment to format: 2026-01-01 12:00:00 UTC.
NOON_2026 = calendar.timegm((2026, 1, 1, 12, 0, 0))
BITWARDEN_NOTE = "Website: example.com. Generated by Bitwarden."
# What the addy.io browser extension accepts as an API key (anonaddy/browser-extension 3.0.3).
ADDY_EXTENSION_KEY = r"^(addy_io_)?[A-Za-z0-9]{40,60}$"
_OWN = object()     # the test's own account token
WRONG = "W" * 43    # a token no account has
ACCOUNT_DETAILS = "/api/v1/account-details"


class HttpReply(collections.namedtuple("HttpReply", "status reason fields body")):
    """A parsed response: ``fields`` is every (name, value) header line in order."""
    __slots__ = ()

    @property
    def headers(self):
        """Lower-cased names; a repeated field's values joined with ", "."""
        joined = {}
        for name, value in self.fields:
            name = name.lower()
            joined[name] = joined[name] + ", " + value if name in joined else value
        return joined

    def json(self):
        return json.loads(self.body.decode("utf-8"))


def request_bytes(method, target, headers=(), body=None, host="127.0.0.1:80"):
    """One HTTP/1.1 request: the request line, Host, ``headers`` ((name, value) pairs, in
    order), Content-Length when there is a ``body`` (bytes, or a JSON value), the body."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: %s" % host]
    lines += ["%s: %s" % (name, value) for name, value in headers]
    if body is not None:
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class HttpClient:
    """A blocking HTTP/1.1 client on one connection, reading replies by Content-Length
    (its own parser, independent of the module's)."""

    def __init__(self, port, host="127.0.0.1", source=None, tls_context=None, timeout=10):
        self.host = "%s:%d" % (host, port)
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        if tls_context is not None:
            try:
                self.sock = tls_context.wrap_socket(self.sock, server_hostname="localhost")
            except BaseException:
                self.sock.close()
                raise
        self.buffer = b""

    def send_raw(self, data):
        self.sock.sendall(data)

    def send(self, method, target, headers=(), body=None):
        self.send_raw(request_bytes(method, target, headers, body, self.host))

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed after %r" % self.buffer[:200])
        self.buffer += chunk

    def reply(self, head_only=False):
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        assert version == "HTTP/1.1", lines[0]
        fields = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        reply = HttpReply(int(status), reason, fields, b"")
        if head_only or reply.status in (204, 304) or reply.status < 200:
            return reply
        if "content-length" not in reply.headers:     # read to the end of the connection
            while True:
                try:
                    self._fill()
                except ConnectionError:
                    body, self.buffer = self.buffer, b""
                    return reply._replace(body=body)
        length = int(reply.headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return reply._replace(body=body)

    def request(self, method, target, headers=(), body=None):
        self.send(method, target, headers, body)
        return self.reply(head_only=method == "HEAD")

    def closed_by_server(self):
        """Has the server ended the connection (EOF or reset), with nothing more said?"""
        try:
            data = self.sock.recv(1)
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        assert data == b"", data
        return True

    def close(self):
        self.sock.close()


def http_request(port, path, headers=(), source=None, method="GET", host="localhost"):
    """One HTTP/1.1 request on a connection of its own: (status, body as JSON or None)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        if source:
            sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        lines = ["%s %s HTTP/1.1" % (method, path), "Host: " + host, "Connection: close"]
        lines += ["%s: %s" % header for header in headers]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), (json.loads(body) if body.strip() else None)


def addy_auth(token):
    return [] if token is None else [("Authorization", "Bearer " + token)]


def simplelogin_auth(token):
    return [] if token is None else [("Authentication", token)]


def bitwarden_headers(auth, xhr=False):
    """The headers every Bitwarden forwarder request carries (create-forwarding-address.ts),
    plus X-Requested-With as older clients and the mobile SDK send it."""
    headers = list(auth) + [("Content-Type", "application/json"), ("Accept", "application/json")]
    if xhr:
        headers.append(("X-Requested-With", "XMLHttpRequest"))
    return headers


def from_addy_time(text):
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


SITE = im.ApiSite(("incognito.test", "other.test"), NOON_2026)
# A handle as the store gives it (fields not named here: None).
HANDLE = im.Handle(**dict(dict.fromkeys(im.Handle._fields), id=70, number=7, local="k3x9q2m7w4t8z5r1",
                          domain="incognito.test", account_id=3, target="alice@example.org",
                          label="shop", enabled=1, created=NOON_2026, updated=NOON_2026 + 60,
                          received=4, last_received=NOON_2026 + 3600, blocked=1, bounced=2,
                          sent=0))
TOKEN = "T" * 43


def api_request(method, target, headers=(), body=None):
    """The request a client's bytes make (through the module's own parser)."""
    [request] = events(im.HttpParser(), request_bytes(method, target, headers, body))
    return request


def addy_request(method, target, body=None, token=TOKEN):
    return api_request(method, target, bitwarden_headers(addy_auth(token)), body)


def simplelogin_request(method, target, body=None, token=TOKEN):
    return api_request(method, target, bitwarden_headers(simplelogin_auth(token)), body)


###############################################################################
# Test support: a mail lab on loopback: a sender's MX, the forwarder and a receiver that judges
# SPF, DKIM and DMARC as a big provider does (dkimpy and pyspf, against a DNS of the test's own)
###############################################################################

def require_mail_lab():
    """The dkim and spf modules (PyPI's dkimpy and pyspf), a private Postfix and openssl; skip
    without them, or fail when INCOGNITOMAIL_REQUIRE_POSTFIX is set."""
    require_postfix(instance=True)
    require(shutil.which("openssl"), "openssl is not installed")
    try:
        with warnings.catch_warnings():     # pyspf's source has old escapes (3.9 compiles it once)
            warnings.simplefilter("ignore", DeprecationWarning)
            import dkim
            import spf
    except ImportError as e:
        require(False, "the deliverability tests need dkimpy and pyspf (python3 -m pip install "
                       "dkimpy pyspf dnspython): %s" % e)
    return dkim, spf


def dkim_key(folder):
    """A fresh RSA key for DKIM: (its PKCS#1 PEM, the p= of its DNS record)."""
    path = os.path.join(folder, "dkim.pem")
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", path, "1024"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    public = subprocess.run(["openssl", "rsa", "-in", path, "-pubout", "-outform", "DER"], check=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=60).stdout
    with open(path, "rb") as f:
        return f.read(), base64.b64encode(public).decode("ascii")


class LabDns:
    """The lab's DNS: TXT records by name, nothing else. ``txt`` is dkimpy's dnsfunc,
    ``lookup`` stands in for pyspf's DNSLookup."""

    def __init__(self, records):
        self.records = {name.lower(): texts for name, texts in records.items()}

    def _texts(self, name):
        name = name.decode("ascii") if isinstance(name, bytes) else name
        return self.records.get(name.rstrip(".").lower(), [])

    def txt(self, name, timeout=5):
        texts = self._texts(name)
        return texts[0].encode("ascii") if texts else None

    def lookup(self, name, qtype, strict=True, timeout=30):
        if qtype not in ("TXT", "SPF"):
            return []
        return [((name, qtype), [text.encode("ascii")]) for text in self._texts(name)]


def organizational_domain(domain):
    """The lab's public suffixes are one label (.example, .test): the last two labels."""
    return ".".join(domain.lower().rstrip(".").split(".")[-2:])


class _BodyMilterParser(im.MilterParser):
    """The module's milter parser, which also gives a body chunk's bytes (the module's milter
    never asks for the body)."""

    @staticmethod
    def _arguments(code, payload):
        if code == im.SMFIC_BODY:
            return (payload,)
        return im.MilterParser._arguments(code, payload)


SMFIP_HDR_LEADSPC = 0x100000    # header values keep their leading space, both ways


class LabServer:
    """A TCP server on a thread of the test process, at ``ip`` on a free port: each client
    it accepts goes to ``connected(sock)``."""

    def __init__(self, ip, name):
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind((ip, 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True, name=name).start()

    def close(self):
        self._listener.close()

    def _accept(self):
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self.connected(sock)


class LabVerifier(LabServer):
    """The receiver's verifier, a milter on a thread of the test process: for each message it
    computes SPF for the connecting IP and envelope sender, DKIM, and DMARC with relaxed
    alignment from the lab's DNS, adds Authentication-Results under ``hostname``, and refuses
    at the end of the message (550 5.7.1) when a p=reject domain fails DMARC and a recipient
    is in one of ``strict_domains``. Each verdict is also kept in ``verdicts``."""

    def __init__(self, dns, hostname, strict_domains):
        self.dkim, self.spf = require_mail_lab()
        self.dns, self.hostname, self.strict_domains = dns, hostname, set(strict_domains)
        self.verdicts = []
        self.errors = []
        super().__init__("127.0.0.1", "lab-verifier")

    def connected(self, sock):
        threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock):
        parser, state = _BodyMilterParser(), {"ip": "", "helo": ""}
        try:
            with sock:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    parser.feed(data)
                    for command in iter(parser.next_request, None):
                        reply = self._answer(state, command)
                        if reply:
                            sock.sendall(reply)
                        if command.code == im.SMFIC_QUIT:
                            return
        except Exception as e:          # shown by the test that waits for the message
            self.errors.append("%s: %s" % (type(e).__name__, e))

    def _answer(self, state, command):
        code, args = command
        if code == im.SMFIC_OPTNEG:
            return im.milter_packet(b"O", struct.pack("!III", 6, 0x01, SMFIP_HDR_LEADSPC))
        if code in (im.SMFIC_MACRO, im.SMFIC_ABORT, im.SMFIC_QUIT):
            return b""
        if code == im.SMFIC_CONNECT:
            state["ip"] = args[3]
        elif code == im.SMFIC_HELO:
            state["helo"] = args[0]
        elif code == im.SMFIC_MAIL:
            state.update(sender=args[0].strip("<>"), recipients=[], headers=[], body=[])
        elif code == im.SMFIC_RCPT:
            state["recipients"].append(args[0].strip("<>").lower())
        elif code == im.SMFIC_HEADER:
            state["headers"].append(args)
        elif code == im.SMFIC_BODY:
            state["body"].append(args[0])
        elif code == im.SMFIC_BODYEOB:
            return self._judge(state)
        return im.milter_packet(im.SMFIR_CONTINUE)

    def _judge(self, state):
        raw = lambda text: text.encode("utf-8", "surrogateescape")
        message = b"".join(raw(name) + b":" + raw(value).replace(b"\n", b"\r\n") + b"\r\n"
                           for name, value in state["headers"]) + b"\r\n" + b"".join(state["body"])
        sender = state["sender"]
        mail_domain = sender.rpartition("@")[2].lower() if sender else state["helo"].lower()
        spf_result = self.spf.check2(i=state["ip"], s=sender, h=state["helo"])[0]
        signatures = [value for name, value in state["headers"] if name.lower() == "dkim-signature"]
        dkim_results = []
        checker = self.dkim.DKIM(message, minkey=1024)
        for index, signature in enumerate(signatures):
            domain = (re.search(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", signature) or re.match("()", "")).group(1)
            try:
                good = checker.verify(idx=index, dnsfunc=self.dns.txt)
            except self.dkim.DKIMException:
                good = False
            dkim_results.append((domain.lower(), "pass" if good else "fail"))
        froms = email.utils.getaddresses([v for n, v in state["headers"] if n.lower() == "from"])
        from_domain = froms[0][1].rpartition("@")[2].lower() if len(froms) == 1 else ""
        record = self.dns.txt("_dmarc." + from_domain) or \
            self.dns.txt("_dmarc." + organizational_domain(from_domain))
        policy = re.search(rb"\bp=(\w+)", record or b"")
        policy = policy.group(1).decode() if policy else None
        aligned = lambda domain: organizational_domain(domain) == organizational_domain(from_domain)
        if not from_domain or policy is None:
            dmarc = "none"
        elif (spf_result == "pass" and aligned(mail_domain)) or \
                any(result == "pass" and aligned(domain) for domain, result in dkim_results):
            dmarc = "pass"
        else:
            dmarc = "fail"
        rejected = dmarc == "fail" and policy == "reject" and any(
            rcpt.rpartition("@")[2] in self.strict_domains for rcpt in state["recipients"])
        subject = next((v.strip() for n, v in state["headers"] if n.lower() == "subject"), "")
        self.verdicts.append(dict(subject=subject, ip=state["ip"], sender=sender, spf=spf_result,
                                  dkim=dkim_results, dmarc=dmarc, from_domain=from_domain,
                                  recipients=list(state["recipients"]), rejected=rejected))
        results = "; ".join(["spf=%s smtp.mailfrom=%s" % (spf_result, sender or mail_domain)]
                            + ["dkim=%s header.d=%s" % (r, d) for d, r in dkim_results]
                            + (["dkim=none"] if not dkim_results else [])
                            + ["dmarc=%s header.from=%s" % (dmarc, from_domain)])
        added = im.milter_packet(SMFIR_ADDHEADER, b"Authentication-Results\0 %s;\n\t%s\0" % (
            self.hostname.encode(), results.encode()))
        if rejected:
            return added + im.milter_reply("550 5.7.1 rejected by the DMARC policy of %s" % from_domain)
        return added + im.milter_packet(im.SMFIR_CONTINUE)

    def verdict(self, mark, timeout=15):
        """The verdict on the message whose Subject holds ``mark``."""
        found = wait_until(lambda: [v for v in self.verdicts if mark in v["subject"]], timeout)
        assert found, "the receiver judged no message %s (errors: %s)" % (mark, self.errors)
        return found[-1]


class Tap(LabServer):
    """A TCP relay in front of a server that keeps every byte its clients send: what the
    server receives, to search."""

    def __init__(self, ip, target):
        self.target = target
        self._received, self._lock = [], threading.Lock()
        super().__init__(ip, "lab-tap")

    def received(self):
        with self._lock:
            return b"".join(self._received)

    def connected(self, client):
        try:
            server = socket.create_connection(self.target, timeout=30)
        except OSError:
            client.close()
            return
        threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, sink, keep):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if keep:
                    with self._lock:
                        self._received.append(data)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            if not keep:
                source.close()
                sink.close()


class LabPostfix(PostfixInstance):
    """A PostfixInstance of the lab: its own loopback address (its smtpd listens there and its
    SMTP client sends from there, so SPF tells the instances apart), its own host name,
    virtual mailboxes named by their whole address (vmail/ADDRESS), and routes to the other
    instances (transport_maps)."""

    def __init__(self, root_dir, ip, hostname, mailboxes=(), routes=(), lines=(), domain="aliases.invalid"):
        super().__init__(root_dir, domain=domain, users=(), ip=ip)
        self.hostname, self.mailboxes = hostname, list(mailboxes)
        self.routes, self.lines = list(routes), list(lines)

    def _main_cf(self):
        domains = sorted({address.rpartition("@")[2] for address in self.mailboxes})
        settings = collections.OrderedDict()
        for line in super()._main_cf().splitlines() + [
            "myhostname = %s" % self.hostname,
            "mynetworks = 127.0.0.1/32",
            "smtp_bind_address = %s" % self.ip,
            "virtual_mailbox_domains = %s" % ", ".join(domains or ["mbox.invalid"]),
            "transport_maps = texthash:%s/transport" % self.config_dir,
        ] + self.lines:
            name, _, value = line.partition("=")
            settings[name.strip()] = value.strip()        # one line a setting: the last one wins
        return "".join("%s = %s\n" % setting for setting in settings.items())

    def create(self, map_text=""):
        os.makedirs(self.config_dir, exist_ok=True)
        self._write("transport", "".join("%s %s\n" % route for route in self.routes))
        super().create(map_text)
        self._write("vmailbox", "".join("%s %s\n" % (a, a) for a in self.mailboxes))
        return self

    def files(self):
        """Every byte it holds for mail: its mailboxes and its queue."""
        data = []
        for folder in ("vmail", "mail", "spool"):
            for path, _, names in os.walk(os.path.join(self.root_dir, folder)):
                for name in names:
                    try:
                        with open(os.path.join(path, name), "rb") as f:
                            data.append(f.read())
                    except OSError:
                        pass
        return b"".join(data)

    def queue_empty(self):
        return not any(files for folder in ("maildrop", "incoming", "active", "deferred", "hold")
                       for _, _, files in os.walk(os.path.join(self.root_dir, "spool", folder)))

    def messages(self, address):
        """The messages in a mailbox, each parsed (email.message.Message); none while a message
        is being written (virtual(8) ends each with an empty line)."""
        text = self.mailbox(address)
        if not text.endswith("\n\n"):
            return []
        return [email.message_from_string("From " + part) for part in re.split(r"(?m)^From ", text) if part.strip()]


LAB_SENDER_IP, LAB_FORWARDER_IP, LAB_RECEIVER_IP = "127.0.0.41", "127.0.0.42", "127.0.0.43"


def smtp_transaction(ip, port, mail_from, recipients, message=None, source=None, helo="client.pflab.test"):
    """One SMTP transaction on a new connection: ({recipient: (code, text)}, (code, text) of
    DATA, or None when no recipient was taken or there is no message)."""
    client = smtplib.SMTP(ip, port, local_hostname=helo, timeout=30,
                          source_address=(source, 0) if source else None)
    try:
        client.ehlo()
        code, text = client.mail(mail_from)
        assert code == 250, (code, text)
        answers = {}
        for recipient in recipients:
            code, text = client.rcpt(recipient)
            answers[recipient] = (code, _decode(text))
        data = None
        if message is not None and any(code in (250, 251) for code, _ in answers.values()):
            try:
                code, text = client.data(message)
            except smtplib.SMTPResponseException as e:
                code, text = e.smtp_code, e.smtp_error
            data = (code, _decode(text))
        return answers, data
    finally:
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


class MailLabTestCase(unittest.TestCase):
    """Three private Postfix instances on loopback, each with an address of its own, and the
    daemon for the forwarder (MilterListen, PolicyListen; ReplyAddresses as the class says):

    - the sender's MX, 127.0.0.41, mx.shop.example: mailboxes at shop.example (which signs with
      DKIM and publishes DMARC p=reject) and plain.example (p=reject, no DKIM); it receives
      every bounce, DSN and reply addressed to a sender, behind a Tap that keeps every byte;
      the senders send from its address straight to the forwarder;
    - the forwarder, 127.0.0.42, mail.incognito.test (SPF: ip4:127.0.0.42), with the daemon;
      the admin's own map line friend@incognito.test -> friend@gmail.example;
    - the receiver, the owners' provider, 127.0.0.43, mx.gmail.example: mailboxes at
      gmail.example (which reports) and strict.example (which refuses DMARC failures of
      p=reject domains); LabVerifier judges every message it takes; OWNER_ALIASES and a route
      to ``error:5.2.2 mailbox full`` make late bounces; the owners send through it.
    """

    REPLY_ADDRESSES = "yes"
    OWNERS = ()                 # the receiver's mailboxes
    OWNER_ALIASES = ()          # (address, target) in the receiver's virtual map
    SENDER_MAILBOXES = ("news@shop.example", "orders@shop.example", "news@plain.example",
                        "sales@plain.example")

    @classmethod
    def setUpClass(cls):
        cls.dkim, spf = require_mail_lab()
        folder = make_folder(prefix="incognitomail-test-lab-")
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.dkim_key, public_key = dkim_key(folder)
        cls.dns = LabDns({
            "shop.example": ["v=spf1 ip4:%s -all" % LAB_SENDER_IP],
            "_dmarc.shop.example": ["v=DMARC1; p=reject"],
            "sel._domainkey.shop.example": ["v=DKIM1; k=rsa; p=%s" % public_key],
            "plain.example": ["v=spf1 ip4:%s -all" % LAB_SENDER_IP],
            "_dmarc.plain.example": ["v=DMARC1; p=reject"],
            "incognito.test": ["v=spf1 ip4:%s -all" % LAB_FORWARDER_IP],
            "mail.incognito.test": ["v=spf1 ip4:%s -all" % LAB_FORWARDER_IP],
            "_dmarc.incognito.test": ["v=DMARC1; p=none"],
            "gmail.example": ["v=spf1 ip4:%s -all" % LAB_RECEIVER_IP],
            "_dmarc.gmail.example": ["v=DMARC1; p=none"],
        })
        patcher = mock.patch.object(spf, "DNSLookup", cls.dns.lookup)
        patcher.start()
        cls.addClassCleanup(patcher.stop)
        cls.verifier = LabVerifier(cls.dns, "mx.gmail.example", ["strict.example"])
        cls.addClassCleanup(cls.verifier.close)
        milter_port, policy_port = free_port(), free_port()
        cls.sender = LabPostfix(os.path.join(folder, "sender"), LAB_SENDER_IP, "mx.shop.example",
                                mailboxes=cls.SENDER_MAILBOXES)
        cls.forwarder = LabPostfix(os.path.join(folder, "forwarder"), LAB_FORWARDER_IP, "mail.incognito.test",
                                   domain="incognito.test", lines=[
                                       "recipient_delimiter = +",
                                       "propagate_unmatched_extensions = canonical",
                                       "smtpd_milters = inet:127.0.0.1:%d" % milter_port,
                                       "non_smtpd_milters = inet:127.0.0.1:%d" % milter_port,
                                       "internal_mail_filter_classes = bounce",
                                       "milter_default_action = tempfail",
                                       "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:%d"
                                       % policy_port])
        cls.receiver = LabPostfix(os.path.join(folder, "receiver"), LAB_RECEIVER_IP, "mx.gmail.example",
                                  mailboxes=("friend@gmail.example",) + tuple(cls.OWNERS), lines=[
                                      "smtpd_milters = inet:127.0.0.1:%d" % cls.verifier.port,
                                      "milter_default_action = tempfail"])
        for instance in (cls.sender, cls.forwarder, cls.receiver):
            cls.addClassCleanup(instance.destroy)
        cls.tap = Tap(LAB_SENDER_IP, (LAB_SENDER_IP, cls.sender.port))
        cls.addClassCleanup(cls.tap.close)
        to_sender = "smtp:[%s]:%d" % (LAB_SENDER_IP, cls.tap.port)
        to_receiver = "smtp:[%s]:%d" % (LAB_RECEIVER_IP, cls.receiver.port)
        cls.forwarder.routes = [("shop.example", to_sender), ("plain.example", to_sender),
                                ("gmail.example", to_receiver), ("strict.example", to_receiver)]
        cls.receiver.routes = [("incognito.test", "smtp:[%s]:%d" % (LAB_FORWARDER_IP, cls.forwarder.port)),
                               ("shop.example", to_sender), ("plain.example", to_sender),
                               ("full.example", "error:5.2.2 mailbox full")]
        cls.sender.create().start()
        cls.receiver.create("".join("%s %s\n" % alias for alias in cls.OWNER_ALIASES)).start()
        cls.forwarder.create("friend@incognito.test friend@gmail.example\n").start()
        cls.site = Site(make_folder(prefix="incognitomail-test-lab-site-"), map_path=cls.forwarder.map_path,
                        config_dir=cls.forwarder.config_dir, domains="incognito.test", sections={"General": {
                            "MilterListen": "inet:127.0.0.1:%d" % milter_port,
                            "PolicyListen": "inet:127.0.0.1:%d" % policy_port,
                            "ReplyAddresses": cls.REPLY_ADDRESSES}})
        cls.addClassCleanup(shutil.rmtree, cls.site.folder, True)
        cls.daemon = DaemonProcess(cls.site)
        cls.addClassCleanup(cls.daemon.stop)
        cls.daemon.start().wait_serving()

    # -- the senders, the owners and what they hold ----------------------------------------------

    def new_owner(self, address):
        """A new account for ``address`` and a handle of it."""
        token = new_account(self.site, address)
        return token, new_handle(self.site, token)

    def message(self, sender, to, mark, headers=(), sign=False, name="Shop News"):
        """A message as a sender's mail program writes it (DKIM-signed by shop.example's MX
        when ``sign``), with ``mark`` in its Subject and body."""
        lines = [("From", '"%s" <%s>' % (name, sender) if name else sender), ("To", to),
                 ("Subject", "Your order %s" % mark), ("Date", email.utils.formatdate()),
                 ("Message-ID", "<%s@%s>" % (mark, sender.rpartition("@")[2]))] + list(headers)
        data = ("".join("%s: %s\r\n" % line for line in lines) + "\r\nHello, this is %s.\r\n" % mark).encode()
        if sign:
            data = self.dkim.sign(data, b"sel", sender.rpartition("@")[2].encode(), self.dkim_key,
                                  canonicalize=(b"relaxed", b"relaxed"),
                                  include_headers=[b"from", b"to", b"subject", b"date", b"message-id"]) + data
        return data

    def send_to_forwarder(self, sender, recipients, message):
        """From the sender's own address, as its MX would send: (RCPT answers, DATA answer)."""
        return smtp_transaction(self.forwarder.ip, self.forwarder.port, sender, recipients, message,
                                source=LAB_SENDER_IP, helo="mx.%s" % (sender.rpartition("@")[2] or "shop.example"))

    def send_from_owner(self, owner, recipients, message):
        """From the owner, through their provider (the receiver relays for 127.0.0.1)."""
        return smtp_transaction(self.receiver.ip, self.receiver.port, owner, recipients, message,
                                helo="laptop.home.example")

    def forward(self, owner, handle, sender="news@shop.example", sign=True, headers=()):
        """A sender's message to ``handle``, accepted by the forwarder: its mark."""
        mark = uuid.uuid4().hex
        answers, data = self.send_to_forwarder(sender, [handle], self.message(sender, handle, mark, headers, sign))
        self.assertEqual((answers[handle][0], data and data[0]), (250, 250), (answers, data))
        return mark

    def delivered(self, instance, address, mark, timeout=20):
        """The message holding ``mark`` in ``address``'s mailbox, once it is there."""
        found = wait_until(lambda: [m for m in instance.messages(address) if mark in (
            m.as_string() if m.is_multipart() else m.get_payload())], timeout, 0.02)
        self.assertTrue(found, "no message %s reached %s;\nforwarder: %s\nreceiver: %s\nverifier: %s" % (
            mark, address, self.forwarder.maillog()[-3000:], self.receiver.maillog()[-2000:],
            self.verifier.errors))
        return found[-1]

    def settled(self, timeout=20):
        """Until no instance holds mail in its queue (every bounce made and delivered)."""
        instances = (self.sender, self.forwarder, self.receiver)
        done = wait_until(lambda: all(i.queue_empty() for i in instances), timeout, 0.05)
        self.assertTrue(done, "mail still queued:\n%s" % self.forwarder.maillog()[-3000:])

    def assert_sender_never_learns(self, owner):
        """Nothing the sender's MX received over SMTP or holds names the owner (not even the local
        part of their address)."""
        self.settled()
        local = owner.partition("@")[0].lower().encode()
        self.assertNotIn(local, self.tap.received().lower())
        self.assertNotIn(local, self.sender.files().lower())

    def counts(self, token, handle):
        return handles_of(self.site, token)[handle]

    def wait_count(self, token, handle, column, value, timeout=15):
        self.assertTrue(wait_until(lambda: self.counts(token, handle)[column] >= value, timeout, 0.1),
                        "%s never reached %d: %s\n%s" % (column, value, self.counts(token, handle),
                                                         self.forwarder.maillog()[-2000:]))

    def assert_verdict(self, mark, **expected):
        verdict = self.verifier.verdict(mark)
        self.assertEqual({key: verdict[key] for key in expected}, expected, verdict)
        return verdict


###############################################################################
# Test support: servers and daemons for the tests' clients, as base TestCases
###############################################################################

def server_options(**options):
    """Decorates a LoopbackTestCase test: its server takes these WebSocketConnection options."""
    def decorate(test):
        test.server_options = options
        return test
    return decorate


class LoopbackTestCase(unittest.IsolatedAsyncioTestCase):
    """Starts an echo server on 127.0.0.1; each test talks to it with raw bytes."""
    options = {}
    echo = True   # False: the server only accepts and keeps the connection

    async def asyncSetUp(self):
        self.sockets = []            # connections whose handshake succeeded
        self.server_results = []     # one None for each of them that has ended
        self.client_writers = []
        self.opened, self.ended = asyncio.Event(), asyncio.Event()   # some connection's opened(), closed()
        options = dict(path='/ws', allowed_origins=(), max_message_size=1 << 20,
                       idle_timeout=5.0, close_timeout=1.0)
        options.update(self.options)
        options.update(getattr(getattr(self, self._testMethodName), 'server_options', {}))
        test = self

        class Connection(im.WebSocketConnection):
            def opened(self, request):
                test.sockets.append(self)
                test.opened.set()

            def message_received(self, message):
                if test.echo:
                    self.send(message)

            def closed(self):
                if self in test.sockets:
                    test.server_results.append(None)
                test.ended.set()

        self.server = await asyncio.get_running_loop().create_server(lambda: Connection(**options), '127.0.0.1', 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def asyncTearDown(self):
        for writer in self.client_writers:   # 3.12+ wait_closed() waits for every connection
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def connect(self, head=None):
        reader, writer = await asyncio.open_connection('127.0.0.1', self.port)
        self.client_writers.append(writer)
        writer.write(upgrade_head() if head is None else head)
        return reader, writer

    async def open(self):
        reader, writer = await self.connect()
        response = await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), 5)
        self.assertTrue(response.startswith(b'HTTP/1.1 101 '), response)
        await self.wait_for(self.opened, 'the server never opened the connection')
        return reader, writer

    async def wait_for(self, event, problem, seconds=2.0):
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except asyncio.TimeoutError:
            self.fail('%s within %s s' % (problem, seconds))

    async def wait_closed(self, seconds=2.0):
        """Until the server's connection has ended: then it is the one connection that ended."""
        await self.wait_for(self.ended, "the server's connection did not end", seconds)
        self.assertEqual(self.server_results, [None])

    async def wait_for_eof(self, reader):
        self.assertEqual(await asyncio.wait_for(reader.read(), 5), b'')

    async def wait_for_end(self, reader):
        """Until the server ends the connection, by a close or a reset; nothing more is said."""
        try:
            data = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            return
        self.assertEqual(data, b'')


class WebSocketDaemonTestCase(unittest.TestCase):
    """A daemon with its WebSocket endpoint on a free loopback port, plus one account."""

    limits = {}
    general = {}

    def daemon_env(self):
        return None

    def setUp(self):
        require_postfix()
        self.port = free_port()
        general = {"ListenAddress": "127.0.0.1:%d" % self.port}
        general.update(self.general)
        self.site = make_site(self, sections={"General": general, "Limits": dict(self.limits)})
        self.daemon = start_daemon(self, self.site, env=self.daemon_env())
        self.token = new_account(self.site)

    def client(self, **kwargs):
        client = WsClient(self.port, **kwargs)
        self.addCleanup(client.close)
        return client

    def raw_http(self, request):
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data.decode("latin-1")
                data += chunk


class HttpApiTestCase(WebSocketDaemonTestCase):
    """A daemon serving the HTTP API on its WebSocket listener, plus one account."""

    def http(self, **kwargs):
        client = HttpClient(self.port, **kwargs)
        self.addCleanup(client.close)
        return client

    def check_reply(self, reply):
        """What every reply of the API must be: never a redirect, never a cookie, not cached,
        JSON whenever it has a body, and no token in it."""
        self.assertFalse(300 <= reply.status < 400, reply)
        self.assertNotIn("set-cookie", reply.headers)
        self.assertEqual(reply.headers.get("cache-control"), "no-store", reply)
        if reply.body:
            self.assertEqual(reply.headers.get("content-type", "").split(";")[0],
                             "application/json", reply)
            reply.json()
        self.assertNotIn(self.token.encode(), reply.body)
        return reply

    def call(self, method, target, headers=(), body=None, source=None):
        """One request on a new connection, as Bitwarden makes them."""
        client = HttpClient(self.port, source=source)
        try:
            return self.check_reply(client.request(method, target, headers, body))
        finally:
            client.close()

    def addy(self, method, path, body=None, token=_OWN, source=None, xhr=False, headers=()):
        token = self.token if token is _OWN else token
        return self.call(method, path, bitwarden_headers(addy_auth(token), xhr) + list(headers),
                         body, source)

    def simplelogin(self, method, path, body=None, token=_OWN, source=None, xhr=False,
                    headers=()):
        token = self.token if token is _OWN else token
        return self.call(method, path,
                         bitwarden_headers(simplelogin_auth(token), xhr) + list(headers), body,
                         source)

    def new_alias(self, description=BITWARDEN_NOTE, token=_OWN, domain="incognito.test",
                  source=None):
        """Bitwarden's addy.io forwarder: POST /api/v1/aliases {domain, description}."""
        reply = self.addy("POST", "/api/v1/aliases", {"domain": domain, "description": description},
                          token, source)
        self.assertEqual(reply.status, 201, reply)
        return reply.json()["data"]

    def listed(self, token=None):
        """The handles of the test's account (or ``token``'s) as list --json prints them."""
        return list(listed(self, self.site, token or self.token).values())

    def assert_error(self, reply, status, dialect):
        """A JSON error a person can act on, in the dialect's shape."""
        self.assertEqual(reply.status, status, reply)
        body = reply.json()
        key = "error" if dialect == im.SIMPLELOGIN else "message"
        self.assertIsInstance(body.get(key), str, body)
        self.assertGreater(len(body[key]), 5, body)
        self.assertEqual(reply.headers.get("access-control-allow-origin"), "*", reply)
        return body[key]


class HoldingTestCase(unittest.TestCase):
    """A daemon that needs no Postfix (the socketmap: Postfix asks the daemon, no map file),
    with its WebSocket endpoint, policy service and socketmap, and one account.

    Subclasses set ``general`` and ``limits`` keys, module ``constants`` (DaemonProcess), an
    open-file limit ``nofile`` (soft, hard), and seed the database in ``prepare``.
    """

    general = {}
    limits = {}
    constants = {}
    nofile = None

    def setUp(self):
        self.port, self.policy_port = free_port(), free_port()
        general = {"ListenAddress": "127.0.0.1:%d" % self.port,
                   "PolicyListen": "inet:127.0.0.1:%d" % self.policy_port}
        general.update(self.general_keys())
        self.site = socketmap_site(self, sections={"General": general, "Limits": dict(self.limits)})
        self.socketmap_path = self.site.config.socketmap_listen[len("unix:"):]
        self.prepare()
        self.daemon = start_daemon(self, self.site, constants=self.constants,
                                   preexec_fn=open_file_limit(*self.nofile) if self.nofile else None)
        self.daemon.wait_serving()
        self.token = new_account(self.site)

    def general_keys(self):
        return dict(self.general)

    def prepare(self):
        """Before the daemon starts."""

    def client(self, **kwargs):
        client = WsClient(self.port, **kwargs)
        self.addCleanup(client.close)
        return client

    def socketmap(self):
        sock = connect_unix(self.socketmap_path)
        self.addCleanup(sock.close)
        return sock

    def policy(self):
        sock = socket.create_connection(("127.0.0.1", self.policy_port), timeout=10)
        self.addCleanup(sock.close)
        return sock

    def flood(self, count):
        """``count`` connections to the WebSocket listener that never say anything; each is
        accepted (and counted) or refused at once: none is left waiting to be accepted."""
        flood = []
        for _ in range(count):
            flood.append(socket.create_connection(("127.0.0.1", self.port), timeout=10))
            self.addCleanup(flood[-1].close)
        self.assertTrue(wait_until(lambda: accept_queue(self.port) == 0, timeout=5),
                        "%s connections still wait to be accepted after 5 s"
                        % accept_queue(self.port))
        return flood

    def assert_quick(self, what, function, seconds=1.0):
        """``function()`` returns within ``seconds``; its result."""
        started = time.monotonic()
        result = function()
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, seconds, "%s took %.2f s" % (what, elapsed))
        return result

    def assert_others_answered(self, web=True):
        """While an attack holds: a new client makes a handle (unless ``web`` is False: the
        WebSocket listener is full), the socketmap and the policy service answer, and so does
        the command line, each within a second."""
        handle = self.assert_quick("the command line's new handle",
                                   lambda: new_handle(self.site, self.token))

        def new_client_handle():
            client = WsClient(self.port, source="127.0.0.99")
            try:
                return client.request(id=1, op="new_handle", token=self.token)
            finally:
                client.close()
        if web:
            reply = self.assert_quick("a new client's new handle", new_client_handle)
            self.assertTrue(reply.get("ok"), reply)

        def socketmap_lookup():
            with connect_unix(self.socketmap_path) as sock:
                return socketmap_ask(sock, handle)
        self.assertEqual(self.assert_quick("a socketmap lookup", socketmap_lookup),
                         b"OK alice@example.org")

        self.assertEqual(self.assert_quick("a policy lookup", lambda: ask_policy(self.policy_port, handle)),
                         "action=DUNNO\n\n")
        status = self.assert_quick("the command line's status", lambda: control(self.site, "status"))
        self.assertEqual(status["status"]["pid"], self.daemon.pid)


class TlsTestCase(HoldingTestCase):
    """The WebSocket endpoint over TLS (wss://), with one certificate for the class."""

    @classmethod
    def setUpClass(cls):
        require_openssl()
        folder = make_folder(prefix="incognitomail-test-tls-")
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.cert, cls.key = make_certificate(folder)

    def general_keys(self):
        return dict(self.general, TLSCertFile=self.cert, TLSKeyFile=self.key)

    def tls_client(self, source):
        client = WsClient(self.port, source=source,
                          tls_context=ssl.create_default_context(cafile=self.cert))
        self.addCleanup(client.close)
        return client

    def try_tls_client(self, source):
        try:
            return self.tls_client(source)
        except (OSError, ConnectionError):
            return None

    def bare(self, source="127.0.0.1", timeout=5):
        """A TCP connection that never starts its TLS handshake."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout,
                                        source_address=(source, 0))
        self.addCleanup(sock.close)
        return sock


###############################################################################
# Test support: headless Chromium over the DevTools protocol (for the owner page)
###############################################################################

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0")


def open_in_chromium(testcase, url):
    """Headless Chromium on a fresh profile showing ``url`` until the test ends."""
    profile = os.path.join(make_folder(testcase), "profile")
    browser = subprocess.Popen([require_chromium()] + list(CHROMIUM_FLAGS) + ["--user-data-dir=" + profile, url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    testcase.addCleanup(browser.wait)
    testcase.addCleanup(browser.kill)
    return browser


class Chromium:
    """Headless Chromium on a fresh profile, its one page driven over the DevTools protocol.

    Every event is kept in ``events`` ({"method", "params"}) for the checks afterwards: the
    URLs the page asked for, CSP violations (Log.entryAdded, source "security"), uncaught
    exceptions, dialogs. The protocol's WebSocket is a WsClient: no driver to install.
    """

    KEYS = {"Tab": ("Tab", 9, ""), "Enter": ("Enter", 13, "\r"), " ": ("Space", 32, " "),
            "Escape": ("Escape", 27, "")}

    def __init__(self, folder):
        self.profile = tempfile.mkdtemp(prefix="profile-", dir=folder)
        self.proc = subprocess.Popen(
            [require_chromium()] + list(CHROMIUM_FLAGS) + ["--user-data-dir=" + self.profile, "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)                 # its own process group: see close()
        self.events, self.next_id, self.ws = [], 0, None
        try:
            port, path = self._page_target()
            self.ws = WsClient(port, path=path, timeout=60)
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(domain + ".enable")
            self.send("Emulation.setFocusEmulationEnabled", enabled=True)   # focus, clipboard
        except BaseException:
            self.close()
            raise

    def _page_target(self):
        """(port, path) of the page's DevTools WebSocket: DevToolsActivePort, then /json/list."""
        def target():
            if self.proc.poll() is not None:
                raise AssertionError("chromium exited with status %s" % self.proc.returncode)
            try:
                with open(os.path.join(self.profile, "DevToolsActivePort")) as f:
                    port = int(f.readline())
                with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=5) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
            except (OSError, ValueError):
                return None
            return pages and (port, pages[0]["webSocketDebuggerUrl"].split(str(port), 1)[1])
        found = wait_until(target, timeout=30, interval=0.05)
        if not found:
            raise AssertionError("chromium offered no page to drive within 30 s")
        return found

    def _message(self, timeout):
        """The next message from Chromium, or None when none starts within ``timeout`` s."""
        if not self.ws.buffer and not select.select([self.ws.sock], [], [], max(timeout, 0))[0]:
            return None
        opcode, payload = self.ws.recv_frame()      # Chromium sends each message as one frame
        if opcode == 0x8:
            raise AssertionError("chromium closed the DevTools connection")
        return json.loads(payload) if opcode == 0x1 else {}

    def send(self, method, timeout=30, **params):
        """Run one command and return its result; events that arrive meanwhile are kept."""
        self.next_id += 1
        me, deadline = self.next_id, time.monotonic() + timeout
        self.ws.send_json(id=me, method=method, params=params)
        while True:
            message = self._message(deadline - time.monotonic())
            if message is None:
                raise AssertionError("%s: no answer from chromium within %d s" % (method, timeout))
            if "method" in message:
                self.events.append(message)
            elif message.get("id") == me:
                if "error" in message:
                    raise AssertionError("%s: %s" % (method, message["error"]))
                return message.get("result", {})

    def wait_event(self, method, predicate=lambda params: True, start=0, timeout=10):
        """Params of the first ``method`` event from events[start:] on that ``predicate`` likes."""
        deadline, seen = time.monotonic() + timeout, start
        while True:
            for event in self.events[seen:]:
                if event["method"] == method and predicate(event["params"]):
                    return event["params"]
            seen = len(self.events)
            message = self._message(deadline - time.monotonic())
            if message is None:
                raise AssertionError("no %s event within %d s" % (method, timeout))
            if "method" in message:
                self.events.append(message)

    def js(self, expression):
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError("%s: %s" % (expression, (details.get("exception") or {}).get(
                "description") or details.get("text")))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=10):
        """Poll ``expression`` until it is true; return that value, or the last one."""
        return wait_until(lambda: self.js(expression), timeout, 0.02)

    def navigate(self, url):
        start = len(self.events)
        error = self.send("Page.navigate", url=url).get("errorText")
        if error:
            raise AssertionError("cannot load %s: %s" % (url, error))
        self.wait_event("Page.loadEventFired", start=start)

    def viewport(self, width, height=800, dark=False):
        """Stays in force until changed; below 500 px wide, a phone (overlay scrollbars)."""
        self.size = (width, height, dark)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=width < 500)
        self.send("Emulation.setEmulatedMedia", features=[
            {"name": "prefers-color-scheme", "value": "dark" if dark else "light"}])

    def screenshot(self, path):
        """The whole page as a PNG: the viewport is as high as the page for the shot."""
        width, height, dark = self.size
        self.viewport(width, self.js("document.documentElement.scrollHeight"), dark)
        shot = self.send("Page.captureScreenshot", format="png")["data"]
        self.viewport(width, height, dark)
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot))

    def click(self, element):
        """A real mouse click in the middle of ``element`` (a JavaScript expression), scrolled
        into view first: a hidden or covered control does not get it."""
        where = ("(() => { const e = %s; e.scrollIntoView({block: 'center'}); "
                 "const r = e.getBoundingClientRect(); "
                 "return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()"
                 % element)
        spots = [None]

        def settled():     # shown, and where it was a moment ago (nothing moves it any more)
            spots.append(self.js(where))
            return spots[-1] is not None and spots[-1] == spots[-2]
        wait_until(settled, 5, 0.03)
        x, y = spots[-1] or (0, 0)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press(self, key):
        """One key: "Tab", "Enter", " ", "Escape" or a printable character."""
        code, number, text = self.KEYS.get(key) or ("", ord(key.upper()) * key.isalnum(), key)
        event = dict(key=key, code=code, windowsVirtualKeyCode=number)
        self.send("Input.dispatchKeyEvent", type="keyDown" if text else "rawKeyDown",
                  text=text, **event)
        self.send("Input.dispatchKeyEvent", type="keyUp", **event)

    def type(self, text):
        """Key presses, one per character; "\n" is Enter."""
        for character in text:
            self.press("Enter" if character == "\n" else character)

    def paste(self, text):
        self.send("Input.insertText", text=text)

    # -- what the page did -----------------------------------------------------------------

    def requested_urls(self):
        """Every URL the page asked for, blocked ones too, WebSockets included."""
        return ([e["params"]["request"]["url"] for e in self.events
                 if e["method"] == "Network.requestWillBeSent"]
                + [e["params"]["url"] for e in self.events
                   if e["method"] == "Network.webSocketCreated"])

    def csp_violations(self):
        return [e["params"]["entry"]["text"] for e in self.events
                if e["method"] == "Log.entryAdded" and e["params"]["entry"]["source"] == "security"]

    def exceptions(self):
        return [(e["params"]["exceptionDetails"].get("exception") or {}).get(
            "description", e["params"]["exceptionDetails"]["text"]) for e in self.events
            if e["method"] == "Runtime.exceptionThrown"]

    def close(self):
        if self.ws is not None:
            self.ws.sock.close()
        try:                    # the browser and its renderers: the process group it leads
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


def element(css):
    """A JavaScript expression for the page's first element matching ``css``."""
    return "document.querySelector(%s)" % json.dumps(css)


HOSTILE_LABEL = "<img src=x onerror=alert(1)>"


# What the page looks like at the current viewport: how wide it is, the controls that stick out
# of it, the body's relative luminance and its text's contrast (WCAG 2 formulas).
LAYOUT_PROBE = """(() => {
  const lum = (color) => { const [r, g, b] = color.match(/[0-9.]+/g).slice(0, 3).map((v) => {
    v = v / 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const style = getComputedStyle(document.body), width = innerWidth;
  const bg = lum(style.backgroundColor), fg = lum(style.color);
  const outside = [...document.querySelectorAll('button, input, select, summary, code, output')]
    .filter((e) => e.getClientRects().length).map((e) => [e, e.getBoundingClientRect()])
    .filter(([e, r]) => r.left < -0.5 || r.right > width + 0.5)
    .map(([e, r]) => (e.id || e.dataset.test || e.tagName) + ' ' + Math.round(r.right));
  return {scroll: document.documentElement.scrollWidth, width, outside, background: bg,
          contrast: (Math.max(bg, fg) + 0.05) / (Math.min(bg, fg) + 0.05)};
})()"""


class OwnerPageDriver:
    """Mixin for a TestCase: one headless Chromium per class, and the owner page used as its
    owner uses it (real clicks and keys), against a daemon the test starts."""

    @classmethod
    def setUpClass(cls):
        require_chromium()
        super().setUpClass()
        folder = make_folder(prefix="incognitomail-test-browser-")
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.browser = Chromium(folder)
        cls.addClassCleanup(cls.browser.close)

    def setUp(self):
        super().setUp()
        self.browser.viewport(1280, 900)
        self.browser.events.clear()

    def listen_sections(self, **limits):
        """Sections putting the owner page on a free loopback port (``self.origin``)."""
        self.port = free_port()
        self.origin = "http://127.0.0.1:%d" % self.port
        return {"General": {"ListenAddress": "127.0.0.1:%d" % self.port},
                "Limits": {key: str(value) for key, value in limits.items()}}

    def page_site(self, **limits):
        """A site serving the page, needing no Postfix (its map is a socketmap)."""
        return socketmap_site(self, sections=self.listen_sections(**limits))

    def open_page(self):
        b = self.browser
        b.send("Browser.grantPermissions", origin=self.origin,
               permissions=["clipboardReadWrite", "clipboardSanitizedWrite"])
        b.navigate(self.origin + "/")
        self.assertTrue(b.wait_for("document.body.dataset.state"), "the page never started")

    def sign_in(self, token, remember=False):
        """Paste the token and sign in; wait for the first list of handles."""
        b = self.browser
        b.click(element("#token"))
        b.paste(token)
        if remember:
            b.click(element("#remember"))
        b.click(element("#sign-in"))
        self.assertTrue(b.wait_for("document.body.dataset.state === 'signed-in' "
                                   "&& +document.body.dataset.loaded >= 1"),
                        "not signed in: %r" % self.text("#sign-in-error"))
        self.assertNotIn(token, b.js("document.documentElement.outerHTML"))

    def text(self, css):
        return self.browser.js(element(css) + ".textContent")

    def shown(self, css):
        return self.browser.js("!%s.closest('[hidden]')" % element(css))

    def loads(self):
        return self.browser.js("+(document.body.dataset.loaded || 0)")

    def wait_loaded(self, before):
        self.assertTrue(self.browser.wait_for("+document.body.dataset.loaded > %d" % before),
                        "the list did not load again")

    def row(self, address, test=None):
        """A JavaScript expression: the handle's row on the page (a <tbody>), or one of its
        [data-test] parts; undefined when the handle is not on the page."""
        found = ("[...document.querySelectorAll('#handles [data-handle-id]')].find(t => "
                 "t.querySelector('[data-test=address]').textContent === %s)" % json.dumps(address))
        return found if test is None else "%s?.querySelector('[data-test=%s]')" % (found, test)

    def addresses(self):
        return self.browser.js("[...document.querySelectorAll('#handles [data-test=address]')]"
                               ".map(a => a.textContent)")

    def stored(self):
        """Every value in the page's sessionStorage and localStorage."""
        return self.browser.js("({session: Object.values(sessionStorage), "
                               "local: Object.values(localStorage)})")

    def tab_to(self, css, limit=40):
        """Press Tab until ``css`` has the focus; every element on the way shows that it has.
        (Past the last one, the focus leaves the page for a step: the body.)"""
        for _ in range(limit):
            self.browser.press("Tab")
            focused = self.browser.js(
                "(() => { const e = document.activeElement, s = getComputedStyle(e); return {"
                "match: e.matches(%s), ring: e === document.body || s.outlineStyle !== 'none'"
                " && s.outlineWidth !== '0px',"
                " name: e.id || e.dataset.test || e.tagName}; })()" % json.dumps(css))
            self.assertTrue(focused["ring"], "%s has the focus, unseen" % focused["name"])
            if focused["match"]:
                return
        self.fail("Tab never reached %s" % css)

    def clipboard(self):
        return self.browser.js("navigator.clipboard.readText()")

    def assert_fits(self, name, shots=((360, False), (360, True), (1280, False), (1280, True))):
        """The page as it is now fits 360 and 1280 px wide, light and dark: nothing wider than
        the screen or outside it, the right background, text contrast 7:1 or more. With
        INCOGNITOMAIL_SCREENSHOTS naming a folder, ``shots`` (width, dark) are saved there."""
        b = self.browser
        folder = os.environ.get(SCREENSHOTS_VARIABLE)
        for width, dark in ((360, False), (360, True), (1280, False), (1280, True)):
            shot = "%s-%d-%s" % (name, width, "dark" if dark else "light")
            b.viewport(width, 800, dark)
            b.js("new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
            look = b.js(LAYOUT_PROBE)
            self.assertLessEqual(look["scroll"], width, "%s: wider than the screen" % shot)
            self.assertEqual(look["outside"], [], "%s: controls outside the screen" % shot)
            if dark:
                self.assertLess(look["background"], 0.05, "%s: not dark" % shot)
            else:
                self.assertGreater(look["background"], 0.8, "%s: not light" % shot)
            self.assertGreaterEqual(look["contrast"], 7, shot)
            if folder and (width, dark) in shots:
                os.makedirs(folder, exist_ok=True)
                b.screenshot(os.path.join(folder, "owner-page-%s.png" % shot))
        b.viewport(1280, 900)

    def assert_page_behaved(self, *secrets):
        """No request to another origin, no CSP violation, no uncaught exception, no dialog,
        and no secret in any URL the page asked for or in the page's markup."""
        b = self.browser
        ours = ("http://127.0.0.1:%d/" % self.port, "ws://127.0.0.1:%d/" % self.port)
        urls = b.requested_urls()
        self.assertTrue(urls)
        self.assertEqual([url for url in urls if not url.startswith(ours)], [])
        self.assertEqual(b.csp_violations(), [])
        self.assertEqual(b.exceptions(), [])
        self.assertEqual([e for e in b.events if e["method"] == "Page.javascriptDialogOpening"], [])
        markup = b.js("document.documentElement.outerHTML")
        for secret in secrets:
            self.assertEqual([url for url in urls if secret in url], [])
            self.assertNotIn(secret, markup)


class PageServer(http.server.ThreadingHTTPServer):
    """A page of another origin: serves it at /, takes what it POSTs to /result."""

    def __init__(self, page):
        self.page = page.encode("utf-8")
        self.results = []
        self.posted = threading.Event()
        super().__init__(("127.0.0.1", 0), PageHandler)

    @property
    def origin(self):
        return "http://127.0.0.1:%d" % self.server_address[1]


class PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.server.page)))
        self.end_headers()
        self.wfile.write(self.server.page)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.results.append(json.loads(body))
        self.server.posted.set()
        self.send_response(204)
        self.end_headers()

    def log_message(self, format, *args):
        pass


###############################################################################
# Errors, and the operating-system helpers every section uses
###############################################################################

class SymlinkTest(PostmapTestCase):
    """Symlinks planted where the daemon writes are never followed."""

    def assert_untouched(self, victim, content, mode):
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), content, "the victim was written")
        self.assertEqual(stat.S_IMODE(os.stat(victim).st_mode), mode, "the victim's mode changed")

    def test_symlinks_at_the_old_temp_names_are_not_followed_by_a_rewrite_or_a_rebuild(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        victim, content, mode = plant_victim(self)
        folder, base = os.path.dirname(site.map_path), os.path.basename(site.map_path)
        planted = [os.path.join(folder, "." + base + suffix) for suffix in (
            ".incognitomail-tmp", ".incognitomail-rebuild", ".incognitomail-rebuild.db")]
        for link in planted:
            os.symlink(victim, link)
        fixture = self.start_service(site)               # a first map: a rebuild
        token = fixture.result("new_account", address="me@example.org")
        handles = [fixture.result("new_handle", token=token).address for _ in range(3)]
        fixture.result("delete_handle", token=token, address=handles[0])
        fixture.stop()                                   # rewrites the text file (flush_text)
        self.assertNotIn(handles[0], site.map_text().decode("utf-8", "replace"))
        os.unlink(site.indexed_path)                     # a full rebuild at the next start
        self.start_service(site).stop()
        self.assert_untouched(victim, content, mode)
        for link in planted:
            self.assertEqual(os.readlink(link), victim)
        self.assertFalse(os.path.islink(site.map_path))
        self.assertTrue(site.map_text().startswith(ADMIN_LINES))
        self.assertEqual(site.query(handles[1]), "me@example.org")
        self.assertIsNone(site.query(handles[0]))

    def test_a_symlink_at_the_lock_file_database_or_socket_fails_the_start_naming_it(self):
        for key, path in (("LockFilePath", "run/incognitomail.lock"),
                          ("DatabasePath", "incognitomail.sqlite3"),
                          ("UnixSockPath", "run/incognitomail.sock")):
            for dangling in (False, True):
                with self.subTest(key=key, dangling=dangling):
                    site = self.make_site()
                    victim, content, mode = plant_victim(self)
                    if dangling:
                        os.unlink(victim)
                    link = os.path.join(site.folder, path)
                    os.makedirs(os.path.dirname(link), mode=0o700, exist_ok=True)
                    os.symlink(victim, link)
                    log = failed_start(self, site)
                    self.assertIn(link, log)
                    self.assertIn(key, log)
                    if dangling:
                        self.assertFalse(os.path.lexists(victim), "created through the symlink")
                    else:
                        self.assert_untouched(victim, content, mode)

    def test_working_folders_others_may_write_are_refused_at_start_naming_the_folder(self):
        layouts = {
            "MapFilePath": ("postfix", {}),
            "DatabasePath": ("data", {"Persistence": {"DatabasePath": "data/db.sqlite3"}}),
            "UnixSockPath": ("sock", {"General": {"UnixSockPath": "sock/incognitomail.sock"}}),
            "LockFilePath": ("lock", {"General": {"LockFilePath": "lock/incognitomail.lock"}}),
        }
        cases = [(key, 0o777, 0) for key in layouts]        # and the sticky bit, a foreign group
        cases += [("DatabasePath", 0o1777, 0), ("UnixSockPath", 0o1777, 0),
                  ("DatabasePath", 0o770, grp.getgrnam("postfix").gr_gid)]
        for key, mode, group in cases:
            with self.subTest(key=key, mode=oct(mode)):
                name, sections = layouts[key]
                folder = make_folder(self)
                path = os.path.join(folder, name)
                os.makedirs(path, exist_ok=True)
                site = Site(folder, sections=sections)
                os.chown(path, 0, group)
                os.chmod(path, mode)
                log = failed_start(self, site)
                self.assertIn("%s: folder for [" % path, log)
                self.assertIn(key, log)
                self.assertIn("chmod go-w %s" % path, log)


class PrivateFilesTest(unittest.TestCase):
    """Folders the daemon creates are 0700; the database (its -wal and -shm too), the lock
    file and the control socket 0600, whatever the umask (0 here); a missing folder for a
    Postfix-facing socket is left for the admin to make."""

    def start(self, sections):
        """A daemon started with umask 0; its socketmap socket in a Postfix folder."""
        sections = {name: dict(keys) for name, keys in sections.items()}
        sections.setdefault("General", {})["SocketmapListen"] = "unix:postfix-run/socketmap.sock"
        site = socketmap_site(self, sections=sections)
        postfix_folder(os.path.join(site.folder, "postfix-run"))
        start_daemon(self, site, preexec_fn=lambda: os.umask(0))
        new_handle(site, new_account(site))
        return site

    def assert_mode(self, path, mode):
        self.assertEqual(oct(stat.S_IMODE(os.stat(path).st_mode)), oct(mode), path)

    def test_created_folders_are_0700_and_the_database_its_wal_and_shm_0600(self):
        site = self.start({"General": {"UnixSockPath": "sock/incognitomail.sock",
                                       "LockFilePath": "lock/incognitomail.lock"},
                           "Persistence": {"DatabasePath": "data/incognitomail.sqlite3"}})
        for name in ("sock", "lock", "data"):
            self.assert_mode(os.path.join(site.folder, name), 0o700)
        database = site.config.database_path
        for path in (database, database + "-wal", database + "-shm",
                     site.config.lock_file_path, site.socket_path):
            self.assert_mode(path, 0o600)
        self.assert_mode(site.config.socketmap_listen[len("unix:"):], 0o666)

    def test_the_control_socket_folder_is_0700_when_the_lock_file_is_in_it_too(self):
        site = self.start({})
        folder = os.path.dirname(site.socket_path)
        self.assertEqual(os.path.dirname(site.config.lock_file_path), folder)
        self.assert_mode(folder, 0o700)
        self.assert_mode(site.socket_path, 0o600)
        self.assert_mode(site.config.lock_file_path, 0o600)

    def test_a_missing_folder_for_a_postfix_socket_is_not_created_and_the_error_says_how(self):
        for key in ("PolicyListen", "SocketmapListen"):
            with self.subTest(key=key):
                endpoints = {"PolicyListen": "", "SocketmapListen": "unix:sm.sock"}
                endpoints[key] = "unix:postfix-run/%s.sock" % key.lower()
                site = socketmap_site(self, sections={"General": endpoints})
                missing = os.path.join(site.folder, "postfix-run")
                log = failed_start(self, site)
                self.assertIn("install -d -o root -g postfix -m 0750 %s" % missing, log)
                self.assertIn(key, log)
                self.assertFalse(os.path.exists(missing), "the folder was created")


###############################################################################
# Configuration
###############################################################################

# The original's sample configuration file, verbatim from its README (seed/original-README.txt).
ORIGINAL_SAMPLE_CONFIG = """\
[General] ; Make sure to include the section name before that section's keys!
MailSystem = "postfix" ; For future reference only. Currently not used (server assumes postfix, will fail with any other value)
UnixSockPath = "/tmp/incognito.sock" ; Address of the unix socket used for communication between the daemon process and the cli utility
LockFilePath = "/var/lock/incognito.lock" ; Path to the file used to prevent two server processes from running at the same time
ListenPath = "/incognitomail" ; Path where the HTTP server will listen for websocket connections
ListenAddress = ":9090" ; Address for the HTTP server to listen. Always include the port number with the ":" prefix. An empty address (as in this case) will listen on all interfaces
TLSCertFile = "server.pem" ; If using HTTPS, path to the server certificate. If signed by a CA, this file needs to be the concatenation of the server's certificate, any intermediates and the CA's certificate
TLSKeyFile = "server.key" ; If using HTTPS, path to the private key file corresponding to the server certificate
[Persistence]
Type = "boltdb" ; For future reference only. Currently not used (server assumes boltdb, will fail with any other value)
DatabasePath = "incognito.db" ; Path to the file where all the information about accounts and handles is stored
[PostfixConfig]
Domain = "@sidhion.com" ; The same domain configured in Postfix
MapFilePath = "/tmp/postfix/canonical" ; Path to the map file used in Postfix. Can be either the canonical or the virtual alias map
"""


class ConfigurationTest(unittest.TestCase):
    """INI file of the original, with its keys, plus the few new ones; clear one-line errors."""

    def setUp(self):
        self.folder = make_folder(self)

    def write(self, text, name="incognitomail.ini"):
        path = os.path.join(self.folder, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def write_sections(self, changes=(), remove=()):
        """The minimal valid file with (section, key, value) changes and (section, key) removals."""
        sections = minimal_ini_sections(self.folder)
        for section, key, value in changes:
            sections.setdefault(section, {})[key] = value
        for section, key in remove:
            del sections[section][key]
        path = os.path.join(self.folder, "incognitomail.ini")
        write_ini(path, sections)
        return path

    def test_original_sample_config_loads_unchanged(self):
        path = self.write(ORIGINAL_SAMPLE_CONFIG)
        with self.assertLogs(im.log, logging.WARNING):
            config = im.load_config(path)
        self.assertEqual(config.unix_sock_path, "/tmp/incognito.sock")
        self.assertEqual(config.lock_file_path, "/var/lock/incognito.lock")
        self.assertEqual(config.listen_path, "/incognitomail")
        self.assertEqual(config.listen_address, ":9090")
        self.assertEqual(config.tls_cert_file, os.path.join(self.folder, "server.pem"))
        self.assertEqual(config.tls_key_file, os.path.join(self.folder, "server.key"))
        self.assertEqual(config.database_path, os.path.join(self.folder, "incognito.db"))
        self.assertEqual(config.domains, ("sidhion.com",))
        self.assertEqual(config.default_domain, "sidhion.com")
        self.assertEqual(config.map_type, "hash")
        self.assertEqual(config.map_file_path, "/tmp/postfix/canonical")

    def test_boltdb_store_type_is_read_as_the_default_store_with_a_warning(self):
        path = self.write(ORIGINAL_SAMPLE_CONFIG)
        with self.assertLogs(im.log, logging.WARNING) as logged:
            im.load_config(path)
        self.assertTrue(any("boltdb" in line and "[Persistence] Type" in line for line in logged.output),
                        logged.output)
        # As a program: the warning is printed, and the command goes on past the configuration
        # (here to "not running", as nothing listens on the sample's socket path).
        done = run_module("-c", path, "status")
        self.assertIn("boltdb", done.stderr)
        self.assertIn("not running", done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_several_domains_with_optional_at_the_first_is_the_default(self):
        path = self.write_sections([("PostfixConfig", "Domain", '"@Mail.Example.org, example.net,@example.com ,'
                                                                ' mail.example.org"')])
        config = im.load_config(path)
        self.assertEqual(config.domains, ("mail.example.org", "example.net", "example.com"))
        self.assertEqual(config.default_domain, "mail.example.org")

    def test_paths_are_relative_to_the_config_files_folder(self):
        path = self.write_sections([
            ("PostfixConfig", "MapFilePath", "lmdb:postfix/virtual"),
            ("PostfixConfig", "ConfigDir", "postfix"),
            ("General", "TLSCertFile", "tls/cert.pem"),
            ("General", "TLSKeyFile", "tls/key.pem"),
            ("General", "PolicyListen", "unix:run/policy.sock"),
            ("General", "SocketmapListen", "unix:run/socketmap.sock"),
        ])
        cwd = os.getcwd()
        os.chdir("/")
        try:
            config = im.load_config(os.path.relpath(path, "/"))
        finally:
            os.chdir(cwd)
        join = lambda *parts: os.path.join(self.folder, *parts)
        self.assertEqual(config.path, path)
        self.assertEqual(config.unix_sock_path, join("run", "incognitomail.sock"))
        self.assertEqual(config.lock_file_path, join("run", "incognitomail.lock"))
        self.assertEqual(config.database_path, join("incognitomail.sqlite3"))
        self.assertEqual((config.map_type, config.map_file_path), ("lmdb", join("postfix", "virtual")))
        self.assertEqual(config.postfix_config_dir, join("postfix"))
        self.assertEqual((config.tls_cert_file, config.tls_key_file), (join("tls", "cert.pem"), join("tls", "key.pem")))
        self.assertEqual(config.policy_listen, "unix:" + join("run", "policy.sock"))
        self.assertEqual(config.socketmap_listen, "unix:" + join("run", "socketmap.sock"))

    def test_map_type_defaults_to_hash_and_may_be_given_as_a_postfix_prefix(self):
        self.assertEqual(im.load_config(self.write_sections()).map_type, "hash")
        for map_type in ("hash", "lmdb", "btree"):
            config = im.load_config(self.write_sections([("PostfixConfig", "MapFilePath", "%s:/etc/postfix/virtual" % map_type)]))
            self.assertEqual((config.map_type, config.map_file_path), (map_type, "/etc/postfix/virtual"))

    def test_new_keys_have_documented_defaults(self):
        config = im.load_config(self.write_sections())
        self.assertEqual(config.handle_length, 16)
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.log_target, "stderr")
        self.assertEqual(config.policy_listen, "")
        self.assertEqual(config.socketmap_listen, "")
        self.assertEqual(config.postfix_config_dir, "")
        config = im.load_config(self.write_sections([("PostfixConfig", "HandleLength", "24"),
                                                      ("General", "LogLevel", "DEBUG"),
                                                      ("General", "LogTarget", "syslog")]))
        self.assertEqual((config.handle_length, config.log_level, config.log_target), (24, "debug", "syslog"))

    def test_unknown_key_is_a_warning_naming_it_not_an_error(self):
        path = self.write_sections([("General", "FrobnicateLevel", "3")])
        with self.assertLogs(im.log, logging.WARNING) as logged:
            im.load_config(path)
        self.assertTrue(any("frobnicatelevel" in line.lower() and "[General]" in line for line in logged.output))

    BAD_VALUES = [
        # (section, key, value or None to leave the key out, key the message must name)
        ("General", "MailSystem", "exim", "MailSystem"),
        ("Persistence", "Type", '"mysql"', "Type"),
        ("PostfixConfig", "Domain", "not a domain", "Domain"),
        ("PostfixConfig", "Domain", "incognito.test, bad_domain!", "Domain"),
        ("PostfixConfig", "Domain", '""', "Domain"),
        ("PostfixConfig", "Domain", None, "Domain"),
        ("PostfixConfig", "MapFilePath", None, "MapFilePath"),
        ("PostfixConfig", "MapFilePath", "regexp:/etc/postfix/virtual", "MapFilePath"),
        ("PostfixConfig", "MapFilePath", "hash:", "MapFilePath"),
        ("PostfixConfig", "HandleLength", "sixteen", "HandleLength"),
        ("PostfixConfig", "HandleLength", "4", "HandleLength"),
        ("General", "LogLevel", "loud", "LogLevel"),
        ("General", "LogTarget", "file", "LogTarget"),
        ("General", "ListenAddress", "localhost", "ListenAddress"),
        ("General", "ListenAddress", "127.0.0.1:99999", "ListenAddress"),
        ("General", "ListenAddress", "::1:9090", "ListenAddress"),
        ("General", "ListenPath", "incognitomail", "ListenPath"),
        ("General", "TLSCertFile", "server.pem", "TLSKeyFile"),
        ("General", "TLSKeyFile", "server.key", "TLSCertFile"),
        ("General", "PolicyListen", "tcp:127.0.0.1:10040", "PolicyListen"),
        ("General", "PolicyListen", "inet:127.0.0.1", "PolicyListen"),
        ("General", "SocketmapListen", "inet:127.0.0.1:9999", "SocketmapListen"),
        ("Limits", "MaxMessageSize", "10", "MaxMessageSize"),
        ("Limits", "IdleTimeout", "-1", "IdleTimeout"),
        ("Prune", "HandlesUnusedDays", "-3", "HandlesUnusedDays"),
        ("Prune", "AccountsUnusedDays", "soon", "AccountsUnusedDays"),
        ("Prune", "Automatic", "maybe", "Automatic"),
    ]

    def assertOneLineError(self, done, *words):
        self.assertEqual(done.returncode, 1, done)
        self.assertNotIn("Traceback", done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        self.assertEqual(len(lines), 1, "expected one line on stderr, got:\n%s" % done.stderr)
        for word in words:
            self.assertIn(word, lines[0])
        return lines[0]

    def write_value(self, section, key, value):
        """The minimal valid file with ``value`` for the key (None: the key left out)."""
        if value is None:
            return self.write_sections(remove=[(section, key)])
        return self.write_sections([(section, key, value)])

    def test_every_bad_value_is_one_line_naming_file_section_and_key_with_exit_code_1(self):
        # Each value in-process: the command line prints the error's message as its one line.
        messages = []
        for section, key, value, named in self.BAD_VALUES:
            with self.subTest(section=section, key=key, value=value):
                path = self.write_value(section, key, value)
                with self.assertRaises(im.ConfigError) as caught:
                    im.load_config(path)
                message = str(caught.exception)
                messages.append(message)
                self.assertNotIn("\n", message.strip())
                for word in (path, "[%s]" % section, named):
                    self.assertIn(word, message)
        # One through the command line itself: that line, and exit status 1.
        section, key, value, named = self.BAD_VALUES[0]
        path = self.write_value(section, key, value)
        line = self.assertOneLineError(run_module("-c", path, "status"), path, "[%s]" % section, named)
        self.assertEqual(line, "incognitomail: error: %s" % messages[0])

    def test_bad_values_are_config_errors_in_process_too(self):
        for section, key, value, named in self.BAD_VALUES:
            with self.subTest(section=section, key=key, value=value):
                path = self.write_value(section, key, value)
                with self.assertRaises(im.ConfigError) as caught:
                    im.load_config(path)
                self.assertIn("[%s] %s" % (section, named), str(caught.exception))

    def test_missing_or_unparsable_file_is_one_line_with_exit_code_1(self):
        missing = os.path.join(self.folder, "nowhere.ini")
        self.assertOneLineError(run_module("-c", missing, "status"), missing, "not found")
        garbage = self.write("Domain = incognito.test\n[General\n", name="garbage.ini")
        self.assertOneLineError(run_module("-c", garbage, "status"), garbage)
        binary = os.path.join(self.folder, "binary.ini")
        with open(binary, "wb") as f:
            f.write(b"[General]\nListenPath = \xff\xfe\n")
        self.assertOneLineError(run_module("-c", binary, "status"), binary)


class DocumentedKeysTest(unittest.TestCase):
    """A configuration key exists because a user needs it, and says what it means: the module
    describes each key once (CONFIG_KEYS), and incognitomail.ini.example is written from that."""

    maxDiff = None

    def read(self, name):
        with open(os.path.join(HERE, name), "rb") as f:
            return f.read()

    def test_the_example_file_is_exactly_what_the_module_writes(self):
        written = self.read("incognitomail.ini.example").decode("utf-8")     # byte for byte: no newline translation
        self.assertEqual(written, im.example_config(),
                         "incognitomail.ini.example is not what the module writes: regenerate it with "
                         "`python3 incognitomail.py example > incognitomail.ini.example`")

    def test_every_key_has_a_meaning_and_the_example_names_it(self):
        example = im.example_config()
        for key in im.CONFIG_KEYS:
            with self.subTest(key=key.name):
                self.assertTrue(key.help and key.help.strip(), "%s has no help text" % key.name)
                self.assertIn("[%s]" % key.section, example)
                self.assertRegex(example, r"(?m)^;? ?%s\b" % key.name, "the example lacks %s" % key.name)

    def test_the_readme_points_readers_to_the_example_file(self):
        self.assertIn(b"incognitomail.ini.example", self.read("README.md"))


class ListenAddressTest(unittest.TestCase):

    def test_colon_port_listens_on_all_interfaces(self):
        self.assertEqual(im.parse_host_port(":9090"), ("", 9090))

    def test_ipv6_in_brackets(self):
        self.assertEqual(im.parse_host_port("[::1]:9090"), ("::1", 9090))

    def test_bad_listen_address_names_the_key(self):
        with self.assertRaises(im.ConfigError) as caught:
            make_site(self, sections={"General": {"ListenAddress": "localhost"}})
        self.assertIn("[General] ListenAddress", str(caught.exception))

    def test_daemon_serves_websocket_on_ipv6_loopback(self):
        require_postfix()
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        port = free_port()
        site = make_site(self, sections={"General": {"ListenAddress": "[::1]:%d" % port}})
        start_daemon(self, site)
        token = new_account(site)
        client = WsClient(port, host="::1")
        self.addCleanup(client.close)
        client.send("new handle " + token)
        self.assertTrue(client.recv().endswith("@incognito.test"))


class ExampleConfigTest(PostmapTestCase):
    """incognitomail.ini.example starts a working server as is, everything beside itself."""

    def test_example_config_starts_a_working_server_as_is(self):
        example = os.path.join(HERE, "incognitomail.ini.example")
        self.assertTrue(os.path.exists(example), "incognitomail.ini.example is missing")
        folder = make_folder(self)
        with open(example) as f:
            text = f.read()
        with socket.socket() as probe:                  # only if someone else holds its port
            if probe.connect_ex(("127.0.0.1", 9090)) == 0:
                text = text.replace("127.0.0.1:9090", "127.0.0.1:%d" % free_port())
        with open(os.path.join(folder, "incognitomail.ini"), "w") as f:
            f.write(text)
        site = Site.from_config_file(os.path.join(folder, "incognitomail.ini"))
        # postmap reads Postfix's main.cf; MAIL_CONFIG says where, as for every Postfix command
        env = dict(os.environ, MAIL_CONFIG=write_postfix_config_dir(os.path.join(folder, "postfix")))
        daemon = start_daemon(self, site, env=env)
        for path in (site.config.database_path, site.config.map_file_path, site.config.unix_sock_path):
            self.assertTrue(path.startswith(folder + os.sep), path)
        token = cli(site, "new", "account", "me@example.net").stdout.strip()
        done = cli(site, "new", "handle", "-", "--label", "shop.example.com", input=token + "\n")
        self.assertEqual(done.returncode, 0, done.stderr + daemon.log())
        handle = done.stdout.strip()
        self.assertRegex(handle, r"^[a-z0-9]{16}@")
        query = subprocess.run([_which("postmap"), "-q", handle, "%s:%s" % (site.config.map_type, site.map_path)],
                               stdout=subprocess.PIPE, universal_newlines=True, env=env)
        self.assertEqual(query.stdout.strip(), "me@example.net")
        self.assertEqual(cli(site, "stop").returncode, 0)
        self.assertEqual(daemon.wait_exit(), 0)
        warnings = [line for line in daemon.log().splitlines() if " WARNING " in line]
        self.assertEqual(warnings, [], "the example warns at every start")


###############################################################################
# Names and secrets
###############################################################################

class TokensAndHandleNamesTest(unittest.TestCase):
    """Tokens: >= 256 random bits, URL-safe. Handles: lowercase letters and digits, no bias."""

    def test_token_has_at_least_256_bits_and_is_url_safe(self):
        tokens = [im.new_token() for _ in range(200)]
        self.assertEqual(len(set(tokens)), len(tokens))
        for token in tokens:
            self.assertRegex(token, r"^[A-Za-z0-9_-]+$")
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            self.assertGreaterEqual(len(raw) * 8, 256)

    def test_token_never_starts_with_a_dash_so_it_can_be_given_as_an_argument(self):
        # "new handle <secret>": a secret like "-Nzx..." would be read as an option (exit 2).
        # token_urlsafe starts with "-" once in 64; 3000 tokens all miss it by chance ~1e-21.
        dashed = sum(1 for _ in range(3000) if im.new_token().startswith("-"))
        self.assertEqual(dashed, 0, "%d of 3000 tokens start with '-'" % dashed)

    def test_handle_names_are_lowercase_letters_and_digits_of_the_asked_length(self):
        for length in (12, 16, 40):
            for _ in range(200):
                name = im.new_handle_name(length)
                self.assertRegex(name, r"^[a-z0-9]{%d}$" % length)

    def test_handle_names_are_random(self):
        names = [im.new_handle_name(16) for _ in range(2000)]
        self.assertEqual(len(set(names)), len(names))
        # every character of the alphabet turns up, letters and digits alike
        self.assertEqual(set("".join(names)), set(im.HANDLE_ALPHABET))

    def test_handle_characters_are_drawn_without_modulo_bias(self):
        # byte % 36 would make 4 characters 8/7 as likely as the others (+14 %); with
        # ~9000 draws per character the noise is about 1 %, so 8 % apart is a clear signal.
        counts = collections.Counter("".join(im.new_handle_name(16) for _ in range(20000)))
        self.assertEqual(len(counts), 36)
        self.assertLess(max(counts.values()) / min(counts.values()), 1.08, counts)


class AddressValidationTest(unittest.TestCase):
    """An account's target is one valid local@domain: nothing that could add a map line."""

    def test_plain_address_is_accepted_and_its_domain_lowercased(self):
        self.assertEqual(im.check_address("Me.Too+tag@Example.ORG"), "Me.Too+tag@example.org")
        self.assertEqual(im.check_address("a@b.c"), "a@b.c")

    def test_whitespace_commas_control_characters_and_newlines_are_refused(self):
        for bad in ("me @example.org", "me@example.org evil@example.net", "me\t@example.org",
                    "me@example.org,evil@example.net", "me@example.org, evil@example.net",
                    "me@exam\x00ple.org", "me\x7f@example.org", "me@example.org\x1b",
                    "me@example.org\nevil@incognito.test other@example.net",
                    "me@example.org\n", "me@example.org\r\n", "\nme@example.org", "me@example.org\r",
                    " me@example.org", "me@example.org ", "", "me", "@example.org", "me@",
                    "a@b@example.org", '"me"@example.org', "me@example.org#x", "me@exa mple.org",
                    "me@-example.org", "me@example..org", "me..x@example.org"):
            with self.subTest(address=bad):
                with self.assertRaises(im.BadRequest):
                    im.check_address(bad)

    def test_address_longer_than_254_characters_is_refused(self):
        local = "a" * 64
        label = "b" * 63
        at_254 = local + "@" + ".".join([label, label, label[:57], "org"])
        self.assertEqual(len(at_254), 254)
        self.assertEqual(im.check_address(at_254), at_254)
        at_255 = local + "@" + ".".join([label, label, label[:58], "org"])
        self.assertEqual(len(at_255), 255)
        with self.assertRaises(im.BadRequest):
            im.check_address(at_255)
        with self.assertRaises(im.BadRequest):
            im.check_address("a" * 65 + "@example.org")

    def test_handle_is_named_with_or_without_its_domain(self):
        domains = ("incognito.test", "other.test")
        self.assertEqual(im.split_handle("abc123", domains), ("abc123", "incognito.test"))
        self.assertEqual(im.split_handle("abc123@other.test", domains), ("abc123", "other.test"))
        self.assertEqual(im.split_handle("ABC123@Incognito.TEST", domains), ("abc123", "incognito.test"))
        with self.assertRaises(im.NotFound):
            im.split_handle("abc123@elsewhere.test", domains)
        for bad in ("abc-123", "abc 123", "", "@incognito.test", "abc,def"):
            with self.subTest(handle=bad):
                with self.assertRaises(im.BadRequest):
                    im.split_handle(bad, domains)


class LabelCharactersTest(unittest.TestCase):
    """Labels show on one line, in the order they are stored."""

    def test_c1_controls_line_separators_and_direction_controls_are_refused(self):
        for character in ("\x85", "\x9b", "\u2028", "\u2029", "\u202a", "\u202e", "\u2066",
                          "\u2069", "\x00", "\n", "\x7f"):
            with self.subTest(character=hex(ord(character))):
                with self.assertRaises(im.BadRequest):
                    im.check_label("shop" + character + "moc.example")

    def test_ordinary_text_is_kept(self):
        for label in ("Café crème", "naïve façade — Ünïcødé", "📫 mail ✉", "👩‍💻 dev",
                      "日本語のラベル", "שלום", "مرحبا", "shop.example.com #2"):
            self.assertEqual(im.check_label(label), label)


class MilterAddressesTest(unittest.TestCase):
    """Bounce addresses (dated, signed) and reply addresses, and what the milter reads in an
    address of a handle's domain."""

    SECRET = b"\x01" * 32
    DOMAINS = ("incognito.test", "other.test")
    HANDLE = "k3v9q0x2m7ab5ts1@incognito.test"

    def read(self, address, now=T0, secret=SECRET):
        return im.read_handle_address(address, self.DOMAINS, secret, now)

    def test_a_bounce_address_is_the_handle_a_day_stamp_and_a_signature(self):
        address = im.bounce_address(self.HANDLE, self.SECRET, T0)
        # T0 is day 19675; 19675 mod 1024 = 219 = 6 * 32 + 27: "g3" in SRS's base32
        self.assertRegex(address, r"^k3v9q0x2m7ab5ts1\+b\.g3\.[a-z2-7]{10}@incognito\.test$")
        self.assertEqual(self.read(address), (self.HANDLE, im.BOUNCE, None))
        self.assertEqual(self.read(address.upper()), (self.HANDLE, im.BOUNCE, None))
        self.assertEqual(im.bounce_address(self.HANDLE, self.SECRET, T0 + 3600), address)
        self.assertNotEqual(im.bounce_address(self.HANDLE, self.SECRET, T0 + DAY), address)
        other = im.bounce_address("k3v9q0x2m7ab5ts1@other.test", self.SECRET, T0)
        self.assertNotEqual(other.split("@")[0], address.split("@")[0])

    def test_a_bounce_address_is_good_for_21_days(self):
        address = im.bounce_address(self.HANDLE, self.SECRET, T0)
        for days in (0, 1, 20, 21):
            self.assertEqual(self.read(address, T0 + days * DAY).kind, im.BOUNCE, days)
        for days in (22, 30, 1000):
            with self.subTest(days=days), self.assertRaises(im.BadRequest):
                self.read(address, T0 + days * DAY)

    def test_a_bounce_address_dated_in_the_future_is_refused(self):
        address = im.bounce_address(self.HANDLE, self.SECRET, T0 + DAY)
        with self.assertRaises(im.BadRequest):
            self.read(address, T0)

    def test_a_forged_bounce_address_is_refused(self):
        address = im.bounce_address(self.HANDLE, self.SECRET, T0)
        local, domain = address.split("@")
        flipped = local[:-1] + ("a" if local[-1] != "a" else "b")
        other = im.bounce_address("abcdefgh12345678@incognito.test", self.SECRET, T0)
        for forged in ("%s@%s" % (flipped, domain),                     # one character changed
                       im.bounce_address(self.HANDLE, b"\x02" * 32, T0),  # another key
                       self.HANDLE.replace("@", other[other.index("+"):other.index("@")] + "@"),
                       "k3v9q0x2m7ab5ts1+b.g3.aaaaaaaaaa@incognito.test"):
            with self.subTest(forged=forged), self.assertRaises(im.BadRequest) as caught:
                self.read(forged)
            self.assertIn("21 days", str(caught.exception))

    def test_a_reply_address_holds_the_correspondent(self):
        for correspondent, local_part in (("news@shop.example", "k3v9q0x2m7ab5ts1+news=shop.example"),
                                          ("a+b=c@Plain.Example", "k3v9q0x2m7ab5ts1+a+b=c=plain.example"),
                                          ("First.Last@shop.example", "k3v9q0x2m7ab5ts1+First.Last=shop.example")):
            with self.subTest(correspondent=correspondent):
                address = im.reply_address(self.HANDLE, correspondent)
                self.assertEqual(address, local_part + "@incognito.test")
                expected = correspondent.rpartition("@")[0] + "@" + correspondent.rpartition("@")[2].lower()
                self.assertEqual(self.read(address), (self.HANDLE, im.REPLY, expected))

    def test_addresses_are_read_as_postfix_routes_them(self):
        self.assertEqual(self.read(self.HANDLE), (self.HANDLE, im.FORWARD, None))
        self.assertEqual(self.read("K3V9Q0X2M7AB5TS1@Incognito.Test"), (self.HANDLE, im.FORWARD, None))
        self.assertEqual(self.read("k3v9q0x2m7ab5ts1+shopping@incognito.test"), (self.HANDLE, im.FORWARD, None))
        self.assertEqual(self.read("k3v9q0x2m7ab5ts1+x=no_domain@incognito.test").kind, im.FORWARD)
        self.assertIsNone(self.read("k3v9q0x2m7ab5ts1@example.org"))
        # quoted, or after another recipient_delimiter character: Postfix routes it to the handle
        self.assertEqual(self.read('"k3v9q0x2m7ab5ts1"@incognito.test'), (self.HANDLE, im.FORWARD, None))
        self.assertEqual(self.read("k3v9q0x2m7ab5ts1-news@incognito.test"), (self.HANDLE, im.FORWARD, None))
        self.assertEqual(self.read("info-desk@incognito.test"), ("info@incognito.test", im.FORWARD, None))
        self.assertIsNone(self.read("+news=shop.example@incognito.test"))


###############################################################################
# Store
###############################################################################

class StoreTest(unittest.TestCase):
    """sqlite in WAL mode, versioned schema migrated forward, tokens kept only as SHA-256."""

    def setUp(self):
        self.folder = make_folder(self)
        self.path = os.path.join(self.folder, "store.sqlite3")

    def open(self, path=None):
        store = im.Store(path or self.path)
        self.addCleanup(store.close)
        return store

    def test_database_is_in_wal_mode_at_the_current_schema_version(self):
        self.open()
        db = sqlite3.connect(self.path)
        try:
            self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], im.SCHEMA_VERSION)
        finally:
            db.close()

    def test_older_schema_is_migrated_forward_on_open_keeping_the_data(self):
        store = self.open()
        account = store.add_account("me@example.org", im.token_digest("t"), 100)
        store.close()
        added = "ALTER TABLE accounts ADD COLUMN note TEXT; UPDATE accounts SET note = 'migrated'"
        newer = im.SCHEMA_VERSION + 1
        with mock.patch.object(im, "_MIGRATIONS", im._MIGRATIONS + (added,)), \
                mock.patch.object(im, "SCHEMA_VERSION", newer):
            with self.assertLogs(im.log, logging.INFO) as logged:
                store = self.open()
            self.assertEqual(store.schema_version(), newer)
            self.assertEqual(store.db.execute("SELECT address, note FROM accounts WHERE id = ?", (account,)).fetchone(),
                             ("me@example.org", "migrated"))
        self.assertTrue(any("migrating" in line for line in logged.output), logged.output)

    def test_empty_file_is_migrated_from_version_0(self):
        open(self.path, "wb").close()
        store = self.open()
        self.assertEqual(store.schema_version(), im.SCHEMA_VERSION)
        self.assertEqual(store.counts(), {"accounts": 0, "handles": 0, "enabled_handles": 0})

    def test_database_of_a_newer_version_is_refused_with_a_clear_error(self):
        db = sqlite3.connect(self.path)
        db.execute("PRAGMA user_version = %d" % (im.SCHEMA_VERSION + 1))
        db.close()
        with self.assertRaises(im.StoreError) as caught:
            im.Store(self.path)
        message = str(caught.exception)
        self.assertIn(self.path, message)
        self.assertIn("newer", message)
        self.assertIn(str(im.SCHEMA_VERSION + 1), message)

    def test_handles_are_unique_case_insensitively_per_domain(self):
        store = self.open()
        account = store.add_account("me@example.org", im.token_digest("t"), 100)
        store.add_handle(account, "abc123", "incognito.test", None, 100)
        with self.assertRaises(sqlite3.IntegrityError):
            store.add_handle(account, "ABC123", "incognito.test", None, 100)
        with self.assertRaises(sqlite3.IntegrityError):
            store.add_handle(account, "abc123", "INCOGNITO.test", None, 100)
        store.add_handle(account, "abc123", "other.test", None, 100)
        self.assertTrue(store.handle_taken("AbC123", "incognito.TEST"))
        self.assertFalse(store.handle_taken("abc124", "incognito.test"))

    def test_deleting_an_account_deletes_its_handles(self):
        store = self.open()
        mine = store.add_account("me@example.org", im.token_digest("a"), 100)
        other = store.add_account("you@example.org", im.token_digest("b"), 100)
        store.add_handle(mine, "aaa111", "incognito.test", None, 100)
        store.add_handle(mine, "aaa222", "incognito.test", None, 100)
        store.add_handle(other, "bbb111", "incognito.test", None, 100)
        store.delete_account(mine)
        self.assertEqual(store.handles_of(mine)[0], [])
        self.assertEqual([h.local for h in store.handles_of(other)[0]], ["bbb111"])
        self.assertEqual(store.counts()["handles"], 1)

    def test_token_is_stored_only_as_its_sha256(self):
        site = socketmap_site(self)
        fixture = ServiceFixture(self, site).start()
        token = fixture.new_account()
        fixture.call("new_handle", token=token, label="shop")
        raw = b""
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(site.config.database_path + suffix):
                with open(site.config.database_path + suffix, "rb") as f:
                    raw += f.read()
        self.assertIn(hashlib.sha256(token.encode()).digest(), raw)
        self.assertNotIn(token.encode(), raw)
        self.assertNotIn(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), raw)
        fixture.stop()
        self.assertEqual(fixture.store.db.execute("SELECT count(*) FROM accounts WHERE token_sha256 = ?",
                                                  (hashlib.sha256(token.encode()).digest(),)).fetchone()[0], 1)

    def test_account_remembers_target_created_and_last_used_times(self):
        now = [1700000000.0]
        site = socketmap_site(self)
        fixture = ServiceFixture(self, site, clock=lambda: now[0]).start()
        token = fixture.new_account()
        account = fixture.store.account_by_digest(im.token_digest(token))
        self.assertEqual((account.address, account.created, account.last_used), ("me@example.org", 1700000000, None))
        now[0] += 60
        handle = fixture.call("new_handle", token=token, label="shop.example.com")
        account = fixture.store.account_by_digest(im.token_digest(token))
        self.assertEqual(account.last_used, 1700000060)
        self.assertEqual(handle["label"], "shop.example.com")
        self.assertEqual(handle["created"], "2023-11-14T22:14:20Z")
        self.assertEqual((handle["enabled"], handle["received"], handle["last_received"]), (True, 0, None))


class IdsTest(unittest.TestCase):
    """Ids tell an owner nothing about other accounts: a handle's id counts within its
    account, new accounts get random ids, and the ids shown before schema 3 stay the same."""

    def setUp(self):
        self.path = os.path.join(make_folder(self), "store.sqlite3")

    def test_each_account_counts_its_own_handles_from_1_and_account_ids_are_random(self):
        store = im.Store(self.path)
        self.addCleanup(store.close)
        with store.transaction():
            accounts = [store.add_account("a%d@example.org" % n, im.token_digest(str(n)), 0)
                        for n in range(3)]
            numbers = [[store.add_handle(a, "h%d%d" % (n, i), "incognito.test", None, 0).number
                        for i in range(3)] for n, a in enumerate(accounts)]
        self.assertEqual(numbers, [[1, 2, 3]] * 3)
        self.assertTrue(all(0 < a < 2 ** 53 for a in accounts))
        self.assertNotEqual(sorted(accounts), [accounts[0], accounts[0] + 1, accounts[0] + 2])

    def test_ids_shown_before_are_kept_and_new_ones_follow_without_reuse(self):
        with mock.patch.object(im, "_MIGRATIONS", im._MIGRATIONS[:2]), \
                mock.patch.object(im, "SCHEMA_VERSION", 2):
            old = im.Store(self.path)
            with old.transaction():
                for account in (1, 2):
                    old.db.execute("INSERT INTO accounts (id, address, token_sha256, created) "
                                   "VALUES (?, ?, ?, 0)", (account, "a%d@x.org" % account,
                                                           im.token_digest(str(account))))
                for local, account in (("a", 1), ("b", 2), ("c", 1)):
                    old.db.execute("INSERT INTO handles (local, domain, account_id, created) "
                                   "VALUES (?, 'incognito.test', ?, 0)", (local, account))
            old.close()
        store = im.Store(self.path)
        self.addCleanup(store.close)
        self.assertEqual([store.handle_by_number(1, n).local for n in (1, 3)], ["a", "c"])
        self.assertEqual(store.handle_by_number(2, 2).local, "b")
        with store.transaction():
            self.assertEqual(store.add_handle(2, "d", "incognito.test", None, 0).number, 4)


class StoreQueryPlanTest(unittest.TestCase):
    """Per-request queries use an index: their cost must not grow with the number of handles."""

    def test_handle_lookups_and_counting_use_the_address_index(self):
        folder = make_folder(self)
        store = im.Store(os.path.join(folder, "db.sqlite3"))
        self.addCleanup(store.close)
        traced = []
        store.db.set_trace_callback(traced.append)
        store.handle("abc", "incognito.test")
        store.handle_taken("abc", "incognito.test")
        store.record_mail("received", {("abc", "incognito.test"): 1}, {("abc", "incognito.test"): 1})
        store.record_mail("blocked", {("abc", "incognito.test"): 1}, {("abc", "incognito.test"): 1})
        store.db.set_trace_callback(None)
        queries = [q for q in traced if q.lstrip().upper().startswith(("SELECT", "UPDATE"))]
        self.assertEqual(len(queries), 4, traced)
        for query in queries:
            plan = " ".join(row[-1] for row in store.db.execute("EXPLAIN QUERY PLAN " + query))
            self.assertIn("handles_by_address", plan, query)
            self.assertNotRegex(plan, r"SCAN (h|handles)\b", query)

    def test_what_expires_is_found_by_the_expiry_index_never_a_scan(self):
        folder = make_folder(self)
        store = im.Store(os.path.join(folder, "db.sqlite3"))
        self.addCleanup(store.close)
        traced = []
        store.db.set_trace_callback(traced.append)
        store.expiring(100, 200)
        store.expired_before(100)
        store.db.set_trace_callback(None)
        queries = [q for q in traced if q.lstrip().upper().startswith("SELECT")]
        self.assertEqual(len(queries), 2, traced)
        for query in queries:
            plan = " ".join(row[-1] for row in store.db.execute("EXPLAIN QUERY PLAN " + query))
            self.assertIn("handles_by_expiry", plan, query)
            self.assertNotRegex(plan, r"SCAN (h|handles)\b", query)


###############################################################################
# Postfix
###############################################################################

class MapFileTest(PostmapTestCase):
    """The text map and its index: admin lines kept byte for byte, our lines in step, at once."""

    def marker_prefix(self, admin=ADMIN_LINES):
        return admin + im.MAP_MARKER

    def test_admin_lines_above_the_marker_survive_add_delete_and_rebuild_byte_for_byte(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        fixture = self.start_service(site)
        self.assertEqual(site.map_text(), self.marker_prefix())
        token = fixture.new_account()
        handles = [fixture.new_handle(token) for _ in range(3)]
        fixture.call("delete_handle", token=token, address=handles[0])
        fixture.call("update_handle", token=token, address=handles[1], enabled=False)
        self.assertTrue(site.map_text().startswith(self.marker_prefix()))
        fixture.stop()
        self.assertEqual(site.map_text(), self.marker_prefix() + ("%s me@example.org\n" % handles[2]).encode())
        os.unlink(site.indexed_path)            # force a full rebuild at the next start
        fixture = self.start_service(site)
        self.assertEqual(site.map_text(), self.marker_prefix() + ("%s me@example.org\n" % handles[2]).encode())
        self.assertEqual(site.query("postmaster@incognito.test"), "root@example.org")
        self.assertIn("bob@example.org", site.query("sales@incognito.test"))
        self.assertEqual(site.query("info@other.test"), "carol@example.org")
        self.assertEqual(site.query(handles[2]), "me@example.org")

    def test_admin_file_without_a_trailing_newline_keeps_every_byte(self):
        admin = b"info@other.test carol@example.org\r\n# last line, no newline: \xff\xfe"
        site = self.make_site(admin_lines=admin)
        fixture = self.start_service(site)
        token = fixture.new_account()
        handle = fixture.new_handle(token)
        fixture.stop()
        text = site.map_text()
        self.assertTrue(text.startswith(admin), text)
        self.assertEqual(text[len(admin):], b"\n" + im.MAP_MARKER + ("%s me@example.org\n" % handle).encode())

    def test_new_handle_is_in_the_text_file_and_visible_to_postmap_at_once(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account("Me@Example.ORG")
        handle = fixture.new_handle(token)
        self.assertEqual(site.query(handle), "Me@example.org")
        self.assertEqual(site.query(handle.upper()), "Me@example.org")
        self.assertIn("%s Me@example.org" % handle, site.our_lines())

    def test_additions_are_appended_without_rewriting_the_text_file(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        fixture = self.start_service(site)
        token = fixture.new_account()
        before = os.stat(site.map_path)
        text_before = site.map_text()
        handle = fixture.new_handle(token)
        after = os.stat(site.map_path)
        self.assertEqual(after.st_ino, before.st_ino)
        self.assertEqual(site.map_text(), text_before + ("%s me@example.org\n" % handle).encode())

    def test_deletions_are_coalesced_into_one_later_rewrite_of_the_text_file(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        handles = [fixture.new_handle(token) for _ in range(5)]
        inode = os.stat(site.map_path).st_ino
        with mock.patch.object(im, "_write_atomically", wraps=im._write_atomically) as rewrite:
            for handle in handles[:4]:
                fixture.call("delete_handle", token=token, address=handle)
                self.assertIsNone(site.query(handle))
            self.assertEqual(os.stat(site.map_path).st_ino, inode, "a deletion rewrote the whole text file")
            fixture.stop()
        self.assertEqual(rewrite.call_count, 1)
        self.assertEqual(site.our_lines(), {"%s me@example.org" % handles[4]})

    def test_text_file_drops_deleted_lines_soon_without_a_stop(self):
        site = self.make_site()
        with mock.patch.object(im, "TEXT_FLUSH_DELAY", 0.3):
            fixture = self.start_service(site)
            token = fixture.new_account()
            keep, gone = fixture.new_handle(token), fixture.new_handle(token)
            fixture.call("delete_handle", token=token, address=gone)
            converged = wait_until(lambda: site.our_lines() == {"%s me@example.org" % keep}, timeout=10)
        self.assertTrue(converged, site.our_lines())

    def test_a_failing_text_rewrite_is_retried_later_not_in_a_loop(self):
        site = self.make_site()
        with mock.patch.object(im, "TEXT_FLUSH_DELAY", 0.2):
            fixture = self.start_service(site)
            token = fixture.new_account()
            gone = fixture.new_handle(token)
            disk_full = OSError(errno.ENOSPC, "No space left on device")
            with mock.patch.object(im, "_write_atomically", side_effect=disk_full) as rewrite, \
                    self.assertLogs(im.log, logging.ERROR):
                fixture.call("delete_handle", token=token, address=gone)
                time.sleep(1.5)
            self.assertGreaterEqual(rewrite.call_count, 1)
            self.assertLessEqual(rewrite.call_count, 10)
            self.assertIsNone(site.query(gone))
            converged = wait_until(lambda: site.our_lines() == set(), timeout=10)
        self.assertTrue(converged, site.our_lines())

    def test_rewritten_text_file_is_never_newer_than_its_index(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        keep, gone = fixture.new_handle(token), fixture.new_handle(token)
        fixture.call("delete_handle", token=token, address=gone)
        fixture.stop()                              # rewrites the text file
        self.assertLessEqual(os.stat(site.map_path).st_mtime, os.stat(site.indexed_path).st_mtime)
        for path in (site.map_path, site.indexed_path):  # older, in the same order, so that
            old = os.stat(path).st_mtime - 200              # postmap compares their ages at all
            os.utime(path, (old, old))
        done = site.postmap("-q", keep, "%s:%s" % (site.config.map_type, site.map_path))
        self.assertEqual((done.stdout.strip(), done.stderr), ("me@example.org", ""))

    def test_deleted_handle_is_gone_from_postmap_at_once_and_from_the_text_file_after_a_clean_stop(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        keep, gone = fixture.new_handle(token), fixture.new_handle(token)
        fixture.call("delete_handle", token=token, address=gone)
        self.assertIsNone(site.query(gone))
        self.assertEqual(site.query(keep), "me@example.org")
        fixture.stop()
        self.assertEqual(site.our_lines(), {"%s me@example.org" % keep})

    def test_text_file_holds_exactly_the_enabled_handles_after_a_clean_stop(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        fixture = self.start_service(site)
        mine, yours = fixture.new_account(), fixture.new_account("you@example.org")
        a, b, c = (fixture.new_handle(mine) for _ in range(3))
        d = fixture.new_handle(yours, domain="other.test")
        fixture.call("delete_handle", token=mine, address=a)
        fixture.call("update_handle", token=mine, address=b, enabled=False)
        e = fixture.new_handle(mine)
        fixture.stop()
        self.assertEqual(site.our_lines(), {"%s me@example.org" % c, "%s you@example.org" % d, "%s me@example.org" % e})

    def test_disabled_handle_is_absent_from_the_map_and_back_once_enabled(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        handle = fixture.new_handle(token)
        result = fixture.call("update_handle", token=token, address=handle, enabled=False)
        self.assertFalse(result["enabled"])
        self.assertIsNone(site.query(handle))
        self.assertEqual([h["enabled"] for h in fixture.call("list_handles", token=token)], [False])
        fixture.call("update_handle", token=token, address=handle, enabled=True)
        self.assertEqual(site.query(handle), "me@example.org")

    def test_disable_then_enable_keeps_the_handles_line_in_the_text_file(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        handle = fixture.new_handle(token)
        fixture.call("update_handle", token=token, address=handle, enabled=False)
        fixture.call("update_handle", token=token, address=handle, enabled=True)
        fixture.stop()
        self.assertEqual(site.query(handle), "me@example.org")
        self.assertEqual(site.our_lines(), {"%s me@example.org" % handle},
                         "the text map lost an enabled handle: a manual postmap of it would drop the handle")

    def test_delete_handle_removes_only_that_handle_not_others_sharing_its_prefix(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        with mock.patch.object(im, "new_handle_name", side_effect=["prefixprefixpre1", "prefixprefixpre12",
                                                                  "prefixprefixpre"]):
            short, longer, shorter = (fixture.new_handle(token) for _ in range(3))
        fixture.call("delete_handle", token=token, address=short)
        self.assertIsNone(site.query(short))
        self.assertEqual(site.query(longer), "me@example.org")
        self.assertEqual(site.query(shorter), "me@example.org")
        fixture.stop()
        self.assertEqual(site.our_lines(), {"%s me@example.org" % longer, "%s me@example.org" % shorter})

    def test_delete_account_removes_all_its_handles_from_the_map(self):
        site = self.make_site()
        fixture = self.start_service(site)
        mine, yours = fixture.new_account(), fixture.new_account("you@example.org")
        my_handles = [fixture.new_handle(mine) for _ in range(3)]
        your_handle = fixture.new_handle(yours)
        self.assertEqual(fixture.call("delete_account", token=mine), 3)
        for handle in my_handles:
            self.assertIsNone(site.query(handle))
        self.assertEqual(site.query(your_handle), "you@example.org")
        with self.assertRaises(im.Unauthorized):
            fixture.call("list_handles", token=mine)
        fixture.stop()
        self.assertEqual(site.our_lines(), {"%s you@example.org" % your_handle})

    def test_rewrites_keep_the_owner_and_mode_of_the_map_files(self):
        require_root_tools()
        site = self.make_site(admin_lines=ADMIN_LINES)
        self.assertEqual(site.postmap("%s:%s" % (site.config.map_type, site.map_path)).returncode, 0)
        for path in (site.map_path, site.indexed_path):
            os.chown(path, NOBODY_UID, NOBODY_UID)
            os.chmod(path, 0o640)

        def assert_kept(when):
            for path in (site.map_path, site.indexed_path):
                st = os.stat(path)
                self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (NOBODY_UID, NOBODY_UID, 0o640),
                                 "%s %s" % (path, when))
        fixture = self.start_service(site)                      # full rebuild: no clean stop yet
        assert_kept("after the rebuild at start")
        token = fixture.new_account()
        handles = [fixture.new_handle(token) for _ in range(2)]
        fixture.call("delete_handle", token=token, address=handles[0])
        assert_kept("after postmap -i and -d")
        fixture.stop()                                          # rewrites the text file
        assert_kept("after the text file was rewritten")
        with open(site.map_path, "ab") as f:                    # drift: rebuilt at the next start
            f.write(b"ghost@incognito.test evil@example.net\n")
        self.start_service(site)
        assert_kept("after a rebuild that replaced both files")

    def test_text_file_is_replaced_atomically_by_rename(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        fixture = self.start_service(site)
        token = fixture.new_account()
        keep, gone = fixture.new_handle(token), fixture.new_handle(token)
        fixture.call("delete_handle", token=token, address=gone)
        old_text = site.map_text()
        old_inode = os.stat(site.map_path).st_ino
        with open(site.map_path, "rb") as reader:              # a reader of the old file ...
            fixture.stop()
            self.assertEqual(reader.read(), old_text)           # ... reads it whole, never half
        self.assertNotEqual(os.stat(site.map_path).st_ino, old_inode)
        self.assertEqual(site.map_text(), self.marker_prefix() + ("%s me@example.org\n" % keep).encode())
        self.assertEqual(sorted(n for n in os.listdir(os.path.dirname(site.map_path)) if "incognitomail" in n), [])

    def test_failed_rewrite_leaves_the_old_text_file_intact(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        fixture = self.start_service(site)
        token = fixture.new_account()
        keep, gone = fixture.new_handle(token), fixture.new_handle(token)
        fixture.call("delete_handle", token=token, address=gone)
        old_text, old_inode = site.map_text(), os.stat(site.map_path).st_ino
        with mock.patch("os.replace", side_effect=OSError(28, "No space left on device")), \
                self.assertLogs(im.log, logging.ERROR) as logged:
            fixture.stop()
        self.assertEqual(site.map_text(), old_text)
        self.assertEqual(os.stat(site.map_path).st_ino, old_inode)
        self.assertTrue(any(site.map_path in line and "No space left" in line for line in logged.output), logged.output)
        self.assertIsNone(site.query(gone))
        self.assertEqual(site.query(keep), "me@example.org")

    def test_text_file_left_stale_by_a_failed_rewrite_is_repaired_at_the_next_start(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        keep, gone = fixture.new_handle(token), fixture.new_handle(token)
        fixture.call("delete_handle", token=token, address=gone)
        with mock.patch("os.replace", side_effect=OSError(28, "No space left on device")), \
                self.assertLogs(im.log, logging.ERROR):
            fixture.stop()
        fixture = self.start_service(site)
        fixture.stop()
        self.assertEqual(site.our_lines(), {"%s me@example.org" % keep},
                         "a deleted handle stayed in the text map, so a manual postmap would bring it back")


class LmdbMapFileTest(MapFileTest):
    """The same promises with an lmdb: map."""
    MAP_TYPE = "lmdb"

    def test_lmdb_index_is_the_file_postfix_reads(self):
        site = self.make_site()
        fixture = self.start_service(site)
        handle = fixture.new_handle(fixture.new_account())
        self.assertTrue(os.path.exists(site.map_path + ".lmdb"))
        self.assertFalse(os.path.exists(site.map_path + ".db"))
        self.assertEqual(site.query(handle), "me@example.org")


class HashVisibilityTest(PostmapTestCase):
    """hash: maps: running Postfix daemons re-open a table only when its mtime's second moves."""

    def test_index_mtime_moves_to_a_new_whole_second_on_every_change(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        seconds = [int(os.stat(site.indexed_path).st_mtime)]
        handles = []
        for _ in range(3):
            handles.append(fixture.new_handle(token))
            seconds.append(int(os.stat(site.indexed_path).st_mtime))
        fixture.call("delete_handle", token=token, address=handles[0])
        seconds.append(int(os.stat(site.indexed_path).st_mtime))
        fixture.call("update_handle", token=token, address=handles[1], enabled=False)
        seconds.append(int(os.stat(site.indexed_path).st_mtime))
        self.assertEqual(seconds, sorted(set(seconds)), "two changes shared a second: Postfix would miss one")


class ReconcileTest(PostmapTestCase):
    """At start the map is made to match the database; an in-step map is left alone."""

    def make_stopped_site(self):
        site = self.make_site(admin_lines=ADMIN_LINES)
        fixture = self.start_service(site)
        token = fixture.new_account()
        handles = [fixture.new_handle(token) for _ in range(3)]
        fixture.call("delete_handle", token=token, address=handles.pop())
        fixture.stop()
        return site, token, handles

    def assert_in_step(self, site, handles):
        self.assertEqual(site.our_lines(), {"%s me@example.org" % h for h in handles})
        self.assertTrue(site.map_text().startswith(ADMIN_LINES + im.MAP_MARKER))
        for handle in handles:
            self.assertEqual(site.query(handle), "me@example.org")
        self.assertEqual(site.query("postmaster@incognito.test"), "root@example.org")

    def identity(self, site):
        return [(s.st_ino, s.st_size, s.st_mtime_ns) for s in (os.stat(site.map_path), os.stat(site.indexed_path))]

    def test_in_step_map_is_left_alone_at_start(self):
        site, token, handles = self.make_stopped_site()
        before = self.identity(site)
        with mock.patch.object(im.PostfixMap, "rebuild", side_effect=AssertionError("rebuilt an in-step map")):
            fixture = self.start_service(site)
        self.assertEqual(self.identity(site), before)
        self.assert_in_step(site, handles)
        self.assertEqual(fixture.new_handle(token).split("@")[1], "incognito.test")

    def test_missing_map_is_rebuilt_from_the_database_at_start(self):
        site, token, handles = self.make_stopped_site()
        os.unlink(site.map_path)
        os.unlink(site.indexed_path)
        self.start_service(site)
        self.assertEqual(site.our_lines(), {"%s me@example.org" % h for h in handles})
        for handle in handles:
            self.assertEqual(site.query(handle), "me@example.org")

    def test_missing_index_is_rebuilt_at_start(self):
        site, token, handles = self.make_stopped_site()
        os.unlink(site.indexed_path)
        self.start_service(site)
        self.assert_in_step(site, handles)

    def test_map_with_drift_is_rebuilt_at_start(self):
        site, token, handles = self.make_stopped_site()
        spec = "%s:%s" % (site.config.map_type, site.map_path)
        site.postmap("-d", handles[0], spec)                                      # an acknowledged handle lost
        with open(site.map_path, "ab") as f:                                      # a line nobody made
            f.write(b"ghost@incognito.test evil@example.net\n")
        site.postmap("-i", spec, stdin="ghost@incognito.test evil@example.net\n")
        self.assertIsNone(site.query(handles[0]))
        self.assertEqual(site.query("ghost@incognito.test"), "evil@example.net")
        self.start_service(site)
        self.assert_in_step(site, handles)
        self.assertIsNone(site.query("ghost@incognito.test"))

    def test_map_is_rebuilt_when_the_last_stop_was_not_clean(self):
        site, token, handles = self.make_stopped_site()
        spec = "%s:%s" % (site.config.map_type, site.map_path)
        store = im.Store(site.config.database_path)
        with store.transaction():
            store.set_meta("clean_stop", None)                  # as after a crash
        store.close()
        site.postmap("-d", handles[0], spec)
        self.start_service(site)
        self.assert_in_step(site, handles)


class RollbackTest(PostmapTestCase):
    """A failing postmap or map write undoes the database change; the service keeps working."""

    def setUp(self):
        self.site = self.make_site(admin_lines=ADMIN_LINES)
        self.fixture = self.start_service(self.site)
        self.token = self.fixture.new_account()
        self.handle = self.fixture.new_handle(self.token)
        self.bin, self.fail_flag, _ = failing_postmap_folder(self, mode="always-fail")

    def failing_postmap(self):
        return mock.patch.dict(os.environ, {"PATH": path_with(self.bin)})

    def handles_in_store(self):
        return sorted(h["address"] for h in self.fixture.call("list_handles", token=self.token))

    def assert_still_working(self):
        handle = self.fixture.new_handle(self.token)
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertEqual(self.site.query(self.handle), "me@example.org")

    def test_failing_postmap_rolls_back_a_new_handle_with_a_clear_error(self):
        text_before = self.site.map_text()
        with self.failing_postmap(), self.assertLogs(im.log, logging.ERROR):
            with self.assertRaises(im.PostfixError) as caught:
                self.fixture.new_handle(self.token)
        self.assertIn("postmap", str(caught.exception))
        self.assertIn("simulated failure", str(caught.exception))
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.assertEqual(self.site.map_text(), text_before)
        self.assert_still_working()

    def test_failing_postmap_rolls_back_a_delete_and_the_handle_keeps_routing(self):
        with self.failing_postmap(), self.assertLogs(im.log, logging.ERROR):
            with self.assertRaises(im.PostfixError):
                self.fixture.call("delete_handle", token=self.token, address=self.handle)
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.assertEqual(self.site.query(self.handle), "me@example.org")
        self.assert_still_working()
        self.fixture.stop()
        self.assertIn("%s me@example.org" % self.handle, self.site.our_lines())

    def test_failing_postmap_rolls_back_a_disable(self):
        with self.failing_postmap(), self.assertLogs(im.log, logging.ERROR):
            with self.assertRaises(im.PostfixError):
                self.fixture.call("update_handle", token=self.token, address=self.handle, enabled=False)
        self.assertEqual([h["enabled"] for h in self.fixture.call("list_handles", token=self.token)], [True])
        self.assertEqual(self.site.query(self.handle), "me@example.org")
        self.assert_still_working()

    def test_failing_postmap_rolls_back_a_delete_account(self):
        with self.failing_postmap(), self.assertLogs(im.log, logging.ERROR):
            with self.assertRaises(im.PostfixError):
                self.fixture.call("delete_account", token=self.token)
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.assertEqual(self.site.query(self.handle), "me@example.org")

    def test_postfix_config_dir_without_main_cf_rolls_back_and_names_main_cf(self):
        empty = make_folder(self)
        self.fixture.table.config_dir = empty
        with self.assertLogs(im.log, logging.ERROR):
            with self.assertRaises(im.PostfixError) as caught:
                self.fixture.new_handle(self.token)
        self.assertIn("main.cf", str(caught.exception))
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.fixture.table.config_dir = self.site.config.postfix_config_dir
        self.assert_still_working()

    def test_map_file_removed_while_running_gives_a_clear_error_and_the_service_keeps_answering(self):
        os.rename(self.site.map_path, self.site.map_path + ".saved")
        try:
            with self.assertLogs(im.log, logging.ERROR):
                with self.assertRaises(im.PostfixError) as caught:
                    self.fixture.new_handle(self.token)
        finally:
            os.rename(self.site.map_path + ".saved", self.site.map_path)
        self.assertIn(self.site.map_path, str(caught.exception))
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.assert_still_working()

    def test_a_change_that_cannot_be_undone_is_cleared_by_a_rebuild_from_the_database(self):
        def commit_fails():         # the disk fills at the commit, and the undo's postmap fails too
            open(self.fail_flag, "w").close()
            raise sqlite3.OperationalError("database or disk is full")
        os.unlink(self.fail_flag)
        with self.failing_postmap(), self.assertLogs(im.log, logging.ERROR) as logged, \
                mock.patch.object(im, "new_handle_name", side_effect=["strayhandle00001"]), \
                mock.patch.object(self.fixture.store, "commit", side_effect=commit_fails):
            with self.assertRaises(im.StoreError):
                self.fixture.new_handle(self.token)
            # the worker tries a rebuild right after the batch it answered: while postmap fails
            self.assertTrue(wait_until(lambda: any("stays in doubt" in line for line in logged.output),
                                       timeout=10), logged.output)
        os.unlink(self.fail_flag)
        self.assertEqual(self.site.query("strayhandle00001@incognito.test"), "me@example.org")   # in doubt
        with self.failing_postmap():
            later = self.fixture.new_handle(self.token)        # the batch after it rebuilds
            self.assertTrue(wait_until(lambda: self.site.query("strayhandle00001@incognito.test") is None,
                                       timeout=10), "the stray handle outlived the rebuild")
        self.assertEqual(self.site.query(later), "me@example.org")
        self.assertEqual(self.handles_in_store(), sorted([self.handle, later]))

    def test_unwritable_map_file_rolls_back_and_names_the_file(self):
        saved = self.site.map_text()
        os.rename(self.site.map_path, self.site.map_path + ".saved")
        os.mkdir(self.site.map_path)                     # root may write anything but this
        try:
            with self.assertLogs(im.log, logging.ERROR):
                with self.assertRaises(im.PostfixError) as caught:
                    self.fixture.new_handle(self.token)
        finally:
            os.rmdir(self.site.map_path)
            os.rename(self.site.map_path + ".saved", self.site.map_path)
        self.assertIn(self.site.map_path, str(caught.exception))
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.assertEqual(self.site.map_text(), saved)
        self.assert_still_working()

    def test_failed_commit_after_the_map_update_undoes_the_map_change(self):
        text_before = self.site.map_text()
        names = ["undoneundoneund1"]
        with mock.patch.object(im, "new_handle_name", side_effect=names), \
                mock.patch.object(self.fixture.store, "commit", side_effect=sqlite3.OperationalError("disk I/O error")), \
                self.assertLogs(im.log, logging.ERROR):
            with self.assertRaises(im.StoreError) as caught:
                self.fixture.new_handle(self.token)
        self.assertIn("disk I/O error", str(caught.exception))
        self.assertIsNone(self.site.query("undoneundoneund1@incognito.test"))
        self.assertEqual(self.site.map_text(), text_before)
        self.assertEqual(self.handles_in_store(), [self.handle])
        self.assert_still_working()


class EndToEndDeliveryTest(PostfixInstanceTestCase):
    """Handles made through the command line route real mail; removed ones are refused at RCPT."""

    def test_handle_made_through_the_command_line_receives_mail_and_once_deleted_is_rejected_at_rcpt(self):
        site, daemon = self.start()
        self.assert_foreign_line_kept()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        self.assert_delivered(handle, "alice")
        self.assert_foreign_line_kept()
        self.run_cli(site, "delete", "handle", handle, token)
        text = self.assert_rejected_at_rcpt(handle)
        self.assertIn("User unknown", text)
        self.assert_foreign_line_kept()

    def test_handle_in_use_receives_mail_with_its_original_recipient_recorded(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "carol@mbox.test")
        handle = self.run_cli(site, "new", "handle", "-", "--label", "shop", input=token + "\n")
        mark = self.assert_delivered(handle, "carol")
        message = self.pf.mailbox("carol").split(mark)[0].rsplit("\nFrom ", 1)[-1]
        self.assertIn("X-Original-To: %s" % handle, message)

    def test_disabled_handle_is_rejected_at_rcpt_and_receives_again_once_enabled(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        self.run_cli(site, "disable", "handle", handle, token)
        self.assert_rejected_at_rcpt(handle)
        self.run_cli(site, "enable", "handle", handle, token)
        self.assert_delivered(handle, "alice")

    def test_deleted_account_leaves_its_handles_rejected(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handles = [self.run_cli(site, "new", "handle", token) for _ in range(2)]
        self.run_cli(site, "delete", "account", token)
        for handle in handles:
            self.assert_rejected_at_rcpt(handle)
        self.assert_foreign_line_kept()

    def test_foreign_line_and_handles_survive_restarts_and_rebuilds(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "dave@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        self.assertEqual(daemon.stop(), 0)
        DaemonProcess(site).start().stop()                  # in step: left alone
        self.assert_foreign_line_kept()
        os.unlink(self.pf.map_path + (".lmdb" if self.MAP_TYPE == "lmdb" else ".db"))
        again = start_daemon(self, site)                    # index missing: rebuilt
        self.assertIn("rebuilt", again.log())
        self.assert_delivered(handle, "dave")
        self.assert_foreign_line_kept()
        again.kill()                                        # a crash: rebuilt at the next start
        start_daemon(self, site)
        self.assert_delivered(handle, "dave")
        self.assert_foreign_line_kept()


class CreateThenSendTests:
    """Mixin: visibility at once, the whole-second mtime trap of hash: maps included."""

    ROUNDS = 20

    def test_new_handles_receive_mail_sent_the_moment_they_are_made(self):
        site, daemon = self.start()
        token = new_account(site, "carol@mbox.test")
        marks = []
        for round in range(self.ROUNDS):
            handle = new_handle(site, token)
            ok, code, text, mark = self.pf.send(handle)
            self.assertTrue(ok, "round %d: %s refused right after it was made: %s %s" % (round, handle, code, text))
            marks.append((handle, mark))
        for handle, mark in marks:
            self.assertTrue(self.pf.wait_for_mail("carol", mark),
                            "accepted but not delivered (bounced by a stale cleanup?): %s" % handle)
        self.assert_foreign_line_kept()

    def test_deleted_handles_are_rejected_the_moment_they_are_deleted(self):
        site, daemon = self.start()
        token = new_account(site, "carol@mbox.test")
        for round in range(self.ROUNDS):
            handle = new_handle(site, token)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 250, "round %d: new %s refused" % (round, handle))
            control(site, "delete_handle", token=token, address=handle)
            code, text = self.pf.rcpt_check(handle)
            self.assertEqual(code, 550, "round %d: deleted %s still accepted: %s" % (round, handle, text))
        self.assert_foreign_line_kept()

    def test_disabled_handles_are_rejected_at_once_and_accepted_at_once_when_enabled(self):
        site, daemon = self.start()
        token = new_account(site, "carol@mbox.test")
        handle = new_handle(site, token)
        for round in range(self.ROUNDS // 2):
            control(site, "update_handle", token=token, address=handle, enabled=False)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 550, "round %d: disabled handle accepted" % round)
            control(site, "update_handle", token=token, address=handle, enabled=True)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 250, "round %d: enabled handle refused" % round)


class CreateThenSendHashTest(CreateThenSendTests, PostfixInstanceTestCase):
    MAP_TYPE = "hash"


class CreateThenSendLmdbTest(CreateThenSendTests, PostfixInstanceTestCase):
    MAP_TYPE = "lmdb"


###############################################################################
# Service
###############################################################################

class NewHandleNamesTest(PostmapTestCase):
    """A new handle never equals a handle in the database or a key of the admin's lines."""

    def test_new_handle_skips_a_name_already_in_the_database(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        with mock.patch.object(im, "new_handle_name", side_effect=["takentakentaken1"]):
            self.assertEqual(fixture.new_handle(token), "takentakentaken1@incognito.test")
        with mock.patch.object(im, "new_handle_name", side_effect=["takentakentaken1", "freshfreshfresh1"]) as names:
            self.assertEqual(fixture.new_handle(fixture.new_account("you@example.org")),
                             "freshfreshfresh1@incognito.test")
        self.assertEqual(names.call_count, 2)
        self.assertEqual(site.query("takentakentaken1@incognito.test"), "me@example.org")

    def test_new_handle_skips_a_key_of_the_admins_own_map_lines(self):
        site = self.make_site(admin_lines=b"adminadminadmin1@incognito.test root@example.org\n")
        fixture = self.start_service(site)
        token = fixture.new_account()
        with mock.patch.object(im, "new_handle_name", side_effect=["adminadminadmin1", "freshfreshfresh1"]):
            self.assertEqual(fixture.new_handle(token), "freshfreshfresh1@incognito.test")
        self.assertEqual(site.query("adminadminadmin1@incognito.test"), "root@example.org")

    def test_same_name_in_another_domain_is_a_different_handle(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        with mock.patch.object(im, "new_handle_name", return_value="samesamesamesame"):
            self.assertEqual(fixture.new_handle(token), "samesamesamesame@incognito.test")
            self.assertEqual(fixture.new_handle(token, domain="@Other.test"), "samesamesamesame@other.test")

    def test_handle_length_follows_the_configuration(self):
        site = self.make_site(sections={"PostfixConfig": {"HandleLength": "21"}})
        fixture = self.start_service(site)
        self.assertRegex(fixture.new_handle(fixture.new_account()), r"^[a-z0-9]{21}@incognito\.test$")

    def test_new_handle_in_a_domain_not_served_is_refused(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        with self.assertRaises(im.BadRequest) as caught:
            fixture.new_handle(token, domain="elsewhere.test")
        self.assertIn("incognito.test", str(caught.exception))
        self.assertEqual(fixture.call("list_handles", token=token), [])


class ServiceBatchingTest(PostmapTestCase):
    """Requests arriving together are one transaction and one postmap; a bad one fails alone."""

    def setUp(self):
        self.site = self.make_site()
        self.fixture = self.start_service(self.site)
        self.service = self.fixture.service
        self.token = self.fixture.new_account()

    def hold_worker(self):
        """Occupy the worker with a request that waits on an event; return (future, release)."""
        entered, release = threading.Event(), threading.Event()

        def blocked(work):
            entered.set()
            release.wait(30)
        self.addCleanup(release.set)
        future = self.service.write(blocked, {})
        self.assertTrue(entered.wait(10))
        return future, release

    def test_requests_queued_together_are_one_batch_with_one_postmap_insert(self):
        held, release = self.hold_worker()
        futures = [self.fixture.submit("new_handle", token=self.token) for _ in range(30)]
        batches = self.service.batches
        with mock.patch.object(self.fixture.table, "postmap", wraps=self.fixture.table.postmap) as postmap:
            release.set()
            handles = [f.result(30).address for f in futures]
        self.assertEqual(self.service.batches, batches + 1)
        self.assertEqual([c.args[:2] for c in postmap.call_args_list if c.args[0] != "-q"], [("-r", "-i")])
        self.assertEqual(len(set(handles)), 30)
        for handle in handles[::7]:
            self.assertEqual(self.site.query(handle), "me@example.org")

    def test_many_concurrent_clients_end_in_fewer_batches(self):
        clients = 40
        barrier = threading.Barrier(clients)
        results, errors = [], []

        def client():
            try:
                barrier.wait(10)
                results.append(self.fixture.result("new_handle", token=self.token).address)
            except Exception as e:                  # reported below
                errors.append(e)
        before = self.service.batches
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(len(set(results)), clients)
        self.assertLess(self.service.batches - before, clients // 2)
        for handle in results:
            self.assertEqual(self.site.query(handle), "me@example.org")

    def test_a_failing_map_update_fails_only_the_requests_that_change_the_map(self):
        bin_folder, _, _ = failing_postmap_folder(self, mode="always-fail")
        held, release = self.hold_worker()
        with mock.patch.dict(os.environ, {"PATH": path_with(bin_folder)}), self.assertLogs(im.log, logging.ERROR):
            creating = self.fixture.submit("new_handle", token=self.token)
            rotating = self.fixture.submit("rotate_token", token=self.token)
            release.set()
            with self.assertRaises(im.PostfixError):
                creating.result(10)
            self.assertEqual(len(rotating.result(10)), im.TOKEN_LENGTH)
        held.result(10)

    def test_one_bad_request_in_a_batch_fails_alone(self):
        other = self.fixture.new_account("you@example.org")
        foreign_handle = self.fixture.new_handle(other)
        held, release = self.hold_worker()
        good = [self.fixture.submit("new_handle", token=self.token, label="shop") for _ in range(2)]
        bad_token = self.fixture.submit("new_handle", token="not-a-token")
        not_mine = self.fixture.submit("delete_handle", token=self.token, address=foreign_handle)
        new_account = self.fixture.submit("new_account", address="them@example.org")
        good.append(self.fixture.submit("new_handle", token=self.token, domain="other.test"))
        batches = self.service.batches
        release.set()
        handles = [f.result(30).address for f in good]
        self.assertIsInstance(bad_token.exception(30), im.Unauthorized)
        self.assertIsInstance(not_mine.exception(30), im.NotFound)
        self.assertIsInstance(new_account.result(30), str)
        self.assertEqual(self.service.batches, batches + 1)
        for handle in handles:
            self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertEqual(self.site.query(foreign_handle), "you@example.org")
        self.assertEqual(len(self.fixture.call("list_handles", token=self.token)), 3)

    def test_each_change_is_a_postmap_insert_or_delete_never_a_full_rebuild(self):
        with mock.patch.object(self.fixture.table, "postmap", wraps=self.fixture.table.postmap) as postmap, \
                mock.patch.object(self.fixture.table, "rebuild", side_effect=AssertionError("full rebuild")):
            handle = self.fixture.new_handle(self.token)
            self.fixture.call("update_handle", token=self.token, address=handle, enabled=False)
            self.fixture.call("update_handle", token=self.token, address=handle, enabled=True)
            self.fixture.call("delete_handle", token=self.token, address=handle)
        kinds = [next(a for a in c.args if a in ("-i", "-d")) for c in postmap.call_args_list]
        self.assertEqual(kinds, ["-i", "-d", "-i", "-d"])


class FairTurnsTest(PostmapTestCase):
    """Owners are served in turns, reads apart from writes, and a batch holds at most
    MAX_BATCH operations: no account's queue delays another's by more than a turn."""

    def test_jobs_are_taken_one_key_at_a_time_and_urgent_ones_first(self):
        queue = im._FairQueue()
        for n in range(4):
            queue.put("a%d" % n, key="a")
        queue.put("b0", key="b")
        queue.put("mail", urgent=True)
        queue.put("b1", key="b")
        self.assertEqual(queue.take(3), ["mail", "a0", "b0"])
        self.assertEqual(queue.take(10), ["a1", "b1", "a2", "a3"])
        queue.close()
        self.assertIsNone(queue.take(1))

    def test_a_read_is_answered_while_the_writer_is_busy(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def held(work):
            entered.set()
            release.wait(30)
        writing = fixture.service.write(held, {})
        self.assertTrue(entered.wait(10))
        started = time.monotonic()
        self.assertEqual(fixture.result("account", token=token).handles, 0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertFalse(writing.done())
        release.set()
        writing.result(10)

    def test_a_batch_takes_at_most_max_batch_operations(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        fixture.service.write(lambda work: (entered.set(), release.wait(30)), {})
        self.assertTrue(entered.wait(10))
        batches = fixture.service.batches
        futures = [fixture.submit("update_handle", token=token, address="nosuch", label="x")
                   for _ in range(im.MAX_BATCH + 1)]
        release.set()
        for future in futures:
            self.assertIsInstance(future.exception(30), im.NotFound)
        self.assertEqual(fixture.service.batches - batches, 2)


class PruneTest(PostmapTestCase):
    """Pruning with a clock the test sets: exactly the never-used old handles and accounts."""

    def make_pruning_site(self, policy=True):
        return self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:10040" if policy else ""}})

    def setUp(self):
        # 30 days ago: the policy service starts counting, handles are made
        self.now = [T0 - 30 * DAY]
        self.site = self.make_pruning_site()
        self.fixture = self.start_service(self.site, clock=lambda: self.now[0])
        fixture = self.fixture
        self.used_account = fixture.new_account("used@example.org")
        self.old_unused_handle = fixture.new_handle(self.used_account)
        self.old_used_handle = fixture.new_handle(self.used_account)
        self.old_disabled_unused = fixture.new_handle(self.used_account)
        fixture.call("update_handle", token=self.used_account, address=self.old_disabled_unused, enabled=False)
        fixture.new_account("never@example.org")
        self.fixture.service.record_mail([(self.old_used_handle, self.now[0] + DAY, im.RECEIVED)]).result(30)
        # an old account whose token was never used, but which has a handle made for it
        self.kept_account = fixture.new_account("kept@example.org")
        self.kept_handle = fixture.new_handle(self.kept_account)
        self.fixture.service.record_mail([(self.kept_handle, self.now[0], im.RECEIVED)]).result(30)
        self.fixture.store.db.execute("UPDATE accounts SET last_used = NULL WHERE address = 'kept@example.org'")
        # yesterday
        self.now[0] += 29 * DAY
        fixture.new_account("young@example.org")
        self.young_unused_handle = fixture.new_handle(self.used_account)
        self.now[0] += DAY

    def all_addresses(self):
        db = self.fixture.store.db
        return (set(a for (a,) in db.execute("SELECT address FROM accounts")),
                set("%s@%s" % row for row in db.execute("SELECT local, domain FROM handles")))

    def test_dry_run_lists_what_would_go_and_removes_nothing(self):
        before = self.all_addresses()
        removed = self.fixture.call("prune", handles_unused_days=7, accounts_unused_days=7, dry_run=True)
        self.assertEqual(sorted(removed), sorted([self.old_unused_handle, self.old_disabled_unused, "never@example.org"]))
        self.assertEqual(self.all_addresses(), before)
        self.assertEqual(self.site.query(self.old_unused_handle), "used@example.org")

    def test_prune_removes_exactly_the_never_used_old_handles_and_accounts(self):
        removed = self.fixture.call("prune", handles_unused_days=7, accounts_unused_days=7, dry_run=False)
        self.assertEqual(sorted(removed), sorted([self.old_unused_handle, self.old_disabled_unused, "never@example.org"]))
        accounts, handles = self.all_addresses()
        self.assertEqual(accounts, {"used@example.org", "kept@example.org", "young@example.org"})
        self.assertEqual(handles, {self.old_used_handle, self.kept_handle, self.young_unused_handle})
        self.assertIsNone(self.site.query(self.old_unused_handle))
        for handle in (self.old_used_handle, self.young_unused_handle):
            self.assertEqual(self.site.query(handle), "used@example.org")
        self.fixture.stop()
        self.assertEqual(self.site.our_lines(), {"%s used@example.org" % self.old_used_handle,
                                                 "%s kept@example.org" % self.kept_handle,
                                                 "%s used@example.org" % self.young_unused_handle})

    def test_handles_are_not_called_unused_before_the_policy_service_has_counted_that_long(self):
        site = self.make_pruning_site()
        now = [T0]
        fixture = self.start_service(site, clock=lambda: now[0])
        token = fixture.new_account("late@example.org")
        fixture.store.db.execute("UPDATE meta SET value = ? WHERE name = 'counting_since'", (str(int(now[0])),))
        now[0] += 3 * DAY
        with self.assertRaises(im.BadRequest) as caught:
            fixture.call("prune", handles_unused_days=7, accounts_unused_days=None, dry_run=False)
        self.assertIn("counted mail only since", str(caught.exception))
        self.assertEqual(len(fixture.call("list_handles", token=token)), 0)
        now[0] += 5 * DAY
        self.assertEqual(fixture.call("prune", handles_unused_days=7, accounts_unused_days=None, dry_run=False), [])

    def test_zero_days_means_every_never_used_handle_whatever_its_age(self):
        removed = self.fixture.call("prune", handles_unused_days=0, accounts_unused_days=None, dry_run=False)
        self.assertEqual(sorted(removed), sorted([self.old_unused_handle, self.old_disabled_unused,
                                                  self.young_unused_handle]))
        self.assertEqual(self.all_addresses()[1], {self.old_used_handle, self.kept_handle})

    def test_handles_and_accounts_have_their_own_ages(self):
        self.assertEqual(self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=7, dry_run=False), ["never@example.org"])
        with self.assertRaises(im.BadRequest):              # counted for 30 days only, so far
            self.fixture.call("prune", handles_unused_days=60, accounts_unused_days=None, dry_run=False)
        self.now[0] += 40 * DAY                        # the old ones are 70 days old, the young 41
        self.assertEqual(sorted(self.fixture.call("prune", handles_unused_days=60, accounts_unused_days=None, dry_run=False)),
                         sorted([self.old_unused_handle, self.old_disabled_unused]))
        self.assertEqual(sorted(self.fixture.call("prune", handles_unused_days=30, accounts_unused_days=30, dry_run=False)),
                         sorted([self.young_unused_handle, "young@example.org"]))

    def test_prune_without_the_policy_service_is_refused_naming_PolicyListen(self):
        site = self.make_pruning_site(policy=False)
        fixture = self.start_service(site)
        token = fixture.new_account()
        handle = fixture.new_handle(token)
        with self.assertRaises(im.BadRequest) as caught:
            fixture.call("prune", handles_unused_days=0, accounts_unused_days=0, dry_run=False)
        self.assertIn("PolicyListen", str(caught.exception))
        self.assertIn("policy service", str(caught.exception))
        self.assertEqual([h["address"] for h in fixture.call("list_handles", token=token)], [handle])


class HandleExpiryTest(PostmapTestCase):
    """An expired handle leaves the map at the first sweep after its time, and comes back at
    once when its expiry moves into the future or goes."""

    def setUp(self):
        self.now = [T0]
        self.site = self.make_site()
        self.fixture = self.start_service(self.site, clock=lambda: self.now[0])
        self.token = self.fixture.new_account()

    def new_expiring(self, expires="90m", **kwargs):
        return self.fixture.call("new_handle", token=self.token, expires=expires, **kwargs)

    def update(self, handle, **fields):
        return self.fixture.call("update_handle", token=self.token, address=handle, **fields)

    def test_an_expired_handle_leaves_the_map_at_the_first_sweep_after_its_expiry_not_before(self):
        made = self.new_expiring("90m")
        handle, expires = made["address"], from_iso(made["expires"])
        self.assertEqual(expires, T0 + 90 * 60)
        self.now[0] = expires - 1
        self.assertEqual(self.fixture.sweep(), 0)
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertEqual(self.fixture.handle(self.token, handle)["state"], "enabled")
        self.now[0] = expires
        self.assertEqual(self.fixture.handle(self.token, handle)["state"], "expired")
        self.assertEqual(self.fixture.sweep(), 1)
        self.assertIsNone(self.site.query(handle))
        self.assertEqual(self.fixture.sweep(), 0)
        self.fixture.stop()
        self.assertEqual(self.site.our_lines(), set())

    def test_never_or_a_later_time_brings_an_expired_handle_back_at_once(self):
        handle = self.new_expiring("1h")["address"]
        self.now[0] += 2 * 3600
        self.fixture.sweep()
        self.assertIsNone(self.site.query(handle))
        self.assertEqual(self.update(handle, expires="never")["state"], "enabled")
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertEqual(self.update(handle, expires="1h")["expires"], im.iso_time(self.now[0] + 3600))
        self.now[0] += 2 * 3600
        self.fixture.sweep()
        self.assertIsNone(self.site.query(handle))
        later = im.iso_time(self.now[0] + 5 * DAY)
        self.assertEqual(self.update(handle, expires=later)["expires"], later)
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.now[0] += 6 * DAY
        self.fixture.sweep()
        self.assertIsNone(self.site.query(handle))
        self.assertIsNone(self.update(handle, expires=None)["expires"])         # JSON null: never
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.fixture.stop()
        self.assertEqual(self.site.our_lines(), {"%s me@example.org" % handle})

    def test_expired_is_its_own_state_apart_from_the_owners_switch(self):
        handle = self.new_expiring("1h")["address"]
        self.update(handle, enabled=False)
        self.now[0] += 2 * 3600
        self.fixture.sweep()
        self.assertEqual((self.fixture.handle(self.token, handle)["state"],
                          self.fixture.handle(self.token, handle)["enabled"]), ("expired", False))
        self.assertEqual(self.update(handle, enabled=True)["state"], "expired")   # still ended
        self.assertIsNone(self.site.query(handle))
        self.update(handle, enabled=False)
        self.assertEqual(self.update(handle, expires="never")["state"], "disabled")
        self.assertIsNone(self.site.query(handle))
        self.assertEqual(self.update(handle, enabled=True)["state"], "enabled")
        self.assertEqual(self.site.query(handle), "me@example.org")

    def test_a_handle_deleted_after_it_expired_but_before_the_sweep_leaves_the_map(self):
        handle = self.new_expiring("1h")["address"]
        self.now[0] += 3600 + 5                             # expired; the next sweep is still to come
        self.fixture.call("delete_handle", token=self.token, address=handle)
        self.fixture.sweep()
        self.assertIsNone(self.site.query(handle), "a deleted handle is still routable")
        self.fixture.stop()
        self.assertEqual(self.site.our_lines(), set())

    def test_a_handle_disabled_after_it_expired_but_before_the_sweep_leaves_the_map(self):
        handle = self.new_expiring("1h")["address"]
        self.now[0] += 3600 + 5
        self.update(handle, enabled=False)
        self.fixture.sweep()
        self.assertIsNone(self.site.query(handle), "an expired, disabled handle is still routable")

    def test_moving_the_expiry_of_a_handle_not_swept_yet_keeps_one_line_for_it_in_the_map_file(self):
        handle = self.new_expiring("1h")["address"]
        self.now[0] += 3600 + 5
        self.update(handle, expires="never")
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.fixture.stop()
        lines = self.site.map_text().split(im.MAP_MARKER, 1)[1].decode().splitlines()
        self.assertEqual(lines, ["%s me@example.org" % handle])

    def test_what_expired_while_the_server_was_stopped_is_out_of_the_map_when_it_starts_again(self):
        gone = [self.new_expiring("1h")["address"] for _ in range(3)]
        kept = self.new_expiring("30d")["address"]
        self.fixture.stop()                                 # a clean stop: the map is trusted at start
        self.now[0] += 2 * 3600
        ServiceFixture(self, self.site, clock=lambda: self.now[0]).start()
        for handle in gone:
            self.assertIsNone(self.site.query(handle))
        self.assertEqual(self.site.query(kept), "me@example.org")

    def test_the_sweep_takes_a_thousand_handles_expiring_in_the_same_minute_out_with_one_postmap_call(self):
        service, table = self.fixture.service, self.fixture.table
        futures = [self.fixture.submit("new_handle", token=self.token, expires=im.iso_time(T0 + 3600 + n % 60))
                   for n in range(1000)]
        expiring = [f.result(60).address for f in futures]
        forever = [self.fixture.new_handle(self.token, expires="never") for _ in range(3)]
        self.now[0] = T0 + 3600 + 60
        with mock.patch.object(table, "postmap", wraps=table.postmap) as postmap:
            self.assertEqual(self.fixture.sweep(), 1000)
        calls = [c for c in postmap.call_args_list if c.args[0] != "-q"]
        self.assertEqual([c.args[0] for c in calls], ["-d"], calls)
        self.assertEqual(sorted(calls[0].kwargs["stdin"].decode().split()), sorted(expiring))
        for handle in expiring[::97]:
            self.assertIsNone(self.site.query(handle))
        for handle in forever:
            self.assertEqual(self.site.query(handle), "me@example.org")

    def test_the_worker_sweeps_once_a_period_however_many_batches_run(self):
        sweep = im._sweep
        swept = []

        def counted(work, **fields):
            swept.append(time.monotonic())
            return sweep(work, **fields)
        site = self.make_site()
        with mock.patch.object(im, "SWEEP_SECONDS", 0.3), mock.patch.object(im, "_sweep", counted):
            fixture = self.start_service(site, clock=lambda: self.now[0])
            token = fixture.new_account()
            batches = fixture.service.batches
            deadline = time.monotonic() + 10
            while len(swept) < 4 and time.monotonic() < deadline:     # the worker is kept busy
                fixture.call("new_handle", token=token)
            fixture.stop()
        self.assertGreaterEqual(len(swept), 4, "the worker did not sweep every 0.3 s")
        self.assertGreater(fixture.service.batches - batches, 3 * len(swept))
        gaps = [later - earlier for earlier, later in zip(swept, swept[1:])]
        self.assertGreaterEqual(min(gaps), 0.3 * 0.9, gaps)


class HandleLifetimeDefaultTest(PostmapTestCase):
    """[PostfixConfig] HandleLifetime: new handles that say nothing about their end get it."""

    def start(self, lifetime):
        self.now = [T0]
        self.site = self.make_site(sections={"PostfixConfig": {"HandleLifetime": lifetime}})
        self.fixture = self.start_service(self.site, clock=lambda: self.now[0])
        self.token = self.fixture.new_account()

    def json_new_handle(self, **fields):
        """As the daemon does for a JSON request from the add-on or the HTTP API."""
        request = im.parse_json_request(json.dumps(dict(fields, op="new_handle", token=self.token)))
        gate = self.fixture.gate
        result = gate.submit(*gate.check(im.WEBSOCKET, request.op, request.fields)).result(30)
        return im.json_value(result, self.now[0])

    def test_handles_made_with_no_expiry_get_the_configured_lifetime(self):
        self.start("30d")
        legacy = self.fixture.result("new_handle", token=self.token)        # the add-on's "new handle"
        self.assertEqual(legacy.expires, T0 + 30 * DAY)
        self.assertEqual(self.json_new_handle(label="shop")["expires"], im.iso_time(T0 + 30 * DAY))
        self.assertEqual(self.fixture.call("new_handle", token=self.token)["expires"],
                         im.iso_time(T0 + 30 * DAY))

    def test_an_explicit_null_never_or_time_overrides_the_default(self):
        self.start("30d")
        self.assertIsNone(self.json_new_handle(expires=None)["expires"])
        self.assertIsNone(self.json_new_handle(expires="never")["expires"])
        self.assertEqual(self.json_new_handle(expires="2h")["expires"], im.iso_time(T0 + 7200))
        handle = self.json_new_handle()["address"]
        self.assertIsNone(self.fixture.call("update_handle", token=self.token, address=handle, handle_id=None, expires="never")["expires"])

    def test_without_a_lifetime_new_handles_never_expire(self):
        self.start("")
        self.assertIsNone(self.json_new_handle()["expires"])
        self.assertIsNone(self.fixture.result("new_handle", token=self.token).expires)

    def test_a_bad_lifetime_is_a_configuration_error_naming_the_key(self):
        folder = make_folder(self)
        for bad in ("5x", "0d", "-1d", "40000d", "30 days"):
            with self.subTest(lifetime=bad):
                with self.assertRaises(im.ConfigError) as caught:
                    Site(folder, sections={"PostfixConfig": {"HandleLifetime": bad}})
                self.assertIn("[PostfixConfig] HandleLifetime", str(caught.exception))
                self.assertIn(bad, str(caught.exception))


class LifetimeInputTest(PostmapTestCase):
    """WHEN is a duration or an ISO 8601 date or time (UTC unless it says otherwise); anything
    else, a past time, 0 or an absurd duration, a limit of 0 messages, is a clear error."""

    def setUp(self):
        self.now = [T0]
        self.site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % free_port()}})
        self.fixture = self.start_service(self.site, clock=lambda: self.now[0])
        self.token = self.fixture.new_account()

    def new_handle(self, expires=None, max_messages=None):
        """A handle ending at ``expires`` (None: as the configuration says)."""
        fields = {"max_messages": max_messages}
        if expires is not None:
            fields["expires"] = expires
        return self.fixture.call("new_handle", token=self.token, **fields)

    def test_durations_and_iso_8601_times_are_understood_utc_unless_they_say_otherwise(self):
        for when, expected in (("90m", T0 + 5400), ("12h", T0 + 12 * 3600), ("30d", T0 + 30 * DAY),
                               ("2w", T0 + 14 * DAY), ("45s", T0 + 45), ("12H", T0 + 12 * 3600),
                               ("2023-12-01", calendar.timegm((2023, 12, 1, 0, 0, 0))),
                               ("2023-12-01T10:00:00", calendar.timegm((2023, 12, 1, 10, 0, 0))),
                               ("2023-12-01T10:00:00Z", calendar.timegm((2023, 12, 1, 10, 0, 0))),
                               ("2023-12-01 10:00:00", calendar.timegm((2023, 12, 1, 10, 0, 0))),
                               ("2023-12-01T12:00:00+02:00", calendar.timegm((2023, 12, 1, 10, 0, 0)))):
            with self.subTest(when=when):
                self.assertEqual(self.new_handle(when)["expires"], im.iso_time(expected))

    def test_a_bad_expiry_is_refused_with_a_clear_error_and_nothing_is_made(self):
        for when, words in (("2023-11-01", "not in the future"), ("2023-11-14T22:13:20Z", "not in the future"),
                            ("0d", "1 s to 100 years"), ("40000d", "1 s to 100 years"),
                            ("-3d", "duration"), ("5x", "units: s, m, h, d, w"), ("3 days", "duration"),
                            ("2023-13-45", "ISO 8601"), ("next tuesday", "ISO 8601"), ("", "ISO 8601")):
            with self.subTest(when=when):
                with self.assertRaises(im.BadRequest) as caught:
                    self.new_handle(when)
                message = str(caught.exception)
                self.assertIn(words, message)
                if when and "future" not in words:
                    self.assertIn(repr(when), message)                  # it says what it did not understand
        self.assertEqual(self.fixture.call("list_handles", token=self.token), [])

    def test_only_ascii_digits_and_the_documented_forms_are_times_on_every_python(self):
        for when in ("\u0662\u0660\u0662\u0667-01-01", "2027-01-01T10:00:00.5", "20270101",
                     "2027-W01", "2027-001", "2027-01-01T10", "\uff13d", "2027-01-01T10:00+0200"):
            with self.subTest(when=when), self.assertRaises(im.BadRequest):
                self.new_handle(when)
        for when, expected in (("2027-01-01 10:00", calendar.timegm((2027, 1, 1, 10, 0, 0))),
                               ("2027-01-01t10:00:00z", calendar.timegm((2027, 1, 1, 10, 0, 0))),
                               ("2027-01-01T12:00-02:00", calendar.timegm((2027, 1, 1, 14, 0, 0)))):
            self.assertEqual(from_iso(self.new_handle(when)["expires"]), expected)

    def test_a_bad_expiry_in_an_update_changes_nothing(self):
        made = self.new_handle("1h")
        for when in ("2023-11-01", "0d", "5x", "40000d"):
            with self.subTest(when=when):
                with self.assertRaises(im.BadRequest):
                    self.fixture.call("update_handle", token=self.token, address=made["address"], handle_id=None, expires=when)
        [listed] = self.fixture.call("list_handles", token=self.token)
        self.assertEqual(listed["expires"], made["expires"])

    def test_max_messages_must_be_a_whole_number_from_1(self):
        for bad in (0, -1, im.MAX_MESSAGES + 1):
            with self.subTest(max_messages=bad):
                with self.assertRaises(im.BadRequest) as caught:
                    self.new_handle(max_messages=bad)
                self.assertIn("max_messages must be a whole number from 1", str(caught.exception))
        for bad in ("3", True, 2.5):
            with self.subTest(max_messages=bad):
                with self.assertRaises(im.BadRequest) as caught:
                    self.fixture.gate.check(im.WEBSOCKET, "new_handle",
                                            {"token": self.token, "max_messages": bad})
                self.assertIn("max_messages", str(caught.exception))
        self.assertEqual(self.fixture.call("list_handles", token=self.token), [])
        self.assertEqual(self.new_handle(max_messages=1)["max_messages"], 1)

    def test_max_messages_without_the_policy_service_is_refused_naming_PolicyListen(self):
        site = self.make_site()
        fixture = self.start_service(site)
        token = fixture.new_account()
        with self.assertRaises(im.BadRequest) as caught:
            fixture.call("new_handle", token=token, max_messages=2)
        self.assertIn("[General] PolicyListen", str(caught.exception))
        self.assertIn("policy service", str(caught.exception))
        self.assertEqual(fixture.call("list_handles", token=token), [])
        handle = fixture.new_handle(token)
        with self.assertRaises(im.BadRequest) as caught:
            fixture.call("update_handle", token=token, address=handle, handle_id=None, max_messages=2)
        self.assertIn("PolicyListen", str(caught.exception))
        self.assertIsNone(fixture.call("list_handles", token=token)[0]["max_messages"])

    def test_the_command_line_refuses_max_messages_0_and_names_the_range(self):
        for bad in ("0", "-2"):
            with self.subTest(max_messages=bad):
                done = cli(self.site, "new", "handle", self.token, "--max-messages", bad)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn("not a number of messages from 1 to %d" % im.MAX_MESSAGES, done.stderr)
                self.assertEqual(done.stdout, "")


class PruneExpiredHandlesTest(PostmapTestCase):
    """prune --handles-expired-days N: exactly the handles that expired more than N days ago."""

    def setUp(self):
        self.now = [T0]
        self.site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % free_port()}})
        self.fixture = self.start_service(self.site, clock=lambda: self.now[0])
        fixture = self.fixture
        token = self.token = fixture.new_account()
        self.long_expired = fixture.new_handle(token, expires="1d")
        self.long_expired_disabled = fixture.new_handle(token, expires="2d")
        fixture.call("update_handle", token=token, address=self.long_expired_disabled, enabled=False)
        self.recently_expired = fixture.new_handle(token, expires="20d")
        self.not_yet = fixture.new_handle(token, expires="60d")
        self.never = fixture.new_handle(token, expires="never")
        self.used_up = fixture.new_handle(token, expires="never", max_messages=1)
        self.fixture.service.record_mail([(self.used_up, T0, im.RECEIVED)]).result(30)
        self.now[0] = T0 + 30 * DAY              # expired 29, 28 and 10 days ago; one in 30 days
        self.fixture.sweep()

    def addresses(self):
        return set("%s@%s" % row for row in self.fixture.store.db.execute("SELECT local, domain FROM handles"))

    def test_dry_run_lists_the_long_expired_handles_and_removes_nothing(self):
        before = self.addresses()
        removed = self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=True, handles_expired_days=14)
        self.assertEqual(sorted(removed), sorted([self.long_expired, self.long_expired_disabled]))
        self.assertEqual(self.addresses(), before)

    def test_prune_removes_exactly_the_handles_that_expired_more_than_n_days_ago(self):
        removed = self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=14)
        self.assertEqual(sorted(removed), sorted([self.long_expired, self.long_expired_disabled]))
        self.assertEqual(self.addresses(), {self.recently_expired, self.not_yet, self.never, self.used_up})
        for handle in (self.not_yet, self.never):
            self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertEqual(self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=14), [])
        self.assertEqual(sorted(self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=9)), [self.recently_expired])

    def test_zero_days_removes_every_expired_handle_and_nothing_else(self):
        removed = self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=0)
        self.assertEqual(sorted(removed), sorted([self.long_expired, self.long_expired_disabled,
                                                  self.recently_expired]))
        self.assertEqual(self.addresses(), {self.not_yet, self.never, self.used_up})

    def test_zero_days_right_after_an_expiry_takes_the_handle_out_of_the_map_too(self):
        handle = self.fixture.new_handle(self.token, expires="1h")
        self.now[0] += 3600 + 1                                     # expired; not swept yet
        self.assertIn(handle, self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=0))
        self.assertIsNone(self.site.query(handle), "a pruned handle is still routable")

    def test_negative_days_are_refused(self):
        with self.assertRaises(im.BadRequest):
            self.fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=-1)

    def test_pruning_expired_handles_needs_no_policy_service(self):
        site = self.make_site()
        fixture = self.start_service(site, clock=lambda: self.now[0])
        token = fixture.new_account()
        handle = fixture.new_handle(token, expires="1d")
        self.now[0] += 10 * DAY
        self.assertEqual(fixture.call("prune", handles_unused_days=None, accounts_unused_days=None, dry_run=False, handles_expired_days=7), [handle])

    def test_the_automatic_daily_prune_removes_long_expired_handles_too(self):
        site = self.make_site(sections={"Prune": {"Automatic": "yes", "HandlesExpiredDays": "14"}})
        fixture = self.start_service(site, clock=lambda: self.now[0])
        token = fixture.new_account()
        old = fixture.new_handle(token, expires="1d")
        young = fixture.new_handle(token, expires="20d")
        self.now[0] += 30 * DAY
        daemon = im.Daemon(site.config, clock=lambda: self.now[0])
        slept = []

        class OneDayIsEnough(Exception):
            pass

        async def sleep(seconds):
            slept.append(seconds)
            if len(slept) > 1:
                raise OneDayIsEnough()
        with mock.patch.object(asyncio, "sleep", sleep), self.assertRaises(OneDayIsEnough):
            asyncio.run(daemon._prune_daily(fixture.gate))
        self.assertEqual(slept, [60, 86400])
        self.assertEqual([h["address"] for h in fixture.call("list_handles", token=token)], [young])
        self.assertNotIn(old, str(fixture.call("list_handles", token=token)))


###############################################################################
# Operations: what each front end may ask for, described once, and the gate to them
###############################################################################

class TokenBucketTest(unittest.TestCase):

    def test_bucket_refills_with_time(self):
        now = [0.0]
        bucket = im.TokenBucket(6, clock=lambda: now[0])
        self.assertEqual([bucket.take("a") for _ in range(6)], [0] * 6)
        self.assertEqual(bucket.take("a"), 10)
        now[0] += 10
        self.assertEqual(bucket.take("a"), 0)

    def test_zero_per_minute_never_limits(self):
        bucket = im.TokenBucket(0)
        self.assertEqual({bucket.take("a") for _ in range(1000)}, {0})


class WrongTokenLimitTest(HoldingTestCase):
    """A token not seen right lately is counted as wrong before it is checked (and given back
    when right); the per-account handle limit belongs to the account, not to its token."""

    limits = {"FailedTokensPerMinutePerClient": "5", "HandlesPerMinutePerAccount": "3",
              "HandlesPerMinutePerClient": "0"}

    def test_500_pipelined_wrong_tokens_get_at_most_the_limit_of_unauthorized_answers(self):
        client = self.client(source="127.0.0.2")
        client.send_raw(b"".join(json_frame(id=number, op="account", token="%s%05d" % ("W" * 38, number))
                                 for number in range(500)))
        errors = collections.Counter(client.recv_json()["error"] for _ in range(500))
        self.assertLessEqual(errors["unauthorized"], 5, errors)
        self.assertEqual(errors["unauthorized"] + errors["rate_limited"], 500, errors)
        self.assertEqual(client.request(id=501, op="account", token=self.token)["error"],
                         "rate_limited")
        other = self.client(source="127.0.0.3")
        self.assertTrue(other.request(id=502, op="account", token=self.token)["ok"])

    def test_pipelined_requests_with_a_right_token_from_a_fresh_client_all_succeed(self):
        client = self.client(source="127.0.0.4")
        client.send_raw(b"".join(json_frame(id=number, op="account", token=self.token) for number in range(16)))
        replies = [client.recv_json() for _ in range(16)]
        self.assertTrue(all(r["ok"] for r in replies), replies)
        for number in range(5):         # none of the 16 was left charged as wrong
            self.assertEqual(client.request(id=number, op="account", token=WRONG)["error"],
                             "unauthorized")
        self.assertEqual(client.request(id=6, op="account", token=WRONG)["error"],
                         "rate_limited")

    def test_the_per_account_handle_limit_survives_rotate_token(self):
        client = self.client(source="127.0.0.5")
        for number in range(3):
            self.assertTrue(client.request(id=number, op="new_handle", token=self.token)["ok"])
        new = client.request(id=3, op="rotate_token", token=self.token)["token"]
        reply = self.client(source="127.0.0.6").request(id=4, op="new_handle", token=new)
        self.assertEqual(reply.get("error"), "rate_limited", reply)


class WorkBudgetTest(HoldingTestCase):
    """One account may have OPERATIONS_PER_SECOND operations a second carried out over the
    network (shortened here to 5, bursts of 10): past that its requests wait; none fails."""

    constants = {"OPERATIONS_PER_SECOND": 5}

    def test_requests_past_the_budget_wait_their_turn_and_all_are_answered(self):
        client = self.client()
        started = time.monotonic()
        client.sock.sendall(b"".join(json_frame(id=n, op="account", token=self.token)
                                     for n in range(16)))
        replies = [client.recv_json() for _ in range(16)]
        elapsed = time.monotonic() - started
        self.assertEqual(sorted(r["id"] for r in replies if r["ok"]), list(range(16)))
        self.assertGreater(elapsed, (16 - 10) / 5 * 0.8)     # the six past the burst waited
        self.assert_quick("the command line's status", lambda: control(self.site, "status"))


class HandleLifetimeFrontEndsTest(PostmapTestCase):
    """list and --json, expire handle, the JSON protocol, the HTTP API and the owner page, on one
    server with HandleLifetime = 30d. The list line's words are computed with the real clock:
    the daemon's clock is moved only where a test says so, and put back after."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        folder = make_folder()
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.port, cls.policy_port = free_port(), free_port()
        cls.site = Site(folder, sections={
            "General": {"ListenAddress": "127.0.0.1:%d" % cls.port,
                        "PolicyListen": "inet:127.0.0.1:%d" % cls.policy_port},
            "PostfixConfig": {"HandleLifetime": "30d"},
            "Limits": {"HandlesPerMinutePerClient": "0", "HandlesPerMinutePerAccount": "0"}})
        cls.daemon = MovedClockDaemon(cls.site).start()
        cls.addClassCleanup(cls.daemon.stop)

    def setUp(self):
        self.token = new_account(self.site, "me@example.org")
        self.addCleanup(self.daemon.set_offset, 0)

    def run_cli(self, *args, rc=0):
        return run_cli(self, self.site, *args, rc=rc)

    def lines(self):
        return {line.split("\t")[0]: line.split("\t") for line in self.run_cli("list", self.token).stdout.splitlines()}

    def api(self, method, path, body=None):
        """(status, JSON body or None) of one request to the HTTP API, as Bitwarden makes it."""
        client = HttpClient(self.port)
        try:
            reply = client.request(method, path, bitwarden_headers(addy_auth(self.token)), body)
        finally:
            client.close()
        return reply.status, reply.json() if reply.body else None

    def assert_about(self, iso, when, slack=120):
        self.assertIsNotNone(iso)
        self.assertLessEqual(abs(from_iso(iso) - when), slack, iso)

    def test_list_line_says_the_state_and_how_the_handle_ends_in_words(self):
        in_3_days = im.iso_time(time.time() + 3 * DAY + 3600)
        soon = self.run_cli("new", "handle", self.token, "--expires", in_3_days, "--label", "shop").stdout.strip()
        burner = self.run_cli("new", "handle", self.token, "--max-messages", "5", "--expires", "never").stdout.strip()
        disabled = self.run_cli("new", "handle", self.token, "--expires", "never").stdout.strip()
        self.run_cli("disable", "handle", disabled, self.token)
        self.daemon.set_offset(-10 * DAY)                   # made 10 days ago, to end 5 days ago
        ended_at = time.time() - 5 * DAY
        ended = self.run_cli("new", "handle", self.token, "--expires", im.iso_time(ended_at)).stdout.strip()
        self.daemon.set_offset(0)
        for instance in ("m1", "m2"):
            self.assertEqual(ask_policy(self.policy_port, burner, instance), "action=DUNNO\n\n")
        self.assertIn("disabled", ask_policy(self.policy_port, disabled))
        wait_counted(self, self.site, self.token, burner, received=2)
        wait_counted(self, self.site, self.token, disabled, blocked=1)
        lines = self.lines()
        self.assertEqual(lines[soon][1], "enabled")
        self.assertIn("expires in 3 days", lines[soon])
        self.assertEqual(lines[soon][-1], "shop")
        self.assertEqual(lines[burner][1], "enabled")
        self.assertIn("received 2", lines[burner])
        self.assertIn("2 of 5 messages", lines[burner])
        self.assertFalse([f for f in lines[burner] if f.startswith(("expire", "blocked"))], lines[burner])
        self.assertEqual(lines[disabled][1], "disabled")
        self.assertIn("blocked 1", lines[disabled])
        self.assertEqual(lines[ended][1], "expired")
        self.assertIn("expired %s" % im.iso_time(ended_at)[:10], lines[ended])
        listed_json = listed(self, self.site, self.token)
        self.assertEqual((listed_json[soon]["state"], listed_json[soon]["expires"], listed_json[soon]["max_messages"]),
                         ("enabled", in_3_days, None))
        self.assertEqual((listed_json[burner]["max_messages"], listed_json[burner]["received"],
                          listed_json[burner]["expires"]),
                         (5, 2, None))
        self.assertEqual((listed_json[disabled]["state"], listed_json[disabled]["blocked"]), ("disabled", 1))
        self.assert_about(listed_json[disabled]["last_blocked"], time.time())
        self.assertEqual((listed_json[ended]["state"], listed_json[ended]["expires"]),
                         ("expired", im.iso_time(ended_at)))

    def test_expire_handle_sets_moves_and_clears_the_expiry(self):
        handle = self.run_cli("new", "handle", self.token).stdout.strip()
        line = self.run_cli("expire", "handle", handle, self.token, "12h").stdout.strip().split("\t")
        self.assertEqual(line[:2], [handle, "enabled"])
        self.assertIn("expires in 12 hours", line)
        reply = json.loads(self.run_cli("expire", "handle", handle, self.token, "2099-06-01T12:00:00+02:00",
                                        "--json").stdout)
        self.assertEqual(reply["expires"], "2099-06-01T10:00:00Z")
        self.assertIsNone(json.loads(self.run_cli("expire", "handle", handle, self.token, "never", "--json")
                                     .stdout)["expires"])
        self.assertFalse([f for f in self.lines()[handle] if f.startswith("expire")])
        for bad, words in (("2001-01-01", "not in the future"), ("5x", "not a duration"), ("0d", "100 years")):
            with self.subTest(when=bad):
                done = self.run_cli("expire", "handle", handle, self.token, bad, rc=1)
                self.assertIn(words, done.stderr)
                self.assertEqual(done.stdout, "")
        self.assertIsNone(listed(self, self.site, self.token)[handle]["expires"])

    def test_new_handle_with_bad_lifetime_options_is_refused_and_makes_nothing(self):
        for args, rc, words in ((("--expires", "5x"), 1, "not a duration"),
                                (("--expires", "2001-01-01"), 1, "not in the future"),
                                (("--expires", "-3d"), 1, "duration"),
                                (("--max-messages", "0"), 2, "not a number of messages")):
            with self.subTest(args=args):
                done = self.run_cli("new", "handle", self.token, *args, rc=rc)
                self.assertIn(words, done.stderr)
        self.assertEqual(self.run_cli("list", self.token).stdout, "")

    def test_handles_made_with_no_expiry_get_the_configured_lifetime_from_every_front_end(self):
        now = time.time()
        client = WsClient(self.port)
        self.addCleanup(client.close)
        client.send("new handle " + self.token)
        made = {"legacy add-on": client.recv()}
        made["JSON"] = client.request(id=1, op="new_handle", token=self.token)["handle"]["address"]
        made["command line"] = self.run_cli("new", "handle", self.token).stdout.strip()
        made["addy.io"] = self.api("POST", "/api/v1/aliases", {"domain": "incognito.test"})[1]["data"]["email"]
        made["SimpleLogin"] = self.api("POST", "/api/alias/random/new?hostname=shop.example", {})[1]["alias"]
        never = {"JSON null": client.request(id=2, op="new_handle", token=self.token, expires=None)["handle"]["address"],
                 "command line never": self.run_cli("new", "handle", self.token, "--expires", "never").stdout.strip(),
                 "addy.io null": self.api("POST", "/api/v1/aliases", {"domain": "incognito.test",
                                                                    "expires_at": None})[1]["data"]["email"]}
        listed_json = listed(self, self.site, self.token)
        for front_end, handle in made.items():
            with self.subTest(front_end=front_end):
                self.assert_about(listed_json[handle]["expires"], now + 30 * DAY)
        for front_end, handle in never.items():
            with self.subTest(front_end=front_end):
                self.assertIsNone(listed_json[handle]["expires"])

    def test_the_json_protocol_takes_and_shows_expires_and_max_messages(self):
        client = WsClient(self.port)
        self.addCleanup(client.close)
        when = im.iso_time(time.time() + 7 * DAY)
        handle = client.request(id=1, op="new_handle", token=self.token, expires=when, max_messages=3)["handle"]
        self.assertEqual({k: handle[k] for k in ("state", "expires", "max_messages", "blocked", "last_blocked")},
                         {"state": "enabled", "expires": when, "max_messages": 3, "blocked": 0, "last_blocked": None})
        address = handle["address"]
        reply = client.request(id=2, op="update_handle", token=self.token, address=address, expires="12h")
        self.assert_about(reply["handle"]["expires"], time.time() + 12 * 3600)
        reply = client.request(id=3, op="update_handle", token=self.token, address=address, expires=None,
                               max_messages=None)
        self.assertEqual((reply["handle"]["expires"], reply["handle"]["max_messages"]), (None, None))
        reply = client.request(id=4, op="update_handle", token=self.token, address=address, expires="2001-01-01")
        self.assertEqual((reply["ok"], reply["error"]), (False, "bad_request"))
        self.assertIn("not in the future", reply["message"])
        reply = client.request(id=5, op="new_handle", token=self.token, max_messages=0)
        self.assertEqual((reply["ok"], reply["error"]), (False, "bad_request"))
        self.daemon.move_clock_to(time.time() + 8 * DAY)
        reply = client.request(id=6, op="new_handle", token=self.token, expires=when)
        self.assertIn("not in the future", reply["message"])
        client.request(id=7, op="update_handle", token=self.token, address=address, expires=im.iso_time(
            self.daemon.now() + 60))
        self.daemon.move_clock_to(self.daemon.now() + 120)
        listed = client.request(id=8, op="get_handle", token=self.token, address=address)["handle"]
        self.assertEqual((listed["state"], listed["enabled"]), ("expired", True))

    def test_the_http_api_shows_and_sets_how_an_alias_ends(self):
        status, body = self.api("POST", "/api/v1/aliases", {"domain": "incognito.test", "max_messages": 4,
                                                          "expires_at": "2099-01-02 03:04:05"})
        self.assertEqual(status, 201, body)
        alias = body["data"]
        self.assertEqual({k: alias[k] for k in ("expires_at", "max_messages", "state", "emails_blocked",
                                                "last_blocked", "active")},
                         {"expires_at": "2099-01-02 03:04:05", "max_messages": 4, "state": "enabled",
                          "emails_blocked": 0, "last_blocked": None, "active": True})
        self.api("DELETE", "/api/v1/active-aliases/%d" % alias["id"])
        self.assertIn("disabled", ask_policy(self.policy_port, alias["email"]))
        wait_counted(self, self.site, self.token, alias["email"], blocked=1)
        status, body = self.api("GET", "/api/v1/aliases/%d" % alias["id"])
        self.assertEqual((body["data"]["emails_blocked"], body["data"]["state"], body["data"]["active"]),
                         (1, "disabled", False))
        self.assertRegex(body["data"]["last_blocked"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
        status, body = self.api("GET", "/api/aliases/%d" % alias["id"])
        self.assertEqual((body["nb_block"], body["nb_forward"]), (1, 0))
        status, body = self.api("PATCH", "/api/v1/aliases/%d" % alias["id"], {"expires_at": None,
                                                                            "max_messages": None})
        self.assertEqual((status, body["data"]["expires_at"], body["data"]["max_messages"]), (200, None, None))
        status, body = self.api("PATCH", "/api/v1/aliases/%d" % alias["id"], {"expires_at": "2001-01-01 00:00:00"})
        self.assertEqual(status, 422)
        self.assertIn("not in the future", body["message"])
        self.assertIsNone(self.api("GET", "/api/v1/aliases/%d" % alias["id"])[1]["data"]["expires_at"])
        ending = self.api("POST", "/api/v1/aliases", {"domain": "incognito.test", "expires_at": "1h"})[1]["data"]
        self.daemon.move_clock_to(self.daemon.now() + 2 * 3600)
        status, body = self.api("GET", "/api/v1/aliases/%d" % ending["id"])
        self.assertEqual((body["data"]["state"], body["data"]["active"]), ("expired", True))

    def test_the_owner_page_knows_each_state_the_http_api_sends(self):
        client = HttpClient(self.port)
        self.addCleanup(client.close)
        page = client.request("GET", "/").body.decode()
        compared = set(re.findall(r"\bst === \"([^\"]+)\"", page))
        self.assertTrue(compared, "the page no longer compares states this way: update this test")
        self.assertLessEqual(compared, {im.ENABLED, im.DISABLED, im.EXPIRED, im.USED_UP})
        self.assertIn(im.USED_UP, compared)
        self.assertIn(im.EXPIRED, compared)

    def test_prune_with_no_options_uses_HandlesExpiredDays(self):
        site = make_site(self, sections={"Prune": {"HandlesExpiredDays": "3"}})
        daemon = start_daemon(self, site, MovedClockDaemon)
        token = new_account(site, "me@example.org")
        old = new_handle(site, token, expires="1h")
        young = new_handle(site, token, expires="4d")
        daemon.move_clock_to(daemon.now() + 5 * DAY)        # expired 5 days and 1 day ago
        done = cli(site, "prune")
        self.assertEqual((done.returncode, done.stdout.strip()), (0, old), done.stderr)
        self.assertEqual(list(handles_of(site, token)), [young])


###############################################################################
# Wire formats: JSON requests (control socket and WebSocket)
###############################################################################

class JsonRequestFormatTest(unittest.TestCase):
    """The JSON request format shared by the WebSocket and the control socket, and the gate's
    check of a request's operation and fields."""

    @classmethod
    def setUpClass(cls):
        folder = make_folder()
        cls.addClassCleanup(shutil.rmtree, folder, True)
        cls.gate = im.Gate(im.load_config(minimal_config_file(folder)), service=None)

    def check(self, text, caller=im.WEBSOCKET):
        """(operation name, checked fields) of a JSON request text."""
        request = im.parse_json_request(text)
        operation, fields = self.gate.check(caller, request.op, request.fields)
        return operation.name, fields

    def test_a_request_is_an_object_with_an_id_and_an_op(self):
        request = im.parse_json_request('{"id": [1, "x"], "op": "new_handle", "token": "t", "label": "shop"}')
        self.assertEqual((request.id, request.op), ([1, "x"], "new_handle"))
        for text in ('[1, 2]', '"op"', '{"op": ', '{"n": NaN}'):
            with self.assertRaises(im.BadRequest, msg=text):
                im.parse_json_request(text)

    def test_fields_become_the_operations_arguments(self):
        self.assertEqual(self.check('{"id": 3, "op": "new_handle", "token": "t", "label": " shop "}'),
                         ("new_handle", {"token": "t", "label": "shop"}))

    def test_update_handle_leaves_absent_fields_unchanged(self):
        name, fields = self.check('{"id": 1, "op": "update_handle", "token": "t", "address": "a", '
                                  '"enabled": false}')
        self.assertEqual(fields, {"token": "t", "address": ("a", "incognito.test"), "enabled": False})

    def test_control_only_operations_are_unknown_over_the_websocket(self):
        with self.assertRaises(im.BadRequest) as caught:
            self.check('{"id": 5, "op": "new_account", "address": "a@b.c"}')
        self.assertIn("unknown op 'new_account'", str(caught.exception))
        self.assertEqual(self.check('{"op": "new_account", "address": "a@b.c"}', im.COMMAND_LINE),
                         ("new_account", {"address": "a@b.c"}))

    def test_each_front_end_may_call_only_its_operations(self):
        fields = {"token": "t", "address": "a@incognito.test", "handle_ids": [1], "enabled": True,
                  "count": 1, "handles": [{"address": "k3v9q0x2m7ab5ts1@incognito.test"}], "path": "/tmp/backup"}
        for name, operation in im.OPERATIONS.items():
            for caller in im.EVERYONE:
                with self.subTest(operation=name, caller=caller):
                    if caller in operation.callers:
                        self.gate.check(caller, name, fields)
                    else:
                        with self.assertRaises(im.BadRequest) as caught:
                            self.gate.check(caller, name, fields)
                        self.assertIn("unknown op", str(caught.exception))

    def test_wrong_types_are_bad_requests_naming_the_field(self):
        for text, field in (('{"op": "new_handle", "token": 7}', "token"),
                            ('{"op": "update_handle", "token": "t", "address": "a", "enabled": 1}', "enabled"),
                            ('{"op": "update_handle", "token": "t", "address": "a", "enabled": null}', "enabled"),
                            ('{"op": "prune", "handles_unused_days": true}', "handles_unused_days"),
                            ('{"op": "new_handle", "token": "t", "label": "\\ud800"}', "label")):
            with self.assertRaises(im.BadRequest, msg=text) as caught:
                self.check(text, im.COMMAND_LINE)
            self.assertEqual(caught.exception.field, field, text)

    def test_a_number_beyond_sqlite_is_a_bad_request_not_an_internal_error(self):
        with self.assertRaises(im.BadRequest):
            self.check('{"op": "get_handle", "token": "t", "handle_id": %d}' % 10 ** 30)

    def test_replies_carry_the_id_and_the_result_under_its_name(self):
        reply = im.json_reply("x", im.OPERATIONS["rotate_token"], "new")
        self.assertEqual(json.loads(reply), {"id": "x", "ok": True, "token": "new"})
        self.assertEqual(json.loads(im.json_reply(2, im.OPERATIONS["delete_handle"], None)), {"id": 2, "ok": True})
        error = json.loads(im.json_error(3, im.RateLimited("slow down", 12)))
        self.assertEqual(error, {"id": 3, "ok": False, "error": "rate_limited", "message": "slow down",
                                 "retry_after": 12})


class JsonNonNumbersTest(HoldingTestCase):
    """NaN and Infinity are not JSON: a request using them is a bad request, answered in
    valid JSON."""

    def test_nan_or_infinity_in_a_request_gets_a_valid_json_bad_request(self):
        client = self.client()
        for text in ('{"id": NaN, "op": "account", "token": "%s"}' % self.token,
                     '{"id": Infinity, "op": "account", "token": "%s"}' % self.token,
                     '{"id": 1, "op": "new_handle", "token": "%s", "label": -Infinity}'
                     % self.token):
            with self.subTest(text=text):
                client.send(text)
                reply = json.loads(client.recv(), parse_constant=refuse_constant)
                self.assertEqual(reply["error"], "bad_request", reply)
        self.assertTrue(client.request(id=2, op="account", token=self.token)["ok"])


###############################################################################
# Wire formats: Postfix policy delegation and socketmap
###############################################################################

class PolicyProtocolTest(unittest.TestCase):
    """SMTPD_POLICY_README's format, with byte strings."""

    REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\ninstance=12.ab.1\n"
               b"recipient=k3v9@incognito.test\nsender=s@example.org\n\n")

    def test_a_request_ends_with_an_empty_line(self):
        parser = im.PolicyParser()
        self.assertEqual(events(parser, self.REQUEST[:-1]), [])
        self.assertTrue(parser.incomplete)
        [request] = events(parser, b"\n")
        self.assertEqual(request["recipient"], "k3v9@incognito.test")
        self.assertEqual(request["protocol_state"], "RCPT")
        self.assertFalse(parser.incomplete)

    def test_requests_split_anywhere_and_several_per_feed(self):
        data = self.REQUEST * 3
        self.assertEqual(len(events(im.PolicyParser(), *(data[i:i + 7] for i in range(0, len(data), 7)))), 3)
        self.assertEqual(len(events(im.PolicyParser(), data)), 3)

    def test_empty_values_are_kept(self):
        [request] = events(im.PolicyParser(), b"sender=\nrecipient=a@b.c\n\n")
        self.assertEqual(request["sender"], "")

    def test_oversized_request_is_refused_before_its_end(self):
        with self.assertRaises(im.PostfixProtocolError):
            events(im.PolicyParser(), b"name=" + b"x" * (im.PolicyParser.MAX_REQUEST + 1))

    def test_line_without_equals_sign_is_refused(self):
        with self.assertRaises(im.PostfixProtocolError):
            events(im.PolicyParser(), b"garbage\n\n")

    def test_binary_garbage_is_refused(self):
        with self.assertRaises(im.PostfixProtocolError):
            events(im.PolicyParser(), b"recipient=\xff\xfe\n\n")

    def test_response_is_an_action_line_and_an_empty_line(self):
        self.assertEqual(im.policy_response("DUNNO"), b"action=DUNNO\n\n")


class SocketmapProtocolTest(unittest.TestCase):
    """socketmap_table(5)'s netstrings, with byte strings."""

    def test_netstrings_split_anywhere(self):
        parser = im.NetstringParser()
        data = b"27:virtual k3v9@incognito.test,3:x y,"
        strings = events(parser, *(data[byte:byte + 1] for byte in range(len(data))))
        self.assertEqual(strings, [b"virtual k3v9@incognito.test", b"x y"])
        self.assertFalse(parser.incomplete)

    def test_missing_comma_is_refused(self):
        with self.assertRaises(im.PostfixProtocolError):
            events(im.NetstringParser(), b"3:abc;")

    def test_bad_or_huge_length_is_refused_before_the_payload(self):
        for data in (b"x:abc,", b"-1:a,", b"9999999:", b"12345678901"):
            with self.assertRaises(im.PostfixProtocolError, msg=data):
                events(im.NetstringParser(), data)

    def test_reply_is_a_netstring(self):
        self.assertEqual(im.netstring(b"OK alice@example.org"), b"20:OK alice@example.org,")
        self.assertEqual(im.netstring(b"NOTFOUND "), b"9:NOTFOUND ,")


###############################################################################
# Wire formats: the milter protocol (version 6, as Postfix speaks it)
###############################################################################


class MilterParserTest(unittest.TestCase):
    """Postfix's milter commands from its bytes (MILTER_README, libmilter's mfdef.h), with byte
    strings: a packet is a 4-byte big-endian length, a command byte and its payload."""

    SESSION = (mta_packet(b"O", struct.pack("!III", 6, 0x1FF, 0x1FFFFF))
               + mta_macros(b"C", _j="mail.incognito.test", **{"{daemon_name}": "mx"})
               + mta_packet(b"C", b"mail.shop.example\x004\xa6\xe8192.0.2.10\x00")
               + mta_macros(b"M", **{"{mail_addr}": "news@shop.example"})
               + mta_strings(b"M", "<news@shop.example>", "SIZE=230", "BODY=8BITMIME")
               + mta_strings(b"R", "<k3v9q0x2m7ab5ts1@incognito.test>", "NOTIFY=NEVER")
               + mta_strings(b"L", "X-Folded", "first line\n\tsecond line")
               + mta_packet(b"E") + mta_packet(b"A") + mta_packet(b"Q"))
    COMMANDS = [
        (b"O", (6, 0x1FF, 0x1FFFFF)),
        (b"D", ("C", {"j": "mail.incognito.test", "{daemon_name}": "mx"})),
        (b"C", ("mail.shop.example", "4", 0xA6E8, "192.0.2.10")),
        (b"D", ("M", {"{mail_addr}": "news@shop.example"})),
        (b"M", ("<news@shop.example>", "SIZE=230", "BODY=8BITMIME")),
        (b"R", ("<k3v9q0x2m7ab5ts1@incognito.test>", "NOTIFY=NEVER")),
        (b"L", ("X-Folded", "first line\n\tsecond line")),
        (b"E", ()), (b"A", ()), (b"Q", ())]

    def test_a_session_split_anywhere_or_whole_parses_the_same(self):
        data = self.SESSION
        self.assertEqual(events(im.MilterParser(), data), self.COMMANDS)
        for split in range(1, len(data)):
            parser = im.MilterParser()
            self.assertEqual(events(parser, data[:split], data[split:]), self.COMMANDS, split)
            self.assertFalse(parser.incomplete)
        parser = im.MilterParser()
        self.assertEqual(events(parser, *(data[i:i + 1] for i in range(len(data)))), self.COMMANDS)

    def test_an_incomplete_packet_waits_for_the_rest(self):
        parser = im.MilterParser()
        self.assertEqual(events(parser, mta_strings(b"R", "<a@b.example>")[:-1]), [])
        self.assertTrue(parser.incomplete)
        self.assertEqual(events(parser, b"\0"), [(b"R", ("<a@b.example>",))])
        self.assertFalse(parser.incomplete)

    def test_an_empty_macro_packet_gives_its_stage_and_no_macros(self):
        # Postfix sends the stage even when it has no macro for it (len=2: "D" and "H")
        self.assertEqual(events(im.MilterParser(), b"\0\0\0\x02DH"), [(b"D", ("H", {}))])
        self.assertEqual(events(im.MilterParser(), mta_macros(b"E", i="5CF4720C0CD")),
                         [(b"D", ("E", {"i": "5CF4720C0CD"}))])

    def test_connect_gives_host_family_port_and_address(self):
        for payload, expected in (
                (b"localhost\x004\xa6\xe8127.0.0.1\x00", ("localhost", "4", 42728, "127.0.0.1")),
                (b"[2001:db8::1]\x006\x00\x192001:db8::1\x00", ("[2001:db8::1]", "6", 25, "2001:db8::1")),
                # a local submission (non_smtpd_milters): port 0
                (b"localhost\x004\x00\x00127.0.0.1\x00", ("localhost", "4", 0, "127.0.0.1")),
                (b"client\x00L\x00\x00/run/smtp.sock\x00", ("client", "L", 0, "/run/smtp.sock"))):
            with self.subTest(payload=payload):
                self.assertEqual(events(im.MilterParser(), mta_packet(b"C", payload)),
                                 [(b"C", expected)])

    def test_connect_from_a_client_of_unknown_family(self):
        # milter8.c: "hostname\0" then SMFIA_UNKNOWN ('U') alone, e.g. for an SMTP session on
        # standard input (sendmail -bs); miltertest sends it for mt.conninfo(conn, host, "unspec")
        self.assertEqual(events(im.MilterParser(), mta_packet(b"C", b"localhost\x00U")),
                         [(b"C", ("localhost", "U", 0, ""))])

    def test_a_header_keeps_its_folding_and_its_name_as_written(self):
        [(code, (name, value))] = events(im.MilterParser(), mta_strings(
            b"L", "dkim-Signature", "v=1; a=rsa-sha256;\n\tb=abc\n def"))
        self.assertEqual((code, name, value), (b"L", "dkim-Signature", "v=1; a=rsa-sha256;\n\tb=abc\n def"))
        self.assertEqual(events(im.MilterParser(), mta_strings(b"L", "X-Empty", "")),
                         [(b"L", ("X-Empty", ""))])

    def test_text_that_is_not_utf8_survives_as_surrogates(self):
        [(_, (name, value))] = events(im.MilterParser(), mta_packet(b"L", b"Subject\0caf\xe9\0"))
        self.assertEqual(value.encode("utf-8", "surrogateescape"), b"caf\xe9")

    def test_commands_without_arguments(self):
        for code in (b"T", b"N", b"E", b"A", b"Q"):
            self.assertEqual(events(im.MilterParser(), mta_packet(code)), [(code, ())])

    def test_an_oversize_length_is_refused_before_its_payload(self):
        for length in (im.MAX_MILTER_PACKET + 1, 0xFFFFFFFF):
            with self.subTest(length=length), self.assertRaises(im.PostfixProtocolError):
                events(im.MilterParser(), struct.pack("!I", length) + b"B")
        parser = im.MilterParser()      # the largest packet is taken
        body = b"x" * (im.MAX_MILTER_PACKET - 1)
        self.assertEqual(events(parser, struct.pack("!I", im.MAX_MILTER_PACKET) + b"B" + body),
                         [(b"B", ())])

    def test_a_zero_length_is_refused(self):
        with self.assertRaises(im.PostfixProtocolError):
            events(im.MilterParser(), b"\0\0\0\0C")

    def test_strings_without_their_final_nul_are_refused(self):
        for packet in (mta_packet(b"M", b"<a@b.example>"), mta_packet(b"R", b"<a@b.example>"),
                       mta_packet(b"L", b"Subject\0hello"), mta_packet(b"C", b"host\x004\x00\x19x"),
                       mta_packet(b"M"), mta_packet(b"D", b"\xff")):
            with self.subTest(packet=packet), self.assertRaises(im.PostfixProtocolError):
                events(im.MilterParser(), packet)

    def test_a_short_negotiation_is_refused_as_a_protocol_error(self):
        with self.assertRaises(im.PostfixProtocolError):
            events(im.MilterParser(), mta_packet(b"O", struct.pack("!I", 6)))


class MilterEncodersTest(unittest.TestCase):
    """What the milter sends Postfix, as bytes."""

    def test_a_packet_is_its_length_its_code_and_its_payload(self):
        self.assertEqual(im.milter_packet(im.SMFIR_CONTINUE), b"\0\0\0\x01c")
        self.assertEqual(im.milter_packet(b"y", b"abc\0"), b"\0\0\0\x05yabc\0")

    def test_the_negotiation_asks_only_for_what_the_milter_changes_and_needs(self):
        [(code, payload)] = milter_replies(im.milter_negotiation())
        self.assertEqual(code, b"O")
        version, actions, steps = struct.unpack("!III", payload)
        self.assertEqual(version, 6)
        # header additions and changes, recipients added and removed, the envelope sender
        self.assertEqual(actions, 0x01 | 0x04 | 0x08 | 0x10 | 0x40)
        # not told of HELO, the end of the headers, the body or unknown commands
        self.assertEqual(steps & (0x02 | 0x40 | 0x10 | 0x100), 0x02 | 0x40 | 0x10 | 0x100, hex(steps))
        # no answer to CONNECT, MAIL, DATA and each header, which it always lets continue; RCPT
        # answered (a handle, or 452 for the others)
        answered = [code for code in (b"C", b"M", b"R", b"T", b"L") if milter_answers(code, steps)]
        self.assertEqual(answered, [b"R"], hex(steps))
        self.assertEqual(milter_replies(im.milter_negotiation(2))[0][1][:4], b"\0\0\0\x02")

    def test_a_reply_doubles_percent_signs_and_ends_with_nul(self):
        self.assertEqual(milter_replies(im.milter_reply("452 4.5.3 100% <a@b>")),
                         [(b"y", b"452 4.5.3 100%% <a@b>\0")])

    def test_strings_follow_a_header_index_when_given(self):
        self.assertEqual(milter_replies(im.milter_strings(b"m", "Subject", "", index=2)),
                         [(b"m", b"\0\0\0\x02Subject\0\0")])
        self.assertEqual(milter_replies(im.milter_strings(b"e", "<a@b.example>")),
                         [(b"e", b"<a@b.example>\0")])
        self.assertEqual(milter_replies(im.milter_strings(b"m", "X", "caf\udce9", index=1)),
                         [(b"m", b"\0\0\0\x01X\0caf\xe9\0")])


###############################################################################
# Wire formats: HTTP/1.1 requests and responses, and the WebSocket handshake
###############################################################################

class ParseRequestTest(unittest.TestCase):
    def test_versions_other_than_http_1_0_and_1_1_are_505(self):
        for version in ("0.9", "1.2", "2.0", "3.0"):
            with self.subTest(version=version), self.assertRaises(im.HttpError) as caught:
                im.parse_request(("GET / HTTP/%s\r\nHost: x\r\n\r\n" % version).encode())
            self.assertEqual(caught.exception.status, 505)
        for version in ("1.0", "1.1"):
            im.parse_request(("GET / HTTP/%s\r\nHost: x\r\n\r\n" % version).encode())

    def test_request_line_and_headers_are_parsed_with_lowercased_names(self):
        request = im.parse_request(upgrade_head('/ws?token=1', X_Thing='  spaced value \t'))
        self.assertEqual(request.method, 'GET')
        self.assertEqual(request.target, '/ws?token=1')
        self.assertEqual(request.path, '/ws')
        self.assertEqual(request.version, (1, 1))
        self.assertEqual(request.headers['host'], 'localhost')
        self.assertEqual(request.headers['x-thing'], 'spaced value')

    def test_repeated_header_values_are_joined_with_commas(self):
        head = b'GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nconnection: Upgrade\r\n\r\n'
        self.assertEqual(im.parse_request(head).headers['connection'], 'keep-alive, Upgrade')

    def test_malformed_request_line_is_400(self):
        for line in ('GET /ws', 'GET /ws HTTP/1.1 extra', 'GET  /ws HTTP/1.1', 'GET /ws HTTP/one',
                     '/ws HTTP/1.1', 'G(T /ws HTTP/1.1', ''):
            with self.subTest(line=line), self.assertRaises(im.HttpError) as ctx:
                im.parse_request(upgrade_head(request_line=line))
            self.assertEqual(ctx.exception.status, 400)

    def test_malformed_header_lines_are_400(self):
        for line in (b'NoColon', b'Bad Name: x', b': empty name', b' folded: continuation',
                     b'X: control\x01char', b'X: bare\nnewline', b'X: del\x7f'):
            head = b'GET / HTTP/1.1\r\nHost: a\r\n' + line + b'\r\n\r\n'
            with self.subTest(line=line), self.assertRaises(im.HttpError) as ctx:
                im.parse_request(head)
            self.assertEqual(ctx.exception.status, 400)

    def test_head_without_blank_line_is_400(self):
        with self.assertRaises(im.HttpError) as ctx:
            im.parse_request(b'GET / HTTP/1.1\r\nHost: a\r\n')
        self.assertEqual(ctx.exception.status, 400)

    def test_hostile_header_lines_are_refused_in_linear_time(self):
        line = b"X: a" + b" " * 8000 + b"\x01"
        head = b"GET / HTTP/1.1\r\nHost: x\r\n" + line + b"\r\n\r\n"
        started = time.monotonic()
        for _ in range(20):        # a backtracking pattern took 0.27 s for each of these
            with self.assertRaises(im.HttpError) as caught:
                im.parse_request(head)
            self.assertEqual(caught.exception.status, 400)
        self.assertLess(time.monotonic() - started, 1.0)

    def test_duplicate_host_is_400(self):
        with self.assertRaises(im.HttpError) as ctx:
            im.parse_request(b'GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n')
        self.assertEqual(ctx.exception.status, 400)

    def test_non_ascii_header_bytes_are_kept_as_latin1(self):
        request = im.parse_request(b'GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n')
        self.assertEqual(request.headers['x'].encode('latin-1'), b'caf\xc3\xa9')


class CheckUpgradeTest(unittest.TestCase):
    def status(self, head, path='/ws', origins=()):
        with self.assertRaises(im.HttpError) as ctx:
            im.check_upgrade(im.parse_request(head), path, origins)
        return ctx.exception

    def test_valid_upgrade_returns_the_key(self):
        self.assertEqual(im.check_upgrade(im.parse_request(upgrade_head()), '/ws', ()), KEY)

    def test_query_string_is_ignored_when_matching_the_path(self):
        self.assertEqual(im.check_upgrade(im.parse_request(upgrade_head('/ws?a=b')), '/ws', ()), KEY)

    def test_other_path_is_404(self):
        self.assertEqual(self.status(upgrade_head('/other')).status, 404)
        self.assertEqual(self.status(upgrade_head('/ws/')).status, 404)

    def test_plain_get_to_the_path_is_426_with_upgrade_header(self):
        error = self.status(upgrade_head(Upgrade=None, Connection='keep-alive'))
        self.assertEqual(error.status, 426)
        self.assertIn(('Upgrade', 'websocket'), error.headers)

    def test_missing_connection_upgrade_token_is_426(self):
        self.assertEqual(self.status(upgrade_head(Connection='keep-alive')).status, 426)
        self.assertEqual(self.status(upgrade_head(Upgrade='h2c')).status, 426)

    def test_connection_token_list_and_case_are_accepted(self):
        head = upgrade_head(Connection='keep-alive, Upgrade', Upgrade='WebSocket')
        self.assertEqual(im.check_upgrade(im.parse_request(head), '/ws', ()), KEY)
        head = upgrade_head(Connection='UPGRADE,keep-alive')
        self.assertEqual(im.check_upgrade(im.parse_request(head), '/ws', ()), KEY)

    def test_method_other_than_get_is_400(self):
        self.assertEqual(self.status(upgrade_head(request_line='POST /ws HTTP/1.1')).status, 400)

    def test_http_1_0_is_400_and_versions_other_than_1_0_and_1_1_are_505(self):
        self.assertEqual(self.status(upgrade_head(request_line='GET /ws HTTP/1.0')).status, 400)
        for version in ('0.9', '1.2', '2.0', '9.9'):
            line = 'GET /ws HTTP/%s' % version
            with self.subTest(version=version):
                self.assertEqual(self.status(upgrade_head(request_line=line)).status, 505)

    def test_missing_host_is_400(self):
        self.assertEqual(self.status(upgrade_head(Host=None)).status, 400)

    def test_missing_or_malformed_key_is_400(self):
        short = base64.b64encode(b'x' * 15).decode()
        bad_keys = (None, '', short, 'not base64 at all!!!!!!=', KEY[:-2], KEY + 'AAAA', 'Zé' * 12)
        for key in bad_keys:
            with self.subTest(key=key):
                self.assertEqual(self.status(upgrade_head(Sec_WebSocket_Key=key)).status, 400)

    def test_websocket_version_other_than_13_is_426_naming_13(self):
        for version in ('8', '14', None):
            with self.subTest(version=version):
                error = self.status(upgrade_head(Sec_WebSocket_Version=version))
                self.assertEqual(error.status, 426)
                self.assertIn(('Sec-WebSocket-Version', '13'), error.headers)

    def test_origin_not_in_allowed_list_is_403(self):
        head = upgrade_head(Origin='https://evil.example')
        self.assertEqual(self.status(head, origins=['https://mail.example']).status, 403)
        self.assertEqual(self.status(upgrade_head(), origins=['https://mail.example']).status, 403)
        prefix = upgrade_head(Origin='https://mail.example.evil')
        self.assertEqual(self.status(prefix, origins=['https://mail.example']).status, 403)

    def test_origin_is_compared_case_insensitively(self):
        head = upgrade_head(Origin='HTTPS://Mail.Example')
        self.assertEqual(im.check_upgrade(im.parse_request(head), '/ws', ['https://mail.example']), KEY)

    def test_empty_allowed_list_accepts_any_origin(self):
        head = upgrade_head(Origin='https://anything.example')
        self.assertEqual(im.check_upgrade(im.parse_request(head), '/ws', []), KEY)

    def test_the_listeners_own_page_is_allowed_and_a_malformed_origin_is_refused_not_a_crash(self):
        own = upgrade_head(Origin='http://localhost')           # upgrade_head's Host: localhost
        self.assertEqual(im.check_upgrade(im.parse_request(own), '/ws', ['moz-extension://a']), KEY)
        broken = upgrade_head(Origin='http://[')
        self.assertEqual(self.status(broken, origins=['moz-extension://a']).status, 403)


class ResponsesTest(unittest.TestCase):
    def test_accept_response_carries_the_rfc_example_accept_value(self):
        response = im.accept_response(KEY)
        self.assertTrue(response.startswith(b'HTTP/1.1 101 Switching Protocols\r\n'))
        self.assertIn(b'\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n', response)
        self.assertIn(b'\r\nUpgrade: websocket\r\n', response)
        self.assertIn(b'\r\nConnection: Upgrade\r\n', response)
        self.assertTrue(response.endswith(b'\r\n\r\n'))

    def test_error_response_has_status_length_close_and_extra_headers(self):
        response = im.error_response(426, 'use WebSocket', [('Sec-WebSocket-Version', '13')])
        head, body = response.split(b'\r\n\r\n', 1)
        lines = head.split(b'\r\n')
        self.assertEqual(lines[0], b'HTTP/1.1 426 Upgrade Required')
        self.assertIn(b'Content-Length: %d' % len(body), lines)
        self.assertIn(b'Connection: close', lines)
        self.assertIn(b'Content-Type: text/plain; charset=utf-8', lines)
        self.assertIn(b'Sec-WebSocket-Version: 13', lines)
        self.assertEqual(body, b'use WebSocket\n')


class HttpParserTest(unittest.TestCase):
    """Requests from a client's bytes, without I/O: keep-alive, bodies by Content-Length."""

    def assertHttpError(self, status, parser, *chunks):
        with self.assertRaises(im.HttpError) as caught:
            events(parser, *chunks)
        self.assertEqual(caught.exception.status, status)
        return caught.exception

    def test_two_pipelined_requests_in_one_feed_come_out_one_at_a_time_in_order(self):
        parser = im.HttpParser()
        parser.feed(request_bytes("POST", "/api/v1/aliases", [("Content-Type", "application/json")],
                                  b'{"domain": "incognito.test"}')
                    + request_bytes("GET", "/api/user_info"))
        first = parser.next_request()
        self.assertEqual((first.method, first.path, first.body),
                         ("POST", "/api/v1/aliases", b'{"domain": "incognito.test"}'))
        self.assertEqual(first.headers["content-type"], "application/json")
        second = parser.next_request()
        self.assertEqual((second.method, second.path, second.body), ("GET", "/api/user_info", b""))
        self.assertIsNone(parser.next_request())
        self.assertEqual(parser.buffered, 0)

    def test_body_by_content_length_split_across_feeds_ends_at_its_last_byte(self):
        data = request_bytes("POST", "/api/alias/random/new?hostname=example.com", (),
                             b'{"note": "split"}')
        head_end = data.index(b"\r\n\r\n") + 4
        parser = im.HttpParser()
        self.assertEqual(events(parser, data[:head_end], *[bytes([b]) for b in data[head_end:-1]]),
                         [])
        [request] = events(parser, data[-1:])
        self.assertEqual(request.body, b'{"note": "split"}')
        self.assertEqual(request.query, {"hostname": "example.com"})
        self.assertEqual(parser.buffered, 0)

    def test_request_fed_byte_by_byte_is_the_same_request(self):
        data = request_bytes("PATCH", "/api/v1/aliases/7", [("Authorization", "Bearer x")],
                             {"description": "shop"})
        whole = events(im.HttpParser(), data)
        self.assertEqual(events(im.HttpParser(), *[bytes([b]) for b in data]), whole)

    def test_no_content_length_means_an_empty_body_and_the_next_request_follows(self):
        data = request_bytes("DELETE", "/api/v1/aliases/7") + request_bytes("GET", "/api/mailboxes")
        self.assertEqual([(r.method, r.body) for r in events(im.HttpParser(), data)],
                         [("DELETE", b""), ("GET", b"")])

    def test_body_of_exactly_the_limit_is_accepted(self):
        [request] = events(im.HttpParser(max_body_bytes=100),
                           request_bytes("POST", "/api/v1/aliases", (), b"x" * 100))
        self.assertEqual(len(request.body), 100)

    def test_body_over_the_limit_is_413_as_soon_as_the_head_is_complete(self):
        parser = im.HttpParser(max_body_bytes=100)
        head = b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n"
        self.assertHttpError(413, parser, head)     # no byte of the body was sent
        self.assertHttpError(413, im.HttpParser(), head.replace(b"101", b"9" * 40))

    def test_chunked_transfer_encoding_is_411(self):
        for coding in (b"chunked", b"gzip, chunked", b"Chunked"):
            self.assertHttpError(411, im.HttpParser(),
                                 b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                                 + coding + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        self.assertHttpError(411, im.HttpParser(),
                             b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\nhello")

    def test_head_over_the_limit_is_431_before_its_end_arrives(self):
        parser = im.HttpParser(max_header_bytes=1024)
        self.assertHttpError(431, parser, b"GET /api/user_info HTTP/1.1\r\n",
                             b"X-Flood: y\r\n" * 200)
        flood = b"GET /api/user_info HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n"
        self.assertHttpError(431, im.HttpParser(max_header_bytes=1024), flood)
        self.assertEqual(len(events(im.HttpParser(max_header_bytes=len(flood) + 100), flood)), 1)

    def test_malformed_or_conflicting_content_length_is_400(self):
        for value in (b"-1", b"+5", b"5 5", b"0x5", b"1e3", b"five", b"", b"5, 6"):
            self.assertHttpError(400, im.HttpParser(),
                                 b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                 + value + b"\r\n\r\nhello")
        self.assertHttpError(400, im.HttpParser(),
                             b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Content-Length: 6\r\n\r\nhello!")

    def test_content_length_of_non_ascii_digits_is_400_not_a_crash(self):
        # "\xb2" (superscript two) is a digit to str.isdigit() but not to int()
        for value in (b"\xb2", b"1\xb9", b"\xbd"):
            self.assertHttpError(400, im.HttpParser(),
                                 b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                 + value + b"\r\n\r\nhello")

    def test_empty_lines_before_a_request_are_tolerated(self):
        data = (b"\r\n\r\n" + request_bytes("POST", "/api/v1/aliases", (), b"{}") + b"\r\n"
                + request_bytes("GET", "/api/user_info"))
        self.assertEqual([r.path for r in events(im.HttpParser(), data)],
                         ["/api/v1/aliases", "/api/user_info"])
        parser = im.HttpParser()
        self.assertEqual(events(parser, b"\r\n"), [])
        self.assertEqual(parser.buffered, 0)


###############################################################################
# Wire formats: RFC 6455 frames
###############################################################################

class FrameParserMessagesTest(unittest.TestCase):
    def test_rfc_example_masked_hello_is_a_text_message(self):
        frame = bytes([0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58])
        self.assertEqual(events(im.FrameParser(100), frame), [im.WebSocketMessage(True, 'Hello')])

    def test_binary_message_is_bytes(self):
        self.assertEqual(events(im.FrameParser(100), client_frame(2, b'\x00\xff')),
                         [im.WebSocketMessage(False, b'\x00\xff')])

    def test_empty_text_and_binary_messages_are_delivered(self):
        self.assertEqual(events(im.FrameParser(10), client_frame(1), client_frame(2)),
                         [im.WebSocketMessage(True, ''), im.WebSocketMessage(False, b'')])

    def test_16_and_64_bit_extended_lengths_are_decoded(self):
        for size in (126, 65535, 65536, 70000):
            payload = os.urandom(size)
            with self.subTest(size=size):
                self.assertEqual(events(im.FrameParser(size), client_frame(2, payload)),
                                 [im.WebSocketMessage(False, payload)])

    def test_fragmented_message_is_reassembled(self):
        frames = client_frame(1, b'Hel', fin=False) + client_frame(0, b'lo', fin=False) + \
            client_frame(0, b'!')
        self.assertEqual(events(im.FrameParser(100), frames), [im.WebSocketMessage(True, 'Hello!')])

    def test_control_frames_may_interleave_with_fragments(self):
        frames = [client_frame(2, b'ab', fin=False), client_frame(9, b'p'), client_frame(10, b'q'),
                  client_frame(0, b'cd')]
        self.assertEqual(events(im.FrameParser(100), *frames),
                         [im.WebSocketPing(b'p'), im.WebSocketPong(b'q'), im.WebSocketMessage(False, b'abcd')])

    def test_feeding_byte_by_byte_gives_the_same_events(self):
        data = client_frame(1, 'κόσμε'.encode(), fin=False) + client_frame(9, b'x') + \
            client_frame(0, os.urandom(300).hex().encode()) + client_frame(2, os.urandom(70000))
        whole = events(im.FrameParser(1 << 20), data)
        single = events(im.FrameParser(1 << 20), *(data[i:i + 1] for i in range(len(data))))
        self.assertEqual(single, whole)
        self.assertEqual(len(whole), 3)

    def test_events_before_a_bad_frame_are_yielded_first(self):
        parser = im.FrameParser(100)
        parser.feed(client_frame(1, b'ok') + client_frame(3))
        self.assertEqual(parser.next_event(), im.WebSocketMessage(True, 'ok'))
        with self.assertRaises(im.WebSocketProtocolError):
            parser.next_event()


class FrameParserProtocolErrorsTest(ProtocolErrorAssertions):
    def test_unmasked_client_frame_is_protocol_error_1002(self):
        self.assertProtocolError(1002, im.FrameParser(100), client_frame(1, b'hi', masked=False))

    def test_unmasked_frame_fails_on_its_first_two_bytes(self):
        self.assertProtocolError(1002, im.FrameParser(100), client_frame(1, b'hi', masked=False)[:2])

    def test_reserved_bits_are_protocol_error_1002(self):
        for rsv in (1, 2, 4, 7):
            with self.subTest(rsv=rsv):
                self.assertProtocolError(1002, im.FrameParser(100), client_frame(1, b'x', rsv=rsv))

    def test_unknown_opcodes_are_protocol_error_1002(self):
        for opcode in (3, 4, 5, 6, 7, 11, 12, 13, 14, 15):
            with self.subTest(opcode=opcode):
                self.assertProtocolError(1002, im.FrameParser(100), client_frame(opcode))

    def test_fragmented_control_frame_is_protocol_error_1002(self):
        for opcode in (8, 9, 10):
            with self.subTest(opcode=opcode):
                self.assertProtocolError(1002, im.FrameParser(100), client_frame(opcode, fin=False))

    def test_control_payload_over_125_is_protocol_error_1002(self):
        self.assertEqual(events(im.FrameParser(10), client_frame(9, b'x' * 125)), [im.WebSocketPing(b'x' * 125)])
        self.assertProtocolError(1002, im.FrameParser(1000), client_frame(9, b'x' * 126)[:4])

    def test_continuation_without_a_message_is_protocol_error_1002(self):
        self.assertProtocolError(1002, im.FrameParser(100), client_frame(0, b'x'))
        self.assertProtocolError(1002, im.FrameParser(100),
                                 client_frame(1, b'a'), client_frame(0, b'b'))

    def test_new_data_frame_during_a_message_is_protocol_error_1002(self):
        for opcode in (1, 2):
            with self.subTest(opcode=opcode):
                self.assertProtocolError(1002, im.FrameParser(100), client_frame(1, b'a', fin=False),
                                         client_frame(opcode, b'b'))

    def test_64_bit_length_with_most_significant_bit_is_protocol_error_1002(self):
        header = bytes([0x82, 0xFF]) + struct.pack('!Q', 1 << 63)
        self.assertProtocolError(1002, im.FrameParser(1 << 70), header)


class FrameParserUtf8Test(ProtocolErrorAssertions):
    EURO = '€'.encode()   # e2 82 ac

    def test_invalid_utf8_text_is_1007(self):
        self.assertProtocolError(1007, im.FrameParser(100), client_frame(1, b'\xff'))
        surrogate = b'\xed\xa0\x80'
        self.assertProtocolError(1007, im.FrameParser(100), client_frame(1, surrogate))

    def test_code_point_split_across_fragments_is_valid(self):
        frames = [client_frame(1, b'a' + self.EURO[:1], fin=False),
                  client_frame(0, self.EURO[1:2], fin=False), client_frame(0, self.EURO[2:] + b'b')]
        self.assertEqual(events(im.FrameParser(100), *frames), [im.WebSocketMessage(True, 'a€b')])

    def test_code_point_split_across_reads_within_a_frame_is_valid(self):
        frame = client_frame(1, self.EURO * 3)
        self.assertEqual(events(im.FrameParser(100), *(frame[i:i + 1] for i in range(len(frame)))),
                         [im.WebSocketMessage(True, '€€€')])

    def test_invalid_fragment_fails_before_the_message_is_finished(self):
        parser = im.FrameParser(100)
        self.assertEqual(events(parser, client_frame(1, 'κόσμε'.encode(), fin=False)), [])
        # F4 90 would encode a code point above U+10FFFF: known invalid at its second byte
        self.assertProtocolError(1007, parser, client_frame(0, b'\xf4\x90', fin=False))

    def test_invalid_bytes_fail_before_the_rest_of_their_frame_arrives(self):
        payload = b'valid \xf4\x90\x80\x80' + b' then much more text' * 5
        frame = client_frame(1, payload)
        bad = 6 + payload.index(b'\x90')   # after the 2-byte header and the 4-byte mask
        parser = im.FrameParser(1000)
        self.assertEqual(events(parser, frame[:bad]), [])
        self.assertProtocolError(1007, parser, frame[bad:bad + 1])

    def test_surrogate_prefix_fails_at_its_second_byte(self):
        parser = im.FrameParser(100)
        self.assertEqual(events(parser, client_frame(1, b'ab\xed', fin=False)), [])
        self.assertProtocolError(1007, parser, client_frame(0, b'\xa0', fin=False))

    def test_message_ending_inside_a_code_point_is_1007(self):
        self.assertProtocolError(1007, im.FrameParser(100), client_frame(1, self.EURO[:2]))
        self.assertProtocolError(1007, im.FrameParser(100), client_frame(1, self.EURO[:2], fin=False),
                                 client_frame(0, b''))

    def test_binary_messages_are_not_utf8_checked(self):
        self.assertEqual(events(im.FrameParser(100), client_frame(2, b'\xff\xfe')),
                         [im.WebSocketMessage(False, b'\xff\xfe')])


class FrameParserCloseTest(ProtocolErrorAssertions):
    def test_empty_close_has_no_code(self):
        self.assertEqual(events(im.FrameParser(100), client_frame(8)), [im.WebSocketClose(None, '')])

    def test_close_code_and_utf8_reason_are_decoded(self):
        payload = struct.pack('!H', 1001) + 'bye ✓'.encode()
        self.assertEqual(events(im.FrameParser(100), client_frame(8, payload)),
                         [im.WebSocketClose(1001, 'bye ✓')])

    def test_close_payload_of_one_byte_is_1002(self):
        self.assertProtocolError(1002, im.FrameParser(100), client_frame(8, b'\x03'))

    def test_invalid_close_codes_are_1002(self):
        for code in (0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 2000, 2999, 5000, 65535):
            with self.subTest(code=code):
                frame = client_frame(8, struct.pack('!H', code))
                self.assertProtocolError(1002, im.FrameParser(100), frame)

    def test_invalid_utf8_close_reason_is_1007(self):
        payload = struct.pack('!H', 1000) + b'\xce\xba\xff'
        self.assertProtocolError(1007, im.FrameParser(100), client_frame(8, payload))

    def test_bytes_after_close_are_ignored(self):
        parser = im.FrameParser(100)
        data = client_frame(8, struct.pack('!H', 1000)) + client_frame(1, b'late') + client_frame(3)
        self.assertEqual(events(parser, data, b'\x00garbage'), [im.WebSocketClose(1000, '')])
        self.assertTrue(parser.closed)


class IsValidCloseCodeTest(unittest.TestCase):
    def test_1000_to_1003_1007_to_1011_and_3000_to_4999_are_valid(self):
        for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999):
            self.assertTrue(im.is_valid_close_code(code), code)

    def test_reserved_and_unassigned_codes_are_invalid(self):
        for code in (0, 999, 1004, 1005, 1006, 1012, 1013, 1014, 1015, 1016, 2999, 5000, 65535):
            self.assertFalse(im.is_valid_close_code(code), code)


class FrameParserSizeLimitTest(ProtocolErrorAssertions):
    def test_oversize_announced_length_is_1009_before_the_payload_is_fed(self):
        header16 = client_frame(2, b'x' * 200)[:4]                        # no mask, no payload
        self.assertProtocolError(1009, im.FrameParser(199), header16)
        header64 = bytes([0x82, 0xFF]) + struct.pack('!Q', 1 << 40)     # 1 TiB announced
        self.assertProtocolError(1009, im.FrameParser(1 << 20), header64)

    def test_message_total_over_the_limit_across_fragments_is_1009(self):
        parser = im.FrameParser(10)
        self.assertEqual(events(parser, client_frame(1, b'123456', fin=False)), [])
        self.assertProtocolError(1009, parser, client_frame(0, b'12345')[:2])

    def test_message_of_exactly_the_limit_is_accepted(self):
        frames = [client_frame(2, b'12345', fin=False), client_frame(0, b'67890')]
        self.assertEqual(events(im.FrameParser(10), *frames), [im.WebSocketMessage(False, b'1234567890')])

    def test_limit_applies_per_message_not_per_connection(self):
        frames = [client_frame(2, b'x' * 10)] * 5
        self.assertEqual(len(events(im.FrameParser(10), *frames)), 5)

    def test_control_frames_do_not_count_against_the_limit(self):
        self.assertEqual(events(im.FrameParser(4), client_frame(9, b'pingpong')), [im.WebSocketPing(b'pingpong')])


class EncodingTest(unittest.TestCase):
    def test_payload_length_uses_7_16_or_64_bits_as_needed(self):
        self.assertEqual(im.encode_frame(1, b''), b'\x81\x00')
        self.assertEqual(im.encode_frame(2, b'x' * 125)[:2], b'\x82\x7d')
        self.assertEqual(im.encode_frame(2, b'x' * 126)[:4], b'\x82\x7e\x00\x7e')
        self.assertEqual(im.encode_frame(2, b'x' * 65535)[:4], b'\x82\x7e\xff\xff')
        self.assertEqual(im.encode_frame(2, b'x' * 65536)[:10], b'\x82\x7f' + struct.pack('!Q', 65536))
        self.assertEqual(len(im.encode_frame(2, b'x' * 65536)), 65546)

    def test_server_frames_are_unmasked_and_fin_is_optional(self):
        self.assertEqual(im.encode_frame(1, b'Hello'), b'\x81\x05Hello')
        self.assertEqual(im.encode_frame(1, b'Hel', fin=False), b'\x01\x03Hel')

    def test_encode_message_picks_the_opcode_from_the_type(self):
        self.assertEqual(im.encode_message('é'), b'\x81\x02\xc3\xa9')
        self.assertEqual(im.encode_message(b'\x00'), b'\x82\x01\x00')
        self.assertEqual(im.encode_message(bytearray(b'\x00')), b'\x82\x01\x00')
        with self.assertRaises(TypeError):
            im.encode_message(42)

    def test_encode_close_carries_code_and_reason(self):
        self.assertEqual(im.encode_close(1000), b'\x88\x02\x03\xe8')
        self.assertEqual(im.encode_close(1001, 'bye'), b'\x88\x05\x03\xe9bye')

    def test_long_close_reason_is_cut_on_a_character_boundary(self):
        frame = im.encode_close(1000, '€' * 100)
        self.assertEqual(frame[1], 2 + 123)
        frame[4:].decode('utf-8')   # 41 whole euro signs, no partial one

    def test_server_frames_round_trip_through_the_parser_once_masked(self):
        for message in ('text ✓', b'\x00bin', 'x' * 70000):
            masked = client_frame(*decode_server_frame(im.encode_message(message)))
            self.assertEqual(events(im.FrameParser(1 << 20), masked),
                             [im.WebSocketMessage(isinstance(message, str), message)])


class UnmaskTest(unittest.TestCase):
    def test_big_int_unmask_matches_a_per_byte_xor_at_every_mask_phase(self):
        for size in (0, 1, 3, 4, 5, 1000):
            data = os.urandom(size)
            for offset in range(5):
                expected = bytes(b ^ MASK[(offset + i) % 4] for i, b in enumerate(data))
                self.assertEqual(im._unmask(data, MASK, offset), expected)


###############################################################################
# Wire formats: the HTTP API, in addy.io's and SimpleLogin's dialects
###############################################################################

class RouteApiTest(unittest.TestCase):
    """Which operation each path and method asks for, with which fields; the token first."""

    @classmethod
    def setUpClass(cls):
        folder = make_folder()
        cls.addClassCleanup(shutil.rmtree, folder, True)
        path = minimal_config_file(folder, PostfixConfig={"Domain": ", ".join(SITE.domains)})
        cls.gate = im.Gate(im.load_config(path), service=None)

    def route(self, request):
        return im.route_api(request, SITE)

    def through_the_gate(self, request):
        """The checked fields of the request's operation, or the API's reply refusing them."""
        call, dialect = self.route(request)
        try:
            return self.gate.check(im.HTTP, call.op, call.fields)[1]
        except im.IncognitoMailError as e:
            return im.api_error(dialect, e)

    def assertCall(self, request, op, dialect, **fields):
        call, got_dialect = self.route(request)
        self.assertIsInstance(call, im.ApiCall, call)
        self.assertEqual((call.op, got_dialect), (op, dialect))
        self.assertEqual(call.fields["token"], TOKEN)
        for name, value in fields.items():
            self.assertEqual(call.fields.get(name), value, (name, call.fields))
        return call

    def assertReply(self, request, status):
        reply, dialect = self.route(request)
        self.assertIsInstance(reply, im.ApiReply, reply)
        self.assertEqual(reply.status, status, reply)
        return reply, dialect

    def assertRefusedAfterTheToken(self, request, status, field=None):
        """A refusal the route finds in the request is told only once the token is checked:
        the call is ``account`` with the request's token, then the error."""
        call, dialect = self.route(request)
        self.assertIsInstance(call, im.ApiCall, call)
        self.assertEqual((call.op, call.fields), ("account", {"token": TOKEN}))
        reply = call.then(None)
        self.assertEqual(reply.status, status, reply)
        if field is not None:
            self.assertIn(field, reply.body["errors"], reply)
        return reply

    def test_addy_routes_reach_their_operations(self):
        ADDY = im.ADDY
        self.assertCall(addy_request("POST", "/api/v1/aliases",
                                     {"domain": "incognito.test", "description": BITWARDEN_NOTE}),
                        "new_handle", ADDY, domain="incognito.test", label=BITWARDEN_NOTE)
        self.assertCall(addy_request("GET", "/api/v1/aliases"), "find_handles", ADDY,
                        offset=0, search=None, enabled=None)
        self.assertCall(addy_request("GET", "/api/v1/aliases/7"), "get_handle", ADDY, handle_id=7)
        self.assertCall(addy_request("PATCH", "/api/v1/aliases/7", {"description": "shop"}),
                        "update_handle", ADDY, handle_id=7, label="shop")
        self.assertCall(addy_request("DELETE", "/api/v1/aliases/7"), "delete_handle", ADDY,
                        handle_id=7)
        self.assertCall(addy_request("POST", "/api/v1/active-aliases", {"id": 7}), "update_handle",
                        ADDY, handle_id=7, enabled=True)
        self.assertCall(addy_request("POST", "/api/v1/active-aliases", {"id": "7"}),
                        "update_handle", ADDY, handle_id=7, enabled=True)
        self.assertCall(addy_request("DELETE", "/api/v1/active-aliases/7"), "update_handle", ADDY,
                        handle_id=7, enabled=False)
        for path in ("/api/v1/domain-options", "/api/v1/account-details",
                     "/api/v1/api-token-details", "/api/v1/recipients?filter[verified]=true"):
            self.assertCall(addy_request("GET", path), "account", ADDY)

    def test_simplelogin_routes_reach_their_operations(self):
        SL = im.SIMPLELOGIN
        self.assertCall(simplelogin_request("POST", "/api/alias/random/new?hostname=example.com",
                                            {"note": BITWARDEN_NOTE}),
                        "new_handle", SL, label=BITWARDEN_NOTE)
        self.assertCall(simplelogin_request("GET", "/api/v2/aliases?page_id=1"), "find_handles", SL,
                        offset=20, limit=20, search=None)
        self.assertCall(simplelogin_request("POST", "/api/v2/aliases?page_id=0", {"query": "shop"}),
                        "find_handles", SL, offset=0, limit=20, search="shop")
        self.assertCall(simplelogin_request("GET", "/api/aliases/7"), "get_handle", SL, handle_id=7)
        self.assertCall(simplelogin_request("DELETE", "/api/aliases/7"), "delete_handle", SL,
                        handle_id=7)
        toggle = self.assertCall(simplelogin_request("POST", "/api/aliases/7/toggle"), "get_handle",
                                 SL, handle_id=7)
        then = toggle.then(HANDLE)
        self.assertEqual((then.op, then.fields["handle_id"], then.fields["enabled"]),
                         ("update_handle", 7, False))
        self.assertEqual(then.then(HANDLE._replace(enabled=0)), im.ApiReply(200, {"enabled": False},
                                                                             ()))
        for path in ("/api/user_info", "/api/mailboxes"):
            self.assertCall(simplelogin_request("GET", path), "account", SL)

    def test_head_is_routed_as_get(self):
        self.assertCall(addy_request("HEAD", "/api/v1/domain-options"), "account", im.ADDY)

    def test_a_method_a_path_does_not_take_is_405_with_allow_listing_those_it_takes(self):
        reply, dialect = self.assertReply(addy_request("PUT", "/api/v1/aliases"), 405)
        self.assertEqual(dialect, im.ADDY)
        allow = dict(reply.headers)["Allow"]
        self.assertEqual(set(allow.split(", ")), {"GET", "HEAD", "POST", "OPTIONS"})
        self.assertIn("PUT", reply.body["message"])
        reply, dialect = self.assertReply(simplelogin_request("GET", "/api/alias/random/new"), 405)
        self.assertEqual(set(dict(reply.headers)["Allow"].split(", ")), {"POST", "OPTIONS"})
        self.assertIn("error", reply.body)

    def test_unknown_path_is_a_json_404_in_no_dialect(self):
        for target in ("/api/v1/nothing", "/favicon.ico", "/api/v1/aliases/7/x",
                       "/api/aliases/7/toggle/x"):
            reply, dialect = self.assertReply(addy_request("GET", target), 404)
            self.assertIsNone(dialect)
            self.assertTrue(reply.body["message"] and reply.body["error"], reply)

    def test_a_base_url_ending_in_a_slash_still_reaches_the_api(self):
        # Bitwarden joins the base URL and the path as strings: "https://host/" gives "//api/..."
        call, dialect = im.route_api(addy_request("GET", "//api/v1/aliases"), SITE)
        self.assertEqual((call.op, dialect), ("find_handles", im.ADDY))

    def test_missing_or_empty_token_is_401_before_anything_else(self):
        for request in (addy_request("POST", "/api/v1/aliases", {"domain": 5}, token=None),
                        api_request("GET", "/api/v1/aliases", [("Authorization", "")]),
                        simplelogin_request("POST", "/api/alias/random/new", b"{", token=None),
                        api_request("GET", "/api/user_info", [("Authentication", "  ")])):
            self.assertReply(request, 401)

    def test_a_bad_request_with_any_token_is_told_only_after_the_token_is_checked(self):
        self.assertRefusedAfterTheToken(addy_request("POST", "/api/v1/aliases", b"{not json"), 422)
        self.assertRefusedAfterTheToken(addy_request("POST", "/api/v1/aliases", {"domain": "x.org"}),
                                        422, "domain")
        self.assertRefusedAfterTheToken(simplelogin_request("POST", "/api/alias/random/new", b"["),
                                        400)
        self.assertRefusedAfterTheToken(addy_request("GET", "/api/v1/aliases/abc"), 404)

    def test_bearer_is_read_in_any_case_and_authentication_takes_the_bare_token(self):
        for headers in ([("Authorization", "Bearer " + TOKEN)], [("Authorization", "bearer " + TOKEN)],
                        [("Authorization", TOKEN)], [("Authentication", TOKEN)]):
            call, _ = im.route_api(api_request("GET", "/api/v1/domain-options", headers), SITE)
            self.assertEqual(call.fields["token"], TOKEN, headers)

    def test_addy_new_alias_fields_are_checked_naming_the_field(self):
        for body, field in (({"description": "x"}, "domain"), ({"domain": "elsewhere.org"}, "domain"),
                            ({"domain": 5}, "domain"), ({"domain": ["incognito.test"]}, "domain"),
                            ({"domain": "incognito.test", "format": "custom"}, "local_part"),
                            ({"domain": "incognito.test", "local_part": "me"}, "local_part"),
                            ({"domain": "incognito.test", "format": 3}, "format"),
                            ({"domain": "incognito.test", "recipient_ids": "1"}, "recipient_ids")):
            reply = self.assertRefusedAfterTheToken(addy_request("POST", "/api/v1/aliases", body), 422,
                                                    field)
            self.assertIsInstance(reply.body["message"], str)
        # what the operation's own fields say is wrong, the gate finds, in addy.io's names
        for body, field in (({"description": 5}, "description"), ({"description": "a\nb"}, "description"),
                            ({"expires_at": "soon"}, "expires_at"), ({"max_messages": "3"}, "max_messages")):
            reply = self.through_the_gate(addy_request("POST", "/api/v1/aliases",
                                                       dict(body, domain="incognito.test")))
            self.assertEqual(reply.status, 422, reply)
            self.assertEqual(list(reply.body["errors"]), [field], reply)

    def test_unknown_domain_is_refused_naming_the_domains_served_here(self):
        reply = self.assertRefusedAfterTheToken(
            addy_request("POST", "/api/v1/aliases", {"domain": "elsewhere.org"}), 422, "domain")
        self.assertIn("incognito.test", reply.body["message"])
        self.assertIn("other.test", reply.body["message"])

    def test_addy_formats_other_than_custom_and_an_empty_local_part_make_a_normal_handle(self):
        for extra in ({"format": "random_characters"}, {"format": "uuid"},
                      {"format": "random_words"}, {"format": None}, {"local_part": ""},
                      {"local_part": None, "recipient_ids": []}, {"recipient_ids": None}):
            body = dict({"domain": "@Other.Test", "description": "d"}, **extra)
            self.assertCall(addy_request("POST", "/api/v1/aliases", body), "new_handle", im.ADDY)
            self.assertEqual(self.through_the_gate(addy_request("POST", "/api/v1/aliases", body)),
                             {"token": TOKEN, "domain": "other.test", "label": "d"})

    def test_ids_that_are_not_whole_numbers_are_no_such_alias(self):
        for text in ("abc", "-1", "1.5", "0x10", "1e3", "%37", "7abc", "9" * 30):
            self.assertRefusedAfterTheToken(addy_request("GET", "/api/v1/aliases/" + text), 404)
            self.assertRefusedAfterTheToken(simplelogin_request("DELETE", "/api/aliases/" + text),
                                            404)
        for value in (True, 1.5, [7], {"id": 7}, None):
            self.assertRefusedAfterTheToken(addy_request("POST", "/api/v1/active-aliases",
                                                         {"id": value}), 422, "id")

    def test_non_ascii_digits_in_numbers_are_refused_not_a_crash(self):
        # "²" is a digit to str.isdigit() but not to int(): each must be an API error
        for request, status in ((simplelogin_request("GET", "/api/v2/aliases?page_id=%C2%B2"), 400),
                                (addy_request("GET", "/api/v1/aliases?page[size]=%C2%B2"), 422),
                                (addy_request("GET", "/api/v1/aliases?page[number]=%C2%B2"), 422),
                                (addy_request("POST", "/api/v1/active-aliases", {"id": "\u00b2"}),
                                 404)):
            self.assertRefusedAfterTheToken(request, status)

    def test_addy_pages_take_number_size_up_to_100_active_and_search(self):
        self.assertCall(addy_request("GET", "/api/v1/aliases?page[number]=3&page[size]=10"
                                            "&filter[active]=false&filter[search]=Shop"),
                        "find_handles", im.ADDY, offset=20, limit=10, enabled=False, search="Shop")
        self.assertCall(addy_request("GET", "/api/v1/aliases?page%5Bsize%5D=100&filter%5Bactive%5D"
                                            "=true&sort=-created_at"),
                        "find_handles", im.ADDY, offset=0, limit=100, enabled=True)
        for query in ("page[size]=101", "page[size]=0", "page[number]=0", "page[number]=x",
                      "filter[active]=yes"):
            self.assertRefusedAfterTheToken(addy_request("GET", "/api/v1/aliases?" + query), 422)

    def test_simplelogin_list_needs_page_id(self):
        for query in ("", "?page_id=", "?page_id=-1", "?page_id=one"):
            self.assertRefusedAfterTheToken(simplelogin_request("GET", "/api/v2/aliases" + query),
                                            400)

    def test_simplelogin_note_else_hostname_becomes_the_label_as_bitwarden_sends_it(self):
        for query, label in (("?hostname=example.com", "example.com"),
                             ("?hostname=example.com:8443", "example.com:8443"),
                             ("?hostname=https://www.example.com/login", "https://www.example.com/login"),
                             ("?hostname=https://shop.example/p?x=1&mode=uuid", None),
                             ("?hostname=", None), ("", None), ("?mode=word", None)):
            call = self.assertCall(simplelogin_request("POST", "/api/alias/random/new" + query),
                                   "new_handle", im.SIMPLELOGIN)
            if label is not None:
                self.assertEqual(call.fields["label"], label)
        self.assertCall(simplelogin_request("POST", "/api/alias/random/new?hostname=example.com",
                                            {"note": "mine"}), "new_handle", im.SIMPLELOGIN,
                        label="mine")
        self.assertRefusedAfterTheToken(
            simplelogin_request("POST", "/api/alias/random/new?mode=fancy"), 400)
        self.assertRefusedAfterTheToken(
            simplelogin_request("POST", "/api/alias/random/new", {"note": 5}), 400)

    def test_new_alias_replies_in_each_services_shape(self):
        call = self.assertCall(addy_request("POST", "/api/v1/aliases", {"domain": "incognito.test"}),
                               "new_handle", im.ADDY)
        reply = call.then(HANDLE)
        self.assertEqual(reply.status, 201)
        self.assertEqual(reply.body["data"]["email"], "k3x9q2m7w4t8z5r1@incognito.test")
        call = self.assertCall(simplelogin_request("POST", "/api/alias/random/new"), "new_handle",
                               im.SIMPLELOGIN)
        reply = call.then(HANDLE)
        self.assertEqual(reply.status, 201)
        self.assertEqual(reply.body["alias"], "k3x9q2m7w4t8z5r1@incognito.test")


class ClientRequestsRouteTest(unittest.TestCase):
    """The exact requests third-party clients send reach an operation (pyaddy 0.5.5,
    simplelogin-client 0.1.0); an unknown path says which endpoints exist."""

    PYADDY_NEW = (b'POST /api/v1/aliases/ HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUser-Agent: python-requests/2.34.2\r\n'
                  b'Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n'
                  b'Authorization: Bearer ' + TOKEN.encode() + b'\r\nContent-Type: application/json\r\n'
                  b'X-Requested-With: XMLHttpRequest\r\nContent-Length: 87\r\n\r\n'
                  b'{"domain": "incognito.test", "description": null, "format": null, "recipient_id": null}')
    SL_SEARCH = (b'GET /api/v2/aliases?page_id=1&enabled=True HTTP/1.1\r\nHost: 127.0.0.1:8765\r\n'
                 b'User-Agent: python-requests/2.34.2\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\n'
                 b'Connection: keep-alive\r\nAuthentication: ' + TOKEN.encode() + b'\r\n'
                 b'Content-Type: application/json\r\nContent-Length: 17\r\n\r\n{"query": "shop"}')

    def route(self, data):
        [request] = events(im.HttpParser(), data)
        return im.route_api(request, SITE)

    def test_pyaddy_makes_aliases_at_a_path_with_a_trailing_slash(self):
        call, dialect = self.route(self.PYADDY_NEW)
        self.assertEqual((call.op, dialect, call.fields["domain"]), ("new_handle", im.ADDY, "incognito.test"))

    def test_simplelogin_clients_search_in_a_get_body_and_filter_by_the_parameters_name(self):
        call, dialect = self.route(self.SL_SEARCH)
        self.assertEqual((call.op, call.fields["search"], call.fields["enabled"], call.fields["offset"]),
                         ("find_handles", "shop", True, 20))
        call, _ = im.route_api(simplelogin_request("GET", "/api/v2/aliases?page_id=0&disabled=anything"), SITE)
        self.assertIs(call.fields["enabled"], False)
        call, _ = im.route_api(simplelogin_request("GET", "/api/v2/aliases?page_id=0&pinned=True&enabled=1"), SITE)
        self.assertEqual((call.op, call.then(None).body), ("account", {"aliases": []}))

    def test_simplelogin_options_say_random_aliases_only_and_custom_aliases_are_refused_saying_why(self):
        for version in ("v4", "v5"):
            call, _ = im.route_api(simplelogin_request("GET", "/api/%s/alias/options" % version), SITE)
            self.assertEqual(call.then(None).body, {"can_create": True, "suffixes": [], "prefix_suggestion": ""})
        call, _ = im.route_api(simplelogin_request("POST", "/api/v3/alias/custom/new",
                                                   {"alias_prefix": "me", "signed_suffix": "x"}), SITE)
        reply = call.then(None)         # told after the token is checked
        self.assertEqual(reply.status, 400)
        self.assertIn("random aliases only", reply.body["error"])
        call, _ = im.route_api(simplelogin_request("GET", "/api/v2/mailboxes"), SITE)
        self.assertEqual(call.op, "account")

    def test_addy_bulk_routes_and_restore_and_forget(self):
        for action, op in (("get", "get_handles"), ("activate", "update_handles"),
                           ("deactivate", "update_handles"), ("delete", "delete_handles"),
                           ("forget", "delete_handles")):
            call, _ = im.route_api(addy_request("POST", "/api/v1/aliases/%s/bulk" % action,
                                                {"ids": ["3", 4]}), SITE)
            self.assertEqual((call.op, call.fields["handle_ids"]), (op, [3, 4]), action)
        call, _ = im.route_api(addy_request("DELETE", "/api/v1/aliases/7/forget"), SITE)
        self.assertEqual((call.op, call.fields["handle_id"]), ("delete_handle", 7))
        for request in (addy_request("PATCH", "/api/v1/aliases/7/restore"),
                        addy_request("POST", "/api/v1/aliases/restore/bulk", {"ids": [7]})):
            reply = im.route_api(request, SITE)[0].then(None)
            self.assertEqual((reply.status, reply.body), (404, {"message": "No aliases found"}))

    def test_an_unknown_path_names_the_endpoints_there_are(self):
        reply, _ = im.route_api(addy_request("GET", "/api/v1/aliasez"), SITE)
        self.assertEqual(reply.status, 404)
        for endpoint in ("/api/v1/aliases", "/api/alias/random/new", "/api/v2/aliases"):
            self.assertIn(endpoint, reply.body["message"])


class ApiAliasShapeTest(unittest.TestCase):
    """A handle as addy.io and SimpleLogin show an alias."""

    def test_addy_alias_has_addys_fields_and_time_format_in_utc(self):
        alias = im.addy_alias(HANDLE, NOON_2026)
        expected = {"id": 7, "local_part": "k3x9q2m7w4t8z5r1", "extension": None,
                    "domain": "incognito.test", "email": "k3x9q2m7w4t8z5r1@incognito.test",
                    "active": True, "description": "shop", "emails_forwarded": 4,
                    "emails_blocked": 1, "emails_replied": 0, "emails_sent": 0, "recipients": [],
                    "last_forwarded": "2026-01-01 13:00:00", "created_at": "2026-01-01 12:00:00",
                    "updated_at": "2026-01-01 12:01:00", "deleted_at": None}
        self.assertEqual({k: alias[k] for k in expected}, expected)
        self.assertIs(im.addy_alias(HANDLE._replace(enabled=0), NOON_2026)["active"], False)
        self.assertIsNone(im.addy_alias(HANDLE._replace(last_received=None), NOON_2026)
                          ["last_forwarded"])
        json.dumps(alias)

    def test_simplelogin_alias_has_simplelogins_fields(self):
        alias = im.simplelogin_alias(HANDLE, NOON_2026)
        mailbox = {"id": 3, "email": "alice@example.org"}
        expected = {"alias": "k3x9q2m7w4t8z5r1@incognito.test", "id": 7,
                    "email": "k3x9q2m7w4t8z5r1@incognito.test", "enabled": True, "note": "shop",
                    "creation_date": "2026-01-01 12:00:00+00:00", "creation_timestamp": NOON_2026,
                    "nb_forward": 4, "nb_block": 1, "nb_reply": 0, "mailbox": mailbox,
                    "mailboxes": [mailbox]}
        self.assertEqual({k: alias[k] for k in expected}, expected)
        json.dumps(alias)


class ApiErrorTest(unittest.TestCase):
    """Errors as each dialect's clients read them: JSON, a message a person can act on."""

    def test_status_and_body_per_error_and_dialect(self):
        cases = ((im.Unauthorized("unknown secret token"), 401, 401),
                 (im.NotFound("no such alias"), 404, 404),
                 (im.RateLimited("rate limited: retry in 12 s", 12), 429, 429),
                 (im.BadRequest("the request body is not valid JSON"), 422, 400),
                 (im.PostfixError("postmap failed: exit 75"), 500, 500),
                 (im.StoreError("database is locked"), 500, 500))
        for error, addy_status, simplelogin_status in cases:
            addy = im.api_error(im.ADDY, error)
            self.assertEqual(addy.status, addy_status, error)
            self.assertEqual(set(addy.body) - {"errors"}, {"message"})
            self.assertGreater(len(addy.body["message"]), 5)
            simplelogin = im.api_error(im.SIMPLELOGIN, error)
            self.assertEqual(simplelogin.status, simplelogin_status, error)
            self.assertEqual(set(simplelogin.body), {"error"})
            self.assertEqual(simplelogin.body["error"], addy.body["message"])

    def test_addy_422_names_the_field_in_errors(self):
        reply = im.api_error(im.ADDY, im.BadRequest("label is too long"))
        self.assertEqual(reply.body["errors"], {"request": ["label is too long"]})
        call, _ = im.route_api(addy_request("POST", "/api/v1/aliases", {"domain": "x.org"}), SITE)
        reply = call.then(None)
        self.assertEqual(list(reply.body["errors"]), ["domain"])
        self.assertEqual(reply.body["errors"]["domain"], [reply.body["message"]])

    def test_429_carries_retry_after(self):
        for dialect in (im.ADDY, im.SIMPLELOGIN):
            reply = im.api_error(dialect, im.RateLimited("too many", 17))
            self.assertEqual(dict(reply.headers)["Retry-After"], "17")

    def test_500_says_nothing_was_changed(self):
        reply = im.api_error(im.ADDY, im.PostfixError("postmap: fatal: simulated failure"))
        self.assertIn("nothing was changed", reply.body["message"])
        self.assertIn("simulated failure", reply.body["message"])

    def test_no_token_is_ever_in_an_error(self):
        for dialect in (im.ADDY, im.SIMPLELOGIN):
            for error in (im.Unauthorized("unknown secret token " + TOKEN),
                          im.Unauthorized(TOKEN)):
                self.assertNotIn(TOKEN, json.dumps(im.api_error(dialect, error).body))


###############################################################################
# Fronts: shared pieces
###############################################################################

class ClientKeyTest(unittest.TestCase):
    """client_key: the client a per-client limit applies to."""

    def test_an_ipv4_address_is_its_own_client(self):
        self.assertEqual(im.client_key("203.0.113.5"), "203.0.113.5")
        self.assertNotEqual(im.client_key("203.0.113.5"), im.client_key("203.0.113.6"))

    def test_ipv6_addresses_are_grouped_by_their_64(self):
        key = im.client_key("2001:db8:1:2::1")
        self.assertEqual(key, "2001:db8:1:2::/64")
        for same in ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:DB8:1:2::ffff",
                     "2001:0db8:0001:0002:0000:0000:0000:0002"):
            self.assertEqual(im.client_key(same), key, same)
        for other in ("2001:db8:1:3::1", "2001:db8:2:2::1"):
            self.assertNotEqual(im.client_key(other), key, other)

    def test_an_ipv4_mapped_ipv6_address_is_its_ipv4_client(self):
        self.assertEqual(im.client_key("::ffff:203.0.113.5"), "203.0.113.5")
        self.assertNotEqual(im.client_key("::ffff:203.0.113.6"), "203.0.113.5")


class EvictionLogTest(unittest.TestCase):
    """Closing the least recently active Postfix connections is said once a minute, with how
    many times it happened since: 400 idle connections make one line, not 400."""

    def test_evictions_are_summarised_once_a_minute(self):
        clients = im._Clients("policy service", 2)
        with self.assertLogs(im.log, logging.WARNING) as logged:
            for _ in range(402):
                clients.add(mock.Mock())
        self.assertEqual(len(logged.output), 1, logged.output)
        self.assertEqual(len(clients), 2)
        later = time.monotonic() + 61
        with mock.patch.object(im.time, "monotonic", return_value=later), \
                self.assertLogs(im.log, logging.WARNING) as logged:
            clients.add(mock.Mock())
        self.assertIn("399 times more", logged.output[0])


class StreamClientCapsTest(HoldingTestCase):
    """Policy and socketmap clients: at most MAX_POSTFIX_CLIENTS per listener, a new one
    closing the least recently active; command-line clients: at most MAX_CONTROL_CLIENTS."""

    def test_idle_socketmap_connections_beyond_the_cap_close_the_least_recently_active(self):
        handle = new_handle(self.site, self.token)
        first = [self.socketmap() for _ in range(im.MAX_POSTFIX_CLIENTS)]
        self.assertEqual(socketmap_ask(first[-1], handle), b"OK alice@example.org")
        self.assertEqual(socketmap_ask(first[0], handle), b"OK alice@example.org")  # active again
        over = self.socketmap()                               # MAX_POSTFIX_CLIENTS + 1
        newest = self.socketmap()
        self.assertEqual(self.assert_quick("a new socketmap client", lambda: socketmap_ask(
            newest, handle)), b"OK alice@example.org")
        for sock in first[1:3]:
            self.assertTrue(closed_by_peer(sock), "the least recently active was kept")
        for sock in (first[0], first[3], first[-1], over):
            self.assertEqual(socketmap_ask(sock, handle), b"OK alice@example.org")

    def test_a_socketmap_client_that_never_reads_is_read_no_further_and_others_are_answered(self):
        handle = new_handle(self.site, self.token)
        greedy = self.socketmap()
        greedy.settimeout(3)
        request = im.netstring(("virtual %s" % handle).encode())
        sent = 0
        with self.assertRaises(socket.timeout):     # the daemon stopped reading it
            while sent < (64 << 20):
                greedy.sendall(request * 1000)
                sent += len(request) * 1000
        rss = rss_bytes(self.daemon.proc.pid)
        self.assertEqual(self.assert_quick("another socketmap client", lambda: socketmap_ask(
            self.socketmap(), handle)), b"OK alice@example.org")
        self.assertLess(rss, 128 << 20, "the daemon held what the client sent")
        greedy.settimeout(10)
        reply = im.netstring(b"OK alice@example.org")
        self.assertEqual(greedy.recv(len(reply)), reply, "the answers, in order, once it reads")

    def test_command_line_connections_beyond_the_cap_are_refused_and_others_answered_later(self):
        idle = [connect_unix(self.site.socket_path) for _ in range(im.MAX_CONTROL_CLIENTS)]
        for sock in idle:
            self.addCleanup(sock.close)
        with connect_unix(self.site.socket_path) as extra:
            extra.sendall(b'{"op": "status"}\n')
            reply = json.loads(extra.makefile("rb").readline())
        self.assertFalse(reply["ok"])
        self.assertIn("too many command-line connections", reply["message"])
        idle.pop().close()
        status = wait_until(lambda: self.try_status(), timeout=10)
        self.assertTrue(status, "the command line was not served once a connection closed")

    def try_status(self):
        try:
            return control(self.site, "status")
        except im.IncognitoMailError:
            return None


class IdleStreamClientsTest(HoldingTestCase):
    """Idle policy, socketmap and command-line connections are closed after their idle timeouts
    (POSTFIX_IDLE_TIMEOUT, CONTROL_IDLE_TIMEOUT; shortened here to 0.5 s)."""

    constants = {"POSTFIX_IDLE_TIMEOUT": 0.5, "CONTROL_IDLE_TIMEOUT": 0.5}

    def assert_closed_after_idle(self, sock, since):
        """``sock``, last active at ``since``, is closed by the daemon, not before 0.4 s."""
        sock.settimeout(10)
        self.assertTrue(closed_by_peer(sock), "an idle connection is still open after 10 s")
        self.assertGreater(time.monotonic() - since, 0.4)

    def test_idle_policy_and_socketmap_clients_are_closed_after_the_idle_timeout(self):
        handle = new_handle(self.site, self.token)
        policy, socketmap = self.policy(), self.socketmap()
        policy.sendall(policy_request(handle))
        self.assertEqual(read_policy_answer(policy), b"action=DUNNO\n\n")
        policy_since = time.monotonic()
        self.assertEqual(socketmap_ask(socketmap, handle), b"OK alice@example.org")
        socketmap_since = time.monotonic()
        self.assert_closed_after_idle(policy, policy_since)
        self.assert_closed_after_idle(socketmap, socketmap_since)

    def test_an_idle_command_line_connection_is_closed_after_the_idle_timeout(self):
        sock = connect_unix(self.site.socket_path)
        self.addCleanup(sock.close)
        self.assert_closed_after_idle(sock, time.monotonic())


###############################################################################
# Fronts: HTTP and WebSocket connections over asyncio
###############################################################################

class WebSocketEchoTest(LoopbackTestCase):
    async def test_handshake_then_text_and_binary_are_echoed(self):
        reader, writer = await self.open()
        self.assertIsNotNone(self.sockets[0].remote_address)
        writer.write(client_frame(1, 'héllo'.encode()) + client_frame(2, b'\x00\x01'))
        self.assertEqual(await read_frame(reader), (1, 'héllo'.encode()))
        self.assertEqual(await read_frame(reader), (2, b'\x00\x01'))

    async def test_bytes_sent_with_the_handshake_are_read_as_frames(self):
        reader, writer = await self.connect(upgrade_head() + client_frame(1, b'early'))
        await asyncio.wait_for(reader.readuntil(b'\r\n\r\n'), 5)
        self.assertEqual(await read_frame(reader), (1, b'early'))

    async def test_large_fragmented_message_is_echoed_whole(self):
        reader, writer = await self.open()
        payload = os.urandom(300000)
        writer.write(client_frame(2, payload[:100], fin=False) + client_frame(0, payload[100:]))
        self.assertEqual(await read_frame(reader), (2, payload))

    async def test_ping_gets_pong_with_the_same_payload(self):
        reader, writer = await self.open()
        writer.write(client_frame(9, b'are you there'))
        self.assertEqual(await read_frame(reader), (10, b'are you there'))

    async def test_many_sends_write_whole_frames_in_order(self):
        reader, writer = await self.open()
        messages = [bytes([i]) * 100000 for i in range(20)]
        self.assertEqual([self.sockets[0].send(m) for m in messages], [True] * len(messages))
        self.assertEqual([await read_frame(reader) for _ in messages], [(2, m) for m in messages])

    @server_options(idle_timeout=0.5, close_timeout=0.3)
    async def test_a_peer_that_reads_nothing_is_not_read_from_and_is_dropped(self):
        reader, writer = await self.open()
        writer.transport.pause_reading()
        for _ in range(40):                     # 4 MB of echoes the client never reads
            writer.write(client_frame(2, b'x' * 100000))
            await asyncio.sleep(0)
        await self.wait_closed(seconds=10)      # dropped: idle timeout, then close timeout


class WebSocketClosingTest(LoopbackTestCase):
    async def test_close_frame_is_echoed_then_the_server_closes_tcp(self):
        reader, writer = await self.open()
        writer.write(client_frame(8, struct.pack('!H', 1001) + b'bye'))
        self.assertEqual(await read_frame(reader), (8, struct.pack('!H', 1001)))
        await self.wait_for_eof(reader)
        await self.wait_closed()

    async def test_empty_close_is_answered_with_1000(self):
        reader, writer = await self.open()
        writer.write(client_frame(8))
        self.assertEqual(await read_frame(reader), (8, struct.pack('!H', 1000)))
        await self.wait_for_eof(reader)

    async def test_protocol_error_sends_its_close_code_then_hangs_up(self):
        reader, writer = await self.open()
        writer.write(client_frame(1, b'ok') + client_frame(1, b'x', masked=False))
        self.assertEqual(await read_frame(reader), (1, b'ok'))
        opcode, payload = await read_frame(reader)
        self.assertEqual((opcode, payload[:2]), (8, struct.pack('!H', 1002)))
        await self.wait_for_eof(reader)   # the server half-closed: a client then hangs up
        writer.close()
        await self.wait_closed()

    async def test_oversize_message_is_refused_with_1009_from_its_header_alone(self):
        reader, writer = await self.open()
        writer.write(client_frame(2, length=2 << 20)[:14])   # header + mask of a 2 MiB frame
        opcode, payload = await read_frame(reader)
        self.assertEqual((opcode, payload[:2]), (8, struct.pack('!H', 1009)))

    async def test_server_close_then_the_peers_answer_ends_the_connection(self):
        reader, writer = await self.open()
        self.sockets[0].close(4000, 'shutting down')
        self.assertEqual(await read_frame(reader), (8, struct.pack('!H', 4000) + b'shutting down'))
        self.assertFalse(self.sockets[0].send('too late'))
        writer.write(client_frame(1, b'late message is discarded') + client_frame(8, struct.pack('!H', 4000)))
        started = asyncio.get_running_loop().time()
        await self.wait_for_eof(reader)
        self.assertLess(asyncio.get_running_loop().time() - started, 0.5)   # well before close_timeout
        await self.wait_closed()

    @server_options(close_timeout=0.3)
    async def test_server_close_gives_up_on_a_silent_peer_after_close_timeout(self):
        reader, writer = await self.open()
        started = asyncio.get_running_loop().time()
        self.sockets[0].close()
        self.assertEqual(await read_frame(reader), (8, struct.pack('!H', 1000)))
        await self.wait_for_end(reader)     # cut off: a reset
        self.assertLess(asyncio.get_running_loop().time() - started, 2)
        await self.wait_closed()

    async def test_peer_vanishing_ends_the_connection_and_send_returns_false(self):
        reader, writer = await self.open()
        writer.transport.abort()
        await self.wait_closed()
        self.assertFalse(self.sockets[0].send(b'anyone?'))


class WebSocketIdleTimeoutTest(LoopbackTestCase):
    options = {'idle_timeout': 0.2}

    async def test_idle_connection_is_closed_with_1001(self):
        reader, writer = await self.open()
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        self.assertEqual((opcode, payload[:2]), (8, struct.pack('!H', 1001)))
        writer.write(client_frame(8, struct.pack('!H', 1001)))
        await self.wait_for_eof(reader)
        await self.wait_closed()

    async def test_pings_keep_the_connection_alive(self):
        reader, writer = await self.open()
        for _ in range(4):
            await asyncio.sleep(0.1)
            writer.write(client_frame(9))
            self.assertEqual(await read_frame(reader), (10, b''))
        self.assertEqual(self.server_results, [])


class AcceptWebSocketHandshakeTest(LoopbackTestCase):
    options = {'max_header_bytes': 300, 'handshake_timeout': 0.3}

    async def response(self, head):
        reader, _ = await self.connect(head)
        return await asyncio.wait_for(reader.read(), 5)   # the server closes after answering

    async def test_refused_handshakes_get_their_status_and_are_closed(self):
        cases = [(upgrade_head('/nope'), b'404'), (upgrade_head(Upgrade=None), b'426'),
                 (upgrade_head(Sec_WebSocket_Key='short'), b'400'),
                 (upgrade_head(Sec_WebSocket_Version='8'), b'426'),
                 (b'garbage\r\n\r\n', b'400')]
        for head, status in cases:
            with self.subTest(status=status):
                response = await self.response(head)
                self.assertTrue(response.startswith(b'HTTP/1.1 ' + status + b' '), response)
                self.assertIn(b'Connection: close', response)
        self.assertEqual(self.sockets, [])

    async def test_too_large_header_section_is_431(self):
        response = await self.response(upgrade_head(X_Padding='p' * 400))
        self.assertTrue(response.startswith(b'HTTP/1.1 431 '), response)

    async def test_slow_handshake_is_closed_without_an_answer(self):
        reader, writer = await self.connect(upgrade_head()[:20])
        started = asyncio.get_running_loop().time()
        await self.wait_for_end(reader)
        self.assertLess(asyncio.get_running_loop().time() - started, 2)
        self.assertEqual(self.sockets, [])

    async def test_peer_hanging_up_mid_handshake_is_harmless(self):
        reader, writer = await self.connect(upgrade_head()[:20])
        writer.close()
        await self.wait_for(self.ended, "the server's connection did not end")
        self.assertEqual(self.sockets, [])
        reader, writer = await self.open()      # and the server goes on serving


class HttpConnectionDeadlineTest(unittest.IsolatedAsyncioTestCase):
    """A slow or silent HTTP client is dropped at the request deadline, never held; an
    answer that takes longer than the deadline is still given."""

    deadline = 0.5

    async def asyncSetUp(self):
        self.ended = asyncio.Event()
        self.answer_delay = 0.0
        self.writers = []
        test = self
        loop = asyncio.get_running_loop()

        class Connection(im.WebSocketConnection):
            def request_received(self, request):
                future = loop.create_future()
                reply = (im.http_response(200, [("Content-Type", "application/json")],
                                          b'{"path": "%s"}' % request.path.encode()), False)
                loop.call_later(test.answer_delay, future.set_result, reply)
                return future

            def closed(self):
                test.ended.set()

        self.server = await loop.create_server(
            lambda: Connection(path="/ws", handshake_timeout=self.deadline), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def asyncTearDown(self):
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def connect(self):
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)
        return reader, writer

    async def assert_dropped(self, reader, started, low=None):
        """The server ends the connection (EOF or reset) by the deadline, saying nothing."""
        try:
            data = await asyncio.wait_for(reader.read(), self.deadline + 3)
        except ConnectionResetError:
            data = b""
        self.assertEqual(data, b"")
        await asyncio.wait_for(self.ended.wait(), 2)
        elapsed = asyncio.get_running_loop().time() - started
        self.assertGreaterEqual(elapsed, self.deadline * 0.9 if low is None else low)
        self.assertLess(elapsed, self.deadline + 2)

    async def test_body_shorter_than_its_content_length_then_silence_is_dropped(self):
        reader, writer = await self.connect()
        started = asyncio.get_running_loop().time()
        writer.write(b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                     + b"0123456789")
        await self.assert_dropped(reader, started)

    async def test_silent_client_is_dropped(self):
        reader, _ = await self.connect()
        await self.assert_dropped(reader, asyncio.get_running_loop().time())

    async def test_head_sent_a_byte_at_a_time_is_dropped_at_the_deadline_though_bytes_keep_coming(self):
        reader, writer = await self.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        data = b"GET /api/user_info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
        for byte in data:
            if self.ended.is_set() or loop.time() - started > self.deadline + 3:
                break
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.02)   # a slow client: a byte every 20 ms
        self.assertTrue(self.ended.is_set(), "a client trickling its head was held")
        await self.assert_dropped(reader, started)

    async def test_idle_keep_alive_connection_is_dropped_a_deadline_after_its_answer(self):
        reader, writer = await self.connect()
        writer.write(b"GET /api/one HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        answered = asyncio.get_running_loop().time()
        body = b'{"path": "/api/one"}'
        self.assertEqual(await asyncio.wait_for(reader.readexactly(len(body)), 2), body)
        await self.assert_dropped(reader, answered, low=self.deadline * 0.8)

    async def test_answer_slower_than_the_deadline_is_still_given_and_the_connection_kept(self):
        self.answer_delay = self.deadline * 2
        reader, writer = await self.connect()
        writer.write(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.deadline * 2 + 3)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(await reader.readexactly(21), b'{"path": "/api/slow"}')
        self.answer_delay = 0.0
        writer.write(b"GET /api/next HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertEqual(await reader.readexactly(21), b'{"path": "/api/next"}')


class PipeliningTest(HoldingTestCase):
    """Pipelined requests from peers that read nothing: parsing stops at MAX_PENDING messages
    awaiting answers and while replies wait; memory stays bounded and others are served. (The
    account's work budget is lifted: this is about what the connections hold.)"""

    constants = {"OPERATIONS_PER_SECOND": 1000000}

    def prepare(self):
        self.rich = seed_account(self.site, numbered_handles(ATTACK_HANDLES), "rich@example.org")

    def test_ten_connections_pipelining_list_handles_without_reading_hold_bounded_memory(self):
        before = rss_bytes(self.daemon.pid)
        limit = before + ATTACK_CONNECTIONS * MAX_GROWTH_PER_CONNECTION
        pipelining_attack(self, self.port, self.rich)
        after = settled_rss(self.daemon.pid, limit)
        self.assertIsNotNone(after, "the daemon grew past %d MB (from %d MB) or was still busy "
                             "after 15 s" % (limit >> 20, before >> 20))
        self.assert_others_answered()
        self.assertLess(rss_bytes(self.daemon.pid), limit)
        self.assertNotIn("Traceback", self.daemon.log())

    def test_requests_held_back_at_max_pending_are_all_answered_once_read(self):
        client = self.client()
        count = 3 * im.MAX_PENDING + 5
        client.send_raw(b"".join(json_frame(id=number, op="account", token=self.token)
                                 for number in range(count)))
        replies = [client.recv_json() for _ in range(count)]
        self.assertEqual(sorted(r["id"] for r in replies), list(range(count)))
        self.assertTrue(all(r["ok"] for r in replies), replies)


class UnreadRepliesTest(HoldingTestCase):
    """A peer that stopped reading with more than MAX_UNSENT_BYTES of replies unread is
    dropped with a reset (shortened here: 256 KiB), long before any idle timeout."""

    constants = {"MAX_UNSENT_BYTES": 256 * 1024}
    limits = {"IdleTimeout": "300"}

    def prepare(self):
        # a page of these is ~60 KB: MAX_PENDING pages are well past the shortened limit
        self.rich = seed_account(self.site, numbered_handles(ATTACK_HANDLES, label="x" * 200), "rich@example.org")

    def test_a_peer_leaving_more_than_max_unsent_bytes_unread_is_dropped_with_a_reset(self):
        client = WsClient(self.port, rcvbuf=4096)
        self.addCleanup(client.sock.close)
        server_end, client_end = ("127.0.0.1", self.port), client.sock.getsockname()
        self.assertEqual(tcp_state(server_end, client_end), "01")
        client.sock.sendall(list_handles_frame(self.rich) * 100)
        # A reset leaves nothing behind; a plain close would linger in FIN_WAIT1 with the
        # replies the peer never reads.
        self.assertTrue(wait_until(lambda: tcp_state(server_end, client_end) is None, timeout=10),
                        "still %s after 10 s" % tcp_state(server_end, client_end))
        with self.assertRaises(ConnectionResetError):
            while client.sock.recv(65536):
                pass
        self.assert_others_answered()


###############################################################################
# Fronts: the web listener (the add-on's WebSocket, the HTTP API, the owner page)
###############################################################################

class WebSocketListeningTest(WebSocketDaemonTestCase):

    general = {"AllowedOrigins": "moz-extension://abc-123, chrome-extension://xyz"}

    def test_other_paths_get_404(self):
        self.assertEqual(self.client(path="/elsewhere", origin="moz-extension://abc-123").status, 404)

    def test_plain_get_to_listen_path_gets_426_naming_websocket(self):
        reply = self.raw_http(b"GET /incognitomail HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith("HTTP/1.1 426"), reply)
        self.assertRegex(reply, r"(?i)\r\nUpgrade: websocket\r\n")

    def test_malformed_key_gets_400(self):
        reply = self.raw_http(b"GET /incognitomail HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.assertTrue(reply.startswith("HTTP/1.1 400"), reply)

    def test_wrong_version_gets_426_with_version_13(self):
        key = base64.b64encode(os.urandom(16))
        reply = self.raw_http(b"GET /incognitomail HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                              b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 8\r\n\r\n")
        self.assertTrue(reply.startswith("HTTP/1.1 426"), reply)
        self.assertIn("Sec-WebSocket-Version: 13", reply)

    def test_post_gets_400(self):
        reply = self.raw_http(b"POST /incognitomail HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(reply.startswith("HTTP/1.1 400"), reply)

    def test_huge_header_section_is_cut_off(self):
        reply = self.raw_http(b"GET /incognitomail HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 100000 + b"\r\n\r\n")
        self.assertRegex(reply, r"^HTTP/1.1 (431|400)")

    def test_origin_not_allowed_gets_403(self):
        self.assertEqual(self.client(origin="https://evil.example").status, 403)

    def test_allowed_extension_origin_connects(self):
        client = self.client(origin="moz-extension://abc-123")
        self.assertEqual(client.status, 101)
        client.send("new handle " + self.token)
        self.assertTrue(client.recv().endswith("@incognito.test"))


class WebSocketTlsTest(unittest.TestCase):

    def setUp(self):
        require_postfix()
        require_openssl()
        self.folder = make_folder(self)
        self.port = free_port()
        self.cert, self.key = make_certificate(self.folder)

    def site(self, cert, key):
        return Site(self.folder, sections={"General": {"ListenAddress": "127.0.0.1:%d" % self.port,
                                                       "TLSCertFile": cert, "TLSKeyFile": key}})

    def test_wss_serves_the_original_add_on_protocol(self):
        site = self.site(self.cert, self.key)
        start_daemon(self, site)
        token = new_account(site)
        context = ssl.create_default_context(cafile=self.cert)
        client = WsClient(self.port, tls_context=context)
        self.addCleanup(client.close)
        client.send("new handle " + token)
        address = client.recv()
        self.assertTrue(address.endswith("@incognito.test"))
        self.assertEqual(site.query(address), "alice@example.org")

    def test_plain_ws_is_refused_when_tls_is_on_saying_the_port_speaks_wss(self):
        site = self.site(self.cert, self.key)
        start_daemon(self, site)
        client = WsClient(self.port, timeout=3)
        self.addCleanup(client.sock.close)
        self.assertEqual(client.status, 400)
        body = client.buffer
        for chunk in iter(lambda: client.sock.recv(4096), b""):
            body += chunk
        self.assertIn(b"wss://", body)

    def test_mismatched_key_fails_at_start_naming_both_files(self):
        _, other_key = make_certificate(self.folder, "other")
        site = self.site(self.cert, other_key)
        done = cli(site)
        self.assertEqual(done.returncode, 1)
        self.assertIn("TLSCertFile", done.stderr)
        self.assertIn(other_key, done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_unreadable_certificate_fails_at_start(self):
        site = self.site(os.path.join(self.folder, "missing.pem"), self.key)
        done = cli(site)
        self.assertEqual(done.returncode, 1)
        self.assertIn("missing.pem", done.stderr)
        self.assertNotIn("Traceback", done.stderr)


class LegacyAddOnProtocolTest(WebSocketDaemonTestCase):
    """The published add-on: send ``new handle <secret>``, read one text message."""

    def test_new_handle_returns_a_routable_address(self):
        client = self.client()
        client.send("new handle " + self.token)
        address = client.recv()
        self.assertRegex(address, r"^[a-z0-9]{16}@incognito\.test$")
        self.assertEqual(self.site.query(address), "alice@example.org")

    def test_a_new_connection_per_handle_works_again_and_again(self):
        addresses = set()
        for _ in range(5):
            client = WsClient(self.port)
            client.send("new handle " + self.token)
            addresses.add(client.recv())
            client.close()
        self.assertEqual(len(addresses), 5)

    def test_unknown_secret_gets_an_error_message(self):
        client = self.client()
        client.send("new handle not-a-real-token")
        reply = client.recv()
        self.assertTrue(reply.startswith("error"), reply)
        self.assertNotIn("not-a-real-token", reply)

    def test_account_commands_are_refused_over_the_websocket(self):
        client = self.client()
        for command in ("new account bob@example.org", "delete account " + self.token, "list " + self.token):
            client.send(command)
            self.assertTrue(client.recv().startswith("error"), command)
        self.assertEqual(cli(self.site, "list", self.token).stdout, "")


class JsonProtocolTest(WebSocketDaemonTestCase):

    def test_new_handle_with_label_returns_the_handle_object(self):
        reply = self.client().request(id=1, op="new_handle", token=self.token, label="shop.example.com")
        self.assertEqual(reply["id"], 1)
        self.assertTrue(reply["ok"])
        handle = reply["handle"]
        self.assertEqual(set(handle), {"address", "label", "enabled", "created", "received", "last_received", "id",
                                       "state", "expires", "max_messages", "blocked", "last_blocked",
                                       "bounced", "last_bounced", "sent", "last_sent", "refuse_as_unknown"})
        self.assertEqual(handle["label"], "shop.example.com")
        self.assertTrue(handle["enabled"])
        self.assertEqual(handle["received"], 0)
        self.assertIsNone(handle["last_received"])
        self.assertRegex(handle["created"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_new_handle_in_another_served_domain(self):
        reply = self.client().request(id="a", op="new_handle", token=self.token, domain="other.test")
        self.assertTrue(reply["handle"]["address"].endswith("@other.test"))

    def test_list_handles_newest_first(self):
        client = self.client()
        first = client.request(id=1, op="new_handle", token=self.token)["handle"]["address"]
        second = client.request(id=2, op="new_handle", token=self.token)["handle"]["address"]
        handles = client.request(id=3, op="list_handles", token=self.token)["handles"]
        self.assertEqual([h["address"] for h in handles], [second, first])

    def test_update_handle_disables_and_relabels(self):
        client = self.client()
        address = client.request(id=1, op="new_handle", token=self.token)["handle"]["address"]
        reply = client.request(id=2, op="update_handle", token=self.token, address=address,
                               enabled=False, label="spam now")
        self.assertEqual((reply["handle"]["enabled"], reply["handle"]["label"]), (False, "spam now"))
        self.assertIsNone(self.site.query(address))
        reply = client.request(id=3, op="update_handle", token=self.token, address=address, enabled=True)
        self.assertTrue(reply["handle"]["enabled"])
        self.assertEqual(reply["handle"]["label"], "spam now")
        self.assertEqual(self.site.query(address), "alice@example.org")

    def test_delete_handle_returns_empty_success(self):
        client = self.client()
        address = client.request(id=1, op="new_handle", token=self.token)["handle"]["address"]
        self.assertEqual(client.request(id=2, op="delete_handle", token=self.token, address=address),
                         {"id": 2, "ok": True})
        self.assertIsNone(self.site.query(address))

    def test_account_describes_the_account(self):
        client = self.client()
        client.request(id=1, op="new_handle", token=self.token)
        account = client.request(id=2, op="account", token=self.token)["account"]
        self.assertEqual(account["address"], "alice@example.org")
        self.assertEqual(account["domains"], ["incognito.test", "other.test"])
        self.assertEqual(account["handles"], 1)
        self.assertRegex(account["created"], r"Z$")

    def test_rotate_token_kills_the_old_token_at_once(self):
        client = self.client()
        new = client.request(id=1, op="rotate_token", token=self.token)["token"]
        self.assertGreaterEqual(len(new), 43)
        self.assertEqual(client.request(id=2, op="account", token=self.token)["error"], "unauthorized")
        self.assertTrue(client.request(id=3, op="account", token=new)["ok"])

    def test_error_codes(self):
        client = self.client()
        other = new_account(self.site, "bob@example.org")
        bobs = client.request(id=0, op="new_handle", token=other)["handle"]["address"]
        cases = [
            ({"id": 1, "op": "no_such_op", "token": self.token}, "bad_request"),
            ({"id": 2, "op": "new_handle"}, "bad_request"),
            ({"id": 3, "op": "new_handle", "token": self.token, "label": 5}, "bad_request"),
            ({"id": 4, "op": "new_handle", "token": self.token, "domain": "elsewhere.test"}, "bad_request"),
            ({"id": 5, "op": "new_account", "address": "x@example.org"}, "bad_request"),
            ({"id": 6, "op": "list_handles", "token": "wrong"}, "unauthorized"),
            ({"id": 7, "op": "delete_handle", "token": self.token, "address": bobs}, "not_found"),
            ({"id": 8, "op": "update_handle", "token": self.token, "address": "nosuch", "enabled": True}, "not_found"),
            ({"id": 9, "op": "update_handle", "token": self.token, "address": bobs, "enabled": "no"}, "bad_request"),
        ]
        for request, code in cases:
            reply = client.request(**request)
            self.assertEqual((reply["id"], reply["ok"], reply["error"]), (request["id"], False, code), reply)
            self.assertTrue(reply["message"])
        self.assertEqual(self.site.query(bobs), "bob@example.org")

    def test_malformed_json_is_bad_request_and_the_connection_stays_usable(self):
        client = self.client()
        client.send("{not json")
        reply = client.recv_json()
        self.assertEqual((reply["id"], reply["error"]), (None, "bad_request"))
        self.assertTrue(client.request(id=1, op="account", token=self.token)["ok"])

    def test_several_requests_in_flight_are_answered_by_id(self):
        client = self.client()
        for number in range(8):
            client.send_json(id=number, op="new_handle", token=self.token)
        replies = [client.recv_json() for _ in range(8)]
        self.assertEqual(sorted(r["id"] for r in replies), list(range(8)))
        self.assertEqual(len({r["handle"]["address"] for r in replies}), 8)

    def test_binary_message_is_refused_with_bad_request(self):
        client = self.client()
        client.send_raw(client_frame(0x2, b"\x00\x01"))
        self.assertEqual(client.recv_json()["error"], "bad_request")


class WebSocketRobustnessTest(WebSocketDaemonTestCase):

    limits = {"MaxMessageSize": "2048", "IdleTimeout": "1"}

    def test_unmasked_frame_closes_with_1002_and_others_are_served(self):
        bad = self.client()
        bad.send_raw(b"\x81\x05hello")
        self.assertEqual(bad.close_code(), 1002)
        good = self.client()
        good.send("new handle " + self.token)
        self.assertTrue(good.recv().endswith("@incognito.test"))

    def test_message_above_max_message_size_closes_with_1009(self):
        client = self.client()
        client.send_raw(client_frame(0x1, b"x" * 4096))
        self.assertEqual(client.close_code(), 1009)

    def test_invalid_utf8_closes_with_1007(self):
        client = self.client()
        client.send_raw(client_frame(0x1, b"new handle \xff"))
        self.assertEqual(client.close_code(), 1007)

    def test_deeply_nested_json_is_a_bad_request_without_a_traceback(self):
        client = self.client()
        client.send("{\"a\":" + "[" * 1500)
        self.assertEqual(client.recv_json()["error"], "bad_request")
        self.assertTrue(client.request(id=1, op="account", token=self.token)["ok"])
        self.assertNotIn("Traceback", self.daemon.log())

    def test_lone_surrogates_in_json_strings_are_bad_requests(self):
        client = self.client()
        for request in ('{"id": 1, "op": "account", "token": "abc\\ud800"}',
                        '{"id": 2, "op": "new_handle", "token": "%s", "label": "x\\udc00"}' % self.token):
            client.send(request)
            self.assertEqual(client.recv_json()["error"], "bad_request")
        self.assertNotIn("Traceback", self.daemon.log())

    def test_a_client_that_stops_reading_is_dropped_and_does_not_delay_a_stop(self):
        client = self.client()
        server_end, client_end = ("127.0.0.1", self.port), client.sock.getsockname()
        self.assertEqual(tcp_state(server_end, client_end), "01")
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for number in range(40):
            client.send_json(id=number, op="new_handle", token=self.token, label="x" * 150)
        for number in range(300):           # replies, never read
            client.send_json(id=number, op="list_handles", token=self.token)
        # Dropped after the idle timeout (1 s) and the close timeout of the close frame it does
        # not read (3 s): the server's end of the connection is closed.
        self.assertTrue(wait_until(lambda: tcp_state(server_end, client_end) != "01", timeout=10),
                        "a client that reads nothing is still connected after 10 s")
        started = time.monotonic()
        self.assertEqual(self.daemon.stop(), 0)
        self.assertLess(time.monotonic() - started, 8)

    def test_ping_gets_pong(self):
        client = self.client()
        client.send_raw(client_frame(0x9, b"are you there"))
        self.assertEqual(client.recv_frame(), (0xA, b"are you there"))

    def test_idle_connection_is_closed(self):
        client = self.client()
        started = time.monotonic()
        self.assertIn(client.close_code(), (1000, 1001))
        self.assertLess(time.monotonic() - started, 5)

    def test_garbage_instead_of_a_handshake_gets_400(self):
        reply = self.raw_http(b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")
        self.assertTrue(reply.startswith("HTTP/1.1 400"), reply)
        self.assertEqual(self.client().status, 101)


class RateLimitTest(WebSocketDaemonTestCase):

    limits = {"HandlesPerMinutePerClient": "3", "HandlesPerMinutePerAccount": "5",
              "FailedTokensPerMinutePerClient": "2", "MaxConnectionsPerClient": "4", "MaxConnections": "6"}

    def new_handle(self, client, token=None):
        return client.request(id=1, op="new_handle", token=token or self.token)

    def test_client_bucket_empties_with_rate_limited_and_retry_after(self):
        client = self.client(source="127.0.0.2")
        for _ in range(3):
            self.assertTrue(self.new_handle(client)["ok"])
        reply = self.new_handle(client)
        self.assertEqual(reply["error"], "rate_limited")
        self.assertGreaterEqual(reply["retry_after"], 1)

    def test_legacy_protocol_says_error_rate_limited(self):
        client = self.client(source="127.0.0.2")
        for _ in range(3):
            client.send("new handle " + self.token)
            self.assertFalse(client.recv().startswith("error"))
        client.send("new handle " + self.token)
        self.assertTrue(client.recv().startswith("error rate limited"))

    def test_each_source_address_is_its_own_client(self):
        first, second = self.client(source="127.0.0.2"), self.client(source="127.0.0.3")
        for _ in range(3):
            self.assertTrue(self.new_handle(first)["ok"])
        self.assertEqual(self.new_handle(first)["error"], "rate_limited")
        self.assertTrue(self.new_handle(second)["ok"])

    def test_account_bucket_limits_across_clients(self):
        clients = [self.client(source="127.0.0.%d" % n) for n in (2, 3)]
        results = [self.new_handle(clients[i % 2])["ok"] for i in range(6)]
        self.assertEqual(results, [True] * 5 + [False])

    def test_failed_tokens_slow_a_client_down(self):
        client = self.client(source="127.0.0.4")
        for _ in range(2):
            self.assertEqual(self.new_handle(client, "wrong")["error"], "unauthorized")
        self.assertEqual(client.request(id=2, op="account", token=self.token)["error"], "rate_limited")
        other = self.client(source="127.0.0.5")
        self.assertTrue(other.request(id=3, op="account", token=self.token)["ok"])

    def test_pipelined_wrong_tokens_meet_the_limit_one_by_one(self):
        client = self.client(source="127.0.0.8")
        for number in range(16):
            client.send_json(id=number, op="account", token="wrong-%d" % number)
        errors = [client.recv_json()["error"] for _ in range(16)]
        self.assertLessEqual(errors.count("unauthorized"), 3, errors)
        self.assertEqual(errors.count("unauthorized") + errors.count("rate_limited"), 16)

    def test_connections_per_client_are_capped(self):
        held = [self.client(source="127.0.0.6") for _ in range(4)]
        self.assertTrue(all(c.status == 101 for c in held))
        self.assertEqual(self.client(source="127.0.0.6").status, 503)
        self.assertEqual(self.client(source="127.0.0.7").status, 101)

    def test_connections_in_total_are_capped(self):
        held = [self.client(source="127.0.0.%d" % (10 + n)) for n in range(6)]
        self.assertTrue(all(c.status == 101 for c in held))
        self.assertEqual(self.client(source="127.0.0.30").status, 503)

    def test_command_line_has_no_rate_limit(self):
        for _ in range(8):
            self.assertEqual(cli(self.site, "new", "handle", self.token).returncode, 0)


class RateLimitsOffTest(WebSocketDaemonTestCase):

    limits = {"HandlesPerMinutePerClient": "0", "HandlesPerMinutePerAccount": "0"}

    def test_zero_turns_the_limits_off(self):
        client = self.client()
        for number in range(40):
            self.assertTrue(client.request(id=number, op="new_handle", token=self.token)["ok"])


_BROWSER_PAGE = """<html><body><script>
const url = 'ws://127.0.0.1:%(port)d/incognitomail';
const legacy = new WebSocket(url);
legacy.onopen = () => legacy.send('new handle %(token)s');
legacy.onmessage = (e) => {
  const json = new WebSocket(url);
  json.onopen = () => json.send(JSON.stringify({id: 1, op: 'new_handle', token: '%(token)s',
                                                label: 'browser saw ' + e.data}));
  json.onmessage = () => { legacy.close(); json.close(1000); };
};
</script></body></html>
"""


class RealBrowserTest(unittest.TestCase):
    """A real browser's WebSocket (headless Chromium) speaks both protocols with the daemon."""

    def test_chromium_makes_a_handle_with_each_protocol(self):
        require_chromium()
        require_postfix()
        port = free_port()
        site = make_site(self, sections={"General": {"ListenAddress": "127.0.0.1:%d" % port}})
        start_daemon(self, site)
        token = new_account(site)
        page = os.path.join(site.folder, "page.html")
        with open(page, "w") as f:
            f.write(_BROWSER_PAGE % {"port": port, "token": token})
        open_in_chromium(self, "file://" + page)
        found = wait_until(lambda: len(listed(self, site, token)) == 2, timeout=30, interval=0.2)
        self.assertTrue(found, "the browser did not make two handles")
        labelled, legacy = listed(self, site, token).values()
        self.assertEqual(labelled["label"], "browser saw " + legacy["address"])
        self.assertEqual(site.query(legacy["address"]), "alice@example.org")


class HttpKeepAliveTest(HttpApiTestCase):
    """HTTP/1.1 on the WebSocket listener: keep-alive, HEAD, 405, JSON 404, never a redirect."""

    def test_two_requests_on_one_connection_are_answered_in_order(self):
        client = self.http()
        first = client.request("POST", "/api/v1/aliases",
                               bitwarden_headers(addy_auth(self.token)),
                               {"domain": "incognito.test", "description": "first"})
        second = client.request("GET", "/api/v1/aliases", bitwarden_headers(addy_auth(self.token)))
        self.assertEqual((first.status, second.status), (201, 200))
        self.assertEqual([a["id"] for a in second.json()["data"]], [first.json()["data"]["id"]])

    def test_pipelined_requests_sent_together_are_answered_in_order(self):
        client = self.http()
        client.send_raw(b"".join(
            request_bytes("POST", "/api/alias/random/new?hostname=site%d.example" % n,
                          bitwarden_headers(simplelogin_auth(self.token)), b"", client.host)
            for n in range(3)) + request_bytes("GET", "/api/v2/aliases?page_id=0",
                                               simplelogin_auth(self.token), None, client.host))
        made = [self.check_reply(client.reply()).json() for _ in range(3)]
        self.assertEqual([a["note"] for a in made], ["site0.example", "site1.example", "site2.example"])
        listed = self.check_reply(client.reply()).json()["aliases"]
        self.assertEqual([a["id"] for a in listed], [a["id"] for a in reversed(made)])

    def test_connection_close_and_http_1_0_close_after_the_answer(self):
        client = self.http()
        reply = client.request("GET", "/api/user_info",
                               simplelogin_auth(self.token) + [("Connection", "close")])
        self.assertEqual(reply.status, 200)
        self.assertTrue(client.closed_by_server())
        client = self.http()
        client.send_raw(b"GET /api/mailboxes HTTP/1.0\r\nAuthentication: " + self.token.encode()
                        + b"\r\n\r\n")
        self.assertEqual(client.reply().status, 200)
        self.assertTrue(client.closed_by_server())

    def test_head_gives_the_length_of_the_body_it_leaves_out(self):
        client = self.http()
        got = client.request("GET", "/api/v1/domain-options", addy_auth(self.token))
        head = client.request("HEAD", "/api/v1/domain-options", addy_auth(self.token))
        self.assertEqual(head.status, 200)
        self.assertEqual(head.headers["content-length"], str(len(got.body)))
        after = client.request("GET", "/api/v1/domain-options", addy_auth(self.token))
        self.assertEqual(after.body, got.body)      # nothing of the HEAD's body was sent
        self.assertEqual(client.request("HEAD", "/nothing/here").status, 404)
        self.assertEqual(client.request("GET", "/api/user_info", simplelogin_auth(self.token)).status,
                         200)

    def test_wrong_method_is_405_with_allow(self):
        reply = self.addy("PUT", "/api/v1/aliases", {"domain": "incognito.test"})
        self.assert_error(reply, 405, im.ADDY)
        self.assertEqual(set(reply.headers["allow"].split(", ")), {"GET", "HEAD", "POST", "OPTIONS"})
        reply = self.simplelogin("GET", "/api/alias/random/new")
        self.assert_error(reply, 405, im.SIMPLELOGIN)
        self.assertIn("POST", reply.headers["allow"])

    def test_unknown_paths_get_a_json_404_and_nothing_answers_with_a_redirect(self):
        for target in ("/api/v1/nothing", "/api", "/api/", "/api/v1", "/api/v1/aliases/7/x",
                       "/favicon.ico", "/api/alias/random/new/x"):
            for method in ("GET", "POST"):
                reply = self.addy(method, target, {"domain": "incognito.test"})
                self.assertEqual(reply.status, 404, (method, target, reply))
                self.assertIsInstance(reply.json()["message"], str)
        self.assertEqual(self.listed(), [])


class BitwardenForwarderTest(HttpApiTestCase):
    """Requests shaped exactly as Bitwarden's forwarders send them make routable handles."""

    def assert_routable_and_listed(self, address, handle_id, label):
        self.assertEqual(self.site.query(address), "alice@example.org")
        [listed] = [h for h in self.listed() if h["address"] == address]
        self.assertEqual((listed["id"], listed["label"]), (handle_id, label))

    def test_addy_forwarder_gets_201_and_a_handle_in_the_map_and_in_list_json(self):
        for xhr in (False, True):
            reply = self.addy("POST", "/api/v1/aliases",
                              {"domain": "incognito.test", "description": BITWARDEN_NOTE}, xhr=xhr)
            self.assertEqual(reply.status, 201, reply)
            data = reply.json()["data"]
            self.assertEqual(data["email"], "%s@%s" % (data["local_part"], data["domain"]))
            self.assertEqual(data["domain"], "incognito.test")
            self.assertEqual((data["description"], data["active"], data["extension"],
                              data["deleted_at"], data["recipients"], data["emails_replied"],
                              data["emails_sent"], data["emails_forwarded"], data["emails_blocked"],
                              data["last_forwarded"]),
                             (BITWARDEN_NOTE, True, None, None, [], 0, 0, 0, 0, None))
            self.assertIsInstance(data["id"], int)
            self.assertLess(abs(from_addy_time(data["created_at"]) - time.time()), 120)
            self.assertLess(abs(from_addy_time(data["updated_at"]) - time.time()), 120)
            self.assert_routable_and_listed(data["email"], data["id"], BITWARDEN_NOTE)

    def test_simplelogin_forwarder_gets_201_and_a_handle_in_the_map_and_in_list_json(self):
        for xhr in (False, True):
            reply = self.simplelogin("POST", "/api/alias/random/new?hostname=example.com",
                                     {"note": BITWARDEN_NOTE}, xhr=xhr)
            self.assertEqual(reply.status, 201, reply)
            alias = reply.json()
            self.assertEqual(alias["alias"], alias["email"])
            self.assertEqual((alias["note"], alias["enabled"], alias["nb_forward"],
                              alias["nb_block"], alias["nb_reply"]),
                             (BITWARDEN_NOTE, True, 0, 0, 0))
            self.assertEqual(alias["mailbox"]["email"], "alice@example.org")
            self.assertEqual(alias["mailboxes"], [alias["mailbox"]])
            self.assertLess(abs(alias["creation_timestamp"] - time.time()), 120)
            self.assertRegex(alias["creation_date"],
                             r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00:00$")
            self.assert_routable_and_listed(alias["alias"], alias["id"], BITWARDEN_NOTE)

    def test_simplelogin_hostname_unencoded_with_a_port_or_as_a_whole_url_is_accepted(self):
        for query, label in (("hostname=example.com", "example.com"),
                             ("hostname=example.com:8443", "example.com:8443"),
                             ("hostname=https://www.example.com/login", "https://www.example.com/login"),
                             ("hostname=http://shop.example:8080/a/b?x=1", None),
                             ("hostname=example.com&mode=uuid", "example.com"),
                             ("hostname=example.com&mode=word", "example.com"),
                             ("hostname=", None)):
            reply = self.simplelogin("POST", "/api/alias/random/new?" + query, b"")
            self.assertEqual(reply.status, 201, (query, reply))
            alias = reply.json()
            if label is not None:
                self.assertEqual(alias["note"], label, query)
            self.assertEqual(self.site.query(alias["alias"]), "alice@example.org")

    def test_a_whole_url_as_hostname_is_accepted_whatever_its_own_query_holds(self):
        # unencoded, the page's own query becomes more parameters of ours: still a handle
        for url in ("https://shop.example/list?sort=new&mode=dark",
                    "https://shop.example/?a=1&hostname=other.example&page_id=x"):
            reply = self.simplelogin("POST", "/api/alias/random/new?hostname=" + url,
                                     {"note": BITWARDEN_NOTE})
            self.assertEqual(reply.status, 201, (url, reply))
            self.assertEqual(self.site.query(reply.json()["alias"]), "alice@example.org")

    def test_addy_domain_may_be_any_served_domain_written_as_the_user_typed_it(self):
        for typed, domain in (("other.test", "other.test"), ("@other.test", "other.test"),
                              ("Incognito.Test", "incognito.test")):
            data = self.new_alias(domain=typed)
            self.assertEqual(data["domain"], domain)
            self.assertTrue(data["email"].endswith("@" + domain))
            self.assertEqual(self.site.query(data["email"]), "alice@example.org")

    def test_a_handle_is_routable_the_moment_it_is_reported(self):
        for _ in range(5):
            data = self.new_alias()
            self.assertEqual(self.site.query(data["email"]), "alice@example.org")


class AddyDialectTest(HttpApiTestCase):
    """addy.io's API: list, get, edit, delete, switch, and the account's pages."""

    limits = {"HandlesPerMinutePerClient": "0", "HandlesPerMinutePerAccount": "0"}

    def test_list_is_newest_first_with_data_links_and_meta(self):
        made = [self.new_alias("site %d" % n)["id"] for n in range(5)]
        body = self.addy("GET", "/api/v1/aliases?page[number]=1&page[size]=2&sort=-created_at").json()
        self.assertEqual([a["id"] for a in body["data"]], made[::-1][:2])
        self.assertEqual((body["meta"]["total"], body["meta"]["per_page"], body["meta"]["current_page"],
                          body["meta"]["last_page"], body["meta"]["from"], body["meta"]["to"]),
                         (5, 2, 1, 3, 1, 2))
        self.assertIsNone(body["links"]["prev"])
        self.assertIn("page[number]=2", body["links"]["next"])
        last = self.addy("GET", "/api/v1/aliases?page%5Bnumber%5D=3&page%5Bsize%5D=2").json()
        self.assertEqual([a["id"] for a in last["data"]], made[:1])
        self.assertIsNone(last["links"]["next"])
        everything = self.addy("GET", "/api/v1/aliases?page[size]=100").json()
        self.assertEqual([a["id"] for a in everything["data"]], made[::-1])

    def test_links_keep_the_filters_and_the_order(self):
        made = [self.new_alias("site %d" % n)["id"] for n in range(5)]
        body = self.addy("GET", "/api/v1/aliases?sort=created_at&filter%5Bsearch%5D=site%20&"
                                "filter[active]=true&page[size]=2").json()
        self.assertEqual([a["id"] for a in body["data"]], made[:2])
        following = urllib.parse.urlsplit(body["links"]["next"])
        self.assertEqual(following.path, "/api/v1/aliases")
        self.assertEqual(dict(urllib.parse.parse_qsl(following.query)), {
            "page[number]": "2", "page[size]": "2", "sort": "created_at", "filter[search]": "site ",
            "filter[active]": "true"})
        second = self.addy("GET", body["links"]["next"]).json()
        self.assertEqual([a["id"] for a in second["data"]], made[2:4])
        self.assertEqual(self.addy("GET", second["links"]["last"]).json()["data"][0]["id"], made[4])

    def test_list_filters_by_active_and_searches_address_and_label(self):
        shop, bank = self.new_alias("My Shop"), self.new_alias("bank")
        self.addy("DELETE", "/api/v1/active-aliases/%d" % bank["id"])
        def ids(query):
            reply = self.addy("GET", "/api/v1/aliases?" + query)
            self.assertEqual(reply.status, 200, reply)
            return [a["id"] for a in reply.json()["data"]]
        self.assertEqual(ids("filter[active]=true"), [shop["id"]])
        self.assertEqual(ids("filter[active]=false"), [bank["id"]])
        self.assertEqual(ids("filter[search]=shop"), [shop["id"]])
        self.assertEqual(ids("filter[search]=" + bank["local_part"][:10]), [bank["id"]])
        self.assertEqual(ids("filter[search]=nothing-like-it"), [])

    def test_page_size_over_100_is_422(self):
        reply = self.addy("GET", "/api/v1/aliases?page[size]=101")
        self.assert_error(reply, 422, im.ADDY)
        self.assertIn("page[size]", reply.json()["errors"])

    def test_get_and_patch_description(self):
        data = self.new_alias("before")
        got = self.addy("GET", "/api/v1/aliases/%d" % data["id"])
        self.assertEqual(got.status, 200)
        self.assertEqual(got.json()["data"]["email"], data["email"])
        patched = self.addy("PATCH", "/api/v1/aliases/%d" % data["id"], {"description": "after"})
        self.assertEqual(patched.status, 200, patched)
        self.assertEqual(patched.json()["data"]["description"], "after")
        self.assertEqual(self.listed()[0]["label"], "after")
        self.assertEqual(self.site.query(data["email"]), "alice@example.org")

    def test_delete_is_204_and_the_handle_leaves_the_map(self):
        data = self.new_alias()
        reply = self.addy("DELETE", "/api/v1/aliases/%d" % data["id"])
        self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertIsNone(self.site.query(data["email"]))
        self.assertEqual(self.listed(), [])
        self.assert_error(self.addy("GET", "/api/v1/aliases/%d" % data["id"]), 404, im.ADDY)

    def test_deactivate_is_204_and_activate_is_200_with_data_and_the_map_follows(self):
        data = self.new_alias()
        reply = self.addy("DELETE", "/api/v1/active-aliases/%d" % data["id"])
        self.assertEqual((reply.status, reply.body), (204, b""))
        self.assertIsNone(self.site.query(data["email"]))
        self.assertIs(self.addy("GET", "/api/v1/aliases/%d" % data["id"]).json()["data"]["active"],
                      False)
        reply = self.addy("POST", "/api/v1/active-aliases", {"id": data["id"]})
        self.assertEqual(reply.status, 200, reply)
        self.assertIs(reply.json()["data"]["active"], True)
        self.assertEqual(self.site.query(data["email"]), "alice@example.org")

    def test_domain_options_name_the_domains_served_here(self):
        reply = self.addy("GET", "/api/v1/domain-options")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.json(), {"data": ["incognito.test", "other.test"], "sharedDomains": [],
                                        "defaultAliasDomain": "incognito.test",
                                        "defaultAliasFormat": "random_characters"})

    def test_account_pages_token_details_and_recipients(self):
        self.new_alias()
        details = self.addy("GET", "/api/v1/account-details").json()["data"]
        self.assertEqual((details["username"], details["total_aliases"]), ("alice@example.org", 1))
        token = self.addy("GET", "/api/v1/api-token-details")
        self.assertEqual(token.status, 200)
        self.assertEqual(set(token.json()), {"name", "created_at", "expires_at"})
        self.assertIsNone(token.json()["expires_at"])
        reply = self.addy("GET", "/api/v1/recipients?filter[verified]=true")
        [recipient] = reply.json()["data"]
        self.assertEqual(recipient["email"], "alice@example.org")
        self.assertIsNotNone(recipient["email_verified_at"])
        self.assertRegex(recipient["email_verified_at"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")

    def test_custom_format_or_a_local_part_is_422_and_other_formats_make_a_normal_handle(self):
        for extra in ({"format": "custom", "local_part": "me"}, {"local_part": "me"},
                      {"format": "custom"}):
            reply = self.addy("POST", "/api/v1/aliases", dict({"domain": "incognito.test"}, **extra))
            self.assert_error(reply, 422, im.ADDY)
            self.assertIn("local_part", reply.json()["errors"])
        for extra in ({"format": "random_characters"}, {"format": "uuid"}, {"format": "random_words"},
                      {"format": "random_noun", "local_part": "", "recipient_ids": []}):
            body = dict({"domain": "incognito.test", "description": "d"}, **extra)
            reply = self.addy("POST", "/api/v1/aliases", body,
                              headers=[("X-Requested-From", "browser-extension")])
            self.assertEqual(reply.status, 201, (extra, reply))
            self.assertRegex(reply.json()["data"]["local_part"], r"^[a-z0-9]{16}$")
        self.assertEqual(len(self.listed()), 4)

    def test_unknown_domain_is_422_naming_the_domains_served_here(self):
        reply = self.addy("POST", "/api/v1/aliases", {"domain": "addy.io", "description": "x"})
        message = self.assert_error(reply, 422, im.ADDY)
        self.assertIn("incognito.test", message)
        self.assertIn("other.test", message)
        self.assertEqual(reply.json()["errors"]["domain"], [message])
        self.assertEqual(self.listed(), [])


class SimpleLoginDialectTest(HttpApiTestCase):
    """SimpleLogin's API: user info, mailboxes, pages of 20, search, delete, toggle."""

    limits = {"HandlesPerMinutePerClient": "0", "HandlesPerMinutePerAccount": "0"}

    def make(self, count):
        client = self.http()
        made = []
        for number in range(count):
            reply = client.request("POST", "/api/alias/random/new?hostname=site%d.example" % number,
                                   bitwarden_headers(simplelogin_auth(self.token)), b"")
            self.assertEqual(reply.status, 201, reply)
            made.append(reply.json())
        return made

    def test_user_info_and_mailboxes(self):
        self.make(2)
        user = self.simplelogin("GET", "/api/user_info").json()
        self.assertEqual(user["email"], "alice@example.org")
        self.assertIn("is_premium", user)
        [mailbox] = self.simplelogin("GET", "/api/mailboxes").json()["mailboxes"]
        self.assertEqual((mailbox["email"], mailbox["verified"], mailbox["default"], mailbox["nb_alias"]),
                         ("alice@example.org", True, True, 2))

    def test_aliases_come_20_a_page_newest_first_and_post_searches(self):
        made = self.make(21)
        newest_first = [a["id"] for a in reversed(made)]
        first = self.simplelogin("GET", "/api/v2/aliases?page_id=0").json()["aliases"]
        second = self.simplelogin("GET", "/api/v2/aliases?page_id=1").json()["aliases"]
        self.assertEqual([a["id"] for a in first + second], newest_first)
        self.assertEqual(len(first), 20)
        self.assertEqual(self.simplelogin("GET", "/api/v2/aliases?page_id=2").json(), {"aliases": []})
        found = self.simplelogin("POST", "/api/v2/aliases?page_id=0", {"query": "site17.example"})
        self.assertEqual([a["id"] for a in found.json()["aliases"]], [made[17]["id"]])
        self.assert_error(self.simplelogin("GET", "/api/v2/aliases"), 400, im.SIMPLELOGIN)

    def test_get_delete_and_toggle(self):
        alias = self.make(1)[0]
        got = self.simplelogin("GET", "/api/aliases/%d" % alias["id"]).json()
        self.assertEqual(got["email"], alias["email"])
        reply = self.simplelogin("POST", "/api/aliases/%d/toggle" % alias["id"])
        self.assertEqual((reply.status, reply.json()), (200, {"enabled": False}))
        self.assertIsNone(self.site.query(alias["email"]))
        reply = self.simplelogin("POST", "/api/aliases/%d/toggle" % alias["id"])
        self.assertEqual(reply.json(), {"enabled": True})
        self.assertEqual(self.site.query(alias["email"]), "alice@example.org")
        reply = self.simplelogin("DELETE", "/api/aliases/%d" % alias["id"])
        self.assertEqual((reply.status, reply.json()), (200, {"deleted": True}))
        self.assertIsNone(self.site.query(alias["email"]))
        self.assert_error(self.simplelogin("DELETE", "/api/aliases/%d" % alias["id"]), 404,
                          im.SIMPLELOGIN)

    def test_mode_other_than_uuid_or_word_is_400(self):
        self.assert_error(self.simplelogin("POST", "/api/alias/random/new?mode=fancy"), 400,
                          im.SIMPLELOGIN)
        self.assertEqual(self.listed(), [])


class BulkAndClientsLiveTest(HttpApiTestCase):
    """Bulk routes, sort orders and account totals on a running server, with clients' exact
    requests."""

    def test_bulk_deactivate_activate_get_and_delete_follow_the_map(self):
        aliases = [self.new_alias() for _ in range(3)]
        ids = [a["id"] for a in aliases]
        reply = self.addy("POST", "/api/v1/aliases/deactivate/bulk", {"ids": [str(i) for i in ids[:2]] + [999]})
        self.assertEqual(reply.json(), {"message": "2 aliases deactivated successfully", "ids": ids[:2]})
        self.assertIsNone(self.site.query(aliases[0]["email"]))
        self.assertEqual(self.site.query(aliases[2]["email"]), "alice@example.org")
        reply = self.addy("POST", "/api/v1/aliases/activate/bulk", {"ids": ids})
        self.assertEqual(reply.json()["ids"], ids[:2])
        self.assertEqual(self.site.query(aliases[0]["email"]), "alice@example.org")
        got = self.addy("POST", "/api/v1/aliases/get/bulk", {"ids": ids}).json()["data"]
        self.assertEqual(sorted(a["email"] for a in got), sorted(a["email"] for a in aliases))
        reply = self.addy("POST", "/api/v1/aliases/delete/bulk", {"ids": ids})
        self.assertEqual(reply.json()["message"], "3 aliases deleted successfully")
        self.assertEqual(self.listed(), [])
        reply = self.addy("POST", "/api/v1/aliases/get/bulk", {"ids": ids})
        self.assertEqual((reply.status, reply.json()), (404, {"message": "No aliases found"}))

    def test_bulk_ids_of_another_account_are_not_found(self):
        theirs = self.new_alias(token=new_account(self.site, "bob@example.org"))
        reply = self.addy("POST", "/api/v1/aliases/delete/bulk", {"ids": [theirs["id"]]})
        self.assertEqual(reply.status, 404)

    def test_pyaddys_exact_create_with_a_trailing_slash_makes_a_routable_handle(self):
        reply = self.addy("POST", "/api/v1/aliases/", {"domain": "incognito.test", "description": None,
                                                      "format": None, "recipient_id": None}, xhr=True)
        self.assertEqual(reply.status, 201, reply)
        self.assertEqual(self.site.query(reply.json()["data"]["email"]), "alice@example.org")

    def test_account_details_carry_totals_and_the_list_sorts_by_what_was_received_or_blocked(self):
        aliases = [self.new_alias(description=str(n)) for n in range(3)]
        details = self.addy("GET", "/api/v1/account-details").json()["data"]
        self.assertEqual((details["total_aliases"], details["total_emails_forwarded"],
                          details["total_emails_blocked"]), (3, 0, 0))
        for sort in ("-created_at", "created_at", "-last_forwarded", "-emails_forwarded",
                     "-emails_blocked", "-last_blocked"):
            reply = self.addy("GET", "/api/v1/aliases?sort=" + sort)
            self.assertEqual(reply.status, 200, (sort, reply))
        oldest = self.addy("GET", "/api/v1/aliases?sort=created_at").json()["data"]
        self.assertEqual([a["description"] for a in oldest], ["0", "1", "2"])
        self.assertEqual(self.addy("GET", "/api/v1/aliases?sort=color").status, 422)


class HandleIdTest(HttpApiTestCase):
    """A handle's id is one integer: the same in both dialects, list --json and the WebSocket."""

    def test_the_same_id_everywhere(self):
        addy = self.new_alias("by addy")
        simplelogin = self.simplelogin("POST", "/api/alias/random/new", {"note": "by SL"}).json()
        by_cli = json.loads(cli(self.site, "--json", "new", "handle", self.token).stdout)
        ids = {addy["email"]: addy["id"], simplelogin["alias"]: simplelogin["id"],
               by_cli["address"]: by_cli["id"]}
        self.assertEqual({h["address"]: h["id"] for h in self.listed()}, ids)
        client = self.client()
        listed = client.request(id=1, op="list_handles", token=self.token)["handles"]
        self.assertEqual({h["address"]: h["id"] for h in listed}, ids)
        for address, handle_id in ids.items():
            self.assertEqual(self.addy("GET", "/api/v1/aliases/%d" % handle_id).json()["data"]["email"],
                             address)
            self.assertEqual(self.simplelogin("GET", "/api/aliases/%d" % handle_id).json()["alias"],
                             address)
        self.assertEqual(self.addy("PATCH", "/api/v1/aliases/%d" % by_cli["id"],
                                   {"description": "renamed"}).json()["data"]["id"], by_cli["id"])


class ApiTokenTest(HttpApiTestCase):
    """401 for a missing or wrong token, never repeating it; old tokens keep working."""

    def test_missing_or_wrong_token_is_401_in_each_dialect_without_the_token(self):
        for token in (None, WRONG, "", self.token + "x"):
            reply = self.addy("POST", "/api/v1/aliases", {"domain": "incognito.test"}, token=token,
                              source="127.0.0.2")
            self.assert_error(reply, 401, im.ADDY)
            self.assertNotIn(WRONG.encode(), reply.body)
            reply = self.simplelogin("POST", "/api/alias/random/new?hostname=x.org", {},
                                     token=token, source="127.0.0.3")
            self.assert_error(reply, 401, im.SIMPLELOGIN)
            self.assertNotIn(WRONG.encode(), reply.body)
        self.assertEqual(self.listed(), [])

    def test_wrong_token_with_a_bad_body_is_401_not_422(self):
        for body in (b"{not json", {"domain": 5}, {"domain": "elsewhere.org"}, [1, 2]):
            self.assert_error(self.addy("POST", "/api/v1/aliases", body, token=WRONG), 401,
                              im.ADDY)
        self.assert_error(self.simplelogin("POST", "/api/alias/random/new?mode=x", b"[",
                                           token=WRONG), 401, im.SIMPLELOGIN)
        self.assert_error(self.addy("GET", "/api/v1/aliases/abc", token=WRONG), 401, im.ADDY)

    def test_new_and_rotated_tokens_are_letters_and_digits_the_addy_extension_accepts(self):
        rotated = control(self.site, "rotate_token", token=self.token)["token"]
        for token in (new_account(self.site, "bob@example.org"), rotated):
            self.assertRegex(token, ADDY_EXTENSION_KEY)
            self.assertGreaterEqual(len(token), 43)
        self.assert_error(self.addy("GET", "/api/v1/domain-options"), 401, im.ADDY)
        self.token = rotated
        self.assertEqual(self.addy("GET", "/api/v1/domain-options").status, 200)
        self.new_alias()

    def test_an_old_url_safe_token_with_dashes_and_underscores_keeps_working(self):
        old = "Old-style_" + secrets.token_urlsafe(32)      # as the 2.0 daemon made them
        seed_account(self.site, address="carol@example.org", token=old)
        data = self.new_alias(token=old)
        self.assertEqual(self.site.query(data["email"]), "carol@example.org")
        alias = self.simplelogin("POST", "/api/alias/random/new?hostname=x.org", {}, token=old).json()
        self.assertEqual(self.site.query(alias["alias"]), "carol@example.org")
        self.assertEqual(self.simplelogin("GET", "/api/user_info", token=old).json()["email"],
                         "carol@example.org")


class ApiOwnershipTest(HttpApiTestCase):
    """Another account's handle is 404, indistinguishable from one that does not exist."""

    def setUp(self):
        super().setUp()
        self.other_token = new_account(self.site, "bob@example.org")
        self.theirs = self.new_alias("theirs", token=self.other_token)
        self.missing_id = self.theirs["id"] + 1000

    def assert_same_404(self, method, path_template, body=None, dialect=im.ADDY):
        send = self.addy if dialect == im.ADDY else self.simplelogin

        def ask(handle_id):
            path = path_template % handle_id if "%d" in path_template else path_template
            text = json.dumps(body)
            return send(method, path, None if body is None else
                        json.loads(text % handle_id if "%d" in text else text))
        theirs, missing = ask(self.theirs["id"]), ask(self.missing_id)
        self.assert_error(theirs, 404, dialect)
        self.assert_error(missing, 404, dialect)
        self.assertEqual(theirs.body.replace(str(self.theirs["id"]).encode(), b"N"),
                         missing.body.replace(str(self.missing_id).encode(), b"N"))
        self.assertEqual(sorted(k for k, _ in theirs.fields if k.lower() != "content-length"),
                         sorted(k for k, _ in missing.fields if k.lower() != "content-length"))

    def test_another_accounts_id_is_the_same_404_as_a_missing_id_and_nothing_changes(self):
        self.assert_same_404("GET", "/api/v1/aliases/%d")
        self.assert_same_404("PATCH", "/api/v1/aliases/%d", {"description": "mine now"})
        self.assert_same_404("DELETE", "/api/v1/aliases/%d")
        self.assert_same_404("DELETE", "/api/v1/active-aliases/%d")
        self.assert_same_404("POST", "/api/v1/active-aliases", {"id": "%d"})
        self.assert_same_404("GET", "/api/aliases/%d", dialect=im.SIMPLELOGIN)
        self.assert_same_404("DELETE", "/api/aliases/%d", dialect=im.SIMPLELOGIN)
        self.assert_same_404("POST", "/api/aliases/%d/toggle", dialect=im.SIMPLELOGIN)
        [theirs] = self.listed(self.other_token)
        self.assertEqual((theirs["label"], theirs["enabled"]), ("theirs", True))
        self.assertEqual(self.site.query(self.theirs["email"]), "bob@example.org")

    def test_ids_that_are_not_numbers_are_404(self):
        for text in ("abc", "-1", "1.5", "0x1", "1e3", "%31", "0", "9" * 30, str(self.theirs["id"]) + "a"):
            self.assert_error(self.addy("GET", "/api/v1/aliases/" + text), 404, im.ADDY)
            self.assert_error(self.simplelogin("DELETE", "/api/aliases/" + text), 404, im.SIMPLELOGIN)
        self.assertEqual(len(self.listed(self.other_token)), 1)

    def test_lists_show_only_the_accounts_own_handles(self):
        mine = self.new_alias("mine")
        self.assertEqual([a["id"] for a in self.addy("GET", "/api/v1/aliases").json()["data"]],
                         [mine["id"]])
        self.assertEqual([a["id"] for a in self.simplelogin("GET", "/api/v2/aliases?page_id=0")
                          .json()["aliases"]], [mine["id"]])


class HostileRequestTest(HttpApiTestCase):
    """Lying lengths, chunked bodies, header floods, bad JSON and wrong types: refused, and
    the server keeps serving."""

    limits = {"MaxMessageSize": "4096"}

    def tearDown(self):
        self.assertEqual(self.addy("GET", "/api/v1/domain-options").status, 200)
        self.assertNotIn("Traceback", self.daemon.log())

    def test_body_over_max_message_size_is_413_without_reading_it(self):
        for length in (4097, 1 << 20, 10 ** 30):
            client = self.http()
            client.send_raw(b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Authorization: Bearer " + self.token.encode() + b"\r\nContent-Length: %d\r\n\r\n"
                            % length)
            reply = client.reply()      # the body is never sent
            self.assertEqual(reply.status, 413, reply)
            self.assertTrue(client.closed_by_server())
        reply = self.addy("POST", "/api/v1/aliases",
                          {"domain": "incognito.test", "description": "x" * 150 + " " * 3800})
        self.assertNotEqual(reply.status, 413)      # 4096 bytes are allowed

    def test_chunked_body_is_411(self):
        client = self.http()
        client.send_raw(b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                        b"Authorization: Bearer " + self.token.encode() + b"\r\n"
                        b"Content-Type: application/json\r\n\r\n1c\r\n{\"domain\": \"incognito.test\"}"
                        b"\r\n0\r\n\r\n")
        self.assertEqual(client.reply().status, 411)
        self.assertTrue(client.closed_by_server())
        self.assertEqual(self.listed(), [])

    def test_header_flood_is_431(self):
        client = self.http()
        client.send_raw(b"GET /api/v1/aliases HTTP/1.1\r\nHost: x\r\n" + b"X-Flood: 1\r\n" * 900)
        self.assertEqual(client.reply().status, 431)
        client = self.http()
        client.send_raw(b"GET /api/v1/aliases HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000)
        self.assertEqual(client.reply().status, 431)

    def test_malformed_content_length_is_400(self):
        for value in (b"-5", b"5, 6", b"abc", b"\xb2"):
            client = self.http()
            client.send_raw(b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Length: " + value
                            + b"\r\n\r\n{}")
            self.assertEqual(client.reply().status, 400, value)

    def test_invalid_json_is_422_for_addy_and_400_for_simplelogin(self):
        for body in (b"{not json", b"{\"domain\": ", b"\xff\xfe", b"[" * 3000, b"NaN",
                     b"{\"domain\": NaN}", b"\"incognito.test\"", b"[]", b"null", b""):
            self.assert_error(self.addy("POST", "/api/v1/aliases", body), 422, im.ADDY)
        for body in (b"{not json", b"\xff", b"[" * 3000, b"[]", b"42"):
            self.assert_error(self.simplelogin("POST", "/api/alias/random/new", body), 400,
                              im.SIMPLELOGIN)
            self.assert_error(self.simplelogin("POST", "/api/v2/aliases?page_id=0", body), 400,
                              im.SIMPLELOGIN)
        self.assertEqual(self.listed(), [])

    def test_wrong_types_are_422_for_addy_naming_the_field_and_400_for_simplelogin(self):
        for body, field in (({"domain": 5, "description": "x"}, "domain"),
                            ({"domain": None}, "domain"),
                            ({"domain": "incognito.test", "description": ["x"]}, "description"),
                            ({"domain": "incognito.test", "description": {"a": 1}}, "description"),
                            ({"domain": "incognito.test", "format": True}, "format"),
                            ({"domain": "incognito.test", "recipient_ids": "all"}, "recipient_ids")):
            reply = self.addy("POST", "/api/v1/aliases", body)
            self.assert_error(reply, 422, im.ADDY)
            self.assertIn(field, reply.json()["errors"], body)
        data = self.new_alias()
        reply = self.addy("PATCH", "/api/v1/aliases/%d" % data["id"], {"description": 42})
        self.assertIn("description", reply.json()["errors"])
        for value in (True, 1.5, [1], None):
            self.assert_error(self.addy("POST", "/api/v1/active-aliases", {"id": value}), 422, im.ADDY)
        for body in ({"note": 5}, {"note": ["a"]}):
            self.assert_error(self.simplelogin("POST", "/api/alias/random/new", body), 400,
                              im.SIMPLELOGIN)
        self.assert_error(self.simplelogin("POST", "/api/v2/aliases?page_id=0", {"query": 5}), 400,
                          im.SIMPLELOGIN)
        self.assertEqual(len(self.listed()), 1)

    def test_non_ascii_digits_are_an_api_error_not_an_internal_error(self):
        self.assert_error(self.simplelogin("GET", "/api/v2/aliases?page_id=%C2%B2"), 400,
                          im.SIMPLELOGIN)
        self.assert_error(self.addy("GET", "/api/v1/aliases?page[size]=%C2%B2"), 422, im.ADDY)

    def test_label_with_control_characters_or_too_long_is_refused(self):
        for description in ("line\nbreak", "x" * 201, "\u202eevil"):
            self.assert_error(self.addy("POST", "/api/v1/aliases",
                                        {"domain": "incognito.test", "description": description}),
                              422, im.ADDY)
        self.assertEqual(self.listed(), [])


class ApiCorsTest(HttpApiTestCase):
    """Any page may call the API (AllowedOrigins empty): preflights, and the origin on every
    reply, errors included; no cookies."""

    PREFLIGHT = [("Connection", "keep-alive"), ("Accept", "*/*"),
                 ("Access-Control-Request-Method", "POST"),
                 ("Access-Control-Request-Headers", "authorization,content-type,x-requested-with"),
                 ("Origin", "https://vault.bitwarden.com"),
                 ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/130.0.0.0 Safari/537.36"),
                 ("Sec-Fetch-Mode", "cors"), ("Sec-Fetch-Site", "cross-site"), ("Sec-Fetch-Dest", "empty"),
                 ("Referer", "https://vault.bitwarden.com/"), ("Accept-Encoding", "gzip, deflate, br"),
                 ("Accept-Language", "en-US,en;q=0.9")]

    def assert_preflight_allowed(self, reply, origin="*"):
        self.assertEqual((reply.status, reply.body), (204, b""), reply)
        headers = reply.headers
        self.assertEqual(headers.get("access-control-allow-origin"), origin)
        methods = {m.strip().upper() for m in headers["access-control-allow-methods"].split(",")}
        self.assertLessEqual({"GET", "POST", "PATCH", "DELETE"}, methods)
        allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
        self.assertLessEqual({"authorization", "authentication", "content-type", "accept",
                              "x-requested-with"}, allowed)
        self.assertNotIn("*", allowed)
        self.assertGreater(int(headers["access-control-max-age"]), 0)
        self.assertNotIn("access-control-allow-credentials", headers)
        self.assertNotIn("set-cookie", headers)

    def test_preflight_as_a_browser_sends_it_is_204_naming_methods_and_headers(self):
        reply = self.call("OPTIONS", "/api/v1/aliases", self.PREFLIGHT)
        self.assert_preflight_allowed(reply)
        headers = [(k, v.replace("x-requested-with", "authentication")) for k, v in self.PREFLIGHT]
        for path in ("/api/alias/random/new?hostname=example.com", "/api/v1/aliases/17",
                     "/api/aliases/17/toggle", "/api/v1/active-aliases/3"):
            self.assert_preflight_allowed(self.call("OPTIONS", path, headers))
        self.assertEqual(self.listed(), [])

    def test_every_reply_carries_the_origin_errors_included(self):
        origin = [("Origin", "https://vault.bitwarden.com")]
        replies = [self.addy("POST", "/api/v1/aliases",
                             {"domain": "incognito.test", "description": BITWARDEN_NOTE}, headers=origin),
                   self.addy("GET", "/api/v1/domain-options", token=WRONG, headers=origin),
                   self.addy("GET", "/api/v1/aliases/999999", headers=origin),
                   self.addy("POST", "/api/v1/aliases", {"domain": "x.org"}, headers=origin),
                   self.addy("PUT", "/api/v1/aliases", headers=origin),
                   self.simplelogin("POST", "/api/alias/random/new?mode=x", headers=origin),
                   self.call("GET", "/nothing/here", origin)]
        self.assertEqual([r.status for r in replies], [201, 401, 404, 422, 405, 400, 404])
        for reply in replies:
            self.assertEqual(reply.headers.get("access-control-allow-origin"), "*", reply)
        self.assertEqual(self.addy("GET", "/api/v1/domain-options").headers
                         .get("access-control-allow-origin"), "*")


class ApiAllowedOriginsTest(HttpApiTestCase):
    """With AllowedOrigins, the reply names the request's Origin only when it is listed."""

    general = {"AllowedOrigins": "https://vault.example.org, moz-extension://abc-123"}

    def test_listed_origin_is_named_and_others_get_no_allow_origin(self):
        for origin in ("https://vault.example.org", "moz-extension://abc-123"):
            reply = self.new_alias_reply(origin)
            self.assertEqual(reply.headers.get("access-control-allow-origin"), origin)
            self.assertIn("origin", reply.headers.get("vary", "").lower())
            error = self.addy("GET", "/api/v1/aliases/99999", headers=[("Origin", origin)])
            self.assertEqual((error.status, error.headers.get("access-control-allow-origin")),
                             (404, origin))
            preflight = self.call("OPTIONS", "/api/v1/aliases",
                                  [("Origin", origin), ("Access-Control-Request-Method", "POST"),
                                   ("Access-Control-Request-Headers", "authorization,content-type")])
            self.assertEqual(preflight.status, 204)
            self.assertEqual(preflight.headers.get("access-control-allow-origin"), origin)
        for headers in ([("Origin", "https://evil.example")], []):
            reply = self.addy("GET", "/api/v1/domain-options", headers=headers)
            self.assertNotIn("access-control-allow-origin", reply.headers)

    def new_alias_reply(self, origin):
        reply = self.addy("POST", "/api/v1/aliases", {"domain": "incognito.test", "description": "x"},
                          headers=[("Origin", origin)])
        self.assertEqual(reply.status, 201)
        return reply


class ApiRateLimitTest(HttpApiTestCase):
    """Every [Limits] rule of the WebSocket applies to the HTTP API the same way."""

    limits = {"HandlesPerMinutePerClient": "3", "HandlesPerMinutePerAccount": "5",
              "FailedTokensPerMinutePerClient": "2", "MaxConnectionsPerClient": "4",
              "MaxConnections": "40"}

    def assert_429(self, reply, dialect):
        self.assert_error(reply, 429, dialect)
        self.assertGreaterEqual(int(reply.headers["retry-after"]), 1)

    def test_new_handles_per_client_over_the_limit_get_429_with_retry_after(self):
        for _ in range(3):
            self.new_alias(source="127.0.0.2")
        self.assert_429(self.addy("POST", "/api/v1/aliases", {"domain": "incognito.test"},
                                  source="127.0.0.2"), im.ADDY)
        self.assert_429(self.simplelogin("POST", "/api/alias/random/new", source="127.0.0.2"),
                        im.SIMPLELOGIN)
        self.assertEqual(len(self.listed()), 3)
        self.new_alias(source="127.0.0.3")

    def test_new_handles_per_account_are_limited_across_clients(self):
        statuses = [self.addy("POST", "/api/v1/aliases", {"domain": "incognito.test"},
                              source="127.0.0.%d" % (2 + n % 2)).status for n in range(6)]
        self.assertEqual(statuses, [201] * 5 + [429])

    def test_websocket_and_http_share_a_clients_limit(self):
        client = self.client(source="127.0.0.9")
        for number in range(2):
            self.assertTrue(client.request(id=number, op="new_handle", token=self.token)["ok"])
        self.new_alias(source="127.0.0.9")
        self.assert_429(self.addy("POST", "/api/v1/aliases", {"domain": "incognito.test"},
                                  source="127.0.0.9"), im.ADDY)

    def test_wrong_tokens_slow_a_client_down_to_429(self):
        for _ in range(2):
            self.assert_error(self.addy("GET", "/api/v1/domain-options", token=WRONG,
                                        source="127.0.0.4"), 401, im.ADDY)
        self.assert_429(self.addy("GET", "/api/v1/domain-options", source="127.0.0.4"), im.ADDY)
        self.assert_429(self.simplelogin("GET", "/api/user_info", source="127.0.0.4"), im.SIMPLELOGIN)
        self.assertEqual(self.addy("GET", "/api/v1/domain-options", source="127.0.0.5").status, 200)

    def test_connections_per_client_over_the_limit_get_503_with_retry_after(self):
        held = [self.http(source="127.0.0.6") for _ in range(4)]
        for client in held:     # each is admitted: it is answered, and stays open
            self.assertEqual(client.request("GET", "/nothing").status, 404)
        refused = self.http(source="127.0.0.6").reply()
        self.assertEqual(refused.status, 503)
        self.assertGreaterEqual(int(refused.headers["retry-after"]), 1)
        self.assertEqual(self.addy("GET", "/api/v1/domain-options", source="127.0.0.7").status, 200)
        held[0].close()

        def admitted():
            try:
                return self.http(source="127.0.0.6").request("GET", "/nothing").status == 404
            except OSError:
                return False
        self.assertTrue(wait_until(admitted, timeout=5), "a closed connection was not released")


class ApiRefusalBeforeRoutingTest(HttpApiTestCase):
    """Refusals made before a request reaches its route (413, 411, a bad Content-Length, too
    many connections) are API errors too: JSON, Access-Control-Allow-Origin, no-store."""

    limits = {"MaxMessageSize": "2048", "MaxConnectionsPerClient": "2"}

    def assert_json_error(self, reply, status):
        self.assertEqual(reply.status, status, reply)
        self.assertEqual(reply.headers.get("content-type", "").split(";")[0], "application/json",
                         reply)
        body = reply.json()
        self.assertTrue(body.get("message") or body.get("error"), body)
        self.assertEqual(reply.headers.get("access-control-allow-origin"), "*", reply)
        self.assertEqual(reply.headers.get("cache-control"), "no-store", reply)

    def test_413_411_and_a_bad_content_length_on_api_paths_are_json_errors(self):
        auth = b"Authorization: Bearer " + self.token.encode() + b"\r\nOrigin: https://vault.bitwarden.com\r\n"
        for head, status in ((b"Content-Length: 1048576\r\n", 413),
                             (b"Transfer-Encoding: chunked\r\n", 411),
                             (b"Content-Length: 5, 6\r\n", 400)):
            client = self.http()
            client.send_raw(b"POST /api/v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + auth + head + b"\r\n")
            self.assert_json_error(client.reply(), status)

    def test_503_for_too_many_connections_is_a_json_error(self):
        held = [self.http(source="127.0.0.6") for _ in range(2)]
        for client in held:
            self.assertEqual(client.request("GET", "/nothing").status, 404)
        refused = self.http(source="127.0.0.6").reply()
        self.assert_json_error(refused, 503)
        self.assertGreaterEqual(int(refused.headers["retry-after"]), 1)


class ApiPostfixFailureTest(HttpApiTestCase):
    """A failing postmap is a 500 with a JSON message, and nothing changed."""

    def daemon_env(self):
        self.bin, self.fail_flag, _ = failing_postmap_folder(self)
        return dict(os.environ, PATH=path_with(self.bin))

    def test_new_alias_is_500_with_nothing_changed_and_works_once_postmap_does(self):
        map_before = self.site.map_text()
        open(self.fail_flag, "w").close()
        reply = self.addy("POST", "/api/v1/aliases",
                          {"domain": "incognito.test", "description": BITWARDEN_NOTE})
        message = self.assert_error(reply, 500, im.ADDY)
        self.assertIn("nothing was changed", message)
        self.assertIn("simulated failure", message)
        self.assert_error(self.simplelogin("POST", "/api/alias/random/new?hostname=x.org", {}), 500,
                          im.SIMPLELOGIN)
        self.assertEqual(self.listed(), [])
        self.assertEqual(self.site.map_text(), map_before)
        os.unlink(self.fail_flag)
        data = self.new_alias()
        self.assertEqual(self.site.query(data["email"]), "alice@example.org")

    def test_delete_is_500_and_the_handle_keeps_routing(self):
        data = self.new_alias()
        open(self.fail_flag, "w").close()
        self.assert_error(self.addy("DELETE", "/api/v1/aliases/%d" % data["id"]), 500, im.ADDY)
        self.assert_error(self.addy("DELETE", "/api/v1/active-aliases/%d" % data["id"]), 500, im.ADDY)
        os.unlink(self.fail_flag)
        self.assertEqual([h["id"] for h in self.listed()], [data["id"]])
        self.assertTrue(self.listed()[0]["enabled"])
        self.assertEqual(self.site.query(data["email"]), "alice@example.org")


class ApiTlsTest(unittest.TestCase):
    """With TLS, https:// serves the API and wss:// the WebSocket, on the same port."""

    def test_https_serves_the_api_and_wss_still_works(self):
        require_postfix()
        require_openssl()
        folder = make_folder(self)
        port = free_port()
        cert, key = make_certificate(folder)
        site = Site(folder, sections={"General": {"ListenAddress": "127.0.0.1:%d" % port,
                                                  "TLSCertFile": cert, "TLSKeyFile": key}})
        start_daemon(self, site)
        token = new_account(site)
        context = ssl.create_default_context(cafile=cert)
        client = HttpClient(port, tls_context=context)
        self.addCleanup(client.close)
        reply = client.request("POST", "/api/v1/aliases", bitwarden_headers(addy_auth(token)),
                               {"domain": "incognito.test", "description": BITWARDEN_NOTE})
        self.assertEqual(reply.status, 201, reply)
        address = reply.json()["data"]["email"]
        self.assertEqual(site.query(address), "alice@example.org")
        reply = client.request("POST", "/api/alias/random/new?hostname=example.com",
                               bitwarden_headers(simplelogin_auth(token)), {})
        self.assertEqual(reply.status, 201, reply)
        ws = WsClient(port, tls_context=context)
        self.addCleanup(ws.close)
        self.assertEqual(ws.request(id=1, op="get_handle", token=token, address=address)["handle"]
                         ["id"], list(listed(self, site, token).values())[-1]["id"])
        plain = HttpClient(port, timeout=3)         # http:// to the TLS port: told so, in plain text
        self.addCleanup(plain.close)
        reply = plain.request("GET", "/api/v1/domain-options", addy_auth(token))
        self.assertEqual(reply.status, 400, reply)
        self.assertIn("https://", reply.json()["message"])


_API_PAGE = """<!doctype html><html><body><script>
const token = %(token)s, api = "http://127.0.0.1:%(port)d";
function call(url, headers, body) {
  return fetch(api + url, {method: "POST", redirect: "manual", cache: "no-store",
                           headers: Object.assign(headers, {"Content-Type": "application/json",
                                                            Accept: "application/json"}),
                           body: JSON.stringify(body)})
    .then(r => r.text().then(text => ({status: r.status, body: text})))
    .catch(e => ({status: 0, body: String(e)}));
}
Promise.all([
  call("/api/v1/aliases", {Authorization: "Bearer " + token},
       {domain: "incognito.test", description: "Website: example.com. Generated by Bitwarden."}),
  call("/api/alias/random/new?hostname=www.example.com:8443", {Authentication: token,
       "X-Requested-With": "XMLHttpRequest"}, {note: "Website: example.com."}),
]).then(results => fetch("/result", {method: "POST", body: JSON.stringify(results)}));
</script></body></html>
"""


class BrowserApiDeliveryTest(PostfixInstanceTestCase):
    """Headless Chromium on a page of another origin calls the API with fetch(), as Bitwarden's
    web vault does (preflight, Authorization header); the handle receives real mail."""

    def daemon_sections(self):
        return {"General": {"ListenAddress": "127.0.0.1:%d" % self.port}}

    def test_chromium_fetch_from_another_origin_makes_handles_that_receive_mail(self):
        require_chromium()
        self.port = free_port()
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        pages = PageServer(_API_PAGE % {"token": json.dumps(token), "port": self.port})
        threading.Thread(target=pages.serve_forever, daemon=True).start()
        self.addCleanup(pages.server_close)
        self.addCleanup(pages.shutdown)
        open_in_chromium(self, pages.origin + "/")
        self.assertTrue(pages.posted.wait(30), "the page never reported its results")
        addy, simplelogin = pages.results[0]
        self.assertEqual(addy["status"], 201, addy)
        self.assertEqual(simplelogin["status"], 201, simplelogin)
        email = json.loads(addy["body"])["data"]["email"]
        alias = json.loads(simplelogin["body"])
        self.assertEqual(alias["note"], "Website: example.com.")
        handles = listed(self, site, token)
        self.assertEqual(set(handles), {email, alias["alias"]})
        self.assertEqual(handles[email]["label"], "Website: example.com. Generated by Bitwarden.")
        self.assert_delivered(email, "alice")
        self.assert_delivered(alias["alias"], "alice")
        self.assert_foreign_line_kept()


class TlsConnectionLimitTest(TlsTestCase):
    """Connections are counted when accepted, before TLS: bare ones beyond
    MaxConnectionsPerClient are closed at once, and other addresses are still served."""

    limits = {"MaxConnectionsPerClient": "4"}

    def test_bare_connections_beyond_the_per_client_limit_are_closed_at_once(self):
        held = [self.bare() for _ in range(4)]
        for number in range(20):
            extra = self.bare(timeout=3)
            started = time.monotonic()
            self.assertTrue(closed_by_peer(extra), "bare connection %d beyond the limit was held"
                            % (number + 5))
            self.assertLess(time.monotonic() - started, 2)
            extra.close()
        self.assertTrue(all(still_open(sock) for sock in held))
        client = self.tls_client("127.0.0.2")
        client.send("new handle " + self.token)
        self.assertTrue(client.recv().endswith("@incognito.test"))


class TlsHandshakeTimeoutTest(TlsTestCase):
    """A TLS handshake must end within TLS_HANDSHAKE_TIMEOUT (shortened here to 0.5 s)."""

    constants = {"TLS_HANDSHAKE_TIMEOUT": 0.5}
    limits = {"MaxConnectionsPerClient": "1"}

    def test_a_connection_that_never_handshakes_is_closed_after_the_timeout_and_uncounted(self):
        sock = self.bare(timeout=10)
        started = time.monotonic()
        self.assertTrue(closed_by_peer(sock), "still open after 10 s")
        self.assertGreater(time.monotonic() - started, 0.4)
        client = wait_until(lambda: self.try_tls_client("127.0.0.1"), timeout=5)
        self.assertTrue(client, "the connection that timed out still counts")
        client.send("new handle " + self.token)
        self.assertTrue(client.recv().endswith("@incognito.test"))


class PlainHttpToTlsPortTest(TlsTestCase):
    """Plain http:// to the TLS port gets a 400 saying the port speaks TLS, not a failed
    handshake's silence; the port still serves TLS after it."""

    def test_plain_http_is_told_the_port_speaks_tls(self):
        status, body = http_request(self.port, "/api/v1/account-details")
        self.assertEqual(status, 400)
        self.assertIn("https://", json.dumps(body))
        client = self.tls_client("127.0.0.1")
        client.send("new handle " + self.token)
        self.assertTrue(client.recv().endswith("@incognito.test"))


class FileDescriptorExhaustionTest(unittest.TestCase):
    """Connections beyond the open-file budget are refused, never left to use the last
    descriptor; a shortage anyway is logged once; the server recovers when they close."""

    def test_a_flood_beyond_the_descriptor_budget_is_refused_and_the_server_recovers(self):
        require_postfix()
        port = free_port()
        site = make_site(self, sections={"General": {"ListenAddress": "127.0.0.1:%d" % port},
                                         "Limits": {"MaxConnections": "0", "MaxConnectionsPerClient": "0"}})
        daemon = start_daemon(self, site, preexec_fn=open_file_limit(128, 128))
        token = new_account(site)
        held, refused = [], 0
        try:
            for _ in range(300):
                held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            refused = lambda: count_refused(held)
            self.assertGreater(wait_until(lambda: refused() > 100 and refused(), timeout=10), 100,
                               "connections beyond the budget were not refused")
            self.assertEqual(json.loads(cli(site, "--json", "status").stdout)["running"], True)
        finally:
            for sock in held:
                sock.close()
        client = wait_until(lambda: _try_ws_client(port), timeout=10)
        self.assertTrue(client, "the server did not recover once descriptors were free")
        try:
            client.send("new handle " + token)
            self.assertTrue(client.recv().endswith("@incognito.test"))
        except OSError as e:
            raise AssertionError("%s\n%s" % (e, daemon.log()[-3000:]))
        client.close()
        self.assertNotIn("Traceback", daemon.log())

    def test_a_shortage_of_descriptors_is_logged_once_a_minute(self):
        with mock.patch.object(im, "_shortage", im._Quiet(60)), \
                self.assertLogs(im.log, logging.ERROR) as logged:
            for _ in range(5):
                im.descriptor_shortage(OSError(errno.EMFILE, "Too many open files"))
        self.assertEqual(len(logged.output), 1, logged.output)
        self.assertIn("out of file descriptors", logged.output[0])


class DescriptorBudgetTest(HoldingTestCase):
    """With a low hard open-file limit, the soft limit is raised to it, WebSocket/HTTP
    connections stay below it minus RESERVED_DESCRIPTORS, and a flood of them leaves the
    command line, the socketmap and the policy service answering."""

    nofile = (256, 600)
    limits = {"MaxConnectionsPerClient": "0"}

    def test_the_soft_limit_is_raised_to_the_hard_one(self):
        with open("/proc/%d/limits" % self.daemon.pid) as f:
            line = next(l for l in f if l.startswith("Max open files"))
        self.assertEqual(line.split()[3:5], ["600", "600"], line)

    def test_a_flood_of_web_connections_leaves_the_command_line_and_postfix_answering(self):
        budget = 600 - min(im.RESERVED_DESCRIPTORS, 600 // 2)     # half is kept back at most
        flood = self.flood(budget + 250)
        refused = lambda: count_refused(flood)
        wait_until(lambda: refused() >= len(flood) - budget, timeout=5)
        self.assertGreaterEqual(refused(), len(flood) - budget, "more connections held than "
                                "the descriptor budget")
        self.assert_others_answered(web=False)
        for sock in flood:
            sock.close()
        client = wait_until(lambda: _try_ws_client(self.port), timeout=10)
        self.assertTrue(client, "no WebSocket client served once the flood ended")
        client.close()
        log = self.daemon.log()
        self.assertEqual(log.count("open-file limit 600 leaves room for %d" % budget), 1, log)
        self.assertNotIn("out of file descriptors", log)
        self.assertNotIn("Traceback", log)


class LowHardLimitTest(HoldingTestCase):
    """A hard open-file limit below RESERVED_DESCRIPTORS: half of it is kept back, and a flood
    of WebSocket/HTTP connections must still not take the command line's descriptors."""

    nofile = (256, 256)
    limits = {"MaxConnectionsPerClient": "0"}

    def test_a_flood_of_web_connections_leaves_the_command_line_and_postfix_answering(self):
        self.flood(300)
        self.assert_others_answered(web=False)
        self.assertNotIn("out of file descriptors", self.daemon.log())


class TrustedProxiesTest(HoldingTestCase):
    """Only a trusted proxy's X-Forwarded-For (its rightmost address that is not a proxy) or
    X-Real-IP names the client the rate limits apply to."""

    general = {"TrustedProxies": "127.0.0.1"}
    limits = {"FailedTokensPerMinutePerClient": "2", "MaxConnectionsPerClient": "3"}

    def api(self, token, source=None, **headers):
        headers = [("Authorization", "Bearer " + token)] + [
            (name.replace("_", "-"), value) for name, value in headers.items()]
        return http_request(self.port, ACCOUNT_DETAILS, headers, source=source)[0]

    def test_wrong_tokens_over_http_lock_out_the_forwarded_client_only(self):
        for _ in range(2):
            self.assertEqual(self.api(WRONG, X_Forwarded_For="203.0.113.5"), 401)
        self.assertEqual(self.api(self.token, X_Forwarded_For="203.0.113.5"), 429)
        self.assertEqual(self.api(self.token, X_Forwarded_For="203.0.113.6"), 200)
        self.assertEqual(self.api(self.token, X_Real_IP="203.0.113.7"), 200)

    def test_wrong_tokens_over_the_websocket_lock_out_the_forwarded_client_only(self):
        locked = self.client(headers={"X-Forwarded-For": "203.0.113.5"})
        for number in range(2):
            self.assertEqual(locked.request(id=number, op="account", token=WRONG)["error"],
                             "unauthorized")
        self.assertEqual(locked.request(id=3, op="account", token=self.token)["error"],
                         "rate_limited")
        again = self.client(headers={"X-Forwarded-For": "203.0.113.5"})
        self.assertEqual(again.request(id=4, op="account", token=self.token)["error"],
                         "rate_limited")
        other = self.client(headers={"X-Forwarded-For": "203.0.113.6"})
        self.assertTrue(other.request(id=5, op="account", token=self.token)["ok"])

    def test_the_rightmost_address_that_is_not_a_proxy_is_the_client(self):
        for _ in range(2):     # the client wrote the leftmost itself; the proxy added the next
            self.assertEqual(self.api(WRONG, X_Forwarded_For="198.51.100.1, 203.0.113.5"), 401)
        self.assertEqual(self.api(self.token, X_Forwarded_For="198.51.100.2, 203.0.113.5"), 429)
        self.assertEqual(self.api(self.token, X_Forwarded_For="203.0.113.5, 127.0.0.1"), 429)
        self.assertEqual(self.api(self.token, X_Forwarded_For="198.51.100.1"), 200)

    def test_a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored(self):
        for _ in range(2):
            self.assertEqual(self.api(WRONG, source="127.0.0.2", X_Forwarded_For="203.0.113.5"),
                             401)
        self.assertEqual(self.api(self.token, source="127.0.0.2", X_Forwarded_For="203.0.113.9"),
                         429)
        self.assertEqual(self.api(self.token, X_Forwarded_For="203.0.113.5"), 200)

    def test_only_the_total_connection_limit_applies_to_a_trusted_proxy(self):
        proxied = [self.client() for _ in range(5)]
        self.assertTrue(all(c.status == 101 for c in proxied))
        direct = [self.client(source="127.0.0.2") for _ in range(4)]
        self.assertEqual([c.status for c in direct], [101, 101, 101, 503])

    def test_one_client_behind_the_proxy_gets_no_more_than_its_own_connections(self):
        behind = [self.client(headers={"X-Forwarded-For": "203.0.113.5"}) for _ in range(4)]
        self.assertEqual([c.status for c in behind], [101, 101, 101, 503])
        other = self.client(headers={"X-Forwarded-For": "203.0.113.6"})
        self.assertEqual(other.status, 101)
        behind[0].close()
        self.assertTrue(wait_until(lambda: self.client(
            headers={"X-Forwarded-For": "203.0.113.5"}).status == 101, timeout=5))


class WithoutTrustedProxiesTest(HoldingTestCase):
    """Without TrustedProxies, X-Forwarded-For is ignored: the peer is the client."""

    limits = {"FailedTokensPerMinutePerClient": "2"}

    def test_x_forwarded_for_is_ignored_and_the_peer_is_locked_out(self):
        for _ in range(2):
            status, _ = http_request(self.port, ACCOUNT_DETAILS, [
                ("Authorization", "Bearer " + WRONG), ("X-Forwarded-For", "203.0.113.5")])
            self.assertEqual(status, 401)
        status, _ = http_request(self.port, ACCOUNT_DETAILS, [
            ("Authorization", "Bearer " + self.token), ("X-Forwarded-For", "203.0.113.6"),
            ("X-Real-IP", "203.0.113.7")])
        self.assertEqual(status, 429)
        status, _ = http_request(self.port, ACCOUNT_DETAILS, [
            ("Authorization", "Bearer " + self.token)], source="127.0.0.2")
        self.assertEqual(status, 200)


class ClientAddressTest(unittest.TestCase):
    """Daemon.client_address: the peer, or what a trusted proxy says the client is."""

    def daemon(self, trusted):
        path = minimal_config_file(make_folder(self), General={"TrustedProxies": trusted})
        return im.WebFront(im.load_config(path), gate=None)

    def test_a_trusted_proxy_names_the_rightmost_address_that_is_not_a_proxy(self):
        daemon = self.daemon("127.0.0.1, 10.0.0.0/8, ::1")
        cases = [
            ({"x-forwarded-for": "203.0.113.5"}, "203.0.113.5"),
            ({"x-forwarded-for": "198.51.100.1, 203.0.113.5"}, "203.0.113.5"),
            ({"x-forwarded-for": "198.51.100.1, 203.0.113.5, 10.1.2.3"}, "203.0.113.5"),
            ({"x-forwarded-for": "2001:db8::5, ::1"}, "2001:db8::5"),
            ({"x-forwarded-for": "garbage, 203.0.113.5"}, "203.0.113.5"),
            ({"x-real-ip": "203.0.113.9"}, "203.0.113.9"),
            ({"x-forwarded-for": "10.0.0.1, 10.0.0.2", "x-real-ip": "203.0.113.9"},
             "203.0.113.9"),
            ({"x-forwarded-for": "203.0.113.5, unknown"}, "127.0.0.1"),
            ({"x-real-ip": "not an address"}, "127.0.0.1"),
            ({}, "127.0.0.1"),
        ]
        for headers, client in cases:
            self.assertEqual(daemon.client_address("127.0.0.1", headers), client, headers)
        self.assertEqual(daemon.client_address("10.9.9.9", {"x-forwarded-for": "203.0.113.5"}),
                         "203.0.113.5")

    def test_headers_from_a_peer_that_is_not_a_trusted_proxy_are_ignored(self):
        for daemon in (self.daemon(""), self.daemon("10.0.0.0/8")):
            for headers in ({"x-forwarded-for": "203.0.113.5"}, {"x-real-ip": "203.0.113.5"}):
                self.assertEqual(daemon.client_address("127.0.0.1", headers), "127.0.0.1")


class ServerNamesTest(HoldingTestCase):
    """ServerNames: the web listener answers only to its host names (421 otherwise), so a page
    that points a name of its own at the server (DNS rebinding) is refused."""

    general = {"ServerNames": "mail.example.org, 127.0.0.1"}

    def status(self, host):
        return http_request(self.port, ACCOUNT_DETAILS, [("Authorization", "Bearer " + self.token)],
                            host=host)[0]

    def test_only_the_listed_host_names_are_answered(self):
        self.assertEqual(self.status("mail.example.org"), 200)
        self.assertEqual(self.status("MAIL.example.org:%d" % self.port), 200)
        self.assertEqual(self.status("127.0.0.1:%d" % self.port), 200)
        self.assertEqual(self.status("evil.example:%d" % self.port), 421)
        client = self.client(headers={"Host": "evil.example"})
        self.assertEqual(client.status, 421)


class OwnOriginTest(unittest.TestCase):
    """The listener's own origin is its Host with the scheme it was reached by."""

    def test_the_scheme_must_match_too(self):
        request = im.parse_request(upgrade_head(Host="mail.example.org", Origin="https://mail.example.org"))
        self.assertTrue(im.origin_allowed(request, ("https://other.example",), "https"))
        self.assertFalse(im.origin_allowed(request, ("https://other.example",), "http"))
        request = request._replace(headers=dict(request.headers, origin="http://mail.example.org"))
        self.assertTrue(im.origin_allowed(request, ("https://other.example",), "http"))
        self.assertFalse(im.origin_allowed(request, ("https://other.example",), "https"))


###############################################################################
# Fronts: Postfix's questions (policy service, socketmap, milter), on a thread of their own
###############################################################################

def fake_handle(address, target, **columns):
    """A Handle as the store gives it: enabled, nothing counted, and ``columns``."""
    local, domain = address.split("@")
    fields = dict.fromkeys(im.Handle._fields)
    fields.update(id=1, number=1, local=local, domain=domain, account_id=1, target=target,
                  enabled=1, created=int(T0), updated=int(T0), received=0, blocked=0, bounced=0,
                  sent=0)
    fields.update(columns)
    return im.Handle(**fields)


class FakeMilterFront:
    """What a MilterSession asks of its front (PostfixFront): the configuration (domains,
    ReplyAddresses), the clock, the secret, lookups (which may be made to fail) and counts."""

    SECRET = b"\x07" * 32

    def __init__(self, testcase, handles=(), reply_addresses=True, now=T0):
        path = minimal_config_file(make_folder(testcase), General={
            "MilterListen": "inet:127.0.0.1:10041", "ReplyAddresses": "yes" if reply_addresses else "no"},
            PostfixConfig={"Domain": "incognito.test, other.test"})
        self.config = im.load_config(path)
        self.now = now
        self.handles = {handle.address: handle for handle in handles}
        self.failure = None             # an exception lookups raise
        self.lookups, self.counted = [], []

    def clock(self):
        return self.now

    def secret(self):
        return self.SECRET

    def lookup(self, address):
        self.lookups.append(address)
        if self.failure is not None:
            raise self.failure
        local, _, domain = address.lower().rpartition("@")
        return self.handles.get("%s@%s" % (re.match("[a-z0-9]*", local).group(), domain))

    def count(self, address, column):
        self.counted.append((address, column))


MILTER_HANDLE = "k3v9q0x2m7ab5ts1@incognito.test"
MILTER_OTHER_HANDLE = "zz99yy88xx77ww66@incognito.test"
MILTER_OWNER = "owner@gmail.example"
MILTER_CONTINUE = [(b"c", b"")]
OWNER_ONLY = (b"550 5.7.1 only the owner of k3v9q0x2m7ab5ts1@incognito.test may write through it, "
              b"from the address it forwards to\0")


class MilterSessionTest(unittest.TestCase):
    """What the milter does with each message, sans-I/O: a MilterSession with a fake front,
    commands in, the bytes for Postfix out."""

    def setUp(self):
        self.front = self.make_front()

    def make_front(self, **options):
        return FakeMilterFront(self, [fake_handle(MILTER_HANDLE, MILTER_OWNER), fake_handle(MILTER_OTHER_HANDLE, "someone@else.example")],
                               **options)

    def session(self, front=None, port=40000, hostname="mail.incognito.test"):
        session = im.MilterSession(front or self.front)
        [(code, payload)] = milter_replies(session.answer(im.MilterCommand(b"O", (6, 0x1FF, 0x1FFFFF))))
        self.assertEqual(code, b"O")
        self.steps = struct.unpack("!III", payload[:12])[2]
        self.assertEqual(self.say(session, b"D", "C", {"j": hostname}), [])
        self.assertEqual(self.say(session, b"C", "mail.example", "4", port, "192.0.2.10"), self.answer(b"C"))
        return session

    def answer(self, code):
        """What the milter answers to a command that changes nothing, as it negotiated."""
        return MILTER_CONTINUE if milter_answers(code, self.steps) else []

    def say(self, session, code, *args):
        return milter_replies(session.answer(im.MilterCommand(code, args)))

    def message(self, sender, recipients, headers, session=None, local=False):
        """One message: (the answers to each RCPT, the answer at its end); MAIL's is checked.
        ``local``: submitted locally (non_smtpd_milters: port 0, addresses without <>)."""
        session = session or self.session(port=0 if local else 40000)
        wrap = "%s" if local else "<%s>"
        self.assertEqual(self.say(session, b"M", wrap % sender, *(() if local else ("SIZE=100",))),
                         self.answer(b"M"))
        answers = [self.say(session, b"R", wrap % rcpt) for rcpt in recipients]
        for name, value in headers:
            self.assertEqual(self.say(session, b"L", name, value), self.answer(b"L"))
        return answers, self.say(session, b"E")

    def bounce_address(self, handle=MILTER_HANDLE, now=T0):
        return im.bounce_address(handle, FakeMilterFront.SECRET, now)

    # -- the protocol --------------------------------------------------------------------------

    def test_the_negotiation_takes_postfixs_version_or_less(self):
        session = im.MilterSession(self.front)
        [(code, payload)] = self.say(session, b"O", 6, 0x1FF, 0x1FFFFF)
        self.assertEqual((code, payload), (b"O", im.milter_negotiation()[5:]))
        [(code, payload)] = self.say(session, b"O", 2, 0x1FF, 0x1FFFFF)
        self.assertEqual(payload[:4], b"\0\0\0\x02")

    def test_a_postfix_that_offers_no_silence_gets_every_command_answered(self):
        session = im.MilterSession(self.front)
        [(code, payload)] = self.say(session, b"O", 6, 0x1FF, 0x7F)     # protocol 2's steps
        self.assertEqual(struct.unpack("!I", payload[8:12])[0] & ~0x7F, 0)
        for code, args in ((b"C", ("h", "4", 1, "192.0.2.1")), (b"M", ("<a@b.example>",)),
                           (b"T", ()), (b"L", ("Subject", "x"))):
            self.assertEqual(self.say(session, code, *args), MILTER_CONTINUE, code)

    def test_macros_abort_and_quit_get_no_answer_and_the_rest_as_negotiated(self):
        session = self.session()
        for code, args in ((b"D", ("R", {"{rcpt_addr}": "x@y"})), (b"A", ()), (b"Q", ())):
            self.assertEqual(self.say(session, code, *args), [], code)
        for code, args in ((b"C", ("h", "4", 1, "192.0.2.1")), (b"M", ("<a@b.example>",)), (b"T", ()),
                           (b"L", ("Subject", "x"))):
            self.assertEqual(self.say(session, code, *args), self.answer(code), code)
        for code in (b"N", b"B", b"U", b"H"):     # switched off, answered all the same
            self.assertEqual(self.say(session, code), MILTER_CONTINUE, code)

    # -- to a handle ---------------------------------------------------------------------------

    def test_mail_to_a_handle_leaves_from_its_bounce_address_with_reply_addresses(self):
        answers, end = self.message("news@shop.example", [MILTER_HANDLE], [
            ("From", '"Shop News" <news@shop.example>'),
            ("To", "k3v9q0x2m7ab5ts1@incognito.test, friend@example.org"),
            ("Cc", "Bob <bob@example.com>,\n\tme@other.test"),
            ("Reply-To", "help@shop.example"),
            ("Subject", "Your order"),
            ("Cc", "carol@example.net")])
        self.assertEqual(answers, [MILTER_CONTINUE])
        self.assertEqual(end, [
            (b"e", b"<%s>\0" % self.bounce_address().encode()),
            (b"m", b'\0\0\0\x01From\0"Shop News - news at shop.example" '
                   b'<k3v9q0x2m7ab5ts1+news=shop.example@incognito.test>\0'),
            (b"m", b"\0\0\0\x01Reply-To\0k3v9q0x2m7ab5ts1+help=shop.example@incognito.test\0"),
            (b"m", b"\0\0\0\x01To\0k3v9q0x2m7ab5ts1@incognito.test,\n"
                   b"\tk3v9q0x2m7ab5ts1+friend=example.org@incognito.test\0"),
            (b"m", b"\0\0\0\x01Cc\0Bob <k3v9q0x2m7ab5ts1+bob=example.com@incognito.test>,\n"
                   b"\tk3v9q0x2m7ab5ts1+me=other.test@incognito.test\0"),
            (b"m", b"\0\0\0\x02Cc\0k3v9q0x2m7ab5ts1+carol=example.net@incognito.test\0"),
            (b"c", b"")])
        self.assertEqual(self.front.counted, [])        # the policy service counts what is received

    def test_a_from_without_a_name_gets_the_senders_address_as_its_name(self):
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [("From", "news@shop.example")])
        self.assertIn((b"m", b'\0\0\0\x01From\0"news at shop.example" '
                             b'<k3v9q0x2m7ab5ts1+news=shop.example@incognito.test>\0'), end)

    def test_an_encoded_name_is_read_and_written_again_encoded(self):
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [("From", "=?utf-8?q?Caf=C3=A9?= <news@shop.example>")])
        [(_, payload)] = [p for p in end if p[0] == b"m"]
        value = payload[4:].split(b"\0")[1].decode("ascii")
        [(name, address)] = email.utils.getaddresses([value])
        self.assertEqual(str(email.header.make_header(email.header.decode_header(name))),
                         "Café - news at shop.example")
        self.assertEqual(address, "k3v9q0x2m7ab5ts1+news=shop.example@incognito.test")

    def test_mail_to_a_handle_from_the_null_sender_keeps_its_envelope(self):
        _, end = self.message("", [MILTER_HANDLE], [("From", "MAILER-DAEMON@mx.example.net")])
        self.assertNotIn(b"e", [code for code, _ in end])
        self.assertEqual(end[-1], (b"c", b""))

    def test_without_reply_addresses_only_the_envelope_sender_changes(self):
        front = self.make_front(reply_addresses=False)
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [("From", "news@shop.example"),
                                                              ("Reply-To", "help@shop.example")],
                              session=self.session(front))
        self.assertEqual(end, [(b"e", b"<%s>\0" % self.bounce_address().encode()), (b"c", b"")])

    def test_the_handles_own_addresses_stay_and_others_of_its_domains_get_reply_addresses(self):
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [
            ("To", "undisclosed-recipients:;"),
            ("Cc", "k3v9q0x2m7ab5ts1@incognito.test, k3v9q0x2m7ab5ts1+shop@incognito.test, "
                   "zz99yy88xx77ww66@incognito.test, x@other.test")])
        self.assertEqual(end[1:], [(b"m", b"\0\0\0\x01Cc\0k3v9q0x2m7ab5ts1@incognito.test,\n\t"
                                          b"k3v9q0x2m7ab5ts1+shop@incognito.test,\n\t"
                                          b"k3v9q0x2m7ab5ts1+zz99yy88xx77ww66=incognito.test@incognito.test,\n\t"
                                          b"k3v9q0x2m7ab5ts1+x=other.test@incognito.test\0"),
                                   (b"c", b"")])

    def test_a_sender_no_reply_address_can_hold_becomes_the_envelope_senders(self):
        for value in ("Jos\u00e9 <jos\u00e9@example.org>", "postmaster"):
            with self.subTest(value=value):
                _, end = self.message("news@shop.example", [MILTER_HANDLE], [("Reply-To", value)])
                self.assertEqual(end[1:], [(b"m", b"\0\0\0\x01Reply-To\0"
                                                  b"k3v9q0x2m7ab5ts1+news=shop.example@incognito.test\0"),
                                           (b"c", b"")])

    def test_an_address_header_the_parser_cannot_account_for_is_replaced(self):
        # what Python reads otherwise than a mail program might: no address is left unread
        for value in ("Alice (Sales <alice@evil.example>", "<alice@evil.example> Alice",
                      "(" * 2000 + "alice@evil.example"):
            with self.subTest(value=value[:40]):
                _, end = self.message("news@shop.example", [MILTER_HANDLE], [("From", value), ("Cc", value)])
                self.assertEqual(end[1:], [
                    (b"m", b"\0\0\0\x01From\0k3v9q0x2m7ab5ts1+news=shop.example@incognito.test\0"),
                    (b"m", b"\0\0\0\x01Cc\0\0"), (b"c", b"")])

    def test_receipts_and_list_mailto_links_never_reach_the_owners_address(self):
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [
            ("Disposition-Notification-To", "news@shop.example"), ("Return-Receipt-To", "news@shop.example"),
            ("List-Unsubscribe", "<mailto:leave@shop.example?subject=stop>, <https://shop.example/u>"),
            ("Mail-Followup-To", "list@shop.example")])
        self.assertEqual(end[1:], [
            (b"m", b"\0\0\0\x01Disposition-Notification-To\0\0"),
            (b"m", b"\0\0\0\x01Return-Receipt-To\0\0"),
            (b"m", b"\0\0\0\x01Mail-Followup-To\0k3v9q0x2m7ab5ts1+list=shop.example@incognito.test\0"),
            (b"m", b"\0\0\0\x01List-Unsubscribe\0<mailto:k3v9q0x2m7ab5ts1+leave=shop.example@incognito.test"
                   b"?subject=stop>, <https://shop.example/u>\0"),
            (b"c", b"")])

    def test_a_display_name_that_is_not_utf8_is_forwarded(self):
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [("From", "Jos\udce9 <jose@shop.example>")])
        self.assertEqual(end[1:], [(b"m", b'\0\0\0\x01From\0=?utf-8?q?Jos=EF=BF=BD_-_jose_at_shop=2Eexample?= '
                                          b"<k3v9q0x2m7ab5ts1+jose=shop.example@incognito.test>\0"),
                                   (b"c", b"")])

    def test_mail_to_other_addresses_is_left_alone(self):
        answers, end = self.message("news@shop.example", ["friend@example.org"], [("From", "news@shop.example")])
        self.assertEqual((answers, end), ([MILTER_CONTINUE], MILTER_CONTINUE))
        answers, end = self.message("news@shop.example", ["nosuchhandle1234@incognito.test"],
                                    [("From", "news@shop.example")])
        self.assertEqual((answers, end), ([MILTER_CONTINUE], MILTER_CONTINUE))

    # -- to a bounce address -----------------------------------------------------------------

    def test_a_bounce_is_counted_and_goes_to_the_owner_through_reply_addresses(self):
        bounce = self.bounce_address(now=T0 - 3 * DAY)
        answers, end = self.message("", [bounce], [("From", "MAILER-DAEMON@mx.gmail.example"), ("To", bounce)])
        self.assertEqual(answers, [MILTER_CONTINUE])
        self.assertEqual(end, [(b"m", b'\0\0\0\x01From\0"MAILER-DAEMON at mx.gmail.example" '
                                      b"<k3v9q0x2m7ab5ts1+MAILER-DAEMON=mx.gmail.example@incognito.test>\0"),
                               (b"c", b"")])        # no sender to change; the bounce address stays
        self.assertEqual(self.front.counted, [(MILTER_HANDLE, im.BOUNCED)])

    def test_mail_to_a_bounce_address_with_a_sender_leaves_with_none(self):
        # else the owner's provider would bounce it, or the owner's auto-reply answer it, to them
        _, end = self.message("mallory@evil.example", [self.bounce_address()], [("From", "mallory@evil.example")])
        self.assertEqual(end[0], (b"e", b"<>\0"))
        self.assertEqual(self.front.counted, [(MILTER_HANDLE, im.BOUNCED)])

    def test_a_forged_or_expired_bounce_address_is_refused_at_rcpt(self):
        good = self.bounce_address()
        for address in (good[:-len("@incognito.test") - 1] + ("b" if good[-16] == "a" else "a") + "@incognito.test",
                        self.bounce_address(now=T0 - 22 * DAY),
                        self.bounce_address(now=T0 + 2 * DAY)):
            with self.subTest(address=address):
                session = self.session()
                self.say(session, b"M", "<mallory@plain.example>")
                [(code, text)] = self.say(session, b"R", "<%s>" % address)
                self.assertEqual(code, b"y")
                self.assertTrue(text.startswith(b"550 5.1.1 <%s>: " % address.encode()), text)
                self.assertTrue(text.endswith(b"\0"))
                # the message goes on for a good recipient, and nothing is counted
                self.assertEqual(self.say(session, b"R", "<%s>" % good), MILTER_CONTINUE)
        self.assertEqual(self.front.counted, [])

    # -- from the owner, to a reply address ------------------------------------------------------

    REPLY_HEADERS = [
        ("Received", "from [10.1.2.3] by smtp.gmail.example with ESMTPSA"),
        ("From", "Owner Name <owner@gmail.example>"),
        ("To", '"Shop News - news at shop.example" <k3v9q0x2m7ab5ts1+news=shop.example@incognito.test>'),
        ("Cc", "owner@gmail.example,\n\tk3v9q0x2m7ab5ts1+bob=example.com@incognito.test"),
        ("Subject", "Re: Your order"),
        ("Message-ID", "<CAF1234@mail.gmail.example>"),
        ("In-Reply-To", "<abc@shop.example>"),
        ("User-Agent", "Thunderbird/115"),
        ("DKIM-Signature", "v=1; d=gmail.example; b=abc"),
        ("Received", "from laptop by 10.1.2.3"),
        ("X-Originating-IP", "[198.51.100.7]"),
        ("Reply-To", "owner@gmail.example"),
        ("Disposition-Notification-To", "owner@gmail.example"),
        ("MIME-Version", "1.0"),
        ("Content-Type", "text/plain; charset=utf-8")]

    def test_a_reply_from_the_owner_leaves_from_the_handle_with_only_its_own_headers(self):
        recipients = ["k3v9q0x2m7ab5ts1+news=shop.example@incognito.test",
                      "k3v9q0x2m7ab5ts1+bob=example.com@incognito.test"]
        with mock.patch.object(im.secrets, "token_hex", return_value="0f" * 16):
            answers, end = self.message(MILTER_OWNER, recipients, self.REPLY_HEADERS)
        self.assertEqual(answers, [MILTER_CONTINUE] * 2)
        self.assertEqual(end, [
            (b"e", b"<%s>\0" % self.bounce_address().encode()),
            (b"-", b"<k3v9q0x2m7ab5ts1+news=shop.example@incognito.test>\0"),
            (b"+", b"<news@shop.example>\0"),
            (b"-", b"<k3v9q0x2m7ab5ts1+bob=example.com@incognito.test>\0"),
            (b"+", b"<bob@example.com>\0"),
            (b"m", b"\0\0\0\x01From\0k3v9q0x2m7ab5ts1@incognito.test\0"),
            (b"m", b'\0\0\0\x01To\0"Shop News - news at shop.example" <news@shop.example>\0'),
            (b"m", b"\0\0\0\x01Cc\0k3v9q0x2m7ab5ts1@incognito.test,\n\tbob@example.com\0"),
            (b"m", b"\0\0\0\x02Received\0\0"), (b"m", b"\0\0\0\x01Received\0\0"),
            (b"m", b"\0\0\0\x01User-Agent\0\0"), (b"m", b"\0\0\0\x01DKIM-Signature\0\0"),
            (b"m", b"\0\0\0\x01X-Originating-IP\0\0"), (b"m", b"\0\0\0\x01Reply-To\0\0"),
            (b"m", b"\0\0\0\x01Disposition-Notification-To\0\0"),
            (b"m", b"\0\0\0\x01Message-ID\0<%s@incognito.test>\0" % (b"0f" * 16)),
            (b"c", b"")])
        self.assertEqual(self.front.counted, [(MILTER_HANDLE, im.SENT)])
        left = [payload for code, payload in end if code in b"m+"]
        self.assertFalse([p for p in left if b"owner" in p.lower() or b"gmail" in p.lower()], left)

    def test_a_first_message_from_the_owner_goes_to_the_address_named_in_the_reply_address(self):
        _, end = self.message(MILTER_OWNER, ["k3v9q0x2m7ab5ts1+sales=plain.example@incognito.test"], [
            ("From", "owner@gmail.example"), ("To", "k3v9q0x2m7ab5ts1+sales=plain.example@incognito.test"),
            ("Subject", "Hello")])
        self.assertEqual(end[:4], [
            (b"e", b"<%s>\0" % self.bounce_address().encode()),
            (b"-", b"<k3v9q0x2m7ab5ts1+sales=plain.example@incognito.test>\0"),
            (b"+", b"<sales@plain.example>\0"),
            (b"m", b"\0\0\0\x01From\0k3v9q0x2m7ab5ts1@incognito.test\0")])
        self.assertIn((b"m", b"\0\0\0\x01To\0sales@plain.example\0"), end)
        self.assertEqual(end[-2][0], b"m")              # a new Message-ID
        self.assertRegex(end[-2][1], rb"^\0\0\0\x01Message-ID\0<[0-9a-f]{32}@incognito\.test>\0$")
        self.assertEqual(self.front.counted, [(MILTER_HANDLE, im.SENT)])

    def test_anyone_but_the_owner_is_refused_at_the_end_in_the_same_words(self):
        # not at RCPT: the answer there would tell whoever tries whether they guessed the owner
        for sender, author in (("mallory@plain.example", "mallory@plain.example"), ("", MILTER_OWNER),
                               ("owner@gmail.example.evil.example", MILTER_OWNER),
                               (MILTER_OWNER, "mallory@plain.example")):
            with self.subTest(sender=sender, author=author):
                answers, end = self.message(sender, ["k3v9q0x2m7ab5ts1+news=shop.example@incognito.test"],
                                            [("From", author)])
                self.assertEqual(answers, [MILTER_CONTINUE])
                self.assertEqual(end, [(b"y", OWNER_ONLY)])
        self.assertEqual(self.front.counted, [])

    def test_the_owners_envelope_with_anothers_from_is_refused_at_the_end(self):
        for froms in ([("From", "Mallory <mallory@plain.example>")],
                      [("From", "owner@gmail.example, mallory@plain.example")],
                      [("From", "owner@gmail.example"), ("From", "mallory@plain.example")],
                      []):
            with self.subTest(froms=froms):
                answers, end = self.message("OWNER@gmail.example", ["k3v9q0x2m7ab5ts1+news=shop.example@incognito.test"],
                                            froms + [("Subject", "hi")])
                self.assertEqual(answers, [MILTER_CONTINUE])
                [(code, text)] = end
                self.assertEqual(code, b"y")
                self.assertTrue(text.startswith(b"550 5.7.1 only the owner of k3v9q0x2m7ab5ts1@incognito.test may write"), text)
        self.assertEqual(self.front.counted, [])

    def reply_with(self, *results, hostname="mail.incognito.test"):
        """The answer at the end of the owner's reply carrying these Authentication-Results."""
        headers = [("From", "owner@gmail.example")] + [("Authentication-Results", r) for r in results]
        _, end = self.message(MILTER_OWNER, ["k3v9q0x2m7ab5ts1+news=shop.example@incognito.test"], headers,
                              session=self.session(hostname=hostname))
        return end

    def assert_refused_by_verdict(self, end, method):
        self.assertEqual(end, [(b"y", OWNER_ONLY)], method)     # in the same words as anyone

    def test_a_fail_in_this_servers_authentication_results_is_refused(self):
        for result, method in (
                ("mail.incognito.test; spf=fail smtp.mailfrom=owner@gmail.example", "spf"),
                ("mail.incognito.test 1; dmarc=fail (p=reject dis=none) header.from=gmail.example", "dmarc"),
                ("MAIL.INCOGNITO.TEST;\n\tdkim=fail (bad signature) header.d=Gmail.Example header.s=sel", "dkim"),
                ("mail.incognito.test; spf=softfail smtp.mailfrom=x@other.example;\n\tdmarc=fail header.from=gmail.example", "dmarc")):
            with self.subTest(result=result):
                self.assert_refused_by_verdict(self.reply_with(result), method)
        self.assertEqual(self.front.counted, [])

    def test_verdicts_of_other_servers_other_domains_and_a_dkim_pass_do_not_refuse(self):
        for results in (
                ["mx.gmail.example; spf=fail smtp.mailfrom=owner@gmail.example; dmarc=fail header.from=gmail.example"],
                ["mail.incognito.test.evil.example; spf=fail smtp.mailfrom=owner@gmail.example"],
                ["mail.incognito.test; spf=fail smtp.mailfrom=owner@evilgmail.example"],
                ["mail.incognito.test; dkim=fail header.d=gmail.example", "mail.incognito.test; dkim=pass header.d=gmail.example"],
                ["mail.incognito.test; spf=pass smtp.mailfrom=owner@gmail.example; dkim=pass header.d=gmail.example; "
                 "dmarc=pass header.from=gmail.example"]):
            with self.subTest(results=results):
                self.assertEqual(self.reply_with(*results)[-1], (b"c", b""))
        # without Postfix's host name (macro j) no verdict is taken for this server's
        self.assertEqual(self.reply_with("mail.incognito.test; spf=fail smtp.mailfrom=owner@gmail.example",
                                         hostname="")[-1], (b"c", b""))

    def test_a_forged_pass_does_not_hide_this_servers_spf_or_dmarc_fail(self):
        # The sender adds a header claiming this server's pass; the verifier adds the real fail.
        for method, domain in (("spf", "smtp.mailfrom=owner@gmail.example"), ("dmarc", "header.from=gmail.example")):
            with self.subTest(method=method):
                end = self.reply_with("mail.incognito.test; %s=pass %s" % (method, domain),
                                      "mail.incognito.test; %s=fail %s" % (method, domain))
                self.assert_refused_by_verdict(end, method)

    # -- one message, one handle, one way ------------------------------------------------------

    def test_a_recipient_changed_otherwise_than_the_first_gets_452(self):
        reply = "k3v9q0x2m7ab5ts1+news=shop.example@incognito.test"
        for sender, first, later in (
                ("news@shop.example", MILTER_HANDLE, "friend@example.org"),
                ("news@shop.example", "friend@example.org", MILTER_HANDLE),
                ("news@shop.example", MILTER_HANDLE, MILTER_OTHER_HANDLE),
                ("news@shop.example", MILTER_HANDLE, self.bounce_address()),
                (MILTER_OWNER, MILTER_HANDLE, reply),
                (MILTER_OWNER, reply, MILTER_HANDLE),
                (MILTER_OWNER, reply, "friend@example.org")):
            with self.subTest(first=first, later=later):
                session = self.session()
                self.say(session, b"M", "<%s>" % sender)
                self.assertEqual(self.say(session, b"R", "<%s>" % first), MILTER_CONTINUE)
                [(code, text)] = self.say(session, b"R", "<%s>" % later)
                self.assertEqual((code, text), (b"y", b"452 4.5.3 <%s>: send to this address in a message "
                                                      b"of its own\0" % later.encode()))
                self.assertEqual(self.say(session, b"R", "<%s>" % first.upper()), MILTER_CONTINUE)

    def test_the_452_doubles_a_percent_sign(self):
        session = self.session()
        self.say(session, b"M", "<news@shop.example>")
        self.say(session, b"R", "<%s>" % MILTER_HANDLE)
        [(_, text)] = self.say(session, b"R", "<100%sure@example.org>")
        self.assertIn(b"<100%%sure@example.org>", text)

    def test_the_first_recipients_message_goes_on_after_a_452(self):
        session = self.session()
        self.say(session, b"M", "<news@shop.example>")
        self.say(session, b"R", "<%s>" % MILTER_HANDLE)
        self.assertEqual(self.say(session, b"R", "<friend@example.org>")[0][0], b"y")
        self.say(session, b"L", "From", "news@shop.example")
        end = self.say(session, b"E")
        self.assertEqual([code for code, _ in end], [b"e", b"m", b"c"])

    def test_a_locally_submitted_message_to_a_handle_and_others_passes_unchanged_and_is_logged(self):
        with self.assertLogs("incognitomail", "WARNING") as logged:
            answers, end = self.message("root@localhost", [MILTER_HANDLE, "friend@example.org", MILTER_OTHER_HANDLE],
                                        [("From", "root@localhost")], local=True)
        self.assertEqual((answers, end), ([MILTER_CONTINUE] * 3, MILTER_CONTINUE))
        self.assertIn(MILTER_HANDLE, "\n".join(logged.output))
        # alone, it is changed as any other
        _, end = self.message("root@localhost", [MILTER_HANDLE], [("From", "root@localhost")], local=True)
        self.assertEqual([code for code, _ in end], [b"e", b"m", b"c"])

    def test_a_locally_submitted_refusal_comes_at_the_end_of_the_message(self):
        # non_smtpd_milters must not refuse a recipient: Postfix would keep the mail queued
        answers, end = self.message("mallory@localhost", ["k3v9q0x2m7ab5ts1+news=shop.example@incognito.test"],
                                    [("From", "mallory@localhost")], local=True)
        self.assertEqual(answers, [MILTER_CONTINUE])
        [(code, text)] = end
        self.assertEqual(code, b"y")
        self.assertTrue(text.startswith(b"550 5.7.1 only the owner of k3v9q0x2m7ab5ts1@incognito.test"), text)

    # -- limits and failures -------------------------------------------------------------------

    def test_a_message_with_too_many_headers_is_refused(self):
        for headers, refused in (([("X-N", "%d" % n) for n in range(im.MAX_MILTER_HEADERS)], False),
                                 ([("X-N", "%d" % n) for n in range(im.MAX_MILTER_HEADERS + 1)], True),
                                 ([("X-Big", "x" * 60000)] * 5, True)):
            with self.subTest(count=len(headers), refused=refused):
                _, end = self.message("news@shop.example", [MILTER_HANDLE], headers)
                if refused:
                    self.assertEqual(end, [(b"y", b"552 5.3.4 <%s>: the message has more headers than a "
                                                  b"handle takes\0" % MILTER_HANDLE.encode())])
                else:
                    self.assertEqual(end[-1], (b"c", b""))

    def test_only_headers_of_mail_it_changes_are_kept_and_only_up_to_the_limit(self):
        for recipient, kept in (("friend@example.org", 0), (MILTER_HANDLE, im.MAX_MILTER_HEADER_BYTES)):
            with self.subTest(recipient=recipient):
                session = self.session()
                self.say(session, b"M", "<news@shop.example>")
                self.say(session, b"R", "<%s>" % recipient)
                for _ in range(40):
                    self.say(session, b"L", "X-Big", "x" * 60000)
                self.assertLessEqual(sum(len(n) + len(v) for n, v in session.headers), kept)

    def test_an_internal_error_at_the_end_asks_to_try_again_later_and_the_next_message_is_served(self):
        session = self.session()
        with mock.patch.object(im, "bounce_address", side_effect=RuntimeError("a bug")), \
                self.assertLogs("incognitomail", "ERROR"):
            _, end = self.message("news@shop.example", [MILTER_HANDLE], [], session=session)
        self.assertEqual(end, [(b"t", b"")])
        _, end = self.message("news@shop.example", [MILTER_HANDLE], [], session=session)
        self.assertEqual([code for code, _ in end], [b"e", b"c"])

    def test_a_lookup_that_fails_asks_to_try_again_later(self):
        for failure in (im.StoreError("database is locked"), sqlite3.OperationalError("disk I/O error")):
            with self.subTest(failure=failure):
                self.front.failure = failure
                session = self.session()
                self.say(session, b"M", "<news@shop.example>")
                with self.assertLogs("incognitomail", "ERROR"):
                    self.assertEqual(self.say(session, b"R", "<%s>" % MILTER_HANDLE), [(b"t", b"")])
        self.front.failure = None
        self.assertEqual(self.message("news@shop.example", [MILTER_HANDLE], [])[0], [MILTER_CONTINUE])

    def test_an_abort_or_a_new_mail_forgets_the_message(self):
        session = self.session()
        self.say(session, b"M", "<news@shop.example>")
        self.say(session, b"R", "<%s>" % MILTER_HANDLE)
        self.assertEqual(self.say(session, b"A"), [])
        self.say(session, b"M", "<news@shop.example>")
        self.assertEqual(self.say(session, b"R", "<friend@example.org>"), MILTER_CONTINUE)
        self.say(session, b"M", "<news@shop.example>")
        self.assertEqual(self.say(session, b"R", "<%s>" % MILTER_HANDLE), MILTER_CONTINUE)
        self.assertEqual([code for code, _ in self.say(session, b"E")], [b"e", b"c"])

    def test_several_messages_on_one_connection(self):
        session = self.session()
        _, first = self.message("news@shop.example", [MILTER_HANDLE], [("From", "news@shop.example")], session=session)
        _, second = self.message(MILTER_OWNER, ["k3v9q0x2m7ab5ts1+news=shop.example@incognito.test"],
                                 [("From", MILTER_OWNER), ("Authentication-Results", "mail.incognito.test; spf=fail "
                                                                              "smtp.mailfrom=owner@gmail.example")],
                                 session=session)
        self.assertEqual([code for code, _ in first], [b"e", b"m", b"c"])
        self.assertEqual(second[0][0], b"y")        # j from the connection still names this server


# A miltertest(8) script (Lua 5.3; Debian's miltertest, see its man page; the real argument
# order of mt.negotiate is version, protocol steps, actions). It plays Postfix for three
# messages: one to a handle and a second recipient, the owner's reply, and a stranger's.
MILTERTEST_SCRIPT = """\
local function check(ok, what) if not ok then error(what) end end
local function session(sender)
    local conn = mt.connect(SOCKET)
    check(conn ~= nil, "cannot connect to " .. SOCKET)
    check(mt.negotiate(conn, 6, nil, nil) == nil, "negotiate")
    mt.macro(conn, SMFIC_CONNECT, "j", "mail.incognito.test", "{daemon_name}", "mail.incognito.test")
    check(mt.conninfo(conn, "mail.shop.example", "192.0.2.10") == nil, "conninfo")
    check(mt.mailfrom(conn, "<" .. sender .. ">", "SIZE=100") == nil, "mailfrom")
    check(mt.getreply(conn) == SMFIR_CONTINUE, "MAIL not continued")
    return conn
end

-- mail to a handle: the second recipient is deferred; From: becomes a reply address
local conn = session("news@shop.example")
check(mt.rcptto(conn, "<" .. HANDLE .. ">") == nil, "rcptto")
check(mt.getreply(conn) == SMFIR_CONTINUE, "the handle was not taken")
check(mt.rcptto(conn, "<friend@example.org>") == nil, "rcptto 2")
check(mt.getreply(conn) == SMFIR_REPLYCODE, "the second recipient got no 452")
check(mt.header(conn, "From", "Shop <news@shop.example>") == nil, "header")
check(mt.header(conn, "To", HANDLE) == nil, "header")
check(mt.eom(conn) == nil, "eom")
check(mt.getreply(conn) == SMFIR_CONTINUE, "the message was not taken")
check(mt.eom_check(conn, MT_HDRCHANGE, "From", FROM), "From: was not made a reply address")
mt.disconnect(conn)

-- the owner's reply: to the correspondent, from the handle, without the owner's headers
conn = session(OWNER)
check(mt.rcptto(conn, "<" .. REPLY .. ">") == nil, "rcptto")
check(mt.getreply(conn) == SMFIR_CONTINUE, "the owner's reply was refused at RCPT")
check(mt.header(conn, "From", "Owner <" .. OWNER .. ">") == nil, "header")
check(mt.header(conn, "To", REPLY) == nil, "header")
check(mt.header(conn, "X-Mailer", "Owner's Mail 1.0") == nil, "header")
check(mt.eom(conn) == nil, "eom")
check(mt.getreply(conn) == SMFIR_CONTINUE, "the owner's reply was not taken")
check(mt.eom_check(conn, MT_RCPTDELETE, "<" .. REPLY .. ">"), "the reply address stays a recipient")
check(mt.eom_check(conn, MT_RCPTADD, "<news@shop.example>"), "the correspondent was not added")
check(mt.eom_check(conn, MT_HDRCHANGE, "From", HANDLE), "From: is not the handle")
check(mt.eom_check(conn, MT_HDRDELETE, "X-Mailer"), "X-Mailer was kept")
mt.disconnect(conn)

-- anyone else writing through the reply address: refused at the end of the message
conn = session("mallory@plain.example")
check(mt.rcptto(conn, "<" .. REPLY .. ">") == nil, "rcptto")
check(mt.getreply(conn) == SMFIR_CONTINUE, "a stranger's RCPT was answered otherwise than the owner's")
check(mt.header(conn, "From", "mallory@plain.example") == nil, "header")
check(mt.eom(conn) == nil, "eom")
check(mt.getreply(conn) == SMFIR_REPLYCODE, "a stranger's message through a reply address was taken")
mt.disconnect(conn)
mt.echo("MILTERTEST OK")
"""


class MilterListenerTest(PostmapTestCase):
    """The daemon's milter (MilterListen) over a socket, as Postfix (or miltertest) talks to it."""

    def setUp(self):
        self.milter_port, self.web_port = free_port(), free_port()
        self.site = self.make_site(sections={"General": {
            "MilterListen": "inet:127.0.0.1:%d" % self.milter_port,
            "ListenAddress": "127.0.0.1:%d" % self.web_port}})
        self.daemon = start_daemon(self, self.site).wait_serving()
        self.token = new_account(self.site, MILTER_OWNER)
        self.handle = new_handle(self.site, self.token)

    def client(self, port=None):
        client = MilterClient(port or self.milter_port)
        self.addCleanup(client.close)
        self.assertEqual(client.negotiate()[0], 6)
        client.tell(mta_macros(b"C", _j="mail.incognito.test"))
        self.assertEqual(client.tell(mta_packet(b"C", b"mail.shop.example\x004\x9c\x40192.0.2.10\x00")),
                         client.continued(b"C"))
        return client

    def test_miltertest_drives_the_daemons_milter(self):
        miltertest = _which("miltertest")
        require(miltertest, "miltertest is not installed (apt-get install miltertest)")
        reply = im.reply_address(self.handle, "news@shop.example")
        script = os.path.join(self.site.folder, "milter.lua")
        with open(script, "w") as f:
            f.write(MILTERTEST_SCRIPT)
        done = subprocess.run(
            [miltertest, "-D", "SOCKET=inet:%d@127.0.0.1" % self.milter_port, "-D", "HANDLE=" + self.handle,
             "-D", "OWNER=" + MILTER_OWNER, "-D", "REPLY=" + reply,
             "-D", 'FROM="Shop - news at shop.example" <%s>' % im.reply_address(self.handle, "news@shop.example"),
             "-s", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stdout + self.daemon.log()[-3000:])
        self.assertIn("MILTERTEST OK", done.stdout)
        wait_until(lambda: handles_of(self.site, self.token)[self.handle]["sent"] == 1, timeout=10)
        self.assertEqual(handles_of(self.site, self.token)[self.handle]["sent"], 1)

    def test_mail_to_a_handle_leaves_with_a_bounce_address_the_daemon_can_read(self):
        client = self.client()
        self.assertEqual(client.tell(mta_strings(b"M", "<news@shop.example>")), client.continued(b"M"))
        self.assertEqual(client.ask(mta_strings(b"R", "<%s>" % self.handle)), MILTER_CONTINUE)
        client.tell(mta_strings(b"L", "Subject", "hello"))
        end = client.ask(mta_packet(b"E"))
        self.assertEqual([code for code, _ in end], [b"e", b"c"])
        bounce = end[0][1].rstrip(b"\0").decode().strip("<>")
        self.assertEqual(im.read_handle_address(bounce, ("incognito.test",), milter_secret(self.site), time.time()),
                         (self.handle, im.BOUNCE, None))

    def test_a_bounce_is_counted_in_every_front_end(self):
        bounce = im.bounce_address(self.handle, milter_secret(self.site), time.time())
        client = self.client()
        for _ in range(2):      # two bounces on one connection
            self.assertEqual(client.tell(mta_strings(b"M", "<>")), client.continued(b"M"))
            self.assertEqual(client.ask(mta_strings(b"R", "<%s>" % bounce)), MILTER_CONTINUE)
            client.tell(mta_strings(b"L", "Subject", "Undelivered Mail Returned to Sender"))
            self.assertEqual(client.ask(mta_packet(b"E")), MILTER_CONTINUE)
            client.send(mta_packet(b"A"))
        forged = bounce[:-len("@incognito.test") - 2] + "aa@incognito.test"
        self.assertEqual(client.tell(mta_strings(b"M", "<>")), client.continued(b"M"))
        [(code, text)] = client.ask(mta_strings(b"R", "<%s>" % forged))
        self.assertEqual((code, text[:9]), (b"y", b"550 5.1.1"))
        counted = wait_until(lambda: handles_of(self.site, self.token)[self.handle]["bounced"] == 2, timeout=10)
        self.assertTrue(counted, handles_of(self.site, self.token))
        shown = listed(self, self.site, self.token)[self.handle]
        self.assertEqual(shown["bounced"], 2)
        self.assertLessEqual(abs(from_iso(shown["last_bounced"]) - time.time()), 120)
        number = shown["id"]
        for path, auth, key in (("/api/v1/aliases/%d" % number, addy_auth, "emails_bounced"),
                                ("/api/aliases/%d" % number, simplelogin_auth, "nb_bounce")):
            client = HttpClient(self.web_port)
            try:
                reply = client.request("GET", path, bitwarden_headers(auth(self.token)))
            finally:
                client.close()
            self.assertEqual(reply.status, 200, reply)
            body = reply.json()
            self.assertEqual(body.get("data", body)[key], 2, body)

    def test_a_malformed_packet_closes_only_its_own_connection(self):
        good = self.client()
        for garbage in (b"\xff\xff\xff\xff", b"\0\0\0\x05M<a@b", b"\0\0\0\0"):
            with self.subTest(garbage=garbage):
                bad = MilterClient(self.milter_port)
                self.addCleanup(bad.close)
                bad.send(garbage)
                self.assertTrue(closed_by_peer(bad.sock))
                good.tell(mta_strings(b"M", "<news@shop.example>"))
                self.assertEqual(good.ask(mta_strings(b"R", "<%s>" % self.handle)), MILTER_CONTINUE)
        self.assertIsNone(self.daemon.proc.poll())

    def test_a_message_takes_milliseconds_over_tcp(self):
        # Postfix writes each command as it comes, without TCP_NODELAY, as this client does:
        # after a write the milter does not answer (a command it asked not to answer, the
        # macros), Postfix's next write waits for the milter's ACK, delayed 40 ms on Linux
        # unless the milter sends it at once. Measured with Postfix and five unanswered
        # commands a message: 88 ms a message alone without the quick ACK, 1.4 ms with it.
        took = []
        for _ in range(5):
            started = time.monotonic()
            client = self.client()
            client.tell(mta_strings(b"M", "<news@shop.example>"))
            client.ask(mta_strings(b"R", "<%s>" % self.handle))
            client.data()
            for number in range(3):
                client.tell(mta_strings(b"L", "X-Header-%d" % number, "value"))
            self.assertEqual(client.ask(mta_packet(b"E"))[-1], (b"c", b""))
            took.append(time.monotonic() - started)
        self.assertLess(sorted(took)[2], 0.020, took)

    def test_the_milter_listens_without_the_policy_service_or_the_socketmap(self):
        port = free_port()
        site = self.make_site(sections={"General": {"MilterListen": "inet:127.0.0.1:%d" % port}})
        daemon = start_daemon(self, site).wait_serving()
        self.assertIn("the milter on inet:127.0.0.1:%d" % port, daemon.log())
        client = self.client(port)
        client.tell(mta_strings(b"M", "<a@b.example>"))
        self.assertEqual(client.ask(mta_strings(b"R", "<a@b.example>")), MILTER_CONTINUE)


class PolicyCountingTest(PostmapTestCase):
    """The policy service's counts: once per message, and a burst of mail is one database write."""

    def test_a_burst_of_mail_is_one_write_and_each_message_counts_once(self):
        site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % free_port()}})
        fixture = self.start_service(site)
        token = fixture.new_account()
        handle = fixture.new_handle(token)
        front = im.PostfixFront(site.config, fixture.service)

        async def burst():
            for number in range(100):
                request = {"protocol_state": "RCPT", "instance": "m%d" % number, "recipient": handle.upper()}
                self.assertEqual(await policy_action(front, request), "DUNNO")
            for state in ("RCPT", "DATA", "END-OF-MESSAGE"):     # Postfix asking again about message m0
                await policy_action(front, {"protocol_state": state, "instance": "m0", "recipient": handle})
            before = fixture.service.batches
            await front._flush_received()
            return fixture.service.batches - before
        self.assertEqual(asyncio.run(burst()), 1)
        [listed] = fixture.call("list_handles", token=token)
        self.assertEqual(listed["received"], 100)
        self.assertIsNotNone(listed["last_received"])


class BurnerAndBlockedCountsTest(PostmapTestCase):
    """The policy service (in-process, with the test's clock): a burner takes its first N
    messages, then refuses; every refused message is counted as blocked, once."""

    def setUp(self):
        self.now = [T0]
        self.site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % free_port()}})
        self.fixture = self.start_service(self.site, clock=lambda: self.now[0])
        self.token = self.fixture.new_account()
        self.front = im.PostfixFront(self.site.config, self.fixture.service, clock=lambda: self.now[0])

    def new_handle(self, expires=None, max_messages=None):
        return self.fixture.new_handle(self.token, expires=expires, max_messages=max_messages)

    def ask(self, *requests):
        """The policy service's answers to (recipient, message instance) pairs at RCPT, then
        the counts written, as the daemon does every second."""
        async def run():
            answers = [await policy_action(self.front, {"protocol_state": "RCPT", "recipient": recipient,
                                                         "instance": instance})
                       for recipient, instance in requests]
            await self.front._flush_received()
            return answers
        return asyncio.run(run())

    def test_a_burner_takes_its_first_n_messages_then_refuses_with_the_used_up_text(self):
        burner = self.new_handle(max_messages=2)
        refusal = "550 5.1.1 <%s>: this address has received all the messages it accepts" % burner
        # all three before the counts are written: the ones not written yet count too
        self.assertEqual(self.ask((burner, "m1"), (burner, "m2"), (burner, "m3")), ["DUNNO", "DUNNO", refusal])
        self.assertEqual(self.ask((burner, "m4")), [refusal])
        listed = self.fixture.handle(self.token, burner)
        self.assertEqual((listed["state"], listed["received"], listed["blocked"]), ("used up", 2, 2))
        # its last message may still be on its way through Postfix: it leaves the map at the sweep
        self.assertEqual(self.site.query(burner), "me@example.org")
        self.now[0] += 60
        self.fixture.sweep()
        self.assertIsNone(self.site.query(burner))

    def test_refused_messages_count_as_blocked_once_per_message_and_not_as_received(self):
        disabled, expired, burner = self.new_handle(), self.new_handle("1h"), self.new_handle(max_messages=1)
        self.fixture.call("update_handle", token=self.token, address=disabled, enabled=False)
        self.ask((burner, "first"))
        self.now[0] += 2 * 3600
        self.fixture.sweep()
        answers = self.ask(*[(handle, message) for handle in (disabled, expired, burner)
                             for message in ("a", "a", "b")])         # Postfix may ask twice about one message
        self.assertEqual(answers[:3], ["550 5.1.1 <%s>: this address is disabled" % disabled] * 3)
        self.assertEqual(answers[3:6], ["550 5.1.1 <%s>: this address has expired" % expired] * 3)
        self.assertEqual(answers[6:], ["550 5.1.1 <%s>: this address has received all the messages it accepts"
                                       % burner] * 3)
        for handle, received in ((disabled, 0), (expired, 0), (burner, 1)):
            listed = self.fixture.handle(self.token, handle)
            self.assertEqual((listed["blocked"], listed["received"]), (2, received), handle)
            self.assertEqual(listed["last_blocked"], im.iso_time(self.now[0]))
        unused = self.new_handle()
        self.assertEqual((self.fixture.handle(self.token, unused)["blocked"],
                          self.fixture.handle(self.token, unused)["last_blocked"]), (0, None))

    def test_raising_or_clearing_max_messages_reopens_a_used_up_handle_at_once(self):
        burner = self.new_handle(max_messages=1)
        self.ask((burner, "m1"))
        self.now[0] += 60
        self.fixture.sweep()
        self.assertIsNone(self.site.query(burner))
        self.fixture.call("update_handle", token=self.token, address=burner, handle_id=None, max_messages=3)
        self.assertEqual(self.site.query(burner), "me@example.org")
        self.assertEqual(self.ask((burner, "m2"), (burner, "m3"), (burner, "m4"))[2][:3], "550")
        self.now[0] += 60
        self.fixture.sweep()
        self.assertIsNone(self.site.query(burner))
        self.fixture.call("update_handle", token=self.token, address=burner, handle_id=None, max_messages=None)
        self.assertEqual(self.site.query(burner), "me@example.org")
        self.assertEqual(self.fixture.handle(self.token, burner)["state"], "enabled")
        self.assertEqual(self.ask((burner, "m5")), ["DUNNO"])

    def test_a_burner_used_up_after_it_expired_but_before_the_sweep_leaves_the_map(self):
        burner = self.new_handle("1h", max_messages=2)
        self.ask((burner, "m1"))
        self.now[0] += 3600 - 10
        async def accepted_then_written_late():
            self.assertEqual(await policy_action(self.front, {"protocol_state": "RCPT", "recipient": burner,
                                                               "instance": "m2"}), "DUNNO")
            self.now[0] += 20                                       # the count is written after the expiry
            await self.front._flush_received()
        asyncio.run(accepted_then_written_late())
        self.fixture.sweep()
        self.assertIsNone(self.site.query(burner), "an expired, used-up burner is still in the map")

    def test_the_socketmap_answers_notfound_for_expired_handles_at_once_and_used_up_ones_after_the_sweep(self):
        expiring, burner = self.new_handle("1h"), self.new_handle(max_messages=1)
        expires = self.fixture.handle(self.token, expiring)["expires"]

        def answer(handle):
            return self.front.socketmap_answer(("virtual %s" % handle).encode())
        found, notfound = im.netstring(b"OK me@example.org"), im.netstring(b"NOTFOUND ")
        self.assertEqual((answer(expiring), answer(burner)), (found, found))
        self.now[0] = from_iso(expires) - 1
        self.assertEqual(answer(expiring), found)
        self.now[0] = from_iso(expires)
        self.assertEqual(answer(expiring), notfound)                # before any sweep
        async def one_message():
            await policy_action(self.front, {"protocol_state": "RCPT", "recipient": burner, "instance": "x"})
        asyncio.run(one_message())      # written before it was let through
        self.assertEqual(answer(burner), found)     # its last message is still on its way
        self.now[0] += 60
        self.fixture.sweep()
        self.assertEqual(answer(burner), notfound)

    def test_concurrent_messages_to_a_burner_take_no_more_than_it_accepts(self):
        burner = self.new_handle(max_messages=2)

        async def overlapping():     # each arrives while earlier ones are being answered
            tasks = []
            for n in range(8):
                tasks.append(asyncio.ensure_future(policy_action(self.front, 
                    {"protocol_state": "RCPT", "recipient": burner, "instance": "m%d" % n})))
                await asyncio.sleep(0.002 * (n % 3))
            return await asyncio.gather(*tasks)
        answers = asyncio.run(overlapping())
        self.assertEqual(answers.count("DUNNO"), 2, answers)
        self.assertEqual(self.fixture.handle(self.token, burner)["received"], 2)
        self.assertEqual(self.front._burners, {})

    def test_postfix_asking_twice_about_one_message_gets_the_same_answer(self):
        burner = self.new_handle(max_messages=1)
        self.assertEqual(self.ask((burner, "m1"), (burner, "m1")), ["DUNNO", "DUNNO"])
        self.assertEqual(self.ask((burner, "m2"))[0][:3], "550")
        self.assertEqual(self.fixture.handle(self.token, burner)["received"], 1)

    def test_an_address_extension_is_counted_and_refused_as_its_handle(self):
        burner, expiring = self.new_handle(max_messages=1), self.new_handle("1h")
        local, domain = burner.split("@")
        extended = "%s+shop@%s" % (local, domain)
        self.assertEqual(self.ask((extended, "m1")), ["DUNNO"])
        self.assertEqual(self.ask((extended, "m2"))[0][:3], "550")
        self.assertEqual(self.fixture.handle(self.token, burner)["received"], 1)
        self.now[0] += 2 * 3600
        local, domain = expiring.split("@")
        self.assertIn("has expired", self.ask(("%s-news@%s" % (local, domain), "m3"))[0])

    def test_a_burner_whose_count_cannot_be_written_asks_the_sender_to_try_later(self):
        burner = self.new_handle(max_messages=3)
        with mock.patch.object(self.fixture.service, "record_mail",
                               side_effect=im.StoreError("the database is not available")), \
                self.assertLogs(im.log, logging.ERROR):
            self.assertEqual(self.ask((burner, "m1"))[0][:3], "451")
        self.assertEqual(self.fixture.handle(self.token, burner)["received"], 0)

    def test_a_limit_raised_after_use_keeps_the_handle_in_the_map_across_a_restart(self):
        burner = self.new_handle(max_messages=1)
        self.ask((burner, "m1"))
        self.fixture.call("update_handle", token=self.token, address=burner, handle_id=None, max_messages=5)
        self.fixture.stop()
        again = self.start_service(self.site, clock=lambda: self.now[0])
        self.assertEqual(self.site.query(burner), "me@example.org")
        self.assertEqual(im.json_value(again.result("list_handles", token=self.token),
                                       self.now[0])["handles"][0]["state"], "enabled")

    def test_a_map_rebuilt_after_a_failed_undo_holds_what_the_last_sweep_left(self):
        expiring = self.new_handle("1h")
        self.now[0] += 3600 + 5            # expired, the sweep has not run yet
        service = self.fixture.service
        service.table.needs_rebuild = True
        service._rebuild_map()
        self.fixture.call("update_handle", token=self.token, address=expiring, handle_id=None, expires="30d")
        self.assertEqual(self.site.query(expiring), "me@example.org")


class BurnerChangedWhileWaitingTest(PostmapTestCase):
    """Messages waiting for a burner's count are answered as the burner is when their turn
    comes: deleted, they get DUNNO (Postfix then refuses the unknown address), and nothing of
    the burner is left behind."""

    def test_a_burner_deleted_while_a_message_waits_answers_it_and_leaves_no_lock(self):
        site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % free_port()}})
        fixture = self.start_service(site)
        token = fixture.new_account()
        burner = fixture.new_handle(token, max_messages=5)
        front = im.PostfixFront(site.config, fixture.service)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        async def run():
            fixture.service.write(lambda work: (entered.set(), release.wait(30)), {})
            await asyncio.get_running_loop().run_in_executor(None, entered.wait, 10)
            first = asyncio.ensure_future(policy_action(front, {"protocol_state": "RCPT",
                                                                "recipient": burner, "instance": "m1"}))
            second = asyncio.ensure_future(policy_action(front, {"protocol_state": "RCPT",
                                                                 "recipient": burner, "instance": "m2"}))
            await asyncio.sleep(0.2)
            deleting = fixture.submit("delete_handle", token=token, address=burner)
            release.set()
            answers = await asyncio.gather(first, second)
            await asyncio.wrap_future(deleting)
            return answers
        self.assertEqual(asyncio.run(run()), ["DUNNO", "DUNNO"])
        self.assertEqual(front._burners, {})


ATTACK_READERS = 20         # connections keeping 16 list_handles in flight, reading every reply
RICH_HANDLES = 500          # with 200-character labels: a whole-account reply would be ~250 KB


class RefuseAsUnknownTest(PostmapTestCase):
    """RefuseAsUnknown (server-wide) and refuse_as_unknown (a handle's own): a switched-off or
    ended handle is refused exactly as an address that does not exist, and still counted."""

    def front(self, server_wide, main_cf=None):
        self.now = [T0]
        site = make_site(self, sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % free_port(),
                                                     "RefuseAsUnknown": server_wide}})
        if main_cf is not None:
            write_postfix_config_dir(site.config.postfix_config_dir, main_cf)
        self.fixture = ServiceFixture(self, site, clock=lambda: self.now[0]).start()
        self.token = self.fixture.new_account()
        return im.PostfixFront(site.config, self.fixture.service, clock=lambda: self.now[0])

    def ask(self, front, recipient):
        return asyncio.run(policy_action(front, {"protocol_state": "RCPT", "recipient": recipient,
                                                 "instance": uuid.uuid4().hex}))

    def test_a_disabled_handle_is_left_to_postfix_and_an_expired_one_gets_its_words(self):
        front = self.front("yes")
        disabled = self.fixture.new_handle(self.token)
        self.fixture.call("update_handle", token=self.token, address=disabled, enabled=False)
        expiring = self.fixture.new_handle(self.token, expires="1h")
        self.now[0] += 2 * 3600           # expired, not swept yet: still in the map
        self.assertEqual(self.ask(front, disabled), "DUNNO")
        self.assertEqual(self.ask(front, expiring), "550 5.1.1 User unknown in virtual alias table")
        asyncio.run(front._flush_received())
        self.assertEqual(self.fixture.handle(self.token, disabled)["blocked"], 1)

    def test_a_local_domain_gets_the_words_of_the_local_recipient_table(self):
        # a canonical map (README.md's local delivery): the domain is in mydestination, and
        # Postfix says "User unknown in local recipient table" of an address it does not know
        front = self.front("yes", main_cf="mydestination = localhost, incognito.test\n"
                                          "recipient_canonical_maps = hash:/nonexistent\n")
        expiring = self.fixture.new_handle(self.token, expires="1h")
        self.now[0] += 2 * 3600
        self.assertEqual(self.ask(front, expiring), "550 5.1.1 User unknown in local recipient table")

    def test_a_handle_may_choose_otherwise_than_the_server(self):
        front = self.front("no")
        quiet, loud = self.fixture.new_handle(self.token), self.fixture.new_handle(self.token)
        self.fixture.call("update_handle", token=self.token, address=quiet, enabled=False, refuse_as_unknown=True)
        self.fixture.call("update_handle", token=self.token, address=loud, enabled=False)
        self.assertEqual(self.ask(front, quiet), "DUNNO")
        self.assertIn("this address is disabled", self.ask(front, loud))
        self.assertIs(self.fixture.handle(self.token, quiet)["refuse_as_unknown"], True)
        self.assertIsNone(self.fixture.handle(self.token, loud)["refuse_as_unknown"])


class MailFlowUnderAttackTest(HoldingTestCase):
    """One account's owner keeps many list_handles in flight on many connections and reads
    every reply: Postfix's questions, a burner's count and another account's new handle are
    answered at once all the same, the burner lets exactly its limit through, and the server's
    memory stays bounded. (Before mail flow had a thread of its own and owners their turns and
    budget, the same load held a burner's answer 7 s and another account's new handle 3 s.)"""

    def prepare(self):
        self.rich = seed_account(self.site, numbered_handles(RICH_HANDLES, label="x" * 200),
                                 "rich@example.org")

    def read_hard(self, stopping, replies, errors):
        frame = json_frame(id=1, op="list_handles", token=self.rich)
        client = None
        try:
            client = WsClient(self.port, timeout=60)
            client.sock.sendall(frame * 16)
            while not stopping.is_set():
                client.recv()
                replies.append(1)
                client.sock.sendall(frame)
        except (OSError, ConnectionError, AssertionError) as e:
            if not stopping.is_set():
                errors.append(e)
        finally:
            if client is not None:
                client.close()

    def timed(self, function, *args):
        started = time.monotonic()
        result = function(*args)
        return time.monotonic() - started, result

    def test_mail_flow_and_other_accounts_are_answered_at_once_while_one_account_reads_hard(self):
        plain = new_handle(self.site, self.token)
        burner = new_handle(self.site, self.token, max_messages=3)
        before = rss_bytes(self.daemon.pid)
        stopping, replies, errors = threading.Event(), [], []
        readers = [threading.Thread(target=self.read_hard, args=(stopping, replies, errors))
                   for _ in range(ATTACK_READERS)]
        for reader in readers:
            reader.start()
        try:
            self.assertTrue(wait_until(lambda: len(replies) > 150, timeout=30), len(replies))
            waits = []
            for _ in range(20):
                with connect_unix(self.socketmap_path) as sock:
                    took, answer = self.timed(socketmap_ask, sock, plain)
                self.assertEqual(answer, b"OK alice@example.org")
                waits.append(("socketmap", took))
                waits.append(("policy",) + self.timed(ask_policy, self.policy_port, plain)[:1])
            for _ in range(5):
                waits.append(("new handle",) + self.timed(new_handle, self.site, self.token)[:1])
            burner_answers = []

            def message():
                burner_answers.append(self.timed(ask_policy, self.policy_port, burner))
            senders = [threading.Thread(target=message) for _ in range(6)]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(60)
            grown = rss_bytes(self.daemon.pid) - before
        finally:
            stopping.set()
            for reader in readers:
                reader.join(30)
        self.assertEqual(errors, [])
        waits += [("burner", took) for took, _ in burner_answers]
        slow = [(what, round(took, 3)) for what, took in waits
                if took > (1.5 if what == "new handle" else 0.5)]
        self.assertEqual(slow, [], "answers that waited while one account read hard")
        self.assertEqual(sorted(answer[:10] for _, answer in burner_answers),
                         ["action=550"] * 3 + ["action=DUN"] * 3)
        self.assertLess(grown, 48 << 20)


class PolicyServiceTest(PolicyInstanceTestCase):
    """Postfix asks the daemon about every recipient: counts, disabled handles, mail keeps flowing."""

    def restart(self, site, daemon):
        """Stop the daemon, which writes every count it still holds, and start another: a late
        (double) count would be in the database by then."""
        self.assertEqual(daemon.stop(), 0)
        return start_daemon(self, site)

    def test_mail_to_a_handle_is_counted_once_per_message_in_list_and_list_json(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle, quiet = self.run_cli(site, "new", "handle", token), self.run_cli(site, "new", "handle", token)
        started = time.time()
        for _ in range(2):
            self.assert_delivered(handle, "alice")
        counted = wait_counted(self, site, token, handle, received=2)
        self.restart(site, daemon)                          # any late double count lands by now
        counted = listed(self, site, token)[handle]
        self.assertEqual(counted["received"], 2)
        last = counted["last_received"]
        self.assertRegex(last, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        when = from_iso(last)
        self.assertLessEqual(abs(when - started), 120)
        self.assertEqual((listed(self, site, token)[quiet]["received"],
                          listed(self, site, token)[quiet]["last_received"]),
                         (0, None))
        line = next(l for l in self.run_cli(site, "list", token).splitlines() if l.startswith(handle))
        self.assertIn("received 2", line)
        self.assertIn(last, line)

    def test_disabled_handle_is_rejected_with_550_by_the_policy_service_and_not_counted(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        self.run_cli(site, "disable", "handle", handle, token)
        text = self.assert_rejected_at_rcpt(handle, 550)
        self.assertIn("disabled", text)
        self.run_cli(site, "enable", "handle", handle, token)
        self.assert_delivered(handle, "alice")
        wait_counted(self, site, token, handle, received=1)
        self.restart(site, daemon)
        self.assertEqual(listed(self, site, token)[handle]["received"], 1)

    def test_counts_survive_a_daemon_restart(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        self.assert_delivered(handle, "alice")
        self.assertEqual(daemon.stop(), 0)               # at once: before the periodic write
        start_daemon(self, site)
        self.assertEqual(listed(self, site, token)[handle]["received"], 1)

    def test_postfix_keeps_delivering_while_the_daemon_is_stopped(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        self.assertEqual(daemon.stop(), 0)
        self.assert_delivered(handle, "alice")
        self.assert_rejected_at_rcpt("nosuch@incognito.test")

    def test_prune_removes_never_used_handles_and_keeps_used_ones(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        used, unused = self.run_cli(site, "new", "handle", token), self.run_cli(site, "new", "handle", token)
        self.assert_delivered(used, "alice")
        wait_counted(self, site, token, used, received=1)
        self.assertEqual(self.run_cli(site, "prune", "--handles-unused-days", "0", "--dry-run"), unused)
        self.assertEqual(set(listed(self, site, token)), {used, unused})
        self.assertEqual(self.run_cli(site, "prune", "--handles-unused-days", "0"), unused)
        self.assertEqual(set(listed(self, site, token)), {used})
        self.assertEqual(self.pf.rcpt_check(unused)[0], 550)
        self.assert_delivered(used, "alice")
        self.assertEqual(self.run_cli(site, "prune", "--handles-unused-days", "0"), "")

    def test_policy_protocol_many_requests_per_connection_and_bad_ones_close_only_their_own(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        handle = self.run_cli(site, "new", "handle", token)
        good = socket.create_connection(("127.0.0.1", self.policy_port), timeout=10)
        self.addCleanup(good.close)
        good.sendall(policy_request(handle) + policy_request("nosuch@incognito.test") + policy_request("x@example.org"))
        answers = b""
        while answers.count(b"\n\n") < 3:
            chunk = good.recv(4096)
            self.assertTrue(chunk, "connection closed early")
            answers += chunk
        self.assertEqual(answers, b"action=DUNNO\n\n" * 3)
        for garbage in (b"\x00\xff\xfe binary garbage\n\n", b"no equals sign here\n\n", b"recipient=" + b"x" * 70000):
            with self.subTest(garbage=garbage[:20]):
                bad = socket.create_connection(("127.0.0.1", self.policy_port), timeout=10)
                self.addCleanup(bad.close)
                try:
                    bad.sendall(garbage)
                    self.assertEqual(bad.recv(4096), b"", "a malformed request got an answer")
                except ConnectionResetError:
                    pass
                good.sendall(policy_request(handle))
                self.assertEqual(read_policy_answer(good), b"action=DUNNO\n\n")
        self.assertIn("policy service", daemon.log())
        self.assertIsNone(daemon.proc.poll())


class HandleLifetimeDeliveryTest(PolicyInstanceTestCase):
    """Expiry, burners and blocked counts with real mail: Postfix asks the policy service (as
    in PolicyServiceTest) and the test moves the daemon's clock instead of waiting."""

    def start_clocked(self, **kwargs):
        site = self.make_site()
        daemon = start_daemon(self, site, MovedClockDaemon, **kwargs)
        return site, daemon, new_account(site, "alice@mbox.test")

    def assert_refused(self, handle, words=None):
        """550 5.1.1 at RCPT; ``words``: the policy service's reason, which Postfix quotes after
        its own "<address>: Recipient address rejected:"."""
        code, text = self.pf.rcpt_check(handle)
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.1.1 <%s>: " % handle), text)
        if words:
            self.assertTrue(text.endswith("<%s>: %s" % (handle, words)), text)

    def test_an_expired_handle_is_refused_at_rcpt_at_once_and_leaves_the_map_at_the_sweep(self):
        site, daemon, token = self.start_clocked()
        made = control(site, "new_handle", token=token, expires="2h")["handle"]
        handle, expires = made["address"], from_iso(made["expires"])
        self.assert_delivered(handle, "alice")
        daemon.move_clock_to(expires - 5)
        self.assertEqual(self.pf.rcpt_check(handle)[0], 250)
        self.assertEqual(self.pf.query(handle), "alice@mbox.test")
        daemon.move_clock_to(expires + 0.5)
        self.assert_refused(handle, "this address has expired")
        self.assertTrue(wait_until(lambda: self.pf.query(handle) is None, timeout=10),
                        "the expired handle is still in the map:\n%s" % daemon.log())
        self.assertEqual(handles_of(site, token)[handle]["state"], "expired")

    def test_moving_the_expiry_forward_or_to_never_makes_an_expired_handle_deliver_again(self):
        site, daemon, token = self.start_clocked()
        made = control(site, "new_handle", token=token, expires="1h")["handle"]
        handle = made["address"]
        daemon.move_clock_to(from_iso(made["expires"]) + 60)
        self.assertTrue(wait_until(lambda: self.pf.query(handle) is None, timeout=10))
        line = self.run_cli(site, "expire", "handle", handle, token, "30d")
        self.assertEqual(line.split("\t")[:2], [handle, "enabled"])
        self.assert_delivered(handle, "alice")
        daemon.move_clock_to(daemon.now() + 31 * DAY)
        self.assert_refused(handle, "this address has expired")
        self.assertTrue(wait_until(lambda: self.pf.query(handle) is None, timeout=10))
        self.run_cli(site, "expire", "handle", handle, token, "never")
        self.assert_delivered(handle, "alice")
        self.assertIsNone(handles_of(site, token)[handle]["expires"])

    def test_a_burner_with_max_messages_2_delivers_two_messages_and_refuses_the_third(self):
        site, daemon, token = self.start_clocked()
        burner = new_handle(site, token, max_messages=2)
        for _ in range(2):
            self.assert_delivered(burner, "alice")
        ok, code, text, mark = self.pf.send(burner)
        self.assertFalse(ok, "the third message was accepted")
        self.assertEqual(code, 550, text)
        self.assertTrue(text.startswith("5.1.1 <%s>: " % burner), text)
        self.assertTrue(text.endswith("<%s>: this address has received all the messages it accepts" % burner), text)
        counted = wait_counted(self, site, token, burner, received=2, blocked=1)
        self.assertEqual((counted["received"], counted["blocked"], counted["state"]), (2, 1, "used up"))
        self.assertTrue(wait_until(lambda: self.pf.query(burner) is None, timeout=10),
                        "the used-up burner is still in the map")

    def test_refused_messages_raise_blocked_and_not_received(self):
        site, daemon, token = self.start_clocked()
        disabled = new_handle(site, token)
        control(site, "update_handle", token=token, address=disabled, enabled=False)
        expired = control(site, "new_handle", token=token, expires="1h")["handle"]
        burner = new_handle(site, token, max_messages=1)
        self.assert_delivered(burner, "alice")
        wait_counted(self, site, token, burner, received=1)
        daemon.move_clock_to(from_iso(expired["expires"]) + 60)
        expired = expired["address"]
        for handle in (disabled, expired, burner):
            for _ in range(2):
                self.assertEqual(self.pf.send(handle)[1], 550)
        for handle, received in ((disabled, 0), (expired, 0), (burner, 1)):
            counted = wait_counted(self, site, token, handle, blocked=2)
            self.assertEqual((counted["blocked"], counted["received"]), (2, received), handle)
            self.assertLessEqual(abs(from_iso(counted["last_blocked"]) - daemon.now()), 120)
        self.assertEqual(daemon.stop(), 0)                  # any late double count is written by now
        start_daemon(self, site, MovedClockDaemon)
        self.assertEqual([handles_of(site, token)[h]["blocked"] for h in (disabled, expired, burner)], [2, 2, 2])
        self.assertEqual([handles_of(site, token)[h]["received"] for h in (disabled, expired, burner)], [0, 0, 1])

    def test_prune_removes_long_expired_handles_and_nothing_else(self):
        site, daemon, token = self.start_clocked()
        old = new_handle(site, token, expires="1h")
        recent = new_handle(site, token, expires="9d")
        later = new_handle(site, token, expires="30d")
        forever = new_handle(site, token)
        unused_disabled = new_handle(site, token)
        control(site, "update_handle", token=token, address=unused_disabled, enabled=False)
        daemon.move_clock_to(daemon.now() + 10 * DAY)         # old expired 10 days ago, recent 1 day ago
        self.assertEqual(self.run_cli(site, "prune", "--handles-expired-days", "7", "--dry-run"), old)
        self.assertEqual(len(handles_of(site, token)), 5)
        self.assertEqual(self.run_cli(site, "prune", "--handles-expired-days", "7"), old)
        self.assertEqual(set(handles_of(site, token)), {recent, later, forever, unused_disabled})
        self.assert_refused(old)
        for handle in (later, forever):
            self.assert_delivered(handle, "alice")
        self.assertEqual(self.run_cli(site, "prune", "--handles-expired-days", "7"), "")

    def test_a_restart_after_sigkill_with_handles_that_expired_while_it_was_down_leaves_none_routable(self):
        site, daemon, token = self.start_clocked()
        expiring = [control(site, "new_handle", token=token, expires="1h")["handle"] for _ in range(3)]
        kept = new_handle(site, token, expires="30d")
        forever = new_handle(site, token)
        for handle in [h["address"] for h in expiring] + [kept, forever]:
            self.assertEqual(self.pf.query(handle), "alice@mbox.test")
        daemon.kill()
        daemon.move_clock_to(max(from_iso(h["expires"]) for h in expiring) + 60)
        start_daemon(self, site, MovedClockDaemon, sweep_seconds=3600)   # only the start can clear them
        for handle in [h["address"] for h in expiring]:
            self.assertIsNone(self.pf.query(handle), "an expired handle is routable after the restart")
            self.assert_refused(handle, "this address has expired")
        for handle in (kept, forever):
            self.assert_delivered(handle, "alice")

    def test_a_burner_used_up_just_before_a_sigkill_stays_closed_after_the_restart(self):
        site, daemon, token = self.start_clocked(flush_seconds=3600)   # counts not written yet
        burner = new_handle(site, token, max_messages=2)
        for _ in range(2):
            self.assert_delivered(burner, "alice")
        daemon.kill()
        start_daemon(self, site, MovedClockDaemon)
        self.assertIsNone(self.pf.query(burner), "a used-up burner is in the map after the restart")
        self.assert_refused(burner, "this address has received all the messages it accepts")


class SocketmapTest(SocketmapInstanceTestCase):
    """``SocketmapListen``: Postfix asks the daemon; a change is visible with no postmap at all."""

    def test_new_handles_receive_mail_sent_the_moment_they_are_made_with_no_postmap(self):
        site, daemon = self.start_without_postmap()
        token = new_account(site, "dave@mbox.test")
        marks = []
        for round in range(20):
            handle = new_handle(site, token)
            ok, code, text, mark = self.pf.send(handle)
            self.assertTrue(ok, "round %d: %s refused right after it was made: %s %s" % (round, handle, code, text))
            marks.append(mark)
        for mark in marks:
            self.assertTrue(self.pf.wait_for_mail("dave", mark))

    def test_deleted_and_disabled_handles_are_rejected_at_once(self):
        site, daemon = self.start_without_postmap()
        token = new_account(site, "dave@mbox.test")
        for round in range(10):
            handle = new_handle(site, token)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 250)
            control(site, "update_handle", token=token, address=handle, enabled=False)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 550, "round %d: disabled handle accepted" % round)
            control(site, "update_handle", token=token, address=handle, enabled=True)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 250, "round %d: enabled handle refused" % round)
            control(site, "delete_handle", token=token, address=handle)
            self.assertEqual(self.pf.rcpt_check(handle)[0], 550, "round %d: deleted handle accepted" % round)

    def test_socketmap_protocol_answers_ok_or_notfound_and_survives_garbage(self):
        site, daemon = self.start_without_postmap()
        token = new_account(site, "dave@mbox.test")
        handle = new_handle(site, token)
        disabled = new_handle(site, token)
        control(site, "update_handle", token=token, address=disabled, enabled=False)
        sock = connect_unix(self.socket_path)
        self.addCleanup(sock.close)
        self.assertEqual(socketmap_ask(sock, handle), b"OK dave@mbox.test")
        self.assertEqual(socketmap_ask(sock, handle.upper()), b"OK dave@mbox.test")
        self.assertEqual(socketmap_ask(sock, disabled), b"NOTFOUND ")
        self.assertEqual(socketmap_ask(sock, "nosuch@incognito.test"), b"NOTFOUND ")
        self.assertEqual(socketmap_ask(sock, handle.split("@")[0] + "@elsewhere.test"), b"NOTFOUND ")
        bad = connect_unix(self.socket_path)
        self.addCleanup(bad.close)
        bad.sendall(b"xyz:not a netstring")
        try:
            self.assertEqual(bad.recv(4096), b"")
        except ConnectionResetError:
            pass
        self.assertEqual(socketmap_ask(sock, handle), b"OK dave@mbox.test")
        done = self.pf.run("postmap", "-q", handle, "socketmap:unix:%s:virtual" % self.socket_path, check=False)
        self.assertEqual(done.stdout.strip(), "dave@mbox.test")

    def test_stopped_daemon_means_a_temporary_failure_not_a_bounce(self):
        site, daemon = self.start_without_postmap()
        token = new_account(site, "dave@mbox.test")
        handle = new_handle(site, token)
        self.assertEqual(daemon.stop(), 0)
        self.assertFalse(os.path.exists(self.socket_path), "socketmap socket left behind")
        code, text = self.pf.rcpt_check(handle)
        self.assertEqual(code // 100, 4, text)


class SocketmapExpiryTest(SocketmapInstanceTestCase):
    """With SocketmapListen (SocketmapTest's setup), an expired handle is NOTFOUND at once."""

    def test_an_expired_handle_is_notfound_at_once_and_found_again_when_its_expiry_moves(self):
        site, daemon = self.start_without_postmap(MovedClockDaemon, sweep_seconds=3600)
        token = new_account(site, "dave@mbox.test")
        made = control(site, "new_handle", token=token, expires="1h")["handle"]
        handle, expires = made["address"], from_iso(made["expires"])
        sock = connect_unix(self.socket_path)
        self.addCleanup(sock.close)
        self.assertEqual(socketmap_ask(sock, handle), b"OK dave@mbox.test")
        daemon.move_clock_to(expires - 5)
        self.assertEqual(socketmap_ask(sock, handle), b"OK dave@mbox.test")
        daemon.move_clock_to(expires + 0.5)
        self.assertEqual(socketmap_ask(sock, handle), b"NOTFOUND ")
        self.assertEqual(self.pf.rcpt_check(handle)[0], 550)
        control(site, "update_handle", token=token, address=handle, expires="never")
        self.assertEqual(socketmap_ask(sock, handle), b"OK dave@mbox.test")
        ok, code, text, mark = self.pf.send(handle)
        self.assertTrue(ok, "%s %s" % (code, text))
        self.assertTrue(self.pf.wait_for_mail("dave", mark))


class DeliverabilityTest(MailLabTestCase):
    """What leaves the forwarder with the milter (ReplyAddresses = yes), as the owner's provider
    judges it and as the sender sees it: SPF and DMARC pass for any sender, and neither a bounce,
    nor an auto-reply, nor the owner's reply tells the sender the owner's address."""

    OWNERS = ("ann.k7q@strict.example", "amy.k7q@gmail.example", "wes.k7q@gmail.example",
              "max.k7q@gmail.example", "ida.k7q@gmail.example", "ola.k7q@gmail.example")
    OWNER_ALIASES = (("liz.k7q@gmail.example", "liz.k7q@full.example"),)

    def test_mail_from_p_reject_senders_passes_spf_and_dmarc_at_a_strict_receiver(self):
        owner = "ann.k7q@strict.example"
        token, handle = self.new_owner(owner)
        for sender, sign in (("news@shop.example", True), ("news@plain.example", False)):
            with self.subTest(sender=sender, signed=sign):
                mark = self.forward(owner, handle, sender, sign)
                verdict = self.assert_verdict(mark, spf="pass", dmarc="pass", from_domain="incognito.test",
                                              ip=LAB_FORWARDER_IP, rejected=False)
                self.assertTrue(verdict["sender"].startswith(handle.split("@")[0] + "+b."), verdict)
                message = self.delivered(self.receiver, owner, mark)
                reply = im.reply_address(handle, sender)
                self.assertEqual(email.utils.parseaddr(message["From"]),
                                 ("Shop News - %s" % sender.replace("@", " at "), reply))
                self.assertEqual(message["Return-Path"], "<%s>" % verdict["sender"])
                self.assertIn("spf=pass", message["Authentication-Results"])
                self.assertIn("dmarc=pass header.from=incognito.test", message["Authentication-Results"])
        wait_counted(self, self.site, token, handle, received=2)

    def test_a_receiver_refusing_the_owner_at_rcpt_tells_the_sender_nothing_and_counts_the_bounce(self):
        owner = "gus.k7q@gmail.example"         # no such mailbox at the receiver
        token, handle = self.new_owner(owner)
        mark = self.forward(owner, handle)
        refused = lambda: [line for line in self.forwarder.maillog().splitlines()
                           if "to=<%s>" % owner in line and "status=bounced" in line and "550 5.1.1" in line]
        self.assertTrue(wait_until(refused, 20), self.forwarder.maillog()[-3000:])
        self.assert_sender_never_learns(owner)
        self.assertNotIn(mark.encode(), self.tap.received())
        # Postfix's own bounce passed the milter (non_smtpd_milters, internal_mail_filter_classes)
        self.wait_count(token, handle, "bounced", 1, timeout=20)

    def test_a_receiver_accepting_then_bouncing_tells_the_sender_nothing_and_counts_the_bounce(self):
        owner = "liz.k7q@gmail.example"         # an alias to a mailbox that is full
        token, handle = self.new_owner(owner)
        mark = self.forward(owner, handle)
        self.wait_count(token, handle, "bounced", 1, timeout=20)
        self.assert_sender_never_learns(owner)
        self.assertNotIn(mark.encode(), self.tap.received())
        counted = listed(self, self.site, token)[handle]
        self.assertEqual(counted["bounced"], 1)
        self.assertIsNotNone(counted["last_bounced"])

    def test_an_auto_reply_to_the_envelope_sender_comes_back_to_the_owner_and_is_counted(self):
        owner = "amy.k7q@gmail.example"
        token, handle = self.new_owner(owner)
        mark = self.forward(owner, handle)
        forwarded = self.delivered(self.receiver, owner, mark)
        return_path = forwarded["Return-Path"].strip("<>")
        self.assertEqual(im.read_handle_address(return_path, ("incognito.test",), milter_secret(self.site),
                                                time.time()).kind, im.BOUNCE)
        # the owner's provider answers for them while they are away, to the envelope sender
        away = uuid.uuid4().hex
        answers, data = self.send_from_owner(owner, [return_path], (
            "From: Amy <%s>\r\nTo: %s\r\nSubject: Away %s\r\nAuto-Submitted: auto-replied\r\n"
            "In-Reply-To: <%s@shop.example>\r\n\r\nI am away until Monday (%s, %s).\r\n"
            % (owner, return_path, away, mark, owner, away)).encode())
        self.assertEqual((answers[return_path][0], data[0]), (250, 250), (answers, data))
        self.delivered(self.receiver, owner, away)
        self.wait_count(token, handle, "bounced", 1)
        self.assert_sender_never_learns(owner)

    def test_mail_to_a_bounce_address_with_a_sender_tells_that_sender_nothing(self):
        owner = "zed.k7q@gmail.example"         # no such mailbox: the owner's provider refuses it
        token, handle = self.new_owner(owner)
        # a bounce address is the envelope sender of what the owner sends: anyone may write to it
        bounce = im.bounce_address(handle, milter_secret(self.site), time.time())
        mark = uuid.uuid4().hex
        answers, data = self.send_to_forwarder("news@shop.example", [bounce],
                                               self.message("news@shop.example", bounce, mark))
        self.assertEqual((answers[bounce][0], data[0]), (250, 250), (answers, data))
        self.wait_count(token, handle, "bounced", 1)
        self.assert_sender_never_learns(owner)

    def test_a_handle_written_as_postfix_also_routes_it_is_rewritten_all_the_same(self):
        owner = "ola.k7q@gmail.example"
        token, handle = self.new_owner(owner)
        local, _, domain = handle.partition("@")
        for recipient in ('"%s"@%s' % (local, domain), "%s@%s" % (local.upper(), domain.upper())):
            with self.subTest(recipient=recipient):
                mark = uuid.uuid4().hex
                answers, data = self.send_to_forwarder("news@shop.example", [recipient],
                                                       self.message("news@shop.example", recipient, mark))
                self.assertEqual(data[0], 250, (answers, data))
                message = self.delivered(self.receiver, owner, mark)
                self.assertTrue(message["Return-Path"].startswith("<%s+b." % local), message["Return-Path"])
                self.assertEqual(email.utils.parseaddr(message["From"])[1],
                                 im.reply_address(handle, "news@shop.example"))

    def test_the_owners_reply_and_first_message_leave_from_the_handle(self):
        owner = "wes.k7q@gmail.example"
        token, handle = self.new_owner(owner)
        mark = self.forward(owner, handle, "orders@shop.example")
        forwarded = self.delivered(self.receiver, owner, mark)
        written_from = " ".join(forwarded["From"].split())      # unfolded, as a mail program copies it
        reply_to = email.utils.parseaddr(written_from)[1]
        self.assertEqual(reply_to, im.reply_address(handle, "orders@shop.example"))
        for correspondent, recipient, in_reply_to in (
                ("orders@shop.example", reply_to, forwarded["Message-ID"]),
                ("sales@plain.example", im.reply_address(handle, "sales@plain.example"), None)):
            with self.subTest(correspondent=correspondent):
                answer = uuid.uuid4().hex
                headers = [("From", "Wes Owner <%s>" % owner), ("To", written_from if in_reply_to else recipient),
                           ("Cc", owner), ("Subject", "Re: %s" % answer), ("Date", email.utils.formatdate()),
                           ("Message-ID", "<%s@mail.gmail.example>" % answer), ("User-Agent", "Owner Mail 1.0"),
                           ("Reply-To", owner), ("Disposition-Notification-To", owner),
                           ("X-Originating-IP", "[198.51.100.7]")]
                if in_reply_to:
                    headers.append(("In-Reply-To", in_reply_to))
                data = ("".join("%s: %s\r\n" % h for h in headers) + "\r\nThanks, %s\r\n" % answer).encode()
                answers, reply = self.send_from_owner(owner, [recipient], data)
                self.assertEqual((answers[recipient][0], reply[0]), (250, 250), (answers, reply))
                arrived = self.delivered(self.sender, correspondent, answer)
                self.assertEqual(email.utils.parseaddr(arrived["From"]), ("", handle))
                self.assertEqual(email.utils.parseaddr(arrived["To"])[1], correspondent)
                self.assertEqual(email.utils.getaddresses(arrived.get_all("Cc")), [("", handle)])
                self.assertRegex(arrived["Message-ID"], r"^<[0-9a-f]{32}@incognito\.test>$")
                self.assertEqual(arrived["In-Reply-To"], in_reply_to)
                for name in ("User-Agent", "Reply-To", "Disposition-Notification-To", "X-Originating-IP",
                             "Authentication-Results", "DKIM-Signature"):
                    self.assertIsNone(arrived[name], name)
                bounce = arrived["Return-Path"].strip("<>")
                self.assertEqual(im.read_handle_address(bounce, ("incognito.test",), milter_secret(self.site),
                                                        time.time()), (handle, im.BOUNCE, None))
                self.assertNotIn("wes.k7q", arrived.as_string())
                self.assertFalse([h for h in arrived.items() if "wes.k7q" in h[1]])
        self.wait_count(token, handle, "sent", 2)
        self.assert_sender_never_learns(owner)

    def test_anyone_else_writing_through_a_reply_address_is_refused(self):
        owner = "ida.k7q@gmail.example"
        token, handle = self.new_owner(owner)
        reply = im.reply_address(handle, "news@shop.example")
        mark = uuid.uuid4().hex
        answers, data = self.send_to_forwarder("news@plain.example", [reply],
                                               self.message("news@plain.example", reply, mark))
        self.assertEqual((answers[reply][0], data[0]), (250, 550), (answers, data))
        self.assertIn("5.7.1 only the owner of %s" % handle, data[1])
        # the owner's address in the envelope, another in From:
        answers, data = self.send_to_forwarder(owner, [reply], self.message("news@plain.example", reply, mark))
        self.assertEqual((answers[reply][0], data[0]), (250, 550), (answers, data))
        self.assertIn("only the owner", data[1])
        self.settled()
        self.assertNotIn(mark.encode(), self.tap.received())
        self.assertEqual(self.counts(token, handle)["sent"], 0)

    def test_a_forged_or_expired_bounce_address_is_refused(self):
        token, handle = self.new_owner("rex.k7q@gmail.example")
        secret = milter_secret(self.site)
        good = im.bounce_address(handle, secret, time.time())
        forged = good[:good.index("@") - 10] + "abcdefghij" + good[good.index("@"):]
        expired = im.bounce_address(handle, secret, time.time() - 22 * DAY)
        answers, _ = self.send_to_forwarder("", [forged, expired, good], None)
        for address in (forged, expired):
            self.assertEqual(answers[address][0], 550, answers)
            self.assertIn("5.1.1", answers[address][1])
        self.assertEqual(answers[good][0], 250, answers)

    def test_a_handle_and_another_recipient_are_sent_apart_and_the_other_arrives_unchanged(self):
        owner = "max.k7q@gmail.example"
        token, handle = self.new_owner(owner)
        mark = uuid.uuid4().hex
        message = self.message("news@shop.example", "%s, friend@incognito.test" % handle, mark, sign=True)
        answers, data = self.send_to_forwarder("news@shop.example", [handle, "friend@incognito.test"], message)
        self.assertEqual(answers[handle][0], 250, answers)
        self.assertEqual(answers["friend@incognito.test"][0], 452, answers)
        self.assertIn("4.5.3", answers["friend@incognito.test"][1])
        self.assertEqual(data[0], 250, data)
        self.assertEqual(self.delivered(self.receiver, owner, mark)["Return-Path"].partition("+")[0],
                         "<" + handle.partition("@")[0])
        # the sender sends it again, alone: the admin's own address is no handle, nothing changes
        answers, data = self.send_to_forwarder("news@shop.example", ["friend@incognito.test"], message)
        self.assertEqual((answers["friend@incognito.test"][0], data[0]), (250, 250), (answers, data))
        arrived = self.delivered(self.receiver, "friend@gmail.example", mark)
        self.assertEqual(arrived["Return-Path"], "<news@shop.example>")
        self.assertEqual(arrived["From"], '"Shop News" <news@shop.example>')
        self.assert_verdict(mark, dkim=[("shop.example", "pass")])
        self.assertEqual(len([m for m in self.receiver.messages(owner) if mark in m.as_string()]), 1)


class DeliverabilityWithoutReplyAddressesTest(MailLabTestCase):
    """ReplyAddresses = no: headers stay as they came, so a signed sender's DKIM signature stays
    intact and SPF passes for the bounce address, while an unsigned p=reject sender fails DMARC
    and a strict receiver refuses it; the sender learns nothing either way."""

    REPLY_ADDRESSES = "no"
    OWNERS = ("ann.k7q@gmail.example", "ben.k7q@strict.example")

    def test_a_signed_sender_keeps_its_dkim_signature_and_spf_passes(self):
        owner = "ann.k7q@gmail.example"
        token, handle = self.new_owner(owner)
        mark = self.forward(owner, handle, "news@shop.example", sign=True)
        verdict = self.assert_verdict(mark, spf="pass", dkim=[("shop.example", "pass")], dmarc="pass",
                                      from_domain="shop.example", rejected=False)
        self.assertTrue(verdict["sender"].startswith(handle.split("@")[0] + "+b."), verdict)
        message = self.delivered(self.receiver, owner, mark)
        self.assertEqual(message["From"], '"Shop News" <news@shop.example>')
        self.assertIn("dkim=pass header.d=shop.example", message["Authentication-Results"])

    def test_an_unsigned_p_reject_sender_is_refused_at_data_and_the_sender_learns_nothing(self):
        owner = "ben.k7q@strict.example"
        token, handle = self.new_owner(owner)
        mark = self.forward(owner, handle, "news@plain.example", sign=False)
        self.assert_verdict(mark, spf="pass", dkim=[], dmarc="fail", rejected=True)
        self.assertTrue(wait_until(lambda: "rejected by the DMARC policy of plain.example" in self.forwarder.maillog(),
                                   15), self.forwarder.maillog()[-3000:])
        # the forwarder's bounce goes to the bounce address, that is to the owner
        dsn = self.delivered(self.receiver, owner, mark)
        self.assertIn("MAILER-DAEMON", dsn["From"])
        self.assert_sender_never_learns(owner)
        self.assertNotIn(mark.encode(), self.tap.received())


###############################################################################
# Fronts: the control socket (the command line)
###############################################################################

class ControlSocketAccessTest(PostmapTestCase):
    """The control socket: mode 0600 in the server's own folder, and a SO_PEERCRED check."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        require_root_tools()

    def setUp(self):
        self.site = self.make_site()

    def test_control_socket_is_mode_0600_in_a_folder_the_server_owns(self):
        start_daemon(self, self.site)
        folder = os.stat(os.path.dirname(self.site.socket_path))
        self.assertEqual(folder.st_uid, os.geteuid())
        self.assertEqual(stat.S_IMODE(folder.st_mode) & 0o022, 0, "others may write to the socket's folder")
        sock = os.stat(self.site.socket_path)
        self.assertTrue(stat.S_ISSOCK(sock.st_mode))
        self.assertEqual(stat.S_IMODE(sock.st_mode), 0o600)

    def run_cli_as_nobody(self, *args):
        """The command line as user nobody (runuser), from a copy of the module it may read."""
        python, runuser = OTHER_USERS_PYTHON, _which("runuser")
        require_root_tools("runuser", python)
        module = os.path.join(self.site.folder, "incognitomail.py")
        shutil.copy(MODULE, module)
        os.chmod(module, 0o644)
        return subprocess.run([runuser, "-u", "nobody", "--", python, module, "-c", self.site.config_path] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=60,
                              cwd="/")

    def open_socket_folder(self):
        folder = os.path.dirname(self.site.socket_path)
        os.makedirs(folder, mode=0o755)
        os.chmod(folder, 0o755)

    def test_another_users_command_line_cannot_open_the_socket(self):
        self.open_socket_folder()                         # only the socket's own mode stops them
        start_daemon(self, self.site)
        done = self.run_cli_as_nobody("new", "account", "mallory@example.org")
        self.assertEqual(done.returncode, 1, done)
        self.assertIn("permission denied", done.stderr)
        result = run_as_user(NOBODY_UID, lambda: im.ControlClient(self.site.config).request("status"))
        self.assertTrue(result.startswith("ServerError"), result)
        self.assertEqual(control(self.site, "status")["status"]["accounts"], 0)

    def test_another_user_is_refused_by_the_server_even_when_the_file_lets_them_in(self):
        self.open_socket_folder()
        daemon = start_daemon(self, self.site)
        os.chmod(self.site.socket_path, 0o666)                  # as a careless admin might
        for op, fields in (("status", {}), ("new_account", {"address": "mallory@example.org"})):
            result = run_as_user(NOBODY_UID, lambda: im.ControlClient(self.site.config).request(op, **fields))
            self.assertFalse(result.startswith("ok"), result)
        done = self.run_cli_as_nobody("new", "account", "mallory@example.org")
        self.assertEqual(done.returncode, 1, done)
        self.assertEqual(done.stdout, "")
        status = control(self.site, "status")["status"]
        self.assertEqual(status["accounts"], 0)
        self.assertIn("refused a command-line connection from user nobody", daemon.log())

    def test_refused_user_is_told_why_every_time(self):
        self.open_socket_folder()
        start_daemon(self, self.site)
        os.chmod(self.site.socket_path, 0o666)
        results = [run_as_user(NOBODY_UID, lambda: im.ControlClient(self.site.config).request("status"))
                   for _ in range(20)]
        told = [r for r in results if r.startswith("Unauthorized") and "only root and user" in r]
        self.assertEqual(len(told), len(results), "refused without the reason: %s" % sorted(set(results)))
        done = self.run_cli_as_nobody("status")
        self.assertIn("only root and user", done.stderr)


###############################################################################
# Daemon
###############################################################################

class DaemonLifecycleTest(PostmapTestCase):
    """``incognitomail.py -c CONFIG`` runs the server in the foreground."""

    def setUp(self):
        self.site = self.make_site(admin_lines=ADMIN_LINES)

    def assert_gone(self):
        self.assertFalse(os.path.exists(self.site.socket_path), "socket left behind")
        self.assertFalse(os.path.exists(self.site.config.lock_file_path), "lock file left behind")

    def test_second_server_with_the_same_lock_file_is_refused_naming_pid_and_lock(self):
        first = start_daemon(self, self.site)
        log = failed_start(self, self.site)
        self.assertIn("already running (pid %d, lock %s)" % (first.pid, self.site.config.lock_file_path), log)
        self.assertEqual(cli(self.site, "status").returncode, 0, "the first server was disturbed")
        self.assertEqual(im.running_pid(self.site.config), first.pid)

    def test_sigterm_stops_gracefully_removing_socket_and_lock(self):
        daemon = start_daemon(self, self.site)
        self.assertTrue(os.path.exists(self.site.config.lock_file_path))
        self.assertEqual(daemon.stop(signal.SIGTERM), 0)
        self.assert_gone()
        self.assertIn("stopped", daemon.log())
        self.assertNotIn("Traceback", daemon.log())

    def test_sigint_stops_gracefully_too(self):
        daemon = start_daemon(self, self.site)
        self.assertEqual(daemon.stop(signal.SIGINT), 0)
        self.assert_gone()

    def test_stop_command_stops_the_server(self):
        daemon = start_daemon(self, self.site)
        done = cli(self.site, "stop")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(str(daemon.pid), done.stderr)
        self.assertEqual(daemon.wait_exit(), 0)
        self.assert_gone()

    def test_request_in_flight_when_sigterm_arrives_is_finished(self):
        folder, _, slow_flag = failing_postmap_folder(self)
        daemon = start_daemon(self, self.site, env=dict(os.environ, PATH=path_with(folder)))
        token = new_account(self.site, "me@example.org")
        open(slow_flag, "w").close()
        command = subprocess.Popen(module_command("-c", self.site.config_path, "new", "handle", token),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                   env=module_env(), cwd=HERE)
        self.addCleanup(command.wait)
        self.addCleanup(command.kill)
        self.assertTrue(wait_until(lambda: os.path.exists(slow_flag + ".started"), 20), "postmap never ran")
        daemon.send_signal(signal.SIGTERM)
        out, err = command.communicate(timeout=60)
        self.assertEqual(command.returncode, 0, err)
        handle = out.strip()
        self.assertRegex(handle, r"^[a-z0-9]{16}@incognito\.test$")
        self.assertEqual(daemon.wait_exit(), 0)
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertIn("%s me@example.org" % handle, self.site.our_lines())

    def test_stale_socket_left_by_a_crash_is_handled_at_the_next_start(self):
        daemon = start_daemon(self, self.site)
        token = new_account(self.site, "me@example.org")
        handle = new_handle(self.site, token)
        daemon.kill()
        self.assertTrue(stat.S_ISSOCK(os.lstat(self.site.socket_path).st_mode), "no stale socket to test with")
        again = start_daemon(self, self.site)
        done = cli(self.site, "list", token)
        self.assertEqual(done.returncode, 0, done.stderr + again.log())
        self.assertEqual(done.stdout.split()[0], handle)
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertEqual(im.running_pid(self.site.config), again.pid)

    def test_crash_during_a_change_leaves_the_map_matching_the_database(self):
        daemon = start_daemon(self, self.site)
        token = new_account(self.site, "me@example.org")
        handles = [new_handle(self.site, token) for _ in range(2)]
        control(self.site, "delete_handle", token=token, address=handles[0])
        daemon.kill()                                   # the text file still has the deleted line
        start_daemon(self, self.site)
        self.assertIsNone(self.site.query(handles[0]))
        self.assertEqual(self.site.query(handles[1]), "me@example.org")
        self.assertEqual(self.site.our_lines(), {"%s me@example.org" % handles[1]})

    def test_crash_between_the_map_update_and_the_commit_leaves_nothing_routable_but_unknown(self):
        bin_folder, _, slow_flag = failing_postmap_folder(self)
        env = dict(os.environ, PATH=path_with(bin_folder))
        daemon = start_daemon(self, self.site, env=env)
        token = new_account(self.site, "me@example.org")
        kept = new_handle(self.site, token)
        open(slow_flag, "w").close()                    # the next postmap waits 1 s, then runs
        creating = subprocess.Popen(module_command("-c", self.site.config_path, "new", "handle", token),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=module_env(), cwd=HERE)
        self.addCleanup(creating.communicate)
        self.addCleanup(creating.kill)
        self.assertTrue(wait_until(lambda: os.path.exists(slow_flag + ".started")), "postmap was not started")
        [line] = [l for l in self.site.our_lines() if not l.startswith(kept)]
        doomed = line.split()[0]                       # appended to the text file, not yet committed
        daemon.kill()
        out, _ = creating.communicate(timeout=10)
        self.assertEqual((creating.returncode, out), (1, b""))   # never reported to anyone
        wait_until(lambda: self.site.query(doomed) is not None)   # the orphaned postmap -i lands the key
        self.assertEqual(self.site.query(doomed), "me@example.org")
        os.unlink(slow_flag)
        start_daemon(self, self.site, env=env)
        self.assertIsNone(self.site.query(doomed))
        self.assertEqual(self.site.query(kept), "me@example.org")
        self.assertEqual(self.site.our_lines(), {"%s me@example.org" % kept})
        self.assertEqual(list(listed(self, self.site, token)), [kept])

    def test_database_of_a_newer_version_stops_the_start_with_a_clear_error(self):
        db = sqlite3.connect(self.site.config.database_path)
        db.execute("PRAGMA user_version = %d" % (im.SCHEMA_VERSION + 1))
        db.close()
        log = failed_start(self, self.site)
        self.assertIn("newer than this program understands", log)
        self.assertIn(self.site.config.database_path, log)
        self.assertIsNone(im.running_pid(self.site.config))

    def test_start_fails_clearly_when_the_maps_folder_is_missing(self):
        missing = os.path.join(self.site.folder, "no-such-folder")
        site = Site(self.site.folder, map_path=os.path.join(missing, "virtual"),
                    config_dir=self.site.config.postfix_config_dir)
        log = failed_start(self, site)
        self.assertIn(missing, log)
        self.assertIn("MapFilePath", log)

    def test_start_fails_clearly_when_the_postfix_config_dir_has_no_main_cf(self):
        empty = make_folder(self)
        site = Site(self.site.folder, map_path=self.site.map_path, config_dir=empty)
        log = failed_start(self, site)
        self.assertIn("main.cf", log)
        self.assertIn("ConfigDir", log)

    def test_start_fails_clearly_when_postmap_fails(self):
        folder, _, _ = failing_postmap_folder(self, mode="always-fail")
        log = failed_start(self, self.site, env=dict(os.environ, PATH=path_with(folder)))
        self.assertIn("simulated failure", log)
        self.assertIn(self.site.map_path, log)
        self.assertIsNone(im.running_pid(self.site.config))

    def test_start_as_a_user_who_cannot_write_the_maps_folder_fails_naming_path_user_and_fix(self):
        python, runuser = OTHER_USERS_PYTHON, _which("runuser")
        require_root_tools("runuser", python)
        home = os.path.join(self.site.folder, "nobody")
        os.mkdir(home)
        os.chown(home, NOBODY_UID, NOBODY_UID)
        site = Site(home, map_path=self.site.map_path, config_dir=self.site.config.postfix_config_dir)
        module = os.path.join(home, "incognitomail.py")
        shutil.copy(MODULE, module)
        os.chmod(module, 0o644)
        done = subprocess.run([runuser, "-u", "nobody", "--", python, module, "-c", site.config_path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=60, cwd="/")
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        folder = os.path.dirname(self.site.map_path)
        self.assertIn(folder, done.stderr)
        self.assertIn("nobody", done.stderr)
        self.assertIn("chmod", done.stderr)                 # the fix
        self.assertEqual(self.site.map_text(), ADMIN_LINES, "the map was changed before the check")

    def test_failing_postmap_is_an_error_for_the_command_and_the_server_keeps_running(self):
        folder, fail_flag, _ = failing_postmap_folder(self)
        daemon = start_daemon(self, self.site, env=dict(os.environ, PATH=path_with(folder)))
        token = new_account(self.site, "me@example.org")
        open(fail_flag, "w").close()
        done = cli(self.site, "new", "handle", token)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        self.assertIn("simulated failure", done.stderr)
        os.unlink(fail_flag)
        self.assertEqual(cli(self.site, "list", token).stdout, "")
        done = cli(self.site, "new", "handle", token)
        self.assertEqual(done.returncode, 0, done.stderr + daemon.log())
        self.assertEqual(self.site.query(done.stdout.strip()), "me@example.org")
        self.assertIsNone(daemon.proc.poll())


###############################################################################
# Command line
###############################################################################

class CommandLineTest(ServerPerClassTestCase):
    """Every command against one running server; each test makes its own accounts."""

    def new_account(self, address="me@example.org"):
        """Made by the command line under test, as are new_handle's and listed's."""
        return self.run_cli("new", "account", address).stdout.strip()

    def new_handle(self, token, *options):
        return self.run_cli("new", "handle", token, *options).stdout.strip()

    def listed(self, token):
        return [line.split()[0] for line in self.run_cli("list", token).stdout.splitlines()]

    # -- the original's commands ---------------------------------------------------------

    def test_new_account_prints_only_the_token(self):
        done = self.run_cli("new", "account", "me@example.org")
        self.assertRegex(done.stdout, r"^[A-Za-z0-9_-]{43,}\n$")
        self.assertIn("secret token", done.stderr)

    def test_new_handle_prints_only_the_address(self):
        token = self.new_account()
        done = self.run_cli("new", "handle", token)
        self.assertRegex(done.stdout, r"^[a-z0-9]{16}@incognito\.test\n$")
        self.assertEqual(self.site.query(done.stdout.strip()), "me@example.org")

    def test_list_prints_one_line_per_handle_starting_with_its_address_newest_first(self):
        token = self.new_account()
        handles = [self.new_handle(token) for _ in range(3)]
        lines = self.run_cli("list", token).stdout.splitlines()
        self.assertEqual([line.split()[0] for line in lines], handles[::-1])
        for line in lines:
            self.assertIn("enabled", line)
            self.assertIn("received 0", line)

    def test_list_of_an_account_without_handles_prints_nothing_on_stdout(self):
        done = self.run_cli("list", self.new_account())
        self.assertEqual(done.stdout, "")
        self.assertIn("no handles", done.stderr)

    def test_delete_handle_removes_it_from_the_map(self):
        token = self.new_account()
        keep, gone = self.new_handle(token), self.new_handle(token)
        done = self.run_cli("delete", "handle", gone, token)
        self.assertEqual(done.stdout, "")
        self.assertIsNone(self.site.query(gone))
        self.assertEqual(self.site.query(keep), "me@example.org")
        self.assertEqual(self.listed(token), [keep])

    def test_delete_handle_accepts_the_handle_with_or_without_its_domain(self):
        token = self.new_account()
        first, second = self.new_handle(token), self.new_handle(token, "--domain", "other.test")
        self.run_cli("delete", "handle", first.split("@")[0], token)
        self.run_cli("delete", "handle", second.upper(), token)
        self.assertEqual(self.listed(token), [])
        self.assertIsNone(self.site.query(first))
        self.assertIsNone(self.site.query(second))

    def test_delete_handle_with_another_accounts_secret_is_refused_and_changes_nothing(self):
        mine, theirs = self.new_account(), self.new_account("them@example.org")
        handle = self.new_handle(mine)
        their_handle = self.new_handle(theirs)
        for name in (handle, handle.split("@")[0]):
            done = self.run_cli("delete", "handle", name, theirs, rc=1)
            self.assertIn("no handle", done.stderr)
        self.assertEqual(self.listed(mine), [handle])
        self.assertEqual(self.listed(theirs), [their_handle])
        self.assertEqual(self.site.query(handle), "me@example.org")
        self.assertIn("%s me@example.org" % handle, self.site.our_lines())

    def test_delete_account_removes_the_account_and_its_handles(self):
        token = self.new_account()
        handles = [self.new_handle(token) for _ in range(2)]
        done = self.run_cli("delete", "account", token)
        self.assertEqual(done.stdout.strip(), "")
        self.assertIn("2 handles", done.stderr)
        for handle in handles:
            self.assertIsNone(self.site.query(handle))
        self.run_cli("list", token, rc=1)

    def test_stop_takes_no_arguments(self):
        # stopping itself is tested on servers of their own in DaemonLifecycleTest
        done = cli(self.site, "stop", "now")
        self.assertEqual(done.returncode, 2)
        self.assertIsNone(self.daemon.proc.poll())

    # -- what an owner needs beyond the original --------------------------------------------

    def test_new_handle_takes_a_label_and_a_domain(self):
        token = self.new_account()
        handle = self.new_handle(token, "--label", "shop.example.com", "--domain", "other.test")
        self.assertRegex(handle, r"^[a-z0-9]{16}@other\.test$")
        self.assertRegex(self.new_handle(token, "--domain", "@Other.Test"), r"@other\.test$")
        line = self.run_cli("list", token).stdout.splitlines()[-1]
        self.assertTrue(line.startswith(handle + "\t"), line)
        self.assertTrue(line.endswith("shop.example.com"), line)

    def test_new_handle_in_a_domain_not_served_is_an_error_naming_the_served_ones(self):
        done = self.run_cli("new", "handle", self.new_account(), "--domain", "elsewhere.test", rc=1)
        self.assertIn("incognito.test", done.stderr)
        self.assertEqual(done.stdout, "")

    def test_disable_and_enable_handle_change_what_postfix_sees(self):
        token = self.new_account()
        handle = self.new_handle(token)
        done = self.run_cli("disable", "handle", handle, token)
        self.assertTrue(done.stdout.startswith(handle + "\tdisabled"), done.stdout)
        self.assertIsNone(self.site.query(handle))
        done = self.run_cli("enable", "handle", handle.split("@")[0], token)
        self.assertTrue(done.stdout.startswith(handle + "\tenabled"), done.stdout)
        self.assertEqual(self.site.query(handle), "me@example.org")

    def test_label_handle_sets_the_label_shown_by_list(self):
        token = self.new_account()
        handle = self.new_handle(token)
        self.run_cli("label", "handle", handle, token, "newsletter of shop.example.com")
        handles = json.loads(self.run_cli("list", token, "--json").stdout)
        self.assertEqual(handles[0]["label"], "newsletter of shop.example.com")
        self.run_cli("label", "handle", handle, token, "line\nbreak", rc=1)

    def test_rotate_prints_a_new_token_and_the_old_one_no_longer_works(self):
        old = self.new_account()
        handle = self.new_handle(old)
        done = self.run_cli("rotate", old)
        new = done.stdout.strip()
        self.assertRegex(done.stdout, r"^[A-Za-z0-9_-]{43,}\n$")
        self.assertNotEqual(new, old)
        self.run_cli("list", old, rc=1)
        self.assertEqual(self.listed(new), [handle])
        self.assertEqual(self.site.query(handle), "me@example.org")

    def test_secret_dash_is_read_from_standard_input(self):
        token = self.new_account()
        secret = token + "\n"
        handle = self.run_cli("new", "handle", "-", input=secret).stdout.strip()
        self.assertRegex(handle, r"@incognito\.test$")
        self.assertEqual(self.run_cli("list", "-", input=secret).stdout.split()[0], handle)
        self.run_cli("label", "handle", handle, "-", "shop", input=secret)
        self.run_cli("disable", "handle", handle, "-", input=secret)
        self.run_cli("enable", "handle", handle, "-", input=secret)
        self.run_cli("delete", "handle", handle, "-", input=secret)
        self.assertEqual(self.listed(token), [])
        new = self.run_cli("rotate", "-", input=secret).stdout.strip()
        self.run_cli("delete", "account", "-", input=new + "\n")
        self.run_cli("list", new, rc=1)
        self.run_cli("list", "-", input="", rc=1)

    def test_secret_starting_with_a_dash_is_accepted_as_an_argument(self):
        token = "-" + im.new_token()[1:]            # an account whose token begins with "-"
        seed_account(self.site, address="dash@example.org", token=token)
        handle = self.new_handle(token)
        self.assertEqual(self.listed(token), [handle])
        self.run_cli("delete", "handle", handle, token)
        self.assertEqual(self.listed(token), [])

    def test_json_is_accepted_anywhere_on_the_command_line(self):
        token = self.new_account()
        config = self.site.config_path
        for argv in (["--json", "-c", config, "new", "handle", token],
                     ["-c", config, "--json", "new", "handle", token],
                     ["-c", config, "new", "--json", "handle", token],
                     ["-c", config, "new", "handle", "--json", token],
                     ["-c", config, "new", "handle", token, "--json"]):
            with self.subTest(argv=argv):
                done = run_module(*argv)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertRegex(json.loads(done.stdout)["address"], r"^[a-z0-9]{16}@incognito\.test$")

    def test_json_output_of_each_command(self):
        token = json.loads(self.run_cli("--json", "new", "account", "me@example.org").stdout)["token"]
        handle = json.loads(self.run_cli("--json", "new", "handle", token, "--label", "shop").stdout)
        self.assertEqual(set(handle), {"address", "label", "enabled", "created", "received", "last_received", "id",
                                       "state", "expires", "max_messages", "blocked", "last_blocked",
                                       "bounced", "last_bounced", "sent", "last_sent", "refuse_as_unknown"})
        self.assertEqual((handle["label"], handle["enabled"], handle["received"], handle["last_received"]),
                         ("shop", True, 0, None))
        self.assertRegex(handle["created"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        listed = json.loads(self.run_cli("--json", "list", token).stdout)
        self.assertEqual(listed, [handle])
        disabled = json.loads(self.run_cli("--json", "disable", "handle", handle["address"], token).stdout)
        self.assertEqual(disabled["enabled"], False)
        self.assertEqual(json.loads(self.run_cli("--json", "delete", "handle", handle["address"], token).stdout), {})
        new = json.loads(self.run_cli("--json", "rotate", token).stdout)["token"]
        self.assertEqual(json.loads(self.run_cli("--json", "delete", "account", new).stdout), {"deleted_handles": 0})
        error = self.run_cli("--json", "list", token, rc=1)
        self.assertEqual(json.loads(error.stdout)["ok"], False)

    def test_list_json_gives_an_empty_array_for_an_account_without_handles(self):
        self.assertEqual(json.loads(self.run_cli("list", self.new_account(), "--json").stdout), [])

    def test_original_go_style_config_flags_are_accepted(self):
        for argv in (["-config", self.site.config_path, "status"], ["-config=" + self.site.config_path, "status"],
                     ["--config", self.site.config_path, "status"], ["--config=" + self.site.config_path, "status"],
                     ["-c", self.site.config_path, "status"]):
            with self.subTest(argv=argv):
                done = run_module(*argv)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertIn("pid %d" % self.daemon.pid, done.stdout)

    def test_status_reports_pid_counts_and_version(self):
        status = json.loads(self.run_cli("status", "--json").stdout)
        self.assertEqual((status["running"], status["pid"], status["version"]), (True, self.daemon.pid, im.__version__))
        self.assertEqual(status["domains"], ["incognito.test", "other.test"])
        self.assertEqual(status["map"], "hash:%s" % self.site.map_path)
        token = self.new_account()
        self.new_handle(token)
        after = json.loads(self.run_cli("--json", "status").stdout)
        self.assertEqual(after["accounts"], status["accounts"] + 1)
        self.assertEqual(after["handles"], status["handles"] + 1)
        self.assertEqual(after["enabled_handles"], status["enabled_handles"] + 1)
        text = self.run_cli("status").stdout
        self.assertIn("running (pid %d)" % self.daemon.pid, text)
        self.assertIn(im.__version__, text)
        self.assertIn("accounts %d" % after["accounts"], text)

    def test_example_prints_the_example_file_and_needs_no_configuration_file(self):
        with open(os.path.join(HERE, "incognitomail.ini.example"), encoding="utf-8") as f:
            example = f.read()
        for argv in (["example"], ["-c", os.path.join(self.site.folder, "nowhere.ini"), "example"]):
            with self.subTest(argv=argv):
                done = run_module(*argv)
                self.assertEqual((done.returncode, done.stderr), (0, ""))
                self.assertEqual(done.stdout, example)

    # -- errors and exit codes ------------------------------------------------------------

    def test_errors_exit_1_with_a_message_and_nothing_on_stdout(self):
        for args in (["new", "account", "me@example.org, evil@example.net"],
                     ["new", "account", "me@example.org\nevil@incognito.test mallory@example.net"],
                     ["new", "handle", "no-such-token"],
                     ["list", "no-such-token"],
                     ["delete", "handle", "abc", "no-such-token"],
                     ["delete", "handle", "not a handle!", self.new_account()]):
            with self.subTest(args=args):
                done = self.run_cli(*args, rc=1)
                self.assertEqual(done.stdout, "")
                self.assertTrue(done.stderr.startswith("incognitomail: error: "), done.stderr)

    def test_wrong_secret_is_not_repeated_in_the_error(self):
        wrong = "Zx9-wrong-secret-" + uuid.uuid4().hex
        done = self.run_cli("list", wrong, rc=1)
        self.assertIn("unknown secret token", done.stderr)
        self.assertNotIn(wrong, done.stderr + done.stdout)
        self.assertNotIn(wrong, self.daemon.log())

    def test_wrong_usage_exits_2(self):
        for args in (["new"], ["new", "thing", "x"], ["new", "handle"], ["frobnicate"], ["list"], ["list", "a", "b"],
                     ["delete", "handle", "only-one"], ["delete", "account"], ["label", "handle", "h", "secret"],
                     ["enable", "account", "x"], ["prune", "--handles-unused-days", "soon"], ["--no-such-flag"]):
            with self.subTest(args=args):
                done = cli(self.site, *args)
                self.assertEqual(done.returncode, 2, done)
                self.assertIn("usage", done.stderr)
                self.assertEqual(done.stdout, "")

    def test_prune_without_the_policy_service_is_refused_naming_PolicyListen(self):
        token = self.new_account()
        handle = self.new_handle(token)
        done = self.run_cli("prune", "--handles-unused-days", "0", rc=1)
        self.assertIn("PolicyListen", done.stderr)
        self.assertIn("policy service", done.stderr)
        self.assertEqual(self.listed(token), [handle])

    # -- logging ------------------------------------------------------------------------

    def test_every_change_is_logged_at_info_without_the_token(self):
        token = self.new_account("logged@example.org")
        handle = self.new_handle(token, "--label", "shop")
        other = self.new_handle(token)
        self.run_cli("label", "handle", handle, token, "renamed")
        self.run_cli("disable", "handle", handle, token)
        self.run_cli("enable", "handle", handle, token)
        self.run_cli("delete", "handle", other, token)
        new = self.run_cli("rotate", token).stdout.strip()
        self.run_cli("delete", "account", new)
        log = self.daemon.log()
        info = [line for line in log.splitlines() if " INFO " in line]
        expectations = [("new account", "logged@example.org"), ("new handle " + handle, "logged@example.org"),
                        ("new handle " + other, ""), ("handle " + handle, "renamed"), ("handle " + handle, "disabled"),
                        ("handle " + handle, "enabled"), ("deleted handle " + other, ""),
                        ("new secret token", "logged@example.org"), ("deleted account", "logged@example.org")]
        for words in expectations:
            with self.subTest(words=words):
                self.assertTrue(any(all(w in line for w in words) for line in info), "no INFO line with %s" % (words,))
        for secret in (token, new):
            self.assertNotIn(secret, log)


class BulkExportImportBackupTest(ServerPerClassTestCase):
    """new handles --count, export, import and backup against one running server."""

    def test_new_handles_makes_many_in_one_request_each_routable(self):
        token = new_account(self.site, "bulk@example.org")
        done = self.run_cli("new", "handles", "-", "--count", "25", "--label", "bulk", input=token + "\n")
        made = done.stdout.split()
        self.assertEqual(len(set(made)), 25)
        for address in made[::6]:
            self.assertEqual(self.site.query(address), "bulk@example.org")
        self.assertEqual(sorted(listed(self, self.site, token)), sorted(made))
        self.run_cli("new", "handles", token, "--count", "0", rc=2)

    def test_export_then_import_restores_the_handles_with_their_addresses(self):
        token = new_account(self.site, "owner@example.org")
        made = [new_handle(self.site, token, label="shop %d" % n) for n in range(3)]
        control(self.site, "update_handle", token=token, address=made[0], enabled=False)
        csv_text = self.run_cli("export", token).stdout
        json_text = self.run_cli("--json", "export", token).stdout
        self.assertTrue(csv_text.startswith("address,label,state,enabled,"), csv_text)
        self.assertEqual([h["address"] for h in json.loads(json_text)], made[::-1])
        self.run_cli("delete", "account", token)
        for text, name in ((csv_text, "export.csv"), (json_text, "export.json")):
            with self.subTest(name=name):
                path = os.path.join(self.site.folder, name)
                with open(path, "w") as f:
                    f.write(text)
                again = new_account(self.site, "owner@example.org")
                self.run_cli("import", again, path)
                handles = listed(self, self.site, again)
                self.assertEqual(list(handles), made[::-1])          # the same order as before
                self.assertEqual(handles[made[1]]["label"], "shop 1")
                self.assertFalse(handles[made[0]]["enabled"])
                self.assertIsNone(self.site.query(made[0]))
                self.assertEqual(self.site.query(made[2]), "owner@example.org")
                done = self.run_cli("import", again, path, rc=1)     # once more: all in use
                self.assertIn("in use already; nothing was imported", done.stderr)
                self.run_cli("delete", "account", again)

    def test_an_imported_message_limit_follows_the_same_rule_as_a_new_handles(self):
        token = new_account(self.site, "limits@example.org")
        path = os.path.join(self.site.folder, "limits.json")
        for limit, problem in ((5, "needs the policy service"), (0, "from 1 to"), ("5", "whole number")):
            with self.subTest(limit=limit):
                with open(path, "w") as f:
                    json.dump([{"address": "l1m1t5a2b3c4d5e6@incognito.test", "max_messages": limit}], f)
                self.assertIn(problem, self.run_cli("import", token, path, rc=1).stderr)
        self.assertEqual(listed(self, self.site, token), {})

    def test_a_bad_import_is_refused_saying_why_and_makes_nothing(self):
        token = new_account(self.site, "bad-import@example.org")
        path = os.path.join(self.site.folder, "bad.json")
        rows = [{"address": "c%015d@incognito.test" % n} for n in range(600)]
        for handles, problem in ((rows + [rows[0]], "c000000000000000@incognito.test is in the file more than once"),
                                 ([{"address": rows[0]["address"], "expires": 5}], "expires is not a time"),
                                 ([{"address": rows[0]["address"], "expires": "9999-12-31T23:59:59-23:59"}],
                                  "out of range"),
                                 ([{"address": "abuse@incognito.test"}], "abuse@incognito.test is not a handle")):
            with self.subTest(problem=problem):
                with open(path, "w") as f:
                    json.dump(handles, f)
                self.assertIn(problem, self.run_cli("import", token, path, rc=1).stderr)
        with self.assertRaisesRegex(im.BadRequest, "in the import twice"):
            control(self.site, "import_handles", token=token, handles=rows[:2] + rows[:1])
        self.assertEqual(listed(self, self.site, token), {})
        self.assertNotIn("Traceback", self.daemon.log())

    def test_backup_is_a_consistent_copy_and_refuses_to_overwrite(self):
        token = new_account(self.site, "kept@example.org")
        handle = new_handle(self.site, token)
        path = os.path.join(self.site.folder, "backup.sqlite3")
        self.run_cli("backup", path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        copy = sqlite3.connect(path)
        try:
            local = handle.split("@")[0]
            self.assertEqual(copy.execute("SELECT count(*) FROM handles WHERE local = ?", (local,)).fetchone()[0], 1)
            self.assertEqual(copy.execute("PRAGMA integrity_check").fetchone()[0], "ok")
        finally:
            copy.close()
        self.assertIn("exists already", self.run_cli("backup", path, rc=1).stderr)


class BackupRestoreTest(PostmapTestCase):
    """Restore as README says: stop, put the backup in place, start: every handle is routable
    again, the ones made after the backup are gone."""

    def test_stop_restore_start_makes_every_handle_routable_again(self):
        site = make_site(self)
        daemon = start_daemon(self, site)
        token = new_account(site)
        kept = [new_handle(site, token) for _ in range(3)]
        backup = os.path.join(site.folder, "backup.sqlite3")
        run_cli(self, site, "backup", backup)
        later = new_handle(site, token)
        control(site, "delete_handle", token=token, address=kept[0])
        daemon.stop()
        database = site.config.database_path
        shutil.copy(backup, database)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(database + suffix):
                os.unlink(database + suffix)
        start_daemon(self, site)
        for address in kept:
            self.assertEqual(site.query(address), "alice@example.org")
        self.assertIsNone(site.query(later))


class FirstUseTest(PostmapTestCase):
    """What an admin meets first: errors that name the line, help, the start line."""

    def test_an_ini_syntax_error_names_the_line(self):
        folder = make_folder(self)
        path = os.path.join(folder, "bad.ini")
        with open(path, "w") as f:
            f.write("[General]\nListenAddress = 127.0.0.1:1\nthis is not a key\n")
        with self.assertRaises(im.ConfigError) as caught:
            im.load_config(path)
        self.assertIn("line 3", str(caught.exception))
        self.assertIn("this is not a key", str(caught.exception))
        with open(path, "w") as f:
            f.write("Domain = x\n[General]\n")
        with self.assertRaises(im.ConfigError) as caught:
            im.load_config(path)
        self.assertIn("line 1", str(caught.exception))

    def test_help_is_a_command_and_a_secret_says_that_dash_reads_standard_input(self):
        everything = run_module("help")
        self.assertEqual(everything.returncode, 0)
        self.assertIn("new handle", everything.stdout)
        one = run_module("help", "new", "handle")
        self.assertEqual(one.returncode, 0)
        self.assertIn("--max-messages", one.stdout)
        self.assertRegex(" ".join(one.stdout.split()), r"<secret> .*- to read it from standard input")

    def test_the_start_line_names_every_listener(self):
        port, policy = free_port(), free_port()
        site = make_site(self, sections={"General": {"ListenAddress": "127.0.0.1:%d" % port,
                                                     "PolicyListen": "inet:127.0.0.1:%d" % policy,
                                                     "MilterListen": "inet:127.0.0.1:%d" % free_port()}})
        daemon = start_daemon(self, site)
        wait_until(lambda: " serving " in daemon.log())
        line = next(l for l in daemon.log().splitlines() if " serving " in l)
        for said in ("http://127.0.0.1:%d/" % port, "ws://127.0.0.1:%d/incognitomail" % port,
                     "policy service on inet:127.0.0.1:%d" % policy, "milter on inet:", site.socket_path):
            self.assertIn(said, line)

    def test_a_main_cf_younger_than_two_seconds_is_said_at_start(self):
        site = make_site(self)
        os.utime(os.path.join(site.config.postfix_config_dir, "main.cf"))
        daemon = start_daemon(self, site)
        self.assertIn("changed less than 2 s ago", daemon.log())


class WireCommandTest(PostmapTestCase):
    """wire: shows what main.cf needs, writes it with postconf after asking, keeps a copy,
    and ends with check."""

    def site(self):
        return make_site(self, sections={"General": {
            "PolicyListen": "inet:127.0.0.1:%d" % free_port(),
            "MilterListen": "inet:127.0.0.1:%d" % free_port()}})

    def postconf(self, site, name):
        done = subprocess.run([_which("postconf"), "-c", site.config.postfix_config_dir, "-h", name],
                              stdout=subprocess.PIPE, universal_newlines=True)
        return done.stdout.strip()

    def test_a_dry_run_shows_the_changes_and_changes_nothing(self):
        site = self.site()
        main_cf = os.path.join(site.config.postfix_config_dir, "main.cf")
        before = read_text(main_cf)
        done = run_cli(self, site, "wire", "--dry-run")
        for name in ("virtual_alias_maps", "virtual_alias_domains", "smtpd_recipient_restrictions",
                     "smtpd_milters", "recipient_delimiter"):
            self.assertIn(name, done.stdout)
        self.assertEqual(read_text(main_cf), before)

    def test_a_dry_run_with_nothing_to_change_creates_no_folder_either(self):
        folder = os.path.join(make_folder(self), "sockets")
        site = make_site(self, sections={"General": {"MilterListen": "unix:%s/milter.sock" % folder}})
        cli(site, "wire", "--yes")                  # check then fails: no server is running
        self.assertTrue(os.path.isdir(folder))
        os.rmdir(folder)
        self.assertIn("needs no change", run_cli(self, site, "wire", "--dry-run").stdout)
        self.assertFalse(os.path.exists(folder))

    def test_yes_writes_the_settings_keeps_a_copy_and_check_finds_postfix_wired(self):
        site = self.site()
        start_daemon(self, site)
        done = cli(site, "wire", "--yes")
        self.assertNotIn("Traceback", done.stderr)
        self.assertEqual(self.postconf(site, "virtual_alias_maps"), "hash:%s" % site.map_path)
        self.assertEqual(self.postconf(site, "recipient_delimiter"), "+")
        self.assertTrue(self.postconf(site, "smtpd_milters").startswith(site.config.milter_listen))
        self.assertTrue(self.postconf(site, "non_smtpd_milters").startswith(site.config.milter_listen))
        self.assertIn("bounce", self.postconf(site, "internal_mail_filter_classes"))
        self.assertEqual(self.postconf(site, "smtpd_policy_service_default_action"), "DUNNO")
        copies = [n for n in os.listdir(site.config.postfix_config_dir) if n.startswith("main.cf.incognitomail-")]
        self.assertEqual(len(copies), 1)
        for check in ("Postfix uses the map", "Postfix routes every domain", "Postfix asks the policy service",
                      "Postfix runs the milter", "Postfix's own bounces are counted",
                      "mail flows while the daemon is down"):
            self.assertRegex(done.stdout, r"(?m)^OK +%s" % re.escape(check))
        again = run_cli(self, site, "wire", "--dry-run")
        self.assertIn("needs no change", again.stdout)

    def test_a_canonical_map_gets_no_extension_handed_on(self):
        site = self.site()
        with open(os.path.join(site.config.postfix_config_dir, "main.cf"), "a") as f:
            f.write("mydestination = localhost, incognito.test\nrecipient_canonical_maps = hash:%s\n"
                    "recipient_canonical_classes = envelope_recipient\n" % site.map_path)
        shown = run_cli(self, site, "wire", "--dry-run").stdout
        self.assertIn("propagate_unmatched_extensions\n    now:  canonical, virtual\n    then: (empty)", shown)
        self.assertNotIn("virtual_alias_maps", shown)

    def test_relay_control_elsewhere_lets_the_policy_service_ask_every_client(self):
        site = self.site()
        main_cf = os.path.join(site.config.postfix_config_dir, "main.cf")
        shown = run_cli(self, site, "wire", "--dry-run").stdout   # compatibility level 0: none
        self.assertIn("then: permit_mynetworks, reject_unauth_destination, check_policy_service %s\n"
                      % site.config.policy_listen, shown)
        with open(main_cf, "a") as f:
            f.write("compatibility_level = 3.6\n")          # as Debian's main.cf: relay defaults
        shown = run_cli(self, site, "wire", "--dry-run").stdout
        self.assertIn("then: check_policy_service %s\n" % site.config.policy_listen, shown)

    def test_the_admins_references_are_kept_as_written(self):
        site = self.site()
        main_cf = os.path.join(site.config.postfix_config_dir, "main.cf")
        with open(main_cf, "a") as f:
            f.write("my_milters = inet:127.0.0.1:8891\nsmtpd_milters = $my_milters\n")
        start_daemon(self, site)
        run_cli(self, site, "wire", "--yes")
        self.assertEqual(self.postconf(site, "smtpd_milters"), "%s, $my_milters" % site.config.milter_listen)
        self.assertEqual(self.postconf(site, "my_milters"), "inet:127.0.0.1:8891")


class StatusWhenStoppedTest(unittest.TestCase):
    """With no server: status says so, commands say how to start it (no Postfix needed)."""

    def setUp(self):
        self.config = minimal_config_file(make_folder(self))

    def test_status_exits_1_saying_not_running(self):
        done = run_module("-c", self.config, "status")
        self.assertEqual(done.returncode, 1)
        self.assertIn("not running", done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_status_json_is_one_json_document_saying_not_running(self):
        done = run_module("-c", self.config, "--json", "status")
        self.assertEqual(done.returncode, 1)
        self.assertEqual(json.loads(done.stdout).get("running"), False, done.stdout)

    def test_commands_say_how_to_start_the_server(self):
        done = run_module("-c", self.config, "new", "account", "me@example.org")
        self.assertEqual(done.returncode, 1)
        self.assertIn("not running", done.stderr)
        self.assertIn("UnixSockPath", done.stderr)
        self.assertIn(self.config, done.stderr)


class CheckCommandTest(PostmapTestCase):
    """``check`` passes on a good setup and names the fault on each broken one."""

    GOOD_MAIN_CF = ("virtual_alias_domains = incognito.test, other.test\n"
                    "virtual_alias_maps = hash:{map}\n"
                    "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:{port}\n")

    def setUp(self):
        self.port = free_port()
        self.site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % self.port}})
        self.set_main_cf(self.GOOD_MAIN_CF)

    def set_main_cf(self, template):
        write_postfix_config_dir(self.site.config.postfix_config_dir,
                                 template.format(map=self.site.map_path, port=self.port))

    def check(self, rc):
        done = cli(self.site, "check")
        self.assertEqual(done.returncode, rc, done.stdout + done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        lines = done.stdout.splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"^(OK|FAIL|NOTE) ")
        return [line for line in lines if line.startswith("FAIL")]

    def start_with_handles(self):
        daemon = start_daemon(self, self.site)
        token = new_account(self.site, "me@example.org")
        return daemon, token, [new_handle(self.site, token) for _ in range(2)]

    def test_check_passes_on_a_good_setup(self):
        self.start_with_handles()
        self.assertEqual(self.check(0), [])
        results = json.loads(cli(self.site, "--json", "check").stdout)
        self.assertTrue(all(r["ok"] for r in results), results)
        self.assertGreaterEqual(len(results), 7)

    def test_check_passes_with_a_recipient_canonical_map_too(self):
        self.set_main_cf("mydestination = localhost, incognito.test, other.test\n"
                         "recipient_canonical_maps = hash:{map}\n"
                         "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:{port}\n")
        self.start_with_handles()
        self.assertEqual(self.check(0), [])

    def test_check_names_a_map_missing_from_main_cf(self):
        self.set_main_cf("virtual_alias_domains = incognito.test, other.test\n"
                         "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:{port}\n")
        self.start_with_handles()
        failed = self.check(1)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("virtual_alias_maps", failed[0])
        self.assertIn("hash:%s" % self.site.map_path, failed[0])

    def test_check_names_a_map_out_of_step(self):
        daemon, token, handles = self.start_with_handles()
        self.site.postmap("-d", handles[0], "hash:%s" % self.site.map_path)
        failed = self.check(1)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("in step", failed[0])
        self.assertIn(handles[0], failed[0])

    def test_check_names_a_map_entry_the_database_does_not_know(self):
        self.start_with_handles()
        self.site.postmap("-i", "hash:%s" % self.site.map_path, stdin="ghost1234ghost12@incognito.test evil@example.net\n")
        failed = self.check(1)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("in step", failed[0])
        self.assertIn("ghost1234ghost12@incognito.test", failed[0])

    def test_check_names_a_domain_not_routed(self):
        self.set_main_cf("virtual_alias_domains = incognito.test\n"
                         "virtual_alias_maps = hash:{map}\n"
                         "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:{port}\n")
        self.start_with_handles()
        failed = self.check(1)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("other.test", failed[0])
        self.assertIn("virtual_alias_domains", failed[0])

    def test_check_names_a_policy_service_postfix_does_not_ask(self):
        self.set_main_cf("virtual_alias_domains = incognito.test, other.test\nvirtual_alias_maps = hash:{map}\n")
        self.start_with_handles()
        failed = self.check(1)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("check_policy_service", failed[0])

    def test_check_names_an_old_map_file_still_listed_beside_the_socketmap(self):
        socket_path = os.path.join(make_folder(self), "socketmap.sock")
        site = self.make_site(sections={"General": {"SocketmapListen": "unix:" + socket_path}})
        write_postfix_config_dir(site.config.postfix_config_dir, (
            "virtual_alias_domains = incognito.test, other.test\n"
            "virtual_alias_maps = hash:%s, socketmap:unix:%s:virtual\n" % (site.map_path, socket_path)))
        own = b"postmaster@incognito.test root@example.org\n" + im.MAP_MARKER

        def problem(text):
            with open(site.map_path, "wb") as f:
                f.write(text)
            problems = dict(im.postfix_config_problems(site.config, im.make_table(site.config)))
            return problems["Postfix reads no stale handles"]
        stale = problem(own + b"k3v9q0x2m7ab5ts1@incognito.test me@example.org\n")
        self.assertIn("virtual_alias_maps", stale)
        self.assertIn("hash:%s" % site.map_path, stale)
        self.assertIn("deleted and switched-off handles stay live", stale)
        self.assertIsNone(problem(own))                 # only the admin's own lines: their map

    def test_check_names_a_server_that_is_not_running(self):
        daemon, token, handles = self.start_with_handles()
        daemon.stop()
        failed = self.check(1)
        self.assertEqual(len(failed), 1, failed)
        self.assertIn("not running", failed[0])


class MilterCheckTest(PostmapTestCase):
    """``check`` with the milter: what in Postfix's configuration it needs, and what would undo
    its work, each passing and failing (in-process, as run_check asks; then the command)."""

    def setUp(self):
        self.port, self.policy_port = free_port(), free_port()
        self.site = self.make_site(sections={"General": {
            "MilterListen": "inet:127.0.0.1:%d" % self.port, "PolicyListen": "inet:127.0.0.1:%d" % self.policy_port}})
        self.folder = self.site.config.postfix_config_dir

    def main_cf(self, *lines, milter="{ours}", leave_out=(), master=""):
        """main.cf: the map and the policy service as they should be, the milter wired as
        README.md says (``milter``: smtpd_milters' value) but for the settings named in
        ``leave_out``, then ``lines`` (later lines win); ``master``: master.cf."""
        good = ["virtual_alias_domains = incognito.test, other.test",
                "virtual_alias_maps = hash:%s" % self.site.map_path,
                "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:%d" % self.policy_port,
                "smtpd_policy_service_default_action = DUNNO",
                "myhostname = mail.example.org",
                "smtpd_milters = " + milter.format(ours="inet:127.0.0.1:%d" % self.port),
                "non_smtpd_milters = inet:127.0.0.1:%d" % self.port,
                "internal_mail_filter_classes = bounce",
                "milter_default_action = tempfail",
                "recipient_delimiter = +",
                "propagate_unmatched_extensions = canonical"]
        good = [line for line in good if line.partition(" =")[0] not in leave_out]
        write_postfix_config_dir(self.folder, "\n".join(good + list(lines)) + "\n")
        with open(os.path.join(self.folder, "master.cf"), "w") as f:
            f.write(master)

    def problems(self, *lines, **kwargs):
        """{what was checked: its problem (None: OK; a Note: NOTE; text: FAIL)} for that main.cf."""
        self.main_cf(*lines, **kwargs)
        config = self.site.config
        store = im.Store(config.database_path)
        try:
            return dict(im.postfix_config_problems(config, im.make_table(config), store))
        finally:
            store.close()

    def failures(self, *lines, **kwargs):
        return {name: problem for name, problem in self.problems(*lines, **kwargs).items()
                if problem is not None and not isinstance(problem, im.Note)}

    def rule_file(self, text):
        path = os.path.join(self.folder, "rules-%s" % uuid.uuid4().hex)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_the_milter_wired_as_readme_says_passes_with_notes(self):
        problems = self.problems()
        self.assertEqual(self.failures(), {})
        self.assertIsNone(problems["Postfix runs the milter"])
        self.assertIsInstance(problems["a DKIM signer follows the milter"], im.Note)
        for domain in ("incognito.test", "other.test"):
            self.assertIsInstance(problems["SPF record of %s" % domain], im.Note)
            self.assertIn('"v=spf1 a:mail.example.org -all"', problems["SPF record of %s" % domain])
        problems = self.problems(milter="{ours}, inet:127.0.0.1:8891")
        self.assertIsNone(problems["a DKIM signer follows the milter"])
        self.assertEqual(self.failures(milter="{ours}, inet:127.0.0.1:8891"), {})
        self.assertEqual(self.failures(milter="{{ {ours}, default_action=tempfail }}"), {})

    def test_a_milter_postfix_does_not_run_fails(self):
        for milter in ("", "inet:127.0.0.1:8891", "inet:127.0.0.2:%d" % self.port):
            with self.subTest(smtpd_milters=milter):
                failed = self.failures(milter=milter)
                self.assertIn("Postfix runs the milter", failed)
                self.assertIn("inet:127.0.0.1:%d" % self.port, failed["Postfix runs the milter"])

    def test_a_unix_socket_path_relative_to_the_queue_directory_counts(self):
        folder = make_folder(self)
        self.site = Site(folder, sections={"General": {
            "MilterListen": "unix:%s" % os.path.join(folder, "run", "milter.sock")}})
        self.folder = self.site.config.postfix_config_dir
        # chrooted daemons (Debian's default) name the socket relative to the queue directory
        self.assertIsNone(self.problems("queue_directory = %s" % folder,
                                        milter="unix:run/milter.sock")["Postfix runs the milter"])
        self.assertIn("Postfix runs the milter", self.failures("queue_directory = /var/spool/postfix",
                                                               milter="unix:run/milter.sock"))

    def test_a_canonical_map_that_rewrites_senders_fails(self):
        # cleanup(8) maps the envelope sender a milter sets as it maps the client's: with the
        # handles in canonical_maps, mail to a handle arrived with Return-Path:
        # <alice+b.j2.3aztff5n7z@mbox.test>, and the owner's replies would leave with it
        table = "hash:%s" % self.site.map_path
        for name in ("canonical_maps", "sender_canonical_maps"):
            with self.subTest(setting=name):
                failed = self.failures("%s = %s" % (name, table), "%s = envelope_sender, envelope_recipient"
                                       % name.replace("maps", "classes"))
                self.assertEqual(list(failed), ["Postfix keeps the milter's senders"])
                self.assertIn(name, failed["Postfix keeps the milter's senders"])
                self.assertIn("recipient_canonical_maps", failed["Postfix keeps the milter's senders"])
        self.assertEqual(self.failures("recipient_canonical_maps = " + table,
                                       "recipient_canonical_classes = envelope_recipient"), {})
        self.assertEqual(self.failures("canonical_maps = " + table,
                                       "canonical_classes = envelope_recipient"), {})
        self.assertEqual(self.failures("canonical_maps = hash:/etc/postfix/admins-own",
                                       "canonical_classes = envelope_sender"), {})

    def test_an_absolute_socket_path_fails_where_postfix_runs_chrooted(self):
        folder = make_folder(self)
        path = os.path.join(folder, "run", "milter.sock")
        self.site = Site(folder, sections={"General": {"MilterListen": "unix:" + path}})
        self.folder = self.site.config.postfix_config_dir
        debian = "smtp inet n - y - - smtpd\ncleanup unix n - y - 0 cleanup\n"   # as Debian ships it
        failed = self.failures("queue_directory = %s" % folder, milter="unix:" + path, master=debian)
        self.assertEqual(list(failed), ["Postfix reaches its sockets from the chroot"])
        self.assertIn("write unix:run/milter.sock", failed["Postfix reaches its sockets from the chroot"])
        self.assertIn("cleanup and smtpd", failed["Postfix reaches its sockets from the chroot"])
        self.assertEqual(self.failures("queue_directory = %s" % folder, milter="unix:run/milter.sock",
                                       master=debian), {})
        unchrooted = debian.replace(" y ", " n ")
        self.assertEqual(self.failures("queue_directory = %s" % folder, milter="unix:" + path,
                                       master=unchrooted), {})
        # the fix a missing milter is told names the socket as the chroot needs it
        failed = self.failures("queue_directory = %s" % folder, milter="", master=debian)
        self.assertIn("lacks unix:run/milter.sock", failed["Postfix runs the milter"])

    def test_a_milter_before_ours_is_noted_as_a_verifiers_place_and_none_as_a_forgers_chance(self):
        # each milter reads what those before it left: README.md puts a verifier before ours
        problems = self.problems(milter="inet:127.0.0.1:8893, {ours}, inet:127.0.0.1:8891")
        self.assertEqual(self.failures(milter="inet:127.0.0.1:8893, {ours}, inet:127.0.0.1:8891"), {})
        before = problems["milters before IncognitoMail's only verify"]
        self.assertIsInstance(before, im.Note)
        self.assertIn("inet:127.0.0.1:8893", before)
        self.assertIn("signer", before)
        self.assertNotIn("a verifier checks the owners' mail", problems)
        self.assertIsNone(problems["a DKIM signer follows the milter"])
        alone = self.problems()["a verifier checks the owners' mail"]
        self.assertIsInstance(alone, im.Note)
        self.assertIn("anyone who knows an owner's address can write as their handles", alone)

    def test_extensions_handed_on_by_the_maps_own_kind_of_lookup_fail(self):
        self.assertEqual(self.failures("propagate_unmatched_extensions = canonical"), {})
        failed = self.failures("propagate_unmatched_extensions = canonical, virtual")
        self.assertIn("includes virtual", failed["bounces reach the owner's own address"])
        # a canonical map (local delivery): canonical must go too
        local = ("mydestination = localhost, incognito.test, other.test", "virtual_alias_maps =",
                 "virtual_alias_domains =", "recipient_canonical_maps = hash:%s" % self.site.map_path,
                 "recipient_canonical_classes = envelope_recipient")
        failed = self.failures(*local + ("propagate_unmatched_extensions = canonical",))
        self.assertEqual(list(failed), ["bounces reach the owner's own address"])
        self.assertIn("includes canonical", failed["bounces reach the owner's own address"])
        self.assertEqual(self.failures(*local + ("propagate_unmatched_extensions =",)), {})

    def test_a_policy_service_that_holds_all_mail_while_the_daemon_is_down_is_noted(self):
        self.assertIsNone(self.problems()["mail flows while the daemon is down"])
        note = self.problems(leave_out=("smtpd_policy_service_default_action",))[
            "mail flows while the daemon is down"]
        self.assertIsInstance(note, im.Note)
        self.assertIn("451 4.3.5 Server configuration problem", note)
        self.assertIn("DUNNO", note)

    def test_postfixs_own_bounces_left_out_of_the_milter_are_noted(self):
        self.assertIsNone(self.problems()["Postfix's own bounces are counted"])
        for leave_out in (("non_smtpd_milters",), ("internal_mail_filter_classes",)):
            with self.subTest(leave_out=leave_out):
                note = self.problems(leave_out=leave_out)["Postfix's own bounces are counted"]
                self.assertIsInstance(note, im.Note)
                self.assertIn("non_smtpd_milters", note)
                self.assertIn("internal_mail_filter_classes", note)
                self.assertEqual(self.failures(leave_out=leave_out), {})

    def test_a_default_action_other_than_tempfail_fails(self):
        for action in ("accept", "reject", "quarantine"):
            with self.subTest(action=action):
                failed = self.failures("milter_default_action = %s" % action)
                self.assertEqual(list(failed), ["Postfix waits while the milter is away"])
                self.assertIn(action, failed["Postfix waits while the milter is away"])
        self.assertEqual(self.failures(leave_out=("milter_default_action",)), {})  # Postfix's default

    def test_a_recipient_delimiter_without_plus_fails(self):
        for delimiter in ("", "-"):
            with self.subTest(delimiter=delimiter):
                failed = self.failures("recipient_delimiter = %s" % delimiter)
                self.assertEqual(list(failed), ["Postfix takes the milter's addresses (handle+...@)"])
                self.assertIn("recipient_delimiter = +", failed["Postfix takes the milter's addresses (handle+...@)"])
        self.assertEqual(self.failures("recipient_delimiter = -+"), {})

    def test_unmatched_extensions_propagated_to_virtual_aliases_fail(self):
        for value in ("canonical, virtual", "virtual"):
            with self.subTest(value=value):
                failed = self.failures("propagate_unmatched_extensions = %s" % value)
                self.assertEqual(list(failed), ["bounces reach the owner's own address"])
        self.assertEqual(self.failures("propagate_unmatched_extensions ="), {})
        # Postfix's default (canonical, virtual) fails: the setting must be written
        self.assertIn("bounces reach the owner's own address",
                      self.failures(leave_out=("propagate_unmatched_extensions",)))

    def test_a_second_envelope_rewriter_fails(self):
        for lines, milter in ((["sender_canonical_maps = socketmap:unix:srs:forward",
                                "sender_canonical_classes = envelope_sender"], "{ours}"),
                              (["sender_canonical_maps = tcp:localhost:10001",
                                "sender_canonical_classes = envelope_sender"], "{ours}"),
                              ([], "{ours}, unix:/run/postsrsd/srs-milter.sock")):
            with self.subTest(lines=lines, milter=milter):
                failed = self.failures(*lines, milter=milter)
                self.assertEqual(list(failed), ["no second envelope rewriter"])
                self.assertIn("postsrsd", failed["no second envelope rewriter"])
        self.assertEqual(self.failures("sender_canonical_maps = hash:%s/sender_canonical" % self.folder,
                                       "sender_canonical_classes = envelope_sender"), {})

    def test_what_rewrites_forwarded_headers_or_bodies_fails(self):
        replace = self.rule_file("/^Subject:/ REPLACE Subject: changed\n")
        prepend = self.rule_file("/^X-Spam/ PREPEND X-Note: seen\n")
        harmless = self.rule_file("# only refusals\n/^X-Virus: yes/ REJECT\n/^X-Foo/ IGNORE\n")
        for lines, named in ((["header_checks = regexp:%s" % replace], "header_checks"),
                             (["body_checks = pcre:%s" % prepend], "body_checks"),
                             (["smtp_header_checks = regexp:%s" % replace], "smtp_header_checks"),
                             (["smtp_generic_maps = hash:%s/generic" % self.folder], "smtp_generic_maps"),
                             (["masquerade_domains = example.org"], "masquerade_domains"),
                             (["canonical_maps = hash:%s/canonical" % self.folder], "canonical_classes"),
                             (["recipient_canonical_maps = hash:%s/rc" % self.folder], "recipient_canonical_classes"),
                             (["sender_canonical_maps = hash:%s/sc" % self.folder,
                               "sender_canonical_classes = envelope_sender, header_sender"], "sender_canonical_classes")):
            with self.subTest(named=named):
                failed = self.failures(*lines)
                self.assertEqual(list(failed), ["nothing rewrites forwarded mail"])
                self.assertIn(named, failed["nothing rewrites forwarded mail"])
                if named.endswith("_classes"):      # leaving the line out keeps header classes
                    self.assertIn("envelope_ classes only", failed["nothing rewrites forwarded mail"])
        self.assertEqual(self.failures("header_checks = regexp:%s" % harmless,
                                       "recipient_canonical_maps = hash:%s/rc" % self.folder,
                                       "recipient_canonical_classes = envelope_recipient"), {})
        # postsrsd's reverse map, kept for 21 days as README.md says
        self.assertEqual(self.failures("recipient_canonical_maps = tcp:localhost:10002",
                                       "recipient_canonical_classes = envelope_recipient"), {})

    def test_without_the_milter_a_note_names_the_providers_that_see_the_owners_address(self):
        site = self.make_site(sections={"General": {"PolicyListen": "inet:127.0.0.1:%d" % self.policy_port}})
        self.site, self.folder = site, site.config.postfix_config_dir
        seed_account(site, address="alice@gmail.example")
        seed_account(site, address="bob@localhost")
        problems = self.problems(milter="")
        note = problems["mail leaves with the owner's privacy kept"]
        self.assertIsInstance(note, im.Note)
        self.assertIn("gmail.example", note)
        self.assertNotIn("localhost", note)
        self.assertIn("MilterListen", note)
        self.assertNotIn("Postfix runs the milter", problems)
        # every target delivered here: nothing to say
        self.assertIsNone(self.problems("mydestination = localhost, gmail.example",
                                        milter="")["mail leaves with the owner's privacy kept"])
        self.assertIsNone(self.problems("mydestination = localhost", "virtual_mailbox_domains = gmail.example",
                                        milter="")["mail leaves with the owner's privacy kept"])

    def test_the_command_prints_notes_and_exits_0_then_1_on_a_failure(self):
        start_daemon(self, self.site)
        self.main_cf()
        done = cli(self.site, "check")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        lines = done.stdout.splitlines()
        for line in lines:
            self.assertRegex(line, r"^(OK|FAIL|NOTE) ")
        self.assertIn("OK   Postfix runs the milter", lines)
        self.assertTrue([l for l in lines if l.startswith("NOTE SPF record of incognito.test: ")], lines)
        self.assertTrue([l for l in lines if l.startswith("NOTE a DKIM signer follows the milter")], lines)
        results = json.loads(cli(self.site, "--json", "check").stdout)
        self.assertTrue(all(r["ok"] for r in results), results)
        self.main_cf("milter_default_action = accept")
        done = cli(self.site, "check")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertEqual([l for l in done.stdout.splitlines() if l.startswith("FAIL")],
                         ["FAIL Postfix waits while the milter is away: milter_default_action = accept: mail "
                          "would pass unchanged while the daemon is down; use tempfail"])


class LoggingTest(unittest.TestCase):
    """LogLevel and LogTarget: stderr or syslog with facility mail."""

    def setUp(self):
        logger = logging.getLogger("incognitomail")
        saved = (list(logger.handlers), logger.level, logger.propagate)

        def restore():
            logger.handlers[:] = saved[0]
            logger.setLevel(saved[1])
            logger.propagate = saved[2]
        self.addCleanup(restore)
        self.folder = make_folder(self)

    def config(self, **general):
        site = Site(self.folder, sections={"General": general}, config_dir=write_postfix_config_dir(
            os.path.join(self.folder, "postfix")))
        return site.config

    def test_syslog_target_uses_dev_log_with_facility_mail(self):
        config = self.config(LogTarget="syslog")
        calls = []

        class FakeSysLogHandler(logging.Handler):
            LOG_MAIL = logging.handlers.SysLogHandler.LOG_MAIL

            def __init__(self, address, facility):
                super().__init__()
                calls.append((address, facility))
        with mock.patch("os.path.exists", lambda path: path == "/dev/log" or os.path.isfile(path)), \
                mock.patch.object(logging.handlers, "SysLogHandler", FakeSysLogHandler):
            im.setup_logging(config)
        self.assertEqual(calls, [("/dev/log", 2)])      # 2: the mail facility of syslog(3)
        self.assertIsInstance(logging.getLogger("incognitomail").handlers[0], FakeSysLogHandler)

    def test_syslog_without_dev_log_names_log_target(self):
        config = self.config(LogTarget="syslog")
        with mock.patch("os.path.exists", lambda path: False):
            with self.assertRaises(im.ConfigError) as caught:
                im.setup_logging(config)
        self.assertIn("[General] LogTarget", str(caught.exception))

    def test_log_level_warning_leaves_out_the_info_lines(self):
        require_postfix()
        site = Site(self.folder, sections={"General": {"LogLevel": "warning"}})
        daemon = start_daemon(self, site)
        self.assertEqual(cli(site, "new", "account", "alice@example.org").returncode, 0)
        daemon.stop()
        self.assertNotIn("new account", daemon.log())
        self.assertNotIn(" INFO ", daemon.log())


###############################################################################
# Data: the owner page
###############################################################################

class OwnerPageEndToEndTest(OwnerPageDriver, PostfixInstanceTestCase):
    """Every action on the owner page has its effect, seen through the command line, the map
    Postfix reads and real mail (a private Postfix that asks the daemon's policy service)."""

    @classmethod
    def extra_main_cf(cls):
        cls.policy_port = free_port()
        return ["virtual_alias_domains = incognito.test other.test",
                "smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:%d"
                % cls.policy_port, "smtpd_policy_service_default_action = DUNNO"]

    DOMAINS = "incognito.test, other.test"

    def daemon_sections(self):
        sections = self.listen_sections()
        sections["General"]["PolicyListen"] = "inet:127.0.0.1:%d" % self.policy_port
        return sections

    def test_each_action_on_the_page_shows_in_the_command_line_the_map_and_real_mail(self):
        site, daemon = self.start()
        token = self.run_cli(site, "new", "account", "alice@mbox.test")
        b = self.browser
        self.open_page()
        self.sign_in(token)
        self.assertEqual(self.stored(), {"session": [token], "local": []})
        self.assertEqual(self.text("#target"), "alice@mbox.test")
        self.assertIn("No handles yet", self.text("#empty"))
        self.assertEqual(self.text("#bitwarden-url"), self.origin)
        self.assertEqual(self.text("#addon-url"), "ws://127.0.0.1:%d/incognitomail" % self.port)

        # make a handle with a label, in the second domain served
        b.click(element("#new-label"))
        b.type("shop.example.com")
        self.assertTrue(self.shown("#new-domain"))
        b.press("Tab")
        b.press("o")                                # the select's type-ahead: other.test
        self.assertEqual(b.js(element("#new-domain") + ".value"), "other.test")
        b.click(element("#create"))
        address = b.wait_for("/^[a-z0-9]+@other[.]test$/.test(%s.textContent) && %s.textContent"
                             % (element("#created-address"), element("#created-address")))
        self.assertTrue(address, self.text("#create-error"))
        handle = listed(self, site, token)[address]
        self.assertEqual((handle["label"], handle["enabled"]), ("shop.example.com", True))
        self.assertEqual(site.query(address), "alice@mbox.test")
        self.assertTrue(b.wait_for("!!" + self.row(address)), "the new handle is not in the list")
        self.assertEqual(b.js(self.row(address, "label") + ".textContent"), "shop.example.com")
        self.assertEqual(b.js(self.row(address, "state") + ".textContent"), "Active")

        b.click(element("#copy-created"))
        self.assertTrue(b.wait_for("document.querySelector('#status').textContent === 'Copied'"))
        self.assertEqual(self.clipboard(), address)

        # real mail reaches it
        self.assert_delivered(address, "alice")
        self.assertTrue(wait_until(lambda: listed(self, site, token)[address]["received"] == 1,
                                   timeout=15, interval=0.1), "the message was never counted")

        # one that ends by itself, in a day or after 3 messages
        b.click(element("summary"))
        b.js("const s = %s; s.value = '86400'; s.dispatchEvent(new Event('change'))"
             % element("#new-expires"))
        b.click(element("#new-max"))
        b.type("3")
        b.click(element("#create"))
        newer = b.wait_for("%s.textContent !== %s && %s.textContent" % (
            element("#created-address"), json.dumps(address), element("#created-address")))
        self.assertTrue(newer, self.text("#create-error"))
        handle = listed(self, site, token)[newer]
        self.assertEqual(handle["max_messages"], 3)
        expires = from_iso(handle["expires"])
        self.assertAlmostEqual(expires, time.time() + 86400, delta=120)
        self.assertEqual(site.query(newer), "alice@mbox.test")

        # after a reload (still signed in): newest first, with what each received
        self.open_page()
        self.assertTrue(b.wait_for("document.body.dataset.loaded && !!" + self.row(address)))
        self.assertEqual(self.addresses(), [newer, address])
        self.assertEqual(b.js(self.row(newer, "state") + ".textContent"),
                         "0 of 3 messages · Expires tomorrow")
        self.assertEqual(b.js(self.row(address, "received") + ".textContent"), "1")
        last = listed(self, site, token)[address]["last_received"]
        self.assertEqual(b.js(self.row(address) + ".querySelector('time[datetime]').title"),
                         last.replace("T", " ").rstrip("Z") + " UTC")

        # search narrows the list to the matching handles
        before = self.loads()
        b.click(element("#search"))
        b.type("shop")
        self.wait_loaded(before)
        self.assertEqual(self.addresses(), [address])
        before = self.loads()
        b.js("const s = %s; s.value = ''; s.dispatchEvent(new Event('input'))" % element("#search"))
        self.wait_loaded(before)

        # switched off: refused at RCPT; on again: accepted
        b.click(self.row(address, "toggle"))
        self.assertTrue(b.wait_for(self.row(address, "toggle") + ".ariaPressed === 'false'"))
        self.assertEqual(b.js(self.row(address, "state") + ".textContent"), "Off")
        self.assertEqual(listed(self, site, token)[address]["enabled"], False)
        self.assertIsNone(site.query(address))
        self.assertEqual(self.pf.rcpt_check(address)[0], 550)
        b.click(self.row(address, "toggle"))
        self.assertTrue(b.wait_for(self.row(address, "toggle") + ".ariaPressed === 'true'"))
        self.assertEqual(listed(self, site, token)[address]["enabled"], True)
        self.assertEqual(site.query(address), "alice@mbox.test")
        self.assertEqual(self.pf.rcpt_check(address)[0], 250)

        # a new label, typed into the row and saved with Enter
        b.click(self.row(address, "edit"))
        self.assertTrue(b.wait_for("document.activeElement.dataset.test === 'label-input'"))
        b.js("document.activeElement.select()")
        b.type("shop, renamed\n")
        label = self.row(address, "label")
        self.assertTrue(b.wait_for(label + "?.textContent === 'shop, renamed'"))
        self.assertEqual(listed(self, site, token)[address]["label"], "shop, renamed")

        # delete, after a confirmation naming the address
        b.click(self.row(address, "delete"))
        question = b.wait_for(self.row(address) + "?.querySelector('tr.sub')?.innerText")
        self.assertIn(address, question)
        b.click(self.row(address, "confirm-delete"))
        self.assertTrue(b.wait_for("!" + self.row(address)), "the deleted handle is still shown")
        self.assertNotIn(address, listed(self, site, token))
        self.assertIsNone(site.query(address))
        self.assertEqual(self.pf.rcpt_check(address)[0], 550)

        # a new token, shown once: the old one stops working, the new one works
        b.click(element("#rotate"))
        b.click(element("#confirm-rotate"))
        fresh = b.wait_for("/^[A-Za-z0-9]{43}$/.test(%s.textContent) && %s.textContent"
                           % (element("#new-token"), element("#new-token")))
        self.assertTrue(fresh, self.text("#rotate-error"))
        self.assertNotEqual(fresh, token)
        self.assertEqual(cli(site, "list", token).returncode, 1)
        self.assertEqual(list(listed(self, site, fresh)), [newer])
        self.assertEqual(self.stored(), {"session": [fresh], "local": []})
        b.click(element("#hide-token"))
        self.assertEqual(self.text("#new-token"), "")
        before = self.loads()
        b.click(self.row(newer, "toggle"))           # the page goes on with the new token
        self.assertTrue(b.wait_for(self.row(newer, "toggle") + ".ariaPressed === 'false'"))
        self.assertEqual(listed(self, site, fresh)[newer]["enabled"], False)
        self.assertEqual(b.js(self.row(newer, "row-error")), None)

        b.click(element("#sign-out"))
        self.assertTrue(b.wait_for("document.body.dataset.state === 'signed-out'"))
        self.assertEqual(self.stored(), {"session": [], "local": []})
        self.assert_page_behaved(token, fresh)
        self.assertNotIn(token, daemon.log())
        self.assertNotIn(fresh, daemon.log())


class OwnerPageSecurityTest(OwnerPageDriver, unittest.TestCase):
    """The page runs only its own script and style, talks only to its own origin, and shows
    what the server sends as text: a hostile label stays text."""

    def test_hostile_label_is_shown_as_text_and_never_runs(self):
        site = self.page_site()
        start_daemon(self, site)
        token = new_account(site)
        address = new_handle(site, token)
        done = cli(site, "label", "handle", address, token, HOSTILE_LABEL)
        self.assertEqual(done.returncode, 0, done.stderr)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        self.assertEqual(b.js(self.row(address, "label") + ".textContent"), HOSTILE_LABEL)
        self.assertEqual(b.js("document.querySelectorAll('#handles img, [onerror]').length"), 0)
        b.click(self.row(address, "edit"))
        self.assertEqual(b.wait_for(self.row(address, "label-input") + "?.value"), HOSTILE_LABEL)
        b.press("Escape")
        before = self.loads()
        b.click(element("#search"))
        b.type(HOSTILE_LABEL[:12])
        self.wait_loaded(before)
        self.assertEqual(self.addresses(), [address])
        self.assertEqual(b.js("document.querySelectorAll('#handles img').length"), 0)
        self.assertEqual([url for url in b.requested_urls() if url.endswith("/x")], [])
        self.assert_page_behaved(token)

    def test_page_is_served_with_a_policy_allowing_only_its_own_script_style_and_origin(self):
        site = self.page_site()
        start_daemon(self, site)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                      % self.port)
            response = b"".join(iter(lambda: s.recv(65536), b"")).decode("utf-8")
        head, body = response.split("\r\n\r\n", 1)
        lines = head.split("\r\n")
        self.assertEqual(lines[0], "HTTP/1.1 200 OK")
        headers = {name.lower(): value.strip() for name, _, value in
                   (line.partition(":") for line in lines[1:])}
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        self.assertEqual(headers["cache-control"], "no-store")

        def inline(tag):
            self.assertEqual(body.count("<%s" % tag), 1, "one inline <%s>" % tag)
            text = body.split("<%s>" % tag, 1)[1].split("</%s>" % tag, 1)[0]
            digest = base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()
            return ["'sha256-%s'" % digest]
        policy = {}
        for directive in headers["content-security-policy"].split(";"):
            name, *values = directive.split()
            policy[name] = values
        port = self.port
        self.assertEqual(policy, {
            "default-src": ["'none'"], "script-src": inline("script"), "style-src": inline("style"),
            "connect-src": ["'self'", "ws://127.0.0.1:%d" % port, "wss://127.0.0.1:%d" % port],
            "img-src": ["'self'", "data:"], "frame-ancestors": ["'none'"],
            "base-uri": ["'none'"], "form-action": ["'none'"]})
        markup = re.sub(r"(?s)<(script|style)>.*?</\1>", "", body)
        self.assertNotRegex(markup, r"<[^>]+\s(on[a-z]+|style)\s*=|javascript:")

    def test_the_browser_reports_what_the_policy_blocks_so_a_violation_fails_the_tests(self):
        site = self.page_site()
        start_daemon(self, site)
        b = self.browser
        self.open_page()
        self.assertEqual(b.csp_violations(), [])
        start = len(b.events)
        b.js("const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
             "document.body.append(s); const i = document.createElement('img');"
             "i.src = 'http://example.invalid/x.png'; document.body.append(i)")
        b.wait_event("Log.entryAdded", lambda p: "example.invalid" in p["entry"]["text"],
                     start=start)
        self.assertIsNone(b.js("window.ran"))
        self.assertEqual(len(b.csp_violations()), 2, b.csp_violations())
        self.assertIn("http://example.invalid/x.png", b.requested_urls())
        with self.assertRaises(AssertionError):
            self.assert_page_behaved()


class OwnerPageSignInTest(OwnerPageDriver, unittest.TestCase):
    """The token is pasted once: it stays for the browser session, or on the device when the
    owner asks to be remembered; signing out forgets it; it never shows in a URL or the page."""

    def test_token_stays_for_the_session_unless_remembered_and_sign_out_forgets_it(self):
        site = self.page_site()
        daemon = start_daemon(self, site)
        token = new_account(site)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        self.assertEqual(self.stored(), {"session": [token], "local": []})
        self.assertEqual(b.js(element("#token") + ".value"), "")
        self.open_page()
        self.assertEqual(b.wait_for("document.body.dataset.state"), "signed-in")
        b.click(element("#sign-out"))
        self.assertEqual(b.js("document.body.dataset.state"), "signed-out")
        self.assertEqual(self.stored(), {"session": [], "local": []})

        self.sign_in(token, remember=True)
        self.assertEqual(self.stored(), {"session": [], "local": [token]})
        self.open_page()
        self.assertEqual(b.wait_for("document.body.dataset.state"), "signed-in")
        b.click(element("#sign-out"))
        self.assertEqual(self.stored(), {"session": [], "local": []})
        self.open_page()
        self.assertEqual(b.wait_for("document.body.dataset.state"), "signed-out")
        self.assert_page_behaved(token)
        self.assertNotIn(token, daemon.log())


class OwnerPageErrorsTest(OwnerPageDriver, unittest.TestCase):
    """What goes wrong is said in place, in words: a wrong token, and a request the rate limit
    refuses, with the seconds to wait."""

    def test_wrong_token_is_refused_in_place_and_nothing_is_kept(self):
        site = self.page_site()
        daemon = start_daemon(self, site)
        new_account(site)
        wrong = im.new_token()
        b = self.browser
        self.open_page()
        b.click(element("#token"))
        b.paste(wrong)
        b.click(element("#sign-in"))
        message = b.wait_for("%s.textContent" % element("#sign-in-error"))
        self.assertIn("token is not valid", message)
        self.assertTrue(self.shown("#sign-in-error"))
        self.assertEqual(b.js("document.body.dataset.state"), "signed-out")
        self.assertEqual(b.js("document.activeElement.id"), "token")
        self.assertEqual(self.stored(), {"session": [], "local": []})
        self.assert_page_behaved(wrong)
        self.assertNotIn(wrong, daemon.log())

    def test_rate_limited_create_is_refused_in_place_with_the_seconds_to_wait(self):
        site = self.page_site(HandlesPerMinutePerClient=1)
        start_daemon(self, site)
        token = new_account(site)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        b.click(element("#create"))
        address = b.wait_for(element("#created-address") + ".textContent")
        self.assertTrue(address, self.text("#create-error"))
        b.click(element("#create"))
        message = b.wait_for(element("#create-error") + ".textContent")
        self.assertRegex(message, r"^Too many requests: try again in [1-9][0-9]* s$")
        self.assertTrue(self.shown("#create-error"))
        self.assertEqual(list(listed(self, site, token)), [address])
        self.assertEqual(self.addresses(), [address])
        self.assert_page_behaved(token)

    def test_token_rotated_elsewhere_signs_the_page_out_saying_why(self):
        site = self.page_site()
        start_daemon(self, site)
        token = new_account(site)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        rotated = cli(site, "rotate", token)
        self.assertEqual(rotated.returncode, 0, rotated.stderr)
        b.click(element("#create"))
        self.assertTrue(b.wait_for("document.body.dataset.state === 'signed-out'"))
        self.assertIn("token is not valid", self.text("#sign-in-error"))
        self.assertEqual(self.stored(), {"session": [], "local": []})
        self.assertEqual(listed(self, site, rotated.stdout.strip()), {})
        self.assert_page_behaved(token)


class OwnerPageSettingsTest(OwnerPageDriver, unittest.TestCase):
    """The page follows the listener's settings: its ListenPath, and AllowedOrigins naming
    only the add-on (the page's own origin stays allowed, its WebSocket included)."""

    def test_page_uses_the_listen_path_and_works_when_allowed_origins_name_only_the_add_on(self):
        sections = self.listen_sections()
        sections["General"].update(ListenPath="/mail/ws", AllowedOrigins="moz-extension://abc")
        site = socketmap_site(self, sections=sections)
        start_daemon(self, site)
        token = new_account(site)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        self.assertEqual(self.text("#addon-url"), "ws://127.0.0.1:%d/mail/ws" % self.port)
        b.click(element("#create"))
        address = b.wait_for(element("#created-address") + ".textContent")
        self.assertTrue(address, self.text("#create-error"))
        b.click(element("#rotate"))
        b.click(element("#confirm-rotate"))
        fresh = b.wait_for(element("#new-token") + ".textContent")
        self.assertTrue(fresh, self.text("#rotate-error"))
        self.assertEqual(list(listed(self, site, fresh)), [address])
        self.assertIn("ws://127.0.0.1:%d/mail/ws" % self.port, b.requested_urls())
        self.assert_page_behaved(token)


class OwnerPageKeyboardTest(OwnerPageDriver, unittest.TestCase):
    """The page works by keyboard alone, each control showing when it has the focus."""

    def test_sign_in_and_make_a_handle_with_tab_enter_and_space_only(self):
        site = self.page_site()
        start_daemon(self, site)
        token = new_account(site)
        b = self.browser
        self.open_page()
        self.assertEqual(b.js("document.activeElement.id"), "token")
        b.type(token)
        self.tab_to("#sign-in")
        b.press("Enter")
        self.assertTrue(b.wait_for("+document.body.dataset.loaded >= 1"))
        self.assertEqual(b.js("document.body.dataset.state"), "signed-in")
        self.tab_to("#new-label")
        b.type("by keyboard")
        self.tab_to("#create")
        b.press(" ")
        address = b.wait_for(element("#created-address") + ".textContent")
        self.assertTrue(address, self.text("#create-error"))
        self.assertEqual(listed(self, site, token)[address]["label"], "by keyboard")
        self.assertEqual(b.js("document.activeElement.id"), "copy-created")
        b.press("Enter")
        self.assertTrue(b.wait_for("%s.textContent === 'Copied'" % element("#status")))
        self.assertEqual(self.clipboard(), address)
        self.tab_to("[data-test=toggle]")
        b.press(" ")
        self.assertTrue(b.wait_for(self.row(address, "toggle") + ".ariaPressed === 'false'"))
        self.assertEqual(listed(self, site, token)[address]["enabled"], False)
        self.assert_page_behaved(token)


class OwnerPageManyHandlesTest(OwnerPageDriver, unittest.TestCase):
    """10,000 handles: the first screen comes at once (one page from the server), and paging
    and search stay quick."""

    def test_first_screen_of_10000_handles_comes_quickly_then_pages_and_search_work(self):
        site = self.page_site()
        now = int(time.time())
        token = seed_account(site, ({"local": "h%05d" % n, "domain": "incognito.test",
                                     "label": "site-%05d.example" % n, "created": now - 10000 + n}
                                    for n in range(1, 10001)))
        start_daemon(self, site)
        b = self.browser
        self.open_page()
        b.click(element("#token"))
        b.paste(token)
        seconds = b.js("new Promise(done => { const t0 = performance.now();"
                       "document.querySelector('#sign-in').click(); (function check() {"
                       "if (document.querySelectorAll('#handles [data-handle-id]').length) {"
                       "requestAnimationFrame(() => done((performance.now() - t0) / 1000)) }"
                       "else setTimeout(check, 2) })() })")
        sys.stderr.write("sign-in to the first screen of 10,000 handles: %.0f ms ... "
                         % (seconds * 1000))
        self.assertLess(seconds, 3.0)
        self.assertEqual(self.text("#page-info"), "1–50 of 10,000")
        shown = self.addresses()
        self.assertEqual(shown, ["h%05d@incognito.test" % n for n in range(10000, 9950, -1)])
        before, started = self.loads(), time.monotonic()
        b.click(element("#next"))
        self.wait_loaded(before)
        turn = time.monotonic() - started
        sys.stderr.write("next page: %.0f ms ... " % (turn * 1000))
        self.assertLess(turn, 3.0)
        self.assertEqual(self.text("#page-info"), "51–100 of 10,000")
        self.assertEqual(self.addresses()[0], "h09950@incognito.test")
        before = self.loads()
        b.click(element("#prev"))
        self.wait_loaded(before)
        self.assertEqual(self.addresses(), shown)
        before = self.loads()
        b.click(element("#search"))
        b.type("site-04242")
        self.wait_loaded(before)
        self.assertEqual(self.addresses(), ["h04242@incognito.test"])
        self.assertEqual(self.text("#total"), "1 found")
        self.assert_page_behaved(token)


class OwnerPageLookTest(OwnerPageDriver, unittest.TestCase):
    """Each handle shows its address, label, state, counts and times, newest first; the page
    fits 360 and 1280 px wide, light and dark (with INCOGNITOMAIL_SCREENSHOTS naming a folder,
    a screenshot of each goes there)."""

    def setUp(self):
        super().setUp()
        self.site = self.page_site()
        now, day = int(time.time()), 86400
        self.handles = [                                  # oldest first
            dict(local="k2v9d7q1m4x8p3z6", label="Newsletter: The Weekly Byte", received=1284,
                 last_received=now - 7200, blocked=3, last_blocked=now - 86000,
                 created=now - 90 * day),
            dict(local="s8f3j2w9c4n7b1t5", label="shop.example.com", enabled=0, received=7,
                 last_received=now - 20 * day, created=now - 60 * day),
            dict(local="c6r1y8e3u5h2a9g4", label="Conference 2024", received=2,
                 last_received=now - 45 * day, expires=now - 3 * day, created=now - 50 * day),
            dict(local="o3t7p1m9w5q2z8d4", label="one-time login code", max_messages=1,
                 received=1, last_received=now - 3600, created=now - 2 * day),
            dict(local="f9t4r7i2a6l1x3e8", label="free trial", max_messages=10, received=2,
                 last_received=now - 600, expires=now + 5 * day + 600, created=now - day),
            dict(local="n5e8w1h3a7n2d6l9", domain="other.test", created=now - 60),
        ]
        for handle in self.handles:
            handle.setdefault("domain", "incognito.test")
        self.token = seed_account(self.site, self.handles, "alice@example.org")
        start_daemon(self, self.site)
        self.open_page()

    def test_each_handle_shows_its_address_label_state_counts_and_times_newest_first(self):
        self.sign_in(self.token)
        shown = self.browser.js("""[...document.querySelectorAll('#handles [data-handle-id]')]
          .map((t) => { const part = (test) => t.querySelector('[data-test=' + test + ']');
            const cell = (name) => t.querySelector('td[data-label="' + name + '"]');
            const time = (name) => cell(name).querySelector('time');
            return [part('address').textContent, part('label').textContent,
                    part('state').textContent, part('received').textContent,
                    part('blocked').textContent, time('Last received')?.title
                    || cell('Last received').textContent, time('Created').title]; })""")

        def utc(seconds):
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
        expected_states = ["Active", "Off", "Expired " + time.strftime(
            "%Y-%m-%d", time.gmtime(self.handles[2]["expires"])), "Used up",
            "2 of 10 messages · Expires in 5 days", "Active"]
        expected = [["%s@%s" % (h["local"], h["domain"]), h.get("label") or "", state,
                     "{:,}".format(h.get("received", 0)), str(h.get("blocked", 0)),
                     utc(h["last_received"]) if h.get("last_received") else "Never",
                     utc(h["created"])] for h, state in zip(self.handles, expected_states)]
        self.assertEqual(shown, expected[::-1])
        self.assertEqual(self.text("#page-info"), "1–6 of 6")
        before = self.loads()
        self.browser.js(element("#filter") + ".focus()")
        self.browser.press("O")                     # the select's type-ahead: Off
        self.wait_loaded(before)
        self.assertEqual(self.addresses(), ["s8f3j2w9c4n7b1t5@incognito.test"])
        self.assert_page_behaved(self.token)

    def test_page_fits_360_and_1280_pixels_wide_in_light_and_dark(self):
        b = self.browser
        self.assert_fits("signed-out", shots=((360, False),))
        b.viewport(1280)
        self.sign_in(self.token)
        b.click(element("#new-label"))
        b.type("forum.example.net\n")
        self.assertTrue(b.wait_for(element("#created-address") + ".textContent"))
        b.click(self.row("s8f3j2w9c4n7b1t5@incognito.test", "delete"))
        b.js("scrollTo(0, 0)")
        self.assert_fits("signed-in")
        self.assert_page_behaved(self.token)


class OwnerPageTools:
    """What the owner page's newer tests do besides clicks and keys: what a screen reader is
    told, a value set as a browser's own picker sets it, editing keys, downloads."""

    def accessible(self, expression):
        """(role, name, {property: value}) of an element, as Chromium tells a screen reader."""
        b = self.browser
        found = b.send("Runtime.evaluate", expression=expression)["result"]
        self.assertIn("objectId", found, "no element: %s" % expression)
        node = b.send("Accessibility.getPartialAXTree", objectId=found["objectId"],
                      fetchRelatives=False)["nodes"][0]
        return (node["role"]["value"], (node.get("name") or {}).get("value"),
                {p["name"]: p["value"].get("value") for p in node.get("properties", [])})

    def create(self, before=""):
        """Click "Create handle"; the address it shows."""
        b = self.browser
        b.click(element("#create"))
        address = b.wait_for("%s.textContent !== %s && %s.textContent" % (
            element("#created-address"), json.dumps(before), element("#created-address")))
        self.assertTrue(address, self.text("#create-error"))
        return address

    def set_value(self, expression, value):
        """As a date picker or a select's list sets a control: its value, then input and
        change."""
        self.browser.js("(() => { const e = %s; e.value = %s; for (const t of ['input', 'change'])"
                        " e.dispatchEvent(new Event(t, {bubbles: true})); })()"
                        % (expression, json.dumps(value)))

    def key(self, key, code, number, modifiers=0, commands=()):
        b = self.browser
        b.send("Input.dispatchKeyEvent", type="rawKeyDown", key=key, code=code,
               windowsVirtualKeyCode=number, modifiers=modifiers, commands=list(commands))
        b.send("Input.dispatchKeyEvent", type="keyUp", key=key, code=code,
               windowsVirtualKeyCode=number, modifiers=modifiers)

    def retype(self, text):
        """Ctrl+A, Backspace, then ``text``, in the focused field."""
        self.key("a", "KeyA", 65, modifiers=2, commands=["selectAll"])
        self.key("Backspace", "Backspace", 8)
        self.browser.type(text)

    def focused(self):
        return self.browser.js("document.activeElement.id || document.activeElement.dataset.test"
                               " || document.activeElement.tagName")

    def local_time(self, days, hour=18, minute=30):
        """A datetime-local value ``days`` from now at hour:minute in the browser's time zone,
        and that moment in seconds since the epoch."""
        return self.browser.js(
            "(() => { const d = new Date(Date.now() + %d * 86400000); d.setHours(%d, %d, 0, 0);"
            " const two = (n) => String(n).padStart(2, '0'); return [d.getFullYear() + '-' +"
            " two(d.getMonth() + 1) + '-' + two(d.getDate()) + 'T' + two(d.getHours()) + ':' +"
            " two(d.getMinutes()), d.getTime() / 1000]; })()" % (days, hour, minute))

    def assert_page_behaved(self, *secrets):
        """As OwnerPageDriver's; but a data: URL is no request to another origin: Chromium
        draws a date input's calendar icon from one (the policy allows img-src data:)."""
        b = self.browser
        b.events = [e for e in b.events if not (e["method"] == "Network.requestWillBeSent" and
                                                e["params"]["request"]["url"].startswith("data:"))]
        super().assert_page_behaved(*secrets)

    def download_folder(self):
        """Downloads go to a folder of the test's own from now on."""
        folder = make_folder(self, prefix="incognitomail-test-downloads-")
        self.browser.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=folder)
        return folder

    def downloaded(self, folder, suffix, timeout=30):
        """(name, text) of the file downloaded into ``folder`` whose name ends with ``suffix``."""
        name = wait_until(lambda: next((n for n in os.listdir(folder) if n.endswith(suffix)),
                                       None), timeout, 0.05)
        self.assertTrue(name, "nothing ending in %s was downloaded: %s" % (suffix,
                                                                          os.listdir(folder)))
        with open(os.path.join(folder, name), encoding="utf-8", newline="") as f:
            return name, f.read()


class OwnerPageNewHandleTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """The form for a new handle: after "Create handle" it is as a new visitor sees it; "Ends"
    takes a date and time; a mistake is said until its field is fixed, not longer; and "Your
    new address" never offers a handle that was deleted."""

    def setUp(self):
        super().setUp()
        self.site = policy_page_site(self)
        start_daemon(self, self.site)
        self.token = new_account(self.site)
        self.open_page()
        self.sign_in(self.token)

    def form(self):
        return self.browser.js("({label: %s.value, ends: %s.value, max: %s.value, open: %s.open,"
                               " date: !!%s?.checkVisibility()})" % (
                                   element("#new-label"), element("#new-expires"),
                                   element("#new-max"), element("#new-form details"),
                                   element("#new-expires-at")))

    def test_after_create_the_form_is_as_a_new_visitor_sees_it(self):
        b = self.browser
        fresh = self.form()
        self.assertEqual(fresh, {"label": "", "ends": "", "max": "", "open": False,
                                 "date": False})
        b.click(element("#new-label"))
        b.type("burner.example")
        b.click(element("#new-form summary"))
        self.set_value(element("#new-expires"), "604800")
        b.click(element("#new-max"))
        b.type("3")
        address = self.create()
        handle = listed(self, self.site, self.token)[address]
        self.assertEqual((handle["label"], handle["max_messages"]), ("burner.example", 3))
        self.assertAlmostEqual(from_iso(handle["expires"]), time.time() + 7 * DAY, delta=120)
        self.assertEqual(self.form(), fresh)
        plain = self.create(address)                  # the next one is a plain one again
        handle = listed(self, self.site, self.token)[plain]
        self.assertEqual((handle["label"], handle["max_messages"], handle["expires"]),
                         (None, None, None))
        self.assert_page_behaved(self.token)

    def test_ends_takes_a_date_and_a_time(self):
        b = self.browser
        b.click(element("#new-form summary"))
        b.js(element("#new-expires") + ".focus()")
        b.press("O")                                # the select's type-ahead: On a date…
        self.assertEqual(b.js(element("#new-expires") + ".value"), "date")
        self.assertTrue(self.shown("#new-expires-at"))
        self.assertEqual(b.js(element("label[for=new-expires-at]") + ".textContent"),
                         "End date and time")
        prefilled = b.js("new Date(%s.value).getTime() / 1000" % element("#new-expires-at"))
        self.assertGreater(prefilled, time.time())
        value, moment = self.local_time(10)
        self.set_value(element("#new-expires-at"), value)
        address = self.create()
        self.assertEqual(from_iso(listed(self, self.site, self.token)[address]["expires"]),
                         moment)
        self.assertFalse(self.shown("#new-expires-at"))
        self.assert_page_behaved(self.token)

    def test_a_mistake_is_said_until_its_field_is_fixed_and_no_longer(self):
        b = self.browser
        b.click(element("#new-form summary"))
        b.click(element("#new-max"))
        b.type("0")
        b.click(element("#create"))
        message = b.wait_for(element("#create-error") + ".textContent")
        self.assertIn("Close after", message)
        self.assertTrue(self.shown("#create-error"))
        self.assertEqual(b.js(element("#new-max") + ".getAttribute('aria-invalid')"), "true")
        self.assertEqual(self.focused(), "new-max")
        self.retype("2")                             # fixed: the error goes at once
        self.assertTrue(b.wait_for("!%s.textContent" % element("#create-error")),
                        "the error stays after its field was fixed")
        self.assertFalse(self.shown("#create-error"))
        self.assertIsNone(b.js(element("#new-max") + ".getAttribute('aria-invalid')"))
        self.assertEqual(listed(self, self.site, self.token), {})

        self.set_value(element("#new-expires"), "date")
        value, _ = self.local_time(-2)
        self.set_value(element("#new-expires-at"), value)
        b.click(element("#create"))
        self.assertIn("in the future", b.wait_for(element("#create-error") + ".textContent"))
        self.assertEqual(self.focused(), "new-expires-at")
        value, moment = self.local_time(2)
        self.set_value(element("#new-expires-at"), value)
        self.assertTrue(b.wait_for("!%s.textContent" % element("#create-error")))
        address = self.create()
        handle = listed(self, self.site, self.token)[address]
        self.assertEqual((handle["max_messages"], from_iso(handle["expires"])), (2, moment))
        self.assert_page_behaved(self.token)

    def test_your_new_address_never_offers_a_deleted_handle(self):
        b = self.browser
        older = self.create()
        newer = self.create(older)
        self.assertTrue(b.wait_for("!!" + self.row(older)))
        b.click(self.row(older, "delete"))           # another handle: the new one stays offered
        b.click(self.row(older, "confirm-delete"))
        self.assertTrue(b.wait_for("!" + self.row(older)))
        self.assertEqual((self.shown("#created"), self.text("#created-address")), (True, newer))
        b.click(self.row(newer, "delete"))
        b.click(self.row(newer, "confirm-delete"))
        self.assertTrue(b.wait_for("!" + self.row(newer)))
        self.assertTrue(b.wait_for("!!%s.closest('[hidden]')" % element("#created")),
                        "the deleted handle is still offered as the new address")
        self.assertEqual(self.text("#created-address"), "")
        self.assertEqual(listed(self, self.site, self.token), {})
        self.assert_page_behaved(self.token)


class OwnerPageDefaultLifetimeTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """With HandleLifetime set, "Ends" offers the server's default first, as what a handle made
    without a choice gets, and "Never" after it, kept as chosen."""

    def setUp(self):
        super().setUp()
        sections = self.listen_sections()
        sections["PostfixConfig"] = {"HandleLifetime": "30d"}
        self.site = socketmap_site(self, sections=sections)
        start_daemon(self, self.site)
        self.token = new_account(self.site)
        self.open_page()
        self.sign_in(self.token)

    def test_ends_offers_the_servers_default_first_then_never(self):
        b = self.browser
        options = b.js("[...%s.options].map((o) => [o.value, o.textContent])" % element("#new-expires"))
        self.assertEqual(options[:2], [["", "In 30 days (this server's default)"], ["never", "Never"]])
        by_default = self.create()
        b.click(element("#new-form summary"))
        self.set_value(element("#new-expires"), "never")
        never = self.create(by_default)
        handles = listed(self, self.site, self.token)
        self.assertAlmostEqual(from_iso(handles[by_default]["expires"]), time.time() + 30 * DAY, delta=120)
        self.assertIsNone(handles[never]["expires"])
        self.assertEqual(b.js(element("#new-expires") + ".value"), "")   # the default again
        self.assert_page_behaved(self.token)


class OwnerPageEndedHandlesTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """An expired or used-up handle is no dead end: its switch says it has ended (not "on"),
    and the page gives it a new end (a date and time, a duration, or never) or a higher limit,
    or none, so that it forwards again; and each handle may refuse mail as if unknown."""

    EXPIRED, USED_UP = "e1x9p2r4d7a3t5k8@incognito.test", "u2s7d4p9q1m6z3w8@incognito.test"
    OFF, ON = "o5f3f8d2k7w1q9z4@incognito.test", "n4w8e2l6s3t9r1a7@incognito.test"

    def setUp(self):
        super().setUp()
        self.site = policy_page_site(self)
        now = int(time.time())
        self.token = seed_account(self.site, [
            dict(local=self.EXPIRED[:16], domain="incognito.test", label="trial",
                 expires=now - 3 * DAY, received=4, created=now - 30 * DAY),
            dict(local=self.USED_UP[:16], domain="incognito.test", label="one-time code",
                 max_messages=1, received=1, created=now - 2 * DAY),
            dict(local=self.OFF[:16], domain="incognito.test", label="old shop", enabled=0,
                 created=now - 10 * DAY),
            dict(local=self.ON[:16], domain="incognito.test", label="newsletter",
                 expires=now + 5 * DAY, created=now - DAY)])
        start_daemon(self, self.site)
        self.open_page()
        self.sign_in(self.token)

    def policy(self, address):
        return ask_policy(self.policy_port, address).strip()

    def test_an_ended_handles_switch_says_ended_and_is_not_on(self):
        b = self.browser
        for address in (self.EXPIRED, self.USED_UP):
            role, name, properties = self.accessible(self.row(address, "toggle"))
            self.assertEqual((role, name), ("button", "Forwarding for %s: ended" % address))
            self.assertNotIn("pressed", properties)
            self.assertIsNone(b.js(self.row(address, "toggle") + ".ariaPressed"))
        for address, pressed in ((self.ON, "true"), (self.OFF, "false")):
            role, name, properties = self.accessible(self.row(address, "toggle"))
            self.assertEqual((name, properties.get("pressed")),
                             ("Forwarding for %s" % address, pressed))
        look = "getComputedStyle(%s).backgroundColor"
        self.assertNotEqual(b.js(look % self.row(self.EXPIRED, "toggle")),
                            b.js(look % self.row(self.ON, "toggle")))
        self.assertEqual(b.js(self.row(self.EXPIRED, "state") + ".textContent")[:8], "Expired ")
        self.assertEqual(b.js(self.row(self.USED_UP, "state") + ".textContent"), "Used up")
        self.assert_page_behaved(self.token)

    def test_an_expired_handle_gets_a_new_end_time_and_forwards_again(self):
        b = self.browser
        self.assertIn("has expired", self.policy(self.EXPIRED))
        b.click(self.row(self.EXPIRED, "toggle"))    # its switch opens what revives it
        self.assertTrue(b.wait_for("document.activeElement.dataset.test === 'ends'"))
        self.assertIn("ended", b.js(self.row(self.EXPIRED, "ended-note") + ".textContent"))
        b.press("O")                                  # type-ahead: On a date…
        self.assertTrue(b.wait_for("!%s.closest('[hidden]')"
                                   % self.row(self.EXPIRED, "ends-at")))
        value, moment = self.local_time(3, 12, 0)
        self.set_value(self.row(self.EXPIRED, "ends-at"), value)
        b.js(self.row(self.EXPIRED, "ends-at") + ".focus()")
        b.press("Enter")
        self.assertTrue(b.wait_for("%s?.ariaPressed === 'true'" % self.row(self.EXPIRED, "toggle")),
                        b.js(self.row(self.EXPIRED) + ".innerText"))
        self.assertRegex(b.js(self.row(self.EXPIRED, "state") + ".textContent"),
                         r"^Expires in [234] days$")
        handle = listed(self, self.site, self.token)[self.EXPIRED]
        self.assertEqual((handle["state"], from_iso(handle["expires"])), ("enabled", moment))
        self.assertEqual(self.policy(self.EXPIRED), "action=DUNNO")
        self.assertEqual(self.focused(), "edit")

        b.click(self.row(self.ON, "edit"))            # one that ends: never, then in 30 days
        self.set_value(self.row(self.ON, "ends"), "never")
        b.click(self.row(self.ON, "save-edit"))
        self.assertTrue(b.wait_for("%s?.textContent === 'Active'" % self.row(self.ON, "state")))
        self.assertIsNone(listed(self, self.site, self.token)[self.ON]["expires"])
        b.click(self.row(self.ON, "edit"))
        self.set_value(self.row(self.ON, "ends"), "2592000")
        b.click(self.row(self.ON, "save-edit"))
        self.assertTrue(b.wait_for("%s?.textContent.startsWith('Expires')"
                                   % self.row(self.ON, "state")))
        self.assertAlmostEqual(from_iso(listed(self, self.site, self.token)[self.ON]["expires"]),
                               time.time() + 30 * DAY, delta=120)
        self.assert_page_behaved(self.token)

    def test_a_used_up_handle_gets_a_higher_limit_then_none(self):
        b = self.browser
        self.assertIn("all the messages", self.policy(self.USED_UP))
        b.click(self.row(self.USED_UP, "revive"))
        self.assertTrue(b.wait_for("document.activeElement.dataset.test === 'limit'"))
        self.assertEqual(b.js("document.activeElement.value"), "1")
        self.assertIn("Received so far: 1", b.js(self.row(self.USED_UP) + ".innerText"))
        self.retype("5\n")
        self.assertTrue(b.wait_for("%s?.textContent === '1 of 5 messages'"
                                   % self.row(self.USED_UP, "state")),
                        b.js(self.row(self.USED_UP) + ".innerText"))
        self.assertEqual(b.js(self.row(self.USED_UP, "toggle") + ".ariaPressed"), "true")
        handle = listed(self, self.site, self.token)[self.USED_UP]
        self.assertEqual((handle["state"], handle["max_messages"]), ("enabled", 5))
        self.assertEqual(self.policy(self.USED_UP), "action=DUNNO")

        b.click(self.row(self.USED_UP, "edit"))       # no limit at all
        b.click(self.row(self.USED_UP, "limit"))
        self.retype("")
        b.click(self.row(self.USED_UP, "save-edit"))
        self.assertTrue(b.wait_for("%s?.textContent === 'Active'"
                                   % self.row(self.USED_UP, "state")))
        self.assertIsNone(listed(self, self.site, self.token)[self.USED_UP]["max_messages"])
        self.assert_page_behaved(self.token)

    def test_a_handle_refuses_as_if_unknown_as_its_owner_chooses(self):
        b = self.browser
        self.assertIn("disabled", self.policy(self.OFF))
        shown = []
        for choice, stored in (("true", True), ("false", False), ("", None)):
            b.click(self.row(self.OFF, "edit"))
            self.assertTrue(b.wait_for("!!" + self.row(self.OFF, "refuse")))
            shown.append(b.js(self.row(self.OFF, "refuse") + ".value"))
            self.assertEqual(b.js("document.querySelector('label[for=' + %s.id + ']')"
                                  ".textContent" % self.row(self.OFF, "refuse")),
                             "Refuse as if unknown")
            self.set_value(self.row(self.OFF, "refuse"), choice)
            b.click(self.row(self.OFF, "save-edit"))
            self.assertTrue(b.wait_for("!" + self.row(self.OFF, "refuse")))
            self.assertEqual(listed(self, self.site, self.token)[self.OFF]["refuse_as_unknown"],
                             stored)
            if stored:      # as if it did not exist: Postfix's own "User unknown", not why
                self.assertNotIn("disabled", self.policy(self.OFF))
            else:
                self.assertIn("disabled", self.policy(self.OFF))
        self.assertEqual(shown, ["", "true", "false"])
        self.assertEqual(b.js(self.row(self.OFF, "state") + ".textContent"), "Off")
        self.assert_page_behaved(self.token)


class OwnerPageLargeAccountTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """230 handles: the account's totals come first; first, previous, next and last page and a
    jump to page N, with a pager at the top too; six orders; and rows selected one by one or a
    whole page at once are switched off, on, or deleted in one go (after one confirmation
    naming how many)."""

    COUNT = 230

    def setUp(self):
        super().setUp()
        self.site = self.page_site()
        now = int(time.time())
        self.handles = [dict(local="big%05d" % n, domain="incognito.test",
                             label="site-%05d.example" % n, created=now - 10000 + n,
                             received=n * 7919 % 1009, last_received=now - (n * 13 % 230) * 60,
                             blocked=n * 613 % 1013, last_blocked=now - (n * 17 % 230) * 60)
                        for n in range(1, self.COUNT + 1)]
        self.token = seed_account(self.site, self.handles)
        for n in (5, 50, 77):
            set_seeded_columns(self.site, "big%05d" % n, bounced=n)
        start_daemon(self, self.site)
        self.open_page()
        self.sign_in(self.token)

    def first_page(self, key, reverse=True):
        order = sorted(self.handles, key=lambda h: h[key], reverse=reverse)
        return ["%s@incognito.test" % h["local"] for h in order[:50]]

    def turn(self, click):
        before = self.loads()
        self.browser.click(element(click))
        self.wait_loaded(before)
        return self.text("#page-info")

    def test_totals_come_first(self):
        b = self.browser
        totals = {name: self.text("#sum-" + name) for name in
                  ("handles", "received", "blocked", "bounced")}
        self.assertEqual(totals, {
            "handles": "230", "received": "{:,}".format(sum(h["received"] for h in self.handles)),
            "blocked": "{:,}".format(sum(h["blocked"] for h in self.handles)),
            "bounced": str(5 + 50 + 77)})
        self.assertTrue(b.js("%s.compareDocumentPosition(%s) & Node.DOCUMENT_POSITION_FOLLOWING"
                             % (element("#sum-handles"), element("#new-h"))))
        self.assertLess(b.js(element("#sum-handles") + ".getBoundingClientRect().bottom"),
                        b.js(element("#new-h") + ".getBoundingClientRect().top"))
        self.assert_page_behaved(self.token)

    def test_pages_first_last_jump_and_a_pager_at_the_top(self):
        b = self.browser
        self.assertEqual(self.text("#page-info"), "1–50 of 230")
        self.assertTrue(self.shown("#pager-top"))
        self.assertEqual(self.text("#page-info-top"), "Page 1 of 5")
        self.assertEqual(b.js("[%s.disabled, %s.disabled]" % (element("#first"),
                                                               element("#prev"))), [True, True])
        self.assertEqual(self.turn("#last"), "201–230 of 230")
        self.assertEqual(self.addresses()[-1], "big00001@incognito.test")
        self.assertEqual(self.focused(), "list-h")      # the new page is read from its top
        self.assertEqual(b.js("[%s.disabled, %s.disabled]" % (element("#next"),
                                                               element("#last"))), [True, True])
        self.assertEqual(self.turn("#first"), "1–50 of 230")
        before = self.loads()
        b.click(element("#page-jump"))
        self.retype("3\n")
        self.wait_loaded(before)
        self.assertEqual(self.text("#page-info"), "101–150 of 230")
        self.assertEqual(self.addresses()[0], "big00130@incognito.test")
        self.assertEqual(self.turn("#next-top"), "151–200 of 230")
        self.assertEqual(self.text("#page-info-top"), "Page 4 of 5")
        self.assertEqual(self.turn("#prev-top"), "101–150 of 230")

        b.viewport(360, 800)                           # a phone: a pager above the list too
        top = b.js(element("#next-top") + ".getBoundingClientRect().toJSON()")
        first = b.js("document.querySelector('#handles tbody').getBoundingClientRect().toJSON()")
        self.assertTrue(top["width"] and top["bottom"] <= first["top"], (top, first))
        per_row = b.js(element("#handles table") + ".getBoundingClientRect().height / 50")
        sys.stderr.write("%.0f px a handle at 360 px ... " % per_row)
        self.assertLess(per_row, 230)
        self.assertEqual(self.turn("#next-top"), "151–200 of 230")
        self.assert_page_behaved(self.token)

    def test_six_orders(self):
        b = self.browser
        newest = ["big%05d@incognito.test" % n for n in range(230, 180, -1)]
        self.assertEqual(self.addresses(), newest)
        before = self.loads()
        b.js(element("#sort") + ".focus()")
        b.press("M")                                # the select's type-ahead: Most received
        self.wait_loaded(before)
        self.assertEqual(b.js(element("#sort") + ".value"), "-emails_forwarded")
        self.assertEqual(self.addresses(), self.first_page("received"))
        for value, expected in (("-emails_blocked", self.first_page("blocked")),
                                ("-last_forwarded", self.first_page("last_received")),
                                ("-last_blocked", self.first_page("last_blocked")),
                                ("created_at", self.first_page("created", reverse=False)),
                                ("-created_at", newest)):
            before = self.loads()
            self.set_value(element("#sort"), value)
            self.wait_loaded(before)
            self.assertEqual(self.addresses(), expected, value)
        self.assert_page_behaved(self.token)

    def test_selected_handles_are_switched_off_on_and_deleted_in_one_go(self):
        b = self.browser
        picked = self.addresses()[1:3]
        for address in picked:
            b.click(self.row(address, "select"))
        self.assertEqual(self.text("#selected-count"), "2 selected")
        self.assertEqual(b.js(element("#select-all") + ".indeterminate"), True)
        for button, enabled, state in (("#bulk-off", False, "Off"), ("#bulk-on", True, "Active")):
            before = self.loads()
            b.click(element(button))
            self.wait_loaded(before)
            handles = listed(self, self.site, self.token)
            self.assertEqual([handles[a]["enabled"] for a in picked], [enabled, enabled])
            self.assertEqual(sum(h["enabled"] for h in handles.values()),
                             230 - 2 * (not enabled))
            self.assertEqual([b.js(self.row(a, "state") + ".textContent") for a in picked],
                             [state, state])
        self.assertEqual(self.text("#selected-count"), "2 selected")

        b.click(element("#select-all"))
        self.assertEqual(self.text("#selected-count"), "50 selected")
        self.assertEqual(b.js("[...document.querySelectorAll('#handles [data-test=select]')]"
                              ".filter((c) => c.checked).length"), 50)
        shown = self.addresses()
        b.click(element("#bulk-delete"))
        self.assertEqual(self.focused(), "cancel-bulk-delete")
        self.assertIn("Delete 50 handles?", self.text("#bulk-q"))
        self.assertEqual(self.text("#confirm-bulk-delete"), "Delete 50 handles")
        self.assertEqual(len(listed(self, self.site, self.token)), 230)
        before = self.loads()
        b.click(element("#confirm-bulk-delete"))
        self.wait_loaded(before)
        left = listed(self, self.site, self.token)
        self.assertEqual(len(left), 180)
        self.assertFalse(set(shown) & set(left))
        self.assertEqual(self.text("#page-info"), "1–50 of 180")
        self.assertTrue(b.wait_for("%s.textContent === '180'" % element("#sum-handles")))
        self.assertEqual((self.text("#selected-count"), self.shown("#bulk-confirm")), ("", False))
        self.assertEqual(b.js(element("#bulk-delete") + ".disabled"), True)
        self.assert_page_behaved(self.token)


class OwnerPageScreenReaderTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """What a screen reader says and where the keyboard goes: the list's heading is "Handles,
    N", and two skip links lead past the rest of the page to the list or the new handle."""

    def setUp(self):
        super().setUp()
        self.site = self.page_site()
        self.token = seed_account(self.site, numbered_handles(60))
        start_daemon(self, self.site)
        self.open_page()
        self.sign_in(self.token)

    def test_the_lists_heading_reads_handles_comma_count(self):
        b = self.browser
        self.assertEqual(self.accessible(element("#list-h"))[:2], ("heading", "Handles, 60"))
        self.assertEqual(self.accessible("document.querySelector('#list-h').closest('section')")
                         [1], "Handles, 60")
        before = self.loads()
        b.click(element("#search"))
        b.type("seed000000000042")
        self.wait_loaded(before)
        self.assertEqual(self.accessible(element("#list-h"))[1], "Handles, 1 found")
        self.assert_page_behaved(self.token)

    def test_skip_links_lead_past_the_page_to_the_list_and_the_new_handle(self):
        b = self.browser
        self.assertEqual(self.focused(), "app-title")
        b.press("Tab")
        self.assertEqual(self.focused(), "skip-list")
        self.assertEqual(self.text("#skip-list"), "Skip to the list")
        spot = b.js(element("#skip-list") + ".getBoundingClientRect().toJSON()")
        self.assertTrue(spot["width"] > 20 and spot["top"] >= 0, spot)   # seen when focused
        b.press("Enter")
        self.assertEqual(self.focused(), "list-h")
        b.press("Tab")
        self.assertEqual(self.focused(), "search")

        b.js(element("#app-title") + ".focus()")     # as after signing in
        b.press("Tab")
        b.press("Tab")
        self.assertEqual(self.focused(), "skip-new")
        self.assertEqual(self.text("#skip-new"), "Skip to new handle")
        b.press("Enter")
        self.assertEqual(self.focused(), "new-label")
        self.assert_page_behaved(self.token)


class OwnerPageGuidanceTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """The page says what a handle is for and where to use it, and how to connect Bitwarden,
    as README.md says."""

    def setUp(self):
        super().setUp()
        self.site = self.page_site()
        start_daemon(self, self.site)
        self.token = new_account(self.site)
        self.open_page()
        self.sign_in(self.token)

    def test_an_empty_list_says_what_a_handle_is_for_and_where_to_use_it(self):
        b = self.browser
        said = " ".join(self.text("#empty").split())
        for words in ("No handles yet", "each website its own", "sign-up form",
                      "switch it off", "spam", "Bitwarden"):
            self.assertIn(words, said)
        b.click(element("#empty a"))
        self.assertEqual(self.focused(), "apps-h")
        self.assertEqual(self.text("#apps-h"), "Connect your apps")
        self.assert_page_behaved(self.token)

    def test_connect_your_apps_names_bitwardens_menus_and_fields_as_readme_does(self):
        b = self.browser
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
            readme = f.read().split("### Bitwarden and other password managers", 1)[1]
        readme = readme.split("\n### ", 1)[0]
        bold = lambda text: re.findall(r"\*\*(.+?)\*\*", text)     # noqa: E731
        where = dict(re.findall(r"^\| (browser extension|desktop app|web vault|Android app) \| "
                                r"(.+) \|$", readme, re.M))
        self.assertEqual(len(where), 4, where)
        bitwarden = element("section[aria-labelledby=apps-h] .app")
        apps = b.js("[...%s.querySelectorAll('li')].map((li) => li.innerText.replace(/\\s+/g, ' '))"
                    % bitwarden)
        said = " ".join(b.js(bitwarden + ".innerText").split())
        for app, text in where.items():
            line = next((a for a in apps if a.lower().startswith(app.split()[0].lower())), "")
            path = bold(text.split("**Service**")[0])
            self.assertTrue(path, text)
            spots = [line.find(step) for step in path]
            self.assertTrue(-1 not in spots and spots == sorted(spots), (app, path, line))
        fields = readme.split("Then fill in:", 1)[1].split("Each ", 1)[0]
        for name in bold(fields):
            self.assertIn(name, said)
        for android in ("API access token", "Domain name"):
            self.assertIn("Android: " + android, said)
        self.assertIn("Service: addy.io", said)
        self.assertNotIn("Settings > Generator", said)
        self.assertEqual(self.text("#bw-domain"), "incognito.test")
        self.assertEqual(self.text("#bitwarden-url"), self.origin)
        b.click(element("[data-copy=bw-domain]"))
        self.assertTrue(b.wait_for("%s.textContent === 'Copied'" % element("#status")))
        self.assertEqual(self.clipboard(), "incognito.test")
        self.assert_page_behaved(self.token)


class OwnerPageRowCountsTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """A row tells what went through the milter: how many bounces came back (and when the
    last did) and how many messages its owner sent from it; a row with neither is silent."""

    def test_a_row_tells_its_bounces_and_what_was_sent_from_it(self):
        site = self.page_site()
        now = int(time.time())
        token = seed_account(site, [dict(local="r%015d" % n, domain="incognito.test", created=now - n)
                                    for n in range(1, 4)])
        set_seeded_columns(site, "r000000000000001", bounced=1234, last_bounced=now - 3 * DAY, sent=3)
        set_seeded_columns(site, "r000000000000002", sent=1)
        start_daemon(self, site)
        self.open_page()
        self.sign_in(token)
        said = self.browser.js("Object.fromEntries([...document.querySelectorAll('#handles tbody')].map("
                               "(t) => [t.querySelector('[data-test=address]').textContent, "
                               "t.querySelector('[data-test=replies]')?.textContent ?? null]))")
        self.assertEqual(said, {"r000000000000001@incognito.test": "1,234 bounced, last 3 days ago · 3 sent from it",
                                "r000000000000002@incognito.test": "1 sent from it",
                                "r000000000000003@incognito.test": None})
        self.assert_page_behaved(token)


class OwnerPageExportTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """"Download CSV" and "Download JSON" save every handle, exactly as the command line's
    export writes them (which import reads back), read page by page over the WebSocket, under
    the page's strict policy (a blob: download needs nothing more)."""

    def test_downloads_are_the_command_lines_export(self):
        site = self.page_site()
        now = int(time.time())
        labels = ['Café "Le Zinc", Paris', "naïve 📫 mail", None, "a,b", "plain", "x\"y"]
        handles = [dict(local="exp%05d" % n, domain="incognito.test" if n % 3 else "other.test",
                        label=labels[n % len(labels)], created=now - 100000 + n,
                        received=n % 17, last_received=now - n * 60 if n % 2 else None,
                        blocked=n % 5, enabled=int(n % 7 != 0),
                        expires=(now - 3 * DAY if n % 11 == 0 else now + 40 * DAY)
                        if n % 4 == 0 else None,
                        max_messages=50 if n % 13 == 0 else None)
                   for n in range(1, 231)]
        token = seed_account(site, handles)
        set_seeded_columns(site, "exp00007", bounced=2, sent=3, refuse_as_unknown=1)
        start_daemon(self, site)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        folder = self.download_folder()
        b.click(element("#export-csv"))
        name, text = self.downloaded(folder, ".csv")
        self.assertRegex(name, r"^incognitomail-handles-[0-9]{4}-[0-9]{2}-[0-9]{2}[.]csv$")
        self.assertEqual(text, run_cli(self, site, "export", token).stdout)
        self.assertTrue(b.wait_for("%s.textContent.startsWith('Saved 230 handles')"
                                   % element("#export-note")), self.text("#export-error"))
        b.click(element("#export-json"))
        name, text = self.downloaded(folder, ".json")
        self.assertEqual(text, run_cli(self, site, "--json", "export", token).stdout)
        self.assertEqual(len(json.loads(text)), 230)
        self.assertIn("ws://127.0.0.1:%d/incognitomail" % self.port, b.requested_urls())
        self.assert_page_behaved(token)


class OwnerPageOpenPartsLookTest(OwnerPageTools, OwnerPageDriver, unittest.TestCase):
    """The page's parts that open fit 360 and 1280 px wide, light and dark: an ended handle's
    editor with its date and time, a mistake in the new handle's options, the bulk
    confirmation and both pagers, and an empty account's first screen (with
    INCOGNITOMAIL_SCREENSHOTS naming a folder, a screenshot of each goes there)."""

    def test_an_open_editor_a_mistake_the_bulk_confirmation_and_the_pagers_fit(self):
        site = policy_page_site(self)
        now = int(time.time())
        handles = numbered_handles(118)
        handles += [dict(local="e1x9p2r4d7a3t5k8", domain="incognito.test", created=now,
                         label="Conference 2024 — badge pick-up and the hotel", received=2,
                         expires=now - 3 * DAY),
                    dict(local="u2s7d4p9q1m6z3w8", domain="incognito.test", created=now,
                         label="one-time code", max_messages=1, received=1)]
        token = seed_account(site, handles)
        start_daemon(self, site)
        b = self.browser
        self.open_page()
        self.sign_in(token)
        b.click(element("#new-form summary"))
        self.set_value(element("#new-expires"), "date")
        b.click(element("#new-max"))
        b.type("0\n")
        self.assertTrue(b.wait_for(element("#create-error") + ".textContent"))
        b.click(self.row("e1x9p2r4d7a3t5k8@incognito.test", "toggle"))
        self.set_value(self.row("e1x9p2r4d7a3t5k8@incognito.test", "ends"), "date")
        b.click(self.row("u2s7d4p9q1m6z3w8@incognito.test", "select"))
        b.click(self.row("seed000000000117@incognito.test", "select"))
        b.click(element("#bulk-delete"))
        self.assertTrue(self.shown("#pager-top") and self.shown("#jump-form"))
        b.js("scrollTo(0, 0)")
        self.assert_fits("open-parts")
        self.assert_page_behaved(token)

    def test_an_empty_accounts_first_screen_fits(self):
        site = self.page_site()
        start_daemon(self, site)
        token = new_account(site)
        self.open_page()
        self.sign_in(token)
        self.assertTrue(self.shown("#empty"))
        self.assert_fits("empty")
        self.assert_page_behaved(token)

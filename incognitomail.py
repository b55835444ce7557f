#!/usr/bin/env python3
"""IncognitoMail: a fresh forwarding address for every website, beside your Postfix server.

An *account* is a real target address plus a secret token. A *handle* is a random address
(``k3v9q0x2m7ab5ts1@mail.example.org``) made with that token; IncognitoMail records it and keeps
Postfix's canonical or virtual alias map in step, so mail to the handle reaches the account's
address at once, until the handle is switched off or ends by itself. One daemon owns the data;
the command line talks to it over a Unix socket, the browser add-on over a WebSocket, password
managers over an HTTP API in addy.io's and SimpleLogin's dialects, and owners through a page it
serves; Postfix asks it through a policy service or a socketmap.

One module, standard library only, Python 3.9 or newer. Read it top to bottom: each section uses
only those above it.

    python3 incognitomail.py -c incognitomail.ini            # run the server
    python3 incognitomail.py -c incognitomail.ini new account me@example.org
    python3 incognitomail.py -c incognitomail.ini new handle -   # secret read from stdin
"""

import argparse
import asyncio
import base64
import codecs
import collections
import concurrent.futures
import configparser
import contextlib
import csv
import datetime
import email.header
import email.utils
import errno
import fcntl
import grp
import functools
import hashlib
import hmac
import html
import io
import ipaddress
import json
import logging
import logging.handlers
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import string
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from http import HTTPStatus

__version__ = "2.1.0"

log = logging.getLogger("incognitomail")


###############################################################################
# Errors, and the operating-system helpers every section uses
###############################################################################

class IncognitoMailError(Exception):
    """Root of every error this module raises on purpose.

    ``str(error)`` is a complete message for a person: it names the file, key, command or
    address at fault. ``code`` is the short machine-readable form used by the JSON protocols.
    No error message ever contains a secret token.
    """
    code = "internal"


class ConfigError(IncognitoMailError):
    """The configuration file is missing, unreadable or has a bad value."""


class BadRequest(IncognitoMailError):
    """The caller asked for something malformed: a bad address, an unknown operation.
    ``field`` names the request field at fault, when one is."""
    code = "bad_request"

    def __init__(self, message, field=None):
        super().__init__(message)
        self.field = field


class Unauthorized(IncognitoMailError):
    """The secret token matches no account."""
    code = "unauthorized"


class NotFound(IncognitoMailError):
    """The handle does not exist or belongs to another account."""
    code = "not_found"


class RateLimited(IncognitoMailError):
    """A client or account asked too often; ``retry_after`` says when to try again."""
    code = "rate_limited"

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class StoreError(IncognitoMailError):
    """The database could not be opened, migrated or written."""


class PostfixError(IncognitoMailError):
    """The map file or ``postmap`` failed; the change was rolled back."""


class ServerError(IncognitoMailError):
    """The daemon cannot start, is already running, or cannot be reached."""


class PostfixProtocolError(IncognitoMailError):
    """A policy or socketmap client (Postfix) sent something that is not the protocol."""


class HttpError(IncognitoMailError):
    """An HTTP request is refused before it reaches an operation: answer ``status``, close."""

    def __init__(self, status, reason, headers=()):
        super().__init__("%d %s" % (status, reason))
        self.status, self.reason, self.headers = status, reason, list(headers)


class WebSocketProtocolError(IncognitoMailError):
    """The peer broke RFC 6455: fail the connection with ``close_code``."""

    def __init__(self, close_code, reason):
        super().__init__("%d %s" % (close_code, reason))
        self.close_code, self.reason = close_code, reason


def _is_number(text):
    """Only ASCII digits: ``str.isdigit`` also takes ``"²"``, which ``int`` refuses."""
    return bool(re.fullmatch(r"[0-9]+", text))


def _os_reason(error):
    """The readable part of an OSError, without Python's ``[Errno N]`` decoration."""
    return getattr(error, "strerror", None) or str(error)


def _user_name(uid=None):
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def _file_identity(path):
    """What a file is now (inode, size, mtime), to notice that someone else changed it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _others_may_write(st):
    """Could a user other than root or us write into the folder whose stat is ``st``?"""
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and st.st_gid not in (0, os.getegid())


def _private_folder(folder, key, error=None, create=True):
    """Make sure ``folder`` exists (created mode 0700) and only root and we may write into it:
    otherwise another user could put a symlink where we create a file, as root."""
    error = error or ServerError
    try:
        if create:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        st = os.stat(folder)
    except OSError as e:
        raise error("%s: cannot create the folder for %s: %s" % (folder, key, _os_reason(e)))
    if _others_may_write(st):
        raise error("%s: folder for %s may be written by users other than root and %s, who "
                    "could make us overwrite any file; make it theirs alone (owned by root or %s, "
                    "chmod go-w %s)" % (folder, key, _user_name(), _user_name(), folder))



###############################################################################
# Configuration
###############################################################################

DEFAULT_CONFIG_PATH = "/etc/incognitomail/incognitomail.ini"

# Map types that ``postmap -i`` and ``postmap -d`` can update in place.
UPDATABLE_MAP_TYPES = ("hash", "btree", "lmdb")

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)"
                        r"(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def parse_host_port(text):
    """``":9090"`` -> ("", 9090) (all interfaces); ``"[::1]:9090"`` -> ("::1", 9090)."""
    host, sep, port = text.rpartition(":")
    if not sep or not _is_number(port) or not 0 < int(port) < 65536:
        raise ValueError("%r must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9090 "
                         "or :9090" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("%r: write an IPv6 address in brackets, e.g. [::1]:9090" % text)
    return host, int(port)


MAX_LIFETIME = 100 * 366 * 86400
_DURATION = re.compile(r"([0-9]{1,10})([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text):
    """``90m``, ``12h``, ``30d``, ``2w`` -> seconds; ValueError naming what is wrong."""
    match = _DURATION.fullmatch(text.strip().lower()) if isinstance(text, str) else None
    if not match:
        raise ValueError("%r is not a duration like 90m, 12h or 30d (units: s, m, h, d, w)" % text)
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not 0 < seconds <= MAX_LIFETIME:
        raise ValueError("%r is not a duration from 1 s to 100 years" % text)
    return seconds


# How a key's text becomes its value: reader(file, text) -> value, or ValueError naming the
# problem. ``file`` is the _ConfigFile being read, for relative paths.

def _path(file, text):
    return os.path.normpath(os.path.join(file.folder, text)) if text else ""


def _number(low, high=None, empty_is_none=False):
    def read(file, text):
        if empty_is_none and text == "":
            return None
        try:
            number = int(text)
        except ValueError:
            raise ValueError("%r is not a whole number" % text) from None
        if number < low or (high is not None and number > high):
            raise ValueError("%d is out of range (%d to %s)"
                             % (number, low, "any" if high is None else high))
        return number
    return read


def _one_of(*choices):
    def read(file, text):
        if text.lower() not in choices:
            raise ValueError("%r is not one of: %s" % (text.lower(), ", ".join(choices)))
        return text.lower()
    return read


def _yes_no(file, text):
    try:
        return configparser.ConfigParser.BOOLEAN_STATES[text.lower()]
    except KeyError:
        raise ValueError("%r is not yes or no" % text) from None


def _store_type(file, text):
    if text.lower() == "boltdb":
        log.warning("%s [Persistence] Type: boltdb was the original's store; using sqlite "
                    "(the default store) instead", file.path)
    elif text.lower() != "sqlite":
        raise ValueError("%r is not supported; use sqlite" % text)


def _mail_system(file, text):
    if text.lower() != "postfix":
        raise ValueError("%r is not supported; only postfix is" % text.lower())


def _domains(file, text):
    domains = []
    for item in text.split(","):
        domain = item.strip().lstrip("@").lower()
        if not _DOMAIN_RE.match(domain):
            raise ValueError("%r is not a domain name" % item.strip())
        if domain not in domains:
            domains.append(domain)
    return tuple(domains)


def _map_file(file, text):
    """``TYPE:PATH`` (TYPE defaults to hash) -> (type, absolute path)."""
    match = re.match(r"^([a-z]+):(.*)$", text)
    map_type, path = match.groups() if match else ("hash", text)
    if map_type not in UPDATABLE_MAP_TYPES:
        raise ValueError("map type %r cannot be updated in place by postmap; use one of: %s"
                         % (map_type, ", ".join(UPDATABLE_MAP_TYPES)))
    if not path:
        raise ValueError("no path given")
    return map_type, _path(file, path)


def _host_port(file, text):
    if text:
        parse_host_port(text)
    return text


def _url_path(file, text):
    if not text.startswith("/"):
        raise ValueError("%r must start with /" % text)
    return text


def _list(file, text):
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _lifetime(file, text):
    return parse_duration(text) if text else None


def _host_name(text):
    """A Host header's name, lower-cased, without its port (``[::1]:9090`` -> ``::1``)."""
    text = text.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    return text.rpartition(":")[0] if text.count(":") == 1 else text


def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_names(file, text):
    names = tuple(_host_name(item) for item in _list(file, text))
    for name in names:
        if not name or (not _DOMAIN_RE.match(name) and not _is_ip(name)):
            raise ValueError("%r is not a host name or IP address" % name)
    return names


def _networks(file, text):
    """Addresses or networks (``127.0.0.1, 10.0.0.0/8, ::1``)."""
    for item in _list(file, text):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError("%r is not an IP address or network" % item) from None
    return _list(file, text)


def _listen(*kinds):
    """A ``unix:/path`` or ``inet:host:port`` endpoint, or empty for off."""
    examples = {"unix": "unix:/path/to.sock", "inet": "inet:127.0.0.1:10040"}

    def read(file, text):
        if not text:
            return ""
        kind, _, rest = text.partition(":")
        if kind not in kinds or not rest:
            raise ValueError("%r must look like %s"
                             % (text, " or ".join(examples[k] for k in kinds)))
        if kind == "unix":
            return "unix:" + _path(file, rest)
        parse_host_port(rest)
        return text
    return read


ConfigKey = collections.namedtuple("ConfigKey", "section name default field read example help")

MIN_HANDLE_LENGTH, MAX_HANDLE_LENGTH = 12, 64      # a handle's characters: unguessable, an address

# Every key a user may write, once: its section, name, default (None: required), the Config
# field it fills (None: checked, then not needed), how its text is read, the value the example
# file shows (None: the default) and what it means. ``incognitomail.py example`` turns this
# table into incognitomail.ini.example. The first three sections and their first keys are the
# original (2016) ones.
CONFIG_KEYS = (
    ConfigKey("General", "MailSystem", "postfix", None, _mail_system, None,
              "Only postfix is supported; any other value is an error."),
    ConfigKey("General", "UnixSockPath", "/run/incognitomail/incognitomail.sock", "unix_sock_path",
              _path, "var/run/incognitomail.sock",
              "The command line talks to the server over this Unix socket. The server creates it "
              "mode 0600, and its folder mode 0700 when missing: only root and the server's own "
              "user may use it."),
    ConfigKey("General", "LockFilePath", "/run/incognitomail/incognitomail.lock", "lock_file_path",
              _path, "var/run/incognitomail.lock",
              "One server per lock file: the server holds an flock on it and writes its PID into "
              "it; a second server fails with \"already running\". The folder is created when "
              "missing; the file is removed at stop."),
    ConfigKey("General", "ListenPath", "/incognitomail", "listen_path", _url_path, None,
              "URL path of the WebSocket endpoint for the browser add-on; starts with /."),
    ConfigKey("General", "ListenAddress", "127.0.0.1:9090", "listen_address", _host_port,
              "127.0.0.1:9090",
              "HOST:PORT of the web listener: the owner page at /, the HTTP API under /api/ and "
              "the WebSocket endpoint. \":9090\" means all interfaces, \"[::1]:9090\" an IPv6 "
              "address; empty turns the listener off."),
    ConfigKey("General", "TLSCertFile", "", "tls_cert_file", _path, None,
              "Set TLSCertFile and TLSKeyFile together to serve https:// and wss://. The "
              "certificate file holds the server's certificate followed by every intermediate "
              "(the full chain, e.g. Let's Encrypt's fullchain.pem). Empty: plain http:// and "
              "ws://."),
    ConfigKey("General", "TLSKeyFile", "", "tls_key_file", _path, None,
              "The private key of TLSCertFile."),
    ConfigKey("General", "AllowedOrigins", "", "allowed_origins", _list, None,
              "Comma-separated Origin values a browser may connect from (WebSocket) or call the "
              "HTTP API from (CORS), e.g. https://vault.example.org, chrome-extension://abcdefgh, "
              "moz-extension://0f2d5c8e-1111-2222-3333-444455556666. The owner page's own origin "
              "is always allowed. Empty: any origin."),
    ConfigKey("General", "ServerNames", "", "server_names", _host_names, None,
              "The host names (comma-separated, e.g. mail.example.org, 127.0.0.1) the web listener "
              "answers to: a request whose Host header names another is refused with 421, so a web "
              "page elsewhere cannot reach the listener by pointing a name of its own at it (DNS "
              "rebinding). Set it when the listener is reachable by name. Empty: any host name."),
    ConfigKey("General", "TrustedProxies", "", "trusted_proxies", _networks, None,
              "Reverse proxies (addresses or networks, comma-separated, e.g. 127.0.0.1, ::1) whose "
              "X-Forwarded-For or X-Real-IP header names the real client for the limits. Nobody "
              "else's such headers are believed. Empty: clients connect directly."),
    ConfigKey("General", "LogLevel", "info", "log_level",
              _one_of("debug", "info", "warning", "error"), None,
              "debug, info, warning or error. Every account and handle change is logged at info."),
    ConfigKey("General", "LogTarget", "stderr", "log_target", _one_of("stderr", "syslog"), None,
              "stderr, or syslog: facility mail through /dev/log, beside Postfix's own lines."),
    ConfigKey("General", "PolicyListen", "", "policy_listen", _listen("unix", "inet"), None,
              "Where the Postfix policy service listens (it counts the mail each handle receives, "
              "refuses switched-off and ended handles with 550, and is needed by prune and by "
              "handles that close after some messages): inet:127.0.0.1:10040 or unix:/path. "
              "Empty: off."),
    ConfigKey("General", "SocketmapListen", "", "socketmap_listen", _listen("unix"), None,
              "unix:/path. Postfix asks the daemon over this socket instead of reading a map file, "
              "e.g. unix:/var/spool/postfix/incognitomail/socketmap.sock. Empty: off (the map "
              "file is used)."),
    ConfigKey("General", "MilterListen", "", "milter_listen", _listen("unix", "inet"), None,
              "Where the milter listens, for Postfix's smtpd_milters (README.md, \"Privacy and "
              "deliverability\"): mail to a handle leaves with a bounce address of the handle's "
              "own, so bounces and auto-replies never reach the sender and SPF passes, and the "
              "owner writes back through the handle. inet:127.0.0.1:10041 or unix:/path. Empty: "
              "off."),
    ConfigKey("General", "ReplyAddresses", "yes", "reply_addresses", _yes_no, None,
              "With the milter: yes gives each correspondent of a handle a reply address in its "
              "domain, written in From: (and Reply-To:, To:, Cc:) of the mail it forwards, so "
              "the owner's replies go out from the handle and DMARC passes for any sender; no "
              "leaves those headers as they are (the sender's DKIM signature stays intact, but "
              "a reply from the owner's mail program goes out from the owner's own address)."),
    ConfigKey("General", "RefuseAsUnknown", "no", "refuse_as_unknown", _yes_no, None,
              "yes: the policy service refuses mail to a switched-off or ended handle exactly as "
              "Postfix refuses an address that does not exist (550 5.1.1 User unknown in virtual "
              "alias table), so a sender learns nothing; no: it says why (this address is "
              "disabled, has expired, ...). An owner may choose otherwise for each handle."),
    ConfigKey("Persistence", "Type", "sqlite", None, _store_type, None,
              "sqlite, the only store. boltdb (the original's) is read as sqlite, with a warning; "
              "the original's data is not imported."),
    ConfigKey("Persistence", "DatabasePath", "incognitomail.sqlite3", "database_path", _path,
              "var/incognitomail.sqlite3",
              "The sqlite database (WAL mode). The server creates it mode 0600, its folder 0700 "
              "when missing, and moves its schema forward at start. A folder other users may "
              "write is refused."),
    ConfigKey("PostfixConfig", "Domain", None, "domains", _domains, "incognito.example.org",
              "Required. The domain or domains handles are made in, comma-separated, \"@\" "
              "optional (@example.org, @example.net); the first is the default for new handles. "
              "Postfix must route each of them (README.md, \"Postfix setup\")."),
    ConfigKey("PostfixConfig", "MapFilePath", None, "map_file", _map_file, "hash:var/virtual",
              "Required. The Postfix map IncognitoMail keeps in step, TYPE:PATH with TYPE hash "
              "(the default when none is given), btree or lmdb (package postfix-lmdb, "
              "recommended in production). Use exactly this map in main.cf. Its folder must exist "
              "and be writable by the server's user; the file and its indexed file (.db or .lmdb) "
              "are created."),
    ConfigKey("PostfixConfig", "ConfigDir", "", "postfix_config_dir", _path, None,
              "Postfix's configuration folder, given to postmap and postconf as -c. Empty: "
              "Postfix's own default, /etc/postfix. That folder must hold a main.cf."),
    ConfigKey("PostfixConfig", "HandleLength", "16", "handle_length",
              _number(MIN_HANDLE_LENGTH, MAX_HANDLE_LENGTH), None,
              "Characters in the random part of a handle (lowercase letters and digits, as Postfix "
              "folds keys to lower case), 12 to 64; 16 give about 82 bits."),
    ConfigKey("PostfixConfig", "HandleLifetime", "", "handle_lifetime", _lifetime, None,
              "How long a new handle lives unless its owner says otherwise: 90m, 12h, 30d, 2w. "
              "Handles made by the add-on or a password manager get it too. Empty: handles never "
              "end by themselves."),
    ConfigKey("Limits", "MaxMessageSize", "65536", "max_message_size", _number(1024), None,
              "Largest WebSocket message, and largest HTTP request body, in bytes (at least "
              "1024)."),
    ConfigKey("Limits", "IdleTimeout", "300", "idle_timeout", _number(0), None,
              "Seconds after which an idle WebSocket connection is closed; 0: never."),
    ConfigKey("Limits", "HandlesPerMinutePerClient", "20", "handles_per_minute_per_client",
              _number(0), None,
              "New handles one client may make per minute over the network (bursts up to this "
              "many); 0: no limit. A client is an IPv4 address, or the /64 an IPv6 address is in."),
    ConfigKey("Limits", "HandlesPerMinutePerAccount", "30", "handles_per_minute_per_account",
              _number(0), None,
              "New handles one account may make per minute over the network, from any client; "
              "0: no limit. The command line has no limits."),
    ConfigKey("Limits", "FailedTokensPerMinutePerClient", "10",
              "failed_tokens_per_minute_per_client", _number(0), None,
              "Wrong secret tokens one client may send per minute before it is refused; "
              "0: no limit."),
    ConfigKey("Limits", "MaxConnections", "20000", "max_connections", _number(0), None,
              "Open WebSocket and HTTP connections in all (fewer when the open-file limit leaves "
              "room for fewer; the server says so at start); 0: as many as the limit allows."),
    ConfigKey("Limits", "MaxConnectionsPerClient", "50", "max_connections_per_client", _number(0),
              None, "Open WebSocket and HTTP connections per client; 0: no limit."),
    ConfigKey("Prune", "HandlesUnusedDays", "", "prune_handles_unused_days",
              _number(0, empty_is_none=True), None,
              "For prune without options, and Automatic: remove handles older than N days that "
              "never received a message (needs PolicyListen). Empty: do not prune such handles."),
    ConfigKey("Prune", "AccountsUnusedDays", "", "prune_accounts_unused_days",
              _number(0, empty_is_none=True), None,
              "The same for accounts older than N days whose token was never used and that have "
              "no handles (needs PolicyListen). Empty: do not prune accounts."),
    ConfigKey("Prune", "HandlesExpiredDays", "", "prune_handles_expired_days",
              _number(0, empty_is_none=True), None,
              "The same for handles that expired more than N days ago (needs no policy service). "
              "Empty: do not prune them."),
    ConfigKey("Prune", "Automatic", "no", "auto_prune", _yes_no, None,
              "yes: prune with the three values above once a day while the server runs, the first "
              "time a minute after start. Needs at least one of them."),
)


_EXAMPLE_INTRO = """\
; IncognitoMail example configuration, written by "python3 incognitomail.py example".
;
; It starts a working server as is, from the folder this file is in, as root:
;
;     python3 incognitomail.py -c incognitomail.ini.example
;
; Relative paths are relative to the folder this file is in (not to the current directory),
; so the server keeps its socket, lock file, database and map under ./var next to this file,
; and creates ./var and ./var/run itself. For a real installation copy this file to
; /etc/incognitomail/incognitomail.ini and use absolute paths (README.md, "Running as a
; service").
;
; Syntax: "Key = value". Comments start with ";" or "#" on their own line, or with " ; " after a
; value. Values may be written in double quotes, as in the original 2016 sample file. Section and
; key names are not case-sensitive. A key left out takes its default: below, a key written
; after ";" shows its default, and a key set is one this example needs.
"""


def example_config():
    """incognitomail.ini.example: every key with its meaning and default, from CONFIG_KEYS."""
    lines = [line.rstrip() for line in _EXAMPLE_INTRO.splitlines()]
    section = None
    for key in CONFIG_KEYS:
        if key.section != section:
            section = key.section
            lines += ["[%s]" % section] if not lines[-1] else ["", "[%s]" % section]
        # a required key's help says so, an empty default's says what empty means
        text = "%s Default: %s." % (key.help, key.default) if key.default else key.help
        lines += ["; " + line for line in textwrap.wrap(text, 96, break_on_hyphens=False,
                                                         break_long_words=False)]
        if key.example is None:     # its default: said, not set
            lines += [("; %s = %s" % (key.name, key.default or "")).rstrip(), ""]
        else:
            lines += [("%s = %s" % (key.name, key.example)).rstrip(), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


class Config(collections.namedtuple("Config", ["path", "given"]
                                    + [k.field for k in CONFIG_KEYS if k.field])):
    """Everything the daemon and the command line need, validated, with absolute paths;
    ``given``: the fields the file set (the others have their defaults)."""
    __slots__ = ()

    @property
    def default_domain(self):
        return self.domains[0]

    @property
    def map_type(self):
        return self.map_file[0]

    @property
    def map_file_path(self):
        return self.map_file[1]


def _ini_problem(error):
    """configparser's error, said as ``line N: what is wrong there``."""
    if isinstance(error, configparser.MissingSectionHeaderError):
        return "line %d: %r comes before any [Section]" % (error.lineno, error.line.strip())
    if isinstance(error, configparser.ParsingError) and error.errors:
        number, line = error.errors[0]      # the line as repr() wrote it
        line = (line[1:-1] if line[:1] in "'\"" else line).replace("\\n", "").strip()
        return "line %d: %r is neither [Section], Key = value nor a comment" % (number, line)
    number = getattr(error, "lineno", None)
    text = str(error).splitlines()[0]
    return "line %d: %s" % (number, text) if number else text


class _ConfigFile:
    """A parsed INI file becoming a Config, one key at a time, with errors that name the key."""

    def __init__(self, path, parser):
        self.path, self.folder, self.parser = path, os.path.dirname(path), parser
        self.sections = {name.lower(): name for name in parser.sections()}
        known = {(k.section.lower(), k.name.lower()) for k in CONFIG_KEYS}
        for section in parser.sections():
            if section.lower() not in {s for s, _ in known}:
                log.warning("%s [%s]: unknown section, ignored", path, section)
                continue
            for key in parser[section]:
                if (section.lower(), key) not in known:
                    log.warning("%s [%s] %s: unknown key, ignored", path, section, key)

    def fail(self, section, key, problem):
        raise ConfigError("%s [%s] %s: %s" % (self.path, section, key, problem))

    def _written(self, key):
        section = self.sections.get(key.section.lower())
        return section is not None and self.parser.has_option(section, key.name)

    def text(self, key):
        """The key's text as written (quotes removed), else its default."""
        section = self.sections.get(key.section.lower())
        if section is not None and self.parser.has_option(section, key.name):
            value = self.parser.get(section, key.name).strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            return value.strip()
        if key.default is None:
            self.fail(key.section, key.name, "required key is missing")
        return key.default

    def config(self):
        values = {"path": self.path, "given": frozenset(
            key.field for key in CONFIG_KEYS if key.field and self._written(key))}
        for key in CONFIG_KEYS:
            try:
                value = key.read(self, self.text(key))
            except ValueError as e:
                self.fail(key.section, key.name, e)
            if key.field:
                values[key.field] = value
        config = Config(**values)
        if bool(config.tls_cert_file) != bool(config.tls_key_file):
            self.fail("General", "TLSKeyFile" if config.tls_cert_file else "TLSCertFile",
                      "TLSCertFile and TLSKeyFile must be set together")
        unused = (config.prune_handles_unused_days, config.prune_accounts_unused_days)
        if config.auto_prune and unused != (None, None) and not config.policy_listen:
            self.fail("Prune", "Automatic", "needs [General] PolicyListen: without the policy "
                      "service every handle looks unused")
        if config.auto_prune and unused == (None, None) and \
                config.prune_handles_expired_days is None:
            self.fail("Prune", "Automatic", "needs HandlesUnusedDays, AccountsUnusedDays and/or "
                      "HandlesExpiredDays")
        return config


def load_config(path):
    """Read and validate the INI file at ``path``; raise ConfigError naming what is wrong.

    The original's sample file loads unchanged: double-quoted values, ``;`` comments after
    values and after section headers, and ``Type = "boltdb"``.
    """
    path = os.path.abspath(path)
    parser = configparser.ConfigParser(
        inline_comment_prefixes=(";",), comment_prefixes=("#", ";"),
        interpolation=None, strict=False, empty_lines_in_values=False)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except FileNotFoundError:
        raise ConfigError("%s: configuration file not found (give another with -c PATH)" % path)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("%s: cannot read the configuration file: %s" % (path, _os_reason(e)))
    except configparser.Error as e:
        raise ConfigError("%s: not a valid INI file: %s" % (path, _ini_problem(e)))
    return _ConfigFile(path, parser).config()


###############################################################################
# Names and secrets
###############################################################################

HANDLE_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_ADDRESS_LENGTH = 254
MAX_LABEL_LENGTH = 200
_TOKEN_ALPHABET = string.ascii_letters + string.digits
TOKEN_LENGTH = 43       # 43 * log2(62) = 256.03 bits

# A plain dot-atom address: nothing that Postfix could read as a second map line, a second
# target (comma), a comment or a lookup-table special character.
_ADDRESS_RE = re.compile(
    r"^(?P<local>[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)$")


def new_token():
    """A fresh secret token: TOKEN_LENGTH letters and digits, at least 256 random bits.

    Letters and digits only: it survives a copy and paste, a URL, and the addy.io browser
    extension's check (40 to 60 of them), and never reads as an option on a command line.
    """
    return "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(TOKEN_LENGTH))


def token_digest(token):
    """What the store keeps instead of the token.

    A token carries 256 random bits, so a plain SHA-256 is as strong as a slow password hash
    here, and it can be indexed for lookup.
    """
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_handle_name(length):
    """A random local part of lowercase letters and digits.

    Postfix folds lookup keys to lower case, so mixed case would add no safety and could
    collide. ``secrets.choice`` draws without modulo bias.
    """
    return "".join(secrets.choice(HANDLE_ALPHABET) for _ in range(length))


def check_address(text):
    """Return ``text`` as a valid single ``local@domain`` target address, or raise BadRequest."""
    if not isinstance(text, str) or not text:
        raise BadRequest("an address is required, e.g. me@example.org")
    if len(text) > MAX_ADDRESS_LENGTH:
        raise BadRequest("address is longer than %d characters" % MAX_ADDRESS_LENGTH)
    match = _ADDRESS_RE.fullmatch(text)
    if not match or len(match.group("local")) > 64:
        raise BadRequest("%r is not a single valid address like me@example.org (no spaces, commas, "
                         "quotes or control characters)" % text)
    return match.group("local") + "@" + match.group("domain").lower()


# Characters a label may not hold: it is shown on one line, on terminals and web pages.
# C0 and C1 controls, line and paragraph separators, and bidirectional overrides and
# isolates, which make text display in another order than it is stored.
_LABEL_FORBIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def check_label(label):
    """A label is free text for a person, on one line."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise BadRequest("label must be text")
    if len(label) > MAX_LABEL_LENGTH:
        raise BadRequest("label is longer than %d characters" % MAX_LABEL_LENGTH)
    if _LABEL_FORBIDDEN.search(label):
        raise BadRequest("label must not contain control characters, line breaks or "
                         "direction overrides")
    return label.strip() or None


def split_handle(text, domains):
    """``"abc@example.org"`` or ``"abc"`` -> ("abc", "example.org"); the first domain is the
    default."""
    if not isinstance(text, str) or not text:
        raise BadRequest("a handle is required, e.g. k3v9q0x2m7ab5ts1@%s" % domains[0])
    local, _, domain = text.strip().lower().partition("@")
    domain = domain or domains[0]
    if not local or not all(c in HANDLE_ALPHABET for c in local) or len(local) > 64:
        raise BadRequest("%r is not a handle (handles are lowercase letters and digits)" % text)
    if domain not in domains:
        raise NotFound("%r is not in a domain served here (%s)" % (text, ", ".join(domains)))
    return local, domain


_HANDLE_PREFIX = re.compile("[%s]*" % HANDLE_ALPHABET)


def routed_handle(address, domains):
    """The handle Postfix routes ``address`` to, as (handle address, extension), or None when
    it is in no domain served here. Postfix looks a quoted local part up unquoted
    (``"k3v9"@domain`` is ``k3v9@domain``), in any case, and without the extension that follows
    its recipient_delimiter (any one character of it): so the handle is the local part's leading
    letters and digits, lowercase, and the extension what follows the character after them, its
    case kept."""
    local, _, domain = address.strip().rpartition("@")
    domain = domain.lower()
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    handle = _HANDLE_PREFIX.match(local.lower()).group()
    if domain not in domains or not handle:
        return None
    return "%s@%s" % (handle, domain), local[len(handle) + 1:]


# The addresses the milter makes in a handle's domain. Each starts with the handle and Postfix's
# recipient_delimiter "+", so Postfix accepts mail to them through the handle's own entry, in any
# map mode, with no map change of their own.
#   k3v9...+b.tt.hhhhhhhhhh@domain  a bounce address: the envelope sender forwarded mail and the
#                                   owner's mail leave with; dated (tt: the day, as SRS writes
#                                   it) and signed (h: HMAC-SHA256), so nobody can make one up
#   k3v9...+shop=example.com@domain a reply address: mail from the owner to it goes to
#                                   shop@example.com, from the handle (addy.io's form)
FORWARD, BOUNCE, REPLY = "forward", "bounce", "reply"
BOUNCE_DAYS = 21            # how long a bounce address is good (SRS's maximum age too)
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"
_BOUNCE_TAG = re.compile(r"b\.([a-z2-7]{2})\.([a-z2-7]{10})")
HandleAddress = collections.namedtuple("HandleAddress", "handle kind correspondent")


def _bounce_hash(secret, stamp, handle):
    message = ("%s.%s" % (stamp, handle.lower())).encode("utf-8")
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.b32encode(digest).decode("ascii")[:10].lower()


def bounce_address(handle, secret, now):
    """The bounce address of ``handle`` (an address) as of ``now``."""
    local, _, domain = handle.partition("@")
    day = int(now // 86400) % 1024
    stamp = _BASE32[day >> 5] + _BASE32[day & 31]
    return "%s+b.%s.%s@%s" % (local, stamp, _bounce_hash(secret, stamp, handle), domain)


def reply_address(handle, correspondent):
    """The address through which the owner of ``handle`` writes to ``correspondent``."""
    local, _, domain = handle.partition("@")
    their_local, _, their_domain = correspondent.rpartition("@")
    return "%s+%s=%s@%s" % (local, their_local, their_domain.lower(), domain)


def read_handle_address(address, domains, secret, now):
    """What an address is to the milter: a HandleAddress (the handle's address, FORWARD, BOUNCE
    or REPLY, and the correspondent of a reply address), or None for an address that is not a
    handle's. A bounce address whose date or signature is wrong raises BadRequest."""
    routed = routed_handle(address, domains)
    if routed is None:
        return None
    handle, extension = routed
    bounce = _BOUNCE_TAG.fullmatch(extension.lower())
    if bounce:
        stamp, signature = bounce.groups()
        day = int(now // 86400) % 1024
        then = _BASE32.index(stamp[0]) * 32 + _BASE32.index(stamp[1])
        if (day - then) % 1024 > BOUNCE_DAYS or \
                not hmac.compare_digest(signature, _bounce_hash(secret, stamp, handle)):
            raise BadRequest("%s is not a bounce address of ours, or is older than %d days"
                             % (address, BOUNCE_DAYS))
        return HandleAddress(handle, BOUNCE, None)
    their_local, equals, their_domain = extension.rpartition("=")
    if equals and their_local and _DOMAIN_RE.match(their_domain.lower()):
        try:
            correspondent = check_address("%s@%s" % (their_local, their_domain))
        except BadRequest:
            correspondent = None
        if correspondent:
            return HandleAddress(handle, REPLY, correspondent)
    return HandleAddress(handle, FORWARD, None)


MAX_MESSAGES = 1000000
MAX_TIME = 1 << 62
# The times every front end takes, the same on every Python: ASCII digits, ISO 8601's common
# forms (datetime.fromisoformat takes more on 3.11 than on 3.9, and any Unicode digit).
TIME_GRAMMAR = "YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS], UTC unless followed by +HH:MM or -HH:MM"
_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
                   r"(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2}))?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?")


def from_iso_time(text):
    """A date or time of TIME_GRAMMAR, UTC unless it says otherwise -> seconds since the epoch;
    ValueError otherwise."""
    match = _TIME.fullmatch(text.strip())
    if not match:
        raise ValueError("%r is not a time like 2026-12-31T18:00:00Z" % text)
    year, month, day, hour, minute, second, offset = match.groups()
    when = datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0),
                             int(second or 0), tzinfo=datetime.timezone.utc)
    if offset and offset.upper() != "Z":
        sign = -1 if offset[0] == "-" else 1
        try:
            when -= sign * datetime.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        except OverflowError:
            raise ValueError("%r is out of range" % text) from None
    return int(when.timestamp())


def iso_time(timestamp):
    """Seconds since the epoch -> ISO 8601 UTC (``2026-11-25T01:27:23Z``); None stays None."""
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def parse_when(text, now):
    """A duration from ``now`` (``30d``) or a date or time (TIME_GRAMMAR, UTC unless it says
    otherwise) -> seconds since the epoch, in the future; BadRequest otherwise."""
    if re.fullmatch(r"[0-9]+[A-Za-z]+", text.strip()):
        try:
            return int(now) + parse_duration(text)
        except ValueError as e:
            raise BadRequest(str(e)) from None
    try:
        timestamp = from_iso_time(text)
    except (ValueError, OverflowError):
        raise BadRequest("%r is neither a time (ISO 8601: %s) nor a duration (e.g. 30d)"
                         % (text, TIME_GRAMMAR)) from None
    if timestamp <= now:
        raise BadRequest("%s is not in the future" % text.strip())
    if timestamp > now + MAX_LIFETIME:
        raise BadRequest("%s is more than 100 years away" % iso_time(timestamp))
    return timestamp


def describe_expiry(expires, now):
    """In words a person understands: ``expires in 3 days``, ``expired 2026-12-01``."""
    if expires <= now:
        return "expired %s" % iso_time(expires)[:10]
    left = expires - now
    for unit, seconds in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if left >= 2 * seconds or unit == "minute":
            count = max(1, int(round(left / seconds)))
            return "expires in %d %s%s" % (count, unit, "" if count == 1 else "s")


###############################################################################
# Store
###############################################################################

# Each entry moves the schema from version N to N+1 (PRAGMA user_version). Append, never edit.
_MIGRATIONS = (
    """
    CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        address TEXT NOT NULL,
        token_sha256 BLOB NOT NULL UNIQUE,
        created INTEGER NOT NULL,
        last_used INTEGER
    );
    CREATE TABLE handles (
        id INTEGER PRIMARY KEY,
        local TEXT NOT NULL,
        domain TEXT NOT NULL,
        account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        label TEXT,
        enabled INTEGER NOT NULL DEFAULT 1,
        created INTEGER NOT NULL,
        received INTEGER NOT NULL DEFAULT 0,
        last_received INTEGER
    );
    CREATE UNIQUE INDEX handles_by_address ON handles (local COLLATE NOCASE, domain COLLATE NOCASE);
    CREATE INDEX handles_by_account ON handles (account_id, id);
    CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    """
    ALTER TABLE handles ADD COLUMN updated INTEGER;
    ALTER TABLE handles ADD COLUMN expires INTEGER;
    ALTER TABLE handles ADD COLUMN max_messages INTEGER;
    ALTER TABLE handles ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE handles ADD COLUMN last_blocked INTEGER;
    ALTER TABLE handles ADD COLUMN used_up INTEGER;
    CREATE INDEX handles_by_expiry ON handles (expires) WHERE expires IS NOT NULL;
    CREATE INDEX handles_by_used_up ON handles (used_up) WHERE used_up IS NOT NULL;
    """,
    # Ids that tell an owner nothing about other accounts: a handle's id (``number``) counts
    # within its account, from where the global ids left off for accounts made before; new
    # accounts get random ids (add_account). The ids shown so far stay what they were.
    """
    ALTER TABLE handles ADD COLUMN number INTEGER;
    UPDATE handles SET number = id;
    CREATE UNIQUE INDEX handles_by_number ON handles (account_id, number);
    DROP INDEX handles_by_account;
    ALTER TABLE accounts ADD COLUMN next_number INTEGER NOT NULL DEFAULT 1;
    UPDATE accounts SET next_number = (SELECT coalesce(max(id), 0) + 1 FROM handles);
    """,
    # What the milter counts: bounces and auto-replies to a handle's bounce address, and the
    # owner's messages through it (replies, and first messages to a new correspondent).
    """
    ALTER TABLE handles ADD COLUMN bounced INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE handles ADD COLUMN last_bounced INTEGER;
    ALTER TABLE handles ADD COLUMN sent INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE handles ADD COLUMN last_sent INTEGER;
    """,
    # How a switched-off or ended handle refuses mail: as if it did not exist (1), saying why
    # (0), or as [General] RefuseAsUnknown says (NULL).
    """
    ALTER TABLE handles ADD COLUMN refuse_as_unknown INTEGER;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)
MAX_ACCOUNT_ID = (1 << 53) - 1

# A handle as every query returns it, with its account's target address.
_HANDLE_SELECT = ("SELECT h.id, h.local, h.domain, h.account_id, a.address, h.label, h.enabled, "
                  "h.created, coalesce(h.updated, h.created), h.received, h.last_received, "
                  "h.blocked, h.last_blocked, h.expires, h.max_messages, h.used_up, h.number, "
                  "h.bounced, h.last_bounced, h.sent, h.last_sent, h.refuse_as_unknown "
                  "FROM handles h "
                  "JOIN accounts a ON a.id = h.account_id")
# The orders a page of handles can come in; the newest first among equals.
HANDLE_ORDERS = {"newest": "h.number DESC", "oldest": "h.number",
                 "last_received": "coalesce(h.last_received, 0) DESC, h.number DESC",
                 "received": "h.received DESC, h.number DESC",
                 "blocked": "h.blocked DESC, h.number DESC",
                 "last_blocked": "coalesce(h.last_blocked, 0) DESC, h.number DESC"}
# In the map after a sweep at :now (the Handle.in_map() rule).
_ROUTABLE = ("h.enabled AND (h.expires IS NULL OR h.expires > :now) "
             "AND (h.max_messages IS NULL OR h.received < h.max_messages OR h.used_up > :now)")

ENABLED, DISABLED, EXPIRED, USED_UP = "enabled", "disabled", "expired", "used up"
# What Postfix's questions count on a handle, each with the time of the latest in last_<column>:
# messages it let through, refused, bounces to its bounce address, the owner's messages from it.
RECEIVED, BLOCKED, BOUNCED, SENT = "received", "blocked", "bounced", "sent"
MAIL_COUNTS = (RECEIVED, BLOCKED, BOUNCED, SENT)
# What the policy service tells a sender about a handle that takes no more mail.
REFUSALS = {DISABLED: "this address is disabled", EXPIRED: "this address has expired",
            USED_UP: "this address has received all the messages it accepts"}


class Handle(collections.namedtuple("Handle", "id local domain account_id target label enabled "
                                              "created updated received last_received blocked "
                                              "last_blocked expires max_messages used_up number "
                                              "bounced last_bounced sent last_sent "
                                              "refuse_as_unknown")):
    """One handle, with its account's target address. ``id`` is the row's, inside the store;
    ``number`` is the id every front end shows (counted within its account)."""
    __slots__ = ()

    @property
    def address(self):
        return "%s@%s" % (self.local, self.domain)

    def state(self, now):
        """ENABLED (mail is delivered), DISABLED (by its owner), EXPIRED or USED_UP: a handle
        ends by itself whatever its owner's switch says."""
        if self.expires is not None and self.expires <= now:
            return EXPIRED
        if self.max_messages is not None and self.received >= self.max_messages:
            return USED_UP
        return ENABLED if self.enabled else DISABLED

    def in_map(self, swept_until):
        """Is it in the map, given that the last sweep was at ``swept_until``? A handle leaves
        the map at the first sweep after it expired or took its last message (which is then
        still on its way through Postfix); the policy service refuses it from the first second.
        """
        if self.state(swept_until) == USED_UP:
            return bool(self.enabled) and (self.used_up or 0) > swept_until
        return self.state(swept_until) == ENABLED


Account = collections.namedtuple("Account", "id address created last_used")


def _sqlite_uri_path(path):
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


@contextlib.contextmanager
def _transaction(db, begin, commit, rollback):
    """Run ``begin``; at the end ``commit()``, or the ``rollback`` statements after an exception
    (in the block, or from the commit itself)."""
    db.execute(begin)
    try:
        yield
        commit()
    except BaseException:
        if db.in_transaction:
            for statement in rollback:
                db.execute(statement)
        raise


class Store:
    """The sqlite database: the only code that speaks SQL.

    One Store object belongs to one thread at a time. Writes happen inside ``transaction()``;
    WAL mode lets a second Store on the same file (the lookup services) read while a batch
    is being written.
    """

    def __init__(self, path, readonly=False):
        self.path = path
        if not readonly:
            _private_folder(os.path.dirname(path), "[Persistence] DatabasePath", StoreError)
        try:
            if not readonly:
                # private: it holds every account's address (its -wal and -shm get its mode)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            if readonly:
                uri = "file:%s?mode=ro" % _sqlite_uri_path(path)
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                          check_same_thread=False)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("PRAGMA busy_timeout = 10000")
            if not readonly:
                self.db.execute("PRAGMA journal_mode = WAL")
                # FULL: a commit is on disk before a handle is reported, even across power loss.
                self.db.execute("PRAGMA synchronous = FULL")
                self._migrate()
            else:
                self._check_version()
        except (sqlite3.Error, OSError) as e:
            raise StoreError("%s: cannot open the database: %s (check [Persistence] DatabasePath "
                             "and that user %s may %s the file and its folder)"
                             % (path, e, _user_name(), "read" if readonly else "write"))

    def close(self):
        self.db.close()

    def _check_version(self):
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError("%s: database schema version %d is newer than this program "
                             "understands (%d); use a newer incognitomail.py"
                             % (self.path, version, SCHEMA_VERSION))
        return version

    def _migrate(self):
        version = self._check_version()
        for number in range(version, SCHEMA_VERSION):
            log.info("%s: migrating database schema from version %d to %d", self.path, number,
                     number + 1)
            with self.transaction():
                for statement in _MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute("PRAGMA user_version = %d" % (number + 1))

    def schema_version(self):
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # -- transactions ------------------------------------------------------------------

    def transaction(self):
        """``with store.transaction():`` commits at the end, rolls back on an exception."""
        return _transaction(self.db, "BEGIN IMMEDIATE", self.commit, ("ROLLBACK",))

    def savepoint(self):
        return _transaction(self.db, "SAVEPOINT op", lambda: self.db.execute("RELEASE op"),
                            ("ROLLBACK TO op", "RELEASE op"))

    def snapshot(self):
        """A read transaction: every query inside sees the database as of its first one."""
        return _transaction(self.db, "BEGIN", self.commit, ("ROLLBACK",))

    def commit(self):
        self.db.execute("COMMIT")

    def rollback(self):
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    # -- accounts ----------------------------------------------------------------------

    def add_account(self, address, digest, now):
        """A new account with a random id (below 2**53, so JavaScript reads it exactly)."""
        while True:
            account_id = secrets.randbelow(MAX_ACCOUNT_ID) + 1
            if not self.db.execute("SELECT 1 FROM accounts WHERE id = ?",
                                   (account_id,)).fetchone():
                break
        self.db.execute("INSERT INTO accounts (id, address, token_sha256, created) "
                        "VALUES (?, ?, ?, ?)", (account_id, address, digest, int(now)))
        return account_id

    def account_by_digest(self, digest):
        row = self.db.execute(
            "SELECT id, address, created, last_used FROM accounts WHERE token_sha256 = ?",
            (digest,)).fetchone()
        return Account(*row) if row else None

    def touch_account(self, account_id, now):
        self.db.execute("UPDATE accounts SET last_used = ? WHERE id = ?", (int(now), account_id))

    def set_token_digest(self, account_id, digest):
        self.db.execute("UPDATE accounts SET token_sha256 = ? WHERE id = ?", (digest, account_id))

    def delete_account(self, account_id):
        self.db.execute("DELETE FROM accounts WHERE id = ?", (account_id,))

    # -- handles -----------------------------------------------------------------------

    def handle_taken(self, local, domain):
        return self.db.execute("SELECT 1 FROM handles WHERE local = ? COLLATE NOCASE "
                               "AND domain = ? COLLATE NOCASE",
                               (local, domain)).fetchone() is not None

    def add_handle(self, account_id, local, domain, label, now, expires=None, max_messages=None):
        number = self.db.execute("SELECT next_number FROM accounts WHERE id = ?",
                                 (account_id,)).fetchone()[0]
        self.db.execute("UPDATE accounts SET next_number = ? WHERE id = ?",
                        (number + 1, account_id))
        cursor = self.db.execute(
            "INSERT INTO handles (local, domain, account_id, label, created, expires, "
            "max_messages, number) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (local, domain, account_id, label, int(now), expires, max_messages, number))
        return self.handle_by_id(cursor.lastrowid)

    def handle_by_id(self, row_id):
        row = self.db.execute(_HANDLE_SELECT + " WHERE h.id = ?", (row_id,)).fetchone()
        return Handle(*row) if row else None

    def handle_by_number(self, account_id, number):
        row = self.db.execute(_HANDLE_SELECT + " WHERE h.account_id = ? AND h.number = ?",
                              (account_id, number)).fetchone()
        return Handle(*row) if row else None

    def handle(self, local, domain):
        row = self.db.execute(_HANDLE_SELECT + " WHERE h.local = ? COLLATE NOCASE "
                              "AND h.domain = ? COLLATE NOCASE", (local, domain)).fetchone()
        return Handle(*row) if row else None

    def handles_of(self, account_id, search=None, enabled=None, offset=0, limit=-1,
                   order="newest"):
        """An account's handles in ``order`` (one of HANDLE_ORDERS); ``search`` in the address
        or label."""
        where, values = "h.account_id = ?", [account_id]
        if search:
            where += (" AND (instr(lower(h.local || '@' || h.domain), ?) "
                      "OR instr(lower(coalesce(h.label, '')), ?))")
            values += [search.lower()] * 2
        if enabled is not None:
            where += " AND h.enabled = ?"
            values.append(int(enabled))
        total = self.db.execute("SELECT count(*) FROM handles h WHERE " + where,
                                values).fetchone()[0]
        rows = self.db.execute(_HANDLE_SELECT + " WHERE %s ORDER BY %s LIMIT ? OFFSET ?"
                               % (where, HANDLE_ORDERS[order]), values + [limit, offset])
        return [Handle(*row) for row in rows], total

    def mail_totals(self, account_id):
        """(received, blocked, bounced, sent) over all the account's handles."""
        return self.db.execute("SELECT coalesce(sum(received), 0), coalesce(sum(blocked), 0), "
                               "coalesce(sum(bounced), 0), coalesce(sum(sent), 0) FROM handles "
                               "WHERE account_id = ?", (account_id,)).fetchone()

    def handles_before(self, account_id, before, limit):
        """Up to ``limit`` of an account's handles, newest first, those numbered below
        ``before`` (None: from the newest)."""
        return [Handle(*row) for row in self.db.execute(
            _HANDLE_SELECT + " WHERE h.account_id = ? AND h.number < ? ORDER BY h.number DESC "
            "LIMIT ?", (account_id, MAX_TIME if before is None else before, limit))]

    def update_handle(self, handle, now):
        """Store what an owner may change of ``handle``: label, switch, expiry, message limit,
        how it refuses."""
        self.db.execute("UPDATE handles SET label = ?, enabled = ?, expires = ?, max_messages = ?, "
                        "refuse_as_unknown = ?, updated = ? WHERE id = ?",
                        (handle.label, int(handle.enabled), handle.expires, handle.max_messages,
                         handle.refuse_as_unknown, int(now), handle.id))

    def delete_handle(self, handle_id):
        self.db.execute("DELETE FROM handles WHERE id = ?", (handle_id,))

    def record_mail(self, column, counts, latest):
        """Add ``counts[(local, domain)]`` messages to each handle's ``column`` (one of
        MAIL_COUNTS), and their latest times to its last_ column."""
        self.db.executemany(
            "UPDATE handles SET {0} = {0} + ?, last_{0} = max(coalesce(last_{0}, 0), ?) "
            "WHERE local = ? COLLATE NOCASE AND domain = ? COLLATE NOCASE".format(column),
            [(n, int(latest[key]), key[0], key[1]) for key, n in counts.items()])

    def map_entries(self, now):
        """Every handle Postfix may deliver to as (key, target), in creation order, streamed."""
        for local, domain, target in self.db.execute(
                "SELECT h.local, h.domain, a.address "
                "FROM handles h JOIN accounts a ON a.id = h.account_id "
                "WHERE %s ORDER BY h.id" % _ROUTABLE, {"now": int(now)}):
            yield "%s@%s" % (local, domain), target

    def expiring(self, after, until):
        """Handles still switched on whose expiry time is in (after, until], by the index."""
        return [Handle(*row) for row in self.db.execute(
            _HANDLE_SELECT + " WHERE h.expires > ? AND h.expires <= ? AND h.enabled",
            (int(after), int(until)))]

    def used_up_between(self, after, until):
        """Handles that took their last message in (after, until], by the index."""
        return [Handle(*row) for row in self.db.execute(
            _HANDLE_SELECT + " WHERE h.used_up > ? AND h.used_up <= ?", (int(after), int(until)))]

    def set_used_up(self, handle_id, when):
        self.db.execute("UPDATE handles SET used_up = ? WHERE id = ?", (int(when), handle_id))

    def settle_used_up(self, now):
        """Move every later used-up time back to ``now`` (by the index)."""
        self.db.execute("UPDATE handles SET used_up = ? WHERE used_up > ?", (int(now), int(now)))

    def expired_before(self, until):
        return [Handle(*row) for row in self.db.execute(
            _HANDLE_SELECT + " WHERE h.expires <= ? ORDER BY h.expires", (int(until),))]

    def target_addresses(self):
        return [row[0] for row in self.db.execute("SELECT DISTINCT address FROM accounts")]

    def counts(self):
        accounts = self.db.execute("SELECT count(*) FROM accounts").fetchone()[0]
        handles, enabled = self.db.execute(
            "SELECT count(*), coalesce(sum(enabled), 0) FROM handles").fetchone()
        return {"accounts": accounts, "handles": handles, "enabled_handles": enabled}

    # -- pruning -----------------------------------------------------------------------

    def unused_handles(self, created_before):
        return [Handle(*row) for row in self.db.execute(
            _HANDLE_SELECT + " WHERE h.received = 0 AND h.created <= ? ORDER BY h.id",
            (int(created_before),))]

    def unused_accounts(self, created_before):
        return [Account(*row) for row in self.db.execute(
            "SELECT a.id, a.address, a.created, a.last_used FROM accounts a "
            "WHERE a.last_used IS NULL AND a.created <= ? "
            "AND NOT EXISTS (SELECT 1 FROM handles h WHERE h.account_id = a.id) ORDER BY a.id",
            (int(created_before),))]

    # -- meta --------------------------------------------------------------------------

    def get_meta(self, name):
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name, value):
        if value is None:
            self.db.execute("DELETE FROM meta WHERE name = ?", (name,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                            (name, value))


###############################################################################
# Postfix
###############################################################################

# Everything below this line in the map's text file is written by IncognitoMail; everything
# above it belongs to the admin and is kept byte for byte.
MAP_MARKER = b"# IncognitoMail manages every line below this one; keep your own lines above it.\n"

_POSTFIX_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")
POSTFIX_SETTLING_SECONDS = 2    # Postfix re-reads a younger main.cf until it is this old


def find_postfix_command(name):
    """Postfix's tools live in /usr/sbin, which a non-root user's PATH often lacks."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_POSTFIX_BIN_DIRS))
    if not path:
        raise PostfixError("%s not found in PATH or %s: install Postfix "
                           "(apt-get install postfix postfix-lmdb)"
                           % (name, ", ".join(_POSTFIX_BIN_DIRS)))
    return path


def map_line(key, target):
    return ("%s %s\n" % (key, target)).encode("utf-8")


def is_marker(line):
    return line.rstrip(b"\r\n") == MAP_MARKER.rstrip(b"\n")


def map_line_key(line):
    """The lookup key of one text map line, lowercased; None for comments, blanks, continuations."""
    if not line or line[:1] in b" \t#\r\n":
        return None
    return line.split(None, 1)[0].decode("utf-8", "replace").lower()


def _copy_ownership(source, target):
    """Give ``target`` (a path or a file descriptor) the owner and mode of ``source``;
    False when there is no ``source``."""
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return False
    os.chmod(target, stat.S_IMODE(st.st_mode))
    mine = os.stat(target)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.chown(target, st.st_uid, st.st_gid)
        except PermissionError:
            log.warning("%s: cannot give the new file owner %d:%d as before (not root); "
                        "it is owned by %s", source, st.st_uid, st.st_gid, _user_name())
    return True


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path, chunks, mode=0o644):
    """Write ``chunks`` to a new file beside ``path``, fsync, and rename it into place.

    The new file is created exclusively (never through a name someone else prepared) and gets
    the owner and mode of the file it replaces, so an admin's ``chown root:postfix`` survives
    every rewrite; a first file gets ``mode``.
    """
    folder = os.path.dirname(path)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".%s." % os.path.basename(path))
    try:
        with open(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            if not _copy_ownership(path, f.fileno()):
                os.chmod(f.fileno(), mode)
        os.replace(temp, path)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    _fsync_folder(folder)


def run_postmap(config_dir, name, *args, stdin=b""):
    """Run postmap with Postfix's ``config_dir`` on the map ``name``; raise PostfixError with
    its own words on failure.

    ``postmap -d`` exits 1 when no key was found, which is not a failure for us: a failure is
    what postmap calls fatal or an error.
    """
    # -o: as root, keep root's rights even when the text file belongs to someone else
    command = [find_postfix_command("postmap"), "-o"]
    if config_dir:
        command += ["-c", config_dir]
    command += list(args)
    try:
        # close_fds=False lets subprocess use posix_spawn (vfork): with 10,000 connections
        # open, starting postmap took 9 ms instead of 43 ms on Python 3.9. Python opens
        # every file and socket close-on-exec, so postmap still inherits none of them.
        done = subprocess.run(command, input=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=300, close_fds=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostfixError("%s failed: %s" % (" ".join(command[:1] + list(args[:-1])), e))
    problems = [line for line in done.stderr.decode("utf-8", "replace").splitlines()
                if "fatal:" in line or "error:" in line or "panic:" in line]
    if problems or (done.returncode != 0 and "-d" not in args and "-q" not in args):
        reason = (problems or done.stderr.decode("utf-8", "replace").splitlines()
                  or ["exit status %d" % done.returncode])[0]
        raise PostfixError("postmap %s failed: %s" % (name, reason.strip()))
    return done


class LookupTable:
    """What the Service asks of the place Postfix looks handles up; each method says when.

    The Service alone calls these, from its worker thread. ``name`` is what Postfix's
    main.cf calls the table; ``needs_rebuild`` is set when a failed undo left it in doubt.
    This base is the socketmap's whole behaviour (Postfix asks the daemon: nothing to write);
    PostfixMap overrides what a map file needs.
    """
    name = "socketmap"
    needs_rebuild = False
    unflushed_since = None      # monotonic time of the oldest change still to tidy (flush_text)

    def __init__(self, config):
        self.path = config.map_file_path
        self.foreign_keys = set()       # keys of the admin's own lines: never handed out

    def check_access(self):
        """At start, before anything changes: fail early, naming path, user and fix."""

    def reconcile(self, entries, clean_fingerprint):
        """At start: make the table hold exactly ``entries`` plus the admin's own lines."""
        self._read_foreign()

    def is_taken(self, key):
        """May ``key`` not be handed out as a new handle, whatever the database says?"""
        return key in self.foreign_keys

    def apply(self, adds, removes):
        """Make the batch's changes visible to Postfix; return an undo for a failed commit."""
        return lambda: None

    def rebuild(self, entries):
        """After a change that could not be undone: rebuild from the database's ``entries``."""

    def flush_text(self):
        """When idle: tidy what ``apply`` left for later."""

    def fingerprint(self):
        """At a clean stop: what the table looks like, for the next start to trust, or None."""
        return None

    def checks(self, store):
        """For ``check``: (what was checked, problem or None) pairs."""
        return []

    def _read_foreign(self):
        """Collect the admin's lines (bytes, above our marker) and their keys."""
        foreign, keys = [], set()
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for line in f:
                    if is_marker(line):
                        break
                    foreign.append(line)
                    key = map_line_key(line)
                    if key:
                        keys.add(key)
        if foreign and not foreign[-1].endswith(b"\n"):
            foreign[-1] += b"\n"
        self.foreign_keys = keys
        return foreign


def _map_drift(table, store):
    """None when the indexed map holds exactly the store's routable handles, else what
    differs. The admin's own lines are not ours and are left out of the comparison."""
    try:
        table._read_foreign()
        swept = int(store.get_meta("swept_until") or time.time())
        expected = {key: target for key, target in store.map_entries(swept)
                    if key not in table.foreign_keys}
        done = table.postmap("-s", table.name)      # what Postfix sees
        indexed = {}
        for line in done.stdout.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition("\t") if "\t" in line else line.partition(" ")
            if key.strip().lower() not in table.foreign_keys:
                indexed[key.strip().lower()] = value.strip()
    except (OSError, IncognitoMailError) as e:
        return str(e)
    missing = [k for k, t in expected.items() if indexed.get(k) != t]
    unknown = [k for k in indexed if k not in expected]
    if not missing and not unknown:
        return None
    return ("%d handles missing or wrong, %d entries the database does not know (e.g. %s); "
            "restart the server to rebuild the map from the database"
            % (len(missing), len(unknown), (missing + unknown)[0]))


class PostfixMap(LookupTable):
    """A Postfix lookup table kept in step with the store: a text file plus its indexed file.

    Changes cost the same whatever the map's size: additions are appended to the text file
    and inserted with ``postmap -i``, removals deleted with ``postmap -d`` at once and from
    the text file later, coalesced (``flush_text``). A full ``postmap`` runs only when
    reconciliation at start finds drift, into a new file renamed into place, so Postfix's
    lookups are never blocked.
    """

    def __init__(self, config):
        super().__init__(config)
        self.type = config.map_type
        self.config_dir = config.postfix_config_dir
        self.indexed_path = self.path + (".lmdb" if self.type == "lmdb" else ".db")
        self.unflushed = set()      # keys whose lines are still in the text file, not in the index
        self._last_second = 0       # hash/btree: whole-second mtime Postfix last saw
        self._written = None        # fingerprint after our own last write

    @property
    def name(self):
        return "%s:%s" % (self.type, self.path)

    # -- postmap ---------------------------------------------------------------------------

    def postmap(self, *args, stdin=b""):
        return run_postmap(self.config_dir, self.name, *args, stdin=stdin)

    # -- start: permissions and reconciliation ---------------------------------------------

    def check_access(self):
        """Fail early, naming path, user and fix, before anything is changed in Postfix."""
        user = _user_name()
        folder = os.path.dirname(self.path)
        fix = ("run the server as a user who may write there (often root or postfix), "
               "or give %s access, e.g. chgrp %s %s && chmod g+w %s"
               % (user, user, folder, folder))
        if not os.path.isdir(folder):
            raise PostfixError("%s: the map's folder does not exist ([PostfixConfig] MapFilePath)"
                               % folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PostfixError("%s: folder is not writable by user %s, which must create map "
                               "files there; %s" % (folder, user, fix))
        _private_folder(folder, "[PostfixConfig] MapFilePath", PostfixError, create=False)
        for path in (self.path, self.indexed_path):
            if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
                raise PostfixError("%s: file is not readable and writable by user %s; %s"
                                   % (path, user, fix))
        find_postfix_command("postmap")
        config_dir = self.config_dir or os.environ.get("MAIL_CONFIG") or "/etc/postfix"
        main_cf = os.path.join(config_dir, "main.cf")
        if not os.path.isfile(main_cf):
            raise PostfixError("%s: no main.cf there, and postmap needs one; set [PostfixConfig] "
                               "ConfigDir to Postfix's configuration folder, or create it "
                               "(an empty main.cf will do)" % config_dir)
        if time.time() - os.stat(main_cf).st_mtime < POSTFIX_SETTLING_SECONDS:
            log.info("%s changed less than %d s ago: Postfix's programs (postmap too) wait until "
                     "it is that old, so this start takes up to %d s longer", main_cf,
                     POSTFIX_SETTLING_SECONDS, POSTFIX_SETTLING_SECONDS)
        if os.path.exists(self.indexed_path):
            # does postmap run at all?
            self.postmap("-q", "incognitomail-start-probe", self.name)

    def _identity(self):
        return json.dumps({"map": self.name, "text": _file_identity(self.path),
                           "indexed": _file_identity(self.indexed_path)})

    def is_taken(self, key):
        return key in self.foreign_keys or key in self.unflushed

    def fingerprint(self):
        """What the files look like after our last write, or None if someone else changed them
        since, or if the text file still holds removed lines (a failed rewrite): the next start
        trusts the map only if it is still exactly so."""
        identity = self._identity()
        clean = identity == self._written and not self.needs_rebuild and not self.unflushed
        return identity if clean else None

    def reconcile(self, entries, clean_fingerprint):
        """Make the map hold exactly ``entries`` plus the admin's lines.

        When the files are exactly as a clean stop left them (``clean_fingerprint``), only the
        admin's part is read; otherwise the map is rebuilt from the store. Returns True when
        a rebuild was needed.
        """
        if not os.path.exists(self.path):
            _write_atomically(self.path, [MAP_MARKER])
        if clean_fingerprint is not None and clean_fingerprint == self._identity():
            self._read_foreign()
            self._note_visible()
            self._written = self._identity()
            return False
        self.rebuild(entries)
        return True

    def rebuild(self, entries):
        """A full rebuild into new files renamed into place: lookups never wait for it."""
        started = time.monotonic()
        foreign = self._read_foreign()
        folder = os.path.dirname(self.path)
        count = [0]

        def lines():
            yield from foreign
            yield MAP_MARKER
            for key, target in entries:
                if key not in self.foreign_keys:
                    count[0] += 1
                    yield map_line(key, target)
        private = None
        try:
            # postmap writes the new files by name: in a folder only we may enter
            private = tempfile.mkdtemp(dir=folder, prefix=".incognitomail-rebuild-")
            temp = os.path.join(private, os.path.basename(self.path))
            temp_indexed = temp + (".lmdb" if self.type == "lmdb" else ".db")
            with open(temp, "wb", buffering=1 << 20) as f:
                f.writelines(lines())
                f.flush()
                os.fsync(f.fileno())
            self.postmap("%s:%s" % (self.type, temp))
            _copy_ownership(self.path, temp)
            _copy_ownership(self.indexed_path if os.path.exists(self.indexed_path) else self.path,
                            temp_indexed)
            os.replace(temp_indexed, self.indexed_path)
            os.replace(temp, self.path)
            _fsync_folder(folder)
        except OSError as e:
            raise PostfixError("%s: cannot rebuild the map: %s" % (self.path, _os_reason(e)))
        finally:
            if private is not None:
                shutil.rmtree(private, ignore_errors=True)
        self.unflushed.clear()
        self.unflushed_since = None
        self.needs_rebuild = False
        self._note_visible()
        self._written = self._identity()
        log.info("rebuilt %s with %d handles in %.2f s", self.name, count[0],
                 time.monotonic() - started)

    # -- changes at constant cost -----------------------------------------------------------

    def apply(self, adds, removes):
        """Add ``adds`` [(key, target)] and remove ``removes`` [key], visible to Postfix at once.

        On failure everything done so far is undone and PostfixError raised. On success an
        undo function is returned, for when the database commit that follows fails.
        """
        if not adds and not removes:
            return lambda: None
        try:
            size_before = os.path.getsize(self.path)
        except OSError as e:
            raise PostfixError("%s: cannot read the map: %s" % (self.path, _os_reason(e)))
        unflushed_before = (set(self.unflushed), self.unflushed_since)
        appended, removed = [], []
        try:
            if removes:
                self.postmap("-d", "-", self.name,
                             stdin="".join(k + "\n" for k in removes).encode("utf-8"))
                removed = list(removes)
                self.unflushed.update(removes)
                if self.unflushed_since is None:
                    self.unflushed_since = time.monotonic()
            if adds:
                # A key removed earlier (a handle disabled, now enabled again) still has its
                # line in the text file: keep that one rather than appending a second.
                self._append([map_line(k, t) for k, t in adds if k not in self.unflushed])
                self.unflushed.difference_update(k for k, _ in adds)
                appended = adds
                self.postmap("-r", "-i", self.name, stdin=b"".join(map_line(k, t) for k, t in adds))
            self._make_visible()
            self._written = self._identity()
        except (PostfixError, OSError) as e:
            self._undo(size_before, unflushed_before, appended, removed)
            if isinstance(e, OSError):
                raise PostfixError("%s: cannot write the map: %s" % (self.path, _os_reason(e)))
            raise

        def undo():
            self._undo(size_before, unflushed_before, appended, removed)
        return undo

    def _append(self, lines):
        if not lines:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _undo(self, size_before, unflushed_before, appended, removed):
        """Best effort: put the map back as it was before a failed change."""
        try:
            if os.path.getsize(self.path) != size_before:
                os.truncate(self.path, size_before)
            if appended:
                self.postmap("-d", "-", self.name,
                             stdin="".join(k + "\n" for k, _ in appended).encode("utf-8"))
            if removed:
                # The removed keys' lines are still in the text file: put them back in the index.
                wanted = set(removed)
                restore = []
                with open(self.path, "rb") as f:
                    seen_marker = False
                    for line in f:
                        if is_marker(line):
                            seen_marker = True
                        elif seen_marker and map_line_key(line) in wanted:
                            restore.append(line)
                self.postmap("-r", "-i", self.name, stdin=b"".join(restore))
            self._make_visible()
            self._written = self._identity()
        except (PostfixError, OSError) as e:
            log.error("%s: could not undo a failed change (%s); "
                      "rebuilding it from the database", self.path, e)
            self.needs_rebuild = True
        self.unflushed, self.unflushed_since = unflushed_before

    def _note_visible(self):
        try:
            self._last_second = int(os.stat(self.indexed_path).st_mtime)
        except FileNotFoundError:
            self._last_second = 0

    def _make_visible(self):
        """Make running Postfix daemons notice the change on their next connection.

        They compare the indexed file's mtime in whole seconds; two changes in one second
        would leave a process stale. lmdb readers see every commit at once.
        """
        if self.type == "lmdb":
            return
        mtime = int(os.stat(self.indexed_path).st_mtime)
        if mtime <= self._last_second:
            mtime = self._last_second + 1
            os.utime(self.indexed_path, (mtime, mtime))
        self._last_second = mtime

    def flush_text(self):
        """Drop removed handles' lines from the text file, in one streaming rewrite."""
        if not self.unflushed:
            return
        started = time.monotonic()
        gone = set(self.unflushed)

        def kept():
            seen_marker = False
            with open(self.path, "rb") as f:
                for line in f:
                    if seen_marker and map_line_key(line) in gone:
                        continue
                    if is_marker(line):
                        seen_marker = True
                    yield line
        try:
            _write_atomically(self.path, kept())
            # Not newer than the indexed file, or Postfix warns that the database is out of date.
            indexed_mtime = os.stat(self.indexed_path).st_mtime
            os.utime(self.path, (indexed_mtime, indexed_mtime))
        except OSError as e:
            log.error("%s: cannot rewrite the map text file: %s (will retry)", self.path,
                      _os_reason(e))
            self.unflushed_since = time.monotonic()     # retry later, not in a loop
            return
        self.unflushed.clear()
        self.unflushed_since = None
        self._written = self._identity()
        log.debug("removed %d lines from %s in %.3f s", len(gone), self.path,
                  time.monotonic() - started)

    def checks(self, store):
        try:
            self.postmap("-q", "incognitomail-check-probe", self.name)
            yield "postmap runs", None
        except IncognitoMailError as e:
            yield "postmap runs", str(e)
        if store is not None:
            yield "map %s in step with the database" % self.name, _map_drift(self, store)


def _same_endpoint(written, ours, queue_directory):
    """Does main.cf's ``unix:PATH`` or ``inet:HOST:PORT`` name our listener?

    Chrooted Postfix daemons (Debian's default) need unix paths relative to the queue
    directory, so such a relative path counts when it leads to our socket.
    """
    if written == ours:
        return True
    kind, _, path = written.partition(":")
    return (kind == "unix"
            and ours == "unix:" + os.path.normpath(os.path.join(queue_directory, path)))


def _wired_endpoint(listen, queue_directory):
    """How main.cf should name our listener: a unix socket in the queue directory by its path
    relative to it, which chrooted daemons reach too."""
    kind, _, path = listen.partition(":")
    inside = kind == "unix" and path.startswith(queue_directory.rstrip("/") + "/")
    return "unix:" + os.path.relpath(path, queue_directory) if inside else listen


class Note(str):
    """A finding of ``check`` that is advice, not a failure."""


# Postfix settings ``check`` reads (postconf -x), and what each is for
_POSTFIX_SETTINGS = (
    "queue_directory myhostname mydestination virtual_alias_domains virtual_alias_maps "
    "canonical_maps recipient_canonical_maps sender_canonical_maps canonical_classes "
    "recipient_canonical_classes sender_canonical_classes smtpd_recipient_restrictions "
    "smtpd_relay_restrictions smtpd_milters non_smtpd_milters milter_default_action "
    "recipient_delimiter propagate_unmatched_extensions header_checks mime_header_checks "
    "nested_header_checks body_checks smtp_header_checks smtp_mime_header_checks "
    "smtp_nested_header_checks smtp_body_checks smtp_generic_maps masquerade_domains "
    "internal_mail_filter_classes smtpd_policy_service_default_action virtual_mailbox_domains"
    ).split()
_CONTENT_CHECKS = [name for name in _POSTFIX_SETTINGS if name.endswith("_checks")]
# where main.cf names our sockets
_SOCKET_SETTINGS = ("smtpd_recipient_restrictions", "smtpd_relay_restrictions",
                    "virtual_alias_maps", "canonical_maps", "recipient_canonical_maps",
                    "smtpd_milters", "non_smtpd_milters")


def _postconf_command(config):
    command = [find_postfix_command("postconf")]
    return command + ["-c", config.postfix_config_dir] if config.postfix_config_dir else command


def _chrooted(config):
    """Which of the daemons that use our sockets (smtpd, cleanup) master.cf runs chrooted in
    the queue directory (Debian's default: both; a "-" is Postfix 3's default, no chroot)."""
    try:
        done = subprocess.run(_postconf_command(config) + ["-M"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    rows = (line.split() for line in done.stdout.decode("utf-8", "replace").splitlines())
    return {row[7] for row in rows if len(row) > 7 and row[4] == "y"
            and row[7] in ("smtpd", "cleanup")}


def _postconf(config, names, expand):
    """{name: value} of Postfix's settings ``names``: with ``$name`` references replaced
    (``postconf -x``: what Postfix uses), or as main.cf writes them (what to write back)."""
    try:
        done = subprocess.run(_postconf_command(config) + (["-x"] if expand else []) + list(names),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PostfixError(str(e))
    if done.returncode != 0:
        raise PostfixError(done.stderr.decode("utf-8", "replace").strip())
    values = {}
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


class _PostfixSettings:
    """Postfix's own configuration, as ``postconf -x`` reads it."""

    def __init__(self, config):
        self.values = _postconf(config, _POSTFIX_SETTINGS, expand=True)
        self.queue = self.values.get("queue_directory", "/var/spool/postfix")
        self.where = "main.cf in %s" % (config.postfix_config_dir or "/etc/postfix")
        self.chrooted = _chrooted(config)

    def words(self, name):
        return [w for w in re.split(r"[\s,{}]+", self.values.get(name, "")) if w]


# postsrsd 1.x's forward lookup table, as its README sets it: sender_canonical_maps =
# tcp:localhost:10001 (the name has no "srs" in it)
POSTSRSD_1_FORWARD_PORT = ":10001"


def _rules_change_content(maps):
    """Do header or body check tables hold REPLACE or PREPEND rules (a file we can read)?"""
    for table in maps:
        path = table.partition(":")[2] if ":" in table else table
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if re.search(r"^\s*/.*/\S*\s+(REPLACE|PREPEND)\b", f.read(), re.M | re.I):
                    return True
        except OSError:
            continue
    return False


def _rewriter_problems(settings):
    """Settings that change what the milter made: a second envelope rewriter (postsrsd), or
    anything that rewrites forwarded headers or bodies."""
    words, where, values = settings.words, settings.where, settings.values
    rewriters = [w for w in words("sender_canonical_maps") + words("smtpd_milters")
                 if "srs" in w.lower() or w.endswith(POSTSRSD_1_FORWARD_PORT)]
    problems = [("no second envelope rewriter", "%s uses %s (postsrsd?): remove it, the milter "
                 "rewrites the envelope itself; see README.md, \"Moving from postsrsd\""
                 % (where, rewriters[0]) if rewriters else None)]
    changing = [name for name in _CONTENT_CHECKS if _rules_change_content(words(name))]
    changing += [name for name in ("smtp_generic_maps", "masquerade_domains") if words(name)]
    for name in ("canonical_classes", "sender_canonical_classes",
                 "recipient_canonical_classes"):
        maps = words(name.replace("classes", "maps")) if name != "canonical_classes" else \
            words("canonical_maps")
        if maps and any(w.startswith("header_") for w in words(name)):
            changing.append(name)
    problems.append(("nothing rewrites forwarded mail", "%s in %s change forwarded headers or "
                     "bodies: the sender's DKIM signature breaks, and a rewrite may undo the "
                     "milter's; remove them (a *canonical_classes: set it to its envelope_ "
                     "classes only, as leaving it out means header classes too)"
                     % (", ".join(changing), where) if changing else None))
    return problems


def _unmilted_note(settings, store):
    """Without the milter: the providers of owners' addresses elsewhere learn of it."""
    words = settings.words
    foreign = sorted({address.rpartition("@")[2] for address in
                      (store.target_addresses() if store is not None else ())}
                     - set(words("mydestination")) - set(words("virtual_mailbox_domains")))
    return [("mail leaves with the owner's privacy kept", Note(
        "without the milter ([General] MilterListen), mail forwarded to %s keeps its "
        "sender's envelope: SPF fails there, and a bounce or an auto-reply shows the sender "
        "the owner's address; see README.md, \"Privacy and deliverability\""
        % ", ".join(foreign)) if foreign else None)]


def _milter_place_problems(config, settings):
    """Where Postfix runs the milter: for mail from outside, between a verifier and a signer,
    and for its own bounces."""
    words, where = settings.words, settings.where
    milters = words("smtpd_milters")
    ours = [i for i, w in enumerate(milters)
            if _same_endpoint(w, config.milter_listen, settings.queue)]
    problems = [("Postfix runs the milter", None if ours else
                 "smtpd_milters in %s lacks %s; add it, then postfix reload"
                 % (where, _wired_endpoint(config.milter_listen, settings.queue)))]
    # each milter reads the message as those before it left it: a verifier goes before ours
    # (the owner's mail as it came), a signer after (what ours made of it)
    if ours and milters[:ours[0]]:
        problems.append(("milters before IncognitoMail's only verify", Note(
            "smtpd_milters lists %s before IncognitoMail's: right for a verifier (OpenDMARC, "
            "OpenDKIM in mode v), whose verdict the milter reads; a DKIM signer there would sign "
            "what the milter then changes: list signers after it" % ", ".join(milters[:ours[0]]))))
    elif ours and config.reply_addresses:
        problems.append(("a verifier checks the owners' mail", Note(
            "no milter before IncognitoMail's: unless a verifier writes Authentication-Results "
            "first (OpenDMARC or OpenDKIM in mode v listed before it, or policyd-spf with "
            "Header_Type = AR), anyone who knows an owner's address can write as their handles;"
            " see README.md, \"Privacy and deliverability\"")))
    if ours:
        problems.append(("a DKIM signer follows the milter", None if milters[ours[0] + 1:] else
                         Note("no milter after IncognitoMail's: forwarded mail passes DMARC by "
                              "SPF alone; list a DKIM signer (OpenDKIM, rspamd) after it to "
                              "sign for the handles' domains")))
    # Postfix's own bounces (the owner's provider refusing a forwarded message, the commonest
    # kind) pass a milter only as locally made mail of the bounce class
    counted = any(_same_endpoint(w, config.milter_listen, settings.queue)
                  for w in words("non_smtpd_milters")) and \
        "bounce" in words("internal_mail_filter_classes")
    problems.append(("Postfix's own bounces are counted", None if counted else Note(
        "a bounce Postfix writes itself, as when the owner's provider refuses a forwarded "
        "message, reaches the owner uncounted: add %s to non_smtpd_milters and bounce to "
        "internal_mail_filter_classes in %s" % (config.milter_listen, where))))
    return problems


def _milter_problems(config, settings, store):
    if not config.milter_listen:
        return _unmilted_note(settings, store)
    words, where, values = settings.words, settings.where, settings.values
    problems = _milter_place_problems(config, settings)
    if (values.get("milter_default_action") or "tempfail") != "tempfail":
        problems.append(("Postfix waits while the milter is away", "milter_default_action = %s:"
                         " mail would pass unchanged while the daemon is down; use tempfail"
                         % values["milter_default_action"]))
    if "+" not in values.get("recipient_delimiter", ""):
        problems.append(("Postfix takes the milter's addresses (handle+...@)", "%s needs "
                         "recipient_delimiter = +" % where))
    # the map's own kind of lookup must not hand a milter address's +extension on to the owner
    local = any(domain in words("mydestination") for domain in config.domains)
    spread, keep = ("canonical", "empty") if local else ("virtual", "canonical (or empty)")
    if spread in words("propagate_unmatched_extensions"):
        problems.append(("bounces reach the owner's own address", "propagate_unmatched_extensions"
                         " includes %s: Postfix adds a bounce address's +extension to the "
                         "owner's address; set it to %s in %s" % (spread, keep, where)))
    problems += _rewriter_problems(settings)
    spf = "v=spf1 a:%s -all" % (values.get("myhostname") or "mail.example.org")
    problems += [("SPF record of %s" % domain, Note(
        "publish TXT \"%s\" (or one naming every address this server sends from) for %s"
        % (spf, domain))) for domain in config.domains]
    return problems


def _stale_map_problem(config, settings):
    """With the socketmap, the map file the daemon wrote before is no longer kept in step:
    Postfix must not read handles from it."""
    old = PostfixMap(config)
    listed = [name for name in ("virtual_alias_maps", "canonical_maps", "recipient_canonical_maps")
              if any(w in (old.name, old.path) for w in settings.words(name))]
    handles = False
    with contextlib.suppress(OSError), open(old.path, "rb") as f:
        below = False
        for line in f:
            handles = handles or below and map_line_key(line) is not None
            below = below or is_marker(line)
    return ("Postfix reads no stale handles", "%s in %s lists %s, whose handles below the "
            "marker the daemon no longer keeps in step (with SocketmapListen): deleted and "
            "switched-off handles stay live through it; move your own lines above the marker to "
            "a map of their own, then remove it" % (listed[0], settings.where, old.name)
            if listed and handles else None)


def _map_problems(config, table, settings):
    words, queue, where = settings.words, settings.queue, settings.where
    if config.socketmap_listen:
        ours = lambda w: w.startswith("socketmap:") and _same_endpoint(
            w.removeprefix("socketmap:").rpartition(":")[0], config.socketmap_listen, queue)
        wanted = "socketmap:%s:virtual" % _wired_endpoint(config.socketmap_listen, queue)
    else:
        ours = lambda w: w == table.name or (table.type == "hash" and w == table.path)
        wanted = table.name
    if any(ours(w) for w in words("virtual_alias_maps")):
        domains = set(words("virtual_alias_domains")) | set(words("mydestination"))
        role = "virtual_alias_maps"
    elif any(ours(w) for w in words("canonical_maps") + words("recipient_canonical_maps")):
        domains = set(words("mydestination")) | set(words("virtual_alias_domains"))
        role = "canonical"
    else:
        return [("Postfix uses the map", "neither virtual_alias_maps nor (recipient_)canonical_maps"
                 " in %s lists %s; add it, e.g. virtual_alias_maps = %s, then postfix reload"
                 % (where, wanted, wanted))]
    missing = [d for d in config.domains if d not in domains]
    setting = "virtual_alias_domains" if role == "virtual_alias_maps" else "mydestination"
    problems = [("Postfix uses the map (%s)" % role, None),
                ("Postfix routes every domain", "%s not in %s (%s); add them there, then "
                 "postfix reload" % (", ".join(missing), setting, where) if missing else None)]
    if config.socketmap_listen:
        problems.append(_stale_map_problem(config, settings))
    if config.milter_listen:
        # canonical maps rewrite envelope senders too, the milter's among them (cleanup(8)
        # maps a sender a milter sets as it maps the client's)
        senders = [name for name in ("canonical_maps", "sender_canonical_maps")
                   if any(ours(w) for w in words(name))
                   and "envelope_sender" in words(name.replace("maps", "classes"))]
        problems.append(("Postfix keeps the milter's senders", "%s in %s lists %s: Postfix "
                         "would turn a handle's bounce address, the sender of mail from the "
                         "handle, into its owner's address; list it in recipient_canonical_maps"
                         " instead" % (senders[0], where, wanted) if senders else None))
    return problems


def _chroot_problems(config, settings):
    """A socket main.cf names by its absolute path is out of a chrooted daemon's reach, though
    ``check``'s own lookups (and unchrooted tools such as postmap) find it."""
    if not settings.chrooted:
        return []
    found = ["%s (write %s)" % (listen, _wired_endpoint(listen, settings.queue))
             for listen in (config.policy_listen, config.socketmap_listen, config.milter_listen)
             if listen and _wired_endpoint(listen, settings.queue) != listen
             and any(listen in settings.values.get(name, "") for name in _SOCKET_SETTINGS)]
    return [("Postfix reaches its sockets from the chroot", "master.cf runs %s chrooted in %s, "
             "where a socket's absolute path leads nowhere: %s" % (
                 " and ".join(sorted(settings.chrooted)), settings.queue, "; ".join(found))
             if found else None)]


def postfix_config_problems(config, table, store=None):
    """What Postfix's own configuration lacks for our map, domains, policy service and milter,
    and what in it would undo the milter's work: (what was checked, problem, Note or None)."""
    try:
        settings = _PostfixSettings(config)
    except IncognitoMailError as e:
        return [("Postfix configuration readable", str(e))]
    problems = _map_problems(config, table, settings)
    if config.policy_listen:
        endpoint, words = config.policy_listen, settings.words
        referenced = any(before == "check_policy_service"
                         and _same_endpoint(word, endpoint, settings.queue)
                         for n in ("smtpd_recipient_restrictions", "smtpd_relay_restrictions")
                         for before, word in zip(words(n), words(n)[1:]))
        problems.append(("Postfix asks the policy service", None if referenced else
                         "smtpd_recipient_restrictions in %s lacks check_policy_service %s; "
                         "see README.md" % (settings.where,
                                            _wired_endpoint(endpoint, settings.queue))))
        default = settings.values.get("smtpd_policy_service_default_action", "")
        problems.append(("mail flows while the daemon is down", None if default == "DUNNO" else
                         Note("smtpd_policy_service_default_action = %s: Postfix answers so "
                              "for every recipient, not only handles, while the daemon is down "
                              "or restarting; set it to DUNNO in %s" % (default, settings.where))))
    return problems + _chroot_problems(config, settings) + _milter_problems(config, settings, store)


class SocketmapTable(LookupTable):
    """Postfix asks the daemon (``SocketmapListen``), straight from the database: nothing to
    write. The admin's map file is left as is; its keys are still never handed out."""


def make_table(config):
    return SocketmapTable(config) if config.socketmap_listen else PostfixMap(config)


###############################################################################
# Service
###############################################################################

# Removed handles leave the text map in one streaming rewrite, once the service has been idle
# this long, or at the latest this long after the first removal (a rewrite of a million-line
# map holds up batches for about 0.7 s).
TEXT_FLUSH_DELAY = 2.0
TEXT_FLUSH_MAX_DELAY = 60.0
SWEEP_SECONDS = 60.0    # how often handles whose time is up leave the map
MAX_BATCH = 64          # owners' operations in one batch: its work and the results it holds
READERS = 2             # threads answering owners' reads, each from a snapshot of its own

ABSENT = object()       # a field the request left out (None is a value: "never", "no label")


class _MapChanges:
    """The net map change of a batch: key -> target to add, or None to remove.

    A key's changes alternate (an add makes it present, a remove absent), so an add
    followed by a remove in one batch, or the reverse, cancels out.
    """

    def __init__(self):
        self.entries = {}

    def add(self, key, target):
        self._record(key, target)

    def remove(self, key):
        self._record(key, None)

    def _record(self, key, target):
        if key in self.entries and (self.entries[key] is None) != (target is None):
            del self.entries[key]
        else:
            self.entries[key] = target

    def merge(self, other):
        for key, target in other.entries.items():
            self._record(key, target)

    @property
    def adds(self):
        return [(k, t) for k, t in self.entries.items() if t is not None]

    @property
    def removes(self):
        return [k for k, t in self.entries.items() if t is None]


Job = collections.namedtuple("Job", "future run fields")    # run(work, **fields) -> result


class _FairQueue:
    """Jobs from many owners, served in turns: each key's jobs in order, the keys round robin,
    and urgent jobs (mail flow) before any. ``take`` returns [] after a timeout, and None
    once the queue is closed and empty."""

    def __init__(self):
        self._ready = threading.Condition()
        self._urgent = collections.deque()
        self._turns = collections.OrderedDict()     # key -> its waiting jobs, in turn order
        self._closed = False

    def put(self, job, key=None, urgent=False):
        """False once the queue is closed: nobody would take the job."""
        with self._ready:
            if self._closed:
                return False
            if urgent:
                self._urgent.append(job)
            else:
                self._turns.setdefault(key, collections.deque()).append(job)
            self._ready.notify()
            return True

    def close(self):
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def take(self, most, timeout=None):
        with self._ready:
            if not self._urgent and not self._turns and not self._closed:
                self._ready.wait(timeout)
            if self._closed and not self._urgent and not self._turns:
                return None
            jobs = []
            while self._urgent and len(jobs) < most:
                jobs.append(self._urgent.popleft())
            while self._turns and len(jobs) < most:
                key, waiting = next(iter(self._turns.items()))
                jobs.append(waiting.popleft())
                del self._turns[key]
                if waiting:
                    self._turns[key] = waiting      # its next job waits for everyone else's
            return jobs


class Work:
    """What an operation sees: the store (inside the batch's transaction, or a reader's
    snapshot), the batch's map changes (None for a read), the configuration and the time."""
    __slots__ = ("service", "store", "changes", "now")

    def __init__(self, service, store, changes, now):
        self.service, self.store, self.changes, self.now = service, store, changes, now

    @property
    def config(self):
        return self.service.config

    def account(self, token):
        """The account whose secret ``token`` this is, marked as used; Unauthorized otherwise."""
        if not token or len(token) > 256:
            raise Unauthorized("a secret token is required")
        account = self.store.account_by_digest(token_digest(token))
        if account is None:
            raise Unauthorized("unknown secret token")
        if self.changes is None:
            self.service.touch(account.id, self.now)    # a read writes nothing: later
        else:
            self.store.touch_account(account.id, self.now)
        return account

    def own_handle(self, account, address=None, handle_id=None):
        """The account's handle named by its address ((local, domain)) or its id; NotFound for
        anyone else's."""
        if handle_id is not None:
            handle, name = self.store.handle_by_number(account.id, handle_id), \
                "number %d" % handle_id
        elif address is not None:
            handle, name = self.store.handle(*address), "%s@%s" % address
        else:
            raise BadRequest("a handle is required, e.g. k3v9q0x2m7ab5ts1@%s"
                             % self.config.default_domain)
        if handle is None or handle.account_id != account.id:
            raise NotFound("no handle %s belongs to this account" % name)
        return handle

    def swept_until(self):
        """The time the last sweep took expired handles out of the map up to."""
        return int(self.store.get_meta("swept_until") or 0)


def _record_mail(work, events):
    """``events``: [(address, time, what)] of messages Postfix asked about: what is one of
    MAIL_COUNTS, the column it is counted in.

    A handle that has now received all the messages it accepts leaves the map at the next
    sweep, once its last message is through Postfix."""
    counts = {column: {} for column in MAIL_COUNTS}
    latest = {column: {} for column in MAIL_COUNTS}
    for address, when, column in events:
        key = tuple(address.lower().split("@", 1))
        counts[column][key] = counts[column].get(key, 0) + 1
        latest[column][key] = max(latest[column].get(key, 0), when)
    store, received = work.store, counts[RECEIVED]
    before = {key: store.handle(*key) for key in received}
    swept = work.swept_until()
    for column in MAIL_COUNTS:
        store.record_mail(column, counts[column], latest[column])
    for key, handle in before.items():
        if handle is not None and handle.max_messages is not None and \
                handle.received < handle.max_messages <= handle.received + received[key]:
            # it leaves the map at the first sweep after this (a later second)
            store.set_used_up(handle.id, max(latest[RECEIVED][key], swept + 1))
            log.info("handle %s has received all the %d messages it accepts",
                     handle.address, handle.max_messages)
    return len(events)


def _sweep(work, restarting=False):
    """Take the handles that expired or were used up since the last sweep out of the map
    (at most once a minute, by two indexes: the cost follows what ends, not the table).

    At a start no message is on its way any more: every used-up handle leaves at once."""
    store, now = work.store, int(work.now)
    since = int(store.get_meta("swept_until") or now)
    used_up = store.used_up_between(since, MAX_TIME if restarting else now)
    ended = store.expiring(since, now) + used_up
    after = [h._replace(used_up=min(h.used_up or 0, now)) if restarting else h for h in ended]
    gone = {h.address for h, later in zip(ended, after) if h.in_map(since)
            and not later.in_map(now)}
    if restarting:
        store.settle_used_up(now)
    for address in gone:
        work.changes.remove(address)
    store.set_meta("swept_until", str(max(since, now)))
    work.service.swept_until = max(since, now)
    if gone:
        log.info("%d handles expired or used up left the map", len(gone))
    return len(gone)


def _operation_error(job, error, done):
    """What the caller of a failed operation is told: its own error, or a short one (the log
    has the details)."""
    if isinstance(error, IncognitoMailError):
        return error
    name = getattr(job.run, "__name__", "an operation").lstrip("_")
    if isinstance(error, sqlite3.Error):
        log.error("database error in %s: %s", name, error)
        return StoreError("the database could not be %s: %s" % (done, error))
    log.error("internal error in %s", name, exc_info=error)
    return IncognitoMailError("internal error; the server log has details")


class Service:
    """The one place that changes anything: every write is store + Postfix, all or nothing.

    Writes go to one worker thread, which takes up to MAX_BATCH of them, owners' in turns
    (``key``: one account or client) and mail flow's first, and runs them as one batch: one
    sqlite transaction (a savepoint per operation, so one bad request fails alone), one
    ``postmap -d`` and one ``postmap -i``, then the commit. A result is handed back only after
    both the commit and the map update, so a reported handle is always recorded and routable.
    Reads go to READERS threads of their own, in turns too, each answered from a consistent
    snapshot (sqlite's WAL readers): writes wait only for writes.

    ``write`` and ``read`` return a concurrent.futures.Future. ``clock`` is injectable so tests
    can move time.
    """

    def __init__(self, config, store, table, clock=time.time):
        self.config = config
        self.store = store
        self.table = table
        self.clock = clock
        self._writes, self._reads = _FairQueue(), _FairQueue()
        self._threads = []
        self._touched = {}              # account id -> when a read used its token, to write
        self._touched_lock = threading.Lock()
        self.swept_until = 0            # the last sweep's time (the database has it too)
        self.batches = 0

    # -- life cycle -------------------------------------------------------------------------

    def start(self):
        """Reconcile the map from the store, then start taking operations."""
        self.table.check_access()
        clean = self.store.get_meta("clean_stop")
        with self.store.transaction():
            self.store.set_meta("clean_stop", None)
            # Received counts mean "unused" only for the time the policy service has been counting.
            if not self.config.policy_listen:
                self.store.set_meta("counting_since", None)
            elif self.store.get_meta("counting_since") is None:
                self.store.set_meta("counting_since", str(int(self.clock())))
            if self.store.get_meta("swept_until") is None:
                self.store.set_meta("swept_until", str(int(self.clock())))
            if self.store.get_meta("milter_secret") is None:
                self.store.set_meta("milter_secret", secrets.token_hex(32))
        # as of the last sweep; the sweep below then takes out what ended since
        self.table.reconcile(self.store.map_entries(self._swept_until()), clean)
        # what expired while the server was down leaves the map before anything is served
        sweep = Job(concurrent.futures.Future(), _sweep, {"restarting": True})
        self._run_batch([sweep])
        sweep.future.result()
        self._threads = [threading.Thread(target=self._write_loop, name="incognitomail-writer",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._read_loop, daemon=True,
                                           name="incognitomail-reader-%d" % n)
                          for n in range(READERS)]
        for thread in self._threads:
            thread.start()

    def stop(self):
        """Finish every queued operation, flush the text map, remember that the stop was clean."""
        self._reads.close()
        self._writes.close()
        for thread in self._threads:
            thread.join()
        self._threads = []
        self.table.flush_text()
        with self.store.transaction():
            self._write_touched()
            self.store.set_meta("clean_stop", self.table.fingerprint())

    # -- entry points -----------------------------------------------------------------------

    def write(self, run, fields, key=None, urgent=False):
        """Queue ``run(work, **fields)`` for the worker: a Future of its result. ``urgent``:
        before every owner's operation (mail flow)."""
        job = Job(concurrent.futures.Future(), run, fields)
        if not self._writes.put(job, key, urgent):
            job.future.set_exception(ServerError("the server is stopping"))
        return job.future

    def read(self, run, fields, key=None):
        """Queue ``run(work, **fields)`` for a reader: it changes nothing."""
        job = Job(concurrent.futures.Future(), run, fields)
        if not self._reads.put(job, key):
            job.future.set_exception(ServerError("the server is stopping"))
        return job.future

    def record_mail(self, events):
        """Count messages Postfix asked about, ahead of every owner's operation."""
        return self.write(_record_mail, {"events": events}, urgent=True)

    def touch(self, account_id, when):
        """A read used the account's token: its last use is written with the next batch."""
        with self._touched_lock:
            self._touched[account_id] = max(when, self._touched.get(account_id, 0))

    # -- the readers ------------------------------------------------------------------------

    def _read_loop(self):
        store = None
        try:
            store = Store(self.store.path, readonly=True)
            while True:
                jobs = self._reads.take(1)
                if jobs is None:
                    return
                for job in jobs:
                    if job.future.set_running_or_notify_cancel():
                        self._answer(job, store)
        except StoreError as e:
            log.error("%s", e)
            while True:                 # nobody waits for ever
                jobs = self._reads.take(1)
                if jobs is None:
                    return
                for job in jobs:
                    job.future.set_exception(e)
        finally:
            if store is not None:
                store.close()

    def _answer(self, job, store):
        try:
            with store.snapshot():
                result = job.run(Work(self, store, None, self.clock()), **job.fields)
        except Exception as e:
            job.future.set_exception(_operation_error(job, e, "read"))
        else:
            job.future.set_result(result)

    # -- the worker -------------------------------------------------------------------------

    def _write_loop(self):
        last_batch = time.monotonic()
        next_sweep = last_batch + SWEEP_SECONDS
        while True:
            due = min(self._flush_due(last_batch), next_sweep)
            jobs = self._writes.take(MAX_BATCH, max(0.0, due - time.monotonic()))
            if jobs is None:
                return
            if time.monotonic() >= next_sweep:
                jobs.append(Job(concurrent.futures.Future(), _sweep, {}))
                next_sweep = time.monotonic() + SWEEP_SECONDS
            if not jobs:
                self.table.flush_text()     # idle (or the oldest removal is old): tidy the map
                last_batch = time.monotonic()
                continue
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            try:
                self._run_batch(jobs)
            except Exception:       # never let one batch stop the worker: nobody would be answered
                log.exception("internal error in the service worker")
                self.store.rollback()
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(
                            IncognitoMailError("internal error; the server log has details"))
            if self.table.needs_rebuild:
                self._rebuild_map()
            last_batch = time.monotonic()
            if (self.table.unflushed_since is not None
                    and last_batch - self.table.unflushed_since >= TEXT_FLUSH_MAX_DELAY):
                self.table.flush_text()

    def _rebuild_map(self):
        """After a change that could not be undone: the store says what the map must hold."""
        try:
            self.table.rebuild(self.store.map_entries(self._swept_until()))
        except IncognitoMailError as e:
            log.error("%s (the map stays in doubt; "
                      "it is rebuilt after the next batch or at start)", e)

    def _flush_due(self, last_batch):
        """When the text map should drop removed lines: once idle, or when they are too old."""
        since = self.table.unflushed_since
        if since is None:
            return float("inf")
        return min(last_batch + TEXT_FLUSH_DELAY, since + TEXT_FLUSH_MAX_DELAY)

    def _swept_until(self):
        return int(self.store.get_meta("swept_until") or 0)

    def _write_touched(self):
        with self._touched_lock:
            touched, self._touched = self._touched, {}
        for account_id, when in touched.items():
            self.store.touch_account(account_id, when)

    def _run_batch(self, jobs, retrying=False):
        """One transaction, one map update, one commit for every job; see the class docstring.

        When the map update or the commit fails, every job that changed the map fails with
        that error; the others are run again in a transaction of their own.
        """
        if not jobs:
            return
        self.batches += 1
        outcomes, undo = [], None
        try:
            with self.store.transaction():
                self._write_touched()
                changes = _MapChanges()
                outcomes = [self._run_job(job, changes) for job in jobs]
                undo = self.table.apply(changes.adds, changes.removes)
        except Exception as e:
            if undo is not None:
                undo()              # the commit failed after the map was changed
            self._batch_failed(jobs, outcomes, e, retrying)
            return
        for job, result, _ in outcomes:
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _run_job(self, job, changes):
        """One operation in a savepoint of its own: it fails alone, and its map changes too."""
        own = _MapChanges()
        try:
            with self.store.savepoint():
                result = job.run(Work(self, self.store, own, self.clock()), **job.fields)
        except Exception as e:
            result = _operation_error(job, e, "written")
        else:
            changes.merge(own)
        return job, result, bool(own.entries)

    def _batch_failed(self, jobs, outcomes, error, retrying):
        if isinstance(error, sqlite3.Error):
            error = StoreError("the database %s: %s%s" % (
                "could not be written" if outcomes else "is not available", error,
                "; nothing was changed" if outcomes else ""))
        elif not isinstance(error, IncognitoMailError):
            log.exception("internal error while writing a batch")
            error = IncognitoMailError("internal error; the server log has details")
        log.error("%s", error)
        if not outcomes:            # nothing ran: the transaction did not even begin
            for job in jobs:
                job.future.set_exception(error)
            return
        retry = []
        for job, result, changed in outcomes:
            if isinstance(result, IncognitoMailError):
                job.future.set_exception(result)
            elif changed or retrying:
                job.future.set_exception(error)
            else:
                retry.append(job)
        if not retrying:
            self._run_batch(retry, retrying=True)


###############################################################################
# Operations: what each front end may ask for, described once, and the gate to them
###############################################################################

# Each operation is a function run(work, **fields) on a Work, inside the Service: the gate
# below has checked every field with its rule, so an operation trusts what it is given.

MAX_PAGE_SIZE = 100
HandlePage = collections.namedtuple("HandlePage", "handles total offset limit")
HandleList = collections.namedtuple("HandleList", "handles next")
AccountSummary = collections.namedtuple("AccountSummary", "id address created handles domains "
                                                         "received blocked bounced sent")


def _new_account(work, address):
    token = new_token()
    account_id = work.store.add_account(address, token_digest(token), work.now)
    log.info("new account %d for %s", account_id, address)
    return token


def _account_id(work, token):
    return work.account(token).id


def _make_handle(work, account, label, domain, expires, max_messages, local=None):
    """A handle for ``account``, random unless ``local`` is given (an import)."""
    store, config = work.store, work.config
    if expires is ABSENT:
        lifetime = config.handle_lifetime
        expires = None if lifetime is None else int(work.now) + lifetime
    domain = domain or config.default_domain
    while local is None:
        local = new_handle_name(config.handle_length)
        if work.service.table.is_taken("%s@%s" % (local, domain)) or \
                store.handle_taken(local, domain):
            local = None
    key = "%s@%s" % (local, domain)
    handle = store.add_handle(account.id, local, domain, label, work.now, expires, max_messages)
    work.changes.add(key, account.address)
    log.info("new handle %s for account %d (%s)", key, account.id, account.address)
    return handle


def _new_handle(work, token, label=None, domain=None, expires=ABSENT, max_messages=None):
    """``expires`` left out: the configured HandleLifetime."""
    return _make_handle(work, work.account(token), label, domain, expires, max_messages)


def _new_handles(work, token, count, label=None, domain=None, expires=ABSENT, max_messages=None):
    """``count`` handles at once: one transaction, one map update."""
    account = work.account(token)
    return [_make_handle(work, account, label, domain, expires, max_messages)
            for _ in range(count)]


def _change_handle(work, account, handle, given):
    changed = handle._replace(**given)
    work.store.update_handle(changed, work.now)
    swept = work.swept_until()
    was, will_be = handle.in_map(swept), changed.in_map(swept)
    if will_be and not was:
        work.changes.add(handle.address, account.address)
    elif was and not will_be:
        work.changes.remove(handle.address)
    log.info("handle %s of account %d: %s%s", handle.address, account.id,
             changed.state(work.now), ", label %r" % changed.label if changed.label else "")
    return work.store.handle_by_id(handle.id)


def _import_handles(work, token, handles, dry_run=False):
    """Make the account's ``handles`` (ImportedHandle rows) with their addresses kept, all or
    none: an address in use (in the database or the admin's own map lines) refuses them all."""
    account, store = work.account(token), work.store
    taken = [row.address for row in handles if store.handle_taken(*row.address.split("@")) or
             row.address in work.service.table.foreign_keys]
    if taken:
        raise BadRequest("%s %s in use already; nothing was imported"
                         % (", ".join(taken[:5]) + (" and %d more" % (len(taken) - 5)
                                                   if len(taken) > 5 else ""),
                            "is" if len(taken) == 1 else "are"))
    if dry_run:
        return len(handles)
    for row in handles:
        local, domain = row.address.split("@")
        handle = _make_handle(work, account, row.label, domain, row.expires, row.max_messages,
                              local)
        if not row.enabled:
            _change_handle(work, account, handle, {"enabled": False})
    return len(handles)


def _backup(work, path):
    """A consistent copy of the whole database at ``path`` (sqlite's backup API, from a
    reader's snapshot: writes go on meanwhile), written beside it and renamed into place."""
    if os.path.lexists(path):
        raise BadRequest("%s exists already; give a new file" % path)
    folder = os.path.dirname(path)
    try:
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".%s." % os.path.basename(path))
    except OSError as e:
        raise BadRequest("cannot write a backup in %s: %s" % (folder, _os_reason(e)))
    os.close(fd)
    try:
        copy = sqlite3.connect(temp)
        try:
            work.store.db.backup(copy)
        finally:
            copy.close()
        os.chmod(temp, 0o600)
        os.rename(temp, path)
    except BaseException:
        if os.path.lexists(temp):
            os.unlink(temp)
        raise
    log.info("backed the database up to %s", path)
    return {"path": path, "bytes": os.path.getsize(path)}


def _get_handle(work, token, address=None, handle_id=None):
    return work.own_handle(work.account(token), address, handle_id)


def _update_handle(work, token, address=None, handle_id=None, label=ABSENT, enabled=ABSENT,
                   expires=ABSENT, max_messages=ABSENT, refuse_as_unknown=ABSENT):
    """Change what is given; ``expires`` None: never, ``max_messages`` None: no limit,
    ``refuse_as_unknown`` None: as the server says."""
    account = work.account(token)
    given = {name: value for name, value in (("label", label), ("enabled", enabled),
                                             ("expires", expires), ("max_messages", max_messages),
                                             ("refuse_as_unknown", refuse_as_unknown))
             if value is not ABSENT}
    return _change_handle(work, account, work.own_handle(account, address, handle_id), given)


def _remove_handle(work, account, handle):
    work.store.delete_handle(handle.id)
    if handle.in_map(work.swept_until()):
        work.changes.remove(handle.address)
    log.info("deleted handle %s of account %d (%s)", handle.address, account.id, account.address)


def _delete_handle(work, token, address=None, handle_id=None):
    account = work.account(token)
    _remove_handle(work, account, work.own_handle(account, address, handle_id))


def _own_handles(work, account, handle_ids):
    found = (work.store.handle_by_number(account.id, number) for number in handle_ids)
    return [handle for handle in found if handle is not None]


def _get_handles(work, token, handle_ids):
    """The account's handles among ``handle_ids`` (others' and unknown ones are left out)."""
    return _own_handles(work, work.account(token), handle_ids)


def _update_handles(work, token, handle_ids, enabled):
    """Switch the account's handles among ``handle_ids`` on or off: those that changed."""
    account = work.account(token)
    return [_change_handle(work, account, handle, {"enabled": enabled})
            for handle in _own_handles(work, account, handle_ids)
            if bool(handle.enabled) != enabled]


def _delete_handles(work, token, handle_ids):
    """Delete the account's handles among ``handle_ids``: the ids of those deleted."""
    account = work.account(token)
    handles = _own_handles(work, account, handle_ids)
    for handle in handles:
        _remove_handle(work, account, handle)
    return [handle.number for handle in handles]


def _list_handles(work, token, before=None, limit=MAX_PAGE_SIZE):
    """A page of the account's handles, newest first; ``next`` is where the next page starts
    (give it as ``before``), None after the last."""
    handles = work.store.handles_before(work.account(token).id, before, limit + 1)
    more = len(handles) > limit
    return HandleList(handles[:limit], handles[limit - 1].number if more else None)


def _find_handles(work, token, search=None, enabled=None, offset=0, limit=50, order="newest"):
    """One page of an account's handles, in ``order``, and how many there are in all."""
    handles, total = work.store.handles_of(work.account(token).id, search, enabled, offset, limit,
                                           order)
    return HandlePage(handles, total, offset, limit)


def _account(work, token):
    account = work.account(token)
    return AccountSummary(account.id, account.address, account.created,
                          work.store.handles_of(account.id, limit=0)[1], work.config.domains,
                          *work.store.mail_totals(account.id))


def _rotate_token(work, token):
    account = work.account(token)
    new = new_token()
    work.store.set_token_digest(account.id, token_digest(new))
    log.info("new secret token for account %d (%s); the old one no longer works",
             account.id, account.address)
    return new


def _delete_account(work, token):
    account = work.account(token)
    handles, swept = work.store.handles_of(account.id)[0], work.swept_until()
    work.store.delete_account(account.id)
    for handle in handles:
        if handle.in_map(swept):
            work.changes.remove(handle.address)
    log.info("deleted account %d (%s) and its %d handles", account.id, account.address,
             len(handles))
    return len(handles)


def _status(work):
    status = work.store.counts()
    status.update({"version": __version__, "pid": os.getpid(), "map": work.service.table.name,
                   "domains": list(work.config.domains)})
    return status


def _prune(work, handles_unused_days=None, accounts_unused_days=None, handles_expired_days=None,
           dry_run=False):
    store, now, swept = work.store, work.now, work.swept_until()
    if (handles_unused_days is not None or accounts_unused_days is not None) and \
            not work.config.policy_listen:
        raise BadRequest("pruning needs the policy service, which counts the mail each handle "
                         "receives: without it every handle looks unused. Set [General] "
                         "PolicyListen and add the policy service to Postfix first "
                         "(see README.md)")
    doomed = []
    if handles_unused_days is not None:
        counting_since = int(store.get_meta("counting_since") or now)
        if handles_unused_days and counting_since > now - handles_unused_days * 86400:
            raise BadRequest("the policy service has counted mail only since %s, so a handle "
                             "cannot yet be known to be unused for %d days; prune from %s "
                             "on, or give a shorter time"
                             % (iso_time(counting_since), handles_unused_days,
                                iso_time(counting_since + handles_unused_days * 86400)))
        doomed += store.unused_handles(now - handles_unused_days * 86400)
    if handles_expired_days is not None:
        doomed += store.expired_before(now - handles_expired_days * 86400)
    removed = []
    for handle in doomed:
        if handle.address not in removed:
            removed.append(handle.address)
            if not dry_run:
                store.delete_handle(handle.id)
                if handle.in_map(swept):
                    work.changes.remove(handle.address)
    if accounts_unused_days is not None:
        for account in store.unused_accounts(now - accounts_unused_days * 86400):
            removed.append(account.address)
            if not dry_run:
                store.delete_account(account.id)
    if removed and not dry_run:
        log.info("pruned %d never-used or long-expired handles and accounts", len(removed))
        log.debug("pruned: %s", ", ".join(removed))
    return removed


# How a field's JSON value becomes what an operation receives: rule(value, config, now) ->
# value, or BadRequest saying why (the gate names the field). The value has the field's type.

def _as_is(value, config, now):
    return value


def _handle_address(value, config, now):
    return split_handle(value, config.domains)


def _target_address(value, config, now):
    return check_address(value)


def _label(value, config, now):
    return check_label(value)


def _served_domain(value, config, now):
    domain = value.strip().lstrip("@").lower()
    if domain and domain not in config.domains:
        raise BadRequest("domain %r is not served here; choose one of: %s"
                         % (value, ", ".join(config.domains)))
    return domain or None


def _expiry(value, config, now):
    return None if value.strip().lower() == "never" else parse_when(value, now)


def _message_limit(value, config, now):
    if not 1 <= value <= MAX_MESSAGES:
        raise BadRequest("max_messages must be a whole number from 1 to %d" % MAX_MESSAGES)
    if not config.policy_listen:
        raise BadRequest("a handle that closes after some messages needs the policy service, "
                         "which counts them: set [General] PolicyListen and add the policy "
                         "service to Postfix (see README.md)")
    return value


MAX_BULK = 100          # handles one bulk operation names
MAX_NEW_HANDLES = 10000     # handles one command line request makes
MAX_IMPORT = 1000           # handles one import request holds (the command line sends several)
ImportedHandle = collections.namedtuple("ImportedHandle", "address label enabled expires "
                                                          "max_messages")


def _imported(value, config, now):
    """Rows of an export (list --json, or its CSV): address, label, enabled, expires (ISO 8601
    or null) and max_messages; the rest is left out."""
    if not 1 <= len(value) <= MAX_IMPORT:
        raise BadRequest("handles must hold 1 to %d handles" % MAX_IMPORT)
    rows, seen = [], set()
    for number, row in enumerate(value, 1):
        try:
            if not isinstance(row, dict) or not isinstance(row.get("address"), str):
                raise BadRequest("it has no address")
            local, domain = split_handle(row["address"], config.domains)
            if len(local) < MIN_HANDLE_LENGTH:
                raise BadRequest("%s is not a handle: handles have %d characters or more"
                                 % (row["address"], MIN_HANDLE_LENGTH))
            if (local, domain) in seen:
                raise BadRequest("%s@%s is in the import twice" % (local, domain))
            seen.add((local, domain))
            expires = row.get("expires")
            if expires is not None and not isinstance(expires, str):
                raise BadRequest("expires is not a time or null")
            limit = row.get("max_messages")
            if limit is not None:
                if not isinstance(limit, int) or isinstance(limit, bool):
                    raise BadRequest("max_messages is not a whole number")
                limit = _message_limit(limit, config, now)
            rows.append(ImportedHandle("%s@%s" % (local, domain), check_label(row.get("label")),
                                       row.get("enabled", True) is not False,
                                       None if expires in (None, "") else from_iso_time(expires),
                                       limit))
        except (IncognitoMailError, ValueError, TypeError) as e:
            raise BadRequest("handle %d of the import: %s" % (number, e))
    return rows


def _handle_numbers(value, config, now):
    if not 1 <= len(value) <= MAX_BULK or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_TIME for n in value):
        raise BadRequest("handle_ids must be a list of 1 to %d handle ids" % MAX_BULK)
    return list(dict.fromkeys(value))


def _one_order(value, config, now):
    if value not in HANDLE_ORDERS:
        raise BadRequest("order must be one of: %s" % ", ".join(HANDLE_ORDERS))
    return value


def _from(low, what, high=MAX_TIME):
    def rule(value, config, now):
        if not low <= value <= high:
            raise BadRequest(what)
        return value
    return rule


# ``nullable``: null means "none" (no label, never, no limit); otherwise null is refused.
Field = collections.namedtuple("Field", "name kind required rule nullable",
                               defaults=(False, _as_is, True))


def check_fields(operation, message, config, now):
    """The operation's fields from ``message`` (a dict of JSON values), each of its declared
    type and passed through its rule; BadRequest naming the field otherwise.

    A required field must be present and not null; an optional one may be null (None), which
    its operation reads as "none"; one left out is left to the operation's default.
    """
    fields = {}
    for field in operation.fields:
        value = message.get(field.name)
        if field.name not in message or (value is None and field.nullable
                                         and not field.required):
            if field.required:
                raise BadRequest("%s needs %r" % (operation.name, field.name), field.name)
            if field.name in message:
                fields[field.name] = None
            continue
        if (not isinstance(value, field.kind)
                or (isinstance(value, bool) and field.kind is not bool)):
            raise BadRequest("%r has the wrong type" % field.name, field.name)
        if field.kind is int and not -MAX_TIME <= value <= MAX_TIME:
            raise BadRequest("%r is out of range" % field.name, field.name)
        if isinstance(value, str):
            try:
                # JSON may carry lone surrogates ("\ud800"), which are not text
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest("%r is not valid Unicode text" % field.name, field.name) from None
        try:
            fields[field.name] = field.rule(value, config, now)
        except BadRequest as e:
            e.field = field.name
            raise
    return fields


# How the command line shows a result (a JSON value): show(value, fields) -> (what --json
# prints, the text printed instead (None: nothing), a note for standard error or None).

def handle_line(handle):
    """address, state, received N, last TIME, created TIME, then how it ends and its label."""
    fields = [handle["address"], handle["state"], "received %d" % handle["received"],
              "last %s" % (handle["last_received"] or "never"), "created %s" % handle["created"]]
    if handle["blocked"]:
        fields.append("blocked %d" % handle["blocked"])
    if handle["expires"]:
        fields.append(describe_expiry(from_iso_time(handle["expires"]), time.time()))
    if handle["max_messages"]:
        fields.append("%d of %d messages" % (handle["received"], handle["max_messages"]))
    return "\t".join(fields + [handle["label"] or ""]).rstrip("\t")


def _show_token(note):
    return lambda token, fields: ({"token": token}, token, note)


def _show_handles(handles, fields):
    return (handles, "\n".join(handle_line(h) for h in handles) or None,
            None if handles else "this account has no handles yet")


def _show_removed(removed, fields):
    done = "would remove" if fields.get("dry_run") else "removed"
    return removed, "\n".join(removed) or None, "%s %d handles and accounts" % (done, len(removed))


def _show_deleted_account(count, fields):
    return {"deleted_handles": count}, None, "deleted the account and its %d handles" % count


def _show_status(status, fields):
    text = ("running (pid %d), version %s\naccounts %d, handles %d (%d enabled)\nmap %s, "
            "domains %s" % (status["pid"], status["version"], status["accounts"],
                            status["handles"], status["enabled_handles"], status["map"],
                            ", ".join(status["domains"])))
    return dict(status, running=True), text, None


# Who calls: the command line (over the control socket), the WebSocket's JSON protocol, the
# HTTP API (and the owner page through it).
COMMAND_LINE, WEBSOCKET, HTTP = "command line", "WebSocket", "HTTP"
EVERYONE = (COMMAND_LINE, WEBSOCKET, HTTP)


class Operation(collections.namedtuple("Operation", "name run fields reply callers reads "
                                                    "limited show")):
    """One thing a front end may ask for: ``run`` (a function of a Work, then the fields), its
    request ``fields`` (name, JSON type, required, rule), the ``reply`` field its result is
    sent in (None: the result's own fields, or nothing), the front ends that may call it,
    whether it only ``reads`` (answered beside the writes), whether it counts against the
    new-handle rate limits (``limited``), and how the command line shows its result."""
    __slots__ = ()


_TOKEN = Field("token", str, True)
_HANDLE = (Field("address", str, rule=_handle_address), Field("handle_id", int))
_LABEL = Field("label", str, rule=_label)
_HANDLE_IDS = Field("handle_ids", list, True, _handle_numbers)
_LIFETIME = (Field("expires", str, rule=_expiry), Field("max_messages", int, rule=_message_limit))
_PAGE_SIZE = _from(1, "limit must be from 1 to %d" % MAX_PAGE_SIZE, MAX_PAGE_SIZE)
_DAYS = _from(0, "days must be 0 or more")
_SHOW_HANDLE = lambda handle, fields: (handle, handle["address"], None)       # noqa: E731
_SHOW_NOTHING = lambda value, fields: (value, None, None)                     # noqa: E731

OPERATIONS = {operation.name: operation for operation in (
    Operation("new_account", _new_account, (Field("address", str, True, _target_address),),
              "token", (COMMAND_LINE,), False, False,
              _show_token("This is the account's secret token: keep it like a password.")),
    Operation("new_handles", _new_handles,
              (_TOKEN, Field("count", int, True, _from(1, "count must be from 1 to %d"
                                                       % MAX_NEW_HANDLES, MAX_NEW_HANDLES)),
               _LABEL, Field("domain", str, rule=_served_domain)) + _LIFETIME, "handles",
              (COMMAND_LINE,), False, False,
              lambda handles, fields: (handles, "\n".join(h["address"] for h in handles), None)),
    Operation("import_handles", _import_handles,
              (_TOKEN, Field("handles", list, True, _imported), Field("dry_run", bool)),
              "imported", (COMMAND_LINE,), False, False,
              lambda count, fields: ({"imported": count}, None, "imported %d handles" % count)),
    Operation("backup", _backup, (Field("path", str, True),), "backup", (COMMAND_LINE,), True,
              False, lambda backup, fields: (backup, None, "backed the database up to %s (%d "
                                                          "bytes)" % (backup["path"],
                                                                      backup["bytes"]))),
    Operation("new_handle", _new_handle,
              (_TOKEN, _LABEL, Field("domain", str, rule=_served_domain)) + _LIFETIME, "handle",
              EVERYONE, False, True, _SHOW_HANDLE),
    Operation("list_handles", _list_handles,
              (_TOKEN, Field("before", int), Field("limit", int, rule=_PAGE_SIZE, nullable=False)),
              None,
              (COMMAND_LINE, WEBSOCKET), True, False, _show_handles),
    Operation("find_handles", _find_handles,
              (_TOKEN, Field("search", str), Field("enabled", bool),
               Field("offset", int, rule=_from(0, "offset must be 0 or more"), nullable=False),
               Field("limit", int, rule=_PAGE_SIZE, nullable=False),
               Field("order", str, rule=_one_order, nullable=False)), "page", (WEBSOCKET, HTTP),
              True, False, _SHOW_NOTHING),
    Operation("get_handle", _get_handle, (_TOKEN,) + _HANDLE, "handle", (WEBSOCKET, HTTP), True,
              False, _SHOW_HANDLE),
    Operation("get_handles", _get_handles, (_TOKEN, _HANDLE_IDS), "handles", (WEBSOCKET, HTTP),
              True, False, _SHOW_NOTHING),
    Operation("update_handles", _update_handles,
              (_TOKEN, _HANDLE_IDS, Field("enabled", bool, True)), "handles", (WEBSOCKET, HTTP),
              False, False, _SHOW_NOTHING),
    Operation("delete_handles", _delete_handles, (_TOKEN, _HANDLE_IDS), "deleted",
              (WEBSOCKET, HTTP), False, False, _SHOW_NOTHING),
    Operation("update_handle", _update_handle,
              (_TOKEN,) + _HANDLE + (_LABEL, Field("enabled", bool, nullable=False))
              + _LIFETIME + (Field("refuse_as_unknown", bool),), "handle",
              EVERYONE, False, False,
              lambda handle, fields: (handle, handle_line(handle), None)),
    Operation("delete_handle", _delete_handle, (_TOKEN,) + _HANDLE, None, EVERYONE, False, False,
              lambda _, fields: ({}, None, "deleted %s" % fields["address"])),
    Operation("account", _account, (_TOKEN,), "account", EVERYONE, True, False, _SHOW_NOTHING),
    Operation("rotate_token", _rotate_token, (_TOKEN,), "token", (COMMAND_LINE, WEBSOCKET), False,
              False, _show_token("This is the account's new secret token; the old one no longer "
                                 "works.")),
    Operation("delete_account", _delete_account, (_TOKEN,), "deleted_handles", (COMMAND_LINE,),
              False, False, _show_deleted_account),
    Operation("status", _status, (), "status", (COMMAND_LINE,), True, False, _show_status),
    Operation("prune", _prune,
              (Field("handles_unused_days", int, rule=_DAYS),
               Field("accounts_unused_days", int, rule=_DAYS),
               Field("handles_expired_days", int, rule=_DAYS), Field("dry_run", bool)),
              "removed", (COMMAND_LINE,), False, False, _show_removed),
    Operation("stop", None, (), None, (COMMAND_LINE,), False, False, _SHOW_NOTHING),
)}


class TokenBucket:
    """Rate limits keyed by client or account: ``per_minute`` requests, bursting up to
    ``burst`` (as many as ``per_minute`` unless said).

    ``take(key)`` returns 0 when allowed, else the whole seconds to wait. ``per_minute = 0``
    turns the limit off. Full buckets are forgotten so memory stays bounded.
    """

    def __init__(self, per_minute, burst=None, clock=time.monotonic):
        self.per_minute, self.burst = per_minute, burst or per_minute
        self.clock = clock
        self._buckets = {}

    def take(self, key, peek=False):
        if not self.per_minute:
            return 0
        now = self.clock()
        tokens = self._level(key, now)
        if tokens < 1:
            self._keep(key, tokens, now)
            return max(1, int((1 - tokens) * 60.0 / self.per_minute + 0.999))
        self._keep(key, tokens if peek else tokens - 1, now)
        return 0

    def reserve(self, key):
        """Take a token now or in the future: the seconds until it is there (0: now). The
        bucket goes into debt for the requests waiting, so each waits once, in turn."""
        if not self.per_minute:
            return 0
        now = self.clock()
        tokens = self._level(key, now) - 1
        self._keep(key, tokens, now)
        return max(0.0, -tokens * 60.0 / self.per_minute)

    def give_back(self, key):
        """Return one token taken in advance for a request that turned out not to count."""
        if self.per_minute and key in self._buckets:
            now = self.clock()
            self._buckets[key] = (min(self.burst, self._level(key, now) + 1), now)

    def _level(self, key, now):
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.per_minute / 60.0)

    def _keep(self, key, tokens, now):
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100000:         # full buckets are as good as none
            for key in list(self._buckets):
                if self._level(key, now) >= self.burst:
                    del self._buckets[key]


KNOWN_TOKENS = 10000        # digests of tokens seen right lately, not charged in advance
# What one account (or, without a token, one client) may ask of the Service over the network:
# operations a second, in bursts of up to twice as many; beyond, its requests wait. Every
# answer costs the whole process time (Python runs one thread at a time), so without such a
# budget one owner reading hard would slow the answers to everyone else.
OPERATIONS_PER_SECOND = 50


class Gate:
    """The one way in: every front end asks here, never the Service directly.

    ``check`` says whether the caller may ask for the operation and turns its fields into
    checked values; ``run`` then applies the limits of a network client and hands the
    operation to the Service in the client's or account's turn. ``on_stop`` is what the
    ``stop`` operation does (the daemon's).
    """

    def __init__(self, config, service, clock=time.time):
        self.config, self.service, self.clock = config, service, clock
        self.on_stop = None
        self._creation_per_client = TokenBucket(config.handles_per_minute_per_client)
        self._creation_per_account = TokenBucket(config.handles_per_minute_per_account)
        self._failures_per_client = TokenBucket(config.failed_tokens_per_minute_per_client)
        self._budget = TokenBucket(60 * OPERATIONS_PER_SECOND, 2 * OPERATIONS_PER_SECOND)
        self._known_tokens = collections.OrderedDict()  # digest -> its account id, or None
        self._checking = {}             # digest of a token not known yet -> done once checked

    def check(self, caller, name, fields):
        """(the Operation, its checked fields) when ``caller`` may ask for ``name``; BadRequest
        naming the fault otherwise. ``fields`` holds JSON values; names it does not know are
        ignored."""
        operation = OPERATIONS.get(name) if isinstance(name, str) else None
        if operation is None or caller not in operation.callers:
            known = [n for n, op in OPERATIONS.items() if caller in op.callers]
            raise BadRequest("unknown op %r; known here: %s" % (name, ", ".join(known)))
        return operation, check_fields(operation, fields, self.config, self.clock())

    def submit(self, operation, fields, key=None):
        """Hand checked ``fields`` to the Service (a concurrent Future of the result), in the
        turn of ``key``."""
        if operation.run is None:
            future = concurrent.futures.Future()
            future.set_result(self.on_stop())
            return future
        queue_for = self.service.read if operation.reads else self.service.write
        return queue_for(operation.run, fields, key)

    async def run(self, caller, client, name, fields):
        """Run one operation for a front end. Network clients (``client``: their address) meet
        the rate limits first; the local command line (client None) has none, and a turn of
        its own."""
        if client is None:
            operation, fields = self.check(caller, name, fields)
            return await asyncio.wrap_future(self.submit(operation, fields, COMMAND_LINE))
        try:
            operation, fields = self.check(caller, name, fields)
        except (BadRequest, NotFound) as e:
            token = fields.get("token")
            if isinstance(token, str) and getattr(e, "field", None) != "token":
                # told only to the account's owner: the token first
                await self._limited(OPERATIONS["account"], {"token": token}, client)
            raise
        return await self._limited(operation, fields, client)

    async def _limited(self, operation, fields, client):
        """A token the gate has not seen right lately is counted as wrong before it is checked,
        and given back when it was right, so that a burst of guesses meets the limit at once;
        requests with that same token wait for the first one's answer rather than count too."""
        failures = self._failures_per_client
        self._refuse_if_limited(failures.take(client, peek=True), client)
        token = fields.get("token")
        digest = token_digest(token) if token is not None else None
        while digest in self._checking:     # the same new token is being checked: wait for it
            await asyncio.shield(self._checking[digest])
        charged = digest not in self._known_tokens
        if charged:
            self._refuse_if_limited(failures.take(client), client)
            self._checking[digest] = asyncio.get_running_loop().create_future()
        try:
            if operation.limited:
                await self._take_creation(client, digest, token)
            wait = self._budget.reserve(digest or client)
            if wait:
                await asyncio.sleep(wait)
            result = await asyncio.wrap_future(self.submit(operation, fields, digest or client))
        except Unauthorized:
            self._known_tokens.pop(digest, None)
            if not charged:
                failures.take(client)
            raise
        except BaseException:
            if charged:
                failures.give_back(client)
            raise
        finally:
            if charged:
                self._checking.pop(digest).set_result(None)
        if charged:
            failures.give_back(client)
        if digest is not None:
            self._known_tokens[digest] = self._known_tokens.get(digest)
            self._known_tokens.move_to_end(digest)
            if len(self._known_tokens) > KNOWN_TOKENS:
                self._known_tokens.popitem(last=False)
        return result

    @staticmethod
    def _refuse_if_limited(wait, client):
        if wait:
            raise RateLimited("too many wrong secret tokens from %s; retry in %d s"
                              % (client, wait), wait)

    async def _take_creation(self, client, digest, token):
        """A new handle meets the client's limit, then its account's (whatever the client)."""
        wait = self._creation_per_client.take(client)
        if not wait:
            account_id = self._known_tokens.get(digest)
            if account_id is None:
                account_id = await asyncio.wrap_future(
                    self.service.read(_account_id, {"token": token}, digest))
                self._known_tokens[digest] = account_id
            wait = self._creation_per_account.take(account_id)
        if wait:
            raise RateLimited("rate limited: too many new handles; retry in %d s" % wait, wait)


###############################################################################
# Wire formats: JSON requests (control socket and WebSocket)
###############################################################################

JsonRequest = collections.namedtuple("JsonRequest", "id op fields")


def _refuse_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def parse_json_request(text):
    """One JSON request -> JsonRequest; BadRequest otherwise.

    Request: ``{"id": any, "op": name, "token": secret, ...}``; the gate checks the rest.
    """
    try:
        message = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        problem = e if isinstance(e, ValueError) else "nested too deeply"
        raise BadRequest("not valid JSON: %s" % problem)
    if not isinstance(message, dict):
        raise BadRequest("a request must be a JSON object")
    return JsonRequest(message.get("id"), message.get("op"), message)


def handle_json(handle, now):
    """A handle as the JSON protocols and ``list --json`` show it. ``enabled`` is the owner's
    switch; ``state`` says whether mail is delivered (enabled, disabled, expired, used up)."""
    return {"address": handle.address, "label": handle.label, "enabled": bool(handle.enabled),
            "created": iso_time(handle.created), "received": handle.received,
            "last_received": iso_time(handle.last_received), "id": handle.number,
            "state": handle.state(now), "expires": iso_time(handle.expires),
            "max_messages": handle.max_messages, "blocked": handle.blocked,
            "last_blocked": iso_time(handle.last_blocked), "bounced": handle.bounced,
            "last_bounced": iso_time(handle.last_bounced), "sent": handle.sent,
            "last_sent": iso_time(handle.last_sent),
            "refuse_as_unknown": None if handle.refuse_as_unknown is None
            else bool(handle.refuse_as_unknown)}


def json_value(result, now=None):
    """The Service's result objects as plain JSON values (states as at ``now``)."""
    now = time.time() if now is None else now
    if isinstance(result, Handle):
        return handle_json(result, now)
    if isinstance(result, HandlePage):
        return {"handles": [handle_json(h, now) for h in result.handles], "total": result.total,
                "offset": result.offset, "limit": result.limit}
    if isinstance(result, HandleList):
        return {"handles": [handle_json(h, now) for h in result.handles], "next": result.next}
    if isinstance(result, AccountSummary):
        return {"address": result.address, "domains": list(result.domains),
                "handles": result.handles, "created": iso_time(result.created), "id": result.id,
                "received": result.received, "blocked": result.blocked,
                "bounced": result.bounced, "sent": result.sent}
    if isinstance(result, list):
        return [json_value(item, now) for item in result]
    return result


def json_reply(request_id, operation, result, now=None):
    reply = {"id": request_id, "ok": True}
    value = json_value(result, now)
    if operation.reply:
        reply[operation.reply] = value
    elif isinstance(value, dict):
        reply.update(value)
    return json.dumps(reply)


def json_error(request_id, error):
    reply = {"id": request_id, "ok": False, "error": error.code, "message": str(error)}
    if isinstance(error, RateLimited):
        reply["retry_after"] = error.retry_after
    return json.dumps(reply)


###############################################################################
# Wire formats: Postfix policy delegation and socketmap
###############################################################################

class _Buffer:
    """Bytes received and not parsed yet; a parser takes whole units from the front."""
    __slots__ = ("data",)

    def __init__(self):
        self.data = bytearray()

    def __len__(self):
        return len(self.data)

    def feed(self, data):
        self.data += data

    def take(self, n):
        chunk = bytes(self.data[:n])
        del self.data[:n]   # cheap: a bytearray drops leading bytes by moving its start
        return chunk

    def take_until(self, delimiter, limit, too_long):
        """The bytes before ``delimiter`` (both taken), None until it arrives; ``too_long()``
        is raised as soon as more than ``limit`` bytes stand before it."""
        end = self.data.find(delimiter, 0, limit + len(delimiter))
        if end < 0:
            if len(self.data) > limit:
                raise too_long()
            return None
        unit = self.take(end)
        del self.data[:len(delimiter)]
        return unit


class _PullParser:
    """What Postfix's protocols' parsers share: ``feed`` adds bytes, ``next_request`` gives
    the next complete request or None, ``incomplete`` says whether bytes of one wait."""

    def __init__(self):
        self._buffer = _Buffer()

    @property
    def incomplete(self):
        return bool(self._buffer)

    def feed(self, data):
        self._buffer.feed(data)


class PolicyParser(_PullParser):
    """SMTPD_POLICY_README: ``name=value`` lines, a request ends with an empty line.

    ``feed`` adds bytes; ``next_request`` returns the next complete request as a dict, or None
    until one is complete. Oversized requests, lines without ``=`` and non-UTF-8 bytes raise
    PostfixProtocolError.
    """
    MAX_REQUEST = 16384

    def next_request(self):
        block = self._buffer.take_until(b"\n\n", self.MAX_REQUEST, lambda: PostfixProtocolError(
            "policy request longer than %d bytes" % self.MAX_REQUEST))
        if block is None:
            return None
        request = {}
        for line in block.split(b"\n"):
            name, sep, value = line.partition(b"=")
            if not sep or not name:
                raise PostfixProtocolError("policy request line without name=value: %r"
                                           % line[:80])
            try:
                request[name.decode("ascii")] = value.decode("utf-8")
            except UnicodeDecodeError:
                raise PostfixProtocolError("policy request is not text: %r" % line[:80])
        return request


def policy_response(action):
    return ("action=%s\n\n" % action).encode("utf-8")


class NetstringParser(_PullParser):
    """Netstrings (``12:hello world!,``) as socketmap_table(5) uses them."""
    MAX_LENGTH = 100000

    def __init__(self):
        super().__init__()
        self._length = None     # of the netstring whose digits are read, until it is complete

    @property
    def incomplete(self):
        return bool(self._buffer) or self._length is not None

    def next_request(self):
        """The next complete netstring's bytes, or None until it is complete."""
        if self._length is None:
            digits = self._buffer.take_until(b":", 6, lambda: PostfixProtocolError(
                "netstring length too long"))
            if digits is None:
                return None
            if not digits.isdigit() or int(digits) > self.MAX_LENGTH:
                raise PostfixProtocolError("bad netstring length %r" % digits[:12])
            self._length = int(digits)
        if len(self._buffer) < self._length + 1:
            return None
        string = self._buffer.take(self._length)
        if self._buffer.take(1) != b",":
            raise PostfixProtocolError("netstring not terminated by a comma")
        self._length = None
        return string


def netstring(data):
    return b"%d:%s," % (len(data), data)


###############################################################################
# Wire formats: the milter protocol (version 6, as Postfix speaks it)
###############################################################################

# Sendmail's libmilter (mfdef.h, mfapi.h) defines the protocol; Postfix's MILTER_README says
# which part it speaks. A packet is a 4-byte big-endian length, then a command byte and its
# payload; strings end with NUL.
MILTER_VERSION = 6
MAX_MILTER_PACKET = 1 << 20     # a header may be 100 KB (header_size_limit); no body is asked for

# Commands from Postfix
SMFIC_OPTNEG, SMFIC_MACRO, SMFIC_CONNECT, SMFIC_HELO = b"O", b"D", b"C", b"H"
SMFIC_MAIL, SMFIC_RCPT, SMFIC_DATA, SMFIC_HEADER, SMFIC_EOH = b"M", b"R", b"T", b"L", b"N"
SMFIC_BODY, SMFIC_BODYEOB, SMFIC_ABORT, SMFIC_QUIT, SMFIC_UNKNOWN = b"B", b"E", b"A", b"Q", b"U"
# Replies, and the changes a milter may ask for at the end of a message
SMFIR_CONTINUE, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_REPLYCODE = b"c", b"r", b"t", b"y"
SMFIR_CHGHEADER, SMFIR_INSHEADER, SMFIR_CHGFROM = b"m", b"i", b"e"
SMFIR_ADDRCPT, SMFIR_DELRCPT = b"+", b"-"
# What this milter may change (actions) ...
SMFIF_ADDHDRS, SMFIF_ADDRCPT, SMFIF_DELRCPT, SMFIF_CHGHDRS, SMFIF_CHGFROM = 0x01, 0x04, 0x08, \
    0x10, 0x40
MILTER_ACTIONS = SMFIF_ADDHDRS | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS | SMFIF_CHGFROM
# ... what it need not be told (protocol steps) ...
SMFIP_NOHELO, SMFIP_NOBODY, SMFIP_NOEOH, SMFIP_NOUNKNOWN = 0x02, 0x10, 0x40, 0x100
# ... and the commands it need not answer, as it always lets them continue: Postfix then writes
# a message's envelope at once and its headers at once, not a command per answer. Postfix writes
# without TCP_NODELAY, so its next write after one left unanswered would wait for the milter's
# delayed ACK (40 ms on Linux): PostfixConnection acknowledges at once each read it does not
# answer.
SMFIP_NR_HDR, SMFIP_NR_CONN, SMFIP_NR_MAIL, SMFIP_NR_DATA = 0x80, 0x1000, 0x4000, 0x10000
MILTER_NO_REPLY = {SMFIC_CONNECT: SMFIP_NR_CONN, SMFIC_MAIL: SMFIP_NR_MAIL,
                   SMFIC_DATA: SMFIP_NR_DATA, SMFIC_HEADER: SMFIP_NR_HDR}
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)     # Linux's; elsewhere all are answered
MILTER_STEPS = SMFIP_NOHELO | SMFIP_NOBODY | SMFIP_NOEOH | SMFIP_NOUNKNOWN | \
    (SMFIP_NR_HDR | SMFIP_NR_CONN | SMFIP_NR_MAIL | SMFIP_NR_DATA if _TCP_QUICKACK else 0)
# Commands answered with nothing: macros, an abort, quit
_UNANSWERED = frozenset((SMFIC_MACRO, SMFIC_ABORT, SMFIC_QUIT))

MilterCommand = collections.namedtuple("MilterCommand", "code args")


class MilterParser(_PullParser):
    """Postfix's milter commands from its bytes: ``feed``, then ``next_request`` returns the next
    MilterCommand, or None until one is complete. ``args``: for OPTNEG (version, actions, steps),
    MACRO (stage, {name: value}), CONNECT (host, family, port, address), HEADER (name, value),
    MAIL and RCPT the strings (address first), otherwise (). Text is decoded as UTF-8, with what
    is not UTF-8 kept as surrogates. A packet over MAX_MILTER_PACKET or one that does not parse
    raises PostfixProtocolError."""

    def next_request(self):
        data = self._buffer.data
        if len(data) < 4:
            return None
        length = int.from_bytes(data[:4], "big")
        if not 1 <= length <= MAX_MILTER_PACKET:
            raise PostfixProtocolError("milter packet of %d bytes" % length)
        if len(data) < 4 + length:
            return None
        packet = self._buffer.take(4 + length)
        code, payload = packet[4:5], packet[5:]
        try:
            return MilterCommand(code, self._arguments(code, payload))
        except (ValueError, IndexError, struct.error):
            raise PostfixProtocolError("malformed milter %r packet" % code) from None

    @staticmethod
    def _arguments(code, payload):
        if code == SMFIC_OPTNEG:
            return struct.unpack("!III", payload[:12])
        strings = [s.decode("utf-8", "surrogateescape") for s in payload.split(b"\0")]
        if code == SMFIC_CONNECT and payload.endswith(b"\0U"):   # a client of unknown family
            return payload[:-2].decode("utf-8", "replace"), "U", 0, ""
        if code in (SMFIC_CONNECT, SMFIC_HEADER, SMFIC_MAIL, SMFIC_RCPT) and \
                payload[-1:] != b"\0":
            raise ValueError("strings must end with NUL")
        if code == SMFIC_MACRO:
            if len(payload) == 1:
                return payload.decode("ascii"), {}
            names = [strings[0][1:]] + strings[1:-1]
            return strings[0][:1], dict(zip(names[0::2], names[1::2]))
        if code == SMFIC_CONNECT:
            host, rest = payload.split(b"\0", 1)
            family = rest[:1].decode("ascii")
            if len(rest) > 3:
                port = int.from_bytes(rest[1:3], "big")
                return host.decode("utf-8", "replace"), family, port, rest[3:-1].decode("ascii")
            return host.decode("utf-8", "replace"), family, 0, ""
        if code == SMFIC_HEADER:
            return strings[0], "\0".join(strings[1:-1])
        if code in (SMFIC_MAIL, SMFIC_RCPT, SMFIC_HELO):
            return tuple(strings[:-1])
        return ()


def milter_packet(code, payload=b""):
    return struct.pack("!I", len(payload) + 1) + code + payload


def milter_negotiation(version=MILTER_VERSION, steps=MILTER_STEPS):
    """The answer to Postfix's OPTNEG: the version, MILTER_ACTIONS and the steps (those of
    MILTER_STEPS that Postfix offered)."""
    return milter_packet(SMFIC_OPTNEG, struct.pack("!III", version, MILTER_ACTIONS, steps))


def milter_reply(text):
    """A reply Postfix sends as it is (``452 4.5.3 ...``); ``%`` is doubled, as libmilter does."""
    return milter_packet(SMFIR_REPLYCODE, text.replace("%", "%%").encode("utf-8") + b"\0")


def milter_strings(code, *strings, index=None):
    """A change request carrying NUL-terminated strings, after a header index if given."""
    head = b"" if index is None else struct.pack("!I", index)
    return milter_packet(code, head + b"".join(
        s.encode("utf-8", "surrogateescape") + b"\0" for s in strings))


###############################################################################
# Wire formats: HTTP/1.1 requests and responses, and the WebSocket handshake
###############################################################################

_WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
_HTTP_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"               # RFC 7230 section 3.2.6
_REQUEST_LINE = re.compile(r"(%s) ([\x21-\x7e]+) HTTP/(\d)\.(\d)" % _HTTP_TOKEN)
_HEADER_NAME = re.compile(_HTTP_TOKEN)
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")    # linear: no backtracking on hostile input


class HttpRequest(collections.namedtuple("HttpRequest", "method target path query version "
                                                        "headers body")):
    """A parsed HTTP request. ``headers`` maps lower-cased names to values; a repeated field's
    values are joined with ", " (RFC 7230 section 3.2.2). ``query`` maps each name in the
    query string to its first value."""
    __slots__ = ()


def parse_request(head):
    """Parse a request line and header fields, ``head`` ending with the blank line (CRLF CRLF)."""
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(400, "header section must end with CRLF CRLF")
    lines = head[:-4].decode("latin-1").split("\r\n")   # latin-1: any byte decodes, none is lost
    start = _REQUEST_LINE.fullmatch(lines[0])
    if start is None:
        raise HttpError(400, "malformed request line")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise HttpError(400, "malformed header line")
        name = name.lower()
        if name == "host" and name in headers:
            raise HttpError(400, "more than one Host header")   # RFC 7230 section 5.4
        headers[name] = headers[name] + ", " + value if name in headers else value
    method, target, major, minor = start.groups()
    if (major, minor) not in (("1", "0"), ("1", "1")):
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are spoken here")
    path, _, query = target.partition("?")
    values = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        values.setdefault(name, value)
    return HttpRequest(method, target, path, values, (int(major), int(minor)), headers, b"")


class HttpParser:
    """Requests from a client's bytes: a head of at most ``max_header_bytes``, then a body by
    Content-Length of at most ``max_body_bytes``.

    ``feed`` adds bytes; ``next_request`` returns the next complete request or None, so the
    caller decides when to parse on (one request at a time, answers in order). What stays in
    memory is at most one head and one body beyond the bytes fed. Raises HttpError with the
    status to answer: 431 for a long head, 413 for a long body, 411 for a chunked body.
    """
    __slots__ = ("max_header_bytes", "max_body_bytes", "_buffer", "_request", "_length")

    def __init__(self, max_header_bytes=8192, max_body_bytes=65536):
        self.max_header_bytes, self.max_body_bytes = max_header_bytes, max_body_bytes
        self._buffer = _Buffer()
        self._request = None        # the head of a request whose body is not complete yet
        self._length = 0

    def feed(self, data):
        self._buffer.feed(data)

    @property
    def buffered(self):
        return len(self._buffer)

    def take_rest(self):
        """The bytes after the last request, when the connection stops speaking HTTP."""
        return self._buffer.take(len(self._buffer))

    def next_request(self):
        if self._request is None:
            while self._buffer.data[:2] == b"\r\n":     # RFC 7230 section 3.5
                self._buffer.take(2)
            head = self._buffer.take_until(
                b"\r\n\r\n", self.max_header_bytes - 4,
                lambda: HttpError(431, "request header section too large"))
            if head is None:
                return None
            request = parse_request(head + b"\r\n\r\n")
            try:
                self._length = self._body_length(request.headers)
            except HttpError as e:
                e.request = request     # whoever answers may still read its headers
                raise
            self._request = request
        if len(self._buffer) < self._length:
            return None
        request, self._request = self._request._replace(body=self._buffer.take(self._length)), None
        return request

    def _body_length(self, headers):
        if "transfer-encoding" in headers:
            raise HttpError(411, "send the body with a Content-Length, not chunked")
        length = headers.get("content-length", "0")
        if not _is_number(length) or len(set(v.strip() for v in length.split(","))) > 1:
            raise HttpError(400, "malformed Content-Length")
        if int(length) > self.max_body_bytes:
            raise HttpError(413, "request body larger than %d bytes" % self.max_body_bytes)
        return int(length)


def http_response(status, headers=(), body=b"", close=False, head_only=False):
    """A whole HTTP/1.1 response; ``head_only`` for HEAD (the length of the body it lacks)."""
    lines = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase)]
    lines += ["%s: %s" % (name, value) for name, value in headers]
    if status not in (204, 304):
        lines.append("Content-Length: %d" % len(body))
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status in (204, 304) else head + body


def error_response(status, reason, headers=()):
    """A whole HTTP error response with a short text/plain body; the connection closes after it."""
    return http_response(status, [("Content-Type", "text/plain; charset=utf-8")] + list(headers),
                         (reason + "\n").encode("utf-8"), close=True)


def _tokens(value):
    """The lower-cased items of a comma-separated header value."""
    return [item.strip().lower() for item in (value or "").split(",")]


def is_upgrade(request):
    """Does the request ask to become a WebSocket (whatever else may be wrong with it)?"""
    return "websocket" in _tokens(request.headers.get("upgrade"))


def origin_allowed(request, allowed_origins, scheme="http"):
    """Any Origin when ``allowed_origins`` is empty, else one of them (ignoring case), or the
    listener's own: a page it served itself, the Origin naming ``scheme`` and the Host."""
    origin = request.headers.get("origin", "").lower()
    if not allowed_origins or origin in {o.lower() for o in allowed_origins}:
        return True
    try:
        parts = urllib.parse.urlsplit(origin)
    except ValueError:      # "http://[" and the like
        return False
    return bool(origin) and (parts.scheme, parts.netloc) == (
        scheme, request.headers.get("host", "").lower())


def check_upgrade(request, path, allowed_origins=(), scheme="http"):
    """Validate a WebSocket upgrade request for ``path``; return its Sec-WebSocket-Key.

    Raises HttpError with the status to answer. An empty ``allowed_origins`` allows any Origin;
    otherwise the Origin header must be present and equal (ignoring case) to one of them.
    """
    if request.path != path:
        raise HttpError(404, "no WebSocket endpoint at this path")
    if request.method != "GET":
        raise HttpError(400, "WebSocket upgrade needs GET")
    if request.version[0] != 1 or request.version[1] < 1:
        raise HttpError(400, "WebSocket upgrade needs HTTP/1.1")
    headers = request.headers
    if not headers.get("host"):
        raise HttpError(400, "missing Host header")
    if not is_upgrade(request) or "upgrade" not in _tokens(headers.get("connection")):
        raise HttpError(426, "this endpoint only speaks WebSocket", [("Upgrade", "websocket")])
    key = headers.get("sec-websocket-key", "")
    try:
        key_ok = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:   # binascii.Error, or non-ASCII text
        key_ok = False
    if not key_ok:
        raise HttpError(400, "missing or malformed Sec-WebSocket-Key")
    if headers.get("sec-websocket-version") != "13":
        raise HttpError(426, "unsupported WebSocket version", [("Sec-WebSocket-Version", "13")])
    if not origin_allowed(request, allowed_origins, scheme):
        raise HttpError(403, "origin not allowed")
    return key


def accept_response(key):
    """The 101 Switching Protocols response that completes the handshake for ``key``."""
    accept = base64.b64encode(hashlib.sha1((key + _WEBSOCKET_GUID).encode("ascii")).digest())
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n\r\n" % accept.decode("ascii")).encode("ascii")


###############################################################################
# Wire formats: RFC 6455 frames
###############################################################################

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_LENGTH_BYTES = {126: 2, 127: 8}   # 7-bit length values announcing an extended length

# Close codes (RFC 6455 section 7.4.1) this server sends.
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001             # idle timeout, server stopping
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007           # text that is not UTF-8
CLOSE_TOO_BIG = 1009                # a message over max_message_size


class WebSocketMessage(collections.namedtuple("WebSocketMessage", "is_text data")):
    """A complete data message; text is already decoded."""
    __slots__ = ()


class WebSocketPing(collections.namedtuple("WebSocketPing", "payload")):
    """A ping; the connection answers it with a pong carrying the same payload."""
    __slots__ = ()


class WebSocketPong(collections.namedtuple("WebSocketPong", "payload")):
    """A pong (unsolicited ones are allowed by RFC 6455 and ignored)."""
    __slots__ = ()


class WebSocketClose(collections.namedtuple("WebSocketClose", "code reason")):
    """The peer's close frame; ``code`` is None when it carried no payload."""
    __slots__ = ()


def is_valid_close_code(code):
    """Whether a peer may send ``code`` in a close frame (RFC 6455 section 7.4). The codes
    registered with IANA since (1012-1014) are not accepted."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


def _unmask(data, mask, offset=0):
    """XOR ``data`` with the repeated 4-byte ``mask``, starting at mask byte ``offset % 4``.

    One big-integer XOR over the whole buffer runs at C speed; a per-byte Python loop would
    cost about a microsecond per byte.
    """
    if not data:
        return b""
    shift = offset % 4
    key = (mask[shift:] + mask[:shift]) * (len(data) // 4 + 1)
    xored = int.from_bytes(data, "little") ^ int.from_bytes(key[:len(data)], "little")
    return xored.to_bytes(len(data), "little")


def _parse_close(payload):
    if not payload:
        return WebSocketClose(None, "")
    if len(payload) == 1:
        raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "close frame payload of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, "invalid close code %d" % code)
    try:
        return WebSocketClose(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        raise WebSocketProtocolError(CLOSE_INVALID_DATA, "close reason is not UTF-8") from None


class FrameParser:
    """Turns bytes from a client into events, enforcing RFC 6455 as early as the bytes allow.

    ``feed`` adds bytes; ``next_event`` returns the next event or None when more bytes are
    needed, so the caller decides when to parse on. It raises WebSocketProtocolError at the
    offending frame, after returning the events before it. Payload bytes are consumed as they
    are parsed: text is UTF-8-checked incrementally, so an invalid sequence fails before the
    rest of its frame is read, and the size limit is checked from the frame header, before
    any of the payload is buffered. What stays in memory beyond the bytes fed is at most the
    current message (<= max_message_size). After a close frame, further bytes are ignored.
    """
    __slots__ = ("max_message_size", "closed", "_buffer", "_mask", "_fin", "_frame_opcode",
                 "_remaining", "_offset", "_opcode", "_decoder", "_parts", "_size")

    def __init__(self, max_message_size):
        self.max_message_size = max_message_size
        self.closed = False
        self._buffer = _Buffer()
        # the frame being read: its mask is set from the end of its header to the end of its payload
        self._mask = None
        self._fin = False
        self._frame_opcode = OP_CONT
        self._remaining = 0     # payload bytes not yet consumed
        self._offset = 0        # payload bytes consumed (the mask's phase)
        # the message being assembled: its opcode is set from its first frame to its last
        self._opcode = None
        self._decoder = None    # an incremental UTF-8 decoder, for text messages only
        self._parts = []
        self._size = 0          # payload bytes announced so far

    def feed(self, data):
        if not self.closed:
            self._buffer.feed(data)

    @property
    def buffered(self):
        return len(self._buffer)

    def next_event(self):
        buffer = self._buffer
        while not self.closed:
            if self._mask is None and not self._read_header():
                return None
            if self._frame_opcode >= OP_CLOSE:   # control frame: at most 125 bytes, wait for all
                if len(buffer) < self._remaining:
                    return None
                payload = _unmask(buffer.take(self._remaining), self._mask)
                self._mask = None
                return self._control_event(self._frame_opcode, payload)
            n = min(self._remaining, len(buffer))
            if n:
                self._add_payload(_unmask(buffer.take(n), self._mask, self._offset))
                self._offset += n
                self._remaining -= n
            if self._remaining:
                return None
            self._mask = None
            if self._fin:
                return self._end_message()
        return None

    def _read_header(self):
        """Parse the next frame header if complete; each rule is checked once its bytes are in."""
        buf = self._buffer.data
        if len(buf) < 2:
            return False
        fin, rsv, opcode = buf[0] & 0x80, buf[0] & 0x70, buf[0] & 0x0F
        masked, length = buf[1] & 0x80, buf[1] & 0x7F
        fail = lambda reason: WebSocketProtocolError(CLOSE_PROTOCOL_ERROR, reason)
        if rsv:
            raise fail("reserved bits set but no extension negotiated")
        if opcode not in _OPCODES:
            raise fail("unknown opcode %d" % opcode)
        if not masked:
            raise fail("client frame is not masked")
        if opcode >= OP_CLOSE:
            if not fin:
                raise fail("fragmented control frame")
            if length > 125:
                raise fail("control frame payload over 125 bytes")
        elif opcode == OP_CONT and self._opcode is None:
            raise fail("continuation frame without a message in progress")
        elif opcode != OP_CONT and self._opcode is not None:
            raise fail("new message before the previous one was finished")
        start = 2 + _LENGTH_BYTES.get(length, 0)
        if len(buf) < start:
            return False
        if start > 2:
            length = int.from_bytes(buf[2:start], "big")
            if length >> 63:
                raise fail("frame length has its most significant bit set")
        if opcode < OP_CLOSE and self._size + length > self.max_message_size:
            raise WebSocketProtocolError(CLOSE_TOO_BIG, "message larger than %d bytes"
                                         % self.max_message_size)
        if len(buf) < start + 4:
            return False
        self._mask = bytes(buf[start:start + 4])
        del buf[:start + 4]
        self._fin, self._frame_opcode, self._remaining, self._offset = bool(fin), opcode, length, 0
        if opcode in (OP_TEXT, OP_BINARY):
            self._opcode = opcode
            self._decoder = codecs.getincrementaldecoder("utf-8")() if opcode == OP_TEXT else None
        if opcode < OP_CLOSE:
            self._size += length
        return True

    def _add_payload(self, chunk):
        if self._decoder is None:
            self._parts.append(chunk)
            return
        try:
            self._parts.append(self._decoder.decode(chunk))
        except UnicodeDecodeError:
            raise WebSocketProtocolError(CLOSE_INVALID_DATA,
                                         "invalid UTF-8 in text message") from None
        # CPython's decoder rejects every impossible prefix at once except a surrogate's
        # (ED A0..BF), which it only rejects when the third byte arrives: check that one here.
        pending = self._decoder.getstate()[0]
        if len(pending) > 1 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise WebSocketProtocolError(CLOSE_INVALID_DATA, "invalid UTF-8 in text message "
                                         "(surrogate)")

    def _end_message(self):
        if self._decoder is not None:
            try:
                self._parts.append(self._decoder.decode(b"", final=True))
            except UnicodeDecodeError:
                raise WebSocketProtocolError(CLOSE_INVALID_DATA, "text message ends inside a "
                                             "UTF-8 sequence") from None
            message = WebSocketMessage(True, "".join(self._parts))
        else:
            message = WebSocketMessage(False, b"".join(self._parts))
        self._opcode, self._decoder, self._parts, self._size = None, None, [], 0
        return message

    def _control_event(self, opcode, payload):
        if opcode == OP_PING:
            return WebSocketPing(payload)
        if opcode == OP_PONG:
            return WebSocketPong(payload)
        event = _parse_close(payload)
        self.closed = True
        self._buffer.take(len(self._buffer))
        return event


def encode_frame(opcode, payload, fin=True):
    """A complete unmasked (server-to-client) frame."""
    first, n = (0x80 if fin else 0) | opcode, len(payload)
    if n < 126:
        head = struct.pack("!BB", first, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


def encode_message(message):
    """A text frame for str, a binary frame for bytes-like."""
    if isinstance(message, str):
        return encode_frame(OP_TEXT, message.encode("utf-8"))
    if isinstance(message, (bytes, bytearray, memoryview)):
        return encode_frame(OP_BINARY, bytes(message))
    raise TypeError("WebSocket messages are str or bytes, not %s" % type(message).__name__)


def encode_close(code, reason=""):
    """A close frame; the reason is cut (on a character boundary) to fit in 125 bytes."""
    data = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + data)


###############################################################################
# Wire formats: the HTTP API, in addy.io's and SimpleLogin's dialects
###############################################################################

# Password managers (Bitwarden's "forwarded email alias" generator) and the addy.io browser
# extension speak these two services' APIs with a self-hosted server URL; each route turns a
# request into one of OPERATIONS and its result into what that service would answer.
ADDY, SIMPLELOGIN = "addy.io", "SimpleLogin"
SIMPLELOGIN_PAGE_SIZE = 20

ApiCall = collections.namedtuple("ApiCall", "op fields then")        # run op, then(result)
ApiSite = collections.namedtuple("ApiSite", "domains now")            # what a route may know
ApiReply = collections.namedtuple("ApiReply", "status body headers")  # body: a JSON value or None


def _reply(status, body=None, headers=()):
    return ApiReply(status, body, tuple(headers))


def _addy_time(timestamp):
    """addy.io's times: ``2026-01-01 12:00:00``, UTC."""
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S")


def addy_alias(handle, now):
    """A handle as addy.io shows an alias, and what addy.io lacks: how it ends
    (``expires_at``, ``max_messages``, ``state``) and its bounces (``emails_bounced``,
    ``last_bounced``). The owner's messages through it count as replies."""
    return {"id": handle.number, "user_id": handle.account_id, "local_part": handle.local,
            "extension": None, "domain": handle.domain, "email": handle.address,
            "active": bool(handle.enabled), "pinned": False, "description": handle.label,
            "from_name": None, "emails_forwarded": handle.received,
            "emails_blocked": handle.blocked, "emails_replied": handle.sent, "emails_sent": 0,
            "recipients": [], "last_forwarded": _addy_time(handle.last_received),
            "last_blocked": _addy_time(handle.last_blocked),
            "last_replied": _addy_time(handle.last_sent),
            "last_sent": None, "created_at": _addy_time(handle.created),
            "updated_at": _addy_time(handle.updated), "deleted_at": None,
            "expires_at": _addy_time(handle.expires), "max_messages": handle.max_messages,
            "state": handle.state(now), "emails_bounced": handle.bounced,
            "last_bounced": _addy_time(handle.last_bounced),
            "refuse_as_unknown": None if handle.refuse_as_unknown is None
            else bool(handle.refuse_as_unknown)}


def simplelogin_alias(handle, now):
    """A handle as SimpleLogin shows an alias, and how it ends and its bounces (``nb_bounce``),
    as in addy_alias."""
    mailbox = {"id": handle.account_id, "email": handle.target}
    return {"alias": handle.address, "id": handle.number, "email": handle.address,
            "creation_date": datetime.datetime.fromtimestamp(
                int(handle.created), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S+00:00"),
            "creation_timestamp": int(handle.created), "enabled": bool(handle.enabled),
            "note": handle.label, "name": None, "nb_forward": handle.received,
            "nb_block": handle.blocked,
            "nb_reply": handle.sent, "nb_bounce": handle.bounced, "mailbox": mailbox,
            "mailboxes": [mailbox], "pinned": False,
            "latest_activity": None, "support_pgp": False, "disable_pgp": False,
            "expires_at": _addy_time(handle.expires), "max_messages": handle.max_messages,
            "state": handle.state(now)}


def _json_body(request, dialect, required=True):
    """The request's JSON object body ({} when there is none and none is required)."""
    if not request.body.strip():
        if required:
            raise BadRequest("send a JSON object as the request body")
        return {}
    try:
        body = json.loads(request.body.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _text_field(body, name):
    """An optional text field of a JSON body that the dialect reads itself: a string, or
    null/absent (None). Fields handed on as they are, the gate checks."""
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest("%s must be text" % name, name)
    return value


def _handle_id(text):
    """A handle's id in a URL: a positive whole number, else no such handle (404)."""
    if not _is_number(text) or len(text) > 18:
        raise NotFound("no such alias")
    return int(text)


# addy.io's sort values, and the order of handles each means here
_ADDY_SORTS = {"-created_at": "newest", "created_at": "oldest",
               "-last_forwarded": "last_received", "-emails_forwarded": "received",
               "-emails_blocked": "blocked", "-last_blocked": "last_blocked"}


def _addy_page(request):
    """``page[number]``, ``page[size]`` (at most 100), ``filter[active]``, ``filter[search]``."""
    def number(name, default, high):
        text = request.query.get(name, str(default))
        if not _is_number(text) or not 1 <= int(text) <= high:
            raise BadRequest("%s must be a whole number from 1 to %d" % (name, high), name)
        return int(text)
    size = number("page[size]", 50, MAX_PAGE_SIZE)
    page = number("page[number]", 1, 1 << 31)
    active = request.query.get("filter[active]")
    if active not in (None, "true", "false"):
        raise BadRequest("filter[active] must be true or false", "filter[active]")
    sort = request.query.get("sort", "-created_at")
    if sort not in _ADDY_SORTS:
        raise BadRequest("sort must be one of: %s" % ", ".join(_ADDY_SORTS), "sort")
    return {"search": request.query.get("filter[search]") or None,
            "enabled": None if active is None else active == "true",
            "offset": (page - 1) * size, "limit": size, "order": _ADDY_SORTS[sort]}


def _addy_list(request, token, match, site):
    def listed(page):
        last = max(1, -(-page.total // page.limit))
        current = page.offset // page.limit + 1
        path = request.path
        kept = [(name, value) for name, value in request.query.items()
                if name not in ("page[number]", "page[size]")]    # the filters and the order

        def link(number):
            return None if number < 1 or number > last else "%s?%s" % (path, urllib.parse.urlencode(
                [("page[number]", number), ("page[size]", page.limit)] + kept, safe="[]"))
        first = page.offset + 1 if page.handles else None
        return _reply(200, {
            "data": [addy_alias(h, site.now) for h in page.handles],
            "links": {"first": link(1), "last": link(last), "prev": link(current - 1),
                      "next": link(current + 1)},
            "meta": {"current_page": current, "from": first, "last_page": last, "path": path,
                     "per_page": page.limit, "total": page.total,
                     "to": page.offset + len(page.handles) if first else None}})
    return ApiCall("find_handles", dict(_addy_page(request), token=token), listed)


# addy.io's names for the fields of new_handle and update_handle, and IncognitoMail's own
# (``expires_at``: a time, null: never; ``max_messages``, null: no limit)
_ADDY_FIELDS = {"description": "label", "expires_at": "expires", "max_messages": "max_messages",
                "refuse_as_unknown": "refuse_as_unknown"}


def _addy_fields(body):
    return {ours: body[theirs] for theirs, ours in _ADDY_FIELDS.items() if theirs in body}


def _addy_new(request, token, match, site):
    body = _json_body(request, ADDY)
    domain = _text_field(body, "domain")
    if domain is None or domain.strip().lstrip("@").lower() not in site.domains:
        raise BadRequest("the domain must be one of the domains served here: %s"
                         % ", ".join(site.domains), "domain")
    if body.get("format") == "custom" or body.get("local_part"):
        raise BadRequest("handles here are random: leave out local_part and use a format other "
                         "than custom", "local_part")
    if body.get("format") is not None and not isinstance(body.get("format"), str):
        raise BadRequest("format must be text", "format")
    if not isinstance(body.get("recipient_ids", []), (list, type(None))):
        raise BadRequest("recipient_ids must be a list", "recipient_ids")
    fields = dict(_addy_fields(body), token=token, domain=domain)
    return ApiCall("new_handle", fields,
                   lambda handle: _reply(201, {"data": addy_alias(handle, site.now)}))


def _addy_get(request, token, match, site):
    return ApiCall("get_handle", {"token": token, "handle_id": _handle_id(match["id"])},
                   lambda handle: _reply(200, {"data": addy_alias(handle, site.now)}))


def _addy_update(request, token, match, site):
    body = _json_body(request, ADDY)
    fields = dict(_addy_fields(body), token=token, handle_id=_handle_id(match["id"]))
    return ApiCall("update_handle", fields,
                   lambda handle: _reply(200, {"data": addy_alias(handle, site.now)}))


def _addy_delete(request, token, match, site):
    return ApiCall("delete_handle", {"token": token, "handle_id": _handle_id(match["id"])},
                   lambda _: _reply(204))


def _addy_activate(request, token, match, site):
    handle_id = _json_body(request, ADDY).get("id")
    if isinstance(handle_id, str):
        handle_id = _handle_id(handle_id)
    if not isinstance(handle_id, int) or isinstance(handle_id, bool):
        raise BadRequest("id must be the alias's id", "id")
    return ApiCall("update_handle", {"token": token, "handle_id": handle_id, "enabled": True},
                   lambda handle: _reply(200, {"data": addy_alias(handle, site.now)}))


def _addy_deactivate(request, token, match, site):
    return ApiCall("update_handle", {"token": token, "handle_id": _handle_id(match["id"]),
                                     "enabled": False}, lambda _: _reply(204))


def _bulk_ids(request):
    """addy.io's bulk ``{"ids": [...]}``: ids as numbers or as text (pyaddy sends text)."""
    ids = _json_body(request, ADDY).get("ids")
    if not isinstance(ids, list) or not ids or \
            not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
        raise BadRequest("ids must be a list of alias ids", "ids")
    return [_handle_id(i) if isinstance(i, str) else i for i in ids]


def _addy_bulk(op, fields, done):
    """A bulk route: ``done`` says what happened (``activated``...); nothing found is a 404."""
    def route(request, token, match, site):
        def answer(result):
            ids = [h.number if isinstance(h, Handle) else h for h in result]
            if not ids:
                return _reply(404, {"message": "No aliases found"})
            if op == "get_handles":
                return _reply(200, {"data": [addy_alias(h, site.now) for h in result]})
            return _reply(200, {"message": "%d alias%s %s successfully" % (
                len(ids), "" if len(ids) == 1 else "es", done), "ids": ids})
        return ApiCall(op, dict(fields, token=token, handle_ids=_bulk_ids(request)), answer)
    return route


def _addy_forget(request, token, match, site):
    """Deleted handles are gone for good here: forgetting one is deleting it."""
    return _addy_delete(request, token, match, site)


def _addy_restore(request, token, match, site):
    """Deleted handles are gone for good here: nothing is there to restore (addy.io's own
    answer when it finds none)."""
    raise NotFound("No aliases found")


def _addy_account(show):
    def route(request, token, match, site):
        return ApiCall("account", {"token": token}, lambda account: _reply(200, show(account)))
    return route


def _addy_domain_options(account):
    return {"data": list(account.domains), "sharedDomains": [],
            "defaultAliasDomain": account.domains[0], "defaultAliasFormat": "random_characters"}


def _addy_account_details(account):
    return {"data": {"id": account.id, "username": account.address,
                     "default_alias_domain": account.domains[0],
                     "default_alias_format": "random_characters", "total_aliases": account.handles,
                     "total_emails_forwarded": account.received,
                     "total_emails_blocked": account.blocked,
                     "total_emails_replied": account.sent, "total_emails_sent": 0,
                     "total_emails_bounced": account.bounced,
                     "created_at": _addy_time(account.created),
                     "updated_at": _addy_time(account.created)}}


def _addy_token_details(account):
    return {"name": "IncognitoMail", "created_at": _addy_time(account.created), "expires_at": None}


def _addy_recipients(account):
    return {"data": [{"id": account.id, "user_id": account.id, "email": account.address,
                      "can_reply_send": False, "should_encrypt": False, "fingerprint": None,
                      "email_verified_at": _addy_time(account.created),
                      "aliases_count": account.handles, "created_at": _addy_time(account.created),
                      "updated_at": _addy_time(account.created)}]}


def _simplelogin_new(request, token, match, site):
    # Bitwarden sends the hostname unencoded: a whole URL may hold "?" and "&" of its own
    whole = re.fullmatch(r"hostname=(.*?)(&mode=(uuid|word))?", request.target.partition("?")[2])
    query = {"hostname": urllib.parse.unquote(whole.group(1)), "mode": whole.group(3)} \
        if whole else request.query
    if query.get("mode") not in (None, "uuid", "word"):
        raise BadRequest("mode must be uuid or word")
    note = _text_field(_json_body(request, SIMPLELOGIN, required=False), "note")
    hostname = query.get("hostname") or None
    label = note if note else hostname[:MAX_LABEL_LENGTH] if hostname else None
    return ApiCall("new_handle", {"token": token, "label": label},
                   lambda handle: _reply(201, simplelogin_alias(handle, site.now)))


def _simplelogin_list(request, token, match, site):
    """``page_id``, and as SimpleLogin reads them: a filter is on when its name is in the
    query, whatever its value (``pinned`` first, then ``disabled``, then ``enabled``), and the
    ``query`` comes in a JSON body, with GET as with POST."""
    page = request.query.get("page_id", "")
    if not _is_number(page) or len(page) > 9:
        raise BadRequest("page_id must be given, a whole number from 0")
    search = _text_field(_json_body(request, SIMPLELOGIN, required=False), "query")
    fields = {"token": token, "search": search or None, "offset": int(page) * SIMPLELOGIN_PAGE_SIZE,
              "limit": SIMPLELOGIN_PAGE_SIZE}
    if "pinned" in request.query:        # no handle is pinned here
        return ApiCall("account", {"token": token}, lambda _: _reply(200, {"aliases": []}))
    if "disabled" in request.query or "enabled" in request.query:
        fields["enabled"] = "disabled" not in request.query
    return ApiCall("find_handles", fields, lambda found: _reply(
        200, {"aliases": [simplelogin_alias(h, site.now) for h in found.handles]}))


def _simplelogin_options(request, token, match, site):
    """Handles here are random: no suffix for a prefix of the owner's choosing."""
    return ApiCall("account", {"token": token}, lambda _: _reply(
        200, {"can_create": True, "suffixes": [], "prefix_suggestion": ""}))


def _simplelogin_custom(request, token, match, site):
    raise BadRequest("this server makes random aliases only: use POST /api/alias/random/new")


def _simplelogin_get(request, token, match, site):
    return ApiCall("get_handle", {"token": token, "handle_id": _handle_id(match["id"])},
                   lambda handle: _reply(200, simplelogin_alias(handle, site.now)))


def _simplelogin_delete(request, token, match, site):
    return ApiCall("delete_handle", {"token": token, "handle_id": _handle_id(match["id"])},
                   lambda _: _reply(200, {"deleted": True}))


def _simplelogin_toggle(request, token, match, site):
    fields = {"token": token, "handle_id": _handle_id(match["id"])}
    return ApiCall("get_handle", fields, lambda handle: ApiCall(
        "update_handle", dict(fields, enabled=not handle.enabled),
        lambda toggled: _reply(200, {"enabled": bool(toggled.enabled)})))


def _simplelogin_user(request, token, match, site):
    return ApiCall("account", {"token": token}, lambda account: _reply(200, {
        "name": account.address, "email": account.address, "is_premium": True,
        "in_trial": False, "profile_picture_url": None, "max_alias_free_plan": None}))


def _simplelogin_mailboxes(request, token, match, site):
    return ApiCall("account", {"token": token}, lambda account: _reply(200, {"mailboxes": [{
        "id": account.id, "email": account.address, "verified": True, "default": True,
        "creation_timestamp": int(account.created), "nb_alias": account.handles}]}))


# (path, dialect, {method: route}); a route takes (request, token, path match, ApiSite); {id}
# in a path is any one segment.
API_ROUTES = tuple((re.compile(path.replace("{id}", r"(?P<id>[^/]+)")), dialect, methods, path)
                   for path, dialect, methods in (
    ("/api/v1/aliases", ADDY, {"GET": _addy_list, "POST": _addy_new}),
    ("/api/v1/aliases/get/bulk", ADDY, {"POST": _addy_bulk("get_handles", {}, "found")}),
    ("/api/v1/aliases/activate/bulk", ADDY, {"POST": _addy_bulk("update_handles",
                                                                {"enabled": True}, "activated")}),
    ("/api/v1/aliases/deactivate/bulk", ADDY, {"POST": _addy_bulk(
        "update_handles", {"enabled": False}, "deactivated")}),
    ("/api/v1/aliases/delete/bulk", ADDY, {"POST": _addy_bulk("delete_handles", {}, "deleted")}),
    ("/api/v1/aliases/forget/bulk", ADDY, {"POST": _addy_bulk("delete_handles", {},
                                                              "forgotten")}),
    ("/api/v1/aliases/restore/bulk", ADDY, {"POST": _addy_restore}),
    ("/api/v1/aliases/{id}", ADDY, {"GET": _addy_get, "PATCH": _addy_update,
                                    "DELETE": _addy_delete}),
    ("/api/v1/aliases/{id}/restore", ADDY, {"PATCH": _addy_restore}),
    ("/api/v1/aliases/{id}/forget", ADDY, {"DELETE": _addy_forget}),
    ("/api/v1/active-aliases", ADDY, {"POST": _addy_activate}),
    ("/api/v1/active-aliases/{id}", ADDY, {"DELETE": _addy_deactivate}),
    ("/api/v1/domain-options", ADDY, {"GET": _addy_account(_addy_domain_options)}),
    ("/api/v1/account-details", ADDY, {"GET": _addy_account(_addy_account_details)}),
    ("/api/v1/api-token-details", ADDY, {"GET": _addy_account(_addy_token_details)}),
    ("/api/v1/recipients", ADDY, {"GET": _addy_account(_addy_recipients)}),
    ("/api/alias/random/new", SIMPLELOGIN, {"POST": _simplelogin_new}),
    ("/api/v2/aliases", SIMPLELOGIN, {"GET": _simplelogin_list, "POST": _simplelogin_list}),
    ("/api/aliases/{id}", SIMPLELOGIN, {"GET": _simplelogin_get, "DELETE": _simplelogin_delete}),
    ("/api/aliases/{id}/toggle", SIMPLELOGIN, {"POST": _simplelogin_toggle}),
    ("/api/user_info", SIMPLELOGIN, {"GET": _simplelogin_user}),
    ("/api/mailboxes", SIMPLELOGIN, {"GET": _simplelogin_mailboxes}),
    ("/api/v2/mailboxes", SIMPLELOGIN, {"GET": _simplelogin_mailboxes}),
    ("/api/v4/alias/options", SIMPLELOGIN, {"GET": _simplelogin_options}),
    ("/api/v5/alias/options", SIMPLELOGIN, {"GET": _simplelogin_options}),
    ("/api/v2/alias/custom/new", SIMPLELOGIN, {"POST": _simplelogin_custom}),
    ("/api/v3/alias/custom/new", SIMPLELOGIN, {"POST": _simplelogin_custom}),
))

CORS_HEADERS = (("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS"),
                ("Access-Control-Allow-Headers", "Authorization, Authentication, Content-Type, "
                                                 "Accept, X-Requested-With, X-Requested-From"),
                ("Access-Control-Max-Age", "86400"))


def api_error(dialect, error):
    """An error as the dialect's clients read it: ``{"error"}`` (SimpleLogin) or
    ``{"message"}`` and, for 422, ``errors`` (addy.io). Bitwarden shows the text."""
    status = {Unauthorized: 401, NotFound: 404, RateLimited: 429}.get(type(error))
    headers = ()
    if isinstance(error, RateLimited):
        headers = (("Retry-After", str(error.retry_after)),)
    text = str(error)
    if isinstance(error, Unauthorized):
        text = "the API token is not valid here: check it, or ask the server's admin for one"
    elif status is None and isinstance(error, BadRequest):
        status = 422 if dialect == ADDY else 400
    elif status is None:
        status, text = 500, "the server could not do it (%s); nothing was changed" % text
    if dialect == SIMPLELOGIN:
        return _reply(status, {"error": text}, headers)
    body = {"message": text}
    if status == 422:
        theirs = {ours: theirs for theirs, ours in _ADDY_FIELDS.items()}
        field = getattr(error, "field", None) or "request"
        body["errors"] = {theirs.get(field, "id" if field == "handle_id" else field): [text]}
    return _reply(status, body, headers)


def route_api(request, site):
    """The request's route: an ApiCall to run, or an ApiReply (an error, or 405 with Allow)."""
    # Bitwarden joins its base URL and the path as strings: "https://host/" gives "//api/...";
    # pyaddy makes aliases at "/api/v1/aliases/"
    path = re.sub("/{2,}", "/", request.path)
    request = request._replace(path=path.rstrip("/") or "/")
    for path, dialect, methods, _ in API_ROUTES:
        match = path.fullmatch(request.path)
        if match is None:
            continue
        method = "GET" if request.method == "HEAD" else request.method
        if method not in methods:
            allowed = sorted(set(methods) | {"OPTIONS"} | ({"HEAD"} if "GET" in methods else set()))
            text = "%s is not allowed here" % request.method
            return _reply(405, {"error": text} if dialect == SIMPLELOGIN else {"message": text},
                          (("Allow", ", ".join(allowed)),)), dialect
        auth = request.headers.get("authentication") or request.headers.get("authorization", "")
        token = auth[6:].strip() if auth[:6].lower() == "bearer" else auth.strip()
        if not token:
            return api_error(dialect, Unauthorized("no API token")), dialect
        try:
            return methods[method](request, token, match, site), dialect
        except IncognitoMailError as e:     # told only to the account's owner: the token first
            return ApiCall("account", {"token": token},
                           lambda _, error=e: api_error(dialect, error)), dialect
    text = "no API endpoint at %s; this server has %s" % (
        request.path[:100], ", ".join("%s %s" % ("|".join(sorted(methods)), path)
                                      for _, _, methods, path in API_ROUTES))
    return _reply(404, {"message": text, "error": text}), None


_HOST = re.compile(r"[A-Za-z0-9.\[\]:-]{1,255}")


def owner_page(request, config):
    """(headers, body) of the owner page (the last section's data): the listener's settings
    filled in, only its own script and style allowed, and connections only to its own origin
    (the WebSocket's too)."""
    host = request.headers.get("host", "")
    sockets = " ws://%s wss://%s" % (host, host) if _HOST.fullmatch(host) else ""
    body = OWNER_PAGE.replace("{{LISTEN_PATH}}", html.escape(config.listen_path)).replace(
        "{{DOMAINS}}", html.escape(",".join(config.domains))).replace(
        "{{LIFETIME}}", str(config.handle_lifetime or ""))
    return [("Content-Type", "text/html; charset=utf-8"),
            ("Content-Security-Policy", PAGE_POLICY % sockets),
            ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY")], body.encode("utf-8")


###############################################################################
# Fronts: shared pieces
###############################################################################

# Each front owns one family of listeners, their clients and their limits, and reaches the
# data only through the gate (web, control socket) or the Service's lookups and mail-flow
# entry (Postfix).

STOP_GRACE_SECONDS = 20     # how long a stop waits for requests in flight


def client_key(address):
    """The client a limit applies to: an IPv4 address, or the /64 an IPv6 address is in
    (one host usually holds a whole /64)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6 and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    if ip.version == 6:
        return str(ipaddress.ip_network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Quiet:
    """A log line said at most once per ``seconds``; the next one counts those held back."""

    def __init__(self, seconds):
        self.seconds, self._said, self._held = seconds, float("-inf"), 0

    def say(self, level, message, *args):
        if time.monotonic() - self._said < self.seconds:
            self._held += 1
            return
        if self._held:
            message += " (and %d times more since the last such line)" % self._held
        log.log(level, message, *args)
        self._said, self._held = time.monotonic(), 0


_shortage = _Quiet(60)


def descriptor_shortage(error):
    """Out of file descriptors: one line a minute, not one per retry of accept()."""
    _shortage.say(logging.ERROR, "out of file descriptors (%s): new connections are refused "
                  "until some close; raise the limit (ulimit -n) or lower [Limits] MaxConnections",
                  error)


def loop_exception(loop, context):
    """An event loop's exception handler: asyncio retries accept() every second when out of
    descriptors, and says so each time."""
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
        descriptor_shortage(error)
        return
    loop.default_exception_handler(context)


def _prepare_unix_socket_path(path, key, for_postfix):
    """Make ``path`` ready to bind: a folder of ours, no stale socket, nothing foreign replaced.

    A folder for Postfix's sockets is never created here: Postfix must be able to enter it,
    which only the admin can arrange."""
    folder = os.path.dirname(path)
    if for_postfix and not os.path.isdir(folder):
        raise ServerError("%s: the folder for %s does not exist; create it so that Postfix (group "
                          "postfix) may enter it and nobody else may write it: install -d -o root "
                          "-g postfix -m 0750 %s" % (folder, key, folder))
    _private_folder(folder, key)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise ServerError("%s (%s) exists and is not a socket; remove it or choose another path"
                          % (path, key))
    if existing.st_uid not in (os.geteuid(), 0):
        raise ServerError("%s (%s) is a socket owned by user %s; remove it or choose another path"
                          % (path, key, _user_name(existing.st_uid)))
    try:
        os.unlink(path)     # we hold the lock file, so no other server is using it: a crash left it
    except OSError as e:
        raise ServerError("%s (%s): cannot remove the socket a stopped server left: %s; "
                          "remove it as its owner (%s) or choose another path"
                          % (path, key, _os_reason(e), _user_name(existing.st_uid)))


class _Listener:
    """A listening socket whose connections ``accept(listener)`` takes, when they come."""

    def __init__(self, loop, sock, accept):
        self.loop, self.sock, self.accept = loop, sock, accept
        sock.setblocking(False)

    def start(self):
        self.loop.add_reader(self.sock.fileno(), self.accept, self)

    def pause(self, seconds):
        """Accept nothing for a while (out of descriptors: asyncio's own remedy)."""
        self.loop.remove_reader(self.sock.fileno())
        self.loop.call_later(seconds, self._resume)

    def _resume(self):
        if self.sock.fileno() >= 0:
            self.start()

    def close(self):
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def _start_unix_server(listen, path, key, mode):
    """``listen(path)`` (asyncio's start_unix_server or create_unix_server, its handler or
    protocol given) on a Unix socket created with ``mode``: by the umask, no chmod by name
    after. The command line's socket is 0600; Postfix's are 0666 in a folder only Postfix may
    enter."""
    _prepare_unix_socket_path(path, key, for_postfix=mode != 0o600)
    old_umask = os.umask(0o777 & ~mode)
    try:
        server = await listen(path)
    except OSError as e:
        raise ServerError("%s: cannot listen on %s: %s" % (key, path, _os_reason(e)))
    finally:
        os.umask(old_umask)
    return server


async def _start_listener(protocol, endpoint, key):
    """A Postfix-facing ``unix:/path`` or ``inet:host:port`` -> a started asyncio server whose
    connections are ``protocol()``."""
    loop = asyncio.get_running_loop()
    kind, _, rest = endpoint.partition(":")
    if kind == "unix":
        return await _start_unix_server(functools.partial(loop.create_unix_server, protocol),
                                        rest, key, 0o666)
    host, port = parse_host_port(rest)
    try:
        return await loop.create_server(protocol, host or None, port)
    except OSError as e:
        raise ServerError("%s: cannot listen on %s: %s" % (key, endpoint, _os_reason(e)))


async def answer_json(gate, text, caller, client):
    """One request of the JSON protocol (the control socket, the WebSocket) -> one JSON reply
    text; never raises."""
    request = JsonRequest(None, None, {})
    try:
        request = parse_json_request(text)
        result = await gate.run(caller, client, request.op, request.fields)
        return json_reply(request.id, OPERATIONS[request.op], result, gate.clock())
    except IncognitoMailError as e:
        return json_error(request.id, e)
    except Exception:
        log.exception("internal error answering a request")
        return json_error(request.id,
                          IncognitoMailError("internal error; the server log has details"))


def _close_server(server, endpoint=""):
    """Stop listening, and remove a Unix socket's file (``unix:PATH`` or a plain path)."""
    server.close()
    path = endpoint.removeprefix("unix:")
    if path and not endpoint.startswith("inet:"):
        try:
            os.unlink(path)
        except OSError:
            pass


class _Clients:
    """The open connections of one listener (stream writers, or protocols: anything with
    ``close()``), least recently active first."""

    def __init__(self, name, most):
        self.name, self.most = name, most
        self._writers = collections.OrderedDict()   # writer -> when it was last active
        self._evictions = _Quiet(60)

    def __len__(self):
        return len(self._writers)

    def add(self, writer):
        """Count ``writer`` in; when full, the least recently active connection makes room."""
        if len(self._writers) >= self.most:
            oldest, _ = self._writers.popitem(last=False)
            oldest.close()
            self._evictions.say(logging.WARNING, "%s: %d connections open; closed the least "
                                "recently active one", self.name, self.most)
        self._writers[writer] = time.monotonic()

    def active(self, writer):
        if writer in self._writers:
            self._writers[writer] = time.monotonic()
            self._writers.move_to_end(writer)

    def close_idle(self, seconds):
        """Close the connections that said nothing for ``seconds``, oldest first."""
        limit = time.monotonic() - seconds
        while self._writers:
            writer, last = next(iter(self._writers.items()))
            if last > limit:
                return
            del self._writers[writer]
            writer.close()

    def discard(self, writer):
        self._writers.pop(writer, None)

    def close_all(self):
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()


###############################################################################
# Fronts: HTTP and WebSocket connections over asyncio
###############################################################################

# how long a peer may read nothing while a reply waits, without an idle timeout
SEND_TIMEOUT = 30.0
MAX_PENDING = 16        # messages of one connection being answered: parsing stops there
READ_AHEAD_BYTES = 65536        # unparsed bytes held before reading from the peer stops
MAX_UNSENT_BYTES = 4 << 20      # replies a peer that stopped reading left: past this, dropped


class _PausingProtocol(asyncio.Protocol):
    """A connection that reads nothing from its peer while any of its reasons holds (replies
    the peer leaves unread, requests still being answered, bytes not parsed yet)."""
    __slots__ = ("transport", "_paused_by")

    def __init__(self):
        self.transport = None
        self._paused_by = set()

    def pause_reading(self, reason):
        """Read nothing more from the peer until ``resume_reading(reason)``."""
        if not self._paused_by and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume_reading(self, reason):
        self._paused_by.discard(reason)
        if not self._paused_by and not self.transport.is_closing():
            self.transport.resume_reading()


class WebSocketConnection(_PausingProtocol):
    """A server-side WebSocket on a bare asyncio Protocol: HTTP/1.1 until the opening
    handshake, then frames.

    No task, stream or coroutine waits while a connection is idle, so one costs about 2 KB
    (asyncio's streams cost 5.6 KB). Subclasses answer the hooks below, and may ``send`` from
    anywhere in the event loop. Everything a client can make the server hold is bounded,
    whatever it sends or fails to read:
    - unparsed bytes: reading stops above READ_AHEAD_BYTES (plus one read of at most 256 KiB);
    - a request head (``max_header_bytes``: 431) and body, or a message (``max_message_size``,
      checked from the frame header: close code 1009);
    - messages being answered: at most ``max_pending`` (a subclass's ``message_received``
      returns a future for each); past that, parsing and reading stop until one is answered;
    - replies it does not read: while they wait, nothing more is read or parsed; a peer that
      reads nothing for the idle timeout (SEND_TIMEOUT without one) is dropped, and so is one
      that has stopped reading with more than MAX_UNSENT_BYTES unread when another reply is due;
    - time: a request must be complete within ``handshake_timeout`` of the connection or of
      the previous answer, a WebSocket idle for ``idle_timeout`` is closed, and a peer that
      does not answer our close frame within ``close_timeout`` is cut off.
    """
    HTTP, OPEN, CLOSING, CLOSED = "http", "open", "closing", "closed"    # states, in this order
    __slots__ = ("remote_address", "state", "_path", "_allowed_origins", "_http", "_frames",
                 "_answering", "_pending", "_timer", "_last_heard", "_idle_timeout",
                 "_handshake_timeout", "_close_timeout", "_max_pending")

    def __init__(self, *, path, allowed_origins=(), max_message_size=65536, idle_timeout=300.0,
                 max_header_bytes=8192, handshake_timeout=10.0, close_timeout=3.0,
                 max_pending=MAX_PENDING):
        super().__init__()
        self.remote_address = None
        self.state = self.HTTP
        self._path, self._allowed_origins = path, allowed_origins
        self._http = HttpParser(max_header_bytes, max_message_size)
        self._frames = FrameParser(max_message_size)
        self._answering = False         # an HTTP request is being answered: parse no further
        self._pending = 0               # messages handed to message_received, not answered yet
        self._timer = None              # the one timer: request, idle, send or close deadline
        self._last_heard = 0.0
        self._idle_timeout, self._handshake_timeout = idle_timeout, handshake_timeout
        self._close_timeout, self._max_pending = close_timeout, max_pending

    # -- for subclasses ---------------------------------------------------------------------

    def opened(self, request):
        """The opening handshake (``request``) succeeded."""

    def message_received(self, message):
        """A text (str) or binary (bytes) message arrived. Return None, or a future that is
        done once it is answered: at most ``max_pending`` are parsed ahead."""

    def request_received(self, request):
        """A plain HTTP request (not for the WebSocket path). Return a future of the response
        bytes and whether to close after them; this one knows no other path."""
        future = asyncio.get_running_loop().create_future()
        future.set_result((error_response(404, "no WebSocket endpoint at this path"), True))
        return future

    def closed(self):
        """The connection is over (called once)."""

    def refusal(self, error, request):
        """The response refusing ``request`` (None: unreadable) with ``error``, an HttpError."""
        return error_response(error.status, error.reason, error.headers)

    def check_request(self, request):
        """Raise HttpError to refuse ``request`` (a handshake too) before it is answered."""

    def own_scheme(self, request):
        """The scheme of the listener's own pages, as the browser sees it (for the Origin)."""
        return "http"

    def send(self, message):
        """Queue a text (str) or binary (bytes) message; False if the connection is closing."""
        if self.state != self.OPEN or self.transport.is_closing():
            return False
        if ("writing" in self._paused_by
                and self.transport.get_write_buffer_size() > MAX_UNSENT_BYTES):
            self.drop()                 # the peer lets our replies pile up
            return False
        self.transport.write(encode_message(message))
        return True

    def close(self, code=CLOSE_NORMAL, reason=""):
        """Start the closing handshake; the transport closes when the peer answers, or soon."""
        if self.transport.is_closing() or self.state in (self.CLOSING, self.CLOSED):
            return
        if self.state == self.HTTP:
            self.transport.close()
            return
        self.state = self.CLOSING
        self.transport.write(encode_close(code, reason))
        self._set_timer(self._close_timeout, self.drop)

    def drop(self):
        """End the connection at once with a reset: whatever the peer left unread is thrown
        away, here and in the kernel (a plain close would keep sending it)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.remote_address = transport.get_extra_info("peername")
        self._set_timer(self._handshake_timeout, self.drop)

    def data_received(self, data):
        if self.state == self.HTTP:
            self._http.feed(data)
            self._parse_http()
        elif self.state in (self.OPEN, self.CLOSING) and not self._frames.closed:
            self._last_heard = asyncio.get_running_loop().time()
            self._frames.feed(data)
            self._parse_frames()

    def eof_received(self):
        return False                    # the peer hung up: close our side too

    def pause_writing(self):
        """The peer is not reading our replies: stop reading its requests, and give it time."""
        self.pause_reading("writing")
        if self.state != self.CLOSING:  # when closing, the close timeout already runs
            self._set_timer(self._idle_timeout or SEND_TIMEOUT, self.drop)

    def resume_writing(self):
        self.resume_reading("writing")
        self._restart_timer()
        if self.state == self.HTTP:
            self._parse_http()
        elif not self._frames.closed:
            self._parse_frames()

    def connection_lost(self, exc):
        self.state = self.CLOSED
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed()

    # -- inside ---------------------------------------------------------------------------------

    def _hold_back(self, buffered):
        """Stop reading while this many unparsed bytes wait; read again once they are parsed."""
        if buffered > READ_AHEAD_BYTES:
            self.pause_reading("buffer")
        else:
            self.resume_reading("buffer")

    def _parse_http(self):
        """Answer the requests that have arrived, one at a time, in order."""
        while (self.state == self.HTTP and not self._answering and "writing" not in self._paused_by
               and not self.transport.is_closing()):
            try:
                request = self._http.next_request()
            except HttpError as exc:
                self._answer_http((self.refusal(exc, getattr(exc, "request", None)), True))
                return
            if request is None:
                break
            try:
                self.check_request(request)
            except HttpError as exc:
                self._answer_http((self.refusal(exc, request), True))
                return
            if request.path == self._path or is_upgrade(request):
                self._upgrade(request)
            else:
                self._answering = True
                self._cancel_timer()
                self.request_received(request).add_done_callback(self._http_answered)
        self._hold_back(self._http.buffered)

    def _http_answered(self, future):
        self._answering = False
        if self.transport.is_closing():
            return
        if future.cancelled() or future.exception() is not None:
            self._answer_http((self.refusal(HttpError(500, "internal error"), None), True))
            return
        self._answer_http(future.result())
        self._parse_http()

    def _answer_http(self, answer):
        response, close = answer
        self.transport.write(response)
        if close:
            self.transport.close()
        else:
            self._set_timer(self._handshake_timeout, self.drop)

    def _upgrade(self, request):
        """The opening handshake: answer 101 (or an HTTP error, and close)."""
        try:
            key = check_upgrade(request, self._path, self._allowed_origins,
                                self.own_scheme(request))
        except HttpError as exc:
            self._answer_http((error_response(exc.status, exc.reason, exc.headers), True))
            return
        self.transport.write(accept_response(key))
        self.state = self.OPEN
        self._last_heard = asyncio.get_running_loop().time()
        self._restart_timer()
        self.opened(request)
        self._frames.feed(self._http.take_rest())
        self._parse_frames()

    def _parse_frames(self):
        """Act on the events that have arrived, until max_pending messages await answers."""
        frames = self._frames
        try:
            while (self._pending < self._max_pending and "writing" not in self._paused_by
                   and not self.transport.is_closing()):
                event = frames.next_event()
                if event is None:
                    break
                if isinstance(event, WebSocketMessage):
                    if self.state == self.OPEN:     # nothing is answered after our close frame
                        self._message(event.data)
                elif isinstance(event, WebSocketPing):
                    self.transport.write(encode_frame(OP_PONG, event.payload))
                elif isinstance(event, WebSocketClose):
                    if self.state == self.OPEN:
                        self.state = self.CLOSING
                        self.transport.write(encode_close(event.code or CLOSE_NORMAL))
                    self.transport.close()      # the server closes TCP first (RFC 6455 7.1.1)
                    return
        except WebSocketProtocolError as exc:
            self._fail(exc.close_code, exc.reason)
            return
        if self._pending >= self._max_pending:
            self.pause_reading("pending")
        else:
            self.resume_reading("pending")
        self._hold_back(frames.buffered)

    def _message(self, data):
        answered = self.message_received(data)
        if answered is not None:
            self._pending += 1
            answered.add_done_callback(self._message_answered)

    def _message_answered(self, future):
        self._pending -= 1
        if self.state in (self.OPEN, self.CLOSING) and not self._frames.closed:
            self._parse_frames()

    def _fail(self, code, reason):
        """A protocol error: close frame with its code, half-close, and stop parsing."""
        self._frames.closed = True      # the rest is noise
        if self.state == self.OPEN:
            self.state = self.CLOSING
            self.transport.write(encode_close(code, reason))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # so a peer we can no longer parse hangs up too
        self._set_timer(self._close_timeout, self.drop)

    def _set_timer(self, delay, callback):
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _cancel_timer(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _restart_timer(self):
        """After the peer read our replies: the deadline of the state we are in."""
        if self.state == self.OPEN and self._idle_timeout:
            self._set_timer(self._idle_timeout, self._idle_check)
        elif self.state == self.OPEN or (self.state == self.HTTP and self._answering):
            self._cancel_timer()
        elif self.state == self.HTTP:
            self._set_timer(self._handshake_timeout, self.drop)

    def _idle_check(self):
        """One timer per connection: re-armed for what is left, closing when the time is up."""
        left = self._last_heard + self._idle_timeout - asyncio.get_running_loop().time()
        if left > 0:
            self._set_timer(left, self._idle_check)
        else:
            self.close(CLOSE_GOING_AWAY, "idle timeout")


###############################################################################
# Fronts: the web listener (the add-on's WebSocket, the HTTP API, the owner page)
###############################################################################

TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_CONTROL_CLIENTS = 16
MAX_POSTFIX_CLIENTS = 200           # per policy or socketmap listener; the oldest makes room
# Descriptors kept back from the WebSocket/HTTP connections: the control socket's and the
# Postfix-facing clients, and a margin for listeners, the database, logging and postmap.
RESERVED_DESCRIPTORS = 64 + MAX_CONTROL_CLIENTS + 2 * MAX_POSTFIX_CLIENTS


_HTTP_METHOD = re.compile(rb"[A-Z]{3,7} ")


async def _peek(loop, sock, timeout):
    """The first bytes a client sent, left unread; asyncio.TimeoutError if it sends none."""
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(sock.fileno())
    return sock.recv(8, socket.MSG_PEEK)


def descriptor_budget(wanted, asked=True):
    """Raise the soft limit of open files towards the hard one; how many WebSocket/HTTP
    connections fit beside RESERVED_DESCRIPTORS: ``wanted`` ([Limits] MaxConnections, 0 for no
    limit of its own), or fewer, said once: as a warning when the admin ``asked`` for more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted + RESERVED_DESCRIPTORS)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    # with a very low limit, half of it is kept back
    budget = soft - min(RESERVED_DESCRIPTORS, soft // 2)
    if wanted and budget < wanted:
        log.log(logging.WARNING if asked else logging.INFO,
                "open-file limit %d leaves room for %d WebSocket/HTTP connections, fewer than "
                "[Limits] MaxConnections %d (%d descriptors are kept for the command line, "
                "Postfix and files); raise the limit (LimitNOFILE in the systemd unit, "
                "ulimit -n)", soft, budget, wanted, soft - budget)
    return min(budget, wanted) if wanted else budget


class _WebClient(WebSocketConnection):
    """One client of the web listener: the add-on's WebSocket, or HTTP requests.

    The front counts it when it accepts it, before any TLS handshake. ``counted_as`` is the
    peer's address (or its /64) for the connection limits; ``client`` the address the rate
    limits apply to, which a trusted proxy may name.
    """
    __slots__ = ("front", "peer", "counted_as", "client")

    def __init__(self, front, peer):
        config = front.config
        super().__init__(path=config.listen_path, allowed_origins=config.allowed_origins,
                         max_message_size=config.max_message_size,
                         idle_timeout=config.idle_timeout or None)
        self.front, self.peer = front, peer
        self.counted_as = self.client = client_key(peer)

    def check_request(self, request):
        self.front.check_request(self, request)

    def own_scheme(self, request):
        return self.front.scheme(self.peer, request.headers)

    def message_received(self, message):
        return self.front.answer_websocket(self, message)

    def request_received(self, request):
        return self.front.answer_http(self, request)

    def refusal(self, error, request):
        return self.front.http_refusal(error, request, self.peer)

    def closed(self):
        self.front.release(self)


class WebFront:
    """The web listener (ListenAddress): accepts and counts each connection before any TLS,
    keeps clients within the connection limits, and answers them through the gate."""

    def __init__(self, config, gate, clock=time.time, tls=None):
        self.config, self.gate, self.clock, self.tls = config, gate, clock, tls
        self._listeners = []
        self._requests = set()          # in-flight answers: finished before stopping
        self._clients = set()           # open _WebClient connections
        self._connections = {}          # client -> how many WebSocket/HTTP connections it has open
        self._max_connections = None    # in all (None: no limit)
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in config.trusted_proxies]

    def urls(self):
        """Where the owner page (and the API under it) and the add-on's WebSocket are."""
        address = self.config.listen_address
        if address.startswith(":"):
            address = "localhost" + address
        secure = "s" if self.tls else ""
        return ("http%s://%s/" % (secure, address),
                "ws%s://%s%s" % (secure, address, self.config.listen_path))

    def start(self, loop):
        """Listen on ListenAddress; connections are accepted (and counted) by ``_accept``."""
        self._max_connections = descriptor_budget(self.config.max_connections,
                                                  "max_connections" in self.config.given)
        host, port = parse_host_port(self.config.listen_address)
        try:
            for family, kind, proto, _, address in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                listener = socket.socket(family, kind, proto)
                self._listeners.append(_Listener(loop, listener, self._accept))
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                listener.bind(address)
                listener.listen(1024)
        except OSError as e:
            self.close()
            raise ServerError("cannot listen on [General] ListenAddress %s: %s"
                              % (self.config.listen_address, _os_reason(e)))
        for listener in self._listeners:
            listener.start()

    def close(self):
        """Listen no more."""
        for listener in self._listeners:
            listener.close()

    async def stop(self):
        """Listen no more, finish the answers in flight, then close every connection."""
        self.close()
        if self._requests:
            await asyncio.wait(set(self._requests), timeout=STOP_GRACE_SECONDS)
        for connection in list(self._clients):
            if connection.transport is not None:    # else in its TLS handshake, which times out
                connection.close(CLOSE_GOING_AWAY, "server stopping")
        for _ in range(100):        # each answers, or is cut off after its close timeout
            if not any(c.transport is not None for c in self._clients):
                break
            await asyncio.sleep(0.05)

    # -- accepting: counted and limited before anything is read -------------------------------

    def _accept(self, listener):
        """Accept what is waiting; each connection is counted and limited before anything is
        read from it, and a TLS handshake must end within TLS_HANDSHAKE_TIMEOUT."""
        for _ in range(100):
            try:
                sock, address = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    descriptor_shortage(e)
                    listener.pause(1.0)
                return
            sock.setblocking(False)
            client = _WebClient(self, address[0] if isinstance(address, tuple) else "unknown")
            if not self.admit(client):
                if self.tls is None:
                    try:
                        sock.send(self.http_refusal(HttpError(503, "too many connections; try "
                                                              "again", [("Retry-After", "10")])))
                    except OSError:
                        pass
                sock.close()
                continue
            asyncio.ensure_future(self._connect(client, sock))

    async def _connect(self, client, sock):
        tls = {"ssl": self.tls, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT} if self.tls else {}
        loop = asyncio.get_running_loop()
        try:
            if self.tls and _HTTP_METHOD.match(await _peek(loop, sock, TLS_HANDSHAKE_TIMEOUT)):
                # plain http:// to a TLS port: say so, instead of a failed handshake
                sock.send(self.http_refusal(HttpError(400, "this port speaks https:// and "
                                                           "wss:// (TLS) only")))
                try:
                    sock.recv(65536)    # read, so that the close is no reset that loses it
                except OSError:
                    pass
                raise ConnectionError("plain HTTP on the TLS port")
            await loop.connect_accepted_socket(lambda: client, sock, **tls)
        except (Exception, asyncio.CancelledError):     # a failed, slow or cancelled handshake
            sock.close()
            if client.transport is None:
                self.release(client)

    def admit(self, connection):
        """A new WebSocket/HTTP connection: within the connection limits, or refused (503).

        A trusted proxy speaks for many clients: its connection is counted for the client it
        forwards once a request names it (``check_request``); until then only the limit in
        total applies."""
        full = self._max_connections is not None and len(self._clients) >= self._max_connections
        if full or not (self._is_trusted(connection.peer) or self._has_room(connection.counted_as)):
            return False
        self._count(connection, connection.counted_as)
        self._clients.add(connection)
        return True

    def release(self, connection):
        if connection in self._clients:
            self._count(connection, None)
            self._clients.discard(connection)

    def _has_room(self, client):
        per_client = self.config.max_connections_per_client
        return not per_client or self._connections.get(client, 0) < per_client

    def _count(self, connection, client):
        """Count ``connection`` for ``client`` instead (None: for nobody any more)."""
        previous = connection.counted_as if connection in self._clients else None
        if previous is not None:
            self._connections[previous] -= 1
            if not self._connections[previous]:
                del self._connections[previous]
        if client is not None:
            self._connections[client] = self._connections.get(client, 0) + 1
            connection.counted_as = client

    def check_request(self, connection, request):
        """Before a request is answered: the listener answers only to its host names
        (ServerNames: a page elsewhere that resolves a name of its own to this server is
        refused), and a trusted proxy's connection counts for the client it forwards."""
        names = self.config.server_names
        host = request.headers.get("host", "").lower()
        if names and _host_name(host) not in names:
            raise HttpError(421, "this server does not answer to the host name %r; see "
                            "[General] ServerNames" % host[:100])
        connection.client = client = client_key(self.client_address(connection.peer,
                                                                    request.headers))
        if client != connection.counted_as:
            if not self._has_room(client):
                raise HttpError(503, "too many connections from %s; try again" % client,
                                [("Retry-After", "10")])
            self._count(connection, client)

    def scheme(self, peer, headers):
        """How the browser reached the listener: https with TLS, or through a trusted proxy
        that says so (X-Forwarded-Proto)."""
        if self.tls is not None:
            return "https"
        forwarded = headers.get("x-forwarded-proto", "").lower()
        return "https" if forwarded == "https" and self._is_trusted(peer) else "http"

    def _is_trusted(self, address):
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def client_address(self, peer, headers):
        """The client's address: the peer's, or, from a trusted proxy (TrustedProxies), the
        nearest address it forwarded (X-Forwarded-For, else X-Real-IP) that is not a proxy."""
        if not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in headers.get("x-forwarded-for", "").split(",")]
        for hop in reversed(hops):
            if not _is_ip(hop):
                break
            if not self._is_trusted(hop):
                return hop
        real = headers.get("x-real-ip", "").strip()
        return real if _is_ip(real) else peer

    # -- answering: through the gate ---------------------------------------------------------

    def _track(self, coroutine):
        """Run one answer as a task the stop waits for."""
        task = asyncio.ensure_future(coroutine)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return task

    def answer_websocket(self, connection, message):
        return self._track(self._answer_websocket(connection, message))

    async def _answer_websocket(self, connection, message):
        client = connection.client
        if isinstance(message, bytes):
            reply = json_error(None, BadRequest("binary messages are not understood; send text"))
        elif message.lstrip().startswith("{"):
            reply = await answer_json(self.gate, message, WEBSOCKET, client)
        else:
            reply = await self._answer_legacy(message, client)
        connection.send(reply)

    async def _answer_legacy(self, message, client):
        """The original add-on's protocol: ``new handle <secret>`` -> address or ``error ...``."""
        words = message.split()
        if len(words) != 3 or words[:2] != ["new", "handle"]:
            return "error unknown command: only \"new handle <secret>\" is accepted here"
        try:
            handle = await self.gate.run(WEBSOCKET, client, "new_handle", {"token": words[2]})
            return handle.address
        except RateLimited as e:
            return "error rate limited: retry in %d s" % e.retry_after
        except IncognitoMailError as e:
            return "error %s" % e

    def http_refusal(self, error, request=None, peer=None):
        """An HTTP-level refusal (413, 411, 431, 503...) as the API answers: JSON, CORS and
        no-store, so that a browser page or Bitwarden can show why."""
        headers = [("Cache-Control", "no-store"), ("Content-Type", "application/json")]
        headers += self._cors(request, peer) + list(error.headers)
        body = json.dumps({"message": error.reason, "error": error.reason}).encode("utf-8")
        return http_response(error.status, headers, body, close=True)

    def _cors(self, request, peer):
        """Access-Control-Allow-Origin for any answer: * when AllowedOrigins is empty, else the
        request's Origin when it is listed (or the owner page's own)."""
        if not self.config.allowed_origins:
            return [("Access-Control-Allow-Origin", "*")]
        if request is not None and origin_allowed(request, self.config.allowed_origins,
                                                  self.scheme(peer, request.headers)):
            return [("Access-Control-Allow-Origin", request.headers["origin"]), ("Vary", "Origin")]
        return [("Vary", "Origin")]

    def answer_http(self, connection, request):
        return self._track(self._answer_http(connection, request))

    async def _answer_http(self, connection, request):
        """One HTTP request -> (response bytes, close after it): the owner page at /, the API
        under /api/."""
        close = "close" in _tokens(request.headers.get("connection")) or request.version < (1, 1)
        head_only = request.method == "HEAD"
        if request.path == "/":
            if request.method not in ("GET", "HEAD"):
                return http_response(405, [("Allow", "GET, HEAD"), ("Cache-Control", "no-store")],
                                     close=close), close
            headers, body = owner_page(request, self.config)
            return http_response(200, headers + [("Cache-Control", "no-store")], body,
                                 close=close, head_only=head_only), close
        reply, dialect = await self._api_reply(connection, request)
        headers = [("Cache-Control", "no-store")] + list(reply.headers) + \
            self._cors(request, connection.peer)
        if request.method == "OPTIONS" and dialect is not None:
            reply = ApiReply(204, None, tuple(CORS_HEADERS))
            headers = [h for h in headers if h[0] != "Allow"] + list(CORS_HEADERS)
        body = b""
        if reply.body is not None:
            body = json.dumps(reply.body).encode("utf-8")
            headers.append(("Content-Type", "application/json"))
        return (http_response(reply.status, headers, body, close=close, head_only=head_only),
                close)

    async def _api_reply(self, connection, request):
        """The API's ApiReply to ``request``, and its dialect: each ApiCall on the way goes
        through the gate."""
        call, dialect = route_api(request, ApiSite(self.config.domains, self.clock()))
        while isinstance(call, ApiCall):
            try:
                result = await self.gate.run(HTTP, connection.client, call.op, call.fields)
                call = call.then(result)
            except IncognitoMailError as e:
                call = api_error(dialect, e)
            except Exception:
                log.exception("internal error answering an HTTP request")
                call = api_error(dialect, IncognitoMailError("internal error"))
        return call, dialect


###############################################################################
# Fronts: Postfix's questions (policy service, socketmap, milter), on a thread of their own
###############################################################################

POSTFIX_IDLE_TIMEOUT = 600.0        # Postfix itself lets a policy connection idle 300 s at most
RECEIVED_FLUSH_SECONDS = 1.0
MAX_UNWRITTEN_RECEIVED = 100000     # counts kept for a retry while the database cannot be written
DECIDED_MESSAGES = 10000            # answers kept for Postfix asking twice about one message


# The headers a message from the owner keeps (SimpleLogin's list for replies): any other could
# name the owner, their provider, their software or their other addresses.
OWNER_HEADERS = frozenset((
    "from", "to", "cc", "subject", "date", "message-id", "references", "in-reply-to",
    "mime-version", "content-type", "content-disposition", "content-transfer-encoding"))
# The headers of forwarded mail whose addresses the owner's mail program may write to: each
# becomes a reply address, so whatever the owner sends there leaves from the handle.
ADDRESS_HEADERS = ("From", "Reply-To", "To", "Cc", "Mail-Followup-To", "Mail-Reply-To")
SENDER_HEADERS = frozenset(("from", "reply-to", "mail-reply-to"))    # never left without one
# ... the list headers' mailto: links (an unsubscribe button writes from the owner's address) ...
LIST_HEADERS = ("List-Unsubscribe", "List-Subscribe", "List-Post", "List-Help", "List-Owner")
_MAILTO = re.compile(r"(?i)(mailto:)([^?>,\s]+)")
# ... and the ones that ask for a receipt or a report from the owner's address: removed.
RECEIPT_HEADERS = ("Disposition-Notification-To", "Return-Receipt-To", "Errors-To")
MAX_MILTER_HEADERS = 1000           # headers a forwarded message may have; past this: refused
MAX_MILTER_HEADER_BYTES = 256 << 10
_CONTINUE = milter_packet(SMFIR_CONTINUE)
_TEMPFAIL = milter_packet(SMFIR_TEMPFAIL)
_OTHER = "other"                    # the kind of a recipient that is no handle's


def _unbracket(address):
    return address.strip().lstrip("<").rstrip(">").strip()


def _unfold(value):
    return re.sub(r"\r?\n([ \t])", r"\1", value)


def _display_name(name, address):
    """Who wrote, in a From: that is no longer theirs: ``Shop - orders at shop.example``."""
    try:
        name = str(email.header.make_header(email.header.decode_header(name))) if name else ""
    except (ValueError, LookupError, UnicodeError):
        pass
    said = address.replace("@", " at ")
    return "%s - %s" % (name, said) if name and name != address else said


def _parsed_addresses(value):
    """The (name, address) pairs of an address header's value, or None when Python's parser
    cannot account for all of it (an address without one "@", a name holding an address in
    angle brackets, an "@" found in neither): such a header is replaced, never left as it was,
    lest the owner's mail program read an address in it that the milter did not. Names that
    are not UTF-8 get U+FFFD."""
    try:
        pairs = [(name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), address)
                 for name, address in email.utils.getaddresses([_unfold(value)]) if address]
    except (RecursionError, ValueError, IndexError):
        return None
    found = sum(name.count("@") + address.count("@") for name, address in pairs)
    whole = all(address.count("@") == 1 and not set(name) & set("<>") for name, address in pairs)
    return pairs if whole and found == value.count("@") else None


def _address_lines(pairs):
    return ",\n\t".join(email.utils.formataddr(pair) for pair in pairs)


class MilterSession:
    """What the milter does with the messages of one Postfix connection, sans-I/O: ``answer``
    takes a MilterCommand and returns the bytes to send back.

    - Mail to a handle (FORWARD) leaves with the handle's bounce address as its envelope
      sender: a bounce or an auto-reply comes back to the handle, where it is counted and goes
      on to the owner (BOUNCE), never to the sender, and SPF is the handle domain's. With
      ReplyAddresses, From:, Reply-To: and the other To: and Cc: addresses become reply
      addresses, so the owner answers through the handle, and DMARC aligns with its domain.
    - Mail from the owner to a reply address (REPLY) goes to the correspondent from the
      handle: the handle in From:, its bounce address as envelope sender, a new Message-ID, and
      only the headers in OWNER_HEADERS. Only the owner may write so: the envelope sender and
      From: must be the account's address, and the verdict of this server's own verifier
      (Authentication-Results by Postfix's myhostname) for it must not be a fail.
    - One message concerns one handle, one way: a recipient whose mail would be changed
      differently is deferred (452 4.5.3) so the sender sends it in a message of its own.
      Locally submitted mail (non_smtpd_milters) cannot be deferred: such a message is let
      through unchanged, and the log says so.
    - When the daemon cannot look a recipient up, it answers 451 (try again later).
    """

    def __init__(self, front):
        self.front = front
        self.macros = {}
        self.local_port = False     # the connection Postfix made up for locally submitted mail
        self.steps = 0              # as negotiated: until then, every command is answered
        self._new_message()

    def _new_message(self):
        self.sender = ""
        self.smtp = True
        self.key = None             # (kind, handle address): what the message is
        self.handle = None
        self.recipients = []        # (as given, HandleAddress or None)
        self.headers = []           # (name, value), kept only for mail the milter changes
        self.header_count = self.header_bytes = 0
        self.refusal = None         # for locally submitted mail: refused at its end
        self.mixed = False

    def answer(self, command):
        code, args = command
        if code == SMFIC_OPTNEG:
            self.steps = MILTER_STEPS & args[2]
            return milter_negotiation(min(args[0], MILTER_VERSION), self.steps)
        if code == SMFIC_MACRO:
            self.macros.update(args[1])
            return b""
        if code == SMFIC_CONNECT:
            self.local_port = args[2] == 0
            return self._continue(code)
        if code == SMFIC_MAIL:
            self._new_message()
            self.sender = _unbracket(args[0])
            # Postfix sends a local submission's sender without <>, and from port 0
            self.smtp = not (self.local_port and not args[0].startswith("<"))
            return self._continue(code)
        if code == SMFIC_RCPT:
            return self._recipient(_unbracket(args[0]))
        if code == SMFIC_HEADER:
            self._header(*args)
            return self._continue(code)
        if code == SMFIC_BODYEOB:
            try:
                return self._end()
            except Exception:
                log.exception("milter: internal error at the end of a message to %s; asking "
                              "to try again later", self.handle.address if self.handle else "?")
                return _TEMPFAIL
            finally:
                self._new_message()
        if code == SMFIC_ABORT:
            self._new_message()
        if code in _UNANSWERED:
            return b""
        return self._continue(code)

    def _continue(self, code):
        """Continue: said, unless Postfix agreed not to wait for it."""
        return b"" if self.steps & MILTER_NO_REPLY.get(code, 0) else _CONTINUE

    def _header(self, name, value):
        """Keep a header of mail the milter changes, while the message stays within its
        limits (past them it is refused at its end: nothing more need be kept)."""
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.handle is not None and self.header_count <= MAX_MILTER_HEADERS and \
                self.header_bytes <= MAX_MILTER_HEADER_BYTES:
            self.headers.append((name, value))

    # -- recipients -------------------------------------------------------------------------

    def _recipient(self, address):
        front, now = self.front, self.front.clock()
        try:
            found = read_handle_address(address, front.config.domains, front.secret(), now)
            handle = front.lookup(found.handle) if found else None
        except BadRequest as e:
            return self._refuse("550 5.1.1 <%s>: %s" % (address, e))
        except (IncognitoMailError, sqlite3.Error) as e:
            log.error("milter: cannot look up %s (%s); asking to try again later", address, e)
            return _TEMPFAIL
        # who writes to a reply address is judged at the message's end, with its headers, and
        # in one word: a refusal here would tell whoever tries whether they guessed the owner
        found = found if handle else None
        key = (found.kind, handle.address) if found else (_OTHER, None)
        if self.key is None:
            self.key, self.handle = key, handle
        elif key != self.key:
            if self.smtp:
                return milter_reply("452 4.5.3 <%s>: send to this address in a message of its "
                                    "own" % address)
            self.mixed = True
        self.recipients.append((address, found))
        return _CONTINUE

    def _refuse(self, text):
        """Refuse a recipient now; locally submitted mail cannot be, so the whole message is
        refused at its end."""
        if self.smtp:
            return milter_reply(text)
        self.refusal = self.refusal or text
        return _CONTINUE

    # -- the end of a message -----------------------------------------------------------------

    def _end(self):
        kind, handle = self.key[0] if self.key else _OTHER, self.handle
        if self.refusal:
            return milter_reply(self.refusal)
        if kind == _OTHER:
            return _CONTINUE
        if self.mixed:
            log.warning("milter: a locally submitted message for %s and other recipients was "
                        "let through unchanged: its bounces would show the owner's address",
                        handle.address)
            return _CONTINUE
        if self.header_count > MAX_MILTER_HEADERS or \
                self.header_bytes > MAX_MILTER_HEADER_BYTES:
            return milter_reply("552 5.3.4 <%s>: the message has more headers than a handle "
                                "takes" % handle.address)
        if kind == BOUNCE:
            self.front.count(handle.address, BOUNCED)
            # a bounce has no sender to answer; mail that only claims to be one gets none
            # either, lest the owner's provider bounce it, or the owner answer it, to them
            return self._forward(handle, "<>")
        if kind == FORWARD:
            return self._forward(handle, "<%s>" % bounce_address(
                handle.address, self.front.secret(), self.front.clock()))
        return self._from_owner(handle)

    def _forward(self, handle, sender):
        """Mail to the owner: from ``sender`` (none for mail without one); receipts asked of
        the owner removed; with ReplyAddresses, every address the owner might write to
        becomes a reply address."""
        changes = [milter_strings(SMFIR_CHGFROM, sender)] if self.sender else []
        for name in RECEIPT_HEADERS:
            changes += self._remove_all(name)
        if self.front.config.reply_addresses:
            for name in ADDRESS_HEADERS:
                changes += self._rewrite_addresses(name, handle, self._to_reply_address)
            for name in LIST_HEADERS:
                changes += self._rewrite_mailto(name, handle)
        return b"".join(changes) + _CONTINUE

    def _to_reply_address(self, handle, name, address, header):
        """An address in a forwarded message -> its reply address; the handle's own stay. One
        a reply address cannot hold (not ASCII) is dropped, or, where a sender must stay,
        becomes the envelope sender's."""
        routed = routed_handle(address, self.front.config.domains)
        if routed is not None and routed[0] == handle.address:
            return name, address        # the handle, or one of its bounce or reply addresses
        if not address.isascii():
            return self._stand_in(handle, header)
        if header == "From":
            name = _display_name(name, address)
        return name, reply_address(handle.address, address)

    def _stand_in(self, handle, header):
        """What takes the place of an address the milter cannot rewrite: in a sender's header,
        the envelope sender's reply address (or the handle), elsewhere nothing."""
        if header.lower() not in SENDER_HEADERS:
            return None
        if self.sender.isascii() and "@" in self.sender:
            return "", reply_address(handle.address, self.sender)
        return "", handle.address

    def _from_owner(self, handle):
        owner = handle.target.lower()
        senders = [address.lower() for _, address in self._addresses("From")]
        failed = self._failed_checks(owner)
        if self.sender.lower() != owner or senders != [owner] or failed:
            log.info("milter: refused a message through %s: %s", handle.address,
                     "this server's %s check failed" % failed if failed else
                     "its sender is not the account's address")
            return milter_reply("550 5.7.1 only the owner of %s may write through it, from "
                                "the address it forwards to" % handle.address)
        changes = [milter_strings(SMFIR_CHGFROM, "<%s>" % bounce_address(
            handle.address, self.front.secret(), self.front.clock()))]
        for address, found in self.recipients:
            changes.append(milter_strings(SMFIR_DELRCPT, "<%s>" % address))
            changes.append(milter_strings(SMFIR_ADDRCPT, "<%s>" % found.correspondent))
        changes += self._rewrite_addresses("From", handle, lambda *a: ("", handle.address))
        for name in ("To", "Cc"):
            changes += self._rewrite_addresses(name, handle, self._to_correspondent)
        changes += self._keep_only_owner_headers()
        changes.append(milter_strings(SMFIR_CHGHEADER, "Message-ID", "<%s@%s>" % (
            secrets.token_hex(16), handle.domain), index=1))
        self.front.count(handle.address, SENT)
        return b"".join(changes) + _CONTINUE

    def _to_correspondent(self, handle, name, address, header):
        """An address in the owner's message -> the correspondent a reply address stands for;
        the owner's own address becomes the handle."""
        if address.lower() == handle.target.lower():
            return "", handle.address
        try:
            found = read_handle_address(address, self.front.config.domains, b"", 0)
        except BadRequest:          # a bounce address: not one to name
            return "", handle.address
        if found is not None and found.kind == REPLY:
            return name, found.correspondent
        return name, address

    # -- headers ----------------------------------------------------------------------------

    def _addresses(self, header):
        """(name, address) of every address in every ``header`` of the message."""
        values = [_unfold(value) for name, value in self.headers if name.lower() == header.lower()]
        return email.utils.getaddresses(values)

    def _rewrite_addresses(self, header, handle, rewrite):
        """CHGHEADER requests giving each ``header`` its addresses rewritten by
        ``rewrite(handle, name, address, header)`` (None: left out), one address a line. A
        header the parser cannot account for is replaced by its stand-in, or removed."""
        changes, index = [], 0
        for name, value in self.headers:
            if name.lower() != header.lower():
                continue
            index += 1
            pairs = _parsed_addresses(value)
            if pairs is None:
                new = [self._stand_in(handle, header)]
            else:
                new = [rewrite(handle, n, a, header) for n, a in pairs]
            new = [pair for pair in new if pair is not None]
            if new != pairs:
                changes.append(milter_strings(SMFIR_CHGHEADER, name, _address_lines(new),
                                              index=index))
        return changes

    def _rewrite_mailto(self, header, handle):
        """CHGHEADER requests turning each mailto: address in ``header`` into its reply
        address (or, one it cannot hold, into the handle)."""
        changes, index = [], 0
        for name, value in self.headers:
            if name.lower() != header.lower():
                continue
            index += 1
            new = _MAILTO.sub(lambda m: m.group(1) + (
                reply_address(handle.address, m.group(2))
                if m.group(2).isascii() and m.group(2).count("@") == 1 else handle.address), value)
            if new != value:
                changes.append(milter_strings(SMFIR_CHGHEADER, name, new, index=index))
        return changes

    def _remove_all(self, header):
        """CHGHEADER requests deleting every ``header``, from the last."""
        count = sum(1 for name, _ in self.headers if name.lower() == header.lower())
        return [milter_strings(SMFIR_CHGHEADER, header, "", index=index)
                for index in range(count, 0, -1)]

    def _keep_only_owner_headers(self):
        """Delete every header not in OWNER_HEADERS."""
        names = {name.lower(): name for name, _ in self.headers}
        return [change for lower, name in names.items() if lower not in OWNER_HEADERS
                for change in self._remove_all(name)]

    def _failed_checks(self, owner):
        """The methods (spf, dkim, dmarc) whose result for the owner's domain is a fail, and
        not a pass too, in this server's own Authentication-Results (its authserv-id is
        Postfix's myhostname: nobody upstream can speak for it)."""
        ours = self.macros.get("j", "").lower()
        domain = re.compile(r"(^|[=@.\s])%s(\s|$)" % re.escape(owner.rpartition("@")[2]))
        verdicts = collections.defaultdict(set)
        for name, value in self.headers:
            server, _, results = _unfold(value).partition(";")
            if name.lower() != "authentication-results" or not ours or \
                    (server.split() or [""])[0].lower() != ours:
                continue
            for result in results.split(";"):
                match = re.match(r"\s*(spf|dkim|dmarc)\s*=\s*(\w+)(.*)", result, re.I | re.S)
                if match and domain.search(match.group(3).lower()):
                    verdicts[match.group(1).lower()].add(match.group(2).lower())
        # a dkim fail is excused by another signature's pass; spf and dmarc have one verdict,
        # and a "pass" beside this server's "fail" is a forger's
        return ", ".join(method for method, seen in sorted(verdicts.items())
                         if "fail" in seen and (method != "dkim" or "pass" not in seen))


class PostfixConnection(_PausingProtocol):
    """One connection of Postfix's to the policy service, the socketmap or the milter: its
    requests answered in order by ``answerer()``'s answer.

    A bare Protocol, as Postfix asks the milter several times a message: each request is
    answered within the read that brought it, with no task or stream between. An answer is
    bytes (none for a milter command that gets none), or a coroutine of them when it must wait
    (a burner handle's count): the connection then reads nothing more until it is written, and
    also while Postfix leaves answers unread.
    """

    def __init__(self, front, clients, parser_class, answerer):
        super().__init__()
        self.front, self.clients = front, clients
        self.parser, self.answer = parser_class(), answerer()

    def connection_made(self, transport):
        self.transport = transport
        self.clients.add(self)

    def data_received(self, data):
        self.clients.active(self)
        self.parser.feed(data)
        if not self._answer_all():
            self._acknowledge()

    def _answer_all(self):
        """Answer the requests read so far; whether anything was written."""
        wrote = False
        while "answer" not in self._paused_by and not self.transport.is_closing():
            try:
                request = self.parser.next_request()
            except PostfixProtocolError as e:
                log.warning("%s: closing a connection: %s", self.clients.name, e)
                self.close()
                break
            if request is None:
                break
            reply = self.answer(request)
            if not isinstance(reply, bytes):
                self._wait_for(reply)
                break
            if reply:
                self.transport.write(reply)
                wrote = True
            if request == (SMFIC_QUIT, ()):
                self.close()
        return wrote

    def _acknowledge(self):
        """Acknowledge what was read now, not after the delayed-ACK timer: Postfix holds its
        next write until then (it writes without TCP_NODELAY), and a read answered with
        nothing (a milter command that needs no answer) sends no ACK along with an answer."""
        sock = self.transport.get_extra_info("socket")
        if _TCP_QUICKACK and sock is not None and sock.family != socket.AF_UNIX:
            with contextlib.suppress(OSError):      # the connection is gone already
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)

    def _wait_for(self, reply):
        self.front.answering += 1
        self.pause_reading("answer")
        asyncio.ensure_future(reply).add_done_callback(self._answered)

    def _answered(self, future):
        self.front.answering -= 1
        if future.cancelled() or self.transport.is_closing():
            return
        if future.exception() is not None:
            log.error("%s: closing a connection: internal error", self.clients.name,
                      exc_info=future.exception())
            self.close()
            return
        self.transport.write(future.result())
        self.resume_reading("answer")
        self._answer_all()

    def pause_writing(self):
        self.pause_reading("writing")

    def resume_writing(self):
        self.resume_reading("writing")

    def eof_received(self):
        if self.parser.incomplete:
            log.warning("%s: a client hung up in the middle of a request", self.clients.name)

    def connection_lost(self, exc):
        self.clients.discard(self)

    def close(self):
        self.transport.close()


def _local_domains(config):
    """Postfix's mydestination: a handle there is routed by a canonical map, and an unknown
    address in it is "User unknown in local recipient table" (empty if postconf cannot say)."""
    try:
        value = _postconf(config, ["mydestination"], expand=True).get("mydestination", "")
    except PostfixError:
        return frozenset()
    return frozenset(w.lower() for w in re.split(r"[\s,]+", value) if w)


class PostfixFront:
    """Postfix's questions: the policy service (PolicyListen), the socketmap (SocketmapListen)
    and the milter (MilterListen, see MilterSession).

    Mail flow comes first: they are answered on an event loop and a thread of their own, from
    a database connection of their own, so no owner's request, however many, stands before
    them. Only a burner handle's count waits for the Service's worker, which takes it before
    any owner's operation. Each listener keeps at most MAX_POSTFIX_CLIENTS connections.
    """

    def __init__(self, config, service, clock=time.time):
        self.config, self.service, self.clock = config, service, clock
        self._local_domains = _local_domains(config)
        self._store = None              # read-only, for lookups: opened in the front's thread
        self._received = []             # (address, time, column) to count, not yet written
        self._secret = None             # the milter's key (HMAC of bounce addresses)
        self._burners = {}              # address -> (asyncio.Lock, users): one message at a time
        self._decided = collections.OrderedDict()  # (instance, recipient) -> answer
        self.answering = 0              # answers in flight: finished before stopping
        self._loop = self._stopping = self._thread = None

    # -- life cycle: a thread and an event loop of its own -------------------------------------

    def start(self):
        """Listen, in a thread of its own; a listener that cannot start raises ServerError here."""
        started = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(started,), daemon=True,
                                        name="incognitomail-postfix")
        self._thread.start()
        try:
            started.result()
        except BaseException:
            self._thread.join()
            self._thread = None
            raise

    def stop(self):
        """Close the listeners and connections (Postfix asks the next server), write the counts."""
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join()
            self._thread = None

    def _main(self, started):
        try:
            asyncio.run(self._serve(started))
        except BaseException as e:          # before it started: the daemon says why
            if not started.done():
                started.set_exception(e)
            else:
                log.exception("the Postfix front stopped")
        finally:
            if self._store is not None:
                self._store.close()

    async def _serve(self, started):
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        self._loop.set_exception_handler(loop_exception)
        config, servers, clients = self.config, [], []
        try:
            for endpoint, key, name, parser, answerer in (
                    (config.policy_listen, "[General] PolicyListen", "policy service",
                     PolicyParser, lambda: self.policy_answer),
                    (config.socketmap_listen, "[General] SocketmapListen", "socketmap",
                     NetstringParser, lambda: self.socketmap_answer),
                    (config.milter_listen, "[General] MilterListen", "milter", MilterParser,
                     lambda: MilterSession(self).answer)):
                if endpoint:
                    clients.append(_Clients(name, MAX_POSTFIX_CLIENTS))
                    protocol = functools.partial(PostfixConnection, self, clients[-1], parser,
                                                 answerer)
                    servers.append((await _start_listener(protocol, endpoint, key), endpoint))
        except BaseException:
            for server, endpoint in servers:
                _close_server(server, endpoint)
            raise
        started.set_result(None)
        chores = asyncio.ensure_future(self._chores(clients))
        await self._stopping.wait()
        for server, endpoint in servers:
            _close_server(server, endpoint)
        for _ in range(int(STOP_GRACE_SECONDS / 0.05)):
            if not self.answering:
                break
            await asyncio.sleep(0.05)
        for listener_clients in clients:
            listener_clients.close_all()    # Postfix asks the next server; nothing counted after
        chores.cancel()
        await self._flush_received()

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, address):
        """The Handle at ``address``, or None: read at once, from the front's own connection."""
        routed = routed_handle(address, self.config.domains)
        if routed is None:
            return None
        return self._reader().handle(*routed[0].split("@"))

    def _reader(self):
        if self._store is None:
            self._store = Store(self.config.database_path, readonly=True)
        return self._store

    def secret(self):
        """The milter's key, kept in the database (the Service made it at its first start)."""
        if self._secret is None:
            self._secret = bytes.fromhex(self._reader().get_meta("milter_secret"))
        return self._secret

    def count(self, address, column):
        """One more message in a handle's ``column`` (MAIL_COUNTS), written within a second."""
        self._received.append((address, self.clock(), column))

    def _milter_address(self, recipient):
        """Is ``recipient`` one of the milter's addresses (a bounce or a reply address)?"""
        try:
            found = read_handle_address(recipient, self.config.domains, self.secret(),
                                        self.clock())
        except BadRequest:
            return True
        return found is not None and found.kind != FORWARD

    # -- socketmap: Postfix asks the daemon instead of a map file -------------------------------

    def socketmap_answer(self, request):
        """``name key`` -> ``OK target`` for a handle in the map, else ``NOTFOUND ``: like a map
        file, but an expired handle is not found from the first second."""
        _, _, key = request.decode("utf-8", "replace").partition(" ")
        try:
            handle = self.lookup(key.strip())
        except (IncognitoMailError, sqlite3.Error) as e:
            log.error("socketmap: lookup failed (%s); answering TEMP", e)
            return netstring(b"TEMP lookup failed")
        swept = self.service.swept_until
        if handle is not None and handle.in_map(swept) and handle.state(self.clock()) != EXPIRED:
            return netstring(b"OK " + handle.target.encode("utf-8"))
        return netstring(b"NOTFOUND ")

    # -- policy service: what mail each handle receives -------------------------------------

    def policy_answer(self, request):
        """The answer at once, or a coroutine of it for a burner handle's message."""
        try:
            action = self.policy_action(request)
        except (IncognitoMailError, sqlite3.Error) as e:
            log.error("policy service: lookup failed (%s); answering DUNNO", e)
            return policy_response("DUNNO")
        return policy_response(action) if isinstance(action, str) else self._later(action)

    async def _later(self, action):
        try:
            return policy_response(await action)
        except (IncognitoMailError, sqlite3.Error) as e:
            log.error("policy service: lookup failed (%s); answering DUNNO", e)
            return policy_response("DUNNO")

    def policy_action(self, request):
        """DUNNO for mail a handle accepts (counted once per message), 550 for one that is
        switched off, expired or used up (counted as blocked), DUNNO for other recipients:
        at once, or a coroutine of it for a burner handle (see _burner_action)."""
        recipient = request.get("recipient", "").strip().lower()
        handle = self.lookup(recipient) if "@" in recipient else None
        if handle is not None and self.config.milter_listen and self._milter_address(recipient):
            return "DUNNO"          # a bounce, or the owner writing: the milter sees to it
        if handle is not None and handle.max_messages is not None:
            return self._burner_action(request, recipient, handle.address)
        answer, event = self._decide(request, recipient, handle)
        if event is not None:
            self._received.append(event)
        return answer

    async def _burner_action(self, request, recipient, address):
        """A burner handle's message is written before it is let through, one at a time per
        handle, so that no crash and no race lets one more in than it accepts; the Service
        writes it before any owner's operation."""
        lock, users = self._burners.get(address, (asyncio.Lock(), 0))
        self._burners[address] = (lock, users + 1)
        try:
            async with lock:
                # as it is now: counted, changed or deleted while this message waited
                handle = self.lookup(recipient)
                answer, event = self._decide(request, recipient, handle, remember=False)
                if event is None:
                    return answer
                if handle.max_messages is None or event[2] != RECEIVED:
                    self._received.append(event)
                else:
                    try:
                        await asyncio.wrap_future(self.service.record_mail([event]))
                    except (IncognitoMailError, sqlite3.Error) as e:
                        log.error("policy service: cannot count a message to %s (%s); asking "
                                  "the sender to try again later", handle.address, e)
                        return "451 4.3.0 <%s>: try again later" % recipient
                self._remember(request, recipient, answer)
                return answer
        finally:
            lock, users = self._burners[address]
            if users > 1:
                self._burners[address] = (lock, users - 1)
            else:
                del self._burners[address]

    def _decide(self, request, recipient, handle, remember=True):
        """(the answer, the event to count or None). Postfix may ask several times about one
        message (RCPT, then DATA or END-OF-MESSAGE restrictions): only RCPT is counted, and a
        message asked about again gets the same answer."""
        if handle is None:
            return "DUNNO", None
        message = (request.get("instance") or "", recipient)
        if message[0] and message in self._decided:
            return self._decided[message], None
        if request.get("protocol_state", "").upper() not in ("RCPT", ""):
            return "DUNNO", None
        now = self.clock()
        state = handle.state(now)
        answer = "DUNNO" if state == ENABLED else self._refusal(recipient, handle, state)
        if remember:
            self._remember(request, recipient, answer)
        return answer, (handle.address, now, RECEIVED if state == ENABLED else BLOCKED)

    def _refusal(self, recipient, handle, state):
        """Why a handle refuses mail, or, as the server or its owner chose, the very answer an
        unknown address gets: Postfix's own (DUNNO: the handle is not in the map, so Postfix
        refuses it itself), or its words while the handle is still in the map."""
        quiet = handle.refuse_as_unknown
        if not (self.config.refuse_as_unknown if quiet is None else quiet):
            return "550 5.1.1 <%s>: %s" % (recipient, REFUSALS[state])
        routable = handle.in_map(self.service.swept_until) and \
            (state != EXPIRED or not self.config.socketmap_listen)
        table = "local recipient" if handle.domain in self._local_domains else "virtual alias"
        return "550 5.1.1 User unknown in %s table" % table if routable else "DUNNO"

    def _remember(self, request, recipient, answer):
        instance = request.get("instance")
        if instance:
            self._decided[(instance, recipient)] = answer
            if len(self._decided) > DECIDED_MESSAGES:
                self._decided.popitem(last=False)

    async def _chores(self, clients):
        """Every second: write the counts gathered; close connections idle for too long."""
        while True:
            await asyncio.sleep(RECEIVED_FLUSH_SECONDS)
            for listener_clients in clients:
                listener_clients.close_idle(POSTFIX_IDLE_TIMEOUT)
            await self._flush_received()

    async def _flush_received(self):
        """Write the counts gathered since the last time; keep them for the next try on failure."""
        if not self._received:
            return
        events, self._received = self._received, []
        try:
            # shielded: a stop cancelling the periodic writer must not drop a write under way
            await asyncio.shield(asyncio.wrap_future(self.service.record_mail(events)))
        except IncognitoMailError as e:
            log.error("could not record %d received messages (will retry): %s", len(events), e)
            self._received[:0] = events[-MAX_UNWRITTEN_RECEIVED:]


###############################################################################
# Fronts: the control socket (the command line)
###############################################################################

CONTROL_IDLE_TIMEOUT = 60.0


class ControlFront:
    """The command line's socket (UnixSockPath): root and the server's own user only, one JSON
    request per line, no limits but MAX_CONTROL_CLIENTS connections at once."""

    def __init__(self, config, gate):
        self.config, self.gate = config, gate
        self._server = None
        self._clients = _Clients("control socket", MAX_CONTROL_CLIENTS)
        self._requests = set()

    async def start(self):
        listen = functools.partial(asyncio.start_unix_server, self._serve, limit=65536)
        self._server = await _start_unix_server(listen, self.config.unix_sock_path,
                                                "[General] UnixSockPath", 0o600)

    async def stop(self):
        if self._server is not None:
            _close_server(self._server, self.config.unix_sock_path)
        if self._requests:
            await asyncio.wait(set(self._requests), timeout=STOP_GRACE_SECONDS)
        self._clients.close_all()

    async def _serve(self, reader, writer):
        try:
            uid = _peer_uid(writer.get_extra_info("socket"))
            if uid not in (0, os.geteuid()):
                log.warning("refused a command-line connection from user %s", _user_name(uid))
                try:    # read the request first, so the refusal reaches a client still sending
                    await asyncio.wait_for(reader.readline(), 5)
                except (asyncio.TimeoutError, ValueError):
                    pass
                writer.write((json_error(None, Unauthorized(
                    "only root and user %s may use this socket" % _user_name())) + "\n").encode())
                await writer.drain()
                return
            if len(self._clients) >= MAX_CONTROL_CLIENTS:
                writer.write((json_error(None, ServerError(
                    "too many command-line connections at once; try again")) + "\n").encode())
                return
            self._clients.add(writer)
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), CONTROL_IDLE_TIMEOUT)
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write((json_error(None, BadRequest("request too long")) + "\n").encode())
                    return
                if not line:
                    return
                task = asyncio.ensure_future(answer_json(
                    self.gate, line.decode("utf-8", "replace"), COMMAND_LINE, None))
                self._requests.add(task)
                task.add_done_callback(self._requests.discard)
                writer.write((await task + "\n").encode("utf-8"))
                await writer.drain()
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(writer)
            writer.close()


###############################################################################
# Daemon
###############################################################################

def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class _LockFile:
    """One server per lock file: an flock held for the server's life, holding its PID."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        folder = os.path.dirname(self.path)
        for attempt in range(20):
            try:
                _private_folder(folder, "[General] LockFilePath")
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
            except OSError as e:
                raise ServerError("%s: cannot open the lock file ([General] LockFilePath): %s"
                                  % (self.path, _os_reason(e)))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                if (pid.isdigit() and _process_exists(int(pid))) or attempt == 19:
                    raise ServerError("already running (pid %s, lock %s)"
                                      % (pid or "unknown", self.path))
                time.sleep(0.01)    # a reader's brief shared lock (status, check): try again
                continue
            if (_file_identity(self.path) is None
                    or os.fstat(fd).st_ino != os.stat(self.path).st_ino):
                os.close(fd)        # a stopping server removed the file we locked: lock the new one
                continue
            os.ftruncate(fd, 0)
            os.write(fd, b"%d\n" % os.getpid())
            self.fd = fd
            return
        raise ServerError("%s: could not take the lock file" % self.path)

    def release(self):
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def running_pid(config):
    """The PID in the lock file if a server holds the lock, else None."""
    try:
        fd = os.open(config.lock_file_path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        return int(text) if text.isdigit() else -1
    os.close(fd)
    return None


class Daemon:
    """Owns the lock, the store, the Service, the gate and the fronts: starts them in order,
    keeps the schedule (automatic pruning) and stops them gracefully."""

    def __init__(self, config, clock=time.time):
        self.config = config
        self.clock = clock
        self.service = None
        self._stop = None

    def run(self):
        """Run in the foreground until SIGTERM, SIGINT or ``stop``; raise ServerError on failure."""
        lock = _LockFile(self.config.lock_file_path)
        lock.acquire()
        store = None
        try:
            tls = self._ssl_context()
            store = Store(self.config.database_path)
            self.service = Service(self.config, store, make_table(self.config), clock=self.clock)
            self.service.start()
            try:
                asyncio.run(self._serve(tls))
            finally:
                self.service.stop()
        finally:
            if store is not None:
                store.close()
            lock.release()
        log.info("stopped")

    def _ssl_context(self):
        if not self.config.tls_cert_file:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.config.tls_cert_file, self.config.tls_key_file)
        except (OSError, ssl.SSLError) as e:
            raise ServerError("cannot use [General] TLSCertFile %s with TLSKeyFile %s: %s"
                              % (self.config.tls_cert_file, self.config.tls_key_file,
                                 getattr(e, "strerror", None) or getattr(e, "reason", None) or e))
        return context

    def stop(self):
        """Ask a running server to stop (from its own event loop)."""
        if self._stop is not None:
            self._stop.set()

    def _stop_requested(self):
        log.info("stop requested from the command line")
        asyncio.get_running_loop().call_soon(self._stop.set)

    async def _serve(self, tls):
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.set_exception_handler(loop_exception)
        config = self.config
        gate = Gate(config, self.service, self.clock)
        gate.on_stop = self._stop_requested
        postfix = PostfixFront(config, self.service, self.clock) \
            if config.policy_listen or config.socketmap_listen or config.milter_listen else None
        web = WebFront(config, gate, self.clock, tls) if config.listen_address else None
        control = ControlFront(config, gate)
        pruning = None
        try:
            if postfix is not None:
                postfix.start()
            if web is not None:
                web.start(loop)
            # last: the command line (and whoever waits for it) finds every listener up
            await control.start()
            where = ["the command line on unix:%s" % config.unix_sock_path]
            if web:
                where.insert(0, "the owner page and the HTTP API at %s, the add-on's "
                             "WebSocket at %s" % web.urls())
            where += ["the %s on %s" % (name, endpoint) for name, endpoint in (
                ("policy service", config.policy_listen), ("socketmap", config.socketmap_listen),
                ("milter", config.milter_listen)) if endpoint]
            log.info("IncognitoMail %s serving %s for %s (pid %d): %s", __version__,
                     self.service.table.name, ", ".join(config.domains), os.getpid(),
                     "; ".join(where))
            if config.auto_prune:
                pruning = asyncio.ensure_future(self._prune_daily(gate))
            await self._stop.wait()
            log.info("stopping")
        finally:
            if pruning is not None:
                pruning.cancel()
            if web is not None:
                web.close()
            await control.stop()
            if web is not None:
                await web.stop()
            if postfix is not None:
                await loop.run_in_executor(None, postfix.stop)

    async def _prune_daily(self, gate):
        await asyncio.sleep(60)
        fields = {"handles_unused_days": self.config.prune_handles_unused_days,
                  "accounts_unused_days": self.config.prune_accounts_unused_days,
                  "handles_expired_days": self.config.prune_handles_expired_days}
        while True:
            try:
                removed = await gate.run(COMMAND_LINE, None, "prune", fields)
                log.info("automatic prune removed %d handles and accounts", len(removed))
            except IncognitoMailError as e:
                log.error("automatic prune failed: %s", e)
            await asyncio.sleep(86400)


###############################################################################
# Command line
###############################################################################

class ControlClient:
    """The command line's side of the control socket: one JSON line out, one back."""

    def __init__(self, config):
        self.config = config

    def request(self, op, **fields):
        path = self.config.unix_sock_path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(600)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ServerError("the server is not running (nothing listens on %s, "
                              "[General] UnixSockPath); start it with: "
                              "python3 incognitomail.py -c %s" % (path, self.config.path))
        except PermissionError:
            sock.close()
            raise ServerError("%s: permission denied; run this as root or as the user the "
                              "server runs as" % path)
        except OSError as e:
            sock.close()
            raise ServerError("cannot connect to %s: %s" % (path, _os_reason(e)))
        with sock:
            self._check_server(sock)
            fields.update(op=op)
            try:
                sock.sendall((json.dumps(fields) + "\n").encode("utf-8"))
            except (BrokenPipeError, ConnectionResetError):
                pass    # the server refused early; its reply says why
            data = b""
            try:
                while not data.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise ServerError("the server closed the connection without answering; "
                                          "see its log")
                    data += chunk
                reply = json.loads(data.decode("utf-8"))
            except (OSError, ValueError) as e:
                raise ServerError("no valid answer from the server on %s (%s); see its log"
                                  % (path, e))
        if not reply.get("ok"):
            error = {"bad_request": BadRequest, "unauthorized": Unauthorized,
                     "not_found": NotFound}.get(reply.get("error"), IncognitoMailError)(
                reply.get("message", "unknown error"))
            raise error
        return reply

    def _check_server(self, sock):
        """Send a secret only to the real server: root, us, or the owner of the database."""
        uid = _peer_uid(sock)
        allowed = {0, os.geteuid()}
        try:
            allowed.add(os.stat(self.config.database_path).st_uid)
        except OSError:
            pass
        if uid not in allowed:
            raise ServerError("%s is served by user %s, who owns neither the database nor this "
                              "session; refusing to send a secret to it"
                              % (self.config.unix_sock_path, _user_name(uid)))


def _make_postfix_folders(config, queue):
    """The folders of the Postfix-facing Unix sockets, as README.md says: root:postfix 0750."""
    for listen in (config.policy_listen, config.socketmap_listen, config.milter_listen):
        kind, _, path = listen.partition(":")
        folder = os.path.dirname(path)
        if kind == "unix" and not os.path.isdir(folder):
            os.makedirs(folder, mode=0o750)
            try:
                os.chown(folder, 0, grp.getgrnam("postfix").gr_gid)
            except (KeyError, PermissionError):
                pass
            os.chmod(folder, 0o750)


def run_check(config, args, out=sys.stdout):
    """``check``: one line per check, OK or FAIL with the fix; exit 0 only if all pass."""
    results = []

    def report(name, problem=None):
        ok = problem is None or isinstance(problem, Note)
        results.append({"check": name, "ok": ok, "problem": problem})
        if not args.json:
            word = "OK" if problem is None else "NOTE" if ok else "FAIL"
            print("%-4s %s%s" % (word, name, "" if problem is None else ": " + problem), file=out)

    report("configuration %s" % config.path)
    table = make_table(config)
    try:
        table.check_access()
        report("map file and folder writable (%s)" % table.name)
    except IncognitoMailError as e:
        report("map file and folder writable", str(e))
    store = None
    try:
        store = Store(config.database_path, readonly=True)
        version = store.schema_version()
        if version != SCHEMA_VERSION:
            raise StoreError("schema version %d, this program's is %d; start the server once "
                             "to migrate" % (version, SCHEMA_VERSION))
        report("database %s readable, schema version %d" % (config.database_path, version))
    except IncognitoMailError as e:
        report("database readable", str(e))
        store = None
    for name, problem in table.checks(store):
        report(name, problem)
    for name, problem in postfix_config_problems(config, table, store):
        report(name, problem)
    pid = running_pid(config)
    try:
        if not pid:
            raise ServerError("not running (no lock held on %s); start it with: "
                              "python3 incognitomail.py -c %s"
                              % (config.lock_file_path, config.path))
        ControlClient(config).request("status")
        report("server running (pid %d)" % pid)
    except IncognitoMailError as e:
        report("server running", str(e))
    if args.json:
        print(json.dumps(results, indent=2), file=out)
    return 0 if all(r["ok"] for r in results) else 1


# What ``wire`` may set in main.cf
_WIRED_SETTINGS = ("virtual_alias_maps", "virtual_alias_domains", "smtpd_recipient_restrictions",
                   "smtpd_policy_service_default_action",
                   "smtpd_milters", "non_smtpd_milters", "internal_mail_filter_classes",
                   "milter_default_action", "recipient_delimiter",
                   "propagate_unmatched_extensions")


def postfix_wiring(config, settings, values):
    """What main.cf needs for this configuration: [(setting, its value now, the value wanted)],
    keeping what the admin has (other maps, restrictions and milters stay, in their order).
    ``settings`` tells what Postfix uses; ``values`` are main.cf's own words (``$name``
    references kept), which a new value extends."""
    words, queue = settings.words, settings.queue

    def endpoint(listen):
        return _wired_endpoint(listen, queue)

    def adding(name, word, first=False):
        now = words(name)
        if any(_same_endpoint(w, word, queue) or w == word for w in now):
            return values.get(name, "")
        if not now:                 # empty, or $references to nothing (virtual_maps)
            return word
        return ", ".join([word, values[name]] if first else [values[name], word])
    table = make_table(config)
    wanted = []
    if config.socketmap_listen:
        mine = "socketmap:%s:virtual" % endpoint(config.socketmap_listen)
    else:
        mine = table.name
    canonical = any(w == mine for w in words("canonical_maps") + words("recipient_canonical_maps"))
    if not canonical:
        wanted.append(("virtual_alias_maps", adding("virtual_alias_maps", mine)))
        domains = [d for d in config.domains if d not in words("mydestination")]
        value = values.get("virtual_alias_domains", "")
        for domain in domains:
            value = value if domain in re.split(r"[\s,]+", value) else \
                ", ".join(w for w in (value, domain) if w)
        wanted.append(("virtual_alias_domains", value))
    if config.policy_listen:
        check = "check_policy_service %s" % endpoint(config.policy_listen)
        now = values.get("smtpd_recipient_restrictions", "")
        if endpoint(config.policy_listen) not in now and config.policy_listen not in now:
            # relay control in smtpd_relay_restrictions (Postfix 2.10+): every client is asked
            relay = "" if words("smtpd_relay_restrictions") else \
                "permit_mynetworks, reject_unauth_destination"
            now = ", ".join(w for w in (now or relay, check) if w)
        wanted += [("smtpd_recipient_restrictions", now),
                   ("smtpd_policy_service_default_action", "DUNNO")]
    if config.milter_listen:
        wanted += [("smtpd_milters", adding("smtpd_milters", endpoint(config.milter_listen),
                                            first=True)),
                   ("non_smtpd_milters", adding("non_smtpd_milters",
                                                endpoint(config.milter_listen), first=True)),
                   ("internal_mail_filter_classes",
                    adding("internal_mail_filter_classes", "bounce")),
                   ("milter_default_action", "tempfail"),
                   ("recipient_delimiter", "+" + values.get("recipient_delimiter", "")
                    if "+" not in values.get("recipient_delimiter", "") else
                    values["recipient_delimiter"]),
                   ("propagate_unmatched_extensions", "" if canonical else "canonical")]
    return [(name, values.get(name, ""), value) for name, value in wanted
            if values.get(name, "") != value]


def run_wire(config, args, out=sys.stdout):
    """``wire``: set what Postfix needs for this configuration (postconf -e), after showing
    it and asking; keep a copy of main.cf; reload Postfix; then ``check``."""
    settings = _PostfixSettings(config)
    changes = postfix_wiring(config, settings, _postconf(config, _WIRED_SETTINGS, expand=False))
    main_cf = os.path.join(config.postfix_config_dir or "/etc/postfix", "main.cf")
    for name, now, value in changes:
        print("%s\n    now:  %s\n    then: %s" % (name, now or "(empty)", value or "(empty)"),
              file=out)
    if not changes:
        print("%s needs no change" % main_cf, file=out)
    if args.dry_run:
        return 0
    if changes and not args.yes and not (sys.stdin.isatty() and input(
            "Write these to %s? [y/N] " % main_cf).strip().lower() in ("y", "yes")):
        print("nothing was changed", file=sys.stderr)
        return 1
    if changes:
        saved = "%s.incognitomail-%s" % (main_cf, time.strftime("%Y%m%dT%H%M%S"))
        shutil.copy2(main_cf, saved)
        command = [find_postfix_command("postconf")]
        command += ["-c", config.postfix_config_dir] if config.postfix_config_dir else []
        done = subprocess.run(command + ["-e"] + ["%s=%s" % (n, v) for n, _, v in changes],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if done.returncode:
            raise PostfixError("postconf -e failed: %s" % done.stderr.decode("utf-8", "replace"))
        print("wrote %s (it was kept as %s; copy that back and run postfix reload to undo)"
              % (main_cf, saved), file=sys.stderr)
    _make_postfix_folders(config, settings.queue)
    postfix = [find_postfix_command("postfix")]
    postfix += ["-c", config.postfix_config_dir] if config.postfix_config_dir else []
    if changes and subprocess.run(postfix + ["status"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL).returncode == 0:
        subprocess.run(postfix + ["reload"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        print("reloaded Postfix", file=sys.stderr)
    return run_check(config, args, out)


_DESCRIPTION = """\
IncognitoMail: random forwarding addresses ("handles") for your Postfix server.

With no command, run the server in the foreground (stop it with SIGTERM, Ctrl-C or "stop").
Every other command talks to the running server over [General] UnixSockPath.
Where a command takes <secret>, give "-" to read it from standard input, which keeps it out
of your shell history and of "ps".
"""

_EXAMPLES = """
examples:
  %(prog)s -c /etc/incognitomail/incognitomail.ini
  %(prog)s -c incognitomail.ini new account me@example.org
  echo "$TOKEN" | %(prog)s -c incognitomail.ini new handle - --label shop.example.com
  %(prog)s -c incognitomail.ini --json list - < token.txt

exit status: 0 success, 1 error, 2 wrong usage.
"""


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, "%s: %s (see --help)\n" % (self.prog, message))


def _days(text):
    if not _is_number(text):
        raise argparse.ArgumentTypeError("%r is not a number of days (0 or more)" % text)
    return int(text)


def _whole_number(text):
    if not _is_number(text) or not int(text):
        raise argparse.ArgumentTypeError("%r is not a whole number from 1" % text)
    return int(text)


def _count(text):
    if not _is_number(text) or not 0 < int(text) <= MAX_MESSAGES:
        raise argparse.ArgumentTypeError("%r is not a number of messages from 1 to %d"
                                         % (text, MAX_MESSAGES))
    return int(text)



class _NotRunning(Exception):
    """``status`` found no server: said on standard output (or as JSON), exit status 1."""


def _ask(client, command, fields):
    """Send the command's request; the reply's value (its operation's ``reply`` field)."""
    reply = client.request(command.op, **fields)
    operation = OPERATIONS[command.op]
    return reply.get(operation.reply) if operation.reply else reply


def _ask_every_page(client, command, fields):
    """``list``: every page of the account's handles, one request each."""
    handles, before = [], None
    while True:
        reply = client.request(command.op, before=before, **fields)
        handles += reply["handles"]
        before = reply["next"]
        if before is None:
            return handles


def _ask_backup(client, command, fields):
    return _ask(client, command, dict(fields, path=os.path.abspath(fields["path"])))


IMPORT_CHUNK = 500      # handles a request of ``import`` carries


def _read_export(path):
    """The handles of an ``export`` file: JSON (a list of objects) or CSV (with its header)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BadRequest("%s: cannot read it: %s" % (path, _os_reason(e)))
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except ValueError as e:
            raise BadRequest("%s: not valid JSON: %s" % (path, e))
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        row = {name: value for name, value in row.items() if name}
        row["enabled"] = row.get("enabled", "true").lower() != "false"
        row["label"] = row.get("label") or None
        limit = row.get("max_messages") or None
        row["max_messages"] = int(limit) if limit and _is_number(limit) else limit
        rows.append(row)
    return rows


def _ask_import(client, command, fields):
    """Read an export (CSV or JSON) and send it in requests of IMPORT_CHUNK handles: first all
    of them as a dry run (any address in use refuses the import before anything is made),
    then for real."""
    handles = _read_export(fields.pop("file"))[::-1]     # the oldest first, as they were made
    if not handles:
        raise BadRequest("the file holds no handles")
    # the server finds a repeat within one request; one across requests is found here
    counted = collections.Counter(str(row.get("address", "")).strip().lower() for row in handles
                                  if isinstance(row, dict))
    twice = sorted(address for address, count in counted.items() if count > 1)
    if twice:
        raise BadRequest("%s is in the file more than once; nothing was imported" % twice[0])
    chunks = [handles[n:n + IMPORT_CHUNK] for n in range(0, len(handles), IMPORT_CHUNK)]
    for dry_run in (True, False):
        for chunk in chunks:
            client.request(command.op, handles=chunk, dry_run=dry_run, **fields)
    return len(handles)


EXPORT_COLUMNS = ("address", "label", "state", "enabled", "expires", "max_messages", "created",
                  "received", "last_received", "blocked", "last_blocked", "bounced",
                  "last_bounced", "sent", "last_sent", "id")


def _show_export(handles, fields):
    """``export``: the handles as CSV (``--json``: as JSON); ``import`` reads either."""
    out = io.StringIO()
    writer = csv.DictWriter(out, EXPORT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(handles)
    return handles, out.getvalue().rstrip("\n"), "%d handles" % len(handles)


def _ask_status(client, command, fields):
    try:
        return _ask(client, command, fields)
    except ServerError as e:
        raise _NotRunning(e) from None


def _ask_stop(client, command, fields):
    pid = running_pid(client.config)
    client.request("stop")
    deadline = time.monotonic() + STOP_GRACE_SECONDS + 10
    while running_pid(client.config) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("stopped the server (pid %s)" % pid, file=sys.stderr)


# Each command of the command line: its words, the operation it asks the server for, its
# arguments (name -> the operation's field), options (flag, field, metavar, type, help),
# fields it always sends, what it is for, how it asks (``ask(client, command, fields)``) and
# how it shows the answer (the operation's ``show`` unless said). The first nine are the
# original's.
Command = collections.namedtuple("Command", "words op arguments options fixed help ask show",
                                 defaults=(_ask, None))
COMMANDS = (
    Command(("new", "account"), "new_account", (("address", "address"),), (), {},
            "make an account for <address>; prints its secret token"),
    Command(("new", "handle"), "new_handle", (("secret", "token"),), (
        ("--label", "label", "TEXT", str, "what the handle is for, e.g. shop.example.com"),
        ("--domain", "domain", "D", str, "one of [PostfixConfig] Domain (default: the first)"),
        ("--expires", "expires", "WHEN", str, "end it then: 90m, 12h, 30d, or an ISO 8601 "
         "date or time (UTC unless it says otherwise); never for no end"),
        ("--max-messages", "max_messages", "N", _count,
         "close it after N messages (needs the policy service)")),
        {}, "make a handle for the account; prints its address"),
    Command(("list",), "list_handles", (("secret", "token"),), (), {},
            "the account's handles, newest first, one per line", _ask_every_page),
    Command(("new", "handles"), "new_handles", (("secret", "token"),), (
        ("--count", "count", "N", _whole_number, "how many (up to %d)" % MAX_NEW_HANDLES),
        ("--label", "label", "TEXT", str, "what they are for"),
        ("--domain", "domain", "D", str, "one of [PostfixConfig] Domain (default: the first)"),
        ("--expires", "expires", "WHEN", str, "end them then (as for new handle)"),
        ("--max-messages", "max_messages", "N", _count, "close each after N messages")),
        {}, "make N handles in one request; prints their addresses, one per line"),
    Command(("export",), "list_handles", (("secret", "token"),), (), {},
            "the account's handles as CSV (--json: JSON), for import or a spreadsheet",
            _ask_every_page, _show_export),
    Command(("import",), "import_handles", (("secret", "token"), ("file", "file")), (), {},
            "make the handles of an export file (CSV or JSON) in the account, addresses kept; "
            "none if any address is in use", _ask_import),
    Command(("backup",), "backup", (("path", "path"),), (), {},
            "a consistent copy of the whole database at PATH, while the server runs",
            _ask_backup),
    Command(("delete", "handle"), "delete_handle", (("handle", "address"), ("secret", "token")),
            (), {}, "remove a handle (with or without its @domain)"),
    Command(("disable", "handle"), "update_handle", (("handle", "address"), ("secret", "token")),
            (), {"enabled": False}, "reject mail to a handle but keep it"),
    Command(("enable", "handle"), "update_handle", (("handle", "address"), ("secret", "token")),
            (), {"enabled": True}, "accept mail to a disabled handle again"),
    Command(("label", "handle"), "update_handle",
            (("handle", "address"), ("secret", "token"), ("text", "label")), (), {},
            "say what the handle is for"),
    Command(("expire", "handle"), "update_handle",
            (("handle", "address"), ("secret", "token"), ("when", "expires")), (), {},
            "end a handle at WHEN (90m, 12h, 30d, an ISO 8601 time) or never"),
    Command(("rotate",), "rotate_token", (("secret", "token"),), (), {},
            "replace the secret token; prints the new one"),
    Command(("delete", "account"), "delete_account", (("secret", "token"),), (), {},
            "remove the account and all its handles"),
    Command(("prune",), "prune", (), (
        ("--handles-unused-days", "handles_unused_days", "N", _days,
         "handles older than N days that never received a message (0: any age)"),
        ("--accounts-unused-days", "accounts_unused_days", "N", _days,
         "accounts older than N days whose token was never used and that have no handles"),
        ("--handles-expired-days", "handles_expired_days", "N", _days,
         "handles that expired more than N days ago"),
        ("--dry-run", "dry_run", None, None, "print what would be removed, remove nothing")),
        {}, "remove never-used handles and accounts"),
    Command(("status",), "status", (), (), {}, "is the server running: pid, counts, version",
            _ask_status),
    Command(("check",), None, (), (), {}, "check the whole installation, with fixes"),
    Command(("wire",), None, (), (
        ("--dry-run", "dry_run", None, None, "show what would change, change nothing"),
        ("--yes", "yes", None, None, "do not ask")), {},
            "set what Postfix's main.cf needs for this configuration (after showing it and "
            "asking), reload Postfix, then check"),
    Command(("example",), None, (), (), {},
            "print an example configuration file: every key, its default and meaning"),
    Command(("stop",), "stop", (), (), {}, "stop the server", _ask_stop),
    Command(("help",), None, (), (), {}, "this help; help COMMAND: the command's, e.g. help new "
            "handle"),
)


_ARGUMENT_HELP = {
    "secret": "the account's secret token, or - to read it from standard input (which keeps it "
              "out of your shell's history and of ps)",
    "handle": "the handle's address, with or without its @domain",
    "file": "a file written by export (CSV, or JSON with --json)",
    "path": "a new file; the server writes it, as its own user",
}


def _usage(command):
    words = list(command.words) + ["<%s>" % name for name, _ in command.arguments]
    words += ["[%s%s]" % (flag, " " + metavar if metavar else "")
              for flag, _, metavar, _, _ in command.options]
    return " ".join(words)


def build_parser():
    epilog = "commands:\n" + "".join(
        "  %-36s%s\n" % (_usage(c), c.help) if len(_usage(c)) < 36 else
        "  %s\n  %-36s%s\n" % (_usage(c), "", c.help) for c in COMMANDS) + _EXAMPLES
    parser = _ArgumentParser(prog="incognitomail.py", description=_DESCRIPTION, epilog=epilog,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help="machine-readable output (accepted anywhere)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    verbs = parser.add_subparsers(dest="command", metavar="command", parser_class=_ArgumentParser)
    objects = {}
    for command in COMMANDS:
        verb = command.words[0]
        if len(command.words) == 1:
            sub = verbs.add_parser(verb, help=command.help, description=command.help)
        else:
            if verb not in objects:
                kinds = "|".join(c.words[1] for c in COMMANDS if c.words[0] == verb)
                objects[verb] = verbs.add_parser(verb, help="%s %s" % (verb, kinds)).add_subparsers(
                    dest="what", metavar=kinds, required=True, parser_class=_ArgumentParser)
            sub = objects[verb].add_parser(command.words[1], help=command.help,
                                           description=command.help)
        for name, _ in command.arguments:
            sub.add_argument(name, metavar="<%s>" % name, help=_ARGUMENT_HELP.get(name))
        for flag, field, metavar, kind, text in command.options:
            if kind is None:
                sub.add_argument(flag, dest=field, action="store_true", help=text)
            else:
                sub.add_argument(flag, dest=field, metavar=metavar, type=kind, help=text)
        sub.set_defaults(chosen=command)
    return parser


_DASH_PROTECTED = "\x00"


def _normalize_argv(argv, parser):
    """Accept the original's Go-style ``-config PATH``, ``--json`` anywhere, and arguments
    that start with "-" without being options (a label, an old secret token).

    Before the command, ``-cPATH`` is the configuration; after it, only the command's own
    options are options. ``help [command]`` is ``[command] --help``."""
    wants_json = "--json" in argv
    words = [a for a in argv if not a.startswith("-")]
    if words and words[0] == "help":
        argv = [a for a in argv if a != "help"] + ["--help"]
    argv = ["--config" if a == "-config" else "--config=" + a.removeprefix("-config=")
            if a.startswith("-config=")
            else a for a in argv if a != "--json"]
    options = {flag for c in COMMANDS for flag, *_ in c.options} | {"-h", "--help"}
    normalized, seen_command = [], False
    for index, arg in enumerate(argv):
        after_option = index and argv[index - 1] in ("-c", "--config") and not seen_command
        if not seen_command and not after_option and not arg.startswith("-"):
            seen_command = True
        elif seen_command and arg.startswith("-") and arg != "-" and \
                arg.split("=", 1)[0] not in options and not arg.lstrip("-").isdigit():
            arg = _DASH_PROTECTED + arg
        normalized.append(arg)
    return (["--json"] if wants_json else []) + normalized


def _unprotect(args):
    for name, value in vars(args).items():
        if isinstance(value, str) and value.startswith(_DASH_PROTECTED):
            setattr(args, name, value[len(_DASH_PROTECTED):])
    return args


def _read_secret(value):
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise BadRequest("expected the secret token on standard input")
    return line


def run_command(config, args, out=sys.stdout):
    """Carry out one command-line command against the running server; print its result."""
    command = args.chosen
    fields = dict(command.fixed)
    for name, field in command.arguments:
        value = getattr(args, name)
        fields[field] = _read_secret(value) if name == "secret" else value
    for _, field, _, _, _ in command.options:
        if getattr(args, field) is not None:
            fields[field] = getattr(args, field)
    kinds = ("handles_unused_days", "accounts_unused_days", "handles_expired_days")
    if command.op == "prune" and not set(fields) & set(kinds):
        fields.update(zip(kinds, (config.prune_handles_unused_days,
                                  config.prune_accounts_unused_days,
                                  config.prune_handles_expired_days)))
        if set(fields.values()) <= {None, False}:
            raise BadRequest("nothing to prune: give --handles-unused-days N, "
                             "--accounts-unused-days N and/or --handles-expired-days N, or set "
                             "them in [Prune] of %s" % config.path)
    try:
        value = command.ask(ControlClient(config), command, fields)
    except _NotRunning as e:
        print(json.dumps({"running": False, "message": str(e)}, indent=2) if args.json
              else "not running: %s" % e, file=out)
        return 1
    data, text, note = (command.show or OPERATIONS[command.op].show)(value, fields)
    if args.json and data is not None:
        print(json.dumps(data, indent=2), file=out)
    elif text is not None and not args.json:
        print(text, file=out)
    if note:
        print(note, file=sys.stderr)
    return 0


def setup_logging(config=None):
    """stderr until the configuration says otherwise; syslog uses facility mail, like Postfix."""
    root = logging.getLogger("incognitomail")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if config is not None and config.log_target == "syslog":
        if not os.path.exists("/dev/log"):
            raise ConfigError("%s [General] LogTarget: syslog, but /dev/log does not exist "
                              "(is a syslog daemon running?); use LogTarget = stderr" % config.path)
        handler = logging.handlers.SysLogHandler("/dev/log",
                                                 facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(logging.Formatter(
            "incognitomail[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s incognitomail[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, (config.log_level if config else "warning").upper()))
    root.propagate = False


###############################################################################
# Data: the owner page
###############################################################################

# One self-contained page, served at / by the web listener and talking to the HTTP API: no
# framework, no external resource. Values from the server reach it as text (textContent),
# never as markup; the token lives in sessionStorage (localStorage when the owner asks to be
# remembered), never in a URL or in the page. Its style and script are allowed by their
# hashes alone.

PAGE_STYLE = """
:root {
  --bg: #f4f5f8; --card: #fff; --fg: #171a21; --muted: #5b6270; --line: #e2e5eb; --soft: #f0f2f6;
  --track: #c9ced8; --accent: #4f46e5; --accent-fg: #fff; --accent-soft: #eef0ff;
  --ok: #137a3b; --ok-soft: #e5f5eb; --warn: #8a5a00; --warn-soft: #fdf3d8;
  --bad: #b42318; --bad-fg: #fff; --bad-soft: #fdecea;
  --s1: 4px; --s2: 8px; --s3: 12px; --s4: 16px; --s5: 24px; --s6: 40px; --r: 14px; --r-sm: 9px;
  --shadow: 0 1px 2px rgba(20, 24, 40, .05), 0 4px 14px rgba(20, 24, 40, .05);
  --mono: ui-monospace, SFMono-Regular, Menlo, Consolas, "DejaVu Sans Mono", "Liberation Mono",
    monospace;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #0e1015; --card: #171a21; --fg: #e6e8ee; --muted: #9ba2b0; --line: #2a2f3a;
    --soft: #1f232c; --track: #3d4452; --accent: #8f96ff; --accent-fg: #11131a;
    --accent-soft: #22254a; --ok: #5ad68a; --ok-soft: #15301f; --warn: #f3c74f;
    --warn-soft: #342a0e; --bad: #f47a70; --bad-fg: #1a0c0b; --bad-soft: #3a1a1a; --shadow: none;
  }
}
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body {
  margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
h1, h2, h3, p, ul, ol, dl, dd { margin: 0; }
h1 { font-size: 22px; letter-spacing: -.01em; }
h2 { font-size: 17px; line-height: 1.3; }
h3 { font-size: 14px; margin-bottom: var(--s2); }
code, .mono { font-family: var(--mono); font-size: .92em; }
a { color: var(--accent); font-weight: 600; }
.muted { color: var(--muted); } .small { font-size: 13px; }
.sr-only {
  position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap; border: 0;
}
[tabindex="-1"]:focus { outline: none; }
:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
.skip-link {
  position: absolute; z-index: 10; left: var(--s2); top: var(--s2); padding: 8px 14px;
  border-radius: var(--r-sm); background: var(--accent); color: var(--accent-fg);
  transform: translateY(-200%);
}
.skip-link:focus { transform: none; }
.card {
  background: var(--card); border: 1px solid var(--line); border-radius: var(--r);
  box-shadow: var(--shadow); padding: var(--s5);
}
.card > * + *, form > * + * { margin-top: var(--s4); }
.brand { display: flex; align-items: center; gap: var(--s2); font-weight: 700; font-size: 17px; }
.logo {
  display: grid; place-items: center; width: 30px; height: 30px; border-radius: 9px;
  background: var(--accent); color: var(--accent-fg);
}
label { display: block; font-size: 13px; font-weight: 600; margin-bottom: var(--s1); }
label.check {
  display: flex; align-items: center; gap: var(--s2); font-size: 14px; font-weight: 400;
  margin-bottom: 0;
}
input, select, button { font: inherit; color: inherit; }
.check input, .sel input {
  width: 18px; height: 18px; margin: 0; accent-color: var(--accent); flex: none;
}
.input, select, .btn {
  min-height: 40px; border: 1px solid var(--line); border-radius: var(--r-sm);
  background: var(--card);
}
.input, select { width: 100%; padding: 7px 12px; }
.input:focus-visible, select:focus-visible { outline-offset: 0; border-color: var(--accent); }
.input::placeholder { color: var(--muted); opacity: .8; }
.input[aria-invalid="true"] { border-color: var(--bad); }
.btn {
  display: inline-flex; align-items: center; justify-content: center; gap: 6px; padding: 7px 14px;
  font-weight: 600; cursor: pointer; white-space: nowrap;
}
.btn:hover, .btn.ghost:hover { background: var(--soft); }
.btn.primary { background: var(--accent); border-color: var(--accent); color: var(--accent-fg); }
.btn.danger { background: var(--bad); border-color: var(--bad); color: var(--bad-fg); }
.btn.primary:hover, .btn.danger:hover { filter: brightness(1.08); }
.btn.ghost { background: transparent; border-color: transparent; }
.btn.sm { min-height: 32px; padding: 3px 10px; font-size: 13px; }
.btn.icon { min-height: 26px; padding: 1px 7px; font-size: 12px; color: var(--muted); }
.btn.link { min-height: 26px; padding: 1px 8px; font-size: 13px; color: var(--accent); }
.btn:disabled, .btn[aria-busy="true"] { opacity: .55; cursor: default; }
.btn:disabled:hover { background: var(--card); }
.row, .acts, .kv { display: flex; flex-wrap: wrap; gap: var(--s3); align-items: flex-end; }
.acts, .kv { gap: var(--s2); align-items: center; }
.field { flex: 1 1 180px; min-width: 0; } .field.grow { flex: 3 1 260px; }
.hint { margin-top: var(--s1); font-size: 12px; color: var(--muted); }
.error { color: var(--bad); font-size: 14px; font-weight: 500; }
.banner, .note { padding: 10px 14px; border-radius: var(--r-sm); background: var(--bad-soft); }
.note { background: var(--warn-soft); font-size: 14px; }
.center { min-height: 100vh; display: grid; place-items: center; padding: var(--s4); }
.signin { width: 100%; max-width: 420px; } .signin h1 { margin-top: var(--s3); }
.pw { display: flex; gap: var(--s2); } .pw .input { flex: 1; font-family: var(--mono); }
.signin .primary { width: 100%; }
.top { background: var(--card); border-bottom: 1px solid var(--line); }
.wrap { max-width: 1240px; margin: 0 auto; padding: 0 var(--s4); }
.top .wrap {
  display: flex; align-items: center; justify-content: space-between; gap: var(--s3);
  min-height: 64px;
}
.top-left {
  display: flex; align-items: center; gap: var(--s2) var(--s4); flex-wrap: wrap; min-width: 0;
}
.who, .label { font-size: 13px; color: var(--muted); overflow-wrap: anywhere; }
.who strong { color: var(--fg); font-weight: 600; }
main.wrap {
  padding-top: var(--s5); padding-bottom: var(--s6); display: grid;
  grid-template-columns: minmax(0, 1fr); gap: var(--s4);
}
.totals { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: var(--s3); }
.totals > div {
  background: var(--card); border: 1px solid var(--line); border-radius: var(--r);
  box-shadow: var(--shadow); padding: var(--s3) var(--s4); min-width: 0;
}
.totals dt {
  font-size: 12px; font-weight: 600; letter-spacing: .04em; text-transform: uppercase;
  color: var(--muted);
}
.totals dd {
  font-size: 22px; font-weight: 700; font-variant-numeric: tabular-nums; overflow-wrap: anywhere;
}
.pair { display: grid; gap: var(--s4); align-items: start; }
.stack { display: grid; gap: var(--s4); }
@media (min-width: 900px) { .pair { grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); } }
.form-foot {
  display: flex; flex-wrap: wrap; gap: var(--s3); align-items: flex-start;
  justify-content: space-between;
}
.form-foot details { flex: 1 1 120px; min-width: 0; max-width: 720px; }
.form-foot details[open] { flex-basis: 100%; }
.form-foot .primary { margin-left: auto; }
summary {
  display: inline-flex; gap: 6px; cursor: pointer; padding: 8px 4px; margin-left: -4px;
  border-radius: 6px; font-size: 14px; font-weight: 600; color: var(--muted);
}
summary::before { content: "▸"; } details[open] > summary::before { content: "▾"; }
details[open] > summary { margin-bottom: var(--s2); }
.created, .token-box, .confirm-box {
  display: grid; gap: var(--s3); padding: var(--s4); border-radius: var(--r-sm);
  background: var(--accent-soft);
}
.token-box { background: var(--warn-soft); } .confirm-box { background: var(--bad-soft); }
.big { font-family: var(--mono); font-size: 20px; font-weight: 700; overflow-wrap: anywhere; }
.head, .sub-in {
  display: flex; flex-wrap: wrap; gap: var(--s3); align-items: center;
  justify-content: space-between;
}
.count {
  margin-left: var(--s2); padding: 1px 9px; border-radius: 999px; background: var(--soft);
  font-size: 13px; font-weight: 600; color: var(--muted); vertical-align: 2px;
}
.count:empty { display: none; }
.tools { display: flex; flex-wrap: wrap; gap: var(--s2); flex: 1 1 320px; max-width: 640px; }
.tools .input { flex: 1 1 200px; width: auto; } .tools select { flex: 1 0 auto; width: auto; }
.bulk {
  display: flex; flex-wrap: wrap; align-items: center; gap: var(--s2) var(--s3);
  padding: 6px var(--s3); border-radius: var(--r-sm); background: var(--soft);
}
.bulk .acts { margin-left: auto; }
#handles { overflow-x: auto; position: relative; }
#handles.loading table { opacity: .55; }
table { width: 100%; border-collapse: collapse; font-size: 14px; }
th, td[data-label]::before {
  font-weight: 600; letter-spacing: .04em; text-transform: uppercase; color: var(--muted);
}
th {
  text-align: left; font-size: 12px; padding: 8px 6px; border-bottom: 1px solid var(--line);
  white-space: nowrap;
}
td { padding: 12px 6px; border-bottom: 1px solid var(--line); vertical-align: middle; }
tbody:hover tr.main td { background: var(--soft); }
.sel-cell { width: 30px; padding-right: 0; }
.sel { display: flex; margin: -8px; padding: 8px; cursor: pointer; }
.num { text-align: right; font-variant-numeric: tabular-nums; } .nowrap { white-space: nowrap; }
.addr-line { display: flex; align-items: center; gap: var(--s1); }
.addr { font-family: var(--mono); font-size: 13.5px; font-weight: 600; }
.label:empty::before { content: "No label"; font-style: italic; opacity: .7; }
.state { display: inline-flex; flex-wrap: wrap; gap: var(--s1); }
.sep { font-size: 0; } /* read, not shown */
.st-cell .btn { margin-left: var(--s1); }
.chip {
  display: inline-block; padding: 2px 9px; border-radius: 999px; font-size: 12px; font-weight: 600;
  white-space: nowrap; background: var(--soft); color: var(--muted);
}
.chip.ok { background: var(--ok-soft); color: var(--ok); }
.chip.warn { background: var(--warn-soft); color: var(--warn); }
.chip.bad { background: var(--bad-soft); color: var(--bad); }
.acts-cell .acts { flex-wrap: nowrap; justify-content: flex-end; }
.switch {
  position: relative; flex: none; width: 42px; height: 24px; padding: 0; border: 0;
  border-radius: 999px; background: var(--track); cursor: pointer; transition: background .15s;
}
.switch::after {
  content: ""; position: absolute; top: 3px; left: 3px; width: 18px; height: 18px;
  border-radius: 50%; background: #fff; box-shadow: 0 1px 2px rgba(0, 0, 0, .3);
  transition: transform .15s;
}
.switch[aria-pressed="true"] { background: var(--accent); }
.switch[aria-pressed="true"]::after { transform: translateX(18px); }
.switch.ended { background: var(--bad-soft); box-shadow: inset 0 0 0 2px var(--bad); }
.switch.ended::after { background: var(--bad); box-shadow: none; }
tbody.busy { opacity: .6; }
tr.sub td { background: var(--bad-soft); }
tr.edit-row td { background: var(--soft); }
.editor { display: grid; gap: var(--s3); }
.editor .field { flex-basis: 170px; } .editor .field.grow { flex-basis: 240px; }
.editor .row, details .row { align-items: flex-start; }
.field.when { flex-basis: 230px; }
.editor label { text-transform: none; letter-spacing: 0; }
.editor .input, .editor select { background: var(--card); }
.addr-q { overflow-wrap: anywhere; }
.empty { padding: var(--s5) var(--s4); color: var(--muted); max-width: 620px; margin: 0 auto; }
.empty > * + * { margin-top: var(--s2); }
.empty .lead { color: var(--fg); font-weight: 600; font-size: 16px; text-align: center; }
.empty.found { text-align: center; }
.empty a { white-space: nowrap; }
.pager {
  display: flex; flex-wrap: wrap; align-items: center; justify-content: space-between;
  gap: var(--s2) var(--s3);
}
.pager-top { justify-content: flex-end; }
.pager .acts { flex-wrap: nowrap; }
.page-info {
  font-size: 13px; color: var(--muted); font-variant-numeric: tabular-nums; white-space: nowrap;
}
.jump { display: flex; align-items: center; gap: var(--s2); margin: 0; }
.jump > * + * { margin-top: 0; }
.jump label { margin: 0; font-weight: 400; font-size: 13px; color: var(--muted); }
.jump .input { width: 76px; min-height: 32px; padding: 3px 8px; }
ol.steps, ul.where { margin: 0; padding-left: 20px; display: grid; gap: 6px; font-size: 14px; }
.steps code, .kv code {
  padding: 3px 8px; border-radius: 6px; background: var(--soft); overflow-wrap: anywhere;
}
.kv { margin-top: var(--s1); }
.steps .kv { display: inline-flex; vertical-align: middle; margin: 0 0 0 var(--s1); }
#export-note:empty { margin: 0; }
.app > * + * { margin-top: var(--s3); }
.app + .app { border-top: 1px solid var(--line); padding-top: var(--s4); }
#new-token {
  font-size: 17px; font-weight: 700; overflow-wrap: anywhere; padding: 8px 10px;
  background: var(--card); border-radius: 6px;
}
#status {
  position: fixed; left: 0; right: 0; bottom: var(--s4); margin: 0 auto; width: fit-content;
  max-width: calc(100% - 32px); padding: 8px 16px; border-radius: 18px;
  background: var(--fg); color: var(--bg); font-size: 14px; font-weight: 500;
  box-shadow: 0 6px 20px rgba(0, 0, 0, .25); overflow-wrap: anywhere;
}
#status:empty { opacity: 0; pointer-events: none; padding: 0; }
@media (min-width: 1260px) { .addr { white-space: nowrap; } .addr wbr { display: none; } }
@media (max-width: 760px) {
  .wrap { padding: 0 var(--s3); }
  .card { padding: var(--s4); }
  .top .wrap { min-height: 56px; padding-top: var(--s2); padding-bottom: var(--s2); }
  .tools { max-width: none; }
  .totals { grid-template-columns: repeat(2, minmax(0, 1fr)); gap: var(--s2); }
  .totals > div { padding: var(--s2) var(--s3); }
  .totals dd { font-size: 19px; }
  .pager { justify-content: center; }
}
@media (max-width: 1259px) {
  .addr { overflow-wrap: anywhere; }
  thead { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  table, tbody, tr, td { display: block; }
  tbody {
    border: 1px solid var(--line); border-radius: var(--r-sm); margin-top: var(--s2);
    overflow: hidden;
  }
  tbody:hover tr.main td { background: none; }
  /* a compact card: address and label; state beside the actions; counts and times below */
  tr.main {
    position: relative; display: flex; flex-wrap: wrap; align-items: center;
    gap: 2px 10px; padding: 10px 10px 10px 38px;
  }
  td { padding: 0; border: 0; }
  .sel-cell { position: absolute; left: 2px; top: 3px; width: auto; }
  .sel { margin: 0; padding: 9px; }
  .acts-cell .acts { gap: 6px; }
  .hcell { flex: 1 1 100%; }
  .st-cell { flex: 1 1 auto; order: 1; padding: 6px 0; }
  .acts-cell { order: 2; margin-left: auto; }
  tr.main::after { content: ""; order: 3; flex-basis: 100%; }
  td.num, td.nowrap { order: 4; font-size: 12.5px; color: var(--muted); }
  td[data-label]::before { content: attr(data-label); margin-right: 4px; font-size: 10.5px; }
  .st-cell[data-label]::before { content: none; }
  .num { text-align: left; }
  tr.sub td { padding: var(--s3); }
}
"""

PAGE_SCRIPT = """
"use strict";
(() => {
  const $ = (sel) => document.querySelector(sel);
  const body = document.body, table = $("#handles table");
  const KEY = "incognitomail.token", PAGE_SIZE = 50, COLUMNS = 8;
  const INVALID = "That token is not valid: check it or ask your admin for a new one";
  const UNREADABLE = "The server sent an answer this page cannot read";
  // unfilled: the server did not substitute the attribute
  const unfilled = (v) => !v || v.includes("{" + "{");
  const LISTEN_PATH = unfilled(body.dataset.listenPath) ? "/incognitomail"
    : body.dataset.listenPath;
  let domains = unfilled(body.dataset.domains) ? []
    : body.dataset.domains.split(",").map((d) => d.trim()).filter(Boolean);
  // HandleLifetime in seconds; 0: handles end only when their owner says
  const LIFETIME = unfilled(body.dataset.lifetime) ? 0 : Number(body.dataset.lifetime) || 0;
  const nf = new Intl.NumberFormat("en-US");
  const rtf = new Intl.RelativeTimeFormat("en", { numeric: "auto" });
  const rows = new Map(); // alias id -> alias object, for the rows on screen
  const selected = new Set(); // ids of the rows on screen whose box is ticked
  const DEFAULT_SORT = "-created_at";
  const newList = (seq) => ({ page: 1, last: 1, search: "", active: "", sort: DEFAULT_SORT,
    seq, ctrl: null, shown: 0, toHead: false });
  let token = null, store = null, loads = 0, creating = false, exporting = false;
  let statusTimer = 0, searchTimer = 0, createdId = null, asked = 0, list = newList(0);

  // ---- helpers: every server value goes in as text (append/textContent), never as markup ----
  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v != null && v !== false) e.setAttribute(k, String(v));
    }
    for (const k of kids) if (k != null) e.append(k);
    return e;
  }
  const button = (test, label, text, cls) => el("button",
    { type: "button", class: cls || "btn sm", "data-test": test, "aria-label": label }, text);
  function setErr(node, msg) { node.textContent = msg || ""; node.hidden = !msg; }
  function showErr(node, err) {
    if (!err || err.name === "AbortError") return;
    if (err.status === 401) return signOut(INVALID);
    setErr(node, err.message || "Something went wrong");
  }
  function status(msg) {
    $("#status").textContent = msg;
    clearTimeout(statusTimer);
    statusTimer = setTimeout(() => { $("#status").textContent = ""; }, 4000);
  }
  const sentence = (m) => (/[.!?]$/.test(m) ? m : m + ".");
  const plural = (n, one) => nf.format(n) + " " + one + (n === 1 ? "" : "s");
  const isoZ = (ms) => new Date(ms).toISOString().slice(0, 19) + "Z";
  const parseT = (s) => (s ? Date.parse(String(s).replace(" ", "T") + "Z") : NaN);
  const wsUrl = () => (location.protocol === "https:" ? "wss://" : "ws://") + location.host
    + LISTEN_PATH;
  function rel(ms) {
    const d = (ms - Date.now()) / 1000, a = Math.abs(d);
    if (a < 45) return d < 0 ? "just now" : "in a moment";
    const [unit, size] = a < 2700 ? ["minute", 60] : a < 79200 ? ["hour", 3600]
      : a < 2246400 ? ["day", 86400] : a < 27648000 ? ["month", 2592000] : ["year", 31536000];
    return rtf.format(Math.round(d / size), unit);
  }
  function when(s, none) {
    const ms = parseT(s);
    if (isNaN(ms)) return el("span", { class: "muted" }, none || "—");
    return el("time", { datetime: new Date(ms).toISOString(), title: s + " UTC" }, rel(ms));
  }
  // a datetime-local input's value (the browser's own time zone) <-> milliseconds
  const localMs = (v) => (/^[0-9]{4}-/.test(v || "") ? new Date(v).getTime() : NaN);
  function localValue(ms) {
    const d = new Date(ms), two = (n) => String(n).padStart(2, "0");
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + "T"
      + two(d.getHours()) + ":" + two(d.getMinutes());
  }

  // ---- checks of what the owner typed: the error names its field (aria-invalid) and goes
  // away as soon as that field is right again ----
  function limitProblem(input) {
    const raw = input.value.trim(), n = Number(raw);
    if (!raw && !input.validity.badInput) return null;
    return raw && Number.isInteger(n) && n >= 1 ? null
      : "Close after: enter a whole number, 1 or more (empty: no limit).";
  }
  function dateProblem(input) {
    const ms = localMs(input.value);
    if (isNaN(ms)) return "Ends: pick a date and a time.";
    if (ms <= Date.now() + 30000) return "Ends: pick a date and time in the future.";
    if (ms > Date.now() + 100 * 365.25 * 86400000) return "Ends: pick a date within 100 years.";
    return null;
  }
  function validate(node, checks) {
    for (const [input, problem] of checks) {
      const msg = problem();
      if (msg) {
        unmark(node); setErr(node, msg); node.problem = input;
        const d = input.closest("details");
        if (d) d.open = true;
        input.setAttribute("aria-invalid", "true"); input.focus();
        return false;
      }
    }
    unmark(node);
    return true;
  }
  function unmark(node) {
    if (node.problem) node.problem.removeAttribute("aria-invalid");
    node.problem = null;
  }
  function recheck(node, checks) {
    const found = node.problem && checks.find(([input]) => input === node.problem);
    if (node.problem && !(found && found[1]())) { unmark(node); setErr(node, ""); }
  }
  // the "Ends" choices: never, a duration in seconds, or "date" (the date input says when)
  function lifetimeText(seconds) { // 2592000 -> "30 days", as HandleLifetime is written
    const [size, unit] = [[604800, "week"], [86400, "day"], [3600, "hour"], [60, "minute"],
      [1, "second"]].find(([n]) => seconds % n === 0);
    return nf.format(seconds / size) + " " + unit + (seconds === size ? "" : "s");
  }
  function endsValue(sel, at) {
    const v = sel.value;
    if (v === "" || v === "never") return null;
    if (v === "date") return isoZ(localMs(at.value));
    return isoZ(Date.now() + Number(v) * 1000);
  }
  function showDate(sel, at, field, from) {
    field.hidden = sel.value !== "date";
    at.min = localValue(Date.now());
    if (!field.hidden && !at.value) at.value = localValue(from || Date.now() + 7 * 86400000);
  }

  // ---- token storage: sessionStorage, or localStorage when "Remember on this device" ----
  function stores() {
    const out = [];
    for (const n of ["sessionStorage", "localStorage"]) {
      try { out.push(window[n]); } catch (e) { /* blocked */ }
    }
    return out;
  }
  function forgetToken() {
    for (const s of stores()) { try { s.removeItem(KEY); } catch (e) { /* blocked */ } }
    store = null;
  }
  function saveToken(t, remember) {
    forgetToken();
    try {
      store = remember ? localStorage : sessionStorage; store.setItem(KEY, t);
    } catch (e) { store = null; }
  }
  function loadToken() {
    for (const s of stores()) {
      try { const v = s.getItem(KEY); if (v) { store = s; return v; } } catch (e) { /* blocked */ }
    }
    return null;
  }

  // ---- API ----
  class ApiError extends Error { constructor(msg, code) { super(msg); this.status = code; } }
  async function api(method, path, data, signal) {
    const opts = { method, signal, cache: "no-store", credentials: "omit",
      headers: { Authorization: "Bearer " + token, Accept: "application/json" } };
    if (data !== undefined) {
      opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(data);
    }
    let res, json = null;
    try { res = await fetch(path, opts); } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError("Cannot reach the server", 0);
    }
    if (res.status !== 204) { try { json = await res.json(); } catch (e) { json = null; } }
    if (res.ok) return json;
    const m = json && typeof json.message === "string" ? json.message : "", code = res.status;
    let msg = m || "Something went wrong (HTTP " + code + ")";
    if (code === 401) msg = INVALID;
    else if (code === 429) {
      const n = parseInt(res.headers.get("Retry-After"), 10);
      msg = "Too many requests: try again in " + (n >= 0 ? n : 60) + " s";
    } else if (code >= 500) {
      msg = sentence(m || "The server had a problem") + " Nothing was changed.";
    } else if (code === 422 && !m && json && json.errors) {
      msg = Object.values(json.errors).flat().join(" ");
    } else if (code === 404 && !m) msg = "Not found: it may have been deleted already";
    throw new ApiError(msg, code);
  }

  // ---- the JSON WebSocket: one connection, each request's reply matched by its id ----
  function openWs() {
    return new Promise((resolve, reject) => {
      const waiting = new Map();
      let ws = null, next = 0;
      const lost = (msg) => {
        clearTimeout(timer); reject(new Error(msg));
        for (const w of waiting.values()) w.reject(new Error(msg));
        waiting.clear();
      };
      const timer = setTimeout(() => {
        try { ws.close(); } catch (e) { /* closed */ }
        lost("Cannot reach the server");
      }, 15000);
      try { ws = new WebSocket(wsUrl()); } catch (e) { lost("Cannot reach the server"); return; }
      ws.onerror = ws.onclose = () => lost("Cannot reach the server");
      ws.onmessage = (ev) => {
        let m = null;
        try { m = JSON.parse(ev.data); } catch (e) { m = null; }
        if (!m || typeof m !== "object") return lost(UNREADABLE);
        const w = waiting.get(m.id);
        if (w) { waiting.delete(m.id); w.resolve(m); }
      };
      ws.onopen = () => {
        clearTimeout(timer);
        resolve({
          ask: (op, fields) => new Promise((res, rej) => {
            const id = ++next;
            const t = setTimeout(() => {
              waiting.delete(id); rej(new Error("Cannot reach the server"));
            }, 15000);
            waiting.set(id, { resolve: (m) => { clearTimeout(t); res(m); },
              reject: (e) => { clearTimeout(t); rej(e); } });
            ws.send(JSON.stringify(Object.assign({ id, op, token }, fields)));
          }),
          close: () => {
            ws.onerror = ws.onclose = null;
            try { ws.close(); } catch (e) { /* closed */ }
          },
        });
      };
    });
  }
  const wsRefusal = (m, what) => new ApiError(m.retry_after
    ? "Too many requests: try again in " + m.retry_after + " s"
    : sentence(m.message || what), m.error === "unauthorized" ? 401 : 0);

  // ---- sign in / out ----
  $("#signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("#token"), btn = $("#sign-in"), err = $("#sign-in-error");
    const t = input.value.trim();
    setErr(err, "");
    if (!t) { setErr(err, "Paste your token first"); input.focus(); return; }
    if (btn.getAttribute("aria-busy")) return;
    btn.setAttribute("aria-busy", "true"); btn.textContent = "Signing in…"; token = t;
    try {
      const acc = await api("GET", "/api/v1/account-details");
      saveToken(t, $("#remember").checked);
      input.value = ""; input.type = "password";
      enter(acc);
    } catch (e) {
      token = null; setErr(err, e.message || "Something went wrong"); input.focus();
    } finally { btn.removeAttribute("aria-busy"); btn.textContent = "Sign in"; }
  });
  $("#token-toggle").addEventListener("click", () => {
    const input = $("#token"), b = $("#token-toggle"), show = input.type === "password";
    input.type = show ? "text" : "password"; b.textContent = show ? "Hide" : "Show";
    b.setAttribute("aria-pressed", String(show));
    b.setAttribute("aria-label", show ? "Hide token" : "Show token");
  });
  $("#sign-out").addEventListener("click", () => { signOut(""); status("Signed out"); });

  function signOut(msg) {
    token = null; forgetToken();
    if (list.ctrl) list.ctrl.abort();
    list = newList(list.seq + 1);
    rows.clear(); selected.clear(); createdId = null;
    table.querySelectorAll("tbody").forEach((t) => t.remove());
    resetNewForm();
    for (const id of ["#search", "#filter", "#created-input"]) $(id).value = "";
    $("#sort").value = DEFAULT_SORT;
    for (const id of ["#target", "#created-address", "#new-token", "#export-note"]) {
      $(id).textContent = "";
    }
    showTotals({});
    for (const id of ["#created", "#new-token-box", "#rotate-confirm", "#bulk-confirm", "#app"]) {
      $(id).hidden = true;
    }
    for (const id of ["#error", "#create-error", "#rotate-error", "#export-error",
      "#bulk-error"]) setErr($(id), "");
    $("#signin-view").hidden = false; body.dataset.state = "signed-out";
    setErr($("#sign-in-error"), msg); $("#token").focus();
  }

  function enter(acc) {
    const d = (acc && acc.data) || {};
    $("#target").textContent = d.username || "your address";
    showTotals(d);
    if (!domains.length && d.default_alias_domain) domains = [d.default_alias_domain];
    if (unfilled(body.dataset.domains)) {
      api("GET", "/api/v1/domain-options").then((r) => {
        if (r && Array.isArray(r.data) && r.data.length) { domains = r.data; setupDomains(); }
      }).catch(() => { /* keep the account's default domain */ });
    }
    setupDomains();
    $("#signin-view").hidden = true; $("#app").hidden = false; body.dataset.state = "signed-in";
    $("#app-title").focus();
    loadList();
  }

  function setupDomains() {
    $("#new-domain").replaceChildren(...domains.map((d) => el("option", { value: d }, d)));
    $("#domain-field").hidden = domains.length < 2;
    $("#bw-domain").textContent = domains[0] || "—";
    $("#bitwarden-url").textContent = location.origin;
    $("#addon-url").textContent = wsUrl();
  }

  // ---- the account's totals, first on the page ----
  function showTotals(d) {
    const show = (id, n) => { $(id).textContent = Number.isFinite(n) ? nf.format(n) : "–"; };
    show("#sum-handles", d.total_aliases); show("#sum-received", d.total_emails_forwarded);
    show("#sum-blocked", d.total_emails_blocked); show("#sum-bounced", d.total_emails_bounced);
  }
  function loadTotals() {
    const who = token;
    api("GET", "/api/v1/account-details").then((r) => {
      if (token === who) showTotals((r && r.data) || {});
    }).catch(() => { /* the next action says what is wrong */ });
  }

  // ---- in-page links (skip links, "Connect your apps"): move the focus there ----
  document.addEventListener("click", (ev) => {
    const a = ev.target.closest("a[href^='#']");
    const to = a && document.getElementById(a.getAttribute("href").slice(1));
    if (!to) return;
    ev.preventDefault();
    if (!to.matches("input, select, button, [tabindex]")) to.setAttribute("tabindex", "-1");
    to.focus();
  });

  // ---- create ----
  const newForm = $("#new-form"), createErr = $("#create-error");
  const newChecks = () => [
    [$("#new-expires-at"), () => ($("#new-expires").value === "date"
      ? dateProblem($("#new-expires-at")) : null)],
    [$("#new-max"), () => limitProblem($("#new-max"))]];
  function resetNewForm() { // as a new visitor sees it
    newForm.reset(); $("#new-options").open = false; $("#new-expires-at-field").hidden = true;
    unmark(createErr); setErr(createErr, "");
  }
  if (LIFETIME) { // the server ends new handles unless told otherwise: say so, offer Never
    const first = $("#new-expires").options[0];
    first.textContent = "In " + lifetimeText(LIFETIME) + " (this server's default)";
    first.after(new Option("Never", "never"));
  }
  $("#new-expires").addEventListener("change", () => {
    showDate($("#new-expires"), $("#new-expires-at"), $("#new-expires-at-field"));
  });
  newForm.addEventListener("input", () => recheck(createErr, newChecks()));
  newForm.addEventListener("change", () => recheck(createErr, newChecks()));
  newForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const btn = $("#create"), maxIn = $("#new-max"), req = {};
    if (creating) return;
    setErr(createErr, "");
    if (!validate(createErr, newChecks())) return;
    if (domains.length) req.domain = domains.length > 1 ? $("#new-domain").value : domains[0];
    const label = $("#new-label").value.trim(), raw = maxIn.value.trim();
    if (label) req.description = label;
    const ends = endsValue($("#new-expires"), $("#new-expires-at"));
    if (ends || $("#new-expires").value === "never") req.expires_at = ends; // "": the default
    if (raw) req.max_messages = Number(raw);
    creating = true; btn.setAttribute("aria-busy", "true");
    try {
      const a = ((await api("POST", "/api/v1/aliases", req)) || {}).data || {};
      resetNewForm();
      createdId = a.id == null ? null : String(a.id);
      $("#created-address").textContent = a.email || "";
      $("#created-fallback").hidden = true; $("#created").hidden = false;
      $("#copy-created").focus();
      status("Created " + (a.email || "a new handle"));
      list.page = 1; loadList(); loadTotals();
    } catch (e) { showErr(createErr, e); } finally {
      creating = false; btn.removeAttribute("aria-busy");
    }
  });
  function forgetCreated(ids) { // "Your new address" offers no handle that is gone
    if (createdId === null || !ids.map(String).includes(createdId)) return;
    createdId = null; $("#created").hidden = true; $("#created-address").textContent = "";
    $("#created-input").value = "";
  }

  // ---- copy: the clipboard API, else select the text and ask for Ctrl+C ----
  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text); status("Copied"); return true;
    } catch (e) { return false; }
  }
  function selectFallback(node) {
    window.getSelection().selectAllChildren(node); status("Selected: press Ctrl+C to copy");
  }
  $("#copy-created").addEventListener("click", async () => {
    const addr = $("#created-address").textContent, inp = $("#created-input");
    if (await copyText(addr)) return;
    inp.value = addr; $("#created-fallback").hidden = false;
    inp.focus(); inp.select(); status("Press Ctrl+C to copy");
  });
  document.addEventListener("click", async (ev) => {
    const b = ev.target.closest("[data-copy]");
    const target = b && document.getElementById(b.dataset.copy);
    if (target && !(await copyText(target.textContent))) selectFallback(target);
  });

  // ---- the list: one page of 50 from the server, in the order chosen ----
  function isEnded(a) { const st = a.state; return st === "expired" || st === "used up"; }
  function stateOf(a) {
    const st = a.state || (a.active ? "enabled" : "disabled");
    if (st === "expired") return [["Expired " + String(a.expires_at || "").slice(0, 10)], "bad"];
    if (st === "used up") return [["Used up"], "bad"];
    if (st === "disabled" || !a.active) return [["Off"], "off"];
    const parts = [];
    if (a.max_messages) {
      parts.push((a.emails_forwarded || 0) + " of " + a.max_messages + " messages");
    }
    if (a.expires_at) parts.push("Expires " + rel(parseT(a.expires_at)));
    return parts.length ? [parts, "warn"] : [["Active"], "ok"];
  }

  function replies(a) { // what went through the milter (bounces, the owner's mail), if any
    const bounced = a.emails_bounced || 0, sent = a.emails_replied || 0;
    if (!bounced && !sent) return null;
    return el("div", { class: "label", "data-test": "replies" },
      bounced ? nf.format(bounced) + " bounced, last " : null,
      bounced ? when(a.last_bounced) : null, bounced && sent ? " · " : null,
      sent ? nf.format(sent) + " sent from it" : null);
  }

  function renderRow(a) {
    const id = String(a.id);
    rows.set(id, a);
    const email = String(a.email || a.local_part + "@" + a.domain), at = email.lastIndexOf("@");
    const [parts, stClass] = stateOf(a), ended = isEnded(a), expired = a.state === "expired";
    const ends = a.expires_at ? "Ends " + a.expires_at + " UTC" : null;
    const chips = parts.flatMap((p, i) => [i ? el("span", { class: "sep" }, " · ") : null,
      el("span", { class: "chip " + stClass }, p)]);
    const box = el("input", { type: "checkbox", "data-test": "select",
      "aria-label": "Select " + email });
    box.checked = selected.has(id);
    return el("tbody", { "data-handle-id": id },
      el("tr", { class: "main" },
        el("td", { class: "sel-cell" }, el("label", { class: "sel" }, box)),
        el("td", { class: "hcell" },
          el("div", { class: "addr-line" },
            el("span", { class: "addr", "data-test": "address" },
              email.slice(0, at), el("wbr"), email.slice(at)),
            button("copy", "Copy " + email, "Copy", "btn ghost icon")),
          el("div", { class: "label", "data-test": "label" }, a.description || ""),
          replies(a)),
        el("td", { class: "st-cell", "data-label": "State" },
          el("span", { class: "state", "data-test": "state", title: ends }, ...chips),
          ended ? button("revive", (expired ? "Extend " : "Raise the message limit of ") + email,
            expired ? "Extend" : "Raise limit", "btn ghost link") : null),
        el("td", { class: "num", "data-label": "Received", "data-test": "received" },
          nf.format(a.emails_forwarded || 0)),
        el("td", { class: "num", "data-label": "Blocked", "data-test": "blocked" },
          nf.format(a.emails_blocked || 0)),
        el("td", { class: "nowrap", "data-label": "Last received" },
          when(a.last_forwarded, "Never")),
        el("td", { class: "nowrap", "data-label": "Created" }, when(a.created_at)),
        el("td", { class: "acts-cell" }, el("div", { class: "acts" },
          // an ended handle's switch says so and opens what revives it
          el("button", { type: "button", class: ended ? "switch ended" : "switch",
            "data-test": "toggle", "aria-pressed": ended ? null : String(!!a.active),
            "aria-label": "Forwarding for " + email + (ended ? ": ended" : ""),
            title: ended ? (expired ? "Ended: extend it to forward again"
              : "Ended: raise its limit to forward again")
              : a.active ? "On: switch off" : "Off: switch on" }),
          button("edit", "Edit " + email, "Edit"),
          button("delete", "Delete " + email, "Delete")))));
  }

  async function loadList() {
    const seq = ++list.seq, box = $("#handles");
    if (list.ctrl) list.ctrl.abort();
    const ctrl = (list.ctrl = new AbortController());
    const q = new URLSearchParams({ "page[number]": list.page, "page[size]": PAGE_SIZE });
    if (list.search) q.set("filter[search]", list.search);
    if (list.active) q.set("filter[active]", list.active);
    if (list.sort !== DEFAULT_SORT) q.set("sort", list.sort);
    box.classList.add("loading"); box.setAttribute("aria-busy", "true");
    try {
      const r = await api("GET", "/api/v1/aliases?" + q, undefined, ctrl.signal);
      const m = (r && r.meta) || {};
      if (seq !== list.seq) return;
      // the page emptied under us, or was past the last
      if (r && Array.isArray(r.data) && !r.data.length && list.page > 1 && m.total) {
        list.page = Math.max(1, Math.min(list.page - 1, m.last_page || 1));
        return loadList();
      }
      renderList(r);
      setErr($("#error"), "");
    } catch (e) {
      if (seq === list.seq) showErr($("#error"), e);
    } finally {
      if (seq === list.seq) {
        box.classList.remove("loading"); box.removeAttribute("aria-busy");
        body.dataset.loaded = String(++loads);
      }
    }
  }

  function emptyState(filtered) {
    if (filtered) return [el("p", { class: "lead" }, "No handle matches")];
    return [
      el("p", { class: "lead" }, "No handles yet — make your first one above"),
      el("p", {}, "A handle is an address of your own that forwards to your real one. Give "
        + "each website its own: paste it into the sign-up form instead of your address."),
      el("p", {}, "If one starts getting spam, switch it off: the others go on working, and "
        + "you know which website gave it away."),
      el("p", {}, "Bitwarden can make one for you each time you sign up: see ",
        el("a", { href: "#apps-h" }, "Connect your apps"), ".")];
  }

  function renderList(r) {
    const data = Array.isArray(r && r.data) ? r.data : [], m = (r && r.meta) || {};
    const total = Number.isFinite(m.total) ? m.total : data.length;
    const filtered = list.search || list.active;
    list.page = m.current_page || list.page; list.last = m.last_page || 1;
    list.shown = data.length;
    rows.clear();
    const ids = new Set(data.map((a) => String(a.id)));
    for (const id of [...selected]) if (!ids.has(id)) selected.delete(id);
    const frag = document.createDocumentFragment();
    for (const a of data) frag.append(renderRow(a));
    table.querySelectorAll("tbody").forEach((t) => t.remove());
    table.append(frag);
    table.hidden = $("#pager").hidden = $("#bulk").hidden = !data.length;
    $("#empty").hidden = !!data.length;
    $("#empty").classList.toggle("found", !!filtered);
    $("#empty").replaceChildren(...(data.length ? [] : emptyState(filtered)));
    const from = m.from || (list.page - 1) * PAGE_SIZE + 1, to = m.to || from + data.length - 1;
    $("#page-info").textContent = data.length
      ? nf.format(from) + "–" + nf.format(to) + " of " + nf.format(total) : "";
    $("#total").textContent = nf.format(total) + (filtered ? " found" : "");
    $("#total-sep").hidden = false;
    showPager(data.length);
    showSelection();
    if (list.toHead) { list.toHead = false; $("#list-h").focus(); }
  }

  function showPager(shown) {
    const focused = document.activeElement, many = list.last > 1;
    const at = "Page " + nf.format(list.page) + " of " + nf.format(list.last);
    $("#pager-top").hidden = !shown || !many;
    $("#pager-buttons").hidden = $("#jump-form").hidden = !many;
    $("#page-info-top").textContent = at;
    $("#page-jump").value = list.page; $("#page-jump").max = list.last;
    $("#page-of").textContent = "of " + nf.format(list.last);
    for (const id of ["#first", "#prev", "#prev-top"]) $(id).disabled = list.page <= 1;
    for (const id of ["#next", "#last", "#next-top"]) $(id).disabled = list.page >= list.last;
    // a pager button that just went off hands the focus to one that still works
    if (focused && focused.disabled && focused.closest(".pager")) {
      const bs = [...focused.closest(".pager").querySelectorAll("button[type=button]")];
      const near = bs.filter((b) => !b.disabled)
        .sort((x, y) => Math.abs(bs.indexOf(x) - bs.indexOf(focused))
          - Math.abs(bs.indexOf(y) - bs.indexOf(focused)))[0];
      (near || $("#list-h")).focus();
    }
  }

  function go(page, toHead) {
    page = Math.max(1, Math.min(page, list.last));
    if (page === list.page) return;
    list.page = page; list.toHead = toHead; loadList();
  }
  $("#search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      list.search = $("#search").value.trim(); list.page = 1; loadList();
    }, 250);
  });
  $("#filter").addEventListener("change", () => {
    list.active = $("#filter").value; list.page = 1; loadList();
  });
  $("#sort").addEventListener("change", () => {
    list.sort = $("#sort").value; list.page = 1; loadList();
  });
  $("#first").addEventListener("click", () => go(1, true));
  $("#prev").addEventListener("click", () => go(list.page - 1, true));
  $("#next").addEventListener("click", () => go(list.page + 1, true));
  $("#last").addEventListener("click", () => go(list.last, true));
  $("#prev-top").addEventListener("click", () => go(list.page - 1, false));
  $("#next-top").addEventListener("click", () => go(list.page + 1, false));
  $("#jump-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const n = Math.round(Number($("#page-jump").value));
    if (!n) { $("#page-jump").value = list.page; return; }
    go(n, true);
    $("#page-jump").value = Math.max(1, Math.min(n, list.last));
  });

  // ---- select rows, then switch them off or on, or delete them, in one request ----
  function showSelection() {
    const n = selected.size, all = $("#select-all");
    setErr($("#bulk-error"), "");
    all.checked = n > 0 && n === rows.size; all.indeterminate = n > 0 && n < rows.size;
    $("#selected-count").textContent = n ? nf.format(n) + " selected" : "";
    for (const id of ["#bulk-off", "#bulk-on", "#bulk-delete"]) $(id).disabled = !n;
    if (n !== asked) $("#bulk-confirm").hidden = true; // it named another number
    table.querySelectorAll("[data-test=select]").forEach((b) => {
      b.checked = selected.has(b.closest("tbody").dataset.handleId);
    });
  }
  table.addEventListener("change", (ev) => {
    const tb = ev.target.closest("tbody[data-handle-id]");
    if (tb && ev.target.matches("[data-test=select]")) {
      if (ev.target.checked) selected.add(tb.dataset.handleId);
      else selected.delete(tb.dataset.handleId);
      showSelection();
    }
  });
  $("#select-all").addEventListener("change", () => {
    selected.clear();
    if ($("#select-all").checked) for (const id of rows.keys()) selected.add(id);
    showSelection();
  });
  const BULK = {
    off: ["deactivate", "Switched off ", "All of them were off already"],
    on: ["activate", "Switched on ", "All of them were on already"],
    delete: ["delete", "Deleted ", "They were deleted already"] };
  async function bulk(kind, btn) {
    const [path, done, none] = BULK[kind], ids = [...selected].map(Number);
    if (!ids.length || btn.getAttribute("aria-busy")) return;
    btn.setAttribute("aria-busy", "true");
    try {
      const r = await api("POST", "/api/v1/aliases/" + path + "/bulk", { ids });
      const n = Array.isArray(r && r.ids) ? r.ids.length : ids.length;
      status(done + plural(n, "handle"));
      if (kind === "delete") {
        forgetCreated(ids); selected.clear(); asked = 0; $("#bulk-confirm").hidden = true;
        if (list.shown === ids.length && list.page > 1) list.page--;
        $("#list-h").focus(); loadTotals();
      }
    } catch (e) {
      if (e.status !== 404) return showErr($("#bulk-error"), e);
      status(none);
    } finally { btn.removeAttribute("aria-busy"); }
    await loadList();
  }
  $("#bulk-off").addEventListener("click", (ev) => bulk("off", ev.currentTarget));
  $("#bulk-on").addEventListener("click", (ev) => bulk("on", ev.currentTarget));
  $("#bulk-delete").addEventListener("click", () => {
    const n = (asked = selected.size), what = plural(n, "handle");
    $("#bulk-q").textContent = "Delete " + what + "? Mail to " + (n === 1 ? "it" : "them")
      + " will be refused, and this cannot be undone.";
    $("#confirm-bulk-delete").textContent = "Delete " + what;
    $("#bulk-confirm").hidden = false; $("#cancel-bulk-delete").focus();
  });
  const closeBulk = () => {
    asked = 0; $("#bulk-confirm").hidden = true; $("#bulk-delete").focus();
  };
  $("#cancel-bulk-delete").addEventListener("click", closeBulk);
  $("#bulk-confirm").addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeBulk(); });
  $("#confirm-bulk-delete").addEventListener("click",
    (ev) => bulk("delete", ev.currentTarget));

  // ---- row actions: errors, the editor and the delete confirmation appear in an extra row of
  // the handle ----
  function rowMsg(tb, err) {
    tb.querySelectorAll("tr.sub").forEach((t) => t.remove());
    if (!err || err.name === "AbortError") return;
    if (err.status === 401) return signOut(INVALID);
    tb.append(el("tr", { class: "sub" }, el("td", { colspan: COLUMNS },
      el("p", { class: "error", role: "alert", "data-test": "row-error" },
        err.message || "Something went wrong"))));
  }
  function replaceRow(tb, a, focusTest) {
    const nt = renderRow(a), act = document.activeElement;
    const refocus = tb.contains(act) || act === body;
    tb.replaceWith(nt);
    if (refocus) nt.querySelector("[data-test=" + focusTest + "]").focus();
  }
  async function run(tb, fn) {
    if (tb.classList.contains("busy")) return;
    tb.classList.add("busy");
    try { await fn(); } catch (e) { rowMsg(tb, e); } finally { tb.classList.remove("busy"); }
  }
  const toggle = (tb, a) => run(tb, async () => {
    let na;
    if (a.active) {
      await api("DELETE", "/api/v1/active-aliases/" + encodeURIComponent(a.id));
      na = Object.assign({}, a, { active: false, state: "disabled" });
    } else {
      const r = await api("POST", "/api/v1/active-aliases", { id: a.id });
      na = (r && r.data) || Object.assign({}, a, { active: true, state: "enabled" });
    }
    replaceRow(tb, na, "toggle");
    status((na.active ? "Switched on " : "Switched off ") + na.email);
  });
  const revive = (tb, a) => startEdit(tb, a, a.state === "expired" ? "ends" : "limit");

  // the editor: label, end, message limit, and how it refuses mail once off or ended
  const part = (tb, test) => tb.querySelector("[data-test=" + test + "]");
  const editChecks = (tb) => [
    [part(tb, "ends-at"), () => (part(tb, "ends").value === "date"
      ? dateProblem(part(tb, "ends-at")) : null)],
    [part(tb, "limit"), () => limitProblem(part(tb, "limit"))]];
  function field(input, text, hint) {
    const hintId = hint ? input.id + "-hint" : null;
    if (hint) {
      input.setAttribute("aria-describedby", hintId + " " + input.id.split("-")[0] + "-err");
    }
    return el("div", { class: input.type === "datetime-local" ? "field when" : "field" },
      el("label", { for: input.id }, text), input,
      hint ? el("p", { id: hintId, class: "hint" }, hint) : null);
  }
  function startEdit(tb, a, focusTest) {
    if (!part(tb, "label-input")) {
      rowMsg(tb, null);
      const p = "e" + a.id, email = String(a.email), expired = a.state === "expired";
      const o = (v, t) => el("option", { value: v }, t);
      const label = el("input", { id: p + "-label", type: "text", class: "input",
        "data-test": "label-input", placeholder: "What is it for?", autocomplete: "off" });
      label.value = a.description || "";
      const ends = el("select", { id: p + "-ends", "data-test": "ends" },
        a.expires_at ? o("keep", (expired ? "Unchanged: ended " : "Unchanged: ")
          + String(a.expires_at).slice(0, 16) + " UTC") : null,
        o("never", "Never"), o("3600", "In 1 hour"), o("86400", "In 1 day"),
        o("604800", "In 7 days"), o("2592000", "In 30 days"), o("date", "On a date…"));
      const at = el("input", { id: p + "-at", type: "datetime-local", class: "input",
        "data-test": "ends-at" });
      const atField = field(at, "End date and time", "In your own time zone");
      atField.hidden = true;
      const limit = el("input", { id: p + "-limit", type: "number", class: "input", min: 1,
        step: 1, inputmode: "numeric", placeholder: "No limit", "data-test": "limit" });
      limit.value = a.max_messages || "";
      const refuse = el("select", { id: p + "-refuse", "data-test": "refuse" },
        o("", "Server's choice"), o("true", "Yes: as if it never existed"),
        o("false", "No: say it is off or ended"));
      refuse.value = a.refuse_as_unknown == null ? "" : String(a.refuse_as_unknown);
      const err = el("p", { id: p + "-err", class: "error", role: "alert",
        "data-test": "edit-error", hidden: true });
      const why = !isEnded(a) ? null : el("p", { class: "note", "data-test": "ended-note" },
        expired ? "It ended " + String(a.expires_at).slice(0, 16) + " UTC and refuses mail. "
          + "Pick a new end, or Never, and it forwards again."
          : "It has received the " + plural(a.max_messages || 0, "message") + " it accepts "
          + "and refuses more. Raise the limit, or empty it, and it forwards again.");
      tb.append(el("tr", { class: "sub edit-row" }, el("td", { colspan: COLUMNS },
        el("div", { class: "editor", role: "group", "aria-label": "Edit " + email }, why,
          el("div", { class: "row" },
            el("div", { class: "field grow" }, el("label", { for: label.id }, "Label"), label),
            field(ends, "Ends"), atField,
            field(limit, "Close after N messages", "Received so far: "
              + nf.format(a.emails_forwarded || 0)),
            field(refuse, "Refuse as if unknown", "When it is off or ended")),
          err,
          el("div", { class: "acts" }, button("save-edit", "Save " + email, "Save",
            "btn sm primary"), button("cancel-edit", null, "Cancel"))))));
    }
    const f = part(tb, focusTest || "label-input");
    f.focus();
    if (f === part(tb, "label-input")) f.select();
  }
  function endEdit(tb) {
    tb.querySelectorAll("tr.edit-row").forEach((n) => n.remove());
    part(tb, "edit").focus();
  }
  async function saveEdit(tb, a) {
    const err = part(tb, "edit-error"), btn = part(tb, "save-edit"), patch = {};
    if (tb.classList.contains("busy")) return;
    setErr(err, "");
    if (!validate(err, editChecks(tb))) return;
    const label = part(tb, "label-input").value.trim(), ends = part(tb, "ends").value;
    const raw = part(tb, "limit").value.trim(), limit = raw ? Number(raw) : null;
    const refuse = part(tb, "refuse").value, refusing = refuse === "" ? null : refuse === "true";
    if (label !== (a.description || "")) patch.description = label;
    if (ends !== "keep" && (ends !== "never" || a.expires_at)) {
      patch.expires_at = endsValue(part(tb, "ends"), part(tb, "ends-at"));
    }
    if (limit !== (a.max_messages || null)) patch.max_messages = limit;
    if (refusing !== (a.refuse_as_unknown == null ? null : a.refuse_as_unknown)) {
      patch.refuse_as_unknown = refusing;
    }
    if (!Object.keys(patch).length) return endEdit(tb);
    tb.classList.add("busy"); btn.setAttribute("aria-busy", "true");
    try {
      const r = await api("PATCH", "/api/v1/aliases/" + encodeURIComponent(a.id), patch);
      const na = (r && r.data) || Object.assign({}, a, patch);
      replaceRow(tb, na, "edit");
      const st = na.state;
      status(!isEnded(a) || st === "expired" || st === "used up" ? "Saved"
        : st === "disabled" ? "Saved: switch it on to forward again"
          : "Saved: " + na.email + " forwards again");
    } catch (e) { showErr(err, e); } finally {
      tb.classList.remove("busy"); btn.removeAttribute("aria-busy");
    }
  }
  table.addEventListener("input", (ev) => {
    const tb = ev.target.closest("tbody[data-handle-id]");
    if (tb && part(tb, "edit-error")) recheck(part(tb, "edit-error"), editChecks(tb));
  });
  table.addEventListener("change", (ev) => {
    const tb = ev.target.closest("tbody[data-handle-id]"), a = tb && rows.get(tb.dataset.handleId);
    if (!a || !part(tb, "edit-error")) return;
    if (ev.target.matches("[data-test=ends]")) {
      const exp = parseT(a.expires_at);
      showDate(ev.target, part(tb, "ends-at"), part(tb, "ends-at").closest(".field"),
        exp > Date.now() ? exp : Date.now() + 30 * 86400000);
    }
    recheck(part(tb, "edit-error"), editChecks(tb));
  });

  function askDelete(tb, a) {
    rowMsg(tb, null);
    const email = String(a.email);
    const cancel = button("cancel-delete", null, "Cancel");
    tb.append(el("tr", { class: "sub" }, el("td", { colspan: COLUMNS },
      el("div", { class: "sub-in", role: "group", "aria-label": "Confirm delete" },
        el("p", { class: "addr-q" }, "Delete " + email + "? Mail to it will be refused."),
        el("div", { class: "acts" },
          button("confirm-delete", "Delete " + email + " for good", "Delete", "btn sm danger"),
          cancel)))));
    cancel.focus();
  }
  function cancelDelete(tb) { rowMsg(tb, null); part(tb, "delete").focus(); }
  const doDelete = (tb, a) => run(tb, async () => {
    await api("DELETE", "/api/v1/aliases/" + encodeURIComponent(a.id));
    status("Deleted " + a.email);
    forgetCreated([a.id]); selected.delete(String(a.id));
    if (list.shown === 1 && list.page > 1) list.page--;
    $("#list-h").focus();
    loadTotals();
    await loadList();
  });

  const actions = { toggle: (tb, a) => (isEnded(a) ? revive(tb, a) : toggle(tb, a)), revive,
    "edit": (tb, a) => startEdit(tb, a), "save-edit": saveEdit, "cancel-edit": endEdit,
    "delete": askDelete, "confirm-delete": doDelete, "cancel-delete": cancelDelete,
    "copy": (tb, a) => copyText(a.email)
      .then((ok) => ok || selectFallback(part(tb, "address"))) };
  table.addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-test]");
    const tb = ev.target.closest("tbody[data-handle-id]");
    const a = tb && rows.get(tb.dataset.handleId), fn = b && actions[b.dataset.test];
    if (a && fn) fn(tb, a);
  });
  table.addEventListener("keydown", (ev) => {
    const tb = ev.target.closest("tbody[data-handle-id]"), a = tb && rows.get(tb.dataset.handleId);
    if (!a) return;
    const editing = ev.target.closest(".editor");
    if (editing && ev.key === "Enter" && ev.target.matches("input")) {
      ev.preventDefault(); saveEdit(tb, a);
    } else if (editing && ev.key === "Escape") {
      ev.preventDefault(); endEdit(tb);
    } else if (ev.key === "Escape" && part(tb, "confirm-delete")) {
      ev.preventDefault(); cancelDelete(tb);
    }
  });

  // ---- export: every handle, over the JSON WebSocket 100 at a time, as the command line's
  // export writes them (CSV, or JSON with --json) ----
  const EXPORT_COLUMNS = ["address", "label", "state", "enabled", "expires", "max_messages",
    "created", "received", "last_received", "blocked", "last_blocked", "bounced",
    "last_bounced", "sent", "last_sent", "id"];
  function csvCell(v) { // as Python's csv module writes str(v)
    const s = v == null ? "" : v === true ? "True" : v === false ? "False" : String(v);
    return /[",\\r\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  const toCsv = (hs) => [EXPORT_COLUMNS.join(",")]
    .concat(hs.map((h) => EXPORT_COLUMNS.map((c) => csvCell(h[c])).join(","))).join("\\n") + "\\n";
  // as Python's json.dumps(indent=2) writes it: ASCII only
  const toJson = (hs) => JSON.stringify(hs, null, 2).replace(/[\\u007f-\\uffff]/g,
    (c) => "\\\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")) + "\\n";
  function download(text, name, type) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = el("a", { href: url, download: name, hidden: true });
    body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  }
  async function exportAs(kind, btn) {
    const note = $("#export-note"), err = $("#export-error"), who = token;
    if (exporting) return;
    exporting = true; btn.setAttribute("aria-busy", "true");
    setErr(err, ""); note.textContent = "Reading your handles…";
    let ws = null;
    try {
      ws = await openWs();
      const all = [];
      for (let before = null; ;) {
        const m = await ws.ask("list_handles", before === null ? { limit: 100 }
          : { before, limit: 100 });
        if (!m.ok) throw wsRefusal(m, "The handles could not be read");
        if (!Array.isArray(m.handles)) throw new Error(UNREADABLE);
        all.push(...m.handles);
        note.textContent = "Read " + plural(all.length, "handle") + "…";
        if (m.next == null || m.next === before) break;
        before = m.next;
      }
      if (token !== who) return;
      const name = "incognitomail-handles-" + new Date().toISOString().slice(0, 10) + "." + kind;
      download(kind === "csv" ? toCsv(all) : toJson(all), name,
        kind === "csv" ? "text/csv;charset=utf-8" : "application/json");
      note.textContent = "Saved " + plural(all.length, "handle") + " as " + name + ".";
    } catch (e) { note.textContent = ""; showErr(err, e); } finally {
      if (ws) ws.close();
      exporting = false; btn.removeAttribute("aria-busy");
    }
  }
  $("#export-csv").addEventListener("click", (ev) => exportAs("csv", ev.currentTarget));
  $("#export-json").addEventListener("click", (ev) => exportAs("json", ev.currentTarget));

  // ---- token rotation: one request over the JSON WebSocket ----
  async function rotateOverWs(old) {
    const ws = await openWs();
    try {
      const m = await ws.ask("rotate_token", { token: old });
      if (m.ok && typeof m.token === "string" && m.token) return m.token;
      throw new Error(m.retry_after ? "Too many requests: try again in " + m.retry_after + " s"
        : sentence(m.message || "The token was not rotated") + " Your old token still works.");
    } finally { ws.close(); }
  }
  const rotateBox = $("#rotate-confirm");
  const closeRotate = () => { rotateBox.hidden = true; $("#rotate").focus(); };
  $("#rotate").addEventListener("click", () => {
    setErr($("#rotate-error"), ""); rotateBox.hidden = false; $("#cancel-rotate").focus();
  });
  $("#cancel-rotate").addEventListener("click", closeRotate);
  rotateBox.addEventListener("keydown", (ev) => { if (ev.key === "Escape") closeRotate(); });
  $("#confirm-rotate").addEventListener("click", async () => {
    const btn = $("#confirm-rotate");
    if (btn.getAttribute("aria-busy")) return;
    btn.setAttribute("aria-busy", "true");
    try {
      const fresh = await rotateOverWs(token);
      token = fresh; // keep it where the old one was
      try { if (store) store.setItem(KEY, fresh); } catch (e) { /* memory only */ }
      rotateBox.hidden = true; $("#new-token").textContent = fresh;
      $("#new-token-box").hidden = false; $("#copy-token").focus(); status("New token made");
    } catch (e) { setErr($("#rotate-error"), e.message); } finally {
      btn.removeAttribute("aria-busy");
    }
  });
  $("#hide-token").addEventListener("click", () => {
    $("#new-token").textContent = ""; $("#new-token-box").hidden = true; $("#rotate").focus();
  });

  // ---- start ----
  const insecure = location.protocol === "http:"
    && !["localhost", "127.0.0.1", "[::1]"].includes(location.hostname);
  document.querySelectorAll(".insecure").forEach((n) => { n.hidden = !insecure; });
  setupDomains();
  token = loadToken();
  if (!token) return signOut("");
  api("GET", "/api/v1/account-details").then(enter, (e) => {
    if (e.status === 401) return signOut(INVALID);
    enter(null); setErr($("#error"), e.message);
  });
})();
"""

PAGE_MARKUP = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="referrer" content="no-referrer">
<link rel="icon" href="data:,">
<title>IncognitoMail</title>
<style>{{STYLE}}</style>
</head>
<body data-listen-path="{{LISTEN_PATH}}" data-domains="{{DOMAINS}}" data-lifetime="{{LIFETIME}}">
<main id="signin-view" class="center" hidden>
  <form id="signin-form" class="card signin" novalidate>
    <div>
      <div class="brand"><span class="logo" aria-hidden="true">@</span>IncognitoMail</div>
      <h1>Sign in</h1>
      <p class="muted">Random forwarding addresses that keep your real address to yourself.</p>
    </div>
    <div>
      <label for="token">Access token</label>
      <div class="pw">
        <input id="token" class="input" type="password" autocomplete="off" autocapitalize="off"
          spellcheck="false" required aria-describedby="sign-in-error">
        <button id="token-toggle" class="btn" type="button" aria-pressed="false"
          aria-controls="token" aria-label="Show token">Show</button>
      </div>
    </div>
    <label class="check"><input id="remember" type="checkbox"> Remember on this device</label>
    <button id="sign-in" class="btn primary" type="submit">Sign in</button>
    <p id="sign-in-error" class="error" role="alert" hidden></p>
    <p class="note insecure" hidden>This page is not using https: your token crosses the network
      in clear text. Ask your admin to set up TLS.</p>
  </form>
</main>

<div id="app" hidden>
  <h1 id="app-title" class="sr-only" tabindex="-1">Your handles</h1>
  <nav aria-label="Skip links">
    <a id="skip-list" class="skip-link" href="#list-h">Skip to the list</a>
    <a id="skip-new" class="skip-link" href="#new-label">Skip to new handle</a>
  </nav>
  <header class="top">
    <div class="wrap">
      <div class="top-left">
        <div class="brand"><span class="logo" aria-hidden="true">@</span>IncognitoMail</div>
        <p class="who">Forwarding to <strong id="target"></strong></p>
      </div>
      <button id="sign-out" class="btn ghost" type="button">Sign out</button>
    </div>
  </header>
  <main class="wrap">
    <section aria-labelledby="totals-h">
      <h2 id="totals-h" class="sr-only">Your account</h2>
      <dl class="totals">
        <div><dt>Handles</dt><dd id="sum-handles">–</dd></div>
        <div><dt>Received</dt><dd id="sum-received">–</dd></div>
        <div><dt>Blocked</dt><dd id="sum-blocked">–</dd></div>
        <div><dt>Bounced</dt><dd id="sum-bounced">–</dd></div>
      </dl>
    </section>

    <section class="card" aria-labelledby="new-h">
      <h2 id="new-h">New handle</h2>
      <form id="new-form" novalidate>
        <div class="row">
          <div class="field grow">
            <label for="new-label">Label <span class="muted">(optional)</span></label>
            <input id="new-label" class="input" type="text"
              placeholder="What is it for? e.g. shop.example.com" autocomplete="off">
          </div>
          <div id="domain-field" class="field" hidden>
            <label for="new-domain">Domain</label>
            <select id="new-domain"></select>
          </div>
        </div>
        <div class="form-foot">
          <details id="new-options">
            <summary>Options</summary>
            <div class="row">
              <div class="field">
                <label for="new-expires">Ends</label>
                <select id="new-expires">
                  <option value="">Never</option><option value="3600">In 1 hour</option>
                  <option value="86400">In 1 day</option><option value="604800">In 7 days</option>
                  <option value="2592000">In 30 days</option>
                  <option value="date">On a date…</option>
                </select>
              </div>
              <div id="new-expires-at-field" class="field when" hidden>
                <label for="new-expires-at">End date and time</label>
                <input id="new-expires-at" class="input" type="datetime-local"
                  aria-describedby="new-expires-at-hint create-error">
                <p id="new-expires-at-hint" class="hint">In your own time zone</p>
              </div>
              <div class="field">
                <label for="new-max">Close after N messages</label>
                <input id="new-max" class="input" type="number" min="1" step="1"
                  inputmode="numeric" placeholder="No limit" aria-describedby="create-error">
              </div>
            </div>
          </details>
          <button id="create" class="btn primary" type="submit">Create handle</button>
        </div>
      </form>
      <p id="create-error" class="error" role="alert" hidden></p>
      <div id="created" class="created" hidden>
        <p class="small muted">Your new address</p>
        <div class="acts">
          <output id="created-address" class="big"></output>
          <button id="copy-created" class="btn" type="button">Copy</button>
        </div>
        <div id="created-fallback" class="acts" hidden>
          <input id="created-input" class="input mono" type="text" readonly
            aria-label="New address, selected">
          <p class="small">Press Ctrl+C to copy</p>
        </div>
      </div>
    </section>

    <section class="card" aria-labelledby="list-h">
      <div class="head">
        <h2 id="list-h" tabindex="-1">Handles<span id="total-sep" class="sep"
          hidden>, </span><span id="total" class="count"></span></h2>
        <div class="tools" role="search">
          <label for="search" class="sr-only">Search address or label</label>
          <input id="search" class="input" type="search" placeholder="Search address or label"
            autocomplete="off">
          <label for="filter" class="sr-only">Show</label>
          <select id="filter">
            <option value="">All</option><option value="true">Active</option>
            <option value="false">Off</option>
          </select>
          <label for="sort" class="sr-only">Order</label>
          <select id="sort">
            <option value="-created_at">Newest first</option>
            <option value="created_at">Oldest first</option>
            <option value="-last_forwarded">Recently received</option>
            <option value="-emails_forwarded">Most received</option>
            <option value="-emails_blocked">Most blocked</option>
            <option value="-last_blocked">Recently blocked</option>
          </select>
        </div>
      </div>
      <nav id="pager-top" class="pager pager-top" aria-label="Pages, at the top" hidden>
        <span id="page-info-top" class="page-info"></span>
        <div class="acts">
          <button id="prev-top" class="btn sm" type="button">Previous</button>
          <button id="next-top" class="btn sm" type="button">Next</button>
        </div>
      </nav>
      <div id="bulk" class="bulk" role="group" aria-label="Selected handles" hidden>
        <label class="check"><input id="select-all" type="checkbox"> Select all on this page</label>
        <span id="selected-count" class="small muted" aria-live="polite"></span>
        <div class="acts">
          <button id="bulk-off" class="btn sm" type="button" disabled>Switch off</button>
          <button id="bulk-on" class="btn sm" type="button" disabled>Switch on</button>
          <button id="bulk-delete" class="btn sm" type="button" disabled>Delete</button>
        </div>
      </div>
      <div id="bulk-confirm" class="confirm-box" role="group" aria-labelledby="bulk-q" hidden>
        <p id="bulk-q" class="addr-q"></p>
        <div class="acts">
          <button id="confirm-bulk-delete" class="btn danger" type="button">Delete</button>
          <button id="cancel-bulk-delete" class="btn" type="button">Cancel</button>
        </div>
      </div>
      <p id="bulk-error" class="error" role="alert" hidden></p>
      <p id="error" class="error banner" role="alert" hidden></p>
      <div id="handles">
        <table hidden>
          <caption class="sr-only">Your handles</caption>
          <thead><tr>
            <th scope="col"><span class="sr-only">Selected</span></th>
            <th scope="col">Handle</th><th scope="col">State</th>
            <th scope="col" class="num">Received</th><th scope="col" class="num">Blocked</th>
            <th scope="col">Last received</th><th scope="col">Created</th>
            <th scope="col"><span class="sr-only">Actions</span></th>
          </tr></thead>
        </table>
        <div id="empty" class="empty" hidden></div>
      </div>
      <nav id="pager" class="pager" aria-label="Pages">
        <span id="page-info" class="page-info"></span>
        <div id="pager-buttons" class="acts">
          <button id="first" class="btn sm" type="button" disabled>First</button>
          <button id="prev" class="btn sm" type="button" disabled>Previous</button>
          <button id="next" class="btn sm" type="button" disabled>Next</button>
          <button id="last" class="btn sm" type="button" disabled>Last</button>
        </div>
        <form id="jump-form" class="jump" novalidate>
          <label for="page-jump">Page</label>
          <input id="page-jump" class="input" type="number" min="1" step="1" inputmode="numeric">
          <span id="page-of" class="page-info"></span>
          <button id="jump" class="btn sm" type="submit">Go</button>
        </form>
      </nav>
    </section>

    <div class="pair">
      <section class="card" aria-labelledby="apps-h">
        <h2 id="apps-h" tabindex="-1">Connect your apps</h2>
        <p class="note insecure" hidden>This page is not using https: your token crosses the
          network in clear text. Ask your admin to set up TLS.</p>
        <div id="bitwarden" class="app">
          <h3>Bitwarden</h3>
          <p class="small">Its generator makes a new handle each time you press
            <strong>Generate email</strong>, labelled with the website. Open it:</p>
          <ul class="where">
            <li>Browser extension: <strong>Generator</strong> tab → <strong>Username</strong> →
              <strong>Type</strong>: <strong>Forwarded email alias</strong></li>
            <li>Desktop app: <strong>View → Generator</strong>, then the same</li>
            <li>Web vault: <strong>Tools → Generator</strong>, then the same (a self-hosted vault
              only: vault.bitwarden.com cannot reach this server)</li>
            <li>Android: <strong>Generator</strong> tab → <strong>Username</strong> →
              <strong>Username type</strong>: <strong>Forwarded email alias</strong></li>
          </ul>
          <p class="small">Then fill in:</p>
          <ol class="steps">
            <li><strong>Service</strong>: <strong>addy.io</strong> (SimpleLogin works the
              same)</li>
            <li><strong>API Key</strong> (Android: API access token): your token</li>
            <li><strong>Email domain</strong> (Android: Domain name):
              <span class="kv"><code id="bw-domain"></code><button class="btn sm" type="button"
                data-copy="bw-domain" aria-label="Copy email domain">Copy</button></span></li>
            <li><strong>Self-host server URL</strong>:
              <span class="kv"><code id="bitwarden-url"></code><button class="btn sm" type="button"
                data-copy="bitwarden-url" aria-label="Copy server URL">Copy</button></span></li>
          </ol>
          <p class="small muted">Bitwarden wants https: over plain http it asks you to trust the
            server.</p>
        </div>
        <div class="app">
          <h3>addy.io browser extension</h3>
          <p class="small muted">Instance URL: the server URL above. API key: your token.</p>
        </div>
        <div class="app">
          <h3>Browser add-on (2016)</h3>
          <p class="small muted">Give it this WebSocket URL and your token.</p>
          <div class="kv"><code id="addon-url"></code><button class="btn sm" type="button"
            data-copy="addon-url" aria-label="Copy WebSocket URL">Copy</button></div>
        </div>
      </section>

      <div class="stack">
        <section class="card" aria-labelledby="tok-h">
          <h2 id="tok-h">Token</h2>
          <p class="small muted">Your token signs you in here, in Bitwarden and in the add-on.
            Rotate it if it may have leaked: the old one stops working at once.</p>
          <button id="rotate" class="btn" type="button">Rotate token</button>
          <div id="rotate-confirm" class="confirm-box" role="group" aria-labelledby="rotate-q"
            hidden>
            <p id="rotate-q">Make a new token now? The current one stops working at once, here,
              in Bitwarden and in the add-on.</p>
            <div class="acts">
              <button id="confirm-rotate" class="btn danger" type="button">Rotate token</button>
              <button id="cancel-rotate" class="btn" type="button">Cancel</button>
            </div>
          </div>
          <p id="rotate-error" class="error" role="alert" hidden></p>
          <div id="new-token-box" class="token-box" hidden>
            <p><strong>Your new token.</strong> It is shown only this once.</p>
            <code id="new-token"></code>
            <div class="acts">
              <button id="copy-token" class="btn primary" type="button" data-copy="new-token"
                aria-label="Copy new token">Copy</button>
              <button id="hide-token" class="btn" type="button">Done</button>
            </div>
            <p class="small">Put it into the browser add-on and Bitwarden too: they stop working
              until you do.</p>
          </div>
        </section>

        <section class="card" aria-labelledby="export-h">
          <h2 id="export-h">Export</h2>
          <p class="small muted">All your handles in one file, as the server's
            <code>export</code> command writes it: open the CSV in a spreadsheet; the server's
            <code>import</code> reads either file back.</p>
          <div class="acts">
            <button id="export-csv" class="btn" type="button">Download CSV</button>
            <button id="export-json" class="btn" type="button">Download JSON</button>
          </div>
          <p id="export-note" class="small muted" role="status"></p>
          <p id="export-error" class="error" role="alert" hidden></p>
        </section>
      </div>
    </div>
  </main>
</div>
<p id="status" role="status" aria-live="polite"></p>
<script>{{SCRIPT}}</script>
</body>
</html>
"""


def _csp_hash(text):
    return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode()


OWNER_PAGE = PAGE_MARKUP.replace("{{STYLE}}", PAGE_STYLE).replace("{{SCRIPT}}", PAGE_SCRIPT)
PAGE_POLICY = ("default-src 'none'; script-src %s; style-src %s; connect-src 'self'%%s; "
               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
               "form-action 'none'" % (_csp_hash(PAGE_SCRIPT), _csp_hash(PAGE_STYLE)))


def main(argv=None):
    parser = build_parser()
    args = _unprotect(parser.parse_args(
        _normalize_argv(sys.argv[1:] if argv is None else list(argv), parser)))
    setup_logging()
    if args.command == "example":
        print(example_config(), end="")
        return 0
    try:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            if args.command == "check":
                print("FAIL configuration: %s" % e)
                return 1
            raise
        if args.command is None:
            setup_logging(config)
            Daemon(config).run()
            return 0
        if args.command == "check":
            return run_check(config, args)
        if args.command == "wire":
            return run_wire(config, args)
        return run_command(config, args)
    except IncognitoMailError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": e.code, "message": str(e)}))
        print("incognitomail: error: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

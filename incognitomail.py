#!/usr/bin/env python3
"""IncognitoMail: a fresh forwarding address for every website, beside your Postfix server.

An *account* is a real target address plus a secret token. A *handle* is a random address
(``k3v9q0x2m7ab5ts1@mail.example.org``) made with that token; IncognitoMail records it and keeps
Postfix's canonical or virtual alias map in step, so mail to the handle reaches the account's
address at once. One daemon owns the data; the command line talks to it over a Unix socket, the
browser add-on over a WebSocket.

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
import concurrent.futures
import configparser
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import logging.handlers
import os
import pwd
import queue
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
from http import HTTPStatus
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

__version__ = "2.0.0"

log = logging.getLogger("incognitomail")


###############################################################################
# Errors
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
    """The caller asked for something malformed: a bad address, an unknown operation."""
    code = "bad_request"


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


class WebSocketError(IncognitoMailError):
    """Base class of the WebSocket layer's errors."""


class HandshakeError(WebSocketError):
    """The opening handshake is refused: answer with HTTP `status` and close."""

    def __init__(self, status: int, reason: str, headers: Sequence[Tuple[str, str]] = ()):
        super().__init__('%d %s' % (status, reason))
        self.status, self.reason, self.headers = status, reason, list(headers)


class ProtocolError(WebSocketError):
    """The peer broke RFC 6455: fail the connection with `close_code`."""

    def __init__(self, close_code: int, reason: str):
        super().__init__('%d %s' % (close_code, reason))
        self.close_code, self.reason = close_code, reason


###############################################################################
# Configuration
###############################################################################

DEFAULT_CONFIG_PATH = "/etc/incognitomail/incognitomail.ini"

# Map types that ``postmap -i`` and ``postmap -d`` can update in place.
UPDATABLE_MAP_TYPES = ("hash", "btree", "lmdb")

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_TARGETS = ("stderr", "syslog")


class Config(NamedTuple):
    """Everything the daemon and the command line need, validated, with absolute paths."""
    path: str
    unix_sock_path: str
    lock_file_path: str
    listen_path: str
    listen_address: str            # "" turns the WebSocket endpoint off
    tls_cert_file: str
    tls_key_file: str
    database_path: str
    domains: Tuple[str, ...]
    map_type: str
    map_file_path: str
    postfix_config_dir: str
    handle_length: int
    log_level: str
    log_target: str
    allowed_origins: Tuple[str, ...]
    max_message_size: int
    idle_timeout: float
    handles_per_minute_per_client: int
    handles_per_minute_per_account: int
    failed_tokens_per_minute_per_client: int
    max_connections: int
    max_connections_per_client: int
    policy_listen: str
    socketmap_listen: str
    prune_handles_unused_days: Optional[int]
    prune_accounts_unused_days: Optional[int]
    auto_prune: bool

    @property
    def default_domain(self):
        return self.domains[0]


# Every key a user may write: section -> {key: default}. ``None`` marks a required key.
# The first three sections and their first keys are the original (2016) ones.
_CONFIG_KEYS = {
    "General": {
        "MailSystem": "postfix",
        "UnixSockPath": "/run/incognitomail/incognitomail.sock",
        "LockFilePath": "/run/incognitomail/incognitomail.lock",
        "ListenPath": "/incognitomail",
        "ListenAddress": "127.0.0.1:9090",
        "TLSCertFile": "",
        "TLSKeyFile": "",
        "AllowedOrigins": "",
        "LogLevel": "info",
        "LogTarget": "stderr",
        "PolicyListen": "",
        "SocketmapListen": "",
    },
    "Persistence": {
        "Type": "sqlite",
        "DatabasePath": "incognitomail.sqlite3",
    },
    "PostfixConfig": {
        "Domain": None,
        "MapFilePath": None,
        "ConfigDir": "",
        "HandleLength": "16",
    },
    "Limits": {
        "MaxMessageSize": "65536",
        "IdleTimeout": "300",
        "HandlesPerMinutePerClient": "20",
        "HandlesPerMinutePerAccount": "30",
        "FailedTokensPerMinutePerClient": "10",
        "MaxConnections": "20000",
        "MaxConnectionsPerClient": "50",
    },
    "Prune": {
        "HandlesUnusedDays": "",
        "AccountsUnusedDays": "",
        "Automatic": "no",
    },
}

_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


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
        raise ConfigError("%s: not a valid INI file: %s" % (path, str(e).splitlines()[0]))
    return _ConfigReader(path, parser).config()


class _ConfigReader:
    """Turns a parsed INI file into a Config, one key at a time, with errors that name the key."""

    def __init__(self, path, parser):
        self.path = path
        self.folder = os.path.dirname(path)
        self.parser = parser
        known = {s.lower(): s for s in _CONFIG_KEYS}
        for section in parser.sections():
            if section.lower() not in known:
                log.warning("%s [%s]: unknown section, ignored", path, section)
                continue
            keys = {k.lower() for k in _CONFIG_KEYS[known[section.lower()]]}
            for key in parser[section]:
                if key not in keys:
                    log.warning("%s [%s] %s: unknown key, ignored", path, section, key)

    def raw(self, section, key):
        for name in self.parser.sections():
            if name.lower() == section.lower() and self.parser.has_option(name, key):
                value = self.parser.get(name, key).strip()
                if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                    value = value[1:-1]
                return value.strip()
        default = _CONFIG_KEYS[section][key]
        if default is None:
            raise ConfigError("%s [%s] %s: required key is missing" % (self.path, section, key))
        return default

    def fail(self, section, key, problem):
        raise ConfigError("%s [%s] %s: %s" % (self.path, section, key, problem))

    def file_path(self, section, key):
        value = self.raw(section, key)
        return os.path.normpath(os.path.join(self.folder, value)) if value else ""

    def integer(self, section, key, low, high=None, allow_empty=False):
        value = self.raw(section, key)
        if allow_empty and value == "":
            return None
        try:
            number = int(value)
        except ValueError:
            self.fail(section, key, "%r is not a whole number" % value)
        if number < low or (high is not None and number > high):
            self.fail(section, key, "%d is out of range (%d to %s)" % (number, low, high if high is not None else "any"))
        return number

    def choice(self, section, key, choices):
        value = self.raw(section, key).lower()
        if value not in choices:
            self.fail(section, key, "%r is not one of: %s" % (value, ", ".join(choices)))
        return value

    def listen(self, section, key, kinds):
        """A ``unix:/path`` or ``inet:host:port`` endpoint, or empty for off."""
        value = self.raw(section, key)
        if not value:
            return ""
        kind, _, rest = value.partition(":")
        if kind not in kinds or not rest:
            self.fail(section, key, "%r must look like %s" % (value, " or ".join(
                {"unix": "unix:/path/to.sock", "inet": "inet:127.0.0.1:10040"}[k] for k in kinds)))
        if kind == "unix":
            return "unix:" + os.path.normpath(os.path.join(self.folder, rest))
        try:
            parse_host_port(rest)
        except ValueError as e:
            self.fail(section, key, str(e))
        return value

    def config(self):
        mail_system = self.raw("General", "MailSystem").lower()
        if mail_system != "postfix":
            self.fail("General", "MailSystem", "%r is not supported; only postfix is" % mail_system)
        store_type = self.raw("Persistence", "Type").lower()
        if store_type == "boltdb":
            log.warning("%s [Persistence] Type: boltdb was the original's store; using sqlite "
                        "(the default store) instead", self.path)
        elif store_type != "sqlite":
            self.fail("Persistence", "Type", "%r is not supported; use sqlite" % store_type)

        domains = []
        for item in self.raw("PostfixConfig", "Domain").split(","):
            domain = item.strip().lstrip("@").lower()
            if not _DOMAIN_RE.match(domain):
                self.fail("PostfixConfig", "Domain", "%r is not a domain name" % item.strip())
            if domain not in domains:
                domains.append(domain)

        map_type, map_path = "hash", self.raw("PostfixConfig", "MapFilePath")
        match = re.match(r"^([a-z]+):(.*)$", map_path)
        if match:
            map_type, map_path = match.group(1), match.group(2)
        if map_type not in UPDATABLE_MAP_TYPES:
            self.fail("PostfixConfig", "MapFilePath", "map type %r cannot be updated in place by "
                      "postmap; use one of: %s" % (map_type, ", ".join(UPDATABLE_MAP_TYPES)))
        if not map_path:
            self.fail("PostfixConfig", "MapFilePath", "no path given")

        listen_address = self.raw("General", "ListenAddress")
        if listen_address:
            try:
                parse_host_port(listen_address)
            except ValueError as e:
                self.fail("General", "ListenAddress", str(e))
        listen_path = self.raw("General", "ListenPath")
        if not listen_path.startswith("/"):
            self.fail("General", "ListenPath", "%r must start with /" % listen_path)
        tls_cert, tls_key = self.file_path("General", "TLSCertFile"), self.file_path("General", "TLSKeyFile")
        if bool(tls_cert) != bool(tls_key):
            self.fail("General", "TLSKeyFile" if tls_cert else "TLSCertFile",
                      "TLSCertFile and TLSKeyFile must be set together")

        automatic = self.raw("Prune", "Automatic").lower()
        if automatic not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
            self.fail("Prune", "Automatic", "%r is not yes or no" % automatic)
        if automatic in ("yes", "true", "on", "1"):
            if not self.raw("General", "PolicyListen"):
                self.fail("Prune", "Automatic", "needs [General] PolicyListen: without the policy service every "
                          "handle looks unused")
            if not self.raw("Prune", "HandlesUnusedDays") and not self.raw("Prune", "AccountsUnusedDays"):
                self.fail("Prune", "Automatic", "needs HandlesUnusedDays and/or AccountsUnusedDays")
        return Config(
            path=self.path,
            unix_sock_path=self.file_path("General", "UnixSockPath"),
            lock_file_path=self.file_path("General", "LockFilePath"),
            listen_path=listen_path,
            listen_address=listen_address,
            tls_cert_file=tls_cert,
            tls_key_file=tls_key,
            database_path=self.file_path("Persistence", "DatabasePath"),
            domains=tuple(domains),
            map_type=map_type,
            map_file_path=os.path.normpath(os.path.join(self.folder, map_path)),
            postfix_config_dir=self.file_path("PostfixConfig", "ConfigDir"),
            handle_length=self.integer("PostfixConfig", "HandleLength", 12, 64),
            log_level=self.choice("General", "LogLevel", LOG_LEVELS),
            log_target=self.choice("General", "LogTarget", LOG_TARGETS),
            allowed_origins=tuple(o.strip() for o in self.raw("General", "AllowedOrigins").split(",") if o.strip()),
            max_message_size=self.integer("Limits", "MaxMessageSize", 1024),
            idle_timeout=float(self.integer("Limits", "IdleTimeout", 0)),
            handles_per_minute_per_client=self.integer("Limits", "HandlesPerMinutePerClient", 0),
            handles_per_minute_per_account=self.integer("Limits", "HandlesPerMinutePerAccount", 0),
            failed_tokens_per_minute_per_client=self.integer("Limits", "FailedTokensPerMinutePerClient", 0),
            max_connections=self.integer("Limits", "MaxConnections", 0),
            max_connections_per_client=self.integer("Limits", "MaxConnectionsPerClient", 0),
            policy_listen=self.listen("General", "PolicyListen", ("unix", "inet")),
            socketmap_listen=self.listen("General", "SocketmapListen", ("unix",)),
            prune_handles_unused_days=self.integer("Prune", "HandlesUnusedDays", 0, allow_empty=True),
            prune_accounts_unused_days=self.integer("Prune", "AccountsUnusedDays", 0, allow_empty=True),
            auto_prune=automatic in ("yes", "true", "on", "1"),
        )


def parse_host_port(text):
    """``":9090"`` -> ("", 9090) (all interfaces); ``"[::1]:9090"`` -> ("::1", 9090)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("%r must be HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9090 or :9090" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("%r: write an IPv6 address in brackets, e.g. [::1]:9090" % text)
    return host, int(port)


def _os_reason(error):
    """The readable part of an OSError, without Python's ``[Errno N]`` decoration."""
    return getattr(error, "strerror", None) or str(error)


###############################################################################
# Names and secrets
###############################################################################

HANDLE_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
MAX_ADDRESS_LENGTH = 254
MAX_LABEL_LENGTH = 200

# A plain dot-atom address: nothing that Postfix could read as a second map line, a second
# target (comma), a comment or a lookup-table special character.
_ADDRESS_RE = re.compile(
    r"^(?P<local>[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*)"
    r"@(?P<domain>[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)$")


def new_token():
    """A fresh secret token: 256 random bits, URL-safe, so it survives a copy and paste.

    Never starting with "-", so that it reads as an argument, not an option, on a command line.
    """
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


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


def check_label(label):
    """A label is free text for a person, on one line."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise BadRequest("label must be text")
    if len(label) > MAX_LABEL_LENGTH:
        raise BadRequest("label is longer than %d characters" % MAX_LABEL_LENGTH)
    if any(ord(c) < 32 or ord(c) == 127 for c in label):
        raise BadRequest("label must not contain control characters or line breaks")
    return label.strip() or None


def split_handle(text, domains):
    """``"abc@example.org"`` or ``"abc"`` -> ("abc", "example.org"); the first domain is the default."""
    if not isinstance(text, str) or not text:
        raise BadRequest("a handle is required, e.g. k3v9q0x2m7ab5ts1@%s" % domains[0])
    local, _, domain = text.strip().lower().partition("@")
    domain = domain or domains[0]
    if not local or not all(c in HANDLE_ALPHABET for c in local) or len(local) > 64:
        raise BadRequest("%r is not a handle (handles are lowercase letters and digits)" % text)
    if domain not in domains:
        raise NotFound("%r is not in a domain served here (%s)" % (text, ", ".join(domains)))
    return local, domain


def iso_time(timestamp):
    """Seconds since the epoch -> ISO 8601 UTC (``2026-11-25T01:27:23Z``); None stays None."""
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
)
SCHEMA_VERSION = len(_MIGRATIONS)

_HANDLE_COLUMNS = "h.id, h.local, h.domain, h.account_id, h.label, h.enabled, h.created, h.received, h.last_received"


class Handle(NamedTuple):
    id: int
    local: str
    domain: str
    account_id: int
    label: Optional[str]
    enabled: bool
    created: int
    received: int
    last_received: Optional[int]

    @property
    def address(self):
        return "%s@%s" % (self.local, self.domain)

    def public(self):
        """The handle as the JSON protocols and ``list --json`` show it."""
        return {"address": self.address, "label": self.label, "enabled": bool(self.enabled),
                "created": iso_time(self.created), "received": self.received,
                "last_received": iso_time(self.last_received)}


class Account(NamedTuple):
    id: int
    address: str
    created: int
    last_used: Optional[int]


class Store:
    """The sqlite database: the only code that speaks SQL.

    One Store object belongs to one thread at a time. Writes happen inside ``transaction()``;
    WAL mode lets a second Store on the same file (the lookup services) read while a batch
    is being written.
    """

    def __init__(self, path, readonly=False):
        self.path = path
        try:
            if not readonly:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            if readonly:
                uri = "file:%s?mode=ro" % _sqlite_uri_path(path)
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
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
            raise StoreError("%s: cannot open the database: %s (check [Persistence] DatabasePath and "
                             "that user %s may %s the file and its folder)"
                             % (path, e, _user_name(), "read" if readonly else "write"))

    def close(self):
        self.db.close()

    def _check_version(self):
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise StoreError("%s: database schema version %d is newer than this program understands (%d); "
                             "use a newer incognitomail.py" % (self.path, version, SCHEMA_VERSION))
        return version

    def _migrate(self):
        version = self._check_version()
        for number in range(version, SCHEMA_VERSION):
            log.info("%s: migrating database schema from version %d to %d", self.path, number, number + 1)
            with self.transaction():
                for statement in _MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute("PRAGMA user_version = %d" % (number + 1))

    def schema_version(self):
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # -- transactions ------------------------------------------------------------------

    def transaction(self):
        return _Transaction(self.db, "BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")

    def savepoint(self):
        return _Transaction(self.db, "SAVEPOINT op", "RELEASE op", "ROLLBACK TO op; RELEASE op")

    def begin(self):
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self):
        self.db.execute("COMMIT")

    def rollback(self):
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    # -- accounts ----------------------------------------------------------------------

    def add_account(self, address, digest, now):
        cursor = self.db.execute("INSERT INTO accounts (address, token_sha256, created) VALUES (?, ?, ?)",
                                 (address, digest, int(now)))
        return cursor.lastrowid

    def account_by_digest(self, digest):
        row = self.db.execute("SELECT id, address, created, last_used FROM accounts WHERE token_sha256 = ?",
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
        return self.db.execute("SELECT 1 FROM handles WHERE local = ? COLLATE NOCASE AND domain = ? COLLATE NOCASE",
                               (local, domain)).fetchone() is not None

    def add_handle(self, account_id, local, domain, label, now):
        cursor = self.db.execute(
            "INSERT INTO handles (local, domain, account_id, label, created) VALUES (?, ?, ?, ?, ?)",
            (local, domain, account_id, label, int(now)))
        return self.handle_by_id(cursor.lastrowid)

    def handle_by_id(self, handle_id):
        row = self.db.execute("SELECT %s FROM handles h WHERE h.id = ?" % _HANDLE_COLUMNS, (handle_id,)).fetchone()
        return Handle(*row) if row else None

    def handle(self, local, domain):
        row = self.db.execute("SELECT %s FROM handles h WHERE h.local = ? COLLATE NOCASE AND h.domain = ? "
                              "COLLATE NOCASE" % _HANDLE_COLUMNS, (local, domain)).fetchone()
        return Handle(*row) if row else None

    def handles_of(self, account_id):
        """An account's handles, newest first."""
        return [Handle(*row) for row in self.db.execute(
            "SELECT %s FROM handles h WHERE h.account_id = ? ORDER BY h.id DESC" % _HANDLE_COLUMNS, (account_id,))]

    def count_handles_of(self, account_id):
        return self.db.execute("SELECT count(*) FROM handles WHERE account_id = ?", (account_id,)).fetchone()[0]

    def update_handle(self, handle_id, label, enabled):
        self.db.execute("UPDATE handles SET label = ?, enabled = ? WHERE id = ?", (label, int(enabled), handle_id))

    def delete_handle(self, handle_id):
        self.db.execute("DELETE FROM handles WHERE id = ?", (handle_id,))

    def record_received(self, counts, now_by_key):
        """Add ``counts[(local, domain)]`` messages to each handle, at the given times."""
        self.db.executemany(
            "UPDATE handles SET received = received + ?, last_received = max(coalesce(last_received, 0), ?) "
            "WHERE local = ? COLLATE NOCASE AND domain = ? COLLATE NOCASE",
            [(n, int(now_by_key[key]), key[0], key[1]) for key, n in counts.items()])

    def lookup_target(self, local, domain):
        """The target address of an enabled handle, for Postfix's lookups (socketmap, policy)."""
        row = self.db.execute(
            "SELECT a.address, h.enabled FROM handles h JOIN accounts a ON a.id = h.account_id "
            "WHERE h.local = ? COLLATE NOCASE AND h.domain = ? COLLATE NOCASE", (local, domain)).fetchone()
        return row  # (target, enabled) or None

    def map_entries(self):
        """Every enabled handle as (key, target), in creation order, streamed from disk."""
        for local, domain, target in self.db.execute(
                "SELECT h.local, h.domain, a.address FROM handles h JOIN accounts a ON a.id = h.account_id "
                "WHERE h.enabled ORDER BY h.id"):
            yield "%s@%s" % (local, domain), target

    def counts(self):
        accounts = self.db.execute("SELECT count(*) FROM accounts").fetchone()[0]
        handles, enabled = self.db.execute("SELECT count(*), coalesce(sum(enabled), 0) FROM handles").fetchone()
        return {"accounts": accounts, "handles": handles, "enabled_handles": enabled}

    # -- pruning -----------------------------------------------------------------------

    def unused_handles(self, created_before):
        return [Handle(*row) for row in self.db.execute(
            "SELECT %s FROM handles h WHERE h.received = 0 AND h.created <= ? ORDER BY h.id" % _HANDLE_COLUMNS,
            (int(created_before),))]

    def unused_accounts(self, created_before):
        return [Account(*row) for row in self.db.execute(
            "SELECT a.id, a.address, a.created, a.last_used FROM accounts a WHERE a.last_used IS NULL "
            "AND a.created <= ? AND NOT EXISTS (SELECT 1 FROM handles h WHERE h.account_id = a.id) ORDER BY a.id",
            (int(created_before),))]

    # -- meta --------------------------------------------------------------------------

    def get_meta(self, name):
        row = self.db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name, value):
        if value is None:
            self.db.execute("DELETE FROM meta WHERE name = ?", (name,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))


class _Transaction:
    """A context manager running SQL at enter, and one of two statements at exit."""

    def __init__(self, db, begin, commit, rollback):
        self.db, self.begin, self.commit_sql, self.rollback_sql = db, begin, commit, rollback

    def __enter__(self):
        self.db.execute(self.begin)
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.db.execute(self.commit_sql)
        else:
            for statement in self.rollback_sql.split(";"):
                self.db.execute(statement)


def _sqlite_uri_path(path):
    return path.replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def _user_name(uid=None):
    uid = os.geteuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


###############################################################################
# Postfix
###############################################################################

# Everything below this line in the map's text file is written by IncognitoMail; everything
# above it belongs to the admin and is kept byte for byte.
MAP_MARKER = b"# IncognitoMail manages every line below this one; keep your own lines above it.\n"

_POSTFIX_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/bin")


def find_postfix_command(name):
    """Postfix's tools live in /usr/sbin, which a non-root user's PATH often lacks."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_POSTFIX_BIN_DIRS))
    if not path:
        raise PostfixError("%s not found in PATH or %s: install Postfix (apt-get install postfix postfix-lmdb)"
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


def _file_identity(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def _write_atomically(path, chunks):
    """Write ``chunks`` to a temp file beside ``path``, fsync, and rename it into place.

    The new file gets the owner and mode of the file it replaces, so an admin's
    ``chown root:postfix`` survives every rewrite.
    """
    folder = os.path.dirname(path)
    temp = os.path.join(folder, ".%s.incognitomail-tmp" % os.path.basename(path))
    try:
        with open(temp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        _copy_ownership(path, temp)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    _fsync_folder(folder)


def _copy_ownership(source, target):
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return
    os.chmod(target, stat.S_IMODE(st.st_mode))
    mine = os.stat(target)
    if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
        try:
            os.chown(target, st.st_uid, st.st_gid)
        except PermissionError:
            log.warning("%s: cannot give the new file owner %d:%d as before (not root); it is owned by %s",
                        source, st.st_uid, st.st_gid, _user_name())


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ProgramLauncher:
    """Starts Postfix's programs: directly, or from a small helper process that holds no files.

    Starting a program copies the starting process's table of open files, which grows with the
    WebSocket connections the daemon holds: at 10,000 a new handle took 2.5 ms longer (median
    7.5 ms instead of 5). Asking a helper costs about 1 ms more than starting directly with few
    files open, so the daemon starts the helper before it accepts anything and sets
    ``use_helper`` only while it holds many connections (measured: 6.2 ms at 10,000). Without
    a helper (the default), or once the helper has died, programs start directly.
    """
    _HELPER = (
        "import json, subprocess, sys\n"
        "requests, replies = sys.stdin.buffer, sys.stdout.buffer\n"
        "for line in iter(requests.readline, b''):\n"
        "    argv, stdin, timeout = json.loads(line)\n"
        "    try:\n"
        "        done = subprocess.run(argv, input=bytes.fromhex(stdin), stdout=subprocess.PIPE,\n"
        "                              stderr=subprocess.PIPE, timeout=timeout)\n"
        "        reply = [done.returncode, done.stdout.hex(), done.stderr.hex(), None]\n"
        "    except (OSError, subprocess.TimeoutExpired) as e:\n"
        "        reply = [None, '', '', str(e)]\n"
        "    replies.write(json.dumps(reply).encode() + b'\\n')\n"
        "    replies.flush()\n")

    def __init__(self):
        self._helper = None
        self._lock = threading.Lock()
        self.use_helper = False

    def start_helper(self):
        self._helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", self._HELPER],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv, stdin, timeout):
        """Like subprocess.run with ``stdin`` as input and stdout and stderr captured."""
        with self._lock:
            if self._helper is not None and self.use_helper:
                try:
                    self._helper.stdin.write(json.dumps([argv, stdin.hex(), timeout]).encode() + b"\n")
                    self._helper.stdin.flush()
                    returncode, stdout, stderr, error = json.loads(self._helper.stdout.readline())
                except (OSError, ValueError) as e:
                    log.warning("the helper that starts postmap failed (%s); starting programs directly", e)
                    self.close()
                else:
                    if error is not None:
                        raise OSError(error)
                    return subprocess.CompletedProcess(argv, returncode, bytes.fromhex(stdout), bytes.fromhex(stderr))
        return subprocess.run(argv, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)

    def close(self):
        if self._helper is not None:
            helper, self._helper = self._helper, None
            for stream in (helper.stdin, helper.stdout):
                try:
                    stream.close()
                except OSError:     # bytes left unflushed for a helper that is gone
                    pass
            helper.wait()


class PostfixMap:
    """A Postfix lookup table kept in step with the store: a text file plus its indexed file.

    Changes cost the same whatever the map's size: additions are appended to the text file
    and inserted with ``postmap -i``, removals deleted with ``postmap -d`` at once and from
    the text file later, coalesced (``flush_text``). A full ``postmap`` runs only when
    reconciliation at start finds drift, into a new file renamed into place, so Postfix's
    lookups are never blocked.
    """

    def __init__(self, config):
        self.type = config.map_type
        self.path = config.map_file_path
        self.config_dir = config.postfix_config_dir
        self.indexed_path = self.path + (".lmdb" if self.type == "lmdb" else ".db")
        self.foreign_keys = set()       # keys of the admin's own lines: never handed out
        self.unflushed = set()          # keys whose lines are still in the text file, gone from the index
        self.unflushed_since = None     # monotonic time of the oldest unflushed removal
        self._last_second = 0           # hash/btree: whole-second mtime Postfix last saw
        self._written = None            # fingerprint after our own last write
        self.needs_rebuild = False      # a failed undo left the map in doubt: rebuild it from the store
        self.launcher = ProgramLauncher()

    @property
    def name(self):
        return "%s:%s" % (self.type, self.path)

    # -- postmap ---------------------------------------------------------------------------

    def postmap(self, *args, stdin=b""):
        """Run postmap with our config dir; raise PostfixError with its own words on failure.

        ``postmap -d`` exits 1 when no key was found, which is not a failure for us: a
        failure is what postmap calls fatal or an error.
        """
        # -o: as root, keep root's rights even when the text file belongs to someone else
        command = [find_postfix_command("postmap"), "-o"]
        if self.config_dir:
            command += ["-c", self.config_dir]
        command += list(args)
        try:
            done = self.launcher.run(command, stdin, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PostfixError("%s failed: %s" % (" ".join(command[:1] + list(args[:-1])), e))
        problems = [line for line in done.stderr.decode("utf-8", "replace").splitlines()
                    if "fatal:" in line or "error:" in line or "panic:" in line]
        if problems or (done.returncode != 0 and "-d" not in args and "-q" not in args):
            reason = (problems or done.stderr.decode("utf-8", "replace").splitlines() or ["exit status %d" % done.returncode])[0]
            raise PostfixError("postmap %s failed: %s" % (self.name, reason.strip()))
        return done

    # -- start: permissions and reconciliation ---------------------------------------------

    def check_access(self):
        """Fail early, naming path, user and fix, before anything is changed in Postfix."""
        user = _user_name()
        folder = os.path.dirname(self.path)
        fix = ("run the server as a user who may write there (often root or postfix), or give %s access, "
               "e.g. chgrp %s %s && chmod g+w %s" % (user, user, folder, folder))
        if not os.path.isdir(folder):
            raise PostfixError("%s: the map's folder does not exist ([PostfixConfig] MapFilePath)" % folder)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PostfixError("%s: folder is not writable by user %s, which must create map files there; %s"
                               % (folder, user, fix))
        for path in (self.path, self.indexed_path):
            if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
                raise PostfixError("%s: file is not readable and writable by user %s; %s" % (path, user, fix))
        find_postfix_command("postmap")
        config_dir = self.config_dir or os.environ.get("MAIL_CONFIG") or "/etc/postfix"
        if not os.path.isfile(os.path.join(config_dir, "main.cf")):
            raise PostfixError("%s: no main.cf there, and postmap needs one; set [PostfixConfig] ConfigDir to "
                               "Postfix's configuration folder, or create it (an empty main.cf will do)" % config_dir)
        if os.path.exists(self.indexed_path):
            self.postmap("-q", "incognitomail-start-probe", self.name)     # does postmap run at all?

    def _identity(self):
        return json.dumps({"map": self.name, "text": _file_identity(self.path),
                           "indexed": _file_identity(self.indexed_path)})

    def fingerprint(self):
        """What the files look like after our last write, or None if someone else changed them since.

        Stored at a clean stop; the next start trusts the map only if it is still exactly so.
        """
        identity = self._identity()
        return identity if identity == self._written and not self.needs_rebuild else None

    def reconcile(self, entries, clean_fingerprint):
        """Make the map hold exactly ``entries`` plus the admin's lines.

        When the files are exactly as a clean stop left them (``clean_fingerprint``), only the
        admin's part is read; otherwise the map is rebuilt from the store. Returns True when
        a rebuild was needed.
        """
        if not os.path.exists(self.path):
            _write_atomically(self.path, [MAP_MARKER])
            os.chmod(self.path, 0o644)
        if clean_fingerprint is not None and clean_fingerprint == self._identity():
            self._read_foreign()
            self._note_visible()
            self._written = self._identity()
            return False
        self.rebuild(entries)
        return True

    def _read_foreign(self):
        """Collect the admin's lines (bytes) and their keys; our lines are yielded back."""
        foreign, keys = [], set()
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

    def rebuild(self, entries):
        """A full rebuild into new files renamed into place: lookups never wait for it."""
        started = time.monotonic()
        foreign = self._read_foreign()
        folder, base = os.path.dirname(self.path), os.path.basename(self.path)
        temp = os.path.join(folder, ".%s.incognitomail-rebuild" % base)
        temp_indexed = temp + (".lmdb" if self.type == "lmdb" else ".db")
        count = [0]

        def lines():
            yield from foreign
            yield MAP_MARKER
            for key, target in entries:
                if key not in self.foreign_keys:
                    count[0] += 1
                    yield map_line(key, target)
        try:
            with open(temp, "wb", buffering=1 << 20) as f:
                f.writelines(lines())
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(temp_indexed):
                os.unlink(temp_indexed)
            self.postmap("%s:%s" % (self.type, temp))
            _copy_ownership(self.path, temp)
            _copy_ownership(self.indexed_path if os.path.exists(self.indexed_path) else self.path, temp_indexed)
            os.replace(temp_indexed, self.indexed_path)
            os.replace(temp, self.path)
            _fsync_folder(folder)
        except OSError as e:
            raise PostfixError("%s: cannot rebuild the map: %s" % (self.path, _os_reason(e)))
        finally:
            for leftover in (temp, temp_indexed):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        self.unflushed.clear()
        self.unflushed_since = None
        self.needs_rebuild = False
        self._note_visible()
        self._written = self._identity()
        log.info("rebuilt %s with %d handles in %.2f s", self.name, count[0], time.monotonic() - started)

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
                self.postmap("-d", "-", self.name, stdin="".join(k + "\n" for k in removes).encode("utf-8"))
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
                self.postmap("-d", "-", self.name, stdin="".join(k + "\n" for k, _ in appended).encode("utf-8"))
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
            log.error("%s: could not undo a failed change (%s); rebuilding it from the database", self.path, e)
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
            log.error("%s: cannot rewrite the map text file: %s (will retry)", self.path, _os_reason(e))
            self.unflushed_since = time.monotonic()     # retry later, not in a loop
            return
        self.unflushed.clear()
        self.unflushed_since = None
        self._written = self._identity()
        log.debug("removed %d lines from %s in %.3f s", len(gone), self.path, time.monotonic() - started)

    def dump(self):
        """Every (key, value) in the indexed file, as Postfix sees them (``postmap -s``)."""
        done = self.postmap("-s", self.name)
        for line in done.stdout.decode("utf-8", "replace").splitlines():
            key, _, value = line.partition("\t") if "\t" in line else line.partition(" ")
            yield key.strip().lower(), value.strip()

    def drift(self, store):
        """None when the indexed map holds exactly the store's enabled handles, else what differs.

        The admin's own lines are not ours and are left out of the comparison.
        """
        try:
            self._read_foreign()
            expected = {key: target for key, target in store.map_entries() if key not in self.foreign_keys}
            indexed = {key: value for key, value in self.dump() if key not in self.foreign_keys}
        except (OSError, IncognitoMailError) as e:
            return str(e)
        missing = [k for k, t in expected.items() if indexed.get(k) != t]
        unknown = [k for k in indexed if k not in expected]
        if not missing and not unknown:
            return None
        return ("%d handles missing or wrong, %d entries the database does not know (e.g. %s); restart the "
                "server to rebuild the map from the database" % (len(missing), len(unknown), (missing + unknown)[0]))


def _same_endpoint(written, ours, queue_directory):
    """Does main.cf's ``unix:PATH`` or ``inet:HOST:PORT`` name our listener?

    Chrooted Postfix daemons (Debian's default) need unix paths relative to the queue
    directory, so such a relative path counts when it leads to our socket.
    """
    if written == ours:
        return True
    kind, _, path = written.partition(":")
    return kind == "unix" and ours == "unix:" + os.path.normpath(os.path.join(queue_directory, path))


def postfix_config_problems(config, table):
    """What Postfix's own configuration (postconf) lacks for our map, domains and policy service."""
    names = ["virtual_alias_maps", "canonical_maps", "recipient_canonical_maps", "virtual_alias_domains",
             "mydestination", "smtpd_recipient_restrictions", "smtpd_relay_restrictions", "queue_directory"]
    command = [find_postfix_command("postconf")]
    if config.postfix_config_dir:
        command += ["-c", config.postfix_config_dir]
    try:
        done = subprocess.run(command + ["-x"] + names, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    except (OSError, subprocess.TimeoutExpired, IncognitoMailError) as e:
        return [("Postfix configuration readable", str(e))]
    if done.returncode != 0:
        return [("Postfix configuration readable", done.stderr.decode("utf-8", "replace").strip())]
    values = {}
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()

    def words(name):
        return [w for w in re.split(r"[\s,]+", values.get(name, "")) if w]
    queue = values.get("queue_directory", "/var/spool/postfix")
    where = "main.cf in %s" % (config.postfix_config_dir or "/etc/postfix")
    if config.socketmap_listen:
        ours = lambda w: w.startswith("socketmap:") and _same_endpoint(w[10:].rpartition(":")[0], config.socketmap_listen, queue)
        wanted = "socketmap:%s:virtual" % config.socketmap_listen
    else:
        ours = lambda w: w == table.name or (table.type == "hash" and w == table.path)
        wanted = table.name
    problems = []
    if any(ours(w) for w in words("virtual_alias_maps")):
        domains = set(words("virtual_alias_domains")) | set(words("mydestination"))
        role = "virtual_alias_maps"
    elif any(ours(w) for w in words("canonical_maps") + words("recipient_canonical_maps")):
        domains = set(words("mydestination")) | set(words("virtual_alias_domains"))
        role = "canonical"
    else:
        problems.append(("Postfix uses the map", "neither virtual_alias_maps nor (recipient_)canonical_maps in %s "
                         "lists %s; add it, e.g. virtual_alias_maps = %s, then postfix reload" % (where, wanted, wanted)))
        role = None
    if role:
        problems.append(("Postfix uses the map (%s)" % role, None))
        missing = [d for d in config.domains if d not in domains]
        setting = "virtual_alias_domains" if role == "virtual_alias_maps" else "mydestination"
        problems.append(("Postfix routes every domain", "%s not in %s (%s); add them there, then postfix reload"
                         % (", ".join(missing), setting, where) if missing else None))
    if config.policy_listen:
        endpoint = config.policy_listen
        referenced = any(before == "check_policy_service" and _same_endpoint(word, endpoint, queue)
                         for n in ("smtpd_recipient_restrictions", "smtpd_relay_restrictions")
                         for before, word in zip(words(n), words(n)[1:]))
        problems.append(("Postfix asks the policy service", None if referenced else
                         "smtpd_recipient_restrictions in %s lacks check_policy_service %s; see README.md"
                         % (where, endpoint)))
    return problems


class SocketmapTable:
    """The lookup style where Postfix asks the daemon (``SocketmapListen``): nothing to write.

    A sibling of PostfixMap with the same interface. The admin's map file is left as is;
    its keys are still never handed out as handles.
    """

    def __init__(self, config):
        self.path = config.map_file_path
        self.name = "socketmap"
        self.foreign_keys = set()
        self.unflushed = set()
        self.unflushed_since = None
        self.needs_rebuild = False

    def check_access(self):
        pass

    def fingerprint(self):
        return None

    def reconcile(self, entries, clean_fingerprint):
        keys = set()
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                for line in f:
                    key = map_line_key(line)
                    if key:
                        keys.add(key)
        self.foreign_keys = keys
        return False

    def apply(self, adds, removes):
        return lambda: None

    def flush_text(self):
        pass


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

_UNCHANGED = object()


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


class Service:
    """The one place that changes anything: every operation is store + Postfix, all or nothing.

    Operations are queued to one worker thread, which takes everything that arrived while
    the previous batch was being written and runs it as one batch: one sqlite transaction
    (a savepoint per operation, so one bad request fails alone), one ``postmap -d`` and one
    ``postmap -i``, then the commit. A result is handed back only after both the commit and
    the map update, so a reported handle is always recorded and routable.

    ``submit`` returns a concurrent.futures.Future; ``call`` waits for it; ``run`` awaits it
    from asyncio. ``clock`` is injectable so tests can move time.
    """

    def __init__(self, config, store, table, clock=time.time):
        self.config = config
        self.store = store
        self.table = table
        self.clock = clock
        self._queue = queue.Queue()
        self._thread = None
        self._lookups = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="incognitomail-lookup")
        self._lookup_store = None
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
        self.table.reconcile(self.store.map_entries(), clean)
        self._thread = threading.Thread(target=self._work, name="incognitomail-service", daemon=True)
        self._thread.start()

    def stop(self):
        """Finish every queued operation, flush the text map, remember that the stop was clean."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._lookups.shutdown(wait=True)
        if self._lookup_store is not None:
            self._lookup_store.close()
            self._lookup_store = None
        self.table.flush_text()
        # A text file still holding removed handles (a failed rewrite) must be rebuilt next time.
        fingerprint = None if self.table.unflushed else self.table.fingerprint()
        with self.store.transaction():
            self.store.set_meta("clean_stop", fingerprint)

    # -- entry points -----------------------------------------------------------------------

    def submit(self, operation, *args):
        future = concurrent.futures.Future()
        method = getattr(self, "_op_" + operation, None)
        if method is None:
            future.set_exception(BadRequest("unknown operation %r" % operation))
        else:
            self._queue.put((future, method, args))
        return future

    def call(self, operation, *args):
        return self.submit(operation, *args).result()

    async def run(self, operation, *args):
        return await asyncio.wrap_future(self.submit(operation, *args))

    async def lookup(self, address):
        """(target, enabled) of a handle, or None; from a read-only connection, beside the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._lookups, self._lookup, address)

    def _lookup(self, address):
        if self._lookup_store is None:
            self._lookup_store = Store(self.store.path, readonly=True)
        local, _, domain = address.lower().partition("@")
        if not domain or domain not in self.config.domains:
            return None
        return self._lookup_store.lookup_target(local, domain)

    # -- the worker -------------------------------------------------------------------------

    def _work(self):
        last_batch = time.monotonic()
        while True:
            try:
                first = self._queue.get(timeout=self._flush_wait(last_batch))
            except queue.Empty:
                self.table.flush_text()
                last_batch = time.monotonic()
                continue
            batch = [first]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if item is not None and item[0].set_running_or_notify_cancel()]
            try:
                self._run_batch(items)
            except Exception:       # never let one batch stop the worker: nobody would be answered
                log.exception("internal error in the service worker")
                self.store.rollback()
                for future, _, _ in items:
                    if not future.done():
                        future.set_exception(IncognitoMailError("internal error; the server log has details"))
            if self.table.needs_rebuild:
                self._rebuild_map()
            last_batch = time.monotonic()
            if self.table.unflushed_since is not None and last_batch - self.table.unflushed_since >= TEXT_FLUSH_MAX_DELAY:
                self.table.flush_text()
            if None in batch:
                return

    def _rebuild_map(self):
        """After a change that could not be undone: the store says what the map must hold."""
        try:
            self.table.rebuild(self.store.map_entries())
        except IncognitoMailError as e:
            log.error("%s (the map stays in doubt; it is rebuilt after the next batch or at start)", e)

    def _flush_wait(self, last_batch):
        """Seconds until the text map should drop removed lines: when idle, or when too old."""
        since = self.table.unflushed_since
        if since is None:
            return None
        due = min(last_batch + TEXT_FLUSH_DELAY, since + TEXT_FLUSH_MAX_DELAY)
        return max(0.0, due - time.monotonic())

    def _run_batch(self, items, retrying=False):
        """One transaction, one map update, one commit for every item; see the class docstring.

        When the map update or the commit fails, every operation that changed the map fails
        with that error; the others are run again in a transaction of their own.
        """
        if not items:
            return
        self.batches += 1
        try:
            self.store.begin()
        except sqlite3.Error as e:
            error = StoreError("the database is not available: %s" % e)
            for future, _, _ in items:
                future.set_exception(error)
            return
        changes = _MapChanges()
        outcomes = []           # (item, result or error, changed the map)
        for item in items:
            future, method, args = item
            op_changes = _MapChanges()
            try:
                with self.store.savepoint():
                    result = method(op_changes, *args)
            except IncognitoMailError as e:
                result = e
            except sqlite3.Error as e:
                log.error("database error in %s: %s", method.__name__[4:], e)
                result = StoreError("the database could not be written: %s" % e)
            except Exception:
                log.exception("internal error in %s", method.__name__[4:])
                result = IncognitoMailError("internal error; the server log has details")
            else:
                changes.merge(op_changes)
            outcomes.append((item, result, bool(op_changes.entries)))
        try:
            undo = self.table.apply(changes.adds, changes.removes)
            try:
                self.store.commit()
            except sqlite3.Error as e:
                undo()
                raise StoreError("the database could not be written: %s; nothing was changed" % e)
        except Exception as e:
            error = e
            if not isinstance(error, IncognitoMailError):
                log.exception("internal error while writing a batch")
                error = IncognitoMailError("internal error; the server log has details")
            log.error("%s", error)
            self.store.rollback()
            retry = [item for item, result, changed in outcomes
                     if not changed and not isinstance(result, IncognitoMailError)]
            for item, result, changed in outcomes:
                if isinstance(result, IncognitoMailError):
                    item[0].set_exception(result)
                elif changed or retrying:
                    item[0].set_exception(error)
            if not retrying:
                self._run_batch(retry, retrying=True)
            return
        for (future, _, _), result, _ in outcomes:
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    # -- operations (run in the worker, inside a savepoint) ------------------------------------

    def _authenticate(self, token):
        if not isinstance(token, str) or not token or len(token) > 256:
            raise Unauthorized("a secret token is required")
        account = self.store.account_by_digest(token_digest(token))
        if account is None:
            raise Unauthorized("unknown secret token")
        self.store.touch_account(account.id, self.clock())
        return account

    def _own_handle(self, account, address):
        local, domain = split_handle(address, self.config.domains)
        handle = self.store.handle(local, domain)
        if handle is None or handle.account_id != account.id:
            raise NotFound("no handle %s@%s belongs to this account" % (local, domain))
        return handle

    def _op_new_account(self, changes, address):
        address = check_address(address)
        token = new_token()
        account_id = self.store.add_account(address, token_digest(token), self.clock())
        log.info("new account %d for %s", account_id, address)
        return token

    def _op_new_handle(self, changes, token, label=None, domain=None):
        account = self._authenticate(token)
        label = check_label(label)
        if domain is None or domain == "":
            domain = self.config.default_domain
        if not isinstance(domain, str) or domain.lstrip("@").lower() not in self.config.domains:
            raise BadRequest("domain %r is not served here; choose one of: %s" % (domain, ", ".join(self.config.domains)))
        domain = domain.lstrip("@").lower()
        while True:
            local = new_handle_name(self.config.handle_length)
            key = "%s@%s" % (local, domain)
            if (key not in self.table.foreign_keys and key not in self.table.unflushed
                    and not self.store.handle_taken(local, domain)):
                break
        handle = self.store.add_handle(account.id, local, domain, label, self.clock())
        changes.add(key, account.address)
        log.info("new handle %s for account %d (%s)", key, account.id, account.address)
        return handle.public()

    def _op_delete_handle(self, changes, token, address):
        account = self._authenticate(token)
        handle = self._own_handle(account, address)
        self.store.delete_handle(handle.id)
        if handle.enabled:
            changes.remove(handle.address)
        log.info("deleted handle %s of account %d (%s)", handle.address, account.id, account.address)
        return {}

    def _op_update_handle(self, changes, token, address, label=_UNCHANGED, enabled=_UNCHANGED):
        account = self._authenticate(token)
        handle = self._own_handle(account, address)
        new_label = handle.label if label is _UNCHANGED else check_label(label)
        if enabled is _UNCHANGED:
            enabled = bool(handle.enabled)
        elif not isinstance(enabled, bool):
            raise BadRequest("enabled must be true or false")
        self.store.update_handle(handle.id, new_label, enabled)
        if enabled and not handle.enabled:
            changes.add(handle.address, account.address)
        elif handle.enabled and not enabled:
            changes.remove(handle.address)
        log.info("handle %s of account %d: %s%s", handle.address, account.id,
                 "enabled" if enabled else "disabled", ", label %r" % new_label if new_label else "")
        return self.store.handle_by_id(handle.id).public()

    def _op_list_handles(self, changes, token):
        account = self._authenticate(token)
        return [handle.public() for handle in self.store.handles_of(account.id)]

    def _op_account(self, changes, token):
        account = self._authenticate(token)
        return {"address": account.address, "domains": list(self.config.domains),
                "handles": self.store.count_handles_of(account.id), "created": iso_time(account.created)}

    def _op_delete_account(self, changes, token):
        account = self._authenticate(token)
        handles = self.store.handles_of(account.id)
        self.store.delete_account(account.id)
        for handle in handles:
            if handle.enabled:
                changes.remove(handle.address)
        log.info("deleted account %d (%s) and its %d handles", account.id, account.address, len(handles))
        return len(handles)

    def _op_rotate_token(self, changes, token):
        account = self._authenticate(token)
        new = new_token()
        self.store.set_token_digest(account.id, token_digest(new))
        log.info("new secret token for account %d (%s); the old one no longer works", account.id, account.address)
        return new

    def _op_status(self, changes):
        status = self.store.counts()
        status.update({"version": __version__, "pid": os.getpid(), "map": self.table.name,
                       "domains": list(self.config.domains)})
        return status

    def _op_record_received(self, changes, events):
        """``events``: [(address, time)] of messages that reached enabled handles."""
        counts, latest = {}, {}
        for address, when in events:
            key = tuple(address.lower().split("@", 1))
            counts[key] = counts.get(key, 0) + 1
            latest[key] = max(latest.get(key, 0), when)
        self.store.record_received(counts, latest)
        return len(events)

    def _op_prune(self, changes, handles_days, accounts_days, dry_run):
        if any(days is not None and days < 0 for days in (handles_days, accounts_days)):
            raise BadRequest("days must be 0 or more")
        if not self.config.policy_listen:
            raise BadRequest("pruning needs the policy service, which counts the mail each handle receives: "
                             "without it every handle looks unused. Set [General] PolicyListen and add the "
                             "policy service to Postfix first (see README.md)")
        now = self.clock()
        removed = []
        if handles_days is not None:
            counting_since = int(self.store.get_meta("counting_since") or now)
            if handles_days and counting_since > now - handles_days * 86400:
                raise BadRequest("the policy service has counted mail only since %s, so a handle cannot yet be known "
                                 "to be unused for %d days; prune from %s on, or give a shorter time"
                                 % (iso_time(counting_since), handles_days, iso_time(counting_since + handles_days * 86400)))
            for handle in self.store.unused_handles(now - handles_days * 86400):
                removed.append(handle.address)
                if not dry_run:
                    self.store.delete_handle(handle.id)
                    if handle.enabled:
                        changes.remove(handle.address)
        if accounts_days is not None:
            for account in self.store.unused_accounts(now - accounts_days * 86400):
                removed.append(account.address)
                if not dry_run:
                    self.store.delete_account(account.id)
        if removed and not dry_run:
            log.info("pruned %d never-used handles and accounts", len(removed))
            log.debug("pruned: %s", ", ".join(removed))
        return removed


###############################################################################
# Wire formats: JSON requests (control socket and WebSocket)
###############################################################################

# Operations an add-on may ask for over the WebSocket; the command line may ask for more.
WEBSOCKET_OPERATIONS = ("new_handle", "list_handles", "update_handle", "delete_handle", "account", "rotate_token")
CONTROL_OPERATIONS = WEBSOCKET_OPERATIONS + ("new_account", "delete_account", "status", "prune", "stop")


class JsonRequest(NamedTuple):
    id: object
    op: str
    args: tuple


def parse_json_request(text, allowed):
    """One JSON request -> JsonRequest; BadRequest (carrying the id when known) otherwise.

    Request: ``{"id": any, "op": name, "token": secret, ...}``; each operation's fields are
    checked here so the Service receives only well-formed arguments.
    """
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _with_id(BadRequest("not valid JSON: %s" % (e if isinstance(e, ValueError) else "nested too deeply")), None)
    if not isinstance(message, dict):
        raise _with_id(BadRequest("a request must be a JSON object"), None)
    request_id = message.get("id")
    op = message.get("op")
    if op not in allowed:
        raise _with_id(BadRequest("unknown op %r; known here: %s" % (op, ", ".join(allowed))), request_id)

    def field(name, kinds, required=True, default=None):
        if name not in message or message[name] is None:
            if required:
                raise _with_id(BadRequest("%s needs %r" % (op, name)), request_id)
            return default
        value = message[name]
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
            raise _with_id(BadRequest("%r has the wrong type" % name), request_id)
        return text(name, value) if isinstance(value, str) else value

    def text(name, value):
        try:
            value.encode("utf-8")       # JSON may carry lone surrogates ("\ud800"), which are not text
        except UnicodeEncodeError:
            raise _with_id(BadRequest("%r is not valid Unicode text" % name), request_id)
        return value

    if op == "new_account":
        args = (field("address", str),)
    elif op == "status" or op == "stop":
        args = ()
    elif op == "prune":
        args = (field("handles_unused_days", int, False), field("accounts_unused_days", int, False),
                bool(field("dry_run", bool, False, False)))
    else:
        args = (field("token", str),)
        if op == "new_handle":
            args += (field("label", str, False), field("domain", str, False))
        elif op in ("update_handle", "delete_handle"):
            args += (field("address", str),)
            if op == "update_handle":
                args += (field("label", str, False) if "label" in message else _UNCHANGED,
                         field("enabled", bool) if "enabled" in message else _UNCHANGED)
    return JsonRequest(request_id, op, args)


def _with_id(error, request_id):
    error.request_id = request_id
    return error


# How each operation's result is wrapped in its reply.
_RESULT_FIELDS = {"new_handle": "handle", "update_handle": "handle", "list_handles": "handles",
                  "account": "account", "rotate_token": "token", "new_account": "token",
                  "status": "status", "prune": "removed", "delete_account": "deleted_handles"}


def json_reply(request_id, op, result):
    reply = {"id": request_id, "ok": True}
    if op in _RESULT_FIELDS:
        reply[_RESULT_FIELDS[op]] = result
    return json.dumps(reply)


def json_error(request_id, error):
    reply = {"id": request_id, "ok": False, "error": error.code, "message": str(error)}
    if isinstance(error, RateLimited):
        reply["retry_after"] = error.retry_after
    return json.dumps(reply)


###############################################################################
# Wire formats: Postfix policy delegation and socketmap
###############################################################################

class PolicyParser:
    """SMTPD_POLICY_README: ``name=value`` lines, a request ends with an empty line.

    ``feed(bytes)`` returns the complete requests as dicts. Oversized requests, lines
    without ``=`` and non-UTF-8 bytes raise PostfixProtocolError.
    """
    MAX_REQUEST = 16384

    def __init__(self):
        self._buffer = b""

    @property
    def incomplete(self):
        """Bytes of a request that has not ended yet (when the client hangs up: a bad client)."""
        return bool(self._buffer)

    def feed(self, data):
        self._buffer += data
        requests = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                if len(self._buffer) > self.MAX_REQUEST:
                    raise PostfixProtocolError("policy request longer than %d bytes" % self.MAX_REQUEST)
                return requests
            block, self._buffer = self._buffer[:end], self._buffer[end + 2:]
            if len(block) > self.MAX_REQUEST:
                raise PostfixProtocolError("policy request longer than %d bytes" % self.MAX_REQUEST)
            request = {}
            for line in block.split(b"\n"):
                name, sep, value = line.partition(b"=")
                if not sep or not name:
                    raise PostfixProtocolError("policy request line without name=value: %r" % line[:80])
                try:
                    request[name.decode("ascii")] = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise PostfixProtocolError("policy request is not text: %r" % line[:80])
            requests.append(request)


def policy_response(action):
    return ("action=%s\n\n" % action).encode("utf-8")


class NetstringParser:
    """Netstrings (``12:hello world!,``) as socketmap_table(5) uses them."""
    MAX_LENGTH = 100000

    def __init__(self):
        self._buffer = b""

    @property
    def incomplete(self):
        return bool(self._buffer)

    def feed(self, data):
        self._buffer += data
        strings = []
        while True:
            colon = self._buffer.find(b":")
            if colon < 0:
                if len(self._buffer) > 10:
                    raise PostfixProtocolError("netstring length too long")
                return strings
            digits = self._buffer[:colon]
            if not digits.isdigit() or len(digits) > 6 or int(digits) > self.MAX_LENGTH:
                raise PostfixProtocolError("bad netstring length %r" % digits[:12])
            length = int(digits)
            if len(self._buffer) < colon + 1 + length + 1:
                return strings
            if self._buffer[colon + 1 + length:colon + 2 + length] != b",":
                raise PostfixProtocolError("netstring not terminated by a comma")
            strings.append(self._buffer[colon + 1:colon + 1 + length])
            self._buffer = self._buffer[colon + 2 + length:]


def netstring(data):
    return b"%d:%s," % (len(data), data)


###############################################################################
# Wire formats: WebSocket handshake and RFC 6455 frames
###############################################################################


_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 section 1.3
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"         # RFC 7230 section 3.2.6
_REQUEST_LINE = re.compile(r"(%s) ([\x21-\x7e]+) HTTP/(\d)\.(\d)" % _TOKEN)
_HEADER_NAME = re.compile(_TOKEN)
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")    # linear: no backtracking on hostile input


class Request(NamedTuple):
    """A parsed HTTP request head. `headers` maps lower-cased names to values; a repeated field's
    values are joined with ', ' (RFC 7230 section 3.2.2)."""
    method: str
    target: str
    path: str
    version: Tuple[int, int]
    headers: Dict[str, str]


def parse_request(head: bytes) -> Request:
    """Parse a request line and header fields, `head` ending with the blank line (CRLF CRLF)."""
    if not head.endswith(b"\r\n\r\n"):
        raise HandshakeError(400, "header section must end with CRLF CRLF")
    lines = head[:-4].decode("latin-1").split("\r\n")   # latin-1: any byte decodes, none is lost
    start = _REQUEST_LINE.fullmatch(lines[0])
    if start is None:
        raise HandshakeError(400, "malformed request line")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        if not colon or not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
            raise HandshakeError(400, "malformed header line")
        name = name.lower()
        if name == "host" and name in headers:
            raise HandshakeError(400, "more than one Host header")   # RFC 7230 section 5.4
        headers[name] = headers[name] + ", " + value if name in headers else value
    method, target, major, minor = start.groups()
    return Request(method, target, target.split("?", 1)[0], (int(major), int(minor)), headers)


def _tokens(value: Optional[str]) -> List[str]:
    """The lower-cased items of a comma-separated header value."""
    return [item.strip().lower() for item in (value or "").split(",")]


def check_upgrade(request: Request, path: str, allowed_origins: Iterable[str] = ()) -> str:
    """Validate a WebSocket upgrade request for `path`; return its Sec-WebSocket-Key.

    Raises HandshakeError with the status to answer. An empty `allowed_origins` allows any Origin;
    otherwise the Origin header must be present and equal (ignoring case) to one of them.
    """
    if request.path != path:
        raise HandshakeError(404, "no WebSocket endpoint at this path")
    if request.method != "GET":
        raise HandshakeError(400, "WebSocket upgrade needs GET")
    if request.version[0] != 1 or request.version[1] < 1:
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1")
    headers = request.headers
    if not headers.get("host"):
        raise HandshakeError(400, "missing Host header")
    if "websocket" not in _tokens(headers.get("upgrade")) or \
            "upgrade" not in _tokens(headers.get("connection")):
        raise HandshakeError(426, "this endpoint only speaks WebSocket", [("Upgrade", "websocket")])
    key = headers.get("sec-websocket-key", "")
    try:
        key_ok = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:   # binascii.Error, or non-ASCII text
        key_ok = False
    if not key_ok:
        raise HandshakeError(400, "missing or malformed Sec-WebSocket-Key")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeError(426, "unsupported WebSocket version",
                             [("Sec-WebSocket-Version", "13")])
    allowed = {origin.lower() for origin in allowed_origins}
    if allowed and headers.get("origin", "").lower() not in allowed:
        raise HandshakeError(403, "origin not allowed")
    return key


def accept_response(key: str) -> bytes:
    """The 101 Switching Protocols response that completes the handshake for `key`."""
    accept = base64.b64encode(hashlib.sha1((key + _GUID).encode("ascii")).digest()).decode("ascii")
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n\r\n" % accept).encode("ascii")


def error_response(status: int, reason: str, headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    """A whole HTTP error response with a short text/plain body; the connection closes after it."""
    body = (reason + "\n").encode("utf-8")
    lines = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase),
             "Content-Type: text/plain; charset=utf-8",
             "Content-Length: %d" % len(body),
             "Connection: close"]
    lines += ["%s: %s" % (name, value) for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))
_LENGTH_BYTES = {126: 2, 127: 8}   # 7-bit length values announcing an extended length


class Message(NamedTuple):
    """A complete data message; text is already decoded."""
    is_text: bool
    data: Union[str, bytes]


class Ping(NamedTuple):
    """A ping; WebSocket.recv() answers it with a pong carrying the same payload."""
    payload: bytes


class Pong(NamedTuple):
    """A pong (unsolicited ones are allowed by RFC 6455 and ignored)."""
    payload: bytes


class Close(NamedTuple):
    """The peer's close frame; `code` is None when it carried no payload."""
    code: Optional[int]
    reason: str


Event = Union[Message, Ping, Pong, Close]


def is_valid_close_code(code: int) -> bool:
    """Whether a peer may send `code` in a close frame (RFC 6455 section 7.4). The codes
    registered with IANA since (1012-1014) are not accepted."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999


def _unmask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR `data` with the repeated 4-byte `mask`, starting at mask byte `offset % 4`.

    One big-integer XOR over the whole buffer runs at C speed; a per-byte Python loop would
    cost about a microsecond per byte.
    """
    if not data:
        return b""
    shift = offset % 4
    key = (mask[shift:] + mask[:shift]) * (len(data) // 4 + 1)
    xored = int.from_bytes(data, "little") ^ int.from_bytes(key[:len(data)], "little")
    return xored.to_bytes(len(data), "little")


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    if len(payload) == 1:
        raise ProtocolError(1002, "close frame payload of one byte")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(1002, "invalid close code %d" % code)
    try:
        return Close(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError(1007, "close reason is not UTF-8") from None


class FrameParser:
    """Turns bytes from a client into events, enforcing RFC 6455 as early as the bytes allow.

    Payload bytes are consumed as they arrive: text is UTF-8-checked incrementally, so an invalid
    sequence fails the connection before the rest of its frame is sent, and the size limit is
    checked from the frame header, before any of the payload is buffered. Once the events of a
    feed are consumed, what stays in memory is at most a partial frame header or control frame
    and the current message (<= max_message_size). After a close frame, further bytes are ignored.
    """
    __slots__ = ("max_message_size", "closed", "_buf", "_mask", "_fin", "_frame_opcode",
                 "_remaining", "_offset", "_opcode", "_decoder", "_parts", "_size")

    def __init__(self, max_message_size: int):
        self.max_message_size = max_message_size
        self.closed = False
        self._buf = bytearray()
        # the frame being read: its mask is set from the end of its header to the end of its payload
        self._mask: Optional[bytes] = None
        self._fin = False
        self._frame_opcode = OP_CONT
        self._remaining = 0   # payload bytes not yet consumed
        self._offset = 0      # payload bytes consumed (the mask's phase)
        # the message being assembled: its opcode is set from its first frame to its last
        self._opcode: Optional[int] = None
        self._decoder: Optional[codecs.IncrementalDecoder] = None   # text messages only
        self._parts: List[Union[str, bytes]] = []
        self._size = 0        # payload bytes announced so far

    def feed(self, data: bytes) -> Iterator[Event]:
        """Add bytes from the peer; return an iterator over the events they complete.

        The iterator raises ProtocolError at the offending frame, after yielding the events that
        came before it (so a message followed by a bad frame is still delivered). Exhaust it
        before feeding more.
        """
        self._buf += data
        return self._events()

    def _events(self) -> Iterator[Event]:
        buf = self._buf
        while not self.closed:
            if self._mask is None and not self._read_header():
                return
            if self._frame_opcode >= OP_CLOSE:   # control frame: at most 125 bytes, wait for all
                if len(buf) < self._remaining:
                    return
                payload = _unmask(self._take(self._remaining), self._mask)
                self._mask = None
                yield self._control_event(self._frame_opcode, payload)
                continue
            n = min(self._remaining, len(buf))
            if n:
                self._add_payload(_unmask(self._take(n), self._mask, self._offset))
                self._offset += n
                self._remaining -= n
            if self._remaining:
                return
            self._mask = None
            if self._fin:
                yield self._end_message()

    def _take(self, n: int) -> bytearray:
        chunk = self._buf[:n]
        del self._buf[:n]   # cheap: a bytearray drops leading bytes by moving its start
        return chunk

    def _read_header(self) -> bool:
        """Parse the next frame header if complete; each rule is checked once its bytes are in."""
        buf = self._buf
        if len(buf) < 2:
            return False
        fin, rsv, opcode = buf[0] & 0x80, buf[0] & 0x70, buf[0] & 0x0F
        masked, length = buf[1] & 0x80, buf[1] & 0x7F
        if rsv:
            raise ProtocolError(1002, "reserved bits set but no extension negotiated")
        if opcode not in _OPCODES:
            raise ProtocolError(1002, "unknown opcode %d" % opcode)
        if not masked:
            raise ProtocolError(1002, "client frame is not masked")
        if opcode >= OP_CLOSE:
            if not fin:
                raise ProtocolError(1002, "fragmented control frame")
            if length > 125:
                raise ProtocolError(1002, "control frame payload over 125 bytes")
        elif opcode == OP_CONT and self._opcode is None:
            raise ProtocolError(1002, "continuation frame without a message in progress")
        elif opcode != OP_CONT and self._opcode is not None:
            raise ProtocolError(1002, "new message before the previous one was finished")
        start = 2 + _LENGTH_BYTES.get(length, 0)
        if len(buf) < start:
            return False
        if start > 2:
            length = int.from_bytes(buf[2:start], "big")
            if length >> 63:
                raise ProtocolError(1002, "frame length has its most significant bit set")
        if opcode < OP_CLOSE and self._size + length > self.max_message_size:
            raise ProtocolError(1009, "message larger than %d bytes" % self.max_message_size)
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

    def _add_payload(self, chunk: bytes) -> None:
        if self._decoder is None:
            self._parts.append(chunk)
            return
        try:
            self._parts.append(self._decoder.decode(chunk))
        except UnicodeDecodeError:
            raise ProtocolError(1007, "invalid UTF-8 in text message") from None
        # CPython's decoder rejects every impossible prefix at once except a surrogate's
        # (ED A0..BF), which it only rejects when the third byte arrives: check that one here.
        pending = self._decoder.getstate()[0]
        if len(pending) > 1 and pending[0] == 0xED and pending[1] >= 0xA0:
            raise ProtocolError(1007, "invalid UTF-8 in text message (surrogate)")

    def _end_message(self) -> Message:
        if self._decoder is not None:
            try:
                self._parts.append(self._decoder.decode(b"", final=True))
            except UnicodeDecodeError:
                raise ProtocolError(1007, "text message ends inside a UTF-8 sequence") from None
            message = Message(True, "".join(self._parts))
        else:
            message = Message(False, b"".join(self._parts))
        self._opcode, self._decoder, self._parts, self._size = None, None, [], 0
        return message

    def _control_event(self, opcode: int, payload: bytes) -> Event:
        if opcode == OP_PING:
            return Ping(payload)
        if opcode == OP_PONG:
            return Pong(payload)
        event = _parse_close(payload)
        self.closed = True
        self._buf.clear()
        return event


def encode_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A complete unmasked (server-to-client) frame."""
    first, n = (0x80 if fin else 0) | opcode, len(payload)
    if n < 126:
        head = struct.pack("!BB", first, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


def encode_message(message: Union[str, bytes]) -> bytes:
    """A text frame for str, a binary frame for bytes-like."""
    if isinstance(message, str):
        return encode_frame(OP_TEXT, message.encode("utf-8"))
    if isinstance(message, (bytes, bytearray, memoryview)):
        return encode_frame(OP_BINARY, bytes(message))
    raise TypeError("WebSocket messages are str or bytes, not %s" % type(message).__name__)


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut (on a character boundary) to fit in 125 bytes."""
    data = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(OP_CLOSE, code.to_bytes(2, "big") + data)


###############################################################################
# Servers: shared pieces
###############################################################################

class TokenBucket:
    """Rate limits keyed by client or account: ``per_minute`` requests, bursting as many.

    ``take(key)`` returns 0 when allowed, else the seconds to wait. ``per_minute = 0``
    turns the limit off. Full buckets are forgotten so memory stays bounded.
    """

    def __init__(self, per_minute, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._buckets = {}

    def take(self, key, peek=False):
        if not self.per_minute:
            return 0
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.per_minute, now))
        tokens = min(self.per_minute, tokens + (now - last) * self.per_minute / 60.0)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return max(1, int((1 - tokens) * 60.0 / self.per_minute + 0.999))
        if not peek:
            tokens -= 1
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100000:
            self._forget_full(now)
        return 0

    def used(self, key):
        """Has ``key`` taken anything that has not come back yet?"""
        if not self.per_minute or key not in self._buckets:
            return False
        tokens, last = self._buckets[key]
        return tokens + (self.clock() - last) * self.per_minute / 60.0 < self.per_minute

    def _forget_full(self, now):
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.per_minute / 60.0 >= self.per_minute:
                del self._buckets[key]


def _peer_uid(sock):
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def _prepare_unix_socket_path(path, key, folder_mode):
    """Make ``path`` ready to bind: a folder of ours, no stale socket, nothing foreign replaced."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        try:
            os.makedirs(folder, mode=folder_mode)
        except OSError as e:
            raise ServerError("%s: cannot create the folder for %s: %s" % (folder, key, _os_reason(e)))
    st = os.stat(folder)
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        raise ServerError("%s: folder for %s is writable by everyone; use a private folder such as "
                          "/run/incognitomail" % (folder, key))
    if st.st_mode & 0o002:
        log.warning("%s is in %s, which every user can write to; a private folder such as /run/incognitomail "
                    "is safer (the socket is still mode 0600 and checks its callers)", path, folder)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise ServerError("%s (%s) exists and is not a socket; remove it or choose another path" % (path, key))
    if existing.st_uid not in (os.geteuid(), 0):
        raise ServerError("%s (%s) is a socket owned by user %s; remove it or choose another path"
                          % (path, key, _user_name(existing.st_uid)))
    try:
        os.unlink(path)     # we hold the lock file, so no other server is using it: a crash left it
    except OSError as e:
        raise ServerError("%s (%s): cannot remove the socket a stopped server left: %s; remove it as its owner "
                          "(%s) or choose another path" % (path, key, _os_reason(e), _user_name(existing.st_uid)))


async def _start_unix_server(handler, path, key, mode):
    """Listen on a Unix socket of ``mode``; Postfix's sockets (0666) get a folder it can enter."""
    _prepare_unix_socket_path(path, key, 0o700 if mode == 0o600 else 0o755)
    old_umask = os.umask(0o777 & ~mode)
    try:
        server = await asyncio.start_unix_server(handler, path, limit=65536)
    except OSError as e:
        raise ServerError("%s: cannot listen on %s: %s" % (path, key, _os_reason(e)))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    return server


async def _start_listener(handler, endpoint, key, unix_mode):
    """``unix:/path`` or ``inet:host:port`` -> a started asyncio server."""
    kind, _, rest = endpoint.partition(":")
    if kind == "unix":
        return await _start_unix_server(handler, rest, key, unix_mode)
    host, port = parse_host_port(rest)
    try:
        return await asyncio.start_server(handler, host or None, port)
    except OSError as e:
        raise ServerError("%s: cannot listen on %s: %s" % (key, endpoint, _os_reason(e)))


###############################################################################
# Servers: WebSocket connections over asyncio
###############################################################################


SEND_TIMEOUT = 30.0     # how long a peer may read nothing while a reply waits, without an idle timeout


class WebSocketConnection(asyncio.Protocol):
    """A server-side WebSocket on a bare asyncio Protocol: the opening handshake, then frames.

    No task, stream or coroutine waits while a connection is idle, so one costs about 2 KB
    (asyncio's streams cost 5.6 KB). Subclasses answer ``message_received(message)`` and may
    ``send`` from anywhere in the event loop; ``closed()`` is called once at the end.

    Everything a client can make the server hold is bounded: the header section
    (MAX_HEADER_BYTES, HANDSHAKE_TIMEOUT), a message (max_message_size, checked from the
    frame header by FrameParser), and unread replies: while the peer reads nothing, we read
    nothing from it either, and after the idle timeout (SEND_TIMEOUT without one) we drop it.
    A header section larger than ``max_header_bytes`` gets 431; one not complete within
    ``handshake_timeout`` is cut off; a peer that does not answer our close frame within
    ``close_timeout`` is cut off too.
    """
    __slots__ = ("transport", "remote_address", "_path", "_allowed_origins", "_parser", "_head",
                 "_idle_timeout", "_last_heard", "_timer", "_close_sent", "_paused_by",
                 "_max_header_bytes", "_handshake_timeout", "_close_timeout")

    def __init__(self, *, path, allowed_origins=(), max_message_size=65536, idle_timeout=300.0,
                 max_header_bytes=8192, handshake_timeout=10.0, close_timeout=3.0):
        self._max_header_bytes = max_header_bytes
        self._handshake_timeout, self._close_timeout = handshake_timeout, close_timeout
        self.transport = None
        self.remote_address = None
        self._path, self._allowed_origins = path, allowed_origins
        self._parser = FrameParser(max_message_size)
        self._head = b""                # the handshake's bytes so far; None once it is done
        self._idle_timeout = idle_timeout
        self._last_heard = 0.0
        self._timer = None              # the one timer: handshake, idle, send or close deadline
        self._close_sent = False
        self._paused_by = set()         # why reading is paused: "writing", or a subclass's reason

    # -- for subclasses ---------------------------------------------------------------------

    def opened(self):
        """The opening handshake succeeded."""

    def message_received(self, message):
        """A text (str) or binary (bytes) message arrived."""

    def closed(self):
        """The connection is over (called once)."""

    @property
    def is_open(self):
        return self._head is None and not self._close_sent and not self.transport.is_closing()

    def send(self, message):
        """Queue a text (str) or binary (bytes) message; False if the connection is closing."""
        if not self.is_open:
            return False
        self.transport.write(encode_message(message))
        return True

    def close(self, code=1000, reason=""):
        """Start the closing handshake; the transport closes when the peer answers, or soon."""
        if self.transport.is_closing() or self._close_sent:
            return
        if self._head is not None:
            self.transport.close()
            return
        self._close_sent = True
        self.transport.write(encode_close(code, reason))
        self._set_timer(self._close_timeout, self.transport.abort)

    def pause_reading(self, reason):
        """Read nothing more from the peer until ``resume_reading(reason)``."""
        if not self._paused_by and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused_by.add(reason)

    def resume_reading(self, reason):
        self._paused_by.discard(reason)
        if not self._paused_by and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.remote_address = transport.get_extra_info("peername")
        self._set_timer(self._handshake_timeout, transport.abort)

    def data_received(self, data):
        if self._head is not None:
            data = self._handshake(data)
            if not data:
                return
        if self._parser is None:
            return                      # after a protocol error the rest is noise
        self._last_heard = asyncio.get_running_loop().time()
        try:
            for event in self._parser.feed(data):
                if isinstance(event, Message):
                    if not self._close_sent:    # nothing is answered after our close frame
                        self.message_received(event.data)
                elif isinstance(event, Ping):
                    self.transport.write(encode_frame(OP_PONG, event.payload))
                elif isinstance(event, Close):
                    if not self._close_sent:
                        self._close_sent = True
                        self.transport.write(encode_close(event.code or 1000))
                    self.transport.close()      # the server closes TCP first (RFC 6455 7.1.1)
                    return
                if self.transport.is_closing():
                    return
        except ProtocolError as exc:
            self._fail(exc.close_code, exc.reason)

    def eof_received(self):
        return False                    # the peer hung up: close our side too

    def pause_writing(self):
        """The peer is not reading our replies: stop reading its requests, and give it time."""
        self.pause_reading("writing")
        if not self._close_sent:        # when closing, the close timeout already runs
            self._set_timer(self._idle_timeout or SEND_TIMEOUT, self.transport.abort)

    def resume_writing(self):
        self.resume_reading("writing")
        if not self._close_sent:
            self._start_idle_timer()

    def connection_lost(self, exc):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.closed()

    # -- inside ---------------------------------------------------------------------------------

    def _handshake(self, data):
        """Collect the header section; answer 101 or an HTTP error. Returns bytes past it."""
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= self._max_header_bytes:
            return b""
        head, rest, self._head = self._head[:end + 4], self._head[end + 4:], None
        try:
            if end < 0 or end + 4 > self._max_header_bytes:
                raise HandshakeError(431, "request header section too large")
            key = check_upgrade(parse_request(head), self._path, self._allowed_origins)
        except HandshakeError as exc:
            self.transport.write(error_response(exc.status, exc.reason, exc.headers))
            self.transport.close()
            return b""
        self.transport.write(accept_response(key))
        self._last_heard = asyncio.get_running_loop().time()
        self._start_idle_timer()
        self.opened()
        return rest

    def _fail(self, code, reason):
        """A protocol error: close frame with its code, half-close, and stop parsing."""
        self._parser = None
        if not self._close_sent:
            self._close_sent = True
            self.transport.write(encode_close(code, reason))
        if self.transport.can_write_eof():
            self.transport.write_eof()  # so a peer we can no longer parse hangs up too
        self._set_timer(self._close_timeout, self.transport.abort)

    def _set_timer(self, delay, callback):
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, callback)

    def _start_idle_timer(self):
        if self._idle_timeout and not self._close_sent:
            self._set_timer(self._idle_timeout, self._idle_check)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle_check(self):
        """One timer per connection: re-armed for what is left, closing when the time is up."""
        left = self._last_heard + self._idle_timeout - asyncio.get_running_loop().time()
        if left > 0:
            self._set_timer(left, self._idle_check)
        else:
            self.close(1001, "idle timeout")


###############################################################################
# Servers: the daemon
###############################################################################

STOP_GRACE_SECONDS = 20
RECEIVED_FLUSH_SECONDS = 1.0
MAX_UNWRITTEN_RECEIVED = 100000     # counts kept for a retry while the database cannot be written
FD_SHORTAGE_LOG_SECONDS = 60        # a shortage of file descriptors is logged again after this quiet time


class _LockFile:
    """One server per lock file: an flock held for the server's life, holding its PID."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        folder = os.path.dirname(self.path)
        for attempt in range(20):
            try:
                os.makedirs(folder, mode=0o755, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ServerError("%s: cannot open the lock file ([General] LockFilePath): %s"
                                  % (self.path, _os_reason(e)))
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                if (pid.isdigit() and _process_exists(int(pid))) or attempt == 19:
                    raise ServerError("already running (pid %s, lock %s)" % (pid or "unknown", self.path))
                time.sleep(0.01)    # a reader's brief shared lock (status, check): try again
                continue
            if _file_identity(self.path) is None or os.fstat(fd).st_ino != os.stat(self.path).st_ino:
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


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def running_pid(config):
    """The PID in the lock file if a server holds the lock, else None."""
    try:
        fd = os.open(config.lock_file_path, os.O_RDONLY)
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


MAX_PIPELINED = 16      # requests one WebSocket connection may have in flight
HELPER_ABOVE_CONNECTIONS = 5000     # start postmap from the helper while holding this many (measured)


class _AddOnConnection(WebSocketConnection):
    """One browser add-on's WebSocket: each message is a request the Daemon answers."""
    __slots__ = ("daemon", "client", "in_flight", "admitted")

    def __init__(self, daemon):
        config = daemon.config
        super().__init__(path=config.listen_path, allowed_origins=config.allowed_origins,
                         max_message_size=config.max_message_size, idle_timeout=config.idle_timeout or None)
        self.daemon, self.client, self.in_flight, self.admitted = daemon, None, 0, False

    def connection_made(self, transport):
        super().connection_made(transport)
        self.client = self.remote_address[0] if self.remote_address else "unknown"
        self.admitted = self.daemon._admit(self)
        if not self.admitted:
            transport.write(error_response(503, "too many connections", [("Retry-After", "10")]))
            transport.close()

    def message_received(self, message):
        self.in_flight += 1
        if self.in_flight >= MAX_PIPELINED:     # a client may pipeline, but not without bound
            self.pause_reading("pipelined")
        self.daemon._track(self.daemon._answer_websocket(self, message, self.client)).add_done_callback(self._answered)

    def _answered(self, task):
        self.in_flight -= 1
        if self.in_flight < MAX_PIPELINED:
            self.resume_reading("pipelined")

    def closed(self):
        if self.admitted:
            self.daemon._release(self)


class Daemon:
    """Owns the lock, the store, the Service and every listener; stops gracefully."""

    def __init__(self, config, clock=time.time):
        self.config = config
        self.clock = clock
        self.service = None
        self._stop = None
        self._requests = set()          # in-flight request tasks: finished before stopping
        self._websockets = set()        # open _AddOnConnection objects
        self._connections = {}          # client IP -> how many WebSocket connections it has open
        self._creation_per_client = TokenBucket(config.handles_per_minute_per_client)
        self._creation_per_account = TokenBucket(config.handles_per_minute_per_account)
        self._failures_per_client = TokenBucket(config.failed_tokens_per_minute_per_client)
        self._suspects = {}             # client IP -> asyncio.Lock: wrong tokens lately, one request at a time
        self._received = []             # (address, time) from the policy service, not yet written
        self._counted = {}              # (instance, recipient) already counted: once per message
        self._postfix_clients = set()   # policy and socketmap connections, closed at stop
        self._fd_shortage_logged = float("-inf")   # when a shortage of descriptors was last seen

    def run(self):
        """Run in the foreground until SIGTERM, SIGINT or ``stop``; raise ServerError on failure."""
        lock = _LockFile(self.config.lock_file_path)
        lock.acquire()
        store = launcher = None
        try:
            ssl_context = self._ssl_context()
            store = Store(self.config.database_path)
            table = make_table(self.config)
            launcher = getattr(table, "launcher", None)
            if launcher is not None:
                launcher.start_helper()     # before any connection: see ProgramLauncher
            self.service = Service(self.config, store, table, clock=self.clock)
            self.service.start()
            try:
                asyncio.run(self._serve(ssl_context))
            finally:
                self.service.stop()
        finally:
            if launcher is not None:
                launcher.close()
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

    async def _serve(self, ssl_context):
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.set_exception_handler(self._loop_exception)
        servers = [await _start_unix_server(self._serve_control, self.config.unix_sock_path,
                                            "[General] UnixSockPath", 0o600)]
        background = []
        try:
            if self.config.listen_address:
                host, port = parse_host_port(self.config.listen_address)
                try:
                    servers.append(await loop.create_server(
                        lambda: _AddOnConnection(self), host or None, port, ssl=ssl_context, backlog=1024))
                except OSError as e:
                    raise ServerError("cannot listen on [General] ListenAddress %s: %s"
                                      % (self.config.listen_address, _os_reason(e)))
            if self.config.policy_listen:
                servers.append(await _start_listener(self._serve_policy, self.config.policy_listen,
                                                     "[General] PolicyListen", 0o666))
            if self.config.socketmap_listen:
                servers.append(await _start_listener(self._serve_socketmap, self.config.socketmap_listen,
                                                     "[General] SocketmapListen", 0o666))
            log.info("IncognitoMail %s serving %s for %s (pid %d)%s", __version__, self.service.table.name,
                     ", ".join(self.config.domains), os.getpid(),
                     "; WebSocket on %s%s%s" % ("wss://" if ssl_context else "ws://", self.config.listen_address,
                                               self.config.listen_path) if self.config.listen_address else "")
            background.append(asyncio.ensure_future(self._write_received_periodically()))
            if self.config.auto_prune:
                background.append(asyncio.ensure_future(self._prune_daily()))
            await self._stop.wait()
            log.info("stopping: finishing %d requests in flight", len(self._requests))
        finally:
            for server in servers:
                server.close()
            if self._requests:
                await asyncio.wait(set(self._requests), timeout=STOP_GRACE_SECONDS)
            for connection in list(self._websockets):
                connection.close(1001, "server stopping")
            for _ in range(100):        # each answers, or is cut off after its close timeout
                if not self._websockets:
                    break
                await asyncio.sleep(0.05)
            for writer in self._postfix_clients:
                writer.close()      # Postfix reconnects to the next server; nothing is counted after this
            for task in background:
                task.cancel()
            await self._flush_received()
            for path in (self.config.unix_sock_path, self.config.socketmap_listen[5:] if
                         self.config.socketmap_listen else "", self.config.policy_listen[5:]
                         if self.config.policy_listen.startswith("unix:") else ""):
                if path:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass

    def _loop_exception(self, loop, context):
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            # asyncio retries accept() every second: one line per shortage, not one per retry
            if time.monotonic() - self._fd_shortage_logged > FD_SHORTAGE_LOG_SECONDS:
                log.error("out of file descriptors (%s): new connections are refused until some close; "
                          "raise the limit (ulimit -n) or lower [Limits] MaxConnections", error)
            self._fd_shortage_logged = time.monotonic()
            return
        loop.default_exception_handler(context)

    def _track(self, coroutine):
        """Run one request as a task the stop waits for."""
        task = asyncio.ensure_future(coroutine)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)
        return task

    # -- control socket: the command line ------------------------------------------------------

    async def _serve_control(self, reader, writer):
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
            while not self._stop.is_set():
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write((json_error(None, BadRequest("request too long")) + "\n").encode())
                    return
                if not line:
                    return
                reply = await self._track(self._answer_json(line.decode("utf-8", "replace"), CONTROL_OPERATIONS, None))
                writer.write((reply + "\n").encode("utf-8"))
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _answer_json(self, text, allowed, client):
        """One JSON request -> one JSON reply text; never raises."""
        request_id = None
        try:
            request = parse_json_request(text, allowed)
            request_id = request.id
            if request.op == "stop":
                log.info("stop requested from the command line")
                asyncio.get_running_loop().call_soon(self._stop.set)
                return json_reply(request_id, "stop", None)
            result = await self._run_limited(client, request.op, request.args)
            return json_reply(request_id, request.op, result)
        except IncognitoMailError as e:
            return json_error(getattr(e, "request_id", request_id), e)
        except Exception:
            log.exception("internal error answering a request")
            return json_error(request_id, IncognitoMailError("internal error; the server log has details"))

    async def _run_limited(self, client, op, args):
        """Run one request; a WebSocket ``client`` (its IP) meets the rate limits first.

        A client that sent a wrong token lately has its requests run one at a time, so that
        pipelined guesses meet the failed-token limit one by one. The local command line
        (client None) has no limits.
        """
        if client is None:
            return await self.service.run(op, *args)
        one_at_a_time = self._suspects.get(client)
        if one_at_a_time is None:
            return await self._run_checked(client, op, args)
        async with one_at_a_time:
            result = await self._run_checked(client, op, args)
        if not self._failures_per_client.used(client):
            self._suspects.pop(client, None)
        return result

    async def _run_checked(self, client, op, args):
        self._check_limits(client, op, args[0] if args else None)
        try:
            return await self.service.run(op, *args)
        except Unauthorized:
            self._failures_per_client.take(client)
            if client not in self._suspects:
                if len(self._suspects) > 10000:
                    self._suspects = {c: lock for c, lock in self._suspects.items()
                                      if self._failures_per_client.used(c)}
                self._suspects[client] = asyncio.Lock()
            raise

    def _check_limits(self, client, op, token):
        """Rate limits for WebSocket clients; the local command line has none."""
        wait = self._failures_per_client.take(client, peek=True)
        if wait:
            raise RateLimited("too many wrong secret tokens from %s; retry in %d s" % (client, wait), wait)
        if op == "new_handle":
            wait = self._creation_per_client.take(client)
            if not wait and isinstance(token, str):
                wait = self._creation_per_account.take(token_digest(token))
            if wait:
                raise RateLimited("rate limited: too many new handles; retry in %d s" % wait, wait)

    # -- WebSocket: the browser add-on ----------------------------------------------------------

    def _admit(self, connection):
        """A new WebSocket connection: within the connection limits, or refused with 503."""
        client = connection.client
        count = self._connections.get(client, 0)
        if ((self.config.max_connections and len(self._websockets) >= self.config.max_connections) or
                (self.config.max_connections_per_client and count >= self.config.max_connections_per_client)):
            return False
        self._connections[client] = count + 1
        self._websockets.add(connection)
        self._launch_from_helper_when_busy()
        return True

    def _release(self, connection):
        self._websockets.discard(connection)
        self._connections[connection.client] -= 1
        if not self._connections[connection.client]:
            del self._connections[connection.client]
        self._launch_from_helper_when_busy()

    def _launch_from_helper_when_busy(self):
        launcher = getattr(self.service.table, "launcher", None)
        if launcher is not None:
            launcher.use_helper = len(self._websockets) >= HELPER_ABOVE_CONNECTIONS

    async def _answer_websocket(self, connection, message, client):
        if isinstance(message, bytes):
            reply = json_error(None, BadRequest("binary messages are not understood; send text"))
        elif message.lstrip().startswith("{"):
            reply = await self._answer_json(message, WEBSOCKET_OPERATIONS, client)
        else:
            reply = await self._answer_legacy(message, client)
        connection.send(reply)

    async def _answer_legacy(self, message, client):
        """The original add-on's protocol: ``new handle <secret>`` -> address or ``error ...``."""
        words = message.split()
        if len(words) != 3 or words[:2] != ["new", "handle"]:
            return "error unknown command: only \"new handle <secret>\" is accepted here"
        try:
            return (await self._run_limited(client, "new_handle", (words[2],)))["address"]
        except RateLimited as e:
            return "error rate limited: retry in %d s" % e.retry_after
        except IncognitoMailError as e:
            return "error %s" % e

    # -- policy service: what mail each handle receives -----------------------------------------

    async def _serve_policy(self, reader, writer):
        await self._serve_postfix(reader, writer, PolicyParser(), self._policy_answer, "policy service")

    async def _serve_postfix(self, reader, writer, parser, answer, name):
        """Postfix's side of the policy and socketmap protocols: many requests per connection."""
        self._postfix_clients.add(writer)
        try:
            while True:
                data = await reader.read(4096)
                if not data:
                    if parser.incomplete:
                        log.warning("%s: a client hung up in the middle of a request", name)
                    return
                for request in parser.feed(data):
                    writer.write(await self._track(answer(request)))
                await writer.drain()
        except PostfixProtocolError as e:
            log.warning("%s: closing a connection: %s", name, e)
        except (ConnectionError, OSError):
            pass
        finally:
            self._postfix_clients.discard(writer)
            writer.close()

    async def _policy_answer(self, request):
        try:
            return policy_response(await self._policy_action(request))
        except (IncognitoMailError, sqlite3.Error) as e:
            log.error("policy service: lookup failed (%s); answering DUNNO", e)
            return policy_response("DUNNO")

    async def _policy_action(self, request):
        recipient = request.get("recipient", "").strip().lower()
        found = await self.service.lookup(recipient) if "@" in recipient else None
        if found is None:
            return "DUNNO"
        _, enabled = found
        if not enabled:
            if request.get("protocol_state", "RCPT").upper() == "RCPT":
                return "550 5.1.1 <%s>: this address is disabled" % recipient
            return "DUNNO"
        if request.get("protocol_state", "").upper() == "RCPT":
            message = (request.get("instance") or "", recipient)
            if not message[0] or message not in self._counted:
                if message[0]:
                    self._counted[message] = True
                    if len(self._counted) > 10000:
                        for old in list(self._counted)[:5000]:
                            del self._counted[old]
                self._received.append((recipient, self.clock()))
        return "DUNNO"

    async def _write_received_periodically(self):
        while True:
            await asyncio.sleep(RECEIVED_FLUSH_SECONDS)
            await self._flush_received()

    async def _flush_received(self):
        """Write the counts gathered since the last time; keep them for the next try on failure."""
        if not self._received:
            return
        events, self._received = self._received, []
        try:
            # shielded: a stop cancelling the periodic writer must not drop a write under way
            await asyncio.shield(self.service.run("record_received", events))
        except IncognitoMailError as e:
            log.error("could not record %d received messages (will retry): %s", len(events), e)
            self._received[:0] = events[-MAX_UNWRITTEN_RECEIVED:]

    # -- socketmap: Postfix asks the daemon -----------------------------------------------------

    async def _serve_socketmap(self, reader, writer):
        await self._serve_postfix(reader, writer, NetstringParser(), self._socketmap_answer, "socketmap")

    async def _socketmap_answer(self, request):
        """``name key`` -> ``OK target`` for an enabled handle, else ``NOTFOUND ``."""
        _, _, key = request.decode("utf-8", "replace").partition(" ")
        try:
            found = await self.service.lookup(key.strip())
        except (IncognitoMailError, sqlite3.Error) as e:
            log.error("socketmap: lookup failed (%s); answering TEMP", e)
            return netstring(b"TEMP lookup failed")
        if found is not None and found[1]:
            return netstring(b"OK " + found[0].encode("utf-8"))
        return netstring(b"NOTFOUND ")

    # -- automatic pruning -----------------------------------------------------------------------

    async def _prune_daily(self):
        await asyncio.sleep(60)
        while True:
            try:
                removed = await self.service.run("prune", self.config.prune_handles_unused_days,
                                                 self.config.prune_accounts_unused_days, False)
                log.info("automatic prune removed %d handles and accounts", len(removed))
            except IncognitoMailError as e:
                log.error("automatic prune failed: %s", e)
            await asyncio.sleep(86400)


###############################################################################
# Command line
###############################################################################

def run_check(config, args, out=sys.stdout):
    """``check``: one line per check, OK or FAIL with the fix; exit 0 only if all pass."""
    results = []

    def report(name, problem=None):
        results.append({"check": name, "ok": problem is None, "problem": problem})
        if not args.json:
            print("%-4s %s%s" % ("OK" if problem is None else "FAIL", name, "" if problem is None else ": " + problem),
                  file=out)

    report("configuration %s" % config.path)
    table = make_table(config)
    try:
        table.check_access()
        report("map file and folder writable (%s)" % table.name)
    except IncognitoMailError as e:
        report("map file and folder writable", str(e))
    if isinstance(table, PostfixMap):
        try:
            table.postmap("-q", "incognitomail-check-probe", table.name)
            report("postmap runs")
        except IncognitoMailError as e:
            report("postmap runs", str(e))
    store = None
    try:
        store = Store(config.database_path, readonly=True)
        version = store.schema_version()
        if version != SCHEMA_VERSION:
            raise StoreError("schema version %d, this program's is %d; start the server once to migrate"
                             % (version, SCHEMA_VERSION))
        report("database %s readable, schema version %d" % (config.database_path, version))
    except IncognitoMailError as e:
        report("database readable", str(e))
        store = None
    if store is not None and isinstance(table, PostfixMap):
        report("map %s in step with the database" % table.name, table.drift(store))
    for name, problem in postfix_config_problems(config, table):
        report(name, problem)
    pid = running_pid(config)
    try:
        if not pid:
            raise ServerError("not running (no lock held on %s); start it with: python3 incognitomail.py -c %s"
                              % (config.lock_file_path, config.path))
        ControlClient(config).request("status")
        report("server running (pid %d)" % pid)
    except IncognitoMailError as e:
        report("server running", str(e))
    if args.json:
        print(json.dumps(results, indent=2), file=out)
    return 0 if all(r["ok"] for r in results) else 1


_DESCRIPTION = """\
IncognitoMail: random forwarding addresses ("handles") for your Postfix server.

With no command, run the server in the foreground (stop it with SIGTERM, Ctrl-C or "stop").
Every other command talks to the running server over [General] UnixSockPath.
Where a command takes <secret>, give "-" to read it from standard input, which keeps it out
of your shell history and of "ps".
"""

_EPILOG = """\
commands:
  new account <address>               make an account; prints its secret token
  new handle <secret> [--label TEXT] [--domain D]
                                      make a handle; prints its address
  list <secret>                       the account's handles, newest first, one per line
  delete handle <handle> <secret>     remove a handle (with or without its @domain)
  disable handle <handle> <secret>    reject mail to a handle but keep it
  enable handle <handle> <secret>     accept mail to a disabled handle again
  label handle <handle> <secret> <text>
                                      say what the handle is for
  rotate <secret>                     replace the secret token; prints the new one
  delete account <secret>             remove the account and all its handles
  prune [--handles-unused-days N] [--accounts-unused-days N] [--dry-run]
                                      remove never-used handles and accounts
  status                              is the server running: pid, counts, version
  check                               check the whole installation, with fixes
  stop                                stop the server

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
    if not text.isdigit():
        raise argparse.ArgumentTypeError("%r is not a number of days (0 or more)" % text)
    return int(text)


def build_parser():
    parser = _ArgumentParser(prog="incognitomail.py", description=_DESCRIPTION, epilog=_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default=DEFAULT_CONFIG_PATH, metavar="PATH",
                        help="configuration file (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="machine-readable output (accepted anywhere)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="command", parser_class=_ArgumentParser)

    def command(name, help, *args, parent=commands):
        sub = parent.add_parser(name, help=help, description=help)
        for arg in args:
            sub.add_argument(arg, metavar="<%s>" % arg)
        return sub

    new = commands.add_parser("new", help="new account or handle").add_subparsers(
        dest="what", metavar="account|handle", required=True, parser_class=_ArgumentParser)
    command("account", "make an account for <address>; prints its secret token", "address", parent=new)
    new_handle = command("handle", "make a handle for the account; prints its address", "secret", parent=new)
    new_handle.add_argument("--label", metavar="TEXT", help="what the handle is for, e.g. shop.example.com")
    new_handle.add_argument("--domain", metavar="D", help="one of [PostfixConfig] Domain (default: the first)")
    delete = commands.add_parser("delete", help="delete an account or a handle").add_subparsers(
        dest="what", metavar="account|handle", required=True, parser_class=_ArgumentParser)
    command("account", "delete the account and every handle it has", "secret", parent=delete)
    command("handle", "delete one handle of the account", "handle", "secret", parent=delete)
    for verb, text in (("enable", "accept mail to a disabled handle again"),
                       ("disable", "reject mail to a handle but keep it")):
        sub = commands.add_parser(verb, help=text).add_subparsers(
            dest="what", metavar="handle", required=True, parser_class=_ArgumentParser)
        command("handle", text, "handle", "secret", parent=sub)
    label = commands.add_parser("label", help="set a handle's label").add_subparsers(
        dest="what", metavar="handle", required=True, parser_class=_ArgumentParser)
    command("handle", "set what a handle is for", "handle", "secret", "text", parent=label)
    command("list", "list the account's handles, newest first", "secret")
    command("rotate", "replace the account's secret token; prints the new one", "secret")
    command("status", "is the server running: pid, counts, version")
    command("check", "check the configuration, the map, Postfix and the server; prints fixes")
    command("stop", "stop the running server")
    prune = command("prune", "remove handles that never received mail and accounts never used")
    prune.add_argument("--handles-unused-days", type=_days, metavar="N",
                       help="handles older than N days that never received a message (0: any age)")
    prune.add_argument("--accounts-unused-days", type=_days, metavar="N",
                       help="accounts older than N days whose token was never used and that have no handles")
    prune.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    return parser


_DASH_PROTECTED = "\x00"


def _normalize_argv(argv, parser):
    """Accept the original's Go-style ``-config PATH``, ``--json`` anywhere, and arguments
    that start with "-" without being options (a label, an old secret token)."""
    wants_json = "--json" in argv
    options, short = set(), set()
    for action in _all_actions(parser):
        options.update(action.option_strings)
        if action.nargs != 0:       # takes a value, which may be attached: -cPATH
            short.update(o for o in action.option_strings if len(o) == 2)
    argv = ["--config" if a == "-config" else "--config=" + a[8:] if a.startswith("-config=") else a
            for a in argv if a != "--json"]
    argv = [_DASH_PROTECTED + a if a.startswith("-") and a != "-" and a.split("=", 1)[0] not in options
            and a[:2] not in short and not a.lstrip("-").isdigit() else a for a in argv]
    return (["--json"] if wants_json else []) + argv


def _all_actions(parser):
    for action in parser._actions:
        yield action
        for sub in getattr(action, "choices", None) or {}:
            if isinstance(action.choices, dict) and isinstance(action.choices[sub], argparse.ArgumentParser):
                yield from _all_actions(action.choices[sub])


def _unprotect(args):
    for name, value in vars(args).items():
        if isinstance(value, str) and value.startswith(_DASH_PROTECTED):
            setattr(args, name, value[len(_DASH_PROTECTED):])
    return args


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
            raise ServerError("the server is not running (nothing listens on %s, [General] UnixSockPath); start it "
                              "with: python3 incognitomail.py -c %s" % (path, self.config.path))
        except PermissionError:
            sock.close()
            raise ServerError("%s: permission denied; run this as root or as the user the server runs as" % path)
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
                        raise ServerError("the server closed the connection without answering; see its log")
                    data += chunk
                reply = json.loads(data.decode("utf-8"))
            except (OSError, ValueError) as e:
                raise ServerError("no valid answer from the server on %s (%s); see its log" % (path, e))
        if not reply.get("ok"):
            error = {"bad_request": BadRequest, "unauthorized": Unauthorized, "not_found": NotFound}.get(
                reply.get("error"), IncognitoMailError)(reply.get("message", "unknown error"))
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
            raise ServerError("%s is served by user %s, who owns neither the database nor this session; "
                              "refusing to send a secret to it" % (self.config.unix_sock_path, _user_name(uid)))


def _read_secret(value):
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise BadRequest("expected the secret token on standard input")
    return line


def _handle_line(handle):
    return "\t".join([handle["address"], "enabled" if handle["enabled"] else "disabled",
                      "received %d" % handle["received"], "last %s" % (handle["last_received"] or "never"),
                      "created %s" % handle["created"], handle["label"] or ""]).rstrip("\t")


def run_command(config, args, out=sys.stdout):
    """Carry out one command-line command against the running server; print its result."""
    client = ControlClient(config)
    emit = (lambda value, text: print(json.dumps(value, indent=2) if args.json else text, file=out))
    if args.command == "new" and args.what == "account":
        reply = client.request("new_account", address=args.address)
        emit({"token": reply["token"]}, reply["token"])
        print("This is the account's secret token: keep it like a password.", file=sys.stderr)
    elif args.command == "new":
        fields = {"token": _read_secret(args.secret), "label": args.label, "domain": args.domain}
        handle = client.request("new_handle", **fields)["handle"]
        emit(handle, handle["address"])
    elif args.command == "delete" and args.what == "account":
        reply = client.request("delete_account", token=_read_secret(args.secret))
        if args.json:
            emit({"deleted_handles": reply["deleted_handles"]}, "")
        print("deleted the account and its %d handles" % reply["deleted_handles"], file=sys.stderr)
    elif args.command == "delete":
        client.request("delete_handle", token=_read_secret(args.secret), address=args.handle)
        if args.json:
            emit({}, "")
        print("deleted %s" % args.handle, file=sys.stderr)
    elif args.command in ("enable", "disable", "label"):
        fields = {"token": _read_secret(args.secret), "address": args.handle}
        if args.command == "label":
            fields["label"] = args.text
        else:
            fields["enabled"] = args.command == "enable"
        handle = client.request("update_handle", **fields)["handle"]
        emit(handle, _handle_line(handle))
    elif args.command == "list":
        handles = client.request("list_handles", token=_read_secret(args.secret))["handles"]
        if args.json:
            emit(handles, "")
        else:
            for handle in handles:
                print(_handle_line(handle), file=out)
            if not handles:
                print("this account has no handles yet", file=sys.stderr)
    elif args.command == "rotate":
        token = client.request("rotate_token", token=_read_secret(args.secret))["token"]
        emit({"token": token}, token)
        print("This is the account's new secret token; the old one no longer works.", file=sys.stderr)
    elif args.command == "status":
        try:
            status = client.request("status")["status"]
        except ServerError as e:
            emit({"running": False, "message": str(e)}, "not running: %s" % e)
            return 1
        status["running"] = True
        emit(status, "running (pid %d), version %s\naccounts %d, handles %d (%d enabled)\nmap %s, domains %s" % (
            status["pid"], status["version"], status["accounts"], status["handles"], status["enabled_handles"],
            status["map"], ", ".join(status["domains"])))
    elif args.command == "prune":
        handles_days = args.handles_unused_days
        accounts_days = args.accounts_unused_days
        if handles_days is None and accounts_days is None:
            handles_days, accounts_days = config.prune_handles_unused_days, config.prune_accounts_unused_days
        if handles_days is None and accounts_days is None:
            raise BadRequest("nothing to prune: give --handles-unused-days N and/or --accounts-unused-days N, "
                             "or set them in [Prune] of %s" % config.path)
        removed = client.request("prune", handles_unused_days=handles_days, accounts_unused_days=accounts_days,
                                 dry_run=args.dry_run)["removed"]
        if args.json or removed:
            emit(removed, "\n".join(removed))
        print("%s %d handles and accounts" % ("would remove" if args.dry_run else "removed", len(removed)),
              file=sys.stderr)
    elif args.command == "stop":
        pid = running_pid(config)
        client.request("stop")
        deadline = time.monotonic() + STOP_GRACE_SECONDS + 10
        while running_pid(config) and time.monotonic() < deadline:
            time.sleep(0.05)
        print("stopped the server (pid %s)" % pid, file=sys.stderr)
    return 0


def setup_logging(config=None):
    """stderr until the configuration says otherwise; syslog uses facility mail, like Postfix."""
    root = logging.getLogger("incognitomail")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if config is not None and config.log_target == "syslog":
        if not os.path.exists("/dev/log"):
            raise ConfigError("%s [General] LogTarget: syslog, but /dev/log does not exist (is a syslog daemon "
                              "running?); use LogTarget = stderr" % config.path)
        handler = logging.handlers.SysLogHandler("/dev/log", facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(logging.Formatter("incognitomail[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s incognitomail[%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, (config.log_level if config else "warning").upper()))
    root.propagate = False


def main(argv=None):
    parser = build_parser()
    args = _unprotect(parser.parse_args(_normalize_argv(sys.argv[1:] if argv is None else list(argv), parser)))
    setup_logging()
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

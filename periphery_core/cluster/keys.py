"""Cluster keys and CurveZMQ: who may talk to whom.

Every master and node has a CurveZMQ keypair. A host's key folder holds its own keypair
(`<name>.key` public, `<name>.key_secret` secret, ZeroMQ's certificate format, the secret
readable by its owner only) and the public keys it trusts by role: `masters/` and `nodes/`.

Trust is by role, not flat. A node's control socket admits master keys only, so only a master
deploys shards or rewires a node; its data socket admits masters (requests into the first
stage) and nodes (activations from the stage before); a master's results socket admits nodes.
A node sends activations only to an endpoint whose key it trusts as a node, or results to one
it trusts as a master. Every connecting socket is a CURVE client that must know the server's
public key, so a master never talks to a node it does not trust either. Traffic is encrypted
and authenticated per message (CurveZMQ's nonces also defeat replays).

`periphery keys init DIR --master master --node node1 ...` writes one such folder per host.
Running without keys needs an explicit `--insecure`, which is logged loudly on every start.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from periphery_core.cluster.same_host import is_ipc
from periphery_core.config_dir import config_dir
from periphery_core.errors import KeysError

log = logging.getLogger("periphery.keys")

KEYS_ENV = "PERIPHERY_KEYS"
INSECURE_WARNING = ("INSECURE: no CurveZMQ keys; anyone who can reach this host can deploy shards, "
                    "submit requests and read activations. Use --keys (see 'periphery keys init').")


Role = Literal["masters", "nodes", "any"]


@dataclass(frozen=True)
class KeyRing:
    """This party's keypair and the public keys it trusts, by role (Z85 bytes)."""

    name: str
    public: bytes
    secret: bytes
    masters: frozenset[bytes]
    nodes: frozenset[bytes]

    @property
    def allowed(self) -> frozenset[bytes]:
        """Every key trusted in some role."""
        return self.masters | self.nodes

    def trusted_as(self, role: Role) -> frozenset[bytes]:
        return self.masters if role == "masters" else self.nodes if role == "nodes" \
            else self.allowed


def default_keys_dir() -> Path | None:
    env = os.environ.get(KEYS_ENV)
    if env:
        return Path(env)
    home = config_dir() / "keys"
    return home if home.is_dir() else None


def load_keyring(folder: str | os.PathLike[str]) -> KeyRing:
    """Read a host's key folder (one `*.key_secret` plus `allowed/*.key`).

    Raises:
        KeysError: the folder is missing or malformed.
    """
    d = Path(folder)
    if not d.is_dir():
        raise KeysError(f"key folder not found: {d} (make one with 'periphery keys init')")
    secrets = sorted(d.glob("*.key_secret"))
    if len(secrets) != 1:
        raise KeysError(f"{d} must hold exactly one *.key_secret file, found {len(secrets)}")
    mode = secrets[0].stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeysError(f"{secrets[0]} is readable by other users (mode {mode & 0o777:o}): "
                        f"run 'chmod 600 {secrets[0]}'")
    try:
        public, secret = zmq.auth.load_certificate(secrets[0])
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read {secrets[0]}: {exc}") from None
    if secret is None:
        raise KeysError(f"{secrets[0]} holds no secret key")
    if (d / "allowed").is_dir() and not (d / "masters").is_dir():
        raise KeysError(f"{d} is a key folder from before roles (one 'allowed' list): make new "
                        "ones with 'periphery keys init DIR --master NAME --node NAME ...'")
    masters, nodes = _read_keys(d / "masters"), _read_keys(d / "nodes")
    if not masters and not nodes:
        raise KeysError(f"{d} trusts no master and no node key: nobody could connect")
    return KeyRing(secrets[0].name.removesuffix(".key_secret"), public, secret, masters, nodes)


def _read_keys(folder: Path) -> frozenset[bytes]:
    keys = set()
    for cert in sorted(folder.glob("*.key")) if folder.is_dir() else []:
        try:
            keys.add(zmq.auth.load_certificate(cert)[0])
        except (OSError, ValueError) as exc:
            raise KeysError(f"cannot read trusted key {cert}: {exc}") from None
    return frozenset(keys)


def init_cluster_keys(folder: str | os.PathLike[str], masters: Sequence[str],
                      nodes: Sequence[str]) -> list[Path]:
    """Create one key folder per host under `folder` (masters first, then nodes).

    Each folder trusts every master's public key as a master and every node's as a node.

    Raises:
        KeysError: no master or no node, a name repeated or not a plain file name, or a
            host's folder exists already.
    """
    root = Path(folder)
    names = [*masters, *nodes]
    if not masters or not nodes:
        raise KeysError("name at least one master (--master) and one node (--node)")
    if len(set(names)) != len(names):
        raise KeysError("give each host a distinct name")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise KeysError(f"'{n}' is not a usable host name for a key file")
    taken = [n for n in names if (root / n).exists()]
    if taken:
        raise KeysError(f"{root / taken[0]} exists already: choose another folder or remove it")
    root.mkdir(parents=True, exist_ok=True)
    publics: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for n in names:
            public_file, secret_file = zmq.auth.create_certificates(tmp, n)
            publics[n] = Path(public_file)
            host = root / n
            host.mkdir(parents=True, mode=0o700)
            for role in ("masters", "nodes"):
                (host / role).mkdir()
            shutil.copy(public_file, host / f"{n}.key")
            secret = host / f"{n}.key_secret"
            # created owner-only before any secret byte is written
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, open(secret_file, "rb") as src:
                out.write(src.read())
        for n in names:
            for role, members in (("masters", masters), ("nodes", nodes)):
                for m in members:
                    shutil.copy(publics[m], root / n / role / publics[m].name)
    return [root / n for n in names]


def keyring_or_insecure(keys: Path | None, insecure: bool) -> KeyRing | None:
    """The CLI's rule: keys from --keys (or the default folder), or an explicit --insecure."""
    if insecure:
        if keys is not None:
            raise KeysError("give either --keys or --insecure, not both")
        return None
    folder = keys or default_keys_dir()
    if folder is None:
        raise KeysError("no cluster keys: make them with 'periphery keys init DIR --master NAME "
                        "--node NAME ...' and pass --keys DIR/<this host> (or set "
                        f"{KEYS_ENV}, or copy that folder to {config_dir() / 'keys'}), or run "
                        "with --insecure on a network you trust")
    return load_keyring(folder)


class Guard:
    """Applies a key ring to the sockets of one ZeroMQ context (None: insecure)."""

    def __init__(self, ctx: zmq.Context, ring: KeyRing | None, who: str) -> None:
        self.ring = ring
        self._auth: ThreadAuthenticator | None = None
        if ring is None:
            log.warning("%s: %s", who, INSECURE_WARNING)
            return
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("periphery.zap"))
        self._auth.start()

        class Provider:
            """Admits the keys trusted in one role (the ZAP domain a server socket names)."""

            def __init__(self, role: Role, keys: frozenset[bytes]) -> None:
                self.role, self.keys = role, keys

            def callback(self, domain: str, key: bytes) -> bool:
                ok = key in self.keys
                if not ok:
                    log.warning("refused a connection from a key not trusted as %s",
                                "master or node" if self.role == "any" else self.role[:-1])
                return ok

        for role in ("masters", "nodes", "any"):
            self._auth.configure_curve_callback(
                role, credentials_provider=Provider(role, ring.trusted_as(role)))

    @property
    def secure(self) -> bool:
        return self.ring is not None

    def server(self, sock: zmq.Socket, admit: Role) -> zmq.Socket:
        """Make `sock` a CURVE server admitting keys trusted as `admit` (before bind)."""
        if self.ring is not None:
            sock.curve_secretkey = self.ring.secret
            sock.curve_publickey = self.ring.public
            sock.curve_server = True
            sock.zap_domain = admit.encode()
        return sock

    def client(self, sock: zmq.Socket, server_key: bytes | None, role: Role) -> zmq.Socket:
        """Make `sock` a CURVE client of a server whose key is trusted as `role`."""
        if self.ring is not None:
            if not server_key:
                raise KeysError("the peer's public key is unknown: cannot connect securely")
            if server_key not in self.ring.trusted_as(role):
                raise KeysError(f"the peer's public key is not trusted as "
                                f"{'master or node' if role == 'any' else role[:-1]} here")
            sock.curve_secretkey = self.ring.secret
            sock.curve_publickey = self.ring.public
            sock.curve_serverkey = server_key
        return sock

    def connect(self, sock: zmq.Socket, endpoint: str, server_key: bytes | None,
                role: Role) -> zmq.Socket:
        """Connect `sock` (its other options set) to a server trusted as `role`: over CurveZMQ
        on TCP; bare on a private Unix socket of this host, which admits no other user and
        which a node checks before it is told to use one (same_host.py)."""
        if not is_ipc(endpoint):
            self.client(sock, server_key, role)
        sock.connect(endpoint)
        return sock

    def candidates(self, advertised: str | None) -> list[bytes | None]:
        """Server keys to try for a node: its advertised key, else every allowed key."""
        if self.ring is None:
            return [None]
        if advertised:
            key = advertised.encode()
            if key not in self.ring.nodes:
                raise KeysError("the node advertises a key not trusted as a node here")
            return [key]
        return [k for k in sorted(self.ring.nodes) if k != self.ring.public]

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


"""Cluster keys and CurveZMQ: who may talk to whom.

Every master and node has a CurveZMQ keypair. A host's key folder holds its own keypair
(`<name>.key` public, `<name>.key_secret` secret, ZeroMQ's certificate format) and `allowed/`,
the public keys of every party it trusts. Every listening socket is a CURVE server whose ZAP
handler admits only allowed keys; every connecting socket is a CURVE client that must know the
server's public key, so a master never talks to a node it does not trust either. Traffic is
encrypted and authenticated per message (CurveZMQ's nonces also defeat replays).

`periphery keys init DIR --name master --name node1 ...` writes one such folder per host, each
allowing all the others. Running without keys needs an explicit `--insecure`, which is logged
loudly on every start.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from periphery_core.errors import KeysError

log = logging.getLogger("periphery.keys")

KEYS_ENV = "PERIPHERY_KEYS"
INSECURE_WARNING = ("INSECURE: no CurveZMQ keys; anyone who can reach this host can deploy shards, "
                    "submit requests and read activations. Use --keys (see 'periphery keys init').")




@dataclass(frozen=True)
class KeyRing:
    """This party's keypair and the public keys it trusts (Z85 bytes)."""

    name: str
    public: bytes
    secret: bytes
    allowed: frozenset[bytes]

    def trusts(self, key: bytes) -> bool:
        return key in self.allowed


def default_keys_dir() -> Path | None:
    env = os.environ.get(KEYS_ENV)
    if env:
        return Path(env)
    home = Path.home() / ".config" / "periphery" / "keys"
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
    try:
        public, secret = zmq.auth.load_certificate(secrets[0])
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read {secrets[0]}: {exc}") from None
    if secret is None:
        raise KeysError(f"{secrets[0]} holds no secret key")
    allowed_dir = d / "allowed"
    allowed = set()
    for cert in sorted(allowed_dir.glob("*.key")) if allowed_dir.is_dir() else []:
        try:
            allowed.add(zmq.auth.load_certificate(cert)[0])
        except (OSError, ValueError) as exc:
            raise KeysError(f"cannot read allowed key {cert}: {exc}") from None
    if not allowed:
        raise KeysError(f"{allowed_dir} lists no allowed public keys: nobody could connect")
    return KeyRing(secrets[0].name.removesuffix(".key_secret"), public, secret,
                   frozenset(allowed))


def init_cluster_keys(folder: str | os.PathLike[str], names: Sequence[str]) -> list[Path]:
    """Create one key folder per name under `folder`, each allowing every name's public key.

    Raises:
        KeysError: a name is repeated or not a plain file name, or the folder exists.
    """
    root = Path(folder)
    if len(set(names)) != len(names) or not names:
        raise KeysError("give each host a distinct --name (at least one)")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise KeysError(f"'{n}' is not a usable host name for a key file")
    taken = [n for n in names if (root / n).exists()]
    if taken:
        raise KeysError(f"{root / taken[0]} exists already: choose another folder or remove it")
    root.mkdir(parents=True, exist_ok=True)
    publics = []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for n in names:
            public_file, secret_file = zmq.auth.create_certificates(tmp, n)
            publics.append(Path(public_file))
            host = root / n
            (host / "allowed").mkdir(parents=True)
            shutil.copy(secret_file, host / f"{n}.key_secret")
            shutil.copy(public_file, host / f"{n}.key")
            os.chmod(host / f"{n}.key_secret", 0o600)
        for n in names:
            for cert in publics:
                shutil.copy(cert, root / n / "allowed" / cert.name)
    return [root / n for n in names]


def keyring_or_insecure(keys: Path | None, insecure: bool) -> KeyRing | None:
    """The CLI's rule: keys from --keys (or the default folder), or an explicit --insecure."""
    if insecure:
        if keys is not None:
            raise KeysError("give either --keys or --insecure, not both")
        return None
    folder = keys or default_keys_dir()
    if folder is None:
        raise KeysError("no cluster keys: create them with 'periphery keys init DIR --name ...' "
                        "and pass --keys DIR/<host> (or set PERIPHERY_KEYS), or run with "
                        "--insecure on a network you trust")
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
        allowed = ring.allowed

        class Provider:
            def callback(self, domain: str, key: bytes) -> bool:
                ok = key in allowed
                if not ok:
                    log.warning("refused a connection from an unknown key")
                return ok

        self._auth.configure_curve_callback("*", credentials_provider=Provider())

    @property
    def secure(self) -> bool:
        return self.ring is not None

    def server(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` a CURVE server (before bind)."""
        if self.ring is not None:
            sock.curve_secretkey = self.ring.secret
            sock.curve_publickey = self.ring.public
            sock.curve_server = True
        return sock

    def client(self, sock: zmq.Socket, server_key: bytes | None) -> zmq.Socket:
        """Make `sock` a CURVE client of the server with `server_key` (before connect)."""
        if self.ring is not None:
            if not server_key:
                raise KeysError("the peer's public key is unknown: cannot connect securely")
            if server_key not in self.ring.allowed:
                raise KeysError("the peer's public key is not in this host's allow list")
            sock.curve_secretkey = self.ring.secret
            sock.curve_publickey = self.ring.public
            sock.curve_serverkey = server_key
        return sock

    def candidates(self, advertised: str | None) -> list[bytes | None]:
        """Server keys to try for a node: its advertised key, else every allowed key."""
        if self.ring is None:
            return [None]
        if advertised:
            key = advertised.encode()
            if key not in self.ring.allowed:
                raise KeysError("the node advertises a key that is not in the allow list")
            return [key]
        return [k for k in sorted(self.ring.allowed) if k != self.ring.public]

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def public_keys(rings: Iterable[KeyRing]) -> list[str]:
    return [r.public.decode() for r in rings]

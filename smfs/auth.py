"""The testbed key on the storage sockets: the mirror stream's mutual handshake, its acks' tags, key files.

Both sites' storage servers and gateways hold one per-testbed key (hex in a file, at least
:data:`MIN_KEY` bytes; :func:`create_key_file` makes one, mode 0600 from the start). A primary
server's TCP connection to its mirror server opens with a mutual handshake before any frame::

    mirror  -> primary   HELLO   b"SMH1" nonce_m                          (20 bytes)
    primary -> mirror    ANSWER  b"SMH1" nonce_p proof(b"P")              (52 bytes)
    mirror  -> primary   CONFIRM proof(b"M")                               (32 bytes)
                         (or REFUSED, b"SMNO", then it hangs up: a primary with another key stops at once)

    proof(role) = HMAC-SHA-256(key, b"smfs-mirror" || role || nonce_m || nonce_p || flow)

``nonce_m`` and ``nonce_p`` are 16 fresh random bytes from each side, ``flow`` the connection as the
primary sends it (its address and port, then the mirror's: ``4s H 4s H``, 12 bytes). The mirror reads
no frame before the ANSWER checks out, and the primary sends none before the CONFIRM does: each side
has shown the other that it holds the key, on this very connection (the nonces are fresh, the flow
binds the addresses and ports), so neither a replayed handshake nor one relayed onto another
connection passes. The primary's stream offsets (the acks, the ack trace, the gateway's
callbacks) count every byte it sent after the SYN, the ANSWER's :data:`ANSWER_LEN` included.

Each MACK (mirror ack) then carries :func:`mack_tag`: HMAC-SHA-256 under the connection's session key
(:func:`session_key`, from the key, both nonces and the flow) of the acked offset, 16 bytes, so a
forged ack cannot complete a remote-sync append early.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import struct
from pathlib import Path

MIN_KEY = 16
"""Shortest accepted key (bytes), as the tunnel's."""
MAGIC = b"SMH1"
NONCE_LEN = 16
PROOF_LEN = 32
HELLO_LEN = len(MAGIC) + NONCE_LEN
ANSWER_LEN = len(MAGIC) + NONCE_LEN + PROOF_LEN
"""Bytes the primary sends before its first frame: its stream offsets start here."""
CONFIRM_LEN = PROOF_LEN
REFUSED = b"SMNO"
"""What the mirror sends instead of a CONFIRM when the ANSWER does not check out, before it hangs up."""
TAG_LEN = 16
"""Bytes of a MACK's tag (its frame's payload)."""
LABEL = b"smfs-mirror"
_FLOW = struct.Struct("!4sH4sH")
_OFFSET = struct.Struct("!Q")


class AuthError(ValueError):
    """A handshake message or a tag that does not check out; the connection is closed."""


def flow_id(src: str, sport: int, dst: str, dport: int) -> bytes:
    """The connection as the primary sends it: its address and port, then the mirror's (12 bytes)."""
    try:
        return _FLOW.pack(socket.inet_aton(src), sport, socket.inet_aton(dst), dport)
    except (OSError, struct.error) as err:
        raise ValueError(f"not an IPv4 flow: {src}:{sport} -> {dst}:{dport}") from err


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY:
        raise ValueError(f"the storage key must be at least {MIN_KEY} bytes")


def _proof(key: bytes, role: bytes, nonce_m: bytes, nonce_p: bytes, flow: bytes) -> bytes:
    _check_key(key)
    return hmac.new(key, LABEL + role + nonce_m + nonce_p + flow, hashlib.sha256).digest()


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_LEN)


def hello(nonce_m: bytes) -> bytes:
    """The mirror's first message: its fresh nonce."""
    return MAGIC + nonce_m


def read_hello(data: bytes) -> bytes:
    """The mirror's nonce from its HELLO; AuthError otherwise."""
    if len(data) != HELLO_LEN or data[:4] != MAGIC:
        raise AuthError("not a mirror handshake (HELLO)")
    return data[4:]


def answer(key: bytes, nonce_m: bytes, nonce_p: bytes, flow: bytes) -> bytes:
    """The primary's ANSWER: its nonce and its proof of the key on this connection."""
    return MAGIC + nonce_p + _proof(key, b"P", nonce_m, nonce_p, flow)


def check_answer(key: bytes, nonce_m: bytes, data: bytes, flow: bytes) -> bytes:
    """The primary's nonce from a valid ANSWER to ``nonce_m`` on ``flow``; AuthError otherwise."""
    if len(data) != ANSWER_LEN or data[:4] != MAGIC:
        raise AuthError("not a mirror handshake (ANSWER)")
    nonce_p = data[4 : 4 + NONCE_LEN]
    if not hmac.compare_digest(data[4 + NONCE_LEN :], _proof(key, b"P", nonce_m, nonce_p, flow)):
        raise AuthError("bad proof: not the testbed's key, or not this connection")
    return nonce_p


def confirm(key: bytes, nonce_m: bytes, nonce_p: bytes, flow: bytes) -> bytes:
    """The mirror's CONFIRM: its proof of the key, over the primary's fresh nonce too."""
    return _proof(key, b"M", nonce_m, nonce_p, flow)


def check_confirm(key: bytes, nonce_m: bytes, nonce_p: bytes, flow: bytes, data: bytes) -> None:
    if len(data) != CONFIRM_LEN or not hmac.compare_digest(data, confirm(key, nonce_m, nonce_p, flow)):
        raise AuthError("bad proof from the mirror: not the testbed's key, or not this connection")


def session_key(key: bytes, nonce_m: bytes, nonce_p: bytes, flow: bytes) -> bytes:
    """The key of one connection's MACK tags."""
    return _proof(key, b"S", nonce_m, nonce_p, flow)


def mack_tag(session: bytes, offset: int) -> bytes:
    """The tag a MACK of ``offset`` carries (its payload)."""
    return hmac.new(session, b"MACK" + _OFFSET.pack(offset), hashlib.sha256).digest()[:TAG_LEN]


def check_mack(session: bytes, offset: int, tag: bytes) -> None:
    if not hmac.compare_digest(tag, mack_tag(session, offset)):
        raise AuthError(f"forged mirror ack (offset {offset}): bad tag")


def read_key_file(path: str | Path) -> bytes:
    """The key in ``path`` (hex); ValueError naming the file when it cannot be read or is too short."""
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"key file {path}: {getattr(err, 'strerror', None) or err}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"key file {path}: not a hex key") from None
    if len(key) < MIN_KEY:
        raise ValueError(f"key file {path}: the key must be at least {MIN_KEY} bytes, got {len(key)}")
    return key


def create_key_file(path: str | Path, nbytes: int = 32) -> bytes:
    """A fresh random key in ``path`` (hex), returned. The file is created with mode 0600 from the start
    (``O_CREAT | O_EXCL`` under a temporary name beside it, then renamed over ``path``): its content is
    never readable by anyone else, not even for an instant, and a file already at ``path`` (whatever its
    mode) is replaced, never written into."""
    path = Path(path)
    key = secrets.token_bytes(nbytes)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return key

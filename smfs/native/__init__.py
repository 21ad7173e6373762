"""The C core of the Maelstrom gateway (``smfs/native/*.c``) and its ctypes binding.

``libsmfs_core.so`` implements, byte for byte, the FEC codec of :mod:`smfs.fec`, the tunnel
framing and replay window of :mod:`smfs.tunnel` and the flow tracker of :mod:`smfs.callbacks`
(see ``smfs_core.h``). The Python modules stay the executable specification; the classes here
wrap the C objects with the same method names and return types (:class:`~smfs.fec.Repair`,
:class:`~smfs.fec.DecoderStats`, :class:`~smfs.callbacks.Flow`, ...) so that a differential
test runs both on the same input. The binding is for tests and tools: a ctypes call costs
about a microsecond, so per-packet throughput is measured in C (:func:`bench_codec`).

:func:`build` runs ``make`` (gcc, make and libssl-dev from Debian); :func:`load` loads the
library, ``variant="asan"`` the AddressSanitizer + UBSan build, which only loads in a process
started with :func:`asan_env` (libasan preloaded).
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import shutil
import socket
import subprocess
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from ctypes import (
    POINTER,
    byref,
    c_char_p,
    c_double,
    c_int,
    c_int64,
    c_long,
    c_size_t,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

from smfs.callbacks import Flow
from smfs.fec import DecoderStats, EncoderStats, FecParams, Repair, _trusted_repair
from smfs.tunnel import MIN_KEY, DataMsg, RepairMsg, TunnelError

HERE = Path(__file__).resolve().parent
BUILD = HERE / "build"
LIBRARIES = {"release": BUILD / "libsmfs_core.so", "asan": BUILD / "asan" / "libsmfs_core.so"}
_TARGETS = {"release": "all", "asan": "asan"}
VARIANT_ENV = "SMFS_NATIVE_VARIANT"
"""Environment variable choosing the library :func:`load` loads by default (release, asan)."""

U64 = 1 << 64
MAX_R = 64
MAX_LAYERS = 8


class NativeError(RuntimeError):
    """The C core cannot be built or loaded, or failed inside (a libcrypto error)."""


# -- build and load -----------------------------------------------------------------------


def _check_toolchain() -> None:
    for tool, package in (("gcc", "gcc"), ("make", "make")):
        if shutil.which(tool) is None:
            raise NativeError(f"{tool} not found: install the Debian package {package} (apt-get install {package})")
    probe = subprocess.run(
        ["gcc", "-E", "-x", "c", "-", "-o", os.devnull],
        input=b"#include <openssl/evp.h>\n#include <openssl/hmac.h>\n",
        capture_output=True,
    )
    if probe.returncode != 0:
        raise NativeError("OpenSSL headers not found (openssl/evp.h): install the Debian package libssl-dev")


_build_lock = threading.Lock()


def build(force: bool = False, variant: str = "release") -> Path:
    """Build the library (``variant`` release or asan) with make; return its path.
    ``force`` rebuilds from scratch. :class:`NativeError` with a one-line reason on failure."""
    if variant not in LIBRARIES:
        raise ValueError(f"variant must be one of {sorted(LIBRARIES)}, got {variant!r}")
    with _build_lock:
        _check_toolchain()
        cmd = ["make", "--no-print-directory", "-C", str(HERE), _TARGETS[variant]]
        if force:
            cmd.insert(1, "-B")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines or ["(no output)"]
            raise NativeError(f"building {LIBRARIES[variant].name} ({variant}) failed: {errors[0].strip()}")
    return LIBRARIES[variant]


def asan_env(base: dict[str, str] | None = None, python_malloc: bool = True) -> dict[str, str]:
    """Environment for a subprocess that loads the asan variant: libasan preloaded (it must come
    first), leak checking off (the interpreter's own), :data:`VARIANT_ENV` = asan; with
    ``python_malloc`` Python allocates through malloc, so that even the small buffers it hands
    to C are guarded (about 4 times slower; otherwise only those over 512 bytes are)."""
    env = dict(os.environ if base is None else base)
    lib = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not lib or not os.path.exists(lib):
        raise NativeError("libasan.so not found: install the Debian package gcc (with its libasan)")
    env["LD_PRELOAD"] = lib
    if python_malloc:
        env["PYTHONMALLOC"] = "malloc"
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    env[VARIANT_ENV] = "asan"
    return env


_libs: dict[str, ctypes.CDLL] = {}


def load(variant: str | None = None) -> ctypes.CDLL:
    """The library (built first when needed), its prototypes declared; cached per variant."""
    variant = variant or os.environ.get(VARIANT_ENV, "release")
    lib = _libs.get(variant)
    if lib is None:
        path = build(variant=variant)
        try:
            lib = ctypes.CDLL(str(path), use_errno=True)
        except OSError as err:
            hint = " (the asan variant needs a process started with asan_env())" if variant == "asan" else ""
            raise NativeError(f"cannot load {path}: {err}{hint}") from err
        _declare(lib)
        _libs[variant] = lib
    return lib


# -- C types ----------------------------------------------------------------------------------


class _Params(ctypes.Structure):
    _fields_ = [("r", c_uint32), ("c", c_uint32), ("interleaves", c_uint32 * MAX_LAYERS), ("flush_ms", c_double)]


class _Repair(ctypes.Structure):
    _fields_ = [
        ("layer", c_uint32),
        ("n", c_uint32),
        ("seqs", POINTER(c_uint64)),
        ("lengths", POINTER(c_uint16)),
        ("xor", c_void_p),
        ("xor_len", c_uint32),
    ]


class _Msg(ctypes.Structure):
    _fields_ = [
        ("kind", c_int),
        ("site", c_uint32),
        ("seq", c_uint64),
        ("packet", c_void_p),
        ("packet_len", c_size_t),
        ("repair", _Repair),
        ("seqs", c_uint64 * MAX_R),
        ("lengths", c_uint16 * MAX_R),
    ]


class _Flow(ctypes.Structure):
    _fields_ = [("src", c_uint8 * 4), ("dst", c_uint8 * 4), ("sport", c_uint16), ("dport", c_uint16)]


_ENC_STATS = ("packets", "bytes", "repairs", "flushed", "held")
_DEC_STATS = (
    "received", "duplicates", "late", "rebuilt", "lost", "skipped", "repairs", "repairs_useless",
    "repairs_stale", "repairs_duplicate", "repairs_inconsistent", "repairs_expired", "nomem",
)


class _EncStats(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in _ENC_STATS]


class _DecStats(ctypes.Structure):
    _fields_ = [(n, c_uint64) for n in _DEC_STATS]


REPAIR_FN = ctypes.CFUNCTYPE(None, c_void_p, POINTER(_Repair))
PACKET_FN = ctypes.CFUNCTYPE(None, c_void_p, c_uint64, c_void_p, c_size_t)
SAFE_FN = ctypes.CFUNCTYPE(None, c_void_p, POINTER(_Flow), c_int64)


def _declare(lib: ctypes.CDLL) -> None:
    P = c_void_p
    protos: dict[str, tuple[object, list[object]]] = {
        "smfs_fec_params_check": (c_int, [POINTER(_Params)]),
        "smfs_repair_check": (c_int, [POINTER(_Repair)]),
        "smfs_encoder_new": (P, [POINTER(_Params)]),
        "smfs_encoder_free": (None, [P]),
        "smfs_encoder_add": (c_int, [P, c_uint64, c_char_p, c_size_t, c_double, REPAIR_FN, P]),
        "smfs_encoder_add_ex": (c_int, [P, c_uint64, c_char_p, c_size_t, c_double, c_int, REPAIR_FN, P]),
        "smfs_encoder_add_batch": (
            c_int, [P, c_uint64, c_char_p, c_size_t, POINTER(c_uint32), POINTER(c_uint32), c_char_p, c_size_t,
                    c_double, REPAIR_FN, P]),
        "smfs_encoder_get_timer": (c_int, [P, POINTER(c_double)]),
        "smfs_encoder_handle_timer": (c_int, [P, c_double, REPAIR_FN, P]),
        "smfs_encoder_flush": (c_int, [P, REPAIR_FN, P]),
        "smfs_encoder_open_bins": (c_size_t, [P]),
        "smfs_encoder_stats": (None, [P, POINTER(_EncStats)]),
        "smfs_encoder_set_budgeted": (None, [P, c_int]),
        "smfs_encoder_credit": (ctypes.c_int64, [P]),
        "smfs_decoder_new": (P, [POINTER(_Params), c_uint64]),
        "smfs_decoder_free": (None, [P]),
        "smfs_decoder_on_data": (c_int, [P, c_uint64, c_char_p, c_size_t, c_double, PACKET_FN, P]),
        "smfs_decoder_on_repair": (c_int, [P, POINTER(_Repair), c_double, PACKET_FN, P]),
        "smfs_decoder_has": (c_int, [P, c_uint64]),
        "smfs_decoder_get": (c_void_p, [P, c_uint64, POINTER(c_size_t)]),
        "smfs_decoder_low": (c_uint64, [P]),
        "smfs_decoder_window": (c_uint64, [P]),
        "smfs_decoder_missing_in_window": (c_uint64, [P]),
        "smfs_decoder_stats": (None, [P, POINTER(_DecStats)]),
        "smfs_xor_into": (None, [c_void_p, c_char_p, c_size_t]),
        "smfs_tunnel_new": (P, [c_char_p, c_size_t]),
        "smfs_tunnel_free": (None, [P]),
        "smfs_tunnel_mac": (c_int, [P, c_char_p, c_size_t, c_void_p]),
        "smfs_seal_data": (c_long, [P, c_int, c_uint64, c_char_p, c_size_t, c_void_p, c_size_t]),
        "smfs_seal_repair": (c_long, [P, c_int, POINTER(_Repair), c_void_p, c_size_t]),
        "smfs_unseal": (c_int, [P, c_char_p, c_size_t, c_int, POINTER(_Msg)]),
        "smfs_tunnel_reason": (c_char_p, [c_int]),
        "smfs_replay_new": (P, [c_uint64]),
        "smfs_replay_free": (None, [P]),
        "smfs_replay_check": (c_int, [P, c_uint64]),
        "smfs_replay_update": (None, [P, c_uint64]),
        "smfs_replay_check_and_update": (c_int, [P, c_uint64]),
        "smfs_replay_mark_rebuilt": (None, [P, c_uint64]),
        "smfs_replay_late_after_rebuild": (c_int, [P, c_uint64]),
        "smfs_replay_top": (c_int, [P, POINTER(c_uint64)]),
        "smfs_replay_rebuilt_count": (c_size_t, [P]),
        "smfs_ft_new": (P, [c_uint32, c_uint32, c_uint32, c_uint32, c_int]),
        "smfs_ft_free": (None, [P]),
        "smfs_ft_on_packet_sent": (None, [P, c_uint64, c_char_p, c_size_t, c_double]),
        "smfs_ft_on_repair_sent": (None, [P, POINTER(_Repair), c_double]),
        "smfs_ft_safe_offsets": (c_int, [P, SAFE_FN, P]),
        "smfs_ft_safe_offset": (c_int, [P, POINTER(_Flow), POINTER(c_int64)]),
        "smfs_ft_flows": (c_size_t, [P]),
        "smfs_ft_pending": (c_size_t, [P]),
        "smfs_ft_ignored": (c_uint64, [P]),
        "smfs_ft_dropped": (c_uint64, [P]),
        "smfs_ft_latencies": (c_size_t, [P, POINTER(c_double), c_size_t]),
        "smfs_ft_held_latencies": (c_size_t, [P, POINTER(c_double), c_size_t]),
        "smfs_ft_set_held": (None, [P, c_double]),
        "smfs_is_pure_ack": (c_int, [c_char_p, c_size_t]),
        "smfs_vnet_segment": (c_long, [c_char_p, c_char_p, c_size_t, c_void_p, c_size_t, c_size_t, POINTER(c_uint32)]),
        "smfs_bench_codec": (
            c_int, [POINTER(_Params), c_char_p, c_size_t, c_size_t, c_double, c_uint64, c_double,
                    POINTER(c_double), POINTER(c_double), POINTER(c_uint64), POINTER(c_uint64)]),
        "smfs_bench_tunnel": (c_int, [c_char_p, c_size_t, c_size_t, c_double, POINTER(c_double), POINTER(c_double)]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


# -- helpers ----------------------------------------------------------------------------------


def _check(rc: int, what: str) -> int:
    """``rc`` when >= 0; else the Python exception of the negative errno."""
    if rc >= 0:
        return rc
    if -rc == errno.ENOMEM:
        raise MemoryError(what)
    if -rc in (errno.EINVAL, errno.ENOSPC):
        raise ValueError(what)
    raise NativeError(f"{what}: {os.strerror(-rc)}")


def _u64(v: object, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < U64:
        raise ValueError(f"{name} must be a u64, got {v!r}")
    return v


def _as_bytes(data: object) -> bytes:
    return data if type(data) is bytes else bytes(data)  # type: ignore[arg-type]


def _params(p: FecParams) -> _Params:
    if len(p.interleaves) > MAX_LAYERS:
        raise ValueError(f"at most {MAX_LAYERS} layers")
    ivs = (c_uint32 * MAX_LAYERS)(*[i if i < 1 << 32 else 0 for i in p.interleaves])
    return _Params(p.r, p.c, ivs, float(p.flush_ms))


def _to_repair(ptr: object) -> Repair:
    r = ptr.contents  # type: ignore[attr-defined]
    n = r.n
    return _trusted_repair(r.layer, tuple(r.seqs[:n]), tuple(r.lengths[:n]), ctypes.string_at(r.xor, r.xor_len))


class _CRepair:
    """A Python :class:`Repair` as a C ``smfs_repair`` (the arrays kept alive with it)."""

    __slots__ = ("struct", "_keep")

    def __init__(self, rep: Repair) -> None:
        n = len(rep.seqs)
        if not 1 <= n <= MAX_R or len(rep.lengths) != n:
            raise ValueError(f"repair must cover 1..{MAX_R} packets, got {n}")
        if not 0 <= rep.layer < 1 << 32:
            raise ValueError(f"repair layer out of range: {rep.layer!r}")
        for s in rep.seqs:
            _u64(s, "repair seq")
        if not all(1 <= ln <= 65535 for ln in rep.lengths):
            raise ValueError("repair lengths must be 1..65535")
        xor = _as_bytes(rep.xor)
        seqs = (c_uint64 * n)(*rep.seqs)
        lengths = (c_uint16 * n)(*rep.lengths)
        buf = ctypes.create_string_buffer(xor, len(xor)) if xor else None
        self._keep = (seqs, lengths, buf)
        self.struct = _Repair(rep.layer, n, seqs, lengths, ctypes.cast(buf, c_void_p) if buf else None, len(xor))


def _flow_of(f: _Flow) -> Flow:
    return Flow(socket.inet_ntoa(bytes(f.src)), f.sport, socket.inet_ntoa(bytes(f.dst)), f.dport)


def _c_flow(flow: Flow) -> _Flow:
    src, dst = socket.inet_aton(flow.src), socket.inet_aton(flow.dst)
    return _Flow((c_uint8 * 4)(*src), (c_uint8 * 4)(*dst), flow.sport, flow.dport)


class _Handle:
    """Owns one C object: freed with its Python wrapper (or on :meth:`close`)."""

    _free_name = ""

    def _own(self, lib: ctypes.CDLL, ptr: int | None, what: str) -> None:
        if not ptr:
            err = ctypes.get_errno() or errno.EINVAL
            raise MemoryError(what) if err == errno.ENOMEM else ValueError(what)
        self._lib = lib
        self._ptr = ptr
        self._finalizer = weakref.finalize(self, getattr(lib, self._free_name), ptr)

    def close(self) -> None:
        """Free the C object now."""
        self._finalizer()


def _none_to_nan(now: float | None) -> float:
    return math.nan if now is None else float(now)


# -- FEC --------------------------------------------------------------------------------------


class Encoder(_Handle):
    """:class:`smfs.fec.Encoder` in C: same methods, same repairs in the same order."""

    _free_name = "smfs_encoder_free"

    def __init__(self, params: FecParams | None = None, variant: str | None = None) -> None:
        self.params = params or FecParams()
        lib = load(variant)
        self._own(lib, lib.smfs_encoder_new(byref(_params(self.params))), f"encoder params {self.params!r}")
        self._out: list[Repair] = []
        self._cb = REPAIR_FN(self._collect)
        self._budgeted = False

    def _collect(self, _ctx: object, rep: object) -> None:
        self._out.append(_to_repair(rep))

    def add(self, seq: int, packet: bytes, now: float, lazy: bool = False) -> list[Repair]:
        """Add packet ``seq`` (sent at ``now``, s); return the repairs it completes."""
        _u64(seq, "seq")
        out = self._out = []
        data = _as_bytes(packet)
        _check(self._lib.smfs_encoder_add_ex(self._ptr, seq, data, len(data), now, int(bool(lazy)), self._cb, None),
               f"seq must increase and packet length be 1..65535: seq {seq}, {len(data)} bytes")
        return out

    def add_many(self, first_seq: int, packets: list[bytes], now: float, lazy: list[bool] | None = None
                 ) -> list[Repair]:
        """Add ``packets`` numbered ``first_seq, first_seq + 1, ...`` in one C call."""
        _u64(first_seq, "first_seq")
        out = self._out = []
        if not packets:
            return out
        data = [_as_bytes(p) for p in packets]
        lens = (c_uint32 * len(data))(*map(len, data))
        offs, at = (c_uint32 * len(data))(), 0
        for i, p in enumerate(data):
            offs[i] = at
            at += len(p)
        buf = b"".join(data)
        flags = None if lazy is None else bytes(bool(v) for v in lazy)
        _check(self._lib.smfs_encoder_add_batch(self._ptr, first_seq, buf, len(buf), offs, lens, flags, len(data),
                                                now, self._cb, None), "bad seq or packet length")
        return out

    def get_timer(self) -> float | None:
        """When (s) :meth:`handle_timer` must next run, or None when no bin is open."""
        deadline = c_double()
        return deadline.value if self._lib.smfs_encoder_get_timer(self._ptr, byref(deadline)) else None

    def handle_timer(self, now: float) -> list[Repair]:
        """Flush every open bin whose deadline is at or before ``now``; return their repairs."""
        out = self._out = []
        self._lib.smfs_encoder_handle_timer(self._ptr, now, self._cb, None)
        return out

    def flush(self) -> list[Repair]:
        """Flush every open bin now."""
        out = self._out = []
        self._lib.smfs_encoder_flush(self._ptr, self._cb, None)
        return out

    @property
    def open_bins(self) -> int:
        return self._lib.smfs_encoder_open_bins(self._ptr)

    @property
    def budgeted(self) -> bool:
        """:attr:`smfs.fec.Encoder.budgeted`."""
        return self._budgeted

    @budgeted.setter
    def budgeted(self, value: bool) -> None:
        self._budgeted = bool(value)
        self._lib.smfs_encoder_set_budgeted(self._ptr, int(self._budgeted))

    @property
    def credit(self) -> int:
        """:attr:`smfs.fec.Encoder.credit`."""
        return self._lib.smfs_encoder_credit(self._ptr)

    @property
    def stats(self) -> EncoderStats:
        s = _EncStats()
        self._lib.smfs_encoder_stats(self._ptr, byref(s))
        return EncoderStats(**{n: getattr(s, n) for n in _ENC_STATS})


class Decoder(_Handle):
    """:class:`smfs.fec.Decoder` in C: same methods, same rebuilt packets, same stats."""

    _free_name = "smfs_decoder_free"

    def __init__(self, params: FecParams | None = None, window: int = 2048, variant: str | None = None) -> None:
        self.params = params or FecParams()
        if not isinstance(window, int) or isinstance(window, bool) or window < max(1, 2 * self.params.span):
            raise ValueError(f"window must be an integer >= 2 * r * max(interleaves) and >= 1, got {window!r}")
        self.window = window
        self.max_repairs = self.params.c * window
        lib = load(variant)
        self._own(lib, lib.smfs_decoder_new(byref(_params(self.params)), window), f"decoder window {window}")
        self._out: list[tuple[int, bytes]] = []
        self._cb = PACKET_FN(self._collect)

    def _collect(self, _ctx: object, seq: int, ptr: int, length: int) -> None:
        self._out.append((seq, ctypes.string_at(ptr, length) if length else b""))

    def has(self, seq: int) -> bool:
        return 0 <= seq < U64 and bool(self._lib.smfs_decoder_has(self._ptr, seq))

    def get(self, seq: int) -> bytes | None:
        if not 0 <= seq < U64:
            return None
        n = c_size_t()
        ptr = self._lib.smfs_decoder_get(self._ptr, seq, byref(n))
        return None if not ptr else ctypes.string_at(ptr, n.value)

    @property
    def low(self) -> int:
        return self._lib.smfs_decoder_low(self._ptr)

    def on_data(self, seq: int, packet: bytes, now: float) -> list[tuple[int, bytes]]:
        """Take data packet ``seq``; return the packets it lets the decoder rebuild."""
        _u64(seq, "seq")
        out = self._out = []
        data = _as_bytes(packet)
        _check(self._lib.smfs_decoder_on_data(self._ptr, seq, data, len(data), now, self._cb, None),
               f"data packet of {len(data)} bytes")
        return out

    def on_repair(self, repair: Repair, now: float) -> list[tuple[int, bytes]]:
        """Take ``repair``; return the packets rebuilt thanks to it (with cascades)."""
        crep = _CRepair(repair)
        out = self._out = []
        _check(self._lib.smfs_decoder_on_repair(self._ptr, byref(crep.struct), now, self._cb, None), "malformed repair")
        return out

    def missing_in_window(self) -> int:
        return self._lib.smfs_decoder_missing_in_window(self._ptr)

    @property
    def stats(self) -> DecoderStats:
        s = _DecStats()
        self._lib.smfs_decoder_stats(self._ptr, byref(s))
        return DecoderStats(**{n: getattr(s, n) for n in _DEC_STATS if n != "nomem"})

    @property
    def nomem(self) -> int:
        """C only: rebuilds or repairs dropped for want of memory."""
        s = _DecStats()
        self._lib.smfs_decoder_stats(self._ptr, byref(s))
        return s.nomem


# -- tunnel -----------------------------------------------------------------------------------


class Tunnel(_Handle):
    """The HMAC-SHA-256 states of one key (``_mac_states``) and the tunnel calls under it."""

    _free_name = "smfs_tunnel_free"

    def __init__(self, key: bytes, variant: str | None = None) -> None:
        if not isinstance(key, bytes) or len(key) < MIN_KEY:
            raise ValueError(f"tunnel key must be at least {MIN_KEY} bytes")
        lib = load(variant)
        self._own(lib, lib.smfs_tunnel_new(key, len(key)), "tunnel key")
        self._buf = ctypes.create_string_buffer(65536)
        self._msg = _Msg()

    def seal_data(self, seq: int, packet: bytes, site: int) -> bytes:
        _check_site(site)
        _u64(seq, "seq")
        data = _as_bytes(packet)
        n = _check(self._lib.smfs_seal_data(self._ptr, site, seq, data, len(data), self._buf, len(self._buf)),
                   f"packet length {len(data)} does not fit a tunnel datagram")
        return self._buf.raw[:n]

    def seal_repair(self, repair: Repair, site: int) -> bytes:
        _check_site(site)
        crep = _CRepair(repair)
        n = _check(self._lib.smfs_seal_repair(self._ptr, site, byref(crep.struct), self._buf, len(self._buf)),
                   "repair does not fit the wire format")
        return self._buf.raw[:n]

    def mac(self, data: bytes) -> bytes:
        """:func:`smfs.tunnel._mac` in C (the control channel's MAC, smfs.callbacks)."""
        data = _as_bytes(data)
        _check(self._lib.smfs_tunnel_mac(self._ptr, data, len(data), self._buf), "mac")
        return self._buf.raw[:16]

    def unseal(self, datagram: bytes, expect_site: int | None = None) -> tuple[int, int | None, bytes | Repair]:
        data = _as_bytes(datagram)
        if expect_site is None:
            site = -1
        elif isinstance(expect_site, int) and 0 <= expect_site <= 255:
            site = expect_site
        else:
            site = 256  # matches no site, as in Python
        m = self._msg
        rc = self._lib.smfs_unseal(self._ptr, data, len(data), site, byref(m))
        if rc < 0:
            raise TunnelError(self._lib.smfs_tunnel_reason(rc).decode())
        if m.kind == 1:
            return m.site, m.seq, ctypes.string_at(m.packet, m.packet_len)
        return m.site, None, _to_repair(ctypes.pointer(m.repair))


class Sealer:
    """:class:`smfs.tunnel.Sealer` in C: :meth:`data` and :meth:`repair` under one key and site."""

    __slots__ = ("site", "_tunnel")

    def __init__(self, key: bytes, site: int) -> None:
        _check_site(site)
        self.site = site
        self._tunnel = Tunnel(key)

    def data(self, seq: int, packet: bytes) -> bytes:
        return self._tunnel.seal_data(seq, packet, self.site)

    def repair(self, repair: Repair) -> bytes:
        return self._tunnel.seal_repair(repair, self.site)


def _check_site(site: int) -> None:
    if not isinstance(site, int) or isinstance(site, bool) or not 0 <= site <= 255:
        raise ValueError(f"site must be 0..255, got {site!r}")


_tunnels: OrderedDict[tuple[bytes, str], Tunnel] = OrderedDict()


def _tunnel(key: bytes) -> Tunnel:
    """The :class:`Tunnel` of ``key``, cached (16 keys) like ``tunnel._mac_states``."""
    ck = (key, os.environ.get(VARIANT_ENV, "release")) if isinstance(key, bytes) else None
    t = _tunnels.get(ck) if ck else None
    if t is None:
        t = Tunnel(key)
        _tunnels[ck] = t  # type: ignore[index]
        while len(_tunnels) > 16:
            _tunnels.popitem(last=False)
    return t


def encode_data(seq: int, packet: bytes, site: int, key: bytes) -> bytes:
    """:func:`smfs.tunnel.encode_data` in C."""
    return _tunnel(key).seal_data(seq, packet, site)


def encode_repair(repair: Repair, site: int, key: bytes) -> bytes:
    """:func:`smfs.tunnel.encode_repair` in C."""
    return _tunnel(key).seal_repair(repair, site)


def decode_raw(datagram: bytes, key: bytes, expect_site: int | None = None) -> tuple[int, int | None, bytes | Repair]:
    """:func:`smfs.tunnel.decode_raw` in C: same results, same :class:`TunnelError` reasons."""
    return _tunnel(key).unseal(datagram, expect_site)


def decode(datagram: bytes, key: bytes, expect_site: int | None = None) -> DataMsg | RepairMsg:
    """:func:`smfs.tunnel.decode` in C."""
    site, seq, payload = decode_raw(datagram, key, expect_site)
    if seq is None:
        return RepairMsg(site, payload)  # type: ignore[arg-type]
    return DataMsg(site, seq, payload)  # type: ignore[arg-type]


class ReplayWindow(_Handle):
    """:class:`smfs.tunnel.ReplayWindow` in C."""

    _free_name = "smfs_replay_free"

    def __init__(self, size: int = 4096, variant: str | None = None) -> None:
        if not isinstance(size, int) or size < 64:
            raise ValueError(f"replay window size must be >= 64, got {size!r}")
        self.size = size
        lib = load(variant)
        self._own(lib, lib.smfs_replay_new(size), f"replay window size {size}")

    @property
    def top(self) -> int:
        top = c_uint64()
        return top.value if self._lib.smfs_replay_top(self._ptr, byref(top)) else -1

    def check(self, seq: int) -> bool:
        return bool(self._lib.smfs_replay_check(self._ptr, _u64(seq, "seq")))

    def update(self, seq: int) -> None:
        self._lib.smfs_replay_update(self._ptr, _u64(seq, "seq"))

    def check_and_update(self, seq: int) -> bool:
        return bool(self._lib.smfs_replay_check_and_update(self._ptr, _u64(seq, "seq")))

    def mark_rebuilt(self, seq: int) -> None:
        self._lib.smfs_replay_mark_rebuilt(self._ptr, _u64(seq, "seq"))

    def late_after_rebuild(self, seq: int) -> bool:
        return bool(self._lib.smfs_replay_late_after_rebuild(self._ptr, _u64(seq, "seq")))

    @property
    def rebuilt_count(self) -> int:
        return self._lib.smfs_replay_rebuilt_count(self._ptr)


# -- flow tracking ----------------------------------------------------------------------------


class FlowTracker(_Handle):
    """:class:`smfs.callbacks.FlowTracker` in C. :meth:`safe_offsets` answers the same pairs,
    in the order the flows first advanced (the Python set's order is arbitrary)."""

    _free_name = "smfs_ft_free"

    def __init__(self, c: int = 3, max_flows: int = 4096, max_pending: int = 65536, max_latencies: int = 10000,
                 safe_at_send: bool = False, variant: str | None = None) -> None:
        if not 0 <= c <= 8:
            raise ValueError(f"c must be 0..8, got {c!r}")
        self.c = c
        self.max_flows = max_flows
        self.max_pending = max_pending
        self.max_latencies = max_latencies
        lib = load(variant)
        self._own(lib, lib.smfs_ft_new(c, max_flows, max_pending, max_latencies, int(safe_at_send)),
                  f"flow tracker limits {max_flows}, {max_pending}, {max_latencies}")
        self._out: list[tuple[Flow, int]] = []
        self._cb = SAFE_FN(self._collect)
        self._held = 0.0

    def _collect(self, _ctx: object, flow: object, offset: int) -> None:
        self._out.append((_flow_of(flow.contents), offset))  # type: ignore[attr-defined]

    def on_packet_sent(self, tunnel_seq: int, ip_packet: bytes, now: float | None = None) -> None:
        data = _as_bytes(ip_packet)
        self._lib.smfs_ft_on_packet_sent(self._ptr, _u64(tunnel_seq, "tunnel_seq"), data, len(data), _none_to_nan(now))

    def on_repairs_sent(self, repairs: Iterable[Repair], now: float | None = None) -> None:
        t = _none_to_nan(now)
        for rep in repairs:
            n = len(rep.seqs)
            seqs = (c_uint64 * n)(*rep.seqs)
            layer = rep.layer if 0 <= rep.layer < 1 << 32 else (1 << 32) - 1
            self._lib.smfs_ft_on_repair_sent(self._ptr, byref(_Repair(layer, n, seqs, None, None, 0)), t)

    def safe_offsets(self) -> list[tuple[Flow, int]]:
        out = self._out = []
        self._lib.smfs_ft_safe_offsets(self._ptr, self._cb, None)
        return out

    def safe_offset(self, flow: Flow) -> int | None:
        off = c_int64()
        return off.value if self._lib.smfs_ft_safe_offset(self._ptr, byref(_c_flow(flow)), byref(off)) else None

    @property
    def flows(self) -> int:
        return self._lib.smfs_ft_flows(self._ptr)

    @property
    def pending(self) -> int:
        return self._lib.smfs_ft_pending(self._ptr)

    @property
    def ignored(self) -> int:
        return self._lib.smfs_ft_ignored(self._ptr)

    @property
    def dropped(self) -> int:
        """C only: segments never tracked for want of room (see smfs_core.h)."""
        return self._lib.smfs_ft_dropped(self._ptr)

    @property
    def latencies(self) -> list[float]:
        return self._doubles(self._lib.smfs_ft_latencies)

    @property
    def held_latencies(self) -> list[float]:
        """:attr:`smfs.callbacks.FlowTracker.held_latencies`."""
        return self._doubles(self._lib.smfs_ft_held_latencies)

    @property
    def held(self) -> float:
        """:attr:`smfs.callbacks.FlowTracker.held` (kept here: C only takes it)."""
        return self._held

    @held.setter
    def held(self, value: float) -> None:
        self._held = float(value)
        self._lib.smfs_ft_set_held(self._ptr, self._held)

    def _doubles(self, fn: Callable[..., int]) -> list[float]:
        n = fn(self._ptr, None, 0)
        buf = (c_double * max(n, 1))()
        fn(self._ptr, buf, n)
        return list(buf[:n])


# -- benchmarks -------------------------------------------------------------------------------


def bench_codec(params: FecParams, packets: bytes, size: int, loss: float = 0.01, seed: int = 1,
                min_s: float = 0.5) -> dict[str, float]:
    """C encode and decode throughput (bytes of data packets per second) over ``packets``
    (``len(packets) // size`` packets of ``size`` bytes), measured in C on this core."""
    lib = load()
    n = len(packets) // size
    enc, dec, rebuilt, lost = c_double(), c_double(), c_uint64(), c_uint64()
    _check(lib.smfs_bench_codec(byref(_params(params)), packets, size, n, loss, seed, min_s, byref(enc), byref(dec),
                                byref(rebuilt), byref(lost)), "bench_codec")
    return {"encode_Bps": enc.value, "decode_Bps": dec.value, "rebuilt": rebuilt.value, "lost": lost.value}


def bench_tunnel(key: bytes, size: int, min_s: float = 0.5) -> dict[str, float]:
    """C seal and unseal rates (DATA datagrams of ``size``-byte packets per second)."""
    lib = load()
    seal, unseal = c_double(), c_double()
    _check(lib.smfs_bench_tunnel(key, len(key), size, min_s, byref(seal), byref(unseal)), "bench_tunnel")
    return {"seal_pps": seal.value, "unseal_pps": unseal.value}


def is_pure_ack(ip_packet: bytes, variant: str | None = None) -> bool:
    """:func:`smfs.callbacks.is_pure_ack` in C (what the C gateway marks lazy)."""
    data = _as_bytes(ip_packet)
    return bool(load(variant).smfs_is_pure_ack(data, len(data)))


def vnet_segment(hdr: bytes, packet: bytes, stride: int = 65536, max_segments: int = 256,
                 variant: str | None = None) -> list[bytes]:
    """offload.c's ``smfs_vnet_segment``: one read from a TUN with IFF_VNET_HDR (``hdr``, the
    10-byte virtio_net_hdr, then ``packet``) as the packets a TUN without offloads gives."""
    lib = load(variant)
    out = ctypes.create_string_buffer(stride * max_segments)
    lens = (c_uint32 * max_segments)()
    n = _check(lib.smfs_vnet_segment(bytes(hdr), bytes(packet), len(packet), out, stride, max_segments, lens),
               "vnet segment")
    return [out.raw[i * stride: i * stride + lens[i]] for i in range(n)]

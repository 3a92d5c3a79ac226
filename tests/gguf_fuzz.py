"""Seeded mutations of valid GGUF files, and a forked, memory-limited runner that loads each mutant.

Used by tests/test_fuzz_gguf.py (importable as `gguf_fuzz`: tests/conftest.py puts this folder on sys.path).

A case is `(kind, index)`; its bytes follow from the seed, the kind of base file and the index alone, so any case
can be replayed (`mutate(base, seed, index)`). Mutations, in three families (docs/spec.md §G1 for the layout):
- raw bytes: bit flips (mostly in the header), truncations, interesting integers written over the header;
- metadata: a key/value replaced by a value of another type or a hostile one of the same type (NaN, inf, 0, huge,
  lists, 64 KiB strings, invalid UTF-8, nested arrays), dropped, duplicated or renamed; tokenizer arrays edited
  element by element (duplicate or unknown tokens, malformed merges, out-of-range token types, wrong lengths);
- tensor infos: rank, dimensions (0, 2^32, >= 2^63, swapped, rows traded for columns), ggml type, data offset,
  names (duplicates, other branch prefixes, 64 KiB, invalid UTF-8), dropped or added tensors, header counts.

The runner forks one child per batch with an address-space limit (`RLIMIT_AS`), so a case that tries to allocate
gigabytes fails with MemoryError inside the child instead of taking the machine down; a child that dies or stops
answering marks its current case as a crash or a hang, and the rest of its batch goes to a new child.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import select
import signal
import struct
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

# GGUF value types (docs/spec.md §G1)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "B", U64: "Q", I64: "q",
        F64: "d"}
_INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)
_SCALAR_TYPES = (*_INT_TYPES, F32, F64, BOOL)
_INTS = (0, 1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63,
         2**64 - 1)
_FLOATS = (0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-7, 3.0e38, 1e308, math.inf, -math.inf, math.nan, 5e6, 1e6)
_STRINGS = (b"", b"x", b"gpt2", b"qwen2", b"llama", b"qwen3vl", b"ideogram4", b"uncond.", b"transformer.",
            b"conditional_transformer.", b"\xff\xfe\x00bad", "é".encode(), b"a b", b"a  b c", b"x" * 65536,
            b"<|im_start|>", b"\xc4\xa0 \xc4\xa0")
_DIMS = (0, 1, 2, 3, 31, 32, 255, 256, 257, 512, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**63 + 5,
         2**64 - 1)
_GGML_TYPES = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 18, 20, 23, 24, 25, 26, 27, 28, 29, 30, 31,
               34, 35, 39, 40, 41, 42, 99, 2**31, 2**32 - 1)


# ---------------------------------------------------------------------------------------------------------------
# A GGUF file as editable parts


@dataclass
class KV:
    key: bytes
    vtype: int
    raw: bytes  # the encoded value


@dataclass
class TensorInfo:
    name: bytes
    dims: list  # fastest first, as stored
    qtype: int
    offset: int  # from the start of the data section


@dataclass
class Layout:
    version: int
    kvs: list
    tensors: list
    data: bytes
    alignment: int
    header_size: int  # bytes before the data section of the original file

    @classmethod
    def parse(cls, blob: bytes) -> "Layout":
        """The parts of a valid GGUF file (the base files only: no checks)."""
        assert blob[:4] == b"GGUF"
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", blob, 4)
        pos, kvs, alignment = 24, [], 32
        for _ in range(n_kv):
            key, pos = _read_str(blob, pos)
            (vtype,) = struct.unpack_from("<I", blob, pos)
            end = _skip_value(blob, pos + 4, vtype)
            kvs.append(KV(key, vtype, blob[pos + 4:end]))
            if key == b"general.alignment":
                (alignment,) = struct.unpack_from("<I", blob, pos + 4)
            pos = end
        tensors = []
        for _ in range(n_tensors):
            name, pos = _read_str(blob, pos)
            (n_dims,) = struct.unpack_from("<I", blob, pos)
            dims = list(struct.unpack_from(f"<{n_dims}Q", blob, pos + 4))
            pos += 4 + 8 * n_dims
            qtype, offset = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            tensors.append(TensorInfo(name, dims, qtype, offset))
        start = -(-pos // alignment) * alignment
        return cls(version, kvs, tensors, blob[start:], alignment, start)

    def copy(self) -> "Layout":
        return Layout(self.version, [KV(k.key, k.vtype, k.raw) for k in self.kvs],
                      [TensorInfo(t.name, list(t.dims), t.qtype, t.offset) for t in self.tensors], self.data,
                      self.alignment, self.header_size)

    def to_bytes(self, n_tensors=None, n_kv=None) -> bytes:
        parts = [b"GGUF", struct.pack("<IQQ", self.version, len(self.tensors) if n_tensors is None else n_tensors,
                                      len(self.kvs) if n_kv is None else n_kv)]
        alignment = 32
        for kv in self.kvs:
            parts += (enc_str(kv.key), struct.pack("<I", kv.vtype), kv.raw)
            if kv.key == b"general.alignment" and kv.vtype == U32 and len(kv.raw) == 4:
                alignment = struct.unpack("<I", kv.raw)[0]
        for t in self.tensors:
            parts += (enc_str(t.name), struct.pack("<I", len(t.dims)),
                      b"".join(struct.pack("<Q", d % 2**64) for d in t.dims), struct.pack("<IQ", t.qtype, t.offset))
        head = b"".join(parts)
        if alignment and not alignment & (alignment - 1) and alignment <= 1 << 20:  # else a file of gigabytes
            head += b"\0" * (-len(head) % alignment)
        return head + self.data

    def kv(self, key: bytes):
        return next((kv for kv in self.kvs if kv.key == key), None)


def _read_str(blob, pos):
    (n,) = struct.unpack_from("<Q", blob, pos)
    return blob[pos + 8:pos + 8 + n], pos + 8 + n


def _skip_value(blob, pos, vtype):
    if vtype in _FMT:
        return pos + struct.calcsize("<" + _FMT[vtype])
    if vtype == STR:
        return _read_str(blob, pos)[1]
    item_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    for _ in range(count):
        pos = _skip_value(blob, pos, item_type)
    return pos


def enc_str(value: bytes) -> bytes:
    return struct.pack("<Q", len(value)) + value


def enc_scalar(vtype: int, value) -> bytes:
    if vtype in (F32, F64):
        if vtype == F32 and math.isfinite(value) and abs(value) > 3.4e38:
            value = math.copysign(math.inf, value)  # what float32 rounds it to
        return struct.pack("<" + _FMT[vtype], value)
    bits = struct.calcsize(_FMT[vtype]) * 8
    value %= 2**bits  # any integer, wrapped into the type (negative numbers of signed types included)
    return value.to_bytes(bits // 8, "little")


def enc_array(item_type: int, items: list) -> bytes:
    return struct.pack("<IQ", item_type, len(items)) + b"".join(items)


def decode_strings(raw: bytes) -> list:
    """The elements of an encoded array of strings."""
    (_, count), pos, out = struct.unpack_from("<IQ", raw), 12, []
    for _ in range(count):
        value, pos = _read_str(raw, pos)
        out.append(value)
    return out


def decode_ints(raw: bytes) -> tuple:
    item_type, count = struct.unpack_from("<IQ", raw)
    return item_type, list(struct.unpack_from(f"<{count}{_FMT[item_type]}", raw, 12))


# ---------------------------------------------------------------------------------------------------------------
# Hostile values


def _scalar_value(rng, vtype):
    if vtype in (F32, F64):
        return rng.choice(_FLOATS) if rng.random() < 0.8 else rng.uniform(-1e9, 1e9)
    if vtype == BOOL:
        return rng.choice((0, 1, 2, 255))
    return rng.choice(_INTS) * rng.choice((1, 1, 1, -1)) if rng.random() < 0.8 else rng.getrandbits(64)


def hostile_scalar(rng, vtype=None):
    vtype = rng.choice(_SCALAR_TYPES) if vtype is None else vtype
    return vtype, enc_scalar(vtype, _scalar_value(rng, vtype))


def hostile_string(rng):
    if rng.random() < 0.7:
        return STR, enc_str(rng.choice(_STRINGS))
    return STR, enc_str(bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 5, 40)))))


def hostile_array(rng, item_type=None, depth=0):
    if item_type is None:
        item_type = rng.choice((*_SCALAR_TYPES, STR, STR, ARR if depth == 0 else STR))
    count = rng.choice((0, 1, 2, 3, 3, 3, 4, 20, 300))
    if item_type == STR:
        items = [hostile_string(rng)[1] for _ in range(count)]
    elif item_type == ARR:
        items = [hostile_array(rng, None, depth + 1)[1] for _ in range(min(count, 4))]
    else:
        items = [enc_scalar(item_type, _scalar_value(rng, item_type)) for _ in range(count)]
    return ARR, enc_array(item_type, items)


def hostile_value(rng):
    r = rng.random()
    return hostile_scalar(rng) if r < 0.4 else hostile_string(rng) if r < 0.65 else hostile_array(rng)


def same_type_value(rng, kv: KV):
    """A hostile value of the key's own type (an array keeps its element type)."""
    if kv.vtype in _FMT:
        return hostile_scalar(rng, kv.vtype)
    if kv.vtype == STR:
        return hostile_string(rng)
    item_type = struct.unpack_from("<I", kv.raw)[0]
    return hostile_array(rng, item_type if item_type != ARR else None)


# ---------------------------------------------------------------------------------------------------------------
# Mutations


def _pick_kv(rng, layout, read_keys):
    """A key the pack reads (present or not) most of the time, else any key of the file."""
    if read_keys and rng.random() < 0.75:
        key = rng.choice(read_keys)
        kv = layout.kv(key)
        if kv is None:
            kv = KV(key, U32, enc_scalar(U32, 1))
            layout.kvs.insert(rng.randrange(len(layout.kvs) + 1), kv)
        return kv
    if not layout.kvs:
        layout.kvs.append(KV(b"general.name", STR, enc_str(b"x")))
    return rng.choice(layout.kvs)


def m_bitflip(rng, base, layout):
    blob = bytearray(base)
    header = layout.header_size
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        pos = rng.randrange(header) if rng.random() < 0.8 else rng.randrange(len(blob))
        blob[pos] ^= 1 << rng.randrange(8)
    return bytes(blob)


def m_truncate(rng, base, layout):
    r = rng.random()
    cut = rng.randrange(layout.header_size) if r < 0.6 else rng.randrange(len(base)) if r < 0.9 \
        else len(base) - rng.randrange(1, 64)
    return base[:cut]


def m_overwrite(rng, base, layout):
    blob = bytearray(base)
    size = rng.choice((1, 2, 4, 8))
    pos = rng.randrange(max(1, layout.header_size - size))
    blob[pos:pos + size] = (rng.choice(_INTS) % 2**(8 * size)).to_bytes(size, "little")
    return bytes(blob)


def m_kv_value(rng, base, layout, read_keys):
    kv = _pick_kv(rng, layout, read_keys)
    kv.vtype, kv.raw = same_type_value(rng, kv) if rng.random() < 0.4 else hostile_value(rng)
    return layout.to_bytes()


def m_kv_structure(rng, base, layout, read_keys):
    kv = _pick_kv(rng, layout, read_keys)
    r = rng.random()
    if r < 0.4:
        layout.kvs.remove(kv)
    elif r < 0.6:
        layout.kvs.insert(rng.randrange(len(layout.kvs) + 1), KV(kv.key, *hostile_value(rng)))  # duplicate key
    elif r < 0.8:
        kv.key = rng.choice((b"", b"\xff\xfe", b"k" * 65536, kv.key + b"\x00", kv.key.upper()))
    else:
        kv.vtype = rng.choice((13, 14, 255, 2**31, ARR, STR))  # a type that does not match the bytes
    return layout.to_bytes()


def m_tokenizer(rng, base, layout, read_keys):
    """Element-level edits of the tokenizer arrays (a text-encoder file)."""
    key = rng.choice((b"tokenizer.ggml.tokens", b"tokenizer.ggml.merges", b"tokenizer.ggml.token_type"))
    kv = layout.kv(key)
    if kv is None:
        return m_kv_value(rng, base, layout, read_keys)
    if key == b"tokenizer.ggml.token_type":
        item_type, values = decode_ints(kv.raw)
        r = rng.random()
        if r < 0.5 and values:
            for _ in range(rng.choice((1, 3, 50))):
                values[rng.randrange(len(values))] = rng.choice((0, 2, 3, 4, 5, 6, 7, -1, 2**31 - 1, -2**31))
        elif r < 0.8:
            values = values[:rng.randrange(len(values) + 1)] if rng.random() < 0.5 else values + [1] * 5
        else:
            item_type = rng.choice((U8, I64, F32, BOOL))
        kv.raw = enc_array(item_type, [enc_scalar(item_type, v) for v in values])
        return layout.to_bytes()
    items = decode_strings(kv.raw)
    for _ in range(rng.choice((1, 1, 2, 10))):
        i = rng.randrange(len(items)) if items else 0
        r = rng.random()
        if not items or r < 0.1:
            items.append(rng.choice(_STRINGS))
        elif r < 0.25:
            del items[i]
        elif r < 0.4:
            items[i] = rng.choice(items)  # a duplicate
        elif r < 0.55:
            items[i] = rng.choice(_STRINGS)
        elif r < 0.7:
            items[i] = items[i].replace(b" ", b"") or b"\xff"  # a merge without its space
        elif r < 0.85:
            items[i] = b"zz\xc4\xa0 qq" + bytes([rng.getrandbits(7)])  # names tokens that are not in the vocabulary
        else:
            items[i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 6)))
    kv.raw = enc_array(STR, [enc_str(s) for s in items])
    return layout.to_bytes()


def m_tensor_dims(rng, base, layout):
    t = rng.choice(layout.tensors)
    r = rng.random()
    if r < 0.35 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice(_DIMS)
    elif r < 0.5 and len(t.dims) >= 2:
        # rows traded for columns: the same byte count, another shape
        factor = rng.choice((2, 4, 256))
        if t.dims[1] % factor == 0:
            t.dims[0], t.dims[1] = t.dims[0] * factor, t.dims[1] // factor
        else:
            t.dims[0], t.dims[1] = t.dims[1], t.dims[0]
    elif r < 0.6 and len(t.dims) >= 2:
        t.dims[0], t.dims[1] = t.dims[1], t.dims[0]
    elif r < 0.75:
        t.dims.append(rng.choice((1, 1, 2, 0, 2**63)))
    elif r < 0.9:
        t.dims = t.dims[:rng.randrange(len(t.dims))] if t.dims else []
    else:
        t.dims = [rng.choice((1, 256)) for _ in range(rng.choice((0, 5, 8)))]
    return layout.to_bytes()


def m_tensor_other(rng, base, layout):
    t = rng.choice(layout.tensors)
    r = rng.random()
    if r < 0.25:
        t.qtype = rng.choice(_GGML_TYPES)
    elif r < 0.4:
        t.offset = rng.choice((0, 1, 16, t.offset + 32, t.offset * 2, len(layout.data), 2**63, 2**64 - 1,
                               rng.randrange(len(layout.data) + 1)))
    elif r < 0.55:
        other = rng.choice(layout.tensors)
        t.name = rng.choice((other.name, b"", b"\xff\xfe", b"n" * 65536, t.name + b"\x00"))
    elif r < 0.75:
        # another branch prefix, or none
        old = t.name.split(b".", 1)[0] + b"." if b"." in t.name else b""
        new = rng.choice((b"", b"cond.", b"uncond.", b"model.", b"model.diffusion_model.", b"transformer.",
                          b"unconditional_transformer.", b"conditional_transformer.", b"negative.", b"x."))
        targets = [x for x in layout.tensors if x.name.startswith(old)] if rng.random() < 0.5 else [t]
        for x in targets:
            x.name = new + x.name[len(old):]
    elif r < 0.9:
        for _ in range(rng.choice((1, 1, 5))):
            if layout.tensors:
                layout.tensors.remove(rng.choice(layout.tensors))
    else:
        layout.tensors.append(TensorInfo(rng.choice((t.name + b"x", b"blk.99.attn_q.weight", b"extra")),
                                         list(t.dims), t.qtype, t.offset))
    return layout.to_bytes()


def m_header(rng, base, layout):
    r = rng.random()
    if r < 0.3:
        layout.version = rng.choice((0, 1, 2, 4, 2**16, 2**24, 2**32 - 1))
        return layout.to_bytes()
    if r < 0.65:
        return layout.to_bytes(n_tensors=max(0, len(layout.tensors) + rng.choice((-1, 1, 2**20, 2**63))) % 2**64)
    return layout.to_bytes(n_kv=max(0, len(layout.kvs) + rng.choice((-1, 1, 2**20, 2**63))) % 2**64)


# name -> (weight, function, needs read_keys)
MUTATIONS = {
    "bitflip": (20, m_bitflip, False),
    "truncate": (8, m_truncate, False),
    "overwrite": (6, m_overwrite, False),
    "kv_value": (22, m_kv_value, True),
    "kv_structure": (8, m_kv_structure, True),
    "tokenizer": (10, m_tokenizer, True),
    "tensor_dims": (14, m_tensor_dims, False),
    "tensor_other": (12, m_tensor_other, False),
    "header": (4, m_header, False),
}


@dataclass
class Base:
    """A valid file and what the mutations need to know about it."""

    kind: str
    blob: bytes
    read_keys: list  # metadata keys the pack reads for this kind of file
    layout: Layout = field(init=False)

    def __post_init__(self):
        self.layout = Layout.parse(self.blob)


def mutate(base: Base, seed: int, index: int) -> tuple[str, bytes]:
    """(mutation name, bytes) of case `index`; deterministic in (seed, kind, index)."""
    rng = random.Random(f"{seed}:{base.kind}:{index}")
    if base.kind != "text_encoder":
        names = [n for n in MUTATIONS if n != "tokenizer"]
    else:
        names = list(MUTATIONS)
    name = rng.choices(names, weights=[MUTATIONS[n][0] for n in names])[0]
    _, fn, keyed = MUTATIONS[name]
    layout = base.layout.copy()
    blob = fn(rng, base.blob, layout, base.read_keys) if keyed else fn(rng, base.blob, layout)
    return name, blob


# ---------------------------------------------------------------------------------------------------------------
# Running cases: forked children with an address-space limit


def classify(exc: BaseException, path: str, pack_error=None, max_len: int = 1000) -> tuple[str, str]:
    """("pack error", message) for an acceptable error (a ValueError subclass of `pack_error`, one line under
    `max_len` characters naming the file), else ("escape: <class> (<what is wrong>)", detail)."""
    message = str(exc)
    where = _where(exc)
    if pack_error is not None and isinstance(exc, pack_error) and isinstance(exc, ValueError):
        problems = []
        if len(message) >= max_len:
            problems.append("long message")
        if os.path.basename(path) not in message:
            problems.append("no file name")
        if "\n" in message.strip():
            problems.append("several lines")
        if not problems:
            return "pack error", message[:160]
        return f"escape: {type(exc).__name__} ({', '.join(problems)})", f"{len(message)} chars: {message[:160]}"
    return f"escape: {type(exc).__name__}", f"{where}: {message[:160]}"


def _where(exc: BaseException) -> str:
    """file:function of the innermost frame inside the pack (or the innermost frame at all)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "site-packages" not in f.filename and "/tests/" not in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.filename)}:{frame.name}"


def run_cases(cases, run_one, *, workers=2, batch=64, case_timeout=30.0, memory_bytes=2 << 30, log=None):
    """Run `run_one(case) -> dict` for every case in forked children; returns {case: result dict}.

    Each child gets `memory_bytes` of address space above what it starts with. A child that dies marks its
    current case "escape: crash (...)"; one that sends nothing for `case_timeout` seconds is killed and its case
    marked "escape: hang"; the rest of its batch is run again in a new child.
    """
    pending = deque(list(cases[i:i + batch]) for i in range(0, len(cases), batch))
    results = {}
    running = {}  # fd -> [pid, batch, buffer, last_activity]
    while pending or running:
        while pending and len(running) < workers:
            chunk = pending.popleft()
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                os.close(read_fd)
                _child(write_fd, chunk, run_one, memory_bytes)
            os.close(write_fd)
            running[read_fd] = [pid, chunk, b"", time.monotonic()]
        ready, _, _ = select.select(list(running), [], [], 0.5)
        now = time.monotonic()
        for fd in ready:
            state = running[fd]
            data = os.read(fd, 1 << 16)
            if data:
                state[2] += data
                *lines, state[2] = state[2].split(b"\n")
                for line in lines:
                    result = json.loads(line)
                    results[_key(result["case"])] = result
                state[3] = now
                continue
            os.close(fd)
            del running[fd]
            _, status = os.waitpid(state[0], 0)
            _requeue(state[1], results, pending, f"escape: crash ({_status(status)})")
        for fd, state in list(running.items()):
            if now - state[3] > case_timeout:
                os.kill(state[0], signal.SIGKILL)
                os.waitpid(state[0], 0)
                os.close(fd)
                del running[fd]
                _requeue(state[1], results, pending, "escape: hang")
        if log is not None:
            log(len(results))
    return results


def _key(case):
    return tuple(case) if isinstance(case, list) else case


def _requeue(chunk, results, pending, verdict):
    missing = [case for case in chunk if _key(case) not in results]
    if missing:
        results[_key(missing[0])] = {"case": missing[0], "verdict": verdict, "detail": "", "mutation": "?"}
        if missing[1:]:
            pending.appendleft(missing[1:])


def _status(status):
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


def _child(write_fd, chunk, run_one, memory_bytes):
    code = 0
    try:
        with open("/proc/self/status") as f:
            vm_size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limit = vm_size + memory_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for case in chunk:
            try:
                result = run_one(case)
            except BaseException as exc:  # noqa: BLE001 - outside the loader: a fault of the harness itself
                result = {"verdict": f"harness error: {type(exc).__name__}", "mutation": "?",
                          "detail": f"{_where(exc)}: {str(exc)[:160]}"}
            result["case"] = case
            os.write(write_fd, (json.dumps(result) + "\n").encode())
    except BaseException:  # noqa: BLE001 - the parent sees the missing result as a crash
        code = 3
    finally:
        os._exit(code)

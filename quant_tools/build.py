"""Write the GGUF file: plan every tensor, then stream them one row chunk at a time into a temp file.

Memory stays bounded whatever the model size: gguf-py writes the header, metadata and tensor table (all small),
then each tensor is read from its source in row chunks of about `CHUNK_WEIGHTS` weights, quantized and appended,
so the peak is one chunk in float32 plus its bytes and the encoders' working arrays (about 100 MB), not one tensor
(llm_cond_proj alone is 0.98 GB in float32).

The sha256 of every source file goes into the metadata. Hashing 2 x 9 GB takes a while, so a background thread
hashes while the tensors are quantized; the metadata is written first with fixed-width placeholders that are
patched in place at the end (the layout does not move). The file is written as `<out>.partial` and renamed only
when complete; any failure or Ctrl-C removes the partial file. A run killed outright (SIGKILL, power loss) cannot
clean up: the next run finds the stale `<out>.partial`, says so and discards it. While a run writes, it holds a
lock on its partial file (POSIX), so a second run on the same output stops instead of discarding a file still
being written.
"""

import errno
import hashlib
import os
import shutil
import struct
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from . import __version__
from .errors import QuantToolError
from .layout import ARCH, BRANCH_PREFIXES, BRANCH_PREFIXES_KEY, BRANCHES_KEY, CONFIG_METADATA, metadata_key
from .quants import F32, default_threads, get_qtype, quantize

CHUNK_WEIGHTS = 1 << 22  # 4 M weights = 16 MB of float32 per chunk
_HASH_PLACEHOLDER = "0" * 64
_F16_MAX = F32(65504)


@dataclass
class PlannedTensor:
    out_name: str
    role: str
    source: object  # sources.TensorSource
    qtype: object  # quants.QuantType
    rule: str

    @property
    def shape(self):
        return self.source.shape

    @property
    def numel(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self):
        return self.numel // self.qtype.block_size * self.qtype.type_size


def plan(branches, recipe, bare_names=False):
    """Every output tensor in file order (branch by branch, official order), with its type and deciding rule."""
    if bare_names and len(branches) != 1:
        raise QuantToolError("bare tensor names are only possible for a single-branch file")
    planned = []
    for branch in branches:
        prefix = "" if bare_names else BRANCH_PREFIXES[branch.role]
        for name, source in branch.tensors.items():
            decision = recipe.decide(name, source.shape)
            planned.append(PlannedTensor(prefix + name, branch.role, source, get_qtype(decision.qtype), decision.rule))
    return planned


def type_histogram(planned):
    counts, sizes, weights = Counter(), Counter(), Counter()
    for t in planned:
        counts[t.qtype.name] += 1
        sizes[t.qtype.name] += t.nbytes
        weights[t.qtype.name] += t.numel
    return counts, sizes, weights


def _source_files(branches):
    """(label, path) per source file; the label is what the metadata records ("conditional/<file name>")."""
    entries = []
    for branch in branches:
        for f in branch.files:
            entries.append((f"{branch.role}/{f.path.name}", f.path))
    return entries


class SourceHasher(threading.Thread):
    """sha256 of each source file, in the background (hashlib releases the GIL on large updates)."""

    def __init__(self, entries, block=16 << 20):
        super().__init__(name="quant_tools-sha256", daemon=True)
        self.entries = entries
        self.block = block
        self.total = sum(os.path.getsize(path) for _, path in entries)
        self.done = 0
        self.digests = {}
        self.error = None
        self._stop_event = threading.Event()

    def run(self):
        try:
            buffer = bytearray(self.block)
            view = memoryview(buffer)
            for label, path in self.entries:
                digest = hashlib.sha256()
                with open(path, "rb", buffering=0) as f:
                    while not self._stop_event.is_set():
                        got = f.readinto(buffer)
                        if not got:
                            break
                        digest.update(view[:got])
                        self.done += got
                if self._stop_event.is_set():
                    return
                self.digests[label] = digest.hexdigest()
        except OSError as exc:
            self.error = exc

    def stop(self):
        self._stop_event.set()

    def percent(self):
        return 100.0 * self.done / self.total if self.total else 100.0


_ADD_VALUE = {
    "uint32": lambda writer, key, value: writer.add_uint32(key, int(value)),
    "float32": lambda writer, key, value: writer.add_float32(key, float(value)),
    "uint32_array": lambda writer, key, value: writer.add_key_value(
        key, [int(v) for v in value], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32),
}


def _add_metadata(writer, branches, recipe, bare_names, hash_labels):
    config = branches[0].config
    writer.add_name("Ideogram 4 DiT" + (f" ({branches[0].role})" if len(branches) == 1 else " (both CFG branches)"))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for field, kind in CONFIG_METADATA.items():
        _ADD_VALUE[kind](writer, metadata_key(field), getattr(config, field))
    writer.add_array(BRANCHES_KEY, [b.role for b in branches])
    if not bare_names:
        writer.add_array(BRANCH_PREFIXES_KEY, [BRANCH_PREFIXES[b.role] for b in branches])
    writer.add_string(f"{ARCH}.recipe_name", recipe.name)
    writer.add_string(f"{ARCH}.recipe", recipe.to_json())
    writer.add_string(f"{ARCH}.quant_tools_version", __version__)
    writer.add_array(f"{ARCH}.source_format", [f"{b.role}: {b.layout}; {b.naming}" for b in branches])
    writer.add_array(f"{ARCH}.source_sha256", [f"{label}:{_HASH_PLACEHOLDER}" for label in hash_labels])


def _patch_hashes(path, labels, digests):
    """Overwrite the fixed-width placeholders of ideogram4.source_sha256 with the real digests."""
    with open(path, "r+b") as f:
        head = f.read(1 << 20)
        for label in labels:
            text = f"{label}:{_HASH_PLACEHOLDER}".encode()
            # the gguf string's length prefix makes the match unique ("conditional/x" is inside "unconditional/x")
            needle = struct.pack("<Q", len(text)) + text
            at = head.find(needle)
            if at < 0:
                raise QuantToolError(f"internal error: hash placeholder for {label} not found in the header")
            f.seek(at + len(needle) - 64)
            f.write(digests[label].encode("ascii"))


def _write_tensor(fout, planned, threads):
    """Stream one tensor's bytes: row chunks read from the source, encoded, appended."""
    t, written = planned, 0
    rows = t.shape[0] if len(t.shape) > 1 else 1
    row_len = t.shape[-1]
    step = max(1, CHUNK_WEIGHTS // row_len)
    for start in range(0, rows, step):
        values = t.source.read(start, min(rows, start + step)) if len(t.shape) > 1 else t.source.read()
        values = values.reshape(-1, row_len)
        if not np.isfinite(values).all():
            raise QuantToolError(f"{t.out_name} holds inf or nan values in rows {start}..{start + len(values) - 1} "
                                 "of its source: the source file is damaged")
        if t.qtype.name == "F16" and values.size and np.abs(values).max() > _F16_MAX:
            raise QuantToolError(
                f"{t.out_name} has values beyond the float16 range (max |x| = {np.abs(values).max():g}); store it as "
                "BF16 or F32 with a recipe rule"
            )
        data = quantize(values, t.qtype, threads=threads)
        fout.write(memoryview(data).cast("B"))
        written += data.nbytes
        yield values.size
    if written != t.nbytes:
        raise QuantToolError(f"internal error: {t.out_name} wrote {written} bytes, planned {t.nbytes}")


def _pad(fout, alignment):
    extra = -fout.tell() % alignment
    if extra:
        fout.write(b"\0" * extra)


def build_gguf(branches, recipe, out_path, *, bare_names=False, threads=None, progress=True, overwrite=False,
               log=None):
    """Quantize `branches` with `recipe` into `out_path`. Returns a summary dict.

    Raises QuantToolError for an existing output (unless overwrite), too little disk space, disk full or bad
    data; KeyboardInterrupt passes through. In every failure case the partial file is removed.
    """
    log = log or (lambda line: print(line, file=sys.stderr))
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise QuantToolError(f"{out_path} exists; pass --force to replace it")
    if not out_path.parent.is_dir():
        raise QuantToolError(f"{out_path.parent}: output folder does not exist")
    planned = plan(branches, recipe, bare_names)
    total_bytes = sum(t.nbytes for t in planned)
    free = shutil.disk_usage(out_path.parent).free
    if free < total_bytes + (16 << 20):
        raise QuantToolError(
            f"not enough disk space in {out_path.parent}: the file needs {total_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free"
        )
    threads = default_threads() if threads is None else threads
    temp = out_path.with_name(out_path.name + ".partial")
    lock = _claim_partial(temp, log)
    entries = _source_files(branches)
    hasher = SourceHasher(entries)
    writer = None
    started = time.perf_counter()
    try:
        writer = gguf.GGUFWriter(temp, ARCH)
        _add_metadata(writer, branches, recipe, bare_names, [label for label, _ in entries])
        for t in planned:
            byte_shape = (t.numel // t.shape[-1], t.shape[-1] // t.qtype.block_size * t.qtype.type_size)
            if len(t.shape) == 1:
                byte_shape = byte_shape[1:]
            writer.add_tensor_info(t.out_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype.ggml_type)
        hasher.start()
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        _pad(fout, writer.data_alignment)

        from tqdm import tqdm

        total_weights = sum(t.numel for t in planned)
        bar = tqdm(total=total_weights, unit="w", unit_scale=True, file=sys.stderr, disable=not progress,
                   desc="quantize", dynamic_ncols=True, smoothing=0.05)
        with bar:
            for t in planned:
                for done in _write_tensor(fout, t, threads):
                    bar.set_postfix_str(f"{t.out_name} {t.qtype.name} | sha256 {hasher.percent():.0f}%", refresh=False)
                    bar.update(done)
                _pad(fout, writer.data_alignment)
            if hasher.is_alive():
                bar.set_postfix_str("waiting for the source sha256 ...")
            hasher.join()
        if hasher.error is not None:
            raise QuantToolError(f"cannot hash the sources: {hasher.error}")
        fout.flush()
        os.fsync(fout.fileno())
        writer.close()
        _patch_hashes(temp, [label for label, _ in entries], hasher.digests)
        os.replace(temp, out_path)
    except OSError as exc:
        _abandon(writer, hasher, temp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise QuantToolError(
                f"disk full while writing {temp} (the file needs {total_bytes / 1e9:.2f} GB); removed the partial "
                "file, free some space and run again"
            ) from None
        raise QuantToolError(f"cannot write {temp}: {exc}; removed the partial file") from None
    except BaseException:
        _abandon(writer, hasher, temp)
        raise
    finally:
        lock.close()
    seconds = time.perf_counter() - started
    counts, _, weights = type_histogram(planned)
    return {
        "path": str(out_path),
        "bytes": out_path.stat().st_size,
        "tensors": len(planned),
        "types": dict(counts),
        "seconds": seconds,
        "weights": sum(weights.values()),
        "sha256": dict(hasher.digests),
    }


def _claim_partial(temp, log):
    """Lock `temp` for this run and return the open handle (closed when the run ends). A stale partial file left
    by a killed run is reported and emptied; one another live run still holds is an error, not a stale file.

    The writer then writes into this same file (same inode, so the lock covers it) rather than a new one."""
    existed = temp.exists()
    try:
        handle = open(temp, "a+b")  # never truncates a file that another run may be writing
    except OSError as exc:
        raise QuantToolError(f"cannot write {temp}: {exc}") from None
    try:
        if not _try_lock(handle):
            raise QuantToolError(f"{temp} is being written by another quantize run right now; wait for it to finish "
                                 "or pick another --out")
        if existed:
            stale = handle.seek(0, os.SEEK_END)
            handle.truncate(0)
            log(f"found and removed a stale partial file {temp} ({stale / 1e9:.3f} GB, left by an interrupted run)")
    except BaseException:
        handle.close()
        raise
    return handle


def _try_lock(handle) -> bool:
    """An exclusive non-blocking advisory lock on an open file (flock; always granted on Windows)."""
    try:
        import fcntl
    except ImportError:  # Windows: its byte-range locks are mandatory and would block our own writer; no check
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _abandon(writer, hasher, temp):
    hasher.stop()
    if writer is not None:
        try:
            writer.close()
        except OSError:
            pass
    try:
        os.remove(temp)
    except FileNotFoundError:
        pass

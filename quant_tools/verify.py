"""`verify FILE.gguf --source ...`: decode every tensor and compare it with the source weights.

A tensor passes when
- its storage type is what the recipe (stored in the file, or --recipe) decides for the source tensor;
- gguf-py's `gguf.quants.dequantize` and our decoder give bit-identical float32 values;
- its relative RMSE against the source is below the sanity limit of its type (a wrong source, a swapped
  branch or corrupt bytes land far above it; measured values are in docs/quant_tools.md);
- with --exact, re-quantizing the source reproduces the stored bytes exactly.
The sha256 of the source files is compared with the one recorded at build time (--no-hash skips it).
"""

import hashlib
import sys

import gguf
import numpy as np

from .build import CHUNK_WEIGHTS, plan
from .errors import QuantToolError
from .gguf_file import GGUFFile
from .inspection import expect_ideogram4
from .layout import BRANCHES_KEY
from .quants import F32, dequantize, quantize
from .recipe import Recipe
from .sources import open_branches

# Relative RMSE above which a tensor cannot be a faithful encoding of its source (about 2x the worst value
# measured on Gaussian, Gaussian + outlier and Student-t(3) weights; see docs/quant_tools.md).
REL_RMSE_LIMIT = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.02, "Q6_K": 0.05, "Q5_K": 0.09,
                  "Q4_K": 0.18, "Q4_0": 0.3}


def _file_layout(gf):
    """(single_branch role or None, bare_names) from the file's metadata or tensor names."""
    roles = gf.metadata.get(BRANCHES_KEY)
    groups = gf.branches()
    bare = "" in groups
    if roles and len(roles) == 1:
        return roles[0], bare
    if bare:  # a single-branch file without our metadata: assume conditional unless told otherwise
        return "conditional", True
    return None, False


def _sha256(path):
    digest = hashlib.sha256()
    buffer = bytearray(16 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buffer):
            digest.update(view[:got])
    return digest.hexdigest()


def verify(path, source, source_uncond=None, recipe=None, branch=None, check_hash=True, exact=False, threads=None,
           progress=True, out=print):
    """Print the per-tensor table; returns True when every check passes."""
    gf = GGUFFile(path)
    expect_ideogram4(gf)
    if recipe is not None:
        rec = Recipe.load(recipe)
    elif isinstance(gf.metadata.get("ideogram4.recipe"), str):
        rec = Recipe.from_json(gf.metadata["ideogram4.recipe"])
    else:
        raise QuantToolError(f"{gf.path} records no recipe (not written by quant_tools); pass --recipe NAME|FILE")
    single, bare = _file_layout(gf)
    single = branch or single
    branches = open_branches(source, source_uncond, single_branch=single)
    failures = []
    try:
        for line in (l for b in branches for l in b.describe()):
            out(line)
        expected = {t.out_name: t for t in plan(branches, rec, bare_names=bare)}
        in_file = {t.name: t for t in gf.tensors}
        for name in expected:
            if name not in in_file:
                failures.append(f"{name}: missing from the file")
        for name in in_file:
            if name not in expected:
                failures.append(f"{name}: in the file but not in the source model")

        if check_hash:
            failures += _check_hashes(gf, branches, out)

        from tqdm import tqdm

        checked = [t for t in gf.tensors if t.name in expected]
        bar = tqdm(total=sum(t.numel for t in checked), unit="w", unit_scale=True, file=sys.stderr,
                   disable=not progress, desc="verify", dynamic_ncols=True)
        width = max((len(t.name) for t in checked), default=10)
        out(f"{'tensor':<{width}}  {'type':<5} {'want':<5} {'rel_rmse':>9}  {'limit':>7}  result")
        with bar:
            for t in checked:
                problems, rel = _check_tensor(gf, t, expected[t.name], exact, threads, bar)
                failures += [f"{t.name}: {p}" for p in problems]
                limit = REL_RMSE_LIMIT.get(t.qtype, 0.0)
                out(f"{t.name:<{width}}  {t.qtype:<5} {expected[t.name].qtype.name:<5} {rel:>9.2e}  {limit:>7.1e}  "
                    + ("ok" if not problems else "FAIL: " + "; ".join(problems)))
    finally:
        for b in branches:
            b.close()
    if failures:
        out(f"verify FAILED: {len(failures)} problem(s)")
        for line in failures[:40]:
            out(f"  {line}")
        return False
    out(f"verify ok: {len(gf.tensors)} tensors match the source and the recipe {rec.name}")
    return True


def _check_hashes(gf, branches, out):
    recorded = {}
    for entry in gf.metadata.get("ideogram4.source_sha256", []):
        label, _, digest = entry.rpartition(":")
        recorded[label] = digest
    if not recorded:
        out("sha256: the file records no source hashes; skipped")
        return []
    problems = []
    for b in branches:
        for f in b.files:
            label = f"{b.role}/{f.path.name}"
            if label not in recorded:
                problems.append(f"sha256: source {label} is not among the files this GGUF was built from")
                continue
            actual = _sha256(f.path)
            if actual != recorded[label]:
                problems.append(f"sha256: source {f.path} is {actual[:16]}..., the file was built from "
                                f"{recorded[label][:16]}... (a different download?)")
            else:
                out(f"sha256 ok: {label}")
    return problems


def _check_tensor(gf, t, planned, exact, threads, bar):
    problems = []
    if t.qtype != planned.qtype.name:
        problems.append(f"stored as {t.qtype}, the recipe says {planned.qtype.name} ({planned.rule})")
    if t.shape != tuple(planned.shape):
        problems.append(f"shape {t.shape}, source {tuple(planned.shape)}")
        return problems, float("nan")
    step = max(1, CHUNK_WEIGHTS // t.shape[-1])
    err2 = ref2 = 0.0
    decoder_differs = bytes_differ = False
    qtype = gguf.GGMLQuantizationType[t.qtype]
    for start in range(0, t.rows, step):
        stop = min(t.rows, start + step)
        raw = gf.read_rows(t, start, stop)
        ours = dequantize(raw, t.qtype)
        with np.errstate(all="ignore"):
            theirs = gguf.quants.dequantize(raw, qtype).reshape(ours.shape).astype(F32, copy=False)
        if not np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
            decoder_differs = True
        src = planned.source.read(start, stop) if len(t.shape) > 1 else planned.source.read()
        src = src.reshape(ours.shape)
        with np.errstate(all="ignore"):  # float32 differences, squares summed in float64 (cheap and precise enough)
            diff = np.subtract(ours, src, out=ours)
            err2 += float(np.square(diff, out=diff).sum(dtype=np.float64))
            ref2 += float(np.square(src).sum(dtype=np.float64))
        if exact and t.qtype == planned.qtype.name and not np.array_equal(quantize(src, t.qtype, threads), raw):
            bytes_differ = True
        bar.update(src.size)
    rel = (err2 / ref2) ** 0.5 if ref2 > 0 else (0.0 if err2 == 0 else float("inf"))
    if decoder_differs:
        problems.append("gguf-py and quant_tools decode it differently")
    if not rel <= REL_RMSE_LIMIT.get(t.qtype, 0.0):
        problems.append(f"relative RMSE {rel:.3g} is above the {t.qtype} limit {REL_RMSE_LIMIT.get(t.qtype, 0.0):g}")
    if bytes_differ:
        problems.append("re-quantizing the source gives different bytes")
    return problems, rel

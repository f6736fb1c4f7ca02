"""Per-kernel speed: every linear kernel fxquant runs, the Hadamard ops, against F.linear and a copy.

Usage: python bench/kernel_times.py [--shapes smollm2|large|all|KxN,...] [--m 1,16,128,2048]
                               [--formats w4,w4g64,w8] [--repeats 5] [--max-seconds-per-case 1.5]
                               [--device cpu|cuda] [--threads N] [--json out.json]

Per weight shape K x N (in x out) and token count M, one call y = x W^T of: float32 and bfloat16
`F.linear`; `torch._int_mm` (int8 x int8 -> int32, M padded to 17 below 17 since it needs M > 16;
dropped when one call at the smallest shape takes > 50 ms, as on CPUs without VNNI); on CUDA
`aten._weight_int4pack_mm` (tinygemm); and each kernel of `LINEAR_KERNELS` that `candidates()`
accepts on the device, for each `--formats` (w4: int4 symmetric per channel, w4g64: int4 asym
float-zero group 64, w8: int8 symmetric per channel; w4a4, w8a8: the same weights behind a
symmetric per-token activation quantizer, which the exact integer kernels take over and the others
run first), on a layer with random weights. Per K with a
Hadamard matrix, on [M, K]: `fxquant::hadamard` (the reference), `fxquant::fast_hadamard`, the fused
`fxquant::fast_hadamard_fake_quant` (4-bit symmetric) and a copy of x.

Time: median over `--repeats` of a run of calls lasting >= 20 ms, after one warm-up call; a case
whose warm-up call exceeds `--max-seconds-per-case` is skipped. GB/s = (bytes of the weight as the
kernel stores it + bytes of x and y) / time. copy GB/s = 2 x bytes / time of `dst.copy_(src)` on a
uint8 tensor of the row's weight bytes (read + write, M-independent), `cp` = GB/s / copy GB/s.
Speedups are against float32 and bfloat16 `F.linear` (Hadamard: the reference) of the same shape and
M in the same run, since the machines are noisy. On a CPU other work is using, multi-threaded calls
stall in scheduler steps (ms): `--threads 1` is then steadier (the run says when the load is high).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fxquant.hadamard import has_hadamard
from fxquant.quant.format import QuantFormat
from fxquant.quant.numerics import qparams, quantize, quantized_weight
from fxquant.runtime.kernels.linear import candidates
from fxquant.runtime.kernels.ops import FAST_HADAMARD, FAST_HADAMARD_FAKE_QUANT
from fxquant.runtime.hooks import ActivationFakeQuant
from fxquant.runtime.linear import QuantizedLinear  # (registers fxquant::hadamard too)
from fxquant.runtime.lowered import LinearPlan, LoweredLinear

SHAPES = {  # (K, N, what): in_features x out_features
    "smollm2": [(576, 576, "q/o"), (576, 192, "k/v"), (576, 1536, "gate/up"), (1536, 576, "down"),
                (576, 49152, "lm_head")],
    "large": [(4096, 4096, ""), (4096, 14336, ""), (14336, 4096, "")],
}
FORMATS = {"w4": QuantFormat(4, True, None, "int"), "w4g64": QuantFormat(4, False, 64, "float"),
           "w8": QuantFormat(8, True, None, "int"), "w4a4": QuantFormat(4, True, None, "int"),
           "w8a8": QuantFormat(8, True, None, "int")}
ACTIVATIONS = {"w4a4": ActivationFakeQuant(4, True), "w8a8": ActivationFakeQuant(8, True)}  # quantized inputs:
# the layer's kernel takes the per-token quantizer over (the exact integer kernels); others quantize first
INT_MM_MIN_M = 17  # torch._int_mm needs M > 16
INT_MM_MAX_PROBE_S = 0.05  # slower than this at the smallest shape: the scalar fallback, not worth timing
MIN_MEASURE_S = 0.02  # each measurement runs enough calls to last this long


def parse_shapes(spec: str) -> list[tuple[int, int, str]]:
    """`smollm2`, `large`, `all` or `KxN` items, comma-separated, as (K, N, what) in order, each K x N once."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item == "all":
            out += SHAPES["smollm2"] + SHAPES["large"]
        elif item in SHAPES:
            out += SHAPES[item]
        else:
            k, _, n = item.lower().partition("x")
            if not (k.isdigit() and n.isdigit()):
                raise SystemExit(f"--shapes: {item!r} is not one of {[*SHAPES, 'all']} or KxN")
            out.append((int(k), int(n), ""))
    named: dict[tuple[int, int], str] = {}
    for k, n, what in out:
        named[k, n] = named.get((k, n)) or what
    return [(k, n, what) for (k, n), what in named.items()]


def parse_formats(spec: str) -> dict[str, QuantFormat]:
    """Names of FORMATS, comma-separated."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise SystemExit(f"--formats: {unknown} not in {list(FORMATS)}")
    return {n: FORMATS[n] for n in names}


def packed_layer(n: int, k: int, fmt: QuantFormat, seed: int = 0) -> QuantizedLinear:
    """A packed [n, k] layer with random weights quantized in `fmt` (as tests/test_kernels.py::_layer)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    scale, zero = qparams(w, fmt)
    qw = quantized_weight(quantize(w, scale, zero, fmt).reshape(scale.shape[:-1] + (-1,)), scale, zero, fmt,
                          torch.float32)
    return QuantizedLinear.from_weight(type(qw)(qw.codes.reshape(n, k), qw.scale, qw.zero, fmt), None)


def nbytes(*tensors) -> int:
    """Bytes of the tensors' elements (None skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class Timer:
    """Times a no-argument callable on `device`: median seconds per call, or None when too slow."""

    device: torch.device
    repeats: int
    max_seconds: float

    def _run(self, fn: Callable, calls: int) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def __call__(self, fn: Callable) -> float | None:
        first = self._run(fn, 1)  # warm-up: lazy tables, kernel selection, compilation
        if first > self.max_seconds:
            return None
        probe = first if first >= MIN_MEASURE_S else self._run(fn, 1)
        calls = max(1, math.ceil(MIN_MEASURE_S / max(probe, 1e-7)))
        return statistics.median(self._run(fn, calls) / calls for _ in range(self.repeats))


@dataclass
class Cell:
    """One (row, M) measurement: seconds per call (None: not measured, `note` says why), bytes moved."""

    seconds: float | None
    bytes: int
    note: str = ""

    @property
    def gbps(self) -> float | None:
        return None if self.seconds is None else self.bytes / self.seconds / 1e9


@dataclass
class Row:
    """A kernel or baseline in one table: its weight bytes, the copy GB/s at that size, a Cell per M."""

    label: str
    weight_bytes: int | None
    copy_gbps: float | None = None
    cells: dict[int, Cell] = field(default_factory=dict)


@dataclass
class Bench:
    """What every case shares: the device, the timer, copy bandwidths by size, whether _int_mm runs."""

    device: torch.device
    timer: Timer
    copies: dict[int, float | None] = field(default_factory=dict)
    int_mm_skip: str | None = None

    def case(self, fn: Callable, moved: int) -> Cell:
        """Time `fn` (under inference mode); errors become a note, as does a skip."""
        try:
            with torch.inference_mode():
                seconds = self.timer(fn)
        except Exception as exc:  # a kernel that fails here is reported, not fatal to the run
            return Cell(None, moved, f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        return Cell(seconds, moved, "" if seconds is not None else "skipped: too slow")

    def copy_gbps(self, size: int) -> float | None:
        """The copy bandwidth (read + write) of `size` bytes, measured once per size."""
        if size not in self.copies:
            src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            self.copies[size] = self.case(lambda: dst.copy_(src), 2 * size).gbps
        return self.copies[size]

    def add(self, row: Row, m: int, fn: Callable, moved: int) -> None:
        row.cells[m] = self.case(fn, moved)
        if row.weight_bytes is not None and row.copy_gbps is None:
            row.copy_gbps = self.copy_gbps(row.weight_bytes)


def probe_int_mm(device: torch.device, k: int, n: int) -> str | None:
    """Why torch._int_mm is left out (None: it runs): an error, or one call at the smallest shape > 50 ms."""
    a = torch.randint(-128, 128, (INT_MM_MIN_M, k), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device).t()
    try:
        Timer(device, 1, math.inf)._run(lambda: torch._int_mm(a, b), 1)
        seconds = Timer(device, 1, math.inf)._run(lambda: torch._int_mm(a, b), 1)
    except RuntimeError as exc:
        return f"torch._int_mm fails here ({str(exc).splitlines()[0][:100]})"
    if seconds > INT_MM_MAX_PROBE_S:
        return (f"one call at {k}x{n}, M={INT_MM_MIN_M} took {seconds * 1e3:.0f} ms > "
                f"{INT_MM_MAX_PROBE_S * 1e3:.0f} ms (a slow reference loop: no VNNI int8 path on this CPU)")
    return None


def _int4pack_cuda(n: int, k: int, device: torch.device):
    """(call(x bf16), weight bytes) for aten._weight_int4pack_mm (CUDA tinygemm) on random codes."""
    group = next(g for g in (256, 128, 64, 32) if k % g == 0)
    tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device)
    weight = torch.ops.aten._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8), tiles)
    scale_zeros = torch.rand(k // group, n, 2, device=device).to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int4pack_mm(x, weight, group, scale_zeros)), nbytes(weight, scale_zeros)


def _kernel_weight_bytes(layer: LoweredLinear, name: str) -> int:
    """Bytes of what kernel `name` reads of the weight: its prepared buffers, or the portable codes."""
    keys = layer.kernel_buffers.get(name, ())
    if not keys:
        return nbytes(layer.codes, layer.scale, layer.zero, layer.bias)
    return nbytes(*(getattr(layer, f"{name}_{key}") for key in keys), layer.bias)


def linear_rows(bench: Bench, k: int, n: int, ms: list[int], formats: dict[str, QuantFormat]):
    """(rows, notes) of the table for weight shape K x N: baselines, then the fxquant kernels."""
    dev, gen = bench.device, torch.Generator().manual_seed(1)
    w32 = torch.randn(n, k, generator=gen).to(dev)
    w16 = w32.to(torch.bfloat16)
    xs = {m: torch.randn(m, k, generator=gen).to(dev) for m in ms}
    rows = {"fp32": Row("F.linear float32", nbytes(w32)), "bf16": Row("F.linear bfloat16", nbytes(w16))}
    notes = []
    for m, x in xs.items():
        y = nbytes(x) * n // k
        bench.add(rows["fp32"], m, lambda: F.linear(x, w32), nbytes(w32, x) + y)
        xb = x.to(torch.bfloat16)
        bench.add(rows["bf16"], m, lambda: F.linear(xb, w16), nbytes(w16, xb) + y // 2)
    if bench.int_mm_skip is None:
        w8 = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen).to(dev)
        row = rows["int_mm"] = Row(f"torch._int_mm int8 (M>={INT_MM_MIN_M})", nbytes(w8))
        for m in ms:
            a = torch.randint(-128, 128, (max(m, INT_MM_MIN_M), k), dtype=torch.int8, device=dev)
            bench.add(row, m, lambda: torch._int_mm(a, w8.t()), nbytes(w8, a) + a.shape[0] * n * 4)
    if dev.type == "cuda":
        try:
            call, size = _int4pack_cuda(n, k, dev)
        except Exception as exc:
            notes.append(f"aten._weight_int4pack_mm left out: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        else:
            row = rows["int4pack"] = Row("aten._weight_int4pack_mm", size)
            for m, x in xs.items():
                xb = x.to(torch.bfloat16)
                bench.add(row, m, lambda: call(xb), size + nbytes(xb) * (k + n) // k)
    for fname, fmt in formats.items():
        start = time.perf_counter()
        layer = packed_layer(n, k, fmt).to(dev)
        act = ACTIVATIONS.get(fname)
        usable, refused = candidates(LoweredLinear.lower(layer, LinearPlan("reference", "reference", 0), act), dev)
        lowered = {kernel.name: LoweredLinear.lower(layer, LinearPlan(kernel.name, kernel.name, 0, "bench"), act)
                   for kernel in usable}
        why_not = "; ".join(f"{kernel}: {why}" for kernel, why in refused.items())
        notes.append(f"{fname} = {fmt.describe()}: made and lowered in {time.perf_counter() - start:.1f} s"
                     + (f"; refused by {why_not}" if why_not else ""))
        for name, low in lowered.items():
            row = rows[f"{name}/{fname}"] = Row(f"{name} {fname}", _kernel_weight_bytes(low, name))
            for m, x in xs.items():
                bench.add(row, m, lambda: low(x), row.weight_bytes + nbytes(x) * (k + n) // k)
    return list(rows.values()), notes


def hadamard_rows(bench: Bench, k: int, ms: list[int]) -> list[Row]:
    """The rows of the Hadamard table for [M, K] float32 activations."""
    rows = [Row("fxquant::hadamard (reference)", None), Row("fxquant::fast_hadamard", None),
            Row("fxquant::fast_hadamard_fake_quant 4b sym", None), Row("copy x -> y", None)]
    calls = [torch.ops.fxquant.hadamard, FAST_HADAMARD, lambda x: FAST_HADAMARD_FAKE_QUANT(x, 4, True, 1.0), None]
    gen = torch.Generator().manual_seed(2)
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(bench.device)
        dst = torch.empty_like(x)
        for row, call in zip(rows, calls):
            fn = (lambda: dst.copy_(x)) if call is None else (lambda: call(x))
            bench.add(row, m, fn, 2 * nbytes(x))
    return rows


def _ratio(base: Cell | None, cell: Cell) -> str:
    if base is None or base.seconds is None or cell.seconds is None:
        return "-"
    return f"{base.seconds / cell.seconds:.2f}"


def print_table(title: str, rows: list[Row], ms: list[int], baselines: dict[str, Row], copy_row: Row | None = None):
    """One table: a line per row, per M its time (us), GB/s, fraction of copy bandwidth and speedups
    against each baseline (column name -> row); `copy_row` gives the per-M copy for rows without one."""
    group = "".join(f"{'us':>10s} {'GB/s':>6s} {'cp':>5s}" + "".join(f" {b:>6s}" for b in baselines) for _ in ms)
    width = len(group) // len(ms)
    print(f"\n{title}")
    print(f"{'':40s} {'w MiB':>7s} {'copy':>6s}" + "".join(f"{'M=' + str(m):>{width}s}" for m in ms))
    print(f"{'':40s} {'':>7s} {'GB/s':>6s}" + group)
    notes = []
    for row in rows:
        wmib = "-" if row.weight_bytes is None else f"{row.weight_bytes / 2 ** 20:.2f}"
        copy = "-" if row.copy_gbps is None else f"{row.copy_gbps:.1f}"
        line = f"{row.label:40s} {wmib:>7s} {copy:>6s}"
        for m in ms:
            cell = row.cells.get(m)
            if cell is None or cell.seconds is None:
                line += f"{'-':>{width}s}"
                if cell is not None and cell.note:
                    notes.append(f"{row.label} M={m}: {cell.note}")
                continue
            ref = row.copy_gbps if row.copy_gbps is not None else (copy_row.cells[m].gbps if copy_row else None)
            cp = "-" if not ref else f"{cell.gbps / ref:.2f}"
            line += f"{cell.seconds * 1e6:10.1f} {cell.gbps:6.1f} {cp:>5s}"
            line += "".join(f" {_ratio(base.cells.get(m), cell):>6s}" for base in baselines.values())
        print(line)
    for note in notes:
        print(f"  {note}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """The machine line's fields: processor, CPU capability, threads, torch, date (and GPU on CUDA)."""
    info = {"processor": platform.processor() or platform.machine(), "cpu": _cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _json_rows(table: str, rows: list[Row], extra: dict) -> list[dict]:
    return [{"table": table, **extra, "row": row.label, "m": m, "us": None if c.seconds is None else c.seconds * 1e6,
             "bytes": c.bytes, "gbps": c.gbps, "weight_bytes": row.weight_bytes, "copy_gbps": row.copy_gbps,
             "note": c.note} for row in rows for m, c in row.cells.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="all", help="smollm2, large, all, or KxN items, comma-separated")
    p.add_argument("--m", default="1,16,128,2048", help="token counts, comma-separated")
    p.add_argument("--formats", default=",".join(FORMATS), help=f"of {list(FORMATS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-seconds-per-case", type=float, default=1.5,
                   help="skip a case whose warm-up call takes longer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, formats = parse_shapes(args.shapes), parse_formats(args.formats)
    ms = [int(m) for m in args.m.split(",")]
    device = torch.device(args.device)
    bench = Bench(device, Timer(device, args.repeats, args.max_seconds_per_case))
    info = machine(device)
    print(f"machine: {info['processor']} ({info['cpu']}), cpu capability {info['cpu_capability']}, "
          f"{info['threads']} threads, torch {info['torch']}, {info['date']}"
          + (f", GPU {info['gpu']}" if "gpu" in info else ""), flush=True)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if device.type == "cpu" and load > 0.5 * cores and torch.get_num_threads() > 1:
        print(f"note: load average {load:.1f} on {cores} cores before the run: with other work on the cores, "
              f"multi-threaded calls wait on the scheduler (ms steps); --threads 1 is steadier")
    start, out = time.perf_counter(), []
    k0, n0, _ = min(shapes, key=lambda s: s[0] * s[1])
    bench.int_mm_skip = probe_int_mm(device, k0, n0)
    if bench.int_mm_skip:
        print(f"torch._int_mm skipped: {bench.int_mm_skip}")
    for k, n, what in shapes:
        rows, notes = linear_rows(bench, k, n, ms, formats)
        by_label = {r.label: r for r in rows}
        title = f"linear K={k} N={n}" + (f" ({what})" if what else "") + f", {device}"
        print_table(title, rows, ms, {"x fp32": by_label["F.linear float32"], "x bf16": by_label["F.linear bfloat16"]})
        for note in notes:
            print(f"  {note}")
        out += _json_rows(title, rows, {"k": k, "n": n})
        print(f"  [{time.perf_counter() - start:.0f} s so far]", flush=True)
    for k in dict.fromkeys(k for k, _, _ in shapes):
        if not has_hadamard(k):
            print(f"\nHadamard K={k}: no Hadamard matrix of that size, skipped")
            continue
        rows = hadamard_rows(bench, k, ms)
        title = f"Hadamard [M, {k}] float32, {device}"
        print_table(title, rows, ms, {"x ref": rows[0]}, copy_row=rows[-1])
        out += _json_rows(title, rows, {"k": k, "n": k})
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "int_mm_skipped": bench.int_mm_skip, "rows": out}, f,
                      indent=1)


if __name__ == "__main__":
    main()

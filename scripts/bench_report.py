#!/usr/bin/env python3
"""Writes docs/BENCHMARKS.md and docs/img/bench-throughput.svg from the raw
results that scripts/bench.sh leaves in .cache/bench/ (standard library only).

    bench_report.py --results .cache/bench --out docs/BENCHMARKS.md --svg docs/img/bench-throughput.svg
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

BATCHED = ("64x32", "16x512", "2x4096")  # the shapes the peer targets apply to
RUNTIMES = [("engine-noreroute", "kvembed (forward pass)"), ("engine-kv", "kvembed, re-routing (kv)"),
            ("llama", "llama.cpp"), ("torch", "PyTorch")]
COLORS = {"engine-noreroute": "#1f77b4", "engine-kv": "#17becf", "llama": "#d62728", "torch": "#ff7f0e"}
DASHES = ["", "6,3", "2,3", "8,3,2,3"]


def load(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def st(xs):
    xs = sorted(x for x in (xs or []) if x is not None)
    if not xs:
        return None
    return xs[0], statistics.median(xs), xs[-1]


def f(x, d=0):
    if x is None:
        return "—"
    return f"{x:,.{d}f}"


def rate3(work, secs):
    """min/median/max of a rate from run times: (work/max, work/median, work/min)."""
    s = st(secs)
    return None if not s else (work / s[2], work / s[1], work / s[0])


def mmm(t, d=0):
    return "—" if not t else f"{f(t[1], d)} ({f(t[0], d)}–{f(t[2], d)})"


def ratio(a, b):
    return a / b if a and b else None


def code(x, n=500):
    """Inline code for an error message (no backticks or newlines inside)."""
    return "`" + str(x).replace("`", "'").replace("\n", " ")[:n] + "`"


def spread(t):
    """Relative spread (max/min - 1) of a (min, median, max) triple."""
    return (t[2] / t[0] - 1) if t and t[0] else 0.0


def pct(xs):
    xs = [x for x in (xs or []) if x is not None]
    return f"{statistics.median(xs) * 100:.0f} %" if xs else "—"


def busy_note(*lists):
    """A warning for a target whose runs shared the machine with other work (median other load > 20 %)."""
    worst = 0.0
    for xs in lists:
        xs = [x for x in (xs or []) if x is not None]
        if xs:
            worst = max(worst, statistics.median(xs))
    return f" (other processes held {worst * 100:.0f} % of the CPU meanwhile: not conclusive)" if worst > 0.2 else ""


def met(ok):
    return "—" if ok is None else ("**met**" if ok else "**missed**")


def machine(threads):
    cpu, flags = "?", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "?":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    feats = [x for x in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f" {x}" in f" {flags} "]
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    virt = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Hypervisor vendor"):
                virt = f", virtual machine ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return [
        ("CPU", f"{cpu}{virt}"),
        ("cores available", str(os.cpu_count())),
        ("threads used by every runtime", str(threads)),
        ("SIMD", ", ".join(feats) or "?"),
        ("memory", mem),
        ("OS", platform.system()),
    ]


# ---------------------------------------------------------------------------
# SVG: tokens/s against the shape (ordered by sequence length), one panel per model


def goals(level, shape):
    """The peer targets of a shape: (runtime key, label, minimum speed ratio). At
    x86-64-v3 (the path of CPUs without AVX-512) those of the int8 work: 3x
    llama.cpp and 2x PyTorch at 64x32 and 16x512, 1.5x PyTorch at 2x4096."""
    if level == "native":
        return (("llama", "llama.cpp", 1.0), ("torch", "PyTorch", 2.0))
    if shape == "2x4096":
        return (("torch", "PyTorch", 1.5),)
    return (("llama", "llama.cpp", 3.0), ("torch", "PyTorch", 2.0))


def svg_plot(peers, path):
    models = list(peers["models"].items())
    shapes = [f"{b}x{n}" for b, n in peers["shapes"]]
    pw, ph, ml, mr, mt, mb = 420, 300, 70, 20, 40, 60
    W = pw * max(1, len(models))
    H = ph + 70
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>']
    import math

    for mi, (name, m) in enumerate(models):
        x0 = mi * pw
        series = {}
        for rk, _ in RUNTIMES:
            pts = []
            for si, key in enumerate(shapes):
                s = m["shapes"].get(key, {})
                b, n = s.get("batch"), s.get("tokens")
                r = s.get(rk, {})
                t = st(r.get("seconds"))
                if t and b:
                    pts.append((si, b * n / t[1]))
            if pts:
                series[rk] = pts
        vals = [v for pts in series.values() for _, v in pts]
        if not vals:
            continue
        lo = 10 ** math.floor(math.log10(min(vals)))
        hi = 10 ** math.ceil(math.log10(max(vals)))
        if hi <= lo:
            hi = lo * 10
        left, right, top, bottom = x0 + ml, x0 + pw - mr, mt, ph - mb + mt

        def X(i):
            return left + (right - left) * (i + 0.5) / len(shapes)

        def Y(v):
            return bottom - (bottom - top) * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

        out.append(f'<text x="{(left + right) / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">{m["file"]}</text>')
        out.append(f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#444"/>')
        d = lo
        while d <= hi * 1.0001:
            for k in (1, 2, 5):
                v = d * k
                if lo <= v <= hi:
                    y = Y(v)
                    out.append(f'<line x1="{left}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
                    out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
            d *= 10
        for i, key in enumerate(shapes):
            b, n = key.split("x")
            out.append(f'<text x="{X(i):.1f}" y="{bottom + 18}" text-anchor="middle">{b}×{n}</text>')
        out.append(f'<text x="{(left + right) / 2}" y="{bottom + 38}" text-anchor="middle">batch shape (texts × tokens), by sequence length</text>')
        out.append(f'<text transform="translate({x0 + 16},{(top + bottom) / 2}) rotate(-90)" text-anchor="middle">tokens/s (log scale, median)</text>')
        for ri, (rk, label) in enumerate(RUNTIMES):
            pts = series.get(rk)
            if not pts:
                continue
            c = COLORS[rk]
            dash = f' stroke-dasharray="{DASHES[ri]}"' if DASHES[ri] else ""
            poly = " ".join(f"{X(i):.1f},{Y(v):.1f}" for i, v in pts)
            out.append(f'<polyline points="{poly}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
            for i, v in pts:
                out.append(f'<circle cx="{X(i):.1f}" cy="{Y(v):.1f}" r="3.5" fill="{c}"/>')
    # legend: two columns, two rows
    for ri, (rk, label) in enumerate(RUNTIMES):
        c = COLORS[rk]
        dash = f' stroke-dasharray="{DASHES[ri]}"' if DASHES[ri] else ""
        lx = 20 + (ri % 2) * (W // 2)
        ly = H - 38 + (ri // 2) * 20
        out.append(f'<line x1="{lx}" x2="{lx + 28}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/>')
        out.append(f'<circle cx="{lx + 14}" cy="{ly}" r="3.5" fill="{c}"/>')
        out.append(f'<text x="{lx + 34}" y="{ly + 4}">{label}</text>')
    out.append("</svg>")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(out) + "\n")


# ---------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--svg", required=True)
    a = ap.parse_args()
    R = Path(a.results)
    run = load(R / "run.json") or {}
    peers = load(R / "peers.json")
    sql = load(R / "sql.json")
    threads = run.get("threads", "?")
    out_path = Path(a.out)
    svg_rel = os.path.relpath(a.svg, out_path.parent)
    L = []
    w = L.append
    cmd = run.get("command", "scripts/bench.sh")
    w("# Benchmarks")
    w("")
    w("<!-- Generated by scripts/bench.sh (scripts/bench_report.py); edits are overwritten. -->")
    w("")
    w("Reproduce (from the repository root; the first run also builds a Python venv")
    w("with llama.cpp and PyTorch, see the header of `scripts/bench.sh`):")
    w("")
    w("```sh")
    w(cmd)
    args = cmd.split(" ", 1)[1] if " " in cmd else ""
    w(f'# or: make bench{" ARGS=" + chr(34) + args + chr(34) if args else ""}')
    w("```")
    w("")
    wall = run.get("wall_s")
    w(f"Measured {run.get('started', '?')}" + (f", in {wall // 60} min {wall % 60} s of wall time" if wall else "") +
      f"; every figure is the median of {run.get('repeat', '?')} timed runs (SQL: {(sql or {}).get('repeat', '?')}) after a warm-up, with the range "
      "(min–max) in parentheses. Ratios compare medians measured side by side in the same run: a machine's "
      "absolute speed drifts, ratios hold better. Nothing here is a pass/fail test.")
    w("")
    w("## Machine")
    w("")
    w("| | |")
    w("| --- | --- |")
    for k, v in machine(threads):
        w(f"| {k} | {v} |")
    level = run.get("cpu_level", "native") if isinstance(run, dict) else "native"
    if level != "native":
        w(f"| CPU level | {level}: every runtime capped to AVX2 + FMA (engine `KVEMBED_CPU={level}`, "
          f"PyTorch `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`, llama.cpp compiled without AVX-512 and AVX-VNNI) |")
    ev = (R / "engine-version.txt").read_text().strip() if (R / "engine-version.txt").exists() else "?"
    matmuls = sorted({sh.get("engine-noreroute", {}).get("matmul") for m in (peers or {}).get("models", {}).values()
                      for sh in m.get("shapes", {}).values()} - {None})
    mm = {"amx-bf16": "matrix products on the AMX tiles in bf16 (f32 accumulation, f32 everywhere else)",
          "int8-avx512vnni": "matrix products in int8 with AVX512-VNNI (int8 weights, 7-bit activations per group of 128, f32 everywhere else)",
          "int8-avx2": "matrix products in int8 with AVX2 (int8 weights, 7-bit activations per group of 128, f32 everywhere else)",
          "f32": "matrix products in f32"}
    how = "; ".join(mm.get(x, x) for x in matmuls) or "matrix products: not recorded"
    w(f"| engine | `{ev}`, release build, CPU, {how} |")
    if peers:
        for name, m in peers["models"].items():
            for rt, pi in m.get("peers", {}).items():
                info = pi.get("info") or {}
                if rt == "llama" and info:
                    cm = (R / "llama-cmake-args.txt").read_text().strip() if (R / "llama-cmake-args.txt").exists() else "?"
                    w(f"| llama.cpp | llama-cpp-python {info.get('llama_cpp_python')} (its bundled llama.cpp), compiled here "
                      f"from source with `{cm}`; it reports `{info.get('system_info', '').replace('|', '/')}` |")
                if rt == "torch" and info:
                    w(f"| PyTorch | torch {info.get('torch')} (CPU capability {info.get('cpu_capability')}), "
                      f"transformers {info.get('transformers')}, {info.get('dtype')}, attention `{info.get('attn')}` |")
            break
    if sql and sql.get("server_version"):
        w(f"| PostgreSQL | {sql['server_version']} |")
    w("")

    # ---- gather the figures used by the summary
    targets = []
    notes = []
    for f_, what in (("setup-llama.err", "llama-cpp-python could not be installed"),
                     ("setup-torch.err", "the PyTorch packages could not be installed")):
        if (R / f_).exists():
            notes.append(f"{what}:\n\n```\n{(R / f_).read_text().strip()}\n```")

    peer_rows = {}
    foreign = []  # (what, share of the CPU other processes used)
    if peers:
        for name, m in peers["models"].items():
            start_err = {}
            for rt, pi in m.get("peers", {}).items():
                if pi.get("error"):
                    start_err[rt] = pi["error"]
                    notes.append(f"{m['file']}: the {dict(RUNTIMES)[rt]} peer could not run, so it has no figures: {code(pi['error'])}")
            for key, s in m["shapes"].items():
                if "error" in s:
                    notes.append(f"{m['file']} {key}: {code(s['error'])}")
                    continue
                work = s["batch"] * s["tokens"]
                row = {}
                for rk, _ in RUNTIMES:
                    r = s.get(rk) or {}
                    if r.get("error") and r["error"] != start_err.get(rk):
                        notes.append(f"{m['file']} {key} {dict(RUNTIMES)[rk]}: {code(r['error'])}")
                    row[rk] = st(r.get("seconds"))
                    for x in r.get("foreign_cpu") or []:
                        if x is not None:
                            foreign.append((f"{m['file']} {key} {dict(RUNTIMES)[rk]}", x))
                row["work"], row["batch"] = work, s["batch"]
                row["cos"] = s.get("cos_llama_torch")
                peer_rows[(name, key)] = row

    def med(row, rk):
        return row[rk][1] if row.get(rk) else None

    # ---- targets
    if peers:
        for name, m in peers["models"].items():
            for key in BATCHED:
                row = peer_rows.get((name, key))
                if not row:
                    continue
                e = med(row, "engine-noreroute")
                sh = m["shapes"].get(key, {})
                for rk, lab, goal in goals(level, key):
                    p = med(row, rk)
                    r = ratio(p, e)  # time ratio = speed ratio
                    note = busy_note((sh.get("engine-noreroute") or {}).get("foreign_cpu"), (sh.get(rk) or {}).get("foreign_cpu"))
                    targets.append((f"{m['file']} {key}: engine ≥ {goal:g}× {lab} tokens/s",
                                    (f"{f(r, 2)}×" if r else "not measured") + note, None if r is None else r >= goal))
            ovs, noisy = [], []
            for key in [f"{b}x{n}" for b, n in peers["shapes"]]:
                row = peer_rows.get((name, key))
                if row and med(row, "engine-kv") and med(row, "engine-noreroute"):
                    ovs.append((key, (med(row, "engine-kv") / med(row, "engine-noreroute") - 1) * 100))
                    if max(spread(row["engine-kv"]), spread(row["engine-noreroute"])) > 0.10:
                        noisy.append(key)
            if ovs:
                worst = max(ovs, key=lambda x: x[1])
                targets.append((f"{m['file']}: re-routing overhead ≤ 5 % (every shape)",
                                f"worst {worst[1]:+.1f} % ({worst[0]})" +
                                (f"; runs spread > 10 % at {', '.join(noisy)}: not conclusive there" if noisy else ""),
                                worst[1] <= 5.0))
    sql_ratio = {}
    eng_tps = None
    if sql:
        eng = sql.get("engine") or {}
        eng_tps = eng.get("texts_per_s_median")
        n = sql.get("rows")
        paths = sql.get("paths") or {}
        for k in ("select_kv_embed", "kv_embed_batch_all", "kv_embed_batch_256", "insert_generated", "kv_backfill"):
            if k in paths and paths[k].get("seconds"):
                sql_ratio[k] = ratio(rate3(n, paths[k]["seconds"])[1], eng_tps)
        for k, lab in (("kv_embed_batch_all", "kv_embed_batch (one call, all rows)"),
                       ("kv_embed_batch_256", "kv_embed_batch (256 rows a call)"),
                       ("insert_generated", "INSERT into a generated column"),
                       ("kv_backfill", "kv_backfill")):
            if k in sql_ratio:
                r = sql_ratio[k]
                note = busy_note(paths[k].get("foreign_cpu"), [eng.get("foreign_cpu")])
                targets.append((f"SQL bulk path {lab} ≥ 90 % of the engine", f"{f(r * 100 if r else None)} %{note}",
                                None if r is None else r >= 0.9))
        pg = sql.get("pgbench") or {}
        t1 = st([x["tps"] for x in (pg.get("1") or {}).get("runs", [])])
        t8 = st([x["tps"] for x in (pg.get("8") or {}).get("runs", [])])
        if t1 and t8:
            r = t8[1] / t1[1]
            loads = [x.get("loadavg_after") for c in ("1", "8") for x in (pg.get(c) or {}).get("runs", [])]
            loads = [x for x in loads if x is not None]
            note = ""
            if loads and max(loads) > 1.5 * (sql.get("threads") or os.cpu_count() or 1):
                note = f" (load average up to {max(loads):.1f} on {os.cpu_count()} cores meanwhile: not conclusive)"
            targets.append(("8 sessions ≥ 1.5× one session (texts/s)", f"{r:.2f}×{note}", r >= 1.5))
        mem = sql.get("memory") or {}
        if mem.get("growth_rss"):
            g = mem["growth_rss"]["max"] / 1e6
            gu = mem["growth_uss"]["max"] / 1e6
            targets.append((f"≤ 10 MB RSS growth per session ({mem.get('sessions')} sessions)",
                            f"max {g:.1f} MB RSS ({gu:.1f} MB private)", g <= 10.0))

    if sql:
        for k, v in (sql.get("paths") or {}).items():
            if isinstance(v, dict):
                for x in v.get("foreign_cpu") or []:
                    foreign.append((f"SQL {k}", x))
        if (sql.get("engine") or {}).get("foreign_cpu") is not None:
            foreign.append(("SQL engine reference", sql["engine"]["foreign_cpu"]))
    if foreign:
        worst = max(foreign, key=lambda x: x[1])
        avg = sum(x for _, x in foreign) / len(foreign)
        w(f"**Machine load.** During the timed runs, other processes on the machine used on average {avg * 100:.0f} % "
          f"of its CPU capacity (at most {worst[1] * 100:.0f} %, during {worst[0]}), measured from `/proc/stat` minus "
          "the CPU time of the measured processes." +
          (" Figures taken while the machine was this busy are slower and noisier than on an idle machine; runtimes "
           "that spin-wait at thread barriers (llama.cpp's and PyTorch's OpenMP) suffer more from a busy machine "
           "than the engine's work-stealing pool, which skews the ratios in the engine's favour." if worst[1] > 0.1 else ""))
        w("")
        if worst[1] > 0.1:
            notes.append(f"the machine was not idle: other processes used up to {worst[1] * 100:.0f} % of the CPU "
                         f"during the timed runs (average {avg * 100:.0f} %); re-run on an idle machine for clean figures")

    w("## Targets")
    w("")
    if targets:
        w("| target | measured (medians) | |")
        w("| --- | --- | --- |")
        for t, v, ok in targets:
            w(f"| {t} | {v} | {met(ok)} |")
    else:
        w("No target could be evaluated in this run (see below).")
    w("")
    w(f"![tokens/s against the batch shape]({svg_rel})")
    w("")

    # ---- 1. engine vs peers
    w("## 1. The engine against llama.cpp and PyTorch")
    w("")
    if not peers:
        w("Not measured in this run (`--no-peers-part` or `--sql-only`).")
        w("")
    else:
        w("The same GGUF file and the **same token ids** for every runtime: `kvembed-lab bench --dump-tokens` writes the")
        w("synthetic sequences of a shape (ordinary English words, no prompt, no BOS) and the peers read them.")
        w("Each timed run is one batched forward pass over all the texts of the shape; the same amount of work for all:")
        w("")
        w("- **kvembed**: `kvembed-lab bench --method kv-no-reroute --threads T` times the decoder's forward pass (the")
        w("  padded batch in one pass, `--batch-tokens` 8192). Matmul weights converted at load, the default: to bf16")
        w("  tiles for the AMX matrix units where the CPU has AMX-BF16, else to int8 with a scale per column and group")
        w("  of 128 inputs, multiplied with AVX512-VNNI or AVX2 integer instructions (the machine table says which ran).")
        w("  `kvembed-lab bench` runs no prompt and no pooling, unlike `kvembed-lab embed`; the pooling is negligible next to the pass.")
        w("- **llama.cpp**: llama-cpp-python's low-level API, one context per shape with `embeddings = true`,")
        w("  mean pooling, one sequence per text in one `llama_decode` (`n_batch = n_ubatch =` all tokens),")
        w("  a per-sequence (non-unified) KV cache, `n_threads = n_threads_batch = T`, weights as stored in the GGUF")
        w("  (quantised kernels, repacked for this CPU). Timed: clearing the KV cache, the decode, reading the pooled vectors.")
        w("- **PyTorch**: `AutoModel.from_pretrained(dir, gguf_file=...)` (transformers dequantises the GGUF to")
        w("  float32), `sdpa` attention, `torch.set_num_threads(T)`, `inference_mode`, `use_cache=False`, the batch as")
        w("  one tensor with its attention mask, mean pooling of the last hidden state.")
        w("")
        owp = peers.get("omp_wait_policy", "default")
        w(f"Both peers run their threads in OpenMP pools, here with `OMP_WAIT_POLICY={owp.upper()}`" if owp != "default"
          else "Both peers run their threads in OpenMP pools, with the library defaults (`OMP_WAIT_POLICY` unset)")
        w("(`scripts/bench.sh --omp-wait-policy`): with spinning waits, a peer loses up to 10× whenever anything else")
        w("runs on the machine, because a spinning thread holds the core its partner needs.")
        w("")
        w("Per shape the runtimes run one after the other (engine, engine with re-routing, llama.cpp, PyTorch), each")
        w("with a warm-up first. Tokens/s = texts × tokens / seconds; ratios > 1 mean kvembed is faster.")
        w("The ratio columns compare kvembed's forward pass without re-routing (the same computation as the peers');")
        w("section 2 gives the cost of re-routing on top.")
        w("")
        for name, m in peers["models"].items():
            w(f"### {m['file']}")
            w("")
            w("| shape | kvembed tokens/s | llama.cpp tokens/s | PyTorch tokens/s | kvembed texts/s | × llama.cpp | × PyTorch | cos(llama.cpp, PyTorch) | other load (kvembed / llama.cpp / PyTorch) |")
            w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
            for b, n_ in peers["shapes"]:
                key = f"{b}x{n_}"
                row = peer_rows.get((name, key))
                if not row:
                    w(f"| {b}×{n_} | error | | | | | | |")
                    continue
                work = row["work"]

                def rt(rk, unit_work=work):
                    t = row.get(rk)
                    return (unit_work / t[2], unit_work / t[1], unit_work / t[0]) if t else None

                e = med(row, "engine-noreroute")
                w(f"| {b}×{n_} | {mmm(rt('engine-noreroute'))} | {mmm(rt('llama'))} | {mmm(rt('torch'))} | "
                  f"{mmm(rt('engine-noreroute', b), 1)} | {f(ratio(med(row, 'llama'), e), 2)} | "
                  f"{f(ratio(med(row, 'torch'), e), 2)} | {f(row['cos'], 4)} | "
                  f"{' / '.join(pct((m['shapes'][key].get(rk) or {}).get('foreign_cpu')) for rk in ('engine-noreroute', 'llama', 'torch'))} |")
            w("")
        w("cos(llama.cpp, PyTorch) is the cosine between llama.cpp's and PyTorch's pooled vector of the first text: both")
        w("really ran the model on these ids (llama.cpp multiplies with the quantised blocks, PyTorch with their")
        w("float32 dequantisation, so it is close to, not exactly, 1). *Other load*: the share of the machine's CPU")
        w("that other processes used while that runtime was timed (median over its runs; see Machine load).")
        w("")

        # ---- 2. re-routing
        w("## 2. Re-routing overhead")
        w("")
        w("`kvembed-lab bench --method kv` (KV-Embedding: at three layers, the last token's key and value prepended as an")
        w("extra attention column) against `--method kv-no-reroute`, the same forward pass without re-routing, on the")
        if peers.get("engine_vs"):
            w("same ids, in one process, their runs alternating (`kvembed-lab bench --method kv-no-reroute --vs kv`).")
        else:
            w("same ids, one after the other (separate `kvembed-lab bench` runs).")
        w("")
        w("| model | shape | no re-routing tokens/s | re-routing tokens/s | overhead |")
        w("| --- | --- | --- | --- | --- |")
        for name, m in peers["models"].items():
            for b, n_ in peers["shapes"]:
                row = peer_rows.get((name, f"{b}x{n_}"))
                if not row or not row.get("engine-kv") or not row.get("engine-noreroute"):
                    continue
                work = row["work"]
                a_ = row["engine-noreroute"]
                k_ = row["engine-kv"]
                ov = (k_[1] / a_[1] - 1) * 100
                w(f"| {m['file']} | {b}×{n_} | {mmm((work / a_[2], work / a_[1], work / a_[0]))} | "
                  f"{mmm((work / k_[2], work / k_[1], work / k_[0]))} | {ov:+.1f} % |")
        w("")

    # ---- 3. SQL
    w("## 3. SQL paths")
    w("")
    if not sql:
        w("Not measured in this run (`--no-sql`).")
        w("")
    else:
        n = sql["rows"]
        st_ = sql.get("status") or {}
        eng = sql.get("engine") or {}
        w(f"A scratch cluster (PostgreSQL {sql.get('server_version', '?')}, `fsync = off`) with kvembed; its engine runs")
        w(f"`{st_.get('model_id', '?')}`, {st_.get('threads', '?')} threads, `batch_tokens` {st_.get('batch_tokens', '?')},")
        w(f"method `{st_.get('method') or 'kv'}`, `max_tokens` {st_.get('max_tokens', '?')}. The table `src` holds {n:,} synthetic")
        w("sentences (1 to 4 clauses, generated from a fixed seed). Every path embeds those texts as documents (with")
        w("the method's prompt) and is compared with the engine alone on the same texts:")
        w(f"`kvembed-lab bench --file texts.txt` (prompt, tokenizer, forward passes packed by `batch_tokens`, pooling;")
        w(f"model loaded) gives **{f(eng_tps, 1)} texts/s** (median; range {mmm(rate3(eng.get('texts', 1), eng.get('seconds')), 1)};"
          f" {f(eng.get('tokens'))} tokens with prompts; " +
          ("the binary the cluster's engine runs)." if eng.get("binary") == "server" else
           "the freshly built binary: the cluster's installed engine binary has no `bench --file`, reinstall with "
           "`scripts/install-ext.sh` to compare the very same binary)."))
        w("")
        paths = sql.get("paths") or {}
        if paths.get("error"):
            w(f"The SQL paths failed: {code(paths['error'])}")
            w("")
        else:
            labels = {"select_kv_embed": "`SELECT kv_embed(body)` per row", "kv_embed_batch_all": "`kv_embed_batch` (all rows in one call)",
                      "kv_embed_batch_256": "`kv_embed_batch` (256 rows a call)",
                      "insert_generated": "`INSERT` into a table with a generated `kv_embed` column",
                      "kv_backfill": "`CALL kv_backfill(...)` (batches of 256, a COMMIT each)"}
            w(f"| path ({n:,} rows) | seconds | texts/s | vs engine | other load |")
            w("| --- | --- | --- | --- | --- |")
            for k, lab in labels.items():
                p = paths.get(k)
                if not p:
                    continue
                s = st(p["seconds"])
                w(f"| {lab} | {mmm(s, 2)} | {mmm(rate3(n, p['seconds']), 1)} | {f(sql_ratio.get(k) and sql_ratio[k] * 100)} % | "
                  f"{pct(p.get('foreign_cpu'))} |")
            w("")
            ef = eng.get("foreign_cpu")
            w(f"*Other load*: the share of the machine's CPU used by processes other than the engine, the backend and")
            w(f"this script while the statement ran (median over the runs); {pct([ef])} during the engine reference. A path")
            w("timed while other work took part of the CPU looks slower against the engine than it is.")
            w("")
            w("The statements:")
            w("")
            w("```sql")
            for k in labels:
                if paths.get(k):
                    w(paths[k]["sql"] + ";")
            w("```")
            w("")
        pg = sql.get("pgbench") or {}
        w("### Concurrent sessions (pgbench)")
        w("")
        if pg.get("error"):
            w(f"pgbench failed: {code(pg['error'])}")
        elif pg:
            w("Each transaction embeds one random row of `src` (`SELECT vector_dims(kv_embed(body)) FROM src WHERE id = :id`);")
            secs = next((v.get("seconds") for v in pg.values() if isinstance(v, dict) and v.get("seconds")), "?")
            w(f"`pgbench -n -c C -j C -T {secs}`, latencies from its per-transaction log.")
            w("")
            w("| sessions | texts/s | p50 latency ms | p99 latency ms | vs 1 session | vs engine |")
            w("| --- | --- | --- | --- | --- | --- |")
            base = st([x["tps"] for x in (pg.get("1") or {}).get("runs", [])])
            for c, v in sorted(((int(k), v) for k, v in pg.items() if k.isdigit())):
                if v.get("error"):
                    w(f"| {c} | failed: {code(v['error'], 200)} | | | | |")
                    continue
                runs = v.get("runs", [])
                t = st([x["tps"] for x in runs])
                p50 = st([x["p50_ms"] for x in runs])
                p99 = st([x["p99_ms"] for x in runs])
                w(f"| {c} | {mmm(t, 1)} | {mmm(p50, 1)} | {mmm(p99, 1)} | {f(ratio(t and t[1], base and base[1]), 2)}× | "
                  f"{f(ratio(t and t[1], eng_tps) and ratio(t[1], eng_tps) * 100)} % |")
        else:
            w("Not measured in this run.")
        w("")

        # ---- 4. memory
        w("## 4. Memory")
        w("")
        mem = sql.get("memory") or {}
        if mem.get("error"):
            w(f"The memory check failed: {code(mem['error'])}")
        elif mem:
            eb, ea = mem.get("engine_before", {}), mem.get("engine_after", {})
            mb = lambda x: f"{x / 1e6:,.1f}" if isinstance(x, (int, float)) else "—"
            w(f"The model lives in one process, the engine (`kvembed serve`, found through `kv_status().engine_pid`;"
              f" `kvembed serve` processes of this cluster during the check: {mem.get('serve_processes')}).")
            w(f"{mem.get('sessions')} sessions connect (`SELECT 1`), then each calls `kv_embed` once; the backends' memory")
            w("is read from `/proc/PID/smaps_rollup` before and after. RSS counts shared pages a backend touches (shared")
            w("buffers, the mapped libraries); private = pages no other process maps (USS).")
            w("")
            w("| process | RSS MB | private MB | anonymous MB | peak RSS MB |")
            w("| --- | --- | --- | --- | --- |")
            w(f"| engine, before the sessions | {mb(eb.get('rss'))} | {mb(eb.get('uss'))} | {mb(eb.get('anon'))} | {mb(eb.get('hwm'))} |")
            w(f"| engine, after {mem.get('sessions')} sessions embedded | {mb(ea.get('rss'))} | {mb(ea.get('uss'))} | {mb(ea.get('anon'))} | {mb(ea.get('hwm'))} |")
            w("")
            w(f"Growth of one backend from its first `kv_embed` (over {mem.get('sessions')} sessions):")
            w("")
            w("| per session | min MB | median MB | max MB |")
            w("| --- | --- | --- | --- |")
            for k, lab in (("rss", "RSS"), ("uss", "private (USS)"), ("anon", "anonymous"), ("pss", "PSS")):
                g = mem.get(f"growth_{k}")
                if g:
                    w(f"| {lab} | {mb(g['min'])} | {mb(g['median'])} | {mb(g['max'])} |")
            if eb.get("rss") and ea.get("rss"):
                w("")
                w(f"The engine grew by {mb(ea['rss'] - eb['rss'])} MB RSS while the sessions embedded; the engine pid "
                  f"{'did not change' if mem.get('engine_pid_unchanged') else 'CHANGED (the engine restarted)'}.")
        else:
            w("Not measured in this run.")
        w("")

        # ---- 5. calibration
        w("## 5. Calibration")
        w("")
        cal = sql.get("calibration") or {}
        if cal.get("error"):
            w(f"The calibration check failed: {code(cal['error'])}")
        elif cal:
            s = st(cal.get("seconds"))
            w(f"`SELECT * FROM kv_select_layers('src', 'body', {cal['rows']}, store => false)`: {mmm(s, 2)} s "
              f"for {cal['rows']:,} rows ({mmm(rate3(cal['rows'], cal.get('seconds')), 1)} texts/s; compression prompt, every layer's final-token state, TwoNN per layer).")
            if cal.get("cli_seconds"):
                w(f"The command-line tool on the same texts, `kvembed-lab select-layers --file ... --sample {cal['rows']}`, "
                  f"model load included: {mmm(st(cal['cli_seconds']), 2)} s.")
        else:
            w("Not measured in this run.")
        w("")

    if notes:
        w("## Problems in this run")
        w("")
        for x in notes:
            w(f"- {x}")
        w("")
    hand = Path(__file__).resolve().parent.parent / "docs" / "bench-notes.md"
    if hand.exists():
        w(hand.read_text().rstrip())
        w("")
    text = "\n".join(L) + "\n"
    # Paths are shown relative to the repository (model ids carry resolved paths).
    text = text.replace(str(Path(__file__).resolve().parent.parent) + "/", "")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
    if peers:
        svg_plot(peers, a.svg)
    print(f"bench_report: wrote {out_path}" + (f" and {a.svg}" if peers else ""))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""SQL paths, concurrency, memory and calibration (parts 3-5 of scripts/bench.sh).

Runs against a running cluster with kvembed installed, found through the
libpq environment (PGHOST, PGPORT, PGUSER) that scripts/env.sh sets; tools
(psql, pgbench) from $PG_BINDIR. Every figure is relative to the engine's own
throughput on the same texts: `kvembed-lab bench --file` (prompt, tokenizer,
forward passes, pooling; model already loaded), with the same method,
max_tokens, batch_tokens and threads as the cluster's engine.

    bench_sql.py --kvembed BIN --model GGUF --threads T --rows 2000 --repeat 3 \
                 --workdir DIR --out sql.json

Nothing here is a test: figures are reported, never asserted.
"""
import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

DB = "kvembed_bench"


def log(msg):
    print(f"[bench-sql] {msg}", flush=True)


# ---------------------------------------------------------------------------
# texts: deterministic, sentence-like, of mixed lengths (about 15-60 tokens)

SUBJECTS = ["the database", "a query planner", "the new index", "our search service", "a vector column",
            "the backup job", "this table", "the replication slot", "a background worker", "the cache",
            "the storage engine", "an old laptop", "the city council", "a young chef", "the river",
            "my neighbour", "the football team", "a small bakery", "the museum", "the train to Lyon"]
VERBS = ["stores", "returns", "ignores", "rebuilds", "compresses", "describes", "scans", "sorts",
         "reports", "loses", "delivers", "repairs", "measures", "announces", "protects", "closes"]
OBJECTS = ["millions of rows", "the nearest neighbours", "a long list of documents", "every sentence",
           "fresh bread before dawn", "the final score", "old paintings", "thousands of passengers",
           "slow queries", "the embeddings", "a cold winter", "the annual budget", "noisy sensor data",
           "a forgotten password", "three new recipes", "the results of the election"]
TAILS = ["after the upgrade", "without any downtime", "every night at midnight", "in under a second",
         "because the disk was full", "while the users sleep", "for the first time since March",
         "according to the documentation", "despite the heavy rain", "as the manual suggests",
         "with surprising accuracy", "on a single core", "before the deadline", "near the old harbour"]


def make_texts(n, seed=20240611):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        parts = []
        for _ in range(rnd.choice([1, 1, 2, 2, 3, 4])):
            s = f"{rnd.choice(SUBJECTS)} {rnd.choice(VERBS)} {rnd.choice(OBJECTS)} {rnd.choice(TAILS)}"
            parts.append(s[0].upper() + s[1:] + ".")
        out.append(f"{' '.join(parts)} (note {i})")
    return out


# ---------------------------------------------------------------------------
# helpers


def stats(xs):
    xs = sorted(xs)
    return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1], "n": len(xs)} if xs else None


def ensure_cluster():
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["bash", str(root / "scripts" / "pg.sh"), "start"], check=False)


def connect(dbname=DB, autocommit=True):
    try:
        return psycopg.connect(dbname=dbname, autocommit=autocommit)
    except psycopg.OperationalError:
        log("connection failed; (re)starting the cluster and retrying once")
        ensure_cluster()
        time.sleep(2)
        return psycopg.connect(dbname=dbname, autocommit=autocommit)


def with_retry(fn):
    """Run fn(conn) on a fresh connection; on a connection error, start the cluster and retry once."""
    for attempt in (1, 2):
        try:
            with connect() as c:
                return fn(c)
        except (psycopg.OperationalError, psycopg.InterfaceError) as e:
            if attempt == 2:
                raise
            log(f"connection error ({e}); (re)starting the cluster and retrying once")
            ensure_cluster()
            time.sleep(2)


def proc_mem(pid):
    """RSS, anonymous RSS, PSS and USS (private pages) of a process, in bytes."""
    m = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            k, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) >= 2 and parts[1] == "kB":
                m[k.strip()] = int(parts[0]) * 1024
        st = {}
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) >= 2 and parts[1] == "kB":
                st[k.strip()] = int(parts[0]) * 1024
    except OSError as e:
        return {"error": str(e)}
    return {
        "rss": m.get("Rss"), "pss": m.get("Pss"),
        "uss": (m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)),
        "anon": st.get("RssAnon"), "file": st.get("RssFile"), "shmem": st.get("RssShmem"),
        "hwm": st.get("VmHWM"),
    }


def machine_cpu_s():
    try:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(v) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def proc_cpu_s(pid):
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


ENGINE_PID = [None]
FOREIGN = []  # share of the machine used by other processes during each timed statement


def timed(c, sql, params=None):
    """Run one statement; also note how much CPU other processes (not the engine, this backend or us) took."""
    bpid = c.info.backend_pid
    pids = [p for p in (ENGINE_PID[0], bpid) if p]
    a0, own0 = machine_cpu_s(), sum(proc_cpu_s(p) for p in pids) + time.process_time()
    t0 = time.perf_counter()
    c.execute(sql, params)
    dt = time.perf_counter() - t0
    a1, own1 = machine_cpu_s(), sum(proc_cpu_s(p) for p in pids) + time.process_time()
    if a0 is not None and a1 is not None and dt > 0:
        FOREIGN.append(max(0.0, (a1 - a0 - (own1 - own0)) / (dt * (os.cpu_count() or 1))))
    return dt


# ---------------------------------------------------------------------------


def setup(args, texts):
    with connect("postgres") as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB}")
        c.execute(f"CREATE DATABASE {DB}")
    with connect() as c:
        c.execute("SET client_min_messages = warning")
        c.execute("CREATE EXTENSION kvembed CASCADE")
        c.execute("CREATE TABLE src (id int PRIMARY KEY, body text NOT NULL)")
        with c.cursor() as cur:
            with cur.copy("COPY src (id, body) FROM STDIN") as cp:
                for i, t in enumerate(texts, 1):
                    cp.write_row((i, t))
        c.execute("ANALYZE src")
        t0 = time.perf_counter()
        c.execute("SELECT vector_dims(kv_embed('warm up'))")
        dim = c.execute("SELECT vector_dims(kv_embed('warm up again'))").fetchone()[0]
        st = c.execute("SELECT * FROM kv_status()")
        cols = [d.name for d in st.description]
        status = dict(zip(cols, st.fetchone()))
        ENGINE_PID[0] = status.get("engine_pid")
        log(f"engine ready ({time.perf_counter() - t0:.1f}s): {status['model_id']}, threads {status['threads']}, "
            f"batch_tokens {status['batch_tokens']}, method {status['method'] or 'kv'}, max_tokens {status['max_tokens']}")
        c.execute(f"CREATE TABLE gen (id int, body text, embedding vector({dim}) GENERATED ALWAYS AS (kv_embed(body)) STORED)")
        c.execute(f"CREATE TABLE bf (id int, body text, embedding vector({dim}))")
    status = {k: (str(v) if not isinstance(v, (int, float, str, type(None), bool)) else v) for k, v in status.items()}
    return dim, status


def engine_reference(args, texts_file):
    """The engine alone on the same texts (same binary as the cluster's engine when it supports --file)."""
    for binary in [args.server_kvembed, args.kvembed]:
        if not binary:
            continue
        cmd = [binary, "bench", "--json", "--file", str(texts_file), "-m", args.model,
               "--threads", str(args.threads), "--repeat", str(args.repeat)]
        a0, t0, ru0 = machine_cpu_s(), time.perf_counter(), os.times()
        p = subprocess.run(cmd, capture_output=True, text=True)
        ru1, wall = os.times(), time.perf_counter() - t0
        if p.returncode == 0:
            r = json.loads(p.stdout.strip().splitlines()[-1])
            r["binary"] = "server" if binary == args.server_kvembed else "cli"
            own = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
            a1 = machine_cpu_s()
            if a0 is not None and a1 is not None:
                r["foreign_cpu"] = max(0.0, (a1 - a0 - own) / (wall * (os.cpu_count() or 1)))
            return r
        log(f"{binary} bench --file failed: {p.stderr.strip()[:300]}")
    return {"error": "kvembed bench --file failed with every binary"}


def sql_paths(args, n):
    res = {}

    def measure(name, prep, sql):
        secs = []
        for i in range(args.repeat):
            def one(c):
                c.execute("SET client_min_messages = warning")
                for p in prep:
                    c.execute(p)
                return timed(c, sql)
            secs.append(with_retry(one))
            log(f"{name}: run {i + 1}/{args.repeat}: {secs[-1]:.2f}s ({n / secs[-1]:.1f} texts/s)")
        res[name] = {"sql": sql, "seconds": secs, "foreign_cpu": FOREIGN[-len(secs):]}

    measure("select_kv_embed", [], "SELECT sum(vector_dims(kv_embed(body))) FROM src")
    measure("kv_embed_batch_all", [], "SELECT cardinality(kv_embed_batch(array_agg(body ORDER BY id))) FROM src")
    measure("kv_embed_batch_256", [],
            "SELECT sum(cardinality(v)) FROM (SELECT kv_embed_batch(array_agg(body ORDER BY id)) AS v "
            "FROM src GROUP BY (id - 1) / 256) s")
    measure("insert_generated", ["TRUNCATE gen"], "INSERT INTO gen (id, body) SELECT id, body FROM src")
    measure("kv_backfill", ["TRUNCATE bf", "INSERT INTO bf (id, body) SELECT id, body FROM src"],
            "CALL kv_backfill('bf', 'body', 'embedding')")
    # sanity: every row got a vector
    def check(c):
        return (c.execute("SELECT count(*) FROM gen WHERE embedding IS NOT NULL").fetchone()[0],
                c.execute("SELECT count(*) FROM bf WHERE embedding IS NOT NULL").fetchone()[0])
    g, b = with_retry(check)
    res["_rows_embedded"] = {"insert_generated": g, "kv_backfill": b}
    return res


def pgbench(args, work, n):
    script = work / "kv_embed.sql"
    script.write_text(f"\\set id random(1, {n})\nSELECT vector_dims(kv_embed(body)) FROM src WHERE id = :id;\n")
    bindir = os.environ.get("PG_BINDIR", "")
    exe = os.path.join(bindir, "pgbench") if bindir else "pgbench"
    res = {}
    for clients in args.sessions:
        runs = []
        for r in range(args.repeat):
            ldir = work / f"pgbench-c{clients}-r{r}"
            ldir.mkdir(exist_ok=True)
            for f in ldir.iterdir():
                f.unlink()
            cmd = [exe, "-n", "-f", str(script), "-c", str(clients), "-j", str(clients), "-T", str(args.pgbench_seconds),
                   "-l", f"--log-prefix={ldir}/log", DB]
            for attempt in (1, 2):
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode == 0:
                    break
                log(f"pgbench failed ({p.stderr.strip()[:300]})" + ("; retrying once" if attempt == 1 else ""))
                ensure_cluster()
            if p.returncode != 0:
                res[str(clients)] = {"error": p.stderr.strip()[-1000:]}
                break
            load = os.getloadavg()[0]
            m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", p.stdout)
            tps = float(m.group(1)) if m else None
            lat = []
            for f in ldir.iterdir():
                for line in f.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 3:
                        lat.append(int(parts[2]) / 1000.0)  # µs -> ms
            lat.sort()
            q = lambda p_: lat[min(len(lat) - 1, int(p_ * len(lat)))] if lat else None
            runs.append({"tps": tps, "transactions": len(lat), "p50_ms": q(0.50), "p99_ms": q(0.99),
                         "mean_ms": sum(lat) / len(lat) if lat else None, "loadavg_after": load})
            log(f"pgbench -c {clients}: run {r + 1}/{args.repeat}: {tps} texts/s, p50 {q(0.5)} ms, p99 {q(0.99)} ms")
        res[str(clients)] = res.get(str(clients)) or {"runs": runs, "seconds": args.pgbench_seconds}
    return res


def memory(args):
    def engine_pid():
        return with_retry(lambda c: c.execute("SELECT engine_pid FROM kv_status()").fetchone()[0])

    pid = engine_pid()
    res = {"engine_pid_found_by": "kv_status().engine_pid", "sessions": args.mem_sessions}
    res["engine_before"] = proc_mem(pid)
    conns, before, after = [], [], []
    try:
        for i in range(args.mem_sessions):
            c = connect()
            c.execute("SELECT 1")
            bpid = c.execute("SELECT pg_backend_pid()").fetchone()[0]
            conns.append((c, bpid))
            before.append(proc_mem(bpid))
        for i, (c, bpid) in enumerate(conns):
            c.execute("SELECT vector_dims(kv_embed(%s))", (f"session {i} embeds one sentence about databases",))
        time.sleep(0.5)
        for c, bpid in conns:
            after.append(proc_mem(bpid))
        res["engine_after"] = proc_mem(engine_pid())
        res["engine_pid_unchanged"] = engine_pid() == pid
        # How many processes of this cluster hold the model? Count the `kvembed serve`
        # processes whose socket is in this cluster's data directory.
        pgdata = os.environ.get("PGDATA", "").encode()
        holders = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    cmd = (d / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if len(cmd) > 1 and cmd[0].endswith(b"kvembed") and cmd[1] == b"serve" \
                        and (not pgdata or any(a.startswith(pgdata + b"/") for a in cmd)):
                    holders.append(int(d.name))
        res["serve_processes"] = len(holders)
    finally:
        for c, _ in conns:
            c.close()
    per = []
    for b, a in zip(before, after):
        per.append({k: (a.get(k) or 0) - (b.get(k) or 0) for k in ("rss", "pss", "uss", "anon")})
    res["backend_before"] = before
    res["backend_after"] = after
    res["backend_growth"] = per
    for k in ("rss", "pss", "uss", "anon"):
        res[f"growth_{k}"] = stats([p[k] for p in per])
    return res


def calibration(args, texts_file, n):
    rows = min(args.calib_rows, n)
    secs = []
    reps = max(1, min(args.repeat, 2))
    for i in range(reps):
        def one(c):
            c.execute("SET client_min_messages = warning")
            return timed(c, "SELECT count(*) FROM kv_select_layers('src', 'body', %s, store => false)", (rows,))
        secs.append(with_retry(one))
        log(f"kv_select_layers on {rows} rows: run {i + 1}/{reps}: {secs[-1]:.2f}s")
    # the same selection by the command-line tool on the same texts (wall time, model load included)
    cli = []
    sub = Path(texts_file).with_name("calib.txt")
    sub.write_text("\n".join(Path(texts_file).read_text().splitlines()[:rows]) + "\n")
    for i in range(reps):
        t0 = time.perf_counter()
        p = subprocess.run([args.kvembed, "select-layers", "-m", args.model, "--threads", str(args.threads),
                            "--file", str(sub), "--sample", str(rows)], capture_output=True, text=True)
        if p.returncode != 0:
            cli = None
            log(f"kvembed select-layers failed: {p.stderr.strip()[:300]}")
            break
        cli.append(time.perf_counter() - t0)
    return {"rows": rows, "seconds": secs, "cli_seconds": cli}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kvembed", required=True, help="the engine CLI built from this checkout")
    ap.add_argument("--server-kvembed", default="", help="the binary the cluster's engine runs")
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sessions", default="1,4,8")
    ap.add_argument("--pgbench-seconds", type=int, default=20)
    ap.add_argument("--mem-sessions", type=int, default=16)
    ap.add_argument("--calib-rows", type=int, default=1000)
    ap.add_argument("--parts", default="paths,pgbench,memory,calibration")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.sessions = [int(s) for s in args.sessions.split(",") if s]
    parts = set(args.parts.split(","))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)

    texts = make_texts(args.rows)
    texts_file = work / "texts.txt"
    texts_file.write_text("\n".join(texts) + "\n")
    res = {"rows": args.rows, "repeat": args.repeat, "threads": args.threads,
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}

    def save():
        out.write_text(json.dumps(res, indent=1))

    log(f"setting up database {DB} with {args.rows} texts")
    dim, status = setup(args, texts)
    res["dim"], res["status"] = dim, status
    res["server_version"] = with_retry(lambda c: c.execute("SHOW server_version").fetchone()[0])
    log("engine reference: kvembed bench --file on the same texts")
    res["engine"] = engine_reference(args, texts_file)
    if "texts_per_s_median" in res["engine"]:
        log(f"engine: {res['engine']['texts_per_s_median']:.1f} texts/s ({res['engine']['tokens']} tokens incl. prompts)")
    save()
    res["loadavg_start"] = os.getloadavg()[0]
    for part, fn in [("paths", lambda: sql_paths(args, args.rows)),
                     ("pgbench", lambda: pgbench(args, work, args.rows)),
                     ("memory", lambda: memory(args)),
                     ("calibration", lambda: calibration(args, texts_file, args.rows))]:
        if part not in parts:
            continue
        log(f"--- {part}")
        try:
            res[part] = fn()
        except Exception as e:  # report, never fake
            import traceback
            res[part] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            log(f"{part} FAILED: {e}")
        save()
    res["status_after"] = with_retry(lambda c: dict(zip(
        ["requests_served", "texts_served", "tokens_served", "engine_restarts", "last_exit"],
        c.execute("SELECT requests_served, texts_served, tokens_served, engine_restarts, last_exit FROM kv_status()").fetchone())))
    res["foreign_cpu"] = FOREIGN
    res["loadavg_end"] = os.getloadavg()[0]
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    save()
    log(f"wrote {out}")


if __name__ == "__main__":
    main()

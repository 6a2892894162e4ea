#!/usr/bin/env python3
"""Engine vs peers on identical token ids (part 1 and 2 of scripts/bench.sh).

Two modes:

  bench_peers.py worker --runtime llama|torch --model GGUF --threads T
      A long-lived peer process. It loads the model once, then reads one JSON
      command per line on stdin and answers one JSON line on stdout:
        {"ids": FILE, "warmup": 1, "repeat": R}  ->  {"seconds": [...], "emb0": [...]}
      FILE is what `kvembed-lab bench --dump-tokens` wrote. Every run embeds all
      the sequences of FILE in one batch: a forward pass and mean pooling,
      exactly the token ids the engine's `bench` times (no prompt, no BOS).

  bench_peers.py run --kvembed BIN --model NAME=GGUF ... --out results.json
      For each model and shape, one runtime after the other so that machine
      noise hits every runtime alike: the engine without and with re-routing
      (`kvembed-lab bench --method kv-no-reroute --vs kv`: both in one process,
      their runs alternating), llama.cpp, PyTorch.
      Writes every timing to the results file (read by bench_report.py).

Nothing here is a test: figures are reported, never asserted.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path


# ---------------------------------------------------------------------------
# how busy the machine is: CPU seconds used by every process (from /proc/stat)


def machine_cpu_s():
    try:
        with open("/proc/stat") as fh:
            parts = fh.readline().split()[1:]
        v = [int(x) for x in parts]
        busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # minus idle and iowait
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def foreign_share(all0, all1, self_s, wall):
    """Share of the machine's CPU capacity used by other processes during a run."""
    if all0 is None or all1 is None or not wall:
        return None
    return max(0.0, (all1 - all0 - self_s) / (wall * (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------
# workers


class LlamaRunner:
    """llama.cpp (llama-cpp-python's low-level API) in embedding mode, mean pooling."""

    def __init__(self, model, threads):
        import llama_cpp as L

        self.L = L
        self.threads = threads
        L.llama_backend_init()
        L.llama_log_set(_LLAMA_LOG_CB, None)
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(model.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model}")
        self.n_embd = L.llama_model_n_embd(self.model)
        self.ctx = None
        self.shape = None
        self.kv_unified = os.environ.get("KVEMBED_BENCH_LLAMA_KV_UNIFIED", "0") == "1"
        self.info = {
            "llama_cpp_python": getattr(L, "__version__", "?"),
            "system_info": L.llama_print_system_info().decode(errors="replace").strip(),
            "kv_unified": self.kv_unified,
            "flash_attn_type": int(getattr(L.llama_context_default_params(), "flash_attn_type", -99)),
        }

    def _context(self, b, n):
        L = self.L
        if self.shape == (b, n):
            return
        if self.ctx:
            L.llama_free(self.ctx)
            self.ctx = None
        cp = L.llama_context_default_params()
        total = b * n
        # One sequence per text. Without a unified KV cache every sequence has
        # its own cells (n_ctx / n_seq_max each), so attention is per text and
        # no masked cross-text work is done.
        cp.n_ctx = total
        cp.n_batch = total
        cp.n_ubatch = total
        cp.n_seq_max = b
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.embeddings = True
        cp.pooling_type = L.LLAMA_POOLING_TYPE_MEAN
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = self.kv_unified
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {b}x{n}")
        self.batch = L.llama_batch_init(total, 0, 1)
        self.shape = (b, n)

    def run(self, seqs):
        L = self.L
        b, n = len(seqs), len(seqs[0])
        self._context(b, n)
        batch = self.batch
        k = 0
        for s, ids in enumerate(seqs):
            for p, t in enumerate(ids):
                batch.token[k] = t
                batch.pos[k] = p
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = s
                batch.logits[k] = True
                k += 1
        batch.n_tokens = k
        t0 = time.perf_counter()
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        rc = L.llama_decode(self.ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        embs = []
        for s in range(b):
            p = L.llama_get_embeddings_seq(self.ctx, s)
            embs.append(p[: self.n_embd] if s == 0 else None)
        dt = time.perf_counter() - t0
        return dt, list(embs[0])


def _make_llama_log_cb():
    try:
        import llama_cpp as L

        @L.llama_log_callback
        def cb(level, text, user_data):
            if level >= 4:  # GGML_LOG_LEVEL_ERROR
                sys.stderr.write(text.decode(errors="replace"))

        return cb
    except Exception:
        return None


_LLAMA_LOG_CB = None


class TorchRunner:
    """PyTorch + transformers on the CPU, the same GGUF dequantised to float32."""

    def __init__(self, model, threads):
        import torch
        import transformers
        from transformers import AutoModel

        self.torch = torch
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        p = Path(model)
        kw = dict(gguf_file=p.name, attn_implementation="sdpa")
        try:
            self.model = AutoModel.from_pretrained(str(p.parent), dtype=torch.float32, **kw)
        except TypeError:
            self.model = AutoModel.from_pretrained(str(p.parent), torch_dtype=torch.float32, **kw)
        self.model.eval()
        self.info = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attn": getattr(self.model.config, "_attn_implementation", "?"),
            "dtype": str(next(self.model.parameters()).dtype),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        }

    def run(self, seqs):
        torch = self.torch
        ids = torch.tensor(seqs, dtype=torch.long)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            h = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            emb = (h * m).sum(1) / m.sum(1)
        dt = time.perf_counter() - t0
        return dt, emb[0].tolist()


def worker(args):
    global _LLAMA_LOG_CB
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries print; keep the protocol channel clean
    try:
        if args.runtime == "llama":
            _LLAMA_LOG_CB = _make_llama_log_cb()
            r = LlamaRunner(args.model, args.threads)
        else:
            r = TorchRunner(args.model, args.threads)
        out.write(json.dumps({"ready": True, "info": r.info}) + "\n")
        out.flush()
    except Exception as e:
        out.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}) + "\n")
        out.flush()
        return 1
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            seqs = json.loads(Path(cmd["ids"]).read_text())["ids"]
            for _ in range(cmd.get("warmup", 1)):
                r.run(seqs)
            secs, emb0 = [], None
            a0, p0, w0 = machine_cpu_s(), time.process_time(), time.perf_counter()
            for _ in range(cmd.get("repeat", 1)):
                dt, emb0 = r.run(seqs)
                secs.append(dt)
            fs = foreign_share(a0, machine_cpu_s(), time.process_time() - p0, time.perf_counter() - w0)
            reply = {"seconds": secs, "emb0": emb0, "foreign_cpu": fs}
        except Exception as e:
            reply = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


# ---------------------------------------------------------------------------
# orchestration


class Peer:
    def __init__(self, runtime, model, threads, log, omp_wait_policy):
        self.runtime = runtime
        self.error = None
        self.info = {}
        env = dict(os.environ)
        for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[v] = str(threads)
        env["OPENBLAS_NUM_THREADS"] = "1"  # numpy's BLAS is not part of either forward pass
        if omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
        self.log = open(log, "a")
        self.p = subprocess.Popen(
            [sys.executable, __file__, "worker", "--runtime", runtime, "--model", model, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        hello = self._read()
        if not hello.get("ready"):
            self.error = hello.get("error", "the worker exited without a reply")
            self.close()
        else:
            self.info = hello.get("info", {})

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait()
            return {"error": f"worker exited with status {rc} (see the log {self.log.name})"}
        return json.loads(line)

    def run(self, ids_file, warmup, repeat):
        if self.error:
            return {"error": self.error}
        self.p.stdin.write(json.dumps({"ids": str(ids_file), "warmup": warmup, "repeat": repeat}) + "\n")
        self.p.stdin.flush()
        r = self._read()
        if "error" in r and self.p.poll() is not None:
            self.error = r["error"]
        return r

    def close(self):
        try:
            if self.p.poll() is None:
                self.p.stdin.close()
                self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
            self.p.wait()


def engine_run(kvembed, model, method, b, n, threads, repeat, vs=None):
    """`kvembed-lab bench` (warm-up included); with `vs`, both methods in one process, runs alternating."""
    cmd = [kvembed, "bench", "--json", "-m", model, "--threads", str(threads), "--method", method,
           "--batch", str(b), "--tokens", str(n), "--repeat", str(repeat)] + (["--vs", vs] if vs else [])
    t0 = time.perf_counter()
    a0 = machine_cpu_s()
    ru0 = os.times()
    p = subprocess.run(cmd, capture_output=True, text=True)
    ru1 = os.times()
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-2000:] or f"exit {p.returncode}", "cmd": cmd}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    own = (ru1.children_user - ru0.children_user) + (ru1.children_system - ru0.children_system)
    wall = time.perf_counter() - t0
    return {"seconds": r["seconds"], "vs_seconds": r.get("vs_seconds"), "wall": wall, "matmul": r.get("matmul"),
            "foreign_cpu": foreign_share(a0, machine_cpu_s(), own, wall)}


def cosine(a, b):
    if not a or not b or len(a) != len(b):
        return None
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else None


def run(args):
    out_path = Path(args.out)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    runtimes = [r for r in args.peers.split(",") if r]
    res = {"threads": args.threads, "repeat": args.repeat, "shapes": [list(s) for s in shapes],
           "omp_wait_policy": args.omp_wait_policy, "engine_vs": True,
           "models": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for spec in args.model:
        name, path = spec.split("=", 1)
        mres = {"path": path, "file": Path(path).name, "shapes": {}, "peers": {}}
        res["models"][name] = mres
        print(f"[bench] {name}: starting peers {runtimes}", flush=True)
        peers = {}
        for rt in runtimes:
            t0 = time.time()
            peers[rt] = Peer(rt, path, args.threads, work / f"{name}-{rt}.log", args.omp_wait_policy)
            mres["peers"][rt] = {"info": peers[rt].info, "error": peers[rt].error, "load_s": time.time() - t0}
            if peers[rt].error:
                print(f"[bench]   {rt}: FAILED: {peers[rt].error}", flush=True)
            else:
                print(f"[bench]   {rt}: ready in {time.time() - t0:.1f}s {peers[rt].info}", flush=True)
        for b, n in shapes:
            key = f"{b}x{n}"
            ids_file = work / f"{name}-{key}.json"
            p = subprocess.run([args.kvembed, "bench", "-m", path, "--batch", str(b), "--tokens", str(n),
                                "--dump-tokens", str(ids_file)], capture_output=True, text=True)
            if p.returncode != 0:
                mres["shapes"][key] = {"error": p.stderr.strip()}
                print(f"[bench] {name} {key}: dump-tokens failed: {p.stderr.strip()}", flush=True)
                continue
            sres = {"batch": b, "tokens": n, "loadavg": os.getloadavg()[0]}
            # Interleave: each round runs every runtime once, in a rotating order.
            # The engine's two methods run in one process, their runs alternating
            # (`kvembed-lab bench --method kv-no-reroute --vs kv`).
            order = ["engine"] + runtimes
            rounds = args.rounds
            per_round = max(1, args.repeat // rounds)
            for rd in range(rounds):
                for who in order[rd % len(order):] + order[: rd % len(order)]:
                    if who == "engine":
                        r = engine_run(args.kvembed, path, "kv-no-reroute", b, n, args.threads, per_round, vs="kv")
                        results = [("engine-noreroute", r)]
                        if "error" not in r:
                            results.append(("engine-kv", dict(r, seconds=r.get("vs_seconds") or [])))
                        else:
                            results.append(("engine-kv", r))
                    else:
                        results = [(who, peers[who].run(ids_file, 1 if rd == 0 else 0, per_round))]
                    for slot_name, r in results:
                        slot = sres.setdefault(slot_name, {"seconds": []})
                        if "error" in r:
                            slot["error"] = r["error"]
                        else:
                            slot["seconds"].extend(r["seconds"])
                            slot.setdefault("foreign_cpu", []).append(r.get("foreign_cpu"))
                            if r.get("matmul"):
                                slot["matmul"] = r["matmul"]
                            if r.get("emb0"):
                                slot["emb0_head"] = r["emb0"][:4]
                                slot["_emb0"] = r["emb0"]
                        med = statistics.median(slot["seconds"]) if slot["seconds"] else None
                        msg = f"{b * n / med:,.0f} tok/s" if med else f"ERROR {slot.get('error', '')[:200]}"
                        print(f"[bench] {name} {key} round {rd + 1}/{rounds} {slot_name}: {msg}", flush=True)
            if "llama" in sres and "torch" in sres:
                sres["cos_llama_torch"] = cosine(sres["llama"].get("_emb0"), sres["torch"].get("_emb0"))
            for v in sres.values():
                if isinstance(v, dict):
                    v.pop("_emb0", None)
            mres["shapes"][key] = sres
            out_path.write_text(json.dumps(res, indent=1))
        for pr in peers.values():
            pr.close()
    res["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    out_path.write_text(json.dumps(res, indent=1))
    print(f"[bench] wrote {out_path}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--runtime", choices=["llama", "torch"], required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--threads", type=int, required=True)
    r = sub.add_parser("run")
    r.add_argument("--kvembed", required=True)
    r.add_argument("--model", action="append", required=True, help="NAME=PATH.gguf")
    r.add_argument("--shapes", default="1x32,64x32,16x512,2x4096")
    r.add_argument("--peers", default="llama,torch")
    r.add_argument("--threads", type=int, required=True)
    r.add_argument("--repeat", type=int, default=3, help="timed runs per runtime and shape")
    r.add_argument("--rounds", type=int, default=1, help="interleaving rounds (repeat is split over them)")
    r.add_argument("--omp-wait-policy", choices=["passive", "active", "default"], default="passive",
                   help="OMP_WAIT_POLICY of the peers (llama.cpp and PyTorch use OpenMP thread pools)")
    r.add_argument("--workdir", required=True)
    r.add_argument("--out", required=True)
    a = ap.parse_args()
    sys.exit(worker(a) if a.mode == "worker" else run(a))


if __name__ == "__main__":
    main()

"""Phase 1 of the GPU check: the joint step, ekd_jax against the PyTorch reference, img/s per case.

A case is (pair, batch size, dtype); its contenders are ekd_jax's step (``--worker jax_serve``, i.e.
compare_cpu.py's ``--serve_jax``: ekd_jax.bench's StepTimer on configs/cifar.py:cifar100,<pair>, method and
adapter ekd) and torch_step.py's JointStep per ``--torch_variants`` (``torch`` = NCHW, ``torch_cl`` =
channels_last). The processes of ``--bench_parallel`` cases start at once (their compiles overlap), then
each case is timed alone: the torch contenders warm up (cudnn.benchmark), then every contender runs
chunks of about ``--chunk_seconds`` in turn, for ``--rounds`` rounds whose order rotates (as compare_cpu.py).
One results.jsonl record per case (phase bench): each contender's median step_ms and img_s, its chunks,
compile / build seconds, XLA's FLOPs (achieved_tflops) and ekd_jax's speed over each PyTorch variant's.
"""

from __future__ import annotations

import statistics
import sys
import time

from gpu.common import ENTRY, Proc, Results, left, log, worker_env


def _bench_cases(args) -> list[tuple[str, int, str]]:
    pairs, bss, dts = args.pairs.split(","), [int(b) for b in args.batch_sizes.split(",")], args.dtypes.split(",")
    # Priority: the smallest batch first (both pairs and dtypes), then the larger.
    return [(pair, bs, dt) for bs in bss for dt in dts for pair in pairs]


def _start_case(args, case, env, logs) -> list[tuple[str, Proc]]:
    """The contenders' processes of one case, as (name, Proc): 'ekd_jax', 'torch', 'torch_cl'."""
    pair, bs, dt = case
    tag = f"{pair}_b{bs}_{dt}"
    procs = []
    if not args.no_jax_bench:
        cmd = [sys.executable, str(ENTRY), "--worker", "jax_serve", "--",
               "--serve_jax", "--pairs", pair, "--batch_sizes", str(bs),
               "--method", "ekd", "--adapter", "ekd", "--patches=", f"--override=dtype={dt}"]
        procs.append(("ekd_jax", Proc(f"jax {tag}", cmd, env, logs / f"bench_jax_{tag}.log")))
    for variant in filter(None, args.torch_variants.split(",")):
        cmd = [args.torch_python, str(ENTRY), "--worker", "torch", "--pair", pair,
               "--batch_size", str(bs), "--dtype", dt, "--threads", str(args.torch_threads)]
        if variant == "cl":
            cmd.append("--channels_last")
        if args.platform == "cpu":
            cmd.append("--cpu")
        name = "torch" if variant == "nchw" else f"torch_{variant}"
        procs.append((name, Proc(f"{name} {tag}", cmd, env, logs / f"bench_{name}_{tag}.log")))
    return procs


def _wait_ready(started: dict, ready_by: float) -> dict:
    """Reads each process's 'ready' line until all are ready or ``ready_by``. Returns, per case, the
    seconds per step of its first JAX steps (key 'ekd_jax') and each contender's '<name>_extra'
    (compile or build seconds, FLOPs per step, device), which its record carries."""
    first: dict[tuple, dict] = {c: {} for c in started}
    pending = [(c, name, p) for c, procs in started.items() for name, p in procs]
    while pending and time.time() < ready_by:
        still = []
        time.sleep(0.2)
        for c, name, p in pending:
            line = p.read(timeout=0.01)
            if line and line.startswith("ready"):
                parts = line.split(maxsplit=4)
                if name == "ekd_jax":  # compare_cpu.py: 'ready FIRST_S COMPILE_S FLOPS XLA_FLAGS'
                    first[c][name] = float(parts[1])
                    first[c][name + "_extra"] = {
                        "compile_s": float(parts[2]), "ready_s": round(time.time() - p.t_start, 1),
                        "gflops_per_step": float(parts[3]) / 1e9 if len(parts) > 3 and float(parts[3]) else None}
                else:  # workers.torch_server: 'ready BUILD_S DEVICE'
                    first[c][name + "_extra"] = {"build_s": float(parts[1]), "device": parts[2] if len(parts) > 2 else ""}
            elif p.alive() or line:
                still.append((c, name, p))
        pending = still
    n = sum(len(procs) for procs in started.values())
    log(f"bench: ready ({n - len(pending)} processes), {len(pending)} not ready")
    return first


def _warm_up(procs: list[tuple[str, Proc]], first: dict, deadline: float) -> list[tuple[str, Proc]]:
    """The contenders of one case that are ready to be timed; the torch ones warm up first (their
    seconds per step after it go into ``first``)."""
    ok = []
    for name, p in procs:
        if time.time() > deadline:
            break
        if name == "ekd_jax" and name not in first:
            continue
        if name.startswith("torch"):
            if name + "_extra" not in first or not p.send("warm 5"):
                continue
            line = p.read(timeout=min(120.0, max(5.0, left(deadline))))
            if not line or not line.startswith("ok"):
                p.kill()  # still busy (or dead): its answers would come out of step
                continue
            first[name] = float(line.split()[1])
        ok.append((name, p))
    return ok


def _time_case(args, case, procs, first: dict, deadline: float) -> dict:
    """Chunks of about --chunk_seconds from each contender in turn, --rounds rounds; the case's record."""
    pair, bs, dt = case
    n = {name: max(1, round(args.chunk_seconds / max(first[name], 1e-5))) for name, _ in procs}
    times: dict[str, list[float]] = {name: [] for name, _ in procs}
    for r in range(args.rounds):
        if r and time.time() > deadline:
            break
        order = procs[r % len(procs):] + procs[: r % len(procs)]
        for name, p in order:
            if not p.alive() or not p.send(str(n[name])):
                continue
            line = p.read(timeout=max(30.0, 20 * args.chunk_seconds))
            if line and line[:1].isdigit():
                times[name].append(float(line.split()[0]) / n[name])
            else:
                p.kill()  # no answer in time: drop it rather than read its late answers as the next ones
    rec = {"phase": "bench", "pair": pair, "batch_size": bs, "dtype": dt, "rounds": args.rounds, "contenders": {}}
    for name, p in procs:
        if not times[name]:
            rec["contenders"][name] = {"error": "no timed chunk", "log": p.tail()}
            continue
        med = statistics.median(times[name])
        c = {"step_ms": 1e3 * med, "img_s": bs / med, "chunk_ms": [round(1e3 * t, 3) for t in times[name]],
             "steps_per_chunk": n[name]}
        c.update(first.get(name + "_extra", {}))
        if c.get("gflops_per_step"):
            c["achieved_tflops"] = c["gflops_per_step"] / med / 1e3
        rec["contenders"][name] = c
    j = rec["contenders"].get("ekd_jax", {})
    torches = {k: v for k, v in rec["contenders"].items() if k.startswith("torch") and "img_s" in v}
    if "img_s" in j and torches:
        best = max(torches, key=lambda k: torches[k]["img_s"])
        rec["jax_over_torch"] = {k: j["img_s"] / v["img_s"] for k, v in torches.items()}
        rec["jax_over_best_torch"] = j["img_s"] / torches[best]["img_s"]
        rec["best_torch"] = best
    return rec


def _print_bench(rec: dict) -> None:
    parts = [f"bench {rec['pair']} b{rec['batch_size']} {rec['dtype']}:"]
    for k, v in rec["contenders"].items():
        parts.append(f"{k} {v['img_s']:.0f} img/s ({v['step_ms']:.2f} ms)" if "img_s" in v else f"{k} failed")
    if "jax_over_best_torch" in rec:
        parts.append(f"jax/best torch {rec['jax_over_best_torch']:.2f}x")
    log(" ".join(parts))


def phase_bench(args, results: Results, deadline: float) -> None:
    env, logs = worker_env(args), args.out / "logs"
    cases = _bench_cases(args)
    n_contenders = (0 if args.no_jax_bench else 1) + len(list(filter(None, args.torch_variants.split(","))))
    per_case_timing = args.rounds * n_contenders * (args.chunk_seconds + 0.1) + 1.5  # + the torch warm-up
    group = max(1, args.bench_parallel)
    for g in range(0, len(cases), group):
        todo = cases[g:g + group]
        if left(deadline) < per_case_timing + 15:
            for c in cases[g:]:
                results.add({"phase": "bench", "pair": c[0], "batch_size": c[1], "dtype": c[2], "skipped": "no time left"})
            break
        log(f"bench: starting {len(todo)} case(s): {todo}")
        started = {c: _start_case(args, c, env, logs) for c in todo}
        try:
            first = _wait_ready(started, ready_by=deadline - per_case_timing * len(todo))
            for c in todo:
                ok = _warm_up(started[c], first[c], deadline)
                if not ok or time.time() > deadline:
                    results.add({"phase": "bench", "pair": c[0], "batch_size": c[1], "dtype": c[2],
                                 "skipped": "no time left to time it" if ok else "no contender ready in time",
                                 "logs": {name: p.tail() for name, p in started[c]}})
                else:
                    rec = _time_case(args, c, ok, first[c], deadline)
                    for name, p in started[c]:
                        if name not in rec["contenders"]:
                            rec["contenders"][name] = {"error": "did not start", "log": p.tail()}
                    results.add(rec)
                    _print_bench(rec)
                for _, p in started[c]:
                    p.close(grace=3)
        finally:
            for c in todo:
                for _, p in started[c]:
                    p.kill()

"""Phases 3-4 of the GPU check: the study runs (``--train_config``, default configs/study.py:full), timed, then trained.

3. calib: one ``--worker calib`` process per (method, seed), vanilla / dml / ekd x ``--max_seeds``, all
   compiling at once; then epochs on command with 3, 6, 9... of them running at once. Its record (phase
   calib): per concurrency, the slowest run's seconds per epoch (train + eval, and train alone) and the
   aggregate img/s, plus each run's start-up and compile seconds: how much runs sharing the GPU slow
   each other.
4. train: vanilla / dml / ekd at ``--epochs`` for as many seeds as the calibration says fit the time left
   (fewer epochs only if not even one seed fits), each wave's runs concurrent (``--worker train``). The
   plan goes to <out>/plan.json and a record (phase train, what plan); each run checkpoints into
   <out>/train/ every ``--ckpt_every`` epochs, so ``--resume_from <a previous out>`` continues the plan.
   One record per run (phase train, method, seed): its summary and speed, or what it reached.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

from gpu.common import (
    METHODS,
    Results,
    left,
    log,
    read_metrics,
    so_far,
    speed,
    start_jax_worker,
    wait_all,
    worker_env,
)


def _run_spec(args, method: str, seed: int, epochs: int, workdir: pathlib.Path) -> dict:
    """A study run's --spec for workers.py (the same for its calibration and its training)."""
    ov = {"data.source": f"npz:{args.data}", "method": method, "seed": seed, "num_epochs": epochs,
          "checkpoint_keep": 1}
    ov.update(json.loads(args.train_overrides))
    return {"config": args.train_config, "workdir": str(workdir), "overrides": ov, "ckpt_every": args.ckpt_every}


# --------------------------------------------------------------------------- phase 3: calib


def _wait_calib_ready(procs: list, rec: dict, deadline: float) -> tuple[list, int | None]:
    """Reads the 'ready' lines until all are ready or 10 s before ``deadline``; kills those still
    compiling (they would disturb the timing). Returns the ready ones in (seed, method) order and the
    runs' steps per epoch; start-up and compile seconds (and the failed ones' logs) go into ``rec``."""
    ready, startup, compile_s, spe = [], {}, {}, None
    pending = list(procs)
    while pending and time.time() < deadline - 10:
        still = []
        time.sleep(0.2)
        for p in pending:
            line = p.read(timeout=0.01)
            if line and line.startswith("ready"):
                parts = line.split()
                startup[p.name], compile_s[p.name], spe = float(parts[1]), float(parts[2]), int(parts[3])
                ready.append(p)
            elif p.alive():
                still.append(p)
            else:
                rec.setdefault("failed", {})[p.name] = p.tail()
        pending = still
    ready_set = {p.name for p in ready}
    ready = [p for p in procs if p.name in ready_set]
    for p in procs:
        if p.name not in ready_set:
            p.kill()
    rec.update(startup_s=startup, compile_s=compile_s, steps_per_epoch=spe,
               ready_after_s=max((time.time() - procs[0].t_start) if ready else 0, 0))
    return ready, spe


def _time_levels(args, rec: dict, ready: list, spe: int, deadline: float) -> None:
    """--calib_epochs epochs with the first 3, 6, ... ready runs at once, into ``rec``."""
    rec["epoch_s"], rec["train_epoch_s"], rec["aggregate_img_s"] = {}, {}, {}
    bs = json.loads(args.train_overrides).get("batch_size", 64)
    for k in range(1, len(ready) // 3 + 1):
        active = ready[: 3 * k]
        last = None  # (train_s, eval_s) of each run, in the last epoch
        for _ in range(args.calib_epochs):
            if time.time() > deadline:
                break
            for p in active:
                p.send("epoch")
            got = [p.read(timeout=max(5.0, left(deadline))) for p in active]
            if any(not g or not g[:1].isdigit() for g in got):
                break
            last = [tuple(float(x) for x in g.split()) for g in got]
        if last is None:
            break
        P = len(active)
        rec["epoch_s"][P] = max(a + b for a, b in last)
        rec["train_epoch_s"][P] = max(a for a, _ in last)
        rec["aggregate_img_s"][P] = sum(spe * bs / a for a, _ in last)
        log(f"calib: {P} concurrent runs: {rec['epoch_s'][P]:.2f} s/epoch per run (train+eval), "
            f"aggregate {rec['aggregate_img_s'][P]:.0f} img/s")


def phase_calib(args, results: Results, deadline: float) -> dict | None:
    """Per-process epoch seconds with 3, 6, ... concurrent study runs; None if it could not run."""
    env = worker_env(args)
    if left(deadline) < 20:
        results.add({"phase": "calib", "config": args.train_config, "skipped": "no time left"})
        return None
    procs = [start_jax_worker(args, "calib", f"calib_{m}_s{s}",
                              _run_spec(args, m, s, args.epochs, args.out / "calib" / f"{m}_s{s}"), env)
             for s in range(args.max_seeds) for m in METHODS]
    log(f"calib: {len(procs)} processes compiling")
    rec: dict = {"phase": "calib", "config": args.train_config, "epochs_planned": args.epochs, "processes": len(procs)}
    try:
        ready, spe = _wait_calib_ready(procs, rec, deadline)
        if len(ready) < 3 or ready[:3] != procs[:3]:
            rec["error"] = "the first seed's three runs did not start in time"
            results.add(rec)
            return None
        _time_levels(args, rec, ready, spe, deadline)
        results.add(rec)
        return rec if rec["epoch_s"] else None
    finally:
        for p in procs:
            p.close(grace=3)
            p.kill()


# --------------------------------------------------------------------------- phase 4: train


def _copy_writable(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies a tree without its permission bits (fetched results may be read-only)."""
    for d, _, files in os.walk(src):
        target = dst / pathlib.Path(d).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(os.path.join(d, f), target / f)


def _wave_estimate(cal: dict, n_seeds: int, epochs: int, args) -> float:
    """Seconds a wave of ``n_seeds`` seeds (3 runs each) at ``epochs`` epochs takes, by the calibration."""
    P = 3 * n_seeds
    ep = cal["epoch_s"].get(P)
    if ep is None:  # not measured at this concurrency: assume the runs share the GPU linearly
        P0 = max(cal["epoch_s"])
        ep = cal["epoch_s"][P0] * P / P0
    startup = max(cal["startup_s"].values())
    saves = epochs / max(1, args.ckpt_every) * 0.5
    return startup + epochs * ep * 1.05 + saves + 10.0  # + finish (networks, summary)


def _resumed_plan(args, root: pathlib.Path, plan_path: pathlib.Path) -> dict | None:
    """--resume_from: its runs copied into ``root``, its plan (None if it has none) made this one's."""
    prev = pathlib.Path(args.resume_from)
    if (prev / "train").is_dir():
        _copy_writable(prev / "train", root)
    if not (prev / "plan.json").exists():
        return None
    plan = json.loads((prev / "plan.json").read_text())
    log(f"train: resuming the plan of {prev}: {plan}")
    # The runs' configs must be the same as before, or the trainer refuses their checkpoints.
    args.train_config, args.data, args.ckpt_every = plan["config"], plan["data"], plan["ckpt_every"]
    args.train_overrides = json.dumps(plan["train_overrides"])
    plan_path.write_text(json.dumps(plan, indent=1))
    return plan


def _new_plan(args, results: Results, cal: dict | None, plan_path: pathlib.Path, deadline: float) -> dict | None:
    """--epochs for as many seeds as fit the time left (else the longest one seed fits); None (recorded
    as skipped) without a calibration or below --min_epochs."""
    if cal is None:
        results.add({"phase": "train", "skipped": "no calibration (and no --resume_from plan)"})
        return None
    budget = left(deadline)
    epochs, n1 = args.epochs, 0
    for n in range(args.max_seeds, 0, -1):
        if _wave_estimate(cal, n, epochs, args) <= budget:
            n1 = n
            break
    if n1 == 0:  # not one seed at the full schedule: the longest one seed fits
        per = _wave_estimate(cal, 1, 1, args) - _wave_estimate(cal, 1, 0, args)
        epochs = int((budget - _wave_estimate(cal, 1, 0, args)) / per)
        n1 = 1
    plan = {"epochs": epochs, "seeds": list(range(args.max_seeds)), "first_wave_seeds": n1,
            "config": args.train_config, "data": args.data, "train_overrides": json.loads(args.train_overrides),
            "ckpt_every": args.ckpt_every, "estimate_s": _wave_estimate(cal, n1, epochs, args), "budget_s": budget}
    if epochs < args.min_epochs:
        results.add({"phase": "train", "skipped": f"only {epochs} epochs would fit (< --min_epochs {args.min_epochs})",
                     "plan": plan})
        return None
    plan_path.write_text(json.dumps(plan, indent=1))
    return plan


def _run_wave(args, results: Results, wave: list[int], epochs: int, root: pathlib.Path, env, deadline: float):
    """The runs of ``wave``'s seeds, concurrent (a run already finished in ``root`` is reused); one record
    per run. Returns (runs started, whether all ended before ``deadline``); a signal is re-raised after
    the records."""
    procs = []
    for s in wave:
        for m in METHODS:
            workdir = root / f"{m}_s{s}_e{epochs}"
            summ = workdir / "summary.json"
            if summ.exists():
                done = json.loads(summ.read_text())
                results.add({"phase": "train", "method": m, "seed": s, "epochs": epochs, "reused": True,
                             **{k: v for k, v in done.items() if k != "config"}, **speed(read_metrics(workdir))})
                continue
            name = f"train_{m}_s{s}_e{epochs}"
            procs.append((m, s, workdir, start_jax_worker(args, "train", name, _run_spec(args, m, s, epochs, workdir), env)))
    log(f"train: wave of seed(s) {wave}: {len(procs)} run(s) at {epochs} epochs")
    interrupted = None
    try:
        finished = wait_all([p for *_, p in procs], deadline)
    except KeyboardInterrupt as e:  # SIGTERM from outside: still record what the runs reached
        for *_, p in procs:
            p.kill()
        finished, interrupted = False, e
    for m, s, workdir, p in procs:
        rec = {"phase": "train", "method": m, "seed": s, "epochs": epochs}
        if p.result:
            rec.update(p.result, finished=True)
            if not args.keep_finished_checkpoints:  # summary.json marks it done; resume needs no state
                shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        else:
            rec.update(so_far(workdir), finished=False, log=p.tail(),
                       error="killed at the deadline (checkpoints kept: --resume_from continues)"
                       if not finished else "failed")
        results.add(rec)
        log(f"train: {m} seed {s}: " + json.dumps({k: rec.get(k) for k in (
            "finished", "epochs_done", "student_top1", "teacher_top1", "best_student_top1", "images_per_s")}))
    if interrupted is not None:
        raise interrupted
    return procs, finished


def phase_train(args, results: Results, cal: dict | None, deadline: float) -> None:
    env = worker_env(args)
    root, plan_path = args.out / "train", args.out / "plan.json"
    plan = _resumed_plan(args, root, plan_path) if args.resume_from else None
    if plan is None:
        plan = _new_plan(args, results, cal, plan_path, deadline)
        if plan is None:
            return
    results.add({"phase": "train", "what": "plan", **plan})
    log(f"train: plan {plan['epochs']} epochs, first wave {plan['first_wave_seeds']} seed(s), "
        f"estimated {plan.get('estimate_s', 0):.0f} s of {left(deadline):.0f} s left")
    epochs, todo = plan["epochs"], list(plan["seeds"])
    n = plan.get("first_wave_seeds", 1)
    wave_s_per_seed = None
    while todo and n > 0:
        wave, todo = todo[:n], todo[n:]
        t = time.time()
        procs, finished = _run_wave(args, results, wave, epochs, root, env, deadline)
        if not finished:
            results.add({"phase": "train", "what": "stopped", "seeds_not_started": todo})
            return
        took = time.time() - t
        wave_s_per_seed = took / max(1, len(wave)) if procs else wave_s_per_seed
        if not todo:
            break
        # Next wave: as many of the remaining seeds as the measured wave time says fit.
        per = wave_s_per_seed or 0.0
        n = 0
        for k in range(len(todo), 0, -1):
            est = per * k if per else 0.0
            if cal is not None and 3 * k in cal["epoch_s"] and 3 * len(wave) in cal["epoch_s"]:
                est = took * cal["epoch_s"][3 * k] / cal["epoch_s"][3 * len(wave)]
            if est * 1.1 <= left(deadline):
                n = k
                break
        if n == 0:
            results.add({"phase": "train", "what": "stopped", "seeds_not_started": todo,
                         "why": f"the next wave needs about {per:.0f} s per seed, {left(deadline):.0f} s left"})

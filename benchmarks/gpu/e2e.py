"""Phase 2 of the GPU check: the trainer end to end, against the step alone (phase 1).

Each ``--e2e_cases`` item PAIR:DTYPE:BATCH is one real ``ekd_jax.train.train_and_evaluate`` run
(configs/cifar.py:cifar10,<pair> on ``--data``, ``--e2e_epochs`` epochs, in a ``--worker train``
process). Its record (phase e2e) has the trainer's own images/s (median over the epochs after the
first), the bench's img/s of the same case and their ratio ``loop_over_bench``, and ``host_feed``: the
host's cost of one batch (the source's train_batch + parallel.shard_batch). A loop far below the bench
means the host feeding it is the bottleneck; the summary says so.
"""

from __future__ import annotations

import json
import shutil
import time

from gpu.common import (
    Results,
    left,
    log,
    so_far,
    start_jax_worker,
    wait_all,
    worker_env,
)


def phase_e2e(args, results: Results, deadline: float) -> None:
    env = worker_env(args)
    est = None  # the last case's seconds: a case is not started unless about that much is left
    for case in filter(None, args.e2e_cases.split(",")):
        pair, dt, bs = case.split(":")
        if left(deadline) < 15 or (est is not None and left(deadline) < 1.2 * est):
            why = "no time left" + (f" (the last case took {est:.0f} s)" if est is not None else "")
            results.add({"phase": "e2e", "case": case, "skipped": why})
            continue
        workdir = args.out / "e2e" / f"{pair}_{dt}_b{bs}"
        spec = {"config": f"configs/cifar.py:cifar10,{pair}", "workdir": str(workdir), "host_feed": True,
                "overrides": {"data.source": f"npz:{args.data}", "dtype": dt, "batch_size": int(bs),
                              "num_epochs": args.e2e_epochs, "eval_every_epochs": args.e2e_epochs,
                              "eval_batch_size": args.eval_batch_size, "log_every_steps": 50}}
        log(f"e2e: {case}, {args.e2e_epochs} epochs")
        t = time.time()
        p = start_jax_worker(args, "train", f"e2e_{pair}_{dt}_b{bs}", spec, env)
        finished = wait_all([p], deadline)
        est = time.time() - t
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)  # a throwaway run: keep $OUT small
        rec = {"phase": "e2e", "case": case, "pair": pair, "dtype": dt, "batch_size": int(bs), "wall_s": est}
        if p.result:
            rec.update(p.result)
        else:
            rec.update(so_far(workdir), error="killed at the phase deadline" if not finished else "failed",
                       log=p.tail())
        bench = next((b for b in results.get("bench") if b.get("pair") == pair and b.get("dtype") == dt
                      and b.get("batch_size") == int(bs)), None)
        j = (bench or {}).get("contenders", {}).get("ekd_jax", {})
        if rec.get("images_per_s") and j.get("img_s"):
            rec["bench_img_s"] = j["img_s"]
            rec["loop_over_bench"] = rec["images_per_s"] / j["img_s"]
        results.add(rec)
        log("e2e: " + json.dumps({k: rec.get(k) for k in ("case", "images_per_s", "bench_img_s", "loop_over_bench",
                                                          "host_feed", "error")}))

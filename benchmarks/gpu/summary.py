"""The GPU check's final table (<out>/summary.txt, also printed): one section per phase, from results.jsonl's records."""

from __future__ import annotations

import statistics
import time

from gpu.common import T0, Results


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def _env(records, budget: float) -> list[str]:
    env = next((r for r in records("env") if r.get("what") == "versions"), {})
    j, t = env.get("jax", {}), env.get("torch", {})
    L = [f"== GPU check ({time.time() - T0:.0f} s of {budget:.0f} s budget) ==",
         (f"python {env.get('python')} | jax {j.get('jax')} {j.get('backend')} {j.get('device_kind')} | "
          f"torch {t.get('torch')} cuda {t.get('cuda')} cudnn {t.get('cudnn')} {t.get('gpu')} | {env.get('nvidia_smi', '')}")]
    wh = next((r for r in records("env") if r.get("what") == "wheels"), None)
    if wh:
        L.append(f"wheels: installed {wh['installed'] + wh['unpacked']}, still missing {wh['missing']}")
    return L


def _bench(records) -> list[str]:
    L = ["-- joint step (ekd, CE+CE+KD+adapter MSE), img/s; ratio = ekd_jax / best PyTorch --",
         (f"{'pair':22s} {'batch':>5s} {'dtype':9s} {'ekd_jax':>9s} {'torch':>9s} {'torch_cl':>9s} {'ratio':>6s} "
          f"{'jax ms':>8s} {'compile s':>9s} {'TFLOP/s':>8s}")]
    for r in records("bench"):
        if "skipped" in r:
            L.append(f"{r['pair']:22s} {r['batch_size']:5d} {r['dtype']:9s} skipped: {r['skipped']}")
            continue
        c = r["contenders"]
        jj = c.get("ekd_jax", {})
        L.append(f"{r['pair']:22s} {r['batch_size']:5d} {r['dtype']:9s} {_fmt(jj.get('img_s'), '.0f'):>9s} "
                 f"{_fmt(c.get('torch', {}).get('img_s'), '.0f'):>9s} {_fmt(c.get('torch_cl', {}).get('img_s'), '.0f'):>9s} "
                 f"{_fmt(r.get('jax_over_best_torch'), '.2f'):>6s} {_fmt(jj.get('step_ms'), '.2f'):>8s} "
                 f"{_fmt(jj.get('compile_s')):>9s} {_fmt(jj.get('achieved_tflops'), '.2f'):>8s}")
    return L


def _e2e(records) -> list[str]:
    L = ["-- trainer end to end (train_and_evaluate on the npz) vs the bench --"]
    for r in records("e2e"):
        if "skipped" in r:
            L.append(f"{r['case']}: skipped ({r['skipped']})")
            continue
        hf = r.get("host_feed") or {}
        ratio = r.get("loop_over_bench")
        verdict = ""
        if ratio is not None:
            verdict = ("the host feeding the loop is the bottleneck" if ratio < 0.7 else
                       "the loop is somewhat below the step (host overhead)" if ratio < 0.9 else
                       "the loop runs at the step's speed")
        L.append(f"{r['case']}: loop {_fmt(r.get('images_per_s'), '.0f')} img/s (by epoch {r.get('images_per_s_by_epoch')}), "
                 f"bench {_fmt(r.get('bench_img_s'), '.0f')} img/s, loop/bench {_fmt(ratio, '.2f')}; host feed "
                 f"{_fmt(hf.get('gather_and_put_ms'), '.2f')} ms/batch (gather {_fmt(hf.get('gather_ms'), '.2f')} ms) "
                 + (f"-> {verdict}" if verdict else "") + (f" [error: {r['error']}]" if r.get("error") else ""))
    return L


def _calib(records) -> list[str]:
    L = []
    for r in records("calib"):
        L.append(f"-- concurrent study runs ({r['config']}), startup {_fmt(max(r.get('startup_s', {0: 0}).values() or [0]))} s --")
        for P, e in (r.get("epoch_s") or {}).items():
            L.append(f"{P} runs at once: {e:.2f} s/epoch per run (train {r['train_epoch_s'][P]:.2f}), "
                     f"aggregate {r['aggregate_img_s'][P]:.0f} img/s")
        if r.get("error") or r.get("skipped"):
            L.append(f"calib: {r.get('error') or 'skipped: ' + r['skipped']} {r.get('failed', '')}")
    return L


def _train(records) -> list[str]:
    L = []
    plan = next((r for r in records("train") if r.get("what") == "plan"), None)
    if plan:
        L.append(f"-- study runs: {plan['config']}, {plan['epochs']} epochs --")
    runs = [r for r in records("train") if "method" in r]
    if runs:
        L.append(f"{'method':8s} {'seed':>4s} {'epochs':>9s} {'student':>8s} {'teacher':>8s} {'best st.':>8s} {'img/s':>7s} state")
        for r in runs:
            st = "done" if r.get("finished") or r.get("reused") else "partial"
            L.append(f"{r['method']:8s} {r['seed']:4d} {str(r.get('epochs_done')) + '/' + str(r['epochs']):>9s} "
                     f"{_fmt(r.get('student_top1') and 100 * r['student_top1'], '.2f'):>8s} "
                     f"{_fmt(r.get('teacher_top1') and 100 * r['teacher_top1'], '.2f'):>8s} "
                     f"{_fmt(r.get('best_student_top1') and 100 * r['best_student_top1'], '.2f'):>8s} "
                     f"{_fmt(r.get('images_per_s'), '.0f'):>7s} {st}")
        by = {}
        for r in runs:
            if (r.get("finished") or r.get("reused")) and r.get("student_top1") is not None:
                by.setdefault(r["method"], []).append(r["student_top1"])
        if by:
            L.append("mean student top-1: " + ", ".join(
                f"{m} {100 * statistics.mean(v):.2f}% (n={len(v)})" for m, v in by.items()))
    for r in records("train"):
        if "skipped" in r or r.get("what") == "stopped":
            L.append(f"train: {r.get('skipped') or ('stopped; seeds not started: ' + str(r.get('seeds_not_started')) + ' ' + r.get('why', ''))}")
    return L


def summarize(args, results: Results) -> str:
    def records(phase):  # a phase's records, without the errors (listed at the end)
        return [r for r in results.get(phase) if "traceback" not in r]

    L = [*_env(records, args.budget), "", *_bench(records), "", *_e2e(records), "", *_calib(records), "",
         *_train(records)]
    for r in results.items:
        if "traceback" in r:
            L.append(f"{r['phase']}: ERROR {r['error']} (traceback in results.jsonl)")
    return "\n".join(L)

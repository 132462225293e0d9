#!/usr/bin/env bash
# The recorded study's background queue (docs/results.md section 4): one run at a time, resumable.
#   DATA=npz:/path/to/cifar10_small.npz nohup benchmarks/study_queue.sh > runs/study_queue.log 2>&1 &
# Restores the finished runs carried in docs/study_runs/, runs the few-sample ablation (seed 0 of
# every variant, then seed 1), then the three-scenario study, saving finished runs' records back
# into docs/study_runs/ after each step (commit them). Interrupted runs resume from their checkpoints.
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA=npz:<path of cifar10_small.npz>, the same string as the carried runs (docs/results.md section 4)}
PY=${PY:-.venv/bin/python}
$PY benchmarks/study_runs.py restore
VARIANTS=${VARIANTS:-vanilla,teacher,dml,ekd_dml_feat,ekd_prev,ekd_beta03,ekd_auxhead,ekd_coevo,ekd_beta0,ekd_beta01,ekd_last_stage,ekd_ahead,ekd_late,ekd_tau4,ekd_gamma0,ekd_auxhead_tau4,ekd_stages01,ekd_correct,ekd_ramp,ekd_beta3,ekd_rawmean,ekd_alpha0,ekd_head,dml_head}
for seed in 0 1; do
  PYTHONPATH=. $PY benchmarks/ablation.py --config configs/study.py:few100 --config.data.source=$DATA \
    --workdir runs/abl_few100 --seeds $seed --only $VARIANTS
  $PY benchmarks/study_runs.py save runs/abl_few100
done
for scenario in few100 full lowres4; do
  $PY -m ekd_jax.compare --config configs/study.py:$scenario --config.data.source=$DATA \
    --methods vanilla,teacher,kd,dml,ekd --seeds 0,1,2 --workdir runs/study_$scenario
  $PY -m ekd_jax.compare --config configs/study.py:$scenario --config.data.source=$DATA \
    --config.teacher.head_start=1.0 --methods ekd --seeds 0,1,2 --workdir runs/study_${scenario}_head
  $PY benchmarks/study_runs.py save runs/study_$scenario runs/study_${scenario}_head
done

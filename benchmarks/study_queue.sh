#!/usr/bin/env bash
# The recorded study's background queue (docs/results.md section 4): one run at a time, resumable.
#   DATA=npz:/path/to/cifar10_small.npz nohup benchmarks/study_queue.sh > runs/study_queue.log 2>&1 &
# Restores the finished runs carried in docs/study_runs/, completes the few-sample ablation (3 seeds
# of the main variants, one of the rest), then the three-scenario study, saving finished runs' records back
# into docs/study_runs/ after each step (commit them). Interrupted runs resume from their checkpoints.
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA=npz:<path of cifar10_small.npz>, the same string as the carried runs (docs/results.md section 4)}
PY=${PY:-.venv/bin/python}
$PY benchmarks/study_runs.py restore
# 1) the variants with >= 2 seeds in docs/results.md section 2, to 3 seeds; 2) one-seed screening of the rest.
VARIANTS=${VARIANTS:-vanilla,teacher,dml,ekd_dml_feat,ekd_late,ekd_auxhead,ekd_tau4,ekd_sigramp}
PYTHONPATH=. $PY benchmarks/ablation.py --config configs/study.py:few100 --config.data.source=$DATA \
  --workdir runs/abl_few100 --seeds 0,1,2 --only $VARIANTS
$PY benchmarks/study_runs.py save runs/abl_few100
SCREEN=${SCREEN:-ekd_stages01,ekd_correct,ekd_beta3,ekd_rawmean,ekd_alpha0,ekd_gamma0,ekd_auxhead_tau4,ekd_head,dml_head}
PYTHONPATH=. $PY benchmarks/ablation.py --config configs/study.py:few100 --config.data.source=$DATA \
  --workdir runs/abl_few100 --seeds 0 --only $SCREEN
$PY benchmarks/study_runs.py save runs/abl_few100
for scenario in few100 full lowres4; do
  $PY -m ekd_jax.compare --config configs/study.py:$scenario --config.data.source=$DATA \
    --methods vanilla,teacher,kd,dml,ekd --seeds 0,1,2 --workdir runs/study_$scenario
  $PY -m ekd_jax.compare --config configs/study.py:$scenario --config.data.source=$DATA \
    --config.teacher.head_start=1.0 --methods ekd --seeds 0,1,2 --workdir runs/study_${scenario}_head
  $PY benchmarks/study_runs.py save runs/study_$scenario runs/study_${scenario}_head
done

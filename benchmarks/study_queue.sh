#!/usr/bin/env bash
# The recorded study's background queue (docs/results.md section 5): one run at a time, resumable.
#   DATA=npz:/path/to/cifar10_small.npz nohup benchmarks/study_queue.sh > runs/study_queue.log 2>&1 &
# Restores the finished runs carried in docs/study_runs/<study>.json, then: the few-sample
# comparison of the defaults to 3 seeds, the aux_head ablation at 2 seeds, the second dataset
# (digits), the three-scenario study (reusing the ablation's runs of the same config), saving
# finished runs' records back into their docs/study_runs/<study>.json after each step and every
# 5 minutes (commit them). Interrupted runs resume from their checkpoints.
set -u
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA=npz:<path of cifar10_small.npz>, the same string as the carried runs (docs/results.md section 5)}
PY=${PY:-.venv/bin/python}
while pgrep -f "benchmarks/ablation.py|ekd_jax.compare" >/dev/null; do sleep 10; done  # one run at a time
$PY benchmarks/study_runs.py restore
# A new checkout starts without runs/: every few minutes carry each finished run's records into
# docs/study_runs/<study>.json (commit them), so that a stop loses at most the runs in progress.
( while sleep 300; do
    for d in runs/abl_* runs/study_*; do [ -d "$d" ] && $PY benchmarks/study_runs.py save "$d" >/dev/null; done
  done ) &
SAVER=$!
trap 'kill $SAVER 2>/dev/null' EXIT
abl() {  # abl SEEDS VARIANTS
  PYTHONPATH=. $PY benchmarks/ablation.py --config configs/study.py:few100 --config.data.source=$DATA \
    --workdir runs/abl_few100_b32 --seeds "$1" --only "$2"
  $PY benchmarks/study_runs.py save runs/abl_few100_b32
}
MAIN=teacher,vanilla,dml,ekd_auxhead
SCREEN=ekd_aux_last,ekd_aux_w,ekd_auxhead_tau4,ekd_aux_ahead,ekd_dml_feat
abl 0,1,2 $MAIN
abl 0 $SCREEN
abl 0,1 ekd_aux_beta2  # seed 0: less transfer (last stage only, lighter early stages) cost 2 points
$PY -m ekd_jax.compare --config configs/study.py:digits --methods vanilla,teacher,dml,ekd --seeds 0,1,2 \
  --workdir runs/study_digits
$PY benchmarks/study_runs.py save runs/study_digits
abl 1 $SCREEN
SCREEN2=ekd_aux_beta05,ekd_aux_gamma0,ekd_aux_alpha0,ekd_aux_correct,ekd_aux_sigramp
abl 0,1 $SCREEN2
abl 0,1 ekd_rawmean  # the adapter's distance as METHOD.md words it: raw maps, mean over elements
# The head start's control at the same compute (section 5): DML whose teacher also first trains
# alone for the student's budget.
$PY -m ekd_jax.compare --config configs/study.py:few100 --config.data.source=$DATA \
  --config.teacher.head_start=1.0 --methods dml,ekd --seeds 0,1,2 --workdir runs/study_few100_head
$PY benchmarks/study_runs.py save runs/study_few100_head
mkdir -p runs/study_full  # lowres4 reuses full's teachers alone (the student's view is all that differs)
# Every scenario's base comparison first, then the head starts (the costliest runs: the teacher
# first trains alone for the student's whole budget).
for scenario in few100 full lowres4; do
  $PY -m ekd_jax.compare --config configs/study.py:$scenario --config.data.source=$DATA \
    --methods vanilla,teacher,kd,dml,ekd --seeds 0,1,2 --workdir runs/study_$scenario --reuse runs/abl_few100_b32,runs/study_full
  $PY benchmarks/study_runs.py save runs/study_$scenario
done
# Why EKD loses at full data (docs/results.md section 5): its online teacher ends ~3 points below the
# teacher alone. Without co-evolution (gamma 0) the teacher learns from labels only, as alone, and
# the student still mimics it online: does the student then gain?
$PY -m ekd_jax.compare --config configs/study.py:full --config.data.source=$DATA \
  --config.loss.gamma=0.0 --methods ekd --seeds 0,1 --workdir runs/study_full_gamma0
$PY benchmarks/study_runs.py save runs/study_full_gamma0
for scenario in full lowres4; do  # few100's head starts (dml and ekd) ran above
  $PY -m ekd_jax.compare --config configs/study.py:$scenario --config.data.source=$DATA \
    --config.teacher.head_start=1.0 --methods ekd --seeds 0,1,2 --workdir runs/study_${scenario}_head
  $PY benchmarks/study_runs.py save runs/study_${scenario}_head
done
# The full-data head start's control at equal teacher compute (section 5; one seed so far).
$PY -m ekd_jax.compare --config configs/study.py:full --config.data.source=$DATA \
  --config.teacher.head_start=1.0 --methods dml --seeds 0 --workdir runs/study_full_dmlhead
$PY benchmarks/study_runs.py save runs/study_full_dmlhead

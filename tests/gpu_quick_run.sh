#!/usr/bin/env bash
# The README's quick experiment in one go on a GPU machine: does CLSP beat SimCLR here? Every log,
# picture and number lands in one folder (six files), ready for the README:
#
#   bash tests/gpu_quick_run.sh OUT [DATA]    # DATA: an image folder DIR/train/<class>, DIR/test/<class>;
#                                             # default: CIFAR-10 in the repository's data/ (downloaded if
#                                             # missing and the machine is online)
#
# Order: the DDPM, its candidates, the SimCLR baseline (lam 0) first, so that it can judge the
# candidates, then the SimCLR-aug control (a third augmented view instead of a candidate), then CLSP
# (lam 1), then the three evaluations (kNN k 200 T 0.1 and the linear probe), with the same DDPM,
# candidates, epochs and seed; then NNCLR, the paper's foil, and its evaluation, when time is left. Each stage runs under its own time limit in seconds, so a slow
# stage cannot eat the others' time: a stage stopped by its limit gets SIGTERM and saves where it is. A
# cut DDPM or CLSP run goes on as it is (the results then say "unfinished", and a comparison of
# unfinished runs is marked as not like for like); a cut candidate set leaves nothing for CLSP, whose
# stages are then skipped. The default limits add up to 565 s, under a 10-minute device call; size them
# (and the flags) from a measured run. It exits 1 if a stage failed other than by its time limit.
#
# Settings, all optional environment variables:
#   PRESET=quick          the preset of every stage
#   DDPM_FLAGS, GEN_FLAGS, CLSP_FLAGS, EVAL_FLAGS   extra flags per script, e.g. DDPM_FLAGS="--steps 6000"
#   SEEDS="0"             CLSP and SimCLR seeds, e.g. SEEDS="0 1" for two of each
#   T_DDPM=180 T_GEN=100 T_CLSP=70 T_EVAL=25 T_BENCH=420   the time limits (seconds)
#   T_TOTAL=590           the NNCLR run (after the SimCLR three) starts only if it fits in this total
#   BENCH=0               1: run tests/benchmark.py --more first (stages BENCH_STAGES=123)
#   WORK=/tmp/clsp_quick  where runs/ lives (not under OUT: only the six result files come back)
#   PY=python3
# Checked on a CPU at tiny scale:  PRESET=tiny bash tests/gpu_quick_run.sh /tmp/out /path/to/tiny/folder
set -u
OUT=${1:?usage: bash tests/gpu_quick_run.sh OUT_DIR [DATA_DIR]}
DATA=${2:+$(realpath "$2")}       # absolute: every stage runs in $WORK
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-python3}
PRESET=${PRESET:-quick}
SEEDS=${SEEDS:-0}
WORK=${WORK:-/tmp/clsp_quick}
LOG="$OUT/log.txt"
mkdir -p "$OUT" "$WORK"
: > "$LOG"
: > "$WORK/times.tsv"
DATA_FLAGS=(--data-dir "$REPO/data")
[ -n "$DATA" ] && DATA_FLAGS=(--dataset folder --data-dir "$DATA")
FAILED=0

stage() {   # stage NAME LIMIT COMMAND...: run it in $WORK under its limit, log it, record rc and seconds
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
    local t0
    t0=$(date +%s%N)
    (cd "$WORK" && timeout --signal=TERM --kill-after=15 "$limit" "$@") >> "$LOG" 2>&1
    local rc=$?
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && FAILED=1
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$ms" "$*" >> "$WORK/times.tsv"
    echo "=== $name: exit $rc after $((ms / 1000)) s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } >> "$LOG" 2>&1

if [ "${BENCH:-0}" = 1 ]; then
    stage benchmark "${T_BENCH:-420}" $PY "$REPO/tests/benchmark.py" --stages "${BENCH_STAGES:-123}" --more
fi
rm -rf "$WORK/runs"
stage ddpm "${T_DDPM:-180}" $PY "$REPO/ddpm.py" --preset "$PRESET" "${DATA_FLAGS[@]}" ${DDPM_FLAGS:-}
stage generate "${T_GEN:-100}" $PY "$REPO/generate.py" --preset "$PRESET" ${GEN_FLAGS:-}
[ -f "$WORK/runs/synthetic.pt" ] || echo "=== no runs/synthetic.pt (generate was cut or failed): CLSP is skipped" | tee -a "$LOG"
for seed in $SEEDS; do
    stage "clsp lam 0 seed $seed" "${T_CLSP:-70}" $PY "$REPO/clsp.py" --preset "$PRESET" --lam 0 --seed "$seed" \
        --out "runs/clsp_lam0_s$seed.pt" ${CLSP_FLAGS:-}
    stage "clsp aug seed $seed" "${T_CLSP:-70}" $PY "$REPO/clsp.py" --preset "$PRESET" --positive view \
        --seed "$seed" --out "runs/clsp_aug_s$seed.pt" ${CLSP_FLAGS:-}
    [ -f "$WORK/runs/synthetic.pt" ] && stage "clsp lam 1 seed $seed" "${T_CLSP:-70}" $PY "$REPO/clsp.py" \
        --preset "$PRESET" --seed "$seed" --out "runs/clsp_s$seed.pt" ${CLSP_FLAGS:-}
done
for seed in $SEEDS; do
    for ckpt in "clsp_lam0_s$seed" "clsp_aug_s$seed" "clsp_s$seed"; do
        [ -f "$WORK/runs/$ckpt.pt" ] || continue
        stage "evaluate $ckpt" "${T_EVAL:-25}" $PY "$REPO/evaluate.py" --preset "$PRESET" --checkpoint "runs/$ckpt.pt" \
            --judge "runs/clsp_lam0_s$seed.pt" --out "runs/eval_$ckpt.json" ${EVAL_FLAGS:-}
    done
done

# NNCLR, the paper's foil (clsp.py --base nnclr --lam 0), with the first seed, only when the budget
# T_TOTAL still holds a run and its evaluation: the SimCLR comparison above always comes first.
first_seed=${SEEDS%% *}
if [ $(( SECONDS + ${T_CLSP:-70} + ${T_EVAL:-25} )) -le "${T_TOTAL:-590}" ]; then
    stage "clsp nnclr seed $first_seed" "${T_CLSP:-70}" $PY "$REPO/clsp.py" --preset "$PRESET" --base nnclr --lam 0 \
        --seed "$first_seed" --out "runs/clsp_nnclr_s$first_seed.pt" ${CLSP_FLAGS:-}
    [ -f "$WORK/runs/clsp_nnclr_s$first_seed.pt" ] && stage "evaluate clsp_nnclr_s$first_seed" "${T_EVAL:-25}" \
        $PY "$REPO/evaluate.py" --preset "$PRESET" --checkpoint "runs/clsp_nnclr_s$first_seed.pt" \
        --judge "runs/clsp_lam0_s$first_seed.pt" --out "runs/eval_clsp_nnclr_s$first_seed.json" ${EVAL_FLAGS:-}
else
    echo "=== NNCLR skipped: ${SECONDS} s used of T_TOTAL=${T_TOTAL:-590}" | tee -a "$LOG"
fi

# The pictures, and every number in two files: results.json (all of it) and results.md (the tables).
cp "$WORK"/runs/ddpm_samples.png "$WORK"/runs/synthetic_preview.png "$WORK"/runs/synthetic_w_sweep.png "$OUT"/ 2>/dev/null
$PY - "$WORK" "$OUT" <<'EOF' >> "$LOG" 2>&1
import glob, json, os, sys
import torch
work, out = sys.argv[1], sys.argv[2]
stages = [dict(zip(("stage", "exit", "seconds", "command"), line.rstrip("\n").split("\t")))
          for line in open(os.path.join(work, "times.tsv"))]
for s in stages:
    s["seconds"] = int(s["seconds"]) / 1000
evals = {os.path.basename(p): json.load(open(p)) for p in sorted(glob.glob(os.path.join(work, "runs", "eval_*.json")))}
summary = None
if os.path.exists(os.path.join(work, "runs", "synthetic.pt")):
    summary = torch.load(os.path.join(work, "runs", "synthetic.pt"), weights_only=True, mmap=True)["summary"]
json.dump(dict(stages=stages, evaluations=evals, synthetic_summary=summary), open(os.path.join(out, "results.json"), "w"),
          indent=2, default=str)
lines = ["| stage | exit | seconds |", "|---|---|---|"]
lines += [f"| {s['stage']} | {s['exit']} | {s['seconds']:.1f} |" for s in stages]
lines += [f"| total | | {sum(s['seconds'] for s in stages):.1f} |", "",
          "| run | method | epochs | finished | kNN top-1 % (k 200, T 0.1) | linear top-1 % | "
          "candidates = anchor's class (judge) % | views = class (judge) % |", "|---|---|---|---|---|---|---|---|"]
epochs = {(r["made_from"]["checkpoint"]["epoch"], r["made_from"]["checkpoint"]["finished"]) for r in evals.values()}
for name, r in evals.items():
    c, d = r["made_from"]["checkpoint"], r.get("synthetic_diagnostics") or {}
    lines.append(f"| {name} | {r.get('method')} (lam {c['lam']}) | {c['epoch']} | "
                 f"{c['finished']} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} | "
                 f"{d.get('candidate_label_agreement_judge', float('nan')):.2f} | "
                 f"{d.get('view_label_agreement_judge', float('nan')):.2f} |")
if len(epochs) > 1 or not all(finished for _, finished in epochs):
    lines += ["", "NOT LIKE FOR LIKE: some runs are unfinished or stopped at other epochs (see above)"]
if summary:
    lines += ["", f"anchor-to-sample L1 by w ({summary.get('sweep_anchors')} anchors): "
              + ", ".join(f"w={w}: {v:.1f}" for w, v in summary["anchor_to_sample_by_w"].items()),
              f"anchor-to-candidate L1 {summary['anchor_to_candidate']:.1f}, between candidates "
              f"{summary['between_candidates'] or float('nan'):.1f}, two training images {summary['anchor_to_other_image']:.1f}"]
open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
cat "$OUT/results.md" 2>/dev/null
ls -la "$OUT"
exit $FAILED

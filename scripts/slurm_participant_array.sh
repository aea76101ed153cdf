#!/bin/bash
# bids_adhd participant level as a Slurm job array: one participant per array task,
# in the Apptainer image. Task N processes the N-th participant of participants.tsv
# (data rows counted from 1, the header excluded).
#
# Submit (N = number of participants; the script prints the range for you):
#   export BIDS_DIR=/data/hbn OUT_DIR=/project/hbn-derivatives SIF=/images/bids_adhd-0.1.0.sif
#   export WORK_ROOT=/scratch/$USER/bids_adhd_work          # fast, per-node scratch is best
#   mkdir -p logs
#   sbatch --array="$(scripts/slurm_participant_array.sh --array-range)%50" scripts/slurm_participant_array.sh
#
# Check what task 3 would run, without running it:
#   SLURM_ARRAY_TASK_ID=3 scripts/slurm_participant_array.sh --dry-run
#
# Extra arguments are passed to bids_adhd, e.g. `... slurm_participant_array.sh --pipeline fast`.
# Each task indexes and validates only its own subject (plus the top-level files), so a task
# costs the same in a 2,000-subject dataset as alone, and another subject's problems do not
# stop it. SKIP_VALIDATION=1 skips even that (e.g. a dataset validated as a whole beforehand).
#
# Environment: BIDS_DIR, OUT_DIR, SIF (required); WORK_ROOT (default /tmp/$USER/bids_adhd_work);
# APPTAINER (default: apptainer, else singularity); SKIP_VALIDATION (0); KEEP_WORK (1: keep
# the task's work dir for re-runs; 0: delete it after success).
#
#SBATCH --job-name=bids_adhd
#SBATCH --cpus-per-task=4
#SBATCH --mem=16G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x_%A_%a.out
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
mode=run
args=()
for a in "$@"; do
    case "$a" in
        --dry-run) dry_run=1 ;;
        --array-range) mode=range ;;
        -h|--help) usage; exit 0 ;;
        *) args+=("$a") ;;
    esac
done

: "${BIDS_DIR:?set BIDS_DIR to the BIDS dataset}"
tsv="$BIDS_DIR/participants.tsv"
if [ ! -f "$tsv" ]; then
    echo "slurm_participant_array.sh: $tsv not found" >&2
    exit 66
fi

# participant labels, one per data row, in file order: the participant_id column
# (wherever it is), 'sub-' stripped, CR and blank lines ignored
labels() {
    awk -F'\t' '
        NR == 1 {
            for (i = 1; i <= NF; i++) { h = $i; gsub(/\r|^[ \t]+|[ \t]+$/, "", h); if (h == "participant_id") c = i }
            if (!c) { print "participants.tsv has no participant_id column" > "/dev/stderr"; exit 65 }
            next
        }
        { gsub(/\r/, "") }
        /^[[:space:]]*$/ { next }
        { id = $c; gsub(/^[ \t]+|[ \t]+$/, "", id); sub(/^sub-/, "", id); print id }
    ' "$tsv"
}

n=$(labels | wc -l)
if [ "$mode" = range ]; then
    [ "$n" -ge 1 ] || { echo "slurm_participant_array.sh: no participants in $tsv" >&2; exit 18; }
    echo "1-$n"
    exit 0
fi

task=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch --array=1-N (see --help)}
if ! [[ "$task" =~ ^[0-9]+$ ]] || [ "$task" -lt 1 ] || [ "$task" -gt "$n" ]; then
    echo "slurm_participant_array.sh: array task $task is outside 1-$n ($n participants in $tsv)" >&2
    exit 64
fi
label=$(labels | sed -n "${task}p")
if ! [[ "$label" =~ ^[A-Za-z0-9]+$ ]]; then
    echo "slurm_participant_array.sh: row $task of $tsv has participant_id '$label', not sub-<letters/digits>" >&2
    exit 65
fi

: "${OUT_DIR:?set OUT_DIR to the output (derivatives) directory}"
: "${SIF:?set SIF to the bids_adhd .sif image}"
WORK_ROOT=${WORK_ROOT:-/tmp/${USER:-bids_adhd}/bids_adhd_work}
work="$WORK_ROOT/sub-$label"
runtime=${APPTAINER:-$(command -v apptainer || command -v singularity || echo apptainer)}
skip=()
[ "${SKIP_VALIDATION:-0}" = 1 ] && skip=(--skip-bids-validation)

cmd=("$runtime" run --containall
     -B "$BIDS_DIR:/data:ro" -B "$OUT_DIR:/out" -B "$work:/work"
     "$SIF" /data /out participant
     --participant-label "$label" --work-dir /work
     --nprocs "${SLURM_CPUS_PER_TASK:-1}" "${skip[@]}" "${args[@]}")

echo "task $task/$n: sub-$label" >&2
if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
mkdir -p "$OUT_DIR" "$work"
status=0
"${cmd[@]}" || status=$?
if [ "$status" = 0 ] && [ "${KEEP_WORK:-1}" = 0 ]; then
    rm -rf "$work"
fi
exit "$status"

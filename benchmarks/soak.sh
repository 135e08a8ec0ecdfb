#!/usr/bin/env bash
# Soak: the main job (examples/train_gpt.py) for many steps under zerofx-launch on 2 ranks, in
# each collective form (native, p2p, shm) at ZeRO stages 2 and 3, under glibc's strictest
# heap checks (MALLOC_CHECK_=3: a corrupted heap aborts at once instead of later). Any run
# that does not exit 0 fails the soak and keeps its log.
#
#     bash benchmarks/soak.sh [steps]        # default 2000; logs and configs under $SOAK_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
steps=${1:-2000}
out=${SOAK_DIR:-$(mktemp -d /tmp/zerofx-soak.XXXXXX)}
mkdir -p "$out"
export MALLOC_CHECK_=3 MALLOC_PERTURB_=165
# glibc 2.34+ moved these checks into libc_malloc_debug.so: without it preloaded,
# MALLOC_CHECK_ is silently ignored (a 1-byte overflow then free() passes unnoticed)
debug_lib=$(ldconfig -p 2>/dev/null | awk '/libc_malloc_debug\.so\.0 /{print $NF; exit}')
if [ -n "$debug_lib" ]; then
  export LD_PRELOAD="$debug_lib${LD_PRELOAD:+:$LD_PRELOAD}"
else
  echo "soak: libc_malloc_debug.so.0 not found: MALLOC_CHECK_ may be ignored by this glibc" >&2
fi
failed=0
for stage in 2 3; do
  base=examples/ds_config.json
  [ "$stage" = 3 ] && base=examples/ds_config_zero3.json
  for form in native p2p shm; do
    case $form in
      native) pins='{"reduce_form": "reduce_scatter", "gather_form": "all_gather"}' ;;
      *) pins="{\"reduce_form\": \"$form\", \"gather_form\": \"$form\"}" ;;
    esac
    cfg="$out/stage${stage}_${form}.json"
    python3 - "$base" "$cfg" "$pins" <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["zerofx"] = {**cfg.get("zerofx", {}), **json.loads(sys.argv[3])}
cfg["steps_per_print"] = 10**6
json.dump(cfg, open(sys.argv[2], "w"), indent=1)
EOF
    log="$out/stage${stage}_${form}.log"
    start=$(date +%s)
    zerofx-launch --num_gpus 2 examples/train_gpt.py --deepspeed_config "$cfg" \
        --steps "$steps" --eval_every 500 --log_every 500 --out_dir "$out/run_${stage}_${form}" \
        > "$log" 2>&1
    rc=$?
    echo "stage $stage, form $form: exit $rc after $(( $(date +%s) - start )) s, $steps steps ($log)"
    [ $rc -ne 0 ] && failed=1 && tail -20 "$log"
  done
done
exit $failed

#!/usr/bin/env bash
# The GPU-only tests in one command, each group's log headed by the device, versions and commit: what
# a device call runs before its timings (CI has no GPU, so these tests skip there). The groups, in
# order of what breaks first when the kernels change:
#   kernels  tests/ops/triton (every mask rule, dtype x head dim, both dQ strategies, KV cache,
#            custom-op checks, compiled and exported blocks, flex) and tests/nn/test_hstu_block.py
#   models   whole models on both backends, serving's CUDA graphs and export, the trainer's compiled and
#            CUDA-graph steps, kill and resume, the loader-built layouts
#
#   bash benchmarks/gpu_tests.sh [OUT_DIR] [GROUP...]     # default: runs/gpu_tests, every group
#
# pytest-xdist, where installed, spreads a group over the CPU cores (the kernels' compiles dominate:
# on an H100 with 16 workers 110 of the kernel group's 230 tests took 3 min; serially the group runs
# past 10 min). Each group's time limit is GPU_TESTS_LIMIT_S seconds (default 420): a group cut short
# leaves its log with what finished, and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_tests}
shift $(( $# > 0 ? 1 : 0 ))
groups=("${@:-kernels models}")
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these tests need one')" \
  || exit 2
workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n "$(( $(nproc) < 16 ? $(nproc) : 16 ))")
commit=${GENREC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
header=$(python3 -c "import torch, triton; print(f'# device: {torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__})')")
status=0
for group in ${groups[*]}; do
  case $group in
    kernels) files=(tests/ops/triton tests/nn/test_hstu_block.py) ;;
    models) files=(tests/models tests/serve/test_graphs.py tests/serve/test_export.py tests/train/test_trainer.py
                   tests/train/test_resume.py tests/nn/test_prepared.py) ;;
    *) echo "unknown group $group (kernels, models)" >&2; exit 2 ;;
  esac
  log="$out/tests_${group}.log"
  { echo "$header; date $(date -u +%F); commit $commit"
    echo "# command: python3 -m pytest ${workers[*]} -v -p no:cacheprovider --timeout 300 ${files[*]} -rfEs --durations=10"
  } > "$log"
  timeout "${GPU_TESTS_LIMIT_S:-420}" python3 -m pytest "${workers[@]}" -v -p no:cacheprovider --timeout 300 \
    "${files[@]}" -rfEs --durations=10 >> "$log" 2>&1
  rc=$?
  [ $rc -eq 124 ] && echo "# cut by the ${GPU_TESTS_LIMIT_S:-420}-s limit before pytest's summary" >> "$log"
  echo "$group: rc $rc, $(grep -c ' PASSED' "$log") passed, $(grep -c ' FAILED' "$log") failed: $log"
  [ $rc -ne 0 ] && status=1
done
exit $status

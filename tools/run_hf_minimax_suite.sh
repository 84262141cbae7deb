#!/usr/bin/env bash
# Hugging Face's own MiniMax tests against this package: once unpatched, once with every MiniMax model patched
# by patch_minimax (tools/hf_minimax_plugin.py; both runs re-enable the four tests HF skips because its cache
# cannot crop). Needs a checkout of the transformers repository's tests (tests/models/minimax, tests/generation,
# the common test files) next to the installed transformers:
#   git clone --depth 1 https://github.com/huggingface/transformers /tmp/transformers
#   bash tools/run_hf_minimax_suite.sh /tmp/transformers
# Prints each run's summary; the full outputs go to hf_unpatched.txt and hf_patched.txt here.
set -uo pipefail
src="${1:?usage: run_hf_minimax_suite.sh TRANSFORMERS_CHECKOUT}"
here="$(cd "$(dirname "$0")" && pwd)"
out="$PWD"
cd "$src" || exit 1
args=(tests/models/minimax/test_modeling_minimax.py -q -rfE --tb=short -p hf_minimax_plugin -p no:cacheprovider)
PYTHONPATH="$here:." env -u LIGHTNING_PATCH python3 -m pytest "${args[@]}" >"$out/hf_unpatched.txt" 2>&1
PYTHONPATH="$here:." LIGHTNING_PATCH=1 python3 -m pytest "${args[@]}" >"$out/hf_patched.txt" 2>&1
for run in unpatched patched; do
  printf '%-10s %s\n' "$run" "$(grep -E '(passed|failed).* in ' "$out/hf_$run.txt" | tail -1)"
done
comm -13 <(grep -oE '^FAILED [^ ]+' "$out/hf_unpatched.txt" | sort) <(grep -oE '^FAILED [^ ]+' "$out/hf_patched.txt" | sort) \
  | sed 's/^/fails only patched: /'

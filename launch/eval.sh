#!/usr/bin/env bash
# End-to-end evaluation of a trained run: sample the eval prompts -> grade -> report.
#
#   OPENAI_API_KEY=... launch/eval.sh WORKDIR [OUTPUT_DIR]
#
# Environment (all optional):
#   GRADER_MODEL   grader model (default gpt-4o)
#   BASE_URL       OpenAI-compatible endpoint for the grader (default: OpenAI)
#   CONCURRENCY    grader requests in flight (default 16)
#   RUBRIC         story (default: story beginnings and probes) or instruct (the
#                  instruction-following set, for a model trained on the Instruct layout)
#   SAMPLE_FLAGS   extra flags for `python -m tinystories_jax.sample`
#   GRADE_FLAGS    extra flags for `python -m tinystories_jax.grade`, e.g.
#                  "--reference_stories=data/valid.jsonl --reference_count=100"
# Rerunning resumes: finished grades are kept in OUTPUT_DIR/grades/grades.jsonl.
set -euo pipefail

WORKDIR="${1:?usage: launch/eval.sh WORKDIR [OUTPUT_DIR]}"
OUT="${2:-${WORKDIR%/}/eval}"
PYTHON="${PYTHON:-python}"
mkdir -p "$OUT"

RUBRIC="${RUBRIC:-story}"

# 1. The packaged eval prompts for the rubric (story: beginnings and the three probe sets).
"$PYTHON" -c "import sys; from tinystories_jax.grading import evalsets; \
print(evalsets.write_prompts(sys.argv[1], evalsets.SETS_FOR_RUBRIC[sys.argv[2]]), 'prompts')" \
    "$OUT/prompts.jsonl" "$RUBRIC"

# 2. Completions from the trained model; rows carry id, prompt, completion, model, sampler.
#    `sample` skips rows already in the file, so a rerun finishes what is missing; with one
#    completion per prompt already there (and default SAMPLE_FLAGS) there is nothing to do.
prompts=$(wc -l < "$OUT/prompts.jsonl")
done_rows=0
[[ -f "$OUT/completions.jsonl" ]] && done_rows=$(wc -l < "$OUT/completions.jsonl")
if [[ -n "${SAMPLE_FLAGS:-}" || "$done_rows" -lt "$prompts" ]]; then
  # shellcheck disable=SC2086
  "$PYTHON" -m tinystories_jax.sample --workdir="$WORKDIR" \
      --prompts_file="$OUT/prompts.jsonl" --output="$OUT/completions.jsonl" ${SAMPLE_FLAGS:-}
fi

# 3. Grade and report (summary.json, report.md, charts).
# shellcheck disable=SC2086
"$PYTHON" -m tinystories_jax.grade --completions="$OUT/completions.jsonl" \
    --output_dir="$OUT/grades" --model="${GRADER_MODEL:-gpt-4o}" --rubric="$RUBRIC" \
    --concurrency="${CONCURRENCY:-16}" ${BASE_URL:+--base_url="$BASE_URL"} ${GRADE_FLAGS:-}

echo "Report: $OUT/grades/report.md"

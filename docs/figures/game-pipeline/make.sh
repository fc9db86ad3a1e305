#!/usr/bin/env bash
# Reproduces docs/figures/game-pipeline.png: the four algorithms through the whole pipeline
# (vLLM pools, judge service, DeepSpeed learner, weight sync) on configs/game-cpu.yaml, beside
# exact tabular Nash-MP on the same game, reference policy, beta and eta. ~2 min per run on the
# 2-core CPU. Run from anywhere; runs go to a temporary folder, their metrics are kept here.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
nlhf=${NLHF:-$repo/.venv/bin/nlhf}
python=${PYTHON:-$repo/.venv/bin/python}
runs=$(mktemp -d /tmp/nlhf-game-pipeline-XXXXXX)
cd "$repo"
for a in ${ALGORITHMS:-nash-mp online-ipo egpo nash-md-pg}; do
  extra=""  # EGPO judges each response against opponents other than its pair partner: 2 of 3 siblings
  [ "$a" = egpo ] && extra="algorithm.opponents_per_response=2"
  $nlhf train --config configs/game-cpu.yaml algorithm.name=$a output_dir=$runs/$a progress=plain \
      win_rate_every=0 cluster.dashboard=false $extra > "$runs/$a.log" 2>&1
  "$python" "$here/plot.py" extract "$runs/$a" "$here/$a.json"
done
# Exact Nash-MP from the pipeline's own starting policy (the tiny LM's initial action distribution).
"$python" "$here/plot.py" ref "$here/nash-mp.json" "$runs/ref.npy"
$nlhf game make --kind random --n 10 --seed 0 --out "$runs/game.npy"
$nlhf game run --matrix "$runs/game.npy" --ref "$runs/ref.npy" --beta 0.2 --eta 0.4 --algorithm nash-mp \
    --queries 24 --out "$here/exact-nash-mp.json"
"$python" "$here/plot.py" plot "$here" "$repo/docs/figures/game-pipeline.png"
rm -rf "$runs"

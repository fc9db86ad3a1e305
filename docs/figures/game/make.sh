#!/usr/bin/env bash
# Reproduces docs/figures/game-convergence.png and docs/figures/game-convergence-cyclic.png
# (exact matrix games; a few seconds on one CPU core). Run from the repository root.
set -euo pipefail
cd "$(dirname "$0")"
nlhf=${NLHF:-nlhf}

# Random game (EGPO's generator), n=100, seed 0, uniform reference, beta=0.1, 400 queries.
$nlhf game make --kind random --n 100 --seed 0 --out random100.npy
for a in nash-mp nash-md omd egpo; do
  $nlhf game run --matrix random100.npy --beta 0.1 --algorithm $a --queries 400 --out random100-$a.json
done
$nlhf game plot random100-nash-mp.json random100-nash-md.json random100-omd.json random100-egpo.json \
  --title "random game n=100 (seed 0), uniform π_ref, β=0.1" --out ../game-convergence.png

# Cyclic (rock-paper-scissors-like) game, n=11, softmax reference (seed 0), beta=0.01, 2000 queries.
$nlhf game make --kind cyclic --n 11 --out cyclic11.npy
$nlhf game ref --kind softmax --n 11 --seed 0 --out ref11.npy
for a in nash-mp nash-md omd egpo; do
  $nlhf game run --matrix cyclic11.npy --ref ref11.npy --beta 0.01 --algorithm $a --queries 2000 --out cyclic11-$a.json
done
$nlhf game plot cyclic11-nash-mp.json cyclic11-nash-md.json cyclic11-omd.json cyclic11-egpo.json \
  --title "cyclic game n=11, softmax π_ref (seed 0), β=0.01" --out ../game-convergence-cyclic.png
rm -f random100.npy cyclic11.npy ref11.npy

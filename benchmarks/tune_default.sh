#!/bin/sh
# Fine-tune experts (by default 32, and their router rows) of the default model on Python source code, under a 25% expert
# cache budget; perplexity before/after on held-out Python and on the evaluation text. Results: benchmarks/tune.md.
set -e
W=${1:-/tmp/moepager-tune}
ARGS=${2:---auto 32 --router --steps 60 --seq-len 256 --lr 2e-3 --save-every 30 --expert-memory 25%}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1  # one thread: the shared 2-core machine collapses spinning OpenMP waits
mkdir -p "$W"
LIB=$(python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
cat "$LIB/argparse.py" "$LIB/shutil.py" "$LIB/tarfile.py" > "$W/train.txt"  # the tuning domain: Python code
cp "$LIB/inspect.py" "$W/heldout.txt"                                      # held out, same domain
MODEL=$(python -c "from moepager.moefy.default_model import default_model_path; print(default_model_path())")
rm -rf "$W/store"
moepager convert "$MODEL" "$W/store" --quiet
EVAL=src/moepager/data/eval_gpl3.txt
for t in heldout eval; do
  f="$W/heldout.txt"; [ $t = eval ] && f=$EVAL
  moepager eval "$W/store" --text "$f" --max-tokens 8192 --json > "$W/before_$t.json"
done
# shellcheck disable=SC2086
/usr/bin/time -v moepager tune "$W/store" --text "$W/train.txt" $ARGS --quiet 2> "$W/time.txt" | tee "$W/tune.txt"
for t in heldout eval; do
  f="$W/heldout.txt"; [ $t = eval ] && f=$EVAL
  moepager eval "$W/store" --text "$f" --max-tokens 8192 --json > "$W/after_$t.json"
done
moepager experts "$W/store" generations
grep "Maximum resident" "$W/time.txt"
cat "$W"/before_*.json "$W"/after_*.json

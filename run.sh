#!/usr/bin/env bash
# The whole pipeline on a fresh machine, on 2 CPU cores in about 11 minutes: install,
# download + tokenize WikiText-2, train config/wikitext_tiny.py, evaluate it on the test split, write a sample.
#   bash run.sh                                       # downloads WikiText-2 (the tokenized release)
#   bash run.sh --source=path/to/wikitext-2           # or reads wiki.{train,valid,test}.tokens from a local folder
# Arguments go to prepare.py. Run it again and it goes on where it stopped: data already prepared is kept, a run
# that was interrupted resumes, a trained model is evaluated and sampled again. To start over:
#   rm -r data/wikitext-2 out-wikitext-tiny
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check -r requirements.txt

if [ -f data/wikitext-2/meta.json ]; then
  echo "run.sh: data/wikitext-2 is prepared already: keeping it"
else
  $py prepare.py --dataset=wikitext-2 "$@"
fi
if [ -f out-wikitext-tiny/ckpt.pt ]; then
  echo "run.sh: out-wikitext-tiny holds a model: going on from its checkpoint (rm -r out-wikitext-tiny to start over)"
  $py train.py config/wikitext_tiny.py --init_from=resume
else
  $py train.py config/wikitext_tiny.py
fi
$py evaluate.py --model=out-wikitext-tiny --split=test
$py sample.py --model=out-wikitext-tiny --start="The history of" --max_new_tokens=100 --seed=1

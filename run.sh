#!/usr/bin/env bash
# The whole pipeline on a fresh machine, on a CPU in about 15 minutes:
# install, download + tokenize WikiText-2, train the tiny config, evaluate on the test split, sample.
#   bash run.sh                                       # downloads WikiText-2 (tokenized release)
#   bash run.sh --source=path/to/wikitext-2           # or reads the files from a local folder
# Arguments go to prepare.py.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
py=.venv/bin/python
$py -m pip install -q --disable-pip-version-check -r requirements.txt
$py prepare.py --dataset=wikitext-2 "$@"
$py train.py config/wikitext_tiny.py
$py evaluate.py --out_dir=out-wikitext-tiny --split=test
$py sample.py --out_dir=out-wikitext-tiny --start="The history of" --max_new_tokens=100 --seed=1

"""scrub.py on the labelled set of tests/pii_labelled.py (recall per kind, false positives on
look-alikes), with and without the optional libraries, on WikiText (nothing to replace), its
worked examples, and copied alone."""

import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import scrub
from pii_labelled import lookalikes, positives

ROOT = Path(__file__).resolve().parents[1]


def measure(libraries):
    """({kind: recall}, overall recall, [(category, text, scrubbed)] of the look-alikes changed)."""
    hits, totals = Counter(), Counter()
    for kind, text, expected in positives():
        totals[kind] += 1
        hits[kind] += scrub.scrub(text, libraries=libraries)[0] == expected
    changed = [(category, text, out) for category, text in lookalikes()
               if (out := scrub.scrub(text, libraries=libraries)[0]) != text]
    recall = {kind: hits[kind] / totals[kind] for kind in totals}
    return recall, sum(hits.values()) / sum(totals.values()), changed


def test_the_labelled_set_covers_every_kind_with_hundreds_of_cases():
    cases = positives()
    assert Counter(kind for kind, _, _ in cases) == {kind: 80 for kind in scrub.KINDS}
    # every expected output holds its kind's placeholder; the set is the same at every call
    assert all(scrub.PLACEHOLDER[kind] in expected for kind, _, expected in cases)
    assert cases == positives() and len(lookalikes()) >= 500
    assert len({category for category, _ in lookalikes()}) >= 12


def check_measures(libraries):
    recall, overall, changed = measure(libraries)
    assert overall >= 0.95, recall
    assert min(recall.values()) >= 0.95, recall
    assert len(changed) <= 0.05 * len(lookalikes()), changed


def test_recall_and_false_positives_with_the_built_in_patterns():
    check_measures(libraries=False)


def test_recall_and_false_positives_with_phonenumbers_and_detect_secrets():
    if scrub.backends() == scrub.backends(libraries=False):
        pytest.skip("neither phonenumbers nor detect-secrets is installed")
    check_measures(libraries=True)


def test_worked_examples():
    text = "Mail jane.doe@example.com or call +44 20 7946 0958 from 203.0.113.7."
    assert scrub.scrub(text) == ("Mail <EMAIL> or call <PHONE> from <IP>.",
                                 Counter({"EMAIL": 1, "PHONE": 1, "IP": 1}))
    text = "SSN 123-45-6789, card 4111 1111 1111 1111; version 1.2.3.4, ISBN 978-3-16-148410-0"
    assert scrub.scrub(text) == ("SSN <SSN>, card <CARD>; version 1.2.3.4, ISBN 978-3-16-148410-0",
                                 Counter({"SSN": 1, "CARD": 1}))
    assert scrub.find("call 212-555-0147 now") == [(5, 17, "PHONE")]
    assert scrub.luhn_ok("4111111111111111") and not scrub.luhn_ok("4111111111111112")
    assert scrub.iban_ok("DE89370400440532013000") and not scrub.iban_ok("DE89370400440532013001")


def test_finds_do_not_overlap_and_the_first_kind_wins():
    text = ("key sk_live_4eC39HqLyjWDarjtT1zdp7dc at https://ops:hunter2@db.example.com, "
            "from 10.1.2.3 to ops@example.com, IBAN GB29 NWBK 6016 1331 9268 19")
    spans = scrub.find(text)
    assert [kind for _, _, kind in spans] == ["SECRET", "SECRET", "IP", "EMAIL", "IBAN"]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    # the password's "hunter2@db.example.com" is no e-mail address: the secret came first
    assert "https://ops:<SECRET>@db.example.com" in scrub.scrub(text)[0]


def test_kinds_chooses_what_is_replaced():
    text = "jane@example.com, 212-555-0147"
    assert scrub.scrub(text, kinds=("EMAIL",)) == ("<EMAIL>, 212-555-0147", Counter({"EMAIL": 1}))
    assert scrub.scrub(text, kinds=()) == (text, Counter())
    with pytest.raises(ValueError, match="unknown kinds \\['NAME'\\]: choose from SECRET, EMAIL"):
        scrub.scrub(text, kinds=("NAME",))


def test_a_private_key_block_goes_whole_and_a_public_key_stays():
    body = "\n".join(["MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"] * 5)
    private = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    public = f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----"
    assert scrub.scrub(f"a\n{private}\nb") == ("a\n<SECRET>\nb", Counter({"SECRET": 1}))
    # a block cut before its END: its base64 lines still go
    assert scrub.scrub(private.rsplit("\n", 1)[0] + "\n\nnext")[0] == "<SECRET>\n\nnext"
    assert scrub.scrub(public) == (public, Counter())


def test_scrub_is_a_pure_function_that_worker_processes_can_run():
    assert pickle.loads(pickle.dumps(scrub.scrub)) is scrub.scrub
    texts = [text for _, text, _ in positives()[::20]]
    assert [scrub.scrub(t) for t in texts] == [scrub.scrub(t) for t in texts]


def test_wikitext_has_nothing_to_replace(shared_data):
    for path in [shared_data / "wikitext-2" / "wiki.valid.tokens",
                 shared_data / "wikitext-2-raw" / "wiki.test.raw"]:
        text = path.read_text(encoding="utf-8")
        assert scrub.find(text, libraries=False) == [], path
        assert scrub.find(text) == [], path


def test_scrub_and_dedup_run_copied_alone(tmp_path):
    for name in ("scrub.py", "dedup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    code = ("import scrub, dedup; print(scrub.scrub('ssh admin@10.0.0.7')[0]); "
            "d = dedup.Deduplicator('near'); print(d.keep('a b c'), d.keep('a  b c'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.split("\n")[:2] == ["ssh admin@<IP>", "True False"], result.stderr

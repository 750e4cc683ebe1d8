"""
Personal data and secrets out of a training corpus: each find is replaced by its kind's placeholder.

    scrub("Mail jane.doe@example.com or call +44 20 7946 0958 from 203.0.113.7.")
    -> ('Mail <EMAIL> or call <PHONE> from <IP>.', Counter({'EMAIL': 1, 'PHONE': 1, 'IP': 1}))

The kinds, and what keeps their look-alikes out:
- EMAIL   name@domain.tld, also "name [at] domain [dot] org"; not "icon@2x.png", "@user" or
          WikiText's "@,@".
- PHONE   international (+44 20 7946 0958, 0049 30 1234567) and national: North American
          ((212) 555-0147, 212-555-0147) and trunk-0 forms (020 7946 0958, 01 23 45 67 89,
          (030) 1234567); any 7 to 15 digits after a word such as "phone", "tel" or "call". Not
          dates, times, ISBNs, prices, scores, page ranges, coordinates or thousands (12 345 678).
          With `phonenumbers` installed (pip install phonenumbers), a number must also be valid in
          its numbering plan (an international one, or a national one in one of REGIONS).
- IP      IPv4 (checked octets) and IPv6 (checked by `ipaddress`). A dotted quad after a version
          word ("version", "release", "==", "nginx/", ...) is a version and stays; so does one whose
          four parts are single digits (1.2.3.4) unless a word like "IP", "host" or "server" comes
          before it.
- CARD    13 to 19 digits grouped as on a payment card, a card network's prefix, a valid Luhn check.
- IBAN    the country's length and a valid mod-97 check (DE89 3704 0044 0532 0130 00).
- SSN     US social security numbers, 123-45-6789 (not 000-, 666-, 9xx-); spaced or bare after
          "SSN" or "social security".
- SECRET  AWS, GitHub, GitLab, Slack, Stripe, Google, OpenAI, Anthropic, Hugging Face, npm, PyPI,
          SendGrid and Twilio keys and tokens, JWTs, a password in a URL (https://user:pw@host),
          private-key blocks (PEM and PuTTY; not public keys or certificates). With `detect-secrets`
          installed (pip install detect-secrets), its providers' patterns are added (not its entropy
          and keyword detectors: prose trips them).

Out of scope: names of people, postal addresses and the like, which need a tagger (a named-entity
model), not patterns. Everything here is patterns and checksums: a number in an unusual layout is
missed, and a look-alike in a phone number's layout is replaced; tests/test_scrub.py measures both
on a labelled set (tests/pii_labelled.py).

scrub() is a pure function of its text, safe to run in worker processes. This file imports only the
standard library (and the optional libraries above where installed, unless libraries=False): it runs
copied alone.
"""

import bisect
import ipaddress
import re
from collections import Counter

# the kinds, in the order they are looked for: where two finds overlap, the earlier kind wins
KINDS = ("SECRET", "EMAIL", "IBAN", "CARD", "SSN", "IP", "PHONE")
PLACEHOLDER = {kind: f"<{kind}>" for kind in KINDS}
# with phonenumbers: the numbering plans a national phone number (no + or 00) is checked against
REGIONS = ("US", "CA", "GB", "IE", "DE", "AT", "CH", "FR", "BE", "NL", "IT", "ES", "PT", "SE", "NO",
           "DK", "FI", "PL", "AU", "NZ", "IN", "JP", "BR", "MX", "ZA")


def scrub(text, kinds=KINDS, libraries=True):
    """The text with every find replaced by its kind's placeholder, and the count of each kind.

        scrub("SSN 123-45-6789, card 4111 1111 1111 1111; version 1.2.3.4, ISBN 978-3-16-148410-0")
        -> ('SSN <SSN>, card <CARD>; version 1.2.3.4, ISBN 978-3-16-148410-0',
            Counter({'SSN': 1, 'CARD': 1}))
    """
    spans = find(text, kinds, libraries)
    if not spans:
        return text, Counter()
    out, last = [], 0
    for start, end, kind in spans:
        out += [text[last:start], PLACEHOLDER[kind]]
        last = end
    out.append(text[last:])
    return "".join(out), Counter(kind for _, _, kind in spans)


def find(text, kinds=KINDS, libraries=True):
    """[(start, end, kind)] of the finds in text, in order and not overlapping.

        find("call 212-555-0147 now") -> [(5, 17, 'PHONE')]
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}: choose from {', '.join(KINDS)}")
    starts, chosen = [], []
    runs = _number_runs(text)
    for kind in (k for k in KINDS if k in kinds):
        for start, end in FINDERS[kind](text, libraries, runs):
            # keep a find that overlaps none kept so far (kinds earlier in KINDS went first)
            i = bisect.bisect_right(starts, start)
            if (i and chosen[i - 1][1] > start) or (i < len(chosen) and chosen[i][0] < end):
                continue
            starts.insert(i, start)
            chosen.insert(i, (start, end, kind))
    return chosen


def backends(libraries=True):
    """What finds phone numbers and secrets here, for a dataset's meta.json.

        backends() -> {'PHONE': 'built-in', 'SECRET': 'built-in'}     (neither library installed)
    """
    phone, secrets = _phonenumbers(libraries), _detect_secrets_patterns(libraries)
    return {"PHONE": "built-in + phonenumbers " + phone.__version__ if phone else "built-in",
            "SECRET": "built-in + detect-secrets" if secrets else "built-in"}


def _before(text, start, width=40):
    """The `width` characters before start, lower-cased: where context words are looked for."""
    return text[max(0, start - width):start].lower()


# ----------------------------------------------------------------------------- where to look

# Speed: a pattern that starts by looking behind (or at any letter) is tried at every character, at
# ~10 MB/s in Python's re; a literal or a digit at its start is found at 50 MB/s to 1 GB/s. So each
# kind is first looked for that way (a run of digits, an "@", a ":", a key's prefix), and its full
# pattern runs only around what was found.
_NUMBER_RUN = re.compile(r"\d[\d \u00a0\-./()+]{5,}\d")


def _windows(text, places, before, after):
    """[(start, end)] of text from `before` characters before to `after` characters after each
    (start, end) of places (in order of start), merged where they meet.

        _windows("0123456789", [(2, 3), (4, 5), (8, 9)], 1, 1) -> [(1, 6), (7, 10)]
    """
    windows = []
    for start, end in places:
        start, end = max(0, start - before), min(len(text), end + after)
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(end, windows[-1][1]))
        else:
            windows.append((start, end))
    return windows


def _number_runs(text):
    """[(start, end)] of where a phone number, an IPv4 address, a card or an SSN can be: runs of 7
    or more digits and separators, 3 characters wider on each side (a leading + or "(", and what
    the patterns look at around a number).

        _number_runs("call 212-555-0147 or 1 @,@ 000") -> [(2, 20)]
    """
    return _windows(text, (m.span() for m in _NUMBER_RUN.finditer(text)), 3, 3)


def _windows_around(text, literals, before, after):
    """_windows around each place where one of the literals is.

        _windows_around("a key AKIA...", ["AKIA"], 2, 4) -> [(4, 10)]
    """
    places = []
    for literal in literals:
        at = text.find(literal)
        while at >= 0:
            places.append((at, at))
            at = text.find(literal, at + 1)
    return _windows(text, sorted(places), before, after)


def _in_windows(pattern, text, windows):
    """pattern's matches inside the windows [(start, end)] of text (a look behind may see before a
    window's start)."""
    for start, end in windows:
        yield from pattern.finditer(text, start, end)


# ----------------------------------------------------------------------------- e-mail addresses

_EMAIL = re.compile(r"(?<![\w.%+'-])[^\W_](?:[\w.%+'-]*[\w%+-])?@"
                    r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))"
                    r"(?![\w@-]|\.[A-Za-z0-9])")
_EMAIL_SPELLED = re.compile(r"(?<![\w.+-])[\w.+-]+ ?[\[(]at[\])] ?[\w-]+"
                            r"(?: ?[\[(]dot[\])] ?[\w-]+)+", re.IGNORECASE)
# file name endings, not top-level domains: icon@2x.png is an image
_FILE_ENDINGS = {"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "pdf",
                 "css", "js", "ts", "py", "txt", "md", "json", "yaml", "yml", "html", "htm", "xml",
                 "csv", "zip", "gz", "mp3", "mp4"}
_AT = re.compile(r"@(?=[^\W_])")
_EMAIL_LOCAL = re.compile(r"[\w.%+'-]{1,64}$")


def _emails(text, libraries, runs):
    end = 0
    for at in _AT.finditer(text):
        before_at = _EMAIL_LOCAL.search(text, max(0, at.start() - 64), at.start())
        if at.start() < end or before_at is None:
            continue
        # the name before the @ starts at a letter or digit
        start = before_at.start()
        while start < at.start() - 1 and not text[start].isalnum():
            start += 1
        m = _EMAIL.match(text, start)
        if m and m[2].lower() not in _FILE_ENDINGS:
            end = m.end()
            yield m.span()
    if "at]" in text or "at)" in text or "AT]" in text or "AT)" in text:
        yield from (m.span() for m in _EMAIL_SPELLED.finditer(text))


# ----------------------------------------------------------------------------- phone numbers

# a run of digit groups: 12, (212), (0), joined by one separator each: " - ", "-", ".", "/", a
# space (or none after a parenthesis); not inside a word, a decimal, a time (10:30) or a longer run
_PHONE_GROUP = r"(?:\(\+?\d{1,5}\)|\d+)"
_PHONE_SEP = r"(?: - |[-./]|[ \u00a0]|(?<=\)))"
_PHONE = re.compile(rf"(?<![\w+@/.\-\u2013])(?<!\d[:,])(?:\+ ?)?"
                    rf"{_PHONE_GROUP}(?:{_PHONE_SEP}{_PHONE_GROUP})*")
# a word that says a phone number follows: "tel.", "phone number:", "call me at", "fax"
_PHONE_WORDS = re.compile(r"\b(?:tel|telephone|phone|ph|mobile|mob|cell|cellphone|fax|call|ring|"
                          r"text|sms|whatsapp|contact|dial|hotline|helpline|reach)\b\.?"
                          r"(?:\W{1,3}(?:me|us|him|her|them|at|on|to|number|no|nr|num|is|was|are)"
                          r"\b\.?){0,3}\W{0,12}$")
# a word that says a number is something else: "ISBN 0 19 852663 6", "pp. 1203-1215"
_NOT_PHONE_WORDS = re.compile(r"\b(?:isbn(?:-1[03])?|issn|doi|arxiv|pmid|oclc|lccn|pp?|pages?|vol|"
                              r"patent|serial|invoice|order|account|acct|zip|postcode)\b\.?"
                              r"[\W\d]{0,16}$")
_NANP = re.compile(r"(?:1[-. ]?)?(?:\([2-9]\d\d\) ?|[2-9]\d\d(?P<sep>[-. ]))[2-9]\d\d"
                   r"(?(sep)(?P=sep)|[-. ])\d{4}")
_DATE = re.compile(r"\d{1,4}([-./])\d{1,2}\1\d{1,4}")


def _phones(text, libraries, runs):
    lib = _phonenumbers(libraries)
    for m in _in_windows(_PHONE, text, runs):
        run = m.group()
        if sum(c.isdigit() for c in run) < 7:
            continue
        # the run, or the longest part of it from its start that is a phone number (a run may
        # take in the number after it: "call 020 7946 0958 12 times")
        ends = [g.end() for g in re.finditer(r"\(\+?\d+\)|\d+", run)]
        for end in reversed(ends):
            if _is_phone(run[:end], text, m.start(), m.start() + end, lib):
                yield m.start(), m.start() + end
                break


def _is_phone(candidate, text, start, end, lib):
    """Whether candidate, found at text[start:end], is a phone number."""
    # the digits to dial, without a trunk 0 in parentheses or an international 00
    digits = re.sub(r"\D", "", candidate.replace("(0)", ""))
    digits = digits[2:] if re.match(r"00[1-9]", candidate) else digits
    before, after = _before(text, start), text[end:end + 1]
    if not 7 <= len(digits) <= 15 or after in ("%", "°", "'", "\u2032", "\u2033"):
        return False
    if _NOT_PHONE_WORDS.search(before) or before.rstrip()[-1:] in ("$", "€", "£", "¥", "#", "№"):
        return False
    groups = re.findall(r"\d+", candidate)
    seps = re.findall(r"(?<=[\d)])[^\d()+]+(?=[\d(])", candidate)
    # a decimal or a coordinate: 51.5074, +40.712776, +51.5074-000.1278
    if "." in seps and not (len(groups) >= 3 and max(map(len, groups[1:])) <= 4
                            and set(seps) == {"."}):
        return False
    # + or 00, the country code, then a separator: 0044 20 7946 0958 (not 0062023117)
    if candidate.startswith(("+", "(+")) or re.match(r"00[1-9]\d{0,2}\D", candidate):
        return len(digits) >= 8 and (lib is None or _valid_with_library(lib, candidate, None))
    said = _PHONE_WORDS.search(before)
    # groups of three after the first, all alike: 12 345 678 or 1.234.567 is a quantity
    thousands = (len(groups) > 1 and len(set(seps)) == 1 and len(groups[0]) <= 3
                 and all(len(g) == 3 for g in groups[1:]) and not candidate.startswith("0"))
    if (thousands and not said) or _DATE.fullmatch(candidate):
        return False
    if _NANP.fullmatch(candidate):
        regions = ("US", "CA")
    elif _trunk_form(candidate, groups, seps, digits) or said:
        regions = REGIONS
    else:
        return False
    return lib is None or any(_valid_with_library(lib, candidate, region) for region in regions)


def _trunk_form(candidate, groups, seps, digits):
    """Whether candidate is a national number behind a trunk 0: 020 7946 0958, (030) 1234567,
    06-12345678, 01.23.45.67.89."""
    if not (re.match(r"\(?0[1-9]", candidate) and 9 <= len(digits) <= 11 and len(groups) >= 2):
        return False
    # with dots only the French way: pairs of digits
    if "." in seps:
        return set(seps) == {"."} and all(len(g) == 2 for g in groups)
    return len(groups[0]) <= 5 and min(map(len, groups)) >= 2


def _valid_with_library(lib, candidate, region):
    try:
        number = lib.parse(re.sub(r"^00", "+", candidate), region)
    except lib.NumberParseException:
        return False
    return lib.is_valid_number(number)


_libraries = {}


def _phonenumbers(libraries):
    """The phonenumbers module when installed and allowed, else None."""
    if not libraries:
        return None
    if "phonenumbers" not in _libraries:
        try:
            import phonenumbers
        except ImportError:
            phonenumbers = None
        _libraries["phonenumbers"] = phonenumbers
    return _libraries["phonenumbers"]


# ----------------------------------------------------------------------------- IP addresses

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = re.compile(rf"(?<![\w.\-])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\d|\.?[A-Za-z_]|-\w)")
# what makes a dotted quad a version: a word ("version", "upgrade to"), a pin ("==", ">="), a
# product/version token ("nginx/1.18.0.1")
_VERSION_WORDS = re.compile(r"(?:\b(?:v|ver|version|versions|release|released|releases|build|rev|"
                            r"revision|firmware|kernel|update|updated|upgrade|upgraded|downgrade|"
                            r"patch|changelog|sdk|api|python|java|node|php|ruby|perl|gcc|clang|"
                            r"linux|windows|android|ios|macos|chrome|firefox|package|library|tag|"
                            r"tagged|rc|os x|osx)\b\.?(?:\s+(?:to|from|of|is|at))?\W{0,4}|"
                            r"(?:==|[~^<>]=?)\s?|[a-z]/)$")
_IP_WORDS = re.compile(r"\b(?:ip|ips|ipv4|address|addr|host|hosts|hostname|server|ping|ssh|sftp|"
                       r"ftp|telnet|connect|connected|connection|gateway|dns|subnet|proxy|client|"
                       r"remote|peer|router|firewall|blocked|banned|login|logged|from|source|src|"
                       r"dst|destination)\b")
# two colons with at most 4 hex digits between: where an IPv6 address can be
_IPV6_HINT = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6 = re.compile(r"(?<![\w:.])\[?((?:[0-9A-Fa-f]{0,4}:){2,7}"
                   r"(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4}|:))(?:%\w+)?\]?(?![\w:])")


def _ips(text, libraries, runs):
    # IPv6 first: ::ffff:192.0.2.1 is one address
    for m in _in_windows(_IPV6, text, _windows(text, (h.span() for h in _IPV6_HINT.finditer(text)),
                                               40, 45)):
        address = m[1]
        # not "::", "a::b" or "std::map"
        if sum(bool(g) for g in address.split(":")) < 2 or not any(c.isdigit() for c in address):
            continue
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            continue
        yield m.span(1)
    for m in _in_windows(_IPV4, text, runs):
        before = _before(text, m.start(), 30)
        if _VERSION_WORDS.search(before):
            continue
        # 1.2.3.4 is more often a version or a section than an address
        if max(map(len, m.group().split("."))) == 1 and not _IP_WORDS.search(before):
            continue
        yield m.span()


# ----------------------------------------------------------------------------- cards, IBANs, SSNs

_CARD = re.compile(r"(?<![\w.\-/])(?<!\d,)\d(?:[ -]?\d){12,22}(?![\w/]|[.,]\d)")
# the ways cards are printed: in fours (13 to 19 digits), American Express 4-6-5, Diners 4-6-4
_CARD_LAYOUTS = {(4, 4, 4, 4), (4, 4, 4, 1), (4, 4, 4, 2), (4, 4, 4, 3), (4, 4, 4, 4, 3), (4, 6, 5),
                 (4, 6, 4), (4, 4, 5), (4, 4, 4, 7), (4, 4, 4, 6), (4, 4, 4, 5)}
# the networks' first digits: Visa, Mastercard, American Express, Diners, Discover, JCB, UnionPay,
# Maestro, Mir
_CARD_PREFIX = re.compile(r"4|5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)|3[47]|3(?:0[0-5]|[689])|"
                          r"6(?:011|5|4[4-9])|35(?:2[89]|[3-8])|62|81|50|5[6-8]|6[37]")


def luhn_ok(digits):
    """Whether a string of digits passes the Luhn check: luhn_ok("4111111111111111") -> True."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _cards(text, libraries, runs):
    for m in _in_windows(_CARD, text, runs):
        # not the rest of an IBAN-like number (one whose check failed)
        if re.search(r"[A-Z]{2}\d\d ?$", text[max(0, m.start() - 5):m.start()]):
            continue
        groups = re.findall(r"\d+", m.group())
        # the longest run of groups from the start that is laid out like a card
        for n in range(len(groups), 0, -1):
            layout, digits = tuple(map(len, groups[:n])), "".join(groups[:n])
            if not (13 <= len(digits) <= 19 and (n == 1 or layout in _CARD_LAYOUTS)):
                continue
            if luhn_ok(digits) and _CARD_PREFIX.match(digits):
                yield m.start(), m.start() + len(" ".join(groups[:n]))
            break


# the IBAN's length in each country of the IBAN registry
IBAN_LENGTHS = dict(
    AD=24, AE=23, AL=28, AT=20, AZ=28, BA=20, BE=16, BG=22, BH=22, BR=29, BY=28, CH=21,
    CR=22, CY=28, CZ=24, DE=22, DK=18, DO=28, EE=20, EG=29, ES=24, FI=18, FO=18, FR=27,
    GB=22, GE=22, GI=23, GL=18, GR=27, GT=28, HR=21, HU=28, IE=22, IL=23, IQ=23, IS=26,
    IT=27, JO=30, KW=30, KZ=20, LB=28, LC=32, LI=21, LT=20, LU=20, LV=21, MC=27, MD=24,
    ME=22, MK=19, MR=27, MT=31, MU=30, NL=18, NO=15, PK=24, PL=28, PS=29, PT=25, QA=29,
    RO=24, RS=22, SA=24, SC=31, SE=24, SI=19, SK=24, SM=27, ST=25, SV=28, TL=23, TN=24,
    TR=26, UA=29, VA=22, VG=24, XK=20)
_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2}|[a-z]{2})\d\d(?: ?[A-Za-z0-9]){11,30}")


def iban_ok(iban):
    """Whether an IBAN (no spaces) has its country's length and a valid mod-97 check:
    iban_ok("DE89370400440532013000") -> True."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _ibans(text, libraries, runs):
    # an account number holds a run of 7 or more digits (in practice, in every country's format):
    # IBANs are looked for up to 40 characters around one
    for m in _in_windows(_IBAN, text, _windows(text, runs, 40, 40)):
        length = IBAN_LENGTHS.get(m[1].upper())
        if length is None:
            continue
        # the country's number of characters, spaces aside; the IBAN must end there
        count, end = 0, m.start()
        while end < m.end() and count < length:
            count += text[end] != " "
            end += 1
        iban = text[m.start():end].replace(" ", "").upper()
        if count == length and not text[end:end + 1].isalnum() and iban_ok(iban):
            yield m.start(), end


_SSN = re.compile(r"(?<![\w\-])(?!000|666|9)\d{3}(-| ?)(?!00)\d\d\1(?!0000)\d{4}(?![\w\-]|[.,]\d)")
_SSN_WORDS = re.compile(r"\b(?:ssn|ss#|ss no|social security(?: number| no)?)\b\.?\W{0,12}$")


def _ssns(text, libraries, runs):
    for m in _in_windows(_SSN, text, runs):
        # 123-45-6789 anywhere; 123 45 6789 and 123456789 after a word that says so
        if m[1] == "-" or _SSN_WORDS.search(_before(text, m.start())):
            yield m.span()


# ----------------------------------------------------------------------------- secrets

_TOKEN_START = r"(?<![A-Za-z0-9_\-])"
_TOKEN_END = r"(?![A-Za-z0-9_\-])"
_TOKEN = r"[A-Za-z0-9_\-]"
# (the strings one of which must be in a text for the pattern to match, the pattern); where a
# pattern has a group named "secret", that group is the secret and the rest its context
_SECRETS = [(triggers, re.compile(pattern)) for triggers, pattern in [
    # AWS: an access key id; a secret access key, 40 characters after a name that says so
    (("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
     rf"{_TOKEN_START}(?:AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{{16}}{_TOKEN_END}"),
    (("aws", "AWS", "Aws"),
     r"(?i:aws.{0,20}?(?:secret|private)[\w.\-]{0,20}?[\"']?\s*[:=]>?\s*[\"']?)"
     r"(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"),
    # GitHub, GitLab, Slack
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
     rf"{_TOKEN_START}gh[pousr]_[A-Za-z0-9]{{36,255}}{_TOKEN_END}"),
    (("github_pat_",), rf"{_TOKEN_START}github_pat_[A-Za-z0-9_]{{60,255}}{_TOKEN_END}"),
    (("glpat-", "gldt-", "glrt-", "glptt-", "glft-", "glsoat-", "glcbt-", "gloas-"),
     rf"{_TOKEN_START}(?:glpat|gldt|glrt|glptt|glft|glsoat|glcbt|gloas)-{_TOKEN}{{20,}}"),
    (("xox",), rf"{_TOKEN_START}xox[abposre]-(?:\d+-)*[A-Za-z0-9\-]{{10,}}"),
    (("hooks.slack.com",), r"https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9_/]+"),
    # Stripe
    (("k_live_", "k_test_"), rf"{_TOKEN_START}[sr]k_(?:live|test)_[A-Za-z0-9]{{16,}}{_TOKEN_END}"),
    (("whsec_",), rf"{_TOKEN_START}whsec_[A-Za-z0-9]{{24,}}{_TOKEN_END}"),
    # Google: an API key, an OAuth client secret, an OAuth access token
    (("AIza",), rf"{_TOKEN_START}AIza{_TOKEN}{{35}}{_TOKEN_END}"),
    (("GOCSPX-",), rf"{_TOKEN_START}GOCSPX-{_TOKEN}{{28}}{_TOKEN_END}"),
    (("ya29.",), rf"{_TOKEN_START}ya29\.{_TOKEN}{{20,}}"),
    # Anthropic; OpenAI: T3BlbkFJ inside, the newer prefixes, the older 48 characters
    (("sk-",), rf"{_TOKEN_START}sk-ant-(?:api|admin)\d\d-{_TOKEN}{{32,}}"),
    (("T3BlbkFJ",),
     rf"{_TOKEN_START}sk-(?:proj-|svcacct-|admin-|None-)?{_TOKEN}{{20,}}T3BlbkFJ{_TOKEN}{{20,}}"),
    (("sk-",), rf"{_TOKEN_START}sk-(?:proj|svcacct|admin)-{_TOKEN}{{40,}}"),
    (("sk-",), rf"{_TOKEN_START}sk-[A-Za-z0-9]{{48}}{_TOKEN_END}"),
    # Hugging Face, npm, PyPI, SendGrid, Twilio
    (("hf_",), rf"{_TOKEN_START}hf_[A-Za-z0-9]{{34,}}{_TOKEN_END}"),
    (("npm_",), rf"{_TOKEN_START}npm_[A-Za-z0-9]{{36}}{_TOKEN_END}"),
    (("pypi-AgEIcHlwaS5vcmc",), rf"{_TOKEN_START}pypi-AgEIcHlwaS5vcmc{_TOKEN}{{50,}}"),
    (("SG.",), rf"{_TOKEN_START}SG\.{_TOKEN}{{22}}\.{_TOKEN}{{43}}{_TOKEN_END}"),
    (("SK",), rf"{_TOKEN_START}SK[0-9a-f]{{32}}{_TOKEN_END}"),
    # a JWT: base64url of '{"' (eyJ) in its header and payload, then a signature
    (("eyJ",), rf"{_TOKEN_START}eyJ{_TOKEN}{{8,}}\.eyJ{_TOKEN}{{8,}}\.{_TOKEN}{{16,}}"),
    # a password in a URL: scheme://user:password@host
    (("://",), r"(?<=://)[^\s:/@]+:(?P<secret>[^\s/@]+)(?=@[\w.\-]+)"),
    # a private key, from BEGIN to END (or to the end of its base64 lines when the END is missing)
    (("PRIVATE KEY",),
     r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]{0,20000}?"
     r"-----END \1PRIVATE KEY(?: BLOCK)?-----|(?:\s*(?:[A-Za-z\-]+: .*|[A-Za-z0-9+/=]{16,}))+)"),
    # a PuTTY key file's private lines
    (("Private-MAC",), r"Private-Lines: \d+\s+(?:[A-Za-z0-9+/=]+\s+)+Private-MAC: [0-9a-f]+"),
]]
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=.:]{20,}")


def _secrets(text, libraries, runs):
    # a text with no "_" has none of the keys with one in their prefix: one scan instead of eleven
    underscore = "_" in text
    for triggers, pattern in _SECRETS:
        if not underscore and "_" in triggers[0]:
            continue
        # around each trigger: a key is at most ~1,000 characters, a private-key block ~20,000
        reach = 25_000 if "PRIVATE KEY" in triggers else 1_024
        for m in _in_windows(pattern, text, _windows_around(text, triggers, 256, reach)):
            yield m.span("secret") if "secret" in pattern.groupindex else m.span()
    patterns = _detect_secrets_patterns(libraries)
    if patterns:
        # detect-secrets' patterns only around a token of 20 or more characters, as every key is
        long_tokens = (m.span() for m in _LONG_TOKEN.finditer(text))
        windows = _windows(text, long_tokens, 100, 100)
        for pattern in patterns:
            for m in _in_windows(pattern, text, windows):
                group = next((g for g in range(1, (pattern.groups or 0) + 1) if m[g]), 0)
                if m.end(group) > m.start(group):
                    yield m.span(group)


def _detect_secrets_patterns(libraries):
    """The compiled patterns of detect-secrets' providers, when installed and allowed, else []."""
    if not libraries:
        return []
    if "detect_secrets" not in _libraries:
        patterns = []
        try:
            from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
            from detect_secrets.plugins.base import RegexBasedDetector
        except ImportError:
            pass
        else:
            # the providers' token formats; not IPs and private keys (found here, a key block
            # whole, where its pattern finds only the BEGIN line), keywords or entropy (prose
            # trips them)
            skip = {"IPPublicDetector", "PrivateKeyDetector", "KeywordDetector",
                    "Base64HighEntropyString", "HexHighEntropyString"}
            for cls in get_mapping_from_secret_type_to_class().values():
                if issubclass(cls, RegexBasedDetector) and cls.__name__ not in skip:
                    patterns += list(cls.denylist)
        _libraries["detect_secrets"] = patterns
    return _libraries["detect_secrets"]


FINDERS = {"EMAIL": _emails, "PHONE": _phones, "IP": _ips, "CARD": _cards, "IBAN": _ibans,
           "SSN": _ssns, "SECRET": _secrets}

"""A labelled set for scrub.py, made by code with a fixed seed: positives (a text with one piece of
personal data or one secret, and the text as it should come out) of every kind, in varied formats
and contexts, and look-alikes (texts that must come out unchanged): versions, dates, times, ISBNs,
prices, scores, page ranges, coordinates, WikiText's number markers, hashes, IDs and the like.

    positives()[0]  -> ('EMAIL', 'JOHN.SMITH@EXAMPLE.COM', '<EMAIL>')
    lookalikes()[0] -> ('version', 'Upgrade to version 2.4.1.0 before Friday.')

tests/test_scrub.py asserts the scrubber's recall and false positives on it; bench/bench_scrub.py
prints them per kind for docs/RESULTS.md.
"""

import base64
import json
import random
import string

FIRST = ["maria", "john", "wei", "fatima", "olga", "liam", "aiko", "carlos", "priya", "noah",
         "emma", "jean-luc",
         "søren", "zoë", "ahmed", "lena", "raj", "chloe", "mateo", "ines"]
LAST = ["garcia", "smith", "zhang", "khan", "ivanova", "murphy", "tanaka", "silva", "patel",
        "müller", "dubois",
        "o.brien", "nguyen", "rossi", "kowalski", "larsen"]
DOMAINS = ["example.org", "example.com", "mail.example.co.uk", "uni-example.de", "example.io",
           "corp.example.net",
           "example.fr", "post.example.ac.jp", "example-mail.com", "example.museum"]

# where a piece of data is found: prose, a signature, a log line, JSON, CSV, a config file,
# markdown, code
CONTEXTS = [
    "Write to {} for details.",
    "For questions, contact {}.",
    "{}",
    "Contact: {}",
    "He gave us {} and left.",
    '{{"user": "x", "value": "{}"}}',
    "id,name,value\n17,Alex,{}\n",
    "2024-03-02 11:04:55 INFO value={} accepted",
    "| field | {} |",
    "value = \"{}\"\n",
    "Her details ({}) were in the letter.",
    "  - {}\n",
    "Reply to: {}\nThanks,\nSam",
    "Please update the record to {}; the old one is gone.",
]


def rand_chars(rng, n, alphabet=string.ascii_letters + string.digits):
    return "".join(rng.choice(alphabet) for _ in range(n))


# ----------------------------------------------------------------------------- positives, one maker
# per kind

def emails(rng):
    first, last, domain = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    local = rng.choice([f"{first}.{last}", f"{first}_{last}{rng.randint(1, 99)}", f"{first}+news",
                        f"{first[0]}{last}",
                        f"{first}.{last}".upper(), f"{first}{rng.randint(1970, 2005)}",
                        f"info-{last}"])
    forms = [f"{local}@{domain}", f"mailto:{local}@{domain}", f"<{local}@{domain}>"]
    form = rng.choice(forms)
    if rng.random() < 0.1:  # spelled out
        name, host = domain.split(".", 1)
        return f"{first} [at] {name} [dot] {host.replace('.', ' [dot] ')}", "<EMAIL>"
    address = form.split(":")[-1].strip("<>")
    return form, form.replace(address, "<EMAIL>")


def phones(rng):
    d = lambda n: "".join(rng.choice(string.digits) for _ in range(n))  # noqa: E731
    area = rng.choice(["212", "415", "312", "617", "202", "305", "206", "512", "646", "718", "303",
                       "404"])
    exchange = str(rng.randint(201, 989))
    forms = [
        f"({area}) {exchange}-{d(4)}", f"{area}-{exchange}-{d(4)}", f"{area}.{exchange}.{d(4)}",
        f"+1 {area} {exchange} {d(4)}", f"+1-{area}-{exchange}-{d(4)}", f"1-800-{exchange}-{d(4)}",
        f"+44 20 7{d(3)} {d(4)}", f"020 7{d(3)} {d(4)}", f"+44 (0)20 7{d(3)} {d(4)}",
        f"07700 9{d(5)}",
        f"+44 7700 9{d(5)}", f"+49 30 {d(8)}", f"030 {d(8)}", f"(030) {d(7)}", f"0171 {d(7)}",
        f"+49 171 {d(7)}",
        f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}", f"01 {d(2)} {d(2)} {d(2)} {d(2)}",
        f"06.{d(2)}.{d(2)}.{d(2)}.{d(2)}",
        f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}", f"+91 98{d(3)} {d(5)}", f"+61 2 9{d(3)} {d(4)}",
        f"(02) 9{d(3)} {d(4)}",
        f"06-{rng.randint(1, 5)}{d(7)}", f"+31 6 {rng.randint(1, 5)}{d(7)}",
        f"+34 91{d(1)} {d(3)} {d(3)}", f"+81 3-{d(4)}-{d(4)}", f"03-{d(4)}-{d(4)}",
        f"0049 30 {d(7)}", f"+39 06 {d(4)} {d(4)}", f"+41 44 {d(3)} {d(2)} {d(2)}",
        f"+353 1 {d(3)} {d(4)}",
        f"+1 ({area}) {exchange}-{d(4)}", f"+7 495 {d(3)}-{d(2)}-{d(2)}", f"+55 11 9{d(4)}-{d(4)}",
    ]
    number = rng.choice(forms)
    if rng.random() < 0.25:  # with a word that says so
        said = rng.choice([f"Tel. {number}", f"Phone: {number}", f"call me at {number}",
                           f"Fax {number}",
                           f"mobile {number}"])
        return said, said.replace(number, "<PHONE>")
    return number, "<PHONE>"


PHONE_SAID = [  # numbers in no standard layout, found by the word before them
    ("Tel: 555-0142", "Tel: <PHONE>"), ("call 912 345 678 tomorrow", "call <PHONE> tomorrow"),
    ("phone number: 2125550147", "phone number: <PHONE>"), ("Mobile: 0612345678",
                                                            "Mobile: <PHONE>"),
]


def ips(rng):
    octet = lambda lo=0: str(rng.randint(lo, 255))  # noqa: E731
    forms = [
        f"{rng.randint(11, 223)}.{octet()}.{octet()}.{octet(1)}",
        f"10.{octet()}.{octet()}.{octet(1)}",
        f"192.168.{rng.randint(0, 20)}.{octet(2)}",
        f"172.{rng.randint(16, 31)}.{octet()}.{octet(1)}",
        f"203.0.113.{octet(1)}", f"198.51.100.{octet(1)}",
    ]
    v6 = lambda: "%x" % rng.randint(1, 0xffff)  # noqa: E731
    forms6 = [f"2001:db8:{v6()}:{v6()}::{v6()}", f"fe80::{v6()}:{v6()}:{v6()}:{v6()}",
              ":".join(v6() for _ in range(8)),
              f"2001:0db8:85a3:0000:0000:8a2e:0370:{rng.randint(1000, 9999)}",
              f"2a00:1450:4001:{v6()}::200e", "::ffff:192.0.2.%d" % rng.randint(1, 254)]
    address = rng.choice(forms) if rng.random() < 0.65 else rng.choice(forms6)
    wrapped = rng.choice([
        (address, "<IP>"), (f"ssh admin@{address}", "ssh admin@<IP>"),
        (f"Request from {address} blocked", "Request from <IP> blocked"),
        (f"host={address}:8080", "host=<IP>:8080"), (f"[{address}] GET /index.html 200",
                                                     "[<IP>] GET /index.html 200"),
        (f"the server at {address} answered", "the server at <IP> answered"),
        (f"ping {address}", "ping <IP>"),
    ])
    if ":" in address and wrapped[0].startswith("host="):
        wrapped = (f"host=[{address}]:8080", "host=[<IP>]:8080")
    return wrapped


def luhn_complete(prefix, length, rng):
    digits = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    for check in string.digits:
        total = 0
        for i, c in enumerate(reversed(digits + check)):
            v = int(c) * (2 if i % 2 else 1)
            total += v - 9 if v > 9 else v
        if total % 10 == 0:
            return digits + check


def cards(rng):
    kind = rng.choice(["visa", "mc", "mc2", "amex", "discover", "jcb", "visa13"])
    prefix, length = {"visa": ("4", 16), "mc": (str(rng.randint(51, 55)), 16), "mc2": ("2221", 16),
                      "amex": (rng.choice(["34", "37"]), 15), "discover": ("6011", 16),
                      "jcb": ("3530", 16),
                      "visa13": ("4", 13)}[kind]
    number = luhn_complete(prefix, length, rng)
    if kind == "amex" and rng.random() < 0.7:
        text = rng.choice([" ", "-"]).join([number[:4], number[4:10], number[10:]])
    elif kind == "visa13" or rng.random() < 0.3:
        text = number
    else:
        sep = rng.choice([" ", "-"])
        text = sep.join(number[i:i + 4] for i in range(0, length, 4))
    return rng.choice([(text, "<CARD>"), (f"card {text} exp 09/27", "card <CARD> exp 09/27"),
                       (f"Paid with {text}.", "Paid with <CARD>."), (f"CC: {text}", "CC: <CARD>")])


IBAN_FORMATS = {"DE": "8n10n", "GB": "4a6n8n", "FR": "5n5n11c2n", "ES": "4n4n1n1n10n",
                "IT": "1a5n5n12c",
                "NL": "4a10n", "BE": "3n7n2n", "CH": "5n12c", "AT": "5n11n", "PL": "8n16n",
                "SE": "3n16n1n",
                "IE": "4a6n8n", "PT": "4n4n11n2n"}


def make_iban(country, rng):
    body = ""
    for part in IBAN_FORMATS[country].replace("n", "n ").replace("a", "a ").replace("c",
                                                                                    "c ").split():
        n, kind = int(part[:-1]), part[-1]
        alphabet = {"n": string.digits, "a": string.ascii_uppercase,
                    "c": string.ascii_uppercase + string.digits}
        body += "".join(rng.choice(alphabet[kind]) for _ in range(n))
    number = int("".join(str(int(c, 36)) for c in body + country + "00"))
    return f"{country}{98 - number % 97:02d}{body}"


def ibans(rng):
    iban = make_iban(rng.choice(sorted(IBAN_FORMATS)), rng)
    text = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)) if rng.random() < 0.6 else iban
    return rng.choice([(text, "<IBAN>"), (f"IBAN: {text}", "IBAN: <IBAN>"),
                       (f"transfer it to {text} by Monday", "transfer it to <IBAN> by Monday")])


def ssns(rng):
    area = rng.choice([n for n in range(1, 900) if n != 666])
    number = f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    return rng.choice([
        (number, "<SSN>"), (f"SSN: {number}", "SSN: <SSN>"),
        (f"her social security number is {number}.", "her social security number is <SSN>."),
        (f"SSN {number.replace('-', ' ')}", "SSN <SSN>"),
        (f"SSN: {number.replace('-', '')}", "SSN: <SSN>"),
    ])


def jwt(rng):
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    header = {"alg": "HS256", "typ": "JWT"}
    payload = {"sub": str(rng.randint(1, 10**9)), "name": "x"}
    signature = rand_chars(rng, 43, string.ascii_letters + string.digits + "-_")
    return f"{part(header)}.{part(payload)}.{signature}"


def pem(rng, kind):
    base64_chars = string.ascii_letters + string.digits + "+/"
    body = "\n".join(rand_chars(rng, 64, base64_chars) for _ in range(rng.randint(3, 8)))
    return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"


def secrets(rng):
    upper = string.ascii_uppercase + string.digits
    secret = rng.choice([
        lambda: "AKIA" + rand_chars(rng, 16, upper),
        lambda: "ASIA" + rand_chars(rng, 16, upper),
        lambda: "ghp_" + rand_chars(rng, 36),
        lambda: "github_pat_" + rand_chars(rng, 22) + "_" + rand_chars(rng, 59),
        lambda: "glpat-" + rand_chars(rng, 20, string.ascii_letters + string.digits + "_-"),
        lambda: "xoxb-" + str(rng.randint(10**10, 10**11)) + "-" + str(rng.randint(10**10,
                                                                                   10**11)) + "-"
        + rand_chars(rng, 24),
        lambda: "sk_live_" + rand_chars(rng, 24),
        lambda: "rk_test_" + rand_chars(rng, 24),
        lambda: "AIza" + rand_chars(rng, 35, string.ascii_letters + string.digits + "_-"),
        lambda: "sk-proj-" + rand_chars(rng, 48, string.ascii_letters + string.digits + "_-"),
        lambda: "sk-" + rand_chars(rng, 48),
        lambda: "hf_" + rand_chars(rng, 34),
        lambda: "npm_" + rand_chars(rng, 36),
        lambda: "SG." + rand_chars(rng, 22) + "." + rand_chars(rng, 43),
        lambda: jwt(rng),
        lambda: pem(rng, rng.choice(["RSA ", "EC ", "OPENSSH ", ""])),
    ])()
    context = rng.choice([
        (secret, "<SECRET>"), (f"export API_TOKEN={secret}", "export API_TOKEN=<SECRET>"),
        (f'token: "{secret}"', 'token: "<SECRET>"'), (f"Authorization: Bearer {secret}",
                                                      "Authorization: Bearer <SECRET>"),
        (f"the key {secret} was leaked", "the key <SECRET> was leaked"),
    ])
    return context


SECRET_FIXED = [  # forms that need their context
    ('aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
     'aws_secret_access_key = "<SECRET>"'),
    ("AWS_SECRET_ACCESS_KEY=je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY",
     "AWS_SECRET_ACCESS_KEY=<SECRET>"),
    ("git clone https://deploy:s3cr3tPassw0rd@git.example.com/repo.git",
     "git clone https://deploy:<SECRET>@git.example.com/repo.git"),
    ("postgres://app:Xy9-pQ2_long@db.internal:5432/prod",
     "postgres://app:<SECRET>@db.internal:5432/prod"),
    ("https://hooks.slack.com/services/T0ABCDEFG/B0HIJKLMN/abcdefghijklmnopqrstuvwx", "<SECRET>"),
]

# written by hand, in formats and from sources other than the makers above (providers' documented
# examples, RFCs' documentation ranges); the makers' patterns were not tuned on these
WRITTEN = {
    "EMAIL": [("JOHN.SMITH@EXAMPLE.COM", "<EMAIL>"), ("j.o'brien@example.ie", "<EMAIL>"),
              ("test.email+alex@leetcode.com,", "<EMAIL>,"), ("(mail: a.b@c-d.example.com)",
                                                              "(mail: <EMAIL>)"),
              ("jane(at)example(dot)org", "<EMAIL>"), ("名前@example.jp", "<EMAIL>"),
              ("first.last@sub-domain.example.travel", "<EMAIL>"), ("Send it to:bob@example.org",
                                                                    "Send it to:<EMAIL>")],
    "PHONE": [("+44-20-7946-0958", "<PHONE>"), ("(+44) 20 7946 0958", "<PHONE>"),
              ("+1 212.555.0147", "<PHONE>"),
              ("212 555 0147", "<PHONE>"), ("1 (800) 555-0199", "<PHONE>"), ("+49 (0)30 1234567",
                                                                             "<PHONE>"),
              ("+49-30-1234567", "<PHONE>"), ("+86 138 0013 8000", "<PHONE>"), ("+27 21 123 4567",
                                                                                "<PHONE>"),
              ("0800 123 4567", "<PHONE>"), ("+44 20 7946 0958 ext. 123", "<PHONE> ext. 123"),
              ("Tel.: +33 (0)1 23 45 67 89", "Tel.: <PHONE>"), ("+852 2123 4567", "<PHONE>"),
              ("555-0147", "<PHONE>"), ("+1 (212) 555-0147", "<PHONE>")],
    "IP": [("inet 127.0.0.1 netmask", "inet <IP> netmask"), ("10.0.0.1/8", "<IP>/8"),
           ("192.168.001.001", "<IP>"),
           ("IP:8.8.8.8", "IP:<IP>"), ("client 2001:db8::ff00:42:8329", "client <IP>"),
           ("http://93.184.216.34/index", "http://<IP>/index"), ("DNS 1.1.1.1", "DNS <IP>"),
           ("::1", "<IP>")],
    "CARD": [("5555 5555 5555 4444", "<CARD>"), ("4012888888881881", "<CARD>"),
             ("6011 0009 9013 9424", "<CARD>"),
             ("3714 496353 98431", "<CARD>"), ("5105-1051-0510-5100", "<CARD>"),
             ("4111 1111 1111 1111 exp 12/25", "<CARD> exp 12/25"),
             ("4111.1111.1111.1111", "<CARD>")],
    "IBAN": [("GB29 NWBK 6016 1331 9268 19", "<IBAN>"),
             ("FR14 2004 1010 0505 0001 3M02 606", "<IBAN>"),
             ("CH93 0076 2011 6238 5295 7", "<IBAN>"), ("NL91ABNA0417164300", "<IBAN>"),
             ("iban: de89 3704 0044 0532 0130 00", "iban: <IBAN>")],
    "SSN": [("078-05-1120", "<SSN>"), ("SSN#: 219-09-9999", "SSN#: <SSN>"),
            ("social security no. 536 90 4399", "social security no. <SSN>")],
    "SECRET": [
        ("gho_16C7e42F292c6912E7710c838347Ae178B4a", "<SECRET>"),
        ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "<SECRET>"),
        ("AIzaSyDaGmWKa4JsXZ-HjGw7ISLn_3namBGewQe", "<SECRET>"),
        ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9l"
         "IiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c", "<SECRET>"),
        ("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI\n"
         "-----END ENCRYPTED PRIVATE KEY-----", "<SECRET>"),
        ("-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQOYBF0Mt4QBCADJzk7p7Gf4xKMZ3oZ9hQ2T\n"
         "-----END PGP PRIVATE KEY BLOCK-----", "<SECRET>"),
        ("mongodb+srv://admin:pa55w0rd@cluster0.example.net",
         "mongodb+srv://admin:<SECRET>@cluster0.example.net"),
        ("xoxp-1234567890-1234567890-1234567890-abcdef0123456789abcdef0123456789", "<SECRET>")],
}

MAKERS = {"EMAIL": emails, "PHONE": phones, "IP": ips, "CARD": cards, "IBAN": ibans, "SSN": ssns,
          "SECRET": secrets}
FIXED = {"PHONE": PHONE_SAID, "SECRET": SECRET_FIXED}


def positives(per_kind=80, seed=0):
    """[(kind, text, the text as scrubbed)]: per_kind texts of every kind: the written ones, then
    made ones, each put in a context."""
    rng = random.Random(seed)
    cases = []
    for kind, make in MAKERS.items():
        found = list(FIXED.get(kind, [])) + WRITTEN[kind]
        while len(found) < per_kind:
            value, scrubbed = make(rng)
            context = rng.choice(CONTEXTS)
            if "\n" in value and "{}" != context:
                context = "{}"
            found.append((context.format(value), context.format(scrubbed)))
        cases += [(kind, text, scrubbed) for text, scrubbed in found]
    return cases


# ----------------------------------------------------------------------------- look-alikes

LOOKALIKES = {
    "version": [
        "Upgrade to version 2.4.1.0 before Friday.", "Chrome 120.0.6099.109 fixes it.",
        "Python 3.11.4 is out.",
        "release 10.2.0.15 notes", "The 1.2.3.4 release adds a parser.",
        "pip install numpy==1.26.4",
        "requires >= 4.0.1.2", "firmware 3.10.2.8 on the router", "v1.2.3.4",
        "bumped to 2.0.1.3", "kernel 5.15.0.91", "tag v10.20.30.40", "Windows 10.0.19045.3693",
        "Version: 7.1.2.201", "1.2.3.4", "Section 4.2.1.3 says so.", "see 2.1.1.1 and 2.1.1.2",
        "build 6.0.2.100 (stable)", "package foo-1.2.3.4.tar.gz", "the 0.9.8.7 beta",
        "updated 4.4.2.2",
        "Release 15.4.1.0 was tagged.", "It needs Java 1.8.0.292.", "appVersion = 3.2.1.0",
    ],
    "date": [
        "on 2024-01-15 the office closed", "15.01.2024", "01/15/2024", "15/01/2024", "2024/01/15",
        "January 15, 2024", "15 January 2024", "Born 1987-06-30.", "the 1990–2000 decade",
        "from 1914 to 1918",
        "20240115", "dated 03.04.2021 and 05.06.2022", "12/31/1999 23:59", "FY2023-24",
        "2023-11-05T14:30:00Z",
        "the years 1990 2000 2010", "1 March 2019 – 2 April 2020", "Q3 2024",
        "on 31.12.2023 at noon",
        "2019-2020 season", "from 05/06/07", "dated 2021.03.04",
    ],
    "time": [
        "at 10:30", "10:30:45", "23:59:59.999", "10:30 AM", "the race took 2:03:40", "lap 1:23.456",
        "Open 09:00–17:30", "at 12:00:00 UTC", "John 3:16", "ratio 16:9", "a 4:3 screen",
        "chapter 12:1-14",
    ],
    "isbn": [
        "ISBN 978-3-16-148410-0", "ISBN-10: 0-306-40615-2", "ISBN 0306406152", "978-0-596-52068-7",
        "ISBN 978 0 14 044913 6", "ISBN: 9780140449136", "ISSN 0317-8471", "doi:10.1000/182",
        "(ISBN 1-86197-876-9)",
        "ISBN 0 19 852663 6", "ISBN 978-1-4028-9462-6", "isbn 85-359-0277-5",
    ],
    "price": [
        "$1,234.56", "€ 1.234,56", "USD 12,345,678", "£19.99", "1 234 567 €", "It cost $2,499,999.",
        "¥ 120 000",
        "EUR 3.450.000,00", "$ 4 500 000", "price: 1299.00", "a 50,000,000 dollar deal",
        "US$ 12.5 million",
        "$212 555 0147 in damages", "CHF 1'250'000",
    ],
    "score": [
        "won 3–2", "21-18", "6-4, 6-3, 7-6", "102 – 98", "a 2-1 win", "lost 0 - 3",
        "score 24-17 at half time",
        "31–28 in overtime", "sets 6–4 6–7 7–5", "went 12-4-1", "a 4-4-2 formation",
        "the 3-5-2 system",
    ],
    "page range": [
        "pp. 123–145", "pages 1203-1215", "p. 45", "pp 12-19, 33-41", "vol. 12, no. 3, pp. 201-230",
        "see pages 100 - 200", "pp. 1234–1256", "§ 12.3.4", "in 12(3):45-67", "Vol 4, 1023-1049",
    ],
    "coordinate": [
        "51.5074° N, 0.1278° W", "40.7128, -74.0060", "+40.712776 -74.005974",
        "48°51′24″N 2°21′03″E",
        "lat 35.6762 lon 139.6503", "(52.5200, 13.4050)", "-33.8688, 151.2093",
        "N 47° 22.567 E 008° 32.410",
        "+51.5074-000.1278", "grid ref 123 456", "at 40.689247, -74.044502",
        "UTM 33U 389586 5819924",
    ],
    "wikitext": [
        "a population of 1 @,@ 000 people", "about 3 @.@ 5 km long", "12 @,@ 345 @,@ 678 visitors",
        "the 2 @,@ 000 @,@ 000 residents", "a 1 @.@ 2 @.@ 3 ratio", "$ 1 @,@ 250 @,@ 000 in 1998",
        "from 1 @,@ 024 to 4 @,@ 096", "it scored 7 @.@ 8 / 10", "the M @-@ 28 road",
        "9 @,@ 834 km2 ( 3 @,@ 797 sq mi )",
        "( 1 @,@ 234 @,@ 567 @,@ 890 )", "up 4 @.@ 2 % to 1 @,@ 000 @,@ 000",
    ],
    "number": [
        "12,345,678", "12 345 678", "population 1234567890", "3.14159", "1e-10", "0.0001",
        "a 1024 x 768 image",
        "ZIP 90210", "10115 Berlin", "SW1A 1AA", "room 1204", "flight BA 0117", "order #123456789",
        "invoice 2024-000123", "the 100 000 000 km mark", "1,000,000,000", "2 + 2 = 4",
        "45 % of 1,200",
        "a 4,096-bit key", "serial 1234567890123456", "tracking 1Z999AA10123456784",
        "4111 1111 1111 1112",
        "9780306406157", "account 12345678", "1700000000000 ms", "0.5 mg/kg", "-273.15 °C",
        "1 000 000 people",
        "100-200-300", "+3 points", "+12.5%", "from 555 to 1212", "Patent 7,654,321",
        "tel. ext. 12",
        "1 212 555 people", "DE89 3704 0044 0532 0130 01", "AB12 CDEF GHIJ KLMN OPQR",
        "000-12-3456", "666-12-3456", "123-00-4567", "987-65-4321", "GB82 WEST 1234 5698 7654 33",
    ],
    "email-like": [
        "icon@2x.png", "logo@3x.jpg", "@username on Twitter", "user @ example", "follow @jane_doe",
        "C@t", "foo@bar", "the @,@ marker", "email me", "@media (max-width: 600px)",
        "@property def x(self):",
        "a = b @ c", "at@", "name at example dot com", "npm i @scope/pkg@1.2.3",
    ],
    "ip-like": [
        "256.1.1.1", "192.168.1", "1.2.3", "10.0.0.256", "999.999.999.999", "12:34:56:78",
        "00:1A:2B:3C:4D:5E",
        "std::vector<int>", "Foo::Bar::baz()", "a::b", "10:30:00", "3.4.5.6.7", "1.1.1", "fe80:",
        "deadbeef", "0x7f000001",
    ],
    "secret-like": [
        "AKIA", "AKIAEXAMPLE", "ghp_xxx", "sk-learn", "9fceb02d0ae598e95dc970b74767f19372d61af8",
        "123e4567-e89b-12d3-a456-426614174000", "d41d8cd98f00b204e9800998ecf8427e",
        "SGVsbG8gV29ybGQ=",
        "api_key = YOUR_API_KEY", "sk_test", "xoxb", "AIza", "hf_hub_download", "npm_config_cache",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n"
        "-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n"
        "-----END CERTIFICATE-----",
        "eyJ", "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "the password is stored in a vault", "https://example.com/path:to@",
        "ssh-rsa AAAAB3NzaC1yc2E user@host",
        "token_type=bearer", "BEGIN PRIVATE KEY is a header", "gho_", "glpat-", "ya29.",
    ],
}


# written by hand after the patterns, to check them on text they were not made for
LOOKALIKES["written later"] = [
    "Apollo 11 landed on 20 July 1969 at 20:17:40 UTC.",
    "The A380 seats 853 passengers over 15,200 km.",
    "Call of Duty 4 sold 15 million copies.", "Population (2011): 1,234,567 people",
    "Dial M for Murder (1954)",
    "ISO 8601: 2007-04-05T14:30Z", "a Boeing 737-800 and an F-16", "catalogue no. 0123 4567 89",
    "UPC 036000291452",
    "EAN 4006381333931", "45.4215° N, 75.6972° W", "build 2048.1024.512.256", "the 0.0.0.0 route",
    "Windows NT 6.1.7601.17514", "Matthew 5:3–12", "Psalm 23:1-6", "The call was at 10:45:30.",
    "His phone was a Nokia 3310.", "Tel Aviv 6473925", "route 66 and I-95", "€ 2 500 000",
    "kr 12 345",
    "12.5% of 1 234 567", "Mac OS X 10.15.7.1", "Server: nginx/1.18.0.1",
    "Mozilla/5.0 (X11; Linux x86_64)",
    "a 1:50,000 map", "RFC 5322 and RFC 3339", "A4 is 210 × 297 mm", "he ran 100 m in 9.58 s",
    "the 2010–11 season: 38 games, 27 wins", "Model 2100-4500-3300", "pp. 1–3, 5–7, 9–11",
    "Born 12 May 1820, died 13 August 1910", "(+3.2 dB)", "tel. 3", "+/- 0.5 mm", "0.1.2.3",
    "in the 1 600 m and 5 000 m", "The 1992–93 FA Cup", "at 51°30′26″N 0°7′39″W",
    "H2O2, CO2 and C6H12O6",
    "an ID of 0000-0002-1825-0097 (ORCID)", "arXiv:1706.03762", "doi:10.1038/nature14539",
    "PMID 31452104",
    "1 @,@ 234 @,@ 567 @,@ 890 @,@ 123", "the 5 @.@ 56 × 45 mm round", "a 32 @-@ bit address",
]


def isbn13(rng):
    digits = "978" + "".join(rng.choice(string.digits) for _ in range(9))
    check = (10 - sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(digits)) % 10) % 10
    return f"{digits[:3]}-{digits[3]}-{digits[4:8]}-{digits[8:12]}-{check}"


def not_luhn(digits):
    """digits, its last one changed if the whole passes the Luhn check."""
    total = sum((d - 9 if d > 9 else d) for d in (int(c) * (2 if i % 2 else 1) for i,
                                                  c in enumerate(digits[::-1])))
    return digits[:-1] + str((int(digits[-1]) + 1) % 10) if total % 10 == 0 else digits


def generated_lookalikes(rng):
    """{category: [text]} made at random: the same kinds of look-alike in other numbers."""
    n = lambda lo, hi: rng.randint(lo, hi)  # noqa: E731
    part = not_luhn("".join(f"{n(0, 9999):04d}" for _ in range(4)))
    y, m, d = n(1900, 2030), n(1, 12), n(1, 28)
    version = ".".join(str(n(0, 30)) for _ in range(4))
    word = rng.choice(["version", "release", "Version", "build", "upgrade to", "v", "firmware"])
    return {
        "version": [f"{word} {version}".replace("v ", "v"), ".".join(str(n(0,
                                                                           9)) for _ in range(4))],
        "date": [rng.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{m:02d}/{d:02d}/{y}",
                             f"{d}/{m}/{y}", f"{y}/{m:02d}/{d:02d}", f"{y}{m:02d}{d:02d}"])],
        "time": [f"{n(0, 23):02d}:{n(0, 59):02d}" + rng.choice(["", f":{n(0, 59):02d}", " pm"])],
        "isbn": [rng.choice(["ISBN ", "", "ISBN-13: "]) + isbn13(rng)],
        "price": [rng.choice(["$", "€", "£", "USD ",
                              "EUR "]) + f"{n(1000, 99999999):,}" + rng.choice(["", ".00"])],
        "score": [f"{n(0, 130)}{rng.choice(['-', '–', ' – ', ' - '])}{n(0, 130)}"],
        "page range": [f"pp. {(a := n(1, 2000))}{rng.choice(['-', '–'])}{a + n(1, 60)}"],
        "coordinate": [f"{rng.uniform(-90, 90):.{n(4, 6)}f}, {rng.uniform(-180, 180):.{n(4, 6)}f}"],
        "wikitext": [" @,@ ".join([str(n(1, 999))] + [f"{n(0, 999):03d}" for _ in range(n(1, 3))]),
                     f"{n(0, 99)} @.@ {n(0, 99)}"],
        # long numbers, of which a card's layout: they fail the Luhn check, as most long numbers do
        "number": [not_luhn(str(n(10**12, 10**16))), " ".join(part[i:i + 4] for i in range(0, 16,
                                                                                           4))],
    }


def lookalikes(generated=20, seed=1):
    """[(category, text)]: texts that must come out unchanged; the written ones, then `generated`
    rounds of generated_lookalikes."""
    rng = random.Random(seed)
    cases = [(category, text) for category, texts in LOOKALIKES.items() for text in texts]
    for _ in range(generated):
        cases += [(c, text) for c, texts in generated_lookalikes(rng).items() for text in texts]
    return cases

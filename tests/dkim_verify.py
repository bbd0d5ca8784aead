#!/usr/bin/python3
"""Verifies every DKIM signature of each message file given, with an
independent implementation (Debian's python3-dkim, dkimpy) and the public
keys given as SELECTOR._domainkey.DOMAIN=TXT arguments instead of DNS.

Prints one line per message: FILE, then ok/fail for each signature (or
"unsigned"), and exits 1 if any signature fails."""
import sys

import dkim

records = {}
files = []
for arg in sys.argv[1:]:
    name, sep, txt = arg.partition("=")
    if sep and "._domainkey." in name:
        records[name.lower().rstrip(".")] = txt.encode()
    else:
        files.append(arg)


def dnsfunc(name, timeout=5):
    if isinstance(name, bytes):
        name = name.decode()
    return records.get(name.lower().rstrip("."))


failed = 0
for path in files:
    with open(path, "rb") as f:
        message = f.read()
    d = dkim.DKIM(message)
    count = sum(1 for (k, _) in d.headers if k.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            ok = d.verify(idx=i, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            print(path, "signature", i, e, file=sys.stderr)
            ok = False
        failed += 0 if ok else 1
        results.append("ok" if ok else "fail")
    print(path, " ".join(results) if results else "unsigned")
sys.exit(1 if failed else 0)

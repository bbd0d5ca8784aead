#!/usr/bin/env bash
# Configures the machine's Postfix as a strict judge of SMTP clients and
# (re)starts it: smtpd on 127.0.0.1:10025 (all extensions) and 127.0.0.1:10026
# (PIPELINING hidden), both refusing improper pipelining and bare newlines,
# discarding what they accept. Needs root and Debian's postfix package.
# Idempotent; used by tests/postfix.rs. Each test runs in a process of its
# own: the lock makes them take turns, and a Postfix already configured so
# is left alone (a reload under a test that is sending would disturb it).
set -euo pipefail
command -v postfix >/dev/null || { echo "postfix is not installed (apt-get install postfix)" >&2; exit 1; }
exec 9>/run/volley-strict-postfix.lock
flock 9
changed=0
main=$(mktemp)
trap 'rm -f "$main" "${master_new:-}"' EXIT
cat > "$main" <<'CF'
compatibility_level = 3.6
myhostname = strict.test
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = loopback-only
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = discard
relay_transport = discard
maillog_file = /var/log/postfix-strict.log
smtpd_forbid_unauth_pipelining = yes
smtpd_forbid_bare_newline = reject
smtpd_forbid_bare_newline_exclusions =
smtpd_tls_security_level = may
smtpd_tls_cert_file = /etc/ssl/certs/ssl-cert-snakeoil.pem
smtpd_tls_key_file = /etc/ssl/private/ssl-cert-snakeoil.key
CF
cmp -s "$main" /etc/postfix/main.cf || { cp "$main" /etc/postfix/main.cf; changed=1; }
master=/etc/postfix/master.cf
master_new=$(mktemp)
sed '/^127\.0\.0\.1:1002[56] /d;/^  -o smtpd_discard_ehlo_keywords=pipelining$/d' "$master" > "$master_new"
cat >> "$master_new" <<'CF'
127.0.0.1:10025 inet n - n - - smtpd
127.0.0.1:10026 inet n - n - - smtpd
  -o smtpd_discard_ehlo_keywords=pipelining
CF
cmp -s "$master_new" "$master" || { cp "$master_new" "$master"; changed=1; }
if ! postfix status >/dev/null 2>&1; then
  postfix start
elif [ "$changed" = 1 ]; then
  postfix reload
fi
for _ in $(seq 50); do
  if (exec 3<>/dev/tcp/127.0.0.1/10025 && exec 4<>/dev/tcp/127.0.0.1/10026) 2>/dev/null; then exit 0; fi
  sleep 0.2
done
echo "postfix smtpd did not start listening on 127.0.0.1:10025/10026" >&2
exit 1

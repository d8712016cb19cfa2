#!/bin/sh
# A command signer in shell: jq makes the signed bytes, openssl signs them (DESIGN.md,
# "Commands").
#
#   sign.sh OPERATOR_KEY.pem < envelope.json              the envelope, signed
#   sign.sh OPERATOR_KEY.pem --canonical < envelope.json  the bytes it signs
#
# envelope.json: {"id", "device_id", "name", "args", "issued_at", "expires_at"}; the key: the
# operator's Ed25519 private key, PKCS#8 PEM (simkeeper fleet keygen). Needs jq and OpenSSL 3
# (pkeyutl -rawin). `jq -cjS` sorts keys at every level and drops whitespace; it writes U+007F
# as \u007f where DESIGN.md wants the raw byte, which sed puts back (only where the backslash
# starts an escape: after an even run of backslashes).
set -eu
key=$1
mode=${2:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
jq -c 'del(.sig)' > "$tmp/envelope.json"
del=$(printf '\177')
jq -cjS . < "$tmp/envelope.json" \
  | LC_ALL=C sed -E -e ':a' -e 's/(^|[^\\])((\\\\)*)\\u007f/\1\2'"$del"'/' -e 'ta' > "$tmp/signed"
if [ "$mode" = --canonical ]; then
  cat "$tmp/signed"
  exit 0
fi
openssl pkeyutl -sign -rawin -inkey "$key" -in "$tmp/signed" -out "$tmp/sig"
sig=$(openssl base64 -A < "$tmp/sig" | tr '+/' '-_' | tr -d '=')
jq -c --arg sig "$sig" '. + {sig: $sig}' < "$tmp/envelope.json"

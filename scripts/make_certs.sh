#!/usr/bin/env bash
# Self-signed CA and a SuperLink certificate for TLS on this machine (tests, trials).
#   scripts/make_certs.sh DIR [HOST_IP]
# Writes DIR/ca.crt, DIR/ca.key, DIR/server.pem, DIR/server.key. The server certificate
# names 127.0.0.1, localhost and HOST_IP (if given). For real sites, use certificates
# from your own CA and name the SuperLink's public address.
set -euo pipefail
dir="${1:?usage: make_certs.sh DIR [HOST_IP]}"
host_ip="${2:-}"
mkdir -p "$dir"
san="IP:127.0.0.1,DNS:localhost${host_ip:+,IP:$host_ip}"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=lorm-flwr test CA" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' "$san" > "$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 30 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
rm -f "$dir/server.csr" "$dir/server.ext" "$dir/ca.srl"
echo "certificates in $dir: ca.crt server.pem server.key"

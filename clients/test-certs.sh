#!/usr/bin/env bash
# Makes the throwaway certificates the client test suites run the broker
# with (TLS and mutual TLS), in OUT_DIR:
#
#   ca.pem, ca.key             a test CA
#   server.pem, server.key     the broker: localhost and 127.0.0.1, signed by the CA
#   client.pem, client.key     a client: DNS name client.tidings.test, signed by the CA
#   other-ca.pem               a second CA that signed none of them (a client
#                              that trusts only it must refuse the broker)
#
# Usage: bash clients/test-certs.sh OUT_DIR
# Needs the openssl command (1.1.1 or later). Keys are P-256, valid one day.
set -euo pipefail

if [ "$#" -ne 1 ]; then
  echo "usage: bash clients/test-certs.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
cd "$1"

ca() { # NAME CN
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj "/CN=$2" -keyout "$1.key" -out "$1.pem" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
}

leaf() { # NAME CN SAN EKU
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
  printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
    "$4" "$3" >"$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
    -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}

ca ca "tidings test CA"
ca other-ca "another CA"
rm -f other-ca.key
leaf server localhost "DNS:localhost,IP:127.0.0.1" serverAuth
leaf client client.tidings.test "DNS:client.tidings.test" clientAuth
rm -f ca.srl

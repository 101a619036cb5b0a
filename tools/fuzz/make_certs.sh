#!/usr/bin/env bash
# Writes the test PKI of the nbd_tls fuzz target into tools/fuzz/certs/ (committed; run again
# only to replace it). Small EC P-256 keys, valid for 100 years: they protect nothing.
#   ca-*        the CA the server trusts for client certificates (--tls-ca) and that signed
#               the server's certificate (the fuzzing client checks the server against it)
#   server-*    the server's certificate (localhost) and key
#   client-*    a client certificate signed by the CA: admitted by --tls-verify-peer
#   foreign-*   a client certificate signed by another CA (foreign-ca-*): refused
#   selfsigned-*  a self-signed client certificate: refused
set -euo pipefail
cd "$(dirname "$0")/certs"
days=36500
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() { key "$1-key.pem"; openssl req -x509 -new -key "$1-key.pem" -out "$1-cert.pem" -subj "$2" -days $days; }
issue() { # name subject ca ext
    key "$1-key.pem"
    openssl req -new -key "$1-key.pem" -out "$1.csr" -subj "$2"
    printf '%b' "$4" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$3-cert.pem" -CAkey "$3-key.pem" -CAcreateserial \
        -out "$1-cert.pem" -days $days -extfile "$1.ext" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
server_ext='subjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n'
client_ext='extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n'
ca ca "/CN=cowdisk fuzz CA"
ca foreign-ca "/CN=cowdisk fuzz foreign CA"
issue server "/CN=localhost" ca "$server_ext"
issue client "/CN=fuzz client" ca "$client_ext"
issue foreign "/CN=fuzz foreign client" foreign-ca "$client_ext"
key selfsigned-key.pem
openssl req -x509 -new -key selfsigned-key.pem -out selfsigned-cert.pem -subj "/CN=fuzz self-signed client" -days $days
rm -f ./*.srl ca-key.pem.bak
ls

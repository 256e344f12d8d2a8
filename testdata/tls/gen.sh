#!/usr/bin/env bash
# Regenerates the PEM keys and certificates used by the TLS tests.
# Needs only the openssl command line (written against OpenSSL 3.0).
# Usage: ./gen.sh   (from any directory; overwrites existing files)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

DAYS=36500                       # 100 years
PASSPHRASE='rpyc-test-passphrase'

TMP="$(mktemp -d ./.gen-tmp.XXXXXX)"
trap 'rm -rf "$TMP"' EXIT        # CSRs, serial files, config/ext file

# ---------------------------------------------------------------- config ---
cat > "$TMP/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt             = no
[dn]

[v3_root]
basicConstraints       = critical, CA:TRUE
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[v3_intermediate]
basicConstraints       = critical, CA:TRUE, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[server_alt]
DNS.1 = localhost
IP.1  = 127.0.0.1
IP.2  = ::1

[v3_server_rsa]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature, keyEncipherment
extendedKeyUsage       = serverAuth
subjectAltName         = @server_alt
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[v3_server_ec]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectAltName         = @server_alt
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[v3_client_alice]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature, keyEncipherment
extendedKeyUsage       = clientAuth
subjectAltName         = DNS:alice.example, email:alice@example.com
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[v3_client_bob]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = clientAuth
subjectAltName         = DNS:bob.example
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[v3_client_carol]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = clientAuth
subjectAltName         = DNS:carol.example
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always

[v3_client_mallory]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature, keyEncipherment
extendedKeyUsage       = clientAuth
subjectAltName         = DNS:mallory.example
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid:always
CNF
CNF="$TMP/openssl.cnf"

# --------------------------------------------------------------- helpers ---
# Run a command, showing its stderr only if it fails (openssl is chatty).
quiet() { "$@" 2>"$TMP/stderr" || { cat "$TMP/stderr" >&2; return 1; }; }

# Key generators; each writes exactly the PEM form named.
rsa_pkcs1()  { quiet openssl genrsa -traditional -out "$1" "$2"; }
rsa_pkcs8()  { quiet openssl genpkey -algorithm RSA -pkeyopt "rsa_keygen_bits:$2" -out "$1"; }
ec_sec1()    { quiet openssl ecparam -genkey -name "$2" -noout -out "$1"; }
ec_pkcs8()   { quiet openssl genpkey -algorithm EC -pkeyopt "ec_paramgen_curve:$2" -pkeyopt ec_param_enc:named_curve -out "$1"; }
ed25519()    { quiet openssl genpkey -algorithm ED25519 -out "$1"; }

# self_signed KEY CERT SUBJECT EXT_SECTION
self_signed() {
    openssl req -new -x509 -config "$CNF" -key "$1" -out "$2" -subj "$3" \
        -extensions "$4" -days "$DAYS" -sha256
}

# sign KEY CERT SUBJECT EXT_SECTION CA_CERT CA_KEY [extra req args...]
sign() {
    local key=$1 cert=$2 subj=$3 ext=$4 cacert=$5 cakey=$6
    shift 6
    local csr="$TMP/$(basename "$cert" .pem).csr"
    openssl req -new -config "$CNF" -key "$key" -subj "$subj" -out "$csr" "$@"
    quiet openssl x509 -req -in "$csr" -out "$cert" -days "$DAYS" -sha256 \
        -CA "$cacert" -CAkey "$cakey" \
        -CAserial "$TMP/$(basename "$cacert" .pem).srl" -CAcreateserial \
        -extfile "$CNF" -extensions "$ext"
}

# ------------------------------------------------------------------- CAs ---
rsa_pkcs8 ca.key 2048
self_signed ca.key ca.pem "/CN=rpyc test root CA" v3_root

ec_pkcs8 intermediate.key P-256
sign intermediate.key intermediate.pem "/CN=rpyc test intermediate CA" v3_intermediate ca.pem ca.key

rsa_pkcs8 other-ca.key 2048
self_signed other-ca.key other-ca.pem "/CN=rpyc other test root CA" v3_root

# --------------------------------------------------------------- servers ---
rsa_pkcs1 server-rsa2048.key 2048
sign server-rsa2048.key server-rsa2048.pem "/CN=localhost" v3_server_rsa ca.pem ca.key

rsa_pkcs8 server-rsa4096.key 4096
sign server-rsa4096.key server-rsa4096.pem "/CN=localhost" v3_server_rsa ca.pem ca.key

ec_sec1 server-p256.key prime256v1
sign server-p256.key server-p256.pem "/CN=localhost" v3_server_ec ca.pem ca.key

ec_pkcs8 server-p384.key P-384
sign server-p384.key server-p384.pem "/CN=localhost" v3_server_ec ca.pem ca.key

ed25519 server-ed25519.key
sign server-ed25519.key server-ed25519.pem "/CN=localhost" v3_server_ec ca.pem ca.key

# Leaf signed by the intermediate; server-chain.pem = leaf + intermediate.
ec_pkcs8 server-chain.key P-256
sign server-chain.key "$TMP/server-chain-leaf.pem" "/CN=localhost" v3_server_ec intermediate.pem intermediate.key
cat "$TMP/server-chain-leaf.pem" intermediate.pem > server-chain.pem

# Encrypted PKCS#8 RSA 2048 key (PBES2, AES-256-CBC).
printf '%s' "$PASSPHRASE" > server-encrypted.passphrase
quiet openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
    -aes-256-cbc -pass file:server-encrypted.passphrase -out server-encrypted.key
sign server-encrypted.key server-encrypted.pem "/CN=localhost" v3_server_rsa ca.pem ca.key \
    -passin file:server-encrypted.passphrase

# --------------------------------------------------------------- clients ---
rsa_pkcs8 client-rsa.key 2048
sign client-rsa.key client-rsa.pem "/CN=alice" v3_client_alice ca.pem ca.key

ec_sec1 client-p256.key prime256v1
sign client-p256.key client-p256.pem "/CN=bob" v3_client_bob ca.pem ca.key

ed25519 client-ed25519.key
sign client-ed25519.key client-ed25519.pem "/CN=carol" v3_client_carol ca.pem ca.key

rsa_pkcs8 other-client.key 2048
sign other-client.key other-client.pem "/CN=mallory" v3_client_mallory other-ca.pem other-ca.key

# ---------------------------------------------------------------- checks ---
fail() { echo "CHECK FAILED: $*" >&2; exit 1; }

# Every certificate verifies against its CA, for its purpose.
for c in ca.pem intermediate.pem; do
    openssl verify -x509_strict -CAfile ca.pem "$c" >/dev/null || fail "verify $c"
done
openssl verify -x509_strict -CAfile other-ca.pem other-ca.pem >/dev/null || fail "verify other-ca.pem"
for c in server-rsa2048.pem server-rsa4096.pem server-p256.pem server-p384.pem \
         server-ed25519.pem server-encrypted.pem; do
    openssl verify -x509_strict -purpose sslserver -verify_hostname localhost -verify_ip 127.0.0.1 \
        -CAfile ca.pem "$c" >/dev/null || fail "verify $c"
done
openssl verify -x509_strict -purpose sslserver -verify_hostname localhost -verify_ip ::1 \
    -CAfile ca.pem -untrusted intermediate.pem server-chain.pem >/dev/null || fail "verify server-chain.pem"
for c in client-rsa.pem client-p256.pem client-ed25519.pem; do
    openssl verify -x509_strict -purpose sslclient -CAfile ca.pem "$c" >/dev/null || fail "verify $c"
done
openssl verify -x509_strict -purpose sslclient -CAfile other-ca.pem other-client.pem >/dev/null \
    || fail "verify other-client.pem"
# Negative: the chain leaf needs the intermediate; other-client is not trusted by ca.pem.
if openssl verify -CAfile ca.pem server-chain.pem >/dev/null 2>&1; then
    fail "server-chain.pem verified without the intermediate"
fi
if openssl verify -CAfile ca.pem other-client.pem >/dev/null 2>&1; then
    fail "other-client.pem verified against ca.pem"
fi
# server-chain.pem holds exactly two certificates: leaf, then intermediate.
[ "$(grep -c -- '-----BEGIN CERTIFICATE-----' server-chain.pem)" -eq 2 ] || fail "server-chain.pem cert count"
[ "$(sed -n '/BEGIN CERTIFICATE/,$p' server-chain.pem | sed '1,/END CERTIFICATE/d')" = "$(cat intermediate.pem)" ] \
    || fail "server-chain.pem second cert is not intermediate.pem"

# Each key matches its certificate.
for base in ca intermediate other-ca other-client server-rsa2048 server-rsa4096 server-p256 \
            server-p384 server-ed25519 server-chain server-encrypted client-rsa client-p256 \
            client-ed25519; do
    kp="$(openssl pkey -in "$base.key" -passin file:server-encrypted.passphrase -pubout)"
    cp="$(openssl x509 -in "$base.pem" -pubkey -noout)"
    [ "$kp" = "$cp" ] || fail "$base.key does not match $base.pem"
done

# Key file formats (first line of each key file).
check_header() {
    local want="-----BEGIN $2-----" got
    got="$(head -n1 "$1")"
    [ "$got" = "$want" ] || fail "$1 starts with '$got', want '$want'"
}
check_header server-rsa2048.key "RSA PRIVATE KEY"
check_header server-p256.key    "EC PRIVATE KEY"
check_header client-p256.key    "EC PRIVATE KEY"
for k in ca.key intermediate.key other-ca.key other-client.key server-rsa4096.key server-p384.key \
         server-ed25519.key server-chain.key client-rsa.key client-ed25519.key; do
    check_header "$k" "PRIVATE KEY"
done
check_header server-encrypted.key "ENCRYPTED PRIVATE KEY"
# Exactly one PEM block per key file (no EC PARAMETERS block etc.).
for k in *.key; do
    [ "$(grep -c -- '-----BEGIN' "$k")" -eq 1 ] || fail "$k has more than one PEM block"
done

# Key types.
check_type() {
    local text
    text="$(openssl pkey -in "$1" -passin file:server-encrypted.passphrase -noout -text)"
    [[ ${text%%$'\n'*} == *"$2"* ]] || fail "$1 is not $2"
}
check_type server-rsa2048.key    "Private-Key: (2048 bit"
check_type server-rsa4096.key    "Private-Key: (4096 bit"
check_type server-encrypted.key  "Private-Key: (2048 bit"
check_type client-rsa.key        "Private-Key: (2048 bit"
check_type server-p256.key       "Private-Key: (256 bit"
check_type server-chain.key      "Private-Key: (256 bit"
check_type client-p256.key       "Private-Key: (256 bit"
check_type server-p384.key       "Private-Key: (384 bit"
check_type server-ed25519.key    "ED25519 Private-Key"
check_type client-ed25519.key    "ED25519 Private-Key"

# Encrypted key: AES-256, opens with the passphrase, not without / with a wrong one.
openssl asn1parse -in server-encrypted.key | grep -q aes-256-cbc || fail "server-encrypted.key is not AES-256-CBC"
openssl pkey -in server-encrypted.key -passin file:server-encrypted.passphrase -noout \
    || fail "server-encrypted.key does not open with the passphrase"
if openssl pkey -in server-encrypted.key -passin pass: -noout </dev/null >/dev/null 2>&1; then
    fail "server-encrypted.key opens with an empty passphrase"
fi
if openssl pkey -in server-encrypted.key -passin pass:wrong -noout </dev/null >/dev/null 2>&1; then
    fail "server-encrypted.key opens with a wrong passphrase"
fi
[ "$(cat server-encrypted.passphrase)" = "$PASSPHRASE" ] && [ -z "$(tail -c1 server-encrypted.passphrase | tr -d -c '\n')" ] \
    || fail "server-encrypted.passphrase content"

# Still valid in 90 years' time.
for c in *.pem; do
    openssl x509 -in "$c" -noout -checkend $((90 * 365 * 86400)) >/dev/null || fail "$c expires within 90 years"
done

# ---------------------------------------------------------------- report ---
echo "generated in $(pwd) (all checks passed):"
for f in *.key *.pem server-encrypted.passphrase; do
    if [[ $f == *.pem ]]; then
        printf '  %-28s %s\n' "$f" "$(openssl x509 -in "$f" -noout -subject -enddate | paste -sd' ')"
    else
        printf '  %-28s %s\n' "$f" "$(head -n1 "$f")"
    fi
done

#!/usr/bin/env bash
# Runs the whole test suite: unit, integration and doc tests, with the examples built.
# It checks for (and, where it can, installs) what the tests need, and says so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "=== MISSING: $1 — $2" >&2
        exit 1
    fi
}
need cargo "install Rust with rustup (https://rustup.rs), then rerun scripts/test.sh"
need cc "install a C compiler: apt-get install -y build-essential"
need pkg-config "the openssl crate finds OpenSSL with it: apt-get install -y pkg-config libssl-dev"
if ! pkg-config --exists openssl; then
    echo "=== MISSING: OpenSSL's headers — apt-get install -y libssl-dev" >&2
    exit 1
fi
need openssl "the TLS tests drive the openssl command line: apt-get install -y openssl"

# The SSH tests start a real OpenSSH server (never a mock) and fail, not skip, without one.
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1 || ! command -v ssh-keygen >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "=== openssh-server is missing; the SSH tests need it. Installing it now:" >&2
        echo "===   apt-get update && apt-get install -y openssh-server openssh-client" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q openssh-server openssh-client >&2
    else
        echo "=== MISSING: /usr/sbin/sshd, ssh or ssh-keygen — the SSH tests start a real OpenSSH server." >&2
        echo "===   install them as root: apt-get install -y openssh-server openssh-client" >&2
        exit 1
    fi
fi
if [ "$(id -u)" != 0 ]; then
    echo "=== NOTE: not root: the SSH password-authentication test needs root to create its user" >&2
    echo "===       (useradd/chpasswd) and will FAIL; CI runs as root." >&2
fi

# The Python interoperability tests drive the real RPyC package (pinned) from a virtual
# environment of their own, target/pyenv; they fail, never skip, without it.
PYENV="$PWD/target/pyenv"
PYTHON="$PYENV/bin/python"
py_ready() {
    [ -x "$PYTHON" ] && "$PYTHON" -c 'import rpyc, plumbum; assert rpyc.__version__ == "6.0.2"; assert plumbum.__version__ == "2.0.2"' >/dev/null 2>&1
}
py_missing() {
    echo "=== MISSING: $1" >&2
    echo "===   the Python interoperability tests need python3 with venv and pip:" >&2
    echo "===   apt-get install -y python3-venv python3-pip" >&2
    exit 1
}
if py_ready; then
    echo "=== Python: $PYENV already has rpyc 6.0.2 and plumbum 2.0.2"
else
    command -v python3 >/dev/null 2>&1 || py_missing "python3"
    echo "=== Python: creating $PYENV (python3 -m venv) for the interoperability tests"
    python3 -m venv --clear "$PYENV" || py_missing "python3 -m venv failed"
    echo "=== Python: pip install rpyc==6.0.2 plumbum==2.0.2 into $PYENV (from PyPI)"
    "$PYTHON" -m pip install --disable-pip-version-check rpyc==6.0.2 plumbum==2.0.2 \
        || py_missing "pip install rpyc==6.0.2 plumbum==2.0.2 failed (is PyPI reachable?)"
    py_ready || py_missing "$PYENV still lacks rpyc 6.0.2 / plumbum 2.0.2 after pip install"
    echo "=== Python: $PYENV is ready (rpyc 6.0.2, plumbum 2.0.2)"
fi
export RPYC_TEST_PYTHON="$PYTHON"
echo "=== Python: RPYC_TEST_PYTHON=$RPYC_TEST_PYTHON"

# The version-mismatch tests also run a real RPyC 5.3.1 server (an older wire protocol): a
# second environment, target/pyenv5. They fail, never skip, without it.
PYENV5="$PWD/target/pyenv5"
PYTHON5="$PYENV5/bin/python"
py5_ready() {
    [ -x "$PYTHON5" ] && "$PYTHON5" -c 'import rpyc, plumbum; assert rpyc.__version__ == "5.3.1"; assert plumbum.__version__ == "2.0.2"' >/dev/null 2>&1
}
if py5_ready; then
    echo "=== Python: $PYENV5 already has rpyc 5.3.1 and plumbum 2.0.2"
else
    echo "=== Python: creating $PYENV5 (python3 -m venv) for the version-mismatch tests"
    python3 -m venv --clear "$PYENV5" || py_missing "python3 -m venv failed"
    echo "=== Python: pip install rpyc==5.3.1 plumbum==2.0.2 into $PYENV5 (from PyPI)"
    "$PYTHON5" -m pip install --disable-pip-version-check rpyc==5.3.1 plumbum==2.0.2 \
        || py_missing "pip install rpyc==5.3.1 plumbum==2.0.2 failed (is PyPI reachable?)"
    py5_ready || py_missing "$PYENV5 still lacks rpyc 5.3.1 / plumbum 2.0.2 after pip install"
    echo "=== Python: $PYENV5 is ready (rpyc 5.3.1, plumbum 2.0.2)"
fi
export RPYC_TEST_PYTHON5="$PYTHON5"
echo "=== Python: RPYC_TEST_PYTHON5=$RPYC_TEST_PYTHON5"

echo "=== rpyc test suite: cargo test (unit, integration, doc tests; builds examples)"
cargo test --locked "$@"

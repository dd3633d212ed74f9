# Sourced by scripts/demo and scripts/test: creates .venv on first use and installs gpushare
# (editable) with its test dependencies from the package index. Needs only Python 3.10+.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "gpushare needs Python 3.10 or newer; $py is $("$py" --version 2>&1)" >&2
    exit 1
fi
# Editable in "compat" mode: the checkout itself goes on sys.path, so packages added later are
# found without reinstalling. The stamp changes with pyproject.toml and with this mode.
stamp=".venv/.installed-compat-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    [ -x .venv/bin/python ] || "$py" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q --config-settings editable_mode=compat -e '.[test]'
    rm -f .venv/.installed-*
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"

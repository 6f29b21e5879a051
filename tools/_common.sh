# Sourced by the launch scripts: the interpreter (this repo's .venv if there is one, else $PYTHON or
# python) and argument checks that fail early with one line.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
check_config() { [[ -f "$1" ]] || die "config file not found: ${1:-<missing>} (usage: $USAGE)"; }
check_count() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '${2:-}' (usage: $USAGE)"
}

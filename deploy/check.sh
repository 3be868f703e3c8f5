#!/usr/bin/env bash
# Static checks of the deployment files, run from the repository root:
#
#   bash deploy/check.sh
#
# Prints one line per check and exits non-zero if any check fails. Installs
# promtool (Debian's prometheus package) and PyYAML when they are missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

failures=0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

pass() { printf 'ok    %s\n' "$1"; }
skip() { printf 'skip  %s (%s)\n' "$1" "$2"; }
fail() {
    printf 'FAIL  %s\n' "$1"
    if [ -n "${2:-}" ]; then
        printf '%s\n' "$2" | sed 's/^/      /'
    fi
    failures=$((failures + 1))
}

# run NAME COMMAND...: one check, its output shown only when it fails.
run() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then
        pass "$name"
    else
        fail "$name" "$out"
    fi
}

# --- tools ------------------------------------------------------------------

if ! command -v promtool >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
command -v promtool >/dev/null 2>&1 || { fail "promtool installed"; exit 1; }

if ! python3 -c 'import yaml' >/dev/null 2>&1; then
    python3 -m pip install -q pyyaml >/dev/null 2>&1 \
        || python3 -m pip install -q --break-system-packages pyyaml >/dev/null 2>&1 \
        || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-yaml >/dev/null; } \
        || true
fi
python3 -c 'import yaml' >/dev/null 2>&1 || { fail "PyYAML installed"; exit 1; }

# --- Prometheus ---------------------------------------------------------------

run "promtool check rules deploy/prometheus/alerts.yml" \
    promtool check rules deploy/prometheus/alerts.yml
run "promtool test rules deploy/prometheus/alerts.test.yml" \
    promtool test rules deploy/prometheus/alerts.test.yml
run "promtool check config deploy/prometheus/scrape.yml" \
    promtool check config deploy/prometheus/scrape.yml

# --- JSON ---------------------------------------------------------------------

while IFS= read -r -d '' f; do
    run "json $f" python3 -m json.tool "$f"
done < <(find deploy -type f -name '*.json' -print0 | sort -z)

# --- YAML ---------------------------------------------------------------------

yaml_check() {
    python3 - "$1" <<'PY'
import sys, yaml
with open(sys.argv[1], encoding="utf-8") as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
if not docs:
    sys.exit("no YAML document")
for d in docs:
    if not isinstance(d, dict):
        sys.exit("a document is not a mapping")
    if "kind" not in d or "apiVersion" not in d:
        sys.exit("a document lacks kind or apiVersion")
PY
}
while IFS= read -r -d '' f; do
    run "yaml $f" yaml_check "$f"
done < <(find deploy/kubernetes -type f \( -name '*.yaml' -o -name '*.yml' \) -print0 | sort -z)

# The relay.toml embedded in the ConfigMap must be valid TOML.
toml_check() {
    python3 - <<'PY'
import sys, yaml
try:
    import tomllib
except ImportError:
    sys.exit(0)  # Python < 3.11: nothing to check with
with open("deploy/kubernetes/configmap.yaml", encoding="utf-8") as f:
    cm = yaml.safe_load(f)
cfg = tomllib.loads(cm["data"]["relay.toml"])
for key in ("server", "spool", "accounts", "targets", "routes"):
    if key not in cfg:
        sys.exit(f"relay.toml lacks [{key}]")
PY
}
run "toml deploy/kubernetes/configmap.yaml (relay.toml)" toml_check

# The kustomization builds (only where kubectl is at hand).
if command -v kubectl >/dev/null 2>&1; then
    run "kubectl kustomize deploy/kubernetes" kubectl kustomize deploy/kubernetes
else
    skip "kubectl kustomize deploy/kubernetes" "no kubectl"
fi

# --- shell and systemd --------------------------------------------------------

run "bash -n deploy/check.sh" bash -n deploy/check.sh

# systemd-analyze needs the binary to exist: verify a copy that runs /bin/true.
unit_check() {
    local dir rc=0
    dir=$(mktemp -d)
    sed 's#/usr/local/bin/wxrelay#/bin/true#g' deploy/systemd/wxrelay.service > "$dir/wxrelay.service"
    systemd-analyze verify "$dir/wxrelay.service" || rc=$?
    rm -rf "$dir"
    return "$rc"
}
if command -v systemd-analyze >/dev/null 2>&1; then
    run "systemd-analyze verify deploy/systemd/wxrelay.service" unit_check
else
    skip "systemd-analyze verify deploy/systemd/wxrelay.service" "no systemd-analyze"
fi

# --- result -------------------------------------------------------------------

if [ "$failures" -ne 0 ]; then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
echo "all deployment checks passed"
